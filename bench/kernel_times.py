"""Per-kernel GPU times of single op calls (torch.profiler, CUDA activity): where a call's time
goes, kernel by kernel, e.g. an fp8-pool prefill against the same call on a bf16 pool.

  python3 bench/kernel_times.py [--lens 32768] [--crs 1 8] [--chunk 4096] [--calls 10]

Cases (Hq 32 / Hkv 8 / D 128 bf16, window 512, block 64, as bench/bench_prefill.py):
* `fp8 N CR`: the last --chunk tokens of an N-token prompt prefilled over the rest in a
  float8_e4m3fn pool (scale 1/64), against `bf16pool N CR`, the same call on a bf16 pool of the
  dequantized values (bench_prefill.py's fp8 rows);
* `fresh N CR`: the whole prompt in one sparse_prefill over an empty cache.
Each call runs --calls times after two warm-up calls; the table gives every kernel's launches
per call and mean microseconds per launch, and the call's summed kernel time. Writes
bench/results/kernel_times_<date>.md.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bench_prefill import empty_state, eviction_logits, prompt_qkv  # noqa: E402


def kernel_times(fn, calls):
    """[(kernel name, launches per call, mean us per launch)] of fn(), sorted by time per call."""
    fn()
    fn()

    def many():
        for _ in range(calls):
            fn()
    acc = common.cuda_kernel_totals(many)
    rows = [(n, c / calls, t / c) for n, (c, t) in acc.items()]
    rows.sort(key=lambda r: -r[1] * r[2])
    return rows


def short(name):
    name = name.replace("|", "/")
    return name if len(name) <= 110 else name[:107] + "..."


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lens", type=int, nargs="+", default=[32768])
    ap.add_argument("--crs", type=float, nargs="+", default=[1, 8])
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--no-fresh", action="store_true")
    ap.add_argument("--results-dir", default=common.RESULTS_DIR)
    a = ap.parse_args()
    common.require_cuda("bench/kernel_times.py")
    import dms_ext  # noqa: F401

    dtype, dev = torch.bfloat16, "cuda"
    hq, hkv, D, w, bs = 32, 8, 128, 512, 64
    scale, kvs = 1.0 / math.sqrt(D), 1.0 / 64
    i32 = dict(dtype=torch.int32, device=dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    sections = []
    for n in a.lens:
        c = min(a.chunk, n)
        h = n - c
        for cr in a.crs:
            q, k, v = prompt_qkv(n, n, hq, hkv, D, dtype, gen)
            _, lg, cr_got = eviction_logits(n, hkv, cr, w, gen)
            cases = []
            k8, v8, *meta, fs, ft = empty_state(h, hkv, w, D, torch.float8_e4m3fn, dev, bs)
            slots = torch.zeros(1, **i32)
            torch.ops.dms.append(k[:h], v[:h], lg[:h], slots, torch.tensor([0, h], **i32), k8, v8,
                                 *meta, fs, ft, kvs, kvs)
            kb, vb = (k8.float() * kvs).to(dtype), (v8.float() * kvs).to(dtype)
            chunk = (q[h:].contiguous(), k[h:].contiguous(), v[h:].contiguous(), lg[h:].contiguous(), slots,
                     torch.tensor([0, c], **i32))
            cases.append((f"fp8 {n} CR {cr:g} (got {cr_got:.2f}), last {c}",
                          lambda: torch.ops.dms.sparse_prefill(*chunk, k8, v8, *meta, scale, kvs, kvs)))
            cases.append((f"bf16pool {n} CR {cr:g}, last {c}",
                          lambda: torch.ops.dms.sparse_prefill(*chunk, kb, vb, *meta, scale)))
            if not a.no_fresh:
                e8 = empty_state(n, hkv, w, D, dtype, dev, bs)
                fresh = (q, k, v, lg, slots, torch.tensor([0, n], **i32))
                cases.append((f"fresh {n} CR {cr:g}",
                              lambda: torch.ops.dms.sparse_prefill(*fresh, *e8[:2], *e8[2:-2], scale)))
            for label, fn in cases:
                rows = kernel_times(fn, a.calls)
                tot = sum(r[1] * r[2] for r in rows)
                print(f"{label}: {tot:.1f} us of kernels per call", flush=True)
                for r in rows:
                    print(f"  {r[1]:.2f} x {r[2]:8.1f} us  {short(r[0])}", flush=True)
                sections.append(f"{label}: {tot:.1f} us of kernel time per call\n\n" + common.md_table(
                    ["kernel", "launches per call", "us per launch", "us per call"],
                    [[short(r[0]), round(r[1], 2), round(r[2], 1), round(r[1] * r[2], 1)] for r in rows]))
            del k8, v8, kb, vb, q, k, v
            torch.cuda.empty_cache()
    body = (f"Per-kernel GPU time (torch.profiler, CUDA activity), mean over {a.calls} calls after two "
            f"warm-up calls; Hq {hq}, Hkv {hkv}, D {D}, bf16, window {w}, block {bs}.\n\n" + "\n\n".join(sections))
    path = common.write_results("kernel_times", "sparse_prefill: per-kernel times of single calls", body,
                                a.results_dir)
    print("wrote", path)


if __name__ == "__main__":
    main()
