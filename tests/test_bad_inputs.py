"""Table-driven sweep of malformed arguments: for every op and every DMSCache method, each kind of
bad argument (dtype, device, shape, ndim, stride / non-contiguity, out-of-range block ids,
seq_lens beyond the block table, bad or repeated rows / sequence ids, bad cu_seqlens, bad
scalars) must raise ValueError with a message naming the argument, and leave every tensor the
call was given (state, inputs modified in place) and the cache's host bookkeeping bit-identical.

The mutations are generated from per-argument rules (each wrong dtype, each constrained dim
+-1, one dim fewer / more, a strided view, another device) plus hand-written data cases, and
counted: the README quotes the counts. On the CPU "another device" is the meta device; on CUDA it
is the CPU. Data checks (block ids, lengths, rows) are CPU-only by design: a CUDA launch does not
read device memory back to validate (no host sync).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import pytest
import torch

import dms_ext  # noqa: F401
from dms_ext import reference
from dms_ext.cache import DMSCache, OutOfBlocks
from helpers import COUNTS, SpecState, make_logits, same_bits

F32, F16, BF16, F64, I32, I64 = (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                 torch.int32, torch.int64)
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True, scope="module")
def _report():
    yield
    print("\n[bad inputs] cases: " + ", ".join(f"{k} {v}" for k, v in sorted(COUNTS.items())
                                               if k.startswith("bad_")))


def names_argument(msg: str, names: Sequence[str]) -> bool:
    """msg mentions one of names as a word (so "k" does not match inside "k_cache")."""
    return any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", msg) for n in names)


# --------------------------------------------------------------------------------------------
# Ops


@dataclass
class Arg:
    """How an op argument may be malformed. kind: 'float' (defines the dtype), 'same' (must match
    the defining float dtype), 'i32', 'f32', 'pos' (int32 or int64). dims: dims whose size is
    constrained (by the op or by another argument); tied: arguments a shape mismatch may be
    reported against instead (the one it is checked against). Every tensor must be contiguous
    (sparse_decode's q: unit last stride), so a stride-2 view of it is malformed."""
    kind: str
    dims: Tuple[int, ...] = ()
    tied: Tuple[str, ...] = ()


WRONG_DTYPES = {
    "float": [F64, I32, I64, torch.bool],
    "same": [F32, F16, BF16, F64, I32],
    "i32": [I64, torch.int16, F32, torch.bool],
    "f32": [F64, F16, BF16, I32],
    "pos": [F32, F64, torch.int16, torch.bool],
}


def other_floats(dtype):
    return [t for t in WRONG_DTYPES["same"] if t != dtype]


@dataclass
class OpCase:
    op: str
    args: Dict[str, object]                      # schema order
    specs: Dict[str, Arg]
    scalars: List[Tuple[str, object, Tuple[str, ...]]] = field(default_factory=list)
    data: List[Tuple[str, Callable[[Dict[str, object]], None], Tuple[str, ...]]] = field(default_factory=list)

    def call(self, args):
        return getattr(torch.ops.dms, self.op)(*args.values())


def build_cases(dev: str, dtype) -> List[OpCase]:
    """Valid calls of every op on a small state with history (Hkv 4, G 2, D 8 or 64: every dim
    +-1 is invalid), to be malformed one argument at a time."""
    gen = torch.Generator().manual_seed(0)
    D = 64 if dev == "cuda" else 8
    hkv, hq = 4, 8
    st = SpecState(gen, max_seqs=3, hkv=hkv, dim=D, window=2, block_size=4, num_blocks=40,
                   max_blocks=4, dtype=dtype, device=dev)
    ks, vs, lgs, cu = st.packed([0, 2], [5, 3], 0.5)
    assert st.append([0, 2], [5, 3], ks, vs, lgs, cu)
    kc, vc, bt, sl, ring, nt, fs, ft = st.tensors()
    T = 3
    g = lambda *s, dt=dtype: torch.randn(*s, generator=gen).to(dev, dt)   # noqa: E731
    i32 = lambda x: torch.tensor(x, dtype=I32, device=dev)                # noqa: E731
    cs = reference.rope_cache(16, D).to(dev)
    slots, cu2 = i32([0, 2]), i32([0, 2, 3])
    logits = make_logits(gen, T, hkv, 0.5).to(dev)
    state_specs = {
        "k_cache": Arg("same", (0, 1, 2), ("v_cache", "free_stack", "k", "q")),
        "v_cache": Arg("same", (0, 1, 2), ("k_cache",)),
        "block_table": Arg("i32", (0, 1), ("seq_lens", "ring", "num_tokens", "k", "q")),
        "seq_lens": Arg("i32", (0, 1), ("block_table",)),
        "ring": Arg("i32", (0, 1), ("block_table",)),
        "num_tokens": Arg("i32", (0,), ("block_table",)),
        "free_stack": Arg("i32", (0,), ("k_cache",)),
        "free_top": Arg("i32", (0,), ()),
    }
    state = dict(k_cache=kc, v_cache=vc, block_table=bt, seq_lens=sl, ring=ring, num_tokens=nt,
                 free_stack=fs, free_top=ft)
    rows = i32([0, 2]).long()
    dq = g(2, hq, D)
    dbt, dsl = bt[rows].contiguous(), sl[rows].contiguous()

    def set_(name, idx, val):
        def f(a):
            a[name] = a[name].clone()
            a[name][idx] = val
        return f

    cases = []
    # sparse_decode / sparse_decode_lse
    for op in ("sparse_decode", "sparse_decode_lse"):
        cases.append(OpCase(op, dict(q=dq, k_cache=kc, v_cache=vc, block_table=dbt, seq_lens=dsl,
                                     scale=0.5),
                            dict(q=Arg("float", (0, 1, 2), ("block_table", "k_cache")),
                                 k_cache=Arg("same", (0, 1, 2), ("v_cache", "q")),
                                 v_cache=state_specs["v_cache"],
                                 block_table=Arg("i32", (0, 1), ("q", "seq_lens")),
                                 seq_lens=Arg("i32", (0, 1), ("block_table",))),
                            scalars=[("scale", x, ("scale",)) for x in (math.nan, math.inf, -math.inf)],
                            data=[("block id past the pool", set_("block_table", (0, 0, 0), 40), ("block_table",)),
                                  ("negative block id", set_("block_table", (1, 3, 0), -1), ("block_table",)),
                                  ("huge block id", set_("block_table", (0, 1, 0), 2**31 - 1), ("block_table",)),
                                  ("seq_lens past the table", set_("seq_lens", (1, 2), 17), ("seq_lens",)),
                                  ("negative seq_lens", set_("seq_lens", (0, 0), -1), ("seq_lens",))]))
    # eviction_rope
    cases.append(OpCase("eviction_rope",
                        dict(q=g(T, hq, D), k=g(T, hkv, D), positions=i32([0, 5, 15]),
                             cos_sin_cache=cs, alpha_scale=100.0, alpha_offset=5.0,
                             q_norm_weight=g(D), k_norm_weight=g(D), norm_eps=1e-6),
                        dict(q=Arg("float", (0, 1, 2), ("k", "positions")),
                             k=Arg("same", (0, 1, 2), ("q",)),
                             positions=Arg("pos", (0,), ()),
                             cos_sin_cache=Arg("f32", (1,), ("q",)),
                             q_norm_weight=Arg("same", (0,), ()),
                             k_norm_weight=Arg("same", (0,), ())),
                        scalars=[("alpha_scale", math.nan, ("alpha_scale",)),
                                 ("alpha_offset", math.inf, ("alpha_offset",)),
                                 ("norm_eps", -1.0, ("norm_eps",)),
                                 ("norm_eps", math.nan, ("norm_eps",))],
                        data=[("position past cos_sin_cache", set_("positions", 1, 16), ("positions",)),
                              ("negative position", set_("positions", 0, -1), ("positions",))]))
    chunk_specs = dict(k=Arg("float", (0, 1, 2), ("v", "logits", "k_cache", "block_table")),
                       v=Arg("same", (0, 1, 2), ("k",)),
                       logits=Arg("f32", (0, 1), ("k",)),
                       seq_slots=Arg("i32", (0,), ("cu_seqlens",)),
                       cu_seqlens=Arg("i32", (0,), ("seq_slots",)))
    chunk_data = [
        ("repeated seq_slots", set_("seq_slots", 1, 0), ("seq_slots",)),
        ("seq_slots past max_seqs", set_("seq_slots", 1, 3), ("seq_slots",)),
        ("negative seq_slots", set_("seq_slots", 0, -1), ("seq_slots",)),
        ("cu_seqlens not from 0", set_("cu_seqlens", 0, 1), ("cu_seqlens",)),
        ("cu_seqlens not to T", set_("cu_seqlens", 2, 2), ("cu_seqlens",)),
        ("empty chunk", set_("cu_seqlens", 1, 0), ("cu_seqlens",)),
        ("decreasing cu_seqlens", set_("cu_seqlens", 1, 4), ("cu_seqlens",)),
        ("block id past the pool", set_("block_table", (0, 1, 0), 40), ("block_table",)),
        ("negative block id", set_("block_table", (2, 0, 0), -5), ("block_table",)),
        ("seq_lens past the table", set_("seq_lens", (0, 3), 17), ("seq_lens",)),
        ("negative seq_lens", set_("seq_lens", (2, 1), -2), ("seq_lens",)),
        ("negative num_tokens", set_("num_tokens", 2, -1), ("num_tokens",)),
        ("ring slot past seq_lens", set_("ring", (0, 0, 1), 40 << 1), ("ring",)),
    ]
    free_data = [
        ("free_top past the pool", set_("free_top", 0, 41), ("free_top",)),
        ("negative free_top", set_("free_top", 0, -1), ("free_top",)),
        ("free_stack entry past the pool", set_("free_stack", 0, 40), ("free_stack",)),
    ]
    # append
    cases.append(OpCase("append", dict(k=g(T, hkv, D), v=g(T, hkv, D), logits=logits, seq_slots=slots,
                                       cu_seqlens=cu2, **state),
                        {**chunk_specs, **{k: v for k, v in state_specs.items() if k != "free_top"},
                         "free_top": state_specs["free_top"]},
                        data=chunk_data + free_data))
    # sparse_prefill
    pre_state = {k: state[k] for k in ("k_cache", "v_cache", "block_table", "seq_lens", "ring",
                                       "num_tokens")}
    cases.append(OpCase("sparse_prefill",
                        dict(q=g(T, hq, D), k=g(T, hkv, D), v=g(T, hkv, D), logits=logits,
                             seq_slots=slots, cu_seqlens=cu2, **pre_state, scale=0.5),
                        {"q": Arg("same", (0, 1, 2), ("k",)), **chunk_specs,
                         **{k: state_specs[k] for k in pre_state}},
                        scalars=[("scale", math.nan, ("scale",)), ("scale", -math.inf, ("scale",))],
                        data=chunk_data))
    # fork (rows 0 and 2 hold tokens, row 1 is empty)
    fork_specs = {**state_specs, "k_cache": Arg("float", (0, 1, 2), ("v_cache", "free_stack"))}
    cases.append(OpCase("fork", dict(src=0, dst=1, **state), fork_specs,
                        scalars=[("src", 3, ("src",)), ("src", -1, ("src",)), ("dst", 3, ("dst",)),
                                 ("dst", -2, ("dst",)), ("dst", 0, ("dst",))],
                        data=[("dst row not empty", lambda a: a.update(dst=2), ("dst",)),
                              ("block id past the pool", set_("block_table", (0, 0, 0), 99), ("block_table",)),
                              ("seq_lens past the table", set_("seq_lens", (0, 0), 17), ("seq_lens",))]
                        + free_data))
    # release
    rel_state = {k: state[k] for k in ("block_table", "seq_lens", "ring", "num_tokens", "free_stack",
                                       "free_top")}
    cases.append(OpCase("release", dict(row=0, **rel_state, block_size=4),
                        {"block_table": Arg("i32", (0, 1), ("seq_lens", "ring", "num_tokens")),
                         **{k: state_specs[k] for k in ("seq_lens", "ring", "num_tokens", "free_top")},
                         "free_stack": Arg("i32", (), ())},
                        scalars=[("row", 3, ("row",)), ("row", -1, ("row",)), ("block_size", 0, ("block_size",)),
                                 ("block_size", -4, ("block_size",))],
                        data=[("block id past the pool", set_("block_table", (0, 1, 0), 40), ("block_table",)),
                              ("seq_lens past the table", set_("seq_lens", (0, 2), 17), ("seq_lens",))]))
    # decode_step
    step_specs = dict(q=Arg("float", (0, 1, 2), ("k", "seq_slots", "k_cache")),
                      k=Arg("same", (0, 1, 2), ("q", "v")), v=Arg("same", (0, 1, 2), ("k",)),
                      cos_sin_cache=Arg("f32", (1,), ("q",)),
                      seq_slots=Arg("i32", (0,), ("q",)),
                      **{k: v for k, v in state_specs.items()},
                      q_norm_weight=Arg("same", (0,), ()), k_norm_weight=Arg("same", (0,), ()),
                      logits=Arg("f32", (0, 1), ("q", "k")))
    step_specs["k_cache"] = Arg("same", (0, 1, 2), ("v_cache", "free_stack", "q"))
    step_specs["block_table"] = Arg("i32", (0, 1), ("seq_lens", "ring", "num_tokens", "k"))
    cases.append(OpCase("decode_step",
                        dict(q=g(2, hq, D), k=g(2, hkv, D), v=g(2, hkv, D), cos_sin_cache=cs,
                             seq_slots=i32([2, 1]), **state, alpha_scale=100.0, alpha_offset=5.0,
                             q_norm_weight=g(D), k_norm_weight=g(D), norm_eps=1e-6,
                             logits=make_logits(gen, 2, hkv, 0.5).to(dev)),
                        step_specs,
                        scalars=[("alpha_scale", -math.inf, ("alpha_scale",)),
                                 ("norm_eps", -1e-3, ("norm_eps",))],
                        data=[("repeated seq_slots", set_("seq_slots", 1, 2), ("seq_slots",)),
                              ("seq_slots past max_seqs", set_("seq_slots", 0, 3), ("seq_slots",)),
                              ("position past cos_sin_cache", set_("num_tokens", 1, 16), ("num_tokens",)),
                              ("block id past the pool", set_("block_table", (2, 0, 0), 40), ("block_table",)),
                              ("seq_lens past the table", set_("seq_lens", (2, 3), 17), ("seq_lens",)),
                              ("ring slot past seq_lens", set_("ring", (2, 1, 0), 30 << 1), ("ring",))]
                        + free_data))
    return cases


def resized(x: torch.Tensor, dim: int, delta: int) -> torch.Tensor:
    """x with dim `dim` one longer (last slice repeated) or one shorter."""
    if delta > 0:
        return torch.cat([x, x.narrow(dim, x.shape[dim] - 1, 1)], dim=dim)
    return x.narrow(dim, 0, x.shape[dim] - 1).contiguous()


def strided(x: torch.Tensor) -> torch.Tensor:
    """Same values and shape, last dim at stride 2 (so not contiguous)."""
    y = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)[..., ::2]
    y.copy_(x)
    return y


