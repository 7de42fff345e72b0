"""torch.compile(fullgraph=True) over nn.Modules that call the dms ops (a prefill layer: RoPE +
logits, sparse prefill attention, append; a decode layer: the fused step, then paged decode
attention; fork / release), against the same modules run eagerly on a twin state: outputs and
every state tensor bit for bit, step after step with changing lengths, without recompiling.
Plus opcheck of the ops whose CUDA kernels the CUDA test files do not opcheck yet.

CPU: the inductor backend (it compiles on this CI box: the ops stay opaque custom-op calls, the
glue around them is generated C++). CUDA: inductor as well (skipped without a GPU).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import dms_ext  # noqa: F401  (registers torch.ops.dms)
from dms_ext import reference
from helpers import make_logits, same_bits

HAS_CUDA = torch.cuda.is_available()

STATE = ("k_cache", "v_cache", "block_table", "seq_lens", "ring", "num_tokens", "free_stack",
         "free_top")


class DMSLayer(nn.Module):
    """One attention layer over a DMS paged cache, state held as buffers (mutated in place by the
    ops, which torch.compile must keep as mutations of the module's buffers)."""

    def __init__(self, *, max_seqs, hkv, hq, dim, window, block_size, num_blocks, max_blocks,
                 max_position, dtype, device, gen):
        super().__init__()
        self.hq, self.hkv, self.dim = hq, hkv, dim
        self.scale = 1.0 / math.sqrt(dim)
        f = dict(dtype=dtype, device=device)
        i32 = dict(dtype=torch.int32, device=device)
        self.register_buffer("k_cache", torch.zeros(num_blocks, block_size, dim, **f))
        self.register_buffer("v_cache", torch.zeros(num_blocks, block_size, dim, **f))
        self.register_buffer("block_table", torch.full((max_seqs, hkv, max_blocks), -1, **i32))
        self.register_buffer("seq_lens", torch.zeros(max_seqs, hkv, **i32))
        self.register_buffer("ring", torch.zeros(max_seqs, hkv, window + 1, **i32))
        self.register_buffer("num_tokens", torch.zeros(max_seqs, **i32))
        self.register_buffer("free_stack", torch.randperm(num_blocks, generator=gen).to(**i32))
        self.register_buffer("free_top", torch.tensor([num_blocks], **i32))
        self.register_buffer("cos_sin", reference.rope_cache(max_position, dim).to(device))
        self.register_buffer("q_norm", (torch.rand(dim, generator=gen) + 0.5).to(**f))
        self.register_buffer("k_norm", (torch.rand(dim, generator=gen) + 0.5).to(**f))

    def state(self):
        return [getattr(self, n) for n in STATE]

    def prefill(self, q, k, v, positions, seq_slots, cu_seqlens):
        logits = torch.ops.dms.eviction_rope(q, k, positions, self.cos_sin, 100.0, 5.0,
                                             self.q_norm, self.k_norm, 1e-6)
        out = torch.ops.dms.sparse_prefill(q, k, v, logits, seq_slots, cu_seqlens, self.k_cache,
                                           self.v_cache, self.block_table, self.seq_lens, self.ring,
                                           self.num_tokens, self.scale)
        torch.ops.dms.append(k, v, logits, seq_slots, cu_seqlens, *self.state())
        return out * 1.0, logits       # glue op, so the graph is more than the custom ops

    def decode(self, q, k, v, seq_slots, adapter_logits=None):
        logits = torch.ops.dms.decode_step(q, k, v, self.cos_sin, seq_slots, *self.state(), 100.0,
                                           5.0, self.q_norm, self.k_norm, 1e-6, adapter_logits)
        bt = self.block_table.index_select(0, seq_slots)
        lens = self.seq_lens.index_select(0, seq_slots)
        out, lse = torch.ops.dms.sparse_decode_lse(q, self.k_cache, self.v_cache, bt, lens,
                                                   self.scale)
        out2 = torch.ops.dms.sparse_decode(q, self.k_cache, self.v_cache, bt, lens, self.scale)
        return out + 0 * out2, lse, logits

    def fork_release(self, src: int, dst: int, row: int):
        torch.ops.dms.fork(src, dst, *self.state())
        torch.ops.dms.release(row, self.block_table, self.seq_lens, self.ring, self.num_tokens,
                              self.free_stack, self.free_top, self.k_cache.shape[1])
        return self.free_top + 0


class Prefill(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, q, k, v, positions, seq_slots, cu_seqlens):
        return self.layer.prefill(q, k, v, positions, seq_slots, cu_seqlens)


class Decode(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, q, k, v, seq_slots, adapter_logits=None):
        return self.layer.decode(q, k, v, seq_slots, adapter_logits)


def twins(device, dtype, dim, seed=0):
    kw = dict(max_seqs=4, hkv=2, hq=6, dim=dim, window=3, block_size=4, num_blocks=64,
              max_blocks=16, max_position=128, dtype=dtype, device=device)
    a = DMSLayer(gen=torch.Generator().manual_seed(seed), **kw)
    b = DMSLayer(gen=torch.Generator().manual_seed(seed), **kw)
    return a, b


def assert_same_state(comp, eager, what):
    """Bit for bit on the CPU. CUDA appends pop blocks with atomics, so block ids may differ
    between two runs: there the content each (row, head) holds must be the same."""
    if comp.k_cache.is_cuda:
        from helpers import assert_same_logical
        assert_same_logical(dict(zip(STATE, comp.state())), dict(zip(STATE, eager.state())),
                            where=what)
    else:
        assert_same(comp.state(), eager.state(), what)


def assert_same(x, y, what):
    if isinstance(x, (tuple, list)):
        for i, (p, q) in enumerate(zip(x, y)):
            assert_same(p, q, f"{what}[{i}]")
        return
    assert same_bits(x, y), f"{what} differs between compiled and eager"


def counting(backend: str):
    """backend, counting the graphs it is asked to compile."""
    from torch._dynamo.backends.registry import lookup_backend
    inner, graphs = lookup_backend(backend), []

    def compile_graph(gm, example_inputs):
        graphs.append(gm)
        return inner(gm, example_inputs)
    return compile_graph, graphs


def run(device, dtype, dim, backend, steps=12):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(1)
    eager, comp = twins(device, dtype, dim)
    pre_e, dec_e = Prefill(eager), Decode(eager)
    pre_backend, pre_graphs = counting(backend)
    dec_backend, dec_graphs = counting(backend)
    pre_c = torch.compile(Prefill(comp), fullgraph=True, backend=pre_backend, dynamic=False)
    dec_c = torch.compile(Decode(comp), fullgraph=True, backend=dec_backend, dynamic=False)

    def inputs(T, hq=6, hkv=2):
        q = torch.randn(T, hq, dim, generator=gen).to(device, dtype)
        k = torch.randn(T, hkv, dim, generator=gen).to(device, dtype)
        v = torch.randn(T, hkv, dim, generator=gen).to(device, dtype)
        return q, k, v

    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    # Prefill three sequences (chunks 5, 9, 2), twice with the same shapes (no recompile).
    for rows, pos0 in (([0, 1, 3], 0), ([1, 3, 0], None)):
        q, k, v = inputs(16)
        nt = eager.num_tokens.cpu()
        lens = [5, 9, 2]
        pos = torch.cat([torch.arange(n) + int(nt[r]) for r, n in zip(rows, lens)]).to(device)
        cu = i32([0, 5, 14, 16])
        oe = pre_e(q.clone(), k.clone(), v, pos, i32(rows), cu)
        oc = pre_c(q.clone(), k.clone(), v, pos, i32(rows), cu)
        assert_same(oc, oe, "prefill outputs")
        assert_same_state(comp, eager, "state after prefill")
    # Decode steps: lengths change every step (evictions, growth), shapes do not.
    for step in range(steps):
        rows = [[0, 1, 3], [3, 0, 1], [1, 3, 0]][step % 3]
        q, k, v = inputs(3)
        q[:, ::3, -1] = torch.where(torch.rand(3, 2, generator=gen) < 0.5, 1.0, -1.0).to(device, dtype)
        adapter = make_logits(gen, 3, 2, 0.5).to(device) if step % 2 else None
        qe, qc = q.clone(), q.clone()
        oe = dec_e(qe, k, v, i32(rows), adapter)
        oc = dec_c(qc, k, v, i32(rows), adapter)
        assert_same(oc, oe, f"decode outputs, step {step}")
        assert_same(qc, qe, f"q roped in place, step {step}")
        assert_same_state(comp, eager, f"state after decode step {step}")
    assert len(set(eager.seq_lens.flatten().tolist())) > 1, "lengths should differ by head"
    # Data (lengths, positions, rows) never enters a guard: one prefill graph, and one decode
    # graph per form of the optional adapter logits (None / tensor).
    assert len(pre_graphs) == 1 and len(dec_graphs) == 2, (len(pre_graphs), len(dec_graphs))
    # fork + release through a compiled function as well.
    fr = torch.compile(lambda m, s, d, r: m.fork_release(s, d, r), fullgraph=True, backend=backend)
    te = eager.fork_release(0, 2, 1)
    tc = fr(comp, 0, 2, 1)
    assert_same(tc, te, "free_top after fork + release")
    assert_same_state(comp, eager, "state after fork + release")


def test_compile_fullgraph_cpu_inductor():
    run("cpu", torch.float32, 8, "inductor")


def test_compile_fullgraph_cpu_aot_eager_bf16():
    run("cpu", torch.bfloat16, 16, "aot_eager", steps=6)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_compile_fullgraph_inductor(dtype):
    run("cuda", dtype, 64, "inductor", steps=30)


# --------------------------------------------------------------------------------------------
# opcheck on CUDA for the ops the CUDA test files do not opcheck (sparse_decode, sparse_prefill
# and decode_step are opchecked in test_decode / test_prefill / test_decode_step).


@pytest.mark.cuda
def test_cuda_opcheck_eviction_rope_append_fork_release():
    from helpers import SpecState
    gen = torch.Generator().manual_seed(5)
    st = SpecState(gen, max_seqs=3, hkv=2, dim=64, window=3, block_size=16, num_blocks=24,
                   max_blocks=4, dtype=torch.bfloat16, device="cuda")
    ks, vs, lgs, cu = st.packed([0, 2], [7, 20], 0.5)
    assert st.append([0, 2], [7, 20], ks, vs, lgs, cu)
    opcheck = torch.library.opcheck
    q = torch.randn(5, 4, 64, generator=gen).to("cuda", torch.bfloat16)
    k = torch.randn(5, 2, 64, generator=gen).to("cuda", torch.bfloat16)
    cs = reference.rope_cache(64, 64).cuda()
    pos = torch.randint(0, 64, (5,), generator=gen).cuda()
    w = (torch.rand(64, generator=gen) + 0.5).to("cuda", torch.bfloat16)
    opcheck(torch.ops.dms.eviction_rope.default, (q, k, pos, cs, 100.0, 5.0),
            {"q_norm_weight": w, "k_norm_weight": w, "norm_eps": 1e-6})
    kk = torch.randn(4, 2, 64, generator=gen).to("cuda", torch.bfloat16)
    lg = make_logits(gen, 4, 2, 0.5).cuda()
    slots = torch.tensor([0, 2], dtype=torch.int32, device="cuda")
    cu2 = torch.tensor([0, 3, 4], dtype=torch.int32, device="cuda")
    opcheck(torch.ops.dms.append.default, (kk, kk.clone(), lg, slots, cu2, *st.tensors()))
    opcheck(torch.ops.dms.fork.default, (0, 1, *st.tensors()))
    opcheck(torch.ops.dms.release.default, (0, *st.tensors()[2:], 16))


def test_cpu_opcheck_every_op_with_norms_and_adapter_logits():
    """test_ops_interface / test_decode_step opcheck each op once; here the optional arguments the
    compiled modules above use (both norm weights, adapter logits) go through opcheck too."""
    from helpers import SpecState
    gen = torch.Generator().manual_seed(6)
    st = SpecState(gen, max_seqs=3, hkv=2, dim=8, window=2, block_size=4, num_blocks=24,
                   max_blocks=6, dtype=torch.float32)
    ks, vs, lgs, cu = st.packed([0, 2], [5, 3], 0.5)
    assert st.append([0, 2], [5, 3], ks, vs, lgs, cu)
    q, k, v = (torch.randn(2, h, 8, generator=gen) for h in (4, 2, 2))
    cs = reference.rope_cache(16, 8)
    w = torch.rand(8, generator=gen) + 0.5
    slots = torch.tensor([2, 1], dtype=torch.int32)
    torch.library.opcheck(torch.ops.dms.decode_step.default,
                          (q, k, v, cs, slots, *st.tensors(), 100.0, 5.0, w, w, 1e-6,
                           make_logits(gen, 2, 2, 0.5)))
