"""DecodePlan (DMSCache.prepare_decode / advance): CUDA-graph decode of a whole DMSCache step,
on every device that has it. Was tests/test_graph_api.py (CPU) + tests/test_cuda_graph_decode.py.

CPU: a "replay" runs the same attend calls with DMSCache._capturing forced on, which is the code
a graph captures: it must not reserve, sync or copy host data to the device, so each step has to
be paid for by plan.advance() beforehand.
CUDA (marked `cuda`: a real capture exists only there): one CUDA graph of a whole decode step
(every layer), replayed with fresh inputs. Each replay is paid for by DecodePlan.advance (host
only); its outputs must equal an eager twin cache fed the same inputs and the float64 reference
over the full history, and a pool that runs out must stop at advance, before the replay, with
nothing lost.
"""
import contextlib

import pytest
import torch

from dms_ext import reference
from dms_ext.cache import DecodePlan, DMSCache, OutOfBlocks, RecaptureNeeded, _Layer
from helpers import (assert_same_state, assert_within_bound, dms_bound, make_logits, poison_free,
                     snapshot)
from test_cache import Model


@contextlib.contextmanager
def replaying(monkeypatch):
    """attend as a graph replay sees it: capturing, and any sync or host->device copy fails."""
    def forbidden(*a, **k):
        raise AssertionError("a captured decode step synced or copied host data")

    with monkeypatch.context() as mp:
        mp.setattr(DMSCache, "_capturing", lambda self: True)
        mp.setattr(DMSCache, "_to_device", forbidden)
        mp.setattr(_Layer, "sync", forbidden)
        yield


def replay_step(m, sids, monkeypatch, atol=1e-5):
    """One decode step of every layer on the plan path; checked against the reference."""
    with replaying(monkeypatch):
        return m.step(sids, [1] * len(sids), atol=atol, rtol=atol)


def make(num_blocks=400, window=3, bs=4, hkv=2, G=3, layers=2, max_seqs=4, **kw):
    cache = DMSCache(layers, hkv, 16, window=window, block_size=bs, num_blocks=num_blocks,
                     max_seqs=max_seqs, dtype=torch.float32, device="cpu", **kw)
    poison_free(cache)
    return cache


def test_plan_steps_match_eager_twin_and_reference(monkeypatch):
    cache, twin = make(), make()
    m, mt = Model(cache, 6, 0.5, 3), Model(twin, 6, 0.5, 3)   # same seed: same inputs
    sids = [m.add() for _ in range(3)]
    assert [mt.add() for _ in range(3)] == sids
    for mm in (m, mt):
        mm.step(sids, [9, 1, 23])
        mm.step(sids[::2], [5, 4])
    plan = cache.prepare_decode(sids, steps=4, max_len=64)
    assert isinstance(plan, DecodePlan) and plan.seq_ids == tuple(sids)
    assert plan.slots.dtype == torch.int32 and plan.cu_seqlens.tolist() == [0, 1, 2, 3]
    for step in range(30):
        plan.advance()
        bounds = [(lay.ub_len.copy(), lay.pending, lay.free_known) for lay in cache._layers]
        outs = replay_step(m, sids, monkeypatch)
        eager = mt.step(sids, [1, 1, 1])
        for a, b in zip(outs, eager):
            assert torch.equal(a, b), step
        for lay, (ub, pending, free) in zip(cache._layers, bounds):   # replays reserve nothing
            assert (lay.ub_len == ub).all() and (lay.pending, lay.free_known) == (pending, free)
    for layer in range(2):
        for sid in sids:
            assert torch.equal(cache.live_tokens(layer, sid), twin.live_tokens(layer, sid))
    assert cache.num_free_blocks == twin.num_free_blocks


def test_capture_needs_an_open_plan_for_exactly_those_ids(monkeypatch):
    cache = make()
    m = Model(cache, 6, 0.5, 4)
    a, b = m.add(), m.add()
    m.step([a, b], [3, 2])
    with replaying(monkeypatch), pytest.raises(ValueError, match="prepare_decode"):
        m.step([a, b], [1, 1])
    plan = cache.prepare_decode([a, b])
    with replaying(monkeypatch):
        with pytest.raises(ValueError, match="prepare_decode"):
            m.step([b, a], [1, 1])                   # another order is another batch
        with pytest.raises(ValueError, match="cu_seqlens"):
            m.step([a, b], [2, 1])                   # prefill cannot be captured
    plan.advance()
    replay_step(m, [a, b], monkeypatch)
    # Eager steps of the plan's batch pay for themselves (plan tensors, normal reservation).
    m.step([a, b], [1, 1])
    assert plan.open


