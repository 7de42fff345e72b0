"""FP8 KV pools (issue 16) read by attention and end to end: the CUDA sparse_prefill and
sparse_decode(_lse) kernels on float8_e4m3fn pools (packed chunks over fp8 history, long windows
and block sizes, and against the same values dequantized into a pool of q's dtype), held to
tests/bounds.py's dms_bound / decode_bound on the dequantized history; DMSCache with fp8 pools
and per-layer scales on both devices (CUDA tests marked `cuda`, skipped without a GPU);
dms_ext.fp8.record_amax / scales_from_amax; and the metrics of bench/fp8_quality.py.
The state ops on fp8 pools (conversion, ops vs the oracle, bad inputs, opcheck) are in
test_fp8.py, whose conventions (F8, SCALES, append_one) this module shares.
"""
import math

import pytest
import torch

from dms_ext import DMSCache, ops, reference
from helpers import (DEVICES, assert_same_state, assert_within_bound, bits, decode_bound, dms_bound,
                     logical_view, make_logits, new_state, poison_allocator, snapshot)
from test_fp8 import F8, SCALES, append_one


# ------------------------------------------------------------------------ DMSCache


@pytest.mark.parametrize("device", DEVICES)
def test_cache_with_fp8_pools_matches_the_oracle(device):
    """DMSCache(kv_dtype=float8_e4m3fn) with per-layer scales: prefill, decode, fork; every
    attend against dms_attention on the dequantized history (chunk tokens of a prefill as given).
    CUDA (head_dim 64; prefills of 12 and 70 tokens, the second over history and past the window):
    the same, and a CPU cache driven alongside holds the same logical state and fp8 bytes."""
    L, hkv, hq, W = 2, 2, 4, 5
    D = 16 if device == "cpu" else 64
    ks, vs = [0.5, 0.03], [2.0, 0.05]
    kw = dict(window=W, block_size=4, num_blocks=96, max_seqs=4, dtype=torch.float16,
              kv_dtype=F8, k_scale=ks, v_scale=vs)
    c = DMSCache(L, hkv, D, device=device, **kw)
    twin = DMSCache(L, hkv, D, device="cpu", **kw) if device != "cpu" else None
    assert c.kv_dtype == F8 and c._layers[0].k_cache.dtype == F8
    gen = torch.Generator().manual_seed(5)
    hist = {}
    a = c.add_sequence()
    if twin is not None:
        assert twin.add_sequence() == a
    hist[a] = [[] for _ in range(L)]

    def same_as_twin():
        if twin is None:
            return
        keys = ("k_cache", "v_cache", "block_table", "seq_lens", "ring", "num_tokens")
        for layer in range(L):
            x = logical_view({k: getattr(c._layers[layer], k) for k in keys})
            y = logical_view({k: getattr(twin._layers[layer], k) for k in keys})
            for u, w, name in zip(x, y, ("num_tokens", "seq_lens", "ring", "live", "k", "v")):
                assert torch.equal(bits(u), bits(w)), f"layer {layer} {name}: cuda vs cpu cache"

    def attend(sid, n):
        for layer in range(L):
            q = torch.randn(n, hq, D, generator=gen).half()
            k = (torch.randn(n, hkv, D, generator=gen) * 4).half()
            v = (torch.randn(n, hkv, D, generator=gen) * 4).half()
            lg = make_logits(gen, n, hkv, 0.6)
            n0 = sum(x[0].shape[0] for x in hist[sid][layer])
            hist[sid][layer].append((q, k, v, lg))
            cu = torch.tensor([0, n], dtype=torch.int32)
            if device != "cpu":
                poison_allocator(((n, hq, D), torch.float16))
            out = c.attend(layer, [sid], cu.to(device), q.to(device), k.to(device), v.to(device),
                           lg.to(device))
            if twin is not None:
                twin.attend(layer, [sid], cu, q, k, v, lg)
            qa, ka, va, la = (torch.cat([x[i] for x in hist[sid][layer]]) for i in range(4))
            ka, va = ka.double(), va.double()
            m = qa.shape[0] if n == 1 else n0
            ka[:m] = reference.dequantize_fp8(reference.quantize_fp8(ka[:m], ks[layer]), ks[layer])
            va[:m] = reference.dequantize_fp8(reference.quantize_fp8(va[:m], vs[layer]), vs[layer])
            o, _, tol, _ = dms_bound(qa, ka, va, la, W, 1 / math.sqrt(D), torch.float16,
                                     rows=list(range(n0, n0 + n)))
            assert_within_bound(out.cpu(), o, tol, f"DMSCache fp8 {device} layer {layer} n={n}")
        same_as_twin()

    attend(a, 12)
    attend(a, 6)
    for _ in range(4):
        attend(a, 1)
    if device != "cpu":
        attend(a, 70)   # CUDA: a prefill over cached tokens, flagged ring entries and the band
        attend(a, 1)
    b = c.fork(a)
    if twin is not None:
        assert twin.fork(a) == b
    hist[b] = [list(h) for h in hist[a]]
    for _ in range(3):
        attend(b, 1)
        attend(a, 1)
    attend(b, 9)        # a prefill on the forked sequence
    c.release(b)
    assert (c._layers[1].k_cache.float().abs() == 448).any()  # layer 1's scale saturates


