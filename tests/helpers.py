"""The one helpers module of the test suite (conftest puts tests/ on sys.path).

Sections: devices (`DEVICES`, a `device` parameter as pytorch/extension-cpp's tests use it:
"cpu" always, "cuda" marked `cuda`, so it skips without a GPU); case counts (`SCALE`);
random inputs (`make_logits`, `step_inputs`, `norm_weights`); state snapshots and comparisons
(`snapshot`, `assert_same_state`, `poison_allocator`, `poison_free`); the error bound every
CUDA attention comparison uses (`attention_bound`, `assert_attention_close`); DMS state tensors
and their logical comparison (`new_state`, `logical_view`, `assert_same_logical`); and for the
reliability suites (test_differential, test_soak, test_bad_inputs, test_compile):
a tolerance that only admits the final rounding, eviction logits with extreme values, and
SpecState, which drives the state ops (append / decode_step / fork / release / sparse_prefill)
on one set of state tensors and checks every touched row against SPEC section 1 through
dms_ext.reference after each call.

Token identity: V channels 0 and 1 of every token carry its position (p // 64, p % 64, exact in
every dtype for p < 16384), so what a (row, head) holds can be read back from the cache alone and
compared, as a set, with the keys reference.visibility_mask says the next query sees.
"""
from __future__ import annotations

import collections
import zlib
import math
import os
import random

import pytest
import torch

from dms_ext import ops, reference
from dms_ext.cache import DMSCache, OutOfBlocks

# Multiplies every case count of the differential and soak suites: DMS_TEST_SCALE=10 for the
# GPU round (bench/gpu_round.sh sets it), default 1 (the CPU suite). DMS_DIFF_SCALE is the old name.
SCALE = max(1, int(os.environ.get("DMS_TEST_SCALE", os.environ.get("DMS_DIFF_SCALE", "1"))))

HAS_CUDA = torch.cuda.is_available()
# `@pytest.mark.parametrize("device", DEVICES)`: "cpu" always, "cuda" marked `cuda` (conftest
# skips it without a GPU; `-m cuda` selects it on the GPU machine).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

# Cases run per suite and kind, printed at the end of each module (README "Reliability").
COUNTS: "collections.Counter[str]" = collections.Counter()

# Extreme but legal eviction logits: the rule is d = (l > 0), so +0.0 / -0.0 keep, the smallest
# subnormal evicts, infinities follow their sign.
EXTREME_LOGITS = [0.0, -0.0, 1e-45, -1e-45, 1e30, -1e30, 3e38, -3e38, math.inf, -math.inf]


def bits(t: torch.Tensor) -> torch.Tensor:
    """An integer view of t, so that equality is bitwise (NaN == NaN, -0.0 != 0.0)."""
    if t.is_floating_point():
        return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def assert_rounded(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str,
                   extra: float = 0.0, ulps: float = 1.0, float_math: bool = False) -> None:
    """out (in dtype) is ref (float64) up to the final rounding to dtype: the CPU twins compute in
    float64 and store through float32, so at most one unit in the last place of dtype, plus what
    float64 summation order can move (1e-12 of the largest value) and `extra` (absolute).
    float_math (CUDA: RoPE / norm in float32): `ulps` units, plus float32 cancellation error
    (1e-6 of the largest value) for results near zero."""
    assert out.shape == ref.shape, f"{what}: shape {list(out.shape)} vs {list(ref.shape)}"
    o, r = out.double().cpu(), ref.double().cpu()
    assert not torch.isnan(o).any(), f"{what}: NaN in output"
    fi = torch.finfo(dtype)
    big = r.abs().max().item() if r.numel() else 0.0
    tol = ulps * fi.eps * (r.abs() + fi.tiny) + (1e-6 if float_math else 1e-12) * big + extra
    err = (o - r).abs()
    bad = err > tol
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(f"{what}: {int(bad.sum())} of {o.numel()} elements off, first at {i}: "
                             f"got {o[tuple(i)].item()!r}, want {r[tuple(i)].item()!r}")


def f32(x: float) -> float:
    """x rounded to float32, so that the op (float params) and the reference (double) agree."""
    return float(torch.tensor(x, dtype=torch.float32))


def make_logits(gen, n: int, hkv: int, rate: float = 0.5, extreme: float = 0.0, device="cpu",
                floor: float = 0.05, span: float = 4.0) -> torch.Tensor:
    """float32 [n, hkv]: positive (evict the previous token) with probability `rate`, magnitude in
    [floor, floor + span) (never near the threshold); a fraction `extreme` of the entries
    replaced by EXTREME_LOGITS (zeros keep, tiny positives evict). gen None: the global RNG."""
    mag = torch.rand(n, hkv, generator=gen) * span + floor
    lg = torch.where(torch.rand(n, hkv, generator=gen) < rate, mag, -mag)
    if extreme > 0 and n:
        pick = torch.rand(n, hkv, generator=gen) < extreme
        vals = torch.tensor(EXTREME_LOGITS)[torch.randint(0, len(EXTREME_LOGITS), (n, hkv), generator=gen)]
        lg = torch.where(pick, vals, lg)
    return lg.to(device)


def random_lengths(rng: random.Random, total: int, max_chunk: int):
    """Chunk lengths (>= 1) summing to total: many one-token steps, some long chunks."""
    out = []
    while total > 0:
        c = min(total, rng.choice([1, 1, 2, rng.randint(1, max_chunk)]))
        out.append(c)
        total -= c
    return out


