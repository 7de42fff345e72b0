"""The interface of the CPU ops (torch.ops.dms.*): opcheck of every op (schemas, fake kernels,
aliasing), malformed arguments (a ValueError naming the argument), and
torch.ops.dms.supported answering from the capability table (csrc/include/dms/capabilities.h).
Their values against the float64 oracle are in test_ops.py (State and decode_case come from it).
"""
import pytest
import torch

import dms_ext  # noqa: F401
from dms_ext import ops, reference
from helpers import assert_same_state, make_logits
from test_ops import State, decode_case

# --------------------------------------------------------------------------------------------
# opcheck: schemas, fake kernels, aliasing, for every op


def small_state_and_chunk(dtype=torch.float32):
    hkv, d, w, bs = 2, 8, 2, 4
    st = State(3, hkv, d, w, bs, 24, 4, dtype)
    st.k_cache.normal_()
    st.v_cache.normal_()
    st.append(torch.randn(5, hkv, d).to(dtype), torch.randn(5, hkv, d).to(dtype),
              make_logits(None, 5, hkv), [0], [5])
    t = 4
    chunk = (torch.randn(t, 2 * hkv, d).to(dtype), torch.randn(t, hkv, d).to(dtype),
             torch.randn(t, hkv, d).to(dtype), make_logits(None, t, hkv),
             torch.tensor([0, 2], dtype=torch.int32), torch.tensor([0, 3, 4], dtype=torch.int32))
    return st, chunk


def test_opcheck_every_op():
    st, (q, k, v, lg, slots, cu) = small_state_and_chunk()
    opcheck = torch.library.opcheck
    dq, kc, vc, bt, lens = decode_case(3, 2, 3, 8, 4, torch.float32)
    kc, vc = kc.nan_to_num(0.0), vc.nan_to_num(0.0)
    opcheck(torch.ops.dms.sparse_decode.default, (dq, kc, vc, bt, lens, 0.3))
    opcheck(torch.ops.dms.sparse_decode_lse.default, (dq, kc, vc, bt, lens, 0.3))
    cs = reference.rope_cache(64, 8)
    pos = torch.randint(0, 64, (4,))
    opcheck(torch.ops.dms.eviction_rope.default, (q.clone(), k.clone(), pos, cs, 100.0, 5.0),
            {"q_norm_weight": torch.rand(8), "k_norm_weight": None, "norm_eps": 1e-6})
    state = (st.block_table, st.seq_lens, st.ring, st.num_tokens)
    opcheck(torch.ops.dms.sparse_prefill.default,
            (q, k, v, lg, slots, cu, st.k_cache, st.v_cache, *state, 0.35))
    opcheck(torch.ops.dms.append.default, (k, v, lg, slots, cu, *st.tensors()))
    opcheck(torch.ops.dms.fork.default, (0, 1, *st.tensors()))
    opcheck(torch.ops.dms.release.default, (0, *state, st.free_stack, st.free_top, 4))


# --------------------------------------------------------------------------------------------
# Malformed arguments: ValueError naming the argument


def expect_value_error(name, fn):
    with pytest.raises(ValueError, match=name):
        fn()


def test_sparse_decode_bad_arguments():
    q, kc, vc, bt, lens = decode_case(2, 2, 2, 8, 4, torch.float32, max_len=10)
    sd = torch.ops.dms.sparse_decode
    expect_value_error("k_cache", lambda: sd(q, kc.half(), vc, bt, lens, 1.0))
    expect_value_error("v_cache", lambda: sd(q, kc, vc[:, :2], bt, lens, 1.0))
    expect_value_error("block_table", lambda: sd(q, kc, vc, bt.long(), lens, 1.0))
    expect_value_error("block_table", lambda: sd(q, kc, vc, bt[:1], lens, 1.0))
    expect_value_error("seq_lens", lambda: sd(q, kc, vc, bt, lens[:, :1], 1.0))
    expect_value_error("q", lambda: sd(q.int(), kc, vc, bt, lens, 1.0))
    expect_value_error("q heads", lambda: sd(q[:, :3], kc, vc, bt, lens, 1.0))
    too_long = lens.clone()
    too_long[1, 1] = bt.shape[2] * 4 + 1
    expect_value_error("seq_lens", lambda: sd(q, kc, vc, bt, too_long, 1.0))
    bad_bt = bt.clone()
    bad_bt[0, 0, 0] = kc.shape[0]
    lens1 = lens.clone()
    lens1[0, 0] = 1
    expect_value_error("block_table", lambda: sd(q, kc, vc, bad_bt, lens1, 1.0))
    expect_value_error("scale", lambda: sd(q, kc, vc, bt, lens, float("nan")))


