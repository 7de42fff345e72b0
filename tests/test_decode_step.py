"""CPU: torch.ops.dms.decode_step equals eviction_rope + append, step after step."""
import pytest
import torch

import dms_ext  # noqa: F401
from dms_ext import ops, reference
from helpers import (assert_pool_consistent, assert_same_logical, clone_state, new_state,
                          norm_weights, make_logits, seed_of, state_args, step_inputs)


def _separate_step(q, k, v, cs, slots, st, logits=None, qn=None, kn=None, eps=1e-6):
    """What decode_step must equal: eviction_rope on copies, then append of 1-token chunks.
    With adapter logits q keeps every channel: eviction_rope only borrows from its q argument,
    so q and k each go through it as the k argument."""
    q2, k2 = q.clone(), k.clone()
    pos = st["num_tokens"][slots.long()].clone()
    if logits is None:
        logits = ops.eviction_rope(q2, k2, pos, cs, 100.0, 5.0, qn, kn, eps)
    else:
        ops.eviction_rope(torch.zeros_like(q2), q2, pos, cs, 100.0, 5.0, None, qn, eps)
        ops.eviction_rope(torch.zeros_like(k2), k2, pos, cs, 100.0, 5.0, None, kn, eps)
    cu = torch.arange(slots.numel() + 1, dtype=torch.int32)
    ops.append(k2, v, logits, slots, cu, *state_args(st))
    return q2, logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group,hkv,dim", [(1, 2, 16), (3, 2, 64), (5, 1, 10), (7, 3, 32)])
@pytest.mark.parametrize("window,block_size", [(1, 4), (3, 2), (8, 16)])
@pytest.mark.parametrize("norm,adapter", [(False, False), (True, False), (True, True)])
def test_decode_step_equals_eviction_rope_plus_append(dtype, group, hkv, dim, window, block_size,
                                                      norm, adapter):
    gen = torch.Generator().manual_seed(seed_of(str(dtype), group, hkv, dim, window, block_size,
                                              norm, adapter))
    hq, rows = group * hkv, 5
    max_blocks = 64 // block_size + 8
    nb = rows * hkv * max_blocks
    cs = reference.rope_cache(256, dim)
    fused = new_state(rows, hkv, dim, nb, block_size, window, max_blocks, dtype, "cpu", gen)
    sep = clone_state(fused)
    qn, kn = norm_weights(dim, dtype, gen) if norm else (None, None)
    # A prefill chunk on some rows first, so decode continues existing state too.
    pre = torch.tensor([1, 3], dtype=torch.int32)
    cu = torch.tensor([0, 7, 9], dtype=torch.int32)
    kk = torch.randn(9, hkv, dim, generator=gen).to(dtype)
    vv = torch.randn(9, hkv, dim, generator=gen).to(dtype)
    ll = make_logits(gen, 9, hkv, 0.5, floor=0.25, span=1.0)
    for st in (fused, sep):
        ops.append(kk, vv, ll, pre, cu, *state_args(st))
    evict_p = [0.0, 0.5, 0.9, 1.0]
    for step in range(40):
        b = int(torch.randint(1, rows + 1, (1,), generator=gen))
        slots = torch.randperm(rows, generator=gen)[:b].to(torch.int32)
        p = evict_p[step % 4]
        q, k, v = step_inputs(b, hq, hkv, dim, dtype, p, gen)
        given = make_logits(gen, b, hkv, p, floor=0.25, span=1.0) if adapter else None
        q_sep, l_sep = _separate_step(q, k, v, cs, slots, sep, given, qn, kn)
        k_before = k.clone()
        l_fused = ops.decode_step(q, k, v, cs, slots, *state_args(fused), 100.0, 5.0, qn, kn,
                                  1e-6, given)
        assert torch.equal(k, k_before), "decode_step must not write k"
        assert torch.equal(l_fused, l_sep)
        assert torch.equal(q, q_sep)
        assert_same_logical(fused, sep, range(rows), hkv)
        for key in ("block_table", "seq_lens", "ring", "num_tokens", "free_stack", "free_top"):
            assert torch.equal(fused[key], sep[key]), key  # same sequential code: same block ids
    assert_pool_consistent(fused, range(rows), block_size)


