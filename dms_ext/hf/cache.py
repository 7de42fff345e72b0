"""DMSCacheHF: a transformers Cache over dms_ext.DMSCache for a patched model."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..cache import DMSCache, to_device
from .settings import state_of


@dataclass
class ForwardPlan:
    """What one forward with a DMSCacheHF feeds to every layer (packed chunks)."""
    seq_ids: List[int]
    cu_seqlens: torch.Tensor           # int32 CPU [n + 1]
    positions: torch.Tensor            # int64 on the model device [T]
    index: Optional[torch.Tensor]      # flat row indices of the packed tokens, None: all of them
    max_position: int
    counts: List[int]
    layers_done: int = 0               # layers whose attention went through the cache

    @property
    def is_decode(self) -> bool:
        return self.index is None and len(self.counts) > 0 and all(c == 1 for c in self.counts)


class LayerView(CacheLayerMixin):
    """What transformers asks of one layer; the data lives in DMSCache."""
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, parent: "DMSCacheHF"):
        super().__init__()
        self._parent = parent

    def lazy_initialization(self, key_states, value_states, *args, **kwargs) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("DMSCacheHF: attention of a DMS model does not call update(); "
                           "was the model patched (dms_ext.hf.patch_model)?")

    def get_mask_sizes(self, query_length, *args, **kwargs):
        q = query_length if isinstance(query_length, int) else int(query_length.shape[-1])
        return q + self._parent.get_seq_length(), 0

    def get_seq_length(self, *args, **kwargs) -> int:
        return self._parent.get_seq_length()

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1

    def reset(self) -> None:
        pass


class DMSCacheHF(Cache):
    """A transformers Cache over :class:`dms_ext.DMSCache` for a patched model.

    Batch row b of the model's inputs is sequence ``seq_ids[b]`` (added on the first call).
    Padding columns (attention_mask 0) never enter the cache: each call packs the valid tokens
    of every row into one chunk per sequence. ``get_seq_length`` counts columns (as transformers
    expects for slicing a continued prompt), positions count each sequence's own tokens.
    ``batch_repeat_interleave`` / ``batch_select_indices`` / ``reorder_cache`` fork and release
    sequences. ``crop`` is impossible (evicted keys are gone) and raises.

    Pass it under the argument name of the installed transformers (``hf.cache_kwargs(model,
    cache)``); either name works. A forward that does not reach the cache raises
    :class:`dms_ext.hf.DMSCacheBypassed` (never a silent dense run).

    Decode steps on CUDA (one token per sequence, no padding) run as CUDA graphs when
    ``cuda_graphs`` is true (the default): the first step of a batch runs eagerly, the second
    captures the step over all layers with a :class:`dms_ext.DecodePlan`, later steps replay it
    (a changed batch, e.g. after a release or a beam reorder, is captured again).

    Pool exhaustion: each layer's ``DMSCache.attend`` raises ``OutOfBlocks`` before touching
    that layer, but the layers before it in the same forward have already appended, so after an
    OutOfBlocks the sequences of that call are inconsistent: release them (size the pool with
    ``from_model``, which assumes no eviction at all, to never get there)."""

    def __init__(self, cache: DMSCache, *, cuda_graphs: bool = True):
        if not isinstance(cache, DMSCache):
            raise ValueError(f"cache: expected a dms_ext.DMSCache, got {type(cache).__name__}")
        super().__init__(layers=[LayerView(self) for _ in range(cache.num_layers)])
        self.dms = cache
        self.seq_ids: List[int] = []
        self.positions: Dict[int, int] = {}
        self.cuda_graphs = bool(cuda_graphs)
        self.graph_replays = 0          # decode steps served by a CUDA graph replay
        self.graph_captures = 0
        self._seen = 0
        self._plan: Optional[ForwardPlan] = None
        self._packed: Optional[tuple] = None
        self._reached = True            # set False by the outer model's hook, True by the decoder
        self._graph = None              # graphs.DecodeGraph of the current decode batch
        self._last_decode: Optional[tuple] = None

    @classmethod
    def from_model(cls, model, *, max_seqs: int, max_tokens: Optional[int] = None,
                   block_size: Optional[int] = None, num_blocks: Optional[int] = None,
                   dtype: Optional[torch.dtype] = None, device=None,
                   cuda_graphs: bool = True, kv_dtype: Optional[torch.dtype] = None,
                   k_scale=1.0, v_scale=1.0) -> "DMSCacheHF":
        """A cache sized for ``max_seqs`` sequences of up to ``max_tokens`` tokens each with no
        eviction at all (the worst case); pass ``num_blocks`` to size the pool yourself.
        ``max_tokens`` defaults to the config's ``dms_preallocate_for_tokens`` and
        ``block_size`` to its ``dms_paged_attention_block_size`` (else 64). ``kv_dtype``,
        ``k_scale``, ``v_scale`` go to :class:`dms_ext.DMSCache` as they are (FP8 KV cache:
        ``kv_dtype=torch.float8_e4m3fn`` with per-layer scales from ``dms_ext.fp8``)."""
        st = state_of(model).settings
        if max_tokens is None:
            max_tokens = st.preallocate_for_tokens
            if max_tokens is None:
                raise ValueError("max_tokens: required (the config has no dms_preallocate_for_tokens)")
        if block_size is None:
            block_size = st.block_size or 64
        cfg = model.config
        hkv = cfg.num_key_value_heads
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        p = next(model.parameters())
        per_head = -(-int(max_tokens) // block_size)
        if num_blocks is None:
            num_blocks = max_seqs * hkv * per_head
        c = DMSCache(cfg.num_hidden_layers, hkv, d, window=st.window, block_size=block_size,
                     num_blocks=num_blocks, max_seqs=max_seqs, dtype=dtype or p.dtype,
                     device=device if device is not None else p.device,
                     max_blocks_per_head=max(1, min(num_blocks, per_head)),
                     kv_dtype=kv_dtype, k_scale=k_scale, v_scale=v_scale)
        return cls(c, cuda_graphs=cuda_graphs)

    # -- transformers' Cache API
    def get_seq_length(self, layer_idx: int = 0, *args, **kwargs) -> int:
        return self._seen

    def get_mask_sizes(self, query_length, layer_idx: int = 0, *args, **kwargs):
        q = query_length if isinstance(query_length, int) else int(query_length.shape[-1])
        return q + self._seen, 0

    def get_max_length(self, layer_idx=None) -> int:
        return -1

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return bool(self.seq_ids)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("DMSCacheHF: crop is impossible, evicted keys are gone")

    def reset(self) -> None:
        for s in list(self.seq_ids):
            self.release(s)
        self.seq_ids = []
        self._seen = 0

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._reselect([i for i in range(len(self.seq_ids)) for _ in range(int(repeats))])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._reselect([int(i) for i in torch.as_tensor(indices).reshape(-1).tolist()])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._reselect([int(i) for i in torch.as_tensor(beam_idx).reshape(-1).tolist()])

    def _reselect(self, rows: List[int]) -> None:
        """New batch row i = old row rows[i]: first use keeps the sequence, repeats fork it, and
        the unused ones are released first, so their rows and blocks can serve the forks."""
        if not self.seq_ids:
            return
        old = self.seq_ids
        if any(not 0 <= r < len(old) for r in rows):
            raise ValueError(f"indices: expected rows in [0, {len(old)}), got {rows}")
        keep = {old[r] for r in rows}
        for sid in old:
            if sid not in keep:
                self.dms.release(sid)
                self.positions.pop(sid, None)
        used = set()
        new = []
        for r in rows:
            sid = old[r]
            if sid in used:
                new.append(self.fork(sid))
            else:
                used.add(sid)
                new.append(sid)
        self.seq_ids = new

    # -- sequences, for generate()
    def add_sequence(self) -> int:
        sid = self.dms.add_sequence()
        self.positions[sid] = 0
        return sid

    def fork(self, seq_id: int) -> int:
        nid = self.dms.fork(seq_id)
        self.positions[nid] = self.positions[seq_id]
        return nid

    def release(self, seq_id: int) -> None:
        self.dms.release(seq_id)            # closes any decode plan (and so graph) using it
        self.positions.pop(seq_id, None)
        if seq_id in self.seq_ids:
            self.seq_ids.remove(seq_id)

    def set_packed(self, seq_ids: Sequence[int], counts: Sequence[int]) -> None:
        """The next model call gets input_ids [1, sum(counts)]: chunk i (counts[i] tokens)
        continues seq_ids[i]. Used by :func:`generate`; batch rows are ignored for that call."""
        if len(seq_ids) != len(counts) or any(int(c) < 1 for c in counts):
            raise ValueError("counts: expected one count >= 1 per sequence id")
        self._packed = ([int(s) for s in seq_ids], [int(c) for c in counts])

    def live_tokens(self, layer: int, seq_id: int) -> torch.Tensor:
        return self.dms.live_tokens(layer, seq_id)

    # -- per forward
    def begin(self, b: int, n: int, mask2d: Optional[torch.Tensor], device) -> ForwardPlan:
        """Packs the call's valid tokens per sequence and advances the positions."""
        if self._packed is not None:
            seq_ids, counts = self._packed
            self._packed = None
            if b != 1 or n != sum(counts):
                raise ValueError(f"input_ids: set_packed expects shape [1, {sum(counts)}], got [{b}, {n}]")
            index = None
        else:
            if not self.seq_ids:
                self.seq_ids = [self.add_sequence() for _ in range(b)]
            if len(self.seq_ids) != b:
                raise ValueError(f"input_ids: batch size {b} does not match the cache's "
                                 f"{len(self.seq_ids)} sequences")
            if mask2d is not None:
                valid = mask2d[:, -n:].detach().to("cpu", torch.bool).numpy()
                if valid.shape != (b, n):
                    raise ValueError(f"attention_mask: expected [{b}, >= {n}], got {list(mask2d.shape)}")
            else:
                valid = None
            if valid is None or valid.all():
                seq_ids, counts, index = list(self.seq_ids), [n] * b, None
            else:
                counts_all = valid.sum(axis=1)
                seq_ids = [s for s, c in zip(self.seq_ids, counts_all) if c > 0]
                counts = [int(c) for c in counts_all if c > 0]
                flat = np.flatnonzero(valid.reshape(-1))
                index = to_device(flat, device)
            self._seen += n
        pos = np.concatenate([np.arange(self.positions[s], self.positions[s] + c)
                              for s, c in zip(seq_ids, counts)]) if seq_ids else np.zeros(0, np.int64)
        for s, c in zip(seq_ids, counts):
            self.positions[s] += c
        cu = torch.zeros(len(seq_ids) + 1, dtype=torch.int32)
        if seq_ids:
            cu[1:] = torch.tensor(np.cumsum(counts), dtype=torch.int32)
        self._plan = ForwardPlan(seq_ids=seq_ids, cu_seqlens=cu,
                                 positions=to_device(pos.astype(np.int64), device),
                                 index=index, max_position=int(pos.max()) if pos.size else 0,
                                 counts=counts)
        return self._plan

    def end(self) -> None:
        self._plan = None
