"""The state-step ops (decode_step, eviction_rope, append, fork, release) on every device (a
`device` parameter: "cpu" always, "cuda" skipped without a GPU; CUDA-only behaviour is marked
`cuda`). Was tests/test_decode_step.py (CPU) + tests/test_cuda_step.py (CUDA).

decode_step against dms_ext.reference, step after step (CPU: the float64 twin is the reference's
peer); eviction_rope against the float64 reference; the fused decode_step against the same step
as separate ops (bitwise) and against the CPU twin; CUDA-only: append / fork / release schedules
and a 256-row decode against the CPU twin, graph replay, opcheck on CUDA tensors.

Block ids come off the free stack by atomics on the GPU, so they may differ from the CPU twin;
states are compared logically: num_tokens, seq_lens, the ring entries (slot and flag) of the
last w+1 positions, and K/V of every live slot gathered through each side's block table; plus
a pool check (every block free or owned exactly once).
"""
import random

import pytest
import torch

import dms_ext  # noqa: F401
from dms_ext import ops, reference
from helpers import (DEVICES, STATE_KEYS, SpecState, assert_logits_within, assert_pool_consistent,
                     assert_same_logical, clone_state, logit_interval, make_logits, new_state,
                     norm_weights, seed_of, state_args, step_inputs)

DEV = "cuda"  # the device of the CUDA-only tests
ULP = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


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


# ---------------------------------------------------------------------------------------------
# Was tests/test_cuda_step.py.


def cpu_copy(st):
    return {k: v.cpu() for k, v in st.items()}


def assert_logically_equal(gpu, cpu, rows=None, hkv=None, k_rtol=0.0, where=""):
    """GPU state == CPU state logically (helpers.compare_logical); returns the GPU state
    copied to the CPU."""
    g = cpu_copy(gpu)
    assert_same_logical(g, cpu, k_rtol=k_rtol, where=where)
    return g


