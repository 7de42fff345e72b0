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
Extra rows (--extra, default D 64 bf16, D 128 fp16 and D 256 bf16 at 16k, CR 1 / 8) with cuDNN
and flash only; "unsupported" where torch.ops.dms.supported has no CUDA sparse_prefill for the D.
"pairs" is the number of (query head, key) score pairs the DMS rule keeps; dense causal has
Hq N (N + 1) / 2. Sanity: at CR 1 our output is compared with cuDNN's, and at every CR with
FlexAttention's (max abs difference, bf16 both sides). Writes bench/results/prefill_<date>.md.

fp8 rows (--fp8-lens, default 16k / 32k, at --fp8-crs, default CR 1 / 8; same heads, D, window,
flags): a fresh prompt never reads the pool, so these rows split the same prompt into a cache
and a chunk: the first N - --fp8-chunk tokens (default 4096) are appended (dms append, same
flags) to a float8_e4m3fn pool with k_scale = v_scale = 1/64 (a power of two, so the pool's
values are exact in bf16), and the timed call prefills the last chunk over it. The same call
on a bf16 pool holding those values dequantized is timed too ("bf16-pool ms"); their outputs
are compared (max abs difference: rounding order only). The two calls are timed alternately
(fp8, bf16 pool, bf16 pool, fp8, ...), so that clock drift over the run does not favour either.

  python3 bench/bench_prefill.py                 # the table (~1-3 min, mostly flex compiles)
  python3 bench/bench_prefill.py --lens 4096 --crs 1 8 --no-flex

Small chunks (--small): T = 1 / 2 / 4 / 8 / 16 new tokens per sequence over a B 64 x 8k cache
at CR 8 (per-head lengths uniform 0.5x-1.5x of ctx / CR, at least w + 1; synthetic DMS state:
ring of the last w + 1 positions over the newest slots, flags at the rate that gives CR 8),
against one-token sparse_decode over the same cache (the T = 1 floor: same bytes) and, with
--small-fi, FlashInfer's BatchPrefillWithPagedKVCacheWrapper with each (sequence, kv head) its
own request (G query heads, T query tokens, the cached keys only, no mask: a lower bound on
what a per-head paged prefill costs; its prefill module JIT-compiles on first use). CUDA-graph
timing, block tables rotated through copies so no call finds the cache in L2.
DMS_PREFILL_SMALL=0 in the environment gives the general kernel's times for the same rows.

  python3 bench/bench_prefill.py --small [--small-ts 1 4] [--small-b 64] [--small-ctx 8192] [--small-fi]
  python3 bench/bench_prefill.py --lens --fp8-lens 16384 --fp8-crs 8   # one fp8 row only

Chunked prefill (--chunked): one --chunked-len prompt (default 128k; Hq, Hkv, D, window as above,
bf16, flags for each of --chunked-crs, default CR 1 / 8) prefilled in one call over an empty
cache ("one-shot") and in --chunked-chunk pieces (default 8k) as an engine runs it: per chunk,
sparse_prefill over the cache of the earlier chunks, then dms append of the chunk. Chunked ms sums
the prefills and appends (prefill-only also given); CUDA events, median of --chunked-reps
(default 5) after a warm-up, the cache reset (untimed) before each. speed = one-shot ms / chunked
ms (target >= 0.8); max|diff|: the chunks' outputs against the one-shot's (rounding only).
Writes bench/results/prefill_chunked_<date>.md.

  python3 bench/bench_prefill.py --chunked [--chunked-len 131072 --chunked-chunk 8192 --chunked-crs 1 8]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import dms_ext  # noqa: E402,F401  (registers torch.ops.dms)
from dms_ext import reference  # noqa: E402


def write_report(kind: str, title: str, notes: list, err_label: str, errors: list, md: str, **kw):
    """notes (+ the failures, if any) and the table into bench/results/<kind>_<date>.md."""
    if errors:
        notes = notes + [f"{err_label}: " + "; ".join(errors)]
    path = common.write_results(kind, title, "\n\n".join(notes) + "\n\n" + md + "\n", **kw)
    print(f"\nwrote {path}")