def test_eviction_rope_bad_arguments():
    q, k = torch.randn(3, 4, 8), torch.randn(3, 2, 8)
    cs, pos = reference.rope_cache(16, 8), torch.arange(3)
    er = ops.eviction_rope
    expect_value_error("k", lambda: er(q, k.half(), pos, cs))
    expect_value_error("k", lambda: er(q, k[:2], pos, cs))
    expect_value_error("positions", lambda: er(q, k, pos.float(), cs))
    expect_value_error("positions", lambda: er(q, k, torch.tensor([0, 1, 16]), cs))
    expect_value_error("cos_sin_cache", lambda: er(q, k, pos, cs.double()))
    expect_value_error("cos_sin_cache", lambda: er(q, k, pos, cs[:, :4]))
    expect_value_error("head_dim", lambda: er(q[..., :7].contiguous(), k[..., :7].contiguous(), pos, cs))
    expect_value_error("q_norm_weight", lambda: er(q, k, pos, cs, q_norm_weight=torch.ones(4)))
    expect_value_error("k_norm_weight", lambda: er(q, k, pos, cs, k_norm_weight=torch.ones(8).half()))
    expect_value_error("q heads", lambda: er(torch.randn(3, 3, 8), k, pos, cs))
    expect_value_error("q", lambda: er(q.transpose(0, 1).contiguous().transpose(0, 1), k, pos, cs))


def test_append_and_prefill_bad_arguments():
    st, (q, k, v, lg, slots, cu) = small_state_and_chunk()
    state = st.tensors()

    def app(**kw):
        a = dict(k=k, v=v, logits=lg, seq_slots=slots, cu_seqlens=cu)
        a.update(kw)
        return lambda: torch.ops.dms.append(a["k"], a["v"], a["logits"], a["seq_slots"],
                                            a["cu_seqlens"], *state)

    def pre(**kw):
        a = dict(q=q, k=k, v=v, logits=lg, seq_slots=slots, cu_seqlens=cu)
        a.update(kw)
        return lambda: torch.ops.dms.sparse_prefill(
            a["q"], a["k"], a["v"], a["logits"], a["seq_slots"], a["cu_seqlens"], st.k_cache,
            st.v_cache, st.block_table, st.seq_lens, st.ring, st.num_tokens, 1.0)

    before = st.snapshot()
    for make in (app, pre):
        expect_value_error("v", make(v=v.half()))
        expect_value_error("logits", make(logits=lg.double()))
        expect_value_error("logits", make(logits=lg[:, :1]))
        expect_value_error("seq_slots", make(seq_slots=slots.long()))
        expect_value_error("cu_seqlens", make(cu_seqlens=cu[:2]))
        expect_value_error("seq_slots", make(seq_slots=torch.tensor([0, 0], dtype=torch.int32)))
        expect_value_error("seq_slots", make(seq_slots=torch.tensor([0, 3], dtype=torch.int32)))
        expect_value_error("cu_seqlens", make(cu_seqlens=torch.tensor([0, 4, 4], dtype=torch.int32)))
        expect_value_error("cu_seqlens", make(cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32)))
        expect_value_error("cu_seqlens", make(cu_seqlens=torch.tensor([1, 2, 4], dtype=torch.int32)))
    expect_value_error("q", pre(q=q[:, :3].contiguous()))
    expect_value_error("q", pre(q=q.half()))
    assert_same_state(before, st.snapshot())
    # State tensors of the wrong shape / dtype.
    kc, vc, bt, sl, ring, nt, fs, ft = state
    ap = torch.ops.dms.append
    expect_value_error("ring", lambda: ap(k, v, lg, slots, cu, kc, vc, bt, sl, ring[:, :, :1], nt, fs, ft))
    expect_value_error("num_tokens", lambda: ap(k, v, lg, slots, cu, kc, vc, bt, sl, ring, nt[:2], fs, ft))
    expect_value_error("free_stack", lambda: ap(k, v, lg, slots, cu, kc, vc, bt, sl, ring, nt, fs[:3], ft))
    expect_value_error("free_top", lambda: ap(k, v, lg, slots, cu, kc, vc, bt, sl, ring, nt, fs, ft.long()))
    expect_value_error("k_cache", lambda: ap(k, v, lg, slots, cu, kc[..., :4], vc, bt, sl, ring, nt, fs, ft))
    bad_sl = sl.clone()
    bad_sl[0, 0] = 10_000
    expect_value_error("seq_lens", lambda: ap(k, v, lg, slots, cu, kc, vc, bt, bad_sl, ring, nt, fs, ft))
    bad_bt = bt.clone()
    bad_bt[0, 0, 0] = -3
    expect_value_error("block_table", lambda: ap(k, v, lg, slots, cu, kc, vc, bad_bt, sl, ring, nt, fs, ft))
    bad_ft = torch.tensor([999], dtype=torch.int32)
    expect_value_error("free_top", lambda: ap(k, v, lg, slots, cu, kc, vc, bt, sl, ring, nt, fs, bad_ft))
    assert_same_state(before, st.snapshot())


