"""sparse_decode vs its peers on the GPU: per-head DMS lengths at CR 8, bf16, one query per row.

Rows (Hq 32, Hkv 8, D 128, block 64 unless noted): B 1 x 32k, B 16 x 16k, B 64 x 8k,
B 128 x 4k, B 1 x 128k, B 8 x 128k, each with three per-(seq, head) length distributions:
uniform (0.5x-1.5x of ctx / CR), skewed (a quarter of the heads keep all ctx tokens, the rest
only the 512-token window) and heavy tail (per-head CR drawn log-uniform in [1, 64], mean about
8, as real DMS heads do); B 64 x 8k at D 64; B 64 x 8k with G 1 (Hq 8); and the uniform rows again with an fp8 e4m3 pool
(rows "... fp8": q / out in --dtype, k_scale = v_scale = 4 / 448, bandwidth counted on the fp8
bytes; their one peer is FlashInfer's fp8 decode, per head, over the same fp8 pool). Block
tables are random permutations of the pool.

Peers, measured in the same run with the same timing (CUDA-graph replay, median):
  FlashInfer per-head   each (seq, kv head) a request (num_kv_heads 1), tensor cores on/off,
                        the faster kept; host-side plan() not counted. On the fp8 rows it is
                        FlashInfer 0.2.14's KV-only fp8 decode (plan(q_data_type=--dtype,
                        kv_data_type=float8_e4m3fn), run(k_scale=, v_scale=)), which exists in
                        both modes: CUDA-core decode kernel and tensor cores (fa2 prefill kernel,
                        fp8 K/V cast to q's type); its run() applies v_scale as a separate
                        out *= v_scale after the kernel, counted in its time. The fp8 rows have
                        no other peer (SDPA / dense / CR 1 cells are '-').
  SDPA + bool mask      padded per-head layout [B, Hkv, Lmax, D], the G query heads as rows
  cuDNN SDPA dense      the uncompressed cache (ctx tokens per head): what DMS saves against
  FlashInfer dense      paged decode over the uncompressed cache (CR 1 reference)
  ours @CR1             our op over the uncompressed cache (kernel bandwidth without DMS skew)
The ceiling is the best read bandwidth measured in the run: torch.sum over 4 GiB, cuDNN and
FlashInfer dense decode, our CR 1 rows, and any other row (so no row shows more than 100%).
Live KV bytes = sum(seq_lens) * 2 * D * 2. Writes bench/results/decode_<date>.md.

  python3 bench/bench_decode.py                 # the table (~1-3 min, plus FlashInfer JIT)
  python3 bench/bench_decode.py --ncu           # our op only, B 64 x 8k, a few calls, for ncu
  python3 bench/bench_decode.py --ncu --ncu-row "B1 x 32k"   # another row
  python3 bench/bench_decode.py --memcheck      # small edge cases once each, for compute-sanitizer
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Case:
    name: str
    B: int
    ctx: int
    hq: int = 32
    hkv: int = 8
    D: int = 128
    dist: str = "uniform"   # "skewed" or "heavy"
    kv: str = "act"         # the pool's dtype: "act" (as q) or "fp8" (float8_e4m3fn)


_SIZES = [("B1 x 32k", 1, 32768), ("B16 x 16k", 16, 16384), ("B64 x 8k", 64, 8192),
          ("B128 x 4k", 128, 4096), ("B1 x 128k", 1, 131072), ("B8 x 128k", 8, 131072)]
CASES = ([Case(n, B, ctx) for n, B, ctx in _SIZES]
         + [Case(f"{n} skewed", B, ctx, dist="skewed") for n, B, ctx in _SIZES]
         + [Case(f"{n} heavy", B, ctx, dist="heavy") for n, B, ctx in _SIZES]
         + [Case("B64 x 8k D64", 64, 8192, D=64), Case("B64 x 8k G1", 64, 8192, hq=8)]
         + [Case(f"{n} fp8", B, ctx, kv="fp8") for n, B, ctx in _SIZES])
FP8_SCALE = 4.0 / 448   # randn data: |x| > 4 saturates, the rest spans the e4m3 range
WINDOW = 512
_DENSE_DONE: dict = {}  # (B, ctx, hq, hkv, D, dtype) -> (dense peer times, SDPA backend)
DEV = "cuda"  # a CPU dry run of run_case's data paths sets this to "cpu"


def make_lens(c: Case, cr: float, gen: torch.Generator, window: int = WINDOW) -> torch.Tensor:
    """int32 [B, Hkv] on the CPU (skewed: the short heads keep `window` tokens)."""
    if c.dist == "skewed":
        lens = torch.full((c.B * c.hkv,), window, dtype=torch.int32)
        full = torch.randperm(c.B * c.hkv, generator=gen)[: (c.B * c.hkv) // 4]
        lens[full] = c.ctx
        return lens.view(c.B, c.hkv)
    if c.dist == "heavy":  # per-head CR log-uniform in [1, 64]
        u = torch.rand(c.B, c.hkv, generator=gen, dtype=torch.float64)
        head_cr = torch.exp(u * math.log(64.0))
        return (c.ctx / head_cr).round().clamp(min=1, max=c.ctx).to(torch.int32)
    mean = c.ctx / cr
    lo, hi = max(1, round(0.5 * mean)), max(1, round(1.5 * mean))
    return torch.randint(lo, hi + 1, (c.B, c.hkv), generator=gen, dtype=torch.int32)


class Paged:
    """Our layout: one pool, `copies` block tables over disjoint shuffled blocks."""

    def __init__(self, lens_cpu, bs, D, dtype, copies, gen_cpu, gen_dev, device=None):
        device = device or DEV
        self.B, self.hkv = lens_cpu.shape
        self.bs, self.D = bs, D
        nb = (lens_cpu.long() + bs - 1) // bs
        per = int(nb.sum())
        self.maxb = max(1, int(nb.max()))
        self.num_blocks = per * copies
        self.k = torch.randn(self.num_blocks, bs, D, device=device, dtype=dtype, generator=gen_dev)
        self.v = torch.randn(self.num_blocks, bs, D, device=device, dtype=dtype, generator=gen_dev)
        perm = torch.randperm(self.num_blocks, generator=gen_cpu).to(torch.int32)
        mask = torch.arange(self.maxb)[None, None, :] < nb[..., None]
        self.tables = []
        for c in range(copies):
            t = torch.zeros(self.B, self.hkv, self.maxb, dtype=torch.int32)
            t[mask] = perm[c * per:(c + 1) * per]
            self.tables.append(t.to(device))
        self.lens = lens_cpu.to(device)
        self.live_tokens = int(lens_cpu.long().sum())

    def padded(self, c: int, lmax: int):
        """[B, Hkv, lmax, D] K and V of copy c (rows past a head's length hold other data)."""
        s = torch.arange(lmax, device=self.k.device)
        blk = self.tables[c].long()[:, :, (s // self.bs).clamp(max=self.maxb - 1)]
        rows = blk * self.bs + (s % self.bs)
        return self.k.view(-1, self.D)[rows], self.v.view(-1, self.D)[rows]


def pools_for(c: Case, P: Paged) -> tuple:
    """An fp8 row's pools: P's K / V quantized in place to e4m3 at FP8_SCALE; the trailing
    (k_scale, v_scale) arguments of the op ((): the row's pools stay in q's dtype)."""
    if c.kv != "fp8":
        return ()
    P.k = (P.k.float() / FP8_SCALE).clamp(-448, 448).to(torch.float8_e4m3fn)
    P.v = (P.v.float() / FP8_SCALE).clamp(-448, 448).to(torch.float8_e4m3fn)
    return (FP8_SCALE, FP8_SCALE)


def live_bytes(tokens: int, D: int, esize: int) -> int:
    return tokens * 2 * D * esize


def _try(fn, label, errors):
    return common.try_peer(fn, label, errors)


def _diffs(r: dict, outs: dict) -> None:
    """Our output against the peers on the same inputs (copy 0): r["diff_<peer>"]."""
    if outs.get("ours") is not None:
        for k in ("sdpa_mask", "fi_ph"):
            if outs.get(k) is not None:
                r[f"diff_{k}"] = (outs["ours"].float() - outs[k].float()).abs().max().item()


def run_case(c: Case, a, ceil, fi_ok: bool, fi_tc_dims, errors, fi_fp8=None) -> dict:
    """fi_fp8: {(D, use_tensor_cores): None if usable else why not}, the FlashInfer fp8-KV modes
    the warm-up built and checked (fp8 rows only time those)."""
    dtype = DTYPES[a.dtype]
    es = torch.tensor([], dtype=dtype).element_size()
    gen_cpu = torch.Generator().manual_seed(a.seed)
    gen_dev = torch.Generator(device=DEV).manual_seed(a.seed)
    G = c.hq // c.hkv
    scale = 1.0 / math.sqrt(c.D)
    lens = make_lens(c, a.cr, gen_cpu)
    tokens = int(lens.long().sum())
    fp8 = c.kv == "fp8"
    lb = live_bytes(tokens, c.D, 1 if fp8 else es)
    copies = common.copies_to_beat_l2(lb + c.B * c.hq * c.D * es)
    r = {"case": c, "live_mb": lb / 1e6, "tokens": tokens, "copies": copies, "t": {}, "modes": {}}
    print(f"{c.name}: live {lb / 1e6:.1f} MB, lengths {int(lens.min())}..{int(lens.max())}, "
          f"{copies} input copies", flush=True)
    P = Paged(lens, a.block_size, c.D, dtype, copies, gen_cpu, gen_dev)
    kv_scales = pools_for(c, P)
    qs = [torch.randn(c.B, c.hq, c.D, device=DEV, dtype=dtype, generator=gen_dev)
          for _ in range(copies)]

    def timed(key, fns, label):
        t = _try(lambda: common.time_calls(fns, f"{c.name}/{label}", target_s=a.target_s), label, errors)
        if t is not None:
            r["t"][key] = t.us
            r["modes"][key] = t.mode
            print(f"  {label:28s} {t}", flush=True)
        return t

    op = torch.ops.dms.sparse_decode
    outs = {}
    timed("ours", [lambda i=i: op(qs[i], P.k, P.v, P.tables[i], P.lens, scale, *kv_scales)
                   for i in range(copies)], "ours")
    outs["ours"] = _try(lambda: op(qs[0], P.k, P.v, P.tables[0], P.lens, scale, *kv_scales), "ours", errors)

    # FlashInfer, each (sequence, kv head) its own request. fp8 rows: the same fp8 pool through
    # FlashInfer's KV-only fp8 decode (q in dtype, k_scale / v_scale), in the modes that built.
    if fp8:
        fi_modes = [tc for tc in (True, False) if (c.D, tc) in (fi_fp8 or {}) and fi_fp8[(c.D, tc)] is None]
        fi_kw = {"q_dtype": dtype, "k_scale": FP8_SCALE, "v_scale": FP8_SCALE}
    else:
        fi_modes = [tc for tc in (True, False) if fi_ok and (not tc or c.D in fi_tc_dims)]
        fi_kw = {}
    if fi_modes:
        import flashinfer_peer as fp
    for tc in fi_modes:
        key = "fi_ph_tc" if tc else "fi_ph_cc"
        label = f"FlashInfer per-head{' fp8' if fp8 else ''} tc={tc}"
        wr = _try(lambda: [fp.PerHeadDecode(P.k, P.v, P.tables[i], P.lens, c.hq, scale, tc, **fi_kw)
                           for i in range(copies)], label, errors)
        if wr:
            timed(key, [lambda i=i: wr[i](qs[i]) for i in range(copies)], label)
            if "fi_ph" not in outs:
                outs["fi_ph"] = _try(lambda: wr[0](qs[0]), label, errors)
        del wr
    if fp8:  # no other peer takes this fp8 pool (see the module docstring)
        r["no_peer"] = not any(k in r["t"] for k in ("fi_ph_tc", "fi_ph_cc"))
        _diffs(r, outs)
        del P, qs, outs
        torch.cuda.empty_cache()
        return r

    # SDPA with a boolean mask over a padded per-head layout; the group's query heads are the
    # query rows of their KV head (no K/V repeat).
    lmax = -(-int(lens.max()) // 64) * 64
    pad_bytes = c.B * c.hkv * lmax * c.D * 2 * es
    sc = common.copies_to_beat_l2(pad_bytes)
    if a.peers and pad_bytes * sc < a.max_peer_gb * 1e9:
        mask = (torch.arange(lmax, device=DEV)[None, None, :] < P.lens[..., None])[:, :, None, :]
        kvp = [P.padded(i % copies, lmax) for i in range(sc)]
        qg = [qs[i % copies].view(c.B, c.hkv, G, c.D) for i in range(sc)]

        def sdpa_mask(i):
            return F.scaled_dot_product_attention(qg[i], kvp[i][0], kvp[i][1], attn_mask=mask,
                                                  scale=scale).view(c.B, c.hq, c.D)
        timed("sdpa_mask", [lambda i=i: sdpa_mask(i) for i in range(sc)], "SDPA bool mask (padded)")
        outs["sdpa_mask"] = _try(lambda: sdpa_mask(0), "SDPA bool mask", errors)
        r["pad_mb"] = pad_bytes / 1e6
        del kvp, qg, mask
    del P
    torch.cuda.empty_cache()

    # Dense peers over the uncompressed cache: every head holds ctx tokens. They do not depend
    # on the length distribution, so each shape is measured once and its rows share the numbers.
    dense_bytes = live_bytes(c.B * c.hkv * c.ctx, c.D, es)
    r["dense_mb"] = dense_bytes / 1e6
    dense_key = (c.B, c.ctx, c.hq, c.hkv, c.D, a.dtype)
    dense_keys = ("dense_sdpa", "fi_dense_tc", "fi_dense_cc", "ours_cr1")
    if dense_key in _DENSE_DONE:
        t_prev, backend = _DENSE_DONE[dense_key]
        r["t"].update(t_prev)
        if backend:
            r["dense_sdpa_backend"] = backend
    elif a.peers and a.dense and dense_bytes < a.max_peer_gb * 1e9:
        dc = common.copies_to_beat_l2(dense_bytes)
        kd = [torch.randn(c.B, c.hkv, c.ctx, c.D, device=DEV, dtype=dtype, generator=gen_dev)
              for _ in range(dc)]
        vd = [torch.randn_like(k) for k in kd]
        qg = [qs[i % copies].view(c.B, c.hkv, G, c.D) for i in range(dc)]
        from torch.nn.attention import SDPBackend, sdpa_kernel
        for backend, key in ((SDPBackend.CUDNN_ATTENTION, "cudnn"), (SDPBackend.FLASH_ATTENTION, "flash")):
            def dense(i, backend=backend):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(qg[i], kd[i], vd[i], scale=scale)
            t = timed("dense_sdpa", [lambda i=i: dense(i) for i in range(dc)], f"SDPA dense ({key})")
            if t is not None:
                r["dense_sdpa_backend"] = key
                break
        del kd, vd, qg
        torch.cuda.empty_cache()

        if fi_ok:
            import flashinfer_peer as fp
            pages = fp.DensePages(c.B, c.ctx, c.hkv, c.D, a.block_size, dc, dtype, gen_cpu, gen_dev)
            for tc in (True, False):
                if tc and c.D not in fi_tc_dims:
                    continue
                key = "fi_dense_tc" if tc else "fi_dense_cc"
                label = f"FlashInfer dense tc={tc}"
                wr = _try(lambda: pages.decoders(c.hq, scale, tc), label, errors)
                if wr:
                    timed(key, [lambda i=i: wr[i](qs[i % copies]) for i in range(dc)], label)
                del wr
            del pages
            torch.cuda.empty_cache()

        # Our op over the same uncompressed cache.
        full = torch.full((c.B, c.hkv), c.ctx, dtype=torch.int32)
        Pd = _try(lambda: Paged(full, a.block_size, c.D, dtype, dc, gen_cpu, gen_dev), "ours @CR1", errors)
        if Pd is not None:
            timed("ours_cr1", [lambda i=i: op(qs[i % copies], Pd.k, Pd.v, Pd.tables[i], Pd.lens, scale)
                               for i in range(dc)], "ours @CR1 (dense cache)")
        del Pd
        torch.cuda.empty_cache()

        _DENSE_DONE[dense_key] = ({k: r["t"][k] for k in dense_keys if k in r["t"]},
                                  r.get("dense_sdpa_backend"))

    # Sanity: our output against the peers on the same inputs (copy 0).
    _diffs(r, outs)
    del qs, outs
    torch.cuda.empty_cache()
    return r


def best(t: dict, *keys):
    vals = [(t[k], k) for k in keys if k in t]
    return min(vals) if vals else (None, None)


def run_ceiling(rows, ceil) -> tuple[float, str]:
    """Best read bandwidth measured in this run, and what reached it."""
    best_gbs, who = (ceil.read_gbs, "torch.sum") if ceil else (float("nan"), "none")
    for r in rows:
        t = r["t"]
        cands = [(r["dense_mb"] * 1e6 / (t[k] * 1e3), f"{k} {r['case'].name}")
                 for k in ("dense_sdpa", "fi_dense_tc", "fi_dense_cc", "ours_cr1") if t.get(k)]
        if t.get("ours"):
            cands.append((r["live_mb"] * 1e6 / (t["ours"] * 1e3), f"ours {r['case'].name}"))
        for gbs, k in cands:
            if not best_gbs == best_gbs or gbs > best_gbs:
                best_gbs, who = gbs, k
    return best_gbs, who


def report(rows, ceil, a, fi_note, errors, wall_s) -> tuple[str, str]:
    ce, ce_who = run_ceiling(rows, ceil)
    main, peers, summ = [], [], []
    for r in rows:
        c, t = r["case"], r["t"]
        ours = t.get("ours")
        gbs = r["live_mb"] * 1e6 / (ours * 1e3) if ours else None
        fi_ph, fi_ph_k = best(t, "fi_ph_tc", "fi_ph_cc")
        fi_d, fi_d_k = best(t, "fi_dense_tc", "fi_dense_cc")
        sp = lambda x: (x / ours) if (x and ours) else None  # noqa: E731
        main.append([c.name, c.D, c.hq // c.hkv, round(r["live_mb"], 1), ours, gbs,
                     (100 * gbs / ce) if gbs else None, sp(fi_ph), sp(t.get("sdpa_mask")),
                     sp(t.get("dense_sdpa")), sp(fi_d),
                     r.get("diff_sdpa_mask"), r.get("diff_fi_ph")])
        dense_gbs = lambda x: r["dense_mb"] * 1e6 / (x * 1e3) if x else None  # noqa: E731
        peers.append([c.name,
                      t.get("fi_ph_tc"), t.get("fi_ph_cc"),
                      t.get("sdpa_mask"),
                      (r.get("pad_mb", 0) * 1e6 / (t["sdpa_mask"] * 1e3)) if t.get("sdpa_mask") else None,
                      t.get("dense_sdpa"), r.get("dense_sdpa_backend"), dense_gbs(t.get("dense_sdpa")),
                      t.get("fi_dense_tc"), t.get("fi_dense_cc"), dense_gbs(fi_d),
                      t.get("ours_cr1"), dense_gbs(t.get("ours_cr1")),
                      (100 * dense_gbs(t["ours_cr1"]) / ce) if t.get("ours_cr1") else None])
        if ours:
            vs = f" vs FI {fi_ph:.1f} (x{fi_ph / ours:.2f})" if fi_ph else ""
            vs = " (no peer)" if r.get("no_peer") else vs
            summ.append(f"{c.name.replace(' ', '')} {ours:.1f}us {gbs / 1e3:.2f}TB/s{vs}")
        else:
            summ.append(f"{c.name.replace(' ', '')} ours n/a")
    modes = sorted({m for r in rows for m in r["modes"].values() if m != "graph"})
    body = [f"Hq/Hkv/D per row, {a.dtype}, block_size {a.block_size}, CR {a.cr:g} "
            f"(per-head lengths uniform 0.5x-1.5x of ctx/CR; skewed: 1/4 of heads keep ctx, the "
            f"rest {WINDOW}; heavy: per-head CR log-uniform in [1, 64]); block tables shuffled. Times: median per call over CUDA-graph "
            f"replays; a replay is >= 8 back-to-back calls rotating input copies so the "
            f"working set exceeds 2x L2.", "",
            f"- ceiling (best read bandwidth of this run): {ce:.0f} GB/s, reached by {ce_who}",
            f"- {ceil.md() if ceil else 'ceiling not measured'}",
            f"- FlashInfer: {fi_note}",
            f"- wall time of this bench: {wall_s:.0f} s", ""]
    if modes:
        body.append(f"- some measurements fell back to eager timing: {modes}\n")
    body += ["## Ours vs peers", "",
             "live MB = sum(seq_lens) * 2 * D * element size (2; 1 on the fp8 rows); GB/s and % of "
             "ceiling count live KV bytes; "
             "speedup = peer us / our us (> 1: we are faster). FI per-head = the faster of "
             "tensor cores on/off. diff = max |ours - peer| on the same inputs. fp8 rows: FI "
             "per-head is FlashInfer's fp8-KV decode (q / out in the row's dtype, e4m3 pages, "
             "k_scale folded into sm_scale, v_scale applied by its run() as a separate "
             "out *= v_scale, counted); FlashInfer 0.2.14 has it with tensor cores off (CUDA-core "
             "decode kernel) and on (fa2 prefill kernel, fp8 K/V cast to q's type before the "
             "MMAs; fp8 q / fp8 MMAs are fa3-only, not offered by the decode wrapper); both "
             "dequantize the same stored values, so diff FI is rounding only. The fp8 rows "
             "have no other peer.", "",
             common.md_table(["case", "D", "G", "live MB", "ours us", "GB/s", "% ceil",
                              "x FI per-head", "x SDPA mask", "x cuDNN dense", "x FI dense",
                              "diff SDPA", "diff FI"], main), "",
             "## Peers (us; GB/s of what each reads: padded or uncompressed cache)", "",
             common.md_table(["case", "FI ph tc", "FI ph cc", "SDPA mask", "GB/s", "dense SDPA",
                              "backend", "GB/s", "FI dense tc", "FI dense cc", "GB/s",
                              "ours @CR1", "GB/s", "% ceil"], peers), ""]
    if errors:
        body += ["## Errors", ""] + [f"- {e}" for e in errors] + [""]
    return "\n".join(body), "SUMMARY: " + "; ".join(summ)


def ncu_mode(a):
    """Our op only on one row (--ncu-row, default B 64 x 8k; for ncu -k regex:sparse_decode):
    2 warm-up + a few calls."""
    dtype = DTYPES[a.dtype]
    c = next((c for c in CASES if c.name == a.ncu_row), None)
    if c is None:
        sys.exit(f"--ncu-row: no row named {a.ncu_row!r}; rows: {', '.join(c.name for c in CASES)}")
    gen_cpu = torch.Generator().manual_seed(a.seed)
    gen_dev = torch.Generator(device="cuda").manual_seed(a.seed)
    P = Paged(make_lens(c, a.cr, gen_cpu), a.block_size, c.D, dtype, 1, gen_cpu, gen_dev)
    kv_scales = pools_for(c, P)
    q = torch.randn(c.B, c.hq, c.D, device="cuda", dtype=dtype, generator=gen_dev)
    for i in range(2 + a.ncu_calls):
        with torch.cuda.nvtx.range(f"sparse_decode {c.name} call {i}"):
            torch.ops.dms.sparse_decode(q, P.k, P.v, P.tables[0], P.lens, c.D ** -0.5, *kv_scales)
    torch.cuda.synchronize()
    print(f"ncu mode: {2 + a.ncu_calls} calls of sparse_decode at {c.name} "
          f"({live_bytes(P.live_tokens, c.D, P.k.element_size()) / 1e6:.0f} MB live)")


def memcheck_mode(a):
    """Edge cases once each (run under compute-sanitizer): -1 in unused table entries, NaN in
    unused cache rows, lengths 0 / 1 / bs-1 / bs / bs+1 / long, every head dim; checks values."""
    import dms_ext.reference as ref
    bad = 0
    for D in (64, 128, 256):
        for dtype in (torch.bfloat16, torch.float16):
            for bs, G in ((16, 4), (64, 3), (64, 1)):
                hkv, B = 2, 3
                lens = torch.tensor([[0, 1], [bs - 1, bs], [bs + 1, 3000]], dtype=torch.int32)
                nb = (lens.long() + bs - 1) // bs
                maxb = int(nb.max()) + 2
                nblk = int(nb.sum()) + 3
                perm = torch.randperm(nblk).to(torch.int32)
                table = torch.full((B, hkv, maxb), -1, dtype=torch.int32)
                mask = torch.arange(maxb)[None, None] < nb[..., None]
                table[mask] = perm[: int(nb.sum())]
                k = torch.full((nblk, bs, D), float("nan"), dtype=dtype)
                v = torch.full((nblk, bs, D), float("nan"), dtype=dtype)
                for b in range(B):
                    for g in range(hkv):
                        n = int(lens[b, g])
                        s = torch.arange(n)
                        blk, row = table[b, g, s // bs].long(), s % bs
                        k[blk, row] = torch.randn(n, D).to(dtype)
                        v[blk, row] = torch.randn(n, D).to(dtype)
                q = torch.randn(B, G * hkv, D).to(dtype)
                args = [x.cuda() for x in (q, k, v, table, lens)]
                out, lse = torch.ops.dms.sparse_decode_lse(*args, D ** -0.5)
                torch.cuda.synchronize()
                want = ref.sparse_decode(q, k, v, table, lens, D ** -0.5)
                err = (out.double().cpu() - want).abs().max().item()
                ok = err < 0.05 and bool(torch.isfinite(out).all())
                bad += not ok
                print(f"D{D} {str(dtype)[6:]} bs{bs} G{G}: max err {err:.2e} {'ok' if ok else 'BAD'}",
                      flush=True)
    print(f"memcheck mode: {bad} bad cases")
    sys.exit(1 if bad else 0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--cr", type=float, default=8.0)
    ap.add_argument("--rows", default="", help="comma-separated substrings of row names to run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target-s", type=float, default=0.2, help="seconds of replays per measurement")
    ap.add_argument("--no-flashinfer", dest="flashinfer", action="store_false")
    ap.add_argument("--no-peers", dest="peers", action="store_false", help="our op only")
    ap.add_argument("--no-dense", dest="dense", action="store_false", help="skip the CR 1 rows")
    ap.add_argument("--fi-timeout", type=float, default=200.0, help="seconds for FlashInfer's JIT")
    ap.add_argument("--max-peer-gb", type=float, default=20.0)
    ap.add_argument("--ncu", action="store_true", help="our op only on --ncu-row, a few calls")
    ap.add_argument("--ncu-row", default="B64 x 8k", help="the row --ncu runs")
    ap.add_argument("--ncu-calls", type=int, default=5)
    ap.add_argument("--memcheck", action="store_true", help="small edge cases, for compute-sanitizer")
    ap.add_argument("--results-dir", default=common.RESULTS_DIR)
    a = ap.parse_args()

    common.require_cuda("bench_decode")
    import dms_ext  # noqa: F401  registers torch.ops.dms
    if a.ncu:
        return ncu_mode(a)
    if a.memcheck:
        return memcheck_mode(a)

    t0 = time.time()
    cases = [c for c in CASES if not a.rows or any(s.strip() in c.name for s in a.rows.split(","))]
    info = common.gpu_info()
    print(f"{info['gpu']}, torch {info['torch']}, CUDA {info['cuda']}, cuDNN {info['cudnn']}", flush=True)

    errors = []
    fi_ok, fi_note, fi_tc_dims = False, "disabled (--no-flashinfer)", (64, 128)
    fi_fp8 = None
    if a.flashinfer and a.peers:
        import flashinfer_peer as fp
        dims = sorted({c.D for c in cases if c.kv != "fp8"})  # the fp8 rows' modules: below
        tc_dims = [d for d in dims if d in fi_tc_dims]
        fi_ok, fi_note = fp.ready(a.fi_timeout, head_dims=dims, dtypes=(a.dtype,), tc_head_dims=tc_dims)
        fp8_dims = sorted({c.D for c in cases if c.kv == "fp8"})
        if fi_ok and fp8_dims:
            # Its own warm-up call: an fp8 JIT failure or timeout loses the fp8 peer only.
            ok8, msg8 = fp.ensure_built(a.fi_timeout, head_dims=(), dtypes=(a.dtype,), tc_head_dims=(),
                                        fp8_head_dims=fp8_dims, fp8_tc_head_dims=fp8_dims)
            got = {(d, tc): why for (q, d, tc), why in fp.fp8_modes().items() if q == a.dtype}
            fi_fp8 = {(d, tc): (got.get((d, tc), "not reported by the warm-up") if ok8 else msg8)
                      for d in fp8_dims for tc in (True, False)}
            fi_note += "; fp8 KV peer: " + ", ".join(
                f"D{d} tc={tc} {'ok' if why is None else 'unavailable'}"
                for (d, tc), why in sorted(fi_fp8.items()))
            errors += [f"FlashInfer fp8 D{d} tc={tc}: {why}" for (d, tc), why in sorted(fi_fp8.items())
                       if why is not None]
        print(f"FlashInfer: {fi_note}", flush=True)

    ceil = _try(common.measure_ceiling, "ceiling", errors)
    if ceil:
        print(ceil.md(), flush=True)
    rows = []
    for c in cases:
        r = _try(lambda: run_case(c, a, ceil, fi_ok, fi_tc_dims, errors, fi_fp8), c.name, errors)
        if r is not None:
            rows.append(r)
        torch.cuda.empty_cache()
    body, summary = report(rows, ceil, a, fi_note, errors, time.time() - t0)
    path = common.write_results("decode", "sparse_decode bench", body, a.results_dir)
    print()
    print(body)
    print(f"wrote {path}")
    print(summary)


if __name__ == "__main__":
    main()
