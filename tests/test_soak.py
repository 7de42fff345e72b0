"""Soak: thousands of add / fork / attend / release cycles on one long-lived DMSCache (and on the
raw state ops), every attend equal to the float64 reference, the block pool audited as it goes:
no block lost or owned twice, host reservations never below what the device uses, and every
block free again at the end. Bounded: about 15 s on two CPU cores (DMS_TEST_SCALE=k for k x; the GPU round runs 10 x).
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from dms_ext.cache import DMSCache, OutOfBlocks
from helpers import COUNTS, NSHARDS, SCALE, SHARD, CacheModel, one_thread
from test_differential import run_state_schedule

CYCLES = 10000 * SCALE


@pytest.fixture(autouse=True, scope="module")
def _one_thread_and_report():
    with one_thread():
        yield
    print("\n[soak] " + ", ".join(f"{k} {v}" for k, v in sorted(COUNTS.items())
                                  if k.startswith("soak_")))


def audit(cache: DMSCache):
    """Each layer's pool: blocks held by live rows + the free stack are every block exactly once;
    the host bounds are sound (ub_len >= seq_lens, free_known - pending <= free_top)."""
    rows = list(cache._rows.values())
    bs, nb = cache.block_size, cache.num_blocks
    for i, lay in enumerate(cache._layers):
        lens = lay.seq_lens.cpu()
        bt = lay.block_table.cpu()
        held = []
        for r in rows:
            for g in range(cache.num_kv_heads):
                held += bt[r, g, : -(-int(lens[r, g]) // bs)].tolist()
        top = int(lay.free_top)
        free = lay.free_stack[:top].cpu().tolist()
        assert sorted(held + free) == list(range(nb)), f"layer {i}: a block is lost or owned twice"
        free_rows = [r for r in range(cache.max_seqs) if r not in rows]
        assert (lens[free_rows] == 0).all(), f"layer {i}: a released row still holds tokens"
        if rows:
            assert np.all(lay.ub_len[rows] >= lens[rows].numpy()), f"layer {i}: ub_len below seq_lens"
        assert lay.free_known - lay.pending <= top, f"layer {i}: reservations overcommit the pool"


def soak(seed: int, cycles: int, device="cpu", dtype=torch.float32, head_dim=8, bounded=False):
    """bounded: a kernel, attends held to helpers.attention_bound (else the CPU twin's rounding)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    layers, hkv, G, window, bs, nb, max_seqs = 2, 2, 3, 4, 4, 40, 5
    cache = DMSCache(layers, hkv, head_dim, window=window, block_size=bs, num_blocks=nb,
                     max_seqs=max_seqs, dtype=dtype, device=device)
    for lay in cache._layers:
        lay.k_cache.fill_(float("nan"))
        lay.v_cache.fill_(float("nan"))
    kw = {"attn_check": None} if bounded else {}
    m = CacheModel(cache, hkv * G, rate=0.6, extreme=0.05, gen=gen, scale=None, **kw)
    max_len = 40                     # a sequence is retired once it is this long
    for cycle in range(cycles):
        sids = list(m.hist)
        kind = rng.choices(["add", "fork", "release", "decode", "prefill"], weights=[3, 2, 2, 8, 3])[0]
        did = m.lifecycle(kind, rng, max_seqs, "soak_out_of_blocks")
        if did is not None:
            pass
        elif kind in ("decode", "prefill") and sids:
            did = True
            act = rng.sample(sids, rng.randint(1, len(sids)))
            lens = [1] * len(act) if kind == "decode" else [rng.randint(1, 9) for _ in act]
            for layer in range(layers):
                if not m.attend(layer, act, lens):       # nothing changed: make room, retry
                    COUNTS["soak_out_of_blocks"] += 1
                    m.release(max(m.hist, key=m.length) if layer == 0 else act[0])
                    if layer:                            # keep the layers in step: drop the call
                        break
                    act = [s for s in act if s in m.hist]
                    lens = lens[:len(act)]
                    if not act or not m.attend(layer, act, lens):
                        break
            for s in [s for s in m.hist if m.length(s) >= max_len]:
                m.release(s)
        else:
            did = False
        COUNTS[f"soak_{kind}"] += did
        if cycle % 25 == 0:
            audit(cache)
    audit(cache)
    for s in list(m.hist):
        m.release(s)
    audit(cache)
    assert cache.num_free_blocks == layers * nb, "blocks leaked"
    assert len(cache) == 0
    return m


def test_dms_cache_soak_no_leak_and_equal_to_reference():
    soak(1, CYCLES)
    assert COUNTS["soak_decode"] + COUNTS["soak_prefill"] >= CYCLES // 2
    assert COUNTS["soak_fork"] >= 100 and COUNTS["soak_release"] >= 100
    assert COUNTS["soak_out_of_blocks"] >= 20


def test_state_ops_soak():
    """One long schedule of append / sparse_prefill / decode_step / fork / release on raw state
    tensors (helpers.SpecState checks each call against docs/semantics.md)."""
    for seed in range(6 * SCALE):
        st = run_state_schedule(20_000 + seed, events=400)
        assert int(st.free_top) == st.nb


@pytest.mark.cuda
def test_cuda_dms_cache_soak_no_leak_and_equal_to_reference():
    # DMS_TEST_SHARD i/n: n independent soaks (seeds 2 + i) of CYCLES / n cycles each.
    soak(2 + SHARD, -(-CYCLES // NSHARDS), device="cuda", dtype=torch.bfloat16, head_dim=64,
         bounded=True)
