"""DMSCache: a paged, per-head KV cache with DMS delayed eviction (docs/cache.md).

Every mutation of the device state goes through torch.ops.dms.append / fork / release, so the
CUDA and CPU builds share one bookkeeping implementation; this file only owns the host-side
mapping of sequence ids to state rows and the block reservations.
"""
from __future__ import annotations

import heapq
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ._checks import FP8_DTYPES, as_int as _as_int, ceil_div as _ceil_div, layer_scales
from ._checks import positive as _positive

__all__ = ["DMSCache", "DecodePlan", "OutOfBlocks", "RecaptureNeeded"]


class OutOfBlocks(RuntimeError):
    """The block pool cannot hold the call. Nothing was changed: release sequences and retry."""


class RecaptureNeeded(RuntimeError):
    """A DecodePlan cannot run another step: a head could outgrow the plan's block-table width,
    or the plan was closed (release of one of its sequences, or a newer plan for the same ids).
    Nothing was changed: prepare a new plan and capture the step again."""


# The ops a DMSCache runs: it takes a configuration only when every one of them implements it
# on the cache's device (torch.ops.dms.supported: the capability table of the C++ library).
_CACHE_OPS = ("sparse_decode", "sparse_prefill", "append", "fork", "release")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Slots are stored as (slot << 1) | flag in int32 ring entries.
_MAX_SLOTS = 1 << 30


def to_device(arr: np.ndarray, device) -> torch.Tensor:
    """A host array on ``device`` without a stream sync: a plain ``.to(cuda)`` of pageable
    memory waits for the stream (torch synchronizes blocking host copies), which would stop a
    decode loop from launching step t + 1 while the GPU runs step t. Pinned (torch's caching
    host allocator keeps the buffer until the copy is done) and non-blocking on CUDA."""
    t = torch.from_numpy(np.ascontiguousarray(arr))
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class _Layer:
    """Device state of one layer (layout: csrc/include/dms/params.h) + its host reservations."""

    def __init__(self, c: "DMSCache", k_scale: float = 1.0, v_scale: float = 1.0):
        dev, hkv = c.device, c.num_kv_heads
        i32 = dict(dtype=torch.int32, device=dev)
        self.k_scale, self.v_scale = k_scale, v_scale   # dequantization scales of an fp8 pool
        self.k_cache = torch.zeros(c.num_blocks, c.block_size, c.head_dim, dtype=c.kv_dtype,
                                   device=dev)
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
        # Tokens per head reserved for decode-plan steps not yet enqueued (graph replays the host
        # never sees): a sync must keep them reserved, or the blocks behind them could be handed
        # to another call before the replays run. Plans reserve on every layer alike, so all
        # layers share the cache's one array.
        self.ahead = c._ahead
        self.block_size = c.block_size

    def sync(self, live_rows: Sequence[int]) -> None:
        """Replaces the bounds with the device's exact values (a host sync), plan steps kept."""
        self.free_known = int(self.free_top.item())
        self.pending = 0
        self.ub_len[:] = 0
        if live_rows:
            rows = list(live_rows)
            exact = self.seq_lens[rows].cpu().numpy().astype(np.int64)
            self.ub_len[rows] = exact + self.ahead[rows, None]
            bs = self.block_size
            self.pending = int((_ceil_div(self.ub_len[rows], bs) - _ceil_div(exact, bs)).sum())

    def state(self):
        return (self.k_cache, self.v_cache, self.block_table, self.seq_lens, self.ring,
                self.num_tokens, self.free_stack, self.free_top)


