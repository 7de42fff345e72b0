"""DMSCache (docs/cache.md) on the CPU against dms_ext.reference, on random schedules."""
import math
import random

import pytest
import torch

import dms_ext
from dms_ext import reference
from dms_ext.cache import DMSCache, OutOfBlocks, _Layer
from dms_state import assert_same_logical
from helpers import SequenceHistory, assert_same_state, assert_within_bound, dms_bound, make_logits, poison_free, snapshot


def cpu_cache(layers, kv_heads, head_dim, **kw) -> DMSCache:
    """A float32 DMSCache on the CPU, the cache of most tests here."""
    return DMSCache(layers, kv_heads, head_dim, dtype=torch.float32, device="cpu", **kw)


class Model(SequenceHistory):
    """Drives a cache and keeps each sequence's full history per layer for the reference."""

    def __init__(self, cache, hq, rate, seed, scale=None):
        super().__init__(cache)
        self.hq, self.rate, self.scale = hq, rate, scale
        self.gen = torch.Generator().manual_seed(seed)

    def inputs(self, lens, dtype=None):
        c, dtype = self.c, dtype or self.c.dtype
        T = sum(lens)
        g = self.gen
        dev = c.device
        q = torch.randn(T, self.hq, c.head_dim, generator=g).to(dev, dtype)
        k = torch.randn(T, c.num_kv_heads, c.head_dim, generator=g).to(dev, dtype)
        v = torch.randn(T, c.num_kv_heads, c.head_dim, generator=g).to(dev, dtype)
        lg = make_logits(g, T, c.num_kv_heads, self.rate).to(dev)
        cu = torch.tensor([0] + list(lens), dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return cu, q, k, v, lg

    def step(self, sids, lens, layers=None, check=True, atol=1e-5, rtol=1e-5):
        """One forward pass: attend on every layer with fresh inputs; check against the reference."""
        outs = []
        for layer in (range(self.c.num_layers) if layers is None else layers):
            cu, q, k, v, lg = self.inputs(lens)
            out = self.c.attend(layer, sids, cu, q, k, v, lg, scale=self.scale)
            assert out.shape == q.shape and out.dtype == q.dtype
            for i, sid in enumerate(sids):
                a, b = int(cu[i]), int(cu[i + 1])
                self.hist[sid][layer].append(tuple(x[a:b].cpu() for x in (q, k, v, lg)))
            if check:
                self.check(layer, sids, cu, out, atol, rtol)
            outs.append(out)
        return outs

    def full(self, sid, layer):
        return [torch.cat(x) for x in zip(*self.hist[sid][layer])]

    def check(self, layer, sids, cu, out, atol, rtol):
        w = self.c.window
        for i, sid in enumerate(sids):
            q, k, v, lg = self.full(sid, layer)
            n = int(cu[i + 1] - cu[i])
            got = out[int(cu[i]):int(cu[i + 1])]
            if atol is None:     # a kernel: helpers.attention_bound
                N = q.shape[0]
                ref, _, tol, _ = dms_bound(q, k, v, lg, w, self.scale, rows=range(N - n, N))
                assert_within_bound(got, ref, tol, f"layer {layer} seq {sid}")
            else:
                ref = reference.dms_attention(q.double(), k.double(), v.double(), lg, w, scale=self.scale)
                torch.testing.assert_close(got.cpu().double(), ref[-n:], atol=atol, rtol=rtol)
            live = self.c.live_tokens(layer, sid)
            assert live.cpu().tolist() == reference.live_counts(lg, w).tolist(), (layer, sid)



def one_sequence(hq, rate, seed, *cache_args, **cache_kw):
    """cpu_cache(*cache_args, **cache_kw) driven by Model(cache, hq, rate, seed) holding one
    sequence: (cache, model, seq id)."""
    cache = cpu_cache(*cache_args, **cache_kw)
    m = Model(cache, hq, rate, seed)
    return cache, m, m.add()

CONFIGS = [  # (hkv, G, head_dim, block_size)
    (2, 1, 16, 4), (1, 3, 32, 8), (2, 5, 16, 16), (3, 7, 8, 4), (2, 2, 64, 64),
]


@pytest.mark.parametrize("rate", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("window", [1, 2, 5, 16])
def test_chunking_invariance_random_schedule(window, rate):
    seed = window * 10 + int(rate * 10)
    rng = random.Random(seed)
    hkv, G, d, bs = CONFIGS[seed % len(CONFIGS)]
    cache = cpu_cache(2, hkv, d, window=window, block_size=bs, num_blocks=400, max_seqs=4)
    poison_free(cache)
    m = Model(cache, hkv * G, rate, seed)
    sids = [m.add() for _ in range(3)]
    for _ in range(9):
        active = rng.sample(sids, rng.randint(1, len(sids)))
        if rng.random() < 0.4:
            lens = [1] * len(active)                       # decode step
        else:
            lens = [rng.choice([1, 2, 3, bs - 1 or 1, bs, bs + 1, rng.randint(1, 40)]) for _ in active]
        m.step(active, lens)
    # A later turn on one sequence while others decode is a prefill call with mixed chunks.
    m.step(sids, [17, 1, 1])


def test_decode_many_steps_matches_reference_and_never_syncs_with_room(monkeypatch):
    syncs = []
    orig = _Layer.sync
    monkeypatch.setattr(_Layer, "sync", lambda self, rows: (syncs.append(1), orig(self, rows)))
    cache = cpu_cache(3, 2, 16, window=4, block_size=4, num_blocks=200, max_seqs=3)
    m = Model(cache, 6, 0.6, 1)
    sids = [m.add() for _ in range(3)]
    m.step(sids, [5, 9, 2])
    for _ in range(40):
        m.step(sids, [1, 1, 1])
    assert not syncs


def test_first_chunk_of_one_token_and_reordered_seq_ids():
    cache = cpu_cache(1, 2, 16, window=3, block_size=4, num_blocks=64, max_seqs=3)
    m = Model(cache, 4, 0.5, 2)
    a, b, c = m.add(), m.add(), m.add()
    m.step([c, a], [1, 1])
    m.step([b, c, a], [1, 6, 1])
    m.step([a, b], [1, 1])
    m.step([a], [5])


def test_bf16_and_fp16_close_to_float64_reference():
    for dtype in (torch.bfloat16, torch.float16):
        cache = DMSCache(2, 2, 32, window=6, block_size=8, num_blocks=128, max_seqs=2,
                         dtype=dtype, device="cpu")
        m = Model(cache, 6, 0.7, 3)
        sids = [m.add(), m.add()]
        m.step(sids, [20, 7], atol=2e-2, rtol=2e-2)
        for _ in range(6):
            m.step(sids, [1, 1], atol=2e-2, rtol=2e-2)
        m.step(sids, [9, 1], atol=2e-2, rtol=2e-2)


def test_custom_scale():
    cache = cpu_cache(1, 1, 16, window=2, block_size=4, num_blocks=32, max_seqs=1)
    m = Model(cache, 3, 0.5, 4, scale=0.37)
    s = m.add()
    m.step([s], [7])
    m.step([s], [1])


@pytest.mark.parametrize("rate", [0.0, 0.9])
def test_fork_is_independent(rate):
    cache = cpu_cache(2, 2, 16, window=3, block_size=4, num_blocks=200, max_seqs=4)
    poison_free(cache)
    m = Model(cache, 6, rate, 5)
    a = m.add()
    m.step([a], [11])
    free_before = cache.num_free_blocks
    b = m.fork(a)
    used_by_a = sum(math.ceil(n / 4) for layer in range(2) for n in cache.live_tokens(layer, a).tolist())
    assert cache.num_free_blocks == free_before - used_by_a
    for layer in range(2):
        assert cache.live_tokens(layer, b).tolist() == cache.live_tokens(layer, a).tolist()
    # Different continuations; each must equal the reference of its own history.
    m.step([a, b], [1, 1])
    m.step([b], [6])
    m.step([a, b], [3, 1])
    c = m.fork(b)
    m.release(a)
    m.step([c, b], [1, 2])
    m.step([c], [1])


def test_release_returns_every_block():
    cache = cpu_cache(2, 3, 8, window=2, block_size=4, num_blocks=60, max_seqs=4)
    start = cache.num_free_blocks
    assert start == 120
    m = Model(cache, 3, 0.3, 6)
    sids = [m.add() for _ in range(3)]
    m.step(sids, [13, 1, 6])
    m.step(sids, [1, 1, 1])
    f = m.fork(sids[0])
    assert cache.num_free_blocks < start
    for s in sids + [f]:
        m.release(s)
    assert cache.num_free_blocks == start
    assert len(cache) == 0
    # Rows are reusable and come back clean.
    s = m.add()
    m.step([s], [9])


def test_add_sequence_beyond_max_seqs_raises():
    cache = cpu_cache(1, 1, 8, window=2, block_size=4, num_blocks=8, max_seqs=2)
    a = cache.add_sequence()
    cache.add_sequence()
    with pytest.raises(RuntimeError, match="max_seqs"):
        cache.add_sequence()
    with pytest.raises(RuntimeError, match="max_seqs"):
        cache.fork(a)
    cache.release(a)
    assert cache.add_sequence() not in (a,)  # ids are never reused


def _twin_caches():
    kw = dict(window=3, block_size=4, num_blocks=64, max_seqs=3, dtype=torch.float32, device="cpu")
    caches = [DMSCache(2, 2, 16, **kw), DMSCache(2, 2, 16, **kw)]
    for c in caches:
        poison_free(c)
    return caches


def test_malformed_arguments_raise_value_error_and_change_nothing():
    good, bad = _twin_caches()
    ma, mb = Model(good, 6, 0.5, 7), Model(bad, 6, 0.5, 7)
    sa, sb = [ma.add(), ma.add()], [mb.add(), mb.add()]
    ma.step(sa, [5, 3])
    mb.step(sb, [5, 3])
    gone = bad.add_sequence()
    bad.release(gone)

    cu, q, k, v, lg = mb.inputs([2, 1])
    ma.inputs([2, 1])  # keeps both input streams in step
    f16 = torch.float16
    cases = {
        "layer": [dict(layer=-1), dict(layer=2), dict(layer="0"), dict(layer=1.0), dict(layer=True)],
        "seq_ids": [dict(seq_ids=[sb[0], sb[0]]), dict(seq_ids=[sb[0], 999]),
                    dict(seq_ids=[sb[0], gone]), dict(seq_ids=7), dict(seq_ids=[sb[0], "1"])],
        "cu_seqlens": [dict(cu_seqlens=cu.float()), dict(cu_seqlens=cu[:2]),
                       dict(cu_seqlens=torch.tensor([1, 2, 3], dtype=torch.int32)),
                       dict(cu_seqlens=torch.tensor([0, 2, 4], dtype=torch.int32)),
                       dict(cu_seqlens=torch.tensor([0, 0, 3], dtype=torch.int32)),
                       dict(cu_seqlens=torch.tensor([0, 3, 3], dtype=torch.int32)),
                       dict(cu_seqlens=torch.tensor([0, 2, 1], dtype=torch.int32)),
                       dict(cu_seqlens=cu[None]), dict(cu_seqlens=[0, 2, 3]),
                       dict(cu_seqlens=cu.to("meta"))],
        "q": [dict(q=q.to(f16)), dict(q=q[..., :8].contiguous()), dict(q=q[:, :5].contiguous()),
              dict(q=q[0]), dict(q=q.to("meta")), dict(q=q.numpy())],
        "k": [dict(k=k.to(f16)), dict(k=k[:2]), dict(k=k[:, :1].contiguous()), dict(k=k[..., :8]),
              dict(k=k.to("meta"))],
        "v": [dict(v=v.to(f16)), dict(v=v[:2]), dict(v=v[:, :1].contiguous()), dict(v=v.to("meta"))],
        "eviction_logits": [dict(eviction_logits=lg[:2]), dict(eviction_logits=lg[:, :1]),
                            dict(eviction_logits=lg > 0), dict(eviction_logits=lg.to(torch.int32)),
                            dict(eviction_logits=lg.to("meta")), dict(eviction_logits=lg[:, :, None])],
        "scale": [dict(scale="x"), dict(scale=float("nan")), dict(scale=[1.0])],
    }
    base = dict(layer=0, seq_ids=sb, cu_seqlens=cu, q=q, k=k, v=v, eviction_logits=lg, scale=None)
    before = snapshot(bad)
    for name, variants in cases.items():
        for change in variants:
            args = {**base, **change}
            with pytest.raises(ValueError, match=name):
                bad.attend(**args)
            assert_same_state(snapshot(bad), before)
    for name, fn in {"seq_id": lambda: bad.fork(999), "seq_id ": lambda: bad.release(gone),
                     "layer": lambda: bad.live_tokens(5, sb[0])}.items():
        with pytest.raises(ValueError, match=name.strip()):
            fn()
    assert_same_state(snapshot(bad), before)
    # The cache that saw every bad call gives the same outputs as one that never did.
    for layers in ([0, 1], [1, 0]):
        oa = ma.step(sa, [2, 1], layers=layers)
        ob = mb.step(sb, [2, 1], layers=layers)
        for x, y in zip(oa, ob):
            assert torch.equal(x, y)
    assert_same_state(snapshot(good), snapshot(bad))


def test_constructor_rejects_bad_arguments():
    kw = dict(num_blocks=8, max_seqs=2, device="cpu", dtype=torch.float32)
    for name, args in {"num_layers": (0, 1, 8), "num_kv_heads": (1, 0, 8), "head_dim": (1, 1, -8)}.items():
        with pytest.raises(ValueError, match=name):
            DMSCache(*args, **kw)
    for name in ("window", "block_size", "num_blocks", "max_seqs", "max_blocks_per_head"):
        with pytest.raises(ValueError, match=name):
            DMSCache(1, 1, 8, **{**kw, name: 0})
    with pytest.raises(ValueError, match="dtype"):
        DMSCache(1, 1, 8, **{**kw, "dtype": torch.int32})
    with pytest.raises(ValueError, match="device"):
        DMSCache(1, 1, 8, **{**kw, "device": "nonsense"})


def test_empty_call_returns_empty():
    cache = cpu_cache(1, 2, 16, window=3, block_size=4, num_blocks=16, max_seqs=2)
    e = torch.empty(0, 2, 16)
    out = cache.attend(0, [], torch.zeros(1, dtype=torch.int32), torch.empty(0, 4, 16), e, e,
                       torch.empty(0, 2))
    assert out.shape == (0, 4, 16)


def test_out_of_blocks_leaves_sequences_intact_and_release_retry_works():
    # Pool of 6 blocks of 4 tokens per layer, 2 heads, nothing evicted (rate 0).
    cache = cpu_cache(2, 2, 16, window=2, block_size=4, num_blocks=6, max_seqs=3)
    poison_free(cache)
    m = Model(cache, 4, 0.0, 8)
    a, b = m.add(), m.add()
    m.step([a], [8])                      # 2 blocks per head: 4 of 6 used
    before = snapshot(cache)
    free = cache.num_free_blocks
    with pytest.raises(OutOfBlocks):
        m.step([a, b], [1, 5], layers=[0])  # b needs 2 x 2 blocks, a one more per head
    assert_same_state(snapshot(cache), before)
    assert cache.num_free_blocks == free
    # Model.step records a chunk only after attend returns, so the history still matches.
    m.step([a], [1])                       # a still equals its reference (fits: opens block 3)
    with pytest.raises(OutOfBlocks):
        m.step([b], [5], layers=[1])
    m.release(a)
    m.step([b], [5])                       # release + retry
    m.step([b], [1])
    assert issubclass(OutOfBlocks, RuntimeError)
    assert dms_ext.OutOfBlocks is OutOfBlocks


def test_out_of_blocks_when_a_head_outgrows_its_block_table():
    cache, m, s = one_sequence(1, 0.0, 9, 1, 1, 8, window=1, block_size=4,
                               num_blocks=32, max_seqs=2, max_blocks_per_head=2)
    m.step([s], [6])
    before = snapshot(cache)
    with pytest.raises(OutOfBlocks, match="max_blocks_per_head"):
        m.step([s], [3])
    assert_same_state(snapshot(cache), before)
    m.step([s], [2])                      # exactly fills the table


def test_reservation_syncs_instead_of_failing_when_evictions_keep_the_cache_small():
    # Every token flagged, window 2: each head keeps 3 tokens (1 block) however long it runs,
    # while the worst-case bound grows by a block every 4 steps: syncs must absorb that.
    cache, m, s = one_sequence(2, 1.0, 10, 2, 2, 8, window=2, block_size=4,
                               num_blocks=2, max_seqs=1, max_blocks_per_head=1)
    m.step([s], [3])
    for _ in range(30):
        m.step([s], [1])
    assert cache.live_tokens(0, s).tolist() == [3, 3]


def test_demo_runs_and_evicts(capsys):
    from dms_ext import demo
    assert demo.main(["--layers", "2", "--prompt-len", "48", "--new-tokens", "4", "--window", "8",
                      "--batch", "2", "--device", "cpu", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    total = [l.split() for l in out.splitlines() if l.strip().startswith("all ")][0]
    dense, live = int(total[1]), int(total[2])
    assert dense == 2 * 2 * 2 * (48 + 4 - 1) and 0 < live < dense  # layers x seqs x Hkv x tokens


# ---------------------------------------------------------------- CUDA (skipped without a GPU)

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rate", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("window", [1, 16, 64])
def test_cuda_chunking_invariance_random_schedule(window, rate, dtype):
    seed = window * 10 + int(rate * 10) + (dtype == torch.float16)
    rng = random.Random(seed)
    hkv, G, d, bs = [(2, 1, 64, 16), (1, 3, 128, 64), (2, 5, 64, 32), (3, 7, 128, 16)][seed % 4]
    cache = DMSCache(2, hkv, d, window=window, block_size=bs, num_blocks=300, max_seqs=4,
                     dtype=dtype, device="cuda")
    poison_free(cache)
    m = Model(cache, hkv * G, rate, seed)
    sids = [m.add() for _ in range(3)]
    tol = dict(atol=None, rtol=None)      # helpers.attention_bound
    for _ in range(10):
        active = rng.sample(sids, rng.randint(1, len(sids)))
        if rng.random() < 0.5:
            lens = [1] * len(active)
        else:
            lens = [rng.choice([1, bs - 1, bs, bs + 1, rng.randint(1, 150)]) for _ in active]
        m.step(active, lens, **tol)
    f = m.fork(sids[0])
    m.step([f, sids[0]], [1, 1], **tol)
    m.step([sids[1], f], [33, 1], **tol)
    for sid in list(m.hist):
        m.release(sid)
    assert cache.num_free_blocks == 2 * 300


@pytest.mark.cuda
def test_cuda_cu_seqlens_on_device_and_out_of_blocks():
    cache = DMSCache(1, 2, 64, window=4, block_size=16, num_blocks=4, max_seqs=2,
                     dtype=torch.bfloat16, device="cuda")
    m = Model(cache, 4, 0.0, 11)
    a, b = m.add(), m.add()
    cu, q, k, v, lg = m.inputs([20])
    out = cache.attend(0, [a], cu.cuda(), q, k, v, lg)
    m.hist[a][0].append(tuple(x.cpu() for x in (q, k, v, lg)))
    m.check(0, [a], cu, out, None, None)
    before = snapshot(cache)
    with pytest.raises(OutOfBlocks):
        m.step([b], [30])                  # 2 blocks per head; a holds the whole pool
    assert_same_state(snapshot(cache), before)
    m.release(a)
    m.step([b], [30], atol=None, rtol=None)


# ------------------------------------------------------------------ DMSCache.decode_step

@pytest.mark.parametrize("device,dtype,kv8", [
    ("cpu", torch.float32, False), ("cpu", torch.bfloat16, False), ("cpu", torch.float32, True),
    pytest.param("cuda", torch.bfloat16, False, marks=pytest.mark.cuda),
    pytest.param("cuda", torch.float16, False, marks=pytest.mark.cuda),
    pytest.param("cuda", torch.bfloat16, True, marks=pytest.mark.cuda)])
@pytest.mark.parametrize("given", [False, True])
def test_decode_step_equals_its_unfused_twin(device, dtype, kv8, given):
    """cache.decode_step (the fused op, then sparse_decode) against a twin cache fed the same
    calls: for the borrowed neuron, eviction_rope then attend (the unfused chain; the kernels
    share every rounding, so bit for bit); for given logits, the two ops called by hand on the
    twin's state. Outputs, logits, q in place and every state tensor equal, over prefill
    chunks, steps across block boundaries (block 4, window 3), G = 3, consecutive and
    reordered rows, fp8 pools with scales != 1."""
    hkv, d, hq, L = 2, 64, 6, 2          # D 64: the smallest head_dim the CUDA kernels take
    kw = dict(window=3, block_size=4, num_blocks=96, max_seqs=4, dtype=dtype, device=device)
    if kv8:
        kw.update(kv_dtype=torch.float8_e4m3fn, k_scale=[0.05, 0.08], v_scale=0.06)
    a, b = DMSCache(L, hkv, d, **kw), DMSCache(L, hkv, d, **kw)
    for c in (a, b):
        poison_free(c)
    gen = torch.Generator().manual_seed(31 + 2 * given + kv8)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(device, dtype)  # noqa: E731
    ids = [(a.add_sequence(), b.add_sequence()) for _ in range(4)]
    a.release(ids[1][0])
    b.release(ids[1][1])
    ids = [ids[0], ids[2], ids[3]]                      # rows 0, 2, 3
    table = reference.rope_cache(64, d).to(device)
    qn, kn = (None, None) if given else (rnd(d), rnd(d))
    # Prefill chunks through attend, the same on both.
    cu = torch.tensor([0, 5, 7, 13], dtype=torch.int32)
    for layer in range(L):
        q, k, v = rnd(13, hq, d), rnd(13, hkv, d), rnd(13, hkv, d)
        lg = make_logits(gen, 13, hkv, 0.6).to(device)
        for c, j in ((a, 0), (b, 1)):
            c.attend(layer, [s[j] for s in ids], cu, q, k, v, lg)
    orders = [[0, 1, 2]] * 3 + [[2, 0]] * 3 + [[1, 2, 0]] * 4 + [[2]] * 2
    for order in orders:
        sa, sb = [ids[i][0] for i in order], [ids[i][1] for i in order]
        n = len(order)
        for layer in range(L):
            q, k, v = rnd(n, hq, d), rnd(n, hkv, d), rnd(n, hkv, d)
            lg = make_logits(gen, n, hkv, 0.6).to(device) if given else None
            qa, qb, kb = q.clone(), q.clone(), k.clone()
            out_a, lg_a = a.decode_step(layer, sa, qa, k, v, table, 40.0, 1.5, qn, kn, 1e-6,
                                        logits=lg, scale=0.3)
            lay = b._layers[layer]
            rows = b._rows_of(sb)
            if given:
                slots = torch.tensor(rows, dtype=torch.int32, device=device)
                lg_b = torch.ops.dms.decode_step(qb, kb, v, table, slots, *lay.state(), 40.0, 1.5,
                                                 qn, kn, 1e-6, lg, lay.k_scale, lay.v_scale)
                out_b = torch.ops.dms.sparse_decode(qb, lay.k_cache, lay.v_cache,
                                                    lay.block_table[rows], lay.seq_lens[rows], 0.3,
                                                    lay.k_scale, lay.v_scale)
            else:
                pos = lay.num_tokens[rows]
                lg_b = torch.ops.dms.eviction_rope(qb, kb, pos, table, 40.0, 1.5, qn, kn, 1e-6)
                out_b = b.attend(layer, sb, torch.arange(n + 1, dtype=torch.int32), qb, kb, v, lg_b,
                                 scale=0.3)
            assert torch.isfinite(out_a).all()
            assert torch.equal(out_a, out_b) and torch.equal(lg_a, lg_b) and torch.equal(qa, qb)
    if device == "cpu":
        assert_same_state(snapshot(a), snapshot(b), "state after the decode steps")
    else:
        # CUDA CTAs pop free blocks in no fixed order, so block ids differ between the twins:
        # the same logical content (tokens, lengths, ring entries, K / V of every live slot).
        names = ("k_cache", "v_cache", "block_table", "seq_lens", "ring", "num_tokens",
                 "free_stack", "free_top")
        for la, lb in zip(a._layers, b._layers):
            sa, sb = (dict(zip(names, (t.float() if t.dtype == torch.float8_e4m3fn else t
                                       for t in lay.state()))) for lay in (la, lb))
            assert_same_logical(sa, sb, where="after the decode steps")
    assert max(int(a.live_tokens(0, s[0]).max()) for s in ids) > 4   # steps crossed blocks


def test_decode_step_bad_arguments_raise_and_change_nothing():
    c = cpu_cache(1, 2, 16, window=3, block_size=4, num_blocks=32, max_seqs=2)
    poison_free(c)
    m = Model(c, 4, 0.5, 5)
    s = [m.add(), m.add()]
    m.step(s, [3, 2])
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, h, 16, generator=g) for h in (4, 2, 2))
    table = reference.rope_cache(32, 16)
    before = snapshot(c)
    cases = {"q": [dict(q=q.transpose(0, 1).contiguous().transpose(0, 1)), dict(q=q[:1], k=k[:1], v=v[:1]),
                   dict(q=q.double())],
             "k": [dict(k=k[:, :1])], "v": [dict(v=v.half())],
             "cos_sin_cache": [dict(cos_sin_cache=table.double()), dict(cos_sin_cache=table[:, :8]),
                               dict(cos_sin_cache=table[0]), dict(cos_sin_cache=None)],
             "logits": [dict(logits=torch.zeros(2, 3)), dict(logits=torch.zeros(2, 2, dtype=torch.int32))],
             "seq_ids": [dict(seq_ids=[s[0], s[0]]), dict(seq_ids=[99, s[0]])],
             "scale": [dict(scale=float("inf"))], "layer": [dict(layer=1)]}
    base = dict(layer=0, seq_ids=s, q=q, k=k, v=v, cos_sin_cache=table)
    for name, variants in cases.items():
        for change in variants:
            with pytest.raises(ValueError, match=name):
                c.decode_step(**{**base, **change})
            assert_same_state(snapshot(c), before, name)
    out, lg = c.decode_step(**base)
    assert out.shape == (2, 4, 16) and lg.shape == (2, 2) and torch.isfinite(out).all()


def test_a_batch_added_after_releasing_everything_gets_consecutive_rows():
    """Rows come lowest first, so generate's batch is consecutive and decode reads the state's
    block table and lengths as views (DMSCache._decode_attention)."""
    c = cpu_cache(1, 1, 8, window=2, block_size=4, num_blocks=8, max_seqs=4)
    first = [c.add_sequence() for _ in range(4)]
    for s in first:
        c.release(s)
    again = [c.add_sequence() for _ in range(3)]
    assert c._rows_of(again) == [0, 1, 2]
    c.release(again[1])
    assert c._rows_of([c.add_sequence()]) == [1]