def test_prepare_decode_validates_arguments():
    cache = make()
    a = cache.add_sequence()
    for bad, name in (([a], "steps"),):
        with pytest.raises(ValueError, match=name):
            cache.prepare_decode(bad, steps=0)
    with pytest.raises(ValueError, match="seq_ids"):
        cache.prepare_decode([a + 7])
    with pytest.raises(ValueError, match="seq_ids"):
        cache.prepare_decode([a, a])
    with pytest.raises(ValueError, match="seq_ids"):
        cache.prepare_decode([])
    with pytest.raises(ValueError, match="max_len"):
        cache.prepare_decode([a], steps=5, max_len=0)
    with pytest.raises(ValueError, match="max_len"):
        cache.prepare_decode([a], steps=5, max_len=4)   # 5 tokens cannot fit in 4
    assert cache.prepare_decode([a], steps=3, max_len=5).max_len == 8   # whole blocks


def test_release_and_newer_plan_close_a_plan(monkeypatch):
    cache = make()
    m = Model(cache, 6, 0.5, 5)
    a, b = m.add(), m.add()
    m.step([a, b], [6, 2])
    p1 = cache.prepare_decode([a, b], steps=2)
    p2 = cache.prepare_decode([a, b], steps=2)
    assert not p1.open and p2.open
    with pytest.raises(RecaptureNeeded, match="closed"):
        p1.advance()
    p2.advance()
    replay_step(m, [a, b], monkeypatch)
    m.release(b)
    with pytest.raises(RecaptureNeeded, match="closed"):
        p2.advance()
    assert not cache._ahead.any()           # no reservation outlives its plans
    p3 = cache.prepare_decode([a])
    for _ in range(5):
        p3.advance()
        replay_step(m, [a], monkeypatch)


def test_reopen_serves_the_next_batch_on_the_same_rows(monkeypatch):
    """A plan re-opened for new sequences on its rows keeps its device tensors (so its graph
    stays valid) and its replays match the reference; other rows, a head past max_len, or a
    pool too small for the step raise and change nothing."""
    cache = make(max_seqs=3)
    m = Model(cache, 6, 0.5, 12)
    a, b = m.add(), m.add()
    m.step([a, b], [7, 3])
    plan = cache.prepare_decode([a, b], steps=2, max_len=32)
    slots, cu = plan.slots, plan.cu_seqlens
    for _ in range(3):
        plan.advance()
        replay_step(m, [a, b], monkeypatch)
    for s in (a, b):
        m.release(s)
    assert not plan.open and not cache._ahead.any()
    c, d = m.add(), m.add()
    m.step([c, d], [5, 9])                              # lowest rows first: c, d on a, b's rows
    with pytest.raises(ValueError, match="seq_ids"):
        plan.reopen([d, c])                             # same rows, another order
    assert not plan.open
    plan.reopen([c, d])
    assert plan.open and plan.seq_ids == (c, d) and plan.slots is slots and plan.cu_seqlens is cu
    assert cache._plan_for(cache._rows_of([c, d])) is plan
    for _ in range(6):                                  # past the first credit: advance refills
        plan.advance()
        replay_step(m, [c, d], monkeypatch)
    # Re-opening an open plan for its own batch holds: one plan, reservations not doubled.
    plan.reopen([c, d])
    assert cache._plans.count(plan) == 1 and int(cache._ahead[cache._rows_of([c, d])].max()) == 1
    plan.advance()
    replay_step(m, [c, d], monkeypatch)
    # A head that could outgrow max_len: RecaptureNeeded, the plan stays closed.
    m.release(c)
    m.release(d)
    e, f = m.add(), m.add()
    m.step([e, f], [120, 2])                          # about 60 kept of 120: past 32
    before = snapshot(cache)
    with pytest.raises(RecaptureNeeded):
        plan.reopen([e, f])
    assert not plan.open and not cache._ahead.any()
    assert_same_state(snapshot(cache), before)


def test_advance_raises_out_of_blocks_before_damage_then_release_and_new_plan(monkeypatch):
    # 8 blocks of 4 tokens per layer, 2 heads, nothing evicted: growth is exact.
    cache = make(num_blocks=8, window=2, bs=4, G=2)
    m = Model(cache, 4, 0.0, 6)
    a, b = m.add(), m.add()
    m.step([a, b], [7, 3])                  # a: 2 blocks per head, b: 1 -> 6 of 8
    plan = cache.prepare_decode([a, b], steps=1, max_len=64)
    done = 0
    while True:
        before, free = snapshot(cache), cache.num_free_blocks
        try:
            plan.advance()
        except OutOfBlocks:
            break
        replay_step(m, [a, b], monkeypatch)
        done += 1
        assert done < 20
    # a reaches 8 (2 blocks), b 4 (1 block) after one step; the next step opens 2 x 2 blocks > 2.
    assert done == 1
    assert_same_state(snapshot(cache), before)
    assert cache.num_free_blocks == free
    with pytest.raises(OutOfBlocks):          # still nothing changed, still refused
        plan.advance()
    m.release(b)
    assert not plan.open
    plan = cache.prepare_decode([a], steps=2, max_len=32)
    for _ in range(8):                         # a grows to 16 tokens per head = the whole pool
        plan.advance()
        replay_step(m, [a], monkeypatch)
    with pytest.raises(OutOfBlocks):
        plan.advance()
    assert cache.live_tokens(0, a).tolist() == [16, 16]


