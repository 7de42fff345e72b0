"""CPU ops (torch.ops.dms.*) against the float64 oracle (dms_ext.reference): conversions,
sparse_decode, eviction_rope, sparse_prefill, and the append / prefill / fork / release state
semantics. The ops' interface (opcheck of schemas and fake kernels, argument errors, the
capability table) is in test_ops_interface.py, which shares State and decode_case from here.

Tolerances (DESIGN.md): float32 ~1e-5 relative; bf16 / fp16 within 2x of what plain torch in
that dtype gets against the same float64 reference (plus a tiny floor for lucky torch runs).
"""
import math
import random

import pytest
import torch

import dms_ext  # noqa: F401
from dms_ext import ops, reference
from helpers import assert_same_state, make_logits, paged_heads, snapshot

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FLOOR = {torch.float32: 0.0, torch.bfloat16: 2e-3, torch.float16: 3e-4}


def rel_err(x, ref):
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def assert_close_to_ref(out, ref, torch_out, dtype, what):
    """fp32: relative 1e-5; half types: max abs error <= 2x plain torch's (+ floor)."""
    assert not torch.isnan(out).any(), f"{what}: NaN in output"
    if dtype == torch.float32:
        assert rel_err(out, ref) < 1e-5, f"{what}: rel err {rel_err(out, ref)}"
        return
    err = (out.double() - ref).abs().max().item()
    err_torch = (torch_out.double() - ref).abs().max().item()
    assert err <= 2 * err_torch + FLOOR[dtype], f"{what}: err {err} vs torch {err_torch}"


# --------------------------------------------------------------------------------------------
# Pool / state helpers


class State:
    """The per-layer state tensors of params.h, CPU, poisoned where nothing is written yet."""

    def __init__(self, max_seqs, hkv, d, window, block_size, num_blocks, max_blocks, dtype):
        self.hkv, self.d, self.window, self.bs = hkv, d, window, block_size
        self.k_cache = torch.full((num_blocks, block_size, d), float("nan"), dtype=dtype)
        self.v_cache = torch.full((num_blocks, block_size, d), float("nan"), dtype=dtype)
        self.block_table = torch.zeros(max_seqs, hkv, max_blocks, dtype=torch.int32)
        self.seq_lens = torch.zeros(max_seqs, hkv, dtype=torch.int32)
        self.ring = torch.zeros(max_seqs, hkv, window + 1, dtype=torch.int32)
        self.num_tokens = torch.zeros(max_seqs, dtype=torch.int32)
        # Shuffled, so a head's blocks are scattered over the pool.
        self.free_stack = torch.randperm(num_blocks).int()
        self.free_top = torch.tensor([num_blocks], dtype=torch.int32)

    def tensors(self):
        return (self.k_cache, self.v_cache, self.block_table, self.seq_lens, self.ring,
                self.num_tokens, self.free_stack, self.free_top)

    def snapshot(self):
        return snapshot(self)

    def append(self, k, v, logits, rows, lens):
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
        torch.ops.dms.append(k, v, logits, torch.tensor(rows, dtype=torch.int32), cu,
                             *self.tensors())

    def head_kv(self, row, g):
        n = int(self.seq_lens[row, g])
        bt = self.block_table[row, g]
        return (reference.paged_gather(self.k_cache, bt, n),
                reference.paged_gather(self.v_cache, bt, n))


def sorted_rows(x):
    """Rows of a [n, D] tensor in a canonical (lexicographic) order, for set comparison."""
    x = x.double()
    for col in reversed(range(x.shape[1])):
        x = x[x[:, col].argsort(stable=True)]
    return x


