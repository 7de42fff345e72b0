"""The oracle: plain-torch, float64 definitions of what every dms op computes (docs/semantics.md).

Dense and slow on purpose: each function states the rule directly (a full visibility mask, a
gather of every slot), so the kernels, the CPU twins and DMSCache are all checked against it.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = [
    "visibility_mask", "dms_attention", "live_counts", "rope_cache", "eviction_rope",
    "sparse_decode", "paged_gather", "rope", "borrowed_logits", "FP8_MAX", "quantize_fp8",
    "dequantize_fp8",
]

# The largest finite float8_e4m3fn; a write to an fp8 pool saturates to +-FP8_MAX.
FP8_MAX = 448.0


def _f32(scale: float) -> torch.Tensor:
    """The scale as the ops hold it (a float32 in KVPool)."""
    return torch.tensor(float(scale), dtype=torch.float32)


def quantize_fp8(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """float8_e4m3fn: what a write of x to an fp8 pool with this dequantization scale stores,
    saturate(x / scale) computed in float32, rounded to nearest even (torch's own cast), clamped
    to +-448 (torch's cast does not saturate: it would give NaN); NaN stays NaN."""
    y = x.float() / _f32(scale).to(x.device)
    return y.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def dequantize_fp8(x8: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """float64: what a read of an fp8 pool element gives, stored * scale (exact in float64)."""
    return x8.double() * _f32(scale).double().item()


def _decisions(logits: torch.Tensor) -> torch.Tensor:
    """d [..., N, Hkv] bool: d_j = logits[j + 1] > 0 (the decision on token j arrives with
    j + 1); the newest token has none yet, which counts as "keep"."""
    d = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    if logits.shape[-2] > 1:
        d[..., :-1, :] = logits[..., 1:, :] > 0
    return d


def visibility_mask(logits: torch.Tensor, window: int) -> torch.Tensor:
    """bool [..., Hkv, N, N]: mask[g, t, j] = j <= t and (t - j <= window or d_j[g] == 0).

    logits [..., N, Hkv]: all the tokens of one sequence (position 0 first), or a batch of
    sequences of equal length ([B, N, Hkv] gives [B, Hkv, N, N])."""
    n = logits.shape[-2]
    d = _decisions(logits).transpose(-1, -2)                    # [..., Hkv, N] indexed by key j
    t = torch.arange(n, device=logits.device)
    dist = t[:, None] - t[None, :]                              # [t, j] = t - j
    causal = dist >= 0
    in_window = dist <= window
    return causal & (in_window | ~d[..., :, None, :])


def dms_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, logits: torch.Tensor,
                  window: int, scale: Optional[float] = None) -> torch.Tensor:
    """float64 [N, Hq, D]: causal attention of one sequence under the DMS visibility rule.

    q [N, Hq, D], k and v [N, Hkv, D] (after RoPE), logits [N, Hkv]. Query head h reads KV head
    h // (Hq / Hkv)."""
    n, hq, dim = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    mask = visibility_mask(logits, window).repeat_interleave(group, dim=0)    # [Hq, N, N]
    qd = q.double().transpose(0, 1)                                           # [Hq, N, D]
    kd = k.double().transpose(0, 1).repeat_interleave(group, dim=0)
    vd = v.double().transpose(0, 1).repeat_interleave(group, dim=0)
    s = (qd @ kd.transpose(1, 2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)                 # every query sees itself: no all -inf row
    return (p @ vd).transpose(0, 1).contiguous()


def live_counts(logits: torch.Tensor, window: int) -> torch.Tensor:
    """int64 [Hkv]: keys (sequence, g) holds after its last token t = N - 1:
    |{j <= t - w - 1 : d_j == 0}| + min(t + 1, w + 1)."""
    n, hkv = logits.shape
    if n == 0:
        return torch.zeros(hkv, dtype=torch.int64)
    t = n - 1
    d = _decisions(logits).cpu()
    old = max(t - window, 0)                                    # j in [0, t - w - 1]
    kept_old = (~d[:old]).sum(dim=0).to(torch.int64)
    return kept_old + min(t + 1, window + 1)


def rope_cache(max_position: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """float32 [max_position, D]: row p = (cos(p * f_i) for i < D/2, then sin(p * f_i)),
    f_i = base^(-2i / D), as HF Llama / Qwen rotate-half RoPE uses."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    ang = torch.arange(max_position, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat([ang.cos(), ang.sin()], dim=1).float()


def _rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    if weight is None:
        return x
    r = torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    return x * r * weight.double()


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: x [..., D], cos and sin [..., D/2] (broadcast)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def borrowed_logits(q_donor: torch.Tensor, alpha_scale: float, alpha_offset: float) -> torch.Tensor:
    """float32 (float64 for float64 q): the eviction logit of a borrowed neuron value ``q_donor`` (any shape), computed
    the way NVIDIA's DMS reference does, in q's dtype: ``q * alpha_scale - alpha_offset`` with
    torch arithmetic, so in bf16 / fp16 the product is rounded to the dtype, then the
    difference (each op computes in float32 and rounds once to the dtype). For float32 that is
    two float32 roundings; float64 rounds nothing away."""
    return (q_donor * alpha_scale - alpha_offset).to(torch.promote_types(q_donor.dtype, torch.float32))


def eviction_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                  cos_sin_cache: torch.Tensor, alpha_scale: float = 100.0,
                  alpha_offset: float = 5.0, q_norm_weight: Optional[torch.Tensor] = None,
                  k_norm_weight: Optional[torch.Tensor] = None,
                  eps: float = 1e-6, logit_dtype: Optional[torch.dtype] = None,
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Out of place: (q_out, k_out, logits). q [T, Hq, D], k [T, Hkv, D]; float64 math, q_out and
    k_out in the input dtype, logits float32 [T, Hkv].

    Order (docs/semantics.md section 10, borrowed neuron): optional per-head RMSNorm on q and k;
    logit
    l[t, g] = q[t, g*G, D-1] * alpha_scale - alpha_offset; zero that channel; rotate-half RoPE on
    q and k; zero the channel again (RoPE mixes channel D-1 into D/2-1 and back).

    The logit follows the model's rounding (``logit_dtype``, default q's dtype; the kernels get
    it from the storage dtype): the donor value is what HF's RMSNorm returns in that dtype
    (``w * round(x * rsqrt(...))``, rounded), then :func:`borrowed_logits`. Pass
    ``logit_dtype=torch.float64`` for the unrounded logit."""
    t_, hq, dim = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    lt = q.dtype if logit_dtype is None else logit_dtype
    donors = torch.arange(hkv, device=q.device) * group
    qdon = q[:, donors, dim - 1].double()
    if q_norm_weight is not None:
        r = torch.rsqrt(q[:, donors].double().pow(2).mean(dim=-1) + eps)
        qdon = (qdon * r).to(lt) * q_norm_weight[dim - 1].to(lt)
    logits = borrowed_logits(qdon.to(lt), alpha_scale, alpha_offset)
    qd = _rms_norm(q.double(), q_norm_weight, eps)
    kd = _rms_norm(k.double(), k_norm_weight, eps)
    qd[:, donors, dim - 1] = 0.0
    cs = cos_sin_cache.double()[positions.long()]               # [T, D]
    cos, sin = cs[:, None, : dim // 2], cs[:, None, dim // 2:]
    qd = rope(qd, cos, sin)
    kd = rope(kd, cos, sin)
    qd[:, donors, dim - 1] = 0.0
    return qd.to(q.dtype), kd.to(k.dtype), logits.float()


def paged_gather(cache: torch.Tensor, block_table_row: torch.Tensor, n: int) -> torch.Tensor:
    """[n, D]: slots 0..n-1 of one (row, head) from a [num_blocks, block_size, D] pool; slot i is
    row i % block_size of block block_table_row[i // block_size]."""
    bs = cache.shape[1]
    i = torch.arange(n, device=cache.device)
    blocks = block_table_row.long().to(cache.device)[i // bs]
    return cache[blocks, i % bs]


def sparse_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  block_table: torch.Tensor, seq_lens: torch.Tensor,
                  scale: Optional[float] = None) -> torch.Tensor:
    """float64 [B, Hq, D]: each query head attends (softmax) to every slot of its KV head;
    zeros for a head with seq_lens == 0."""
    b_, hq, dim = q.shape
    hkv = block_table.shape[1]
    group = hq // hkv
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    out = torch.zeros(b_, hq, dim, dtype=torch.float64, device=q.device)
    lens = seq_lens.cpu()
    for b in range(b_):
        for g in range(hkv):
            n = int(lens[b, g])
            if n == 0:
                continue
            kk = paged_gather(k_cache, block_table[b, g], n).double()
            vv = paged_gather(v_cache, block_table[b, g], n).double()
            qq = q[b, g * group:(g + 1) * group].double()       # [G, D]
            p = torch.softmax((qq @ kk.t()) * scale, dim=-1)
            out[b, g * group:(g + 1) * group] = p @ vv
    return out