def test_width_exceeded_needs_recapture_unless_evictions_keep_heads_short(monkeypatch):
    cache = make(window=2, bs=4, G=1)
    m = Model(cache, 2, 0.0, 7)
    s = m.add()
    m.step([s], [5])
    plan = cache.prepare_decode([s], steps=1)          # width: 6 tokens -> 2 blocks = 8
    assert plan.max_len == 8
    for _ in range(3):
        plan.advance()
        replay_step(m, [s], monkeypatch)
    before = snapshot(cache)
    with pytest.raises(RecaptureNeeded, match="width"):
        plan.advance()                                 # 9 tokens would not fit in 8
    assert_same_state(snapshot(cache), before)
    # Every token flagged: heads keep window + 1 = 3 tokens, the bound syncs back down.
    cache2 = make(window=2, bs=4, G=1)
    m2 = Model(cache2, 2, 1.0, 8)
    s2 = m2.add()
    m2.step([s2], [5])
    plan2 = cache2.prepare_decode([s2], steps=1, max_len=8)
    for _ in range(40):
        plan2.advance()
        replay_step(m2, [s2], monkeypatch)
    assert cache2.live_tokens(1, s2).tolist() == [3, 3]


def test_sync_keeps_plan_steps_reserved(monkeypatch):
    # The plan of a holds 10 steps; eager calls on b and a fork, which sync, must not take the
    # blocks those steps may need.
    cache = make(num_blocks=12, window=2, bs=4, G=1, layers=1, max_seqs=3)
    m = Model(cache, 2, 0.0, 9)
    a, b = m.add(), m.add()
    m.step([a], [4])                        # 1 block per head: 2 of 12
    plan = cache.prepare_decode([a], steps=10, max_len=16)   # up to 14 tokens: 3 more per head
    with pytest.raises(OutOfBlocks):
        m.step([b], [9])                    # 2 x 3 blocks, only 12 - 2 - 6 = 4 not reserved
    m.step([b], [5])                        # 2 x 2 blocks: fits exactly
    with pytest.raises(OutOfBlocks, match="fork"):
        m.fork(b)                           # 4 more blocks: 6 are free, all reserved
    for _ in range(10):
        plan.advance()
        replay_step(m, [a], monkeypatch)
    assert cache.num_free_blocks == 0
    assert cache.live_tokens(0, a).tolist() == [14, 14]


# --------------------------------------------------------------------------------------------
# CUDA: the real capture (was tests/test_cuda_graph_decode.py).

DEV = "cuda"
DT = torch.bfloat16


class CudaRun:
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


def make_cuda(layers, hkv, d, window, bs, num_blocks):
    c = DMSCache(layers, hkv, d, window=window, block_size=bs, num_blocks=num_blocks, max_seqs=4,
                 dtype=DT, device=DEV)
    poison_free(c)
    return c


def warm_up_cuda(hkv, G, d, bs):
    """Eager decode on a throwaway cache, so kernel attributes and modules load before a capture."""
    run = CudaRun([make_cuda(1, hkv, d, 4, bs, 16)], hkv * G, 0.5, 99)
    s = run.add()
    run.eager([s], [3])
    run.eager([s], [1])
    torch.cuda.synchronize()


@pytest.mark.cuda
def test_cuda_graph_decode_step_replays_match_eager_twin_and_reference():
    L, hkv, G, d, w, bs = 2, 2, 5, 128, 16, 16
    cache, twin = make_cuda(L, hkv, d, w, bs, 200), make_cuda(L, hkv, d, w, bs, 200)
    run = CudaRun([cache, twin], hkv * G, 0.5, 1)
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


@pytest.mark.cuda
def test_cuda_graph_decode_out_of_blocks_before_damage_then_release_and_recapture():
    # 8 blocks of 16 tokens per layer, 2 heads, nothing evicted (rate 0): growth is exact.
    L, hkv, G, d, w, bs = 2, 2, 3, 64, 4, 16
    warm_up_cuda(hkv, G, d, bs)
    cache = make_cuda(L, hkv, d, w, bs, 8)
    run = CudaRun([cache], hkv * G, 0.0, 2)
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


@pytest.mark.cuda
def test_cuda_capture_without_plan_or_of_prefill_raises():
    cache = make_cuda(1, 2, 64, 4, 16, 32)
    run = CudaRun([cache], 2, 0.5, 3)
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
