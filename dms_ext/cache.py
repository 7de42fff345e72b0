"""DMSCache: a paged, per-head KV cache with DMS delayed eviction (SPEC section 5).

Every mutation of the device state goes through torch.ops.dms.append / fork / release, so the
CUDA and CPU builds share one bookkeeping implementation; this file only owns the host-side
mapping of sequence ids to state rows and the block reservations.
"""
from __future__ import annotations

import math
import operator
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

__all__ = ["DMSCache", "OutOfBlocks"]


class OutOfBlocks(RuntimeError):
    """The block pool cannot hold the call. Nothing was changed: release sequences and retry."""


_CPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CUDA_DTYPES = (torch.float16, torch.bfloat16)
_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Slots are stored as (slot << 1) | flag in int32 ring entries.
_MAX_SLOTS = 1 << 30


def _as_int(value, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected an int, got a bool")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name}: expected an int, got {type(value).__name__}") from None


def _positive(value, name: str) -> int:
    v = _as_int(value, name)
    if v < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {v}")
    return v


def _ceil_div(a: np.ndarray, b: int) -> np.ndarray:
    return -(-a // b)


class _Layer:
    """Device state of one layer (layout: csrc/include/dms/params.h) + its host reservations."""

    def __init__(self, c: "DMSCache"):
        dev, hkv = c.device, c.num_kv_heads
        i32 = dict(dtype=torch.int32, device=dev)
        self.k_cache = torch.zeros(c.num_blocks, c.block_size, c.head_dim, dtype=c.dtype, device=dev)
        self.v_cache = torch.zeros_like(self.k_cache)
        self.block_table = torch.full((c.max_seqs, hkv, c.max_blocks_per_head), -1, **i32)
        self.seq_lens = torch.zeros(c.max_seqs, hkv, **i32)
        self.ring = torch.zeros(c.max_seqs, hkv, c.window + 1, **i32)
        self.num_tokens = torch.zeros(c.max_seqs, **i32)
        self.free_stack = torch.arange(c.num_blocks, **i32)
        self.free_top = torch.full((1,), c.num_blocks, **i32)
        # Reservations: free_known - pending is a lower bound of the device's free count, and
        # ub_len[row, g] an upper bound of seq_lens[row, g], both kept without reading the device.
        self.free_known = c.num_blocks
        self.pending = 0
        self.ub_len = np.zeros((c.max_seqs, hkv), dtype=np.int64)

    def sync(self, live_rows: Sequence[int]) -> None:
        """Replaces the bounds with the device's exact values (a host sync)."""
        self.free_known = int(self.free_top.item())
        self.pending = 0
        self.ub_len[:] = 0
        if live_rows:
            rows = list(live_rows)
            self.ub_len[rows] = self.seq_lens[rows].cpu().numpy()

    def state(self):
        return (self.k_cache, self.v_cache, self.block_table, self.seq_lens, self.ring,
                self.num_tokens, self.free_stack, self.free_top)


class DMSCache:
    """Paged per-head KV cache of a whole model with DMS delayed eviction (SPEC sections 1, 5).

    Each layer owns a pool of ``num_blocks`` single-head blocks of ``block_size`` tokens; every
    (sequence, KV head) holds exactly the keys its next query can see (the newest ``window + 1``
    tokens plus the older ones whose eviction decision was 0), so heads that keep more tokens
    use proportionally more blocks. Up to ``max_seqs`` sequences are live at once; a forward pass
    calls :meth:`attend` once per layer with packed chunks (prefill chunks of any length, or one
    token per sequence when decoding).

    Block reservations (why attend never reads the device on the hot path): ``append`` pops
    blocks inside the op, and how many it pops depends on the eviction decisions, which live on
    the device. Reading them back each step would stall the stream and break CUDA-graph capture
    of the decode step. Instead the host keeps, per layer,

    * ``free_known``: the exact free-block count at the last sync,
    * ``pending``: the worst-case number of blocks consumed since that sync,
    * ``ub_len[row, g]``: an upper bound of ``seq_lens[row, g]`` (slots in use).

    A chunk of ``c`` tokens on (row, g) can open at most ``ceil((ub + c) / bs) - ceil(ub / bs)``
    new blocks (evictions only reuse slots, they never need blocks). If the call's total need
    exceeds ``free_known - pending``, or some ``ub + c`` exceeds the block table
    (``max_blocks_per_head * block_size`` slots), the layer syncs once (reads ``free_top`` and the
    ``seq_lens`` of the live rows, resets the bounds) and checks again with exact lengths. If the
    call still might not fit, :class:`OutOfBlocks` is raised before anything is touched, so every
    sequence stays exactly as it was and the caller can release sequences and retry. Syncs happen
    only when the pool gets tight, roughly once per ``free/need`` steps. :meth:`release` leaves
    the bound low (the freed count is not read back); the next shortage syncs and finds the
    blocks. :meth:`fork` is off the hot path and always syncs to size the copy exactly.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, window: int = 512,
                 block_size: int = 64, num_blocks: int, max_seqs: int,
                 dtype: torch.dtype = torch.bfloat16, device="cuda",
                 max_blocks_per_head: Optional[int] = None):
        self.num_layers = _positive(num_layers, "num_layers")
        self.num_kv_heads = _positive(num_kv_heads, "num_kv_heads")
        self.head_dim = _positive(head_dim, "head_dim")
        self.window = _positive(window, "window")
        self.block_size = _positive(block_size, "block_size")
        self.num_blocks = _positive(num_blocks, "num_blocks")
        self.max_seqs = _positive(max_seqs, "max_seqs")
        self.max_blocks_per_head = (self.num_blocks if max_blocks_per_head is None
                                    else _positive(max_blocks_per_head, "max_blocks_per_head"))
        if self.max_blocks_per_head * self.block_size >= _MAX_SLOTS:
            raise ValueError(f"max_blocks_per_head: max_blocks_per_head * block_size must stay "
                             f"below 2**30 slots, got {self.max_blocks_per_head * self.block_size}")
        if self.num_blocks * self.block_size >= 2**31:
            raise ValueError("num_blocks: num_blocks * block_size must fit in int32")
        try:
            self.device = torch.empty(0, device=device).device  # resolves "cuda" to cuda:N
        except (RuntimeError, TypeError, AssertionError) as e:
            raise ValueError(f"device: {device!r} is not usable: {e}") from None
        allowed = _CUDA_DTYPES if self.device.type == "cuda" else _CPU_DTYPES
        if dtype not in allowed:
            raise ValueError(f"dtype: expected one of {list(allowed)} on {self.device.type}, got {dtype}")
        if self.device.type == "cuda":
            # What the CUDA kernels implement; failing here beats failing in the first attend.
            if self.head_dim not in (64, 128):
                raise ValueError(f"head_dim: the CUDA kernels support 64 and 128, got {self.head_dim}")
            if self.block_size & (self.block_size - 1):
                raise ValueError(f"block_size: must be a power of two on CUDA, got {self.block_size}")
        self.dtype = dtype
        self._layers = [_Layer(self) for _ in range(self.num_layers)]
        self._rows: Dict[int, int] = {}
        self._free_rows: List[int] = list(range(self.max_seqs - 1, -1, -1))
        self._next_id = 0

    # ---------------------------------------------------------------- sequences

    @property
    def seq_ids(self) -> List[int]:
        """Ids of the live sequences, oldest first."""
        return list(self._rows)

    def __contains__(self, seq_id) -> bool:
        return seq_id in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def add_sequence(self) -> int:
        """A new empty sequence; its id is never reused."""
        if not self._free_rows:
            raise RuntimeError(f"max_seqs: all {self.max_seqs} sequences are live; release one first")
        return self._take_row(self._free_rows.pop())

    def fork(self, seq_id: int) -> int:
        """An independent copy of ``seq_id`` in every layer (e.g. parallel sampling of a prompt)."""
        src = self._row(seq_id, "seq_id")
        if not self._free_rows:
            raise RuntimeError(f"max_seqs: all {self.max_seqs} sequences are live; release one first")
        live = list(self._rows.values())
        needs = []
        for i, layer in enumerate(self._layers):
            layer.sync(live)
            need = int(_ceil_div(layer.ub_len[src], self.block_size).sum())
            if need > layer.free_known:
                raise OutOfBlocks(f"fork: layer {i} needs {need} blocks to copy sequence {seq_id}, "
                                  f"{layer.free_known} are free")
            needs.append(need)
        dst = self._free_rows.pop()
        for layer, need in zip(self._layers, needs):
            torch.ops.dms.fork(src, dst, *layer.state())
            layer.free_known -= need
            layer.ub_len[dst] = layer.ub_len[src]
        return self._take_row(dst)

    def release(self, seq_id: int) -> None:
        """Drops ``seq_id``; all of its blocks go back to the pool."""
        row = self._row(seq_id, "seq_id")
        for layer in self._layers:
            torch.ops.dms.release(row, layer.block_table, layer.seq_lens, layer.ring,
                                  layer.num_tokens, layer.free_stack, layer.free_top,
                                  self.block_size)
            layer.ub_len[row] = 0
        del self._rows[seq_id]
        self._free_rows.append(row)

    def live_tokens(self, layer: int, seq_id: int) -> torch.Tensor:
        """Tokens each KV head of ``seq_id`` keeps in ``layer``: int32 [Hkv] (a copy)."""
        lay = self._layer(layer)
        return lay.seq_lens[self._row(seq_id, "seq_id")].clone()

    @property
    def num_free_blocks(self) -> int:
        """Free blocks summed over the layers' pools (reads the device)."""
        return sum(int(layer.free_top.item()) for layer in self._layers)

    # ---------------------------------------------------------------- attention

    def attend(self, layer: int, seq_ids: Sequence[int], cu_seqlens: torch.Tensor,
               q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               eviction_logits: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
        """Attention of packed chunks with DMS visibility, then appends them to the cache.

        q [T, Hq, D], k and v [T, Hkv, D] (RoPE applied), eviction_logits [T, Hkv] (logit of
        token t decides about token t-1); chunk i = rows cu_seqlens[i]:cu_seqlens[i+1]
        continues sequence seq_ids[i]. Returns out [T, Hq, D] in the cache dtype.

        Every argument is checked before anything changes. cu_seqlens may live on the CPU or
        the cache device; on the device it is read back for that check (a sync), except while
        a CUDA graph is being captured, where only the decode shape (T == len(seq_ids)) is
        accepted unread.
        """
        lay = self._layer(layer)
        rows = self._rows_of(seq_ids)
        n = len(rows)
        hkv, d = self.num_kv_heads, self.head_dim
        T = self._check_tensor(q, "q", 3, self.dtype)
        if q.shape[2] != d or q.shape[1] < 1 or q.shape[1] % hkv:
            raise ValueError(f"q: expected [T, Hq, {d}] with Hq a multiple of num_kv_heads={hkv}, "
                             f"got {list(q.shape)}")
        hq = q.shape[1]
        for t, name in ((k, "k"), (v, "v")):
            self._check_tensor(t, name, 3, self.dtype)
            if list(t.shape) != [T, hkv, d]:
                raise ValueError(f"{name}: expected [{T}, {hkv}, {d}], got {list(t.shape)}")
        self._check_tensor(eviction_logits, "eviction_logits", 2, None)
        if eviction_logits.dtype not in _LOGIT_DTYPES:
            raise ValueError(f"eviction_logits: expected a float dtype, got {eviction_logits.dtype}")
        if list(eviction_logits.shape) != [T, hkv]:
            raise ValueError(f"eviction_logits: expected [{T}, {hkv}], got {list(eviction_logits.shape)}")
        cu_host, cu_dev = self._check_cu_seqlens(cu_seqlens, n, T)
        if scale is None:
            scale = 1.0 / math.sqrt(d)
        else:
            try:
                scale = float(scale)
            except (TypeError, ValueError):
                raise ValueError(f"scale: expected a float or None, got {type(scale).__name__}") from None
            if not math.isfinite(scale):
                raise ValueError(f"scale: expected a finite float, got {scale}")
        if n == 0:
            return q.new_empty((0, hq, d))

        lens = np.diff(cu_host) if cu_host is not None else np.ones(n, dtype=np.int64)
        self._reserve(lay, layer, rows, lens)

        slots = self._to_device(np.asarray(rows, dtype=np.int32))
        if cu_dev is None:
            cu_dev = self._to_device(cu_host.astype(np.int32))
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        logits = eviction_logits.to(torch.float32).contiguous()
        if n == T:
            # Decode: after appending token t the cache holds exactly the keys query t sees.
            torch.ops.dms.append(k, v, logits, slots, cu_dev, *lay.state())
            # Gather only the block-table columns the rows can use (ub_len bounds seq_lens):
            # the full width is num_blocks by default, and copying it per step would cost more
            # than the attention itself.
            cols = max(1, -(-int(lay.ub_len[rows].max()) // self.block_size))
            out = torch.ops.dms.sparse_decode(q, lay.k_cache, lay.v_cache,
                                              lay.block_table[:, :, :cols].index_select(0, slots),
                                              lay.seq_lens.index_select(0, slots), scale)
        else:
            out = torch.ops.dms.sparse_prefill(q, k, v, logits, slots, cu_dev, lay.k_cache,
                                               lay.v_cache, lay.block_table, lay.seq_lens,
                                               lay.ring, lay.num_tokens, scale)
            torch.ops.dms.append(k, v, logits, slots, cu_dev, *lay.state())
        return out

    # ---------------------------------------------------------------- internals

    def _take_row(self, row: int) -> int:
        sid = self._next_id
        self._next_id += 1
        self._rows[sid] = row
        return sid

    def _row(self, seq_id, name: str) -> int:
        sid = _as_int(seq_id, name)
        if sid not in self._rows:
            raise ValueError(f"{name}: unknown sequence id {sid}")
        return self._rows[sid]

    def _layer(self, layer) -> _Layer:
        i = _as_int(layer, "layer")
        if not 0 <= i < self.num_layers:
            raise ValueError(f"layer: expected 0 <= layer < {self.num_layers}, got {i}")
        return self._layers[i]

    def _rows_of(self, seq_ids) -> List[int]:
        if isinstance(seq_ids, (torch.Tensor, np.ndarray)) and seq_ids.ndim == 1:
            seq_ids = seq_ids.tolist()
        if not isinstance(seq_ids, (list, tuple, range)):
            raise ValueError(f"seq_ids: expected a list of ints, got {type(seq_ids).__name__}")
        ids = [_as_int(s, "seq_ids") for s in seq_ids]
        if len(set(ids)) != len(ids):
            raise ValueError(f"seq_ids: repeated sequence id in {ids}")
        unknown = [s for s in ids if s not in self._rows]
        if unknown:
            raise ValueError(f"seq_ids: unknown sequence id(s) {unknown}")
        return [self._rows[s] for s in ids]

    def _check_tensor(self, t, name: str, ndim: int, dtype) -> int:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.device != self.device:
            raise ValueError(f"{name}: expected a tensor on {self.device}, got {t.device}")
        if dtype is not None and t.dtype != dtype:
            raise ValueError(f"{name}: expected dtype {dtype} (the cache dtype), got {t.dtype}")
        if t.dim() != ndim:
            raise ValueError(f"{name}: expected {ndim} dimensions, got shape {list(t.shape)}")
        return t.shape[0]

    def _check_cu_seqlens(self, cu, n: int, T: int):
        """Host copy of cu_seqlens (None when it cannot be read) and the device tensor if given."""
        if not isinstance(cu, torch.Tensor):
            raise ValueError(f"cu_seqlens: expected an int32 torch.Tensor, got {type(cu).__name__}")
        if cu.device.type != "cpu" and cu.device != self.device:
            raise ValueError(f"cu_seqlens: expected a tensor on {self.device} or the CPU, got {cu.device}")
        if cu.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cu_seqlens: expected dtype torch.int32, got {cu.dtype}")
        if list(cu.shape) != [n + 1]:
            raise ValueError(f"cu_seqlens: expected shape [{n + 1}] (len(seq_ids) + 1), got {list(cu.shape)}")
        on_dev = cu.device.type != "cpu"
        cu_dev = cu.to(torch.int32).contiguous() if on_dev else None
        if on_dev and n == T and torch.cuda.is_current_stream_capturing():
            # Being captured: reading values would sync. n chunks of >= 1 token over T == n
            # tokens leaves only 0, 1, ..., n, which is what the decode path assumes.
            return None, cu_dev
        host = cu.detach().cpu().numpy().astype(np.int64)
        if host[0] != 0:
            raise ValueError(f"cu_seqlens: must start at 0, got {int(host[0])}")
        if host[-1] != T:
            raise ValueError(f"cu_seqlens: must end at T = q.shape[0] = {T}, got {int(host[-1])}")
        if n and np.any(np.diff(host) < 1):
            i = int(np.argmax(np.diff(host) < 1))
            raise ValueError(f"cu_seqlens: chunk {i} (sequence {i}) has {int(host[i + 1] - host[i])} "
                             f"tokens; every chunk needs at least 1")
        return host, cu_dev

    def _to_device(self, arr: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(arr)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _reserve(self, lay: _Layer, layer_idx: int, rows: List[int], lens: np.ndarray) -> None:
        bs = self.block_size
        cap = self.max_blocks_per_head * bs
        c = lens.astype(np.int64)[:, None]

        def check():
            ub = lay.ub_len[rows]
            need = int((_ceil_div(ub + c, bs) - _ceil_div(ub, bs)).sum())
            return need, bool(np.all(ub + c <= cap))

        need, fits_table = check()
        if need > lay.free_known - lay.pending or not fits_table:
            lay.sync(list(self._rows.values()))
            need, fits_table = check()
            if not fits_table:
                raise OutOfBlocks(
                    f"layer {layer_idx}: a sequence could grow past max_blocks_per_head="
                    f"{self.max_blocks_per_head} blocks ({cap} tokens) per head")
            if need > lay.free_known:
                raise OutOfBlocks(f"layer {layer_idx}: the call may need {need} new blocks, "
                                  f"{lay.free_known} are free")
        lay.pending += need
        lay.ub_len[rows] += c