def test_cache_fp8_arguments_are_checked():
    kw = dict(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, num_blocks=8, max_seqs=2,
              dtype=torch.bfloat16, device="cpu")
    with pytest.raises(ValueError, match="kv_dtype"):
        DMSCache(**kw, kv_dtype=torch.float16)
    for bad in (0.0, -1.0, math.nan, math.inf, "x"):
        with pytest.raises(ValueError, match="k_scale"):
            DMSCache(**kw, kv_dtype=F8, k_scale=bad)
    with pytest.raises(ValueError, match="v_scale"):
        DMSCache(**kw, kv_dtype=F8, v_scale=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="k_scale"):
        DMSCache(**kw, k_scale=2.0)          # a bf16 pool has no scale
    c = DMSCache(**kw, kv_dtype=F8, k_scale=(0.5, 0.25))
    assert c.kv_dtype == F8 and c.dtype == torch.bfloat16 and c._layers[1].k_scale == 0.25
    assert DMSCache(**kw).kv_dtype == torch.bfloat16
    s = c.add_sequence()
    before = snapshot(c)
    x = torch.randn(1, 2, 8)
    with pytest.raises(ValueError, match="q"):
        c.attend(0, [s], torch.tensor([0, 1], dtype=torch.int32), x.to(F8), x.bfloat16(),
                 x.bfloat16(), torch.zeros(1, 2))
    assert_same_state(before, c, "fp8 q")


# ------------------------------------------------------------------------ CUDA