def other_device(dev: str) -> str:
    return "cpu" if dev == "cuda" else "meta"


def mutations(case: OpCase, dev: str):
    """(label, args, accepted names) for every malformed variant of case."""
    base = case.args
    ref = next((base[n] for n in ("q", "k", "k_cache") if n in base), None)
    dtype = None if ref is None else ref.dtype
    for name, spec in case.specs.items():
        x = base[name]
        ok = (name,) + spec.tied
        wrong = other_floats(dtype) if spec.kind == "same" else list(WRONG_DTYPES[spec.kind])
        table_op = "sparse_decode" if case.op == "sparse_decode_lse" else case.op
        if dev == "cuda" and spec.kind == "float" and not torch.ops.dms.supported(table_op, "cuda", F32):
            wrong.append(F32)                # sparse_decode / sparse_prefill: bf16 / fp16 only
        for dt in wrong:
            yield f"{name} dtype {dt}", {**base, name: x.to(dt)}, (name,) + spec.tied
        for d in spec.dims:
            for delta in (1, -1):
                if x.shape[d] + delta < 1:
                    continue
                yield f"{name} dim {d} {delta:+d}", {**base, name: resized(x, d, delta)}, ok
        if x.dim() >= 2:
            yield f"{name} one dim fewer", {**base, name: x.flatten(0, 1)}, ok
        elif x.dim() == 1:
            yield f"{name} 0-d", {**base, name: x[0]}, ok
        yield f"{name} one dim more", {**base, name: x.unsqueeze(-1)}, ok
        if x.shape[-1] > 1 if x.dim() else False:
            yield f"{name} strided", {**base, name: strided(x)}, (name,)
        od = other_device(dev)
        # On CUDA a CPU tensor among CUDA ones is reported by name, or the call names the tensor
        # that decides the device.
        yield f"{name} on {od}", {**base, name: x.to(od)}, ok + ("q", "k", "k_cache", "block_table")
    for name, val, ok in case.scalars:
        yield f"{name} = {val}", {**base, name: val}, ok
    if dev == "cpu":
        for label, fn, ok in case.data:
            args = dict(base)
            fn(args)
            yield label, args, ok


