"""Runs every dms CUDA kernel on small cases, edge cases included, for compute-sanitizer
(bench/sanitize.sh runs it under memcheck, racecheck, initcheck and synccheck):

  sparse_decode / sparse_decode_lse (main + split-KV merge kernels): head_dim 64/128/256, GQA
    groups 1/3/8, empty heads, one long head (many splits), a full block table, > 992 rows,
    a misaligned q view, an empty batch
  eviction_rope: T 0/1/37, head_dim 40/64/128/256, norms on and off, int32 / int64 positions
  append (decode and chunk kernels): one-token steps, chunks across blocks, a 2048-token chunk
    (1024-thread CTAs), block size 1, window 1, head_dim 36 (no 16-byte path), a pool that runs
    dry on the device (error path)
  sparse_prefill (prepare + attention kernels): chunks 1/3/17/130/200/500/700 over history, windows 1/16/100, D 64/128/256,
    block sizes 1/16, groups 1/5/2
  fork / release, decode_step (borrowed and adapter logits, norms, head_dim 40/64/128/256,
    batch 1..64, block size 1), and DMSCache: prefill, decode, fork, release, and a CUDA graph of
    a decode step (prepare_decode / advance / replay; only with the caching allocator on)
  fp8: e4m3 pools through append (saturating), sparse_prefill, sparse_decode(_lse), fork
  graph: decode_step + sparse_decode_lse captured in one CUDA graph, replayed with fresh inputs
    (only with the caching allocator on: `sanitize.sh memcheck-graph`)

Every tensor a kernel reads is initialised (initcheck), outputs are allocated by the ops. Light
checks against the CPU twins make sure each kernel really ran. Prints one line per group and
`SANITIZE_DRIVER: <n> cases ok` last; exits 1 if a check failed.

  python bench/sanitize_driver.py [--quick] [--only decode,rope,...]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import dms_ext  # noqa: F401
from dms_ext import ops, reference
from dms_ext.cache import DMSCache

DEV = "cuda"  # --device cpu: a dry run of the same cases on the CPU twins (checks this script)
BF16, F16 = torch.bfloat16, torch.float16
GEN = torch.Generator().manual_seed(0)
CASES = [0]
FAILS = []


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def rnd(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=GEN) * scale).to(DEV, dtype)


def i32(x):
    return torch.tensor(x, dtype=torch.int32, device=DEV)


def check(ok: bool, what: str):
    if not ok:
        FAILS.append(what)
        print(f"CHECK FAILED: {what}", flush=True)


def logits(n, hkv, rate=0.5):
    mag = torch.rand(n, hkv, generator=GEN) * 4 + 0.05
    return torch.where(torch.rand(n, hkv, generator=GEN) < rate, mag, -mag).to(DEV)


# ------------------------------------------------------------------------------ sparse_decode

def decode_case(lens, G, D, bs, dtype, strided=False):
    B, hkv = lens.shape
    M = max(1, -(-int(lens.max()) // bs)) if lens.numel() else 1
    nb = B * hkv * M + 1
    bt = torch.randperm(nb, generator=GEN)[: B * hkv * M].reshape(B, hkv, M).to(torch.int32)
    kc, vc = rnd(nb, bs, D, dtype=dtype), rnd(nb, bs, D, dtype=dtype)
    if strided:
        wide = rnd(B, hkv * G, D + 8, dtype=dtype)
        q = wide[..., 3:3 + D]                  # odd offset: the op copies it to align
    else:
        q = rnd(B, hkv * G, D, dtype=dtype)
    args = (q, kc, vc, bt.to(DEV), lens.to(DEV))
    out = ops.sparse_decode(*args)
    out2, lse = ops.sparse_decode_lse(*args)
    sync()
    CASES[0] += 1
    if B and lens.numel() and int(lens.sum()) < 20000:
        ref = ops.sparse_decode(*(a.cpu().float() if a.is_floating_point() else a.cpu() for a in args))
        err = (out.float().cpu() - ref).abs().max().item()
        check(err < 0.05 * max(1.0, ref.abs().max().item()), f"sparse_decode {list(lens.shape)} G{G} D{D}: err {err}")
        check(torch.equal(out, out2), "sparse_decode vs sparse_decode_lse")


def group_decode(quick):
    dts = [BF16, F16]
    for i, (D, G) in enumerate([(64, 1), (128, 3), (256, 8), (128, 1)] + ([] if quick else [(64, 8), (256, 3)])):
        lens = torch.tensor([[0, 1], [15, 16], [17, 100]], dtype=torch.int32)
        decode_case(lens, G, D, 16, dts[i % 2])
    decode_case(torch.tensor([[3000], [0]], dtype=torch.int32), 4, 128, 64, BF16)  # split-KV + merge
    decode_case(torch.tensor([[64 * 4, 5]], dtype=torch.int32), 2, 64, 64, F16)   # full table
    decode_case(torch.zeros(2, 2, dtype=torch.int32), 2, 64, 16, BF16)             # all empty
    decode_case(torch.zeros(0, 2, dtype=torch.int32), 2, 64, 16, BF16)             # empty batch
    decode_case(torch.randint(0, 4, (1000, 1), generator=GEN, dtype=torch.int32), 1, 64, 16, BF16)
    decode_case(torch.randint(0, 40, (225, 2), generator=GEN, dtype=torch.int32), 2, 128, 16, F16)  # 450 rows: 4 per scan thread
    decode_case(torch.tensor([[5, 40]], dtype=torch.int32), 3, 128, 32, BF16, strided=True)


# ------------------------------------------------------------------------------ eviction_rope

def group_rope(quick):
    for T, D, norm, dt, pdt in [(0, 64, False, BF16, torch.int64), (1, 128, True, F16, torch.int32),
                                (37, 40, True, BF16, torch.int64), (37, 256, False, F16, torch.int64),
                                (5, 64, True, BF16, torch.int32)][: 3 if quick else None]:
        hkv, G = 2, 3
        q, k = rnd(T, hkv * G, D, dtype=dt), rnd(T, hkv, D, dtype=dt)
        cs = reference.rope_cache(64, D).to(DEV)
        pos = torch.randint(0, 64, (T,), generator=GEN).to(DEV, pdt)
        w = (torch.rand(D, generator=GEN) + 0.5).to(DEV, dt) if norm else None
        q_cpu, k_cpu = q.cpu().float(), k.cpu().float()
        lg = ops.eviction_rope(q, k, pos, cs, 100.0, 5.0, w, w)
        sync()
        CASES[0] += 1
        lg_cpu = ops.eviction_rope(q_cpu, k_cpu, pos.cpu(), cs.cpu(), 100.0, 5.0,
                                   None if w is None else w.cpu().float(),
                                   None if w is None else w.cpu().float())
        check(torch.allclose(lg.cpu(), lg_cpu, rtol=2e-2, atol=0.5), f"eviction_rope T{T} D{D}: logits")


# ------------------------------------------------------------------------------ state ops

def new_state(S, hkv, D, nb, bs, window, M, dtype):
    return dict(k_cache=rnd(nb, bs, D, dtype=dtype), v_cache=rnd(nb, bs, D, dtype=dtype),
                block_table=torch.full((S, hkv, M), -1, dtype=torch.int32, device=DEV),
                seq_lens=torch.zeros(S, hkv, dtype=torch.int32, device=DEV),
                ring=torch.zeros(S, hkv, window + 1, dtype=torch.int32, device=DEV),
                num_tokens=torch.zeros(S, dtype=torch.int32, device=DEV),
                free_stack=torch.randperm(nb, generator=GEN).to(DEV, torch.int32),
                free_top=i32([nb]))


KEYS = ("k_cache", "v_cache", "block_table", "seq_lens", "ring", "num_tokens", "free_stack", "free_top")


def st_args(st):
    return [st[k] for k in KEYS]


def cpu_twin(st):
    return {k: (v.cpu().float() if v.is_floating_point() else v.cpu()).clone() for k, v in st.items()}


def same_counts(a, b, what):
    for k in ("seq_lens", "num_tokens", "free_top"):
        check(torch.equal(a[k].cpu(), b[k].cpu()), f"{what}: {k} differs from the CPU twin")


def append_both(st, cpu, rows, lens, hkv, D, dtype, rate=0.5):
    T = sum(lens)
    k, v, lg = rnd(T, hkv, D, dtype=dtype), rnd(T, hkv, D, dtype=dtype), logits(T, hkv, rate)
    cu = i32([0] + list(torch.tensor(lens).cumsum(0)))
    ops.append(k, v, lg, i32(rows), cu, *st_args(st))
    ops.append(k.cpu().float(), v.cpu().float(), lg.cpu(), i32(rows).cpu(), cu.cpu(), *st_args(cpu))
    CASES[0] += 1


def group_append(quick):
    for hkv, D, bs, w, dt, chunks in [(2, 64, 16, 3, BF16, [[1, 17, 300], [1, 1, 1], [40, 2, 1]]),
                                       (1, 36, 1, 1, F16, [[5, 9], [1, 1], [3, 2]]),
                                       (3, 128, 16, 64, BF16, [[2048], [1], [100]])][: 2 if quick else None]:
        S = len(chunks[0])
        total = [sum(c[i] for c in chunks if i < len(c)) for i in range(S)]
        M = -(-max(total) // bs) + 1
        st = new_state(S, hkv, D, S * hkv * M, bs, w, M, dt)
        cpu = cpu_twin(st)
        for c in chunks:
            rows = list(range(len(c)))
            append_both(st, cpu, rows, c, hkv, D, dt)
        sync()
        same_counts(st, cpu, f"append hkv{hkv} D{D} bs{bs} w{w}")
    # A pool that runs dry on the device: the kernel reports it and must stay in bounds.
    st = new_state(2, 2, 64, 3, 16, 2, 8, BF16)
    k, v = rnd(100, 2, 64, dtype=BF16), rnd(100, 2, 64, dtype=BF16)
    try:
        ops.append(k, v, logits(100, 2, 0.0), i32([0, 1]), i32([0, 50, 100]), *st_args(st))
    except RuntimeError as e:  # the CPU twin checks up front and raises; CUDA reports on device
        check(DEV == "cpu" and "out of blocks" in str(e), f"append on a dry pool: {e}")
    sync()
    CASES[0] += 1


def group_prefill(quick):
    for hkv, G, D, bs, w, dt, hist, chunks in [
            (2, 1, 64, 16, 16, BF16, [40, 0], [17, 200]),
            (1, 5, 128, 1, 1, F16, [40, 3], [1, 17]),
            (2, 3, 64, 16, 100, BF16, [150, 20], [200, 1]),
            (2, 2, 256, 16, 16, F16, [40, 3], [3, 130]),
            # D 256 on the wgmma kernel: cached tiles by TMA (blocks of 64), long chunks whose
            # kept lists are compacted, a fresh prompt beside a later turn.
            (2, 4, 256, 64, 16, BF16, [300, 0], [700, 500])][: 2 if quick else None]:
        S = len(hist)
        M = -(-max(h + c for h, c in zip(hist, chunks)) // bs) + 1
        st = new_state(S, hkv, D, S * hkv * M, bs, w, M, dt)
        rows = [r for r in range(S) if hist[r]]
        if rows:
            append_both(st, cpu_twin(st), rows, [hist[r] for r in rows], hkv, D, dt)
        T = sum(chunks)
        q, k, v = rnd(T, hkv * G, D, dtype=dt), rnd(T, hkv, D, dtype=dt), rnd(T, hkv, D, dtype=dt)
        lg = logits(T, hkv)
        cu = i32([0] + list(torch.tensor(chunks).cumsum(0)))
        out = ops.sparse_prefill(q, k, v, lg, i32(list(range(S))), cu, st["k_cache"], st["v_cache"],
                                 st["block_table"], st["seq_lens"], st["ring"], st["num_tokens"])
        sync()
        CASES[0] += 1
        cpu = cpu_twin(st)
        ref = ops.sparse_prefill(q.cpu().float(), k.cpu().float(), v.cpu().float(), lg.cpu(),
                                 i32(list(range(S))).cpu(), cu.cpu(), cpu["k_cache"], cpu["v_cache"],
                                 cpu["block_table"], cpu["seq_lens"], cpu["ring"], cpu["num_tokens"])
        err = (out.float().cpu() - ref).abs().max().item()
        check(err < 0.05 * max(1.0, ref.abs().max().item()), f"sparse_prefill D{D} w{w}: err {err}")


def group_fork_release(quick):
    hkv, D, bs, w = 2, 64, 16, 4
    st = new_state(3, hkv, D, 40, bs, w, 8, BF16)
    cpu = cpu_twin(st)
    append_both(st, cpu, [0], [45], hkv, D, BF16, rate=0.2)
    ops.fork(0, 2, *st_args(st))
    ops.fork(0, 2, *st_args(cpu))
    CASES[0] += 1
    for s in (st, cpu):
        ops.release(0, s["block_table"], s["seq_lens"], s["ring"], s["num_tokens"], s["free_stack"],
                    s["free_top"], bs)
    CASES[0] += 1
    sync()
    same_counts(st, cpu, "fork + release")


def group_decode_step(quick):
    for B, hkv, G, D, bs, norm, adapter, dt in [(1, 2, 3, 64, 16, True, False, BF16),
                                                (5, 1, 1, 40, 1, False, True, F16),
                                                (64, 4, 2, 128, 16, True, True, BF16),
                                                (3, 2, 4, 256, 32, False, False, F16)][: 2 if quick else None]:
        w, steps = 3, 6
        M = -(-(steps + 10) // bs) + 1
        st = new_state(B, hkv, D, B * hkv * M, bs, w, M, dt)
        cpu = cpu_twin(st)
        append_both(st, cpu, list(range(B)), [10] * B, hkv, D, dt)
        cs = reference.rope_cache(64, D).to(DEV)
        wq = (torch.rand(D, generator=GEN) + 0.5).to(DEV, dt) if norm else None
        for _ in range(steps):
            q, k, v = rnd(B, hkv * G, D, dtype=dt), rnd(B, hkv, D, dtype=dt), rnd(B, hkv, D, dtype=dt)
            lg = logits(B, hkv) if adapter else None
            slots = i32(torch.randperm(B, generator=GEN).tolist())
            ops.decode_step(q, k, v, cs, slots, *st_args(st), 100.0, 5.0, wq, wq, 1e-6, lg)
            if adapter:  # identical decisions on the CPU twin, so the counts must agree
                ops.decode_step(q.cpu().float(), k.cpu().float(), v.cpu().float(), cs.cpu(), slots.cpu(),
                                *st_args(cpu), 100.0, 5.0, None if wq is None else wq.cpu().float(),
                                None if wq is None else wq.cpu().float(), 1e-6, lg.cpu())
            CASES[0] += 1
        sync()
        if adapter:
            same_counts(st, cpu, f"decode_step B{B} D{D}")


def group_cache(quick):
    c = DMSCache(2, 2, 64, window=4, block_size=16, num_blocks=64, max_seqs=4, dtype=BF16, device=DEV)
    a, b = c.add_sequence(), c.add_sequence()

    def step(sids, lens):
        T = sum(lens)
        cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        for layer in range(2):
            c.attend(layer, sids, cu, rnd(T, 6, 64, dtype=BF16), rnd(T, 2, 64, dtype=BF16),
                     rnd(T, 2, 64, dtype=BF16), logits(T, 2))
        CASES[0] += 1

    step([a, b], [30, 7])
    for _ in range(3):
        step([a, b], [1, 1])
    f = c.fork(a)
    step([f, b], [1, 5])
    c.release(b)
    if DEV != "cuda":
        return
    if os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING", "0") != "0":
        # Without the caching allocator a capture would cudaMalloc (not capturable) and free
        # its temporaries while the graph still uses them: `sanitize.sh memcheck-graph` runs
        # this part with the allocator on.
        print("cache: CUDA graph part skipped (PYTORCH_NO_CUDA_MEMORY_CACHING=1)", flush=True)
        return
    # One CUDA graph of a decode step, replayed.
    sids = [a, f]
    q, k, v = rnd(2, 6, 64, dtype=BF16), rnd(2, 2, 64, dtype=BF16), rnd(2, 2, 64, dtype=BF16)
    lg = logits(2, 2)
    cu = torch.arange(3, dtype=torch.int32, device=DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for layer in range(2):
            c.attend(layer, sids, cu, q, k, v, lg)
    torch.cuda.current_stream().wait_stream(side)
    plan = c.prepare_decode(sids, steps=4)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for layer in range(2):
            c.attend(layer, sids, cu, q, k, v, lg)
    for _ in range(3):
        plan.advance()
        q.copy_(rnd(2, 6, 64, dtype=BF16))
        g.replay()
        CASES[0] += 1
    sync()
    plan.close()
    for s in list(c.seq_ids):
        c.release(s)
    check(c.num_free_blocks == 2 * 64, "DMSCache: blocks leaked")


def group_graph(quick):
    """sparse_decode + decode_step captured in one CUDA graph and replayed with fresh inputs
    (the captured path: `sanitize.sh memcheck-graph`, caching allocator on)."""
    if DEV != "cuda":
        return
    if os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING", "0") != "0":
        print("graph: skipped (PYTORCH_NO_CUDA_MEMORY_CACHING=1; run by memcheck-graph)", flush=True)
        return
    for B, hkv, G, D, bs, dt in [(4, 2, 3, 128, 16, BF16), (3, 1, 5, 64, 32, F16)][: 1 if quick else None]:
        w, M = 4, 8
        st = new_state(B, hkv, D, B * hkv * M, bs, w, M, dt)
        append_both(st, cpu_twin(st), list(range(B)), [5 + 17 * i for i in range(B)], hkv, D, dt)
        cs = reference.rope_cache(256, D).to(DEV)
        q, k, v = rnd(B, hkv * G, D, dtype=dt), rnd(B, hkv, D, dtype=dt), rnd(B, hkv, D, dtype=dt)
        slots = i32(list(range(B)))
        warm = {key: t.clone() for key, t in st.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            ops.decode_step(q.clone(), k, v, cs, slots, *st_args(warm), 100.0, 5.0)
            ops.sparse_decode_lse(q, warm["k_cache"], warm["v_cache"], warm["block_table"], warm["seq_lens"])
        torch.cuda.current_stream().wait_stream(side)
        sync()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            ops.decode_step(q, k, v, cs, slots, *st_args(st), 100.0, 5.0)
            out, lse = ops.sparse_decode_lse(q, st["k_cache"], st["v_cache"], st["block_table"],
                                             st["seq_lens"])
        for _ in range(3 if quick else 6):
            q.copy_(rnd(B, hkv * G, D, dtype=dt))
            k.copy_(rnd(B, hkv, D, dtype=dt))
            v.copy_(rnd(B, hkv, D, dtype=dt))
            out.fill_(float("nan"))
            g.replay()
            sync()
            CASES[0] += 1
            check(bool(torch.isfinite(out).all()), f"graph B{B} D{D}: output not written")
        check(int(st["num_tokens"][0]) == 5 + (3 if quick else 6), f"graph B{B} D{D}: replays did not step")


def group_fp8(quick):
    """fp8 e4m3 pools: append (one-token and chunk kernels, saturating stores), sparse_prefill
    over the pool (the fp8 loader), sparse_decode(_lse) (fp8 slices, D 64 / 128 / 256), fork."""
    F8 = torch.float8_e4m3fn
    for hkv, G, D, bs, w, dt in [(2, 4, 128, 16, 16, BF16), (1, 3, 64, 1, 4, F16),
                                 (2, 2, 256, 16, 8, BF16)][: 2 if quick else None]:
        S, ks, vs = 3, 0.05, 0.5    # rows 0, 1 filled, row 2 empty (an empty head; fork's dst)
        M = -(-300 // bs) + 2
        st = new_state(S, hkv, D, S * hkv * M, bs, w, M, dt)
        st["k_cache"], st["v_cache"] = st["k_cache"].to(F8), st["v_cache"].to(F8)
        for lens in ([150, 40], [1, 1], [60, 1]):
            T = sum(lens)
            k, v = rnd(T, hkv, D, dtype=dt, scale=20.0), rnd(T, hkv, D, dtype=dt)  # k saturates
            cu = i32([0] + list(torch.tensor(lens).cumsum(0)))
            lg = logits(T, hkv)
            q = rnd(T, hkv * G, D, dtype=dt)
            out = ops.sparse_prefill(q, k, v, lg, i32([0, 1]), cu, st["k_cache"], st["v_cache"],
                                     st["block_table"], st["seq_lens"], st["ring"], st["num_tokens"],
                                     k_scale=ks, v_scale=vs)
            sync()
            check(bool(torch.isfinite(out.float()).all()), f"fp8 sparse_prefill D{D}: non-finite output")
            ops.append(k, v, lg, i32([0, 1]), cu, *st_args(st), k_scale=ks, v_scale=vs)
            sync()
            CASES[0] += 1
        qd = rnd(S, hkv * G, D, dtype=dt)
        args = (qd, st["k_cache"], st["v_cache"], st["block_table"], st["seq_lens"])
        out = ops.sparse_decode(*args, k_scale=ks, v_scale=vs)
        out2, _ = ops.sparse_decode_lse(*args, k_scale=ks, v_scale=vs)
        sync()
        CASES[0] += 1
        ref = ops.sparse_decode(qd.cpu().float(), st["k_cache"].cpu(), st["v_cache"].cpu(),
                                st["block_table"].cpu(), st["seq_lens"].cpu(), k_scale=ks, v_scale=vs)
        err = (out.float().cpu() - ref).abs().max().item()
        check(err < 0.05 * max(1.0, ref.abs().max().item()), f"fp8 sparse_decode D{D}: err {err}")
        check(torch.equal(out, out2), "fp8 sparse_decode vs sparse_decode_lse")
        ops.fork(0, 2, *st_args(st))
        sync()
        CASES[0] += 1


GROUPS = dict(decode=group_decode, rope=group_rope, append=group_append, prefill=group_prefill,
              fork_release=group_fork_release, decode_step=group_decode_step, cache=group_cache,
              graph=group_graph, fp8=group_fp8)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer configurations per group")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--only", default="", help="comma-separated groups: " + ",".join(GROUPS))
    a = ap.parse_args(argv)
    global DEV
    DEV = a.device
    if DEV == "cuda" and not torch.cuda.is_available():
        print("SANITIZE_DRIVER: no CUDA device")
        return 2
    only = [g for g in a.only.split(",") if g] or list(GROUPS)
    for name in only:
        t0, n0 = time.time(), CASES[0]
        try:
            GROUPS[name](a.quick)
        except Exception as e:  # one broken group must not hide the others from the sanitizer
            check(False, f"group {name} raised {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        print(f"group {name}: {CASES[0] - n0} cases, {time.time() - t0:.1f} s", flush=True)
    status = "ok" if not FAILS else f"{len(FAILS)} checks FAILED"
    print(f"SANITIZE_DRIVER: {CASES[0]} cases {status}", flush=True)
    return 0 if not FAILS else 1


if __name__ == "__main__":
    sys.exit(main())
