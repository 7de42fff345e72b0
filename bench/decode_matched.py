"""The best read any kernel in this run reaches at a CR 8 decode row's own size.

bench_decode.py's ceiling is the best bandwidth of its run, reached on gigabytes (our CR 1 kernel at
B 8 x 128k, 4.3 GB). A CR 8 row reads 10-550 MB, and a call also pays costs that do not scale with
bytes (launches, finding the work, the last CTAs, merging split rows). This bench asks what the
other readers get at the same size: for every uniform CR 8 row (and its fp8 twin, half the bytes)
it times, in one run and with bench_decode's timing (CUDA-graph replays, inputs rotated past L2,
medians):

  ours CR 8        the row itself (per-head lengths 0.5-1.5x of ctx / 8, as bench_decode.py)
  ours equal       our op with every head at the mean length (same bytes, no length skew)
  FI dense         FlashInfer 0.2.14 paged decode, B requests x Hkv heads at the mean length
                   (its own batched mode, not head-as-request), tensor cores on and off
  cuDNN dense      SDPA (cuDNN backend) over [B, Hkv, L, D] at the mean length
  torch.sum        a plain read of a flat bf16 tensor of the same bytes

"size floor" = the fastest of the last four; "% ceil" against the run's ceiling (the best bandwidth
of the run: torch.sum over 4 GiB, our CR 1 kernel at B 8 x 128k, and every row here).

    python3 bench/decode_matched.py           # writes bench/results/decode_matched_<date>.md
    python3 bench/decode_matched.py --rows "B64 x 8k" --no-flashinfer
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_decode as bd  # noqa: E402
import common  # noqa: E402

SIZES = bd._SIZES


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="", help="comma-separated substrings of row names")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--cr", type=float, default=8.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target-s", type=float, default=0.2)
    ap.add_argument("--no-flashinfer", dest="flashinfer", action="store_false")
    ap.add_argument("--no-fp8", dest="fp8", action="store_false")
    ap.add_argument("--fi-timeout", type=float, default=200.0)
    ap.add_argument("--results-dir", default=common.RESULTS_DIR)
    a = ap.parse_args()
    common.require_cuda("decode_matched")
    import dms_ext  # noqa: F401  registers torch.ops.dms
    t0 = time.time()
    dev, dt, es = "cuda", torch.bfloat16, 2
    op = torch.ops.dms.sparse_decode
    errors: list = []
    info = common.gpu_info()
    print(f"{info['gpu']}, torch {info['torch']}", flush=True)

    fi_ok, fi_note = False, "disabled (--no-flashinfer)"
    if a.flashinfer:
        import flashinfer_peer as fp
        fi_ok, fi_note = fp.ready(a.fi_timeout, head_dims=(128,), dtypes=("bf16",), tc_head_dims=(128,))
        print("FlashInfer:", fi_note, flush=True)

    def timed(fns, label):
        t = common.try_peer(lambda: common.time_calls(fns, label, target_s=a.target_s), label, errors)
        if t is not None:
            print(f"  {label:34s} {t}", flush=True)
        return t.us if t is not None else None

    ceiling = {}  # who -> GB/s
    ce = common.try_peer(common.measure_ceiling, "ceiling", errors)
    if ce:
        ceiling["torch.sum 4 GiB"] = ce.read_gbs
    # Our CR 1 kernel at B 8 x 128k, the reader that set bench_decode's ceilings.
    full = torch.full((8, 8), 131072, dtype=torch.int32)
    g_cpu, g_dev = torch.Generator().manual_seed(a.seed), torch.Generator(device=dev).manual_seed(a.seed)
    Pd = bd.Paged(full, a.block_size, 128, dt, 1, g_cpu, g_dev, device=dev)
    qd = torch.randn(8, 32, 128, device=dev, dtype=dt, generator=g_dev)
    t = timed([lambda: op(qd, Pd.k, Pd.v, Pd.tables[0], Pd.lens, 128 ** -0.5)], "ours CR 1 B8 x 128k")
    if t:
        ceiling["ours CR 1 B8 x 128k"] = bd.live_bytes(Pd.live_tokens, 128, es) / (t * 1e3)
    del Pd, qd
    torch.cuda.empty_cache()

    rows = []
    for name, B, ctx in SIZES:
        if a.rows and not any(s.strip() in name for s in a.rows.split(",")):
            continue
        for kv in (("act", "fp8") if a.fp8 else ("act",)):
            c = bd.Case(name + (" fp8" if kv == "fp8" else ""), B, ctx, kv=kv)
            g_cpu = torch.Generator().manual_seed(a.seed)
            g_dev = torch.Generator(device=dev).manual_seed(a.seed)
            lens = bd.make_lens(c, a.cr, g_cpu)
            tokens = int(lens.long().sum())
            esz = 1 if kv == "fp8" else es
            lb = bd.live_bytes(tokens, 128, esz)
            copies = common.copies_to_beat_l2(lb)
            print(f"{c.name}: {lb / 1e6:.1f} MB, {copies} copies", flush=True)
            r = {"case": c.name, "mb": lb / 1e6, "t": {}}
            P = bd.Paged(lens, a.block_size, 128, dt, copies, g_cpu, g_dev, device=dev)
            kvs = bd.pools_for(c, P)
            qs = [torch.randn(B, 32, 128, device=dev, dtype=dt, generator=g_dev) for _ in range(copies)]
            r["t"]["ours"] = timed([lambda i=i: op(qs[i], P.k, P.v, P.tables[i], P.lens, 128 ** -0.5, *kvs)
                                    for i in range(copies)], f"{c.name} ours CR 8")
            del P
            torch.cuda.empty_cache()
            # The same bytes as bf16 at one length per head: L bf16 tokens per (sequence, head).
            L = max(1, round(lb / (B * 8 * 2 * 128 * es)))
            mb_eq = B * 8 * L * 2 * 128 * es / 1e6
            r["L"], r["mb_eq"] = L, mb_eq
            eq = torch.full((B, 8), L, dtype=torch.int32)
            Pe = bd.Paged(eq, a.block_size, 128, dt, copies, g_cpu, g_dev, device=dev)
            r["t"]["ours_eq"] = timed([lambda i=i: op(qs[i], Pe.k, Pe.v, Pe.tables[i], Pe.lens, 128 ** -0.5)
                                       for i in range(copies)], f"{c.name} ours equal L {L}")
            del Pe
            torch.cuda.empty_cache()
            if fi_ok:
                import flashinfer_peer as fp
                pages = fp.DensePages(B, L, 8, 128, a.block_size, copies, dt, g_cpu, g_dev)
                for tc in (True, False):
                    wr = common.try_peer(lambda: pages.decoders(32, 128 ** -0.5, tc), f"FI dense tc={tc}", errors)
                    if wr:
                        r["t"][f"fi_{'tc' if tc else 'cc'}"] = timed([lambda i=i: wr[i](qs[i]) for i in range(copies)],
                                                                      f"{c.name} FI dense tc={tc}")
                    del wr
                del pages
                torch.cuda.empty_cache()
            from torch.nn.attention import SDPBackend, sdpa_kernel
            kvd = [torch.randn(2, B, 8, L, 128, device=dev, dtype=dt, generator=g_dev) for _ in range(copies)]
            kd, vd = [x[0] for x in kvd], [x[1] for x in kvd]
            qg = [q.view(B, 8, 4, 128) for q in qs]

            def dense(i):
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    return F.scaled_dot_product_attention(qg[i], kd[i], vd[i], scale=128 ** -0.5)
            r["t"]["cudnn"] = timed([lambda i=i: dense(i) for i in range(copies)], f"{c.name} cuDNN dense")
            r["t"]["sum"] = timed([lambda i=i: kvd[i].sum(dtype=torch.float32) for i in range(copies)],
                                  f"{c.name} torch.sum (K and V)")
            del kvd, kd, vd, qg, qs
            torch.cuda.empty_cache()
            rows.append(r)
            for k, v in r["t"].items():
                if v:
                    ceiling[f"{k} {c.name}"] = (r["mb"] if k == "ours" else r["mb_eq"]) * 1e6 / (v * 1e3)

    ce_gbs, ce_who = max((v, k) for k, v in ceiling.items())
    names = {"ours_eq": "ours equal", "fi_tc": "FI dense tc", "fi_cc": "FI dense cc", "cudnn": "cuDNN dense",
             "sum": "torch.sum"}
    table = []
    for r in rows:
        t = r["t"]
        cands = [(t[k], names[k]) for k in names if t.get(k)]
        fl, fl_who = min(cands) if cands else (None, "-")
        ours = t.get("ours")
        gbs = r["mb"] * 1e3 / ours if ours else None
        fl_gbs = r["mb_eq"] * 1e3 / fl if fl else None

        def f(x, p=1):
            return "-" if x is None else f"{x:.{p}f}"
        table.append([r["case"], f(r["mb"]), r["L"], f(ours), f(gbs, 0), f(100 * gbs / ce_gbs if gbs else None),
                      f(t.get("ours_eq")), f(t.get("fi_tc")), f(t.get("fi_cc")), f(t.get("cudnn")), f(t.get("sum")),
                      f(fl), fl_who, f(fl_gbs, 0), f(100 * fl_gbs / ce_gbs if fl_gbs else None),
                      f(fl / ours if fl and ours else None, 3)])
    body = (f"Uniform CR 8 rows of bench_decode.py (Hq 32 / Hkv 8 / D 128, q bf16, block 64; fp8 rows: e4m3 pools, "
            f"half the bytes) against readers of the same bytes at one length per (sequence, head) (L: bf16 tokens "
            f"per head). Graph replays, inputs rotated past L2, medians (us).\n\n"
            f"- ceiling (best bandwidth of this run): {ce_gbs:.0f} GB/s, {ce_who}\n"
            f"- FlashInfer: {fi_note}\n- wall time {time.time() - t0:.0f} s\n\n"
            + common.md_table(["case", "live MB", "L", "ours us", "GB/s", "% ceil", "ours equal", "FI dense tc",
                               "FI dense cc", "cuDNN dense", "torch.sum", "size floor us", "floor by",
                               "floor GB/s", "floor % ceil", "floor / ours"], table)
            + "\n\nfloor / ours > 1: our CR 8 row is faster than every reader of its bytes here.\n")
    if errors:
        body += "\nErrors:\n" + "\n".join(f"- {e}" for e in errors) + "\n"
    path = common.write_results("decode_matched", "sparse_decode against readers of the same size", body,
                                a.results_dir)
    print(body)
    print("wrote", path)


if __name__ == "__main__":
    main()
