"""The fused DMS decode step (torch.ops.dms.decode_step) vs the same work as separate ops.

Per decode step and layer, for B sequences (Hq 32, Hkv 8, D 128, bf16, window 512, block 64,
every sequence already holding 1024 tokens): per-head q/k RMSNorm (Qwen3), the borrowed-neuron
eviction logit, zeroing of that channel, rotate-half RoPE of q and k, the ring bookkeeping
(flag the previous token, reuse the slot of a flagged token leaving the window or append and
pop a block), and the K/V write into the paged cache. Rows:

  fused          dms.decode_step: one kernel
  ours, 2 ops    dms.eviction_rope + dms.append (q/k roped in place, then the bookkeeping)
  torch ops      the same step written with torch ops, as NVIDIA's DMS code does it: norm,
                 logit slice, zeroing, RoPE, index math and scatter into the cache (no host
                 sync, so it captures in a graph too)

Timing: CUDA-graph replay of back-to-back steps, median per step (bench/common.time_calls).
A second table times dms.append on prefill chunks (K/V bytes written per second). Before
timing, one step of each variant runs from the same state and the states are compared.

  python3 bench/bench_step.py            # both tables, writes bench/results/step_<date>.md
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

HQ, HKV, D, WINDOW, BS, CTX = 32, 8, 128, 512, 64, 1024
ALPHA_SCALE, ALPHA_OFFSET, EPS = 100.0, 5.0, 1e-6
# Steps a measurement may take (warm-up, capture, replays): positions and blocks for them.
STEP_MARGIN = 4096


def make_state(b, dtype, gen, ctx=CTX, margin=STEP_MARGIN):
    """B rows holding `ctx` tokens each (one append of random K/V and logits), room for
    `margin` more tokens per row."""
    max_blocks = (ctx + margin) // BS + 2
    nb = b * HKV * max_blocks
    dev = "cuda"
    st = dict(
        k_cache=torch.empty(nb, BS, D, dtype=dtype, device=dev),
        v_cache=torch.empty(nb, BS, D, dtype=dtype, device=dev),
        block_table=torch.full((b, HKV, max_blocks), -1, dtype=torch.int32, device=dev),
        seq_lens=torch.zeros(b, HKV, dtype=torch.int32, device=dev),
        ring=torch.zeros(b, HKV, WINDOW + 1, dtype=torch.int32, device=dev),
        num_tokens=torch.zeros(b, dtype=torch.int32, device=dev),
        free_stack=torch.randperm(nb, generator=gen).to(torch.int32).to(dev),
        free_top=torch.tensor([nb], dtype=torch.int32, device=dev),
    )
    t = b * ctx
    k = torch.randn(t, HKV, D, device=dev, dtype=dtype)
    v = torch.randn(t, HKV, D, device=dev, dtype=dtype)
    logits = torch.randn(t, HKV, device=dev)
    slots = torch.arange(b, dtype=torch.int32, device=dev)
    cu = torch.arange(0, t + 1, ctx, dtype=torch.int32, device=dev)
    torch.ops.dms.append(k, v, logits, slots, cu, *state_args(st))
    return st


KEYS = ("k_cache", "v_cache", "block_table", "seq_lens", "ring", "num_tokens", "free_stack",
        "free_top")


def state_args(st):
    return [st[k] for k in KEYS]


def clone(st):
    return {k: v.clone() for k, v in st.items()}


# ---------------------------------------------------------------------------------------------
# The step as separate torch ops.

def rms_norm(x, w, eps=EPS):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


def torch_step(q, k, v, cs, slots, st, qn, kn):
    """Returns (q roped, logits); updates st. All on the device, no host sync."""
    group = q.shape[1] // k.shape[1]
    rows = slots.long()
    q = rms_norm(q, qn)
    k = rms_norm(k, kn)
    logits = q[:, ::group, -1].float() * ALPHA_SCALE - ALPHA_OFFSET
    q[:, ::group, -1] = 0
    t = st["num_tokens"][rows].long()                              # [B] positions
    c = cs[t]                                                      # [B, D]
    half = D // 2
    cos = torch.cat((c[:, :half], c[:, :half]), -1)[:, None, :].to(q.dtype)
    sin = torch.cat((c[:, half:], c[:, half:]), -1)[:, None, :].to(q.dtype)
    q = rope(q, cos, sin)
    k = rope(k, cos, sin)
    q[:, ::group, -1] = 0

    ring, r = st["ring"], WINDOW + 1
    heads = torch.arange(HKV, device=q.device)
    ri, hi = rows[:, None], heads[None, :]
    # d_{t-1} = logit_t > 0 into the entry of token t-1 (rows with t >= 1).
    prev = ((t - 1) % r)[:, None].expand(-1, HKV)
    e = ring[ri, hi, prev]
    flagged = (e & ~1) | (logits > 0).int()
    ring[ri, hi, prev] = torch.where((t >= 1)[:, None], flagged, e)
    # Token t-(w+1) leaving the window: reuse its slot if flagged, else append.
    cur = (t % r)[:, None].expand(-1, HKV)
    old = ring[ri, hi, cur]
    reuse = (t >= r)[:, None] & ((old & 1) == 1)
    lens = st["seq_lens"][ri, hi]
    slot = torch.where(reuse, old >> 1, lens)
    st["seq_lens"][ri, hi] = lens + (~reuse).int()
    need = (~reuse) & (lens % BS == 0)
    rank = need.flatten().int().cumsum(0).view_as(need) - 1
    top = st["free_top"]
    idx = (top - 1 - rank).clamp(min=0).long()
    popped = st["free_stack"][idx]
    bt = st["block_table"]
    col = (slot // BS).long()
    bt[ri, hi, col] = torch.where(need, popped, bt[ri, hi, col])
    top.sub_(need.sum().int())
    dest = (bt[ri, hi, col].long() * BS + (slot % BS).long()).flatten()
    st["k_cache"].view(-1, D).index_copy_(0, dest, k.reshape(-1, D))
    st["v_cache"].view(-1, D).index_copy_(0, dest, v.reshape(-1, D))
    ring[ri, hi, cur] = slot << 1
    st["num_tokens"].index_add_(0, rows, torch.ones_like(slots))
    return q, logits


def ours_two_ops(q, k, v, cs, slots, st, qn, kn, cu):
    pos = st["num_tokens"][slots.long()]
    logits = torch.ops.dms.eviction_rope(q, k, pos, cs, ALPHA_SCALE, ALPHA_OFFSET, qn, kn, EPS)
    torch.ops.dms.append(k, v, logits, slots, cu, *state_args(st))
    return q, logits


def fused(q, k, v, cs, slots, st, qn, kn):
    logits = torch.ops.dms.decode_step(q, k, v, cs, slots, *state_args(st), ALPHA_SCALE,
                                       ALPHA_OFFSET, qn, kn, EPS, None)
    return q, logits


# ---------------------------------------------------------------------------------------------

def check_agreement(b, dtype, gen):
    """One step of each variant from the same state: same bookkeeping (seq_lens, num_tokens,
    ring) and close q / logits. Guards the comparison against a baseline that does less."""
    st0 = make_state(b, dtype, gen, ctx=WINDOW + 37, margin=64)
    cs = cos_sin(WINDOW + 200)
    q, k, v, qn, kn, slots, cu = step_inputs(b, dtype, gen)
    # Donor channels far from the decision threshold: torch's bf16 norm rounds before the
    # logit is read, which may flip a decision that sits on the threshold.
    sign = torch.where(torch.rand(b, HKV, device="cuda") < 0.5, 1.0, -1.0)
    q[:, :: HQ // HKV, -1] = (4.0 * sign).to(dtype)
    outs = {}
    for name, fn in (("fused", lambda s: fused(q.clone(), k, v, cs, slots, s, qn, kn)),
                     ("two", lambda s: ours_two_ops(q.clone(), k.clone(), v, cs, slots, s, qn, kn, cu)),
                     ("torch", lambda s: torch_step(q.clone(), k, v, cs, slots, s, qn, kn))):
        s = clone(st0)
        qo, lo = fn(s)
        outs[name] = (qo, lo, s)
    ref_q, ref_l, ref_s = outs["fused"]
    problems = []
    for name in ("two", "torch"):
        qo, lo, s = outs[name]
        for key in ("seq_lens", "num_tokens", "ring", "free_top"):
            if not torch.equal(s[key], ref_s[key]):
                problems.append(f"{name}: {key} differs from fused")
        # Loose bounds: the torch variant rounds to bf16 after every op (as model code does).
        if not bool(((lo - ref_l).abs() <= 0.02 * ref_l.abs() + 0.5).all()):
            problems.append(f"{name}: logits differ by {(lo - ref_l).abs().max().item():.3g}")
        dq = (qo.float() - ref_q.float()).abs()
        if not bool((dq <= 0.05 * ref_q.float().abs() + 0.05).all()):
            problems.append(f"{name}: q differs by {dq.max().item():.3g}")
    return problems


def step_inputs(b, dtype, gen):
    """q, k, v of one decode step, q / k norm weights, the batch's state rows, cu_seqlens."""
    q = torch.randn(b, HQ, D, device="cuda", dtype=dtype)
    k = torch.randn(b, HKV, D, device="cuda", dtype=dtype)
    v = torch.randn(b, HKV, D, device="cuda", dtype=dtype)
    qn = (torch.rand(D, device="cuda") + 0.5).to(dtype)
    kn = (torch.rand(D, device="cuda") + 0.5).to(dtype)
    slots = torch.randperm(b, generator=gen).to(torch.int32).cuda()
    cu = torch.arange(b + 1, dtype=torch.int32, device="cuda")
    return q, k, v, qn, kn, slots, cu


