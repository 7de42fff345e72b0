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
import inspect
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

    step_sig = inspect.signature(step)

    def recording_step(*args, **kwargs):
        out = step(*args, **kwargs)
        a = step_sig.bind(*args, **kwargs)   # the call validated its arguments
        a.apply_defaults()
        a = a.arguments
        if a["k"].numel():
            layer = a["layer"]
            lay = cache._layers[layer]
            pos = lay.num_tokens[cache._rows_of(a["seq_ids"])] - 1   # the step appended one token
            kk = a["k"].to(cache.dtype).clone()
            torch.ops.dms.eviction_rope(a["q"].clone(), kk, pos, a["cos_sin_cache"],
                                        float(a["alpha_scale"]), float(a["alpha_offset"]),
                                        a["q_norm_weight"], a["k_norm_weight"], float(a["norm_eps"]))
            record(layer, kk, a["v"])
        return out

    cache.attend, cache.decode_step = recording, recording_step
    try:
        yield amax
    finally:
        del cache.attend, cache.decode_step
