"""One CUDA graph of a whole DMSCache decode step (every layer), replayed with fresh inputs.

Each replay is paid for by DecodePlan.advance (host only); its outputs must equal an eager twin
cache fed the same inputs and the float64 reference over the full history, and a pool that
runs out must stop at advance, before the replay, with nothing lost.
"""
import pytest
import torch

from dms_ext import reference
from dms_ext.cache import DMSCache, OutOfBlocks, RecaptureNeeded
from helpers import assert_same_state, assert_within_bound, dms_bound, make_logits, poison_free, snapshot

pytestmark = pytest.mark.cuda

DEV = "cuda"
DT = torch.bfloat16


class Run:
    """Caches fed identical inputs, plus each sequence's full history per layer."""

    def __init__(self, caches, hq, rate, seed):
        self.caches, self.hq, self.rate = caches, hq, rate
        c = caches[0]
        self.L, self.hkv, self.d, self.w = c.num_layers, c.num_kv_heads, c.head_dim, c.window
        self.gen = torch.Generator().manual_seed(seed)
        self.hist = {}

    def add(self):
        ids = {c.add_sequence() for c in self.caches}
        assert len(ids) == 1
        sid = ids.pop()
        self.hist[sid] = [[] for _ in range(self.L)]
        return sid

    def release(self, sid):
        for c in self.caches:
            c.release(sid)
        del self.hist[sid]

    def inputs(self, T):
        g = self.gen
        q = torch.randn(T, self.hq, self.d, generator=g).to(DEV, DT)
        k = torch.randn(T, self.hkv, self.d, generator=g).to(DEV, DT)
        v = torch.randn(T, self.hkv, self.d, generator=g).to(DEV, DT)
        lg = make_logits(g, T, self.hkv, self.rate).to(DEV)
        return q, k, v, lg

    def record(self, layer, sids, lens, x):
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        for i, sid in enumerate(sids):
            self.hist[sid][layer].append(tuple(t[cu[i]:cu[i + 1]] for t in x))
        return cu

    def eager(self, sids, lens):
        """attend on every layer of every cache; checks each output against the reference."""
        cu = torch.tensor([0] + list(lens), dtype=torch.int32).cumsum(0, dtype=torch.int32)
        for layer in range(self.L):
            x = self.inputs(sum(lens))
            outs = [c.attend(layer, sids, cu, *x) for c in self.caches]
            self.record(layer, sids, lens, x)
            for out in outs:
                self.check(layer, sids, lens, out)
            for out in outs[1:]:
                torch.testing.assert_close(out, outs[0], atol=1e-3, rtol=1e-3)

    def check(self, layer, sids, lens, out, where=""):
        start = 0
        for sid, n in zip(sids, lens):
            q, k, v, lg = (torch.cat(t) for t in zip(*self.hist[sid][layer]))
            N = q.shape[0]
            ref, _, tol, _ = dms_bound(q, k, v, lg, self.w, None, rows=range(N - n, N))
            assert_within_bound(out[start:start + n], ref, tol, f"{where} layer {layer} seq {sid}")
            start += n

    def check_live(self, cache):
        for layer in range(self.L):
            for sid, h in self.hist.items():
                lg = torch.cat([t[3] for t in h[layer]]).cpu()
                assert cache.live_tokens(layer, sid).cpu().tolist() == \
                    reference.live_counts(lg, self.w).tolist(), (layer, sid)


class Step:
    """Static input buffers of one decode step over `sids`, captured as one graph."""

    def __init__(self, run, cache, sids, cu):
        n = len(sids)
        self.run, self.cache, self.sids, self.n = run, cache, list(sids), n
        self.bufs = [tuple(t.clone() for t in run.inputs(n)) for _ in range(run.L)]
        state = [(lay.seq_lens.clone(), lay.num_tokens.clone(), lay.free_top.clone())
                 for lay in cache._layers]
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outs = [cache.attend(layer, sids, cu, *self.bufs[layer])
                         for layer in range(run.L)]
        torch.cuda.synchronize()
        for lay, (sl, nt, ft) in zip(cache._layers, state):   # capture records, runs nothing
            assert torch.equal(lay.seq_lens, sl) and torch.equal(lay.num_tokens, nt)
            assert torch.equal(lay.free_top, ft)

    def replay(self, plan, twin=None, where=""):
        """New inputs -> advance -> replay; outputs against the twin and the reference."""
        xs = [self.run.inputs(self.n) for _ in range(self.run.L)]
        for buf, x in zip(self.bufs, xs):
            for b, t in zip(buf, x):
                b.copy_(t)
        for o in self.outs:
            o.fill_(float("nan"))          # the replay must write every output
        plan.advance()
        self.graph.replay()
        eager = ([twin.attend(layer, self.sids, torch.arange(self.n + 1, dtype=torch.int32),
                              *xs[layer]) for layer in range(self.run.L)]
                 if twin is not None else None)
        for layer in range(self.run.L):
            self.run.record(layer, self.sids, [1] * self.n, xs[layer])
            out = self.outs[layer]
            assert not out.isnan().any(), f"{where} layer {layer}: output not written"
            if eager is not None:
                torch.testing.assert_close(out, eager[layer], atol=1e-3, rtol=1e-3,
                                           msg=lambda m: f"{where} layer {layer} vs eager: {m}")
            self.run.check(layer, self.sids, [1] * self.n, out, where)