def blocks_needed(cpu, row, c, bs):
    lens = cpu["seq_lens"][row].long()
    return int(((lens + c + bs - 1) // bs - (lens + bs - 1) // bs).sum())


# ---------------------------------------------------------------------------------------------
# append + fork + release: random schedules against the CPU twin.

@pytest.mark.cuda
@pytest.mark.parametrize("dtype,hkv,dim,window,bs", [
    (torch.bfloat16, 8, 128, 512, 64),   # the public checkpoint's shape: decode + big chunks
    (torch.bfloat16, 4, 64, 300, 16),    # window + 1 > 256: chunk batches of 256 tokens
    (torch.bfloat16, 3, 128, 1100, 32),  # window + 1 > 1024: long chunks in batches of 1024
    (torch.float16, 3, 64, 7, 4),        # small window: batches of w + 1 = 8 tokens
    (torch.bfloat16, 2, 24, 1, 2),       # w = 1, 48-byte rows (16-byte path, odd count)
    (torch.float16, 5, 20, 33, 8),       # 40-byte rows: scalar copy path
])
def test_cuda_append_fork_release_match_cpu_twin(dtype, hkv, dim, window, bs):
    rng = random.Random(seed_of(str(dtype), hkv, dim, window, bs))
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    rows, max_tokens = 6, 1500
    max_blocks = (max_tokens + bs - 1) // bs + 1
    nb = rows * hkv * max_blocks // 2
    cpu = new_state(rows, hkv, dim, nb, bs, window, max_blocks, dtype, "cpu", gen)
    gpu = clone_state(cpu, DEV)
    rates = [0.0, 0.5, 0.9, 1.0]
    decode_calls = chunk_calls = long_calls = forks = releases = 0
    for step in range(220):
        nt = cpu["num_tokens"]
        empty = [r for r in range(rows) if int(nt[r]) == 0]
        live = [r for r in range(rows) if int(nt[r]) > 0]
        u = rng.random()
        if u < 0.08 and live and empty:
            src, dst = rng.choice(live), rng.choice(empty)
            need = int(((cpu["seq_lens"][src].long() + bs - 1) // bs).sum())
            if need <= int(cpu["free_top"][0]):
                ops.fork(src, dst, *state_args(cpu))
                ops.fork(src, dst, *state_args(gpu))
                forks += 1
        elif u < 0.14 and live:
            row = rng.choice(live)
            ops.release(row, *[cpu[k] for k in STATE_KEYS[2:]], bs)
            ops.release(row, *[gpu[k] for k in STATE_KEYS[2:]], bs)
            releases += 1
        else:
            decode = u < 0.6
            # Long chunks alone (one or two): >= 1024 tokens per chunk takes the 1024-thread
            # kernel (on sm_90 a cluster of CTAs per chunk and head).
            long_one = not decode and rng.random() < 0.2
            n = rng.randint(1, 2) if long_one else rng.randint(1, rows)
            chosen = rng.sample(range(rows), n)
            chunks, budget = [], int(cpu["free_top"][0])
            for r in chosen:
                c = 1 if decode else rng.choice([1, rng.randint(2, 40), rng.randint(200, 700)])
                if long_one:
                    c = rng.randint(1024, 1400)
                if int(nt[r]) + c > max_tokens:
                    continue
                need = blocks_needed(cpu, r, c, bs)
                if need > budget:
                    continue
                budget -= need
                chunks.append((r, c))
            if not chunks:
                # Pool or rows full: free the longest row.
                row = max(range(rows), key=lambda r: int(nt[r]))
                ops.release(row, *[cpu[k] for k in STATE_KEYS[2:]], bs)
                ops.release(row, *[gpu[k] for k in STATE_KEYS[2:]], bs)
                releases += 1
            else:
                slots = torch.tensor([r for r, _ in chunks], dtype=torch.int32)
                lens = [c for _, c in chunks]
                cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32)
                t = int(cu[-1])
                k = torch.randn(t, hkv, dim, generator=gen).to(dtype)
                v = torch.randn(t, hkv, dim, generator=gen).to(dtype)
                lg = make_logits(gen, t, hkv, rates[step % 4], floor=0.25, span=1.0)
                ops.append(k, v, lg, slots, cu, *state_args(cpu))
                ops.append(k.to(DEV), v.to(DEV), lg.to(DEV), slots.to(DEV), cu.to(DEV),
                           *state_args(gpu))
                if t == len(lens):
                    decode_calls += 1
                else:
                    chunk_calls += 1
                    long_calls += t // len(lens) >= 1024
        if step < 20 or step % 4 == 3:
            g = assert_logically_equal(gpu, cpu, where=f"step {step}")
            assert_pool_consistent(g, range(rows), bs)
    g = assert_logically_equal(gpu, cpu, where="end")
    assert_pool_consistent(g, range(rows), bs)
    assert decode_calls > 20 and chunk_calls > 10 and long_calls > 0 and forks + releases > 5, \
        (decode_calls, chunk_calls, long_calls, forks, releases)


@pytest.mark.cuda
def test_cuda_append_decode_batch_256_rows():
    """The decode shape at full width: 256 sequences x 8 heads, one token each, many steps."""
    gen = torch.Generator().manual_seed(1)
    rows, hkv, dim, window, bs, steps = 256, 8, 128, 16, 16, 40
    max_blocks = steps // bs + 2
    cpu = new_state(rows, hkv, dim, rows * hkv * max_blocks, bs, window, max_blocks,
                    torch.bfloat16, "cpu", gen)
    gpu = clone_state(cpu, DEV)
    slots = torch.randperm(rows, generator=gen).to(torch.int32)
    cu = torch.arange(rows + 1, dtype=torch.int32)
    for step in range(steps):
        k = torch.randn(rows, hkv, dim, generator=gen).to(torch.bfloat16)
        v = torch.randn(rows, hkv, dim, generator=gen).to(torch.bfloat16)
        lg = make_logits(gen, rows, hkv, 0.5, floor=0.25, span=1.0)
        ops.append(k, v, lg, slots, cu, *state_args(cpu))
        ops.append(k.to(DEV), v.to(DEV), lg.to(DEV), slots.to(DEV), cu.to(DEV), *state_args(gpu))
    g = assert_logically_equal(gpu, cpu, range(rows), hkv)
    assert_pool_consistent(g, range(rows), bs)


# ---------------------------------------------------------------------------------------------
# eviction_rope against the float64 reference.

def _check_rope_outputs(q_out, k_out, logits, q_ref, k_ref, dtype, group, q, qn=None):
    """q, qn (the inputs): the logits against the reference's chain (bounds.logit_interval; on
    CUDA widened by the float32 RMSNorm's rounding)."""
    ulp = ULP[dtype]
    for got, ref, name in ((q_out, q_ref, "q"), (k_out, k_ref, "k")):
        err = (got.double().cpu() - ref).abs()
        # One rounding of a float result: half an ulp of the value, plus float slack.
        bound = ref.abs() * ulp * 1.05 + 1e-5
        assert bool((err <= bound).all()), f"{name}: max err {err.max():.3e}"
    lo, hi = logit_interval(q, k_out.shape[1], 100.0, 5.0, qn, float32_norm=logits.is_cuda)
    assert_logits_within(logits, lo, hi, "eviction_rope logits")
    assert bool((q_out[:, ::group, -1] == 0).all()), "donor channel D-1 must be 0"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group,hkv,dim", [(4, 8, 128), (1, 2, 64), (3, 2, 256), (5, 1, 128),
                                           (7, 3, 64), (2, 2, 24), (3, 1, 40)])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_eviction_rope_matches_reference(dtype, group, hkv, dim, norm, device):
    gen = torch.Generator().manual_seed(seed_of(str(dtype), group, hkv, dim, norm))
    T, hq = 77, group * hkv
    cs = reference.rope_cache(4096, dim)
    q = torch.randn(T, hq, dim, generator=gen).to(dtype)
    k = torch.randn(T, hkv, dim, generator=gen).to(dtype)
    pos = torch.randint(0, 4096, (T,), generator=gen)
    qn, kn = norm_weights(dim, dtype, gen) if norm else (None, None)
    q_ref, k_ref, _ = reference.eviction_rope(q.double(), k.double(), pos, cs, 100.0, 5.0,
                                              None if qn is None else qn.double(),
                                              None if kn is None else kn.double(),
                                              logit_dtype=dtype)
    for pos_dtype in (torch.int32, torch.int64):
        qd, kd = q.to(device, copy=True), k.to(device, copy=True)
        logits = ops.eviction_rope(qd, kd, pos.to(pos_dtype).to(device), cs.to(device), 100.0,
                                   5.0, None if qn is None else qn.to(device),
                                   None if kn is None else kn.to(device))
        _check_rope_outputs(qd, kd, logits, q_ref, k_ref, dtype, group, q, qn)


@pytest.mark.parametrize("device", DEVICES)
def test_eviction_rope_misaligned_and_empty(device):
    """Contiguous views whose base is not 16-byte aligned take the scalar path; T = 0 is a no-op."""
    gen = torch.Generator().manual_seed(2)
    T, hq, hkv, dim = 9, 8, 2, 128
    cs = reference.rope_cache(64, dim)
    q = torch.randn(T, hq, dim, generator=gen).to(torch.bfloat16)
    k = torch.randn(T, hkv, dim, generator=gen).to(torch.bfloat16)
    pos = torch.randint(0, 64, (T,), generator=gen)
    q_ref, k_ref, _ = reference.eviction_rope(q.double(), k.double(), pos, cs,
                                              logit_dtype=torch.bfloat16)
    qbuf = torch.empty(q.numel() + 1, dtype=q.dtype, device=device)
    kbuf = torch.empty(k.numel() + 3, dtype=k.dtype, device=device)
    qd = qbuf[1:].view(T, hq, dim)
    kd = kbuf[3:].view(T, hkv, dim)
    qd.copy_(q)
    kd.copy_(k)
    assert qd.data_ptr() % 16 != 0
    logits = ops.eviction_rope(qd, kd, pos.to(device), cs.to(device))
    _check_rope_outputs(qd, kd, logits, q_ref, k_ref, torch.bfloat16, hq // hkv, q)
    e = torch.empty(0, hq, dim, dtype=torch.bfloat16, device=device)
    out = ops.eviction_rope(e, torch.empty(0, hkv, dim, dtype=torch.bfloat16, device=device),
                            torch.empty(0, dtype=torch.int32, device=device), cs.to(device))
    assert out.shape == (0, hkv)


# ---------------------------------------------------------------------------------------------
# decode_step: fused == separate GPU ops (bitwise), == CPU twin (logically), graph replay.

def _prefill_rows(states, rows, hkv, dim, dtype, gen):
    """A chunk of random length on every row, so decode starts from existing state."""
    lens = [int(torch.randint(1, 40, (1,), generator=gen)) for _ in range(rows)]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    t = int(cu[-1])
    k = torch.randn(t, hkv, dim, generator=gen).to(dtype)
    v = torch.randn(t, hkv, dim, generator=gen).to(dtype)
    lg = make_logits(gen, t, hkv, 0.5, floor=0.25, span=1.0)
    slots = torch.arange(rows, dtype=torch.int32)
    for st in states:
        d = st["ring"].device
        ops.append(k.to(d), v.to(d), lg.to(d), slots.to(d), cu.to(d), *state_args(st))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group,hkv,dim", [(4, 8, 128), (1, 4, 64), (3, 2, 256), (5, 3, 40),
                                           (7, 1, 128)])