def ops_sweep(dev: str, dtype):
    tried = 0
    for case in build_cases(dev, dtype):
        for label, args, ok in mutations(case, dev):
            tensors = [v for v in list(case.args.values()) + list(args.values())
                       if isinstance(v, torch.Tensor) and v.device.type != "meta"]
            snap = [(t, t.clone()) for t in tensors]
            with pytest.raises(ValueError) as info:
                case.call(args)
                pytest.fail(f"{case.op}: {label}: no error")
            msg = str(info.value)
            assert names_argument(msg, ok), f"{case.op}: {label}: message names none of {ok}: {msg}"
            for t, before in snap:
                assert same_bits(t, before), f"{case.op}: {label}: an argument changed"
            tried += 1
            COUNTS[f"bad_op_{dev}"] += 1
    return tried


def test_every_op_rejects_each_malformed_argument_and_changes_nothing():
    tried = sum(ops_sweep("cpu", dt) for dt in (F32, BF16))
    assert tried >= 800, tried


@pytest.mark.cuda
def test_cuda_every_op_rejects_each_malformed_argument_and_changes_nothing():
    tried = sum(ops_sweep("cuda", dt) for dt in (BF16, F16))
    assert tried >= 600, tried


# --------------------------------------------------------------------------------------------
# DMSCache


