"""The helpers module of the test suite (conftest puts tests/ on sys.path).

Sections: devices (`DEVICES`, a `device` parameter as pytorch/extension-cpp's tests use it:
"cpu" always, "cuda" marked `cuda`, so it skips without a GPU); case counts (`SCALE`);
random inputs (`make_logits`, `step_inputs`, `norm_weights`); state snapshots and comparisons
(`snapshot`, `assert_same_state`, `poison_allocator`, `poison_free`); and for the
reliability suites (test_differential, test_soak, test_bad_inputs, test_compile):
a tolerance that only admits the final rounding, eviction logits with extreme values, and
SpecState, which drives the state ops (append / decode_step / fork / release / sparse_prefill)
on one set of state tensors and checks every touched row against SPEC section 1 through
dms_ext.reference after each call.

Two topics live in their own modules and are re-exported here, so `from helpers import X` works
for all of them: tests/bounds.py, the error bound every CUDA attention comparison uses
(`attention_bound`, `decode_bound`, `dms_bound`, `assert_within_bound`, `bound_violations`), and
tests/dms_state.py, the DMS state tensors and their logical comparison (`new_state`,
`logical_view`, `assert_same_logical`, `assert_pool_consistent`).

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

# Re-exported (one definition each, in its topic module): `from helpers import X` keeps working.
from bounds import (LAMBDA, SAFETY, U32, assert_logits_within, assert_within_bound,  # noqa: F401
                    attention_bound, bound_violations, decode_bound, dms_bound, logit_interval,
                    paged_heads, unit_roundoff)
from dms_state import (STATE_KEYS, assert_pool_consistent, assert_same_logical,  # noqa: F401
                       clone_state, compare_logical, logical_view, new_state, state_args)

# Multiplies every case count of the differential and soak suites: DMS_TEST_SCALE=10 for the
# GPU round (bench/gpu_round.sh sets it), default 1 (the CPU suite). DMS_DIFF_SCALE is the old name.
SCALE = max(1, int(os.environ.get("DMS_TEST_SCALE", os.environ.get("DMS_DIFF_SCALE", "1"))))


def _shard():
    """DMS_TEST_SHARD="i/n": this process runs slice i of n of the sharded CUDA suites (the random
    cases of test_differential and the CUDA soak), so that gpu_round.sh can spread 10x the cases
    over n processes. Default "0/1": everything."""
    text = os.environ.get("DMS_TEST_SHARD", "0/1")
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"DMS_TEST_SHARD must be 'i/n', got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"DMS_TEST_SHARD: need 0 <= i < n, got {text!r}")
    return i, n


SHARD, NSHARDS = _shard()


def shard_range(n: int) -> range:
    """Case indices of this shard: i, i + n_shards, ... below n (all of them when unsharded)."""
    return range(SHARD, n, NSHARDS)


def case_rngs(stream: int, i: int):
    """(random.Random, torch.Generator) of case i of a sharded stream: each case seeds its own,
    so a shard draws exactly the cases the unsharded run draws at those indices."""
    seed = stream * 1_000_003 + i
    return random.Random(seed), torch.Generator().manual_seed(seed)

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
            q_ref, k_ref, _ = reference.eviction_rope(q64, k64, pos, cs, alpha[0], alpha[1],
                                                      qn64, kn64, eps, logit_dtype=q.dtype)
        else:
            # Adapter logits: q keeps every channel; rope q and k alone (each as the `k` argument).
            _, q_ref, _ = reference.eviction_rope(torch.zeros_like(q64), q64, pos, cs, 1.0, 0.0,
                                                  None, qn64, eps)
            _, k_ref, _ = reference.eviction_rope(torch.zeros_like(k64), k64, pos, cs, 1.0, 0.0,
                                                  None, kn64, eps)
        if given is None:    # the reference's chain; a float32 RMSNorm's interval on CUDA
            lo, hi = logit_interval(q, self.hkv, alpha[0], alpha[1], qn, eps,
                                    float32_norm=self.float_math)
        qd, kd, vd = self._d(q), self._d(k), self._d(v)     # on the CPU: q itself, written
        done, logits = self.unless_out_of_blocks("decode_step", lambda: ops.decode_step(
            qd, kd, vd, self._d(cs), self._d(torch.tensor(rows, dtype=torch.int32)),
            *self.tensors(), alpha[0], alpha[1], None if qn is None else self._d(qn),
            None if kn is None else self._d(kn), eps, None if given is None else self._d(given)))
        if not done:
            return False
        assert same_bits(kd.cpu(), k), "decode_step wrote its k argument"
        if given is None:
            assert_logits_within(logits, lo, hi, "decode_step logits", self.logit_rtol, self.logit_atol)
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
# Random inputs for the state ops (test_decode_step: CPU and CUDA)


def seed_of(*args):
    """A seed fixed by the test's parameters (hash() of a str changes from run to run)."""
    return zlib.crc32(repr(args).encode()) & 0x7FFFFFFF


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