@pytest.mark.parametrize("norm,adapter", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("device", DEVICES)
def test_decode_step_matches_separate_ops_and_cpu_twin(dtype, group, hkv, dim, norm, adapter,
                                                       device):
    gen = torch.Generator().manual_seed(seed_of(str(dtype), group, hkv, dim, norm, adapter))
    rows, window, bs, steps = 7, 9, 8, 120
    hq = group * hkv
    max_blocks = (40 + steps) // bs + 2
    nb = rows * hkv * max_blocks
    cs = reference.rope_cache(512, dim)
    csd = cs.to(device)
    cpu = new_state(rows, hkv, dim, nb, bs, window, max_blocks, dtype, "cpu", gen)
    fused, sep = clone_state(cpu, device), clone_state(cpu, device)
    _prefill_rows([cpu, fused, sep], rows, hkv, dim, dtype, gen)
    qn, kn = norm_weights(dim, dtype, gen) if norm else (None, None)
    qnd = None if qn is None else qn.to(device)
    knd = None if kn is None else kn.to(device)
    rates = [0.0, 0.5, 0.9, 1.0]
    for step in range(steps):
        b = 1 + step % rows
        slots = torch.randperm(rows, generator=gen)[:b].to(torch.int32)
        q, k, v = step_inputs(b, hq, hkv, dim, dtype, rates[step % 4], gen)
        given = make_logits(gen, b, hkv, rates[step % 4], floor=0.25, span=1.0) if adapter else None
        sd = slots.to(device)
        gd = None if given is None else given.to(device)
        # Fused on the device.
        qf, kf, vf = (x.to(device, copy=True) for x in (q, k, v))
        kf0 = kf.clone()
        lf = ops.decode_step(qf, kf, vf, csd, sd, *state_args(fused), 100.0, 5.0, qnd, knd,
                             1e-6, gd)
        assert torch.equal(kf, kf0), "decode_step must not write k"
        # The same step as separate ops on the device.
        qs, ks = q.to(device, copy=True), k.to(device, copy=True)
        pos = sep["num_tokens"][sd.long()].clone()
        if adapter:
            ops.eviction_rope(torch.zeros_like(qs), qs, pos, csd, 100.0, 5.0, None, qnd)
            ops.eviction_rope(torch.zeros_like(ks), ks, pos, csd, 100.0, 5.0, None, knd)
            ls = gd
        else:
            ls = ops.eviction_rope(qs, ks, pos, csd, 100.0, 5.0, qnd, knd)
        ops.append(ks, vf, ls, sd, torch.arange(b + 1, dtype=torch.int32, device=device),
                   *state_args(sep))
        # Same device code path (rope_row) and the same rule: bitwise equal outputs.
        assert torch.equal(qf, qs), f"q differs from eviction_rope at step {step}"
        assert torch.equal(lf, ls), f"logits differ at step {step}"
        # CPU twin.
        qc = q.clone()
        lc = ops.decode_step(qc, k, v, cs, slots, *state_args(cpu), 100.0, 5.0, qn, kn, 1e-6,
                             given)
        err = (qf.cpu().double() - qc.double()).abs()
        assert bool((err <= qc.double().abs() * 2 * ULP[dtype] + 1e-5).all()), f"q vs CPU {step}"
        if lf.is_cuda and given is None:    # float32 RMSNorm (bounds.logit_interval)
            lo, hi = logit_interval(q, hkv, 100.0, 5.0, qn)
            assert_logits_within(lf, lo, hi, f"logits at step {step}")
        else:
            torch.testing.assert_close(lf.cpu(), lc, rtol=1e-5, atol=1e-3)
        if step % 10 == 9 or step == steps - 1:
            g = assert_logically_equal(fused, cpu, range(rows), hkv, k_rtol=2 * ULP[dtype],
                                       where=f"fused vs cpu, step {step}")
            assert_pool_consistent(g, range(rows), bs)
            assert_logically_equal(sep, cpu_copy(fused), range(rows), hkv,
                                   where=f"fused vs separate, step {step}")


@pytest.mark.cuda
def test_cuda_decode_step_graph_replay_equals_eager():
    """Captured once, replayed with new inputs each step: same as eager calls, since positions,
    slots and blocks are all read on the device."""
    gen = torch.Generator().manual_seed(4)
    rows, hq, hkv, dim, window, bs, steps = 16, 32, 8, 128, 12, 16, 60
    dtype = torch.bfloat16
    max_blocks = (40 + steps) // bs + 2
    cs = reference.rope_cache(512, dim).to(DEV)
    base = new_state(rows, hkv, dim, rows * hkv * max_blocks, bs, window, max_blocks, dtype, DEV,
                     gen)
    _prefill_rows([base], rows, hkv, dim, dtype, gen)
    graph_state, eager = clone_state(base), clone_state(base)
    qn, kn = [w.to(DEV) for w in norm_weights(dim, dtype, gen)]
    b = 12
    q_s = torch.zeros(b, hq, dim, dtype=dtype, device=DEV)
    k_s = torch.zeros(b, hkv, dim, dtype=dtype, device=DEV)
    v_s = torch.zeros(b, hkv, dim, dtype=dtype, device=DEV)
    slots_s = torch.zeros(b, dtype=torch.int32, device=DEV)

    # Warm up on a throwaway state, then capture (capture records; it runs nothing).
    warm = clone_state(base)
    slots_s.copy_(torch.arange(b, dtype=torch.int32))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.decode_step(q_s.clone(), k_s, v_s, cs, slots_s, *state_args(warm), 100.0, 5.0, qn, kn)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits_s = ops.decode_step(q_s, k_s, v_s, cs, slots_s, *state_args(graph_state), 100.0,
                                   5.0, qn, kn)
    assert torch.equal(graph_state["num_tokens"], base["num_tokens"]), "capture must not run"
    for step in range(steps):
        slots = torch.randperm(rows, generator=gen)[:b].to(torch.int32).to(DEV)
        q, k, v = step_inputs(b, hq, hkv, dim, dtype, 0.5, gen, DEV)
        q_s.copy_(q)
        k_s.copy_(k)
        v_s.copy_(v)
        slots_s.copy_(slots)
        graph.replay()
        qe = q.clone()
        le = ops.decode_step(qe, k, v, cs, slots, *state_args(eager), 100.0, 5.0, qn, kn)
        assert torch.equal(q_s, qe), f"q differs at step {step}"
        assert torch.equal(logits_s, le), f"logits differ at step {step}"
        if step % 15 == 14:
            assert_logically_equal(graph_state, cpu_copy(eager), range(rows), hkv,
                                   where=f"graph vs eager, step {step}")
    torch.cuda.synchronize()


@pytest.mark.cuda
def test_cuda_decode_step_opcheck():
    gen = torch.Generator().manual_seed(6)
    rows, hq, hkv, dim = 3, 8, 2, 64
    st = new_state(rows, hkv, dim, 24, 4, 3, 8, torch.bfloat16, DEV, gen)
    q, k, v = step_inputs(2, hq, hkv, dim, torch.bfloat16, 0.5, gen, DEV)
    cs = reference.rope_cache(32, dim).to(DEV)
    slots = torch.tensor([2, 0], dtype=torch.int32, device=DEV)
    torch.library.opcheck(torch.ops.dms.decode_step.default,
                          (q, k, v, cs, slots, *state_args(st), 100.0, 5.0, None, None, 1e-6,
                           None))