def cache_snapshot(c: DMSCache):
    """Everything a failed call must leave alone: device state and host bookkeeping."""
    dev = [[t.clone() for t in lay.state()] for lay in c._layers]
    host = (dict(c._rows), list(c._free_rows), c._next_id, c._ahead.copy(),
            [(lay.free_known, lay.pending, lay.ub_len.copy()) for lay in c._layers],
            [(p.seq_ids, p.open, p._credit, p._inflight) for p in c._plans])
    return dev, host


def assert_same_cache(a, b, what):
    for la, lb in zip(a[0], b[0]):
        for x, y in zip(la, lb):
            assert same_bits(x, y), f"{what}: device state changed"
    ha, hb = a[1], b[1]
    assert ha[:3] == hb[:3] and np.array_equal(ha[3], hb[3]), f"{what}: sequence table changed"
    for (fa, pa, ua), (fb, pb, ub) in zip(ha[4], hb[4]):
        assert fa == fb and pa == pb and np.array_equal(ua, ub), f"{what}: reservations changed"
    assert ha[5] == hb[5], f"{what}: decode plans changed"


def make_cache(dev, dtype):
    D = 64 if dev == "cuda" else 16
    cache = DMSCache(2, 2, D, window=3, block_size=4, num_blocks=64, max_seqs=4, dtype=dtype,
                     device=dev)
    for lay in cache._layers:
        lay.k_cache.fill_(math.nan)
        lay.v_cache.fill_(math.nan)
    return cache