def test_fork_release_bad_arguments():
    st, _ = small_state_and_chunk()
    kc, vc, bt, sl, ring, nt, fs, ft = st.tensors()
    expect_value_error("src", lambda: ops.fork(5, 1, *st.tensors()))
    expect_value_error("dst", lambda: ops.fork(0, -1, *st.tensors()))
    expect_value_error("v_cache", lambda: ops.fork(0, 1, kc, vc.half(), bt, sl, ring, nt, fs, ft))
    expect_value_error("seq_lens", lambda: ops.fork(0, 1, kc, vc, bt, sl.long(), ring, nt, fs, ft))
    expect_value_error("row", lambda: ops.release(3, bt, sl, ring, nt, fs, ft, 4))
    expect_value_error("block_size", lambda: ops.release(0, bt, sl, ring, nt, fs, ft, 0))
    expect_value_error("ring", lambda: ops.release(0, bt, sl, ring.half(), nt, fs, ft, 4))


# --------------------------------------------------------------------------------------------
# The capability table (csrc/include/dms/capabilities.h)


def test_supported_answers_from_the_capability_table():
    s = torch.ops.dms.supported
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    assert s("sparse_decode", "cpu", f32, 96, 24)
    assert not s("sparse_decode", "cuda", f32)
    assert s("sparse_decode", "cuda", bf16, 256, 64)
    assert not s("sparse_decode", "cuda", bf16, 96) and not s("sparse_decode", "cuda", f16, 128, 24)
    assert s("sparse_prefill", "cuda", f16, 128, 24) and s("sparse_prefill", "cuda", f16, 256)
    assert not s("sparse_prefill", "cuda", f16, 96)
    for op in ("eviction_rope", "decode_step"):
        for dev in ("cpu", "cuda"):
            assert s(op, dev, f32, 8) and not s(op, dev, f32, 7)
    for op in ("append", "fork", "eviction_rope", "decode_step", "release"):
        assert s(op, "cuda", f32)
    assert not s("append", "cpu", torch.float64)
    with pytest.raises(ValueError, match="op"):
        s("nope", "cpu", f32)
    with pytest.raises(ValueError, match="device"):
        s("append", "tpu", f32)
    # The ops refuse what the table refuses, naming the argument.
    q, k = torch.randn(2, 2, 7), torch.randn(2, 1, 7)
    with pytest.raises(ValueError, match="head_dim"):
        torch.ops.dms.eviction_rope(q, k, torch.zeros(2, dtype=torch.int32), torch.zeros(4, 7),
                                    1.0, 0.0)
