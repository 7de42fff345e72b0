"""sparse_prefill vs its peers on the GPU: one fresh prompt (empty cache), bf16, Hq 32, Hkv 8,
D 128, window 512, prompts 4k / 16k / 32k, eviction giving CR 1 / 4 / 8.

The flag probability p is chosen so that live / total ~ 1 / CR after the last token:
live = (1 - p) (N - w - 1) + w + 1 (docs/semantics.md), so 1 - p = (N / CR - w - 1) / (N - w - 1),
clamped to [0, 1] (4k at CR 8 is slightly short of 8: the window alone is 1/8 of 4k).

Peers, measured in the same run (CUDA events, median after warm-up):
  FlexAttention   torch.compile(flex_attention) with a DMS mask_mod over the flags and a block
                  mask from create_block_mask(_compile=True) (its build is not timed; printed)
  cuDNN SDPA      dense causal (what DMS saves against), K/V pre-expanded to Hq heads
  flash SDPA      dense causal, same inputs
Extra rows (--extra, default D 64 bf16 and D 128 fp16 at 16k, CR 1 / 8) with cuDNN only.
"pairs" is the number of (query head, key) score pairs the DMS rule keeps; dense causal has
Hq N (N + 1) / 2. Sanity: at CR 1 our output is compared with cuDNN's, and at every CR with
FlexAttention's (max abs difference, bf16 both sides). Writes bench/results/prefill_<date>.md.

  python3 bench/bench_prefill.py                 # the table (~1-3 min, mostly flex compiles)
  python3 bench/bench_prefill.py --lens 4096 --crs 1 8 --no-flex
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import dms_ext  # noqa: E402,F401  (registers torch.ops.dms)
from dms_ext import reference  # noqa: E402


def flag_prob(n: int, cr: float, w: int) -> float:
    if cr <= 1 or n <= w + 1:
        return 0.0
    keep = (n / cr - w - 1) / (n - w - 1)
    return float(min(1.0, max(0.0, 1.0 - keep)))


def visible_pairs(d: torch.Tensor, w: int, group: int) -> int:
    """Score pairs the DMS rule keeps: d bool [Hkv, N] (d_j), summed over query heads."""
    hkv, n = d.shape
    t = torch.arange(n, device=d.device, dtype=torch.int64)
    window = torch.clamp(t + 1, max=w + 1).sum() * hkv
    kept = (~d).to(torch.int64).cumsum(1)                       # kept[g, j] = #kept in [0, j]
    older = kept[:, : max(0, n - w - 1)].sum()                 # query t sees kept j <= t-w-1
    return int((window + older).item()) * group


def _try(fn, label, errors):
    return common.try_peer(fn, label, errors, oom_value="OOM")


def timed(fn, name, a):
    t = common.time_calls([fn], name, min_calls=1, target_s=a.target_s, min_replays=5,
                          max_replays=40, use_graph=False)
    return t.us / 1e3  # ms


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lens", type=int, nargs="+", default=[4096, 16384, 32768])
    ap.add_argument("--crs", type=float, nargs="+", default=[1, 4, 8])
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target-s", type=float, default=0.3, help="timing seconds per measurement")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--extra", nargs="*", default=["64:bf16", "128:fp16"],
                    help="extra D:dtype configs (dtype bf16 / fp16), run at --extra-lens x "
                         "--extra-crs without peers other than cuDNN")
    ap.add_argument("--extra-lens", type=int, nargs="*", default=[16384])
    ap.add_argument("--extra-crs", type=float, nargs="*", default=[1, 8])
    ap.add_argument("--flex-budget-s", type=float, default=150.0,
                    help="skip FlexAttention once the run is this old (its compiles dominate)")
    a = ap.parse_args()
    common.require_cuda("bench_prefill")
    t_start = time.time()
    torch.backends.cuda.matmul.allow_tf32 = True
    dtype = torch.bfloat16
    hq, hkv, D, w = a.hq, a.hkv, a.dim, a.window
    G = hq // hkv
    scale = 1.0 / math.sqrt(D)
    dev = "cuda"
    errors = []
    rows = []
    print(f"{common.gpu_info()}", flush=True)

    flex = create_block_mask = None
    if not a.no_flex:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            flex = torch.compile(flex_attention, dynamic=False)
        except Exception as e:
            errors.append(f"flex import: {type(e).__name__}: {e}")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator(device=dev).manual_seed(a.seed)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    configs = [(n, D, dtype, a.crs, flex) for n in a.lens]
    for e in a.extra:
        d_s, dt_s = e.split(":")
        configs += [(n, int(d_s), dtypes[dt_s], a.extra_crs, None) for n in a.extra_lens]
    for n, D, dtype, crs, flex in configs:
        scale = 1.0 / math.sqrt(D)
        print(f"N = {n}, D {D}, {dtype}", flush=True)
        q = torch.randn(n, hq, D, device=dev, dtype=dtype, generator=gen)
        k = torch.randn(n, hkv, D, device=dev, dtype=dtype, generator=gen)
        v = torch.randn(n, hkv, D, device=dev, dtype=dtype, generator=gen)
        # Empty per-sequence state (one row): the whole prompt is the chunk.
        i32 = dict(dtype=torch.int32, device=dev)
        k_cache = torch.zeros(1, 64, D, device=dev, dtype=dtype)
        v_cache = torch.zeros_like(k_cache)
        block_table = torch.zeros(1, hkv, 1, **i32)
        seq_lens = torch.zeros(1, hkv, **i32)
        ring = torch.zeros(1, hkv, w + 1, **i32)
        num_tokens = torch.zeros(1, **i32)
        slots = torch.zeros(1, **i32)
        cu = torch.tensor([0, n], **i32)
        # SDPA layout [1, Hq, N, D] as strided views of the packed tensors; K/V expanded once.
        qs = q.view(1, n, hq, D).transpose(1, 2)
        ke = k.repeat_interleave(G, dim=1).view(1, n, hq, D).transpose(1, 2)
        ve = v.repeat_interleave(G, dim=1).view(1, n, hq, D).transpose(1, 2)
        kf = k.view(1, n, hkv, D).transpose(1, 2)
        vf = v.view(1, n, hkv, D).transpose(1, 2)

        dense = {}
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            def run_sdpa(backend=backend):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(qs, ke, ve, is_causal=True, scale=scale)
            dense[name] = _try(lambda: timed(run_sdpa, f"{n}/{name}", a), f"{n} {name}", errors)
            if name == "cudnn" and isinstance(dense[name], float):
                dense["cudnn_out"] = run_sdpa().transpose(1, 2).reshape(n, hq, D)
        flags = torch.zeros(hkv, n, dtype=torch.bool, device=dev)   # d_j, captured by mask_mod

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & ((q_idx - kv_idx <= w) | ~flags[h // G, kv_idx])

        for cr in crs:
            p = flag_prob(n, cr, w)
            lg = torch.where(torch.rand(n, hkv, device=dev, generator=gen) < p, 1.0, -1.0).float()
            d = torch.zeros(n, hkv, dtype=torch.bool, device=dev)
            d[:-1] = lg[1:] > 0
            flags.copy_(d.t())
            live = reference.live_counts(lg, w).double().mean().item()
            pairs = visible_pairs(flags, w, G)
            dense_pairs = hq * n * (n + 1) // 2
            r = {"n": n, "D": D, "dtype": str(dtype).replace("torch.", ""), "cr": cr, "p": p, "cr_got": n / live, "pair_ratio": dense_pairs / pairs,
                 "cudnn": dense.get("cudnn"), "flash": dense.get("flash")}

            def ours():
                return torch.ops.dms.sparse_prefill(q, k, v, lg, slots, cu, k_cache, v_cache,
                                                    block_table, seq_lens, ring, num_tokens, scale)
            r["ours"] = _try(lambda: timed(ours, f"{n}/cr{cr}/ours", a), f"{n} CR{cr} ours", errors)
            out = None
            if isinstance(r["ours"], float):
                out = ours()
                r["tflops"] = 4.0 * D * pairs / (r["ours"] * 1e-3) / 1e12
                if cr <= 1 and isinstance(dense.get("cudnn_out"), torch.Tensor):
                    r["err_dense"] = (out.float() - dense["cudnn_out"].float()).abs().max().item()

            if flex is not None and time.time() - t_start < a.flex_budget_s:
                def build():
                    t0 = time.time()
                    bm = create_block_mask(mask_mod, 1, hq, n, n, device=dev, _compile=True)
                    torch.cuda.synchronize()
                    return bm, time.time() - t0
                got = _try(build, f"{n} CR{cr} flex block mask", errors)
                if isinstance(got, tuple):
                    bm, build_s = got
                    r["flex_build_s"] = build_s

                    def run_flex():
                        return flex(qs, kf, vf, block_mask=bm, scale=scale, enable_gqa=True)
                    r["flex"] = _try(lambda: timed(run_flex, f"{n}/cr{cr}/flex", a), f"{n} CR{cr} flex", errors)
                    if isinstance(r["flex"], float) and out is not None:
                        fo = run_flex().transpose(1, 2).reshape(n, hq, D)
                        r["err_flex"] = (out.float() - fo.float()).abs().max().item()
                    del bm
                else:
                    r["flex"] = got
            elif flex is not None:
                r["flex"] = "skipped (time)"
            rows.append(r)
            print(f"  CR {cr}: p {p:.3f} (CR {r['cr_got']:.2f}), pairs 1/{r['pair_ratio']:.2f} of dense, "
                  f"ours {fmt(r.get('ours'))} ms, flex {fmt(r.get('flex'))} ms, cuDNN "
                  f"{fmt(r.get('cudnn'))} ms, flash {fmt(r.get('flash'))} ms, "
                  f"err vs cuDNN {fmt(r.get('err_dense'))}, vs flex {fmt(r.get('err_flex'))}", flush=True)
            del out
        del q, k, v, qs, ke, ve, kf, vf, dense
        torch.cuda.empty_cache()

    headers = ["N", "D", "dtype", "CR (got)", "flag p", "pairs vs dense", "ours ms",
               "ours TFLOP/s", "flex ms", "cuDNN ms", "flash ms", "x cuDNN", "x flex",
               "max|ours-flex|", "max|ours-cuDNN|"]
    table = []
    for r in rows:
        table.append([r["n"], r["D"], r["dtype"], f"{r['cr']:g} ({r['cr_got']:.2f})", r["p"], f"1/{r['pair_ratio']:.2f}",
                      cell(r.get("ours")), r.get("tflops"), cell(r.get("flex")), cell(r.get("cudnn")),
                      cell(r.get("flash")), ratio(r.get("cudnn"), r.get("ours")),
                      ratio(r.get("flex"), r.get("ours")), r.get("err_flex"), r.get("err_dense")])
    md = common.md_table(headers, table)
    print()
    print(md)
    notes = [f"Hq {hq}, Hkv {hkv}, window {w}, one fresh prompt (empty cache), scale 1/sqrt(D). "
             f"ms: median of CUDA-event timings after warm-up. TFLOP/s (\"ours TFLOP/s\") is "
             f"achieved on kept pairs: 4 D flops per kept (query head, key) pair. The D / dtype "
             f"rows after the main ones (--extra) skip FlexAttention. DMS_PREFILL_V2="
             f"{os.environ.get('DMS_PREFILL_V2', '1 (default)')} (0: the mma.sync kernel). "
             f"FlexAttention's block-mask build is not timed."]
    flex_builds = [f"{r['n']}@CR{r['cr']:g}: {r['flex_build_s']:.1f} s" for r in rows if "flex_build_s" in r]
    if flex_builds:
        notes.append("Flex block-mask build (incl. compile on first use): " + ", ".join(flex_builds))
    if errors:
        notes.append("Failures / OOM: " + "; ".join(errors))
    body = "\n\n".join(notes) + "\n\n" + md + "\n"
    path = common.write_results("prefill", "sparse_prefill vs FlexAttention (DMS mask) and dense SDPA", body)
    print(f"\nwrote {path}")
    best = [r for r in rows if isinstance(r.get("ours"), float)]
    summ = ", ".join(f"{r['n'] // 1024}k D{r['D']} {r['dtype']} CR{r['cr']:g} {r['ours']:.2f}ms "
                     f"(x{ratio(r.get('cudnn'), r.get('ours')) or 0:.1f} cuDNN)" for r in best)
    print(f"SUMMARY: {summ or 'no timings'}" + (f"; {len(errors)} failures" if errors else ""))


def fmt(x):
    if isinstance(x, float):
        return f"{x:.3g}"
    return "-" if x is None else str(x)


def cell(x):
    return x if isinstance(x, float) else ("-" if x is None else str(x))


def ratio(peer, ours):
    if isinstance(peer, float) and isinstance(ours, float) and ours > 0:
        return peer / ours
    return None


if __name__ == "__main__":
    main()