def feed(cache, sids, lens, gen, hq=6):
    """A valid attend on every layer (to build history)."""
    T = sum(lens)
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    outs = []
    for layer in range(cache.num_layers):
        q = torch.randn(T, hq, cache.head_dim, generator=gen).to(cache.device, cache.dtype)
        k = torch.randn(T, 2, cache.head_dim, generator=gen).to(cache.device, cache.dtype)
        v = torch.randn(T, 2, cache.head_dim, generator=gen).to(cache.device, cache.dtype)
        lg = make_logits(gen, T, 2, 0.5).to(cache.device)
        outs.append(cache.attend(layer, sids, cu, q, k, v, lg))
    return outs


def cache_sweep(dev, dtype):
    gen = torch.Generator().manual_seed(1)
    good, bad = make_cache(dev, dtype), make_cache(dev, dtype)
    for c in (good, bad):
        a, b, _ = c.add_sequence(), c.add_sequence(), c.add_sequence()
        gone = c.add_sequence()
        c.release(gone)
    sids = [a, b]
    for c in (good, bad):
        feed(c, sids, [5, 3], torch.Generator().manual_seed(2))
    plan = bad.prepare_decode([a], steps=2)
    gplan = good.prepare_decode([a], steps=2)
    D = bad.head_dim
    T = 3
    q = torch.randn(T, 6, D, generator=gen).to(dev, dtype)
    k = torch.randn(T, 2, D, generator=gen).to(dev, dtype)
    v = torch.randn(T, 2, D, generator=gen).to(dev, dtype)
    lg = make_logits(gen, T, 2, 0.5).to(dev)
    cu = torch.tensor([0, 2, 3], dtype=torch.int32)
    od = other_device(dev)
    other = torch.float16 if dtype != torch.float16 else torch.bfloat16
    # attend: name -> bad values (each alone in an otherwise valid call)
    attend_bad = {
        "layer": [-1, 2, "0", 1.0, True, None, [0]],
        "seq_ids": [[a, a], [a, 999], [a, gone], 7, [a, "1"], [a, True], [a, 1.5], "ab",
                    torch.tensor([[a, b]]), None, [a], [a, b, 2]],
        "cu_seqlens": [cu.float(), cu.to(torch.int16), cu[:2], cu[None], [0, 2, 3], None,
                       torch.tensor([1, 2, 3], dtype=torch.int32), torch.tensor([0, 2, 4], dtype=torch.int32),
                       torch.tensor([0, 0, 3], dtype=torch.int32), torch.tensor([0, 3, 3], dtype=torch.int32),
                       torch.tensor([0, 2, 1], dtype=torch.int32), torch.tensor([0, -1, 3], dtype=torch.int32),
                       cu.to("meta")],
        "q": [q.to(other), q.to(torch.float64), q.int(), q[..., :8].contiguous(), q[:, :5].contiguous(),
              q[:, :3].contiguous(), q[0], q[None], q.to(od), q.float().cpu().numpy(), None, q[:2]],
        "k": [k.to(other), k[:2], k[:, :1].contiguous(), k[..., :8], k.to(od), k[0], k[..., None],
              None, k[:, :, None].expand(T, 2, 2, D)],
        "v": [v.to(other), v[:2], v[:, :1].contiguous(), v[..., :8], v.to(od), v[None], None],
        "eviction_logits": [lg[:2], lg[:, :1], lg > 0, lg.to(torch.int32), lg.to(torch.float64),
                            lg.to(od), lg[:, :, None], lg[0], None],
        "scale": ["x", math.nan, math.inf, -math.inf, [1.0], object()],
    }
    # A malformed seq_ids list of another length is reported against cu_seqlens (its length
    # fixes n); a q with other T against k (q fixes T).
    also = {"seq_ids": ("cu_seqlens",), "q": ("k",)}
    base = dict(layer=0, seq_ids=[a, b], cu_seqlens=cu, q=q, k=k, v=v, eviction_logits=lg,
                scale=None)
    calls: List[Tuple[str, Callable[[], object], Tuple[str, ...]]] = []
    for name, values in attend_bad.items():
        for val in values:
            calls.append((f"attend {name}={type(val).__name__}",
                          (lambda kw: lambda: bad.attend(**kw))({**base, name: val}),
                          (name,) + also.get(name, ())))
    bad_ids = [999, gone, "0", 1.5, True, None, [a], -1]
    for val in bad_ids:
        calls.append((f"fork {val!r}", (lambda s: lambda: bad.fork(s))(val), ("seq_id",)))
        calls.append((f"release {val!r}", (lambda s: lambda: bad.release(s))(val), ("seq_id",)))
        calls.append((f"live_tokens seq {val!r}", (lambda s: lambda: bad.live_tokens(0, s))(val), ("seq_id",)))
    for val in (-1, 2, "0", 1.0, True, None):
        calls.append((f"live_tokens layer {val!r}", (lambda s: lambda: bad.live_tokens(s, a))(val), ("layer",)))
    for val in ([a, a], [999], [], [gone], "a", None, [a, "b"]):
        calls.append((f"prepare_decode seq_ids {val!r}", (lambda s: lambda: bad.prepare_decode(s))(val), ("seq_ids",)))
    for val in (0, -3, True, "2", 2.0, None):
        calls.append((f"prepare_decode steps {val!r}", (lambda s: lambda: bad.prepare_decode([b], steps=s))(val), ("steps",)))
        calls.append((f"advance steps {val!r}", (lambda s: lambda: plan.advance(s))(val), ("steps",)))
    for val in (0, -1, True, "x", 2.0):
        calls.append((f"prepare_decode max_len {val!r}", (lambda s: lambda: bad.prepare_decode([b], max_len=s))(val), ("max_len",)))
    # Sequence a holds 5 tokens: 10 more steps cannot fit in 4 tokens per head.
    calls.append(("prepare_decode max_len too small", lambda: bad.prepare_decode([a], 10, max_len=4), ("max_len",)))
    tried = 0
    for label, fn, ok in calls:
        # Exact host bounds first: a failing call may sync (refresh them), never change them.
        live = list(bad._rows.values())
        for lay in bad._layers:
            lay.sync(live)
        before = cache_snapshot(bad)
        with pytest.raises(ValueError) as info:
            fn()
            pytest.fail(f"{label}: no error")
        assert names_argument(str(info.value), ok), f"{label}: message names none of {ok}: {info.value}"
        assert_same_cache(cache_snapshot(bad), before, label)
        tried += 1
        COUNTS[f"bad_cache_{dev}"] += 1
    # The constructor: each argument alone out of contract.
    kw = dict(window=3, block_size=4, num_blocks=8, max_seqs=2, dtype=dtype, device=dev)
    ctor = [("num_layers", (0, 2, 8), {}), ("num_kv_heads", (1, -1, 8), {}), ("head_dim", (1, 2, 0), {}),
            ("num_layers", ("1", 2, 8), {}), ("head_dim", (1, 2, 8.0), {})]
    for name in ("window", "block_size", "num_blocks", "max_seqs", "max_blocks_per_head"):
        for val in (0, -1, True, "4", 2.5):
            ctor.append((name, (1, 2, 64 if dev == "cuda" else 8), {name: val}))
    ctor += [("dtype", (1, 2, 8), {"dtype": torch.int32}), ("dtype", (1, 2, 8), {"dtype": torch.float64}),
             ("device", (1, 2, 8), {"device": "nonsense"}), ("device", (1, 2, 8), {"device": 3.5}),
             ("max_blocks_per_head", (1, 2, 8), {"max_blocks_per_head": 2**29})]
    if dev == "cuda":
        ctor += [("dtype", (1, 2, 64), {"dtype": torch.float32}), ("head_dim", (1, 2, 96), {}),
                 ("block_size", (1, 2, 64), {"block_size": 24})]
    for name, pos, extra in ctor:
        with pytest.raises(ValueError, match=name):
            DMSCache(*pos, **{**kw, **extra})
        tried += 1
        COUNTS[f"bad_cache_{dev}"] += 1
    # The cache that saw every bad call answers exactly as one that saw none.
    for c, p in ((good, gplan), (bad, plan)):
        p.close()
    for lens in ([2, 1], [1, 1], [4, 1]):
        oa = feed(good, sids, lens, torch.Generator().manual_seed(sum(lens)))
        ob = feed(bad, sids, lens, torch.Generator().manual_seed(sum(lens)))
        for x, y in zip(oa, ob):
            assert same_bits(x, y)
    for lg_, lb_ in zip(good._layers, bad._layers):
        if dev == "cpu":
            for x, y in zip(lg_.state(), lb_.state()):
                assert same_bits(x, y)
        else:  # CUDA appends pop blocks with atomics: same content, block ids may differ
            from helpers import assert_same_logical
            keys = ("k_cache", "v_cache", "block_table", "seq_lens", "ring", "num_tokens",
                    "free_stack", "free_top")
            assert_same_logical(dict(zip(keys, lg_.state())), dict(zip(keys, lb_.state())))
    return tried