class one_thread:
    """Context manager: torch on one thread. The reference runs thousands of tiny float64 ops,
    and on this 2-core CI box each of them costs ~20x more with 2 OpenMP threads than with 1."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


# --------------------------------------------------------------------------------------------


class SpecState:
    """The per-layer state tensors of params.h plus, per row, the full token history it was fed;
    every mutation goes through a dms op and is checked against the reference right after."""

    def __init__(self, gen: torch.Generator, *, max_seqs: int, hkv: int, dim: int, window: int,
                 block_size: int, num_blocks: int, max_blocks: int, dtype: torch.dtype,
                 device="cpu"):
        assert dim >= 2
        self.gen, self.dev, self.dtype = gen, torch.device(device), dtype
        self.S, self.hkv, self.d, self.w, self.bs = max_seqs, hkv, dim, window, block_size
        self.nb, self.M = num_blocks, max_blocks
        i32 = dict(dtype=torch.int32, device=device)
        self.k_cache = torch.full((num_blocks, block_size, dim), math.nan, dtype=dtype, device=device)
        self.v_cache = torch.full_like(self.k_cache, math.nan)
        self.block_table = torch.full((max_seqs, hkv, max_blocks), -1, **i32)
        self.seq_lens = torch.zeros(max_seqs, hkv, **i32)
        self.ring = torch.zeros(max_seqs, hkv, window + 1, **i32)
        self.num_tokens = torch.zeros(max_seqs, **i32)
        # Shuffled: a head's blocks end up scattered over the pool.
        self.free_stack = torch.randperm(num_blocks, generator=gen).to(**i32)
        self.free_top = torch.tensor([num_blocks], **i32)
        self.hist = {r: self._empty() for r in range(max_seqs)}
        # How outputs are compared with the float64 reference: the CPU twins round once; CUDA
        # tests set attn_check None (attention_bound: float32 math, P rounded for the PV product)
        # and loosen the RoPE checks (float32 math).
        self.attn_check = assert_rounded
        self.rope_ulps = 1.0
        self.logit_rtol, self.logit_atol = 1e-6, 1e-6
        self.float_math = False

    def _empty(self):
        return dict(k=[], v=[], lg=[])

    def tensors(self):
        return (self.k_cache, self.v_cache, self.block_table, self.seq_lens, self.ring,
                self.num_tokens, self.free_stack, self.free_top)

    def snapshot(self):
        return snapshot(self)

    def assert_unchanged(self, snap, what):
        assert_same_state(snap, self, f"{what}: changed by a failed call (order {STATE_KEYS})")

    def length(self, row):
        return sum(x.shape[0] for x in self.hist[row]["k"])

    def full(self, row):
        h = self.hist[row]
        if not h["k"]:
            e = torch.empty(0, self.hkv, self.d, dtype=self.dtype)
            return e, e.clone(), torch.empty(0, self.hkv)
        return torch.cat(h["k"]), torch.cat(h["v"]), torch.cat(h["lg"])

    # ---------------------------------------------------------------- inputs

    def rand(self, *shape, scale=1.0):
        return (torch.randn(*shape, generator=self.gen) * scale).to(self.dtype)

    def new_v(self, row, n):
        """V of the next n tokens of row, positions encoded in channels 0 and 1."""
        v = self.rand(n, self.hkv, self.d)
        pos = torch.arange(n) + self.length(row)
        v[:, :, 0] = (pos // 64).to(self.dtype)[:, None]
        v[:, :, 1] = (pos % 64).to(self.dtype)[:, None]
        return v

    def packed(self, rows, lens, rate, extreme=0.0):
        ks = [self.rand(c, self.hkv, self.d) for c in lens]
        vs = [self.new_v(r, c) for r, c in zip(rows, lens)]
        lgs = [make_logits(self.gen, c, self.hkv, rate, extreme) for c in lens]
        cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return ks, vs, lgs, cu

    def _d(self, t):
        return t.to(self.dev)

    # ---------------------------------------------------------------- ops

    def prefill_check(self, rows, lens, ks, vs, lgs, cu, hq, scale, rng_scale=1.0):
        """sparse_prefill on these chunks equals reference.dms_attention over each row's history
        plus its chunk (last rows). Call before append; reads the state, writes nothing."""
        qs = [self.rand(c, hq, self.d, scale=rng_scale) for c in lens]
        snap = self.snapshot()
        out = ops.sparse_prefill(*map(self._d, (torch.cat(qs), torch.cat(ks), torch.cat(vs),
                                                torch.cat(lgs))),
                                 self._d(torch.tensor(rows, dtype=torch.int32)), self._d(cu),
                                 self.k_cache, self.v_cache, self.block_table, self.seq_lens,
                                 self.ring, self.num_tokens, scale)
        self.assert_unchanged(snap, "sparse_prefill")
        out = out.cpu()
        for i, r in enumerate(rows):
            k0, v0, l0 = self.full(r)
            n0 = k0.shape[0]
            q = torch.cat([torch.zeros(n0, hq, self.d, dtype=self.dtype), qs[i]])
            K, V, L = torch.cat([k0, ks[i]]), torch.cat([v0, vs[i]]), torch.cat([l0, lgs[i]])
            what = f"sparse_prefill row {r} (history {n0}, chunk {lens[i]})"
            got = out[int(cu[i]):int(cu[i + 1])]
            if self.attn_check is None:     # a kernel: the error bound of its algorithm
                ref, _, tol, _ = dms_bound(q, K, V, L, self.w, scale, rows=range(n0, n0 + lens[i]))
                assert_within_bound(got, ref, tol, what)
            else:
                ref = reference.dms_attention(q, K, V, L, self.w, scale)[n0:]
                self.attn_check(got, ref, self.dtype, what)
        COUNTS["sparse_prefill"] += 1

    def unless_out_of_blocks(self, op, call, snap=None):
        """(True, call()), or (False, None) when the pool ran dry: then the state must be
        bit-identical to before the call (checked) and COUNTS[op + "_out_of_blocks"] counts it."""
        snap = self.snapshot() if snap is None else snap
        try:
            return True, call()
        except RuntimeError as e:
            if "out of blocks" not in str(e):
                raise
            self.assert_unchanged(snap, f"{op} out of blocks")
            COUNTS[f"{op}_out_of_blocks"] += 1
            return False, None

    def append(self, rows, lens, ks, vs, lgs, cu) -> bool:
        """append; False (state checked unchanged) when the pool ran dry."""
        done, _ = self.unless_out_of_blocks("append", lambda: ops.append(
            *map(self._d, (torch.cat(ks), torch.cat(vs), torch.cat(lgs))),
            self._d(torch.tensor(rows, dtype=torch.int32)), self._d(cu), *self.tensors()))
        if not done:
            return False
        for r, k, v, lg in zip(rows, ks, vs, lgs):
            h = self.hist[r]
            h["k"].append(k)
            h["v"].append(v)
            h["lg"].append(lg)
        for r in rows:
            self.check_row(r)
        COUNTS["append"] += 1
        return True

    def decode_step(self, rows, hq, cs, rate, norm, adapter, alpha=(100.0, 5.0), eps=1e-6):
        """decode_step on one token per row; q and logits against reference.eviction_rope, then
        the rows' state against the SPEC (with K as the op wrote it, checked against the
        reference roped K first)."""
        b = len(rows)
        group = hq // self.hkv
        q = torch.randn(b, hq, self.d, generator=self.gen)
        # Donor channel away from the threshold, sign by the eviction rate.
        want_evict = torch.rand(b, self.hkv, generator=self.gen) < rate
        mag = torch.rand(b, self.hkv, generator=self.gen) + 0.5
        q[:, ::group, self.d - 1] = torch.where(want_evict, mag, -mag) * 4
        q = q.to(self.dtype)
        k = self.rand(b, self.hkv, self.d)
        v = torch.cat([self.new_v(r, 1) for r in rows])
        qn = kn = None
        if norm:
            qn = (torch.rand(self.d, generator=self.gen) + 0.5).to(self.dtype)
            kn = (torch.rand(self.d, generator=self.gen) + 0.5).to(self.dtype)
        given = make_logits(self.gen, b, self.hkv, rate, 0.2) if adapter else None
        pos = torch.tensor([self.length(r) for r in rows])
        # float64 in, float64 out: the reference before any rounding to dtype.
        q64, k64 = q.double(), k.double()
        qn64 = None if qn is None else qn.double()
        kn64 = None if kn is None else kn.double()
        if given is None:
            q_ref, k_ref, l_ref = reference.eviction_rope(q64, k64, pos, cs, alpha[0], alpha[1],
                                                          qn64, kn64, eps, logit_dtype=q.dtype)
        else:
            # Adapter logits: q keeps every channel; rope q and k alone (each as the `k` argument).
            _, q_ref, _ = reference.eviction_rope(torch.zeros_like(q64), q64, pos, cs, 1.0, 0.0,
                                                  None, qn64, eps)
            _, k_ref, _ = reference.eviction_rope(torch.zeros_like(k64), k64, pos, cs, 1.0, 0.0,
                                                  None, kn64, eps)
            l_ref = given
        qd, kd, vd = self._d(q), self._d(k), self._d(v)
        done, logits = self.unless_out_of_blocks("decode_step", lambda: ops.decode_step(
            qd, kd, vd, self._d(cs), self._d(torch.tensor(rows, dtype=torch.int32)),
            *self.tensors(), alpha[0], alpha[1], None if qn is None else self._d(qn),
            None if kn is None else self._d(kn), eps, None if given is None else self._d(given)))
        if not done:
            return False
        assert same_bits(kd.cpu(), k), "decode_step wrote its k argument"
        if given is None:
            torch.testing.assert_close(logits.cpu(), l_ref, rtol=self.logit_rtol, atol=self.logit_atol)
        else:
            assert same_bits(logits.cpu(), given), "adapter logits must come back unchanged"
        assert_rounded(qd.cpu(), q_ref, self.dtype, "decode_step q", ulps=self.rope_ulps,
                       float_math=self.float_math)
        # K as written: the slot of the newest token of each (row, head) is its ring entry.
        for i, r in enumerate(rows):
            p = int(pos[i])
            e = self.ring[r, :, p % (self.w + 1)].cpu().long()
            slot = e >> 1
            blk = self.block_table[r].cpu().long().gather(1, (slot // self.bs)[:, None])[:, 0]
            k_w = self.k_cache[blk.to(self.dev), (slot % self.bs).to(self.dev)].cpu()  # [Hkv, D]
            assert_rounded(k_w, k_ref[i], self.dtype, f"decode_step K row {r}", ulps=self.rope_ulps,
                           float_math=self.float_math)
            h = self.hist[r]
            h["k"].append(k_w[None])
            h["v"].append(v[i:i + 1])
            h["lg"].append(logits[i:i + 1].cpu())
        for r in rows:
            self.check_row(r)
        COUNTS["decode_step"] += 1
        return True

    def fork(self, src, dst) -> bool:
        snap = self.snapshot()
        done, _ = self.unless_out_of_blocks("fork", lambda: ops.fork(src, dst, *self.tensors()), snap)
        if not done:
            return False
        self.hist[dst] = {key: list(val) for key, val in self.hist[src].items()}
        for i in (2, 3, 4, 5):  # block_table, seq_lens, ring, num_tokens of src untouched
            assert same_bits(snap[i][src], self.tensors()[i][src]), "fork changed its source row"
        self.check_row(src)
        self.check_row(dst)
        COUNTS["fork"] += 1
        return True

    def release(self, row):
        ops.release(row, self.block_table, self.seq_lens, self.ring, self.num_tokens,
                    self.free_stack, self.free_top, self.bs)
        self.hist[row] = self._empty()
        assert (self.block_table[row] == -1).all() and (self.seq_lens[row] == 0).all()
        assert (self.ring[row] == 0).all() and int(self.num_tokens[row]) == 0
        COUNTS["release"] += 1

    # ---------------------------------------------------------------- checks

    def check_row(self, row):
        """SPEC section 1 for one row: num_tokens, seq_lens == live_counts, the cached tokens are
        exactly those the next query sees (K and V bit for bit), the ring holds the last
        min(n, w + 1) positions with their flags (the newest one unflagged)."""
        k_all, v_all, lg = self.full(row)
        n, w = k_all.shape[0], self.w
        assert int(self.num_tokens[row]) == n, f"row {row}: num_tokens {int(self.num_tokens[row])} != {n}"
        lens = self.seq_lens[row].cpu()
        live = reference.live_counts(lg, w)
        assert lens.long().tolist() == live.tolist(), f"row {row}: seq_lens {lens.tolist()} != {live.tolist()}"
        if n == 0:
            return
        vis = reference.visibility_mask(lg, w)[:, n - 1]            # [Hkv, n]
        d = torch.zeros(n, self.hkv, dtype=torch.bool)
        d[:-1] = lg[1:] > 0
        bt = self.block_table[row].cpu()
        ring = self.ring[row].cpu().long()
        js = torch.arange(max(0, n - w - 1), n)
        kc_all = self.k_cache.cpu()
        vc_all = self.v_cache.cpu()
        for g in range(self.hkv):
            L = int(lens[g])
            kc = reference.paged_gather(kc_all, bt[g], L)
            vc = reference.paged_gather(vc_all, bt[g], L)
            assert not torch.isnan(vc[:, :2]).any(), f"row {row} head {g}: unwritten slot in use"
            pos = (vc[:, 0].double() * 64 + vc[:, 1].double()).long()
            want = vis[g].nonzero()[:, 0]
            assert sorted(pos.tolist()) == want.tolist(), f"row {row} head {g}: holds the wrong tokens"
            assert same_bits(vc, v_all[pos, g]), f"row {row} head {g}: V differs"
            assert same_bits(kc, k_all[pos, g]), f"row {row} head {g}: K differs"
            e = ring[g, js % (w + 1)]
            slot, flag = e >> 1, e & 1
            assert ((slot >= 0) & (slot < L)).all(), f"row {row} head {g}: ring slot out of range"
            assert torch.equal(pos[slot], js), f"row {row} head {g}: ring points at the wrong tokens"
            assert torch.equal(flag[:-1].bool(), d[js[:-1], g]), f"row {row} head {g}: ring flags"
            assert int(flag[-1]) == 0, f"row {row} head {g}: the newest token is flagged"

    def check_pool(self):
        """Blocks held by the rows plus the free stack are every block exactly once."""
        held = []
        lens = self.seq_lens.cpu()
        bt = self.block_table.cpu()
        for r in range(self.S):
            for g in range(self.hkv):
                held += bt[r, g, : -(-int(lens[r, g]) // self.bs)].tolist()
        top = int(self.free_top)
        free = self.free_stack[:top].cpu().tolist()
        assert sorted(held + free) == list(range(self.nb)), "a block is lost or owned twice"


# --------------------------------------------------------------------------------------------


class SequenceHistory:
    """A DMSCache plus each live sequence's full per-layer history of attend inputs (what the
    reference needs); add / fork / release keep the two in step. Shared by the cache drivers
    of tests/test_cache.py and CacheModel below."""

    def __init__(self, cache: DMSCache):
        self.c = cache
        self.hist = {}  # seq id -> per layer list of (q, k, v, logits) chunks

    def add(self):
        sid = self.c.add_sequence()
        self.hist[sid] = [[] for _ in range(self.c.num_layers)]
        return sid

    def fork(self, sid):
        new = self.c.fork(sid)
        self.hist[new] = [list(h) for h in self.hist[sid]]
        return new

    def release(self, sid):
        self.c.release(sid)
        del self.hist[sid]


class CacheModel(SequenceHistory):
    """A DMSCache plus every sequence's full per-layer history; attend outputs and live counts
    are checked against reference.dms_attention / live_counts after each call."""

    def __init__(self, cache: DMSCache, hq: int, rate: float, extreme: float, gen, scale,
                 attn_check=assert_rounded):
        super().__init__(cache)
        self.hq, self.rate, self.extreme, self.gen = hq, rate, extreme, gen
        self.scale, self.attn_check = scale, attn_check

    def length(self, sid):
        return sum(x[0].shape[0] for x in self.hist[sid][0])

    def lifecycle(self, kind, rng, max_seqs, oob_key):
        """Events "add" / "fork" / "release" of a random schedule (a fork that runs out of blocks
        counts in COUNTS[oob_key]): True if done, False if not possible now, None for other kinds."""
        sids = list(self.hist)
        if kind == "add":
            return len(sids) < max_seqs and (self.add(), True)[1]
        if kind == "fork":
            if not sids or len(sids) >= max_seqs:
                return False
            try:
                self.fork(rng.choice(sids))
            except OutOfBlocks:
                COUNTS[oob_key] += 1
            return True
        if kind == "release":
            return bool(sids) and (self.release(rng.choice(sids)), True)[1]
        return None


    def attend(self, layer, sids, lens):
        c, g = self.c, self.gen
        T = sum(lens)
        dt, dev = c.dtype, c.device
        q = torch.randn(T, self.hq, c.head_dim, generator=g).to(dt)
        k = torch.randn(T, c.num_kv_heads, c.head_dim, generator=g).to(dt)
        v = torch.randn(T, c.num_kv_heads, c.head_dim, generator=g).to(dt)
        lg = make_logits(g, T, c.num_kv_heads, self.rate, self.extreme)
        cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        before = snapshot(c)
        try:
            out = c.attend(layer, sids, cu, q.to(dev), k.to(dev), v.to(dev), lg.to(dev), scale=self.scale)
        except OutOfBlocks:
            assert_same_state(before, c, "OutOfBlocks changed the cache")
            COUNTS["cache_out_of_blocks"] += 1
            return False
        out = out.cpu()
        assert out.dtype == dt and list(out.shape) == [T, self.hq, c.head_dim]
        w = c.window
        for i, sid in enumerate(sids):
            a, b = int(cu[i]), int(cu[i + 1])
            self.hist[sid][layer].append((q[a:b], k[a:b], v[a:b], lg[a:b]))
            qa, ka, va, la = (torch.cat(x) for x in zip(*self.hist[sid][layer]))
            scale = f32(1 / math.sqrt(c.head_dim) if self.scale is None else self.scale)
            what = f"attend layer {layer} seq {sid} chunk {b - a}"
            if self.attn_check is None:     # a kernel: the error bound of its algorithm
                n = qa.shape[0]
                ref, _, tol, _ = dms_bound(qa, ka, va, la, w, scale, rows=range(n - (b - a), n))
                assert_within_bound(out[a:b], ref, tol, what)
            else:
                ref = reference.dms_attention(qa, ka, va, la, w, scale=scale)[-(b - a):]
                self.attn_check(out[a:b], ref, dt, what)
            live = c.live_tokens(layer, sid).cpu()
            assert live.tolist() == reference.live_counts(la, w).tolist(), (layer, sid)
        COUNTS["cache_attend"] += 1
        return True


# --------------------------------------------------------------------------------------------
# Snapshots, bitwise state comparison, poisoning


def _tensors_of(x):
    """The tensors of a snapshot-able thing, flattened in a fixed order: a DMSCache (every
    layer's state), an object with .tensors() (SpecState, a test's State), a dict (new_state),
    or a (nested) list / tuple of tensors."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, DMSCache):
        return [t for lay in x._layers for t in lay.state()]
    if hasattr(x, "tensors"):
        return list(x.tensors())
    if isinstance(x, dict):
        return [t for k in sorted(x) for t in _tensors_of(x[k])]
    return [t for y in x for t in _tensors_of(y)]


