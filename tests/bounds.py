"""The error bound of a half-precision attention kernel (issue 17): every CUDA attention
comparison of the test suite holds a kernel to it.

`attention_bound` (one KV head, float64 reference and per-element bounds, derivation in its
docstring), `paged_heads` / `decode_bound` (every (row, KV head) of a paged decode), `dms_bound`
(one sequence under the DMS visibility rule), `bound_violations` / `assert_within_bound` (the
comparison). Re-exported by helpers, so `from helpers import attention_bound` works too.
"""
from __future__ import annotations

import math

import torch

from dms_ext import reference

LAMBDA = 8.0     # probabilistic rounding-error bounds hold with probability >= 1 - 2 exp(-L^2 / 2)
SAFETY = 2.0     # every modelled rounding may happen twice (see attention_bound)
U32 = 2.0 ** -24
FTZ32 = 2.0 ** -126   # float32's smallest normal: results below it may flush to zero (term 6)


def unit_roundoff(dtype):
    """u = eps / 2: round to nearest moves x by at most u |x| (normal range)."""
    return torch.finfo(dtype).eps / 2


def attention_bound(q, k, v, scale, dtype, mask=None):
    """Reference and per-element error bounds of one KV head's attention, in float64.

    q [Q, D] (the queries that read this KV head), k, v [n, D] (the keys and values as stored,
    already rounded to `dtype`), mask [Q, n] bool (visible keys; None: all). Returns
    (o [Q, D], lse [Q], tol_o [Q, D], tol_lse [Q]); rows that see no key have o = 0, lse = -inf,
    tol = 0 (the kernel must give exact zeros / -inf there).

    The algorithm bounded: flash-decoding with float32 scores and accumulators: s_j = scale q.k_j
    (dtype x dtype products are exact in float32, D - 1 float32 additions, then x scale), an online
    softmax P_j = exp(s_j - m) in float32, l = sum_j P_j in float32, P rounded to `dtype` for the
    PV product (tensor cores), acc = sum_j P_j v_j in float32, o = acc / l rounded to `dtype`,
    lse = m + log l. u32 = 2^-24, u = unit roundoff of dtype, eta = its smallest subnormal,
    c_j = |scale| sum_i |q_i k_ji| (the condition of the dot product), m = max_j s_j, p = softmax(s).

    1. Scores: |s^_j - s_j| <= Delta_j = u32 ((D + 2) c_j + |s_j - m|): D - 1 additions of terms
       bounded by c_j (recursive summation, gamma_{D-1} ~ (D-1) u32), the scale product, the
       log2(e) product, and the rounding of s_j - m before exp. Worst case, not probabilistic.
    2. Through softmax, exactly: p^_j / p_j = e^{d_j} / E with E = sum_i p_i e^{d_i} in
       [E-, E+] = [sum p e^{-Delta}, sum p e^{Delta}], so |p^_j - p_j| <= dp_j =
       max(p_j e^{Delta_j} / E- - p_j, p_j - p_j e^{-Delta_j} / E+) and, since sum p^ = sum p,
       |o(s^) - o(s)| <= sum_j dp_j |v_j - o|.   lse: lse(s - Delta) <= lse(s^) <= lse(s + Delta).
       Both are evaluated in float64 in the log domain, so huge Delta (scores of order 1e5) and
       far-off keys (p_j ~ 0, Delta_j large) are handled without a max over keys.
    3. P rounded to dtype: each P_j moves by at most a_j = max(u P_j, eta / 2); l may be summed
       from the unrounded P, so the error is sum_j eps_j p_j v_j (not v_j - o): we take |v_j| + |o|
       to cover either convention. The eps_j are independent, mean-zero, bounded roundings
       (Higham & Mary, SIAM J. Sci. Comput. 2019): Hoeffding gives
       |sum_j a_j e_j (|v_j| + |o|)| <= LAMBDA sqrt(sum_j a_j^2 (|v_j| + |o|)^2) with probability
       >= 1 - 2 exp(-LAMBDA^2 / 2) = 1 - 2.5e-14 per element (LAMBDA = 8). Exactly tied scores
       give P_j = 1, exact, so correlated roundings do not arise from ties.
    4. float32 accumulation of acc and l over n keys (any order, split-KV merge included), the
       same probabilistic model: LAMBDA sqrt(n) u32 (sum_j p_j |v_j| + |o|); for lse,
       LAMBDA sqrt(n) u32 + 4 u32 (exp2 / log2 approximations, 2 ulp each).
    5. Output rounding to dtype: u |o| + eta / 2 (exact, not multiplied by SAFETY); lse is
       float32: u32 |lse|.
    6. float32 results below 2^-126 may flush to zero (ex2.approx.ftz for P, the final o = acc / l):
       a P_j under 2^-126 may be lost entirely, a deterministic (not mean-zero) error of at most
       sum_j min(p_j, tau) (|v_j| + |o|) with tau = 2^-126 e^{m - lse} (the flush threshold on the
       normalised scale), and o itself loses up to 2^-126. This only matters for bf16 outputs
       near 1e-38 (the 10x differential suites found heads whose output was such a remnant).

    tol_o = SAFETY (term 2 + term 3 + term 4 + term 6) + term 5, tol_lse likewise. SAFETY = 2 is not
    needed by any modelled term (their products, the second-order terms, are below 1%): it lets
    every modelled rounding happen twice (a kernel that rounds P once more, stores a partial
    result of a split in float32 and reloads it, or folds scale and log2 e into separate
    multiplies), and it is not tuned to any measured error.

    Batched: leading dimensions broadcast (q [..., Q, D], k / v [..., n, D], mask [..., Q, n]),
    so one call bounds every query head of a problem (dms_bound).
    """
    q64, k64, v64 = q.double(), k.double(), v.double()
    Q, D = q64.shape[-2:]
    n = k64.shape[-2]
    u = unit_roundoff(dtype)
    eta = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps   # smallest subnormal
    scale = abs(float(scale))
    kt = k64.transpose(-1, -2)
    s = (q64 @ kt) * scale                                     # [..., Q, n]
    if mask is None:
        mask = torch.ones(s.shape[-2:], dtype=torch.bool, device=q64.device)
    mask = mask.to(q64.device).expand(s.shape)
    seen = mask.any(dim=-1)
    s = s.masked_fill(~mask, -math.inf)
    c = (q64.abs() @ kt.abs()) * scale
    m = s.amax(dim=-1, keepdim=True).nan_to_num(0.0, neginf=0.0)
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    logp = s - lse_safe
    p = logp.exp()                                             # 0 where masked
    o = p @ v64
    delta = U32 * ((D + 2) * c + (s - m).abs().nan_to_num(0.0, posinf=0.0))
    delta = delta.masked_fill(~mask, 0.0)
    le_plus = torch.logsumexp(s + delta, dim=-1, keepdim=True) - lse_safe     # log E+
    le_minus = torch.logsumexp(s - delta, dim=-1, keepdim=True) - lse_safe    # log E-
    dp = torch.maximum((logp + delta - le_minus).exp() - p, p - (logp - delta - le_plus).exp())
    dp = dp.masked_fill(~mask, 0.0).nan_to_num(0.0, posinf=math.inf)
    va = v64.abs()
    # sum_j dp_j |v_jd - o_d| without materialising [..., Q, n, D] for long heads: chunks of keys
    # (larger on a GPU, where each chunk is a launch; only the float64 summation order differs).
    e_score = torch.zeros_like(o)
    step = max(1, (1 << (22 if q64.device.type == "cpu" else 25)) // max(1, o.numel()))
    for a in range(0, n, step):
        diff = (v64[..., None, a:a + step, :] - o[..., None, :]).abs()
        e_score += (dp[..., a:a + step, None] * diff).sum(-2)
    a_j = torch.maximum(u * p, (eta / 2) * (m - lse_safe).exp()).masked_fill(~mask, 0.0)
    a2 = a_j * a_j
    oa = o.abs()
    # sum_j a_j^2 (|v_jd| + |o_d|)^2 = a2 @ |v|^2 + 2 |o_d| (a2 @ |v|) + |o_d|^2 sum a2
    e_p = LAMBDA * (a2 @ (va * va) + 2 * oa * (a2 @ va) + oa * oa * a2.sum(-1, keepdim=True)).sqrt()
    n_seen = mask.sum(-1, keepdim=True).double()
    e_acc = LAMBDA * n_seen.sqrt() * U32 * (p @ va + oa)
    # term 6: P_j flushed below 2^-126 (on the normalised scale tau), and o flushed
    p_ftz = torch.minimum(p, FTZ32 * (m - lse_safe).exp())
    e_ftz = p_ftz @ va + oa * p_ftz.sum(-1, keepdim=True)
    tol_o = SAFETY * (e_score + e_p + e_acc + e_ftz) + u * oa + torch.maximum(
        torch.full_like(oa, eta / 2), (oa < FTZ32) * FTZ32)
    lse_err = torch.maximum(le_plus, -le_minus)
    tol_lse = SAFETY * (lse_err + LAMBDA * n_seen.sqrt() * U32 + 4 * U32) + U32 * lse_safe.abs()
    o = torch.where(seen[..., None], o, torch.zeros_like(o))
    tol_o = torch.where(seen[..., None], tol_o, torch.zeros_like(tol_o))
    tol_lse = torch.where(seen[..., None], tol_lse, torch.zeros_like(tol_lse))
    return o, lse[..., 0], tol_o, tol_lse[..., 0]


def paged_heads(q, k_cache, v_cache, block_table, seq_lens):
    """Yields (b, heads, K, V) for every non-empty (row b, KV head) of a paged decode problem:
    heads the slice of q's query heads that read it, K and V [n, D] gathered from the pool."""
    hkv = block_table.shape[1]
    G = q.shape[1] // max(1, hkv)
    lens = seq_lens.cpu()
    for b in range(q.shape[0]):
        for g in range(hkv):
            n = int(lens[b, g])
            if n:
                yield (b, slice(g * G, (g + 1) * G), reference.paged_gather(k_cache, block_table[b, g], n),
                       reference.paged_gather(v_cache, block_table[b, g], n))


def decode_bound(q, k_cache, v_cache, block_table, seq_lens, scale, dtype=None, device="cpu"):
    """attention_bound for every (row, KV head) of a paged decode: (o [B, Hq, D], lse [B, Hq],
    tol_o, tol_lse), float64 on the CPU, from the tensors as the kernel read them. `device`:
    where the float64 math runs (the same oracle; a GPU only changes float64 rounding, far below
    any bound), the results come back to the CPU.

    Batched: the non-empty heads, sorted by length, go in groups padded to the group's longest
    head (at most 2x their keys on a GPU, 1.25x on the CPU); each group is one gather and one
    attention_bound call with a length mask. A head at a time was about 30 small ops per head:
    on a GPU, thousands of launches per case of the 10x differential suite."""
    q, k_cache, v_cache = q.to(device), k_cache.to(device), v_cache.to(device)
    block_table, lens = block_table.to(device), seq_lens.cpu().long()
    B, hq, D = q.shape
    hkv = block_table.shape[1]
    G = hq // max(1, hkv)
    bs = k_cache.shape[1]
    dtype = dtype or q.dtype
    o = torch.zeros(B, hkv, G, D, dtype=torch.float64, device=device)
    lse = torch.full((B, hkv, G), -math.inf, dtype=torch.float64, device=device)
    tol_o, tol_lse = torch.zeros_like(o), torch.zeros_like(lse)
    heads = sorted((int(lens[b, g]), b, g) for b in range(B) for g in range(hkv) if lens[b, g] > 0)
    # Padding allowed per group: a GPU is launch-bound here (pad freely), the CPU compute-bound.
    ratio, slack = (2.0, 256) if torch.device(device).type == "cuda" else (1.25, 32)
    groups, cur, keys = [], [], 0
    for h in heads:               # ascending n: padding a group to its last head's n
        if cur and (len(cur) + 1) * h[0] > ratio * (keys + h[0]) + slack:
            groups.append(cur)
            cur, keys = [], 0
        cur.append(h)
        keys += h[0]
    if cur:
        groups.append(cur)
    qg = q.view(B, hkv, G, D)
    for grp in groups:
        n = torch.tensor([h[0] for h in grp], device=device)
        bi = torch.tensor([h[1] for h in grp], device=device)
        gi = torch.tensor([h[2] for h in grp], device=device)
        nmax = grp[-1][0]
        idx = torch.arange(nmax, device=device)
        valid = idx[None, :] < n[:, None]                                   # [m, nmax]
        blocks = block_table[bi, gi][:, idx // bs].long()
        blocks = torch.where(valid, blocks, torch.zeros_like(blocks))       # unused entries: any
        pad = ~valid[..., None]                  # padding reads zeros (pools hold NaN there)
        kk = k_cache[blocks, idx % bs].masked_fill(pad, 0)                   # [m, nmax, D]
        vv = v_cache[blocks, idx % bs].masked_fill(pad, 0)
        og, lg, tg, tlg = attention_bound(qg[bi, gi], kk, vv, scale, dtype, valid[:, None, :])
        o[bi, gi], lse[bi, gi], tol_o[bi, gi], tol_lse[bi, gi] = og, lg, tg, tlg
    return tuple(x.reshape(B, hq, *x.shape[3:]).cpu() for x in (o, lse, tol_o, tol_lse))


def dms_bound(q, k, v, logits, window, scale, dtype=None, rows=None, device=None):
    """attention_bound under the DMS visibility rule for one sequence: q [N, Hq, D], k, v
    [N, Hkv, D], logits [N, Hkv]; rows: the query positions to bound (default all). Returns
    (o, lse, tol_o, tol_lse) with o [R, Hq, D], float64 on the CPU. `device`: where the float64
    math runs (as decode_bound); None: a GPU when there is one and the problem is large
    (R N Hq D > 2^22), else the CPU. One batched attention_bound call for every query head."""
    N, hq, D = q.shape
    hkv = k.shape[1]
    G = hq // hkv
    rows = torch.arange(N) if rows is None else torch.as_tensor(rows)
    R = rows.numel()
    if device is None:
        device = "cuda" if torch.cuda.is_available() and R * N * hq * D > (1 << 22) else "cpu"
    q, k, v, logits = q.to(device), k.to(device), v.to(device), logits.to(device)
    rows = rows.to(device)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dtype = dtype or q.dtype
    mask = reference.visibility_mask(logits, window)[:, rows]          # [Hkv, R, N]
    qh = q[rows].reshape(R, hkv, G, D).permute(1, 2, 0, 3)              # [Hkv, G, R, D]
    kh, vh = k.permute(1, 0, 2)[:, None], v.permute(1, 0, 2)[:, None]  # [Hkv, 1, N, D]
    o, lse, tol_o, tol_lse = attention_bound(qh, kh, vh, scale, dtype, mask[:, None])
    o, tol_o = (x.permute(2, 0, 1, 3).reshape(R, hq, D).cpu() for x in (o, tol_o))
    lse, tol_lse = (x.permute(2, 0, 1).reshape(R, hq).cpu() for x in (lse, tol_lse))
    return o, lse, tol_o, tol_lse


def bound_violations(out, ref, tol):
    """(count, worst err / tol, first bad index) of |out - ref| > tol, NaN counting as bad."""
    o = out.double().cpu()
    err = (o - ref).abs()
    bad = ~(err <= tol)                                   # NaN compares False: bad
    ratio = (err / tol.clamp_min(1e-300)).nan_to_num(math.inf)
    first = bad.nonzero()[0].tolist() if bad.any() else None
    return int(bad.sum()), (ratio.max().item() if ratio.numel() else 0.0), first


def assert_within_bound(out, ref, tol, what, lse=None, lse_ref=None, lse_tol=None):
    """out within tol of ref elementwise (tol from attention_bound); lse likewise when given,
    with -inf exactly where the reference is -inf (heads that see no key)."""
    assert list(out.shape) == list(ref.shape), f"{what}: shape {list(out.shape)} vs {list(ref.shape)}"
    nbad, worst, first = bound_violations(out, ref, tol)
    print(f"{what}: max err/bound {worst:.3g}")
    assert nbad == 0, (f"{what}: {nbad} of {out.numel()} elements outside the error bound, worst "
                       f"{worst:.3g} x bound, first at {first}: got {out.double().cpu()[tuple(first)].item()!r}, "
                       f"want {ref[tuple(first)].item()!r} +- {tol[tuple(first)].item():.3g}")
    if lse is not None:
        lse = lse.double().cpu()
        empty = torch.isneginf(lse_ref)
        assert torch.equal(torch.isneginf(lse), empty), f"{what}: lse -inf pattern differs"
        nbad, worst, first = bound_violations(lse[~empty], lse_ref[~empty], lse_tol[~empty])
        assert nbad == 0, f"{what}: lse outside the bound ({nbad} heads, worst {worst:.3g} x bound)"


def logit_interval(q, hkv, alpha_scale, alpha_offset, q_norm_weight=None, eps=1e-6, dtype=None,
                   float32_norm=True):
    """[lo, hi] (float64 [T, Hkv]) of the borrowed eviction logit (reference.eviction_rope's
    rounding chain) that a kernel doing the RMSNorm in float32 may give; q [T, Hq, D].
    float32_norm False (the CPU twins, which match the float64 chain): lo = hi = the reference.

    Without a norm the chain is exact (lo = hi = the reference). With one, the donor is
    round(round(x r) w) where the kernel's r = rsqrtf(sum(x^2) / D + eps) has relative error at
    most delta = ((D + 2) / 2 + 5) u32 (D fma additions of positive terms, halved by the square
    root, the division, the eps addition, rsqrtf's 2 ulp, the product x r): near a rounding tie
    of x r the kernel's donor may sit one unit of `dtype` away from the float64 reference's, and
    a_s magnifies that step (the 10x CUDA differential suite met 6 such cases in 30,000). The
    chain is monotonic in r, so the ends are the logits of r (1 - delta) and r (1 + delta)."""
    T, hq, D = q.shape
    lt = dtype or q.dtype
    donors = torch.arange(hkv) * (hq // hkv)
    x = q[:, donors, D - 1].double().cpu()
    if q_norm_weight is None:
        l = reference.borrowed_logits(x.to(lt), alpha_scale, alpha_offset).double()
        return l, l
    r = torch.rsqrt(q[:, donors].double().cpu().pow(2).mean(dim=-1) + eps)
    delta = ((D + 2) / 2 + 5) * U32 if float32_norm else 0.0
    w = q_norm_weight.cpu()[D - 1].to(lt)
    ends = [reference.borrowed_logits(((x * r * f).to(lt) * w).to(lt), alpha_scale,
                                      alpha_offset).double() for f in (1 - delta, 1 + delta)]
    return torch.minimum(*ends), torch.maximum(*ends)


def assert_logits_within(logits, lo, hi, what, rtol=1e-5, atol=1e-3):
    """Each logit in [lo - tol, hi + tol], tol = atol + rtol max(|lo|, |hi|) (logit_interval)."""
    x = logits.double().cpu()
    tol = atol + rtol * torch.maximum(lo.abs(), hi.abs())
    inside = (x >= lo) & (x <= hi)                        # equal infinities included
    err = torch.maximum(lo - x, x - hi).clamp_min(0.0)
    bad = ~inside & ~(err <= tol)
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {x.numel()} logits outside the interval, "
                           f"first at {bad.nonzero()[0].tolist()}: got {x[bad][0].item()!r}, "
                           f"want [{lo[bad][0].item()!r}, {hi[bad][0].item()!r}]")
