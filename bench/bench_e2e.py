"""bench_e2e: decode throughput of a Qwen3-8B-shaped model, DMS (CR 8) vs dense, equal KV memory.

    python bench/bench_e2e.py [--contexts 8192,32768] [--kv-gib 40] [--cr 8] [--steps 20]
    python bench/bench_e2e.py --smoke          # tiny shapes on the CPU ops: checks the code path
    python bench/bench_e2e.py --kv-dtype fp8   # adds a DMS row with fp8 e4m3 pools (same budget)
    python bench/bench_e2e.py --dists uniform,skewed,heavy   # one DMS row per length distribution

The model: 36 layers, hidden 4096, Hq 32, Hkv 8, D 128, MLP 12288, vocab 151936, q/k RMSNorm,
random bf16 weights (about 16 GB), so projections, MLP, lm_head and greedy argmax all run and the
ratio is honest. One decode step = embedding, 36 layers, final norm, lm_head, argmax, the token
fed back: captured once as a CUDA graph per path and replayed.

* DMS: per layer ``dms.decode_step`` (q/k norm, borrowed-neuron logit, RoPE, window bookkeeping,
  K/V write into the paged per-head cache) then ``dms.sparse_decode`` over the live tokens.
* Dense: the same projections and MLP; q/k norm + RoPE by the same fused op (dms.eviction_rope,
  its logits unused; the borrowed channel it zeroes changes values, not work), K/V written into
  a contiguous cache [B, Hkv, L, D] (the slot of position p is p mod L: a steady state of L tokens),
  attention by torch SDPA with the fastest of cuDNN / flash / efficient (picked by timing), the
  GQA group laid out as G query rows per KV head (no repeat of K/V).

Memory: both paths get the same KV budget (--kv-gib, default 40 GiB); each runs the largest batch
whose cache fits. Dense: B * 36 * 2 * Hkv * L * D * 2 bytes. DMS: the block pools (every layer's
pool sized for the layer that needs most) plus block tables, rings and lengths, with room for
each head to grow by one token per timed step.

FP8 (``--kv-dtype fp8``): the DMS path runs twice in the same run, once with pools of the compute
dtype ('DMS CR 8') and once with float8_e4m3fn pools ('DMS CR 8 fp8') at the same KV budget, so
its batch is about 2x; ``decode_step`` quantizes the new K/V on the write and ``sparse_decode``
dequantizes with k_scale = v_scale = FP8_SCALE (1.0: the random K/V are ~N(0, 1), far from the
e4m3 limit of 448, so nothing saturates).

Prefill is synthetic (what "at context L" means here): every DMS sequence has seen L tokens; each
(sequence, layer, head) keeps n tokens, drawn by bench_decode.make_lens's rule for the
distribution (``--dists``, comma list, default uniform; one DMS row per distribution, and per
pool dtype with --kv-dtype fp8), over all layers x sequences x heads at once:

* uniform: n uniform in [0.5, 1.5] x L/CR (the only one that --cr sets);
* skewed:  a quarter of the heads keep all L tokens, the rest only the window;
* heavy:   per-head CR log-uniform in [1, 64] (n = L / CR; mean live about L / 4.2).

n is then floored at window + 1 (the ring) and capped at L. The batch that fits the budget
depends on the distribution: every layer's pool is sized for the layer whose heads need most.
The state tensors are written directly and consistently (block tables from a shuffled pool, the
ring holding the last window + 1 tokens with flags drawn at each head's own steady-state eviction
rate, 1 - (n - window - 1) / (L - window - 1), so a full-context head keeps every token and a
window-only head evicts every one; the free stack holds the rest), K/V are random. From there
each timed step runs the real bookkeeping with the random model's own eviction logits.
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
import bench_decode  # noqa: E402  make_lens: the per-head length distributions
import common  # noqa: E402


@dataclass
class Shape:
    layers: int = 36
    hidden: int = 4096
    hq: int = 32
    hkv: int = 8
    d: int = 128
    inter: int = 12288
    vocab: int = 151936
    eps: float = 1e-6
    theta: float = 1_000_000.0

    @property
    def g(self) -> int:
        return self.hq // self.hkv


FP8_SCALE = 1.0          # k_scale = v_scale of the fp8 pools (a power of two: exact)
KV_DTYPES = {"bf16": None, "fp8": torch.float8_e4m3fn}   # None: the compute dtype

SMOKE = Shape(layers=2, hidden=256, hq=8, hkv=2, d=32, inter=512, vocab=1000)
DISTS = ("uniform", "skewed", "heavy")   # bench_decode.Case.dist


class Weights:
    """Random weights of the whole model, Qwen3 layout (q/k RMSNorm on the head dim)."""

    def __init__(self, s: Shape, dtype, device, gen):
        def mat(o, i):
            return torch.empty(o, i, dtype=dtype, device=device).normal_(0, 0.02, generator=gen)

        def norm(n):
            return (1 + 0.1 * torch.randn(n, device=device, generator=gen)).to(dtype)

        self.embed = mat(s.vocab, s.hidden)
        self.lm_head = mat(s.vocab, s.hidden)
        self.norm = norm(s.hidden)
        self.layers = []
        for _ in range(s.layers):
            self.layers.append(dict(
                ln1=norm(s.hidden), wq=mat(s.hq * s.d, s.hidden), wk=mat(s.hkv * s.d, s.hidden),
                wv=mat(s.hkv * s.d, s.hidden), qn=norm(s.d), kn=norm(s.d),
                wo=mat(s.hidden, s.hq * s.d), ln2=norm(s.hidden),
                w_gu=mat(2 * s.inter, s.hidden), w_down=mat(s.hidden, s.inter)))

    def nbytes(self) -> int:
        n = sum(t.numel() * t.element_size() for t in (self.embed, self.lm_head, self.norm))
        for L in self.layers:
            n += sum(t.numel() * t.element_size() for t in L.values())
        return n


def rope_table(rows: int, d: int, theta: float, device) -> torch.Tensor:
    from dms_ext.reference import rope_cache
    return rope_cache(rows, d, theta).to(device)


def _mlp(x, W, s: Shape):
    h = F.rms_norm(x, (s.hidden,), W["ln2"], s.eps)
    gu = h @ W["w_gu"].t()
    return x + (F.silu(gu[:, : s.inter]) * gu[:, s.inter:]) @ W["w_down"].t()


def _head(x, w: Weights, s: Shape, tokens):
    logits = F.rms_norm(x, (s.hidden,), w.norm, s.eps) @ w.lm_head.t()
    tokens.copy_(logits.argmax(-1))


# ----------------------------------------------------------------------------- DMS path

class DMSState:
    """Synthetic prefill of every layer's paged per-head cache (see the module docstring)."""

    def __init__(self, s: Shape, lens: torch.Tensor, L: int, window: int, bs: int, grow: int,
                 num_blocks: int, dtype, device, gen_cpu, p_evict: float, kv_dtype=None,
                 kv_scale: float = 1.0):
        nl, B, hkv = lens.shape
        R = window + 1
        self.B, self.bs, self.window = B, bs, window
        kv_dtype = kv_dtype or dtype
        self.k_scale = self.v_scale = float(kv_scale) if kv_dtype != dtype else 1.0
        maxb = int(-(-(int(lens.max()) + grow) // bs))
        self.layers = []
        dev = device
        for li in range(nl):
            ln = lens[li].to(torch.int64)                                 # [B, hkv]
            nb = (ln + bs - 1) // bs
            used = int(nb.sum())
            perm = torch.randperm(num_blocks, generator=gen_cpu).to(torch.int32)
            table = torch.full((B, hkv, maxb), -1, dtype=torch.int32)
            mask = torch.arange(maxb)[None, None, :] < nb[..., None]
            table[mask] = perm[:used]
            free = torch.zeros(num_blocks, dtype=torch.int32)
            free[: num_blocks - used] = perm[used:]
            # Ring: token t sits at t % R; the window's tokens hold the newest R slots. Their
            # flags follow the steady-state eviction rate; the newest token's is not decided yet.
            t = torch.arange(L - R, L)
            slots = ln[..., None] - R + torch.arange(R)[None, None, :]      # [B, hkv, R]
            pe = p_evict[li][..., None] if torch.is_tensor(p_evict) else p_evict   # [B, hkv, 1]
            flags = (torch.rand(B, hkv, R, generator=gen_cpu) < pe).to(torch.int64)
            flags[..., -1] = 0
            ring = torch.zeros(B, hkv, R, dtype=torch.int64)
            ring[..., t % R] = (slots << 1) | flags
            kc = torch.empty(num_blocks, bs, s.d, dtype=dtype, device=dev).normal_()
            vc = torch.empty_like(kc).normal_()
            if kv_dtype != dtype:   # fp8: stored = x / scale (N(0, 1) never nears +-448)
                kc = (kc / self.k_scale).to(kv_dtype)
                vc = (vc / self.v_scale).to(kv_dtype)
            self.layers.append(dict(
                k_cache=kc, v_cache=vc, block_table=table.to(dev), seq_lens=ln.to(torch.int32).to(dev),
                ring=ring.to(torch.int32).to(dev),
                num_tokens=torch.full((B,), L, dtype=torch.int32, device=dev),
                free_stack=free.to(dev),
                free_top=torch.tensor([num_blocks - used], dtype=torch.int32, device=dev)))
        self.slots = torch.arange(B, dtype=torch.int32, device=dev)
        self.pool_bytes = nl * 2 * num_blocks * bs * s.d * torch.tensor([], dtype=kv_dtype).element_size()
        self.meta_bytes = nl * meta_bytes_per_row(hkv, maxb, R) * B

    def live_tokens(self) -> int:
        return int(sum(int(L["seq_lens"].sum()) for L in self.layers))


def meta_bytes_per_row(hkv: int, maxb: int, R: int) -> int:
    # block_table + ring + seq_lens (int32) per layer and row, + num_tokens
    return 4 * (hkv * maxb + hkv * R + hkv + 1)


def dms_step(w: Weights, s: Shape, st: DMSState, table, tokens, alpha_scale, alpha_offset):
    B = tokens.shape[0]
    x = w.embed[tokens]
    scale = s.d ** -0.5
    for W, L in zip(w.layers, st.layers):
        h = F.rms_norm(x, (s.hidden,), W["ln1"], s.eps)
        q = (h @ W["wq"].t()).view(B, s.hq, s.d)
        k = (h @ W["wk"].t()).view(B, s.hkv, s.d)
        v = (h @ W["wv"].t()).view(B, s.hkv, s.d)
        torch.ops.dms.decode_step(q, k, v, table, st.slots, L["k_cache"], L["v_cache"],
                                  L["block_table"], L["seq_lens"], L["ring"], L["num_tokens"],
                                  L["free_stack"], L["free_top"], alpha_scale, alpha_offset,
                                  W["qn"], W["kn"], s.eps, None, st.k_scale, st.v_scale)
        o = torch.ops.dms.sparse_decode(q, L["k_cache"], L["v_cache"], L["block_table"],
                                        L["seq_lens"], scale, st.k_scale, st.v_scale)
        x = x + o.view(B, s.hq * s.d) @ W["wo"].t()
        x = _mlp(x, W, s)
    _head(x, w, s, tokens)


# ----------------------------------------------------------------------------- dense path

class DenseState:
    def __init__(self, s: Shape, B: int, L: int, dtype, device):
        self.B, self.L = B, L
        self.k = [torch.empty(B, s.hkv, L, s.d, dtype=dtype, device=device).normal_()
                  for _ in range(s.layers)]
        self.v = [torch.empty_like(k).normal_() for k in self.k]
        self.pos = torch.tensor([L], dtype=torch.int64, device=device)
        self.positions = torch.full((B,), L, dtype=torch.int64, device=device)
        self.bytes = 2 * s.layers * B * s.hkv * L * s.d * torch.tensor([], dtype=dtype).element_size()


def dense_step(w: Weights, s: Shape, st: DenseState, table, tokens, backend):
    from torch.nn.attention import sdpa_kernel
    B = tokens.shape[0]
    x = w.embed[tokens]
    slot = torch.remainder(st.pos, st.L)
    scale = s.d ** -0.5
    for li, W in enumerate(w.layers):
        h = F.rms_norm(x, (s.hidden,), W["ln1"], s.eps)
        q = (h @ W["wq"].t()).view(B, s.hq, s.d)
        k = (h @ W["wk"].t()).view(B, s.hkv, s.d)
        v = (h @ W["wv"].t()).view(B, s.hkv, 1, s.d)
        # q/k RMSNorm + RoPE in one fused op, as the DMS path gets (its logits are unused here),
        # so the comparison is about the cache and attention, not launch counts.
        torch.ops.dms.eviction_rope(q, k, st.positions, table, 0.0, 0.0, W["qn"], W["kn"], s.eps)
        st.k[li].index_copy_(2, slot, k.view(B, s.hkv, 1, s.d))
        st.v[li].index_copy_(2, slot, v)
        with sdpa_kernel([backend]):
            o = F.scaled_dot_product_attention(q.view(B, s.hkv, s.g, s.d), st.k[li], st.v[li],
                                               scale=scale)
        x = x + o.reshape(B, s.hq * s.d) @ W["wo"].t()
        x = _mlp(x, W, s)
    _head(x, w, s, tokens)
    st.pos.add_(1)
    st.positions.add_(1)


def pick_sdpa_backend(s: Shape, B: int, L: int, dtype, device) -> tuple:
    """The fastest SDPA backend that runs [B, Hkv, G, D] x [B, Hkv, L, D] (eager timing)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = torch.randn(B, s.hkv, s.g, s.d, dtype=dtype, device=device)
    k = torch.randn(B, s.hkv, L, s.d, dtype=dtype, device=device)
    best, notes = None, []
    for name in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"):
        be = getattr(SDPBackend, name)
        try:
            with sdpa_kernel([be]):
                F.scaled_dot_product_attention(q, k, k)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(5):
                    F.scaled_dot_product_attention(q, k, k)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                us = (time.perf_counter() - t0) / 5 * 1e6
        except RuntimeError as e:
            notes.append(f"{name}: {str(e).splitlines()[0][:60]}")
            continue
        notes.append(f"{name} {us:.0f} us")
        if best is None or us < best[1]:
            best = (be, us, name)
        if device.type == "cuda" and name == "EFFICIENT_ATTENTION" and best is not None:
            break  # MATH is never the fastest on a GPU
    del q, k
    return best[0], best[2], "; ".join(notes)


# ----------------------------------------------------------------------------- sizing

def dms_lens(s: Shape, B: int, L: int, cr: float, window: int, gen,
             dist: str = "uniform") -> torch.Tensor:
    """int64 [layers, B, Hkv] live lengths: bench_decode.make_lens's rule for `dist` drawn over
    all layers x B x Hkv heads at once (its skewed heads keep `window` tokens), then floored at
    window + 1 (the ring) and capped at L."""
    if dist not in DISTS:
        raise ValueError(f"unknown length distribution {dist!r} (one of {', '.join(DISTS)})")
    c = bench_decode.Case(f"e2e {dist}", s.layers * B, L, hq=s.hq, hkv=s.hkv, D=s.d, dist=dist)
    lens = bench_decode.make_lens(c, cr, gen, window)
    return lens.view(s.layers, B, s.hkv).to(torch.int64).clamp(min=min(L, window + 1), max=L)


def dms_fit(s: Shape, L: int, cr: float, window: int, bs: int, grow: int, budget: int, esize: int,
            gen, max_batch: int = 0, dist: str = "uniform") -> tuple:
    """Largest B whose pools (each layer sized for the most demanding layer) + metadata fit
    (at most max_batch when > 0), lengths drawn from `dist`: (B, lens [layers, B, hkv], blocks).

    B is searched over the prefixes of one long draw, then the lengths are drawn again for
    exactly B rows (so the state follows the rule as make_lens applies it to a whole draw, e.g.
    skewed: exactly a quarter of the heads at L), one row fewer while that draw does not fit."""
    block_bytes = 2 * bs * s.d * esize

    def cost(lens):  # per row count b: (fits, pool blocks per layer) of rows [0, b)
        per_b = ((lens + grow + bs - 1) // bs).cumsum(1).sum(-1)  # [layers, B] prefix sums
        maxb = int(-(-(int(lens.max()) + grow) // bs))

        def fits(b):
            blocks = int(per_b[:, b - 1].max())
            meta = s.layers * b * meta_bytes_per_row(s.hkv, maxb, window + 1)
            return s.layers * blocks * block_bytes + meta <= budget, blocks
        return fits

    mean_blocks = (L / cr + grow) / bs + 0.5
    rows = 2 * (int(budget / (s.layers * (s.hkv * mean_blocks * block_bytes))) + 8) + 16
    while True:  # the guess is from uniform's mean: draw more rows while all of them fit
        fits = cost(dms_lens(s, rows, L, cr, window, gen, dist))
        lo, hi = 0, rows if max_batch <= 0 else min(rows, max_batch)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(mid)[0]:
                lo = mid
            else:
                hi = mid - 1
        if lo < rows or 0 < max_batch <= rows:
            break
        rows *= 2
    while lo > 0:
        lens = dms_lens(s, lo, L, cr, window, gen, dist)
        ok, blocks = cost(lens)(lo)
        if ok:
            return lo, lens, blocks
        lo -= 1
    raise ValueError("kv budget too small for one DMS sequence")


# ----------------------------------------------------------------------------- timing

PROFILES = []   # --profile: one kernel table per DMS row


def time_step(fn, steps: int, device, graph: bool) -> tuple:
    """Median seconds per decode step: `steps` replays of a one-step CUDA graph (eager on CPU)."""
    if device.type != "cuda":
        fn()
        ts = []
        for _ in range(steps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2], "eager (cpu)"
    common.warm_up([fn])
    g, mode = common.capture(fn, "CUDA graph") if graph else (None, "eager")
    run = g.replay if g is not None else fn
    run()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(steps)]
    for a, b in ev:
        a.record()
        run()
        b.record()
    torch.cuda.synchronize()
    ts = sorted(a.elapsed_time(b) * 1e-3 for a, b in ev)
    return ts[len(ts) // 2], mode


# ----------------------------------------------------------------------------- main

def run_context(L: int, a, s: Shape, w: Weights, dtype, device, gen_cpu, gen_dev) -> dict:
    esize = torch.tensor([], dtype=dtype).element_size()
    budget = int(a.kv_gib * 2**30)
    grow = a.steps + 8                     # tokens a head may gain over warm-up + timed steps
    table = rope_table(L + grow + 8, s.d, s.theta, device)
    r = {"L": L}

    # Dense.
    per_seq = 2 * s.layers * s.hkv * L * s.d * esize
    Bd = budget // per_seq
    if a.batch:
        Bd = min(Bd, a.batch)
    r["dense_B"] = int(Bd)
    if Bd >= 1:
        try:
            backend, bname, notes = pick_sdpa_backend(s, int(Bd), L, dtype, device)
            r["dense_backend"], r["dense_backend_notes"] = bname, notes
            st = DenseState(s, int(Bd), L, dtype, device)
            tokens = torch.randint(0, s.vocab, (int(Bd),), device=device, generator=gen_dev)
            t, mode = time_step(lambda: dense_step(w, s, st, table, tokens, backend), a.steps,
                                device, not a.no_graph)
            r.update(dense_s=t, dense_mode=mode, dense_kv=st.bytes, dense_tps=Bd / t)
        except Exception as e:  # report and go on: the DMS row still means something
            r["dense_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            print(f"L {L} dense failed: {r['dense_error']}", flush=True)
        st = tokens = None
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # DMS: one row per length distribution and pool dtype (bf16 first; with --kv-dtype fp8 also
    # fp8 at the same budget).
    r["dms"] = [run_dms(L, a, s, w, dtype, device, gen_cpu, gen_dev, table, budget, grow, kvd, dist)
                for dist in parse_dists(a.dists)
                for kvd in (["bf16"] if a.kv_dtype == "bf16" else ["bf16", a.kv_dtype])]
    if device.type == "cuda":
        r["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    for d in r["dms"]:
        d["speedup"] = d["tps"] / r["dense_tps"] if r.get("dense_tps") else None
    return r


def run_dms(L: int, a, s: Shape, w: Weights, dtype, device, gen_cpu, gen_dev, table, budget: int,
            grow: int, kvd: str, dist: str = "uniform") -> dict:
    """The DMS path with pools of KV_DTYPES[kvd] (None: the compute dtype) at the KV budget,
    live lengths drawn from `dist`."""
    kv_dtype = KV_DTYPES[kvd] or dtype
    esize = torch.tensor([], dtype=kv_dtype).element_size()
    d = dict(kv=kvd if kv_dtype != dtype else "", dist=dist, B=0, s=math.nan, mode="-", pool=0,
             meta=0, live=0, tps=0.0, cr=math.nan, live_growth=0.0, sane=False, len_min=0,
             len_max=0, full_frac=math.nan)
    st = tokens = None
    try:
        Bm, lens, nblocks = dms_fit(s, L, a.cr, a.window, a.block_size, grow, budget, esize,
                                    gen_cpu, a.batch or 0, dist)
        d.update(len_min=int(lens.min()), len_max=int(lens.max()),
                 full_frac=float((lens == L).double().mean()))
        # Each head's steady-state eviction rate: it kept n - R of the L - R tokens past the ring.
        R = a.window + 1
        p_evict = 1.0 - ((lens - R).double() / max(1, L - R)).clamp(0.0, 1.0)
        st = DMSState(s, lens, L, a.window, a.block_size, grow, nblocks, dtype, device, gen_cpu,
                      p_evict, kv_dtype=kv_dtype, kv_scale=FP8_SCALE)
        live0 = st.live_tokens()
        tokens = torch.randint(0, s.vocab, (Bm,), device=device, generator=gen_dev)
        t, mode = time_step(lambda: dms_step(w, s, st, table, tokens, a.alpha_scale,
                                             a.alpha_offset), a.steps, device, not a.no_graph)
        if a.profile and device.type == "cuda":
            def steps(k):
                for _ in range(k):
                    dms_step(w, s, st, table, tokens, a.alpha_scale, a.alpha_offset)
            PROFILES.append(common.kernel_profile_md(
                f"one eager raw-op DMS step (L {L}, {dist}, {kvd}, B {Bm}; profile of 12 steps minus 4, / 8)",
                common.kernel_profile(steps), s.layers))
            print(PROFILES[-1], flush=True)
        live1 = st.live_tokens()
        cap = st.layers[0]["block_table"].shape[-1] * a.block_size
        # Every head grows by at most one token a step and never past its block table.
        ok = (all(int(Ly["free_top"]) >= 0 and int(Ly["seq_lens"].max()) <= cap
                  for Ly in st.layers)
              and 0 <= live1 - live0 <= (a.steps + 2) * s.layers * Bm * s.hkv
              and bool(((tokens >= 0) & (tokens < s.vocab)).all()))
        d.update(B=Bm, s=t, mode=mode, pool=st.pool_bytes, meta=st.meta_bytes,
                 live=live0 * 2 * s.d * esize, tps=Bm / t,
                 cr=(Bm * s.layers * s.hkv * L) / live0,
                 live_growth=(live1 - live0) / max(live0, 1), sane=ok)
    except Exception as e:  # report it in the table; the other rows still mean something
        d["mode"] = f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        print(f"L {L} DMS {dist} {d['kv']} {d['mode']}", flush=True)
    st = tokens = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return d


def report(rows, a, s: Shape, wbytes: int, wall: float, info: dict) -> str:
    gib = lambda x: x / 2**30 if x is not None else None  # noqa: E731
    hdr = ["context", "path", "dist", "max batch", "KV GiB (budget " + f"{a.kv_gib:g})", "step ms",
           "tokens/s", "x dense", "notes"]
    out = []
    for r in rows:
        out.append([r["L"], f"dense ({r.get('dense_backend', '-')})", "-", r.get("dense_B"),
                    gib(r.get("dense_kv")), (r.get("dense_s") or math.nan) * 1e3, r.get("dense_tps"),
                    1.0 if r.get("dense_tps") else None,
                    r.get("dense_error") or r.get("dense_mode", "-")])
        for d in r["dms"]:
            out.append([r["L"], dms_name(a, d), d["dist"], d["B"], gib(d["pool"] + d["meta"]),
                        d["s"] * 1e3, d["tps"], d.get("speedup"),
                        f"{d['mode']}; live KV {gib(d['live']):.1f} GiB, achieved CR "
                        f"{d['cr']:.2f}, live lengths {d['len_min']}..{d['len_max']} "
                        f"({100 * d['full_frac']:.1f}% of heads at L), metadata {d['meta'] / 2**20:.0f} MiB, live grew "
                        f"{100 * d['live_growth']:.2f}% over the steps{'' if d['sane'] else ', NOT SANE'}"])
    md = common.md_table(hdr, out)
    lines = [
        f"Model: {s.layers} layers, hidden {s.hidden}, Hq {s.hq}, Hkv {s.hkv}, D {s.d}, MLP "
        f"{s.inter}, vocab {s.vocab}; random {'bf16' if a.dtype == 'bf16' else a.dtype} weights "
        f"{wbytes / 2**30:.1f} GiB. Window {a.window}, block {a.block_size}, alpha "
        f"{a.alpha_scale:g}/{a.alpha_offset:g}. Median of {a.steps} decode steps (each one full "
        f"model step incl. lm_head + argmax).",
        "",
        md,
        "",
        "Dense: contiguous cache, exactly L tokens per sequence (slot = position mod L), SDPA "
        "backend picked by timing. DMS: paged per-head cache from a synthetic prefill, per-head "
        "live lengths by the row's dist (bench_decode.make_lens's rules; all floored at window + 1): "
        f"uniform = [0.5, 1.5] x L/CR (CR {a.cr:g}), skewed = a quarter of the heads keep all L "
        "tokens and the rest only the window, heavy = per-head CR log-uniform in [1, 64]; --cr sets "
        "only uniform, the others' CR is the achieved one in the notes. KV GiB counts the whole "
        "block pools (sized for the most demanding layer, with growth room) plus tables and rings.",
    ]
    if a.kv_dtype != "bf16":
        lines.append(f"- 'DMS CR {a.cr:g} {a.kv_dtype}': float8_e4m3fn pools at the same budget "
                     f"(1 byte per K/V value), k_scale = v_scale = {FP8_SCALE:g}; the other DMS "
                     f"row has pools of the compute dtype ({a.dtype}).")
    for r in rows:
        if r.get("dense_backend_notes"):
            lines.append(f"- L {r['L']}: SDPA backends: {r['dense_backend_notes']}")
    if rows and rows[-1].get("peak_gib"):
        lines.append(f"- peak memory allocated: {rows[-1]['peak_gib']:.1f} GiB")
    lines.append(f"- wall time {wall:.0f} s; GPU {info.get('gpu')}, torch {info.get('torch')}")
    return "\n".join(lines)


def dms_name(a, d: dict) -> str:
    """'DMS CR 8' (uniform: the CR that --cr sets), 'DMS skewed', 'DMS heavy'; + ' fp8'."""
    base = f"DMS CR {a.cr:g}" if d.get("dist", "uniform") == "uniform" else f"DMS {d['dist']}"
    return base + (f" {d['kv']}" if d["kv"] else "")


def summary_name(d: dict) -> str:
    """'DMS', 'DMS fp8', 'DMS skewed', 'DMS skewed fp8', ... (the SUMMARY line's labels)."""
    return " ".join(["DMS"] + [x for x in (d.get("dist", "uniform"), d["kv"])
                               if x and x != "uniform"])


def parse_dists(text: str) -> list:
    dists = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in dists if x not in DISTS]
    if bad or not dists:
        raise ValueError(f"--dists: {', '.join(bad) or 'empty'}; accepted: {', '.join(DISTS)}")
    return dists


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="8192,32768")
    ap.add_argument("--kv-gib", type=float, default=40.0)
    ap.add_argument("--cr", type=float, default=8.0)
    ap.add_argument("--batch", type=int, default=None,
                    help="at most this batch on both paths (default: the largest that fits the budget); "
                         "bench_hf compares its per-step time with this at its own batch")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--alpha-scale", type=float, default=100.0)
    ap.add_argument("--alpha-offset", type=float, default=5.0)
    ap.add_argument("--steps", type=int, default=20, help="timed decode steps per path")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (quick look)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--kv-dtype", default="bf16", choices=sorted(KV_DTYPES),
                    help="DMS pool dtype: bf16 = the compute dtype (--dtype); fp8 = e4m3 pools, "
                         "run next to the compute-dtype DMS row at the same KV budget")
    ap.add_argument("--dists", default="uniform",
                    help="comma list of per-head live-length distributions, one DMS row each "
                         f"(and each pool dtype): {', '.join(DISTS)} (bench_decode.make_lens)")
    ap.add_argument("--no-graph", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="also list the GPU kernels of one eager DMS step (torch.profiler)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model on the CPU ops (or --device), 2 contexts, no results file")
    ap.add_argument("--device", default=None)
    ap.add_argument("--results-dir", default=common.RESULTS_DIR)
    a = ap.parse_args()
    try:
        parse_dists(a.dists)
    except ValueError as e:
        ap.error(str(e))

    t0 = time.time()
    s = Shape()
    if a.smoke:
        s = SMOKE
        a.contexts = "256,640" if a.contexts == "8192,32768" else a.contexts
        a.kv_gib = min(a.kv_gib, 0.004)
        a.window, a.block_size, a.steps = 32, 16, min(a.steps, 4)
        device = torch.device(a.device or "cpu")
    else:
        common.require_cuda("bench_e2e")
        device = torch.device(a.device or "cuda")
    if a.layers:
        s = Shape(**{**s.__dict__, "layers": a.layers})
    import dms_ext  # noqa: F401  registers torch.ops.dms
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    gen_cpu = torch.Generator().manual_seed(a.seed)
    gen_dev = torch.Generator(device=device).manual_seed(a.seed)
    info = common.gpu_info() if device.type == "cuda" else {"gpu": "cpu", "torch": torch.__version__}
    print(f"{info.get('gpu')}, torch {info.get('torch')}: building weights", flush=True)
    w = Weights(s, dtype, device, gen_dev)
    rows = []
    for L in [int(x) for x in a.contexts.split(",")]:
        r = run_context(L, a, s, w, dtype, device, gen_cpu, gen_dev)
        print(f"L {L}: dense B {r.get('dense_B')} {r.get('dense_tps', 0):.0f} tok/s | " + " | ".join(
              f"{dms_name(a, d)} B {d['B']} {d['tps']:.0f} tok/s x{(d.get('speedup') or 0):.2f} "
              f"(CR {d['cr']:.2f}, {d['mode']})" for d in r["dms"]), flush=True)
        rows.append(r)
    body = report(rows, a, s, w.nbytes(), time.time() - t0, info)
    if PROFILES:
        body = body.rstrip() + "\n\n" + "\n\n".join(PROFILES) + "\n"
    print(body)
    print("SUMMARY: " + "; ".join(
        f"L{r['L']} dense B{r.get('dense_B')} {r.get('dense_tps') or 0:.0f} tok/s, " + ", ".join(
            summary_name(d) + f" B{d['B']} {d['tps']:.0f} tok/s, "
            f"x{(d.get('speedup') or 0):.2f}" for d in r["dms"]) for r in rows), flush=True)
    if not a.smoke:
        path = common.write_results("e2e", "End-to-end decode: DMS vs dense at equal KV memory",
                                    body, a.results_dir)
        print(f"wrote {path}")
    if not all(d["sane"] for r in rows for d in r["dms"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
