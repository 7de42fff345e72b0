"""CPU: torch.ops.dms.decode_step against dms_ext.reference, step after step."""
import pytest
import torch

import dms_ext  # noqa: F401
from dms_ext import ops, reference
from helpers import (SpecState, clone_state, new_state,
                     norm_weights, seed_of, state_args, step_inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group,hkv,dim", [(1, 2, 16), (3, 2, 64), (5, 1, 10), (7, 3, 32)])
@pytest.mark.parametrize("window,block_size", [(1, 4), (3, 2), (8, 16)])
@pytest.mark.parametrize("norm,adapter", [(False, False), (True, False), (True, True)])
def test_decode_step_matches_reference(dtype, group, hkv, dim, window, block_size, norm, adapter):
    """decode_step against dms_ext.reference only (not against the ops it is built from): after
    every step q and the logits equal reference.eviction_rope, k is untouched, the K written
    equals the reference roped k, and every stepped row holds exactly the tokens SPEC section 1
    says (helpers.SpecState.decode_step / check_row); the pool stays consistent."""
    gen = torch.Generator().manual_seed(seed_of(str(dtype), group, hkv, dim, window, block_size,
                                              norm, adapter))
    hq, rows = group * hkv, 5
    max_blocks = 64 // block_size + 8
    st = SpecState(gen, max_seqs=rows, hkv=hkv, dim=dim, window=window, block_size=block_size,
                   num_blocks=rows * hkv * max_blocks, max_blocks=max_blocks, dtype=dtype)
    cs = reference.rope_cache(256, dim)
    # A prefill chunk on some rows first, so decode continues existing state too.
    ks, vs, lgs, cu = st.packed([1, 3], [7, 2], 0.5)
    assert st.append([1, 3], [7, 2], ks, vs, lgs, cu)
    evict_p = [0.0, 0.5, 0.9, 1.0]
    for step in range(40):
        b = int(torch.randint(1, rows + 1, (1,), generator=gen))
        slots = torch.randperm(rows, generator=gen)[:b].tolist()
        assert st.decode_step(slots, hq, cs, evict_p[step % 4], norm, adapter)
        st.check_pool()


def test_decode_step_matches_reference_rope_and_live_counts():
    """Independent of the CPU twins: q after the fused step equals reference.eviction_rope at
    position num_tokens, and the live counts follow docs/semantics.md section 6 over the emitted
    logits."""
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
