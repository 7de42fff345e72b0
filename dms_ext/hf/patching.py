"""patch_model: turns a transformers Qwen3 / Llama causal LM into a DMS model in place.

Never silently dense: the decoder model's forward is wrapped, finds a DMSCacheHF under any
argument name (``past_key_values`` in older 5.x, ``cache`` in newer ones), and every layer's
attention must go through it; the outer model checks that its decoder received the cache.
Otherwise :class:`DMSCacheBypassed` names the installed transformers version."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .attention import cached_attention_batch, dense_attention
from .cache import DMSCacheHF
from .graphs import decode_step
from .settings import (SUPPORTED_MODEL_TYPES, DMSSettings, ModelState, bypass_error,
                       dms_settings, write_settings)

ATTN_IMPL = "dms"


def _find_cache(args, kwargs, cls):
    for v in list(kwargs.values()) + list(args):
        if isinstance(v, cls):
            return v
    return None


# ----------------------------------------------------------------------------- attention

def _dms_attention_forward(self, hidden_states: torch.Tensor, position_embeddings=None,
                           attention_mask=None, past_key_values=None, cache=None, **kwargs):
    """Replaces Qwen3Attention / LlamaAttention.forward on a patched model."""
    state: ModelState = self._dms_state
    h_pre = self.__dict__.pop("_dms_h_pre", None)
    given = cache if cache is not None else past_key_values
    if state.cache is not None:
        out = cached_attention_batch(self, state, state.cache, hidden_states, h_pre)
    elif isinstance(given, DMSCacheHF):
        raise bypass_error("the attention layer received the cache but the decoder model did not")
    else:
        out = dense_attention(self, state, given, hidden_states, h_pre, position_embeddings)
    return self.o_proj(out), None


def _dms_attention_interface(module, query, key, value, attention_mask, scaling=None, **kwargs):
    # Registered only so that config._attn_implementation may name "dms" (which also turns off
    # transformers' mask building); patched attention modules never call it.
    o = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                       enable_gqa=True, is_causal=attention_mask is None)
    return o.transpose(1, 2).contiguous(), None


def _register_interface() -> None:
    from transformers import AttentionInterface
    if ATTN_IMPL not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_IMPL, _dms_attention_interface)


# ----------------------------------------------------------------------------- decoder forward

def _base_output(hidden: torch.Tensor, cache: DMSCacheHF):
    from transformers.modeling_outputs import BaseModelOutputWithPast
    names = {f.name for f in dataclasses.fields(BaseModelOutputWithPast)}
    key = "cache" if "cache" in names else "past_key_values"
    return BaseModelOutputWithPast(last_hidden_state=hidden, **{key: cache})


def _graphable(kwargs, ids) -> bool:
    return (ids is not None and kwargs.get("inputs_embeds") is None
            and not kwargs.get("output_attentions") and not kwargs.get("output_hidden_states"))


def _run_cached(model, state: ModelState, cache: DMSCacheHF, orig, args, kwargs, ref, ids, mask2d):
    b, n = ref.shape[0], ref.shape[1]
    plan = cache.begin(b, n, mask2d, ref.device)
    state.cache, state.mask2d = cache, mask2d
    try:
        if plan.is_decode and _graphable(kwargs, ids) and not args:
            # One token per sequence: the shared eager / CUDA-graph step (graphs.decode_step).
            hidden = decode_step(model, state, cache, plan, ids.reshape(-1))
            out = _base_output(hidden.view(b, n, -1), cache)
        else:
            out = orig(*args, **kwargs)
        if plan.seq_ids and plan.layers_done != state.num_layers:
            raise bypass_error(f"only {plan.layers_done} of {state.num_layers} attention layers "
                               f"went through it")
    finally:
        cache.end()
        state.cache, state.mask2d = None, None
    cache._reached = True
    return out


def _chunks(kwargs, n: int, size: int):
    """kwargs of each column chunk of a forward over n columns (2-D attention_mask keeps every
    column up to the chunk's end; position_ids / cache_position / input tensors are sliced)."""
    mask = kwargs.get("attention_mask")
    for s in range(0, n, size):
        e = min(n, s + size)
        kw = dict(kwargs)
        for key in ("input_ids", "inputs_embeds"):
            if kw.get(key) is not None:
                kw[key] = kw[key][:, s:e]
        for key in ("position_ids", "cache_position"):
            if isinstance(kw.get(key), torch.Tensor) and kw[key].shape[-1] == n:
                kw[key] = kw[key][..., s:e]
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            kw["attention_mask"] = mask[:, : mask.shape[1] - n + e]
        yield kw


def _decoder_forward(self, *args, **kwargs):
    """Wraps the decoder model's forward (Qwen3Model / LlamaModel) of a patched model."""
    state: ModelState = self.__dict__["_dms_state"]
    orig = self.__dict__["_dms_orig_forward"]
    model = self.__dict__["_dms_outer"]()
    mask = kwargs.get("attention_mask")
    mask2d = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    cache = _find_cache(args, kwargs, DMSCacheHF)
    if cache is None:
        state.mask2d = mask2d
        try:
            return orig(*args, **kwargs)
        finally:
            state.mask2d = None
    ids = kwargs.get("input_ids")
    if ids is None and args:
        ids = args[0]
    ref = ids if ids is not None else kwargs.get("inputs_embeds")
    if ref is None:
        raise ValueError("input_ids: expected input_ids or inputs_embeds")
    n = ref.shape[1]
    size = state.settings.chunked_prefill
    if size and n > size and not args and cache._packed is None:
        # dms_chunked_prefill: the layers see at most `size` columns at a time.
        outs = []
        for kw in _chunks(kwargs, n, size):
            r = kw["input_ids"] if kw.get("input_ids") is not None else kw["inputs_embeds"]
            m = kw.get("attention_mask")
            m2 = m if isinstance(m, torch.Tensor) and m.dim() == 2 else None
            outs.append(_run_cached(model, state, cache, orig, (), kw, r, kw.get("input_ids"), m2))
        last = outs[-1]
        last.last_hidden_state = torch.cat([o.last_hidden_state for o in outs], dim=1)
        return last
    return _run_cached(model, state, cache, orig, args, kwargs, ref, ids, mask2d)


def _outer_pre_hook(module, args, kwargs):
    cache = _find_cache(args, kwargs, DMSCacheHF)
    if cache is not None:
        cache._reached = False
    return None


def _outer_post_hook(module, args, kwargs, output):
    cache = _find_cache(args, kwargs, DMSCacheHF)
    if cache is not None and not cache._reached:
        cache._reached = True
        raise bypass_error("the decoder model never received it")
    return None


def _layer_pre_hook(layer, args, kwargs):
    h = args[0] if args else kwargs.get("hidden_states")
    layer.self_attn.__dict__["_dms_h_pre"] = h


# ----------------------------------------------------------------------------- patching

def patch_model(model: nn.Module, settings: Optional[DMSSettings] = None, **overrides) -> nn.Module:
    """Turns a transformers Qwen3ForCausalLM / LlamaForCausalLM into a DMS model in place.

    Settings come from ``settings`` or the config (:func:`dms_settings`); the adapter variant
    gets ``dms_proj_alpha_norm`` / ``dms_proj_alpha`` on every attention module if missing
    (fresh nn.Linear init: load weights afterwards). Returns the model."""
    import weakref
    cfg = model.config
    mtype = getattr(cfg, "model_type", None)
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model: expected a model_type in {SUPPORTED_MODEL_TYPES}, got {mtype!r}")
    if getattr(model, "_dms_patched", False):
        raise ValueError("model: already patched for DMS")
    st = settings if settings is not None else dms_settings(cfg, **overrides)
    base = model.model
    hkv = cfg.num_key_value_heads
    hq = cfg.num_attention_heads
    if hq % hkv:
        raise ValueError(f"model: num_attention_heads={hq} is not a multiple of num_key_value_heads={hkv}")
    state = ModelState(model, st)
    ref = next(model.parameters())
    for layer in base.layers:
        attn = layer.self_attn
        if st.variant == "adapter" and not hasattr(attn, "dms_proj_alpha"):
            norm_cls = type(layer.input_layernorm)
            attn.dms_proj_alpha_norm = norm_cls(cfg.hidden_size, eps=cfg.rms_norm_eps).to(
                device=ref.device, dtype=ref.dtype)
            attn.dms_proj_alpha = nn.Linear(cfg.hidden_size, hkv,
                                            bias=bool(getattr(cfg, "attention_bias", False))).to(
                device=ref.device, dtype=ref.dtype)
        attn.__dict__["_dms_state"] = state
        attn.forward = _dms_attention_forward.__get__(attn, type(attn))
        if st.variant == "adapter":
            layer.register_forward_pre_hook(_layer_pre_hook, with_kwargs=True)
    base.__dict__["_dms_state"] = state
    base.__dict__["_dms_orig_forward"] = base.forward
    base.__dict__["_dms_outer"] = weakref.ref(model)
    base.forward = _decoder_forward.__get__(base, type(base))
    model.register_forward_pre_hook(_outer_pre_hook, with_kwargs=True)
    model.register_forward_hook(_outer_post_hook, with_kwargs=True)
    _register_interface()
    try:
        model.set_attn_implementation(ATTN_IMPL)
    except Exception:  # older / stricter versions: the config attribute is what masks read
        cfg._attn_implementation = ATTN_IMPL
    write_settings(cfg, st)
    model.__dict__["_dms_patched"] = True
    model.__dict__["_dms_state"] = state
    return model