def cos_sin(max_pos):
    from dms_ext.reference import rope_cache
    return rope_cache(max_pos, D, 10000.0).cuda()


def bench_decode(b, dtype, gen, target_s):
    cs = cos_sin(CTX + STEP_MARGIN + 8)
    q0, k, v, qn, kn, slots, cu = step_inputs(b, dtype, gen)
    q, kk = q0.clone(), k.clone()
    res = {}
    base = make_state(b, dtype, gen)
    variants = (
        ("fused", lambda s: fused(q, k, v, cs, slots, s, qn, kn)),
        ("two ops", lambda s: ours_two_ops(q, kk, v, cs, slots, s, qn, kn, cu)),
        ("torch ops", lambda s: torch_step(q0, k, v, cs, slots, s, qn, kn)),
    )
    for name, fn in variants:
        s = clone(base)
        res[name] = common.time_calls([lambda s=s, fn=fn: fn(s)], f"step/{name}/B{b}",
                                      target_s=target_s, max_replays=200)
        used = int(s["num_tokens"].max().item()) - CTX
        assert used <= STEP_MARGIN, f"{name}: {used} steps ran, more than the margin"
        del s
    del base
    torch.cuda.empty_cache()
    return res


def bench_prefill_append(b, chunk, dtype, gen, target_s):
    """append of B chunks of `chunk` tokens onto rows already holding CTX tokens."""
    copies = 3
    st = make_state(b, dtype, gen, ctx=CTX, margin=chunk * (copies * 8 + 8))
    t = b * chunk
    ks = [torch.randn(t, HKV, D, device="cuda", dtype=dtype) for _ in range(copies)]
    vs = [torch.randn(t, HKV, D, device="cuda", dtype=dtype) for _ in range(copies)]
    ls = [torch.randn(t, HKV, device="cuda") for _ in range(copies)]
    slots = torch.arange(b, dtype=torch.int32, device="cuda")
    cu = torch.arange(0, t + 1, chunk, dtype=torch.int32, device="cuda")
    fns = [lambda i=i: torch.ops.dms.append(ks[i], vs[i], ls[i], slots, cu, *state_args(st))
           for i in range(copies)]
    # Each call appends `chunk` tokens per row: bound the calls by the margin.
    tm = common.time_calls(fns, f"append/B{b}x{chunk}", target_s=target_s, min_calls=copies,
                           max_replays=6, min_replays=3)
    bytes_moved = 2 * 2 * t * HKV * D * ks[0].element_size()   # K and V, read + write
    del st, ks, vs, ls
    torch.cuda.empty_cache()
    return tm, bytes_moved


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,16,64,128")
    ap.add_argument("--target-s", type=float, default=0.15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-prefill", dest="prefill", action="store_false")
    ap.add_argument("--results-dir", default=common.RESULTS_DIR)
    a = ap.parse_args()

    common.require_cuda("bench_step")
    import dms_ext  # noqa: F401  registers torch.ops.dms

    t0 = time.time()
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(a.seed)
    info = common.gpu_info()
    print(f"{info['gpu']}, torch {info['torch']}, CUDA {info['cuda']}", flush=True)

    problems = check_agreement(16, dtype, gen)
    for p in problems:
        print("AGREEMENT:", p, flush=True)

    rows, speedups = [], []
    for b in [int(x) for x in a.batches.split(",") if x.strip()]:
        r = bench_decode(b, dtype, gen, a.target_s)
        f, two, tor = r["fused"], r["two ops"], r["torch ops"]
        rows.append([b, f.us, two.us, tor.us, tor.us / f.us, two.us / f.us, f.mode])
        speedups.append(f"B{b} {tor.us / f.us:.1f}x")
        print(f"B {b:4d}: fused {f}, two ops {two.us:.1f} us, torch ops {tor.us:.1f} us", flush=True)
    table = common.md_table(
        ["B", "fused (us)", "eviction_rope + append (us)", "torch ops (us)",
         "torch / fused", "2 ops / fused", "timing"], rows)

    prows = []
    if a.prefill:
        for b, chunk in ((1, 4096), (1, 16384), (16, 1024), (64, 256)):
            tm, nbytes = bench_prefill_append(b, chunk, dtype, gen, a.target_s)
            prows.append([f"{b} x {chunk}", tm.us, nbytes / (tm.us * 1e3), tm.mode])
            print(f"append {b} x {chunk}: {tm}", flush=True)
    ptable = common.md_table(["chunks", "append (us)", "K/V GB/s (read + write)", "timing"],
                             prows) if prows else "(skipped)"

    body = "\n".join([
        f"Hq {HQ}, Hkv {HKV}, D {D}, bf16, window {WINDOW}, block {BS}, {CTX} tokens per "
        f"sequence before the step, q/k RMSNorm on. Median per step over CUDA-graph replays.",
        "",
        "Agreement check (one step of each variant from the same state): "
        + ("all variants agree" if not problems else "; ".join(problems)),
        "",
        "## Decode step", "", table, "",
        "## dms.append on prefill chunks (rows already holding 1024 tokens)", "", ptable, "",
        f"wall time {time.time() - t0:.0f} s",
    ])
    path = common.write_results("step", "Fused DMS decode step vs separate ops", body,
                                a.results_dir)
    print()
    print(body)
    print(f"wrote {path}")
    print("SUMMARY: fused step vs torch ops: " + ", ".join(speedups)
          + ("" if not problems else f"; AGREEMENT PROBLEMS: {len(problems)}"))


if __name__ == "__main__":
    main()
