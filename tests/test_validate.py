"""DMS_VALIDATE (issue 17, docs/errors.md section 4): with the mode on, every CUDA op that reads
a page table, lengths or rows first checks that data on the device (dms::validate, the checks of
csrc/include/dms/validate.h) and raises what the CPU op raises, before anything is written.

One table of corruptions, each of one argument of an otherwise valid state, runs on both
devices: the CPU twins run the same checks on the host, so the same message is expected from
both (the CUDA one ends in "(DMS_VALIDATE)"), and a refused call leaves every state tensor
bit-identical. The CUDA cases turn the mode on through ops.validate_mode (the test hook; an
engine sets DMS_VALIDATE=1)."""
import os
import re
import subprocess
import sys

import pytest
import torch

from dms_ext import ops
from helpers import DEVICES, assert_same_state, make_logits, new_state, snapshot, state_args

H, HQ, D, BS, NB, W, S, M = 2, 4, 64, 16, 32, 4, 4, 8
DT = torch.bfloat16
LENS = (20, 37)          # rows 0 and 1 hold tokens, rows 2 and 3 are empty
MAX_POSITION = 40


@pytest.fixture
def validating():
    before = ops.validate_mode(True)
    yield
    ops.validate_mode(before)


def valid_state(dev):
    gen = torch.Generator().manual_seed(0)
    st = new_state(S, H, D, NB, BS, W, M, DT, "cpu", gen)
    T = sum(LENS)
    k = torch.randn(T, H, D, generator=gen).to(DT)
    v = torch.randn(T, H, D, generator=gen).to(DT)
    cu = torch.tensor([0, LENS[0], T], dtype=torch.int32)
    ops.append(k, v, make_logits(gen, T, H, 0.3), torch.tensor([0, 1], dtype=torch.int32), cu,
               *state_args(st))
    return {k: t.to(dev) for k, t in st.items()}


def rand(dev, *shape):
    return torch.randn(*shape).to(dev, DT)


def i32(dev, values):
    return torch.tensor(values, dtype=torch.int32, device=dev)


# Each op call on state `st` (the corrupted tensors are st's).
def decode(st, dev, lse=False):
    q = rand(dev, 2, HQ, D)
    f = ops.sparse_decode_lse if lse else ops.sparse_decode
    return lambda: f(q, st["k_cache"], st["v_cache"], st["block_table"][:2], st["seq_lens"][:2])


def prefill(st, dev, rows=(0, 1), cu=(0, 2, 3)):
    T = cu[-1]
    q, k, v = rand(dev, T, HQ, D), rand(dev, T, H, D), rand(dev, T, H, D)
    lg = torch.randn(T, H).to(dev)
    return lambda: ops.sparse_prefill(q, k, v, lg, i32(dev, list(rows)), i32(dev, list(cu)),
                                      st["k_cache"], st["v_cache"], st["block_table"],
                                      st["seq_lens"], st["ring"], st["num_tokens"])


def append(st, dev, rows=(0, 1), cu=(0, 2, 3)):
    T = cu[-1]
    k, v, lg = rand(dev, T, H, D), rand(dev, T, H, D), torch.randn(T, H).to(dev)
    return lambda: ops.append(k, v, lg, i32(dev, list(rows)), i32(dev, list(cu)),
                              *state_args(st))


def step(st, dev, rows=(0, 1)):
    B = len(rows)
    q, k, v = rand(dev, B, HQ, D), rand(dev, B, H, D), rand(dev, B, H, D)
    cs = torch.randn(MAX_POSITION, D).to(dev)
    return lambda: ops.decode_step(q, k, v, cs, i32(dev, list(rows)), *state_args(st))


def fork(st, dev, src=0, dst=2):
    return lambda: ops.fork(src, dst, *state_args(st))


def release(st, dev, row=0):
    keys = ("block_table", "seq_lens", "ring", "num_tokens", "free_stack", "free_top")
    return lambda: ops.release(row, *[st[k] for k in keys], BS)


def put(name, index, value):
    def corrupt(st):
        st[name][index] = value
    return corrupt