def check_sequence(st, row, k_all, v_all, logits_all):
    """The state of `row` is docs/semantics.md's after the tokens k_all/v_all/logits_all [N, ...]:
    the slots hold exactly the K/V visible to the last query, seq_lens = live_counts, and the ring
    holds the last min(N, w+1) tokens with their flags."""
    n = k_all.shape[0]
    w = st.window
    assert int(st.num_tokens[row]) == n
    live = reference.live_counts(logits_all, w)
    assert st.seq_lens[row].long().tolist() == live.tolist()
    if n == 0:
        return
    mask = reference.visibility_mask(logits_all, w)[:, n - 1]        # [Hkv, N]
    d = torch.zeros(n, st.hkv, dtype=torch.bool)
    d[:-1] = logits_all[1:] > 0
    for g in range(st.hkv):
        kc, vc = st.head_kv(row, g)
        vis = mask[g].nonzero().squeeze(1)
        assert torch.equal(sorted_rows(kc), sorted_rows(k_all[vis, g])), (row, g)
        assert torch.equal(sorted_rows(vc), sorted_rows(v_all[vis, g])), (row, g)
        for j in range(max(0, n - w - 1), n):
            e = int(st.ring[row, g, j % (w + 1)])
            assert torch.equal(kc[e >> 1], k_all[j, g]), (row, g, j)
            assert torch.equal(vc[e >> 1], v_all[j, g]), (row, g, j)
            if j < n - 1:
                assert bool(e & 1) == bool(d[j, g]), (row, g, j)