class DMSCache:
    """Paged per-head KV cache of a whole model with DMS delayed eviction (docs/cache.md).

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

    CUDA graphs of the decode step (one token per sequence, every layer): a replay runs without
    Python, so the host cannot reserve inside it, and whatever the captured ops read must be a
    device tensor that outlives the graph. :meth:`prepare_decode` builds a :class:`DecodePlan`
    outside the capture: the state rows as a device int32 tensor, ``cu_seqlens`` as a device
    ``arange``, and a block-table gather width fixed for the plan (``max_len`` tokens per head).
    While a graph is being captured, :meth:`attend` of a decode batch uses only the open plan for
    exactly those ``seq_ids`` (in that order): no host copy, no read-back, no reservation
    (``cu_seqlens`` may be a CPU or device tensor; its values are implied). Each replay is one
    step, paid for beforehand by :meth:`DecodePlan.advance`, which applies the same conservative
    rule on every layer (each head may grow by one token per step) and raises
    :class:`OutOfBlocks`, or :class:`RecaptureNeeded` when a head could outgrow the plan's width,
    before the replay, so a replay never meets an empty pool. Steps reserved but not yet replayed
    stay reserved across syncs (``_Layer.ahead``). Typical loop::

        plan = cache.prepare_decode(seq_ids, steps=64)     # reserves 64 steps, fixes the width
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for layer in range(L): out[layer] = cache.attend(layer, seq_ids, cu, q, k, v, lg)
        while generating:
            plan.advance()      # host only; OutOfBlocks / RecaptureNeeded come here, not later
            g.replay()

    Keep the plan alive as long as its graph. :meth:`release` of one of its sequences closes it;
    a plan also closes when a newer one is prepared for the same ``seq_ids``. Outside a capture
    :meth:`attend` of the plan's batch reserves as usual (a plan does not pay for eager steps)
    and uses the plan's tensors when the bounds fit its width.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, window: int = 512,
                 block_size: int = 64, num_blocks: int, max_seqs: int,
                 dtype: torch.dtype = torch.bfloat16, device="cuda",
                 max_blocks_per_head: Optional[int] = None,
                 kv_dtype: Optional[torch.dtype] = None, k_scale=1.0, v_scale=1.0):
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
        kv_dtype = dtype if kv_dtype is None else kv_dtype
        if kv_dtype != dtype and kv_dtype not in FP8_DTYPES:
            raise ValueError(f"kv_dtype: expected None, dtype ({dtype}) or one of {FP8_DTYPES}, "
                             f"got {kv_dtype}")
        self._check_supported(dtype, kv_dtype)
        self.dtype, self.kv_dtype = dtype, kv_dtype
        fp8 = kv_dtype in FP8_DTYPES
        ks = layer_scales(k_scale, "k_scale", self.num_layers, fp8)
        vs = layer_scales(v_scale, "v_scale", self.num_layers, fp8)
        self._ahead = np.zeros(self.max_seqs, dtype=np.int64)  # see _Layer.ahead
        self._layers = [_Layer(self, ks[i], vs[i]) for i in range(self.num_layers)]
        self._rows: Dict[int, int] = {}
        # A min-heap: a new sequence takes the lowest free row, so a batch added after a
        # release of everything gets consecutive ascending rows, which attend's decode path
        # reads as views (no per-layer gathers of the block table and lengths).
        self._free_rows: List[int] = list(range(self.max_seqs))
        self._next_id = 0
        self._plans: List["DecodePlan"] = []  # open decode plans

    def _check_supported(self, dtype, kv_dtype):
        """What the ops implement on this device; failing here beats failing in the first attend.
        An fp8 kv_dtype the device's kernels lack is NotImplementedError (as the ops raise)."""
        dev = "cuda" if self.device.type == "cuda" else "cpu"

        def refusal(dt, head_dim=0, block_size=0, kv=None):
            return next((op for op in _CACHE_OPS
                         if not torch.ops.dms.supported(op, dev, dt, head_dim, block_size, kv)), None)

        if not isinstance(dtype, torch.dtype) or refusal(dtype) is not None:
            allowed = [dt for dt in _FLOAT_DTYPES if refusal(dt) is None]
            raise ValueError(f"dtype: expected one of {allowed} on {dev}, got {dtype}")
        for name, value in (("head_dim", self.head_dim), ("block_size", self.block_size)):
            op = refusal(dtype, **{name: value})
            if op is not None:
                raise ValueError(f"{name}: dms.{op} does not implement {name} {value} on {dev} "
                                 "(torch.ops.dms.supported)")
        op = refusal(dtype, kv=kv_dtype)
        if op is not None:
            raise NotImplementedError(f"kv_dtype: dms.{op} does not implement kv_dtype {kv_dtype} "
                                      f"with dtype {dtype} on {dev} (torch.ops.dms.supported)")

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
        return self._take_row(heapq.heappop(self._free_rows))

    def fork(self, seq_id: int) -> int:
        """An independent copy of ``seq_id`` in every layer (e.g. parallel sampling of a prompt)."""
        src = self._row(seq_id, "seq_id")
        if not self._free_rows:
            raise RuntimeError(f"max_seqs: all {self.max_seqs} sequences are live; release one first")
        live = list(self._rows.values())
        needs = []
        for i, layer in enumerate(self._layers):
            layer.sync(live)
            exact = layer.ub_len[src] - layer.ahead[src]  # right after a sync
            need = int(_ceil_div(exact, self.block_size).sum())
            if need > layer.free_known - layer.pending:
                raise OutOfBlocks(f"fork: layer {i} needs {need} blocks to copy sequence {seq_id}, "
                                  f"{layer.free_known - layer.pending} are free (not reserved)")
            needs.append(need)
        dst = heapq.heappop(self._free_rows)
        for layer, need in zip(self._layers, needs):
            torch.ops.dms.fork(src, dst, *layer.state())
            layer.free_known -= need
            layer.ub_len[dst] = layer.ub_len[src] - layer.ahead[src]  # the copy has no plan steps
        return self._take_row(dst)

    def release(self, seq_id: int) -> None:
        """Drops ``seq_id``; all of its blocks go back to the pool."""
        row = self._row(seq_id, "seq_id")
        for plan in [p for p in self._plans if row in p._rows]:
            plan.close()
        for layer in self._layers:
            torch.ops.dms.release(row, layer.block_table, layer.seq_lens, layer.ring,
                                  layer.num_tokens, layer.free_stack, layer.free_top,
                                  self.block_size)
            layer.ub_len[row] = 0
        self._ahead[row] = 0
        del self._rows[seq_id]
        heapq.heappush(self._free_rows, row)

    def live_tokens(self, layer: int, seq_id: int) -> torch.Tensor:
        """Tokens each KV head of ``seq_id`` keeps in ``layer``: int32 [Hkv] (a copy)."""
        lay = self._layer(layer)
        return lay.seq_lens[self._row(seq_id, "seq_id")].clone()

    @property
    def num_free_blocks(self) -> int:
        """Free blocks summed over the layers' pools (reads the device)."""
        return sum(int(layer.free_top.item()) for layer in self._layers)

    # ---------------------------------------------------------------- CUDA-graph decode

    def prepare_decode(self, seq_ids: Sequence[int], steps: int = 1, *,
                       max_len: Optional[int] = None) -> "DecodePlan":
        """A :class:`DecodePlan` for decode steps of ``seq_ids`` (in this order), with ``steps``
        steps reserved on every layer; host-side, call it outside any graph capture.

        ``max_len`` (tokens per head) fixes the block-table gather width of graphs captured with
        the plan; by default it is the most a head may hold after ``steps`` steps, rounded up to
        whole blocks. Raises :class:`OutOfBlocks` (nothing changed) when the steps might not
        fit, ValueError when ``max_len`` is already too small. An open plan for the same
        ``seq_ids`` is closed (its graph must be captured again with the new plan).
        """
        rows = self._rows_of(seq_ids)
        if not rows:
            raise ValueError("seq_ids: a decode plan needs at least one sequence")
        steps = _positive(steps, "steps")
        bs = self.block_size
        cap = self.max_blocks_per_head * bs
        width = None
        if max_len is not None:
            width = min(-(-_positive(max_len, "max_len") // bs) * bs, cap)
        try:
            self._reserve_steps(rows, steps, width)
        except RecaptureNeeded as e:
            raise ValueError(f"max_len: {e}") from None
        if width is None:
            top = max(int(lay.ub_len[rows].max()) for lay in self._layers)
            width = min(max(1, -(-top // bs)) * bs, cap)
        ids = {r: s for s, r in self._rows.items()}
        plan = DecodePlan(self, tuple(ids[r] for r in rows), rows, width // bs, steps)
        self._open_plan(plan, steps)
        return plan

    def _open_plan(self, plan: "DecodePlan", steps: int) -> None:
        """Registers ``plan`` (its ``steps`` already reserved), closing any other plan of its rows."""
        for old in [p for p in self._plans if p._rows == plan._rows and p is not plan]:
            old.close()
        self._ahead[plan._rows] += steps
        self._plans.append(plan)

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
        accepted unread, and only for the ``seq_ids`` of an open :class:`DecodePlan`
        (:meth:`prepare_decode`; see the class docstring).
        """
        lay, rows, T, hq = self._check_qkv(layer, seq_ids, q, k, v)
        n, d = len(rows), self.head_dim
        self._check_logits(eviction_logits, "eviction_logits", T)
        plan, capturing = self._decode_plan(rows, T)
        cu_host, cu_dev = self._check_cu_seqlens(cu_seqlens, n, T)
        scale = self._check_scale(scale)
        if n == 0:
            return q.new_empty((0, hq, d))
        lens = np.diff(cu_host) if cu_host is not None else np.ones(n, dtype=np.int64)
        slots, cu_dev, cols, plan = self._begin_call(lay, layer, rows, lens, cu_host, cu_dev, plan,
                                                     capturing)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        logits = eviction_logits.to(torch.float32).contiguous()
        kv_scales = (lay.k_scale, lay.v_scale)   # an fp8 pool quantizes on the write
        if n == T:
            # Decode: after appending token t the cache holds exactly the keys query t sees.
            torch.ops.dms.append(k, v, logits, slots, cu_dev, *lay.state(), *kv_scales)
            return self._decode_attention(lay, rows, slots, cols, q, scale)
        out = torch.ops.dms.sparse_prefill(q, k, v, logits, slots, cu_dev, lay.k_cache,
                                           lay.v_cache, lay.block_table, lay.seq_lens,
                                           lay.ring, lay.num_tokens, scale, *kv_scales)
        torch.ops.dms.append(k, v, logits, slots, cu_dev, *lay.state(), *kv_scales)
        return out

    def decode_step(self, layer: int, seq_ids: Sequence[int], q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor, cos_sin_cache: torch.Tensor, alpha_scale: float = 100.0,
                    alpha_offset: float = 5.0, q_norm_weight: Optional[torch.Tensor] = None,
                    k_norm_weight: Optional[torch.Tensor] = None, norm_eps: float = 1e-6,
                    logits: Optional[torch.Tensor] = None,
                    scale: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """One decode token per sequence of ``seq_ids`` through the fused op
        ``torch.ops.dms.decode_step`` (optional per-head RMSNorm, the borrowed-neuron logits or
        the given ``logits``, RoPE, the append) and then ``sparse_decode``: what
        ``eviction_rope`` + :meth:`attend` do, in one kernel fewer per layer.

        q [n, Hq, D], k and v [n, Hkv, D] are the projections BEFORE norm and RoPE; q is normed
        and roped in place. The position of each token is its sequence's token count in this
        layer (the tokens appended so far), so ``cos_sin_cache`` (float32 [max_position, D], as
        ``eviction_rope``) must have that row. ``logits`` float32 [n, Hkv] (the adapter variant;
        q then keeps every channel) replaces the borrowed neuron. Returns (out [n, Hq, D],
        logits float32 [n, Hkv]). Checked, reserved and capturable like a decode :meth:`attend`.
        """
        lay, rows, n, hq = self._check_qkv(layer, seq_ids, q, k, v)
        if n != len(rows):
            raise ValueError(f"q: decode_step takes one token per sequence: expected {len(rows)} "
                             f"rows (len(seq_ids)), got {n}")
        if logits is not None:
            self._check_logits(logits, "logits", n)
            logits = logits.to(torch.float32).contiguous()
        if not q.is_contiguous():
            raise ValueError("q: expected a contiguous tensor (decode_step norms and ropes it in place)")
        if (not isinstance(cos_sin_cache, torch.Tensor) or cos_sin_cache.dim() != 2
                or cos_sin_cache.dtype != torch.float32 or cos_sin_cache.device != self.device
                or cos_sin_cache.shape[1] != self.head_dim):
            raise ValueError(f"cos_sin_cache: expected a float32 [max_position, {self.head_dim}] tensor "
                             f"on {self.device}, got "
                             + (f"{cos_sin_cache.dtype} {list(cos_sin_cache.shape)} on {cos_sin_cache.device}"
                                if isinstance(cos_sin_cache, torch.Tensor) else type(cos_sin_cache).__name__))
        plan, capturing = self._decode_plan(rows, n)
        scale = self._check_scale(scale)
        if n == 0:
            return q.new_empty((0, hq, self.head_dim)), q.new_empty((0, self.num_kv_heads),
                                                                   dtype=torch.float32)
        ones = np.ones(n, dtype=np.int64)
        slots, _, cols, plan = self._begin_call(lay, layer, rows, ones, None, None, plan, capturing)
        kv_scales = (lay.k_scale, lay.v_scale)
        out_logits = torch.ops.dms.decode_step(
            q, k.contiguous(), v.contiguous(), cos_sin_cache, slots, *lay.state(),
            float(alpha_scale), float(alpha_offset), q_norm_weight, k_norm_weight, float(norm_eps),
            logits, *kv_scales)
        return self._decode_attention(lay, rows, slots, cols, q, scale), out_logits

    # ---------------------------------------------------------------- attention internals

    def _check_qkv(self, layer, seq_ids, q, k, v):
        """(layer, rows, T, Hq) of a call with q [T, Hq, D], k and v [T, Hkv, D]."""
        lay = self._layer(layer)
        rows = self._rows_of(seq_ids)
        hkv, d = self.num_kv_heads, self.head_dim
        T = self._check_tensor(q, "q", 3, self.dtype)
        if q.shape[2] != d or q.shape[1] < 1 or q.shape[1] % hkv:
            raise ValueError(f"q: expected [T, Hq, {d}] with Hq a multiple of num_kv_heads={hkv}, "
                             f"got {list(q.shape)}")
        for t, name in ((k, "k"), (v, "v")):
            self._check_tensor(t, name, 3, self.dtype)
            if list(t.shape) != [T, hkv, d]:
                raise ValueError(f"{name}: expected [{T}, {hkv}, {d}], got {list(t.shape)}")
        return lay, rows, T, q.shape[1]

    def _check_logits(self, t, name: str, T: int) -> None:
        self._check_tensor(t, name, 2, None)
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name}: expected a float dtype, got {t.dtype}")
        if list(t.shape) != [T, self.num_kv_heads]:
            raise ValueError(f"{name}: expected [{T}, {self.num_kv_heads}], got {list(t.shape)}")

    def _check_scale(self, scale) -> float:
        if scale is None:
            return 1.0 / math.sqrt(self.head_dim)
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            raise ValueError(f"scale: expected a float or None, got {type(scale).__name__}") from None
        if not math.isfinite(scale):
            raise ValueError(f"scale: expected a finite float, got {scale}")
        return scale

    def _decode_plan(self, rows: List[int], T: int):
        """(the open plan of a decode batch or None, whether a graph is being captured); under a
        capture only a planned decode batch is accepted."""
        n = len(rows)
        capturing = self._capturing()
        plan = self._plan_for(rows) if n == T else None
        if capturing and n:
            if n != T:
                raise ValueError(f"cu_seqlens: only a decode step (one token per sequence, T == "
                                 f"len(seq_ids)) can be captured in a CUDA graph; got T={T} for "
                                 f"{n} sequences")
            if plan is None:
                raise ValueError("seq_ids: capturing attend in a CUDA graph needs an open plan for "
                                 "exactly these seq_ids, in this order: call "
                                 "cache.prepare_decode(seq_ids, steps) before the capture")
        return plan, capturing

    def _begin_call(self, lay: _Layer, layer: int, rows: List[int], lens: np.ndarray, cu_host,
                    cu_dev, plan, capturing: bool):
        """Reserves the call's tokens (outside a capture; a replay's step is paid by
        DecodePlan.advance) and returns (slots, cu_seqlens on the device, block-table columns
        a decode gathers, the plan still usable)."""
        if not capturing:
            self._reserve(lay, layer, rows, lens)
            if plan is not None and int(lay.ub_len[rows].max()) > plan.max_len:
                plan = None  # this eager step may outgrow the plan's width: gather as below
        if plan is not None:
            # Only tensors that outlive a graph of this step, and a width fixed at prepare time.
            return plan.slots, plan.cu_seqlens, plan.cols, plan
        slots = self._to_device(np.asarray(rows, dtype=np.int32))
        if cu_dev is None and cu_host is not None:
            cu_dev = self._to_device(cu_host.astype(np.int32))
        # Gather only the block-table columns the rows can use (ub_len bounds seq_lens): the
        # full width is num_blocks by default, and copying it per step would cost more than the
        # attention itself.
        cols = max(1, -(-int(lay.ub_len[rows].max()) // self.block_size))
        return slots, cu_dev, cols, plan

    def _decode_attention(self, lay: _Layer, rows: List[int], slots, cols: int, q, scale: float):
        r0, n = rows[0], len(rows)
        if rows == list(range(r0, r0 + n)):
            # Consecutive rows (generate's usual batch): views of the state, no gather kernels
            # (a decode step runs one attention per layer).
            table, lens = lay.block_table[r0:r0 + n], lay.seq_lens[r0:r0 + n]
        else:
            table = lay.block_table[:, :, :cols].index_select(0, slots)
            lens = lay.seq_lens.index_select(0, slots)
        return torch.ops.dms.sparse_decode(q, lay.k_cache, lay.v_cache, table, lens, scale,
                                           lay.k_scale, lay.v_scale)

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
        return to_device(arr, self.device)

    def _reserve(self, lay: _Layer, layer_idx: int, rows: List[int], lens: np.ndarray) -> None:
        c = lens.astype(np.int64)[:, None]
        need = self._fit(lay, layer_idx, rows, c)
        lay.pending += need
        lay.ub_len[rows] += c

    def _reserve_steps(self, rows: List[int], steps: int, width: Optional[int]) -> None:
        """Reserves ``steps`` tokens per head of ``rows`` on every layer, all or nothing."""
        needs = [self._fit(lay, i, rows, steps, width) for i, lay in enumerate(self._layers)]
        for lay, need in zip(self._layers, needs):
            lay.pending += need
            lay.ub_len[rows] += steps

    def _fit(self, lay: _Layer, layer_idx: int, rows: List[int], c, width: Optional[int] = None) -> int:
        """Blocks that ``c`` more tokens per head of ``rows`` may need; raises before any change
        when they might not fit (the pool, the block table, or a plan's ``width`` in tokens).
        Syncs the layer once when the bounds alone cannot tell."""
        bs = self.block_size
        cap = self.max_blocks_per_head * bs

        def check():
            ub = lay.ub_len[rows]
            need = int((_ceil_div(ub + c, bs) - _ceil_div(ub, bs)).sum())
            return need, int((ub + c).max())

        need, top = check()
        if need > lay.free_known - lay.pending or top > cap or (width is not None and top > width):
            lay.sync(list(self._rows.values()))
            need, top = check()
            if top > cap:
                raise OutOfBlocks(
                    f"layer {layer_idx}: a sequence could grow past max_blocks_per_head="
                    f"{self.max_blocks_per_head} blocks ({cap} tokens) per head")
            if width is not None and top > width:
                raise RecaptureNeeded(
                    f"layer {layer_idx}: a head could hold {top} tokens, more than the decode "
                    f"plan's block-table width of {width} tokens")
            if need > lay.free_known - lay.pending:
                raise OutOfBlocks(f"layer {layer_idx}: the call may need {need} new blocks, "
                                  f"{lay.free_known - lay.pending} are free (not reserved)")
        return need

    def _capturing(self) -> bool:
        return self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()

    def _plan_for(self, rows: List[int]) -> Optional["DecodePlan"]:
        for plan in self._plans:
            if plan._rows == rows:
                return plan
        return None


class DecodePlan:
    """Device-side constants of a capturable decode step over fixed ``seq_ids`` and the host
    account of the steps paid for (made by :meth:`DMSCache.prepare_decode`).

    ``slots`` (int32 [n], the state rows), ``cu_seqlens`` (int32 [n + 1], ``0..n``) and ``cols``
    (block-table columns gathered per step; ``max_len = cols * block_size`` tokens per head) are
    what a captured :meth:`DMSCache.attend` reads; they never change, so a graph stays valid as
    long as the plan is open. Call :meth:`advance` right before every replay.
    """

    def __init__(self, cache: DMSCache, seq_ids: Tuple[int, ...], rows: List[int], cols: int,
                 steps: int):
        self._cache = cache
        self.seq_ids = seq_ids
        self._rows = list(rows)
        self.cols = cols
        self.max_len = cols * cache.block_size
        self.slots = cache._to_device(np.asarray(rows, dtype=np.int32))
        self.cu_seqlens = torch.arange(len(rows) + 1, dtype=torch.int32, device=cache.device)
        self._credit = steps    # steps reserved on every layer and not handed to a replay yet
        self._inflight = 0      # steps handed out by the last advance (maybe not enqueued yet)
        self._refill = steps    # steps reserved at once when the credit runs out
        self.open = True

    @property
    def steps_reserved(self) -> int:
        """Steps :meth:`advance` can hand out before it has to reserve (and maybe sync) again."""
        return self._credit

    def advance(self, steps: int = 1) -> None:
        """Pays for the next ``steps`` replays (host only). Call it right before replaying, after
        the previous replay was enqueued. Raises before the replay, changing nothing:
        :class:`OutOfBlocks` when the pool might not hold the steps (release sequences, then
        advance again), :class:`RecaptureNeeded` when a head could outgrow ``max_len`` or the
        plan is closed."""
        if not self.open:
            raise RecaptureNeeded(f"decode plan for seq_ids {list(self.seq_ids)} is closed (a "
                                  f"sequence was released or a newer plan replaced it)")
        steps = _positive(steps, "steps")
        c = self._cache
        # The previous replay was enqueued before this call, so a sync from now on sees it.
        c._ahead[self._rows] -= self._inflight
        self._inflight = 0
        short = steps - self._credit
        if short > 0:
            more = max(short, self._refill)
            try:
                c._reserve_steps(self._rows, more, self.max_len)
            except (OutOfBlocks, RecaptureNeeded):
                if more == short:
                    raise
                more = short  # the refill did not fit; the steps asked for still may
                c._reserve_steps(self._rows, more, self.max_len)
            self._credit += more
            c._ahead[self._rows] += more
        self._credit -= steps
        self._inflight = steps

    def reopen(self, seq_ids: Sequence[int], steps: int = 1) -> None:
        """Re-opens this plan for ``seq_ids``: other sequences (or the same) that occupy exactly
        the plan's state rows, in its order (a new batch gets the lowest free rows, so the next
        batch of the same size lands on the rows of the last one). The device tensors, the
        block-table width and so any graph captured with the plan stay valid; ``steps`` steps
        are reserved as :meth:`DMSCache.prepare_decode` does. Raises ValueError (rows differ),
        :class:`RecaptureNeeded` (a head could outgrow ``max_len``) or :class:`OutOfBlocks`,
        changing nothing; an open plan is closed first only when it succeeds."""
        c = self._cache
        rows = c._rows_of(seq_ids)
        if rows != self._rows:
            raise ValueError(f"seq_ids: the plan's state rows are {self._rows}, these sequences "
                             f"occupy {rows}")
        steps = _positive(steps, "steps")
        if self.open:
            c._ahead[self._rows] -= self._credit + self._inflight
        try:
            c._reserve_steps(rows, steps, self.max_len)
        except (OutOfBlocks, RecaptureNeeded):
            if self.open:
                c._ahead[self._rows] += self._credit + self._inflight
            raise
        if self.open:
            c._plans.remove(self)
        self.seq_ids = tuple(_as_int(s, "seq_ids") for s in seq_ids)
        self._credit, self._inflight = steps, 0
        self.open = True
        c._open_plan(self, steps)

    def close(self) -> None:
        """Ends the plan: its unreplayed steps stop being held across syncs (their blocks come
        back at the next sync); :meth:`advance` raises :class:`RecaptureNeeded` from now on."""
        if not self.open:
            return
        self.open = False
        c = self._cache
        c._ahead[self._rows] -= self._credit + self._inflight
        self._credit = self._inflight = 0
        c._plans.remove(self)

    def __repr__(self) -> str:
        return (f"DecodePlan(seq_ids={list(self.seq_ids)}, max_len={self.max_len}, "
                f"steps_reserved={self._credit}, open={self.open})")
