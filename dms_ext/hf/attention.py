"""The DMS attention of a patched layer: projections, eviction logits, RoPE, then either the
DMSCache kernels (cached) or a dense plain-torch forward under the DMS visibility mask."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..ops import has_kernel
from ..reference import borrowed_logits, rope
from .settings import DMSSettings, ModelState


def adapter_logits(attn, h_pre: Optional[torch.Tensor], st: DMSSettings) -> torch.Tensor:
    if h_pre is None:
        raise RuntimeError("adapter variant: the decoder layer's input was not captured")
    # In the model dtype, as NVIDIA's reference: round(round(a * scale) - offset) in bf16.
    return borrowed_logits(attn.dms_proj_alpha(attn.dms_proj_alpha_norm(h_pre)),
                           st.alpha_scale, st.alpha_offset)


def finish_logits(logits: Optional[torch.Tensor], st: DMSSettings, shape, device) -> torch.Tensor:
    if logits is None or not st.evicts:
        # Far below 0: every decision is "keep", so nothing is ever evicted.
        return torch.full(shape, -1e4, dtype=torch.float32, device=device)
    if st.alpha_per == "layer":
        logits = logits[..., :1].expand(shape)
    return logits.float().contiguous()


def _donor_keep(hq: int, g: int, d: int, device) -> torch.Tensor:
    keep = torch.ones(hq, d, dtype=torch.float32, device=device)
    keep[::g, d - 1] = 0.0
    return keep


def cached_attention(attn, state: ModelState, dms, plan, x: torch.Tensor,
                     h_pre: Optional[torch.Tensor]) -> torch.Tensor:
    """x (normed) and h_pre (the layer input) [T, hidden] of the packed tokens of ``plan``
    (a cache.ForwardPlan) -> attention output [T, Hq * D] in the cache dtype, through
    ``dms.attend`` (capturable in a CUDA graph for a decode plan)."""
    st = state.settings
    hq = attn.config.num_attention_heads
    hkv = attn.config.num_key_value_heads
    d = attn.head_dim
    dtype = dms.dtype
    t = x.shape[0]
    q = attn.q_proj(x).view(t, hq, d)
    k = attn.k_proj(x).view(t, hkv, d)
    v = attn.v_proj(x).view(t, hkv, d).to(dtype).contiguous()
    qn = getattr(attn, "q_norm", None)
    kn = getattr(attn, "k_norm", None)
    table = state.rope_table(x.device, plan.max_position + 1)
    # The trailing arguments of both kernels (decode_step, eviction_rope): alpha, norms, eps.
    kernel_args = (float(st.alpha_scale), float(st.alpha_offset),
                   None if qn is None else qn.weight.to(dtype).contiguous(),
                   None if kn is None else kn.weight.to(dtype).contiguous(),
                   float(qn.variance_epsilon if qn is not None else 1e-6))
    borrowed_in_kernel = st.variant == "borrowed" and st.evicts and st.alpha_per == "head"
    if (t == len(plan.seq_ids) and (borrowed_in_kernel or st.variant != "borrowed")
            and has_kernel("decode_step", x.device)):
        # A decode step: norm, logits, RoPE and the append in one kernel (DMSCache.decode_step);
        # the position of each token is its sequence's token count, as plan.positions.
        given = None
        if not borrowed_in_kernel:      # adapter / none: the logits come in, q keeps its channels
            given = finish_logits(adapter_logits(attn, h_pre, st) if st.variant == "adapter" else None,
                                  st, (t, hkv), x.device)
        o, _ = dms.decode_step(attn.layer_idx, plan.seq_ids, q.to(dtype).contiguous(),
                               k.to(dtype).contiguous(), v, table, *kernel_args, logits=given,
                               scale=attn.scaling)
        plan.layers_done += 1
        return o.reshape(t, hq * d)
    logits = None
    if st.variant == "borrowed" and has_kernel("eviction_rope", x.device):
        q = q.to(dtype).contiguous()
        k = k.to(dtype).contiguous()
        logits = torch.ops.dms.eviction_rope(q, k, plan.positions, table, *kernel_args)
    else:
        if qn is not None:
            q, k = qn(q), kn(k)
        cs = table.index_select(0, plan.positions.long())
        cos, sin = cs[:, None, : d // 2], cs[:, None, d // 2:]
        if st.variant == "borrowed":
            g = hq // hkv
            logits = borrowed_logits(q[:, ::g, d - 1], st.alpha_scale, st.alpha_offset)
            keep = _donor_keep(hq, g, d, x.device)
            q = rope(q.float() * keep, cos, sin) * keep
        else:
            q = rope(q.float(), cos, sin)
        k = rope(k.float(), cos, sin)
        q = q.to(dtype).contiguous()
        k = k.to(dtype).contiguous()
    if st.variant == "adapter":
        logits = adapter_logits(attn, h_pre, st)
    logits = finish_logits(logits, st, (t, hkv), x.device)
    o = dms.attend(attn.layer_idx, plan.seq_ids, plan.cu_seqlens, q, k, v, logits,
                   scale=attn.scaling)
    plan.layers_done += 1
    return o.reshape(t, hq * d)


def cached_attention_batch(attn, state: ModelState, cache, hidden_states, h_pre):
    """HF's [B, N, hidden] view of :func:`cached_attention`: padding columns are dropped before
    the cache (plan.index) and come back as zeros."""
    plan = cache._plan
    if plan is None:
        raise RuntimeError("DMSCacheHF: no forward plan (call the model, not a layer, with the cache)")
    b, n, hid = hidden_states.shape
    x = hidden_states.reshape(b * n, hid)
    if h_pre is not None:
        h_pre = h_pre.reshape(b * n, hid)
    if plan.index is not None:
        x = x.index_select(0, plan.index)
        if h_pre is not None:
            h_pre = h_pre.index_select(0, plan.index)
    o = cached_attention(attn, state, cache.dms, plan, x, h_pre).to(hidden_states.dtype)
    if plan.index is not None:
        full = o.new_zeros(b * n, o.shape[1])
        full.index_copy_(0, plan.index, o)
        o = full
    return o.view(b, n, -1)


def dense_attention(attn, state: ModelState, past_key_values, hidden_states, h_pre,
                    position_embeddings):
    """Plain torch: HF's projections and RoPE, then softmax over a dense DMS visibility mask."""
    from transformers.cache_utils import Cache
    st = state.settings
    b, n, _ = hidden_states.shape
    hq = attn.config.num_attention_heads
    hkv = attn.config.num_key_value_heads
    d = attn.head_dim
    g = hq // hkv
    q = attn.q_proj(hidden_states).view(b, n, hq, d)
    k = attn.k_proj(hidden_states).view(b, n, hkv, d)
    v = attn.v_proj(hidden_states).view(b, n, hkv, d)
    if getattr(attn, "q_norm", None) is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    logits = None
    cos, sin = position_embeddings                     # [B or 1, N, D], both halves equal
    cos = cos[..., None, : d // 2].float()
    sin = sin[..., None, : d // 2].float()
    if st.variant == "borrowed":
        logits = borrowed_logits(q[:, :, ::g, d - 1], st.alpha_scale, st.alpha_offset)
        keep = _donor_keep(hq, g, d, q.device)
        q = rope(q.float() * keep, cos, sin) * keep
    else:
        q = rope(q.float(), cos, sin)
    k = rope(k.float(), cos, sin)
    if st.variant == "adapter":
        logits = adapter_logits(attn, h_pre, st)
    logits = finish_logits(logits, st, (b, n, hkv), q.device)
    q = q.to(v.dtype).transpose(1, 2)                  # [B, Hq, N, D]
    k = k.to(v.dtype).transpose(1, 2)
    v = v.transpose(1, 2)
    if past_key_values is not None:
        if not isinstance(past_key_values, Cache):
            raise ValueError("past_key_values: expected a DMSCacheHF or a transformers Cache")
        k, v = past_key_values.update(k, v, attn.layer_idx)
        store = past_key_values.__dict__.setdefault("_dms_logits", {})
        prev = store.get(attn.layer_idx)
        logits = logits if prev is None else torch.cat([prev, logits], dim=1)
        store[attn.layer_idx] = logits
    s = k.shape[2]
    dev = q.device
    past = s - n
    # reference.visibility_mask, only the last n query rows: d_j (decision on key j) arrives
    # with token j + 1; the newest key has none yet.
    dec = torch.zeros(b, s, hkv, dtype=torch.bool, device=dev)
    if s > 1:
        dec[:, :-1] = logits[:, 1:] > 0
    qi = past + torch.arange(n, device=dev)
    kj = torch.arange(s, device=dev)
    dist = qi[:, None] - kj[None, :]                    # [N, S]
    vis = (dist >= 0)[None, None] & ((dist <= st.window)[None, None]
                                     | ~dec.permute(0, 2, 1)[:, :, None, :])   # [B, Hkv, N, S]
    mask2d = state.mask2d
    if mask2d is not None:
        valid = mask2d[:, -s:].to(device=dev, dtype=torch.bool)
        vis = vis & valid[:, None, None, :]
        # A padding query sees nothing; let it see itself so softmax stays finite.
        vis = vis | (dist == 0)[None, None]
    vis = vis.repeat_interleave(g, dim=1)
    k = k.repeat_interleave(g, dim=1)
    v = v.repeat_interleave(g, dim=1)
    o = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=vis,
                                       scale=attn.scaling)
    return o.to(hidden_states.dtype).transpose(1, 2).reshape(b, n, hq * d)