def check_pool(st, rows):
    """Blocks held by `rows` plus the free stack are every block exactly once."""
    held = []
    for r in rows:
        for g in range(st.hkv):
            nb = -(-int(st.seq_lens[r, g]) // st.bs)
            held += st.block_table[r, g, :nb].tolist()
    free = st.free_stack[: int(st.free_top)].tolist()
    assert sorted(held + free) == list(range(st.k_cache.shape[0]))


def random_chunks(n, max_chunk):
    out = []
    while n > 0:
        c = random.choice([1, 1, random.randint(1, max_chunk)])
        c = min(c, n)
        out.append(c)
        n -= c
    return out


# --------------------------------------------------------------------------------------------
# Conversions (csrc/cpu/convert.h), checked bit for bit through the ops


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_load_store_round_trips_every_bit_pattern(dtype):
    # One key per head: softmax weight 1, so out == v through load -> float64 -> store.
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    vals = bits.view(dtype)
    vals = vals[torch.isfinite(vals.float())]
    d = 64
    vals = vals[: vals.numel() // d * d].reshape(-1, 1, d)
    nb = vals.shape[0]
    q = torch.randn(nb, 1, d).to(dtype)
    k_cache = torch.randn(nb, 1, d).to(dtype) * 0.01
    bt = torch.arange(nb, dtype=torch.int32).reshape(nb, 1, 1)
    sl = torch.ones(nb, 1, dtype=torch.int32)
    out = ops.sparse_decode(q, k_cache, vals, bt, sl)
    # Exact values (the weighted sum 0.0 + 1 * -0.0 is +0.0, so compare values, not bits).
    assert torch.equal(out, vals)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float_to_half_rounds_to_nearest_even_like_torch(dtype):
    # k = 1, cos = c, sin = 0: RoPE gives exactly c in float, then the store rounds it.
    finfo = torch.finfo(dtype)
    c = torch.cat([
        torch.randn(4096) * 10.0 ** torch.randint(-9, 6, (4096,)).float(),
        torch.randn(512) * finfo.tiny,                                   # subnormals
        torch.tensor([finfo.max, -finfo.max, finfo.max * 1.0001, 0.0, -0.0, 1e-30, 65519.0,
                      65520.0, float("inf"), -float("inf")]),
    ])
    # Exact ties halfway between neighbours in `dtype` (bit patterns b and b + 1, same sign),
    # over the whole range, subnormals included: these decide round-to-nearest-even.
    bits = torch.randint(0, 0x7C00 if dtype == torch.float16 else 0x7F80, (4096,))
    bits = torch.cat([bits, torch.arange(0, 64)]).to(torch.int16)
    a, up = bits.view(dtype), (bits + 1).view(dtype)
    ties = ((a.double() + up.double()) / 2).float()
    ties = ties[torch.isfinite(up.float())]
    c = torch.cat([c, ties, -ties]).float()
    d = 2
    n = c.numel()
    cs = torch.stack([c, torch.zeros(n)], dim=1)                       # [n, D]: cos, sin
    q = torch.randn(n, 1, d).to(dtype)
    k = torch.ones(n, 1, d, dtype=dtype)
    ops.eviction_rope(q, k, torch.arange(n), cs)
    assert torch.equal(k[:, 0, 0].view(torch.int16), c.to(dtype).view(torch.int16))


# --------------------------------------------------------------------------------------------
# sparse_decode


def decode_case(b, hkv, group, d, bs, dtype, max_len=70, empty_rate=0.2):
    hq = hkv * group
    lens = torch.randint(0, max_len + 1, (b, hkv), dtype=torch.int32)
    # Block boundaries and empty heads on purpose.
    edge = torch.tensor([0, 1, bs - 1, bs, bs + 1, 2 * bs, 3 * bs - 1], dtype=torch.int32)
    pick = torch.rand(b, hkv) < 0.4
    lens = torch.where(pick, edge[torch.randint(0, len(edge), (b, hkv))], lens)
    lens = torch.where(torch.rand(b, hkv) < empty_rate, torch.zeros_like(lens), lens)
    max_blocks = max(1, -(-int(lens.max()) // bs)) + 1
    num_blocks = b * hkv * max_blocks + 3
    perm = torch.randperm(num_blocks).int()
    bt = perm[: b * hkv * max_blocks].reshape(b, hkv, max_blocks).contiguous()
    k_cache = torch.full((num_blocks, bs, d), float("nan"), dtype=dtype)
    v_cache = torch.full((num_blocks, bs, d), float("nan"), dtype=dtype)
    for bi in range(b):
        for g in range(hkv):
            n = int(lens[bi, g])
            for s in range(n):
                blk = int(bt[bi, g, s // bs])
                k_cache[blk, s % bs] = torch.randn(d).to(dtype)
                v_cache[blk, s % bs] = torch.randn(d).to(dtype)
    q = torch.randn(b, hq, d).to(dtype)
    return q, k_cache, v_cache, bt, lens


def torch_decode(q, k_cache, v_cache, bt, lens, scale):
    """Plain torch in q's dtype: the baseline the tolerance is measured against."""
    out = torch.zeros_like(q)
    for b, hs, kk, vv in paged_heads(q, k_cache, v_cache, bt, lens):
        out[b, hs] = torch.softmax((q[b, hs] @ kk.t()) * scale, -1) @ vv
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 3, 5, 7])
def test_sparse_decode_matches_reference(dtype, group):
    bs = random.choice([4, 16])
    q, k_cache, v_cache, bt, lens = decode_case(5, 2, group, 32, bs, dtype)
    out = ops.sparse_decode(q, k_cache, v_cache, bt, lens)
    ref = reference.sparse_decode(q, k_cache, v_cache, bt, lens)
    assert out.dtype == dtype and out.shape == q.shape
    base = torch_decode(q, k_cache, v_cache, bt, lens, 1 / math.sqrt(32))
    assert_close_to_ref(out, ref, base, dtype, "sparse_decode")
    # Empty heads give exact zeros.
    empty = (lens == 0).repeat_interleave(group, dim=1)
    assert (out[empty] == 0).all()


def test_sparse_decode_lse_and_scale():
    q, k_cache, v_cache, bt, lens = decode_case(4, 3, 2, 16, 8, torch.float32)
    scale = 0.37
    out, lse = ops.sparse_decode_lse(q, k_cache, v_cache, bt, lens, scale=scale)
    ref = reference.sparse_decode(q, k_cache, v_cache, bt, lens, scale=scale)
    assert rel_err(out, ref) < 1e-5
    for b in range(4):
        for h in range(6):
            g = h // 2
            n = int(lens[b, g])
            if n == 0:
                assert lse[b, h] == -math.inf
                continue
            kk = reference.paged_gather(k_cache, bt[b, g], n).double()
            want = torch.logsumexp(kk @ q[b, h].double() * scale, 0)
            assert abs(lse[b, h].item() - want.item()) < 1e-5 * max(1.0, abs(want.item()))


def test_sparse_decode_strided_q():
    q, k_cache, v_cache, bt, lens = decode_case(3, 2, 3, 16, 4, torch.float32)
    wide = torch.randn(3, 6, 40)
    wide[:, :, 5:21] = q
    qs = wide[:, :, 5:21]
    assert not qs.is_contiguous()
    out = ops.sparse_decode(qs, k_cache, v_cache, bt, lens)
    assert torch.equal(out, ops.sparse_decode(q, k_cache, v_cache, bt, lens))


# --------------------------------------------------------------------------------------------
# eviction_rope


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("norm", [False, True])
def test_eviction_rope_matches_reference(dtype, group, norm):
    t, hkv, d = 37, 2, 32
    q = (torch.randn(t, hkv * group, d) * 0.3).to(dtype)
    k = torch.randn(t, hkv, d).to(dtype)
    cs = reference.rope_cache(4096, d)
    pos = torch.randint(0, 4096, (t,), dtype=random.choice([torch.int32, torch.int64]))
    wq = (torch.rand(d) + 0.5).to(dtype) if norm else None
    wk = (torch.rand(d) + 0.5).to(dtype) if norm else None
    q_ref, k_ref, l_ref = reference.eviction_rope(q, k, pos, cs, 100.0, 5.0, wq, wk, 1e-6)
    q_op, k_op = q.clone(), k.clone()
    logits = ops.eviction_rope(q_op, k_op, pos, cs, q_norm_weight=wq, k_norm_weight=wk)
    assert logits.dtype == torch.float32 and logits.shape == (t, hkv)
    assert torch.allclose(logits, l_ref, rtol=1e-5, atol=1e-4)
    # One rounding at the end in both, so at most one unit in the last place apart.
    ulp = {torch.float32: 1e-6, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
    for got, want in ((q_op, q_ref), (k_op, k_ref)):
        assert torch.allclose(got.float(), want.float(), rtol=ulp, atol=1e-6)
    donors = torch.arange(hkv) * group
    assert (q_op[:, donors, d - 1] == 0).all()
    # Non-donor heads keep their last channel.
    if group > 1:
        assert (q_op[:, 1, d - 1] != 0).any()


def test_eviction_rope_logits_sign_and_rope_identity_at_position_zero():
    t, hkv, group, d = 9, 3, 2, 16
    q = torch.randn(t, hkv * group, d)
    k = torch.randn(t, hkv, d)
    cs = reference.rope_cache(8, d)
    q0, k0 = q.clone(), k.clone()
    logits = ops.eviction_rope(q0, k0, torch.zeros(t, dtype=torch.int64), cs, 2.0, 0.5)
    assert torch.allclose(logits, q[:, ::group, d - 1] * 2.0 - 0.5, atol=1e-6)
    expect = q.clone()
    expect[:, ::group, d - 1] = 0
    assert torch.equal(q0, expect) and torch.equal(k0, k)


# --------------------------------------------------------------------------------------------
# append: the state after any chunking equals docs/semantics.md


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,bs", [(1, 2), (3, 4), (8, 5)])
def test_append_state_is_sequential_semantics(dtype, window, bs):
    hkv, d, max_seqs = 3, 8, 5
    lengths = [0, 1, window + 1, window + 2, 37]
    rows = random.sample(range(max_seqs), len(lengths))
    max_blocks = -(-max(lengths) // bs) + 1
    st = State(max_seqs, hkv, d, window, bs, max_seqs * hkv * max_blocks, max_blocks, dtype)
    data = {}
    for r, n in zip(rows, lengths):
        rate = random.choice([0.2, 0.5, 0.9])
        data[r] = (torch.randn(n, hkv, d).to(dtype), torch.randn(n, hkv, d).to(dtype),
                   make_logits(None, n, hkv, rate), random_chunks(n, 2 * window + 3))
    done = {r: 0 for r in rows}
    pending = {r: list(data[r][3]) for r in rows}
    # Calls mixing chunks of several sequences, in a random order.
    while any(pending.values()):
        live = [r for r in rows if pending[r]]
        call = random.sample(live, random.randint(1, len(live)))
        ks, vs, ls, lens = [], [], [], []
        for r in call:
            c = pending[r].pop(0)
            k, v, lg, _ = data[r]
            ks.append(k[done[r]:done[r] + c])
            vs.append(v[done[r]:done[r] + c])
            ls.append(lg[done[r]:done[r] + c])
            lens.append(c)
            done[r] += c
        st.append(torch.cat(ks), torch.cat(vs), torch.cat(ls), call, lens)
    for r in rows:
        k, v, lg, _ = data[r]
        check_sequence(st, r, k, v, lg)
    check_pool(st, rows)


def test_append_out_of_blocks_leaves_state_untouched():
    hkv, d, w, bs = 2, 4, 2, 2
    st = State(3, hkv, d, w, bs, 6, 8, torch.float32)
    st.append(torch.randn(3, hkv, d), torch.randn(3, hkv, d), make_logits(None, 3, hkv), [1], [3])
    before = st.snapshot()
    # Two sequences at once; the pool runs dry in the second chunk: nothing may change.
    n = 6
    with pytest.raises(RuntimeError, match="out of blocks"):
        st.append(torch.randn(n, hkv, d), torch.randn(n, hkv, d), -torch.ones(n, hkv), [0, 1],
                  [3, 3])
    assert_same_state(before, st.snapshot())


def test_append_then_release_returns_every_block():
    hkv, d, w, bs = 2, 4, 3, 3
    st = State(4, hkv, d, w, bs, 40, 8, torch.float16)
    for r in (0, 2):
        n = random.randint(5, 20)
        st.append(torch.randn(n, hkv, d).half(), torch.randn(n, hkv, d).half(),
                  make_logits(None, n, hkv), [r], [n])
    check_pool(st, [0, 2])
    ops.release(2, st.block_table, st.seq_lens, st.ring, st.num_tokens, st.free_stack,
                st.free_top, bs)
    check_pool(st, [0])
    assert (st.block_table[2] == -1).all()
    assert st.seq_lens[2].eq(0).all() and st.ring[2].eq(0).all() and int(st.num_tokens[2]) == 0
    ops.release(0, st.block_table, st.seq_lens, st.ring, st.num_tokens, st.free_stack,
                st.free_top, bs)
    assert int(st.free_top) == 40
    check_pool(st, [])


# --------------------------------------------------------------------------------------------
# sparse_prefill == dms_attention over the whole sequence, for any chunking


def torch_dms_attention(q, k, v, logits, window, scale):
    """Plain torch in q's dtype with the DMS mask: the tolerance baseline for half types."""
    n, hq, d = q.shape
    group = hq // k.shape[1]
    mask = reference.visibility_mask(logits, window).repeat_interleave(group, 0)
    kk = k.transpose(0, 1).repeat_interleave(group, 0)
    vv = v.transpose(0, 1).repeat_interleave(group, 0)
    s = (q.transpose(0, 1) @ kk.transpose(1, 2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return (torch.softmax(s, -1) @ vv).transpose(0, 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 3])
def test_sparse_prefill_matches_reference_for_chunked_schedules(dtype, group):
    hkv, d, w, bs, max_seqs = 2, 16, 5, 4, 4
    hq = hkv * group
    totals = [1, 7, 23, 31]
    max_blocks = -(-max(totals) // bs) + 1
    st = State(max_seqs, hkv, d, w, bs, max_seqs * hkv * max_blocks, max_blocks, dtype)
    rows = random.sample(range(max_seqs), len(totals))
    seq = {}
    for r, n in zip(rows, totals):
        seq[r] = dict(q=torch.randn(n, hq, d).to(dtype), k=torch.randn(n, hkv, d).to(dtype),
                      v=torch.randn(n, hkv, d).to(dtype),
                      logits=make_logits(None, n, hkv, random.choice([0.3, 0.7])),
                      chunks=random_chunks(n, 12), done=0)
    scale = 1 / math.sqrt(d)
    outs = {r: torch.full((n, hq, d), float("nan"), dtype=dtype) for r, n in zip(rows, totals)}
    while any(s["chunks"] for s in seq.values()):
        call = [r for r in rows if seq[r]["chunks"] and random.random() < 0.7]
        if not call:
            continue
        parts = {name: [] for name in ("q", "k", "v", "logits")}
        lens = []
        for r in call:
            s = seq[r]
            c = s["chunks"].pop(0)
            for name in parts:
                parts[name].append(s[name][s["done"]:s["done"] + c])
            lens.append(c)
        q, k, v, lg = (torch.cat(parts[x]) for x in ("q", "k", "v", "logits"))
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
        slots = torch.tensor(call, dtype=torch.int32)
        out = ops.sparse_prefill(q, k, v, lg, slots, cu, st.k_cache, st.v_cache, st.block_table,
                                 st.seq_lens, st.ring, st.num_tokens)
        for i, r in enumerate(call):
            outs[r][seq[r]["done"]:seq[r]["done"] + lens[i]] = out[cu[i]:cu[i + 1]]
            seq[r]["done"] += lens[i]
        st.append(k, v, lg, call, lens)
    for r in rows:
        s = seq[r]
        ref = reference.dms_attention(s["q"], s["k"], s["v"], s["logits"], w, scale)
        base = torch_dms_attention(s["q"], s["k"], s["v"], s["logits"], w, scale)
        assert_close_to_ref(outs[r], ref, base, dtype, f"sparse_prefill row {r}")
        check_sequence(st, r, s["k"], s["v"], s["logits"])


# --------------------------------------------------------------------------------------------
# fork / release


def test_fork_copies_are_independent():
    hkv, d, w, bs, dtype = 2, 8, 3, 4, torch.bfloat16
    st = State(4, hkv, d, w, bs, 64, 10, dtype)
    n = 14
    k, v, lg = torch.randn(n, hkv, d).to(dtype), torch.randn(n, hkv, d).to(dtype), make_logits(None, n, hkv)
    st.append(k, v, lg, [1], [n])
    free_before = int(st.free_top)
    ops.fork(1, 3, *st.tensors())
    used = sum(-(-int(x) // bs) for x in st.seq_lens[1])
    assert int(st.free_top) == free_before - used
    check_sequence(st, 3, k, v, lg)
    check_pool(st, [1, 3])
    # Continue each copy differently: each equals its own history.
    hist = {}
    for r in (1, 3):
        m = random.randint(3, 9)
        k2, v2 = torch.randn(m, hkv, d).to(dtype), torch.randn(m, hkv, d).to(dtype)
        lg2 = make_logits(None, m, hkv)
        st.append(k2, v2, lg2, [r], [m])
        hist[r] = (torch.cat([k, k2]), torch.cat([v, v2]), torch.cat([lg, lg2]))
    for r in (1, 3):
        check_sequence(st, r, *hist[r])
    check_pool(st, [1, 3])
    ops.release(1, st.block_table, st.seq_lens, st.ring, st.num_tokens, st.free_stack,
                st.free_top, bs)
    check_sequence(st, 3, *hist[3])
    check_pool(st, [3])


def test_fork_out_of_blocks_and_non_empty_dst():
    hkv, d, w, bs = 2, 4, 2, 2
    st = State(3, hkv, d, w, bs, 7, 8, torch.float32)
    n = 6
    st.append(torch.randn(n, hkv, d), torch.randn(n, hkv, d), -torch.ones(n, hkv), [0], [n])
    before = st.snapshot()
    with pytest.raises(RuntimeError, match="out of blocks"):
        ops.fork(0, 1, *st.tensors())
    assert_same_state(before, st.snapshot())
    st2 = State(3, hkv, d, w, bs, 40, 8, torch.float32)
    for r in (0, 1):
        st2.append(torch.randn(n, hkv, d), torch.randn(n, hkv, d), make_logits(None, n, hkv), [r], [n])
    with pytest.raises(ValueError, match="dst"):
        ops.fork(0, 1, *st2.tensors())
    with pytest.raises(ValueError, match="dst"):
        ops.fork(0, 0, *st2.tensors())