def snapshot(x):
    """Clones of every tensor of x (see _tensors_of), for assert_same_state."""
    return [t.clone() for t in _tensors_of(x)]


def assert_same_state(a, b, what=""):
    """a and b (snapshots, or things snapshot() takes) hold bitwise the same tensors."""
    ta, tb = _tensors_of(a), _tensors_of(b)
    assert len(ta) == len(tb), f"{what}: {len(ta)} vs {len(tb)} tensors"
    for i, (x, y) in enumerate(zip(ta, tb)):
        assert same_bits(x.cpu(), y.cpu()), f"{what}: state tensor {i} {list(x.shape)} changed"


def poison_allocator(*shapes_dtypes, copies=2):
    """CUDA: frees NaN-filled blocks of the sizes an op is about to allocate, so an output it
    fails to write reads back as NaN (the caching allocator hands the same blocks out again).
    shapes_dtypes: (shape, dtype) pairs. No-op without a GPU."""
    if not HAS_CUDA:
        return
    held = [torch.full(shape, math.nan, dtype=dt, device="cuda")
            for shape, dt in shapes_dtypes for _ in range(copies)]
    del held


def poison_free(cache):
    """NaN in every slot of a DMSCache's pools, so reading a slot it does not own shows up."""
    for lay in cache._layers:
        lay.k_cache.fill_(math.nan)
        lay.v_cache.fill_(math.nan)