def flag_prob(n: int, cr: float, w: int) -> float:
    if cr <= 1 or n <= w + 1:
        return 0.0
    keep = (n / cr - w - 1) / (n - w - 1)
    return float(min(1.0, max(0.0, 1.0 - keep)))


def eviction_logits(n: int, hkv: int, cr: float, w: int, gen: torch.Generator):
    """(p, logits float32 [n, Hkv] of +-1 with P(+1) = p = flag_prob, the CR they give)."""
    p = flag_prob(n, cr, w)
    lg = torch.where(torch.rand(n, hkv, device=gen.device, generator=gen) < p, 1.0, -1.0).float()
    return p, lg, n / reference.live_counts(lg, w).double().mean().item()


def prompt_qkv(nq, n, hq, hkv, D, dtype, gen):
    """q [nq, Hq, D], k / v [n, Hkv, D], standard normal."""
    return (torch.randn(nq, hq, D, device=gen.device, dtype=dtype, generator=gen),
            torch.randn(n, hkv, D, device=gen.device, dtype=dtype, generator=gen),
            torch.randn(n, hkv, D, device=gen.device, dtype=dtype, generator=gen))


def empty_state(n_max, hkv, w, D, dtype, dev, bs=64):
    """One empty state row with room for n_max tokens per head, in append's argument order:
    (k_cache, v_cache, block_table, seq_lens, ring, num_tokens, free_stack, free_top);
    sparse_prefill takes the first six. n_max 0: a one-block pool (a fresh prompt's)."""
    i32 = dict(dtype=torch.int32, device=dev)
    nb = -(-n_max // bs)
    blocks = hkv * nb + 1
    k_cache = torch.zeros(blocks, bs, D, device=dev, dtype=dtype)
    return (k_cache, torch.zeros_like(k_cache), torch.zeros(1, hkv, max(1, nb), **i32),
            torch.zeros(1, hkv, **i32), torch.zeros(1, hkv, w + 1, **i32), torch.zeros(1, **i32),
            torch.arange(blocks, **i32), torch.tensor([blocks], **i32))


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


def timed_interleaved(fns, name, a, min_reps=15, max_reps=60):
    """Median ms per call of each fn, timed alternately (A B, then B A, ...: one CUDA-event pair
    per call), so that clock and power drift over the run weigh on every fn alike."""
    common.warm_up(fns, rounds=2)
    ev = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
    s, e = ev(), ev()
    s.record()
    for f in fns:
        f()
    e.record()
    torch.cuda.synchronize()
    reps = int(min(max_reps, max(min_reps, a.target_s / max(s.elapsed_time(e) * 1e-3, 1e-6))))
    marks = [[] for _ in fns]
    with torch.cuda.nvtx.range(name):
        for i in range(reps):
            order = range(len(fns)) if i % 2 == 0 else reversed(range(len(fns)))
            for j in order:
                s, e = ev(), ev()
                s.record()
                fns[j]()
                e.record()
                marks[j].append((s, e))
        torch.cuda.synchronize()
    out = []
    for m in marks:
        t = sorted(s.elapsed_time(e) for s, e in m)
        out.append(t[len(t) // 2])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lens", type=int, nargs="*", default=[4096, 16384, 32768])
    ap.add_argument("--crs", type=float, nargs="+", default=[1, 4, 8])
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target-s", type=float, default=0.3, help="timing seconds per measurement")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--fp8-lens", type=int, nargs="*", default=[16384, 32768],
                    help="prompt lengths of the fp8-pool rows (none: no fp8 rows)")
    ap.add_argument("--fp8-crs", type=float, nargs="+", default=[1, 8])
    ap.add_argument("--fp8-chunk", type=int, default=4096,
                    help="fp8 rows: the timed chunk; the rest of the prompt is in the pool")
    ap.add_argument("--extra", nargs="*", default=["64:bf16", "128:fp16", "256:bf16"],
                    help="extra D:dtype configs (dtype bf16 / fp16), run at --extra-lens x "
                         "--extra-crs without peers other than cuDNN")
    ap.add_argument("--extra-lens", type=int, nargs="*", default=[16384])
    ap.add_argument("--extra-crs", type=float, nargs="*", default=[1, 8])
    ap.add_argument("--flex-budget-s", type=float, default=150.0,
                    help="skip FlexAttention once the run is this old (its compiles dominate)")
    ap.add_argument("--results-dir", default=common.RESULTS_DIR, help="where the results table goes")
    ap.add_argument("--small", action="store_true", help="the small-chunk table instead (see above)")
    ap.add_argument("--small-ts", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--small-b", type=int, default=64)
    ap.add_argument("--small-ctx", type=int, default=8192)
    ap.add_argument("--small-cr", type=float, default=8.0)
    ap.add_argument("--small-fi", action="store_true", help="time FlashInfer's paged prefill too")
    ap.add_argument("--chunked", action="store_true", help="the chunked-prefill table instead (see above)")
    ap.add_argument("--chunked-len", type=int, default=131072)
    ap.add_argument("--chunked-chunk", type=int, default=8192)
    ap.add_argument("--chunked-crs", type=float, nargs="+", default=[1, 8])
    ap.add_argument("--chunked-reps", type=int, default=5, help="timed repetitions (after one warm-up)")
    # --chunked's data path on the CPU ops at tiny sizes, untimed in effect: checks max|diff|.
    ap.add_argument("--cpu-dry-run", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.chunked or a.cpu_dry_run:
        return chunked_main(a)
    common.require_cuda("bench_prefill")
    if a.small:
        return small_main(a)
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
        q, k, v = prompt_qkv(n, n, hq, hkv, D, dtype, gen)
        # Empty per-sequence state (one row): the whole prompt is the chunk.
        state = empty_state(0, hkv, w, D, dtype, dev)[:6]
        slots = torch.zeros(1, dtype=torch.int32, device=dev)
        cu = torch.tensor([0, n], dtype=torch.int32, device=dev)
        ours_ok = torch.ops.dms.supported("sparse_prefill", "cuda", dtype, D)
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
            p, lg, cr_got = eviction_logits(n, hkv, cr, w, gen)
            d = torch.zeros(n, hkv, dtype=torch.bool, device=dev)
            d[:-1] = lg[1:] > 0
            flags.copy_(d.t())
            pairs = visible_pairs(flags, w, G)
            dense_pairs = hq * n * (n + 1) // 2
            r = {"n": n, "D": D, "dtype": str(dtype).replace("torch.", ""), "cr": cr, "p": p, "cr_got": cr_got, "pair_ratio": dense_pairs / pairs,
                 "cudnn": dense.get("cudnn"), "flash": dense.get("flash")}

            def ours():
                return torch.ops.dms.sparse_prefill(q, k, v, lg, slots, cu, *state, scale)
            r["ours"] = (_try(lambda: timed(ours, f"{n}/cr{cr}/ours", a), f"{n} CR{cr} ours", errors)
                         if ours_ok else f"unsupported (D {D})")
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

    fp8_rows = fp8_cases(a, gen, errors) if a.fp8_lens else []

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
    if fp8_rows:
        md += "\n\n" + common.md_table(
            ["N", "CR (got)", "cached (live)", "chunk", "fp8 ms", "bf16-pool ms", "fp8 / bf16",
             "max|fp8 - bf16-pool|"],
            [[f"{r['n']} fp8", f"{r['cr']:g} ({r['cr_got']:.2f})", f"{r['cached']} ({r['live']:.0f})",
              r["chunk"], cell(r.get("fp8")), cell(r.get("bf16")), ratio(r.get("fp8"), r.get("bf16")),
              r.get("err")] for r in fp8_rows])
    print()
    print(md)
    notes = [f"Hq {hq}, Hkv {hkv}, window {w}, one fresh prompt (empty cache), scale 1/sqrt(D). "
             f"ms: median of CUDA-event timings after warm-up. TFLOP/s (\"ours TFLOP/s\") is "
             f"achieved on kept pairs: 4 D flops per kept (query head, key) pair. The D / dtype "
             f"rows after the main ones (--extra) skip FlexAttention. DMS_PREFILL_V2="
             f"{os.environ.get('DMS_PREFILL_V2', '1 (default)')} (0: the mma.sync kernel). "
             f"FlexAttention's block-mask build is not timed. \"unsupported\": no CUDA sparse_prefill "
             f"kernel for that D / dtype (torch.ops.dms.supported); the dense peers still run."]
    if fp8_rows:
        notes.append(f"fp8 rows: the prompt's last {a.fp8_chunk} tokens prefilled over the rest, "
                     "appended first to a float8_e4m3fn pool (k_scale = v_scale = 1/64), against "
                     "the same call on a bf16 pool of the dequantized values (exact); the two "
                     "timed alternately, medians of CUDA-event timings of single calls.")
    flex_builds = [f"{r['n']}@CR{r['cr']:g}: {r['flex_build_s']:.1f} s" for r in rows if "flex_build_s" in r]
    if flex_builds:
        notes.append("Flex block-mask build (incl. compile on first use): " + ", ".join(flex_builds))
    if errors:
        notes.append("Failures / OOM: " + "; ".join(errors))
    body = "\n\n".join(notes) + "\n\n" + md + "\n"
    path = common.write_results("prefill", "sparse_prefill vs FlexAttention (DMS mask) and dense SDPA", body,
                                results_dir=a.results_dir)
    print(f"\nwrote {path}")
    best = [r for r in rows if isinstance(r.get("ours"), float)]
    summ = ", ".join(f"{r['n'] // 1024}k D{r['D']} {r['dtype']} CR{r['cr']:g} {r['ours']:.2f}ms "
                     f"(x{ratio(r.get('cudnn'), r.get('ours')) or 0:.1f} cuDNN)" for r in best)
    summ = ", ".join([summ] * bool(summ) + [
        f"{r['n'] // 1024}k CR{r['cr']:g} fp8 {r['fp8']:.2f}ms (bf16 pool {fmt(r.get('bf16'))}ms)"
        for r in fp8_rows if isinstance(r.get("fp8"), float)])
    print(f"SUMMARY: {summ or 'no timings'}" + (f"; {len(errors)} failures" if errors else ""))


def small_state(B, hkv, ctx, cr, w, D, dtype, bs, copies, gen):
    """Synthetic DMS state of B rows that have seen ctx tokens each: per-head lengths around
    ctx / cr (>= w + 1), the ring's w + 1 newest positions on the newest slots, flags at the
    rate that gives CR `cr`. `copies` block tables over disjoint shuffled blocks."""
    dev = "cuda"
    mean = ctx / cr
    lens = torch.randint(max(w + 1, round(0.5 * mean)), max(w + 2, round(1.5 * mean)) + 1, (B, hkv),
                         generator=gen, dtype=torch.int32)
    nb = (lens.long() + bs - 1) // bs
    per, maxb = int(nb.sum()), int(nb.max())
    k_cache = torch.randn(per * copies, bs, D, dtype=dtype, device=dev)
    v_cache = torch.randn(per * copies, bs, D, dtype=dtype, device=dev)
    perm = torch.randperm(per * copies, generator=gen).to(torch.int32)
    mask = torch.arange(maxb)[None, None, :] < nb[..., None]
    tables = []
    for c in range(copies):
        t = torch.zeros(B, hkv, maxb, dtype=torch.int32)
        t[mask] = perm[c * per:(c + 1) * per]
        tables.append(t.to(dev))
    pflag = flag_prob(ctx, cr, w)
    pos = torch.arange(ctx - w - 1, ctx)                                    # ring positions
    slot = lens[..., None].long() - (w + 1) + (pos - (ctx - w - 1))[None, None, :]
    flag = (torch.rand(B, hkv, w + 1, generator=gen) < pflag).long()
    ring = torch.zeros(B, hkv, w + 1, dtype=torch.int32)
    ring[:, :, pos % (w + 1)] = ((slot << 1) | flag).to(torch.int32)
    num_tokens = torch.full((B,), ctx, dtype=torch.int32)
    return (k_cache, v_cache, tables, lens.to(dev), ring.to(dev), num_tokens.to(dev), pflag)


def small_main(a):
    dtype, D, hq, hkv, w, bs = torch.bfloat16, a.dim, a.hq, a.hkv, a.window, 16
    G, B, ctx = hq // hkv, a.small_b, a.small_ctx
    scale = 1.0 / math.sqrt(D)
    print(f"{common.gpu_info()}", flush=True)
    errors = []
    gen = torch.Generator().manual_seed(a.seed)
    live = B * hkv * ctx / a.small_cr
    copies = common.copies_to_beat_l2(int(live * D * 2 * 2))
    k_cache, v_cache, tables, seq_lens, ring, num_tokens, pflag = small_state(
        B, hkv, ctx, a.small_cr, w, D, dtype, bs, copies, gen)
    live = int(seq_lens.sum())
    slots = torch.arange(B, dtype=torch.int32, device="cuda")
    print(f"B {B} x ctx {ctx}, CR {B * hkv * ctx / live:.2f} (flag p {pflag:.3f}), {copies} table "
          f"copies, {live * D * 4 / 2**30:.2f} GiB K+V", flush=True)

    def t_ms(fns, name):
        t = common.time_calls(fns, name, target_s=a.target_s)
        return t.us / 1e3

    qd = [torch.randn(B, hq, D, dtype=dtype, device="cuda") for _ in range(copies)]
    dec = _try(lambda: t_ms([lambda i=i: torch.ops.dms.sparse_decode(qd[i], k_cache, v_cache, tables[i],
                                                                        seq_lens, scale)
                             for i in range(copies)], "small/decode"), "sparse_decode", errors)
    print(f"sparse_decode (T=1): {fmt(dec)} ms", flush=True)

    fi = None
    if a.small_fi:
        import flashinfer_peer as fp
        fi = fp.load()
        if fi is None:
            errors.append(f"flashinfer: {fp.reason()}")
    rows = []
    for T in a.small_ts:
        n = B * T
        q = torch.randn(n, hq, D, dtype=dtype, device="cuda")
        k = torch.randn(n, hkv, D, dtype=dtype, device="cuda")
        v = torch.randn(n, hkv, D, dtype=dtype, device="cuda")
        lg = torch.where(torch.rand(n, hkv, device="cuda") < pflag, 1.0, -1.0).float()
        cu = torch.arange(B + 1, dtype=torch.int32, device="cuda") * T

        def ours(i):
            return torch.ops.dms.sparse_prefill(q, k, v, lg, slots, cu, k_cache, v_cache, tables[i],
                                                seq_lens, ring, num_tokens, scale)
        r = {"T": T, "ours": _try(lambda: t_ms([lambda i=i: ours(i) for i in range(copies)],
                                               f"small/T{T}/ours"), f"T{T} ours", errors)}
        if fi is not None:
            def fi_peer():
                import flashinfer_peer as fp
                wss = torch.zeros(256 << 20, dtype=torch.uint8, device="cuda")
                qh = q.view(B, T, hkv, G, D).permute(0, 2, 1, 3, 4).reshape(B * hkv * T, G, D).contiguous()
                qo_indptr = torch.arange(B * hkv + 1, dtype=torch.int32, device="cuda") * T
                kv = (k_cache.view(-1, bs, 1, D), v_cache.view(-1, bs, 1, D))
                wrs = []
                for i in range(copies):
                    indptr, indices, last = fp.per_head_indices(tables[i], seq_lens, bs)
                    wr = fi.BatchPrefillWithPagedKVCacheWrapper(wss if i == 0 else torch.zeros_like(wss), "NHD")
                    wr.plan(qo_indptr, indptr, indices, last, G, 1, D, bs, causal=False,
                            pos_encoding_mode="NONE", sm_scale=scale, q_data_type=dtype,
                            kv_data_type=dtype)
                    wrs.append(wr)
                return t_ms([lambda i=i: wrs[i].run(qh, kv) for i in range(copies)], f"small/T{T}/fi")
            r["fi"] = _try(fi_peer, f"T{T} flashinfer", errors)
        rows.append(r)
        print(f"  T {T}: ours {fmt(r['ours'])} ms, decode {fmt(dec)} ms, ratio "
              f"{fmt(ratio(r['ours'], dec))}, FlashInfer {fmt(r.get('fi'))} ms", flush=True)
        del q, k, v, lg

    headers = ["T", "ours ms", "sparse_decode (T=1) ms", "ours / decode", "FlashInfer prefill ms"]
    table = [[r["T"], cell(r["ours"]), cell(dec), ratio(r["ours"], dec),
              cell(r.get("fi")) if a.small_fi else "not run (--small-fi)"] for r in rows]
    md = common.md_table(headers, table)
    print()
    print(md)
    knob = os.environ.get("DMS_PREFILL_SMALL")
    notes = [f"Small chunks: B {B} x ctx {ctx}, CR {a.small_cr:g}, Hq {hq}, Hkv {hkv}, D {D}, bf16, "
             f"window {w}, block_size {bs}; T new tokens per sequence, one packed call. "
             f"DMS_PREFILL_SMALL={knob if knob is not None else '(unset)'}. FlashInfer: each "
             f"(sequence, kv head) a request, cached keys only, no mask."]
    write_report("prefill_small", "sparse_prefill, small chunks, vs sparse_decode", notes,
                 "Failures", errors, md, results_dir=a.results_dir)
    summ = ", ".join(f"T{r['T']} {r['ours']:.3f}ms (x{ratio(r['ours'], dec) or 0:.2f} decode)"
                     for r in rows if isinstance(r.get("ours"), float))
    print(f"SUMMARY: {summ or 'no timings'}" + (f"; {len(errors)} failures" if errors else ""))


def step_times(run, reset, reps, dev):
    """run(mark) reps times after one warm-up, reset() before each (untimed); run calls mark()
    after each step. Returns (per repetition the steps' ms, the last run's result). CUDA events;
    time.perf_counter on the CPU."""
    cuda = dev == "cuda"

    def stamp():
        if not cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e
    times = []
    for i in range(reps + 1):
        reset()
        marks = [stamp()]
        out = run(lambda: marks.append(stamp()))
        if cuda:
            torch.cuda.synchronize()
        if i:
            times.append([x.elapsed_time(y) if cuda else (y - x) * 1e3 for x, y in zip(marks, marks[1:])])
    return times, out


def chunked_case(a, cr, gen, dev):
    """One --chunked row: the prompt in one sparse_prefill over an empty cache, and chunk by
    chunk (sparse_prefill over the cache of the earlier chunks, then append of the chunk)."""
    dtype, n, c = torch.bfloat16, a.chunked_len, a.chunked_chunk
    hq, hkv, D, w = a.hq, a.hkv, a.dim, a.window
    scale, i32 = 1.0 / math.sqrt(D), dict(dtype=torch.int32, device=dev)
    q, k, v = prompt_qkv(n, n, hq, hkv, D, dtype, gen)
    _, lg, cr_got = eviction_logits(n, hkv, cr, w, gen)
    slots = torch.zeros(1, **i32)
    one_state = empty_state(0, hkv, w, D, dtype, dev)[:6]
    cu = torch.tensor([0, n], **i32)
    st = empty_state(n, hkv, w, D, dtype, dev)
    init = [t.clone() for t in st[2:]]      # the pool's contents are written before read
    pieces = [(q[s:s + c], k[s:s + c], v[s:s + c], lg[s:s + c], slots,
               torch.tensor([0, min(c, n - s)], **i32)) for s in range(0, n, c)]

    def reset():
        for t, t0 in zip(st[2:], init):
            t.copy_(t0)

    def one_shot(mark):
        out = torch.ops.dms.sparse_prefill(q, k, v, lg, slots, cu, *one_state, scale)
        mark()
        return out

    def chunked(mark):
        outs = []
        for qc, kc, vc, lc, sl, cc in pieces:
            outs.append(torch.ops.dms.sparse_prefill(qc, kc, vc, lc, sl, cc, *st[:6], scale))
            mark()
            torch.ops.dms.append(kc, vc, lc, sl, cc, *st)
            mark()
        return outs
    t1, out1 = step_times(one_shot, lambda: None, a.chunked_reps, dev)
    tc, outc = step_times(chunked, reset, a.chunked_reps, dev)
    med = lambda xs: sorted(xs)[len(xs) // 2]   # noqa: E731
    r = {"n": n, "chunk": c, "cr": cr, "cr_got": cr_got, "one": med([sum(t) for t in t1]),
         "chunked": med([sum(t) for t in tc]), "prefill": med([sum(t[::2]) for t in tc]),
         "err": (torch.cat(outc).float() - out1.float()).abs().max().item()}
    r["speed"] = r["one"] / r["chunked"]
    return r


def chunked_main(a):
    """--chunked: the one-shot vs chunked-into-the-cache table (see the module docstring)."""
    if a.cpu_dry_run:
        a.chunked_len, a.chunked_chunk, a.hq, a.hkv, a.dim, a.window = 512, 128, 4, 2, 64, 32
        dev = "cpu"
    else:
        common.require_cuda("bench_prefill --chunked")
        dev = "cuda"
        print(f"{common.gpu_info()}", flush=True)
    gen = torch.Generator(device=dev).manual_seed(a.seed)
    errors, rows = [], []
    for cr in a.chunked_crs:
        print(f"chunked: N = {a.chunked_len} in chunks of {a.chunked_chunk}, CR {cr:g}", flush=True)
        r = _try(lambda: chunked_case(a, cr, gen, dev), f"chunked CR{cr:g}", errors)
        if isinstance(r, dict):
            rows.append(r)
            print(f"  CR {r['cr_got']:.2f}: one-shot {r['one']:.3g} ms, chunked {r['chunked']:.3g} ms "
                  f"(prefill {r['prefill']:.3g} ms), speed x{r['speed']:.3f}, max|diff| {r['err']:.3g}",
                  flush=True)
        if dev == "cuda":
            torch.cuda.empty_cache()
    md = common.md_table(
        ["N", "chunk", "CR (got)", "one-shot ms", "chunked ms", "chunked prefill-only ms",
         "chunked / one-shot speed", "max\\|diff\\|"],
        [[r["n"], r["chunk"], f"{r['cr']:g} ({r['cr_got']:.2f})", r["one"], r["chunked"], r["prefill"],
          r["speed"], r["err"]] for r in rows])
    print()
    print(md)
    notes = [f"Hq {a.hq}, Hkv {a.hkv}, D {a.dim}, bf16, window {a.window}, block_size 64, one "
             f"sequence. One-shot: one sparse_prefill over the prompt, empty cache. Chunked: per "
             f"chunk, sparse_prefill over the cache of the earlier chunks, then dms append of the "
             f"chunk (as an engine runs it); the cache reset (untimed) before every repetition. "
             f"ms: median over {a.chunked_reps} repetitions after one warm-up "
             f"({'time.perf_counter, CPU ops: dry run' if a.cpu_dry_run else 'CUDA events'}); "
             f"chunked ms includes the appends. speed = one-shot ms / chunked ms (target >= 0.8). "
             f"max|diff|: the chunks' outputs against the one-shot output (bf16, rounding only)."]
    write_report("prefill_chunked", "sparse_prefill: chunked prefill into the cache vs one shot",
                 notes, "Failures / OOM", errors, md,
                 results_dir=tempfile.gettempdir() if a.cpu_dry_run else a.results_dir)
    summ = " ".join(f"CR{r['cr']:g} x{r['speed']:.2f}" for r in rows)
    kib = lambda x: f"{x // 1024}k" if x % 1024 == 0 else str(x)   # noqa: E731
    print(f"SUMMARY: chunked {kib(a.chunked_len)}/{kib(a.chunked_chunk)} {summ or 'no timings'}"
          + (f"; {len(errors)} failures" if errors else ""))
    if a.cpu_dry_run:
        assert len(rows) == len(a.chunked_crs) and all(r["err"] <= 1e-2 for r in rows), (rows, errors)
        print("dry run OK")


def fp8_cases(a, gen, errors):
    """The fp8-pool rows (see the module docstring): per (N, CR), the prompt's first
    N - fp8_chunk tokens appended to a float8_e4m3fn pool, the last fp8_chunk prefilled over it;
    the same prefill on a bf16 pool of the dequantized values for comparison."""
    dtype, dev = torch.bfloat16, "cuda"
    hq, hkv, D, w = a.hq, a.hkv, a.dim, a.window
    G, scale, kvs, bs = hq // hkv, 1.0 / math.sqrt(D), 1.0 / 64, 64
    i32 = dict(dtype=torch.int32, device=dev)
    rows = []
    for n in a.fp8_lens:
        c = min(a.fp8_chunk, n)
        h = n - c
        q, k, v = prompt_qkv(c, n, hq, hkv, D, dtype, gen)
        for cr in a.fp8_crs:
            _, lg, cr_got = eviction_logits(n, hkv, cr, w, gen)
            r = {"n": n, "cr": cr, "cr_got": cr_got, "cached": h, "chunk": c}
            print(f"N = {n} fp8, CR {cr}: {h} cached + {c}", flush=True)
            try:
                k8, v8, *meta, free_stack, free_top = empty_state(h, hkv, w, D, torch.float8_e4m3fn, dev, bs)
                slots = torch.zeros(1, **i32)
                if h > 0:
                    torch.ops.dms.append(k[:h], v[:h], lg[:h], slots, torch.tensor([0, h], **i32), k8, v8,
                                         *meta, free_stack, free_top, kvs, kvs)
                r["live"] = meta[1].double().mean().item() if h > 0 else 0.0
                kb = (k8.float() * kvs).to(dtype)   # exact: e4m3 times a power of two
                vb = (v8.float() * kvs).to(dtype)
                cu = torch.tensor([0, c], **i32)
                chunk = (q, k[h:].contiguous(), v[h:].contiguous(), lg[h:].contiguous(), slots, cu)

                def run8():
                    return torch.ops.dms.sparse_prefill(*chunk, k8, v8, *meta, scale, kvs, kvs)

                def runb():
                    return torch.ops.dms.sparse_prefill(*chunk, kb, vb, *meta, scale)
                both = _try(lambda: timed_interleaved([run8, runb], f"{n}/cr{cr}/fp8-vs-bf16pool", a),
                            f"{n} CR{cr} fp8 / bf16 pool", errors)
                if both is not None:
                    r["fp8"], r["bf16"] = both
                if isinstance(r["fp8"], float) and isinstance(r["bf16"], float):
                    r["err"] = (run8().float() - runb().float()).abs().max().item()
                del k8, v8, kb, vb
            except Exception as e:  # noqa: BLE001  (a failed row is reported, the run goes on)
                errors.append(f"{n} CR{cr} fp8: {type(e).__name__}: {e}")
            rows.append(r)
            print(f"  fp8 {fmt(r.get('fp8'))} ms, bf16 pool {fmt(r.get('bf16'))} ms, "
                  f"max|diff| {fmt(r.get('err'))}", flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    return rows


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