def test_dms_cache_rejects_each_malformed_argument_and_changes_nothing():
    assert cache_sweep("cpu", torch.float32) >= 150


@pytest.mark.cuda
def test_cuda_dms_cache_rejects_each_malformed_argument_and_changes_nothing():
    assert cache_sweep("cuda", torch.bfloat16) >= 150


# --------------------------------------------------------------------------------------------
# OutOfBlocks: nothing lost, free and retry works


def test_out_of_blocks_loses_nothing_and_release_then_retry_succeeds():
    """A pool that fills up under random prefill / decode / fork: each OutOfBlocks leaves the
    device state bit-identical (the host may have refreshed its bounds); releasing the oldest
    sequence and retrying the rest of the call succeeds and matches the reference."""
    import random

    from helpers import CacheModel
    gen = torch.Generator().manual_seed(4)
    rng = random.Random(4)
    cache = DMSCache(1, 2, 8, window=2, block_size=2, num_blocks=14, max_seqs=4,
                     dtype=torch.float32, device="cpu")
    m = CacheModel(cache, 4, 0.3, 0.0, gen, None)
    hits = retried = 0
    for _ in range(150):
        while len(m.hist) < 3:
            m.add()
        sids = list(m.hist)
        lens = [rng.choice([1, 1, 2, 5]) for _ in sids]
        if not m.attend(0, sids, lens):          # checks the device state is untouched
            hits += 1
            m.release(sids[0])
            if m.attend(0, sids[1:], lens[1:]):  # checks the outputs against the reference
                retried += 1
            else:
                for s in sids[1:]:
                    m.release(s)
        if rng.random() < 0.2 and 0 < len(m.hist) < 4:
            try:
                m.fork(rng.choice(list(m.hist)))
            except OutOfBlocks:
                hits += 1
    assert hits >= 10 and retried >= 5, (hits, retried)
    for s in list(m.hist):
        m.release(s)
    assert cache.num_free_blocks == 14