# --------------------------------------------------------------------------------------------
# The error bound of a half-precision attention kernel (issue 17)

LAMBDA = 8.0     # probabilistic rounding-error bounds hold with probability >= 1 - 2 exp(-L^2 / 2)
SAFETY = 2.0     # every modelled rounding may happen twice (see attention_bound)
U32 = 2.0 ** -24


def unit_roundoff(dtype):
    """u = eps / 2: round to nearest moves x by at most u |x| (normal range)."""
    return torch.finfo(dtype).eps / 2


def attention_bound(q, k, v, scale, dtype, mask=None):
    """Reference and per-element error bounds of one KV head's attention, in float64.

    q [Q, D] (the queries that read this KV head), k, v [n, D] (the keys and values as stored,
    already rounded to `dtype`), mask [Q, n] bool (visible keys; None: all). Returns
    (o [Q, D], lse [Q], tol_o [Q, D], tol_lse [Q]); rows that see no key have o = 0, lse = -inf,
    tol = 0 (the kernel must give exact zeros / -inf there).

    The algorithm bounded: flash-decoding with float32 scores and accumulators: s_j = scale q.k_j
    (dtype x dtype products are exact in float32, D - 1 float32 additions, then x scale), an online
    softmax P_j = exp(s_j - m) in float32, l = sum_j P_j in float32, P rounded to `dtype` for the
    PV product (tensor cores), acc = sum_j P_j v_j in float32, o = acc / l rounded to `dtype`,
    lse = m + log l. u32 = 2^-24, u = unit roundoff of dtype, eta = its smallest subnormal,
    c_j = |scale| sum_i |q_i k_ji| (the condition of the dot product), m = max_j s_j, p = softmax(s).

    1. Scores: |s^_j - s_j| <= Delta_j = u32 ((D + 2) c_j + |s_j - m|): D - 1 additions of terms
       bounded by c_j (recursive summation, gamma_{D-1} ~ (D-1) u32), the scale product, the
       log2(e) product, and the rounding of s_j - m before exp. Worst case, not probabilistic.
    2. Through softmax, exactly: p^_j / p_j = e^{d_j} / E with E = sum_i p_i e^{d_i} in
       [E-, E+] = [sum p e^{-Delta}, sum p e^{Delta}], so |p^_j - p_j| <= dp_j =
       max(p_j e^{Delta_j} / E- - p_j, p_j - p_j e^{-Delta_j} / E+) and, since sum p^ = sum p,
       |o(s^) - o(s)| <= sum_j dp_j |v_j - o|.   lse: lse(s - Delta) <= lse(s^) <= lse(s + Delta).
       Both are evaluated in float64 in the log domain, so huge Delta (scores of order 1e5) and
       far-off keys (p_j ~ 0, Delta_j large) are handled without a max over keys.
    3. P rounded to dtype: each P_j moves by at most a_j = max(u P_j, eta / 2); l may be summed
       from the unrounded P, so the error is sum_j eps_j p_j v_j (not v_j - o): we take |v_j| + |o|
       to cover either convention. The eps_j are independent, mean-zero, bounded roundings
       (Higham & Mary, SIAM J. Sci. Comput. 2019): Hoeffding gives
       |sum_j a_j e_j (|v_j| + |o|)| <= LAMBDA sqrt(sum_j a_j^2 (|v_j| + |o|)^2) with probability
       >= 1 - 2 exp(-LAMBDA^2 / 2) = 1 - 2.5e-14 per element (LAMBDA = 8). Exactly tied scores
       give P_j = 1, exact, so correlated roundings do not arise from ties.
    4. float32 accumulation of acc and l over n keys (any order, split-KV merge included), the
       same probabilistic model: LAMBDA sqrt(n) u32 (sum_j p_j |v_j| + |o|); for lse,
       LAMBDA sqrt(n) u32 + 4 u32 (exp2 / log2 approximations, 2 ulp each).
    5. Output rounding to dtype: u |o| + eta / 2 (exact, not multiplied by SAFETY); lse is
       float32: u32 |lse|.

    tol_o = SAFETY (term 2 + term 3 + term 4) + term 5, tol_lse likewise. SAFETY = 2 is not
    needed by any modelled term (their products, the second-order terms, are below 1%): it lets
    every modelled rounding happen twice (a kernel that rounds P once more, stores a partial
    result of a split in float32 and reloads it, or folds scale and log2 e into separate
    multiplies), and it is not tuned to any measured error.
    """
    q64, k64, v64 = q.double(), k.double(), v.double()
    Q, D = q64.shape
    n = k64.shape[0]
    u = unit_roundoff(dtype)
    eta = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps   # smallest subnormal
    scale = abs(float(scale))
    if mask is None:
        mask = torch.ones(Q, n, dtype=torch.bool, device=q64.device)
    mask = mask.to(q64.device)
    seen = mask.any(dim=1)
    s = (q64 @ k64.t()) * scale
    s = s.masked_fill(~mask, -math.inf)
    c = (q64.abs() @ k64.abs().t()) * scale
    m = s.amax(dim=1, keepdim=True).nan_to_num(0.0, neginf=0.0)
    lse = torch.logsumexp(s, dim=1, keepdim=True)
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    logp = s - lse_safe
    p = logp.exp()                                             # 0 where masked
    o = p @ v64
    delta = U32 * ((D + 2) * c + (s - m).abs().nan_to_num(0.0, posinf=0.0))
    delta = delta.masked_fill(~mask, 0.0)
    le_plus = torch.logsumexp(s + delta, dim=1, keepdim=True) - lse_safe     # log E+
    le_minus = torch.logsumexp(s - delta, dim=1, keepdim=True) - lse_safe    # log E-
    dp = torch.maximum((logp + delta - le_minus).exp() - p, p - (logp - delta - le_plus).exp())
    dp = dp.masked_fill(~mask, 0.0).nan_to_num(0.0, posinf=math.inf)
    va = v64.abs()
    # sum_j dp_j |v_jd - o_d| without materialising [Q, n, D] for long heads: chunks of keys
    # (larger on a GPU, where each chunk is a launch; only the float64 summation order differs).
    e_score = torch.zeros(Q, D, dtype=torch.float64, device=q64.device)
    step = max(1, (1 << (22 if q64.device.type == "cpu" else 25)) // max(1, Q * D))
    for a in range(0, n, step):
        e_score += (dp[:, a:a + step, None] * (v64[None, a:a + step] - o[:, None]).abs()).sum(1)
    a_j = torch.maximum(u * p, (eta / 2) * (m - lse_safe).exp()).masked_fill(~mask, 0.0)
    a2 = a_j * a_j
    oa = o.abs()
    # sum_j a_j^2 (|v_jd| + |o_d|)^2 = a2 @ |v|^2 + 2 |o_d| (a2 @ |v|) + |o_d|^2 sum a2
    e_p = LAMBDA * (a2 @ (va * va) + 2 * oa * (a2 @ va) + oa * oa * a2.sum(1, keepdim=True)).sqrt()
    n_seen = mask.sum(1, keepdim=True).double()
    e_acc = LAMBDA * n_seen.sqrt() * U32 * (p @ va + oa)
    tol_o = SAFETY * (e_score + e_p + e_acc) + u * oa + eta / 2
    lse_err = torch.maximum(le_plus, -le_minus)
    tol_lse = SAFETY * (lse_err + LAMBDA * n_seen.sqrt() * U32 + 4 * U32) + U32 * lse_safe.abs()
    o = torch.where(seen[:, None], o, torch.zeros_like(o))
    tol_o = torch.where(seen[:, None], tol_o, torch.zeros_like(tol_o))
    tol_lse = torch.where(seen[:, None], tol_lse, torch.zeros_like(tol_lse))
    return o, lse[:, 0], tol_o, tol_lse[:, 0]


def paged_heads(q, k_cache, v_cache, block_table, seq_lens):
    """Yields (b, heads, K, V) for every non-empty (row b, KV head) of a paged decode problem:
    heads the slice of q's query heads that read it, K and V [n, D] gathered from the pool."""
    hkv = block_table.shape[1]
    G = q.shape[1] // max(1, hkv)
    lens = seq_lens.cpu()
    for b in range(q.shape[0]):
        for g in range(hkv):
            n = int(lens[b, g])
            if n:
                yield (b, slice(g * G, (g + 1) * G), reference.paged_gather(k_cache, block_table[b, g], n),
                       reference.paged_gather(v_cache, block_table[b, g], n))


def decode_bound(q, k_cache, v_cache, block_table, seq_lens, scale, dtype=None, device="cpu"):
    """attention_bound for every (row, KV head) of a paged decode: (o [B, Hq, D], lse [B, Hq],
    tol_o, tol_lse), float64 on the CPU, from the tensors as the kernel read them. `device`:
    where the float64 math runs (the same oracle; a GPU only changes float64 rounding, far below
    any bound), the results come back to the CPU."""
    q, k_cache, v_cache = q.to(device), k_cache.to(device), v_cache.to(device)
    block_table, seq_lens = block_table.to(device), seq_lens.cpu()
    B, hq, D = q.shape
    dtype = dtype or q.dtype
    o = torch.zeros(B, hq, D, dtype=torch.float64, device=device)
    lse = torch.full((B, hq), -math.inf, dtype=torch.float64, device=device)
    tol_o, tol_lse = torch.zeros_like(o), torch.zeros_like(lse)
    for b, hs, kk, vv in paged_heads(q, k_cache, v_cache, block_table, seq_lens):
        o[b, hs], lse[b, hs], tol_o[b, hs], tol_lse[b, hs] = attention_bound(
            q[b, hs], kk, vv, scale, dtype)
    return o.cpu(), lse.cpu(), tol_o.cpu(), tol_lse.cpu()


def dms_bound(q, k, v, logits, window, scale, dtype=None, rows=None, device="cpu"):
    """attention_bound under the DMS visibility rule for one sequence: q [N, Hq, D], k, v
    [N, Hkv, D], logits [N, Hkv]; rows: the query positions to bound (default all). Returns
    (o, lse, tol_o, tol_lse) with o [R, Hq, D], float64 on the CPU. `device`: where the float64
    math runs (as decode_bound)."""
    q, k, v, logits = q.to(device), k.to(device), v.to(device), logits.to(device)
    N, hq, D = q.shape
    hkv = k.shape[1]
    G = hq // hkv
    rows = (torch.arange(N) if rows is None else torch.as_tensor(rows)).to(device)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dtype = dtype or q.dtype
    mask = reference.visibility_mask(logits, window)[:, rows]          # [Hkv, R, N]
    R = rows.numel()
    o = torch.zeros(R, hq, D, dtype=torch.float64, device=device)
    lse = torch.zeros(R, hq, dtype=torch.float64, device=device)
    tol_o, tol_lse = torch.zeros_like(o), torch.zeros_like(lse)
    for h in range(hq):
        g = h // G
        o[:, h], lse[:, h], tol_o[:, h], tol_lse[:, h] = attention_bound(
            q[rows, h], k[:, g], v[:, g], scale, dtype, mask[g])
    return o.cpu(), lse.cpu(), tol_o.cpu(), tol_lse.cpu()


def bound_violations(out, ref, tol):
    """(count, worst err / tol, first bad index) of |out - ref| > tol, NaN counting as bad."""
    o = out.double().cpu()
    err = (o - ref).abs()
    bad = ~(err <= tol)                                   # NaN compares False: bad
    ratio = (err / tol.clamp_min(1e-300)).nan_to_num(math.inf)
    first = bad.nonzero()[0].tolist() if bad.any() else None
    return int(bad.sum()), (ratio.max().item() if ratio.numel() else 0.0), first


def assert_within_bound(out, ref, tol, what, lse=None, lse_ref=None, lse_tol=None):
    """out within tol of ref elementwise (tol from attention_bound); lse likewise when given,
    with -inf exactly where the reference is -inf (heads that see no key)."""
    assert list(out.shape) == list(ref.shape), f"{what}: shape {list(out.shape)} vs {list(ref.shape)}"
    nbad, worst, first = bound_violations(out, ref, tol)
    print(f"{what}: max err/bound {worst:.3g}")
    assert nbad == 0, (f"{what}: {nbad} of {out.numel()} elements outside the error bound, worst "
                       f"{worst:.3g} x bound, first at {first}: got {out.double().cpu()[tuple(first)].item()!r}, "
                       f"want {ref[tuple(first)].item()!r} +- {tol[tuple(first)].item():.3g}")
    if lse is not None:
        lse = lse.double().cpu()
        empty = torch.isneginf(lse_ref)
        assert torch.equal(torch.isneginf(lse), empty), f"{what}: lse -inf pattern differs"
        nbad, worst, first = bound_violations(lse[~empty], lse_ref[~empty], lse_tol[~empty])
        assert nbad == 0, f"{what}: lse outside the bound ({nbad} heads, worst {worst:.3g} x bound)"


# --------------------------------------------------------------------------------------------
# DMS state tensors (params.h) and their logical comparison (test_decode_step: CPU and CUDA)


def seed_of(*args):
    """A seed fixed by the test's parameters (hash() of a str changes from run to run)."""
    return zlib.crc32(repr(args).encode()) & 0x7FFFFFFF


STATE_KEYS = ("k_cache", "v_cache", "block_table", "seq_lens", "ring", "num_tokens", "free_stack",
              "free_top")


def new_state(max_seqs, hkv, dim, num_blocks, block_size, window, max_blocks, dtype, device,
              gen=None):
    """Empty state per params.h. Caches start as NaN so that a read of an unwritten row shows;
    the free stack is a random permutation so that block ids are not accidentally positional."""
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    return dict(
        k_cache=torch.full((num_blocks, block_size, dim), math.nan, dtype=dtype, device=device),
        v_cache=torch.full((num_blocks, block_size, dim), math.nan, dtype=dtype, device=device),
        block_table=torch.full((max_seqs, hkv, max_blocks), -1, dtype=torch.int32, device=device),
        seq_lens=torch.zeros(max_seqs, hkv, dtype=torch.int32, device=device),
        ring=torch.zeros(max_seqs, hkv, window + 1, dtype=torch.int32, device=device),
        num_tokens=torch.zeros(max_seqs, dtype=torch.int32, device=device),
        free_stack=perm.to(device),
        free_top=torch.tensor([num_blocks], dtype=torch.int32, device=device),
    )


def state_args(st):
    return [st[k] for k in STATE_KEYS]


def clone_state(st, device=None):
    return {k: v.clone() if device is None else v.to(device).clone() for k, v in st.items()}


def step_inputs(b, hq, hkv, dim, dtype, evict_p, gen, device="cpu"):
    """q, k, v [b, *, dim] (before norm / RoPE) with the donor channel D-1 of each group's first
    query head pushed far from the decision threshold, positive with probability evict_p."""
    q = torch.randn(b, hq, dim, generator=gen)
    k = torch.randn(b, hkv, dim, generator=gen)
    v = torch.randn(b, hkv, dim, generator=gen)
    group = hq // hkv
    q[:, ::group, dim - 1] = make_logits(gen, b, hkv, evict_p, floor=0.25, span=1.0) * 4.0
    return q.to(dtype).to(device), k.to(dtype).to(device), v.to(dtype).to(device)


def norm_weights(dim, dtype, gen, device="cpu"):
    # Positive, so the norm keeps the sign of the donor channel.
    return ((torch.rand(dim, generator=gen) + 0.5).to(dtype).to(device),
            (torch.rand(dim, generator=gen) + 0.5).to(dtype).to(device))
def logical_view(st):
    """What a query can see, independent of block ids, for every (row, head) at once (CPU):
    num_tokens [S], seq_lens [S, H], the ring masked to the entries of the last min(n, w+1)
    positions [S, H, w+1], live [S, H, L] (slot < seq_len, L = max_blocks * block_size), and
    K and V [live slots, D] gathered through the block table in (row, head, slot) order."""
    st = {k: v.cpu() for k, v in st.items()}
    nt, lens, ring, bt = st["num_tokens"].long(), st["seq_lens"].long(), st["ring"], st["block_table"]
    r = ring.shape[2]
    idx = torch.arange(r)
    valid = (nt[:, None] >= r) | (idx[None, :] < nt[:, None])            # [S, R]
    ring = torch.where(valid[:, None, :], ring, torch.zeros_like(ring))
    bs = st["k_cache"].shape[1]
    slots = torch.arange(bt.shape[2] * bs)
    live = slots[None, None, :] < lens[:, :, None]                        # [S, H, L]
    blocks = bt.long()[:, :, slots // bs][live]                           # [live slots]
    within = (slots % bs)[None, None, :].expand_as(live)[live]
    return [nt, lens, ring, live, st["k_cache"][blocks, within], st["v_cache"][blocks, within]]


def _where_rows(live, diff):
    """(row, head, slot) of the first differing live slots."""
    return live.nonzero()[diff.any(-1)][:5].tolist()


def compare_logical(a, b, k_rtol=0.0, where=""):
    """a, b: logical_view()s. Same tokens, lengths, ring entries (slot and flag), K/V at every
    live slot (K within k_rtol when it was roped in float on one side, double on the other)."""
    na, la, ra, live, ka, va = a
    nb, lb, rb, _, kb, vb = b
    assert torch.equal(na, nb), f"num_tokens differ {where}: {na.tolist()} vs {nb.tolist()}"
    assert torch.equal(la, lb), f"seq_lens differ {where}: {(la != lb).nonzero().tolist()}"
    assert torch.equal(ra, rb), f"ring entries differ {where} at (row, head) " \
        f"{(ra != rb).any(-1).nonzero().tolist()}"
    for x, name in ((ka, "K"), (va, "V"), (kb, "K"), (vb, "V")):
        assert not torch.isnan(x).any(), f"unwritten {name} slot read {where}"
    if k_rtol == 0.0:
        assert torch.equal(ka, kb), f"K differs {where} at (row, head) " \
            f"{_where_rows(live, ka != kb)}"
    else:
        torch.testing.assert_close(ka.float(), kb.float(), rtol=k_rtol, atol=k_rtol,
                                   msg=lambda m: f"K {where}: {m}")
    assert torch.equal(va, vb), f"V differs {where} at (row, head) " \
        f"{_where_rows(live, va != vb)}"


def assert_same_logical(a, b, rows=None, hkv=None, k_rtol=0.0, where=""):
    """States a and b hold the same logical content (rows/hkv kept for the old call form)."""
    compare_logical(logical_view(a), logical_view(b), k_rtol, where)
    assert int(a["free_top"][0]) == int(b["free_top"][0]), f"free_top differs {where}"


def assert_pool_consistent(st, rows_live, block_size):
    """Every block is either free or owned by exactly one live (row, head) block-table entry."""
    nb = st["k_cache"].shape[0]
    top = int(st["free_top"][0])
    owned = []
    for row in rows_live:
        for g in range(st["seq_lens"].shape[1]):
            n = math.ceil(int(st["seq_lens"][row, g]) / block_size)
            owned += st["block_table"][row, g, :n].cpu().tolist()
    free = st["free_stack"][:top].cpu().tolist()
    assert len(owned) + len(free) == nb, f"{len(owned)} owned + {len(free)} free != {nb} blocks"
    assert sorted(owned + free) == list(range(nb)), "a block is lost or owned twice"