def fp8_prefill_case(act, D, G, ks, vs, hist, chunks, window, rate=0.6, bs=16, amp=1.0, seed=0,
                     spare_blocks=5):
    """One CUDA sparse_prefill call over packed chunks (chunk i continues sequence i, which
    holds hist[i] tokens appended to an fp8 pool with eviction: a prefill piece and single
    tokens, rows scattered, blocks shuffled, unowned slots NaN), against dms_bound on the
    history dequantized (the chunk as given), and the CPU twin on the same state likewise.
    Output poisoned first; the state is read, never written. The pool holds spare_blocks blocks
    beyond the histories'. Returns the fp8 pool."""
    dev, hkv = "cuda", 2
    hq = hkv * G
    gen = torch.Generator().manual_seed(seed)
    n_seq = len(chunks)
    rows = [(3 * i + 1) % (n_seq + 2) for i in range(n_seq)]        # distinct, scattered
    max_blocks = max(1, max(-(-h // bs) for h in hist))
    nb = sum(hkv * -(-h // bs) for h in hist) + spare_blocks
    st = new_state(n_seq + 2, hkv, D, nb, bs, window, max_blocks, F8, dev, gen=gen)
    full = []
    for i in range(n_seq):
        n = hist[i] + chunks[i]
        full.append((torch.randn(n, hq, D, generator=gen).to(act),
                     (torch.randn(n, hkv, D, generator=gen) * amp).to(act),
                     (torch.randn(n, hkv, D, generator=gen) * amp).to(act),
                     make_logits(gen, n, hkv, rate)))
    for i, h in enumerate(hist):        # a piece, then up to three single tokens
        cuts = sorted({0, h} | {max(0, h - j) for j in range(1, 4)})
        for a, b in zip(cuts[:-1], cuts[1:]):
            _, k, v, lg = full[i]
            append_one(st, k[a:b].to(dev), v[a:b].to(dev), [rows[i]], [0, b - a],
                       lg[a:b].to(dev), ks, vs)
    cu = [0]
    for c in chunks:
        cu.append(cu[-1] + c)
    q, k, v, lg = (torch.cat([full[i][j][hist[i]:] for i in range(n_seq)]) for j in range(4))
    slots = torch.tensor(rows, dtype=torch.int32)
    cu_t = torch.tensor(cu, dtype=torch.int32)
    scale = D ** -0.5
    pool = [st[key] for key in ("k_cache", "v_cache", "block_table", "seq_lens", "ring", "num_tokens")]
    before = snapshot(st)
    poison_allocator(((q.shape[0], hq, D), act))
    out = ops.sparse_prefill(q.to(dev), k.to(dev), v.to(dev), lg.to(dev), slots.to(dev),
                             cu_t.to(dev), *pool, scale, k_scale=ks, v_scale=vs)
    torch.cuda.synchronize()
    assert_same_state(before, st, "cuda fp8 prefill reads the state")
    out_cpu = ops.sparse_prefill(q, k, v, lg, slots, cu_t, *(t.cpu() for t in pool), scale,
                                 k_scale=ks, v_scale=vs)
    for i in range(n_seq):
        qf, kf, vf, lf = full[i]
        h, n = hist[i], hist[i] + chunks[i]
        kk, vv = kf.double(), vf.double()
        kk[:h] = reference.dequantize_fp8(reference.quantize_fp8(kk[:h], ks), ks)
        vv[:h] = reference.dequantize_fp8(reference.quantize_fp8(vv[:h], vs), vs)
        o, _, tol, _ = dms_bound(qf, kk, vv, lf, window, scale, act, rows=range(h, n))
        what = f"cuda fp8 prefill D{D} G{G} seq {i} (hist {h}, chunk {chunks[i]})"
        assert_within_bound(out[cu[i]:cu[i + 1]].cpu(), o, tol, what)
        assert_within_bound(out_cpu[cu[i]:cu[i + 1]], o, tol, what + " CPU twin")
    return st


@pytest.mark.cuda
@pytest.mark.parametrize("act", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("G", [1, 4, 5])
@pytest.mark.parametrize("ks,vs", SCALES)
def test_cuda_sparse_prefill_fp8_matches_the_oracle(act, D, G, ks, vs):
    """The CUDA prefill kernel on an fp8 pool: five sequences in one call, histories of 0 to
    450 tokens (survivors, flagged ring entries, evicted slots), chunks of 1 to 200 tokens (rows
    token x G: none a multiple of the 128-row tile or the 64-key tile), window 16 (queries inside
    and past it), GQA groups 1, 4 and 5; scales 1, ordinary, and saturating (amplitude 3 at
    scale 0.004: most cached values clamp at +-448)."""
    amp = 3.0 if ks < 0.01 else 1.0
    st = fp8_prefill_case(act, D, G, ks, vs, hist=[0, 7, 50, 300, 450], chunks=[37, 1, 200, 129, 65],
                          window=16, amp=amp, seed=hash((D, G)) & 0xffff)
    if ks < 0.01:
        assert (st["k_cache"].float().abs() == 448).any(), "the saturating case did not saturate"


@pytest.mark.cuda
@pytest.mark.parametrize("act", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
def test_cuda_sparse_prefill_fp8_both_dequant_layouts(act, D):
    """On sm_90 the fp8 prefill first dequantizes the call rows' cached blocks into the
    workspace: at their pool block ids when the pool has no more blocks than chunks x heads x
    table width (the oracle cases above: 290 table entries, 111 blocks), else compactly by
    (chunk, head, block index). The compact layout here (a pool of 1106 blocks), against the
    same oracle."""
    hist, chunks = [0, 7, 50, 300, 450], [37, 1, 200, 129, 65]
    nb = sum(2 * -(-h // 16) for h in hist)
    assert len(chunks) * 2 * max(-(-h // 16) for h in hist) < nb + 1000  # compact
    fp8_prefill_case(act, D, 4, 0.37, 2.5, hist=hist, chunks=chunks, window=16, seed=D,
                     spare_blocks=1000)


@pytest.mark.cuda
@pytest.mark.parametrize("act", [torch.float16, torch.bfloat16])
def test_cuda_sparse_prefill_fp8_long_window_and_block_sizes(act):
    """Window 100 over short histories (every cached query sees the flagged ring: segment 1
    carries most keys), odd block size 5, head_dim 128, G 3."""
    fp8_prefill_case(act, 128, 3, 0.37, 2.5, hist=[90, 130, 3], chunks=[150, 17, 64], window=100,
                     rate=0.9, bs=5, seed=3)


@pytest.mark.cuda
def test_cuda_fp8_prefill_matches_the_compute_pool_prefill():
    """An fp8 pool and its values dequantized into a bf16 pool (exact: power-of-two scales) give
    the same attention up to the folding of the scales; both within the oracle's bound."""
    act, D, G, hkv, W, bs = torch.bfloat16, 128, 4, 2, 8, 16
    ks, vs = 0.25, 2.0
    gen = torch.Generator().manual_seed(9)
    st8 = new_state(2, hkv, D, 64, bs, W, 32, F8, "cuda", gen=torch.Generator().manual_seed(1))
    hist = 230
    k0 = (torch.randn(hist, hkv, D, generator=gen) * 3).to(act)
    v0 = (torch.randn(hist, hkv, D, generator=gen) * 3).to(act)
    lg0 = make_logits(gen, hist, hkv, 0.7)
    append_one(st8, k0.cuda(), v0.cuda(), [1], [0, hist], lg0.cuda(), ks, vs)
    sta = {key: t.clone() for key, t in st8.items()}
    sta["k_cache"] = reference.dequantize_fp8(st8["k_cache"].cpu(), ks).to(act).cuda()
    sta["v_cache"] = reference.dequantize_fp8(st8["v_cache"].cpu(), vs).to(act).cuda()
    T = 77
    q = torch.randn(T, hkv * G, D, generator=gen).to(act)
    k = (torch.randn(T, hkv, D, generator=gen) * 3).to(act)
    v = (torch.randn(T, hkv, D, generator=gen) * 3).to(act)
    lg = make_logits(gen, T, hkv, 0.7)
    args = [x.cuda() for x in (q, k, v, lg)] + [torch.tensor([1], dtype=torch.int32, device="cuda"),
                                                torch.tensor([0, T], dtype=torch.int32, device="cuda")]
    keys = ("k_cache", "v_cache", "block_table", "seq_lens", "ring", "num_tokens")
    out8 = ops.sparse_prefill(*args, *(st8[x] for x in keys), k_scale=ks, v_scale=vs)
    outa = ops.sparse_prefill(*args, *(sta[x] for x in keys))
    kk = torch.cat([reference.dequantize_fp8(reference.quantize_fp8(k0.double(), ks), ks), k.double()])
    vv = torch.cat([reference.dequantize_fp8(reference.quantize_fp8(v0.double(), vs), vs), v.double()])
    qq = torch.cat([torch.zeros(hist, hkv * G, D, dtype=act), q])
    o, _, tol, _ = dms_bound(qq, kk, vv, torch.cat([lg0, lg]), W, D ** -0.5, act,
                             rows=range(hist, hist + T))
    assert_within_bound(out8.cpu(), o, tol, "fp8 pool")
    assert_within_bound(outa.cpu(), o, tol, "compute pool")


def random_fp8_pool(B, hkv, D, bs, lens, ks, vs, amp, gen):
    """A paged fp8 pool of random (never zero) values, some beyond 448 * scale (saturated at
    the quantization), each (row, head) with lens[b][g] slots on shuffled blocks."""
    maxb = max(1, max(-(-n // bs) for row in lens for n in row))
    nblk = B * hkv * maxb + 3
    k = torch.randn(nblk, bs, D, generator=gen) * amp
    v = torch.randn(nblk, bs, D, generator=gen) * amp
    k = torch.where(k.abs() < 1e-3, torch.full_like(k, 0.5), k)
    perm = torch.randperm(nblk, generator=gen)[: B * hkv * maxb].to(torch.int32)
    table = perm.view(B, hkv, maxb)
    return (reference.quantize_fp8(k, ks), reference.quantize_fp8(v, vs), table,
            torch.tensor(lens, dtype=torch.int32))


@pytest.mark.cuda
@pytest.mark.parametrize("act", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("G,bs", [(4, 16), (1, 64), (7, 32), (17, 16)])
@pytest.mark.parametrize("ks,vs", SCALES)
def test_cuda_sparse_decode_fp8_matches_the_oracle(act, D, G, bs, ks, vs):
    """The CUDA decode kernel on an fp8 pool against decode_bound on the dequantized pool:
    head dims 64 / 128 / 256, GQA groups of 1 to 17 (two head tiles), lengths 0 to 3000 (rows
    cut between CTAs and merged), saturated values (amplitude 448 * 1.5 * scale), lse too.
    Outputs poisoned first."""
    gen = torch.Generator().manual_seed(hash((D, G, bs)) & 0xffff)
    B, hkv = 3, 2
    lens = [[0, 1], [17, 3000], [700, 64]]
    amp = 448 * 1.5 * min(ks, vs) if ks < 0.01 else 2.0
    k8, v8, table, sl = random_fp8_pool(B, hkv, D, bs, lens, ks, vs, amp, gen)
    q = torch.randn(B, G * hkv, D, generator=gen).to(act)
    scale = D ** -0.5
    dev = [x.cuda() for x in (q, k8, v8, table, sl)]
    poison_allocator(((B, G * hkv, D), act), ((B, G * hkv), torch.float32))
    out, lse = ops.sparse_decode_lse(*dev, scale, ks, vs)
    poison_allocator(((B, G * hkv, D), act))
    out2 = ops.sparse_decode(*dev, scale, k_scale=ks, v_scale=vs)
    assert torch.equal(bits(out), bits(out2))
    o, lse_ref, tol, tol_lse = decode_bound(q, reference.dequantize_fp8(k8, ks),
                                            reference.dequantize_fp8(v8, vs), table, sl, scale, act)
    assert_within_bound(out, o, tol, f"cuda fp8 decode D{D} G{G}", lse, lse_ref, tol_lse)


@pytest.mark.cuda
@pytest.mark.parametrize("act", [torch.float16, torch.bfloat16])
def test_cuda_fp8_decode_matches_the_compute_pool_decode(act):
    """An fp8 pool and the same values dequantized into a pool of q's dtype (exact: every e4m3
    value times a power-of-two scale is a half / bfloat16) give the same kernel result up to
    the folding of the scales (k_scale into the score scale, v_scale into the output)."""
    gen = torch.Generator().manual_seed(5)
    B, hkv, G, D, bs = 4, 2, 4, 128, 16
    ks, vs = 0.25, 2.0   # powers of two: the dequantized pool is exact in act
    lens = [[5, 1000], [64, 0], [333, 2], [1, 1]]
    k8, v8, table, sl = random_fp8_pool(B, hkv, D, bs, lens, ks, vs, 3.0, gen)
    q = torch.randn(B, G * hkv, D, generator=gen).to(act)
    kd = reference.dequantize_fp8(k8, ks).to(act)
    vd = reference.dequantize_fp8(v8, vs).to(act)
    scale = D ** -0.5
    out8, lse8 = ops.sparse_decode_lse(q.cuda(), k8.cuda(), v8.cuda(), table.cuda(), sl.cuda(), scale, ks, vs)
    outa, lsea = ops.sparse_decode_lse(q.cuda(), kd.cuda(), vd.cuda(), table.cuda(), sl.cuda(), scale)
    o, lse_ref, tol, tol_lse = decode_bound(q, kd, vd, table, sl, scale, act)
    assert_within_bound(out8, o, tol, "fp8 pool", lse8, lse_ref, tol_lse)
    assert_within_bound(outa, o, tol, "compute pool", lsea, lse_ref, tol_lse)


def test_record_amax_gives_scales_that_just_fit():
    """dms_ext.fp8.record_amax / scales_from_amax: amax / 448 per layer, so the same data in an
    fp8 cache built with those scales reaches +-448 and never beyond (no saturation)."""
    from dms_ext import fp8
    L, hkv, hq, D = 3, 2, 4, 8
    kw = dict(num_layers=L, num_kv_heads=hkv, head_dim=D, window=4, block_size=4,
              num_blocks=32, max_seqs=2, device="cpu")
    calib = DMSCache(**kw, dtype=torch.float32)
    amp = [0.5, 30.0, 2000.0]
    data = [[(torch.randn(6, hq, D), torch.randn(6, hkv, D) * amp[l], torch.randn(6, hkv, D) * amp[l] / 2,
              make_logits(None, 6, hkv, 0.0)) for l in range(L)] for _ in range(2)]  # no eviction
    sid = calib.add_sequence()
    cu = torch.tensor([0, 6], dtype=torch.int32)
    with fp8.record_amax(calib) as amax:
        for step in data:
            for l, (q, k, v, lg) in enumerate(step):
                calib.attend(l, [sid], cu, q, k, v, lg)
    assert "attend" not in vars(calib)                  # the recording wrapper is gone
    for l in range(L):
        want_k = max(float(step[l][1].abs().max()) for step in data)
        assert amax.k[l] == want_k and amax.k_scales()[l] == want_k / 448
    assert fp8.scales_from_amax([0.0, math.nan, 2.0]) == [1.0, 1.0, 2.0 / 448]
    cache = DMSCache(**kw, dtype=torch.float32, kv_dtype=F8, k_scale=amax.k_scales(),
                     v_scale=amax.v_scales())
    s = cache.add_sequence()
    for step in data:
        for l, (q, k, v, lg) in enumerate(step):
            cache.attend(l, [s], cu, q, k, v, lg)
    for lay in cache._layers:
        assert lay.k_cache.float().abs().max().item() == 448.0


# ------------------------------------------------------------------------ bench/fp8_quality.py


def _fp8_quality():
    import importlib
    import os
    import sys
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    return importlib.import_module("fp8_quality")


def test_fp8_quality_kl_is_zero_for_identical_logits_and_right_on_two_tokens():
    q = _fp8_quality()
    x = torch.randn(3, 5, 17)
    assert torch.equal(q.kl_per_token(x, x), torch.zeros(3, 5, dtype=torch.float64))
    assert float(q.kl_per_token(x, x + 7.5).abs().max()) < 1e-12     # a shift is no change
    # P = (1/2, 1/2), Q = (3/4, 1/4): KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3).
    f64 = dict(dtype=torch.float64)   # log(3) exactly as math has it (float32 would round it)
    kl = q.kl_per_token(torch.tensor([0.0, 0.0], **f64), torch.tensor([math.log(3.0), 0.0], **f64))
    assert abs(float(kl) - 0.5 * math.log(4.0 / 3.0)) < 1e-12
    # KL(P || Q) is not symmetric: KL(Q || P) = 3/4 ln(3/2) + 1/4 ln(1/2).
    kl = q.kl_per_token(torch.tensor([math.log(3.0), 0.0], **f64), torch.tensor([0.0, 0.0], **f64))
    assert abs(float(kl) - (0.75 * math.log(1.5) + 0.25 * math.log(0.5))) < 1e-12


def test_fp8_quality_agreement_and_divergence_counts():
    q = _fp8_quality()
    assert q.tokens_until_divergence([1, 2, 3], [1, 2, 3]) == 3
    assert q.tokens_until_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert q.tokens_until_divergence([1, 2, 3], [4, 2, 3]) == 0
    ref_tokens = torch.tensor([[2, 0], [1, 1]])
    ref = torch.nn.functional.one_hot(ref_tokens, 3).float() * 4      # argmax = ref_tokens
    tf = ref.clone()
    tf[1, 1] = torch.tensor([0.0, 0.0, 4.0])                          # one of 4 disagrees
    r = q.compare(ref, ref_tokens, tf, torch.tensor([[2, 0], [1, 2]]))
    assert r["agree"] == 75.0 and r["tokens"] == 4
    assert r["div_min"] == 1 and r["div_mean"] == 1.5
    assert r["kl_max"] == pytest.approx(float(q.kl_per_token(ref[1, 1], tf[1, 1])))
    assert r["kl_mean"] == pytest.approx(r["kl_max"] / 4)