def test_decode_step_matches_reference_rope_and_live_counts():
    """Independent of the CPU twins: q after the fused step equals reference.eviction_rope at
    position num_tokens, and the live counts follow the SPEC formula over the emitted logits."""
    gen = torch.Generator().manual_seed(7)
    hq, hkv, dim, window, bs, rows = 12, 4, 32, 5, 4, 3
    cs = reference.rope_cache(128, dim)
    st = new_state(rows, hkv, dim, 4 * rows * hkv * 8, bs, window, 32, torch.float32, "cpu", gen)
    qn, kn = norm_weights(dim, torch.float32, gen)
    history = [[] for _ in range(rows)]
    for step in range(30):
        slots = torch.randperm(rows, generator=gen)[: 1 + step % rows].to(torch.int32)
        q, k, v = step_inputs(slots.numel(), hq, hkv, dim, torch.float32, 0.6, gen)
        pos = st["num_tokens"][slots.long()].clone()
        q_ref, _, l_ref = reference.eviction_rope(q, k, pos, cs, 100.0, 5.0, qn, kn)
        logits = ops.decode_step(q, k, v, cs, slots, *state_args(st), 100.0, 5.0, qn, kn)
        torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits, l_ref, rtol=1e-5, atol=1e-4)
        for i, r in enumerate(slots.tolist()):
            history[r].append(logits[i])
    for r in range(rows):
        if history[r]:
            live = reference.live_counts(torch.stack(history[r]), window)
            assert st["seq_lens"][r].long().tolist() == live.tolist()


def _small_case(gen, b=2, hq=4, hkv=2, dim=16, rows=3, nb=24, bs=4, window=2):
    cs = reference.rope_cache(16, dim)
    st = new_state(rows, hkv, dim, nb, bs, window, 6, torch.float32, "cpu", gen)
    q, k, v = step_inputs(b, hq, hkv, dim, torch.float32, 0.5, gen)
    slots = torch.arange(b, dtype=torch.int32)
    return q, k, v, cs, slots, st


def _call(q, k, v, cs, slots, st, **kw):
    return torch.ops.dms.decode_step(q, k, v, cs, slots, *state_args(st), 100.0, 5.0,
                                     kw.get("qn"), kw.get("kn"), 1e-6, kw.get("logits"))


@pytest.mark.parametrize("what,name", [
    ("k_heads", "k"), ("v_shape", "v"), ("logits_shape", "logits"), ("slots_dtype", "seq_slots"),
    ("repeat", "seq_slots"), ("slot_range", "seq_slots"), ("cs_dim", "cos_sin_cache"),
    ("norm_shape", "q_norm_weight"), ("position", "num_tokens"), ("q_odd", "q"),
])
def test_decode_step_rejects_bad_arguments(what, name):
    gen = torch.Generator().manual_seed(3)
    q, k, v, cs, slots, st = _small_case(gen)
    kw = {}
    if what == "k_heads":
        k = torch.randn(2, 3, 16)
    elif what == "v_shape":
        v = torch.randn(2, 2, 8)
    elif what == "logits_shape":
        kw["logits"] = torch.randn(2, 3)
    elif what == "slots_dtype":
        slots = slots.long()
    elif what == "repeat":
        slots = torch.tensor([1, 1], dtype=torch.int32)
    elif what == "slot_range":
        slots = torch.tensor([0, 3], dtype=torch.int32)
    elif what == "cs_dim":
        cs = torch.randn(16, 8)
    elif what == "norm_shape":
        kw["qn"] = torch.ones(8)
    elif what == "position":
        st["num_tokens"][1] = 16  # cos_sin_cache has 16 positions
    elif what == "q_odd":
        q = torch.randn(2, 4, 15)
    before = clone_state(st)
    with pytest.raises(ValueError, match=name):
        _call(q, k, v, cs, slots, st, **kw)
    for key in before:
        assert torch.equal(before[key], st[key]) or key.endswith("cache")


def test_decode_step_out_of_blocks_leaves_everything_untouched():
    gen = torch.Generator().manual_seed(5)
    q, k, v, cs, slots, st = _small_case(gen, nb=24)
    st["free_top"][0] = 3  # 2 rows x 2 heads need 4 fresh blocks
    before, q0 = clone_state(st), q.clone()
    with pytest.raises(RuntimeError, match="(?i)block"):
        _call(q, k, v, cs, slots, st)
    assert torch.equal(q, q0)
    for key in before:
        torch.testing.assert_close(st[key], before[key], rtol=0, atol=0, equal_nan=True)


def test_decode_step_opcheck():
    gen = torch.Generator().manual_seed(11)
    q, k, v, cs, slots, st = _small_case(gen)
    qn, kn = norm_weights(16, torch.float32, gen)
    torch.library.opcheck(torch.ops.dms.decode_step.default,
                          (q, k, v, cs, slots, *state_args(st), 100.0, 5.0, qn, kn, 1e-6, None))
