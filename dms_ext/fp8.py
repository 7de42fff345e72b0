"""FP8 KV cache helpers: per-layer scales for ``DMSCache(kv_dtype=torch.float8_e4m3fn)``.

vLLM's rule: scale = amax / 448 per pool and layer, so the largest K (V) value seen in
calibration stores as +-448 and nothing of that data saturates. Calibrate on a cache in the
compute dtype, then build the fp8 cache with the scales::

    calib = DMSCache(..., dtype=torch.bfloat16)
    with record_amax(calib) as amax:
        ...                                    # the model's forward passes over some prompts
    cache = DMSCache(..., dtype=torch.bfloat16, kv_dtype=torch.float8_e4m3fn,
                     k_scale=amax.k_scales(), v_scale=amax.v_scales())
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, List

from .cache import DMSCache
from .reference import FP8_MAX

__all__ = ["Amax", "record_amax", "scales_from_amax"]


def scales_from_amax(amax: List[float]) -> List[float]:
    """amax / 448 per layer; 1.0 for a layer with no (or no finite, nonzero) amax."""
    return [a / FP8_MAX if math.isfinite(a) and a > 0 else 1.0 for a in amax]


class Amax:
    """Per-layer max |k| and |v| seen by DMSCache.attend while recording."""

    def __init__(self, num_layers: int):
        self.k = [0.0] * num_layers
        self.v = [0.0] * num_layers

    def k_scales(self) -> List[float]:
        return scales_from_amax(self.k)

    def v_scales(self) -> List[float]:
        return scales_from_amax(self.v)


@contextlib.contextmanager
def record_amax(cache: DMSCache) -> Iterator[Amax]:
    """Records the per-layer amax of the k / v every ``cache.attend`` and ``cache.decode_step``
    gets inside the block (decode_step's k as stored: normed and roped at its position, redone
    by eviction_rope on a copy). Reads each amax back to the host: a sync per call, so not
    inside a CUDA graph capture."""
    import torch

    amax = Amax(cache.num_layers)
    attend, step = cache.attend, cache.decode_step

    def record(layer, k, v):
        if k.numel():  # the call validated its arguments: layer is an int in range
            amax.k[layer] = max(amax.k[layer], float(k.detach().abs().max()))
            amax.v[layer] = max(amax.v[layer], float(v.detach().abs().max()))

    def recording(layer, seq_ids, cu_seqlens, q, k, v, *args, **kwargs):
        out = attend(layer, seq_ids, cu_seqlens, q, k, v, *args, **kwargs)
        record(layer, k, v)
        return out

    def recording_step(layer, seq_ids, q, k, v, cos_sin_cache, alpha_scale=100.0,
                       alpha_offset=5.0, q_norm_weight=None, k_norm_weight=None, norm_eps=1e-6,
                       logits=None, scale=None):
        out = step(layer, seq_ids, q, k, v, cos_sin_cache, alpha_scale, alpha_offset,
                   q_norm_weight, k_norm_weight, norm_eps, logits, scale)
        if k.numel():
            lay = cache._layers[layer]
            pos = lay.num_tokens[cache._rows_of(seq_ids)] - 1     # the step appended one token
            kk = k.to(cache.dtype).clone()
            torch.ops.dms.eviction_rope(q.clone(), kk, pos, cos_sin_cache, float(alpha_scale),
                                        float(alpha_offset), q_norm_weight, k_norm_weight,
                                        float(norm_eps))
            record(layer, kk, v)
        return out

    cache.attend, cache.decode_step = recording, recording_step
    try:
        yield amax
    finally:
        del cache.attend, cache.decode_step