# id: (corrupt the state, the call, the exception, the op, the message after "<op>: ")
CASES = {
    "decode_block_id": (put("block_table", (1, 1, 0), 9001), decode, ValueError, "sparse_decode",
                        r"block_table\[1, 1, 0\] = 9001 is not a block id in \[0, 32\)"),
    "decode_lse_negative_block": (put("block_table", (0, 0, 0), -1),
                                  lambda st, dev: decode(st, dev, lse=True), ValueError,
                                  "sparse_decode",
                                  r"block_table\[0, 0, 0\] = -1 is not a block id in \[0, 32\)"),
    "decode_seq_len": (put("seq_lens", (0, 1), M * BS + 1), decode, ValueError, "sparse_decode",
                       r"seq_lens\[0, 1\] = 129 is outside \[0, max_blocks_per_head \* "
                       r"block_size = 128\]"),
    "decode_negative_seq_len": (put("seq_lens", (1, 0), -2), decode, ValueError, "sparse_decode",
                                r"seq_lens\[1, 0\] = -2 is outside"),
    "prefill_ring_slot": (put("ring", (1, 0, (LENS[1] - 1) % (W + 1)), 999 << 1), prefill,
                          ValueError, "sparse_prefill",
                          r"ring\[1, 0, 1\] holds slot 999, outside seq_lens\[1, 0\] = \d+"),
    "prefill_repeated_row": (lambda st: None, lambda st, dev: prefill(st, dev, rows=(1, 1)),
                             ValueError, "sparse_prefill",
                             r"seq_slots \(rows\) must be distinct, row 1 repeats"),
    "prefill_negative_num_tokens": (put("num_tokens", 0, -3), prefill, ValueError,
                                    "sparse_prefill", r"num_tokens\[0\] = -3 is negative"),
    "prefill_cu_seqlens_order": (lambda st: None, lambda st, dev: prefill(st, dev, cu=(0, 3, 3)),
                                 ValueError, "sparse_prefill",
                                 r"cu_seqlens must increase \(chunks of >= 1 token\), got "
                                 r"cu_seqlens\[1\] = 3, cu_seqlens\[2\] = 3"),
    "append_row_range": (lambda st: None, lambda st, dev: append(st, dev, rows=(0, 7)),
                         ValueError, "append", r"seq_slots \(rows\)\[1\] = 7 is not a row in \[0, 4\)"),
    "append_block_id": (put("block_table", (1, 1, 0), NB), append, ValueError, "append",
                        r"block_table\[1, 1, 0\] = 32 is not a block id in \[0, 32\)"),
    "append_free_stack": (put("free_stack", 0, 77), append, ValueError, "append",
                          r"free_stack\[0\] = 77 is not a block id in \[0, 32\)"),
    "append_free_top": (put("free_top", 0, NB + 1), append, ValueError, "append",
                        r"free_top = 33 is outside \[0, 32\]"),
    "append_cu_seqlens_first": (lambda st: None, lambda st, dev: append(st, dev, cu=(1, 2, 3)),
                                ValueError, "append", r"cu_seqlens\[0\] must be 0, got 1"),
    "step_position": (put("num_tokens", 1, MAX_POSITION), step, ValueError, "decode_step",
                      r"position num_tokens\[1\] = 40 is outside cos_sin_cache's \[0, 40\)"),
    "step_repeated_row": (lambda st: None, lambda st, dev: step(st, dev, rows=(0, 0)), ValueError,
                          "decode_step", r"seq_slots \(rows\) must be distinct, row 0 repeats"),
    "step_block_id": (put("block_table", (0, 1, 0), -5), step, ValueError, "decode_step",
                      r"block_table\[0, 1, 0\] = -5 is not a block id in \[0, 32\)"),
    "fork_dst_not_empty": (lambda st: None, lambda st, dev: fork(st, dev, 0, 1), ValueError,
                           "fork", r"dst row 1 must be empty \(num_tokens\[dst\] == 0\)"),
    "fork_dst_seq_len": (put("seq_lens", (2, 1), 3), fork, ValueError, "fork",
                         r"dst row 2 must be empty \(seq_lens\[dst, 1\] == 0\)"),
    "fork_src_block_id": (put("block_table", (0, 0, 0), 4096), fork, ValueError, "fork",
                          r"block_table\[0, 0, 0\] = 4096 is not a block id in \[0, 32\)"),
    "fork_out_of_blocks": (put("free_top", 0, 0), fork, RuntimeError, "fork",
                           r"needs \d+ blocks, 0 free"),
    "release_free_top": (put("free_top", 0, NB), release, ValueError, "release",
                         r"free_top = 32 plus the row's \d+ blocks exceeds num_blocks = 32"),
    "release_seq_len": (put("seq_lens", (0, 0), 1000), release, ValueError, "release",
                        r"seq_lens\[0, 0\] = 1000 is outside"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_device_data_is_refused_before_anything_changes(device, case, validating):
    corrupt, call, exc, op, message = CASES[case]
    st = valid_state(device)
    corrupt(st)
    fn = call(st, device)
    before = snapshot(st)
    with pytest.raises(exc) as info:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    text = str(info.value)
    assert f"{op}: " in text, text
    assert re.search(message, text), f"{case}: {text!r} does not match {message!r}"
    if device == "cuda":
        assert "(DMS_VALIDATE)" in text, text
    assert_same_state(snapshot(st), before, f"{case}: a refused call changed the state")


@pytest.mark.cuda
def test_cuda_validated_calls_on_good_data_match_unvalidated_ones(validating):
    """The mode changes nothing for good data: each op agrees bit for bit with the mode off."""
    outs = {}
    for mode in (True, False):
        ops.validate_mode(mode)
        torch.manual_seed(5)
        st = valid_state("cuda")
        res = [decode(st, "cuda")(), prefill(st, "cuda")()]
        append(st, "cuda")()
        res.append(step(st, "cuda", rows=(1, 0))())
        fork(st, "cuda")()
        release(st, "cuda", row=1)()
        res.append(decode(st, "cuda")())
        outs[mode] = (res, {k: st[k] for k in ("seq_lens", "num_tokens", "ring", "free_top")})
    for a, b in zip(outs[True][0], outs[False][0]):
        assert torch.equal(a, b)
    for k in outs[True][1]:
        assert torch.equal(outs[True][1][k], outs[False][1][k]), k


@pytest.mark.cuda
def test_cuda_graph_capture_skips_the_check(validating):
    """A sync cannot be captured: under capture the op runs unchecked (and replays fine)."""
    st = valid_state("cuda")
    call = decode(st, "cuda")
    eager = call()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = call()
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


def test_validate_mode_hook_sets_and_restores():
    before = ops.validate_mode()
    try:
        assert ops.validate_mode(True) == before
        assert ops.validate_mode() is True
        assert ops.validate_mode(False) is True
        assert ops.validate_mode() is False
    finally:
        ops.validate_mode(before)


@pytest.mark.parametrize("env,expected", [(None, False), ("0", False), ("1", True)])
def test_dms_validate_env_var_is_the_initial_mode(env, expected):
    e = {k: v for k, v in os.environ.items() if k != "DMS_VALIDATE"}
    if env is not None:
        e["DMS_VALIDATE"] = env
    out = subprocess.run([sys.executable, "-c", "import dms_ext; print(dms_ext.ops.validate_mode())"],
                         env=e, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == str(expected)
