"""DecodePlan (DMSCache.prepare_decode / advance) on the CPU: the host side of CUDA-graph decode.

A CPU "replay" runs the same attend calls with DMSCache._capturing forced on, which is the code
a graph captures: it must not reserve, sync or copy host data to the device, so each step has to
be paid for by plan.advance() beforehand. tests/test_cuda_graph_decode.py does the real capture.
"""
import contextlib

import pytest
import torch

from dms_ext.cache import DecodePlan, DMSCache, OutOfBlocks, RecaptureNeeded, _Layer
from helpers import assert_same_state, poison_free, snapshot
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