def make(layers, hkv, d, window, bs, num_blocks):
    c = DMSCache(layers, hkv, d, window=window, block_size=bs, num_blocks=num_blocks, max_seqs=4,
                 dtype=DT, device=DEV)
    poison_free(c)
    return c


def warm_up(hkv, G, d, bs):
    """Eager decode on a throwaway cache, so kernel attributes and modules load before a capture."""
    run = Run([make(1, hkv, d, 4, bs, 16)], hkv * G, 0.5, 99)
    s = run.add()
    run.eager([s], [3])
    run.eager([s], [1])
    torch.cuda.synchronize()


def test_cuda_graph_decode_step_replays_match_eager_twin_and_reference():
    L, hkv, G, d, w, bs = 2, 2, 5, 128, 16, 16
    cache, twin = make(L, hkv, d, w, bs, 200), make(L, hkv, d, w, bs, 200)
    run = Run([cache, twin], hkv * G, 0.5, 1)
    sids = [run.add() for _ in range(3)]
    run.eager(sids, [37, 5, 100])            # prefill chunks of different lengths
    run.eager(sids[:2], [16, 1])             # a second chunk across a block boundary
    run.eager(sids, [1, 1, 1])               # an eager decode step (also warms the kernels)
    # 10 steps reserved at a time; the width covers every head for the 100 steps below.
    plan = cache.prepare_decode(sids, steps=10, max_len=256)
    assert plan.cols == 256 // bs
    step = Step(run, cache, sids, torch.arange(len(sids) + 1, dtype=torch.int32))
    for i in range(100):
        step.replay(plan, twin, where=f"step {i}")
    torch.cuda.synchronize()
    run.check_live(cache)
    run.check_live(twin)
    assert cache.num_free_blocks == twin.num_free_blocks
    # The eager path still works between replays, and the graph keeps going after it.
    run.eager(sids, [1, 1, 1])
    for i in range(3):
        step.replay(plan, twin, where=f"after eager, step {i}")
    run.check_live(cache)


def test_cuda_graph_decode_out_of_blocks_before_damage_then_release_and_recapture():
    # 8 blocks of 16 tokens per layer, 2 heads, nothing evicted (rate 0): growth is exact.
    L, hkv, G, d, w, bs = 2, 2, 3, 64, 4, 16
    warm_up(hkv, G, d, bs)
    cache = make(L, hkv, d, w, bs, 8)
    run = Run([cache], hkv * G, 0.0, 2)
    a, b = run.add(), run.add()
    run.eager([a, b], [30, 14])              # a: 2 blocks per head, b: 1 -> 6 of 8 per layer
    plan = cache.prepare_decode([a, b], steps=1, max_len=128)
    # cu_seqlens on the device is accepted unread while capturing.
    step = Step(run, cache, [a, b], torch.arange(3, dtype=torch.int32, device=DEV))
    done = 0
    while True:
        torch.cuda.synchronize()
        before, free = snapshot(cache), cache.num_free_blocks
        try:
            step.replay(plan, where=f"step {done}")
        except OutOfBlocks:
            break
        done += 1
        assert done < 10
    # After 2 steps a holds 32 and b 16 tokens per head; step 3 would open 2 x 2 blocks > 2.
    assert done == 2
    assert_same_state(snapshot(cache), before)
    assert cache.num_free_blocks == free == 2 * L
    run.check_live(cache)
    run.release(b)
    with pytest.raises(RecaptureNeeded):
        plan.advance()
    del step
    plan = cache.prepare_decode([a], steps=4, max_len=128)
    step = Step(run, cache, [a], torch.arange(2, dtype=torch.int32))
    for i in range(32):                      # a grows to 64 tokens per head: the whole pool
        step.replay(plan, where=f"after release, step {i}")
    before = snapshot(cache)
    with pytest.raises(OutOfBlocks):
        plan.advance()
    assert_same_state(snapshot(cache), before)
    run.check_live(cache)
    assert cache.live_tokens(1, a).tolist() == [64, 64]
    assert cache.num_free_blocks == 0


def test_cuda_capture_without_plan_or_of_prefill_raises():
    cache = make(1, 2, 64, 4, 16, 32)
    run = Run([cache], 2, 0.5, 3)
    a = run.add()
    run.eager([a], [5])
    x = [t.clone() for t in run.inputs(1)]
    cu = torch.arange(2, dtype=torch.int32)
    g = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match="prepare_decode"):
        with torch.cuda.graph(g):
            cache.attend(0, [a], cu, *x)
    torch.cuda.synchronize()
    cache.prepare_decode([a])
    x2 = [t.clone() for t in run.inputs(2)]
    g = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match="cu_seqlens"):
        with torch.cuda.graph(g):
            cache.attend(0, [a], torch.tensor([0, 2], dtype=torch.int32), *x2)
    torch.cuda.synchronize()
