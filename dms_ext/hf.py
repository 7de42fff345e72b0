"""transformers integration: Qwen3 / Llama DMS models in generate() on DMSCache and the dms ops.

    model = load_dms_model("path/to/checkpoint")            # or a config / dict: random weights
    cache = DMSCacheHF.from_model(model, max_seqs=4, max_tokens=4096)
    out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=64)

or, with fork for parallel sampling and sequences released as they finish (no padding at all):

    result = generate(model, [prompt_a, prompt_b], max_new_tokens=64, num_samples=4,
                      do_sample=True, eos_token_id=tok.eos_token_id)

What the patch does (docs/semantics.md section 10), per attention layer of a transformers
Qwen3ForCausalLM or LlamaForCausalLM:

* Borrowed neuron (``dms_separate_alpha`` false, the public nvidia/Qwen3-8B-DMS-8x checkpoint):
  the eviction logit of KV head g is channel D-1 of query head g*G after q_norm and before RoPE,
  times ``dms_alpha_scale`` minus ``dms_initial_alpha_offset``; that channel is zeroed before and
  after RoPE. On the cached path this is the fused ``dms.eviction_rope`` op (q/k RMSNorm inside).
* Adapter (``dms_separate_alpha`` true, NVIDIA's naming): ``dms_proj_alpha(dms_proj_alpha_norm(h))``
  of the layer input h (before input_layernorm), one logit per KV head; q keeps every channel.
  Checkpoints written by dms_ext.models (``dms_norm`` / ``dms_proj``) load under these names.
* ``dms_alpha_per == "layer"``: KV head 0's logit decides for every head of the layer.
* Attention then goes through ``DMSCache.attend`` (sparse prefill / sparse decode kernels).

Without a DMSCacheHF (``past_key_values`` None or a transformers DynamicCache) the same model runs a
dense plain-torch forward masked by the DMS visibility rule: that is the oracle the cached path is
tested against, and it keeps ``model(ids)`` working as users expect.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .cache import DMSCache
from .models import _has_kernel, _rope

try:
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError as _e:  # pragma: no cover - exercised only without transformers
    raise ImportError("dms_ext.hf needs transformers (pip install transformers)") from _e

__all__ = ["DMSSettings", "dms_settings", "patch_model", "load_dms_model", "DMSCacheHF",
           "generate", "GenerationResult", "SUPPORTED_MODEL_TYPES"]

SUPPORTED_MODEL_TYPES = ("qwen3", "llama")
VARIANTS = ("borrowed", "adapter", "none")
_ATTN_IMPL = "dms"


# ----------------------------------------------------------------------------- settings

@dataclass
class DMSSettings:
    """DMS fields of a model config (names of NVIDIA's Qwen3ConfigDMS in brackets).

    window [dms_window_size], alpha_scale [dms_alpha_scale], alpha_offset
    [dms_initial_alpha_offset], variant "adapter" iff [dms_separate_alpha], alpha_per
    [dms_alpha_per] "head" or "layer", disable_eviction [dms_disable_eviction]. variant "none"
    is a plain model run through the cache (nothing is ever evicted)."""
    window: int = 512
    alpha_scale: float = 100.0
    alpha_offset: float = 5.0
    variant: str = "borrowed"
    alpha_per: str = "head"
    disable_eviction: bool = False

    def __post_init__(self):
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1:
            raise ValueError(f"window: expected an int >= 1, got {self.window!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant: expected one of {VARIANTS}, got {self.variant!r}")
        if self.alpha_per not in ("head", "layer"):
            raise ValueError(f"alpha_per: expected 'head' or 'layer', got {self.alpha_per!r}")
        for name in ("alpha_scale", "alpha_offset"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name}: expected a finite float, got {v!r}")

    @property
    def evicts(self) -> bool:
        return self.variant != "none" and not self.disable_eviction


def _cfg_get(config, name, default=None):
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def dms_settings(config, **overrides) -> DMSSettings:
    """DMSSettings from a transformers config or config.json dict.

    Reads NVIDIA's fields (dms_window_size, dms_alpha_scale, dms_initial_alpha_offset,
    dms_separate_alpha, dms_alpha_per, dms_disable_eviction), else the ``"dms"`` block that
    dms_ext.models writes ({"window", "alpha_scale", "alpha_offset", "variant"}); ``overrides``
    (DMSSettings field names) win over both."""
    s = {}
    ext = _cfg_get(config, "dms", None) or {}
    if isinstance(ext, dict):
        for src, dst in (("window", "window"), ("alpha_scale", "alpha_scale"),
                         ("alpha_offset", "alpha_offset"), ("variant", "variant")):
            if src in ext:
                s[dst] = ext[src]
    for src, dst in (("dms_window_size", "window"), ("dms_alpha_scale", "alpha_scale"),
                     ("dms_initial_alpha_offset", "alpha_offset"), ("dms_alpha_per", "alpha_per"),
                     ("dms_disable_eviction", "disable_eviction")):
        v = _cfg_get(config, src, None)
        if v is not None:
            s[dst] = v
    sep = _cfg_get(config, "dms_separate_alpha", None)
    if sep is not None:
        s["variant"] = "adapter" if sep else "borrowed"
    s.update({k: v for k, v in overrides.items() if v is not None})
    if "window" in s:
        s["window"] = int(s["window"])
    return DMSSettings(**s)


def _write_settings(config, st: DMSSettings) -> None:
    """Mirror the settings into the config under NVIDIA's names (save_pretrained keeps them)."""
    config.dms_window_size = st.window
    config.dms_alpha_scale = float(st.alpha_scale)
    config.dms_initial_alpha_offset = float(st.alpha_offset)
    config.dms_separate_alpha = st.variant == "adapter"
    config.dms_alpha_per = st.alpha_per
    config.dms_disable_eviction = bool(st.disable_eviction or st.variant == "none")


# ----------------------------------------------------------------------------- model state

class _ModelState:
    """Per patched model: settings, the RoPE table for the dms ops, the forward's padding mask.

    Kept out of the module tree (a plain attribute), so it never lands in a state dict."""

    def __init__(self, model: nn.Module, settings: DMSSettings):
        self.settings = settings
        self.rotary = model.model.rotary_emb
        self.tables: Dict[torch.device, torch.Tensor] = {}
        self.mask2d: Optional[torch.Tensor] = None
        self.cache: Optional["DMSCacheHF"] = None

    def rope_table(self, device: torch.device, min_rows: int) -> torch.Tensor:
        """float32 [P, D]: cos then sin of every position, the way the model's rotary module
        computes them (its inv_freq and attention_scaling, float32), for the dms ops."""
        t = self.tables.get(device)
        if t is None or t.shape[0] < min_rows:
            rows = max(min_rows, 1 << max(12, (min_rows - 1).bit_length()))
            inv = self.rotary.inv_freq.detach().float().to(device)
            pos = torch.arange(rows, device=device, dtype=torch.float32)
            ang = pos[:, None] * inv[None, :]
            scale = float(getattr(self.rotary, "attention_scaling", 1.0))
            t = torch.cat([ang.cos() * scale, ang.sin() * scale], dim=1).contiguous()
            self.tables[device] = t
        return t


def _adapter_logits(attn, h_pre: torch.Tensor, st: DMSSettings) -> torch.Tensor:
    return attn.dms_proj_alpha(attn.dms_proj_alpha_norm(h_pre)).float() * st.alpha_scale - st.alpha_offset


def _finish_logits(logits: Optional[torch.Tensor], st: DMSSettings, shape, device) -> torch.Tensor:
    if logits is None or not st.evicts:
        # Far below 0: every decision is "keep", so nothing is ever evicted.
        return torch.full(shape, -1e4, dtype=torch.float32, device=device)
    if st.alpha_per == "layer":
        logits = logits[..., :1].expand(shape)
    return logits.float().contiguous()


# ----------------------------------------------------------------------------- attention

def _dms_attention_forward(self, hidden_states: torch.Tensor, position_embeddings=None,
                           attention_mask=None, past_key_values=None, **kwargs):
    """Replaces Qwen3Attention / LlamaAttention.forward on a patched model."""
    state: _ModelState = self._dms_state
    h_pre = self.__dict__.pop("_dms_h_pre", None)
    if isinstance(past_key_values, DMSCacheHF):
        out = _cached_attention(self, state, past_key_values, hidden_states, h_pre)
    else:
        out = _dense_attention(self, state, past_key_values, hidden_states, h_pre,
                               position_embeddings)
    return self.o_proj(out), None


def _cached_attention(attn, state: _ModelState, cache: "DMSCacheHF", hidden_states, h_pre):
    st = state.settings
    plan = cache._plan
    if plan is None:
        raise RuntimeError("DMSCacheHF: no forward plan (call the model, not a layer, with the cache)")
    b, n, hid = hidden_states.shape
    hq = attn.config.num_attention_heads
    hkv = attn.config.num_key_value_heads
    d = attn.head_dim
    dtype = cache.dms.dtype
    x = hidden_states.reshape(b * n, hid)
    if plan.index is not None:
        x = x.index_select(0, plan.index)
        if h_pre is not None:
            h_pre = h_pre.reshape(b * n, hid).index_select(0, plan.index)
    elif h_pre is not None:
        h_pre = h_pre.reshape(b * n, hid)
    t = x.shape[0]
    q = attn.q_proj(x).view(t, hq, d)
    k = attn.k_proj(x).view(t, hkv, d)
    v = attn.v_proj(x).view(t, hkv, d).to(dtype).contiguous()
    qn = getattr(attn, "q_norm", None)
    kn = getattr(attn, "k_norm", None)
    table = state.rope_table(x.device, plan.max_position + 1)
    logits = None
    if st.variant == "borrowed" and _has_kernel("eviction_rope", x.device):
        q = q.to(dtype).contiguous()
        k = k.to(dtype).contiguous()
        logits = torch.ops.dms.eviction_rope(
            q, k, plan.positions, table, float(st.alpha_scale), float(st.alpha_offset),
            None if qn is None else qn.weight.to(dtype).contiguous(),
            None if kn is None else kn.weight.to(dtype).contiguous(),
            float(qn.variance_epsilon if qn is not None else 1e-6))
    else:
        if qn is not None:
            q, k = qn(q), kn(k)
        cs = table.index_select(0, plan.positions.long())
        cos, sin = cs[:, None, : d // 2], cs[:, None, d // 2:]
        if st.variant == "borrowed":
            g = hq // hkv
            logits = q[:, ::g, d - 1].float() * st.alpha_scale - st.alpha_offset
            keep = torch.ones(hq, d, dtype=torch.float32, device=x.device)
            keep[::g, d - 1] = 0.0
            q = _rope(q.float() * keep, cos, sin) * keep
        else:
            q = _rope(q.float(), cos, sin)
        k = _rope(k.float(), cos, sin)
        q = q.to(dtype).contiguous()
        k = k.to(dtype).contiguous()
    if st.variant == "adapter":
        if h_pre is None:
            raise RuntimeError("adapter variant: the decoder layer's input was not captured")
        logits = _adapter_logits(attn, h_pre, st)
    logits = _finish_logits(logits, st, (t, hkv), x.device)
    o = cache.dms.attend(attn.layer_idx, plan.seq_ids, plan.cu_seqlens, q, k, v, logits,
                         scale=attn.scaling)
    o = o.reshape(t, hq * d).to(hidden_states.dtype)
    if plan.index is not None:
        full = o.new_zeros(b * n, hq * d)
        full.index_copy_(0, plan.index, o)
        o = full
    return o.view(b, n, hq * d)


def _dense_attention(attn, state: _ModelState, past_key_values, hidden_states, h_pre,
                     position_embeddings):
    """Plain torch: HF's projections and RoPE, then softmax over a dense DMS visibility mask."""
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
        logits = q[:, :, ::g, d - 1].float() * st.alpha_scale - st.alpha_offset
        keep = torch.ones(hq, d, dtype=torch.float32, device=q.device)
        keep[::g, d - 1] = 0.0
        q = _rope(q.float() * keep, cos, sin) * keep
    else:
        q = _rope(q.float(), cos, sin)
    k = _rope(k.float(), cos, sin)
    if st.variant == "adapter":
        if h_pre is None:
            raise RuntimeError("adapter variant: the decoder layer's input was not captured")
        logits = _adapter_logits(attn, h_pre, st)
    logits = _finish_logits(logits, st, (b, n, hkv), q.device)
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
    past = s - n
    dev = q.device
    # d_j (decision on key j) arrives with token j + 1; the newest key has none yet.
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


def _dms_attention_interface(module, query, key, value, attention_mask, scaling=None, **kwargs):
    # Registered only so that config._attn_implementation may name "dms" (which also turns off
    # transformers' mask building); patched attention modules never call it.
    o = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                       enable_gqa=True, is_causal=attention_mask is None)
    return o.transpose(1, 2).contiguous(), None


def _register_interface() -> None:
    from transformers import AttentionInterface
    if _ATTN_IMPL not in AttentionInterface._global_mapping:
        AttentionInterface.register(_ATTN_IMPL, _dms_attention_interface)


# ----------------------------------------------------------------------------- patching

def _layer_pre_hook(layer, args, kwargs):
    h = args[0] if args else kwargs.get("hidden_states")
    layer.self_attn.__dict__["_dms_h_pre"] = h


def _model_pre_hook(module, args, kwargs):
    state: _ModelState = module._dms_state
    pkv = kwargs.get("past_key_values")
    mask = kwargs.get("attention_mask")
    state.mask2d = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    if isinstance(pkv, DMSCacheHF):
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        emb = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else emb
        if ref is None:
            raise ValueError("input_ids: expected input_ids or inputs_embeds")
        pkv._begin(ref.shape[0], ref.shape[1], state.mask2d, ref.device)
        state.cache = pkv
    return None


def _model_post_hook(module, args, kwargs, output):
    state: _ModelState = module._dms_state
    if state.cache is not None:
        state.cache._end()
        state.cache = None
    state.mask2d = None
    return None


def patch_model(model: nn.Module, settings: Optional[DMSSettings] = None, **overrides) -> nn.Module:
    """Turns a transformers Qwen3ForCausalLM / LlamaForCausalLM into a DMS model in place.

    Settings come from ``settings`` or the config (:func:`dms_settings`); the adapter variant
    gets ``dms_proj_alpha_norm`` / ``dms_proj_alpha`` on every attention module if missing
    (fresh nn.Linear init: load weights afterwards). Returns the model."""
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
    state = _ModelState(model, st)
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
    base.register_forward_pre_hook(_model_pre_hook, with_kwargs=True)
    base.register_forward_hook(_model_post_hook, with_kwargs=True)
    _register_interface()
    try:
        model.set_attn_implementation(_ATTN_IMPL)
    except Exception:  # older / stricter versions: the config attribute is what masks read
        cfg._attn_implementation = _ATTN_IMPL
    _write_settings(cfg, st)
    model.__dict__["_dms_patched"] = True
    model.__dict__["_dms_state"] = state
    return model


def _state_of(model) -> _ModelState:
    st = model.__dict__.get("_dms_state")
    if st is None:
        raise ValueError("model: not a DMS model; load it with load_dms_model or patch_model")
    return st


# ----------------------------------------------------------------------------- loading

_ADAPTER_RENAMES = ((".self_attn.dms_norm.", ".self_attn.dms_proj_alpha_norm."),
                    (".self_attn.dms_proj.", ".self_attn.dms_proj_alpha."))


def _read_dms_tensors(path: str) -> Dict[str, torch.Tensor]:
    """The adapter tensors of a checkpoint folder (safetensors, sharded or not, or .bin)."""
    out = {}
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if files:
        from safetensors import safe_open
        for f in files:
            with safe_open(os.path.join(path, f), framework="pt") as h:
                for key in h.keys():
                    if ".dms_" in key:
                        out[key] = h.get_tensor(key)
    else:
        for f in sorted(f for f in os.listdir(path) if f.endswith(".bin")):
            sd = torch.load(os.path.join(path, f), map_location="cpu", weights_only=True)
            out.update({k: v for k, v in sd.items() if ".dms_" in k})
    renamed = {}
    for key, t in out.items():
        for a, b in _ADAPTER_RENAMES:
            key = key.replace(a, b)
        renamed[key] = t
    return renamed


def load_dms_model(path_or_config, *, dtype: Optional[torch.dtype] = None, device=None,
                   **overrides) -> nn.Module:
    """A transformers Qwen3 / Llama causal LM patched for DMS (see :func:`patch_model`).

    path_or_config: a local checkpoint folder (config.json + weights; nothing is downloaded),
    a transformers config, or a config dict (random weights). ``overrides``: DMSSettings fields
    (window, alpha_scale, alpha_offset, variant, alpha_per, disable_eviction)."""
    if isinstance(path_or_config, (str, os.PathLike)):
        path = os.fspath(path_or_config)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"path_or_config: {path!r} is not a checkpoint folder with a config.json")
        with open(os.path.join(path, "config.json")) as f:
            raw = json.load(f)
        st = dms_settings(raw, **overrides)
        _check_type(raw.get("model_type"))
        # The adapter tensors are "unexpected" to the plain architecture; they are loaded below,
        # so transformers' load report would only mislead.
        from transformers.utils import logging as hf_logging
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto",
                                                             local_files_only=True)
        finally:
            hf_logging.set_verbosity(level)
        patch_model(model, st)
        if st.variant == "adapter":
            extra = _read_dms_tensors(path)
            want = {k for k in model.state_dict() if ".dms_proj_alpha" in k}
            missing = sorted(want - set(extra))
            if missing:
                raise ValueError(f"path_or_config: adapter checkpoint lacks {missing[:3]}"
                                 f"{' ...' if len(missing) > 3 else ''}")
            model.load_state_dict({k: extra[k] for k in want}, strict=False)
    else:
        if isinstance(path_or_config, dict):
            raw = dict(path_or_config)
            _check_type(raw.get("model_type"))
            config = AutoConfig.for_model(**raw)
        elif isinstance(path_or_config, PretrainedConfig):
            config = path_or_config
            _check_type(getattr(config, "model_type", None))
        else:
            raise ValueError(f"path_or_config: expected a folder, a config or a dict, got "
                             f"{type(path_or_config).__name__}")
        st = dms_settings(config, **overrides)
        model = AutoModelForCausalLM.from_config(config)
        if dtype is not None:
            model = model.to(dtype)
        patch_model(model, st)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model


def _check_type(mtype) -> None:
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"path_or_config: model_type must be one of {SUPPORTED_MODEL_TYPES}, got {mtype!r}")


# ----------------------------------------------------------------------------- the cache

@dataclass
class _Plan:
    seq_ids: List[int]
    cu_seqlens: torch.Tensor           # int32 CPU [n + 1]
    positions: torch.Tensor            # int64 on the model device [T]
    index: Optional[torch.Tensor]      # flat row indices of the packed tokens, None: all of them
    max_position: int
    counts: List[int]


class _LayerView(CacheLayerMixin):
    """What transformers asks of one layer; the data lives in DMSCache."""
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, parent: "DMSCacheHF"):
        super().__init__()
        self._parent = parent

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("DMSCacheHF: attention of a DMS model does not call update(); "
                           "was the model patched (dms_ext.hf.patch_model)?")

    def get_mask_sizes(self, query_length: int):
        return query_length + self._parent.get_seq_length(), 0

    def get_seq_length(self) -> int:
        return self._parent.get_seq_length()

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        pass


class DMSCacheHF(Cache):
    """A transformers Cache over :class:`dms_ext.DMSCache` for a patched model.

    Batch row b of the model's inputs is sequence ``seq_ids[b]`` (added on the first call).
    Padding columns (attention_mask 0) never enter the cache: each call packs the valid tokens
    of every row into one chunk per sequence. ``get_seq_length`` counts columns (as transformers
    expects for slicing a continued prompt), positions count each sequence's own tokens.
    ``batch_repeat_interleave`` / ``batch_select_indices`` / ``reorder_cache`` fork and release
    sequences. ``crop`` is impossible (evicted keys are gone) and raises.

    Pool exhaustion: each layer's ``DMSCache.attend`` raises ``OutOfBlocks`` before touching
    that layer, but the layers before it in the same forward have already appended, so after an
    OutOfBlocks the sequences of that call are inconsistent: release them (size the pool with
    ``from_model``, which assumes no eviction at all, to never get there)."""

    def __init__(self, cache: DMSCache):
        if not isinstance(cache, DMSCache):
            raise ValueError(f"cache: expected a dms_ext.DMSCache, got {type(cache).__name__}")
        super().__init__(layers=[_LayerView(self) for _ in range(cache.num_layers)])
        self.dms = cache
        self.seq_ids: List[int] = []
        self.positions: Dict[int, int] = {}
        self._seen = 0
        self._plan: Optional[_Plan] = None
        self._packed: Optional[tuple] = None

    @classmethod
    def from_model(cls, model, *, max_seqs: int, max_tokens: int, block_size: int = 64,
                   num_blocks: Optional[int] = None, dtype: Optional[torch.dtype] = None,
                   device=None) -> "DMSCacheHF":
        """A cache sized for ``max_seqs`` sequences of up to ``max_tokens`` tokens each with no
        eviction at all (the worst case); pass ``num_blocks`` to size the pool yourself."""
        st = _state_of(model)
        cfg = model.config
        hkv = cfg.num_key_value_heads
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        p = next(model.parameters())
        if num_blocks is None:
            num_blocks = max_seqs * hkv * (-(-int(max_tokens) // block_size))
        per_head = -(-int(max_tokens) // block_size)
        c = DMSCache(cfg.num_hidden_layers, hkv, d, window=st.settings.window, block_size=block_size,
                     num_blocks=num_blocks, max_seqs=max_seqs, dtype=dtype or p.dtype,
                     device=device if device is not None else p.device,
                     max_blocks_per_head=max(1, min(num_blocks, per_head)))
        return cls(c)

    # -- transformers' Cache API
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._seen

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0):
        return query_length + self._seen, 0

    def get_max_length(self, layer_idx=None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return bool(self.seq_ids)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("DMSCacheHF: crop is impossible, evicted keys are gone")

    def reset(self) -> None:
        for s in list(self.seq_ids):
            self.dms.release(s)
            self.positions.pop(s, None)
        self.seq_ids = []
        self._seen = 0

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._reselect([i for i in range(len(self.seq_ids)) for _ in range(int(repeats))])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._reselect([int(i) for i in torch.as_tensor(indices).reshape(-1).tolist()])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._reselect([int(i) for i in torch.as_tensor(beam_idx).reshape(-1).tolist()])

    def _reselect(self, rows: List[int]) -> None:
        """New batch row i = old row rows[i]: first use keeps the sequence, repeats fork it, and
        the unused ones are released first, so their rows and blocks can serve the forks."""
        if not self.seq_ids:
            return
        old = self.seq_ids
        if any(not 0 <= r < len(old) for r in rows):
            raise ValueError(f"indices: expected rows in [0, {len(old)}), got {rows}")
        keep = {old[r] for r in rows}
        for sid in old:
            if sid not in keep:
                self.dms.release(sid)
                self.positions.pop(sid, None)
        used = set()
        new = []
        for r in rows:
            sid = old[r]
            if sid in used:
                new.append(self.fork(sid))
            else:
                used.add(sid)
                new.append(sid)
        self.seq_ids = new

    # -- sequences, for generate() below
    def add_sequence(self) -> int:
        sid = self.dms.add_sequence()
        self.positions[sid] = 0
        return sid

    def fork(self, seq_id: int) -> int:
        nid = self.dms.fork(seq_id)
        self.positions[nid] = self.positions[seq_id]
        return nid

    def release(self, seq_id: int) -> None:
        self.dms.release(seq_id)
        self.positions.pop(seq_id, None)
        if seq_id in self.seq_ids:
            self.seq_ids.remove(seq_id)

    def set_packed(self, seq_ids: Sequence[int], counts: Sequence[int]) -> None:
        """The next model call gets input_ids [1, sum(counts)]: chunk i (counts[i] tokens)
        continues seq_ids[i]. Used by :func:`generate`; batch rows are ignored for that call."""
        if len(seq_ids) != len(counts) or any(int(c) < 1 for c in counts):
            raise ValueError("counts: expected one count >= 1 per sequence id")
        self._packed = ([int(s) for s in seq_ids], [int(c) for c in counts])

    def live_tokens(self, layer: int, seq_id: int) -> torch.Tensor:
        return self.dms.live_tokens(layer, seq_id)

    # -- per forward
    def _begin(self, b: int, n: int, mask2d: Optional[torch.Tensor], device) -> None:
        if self._packed is not None:
            seq_ids, counts = self._packed
            self._packed = None
            if b != 1 or n != sum(counts):
                raise ValueError(f"input_ids: set_packed expects shape [1, {sum(counts)}], got [{b}, {n}]")
            index = None
        else:
            if not self.seq_ids:
                self.seq_ids = [self.add_sequence() for _ in range(b)]
            if len(self.seq_ids) != b:
                raise ValueError(f"input_ids: batch size {b} does not match the cache's "
                                 f"{len(self.seq_ids)} sequences")
            if mask2d is not None:
                valid = mask2d[:, -n:].detach().to("cpu", torch.bool).numpy()
                if valid.shape != (b, n):
                    raise ValueError(f"attention_mask: expected [{b}, >= {n}], got {list(mask2d.shape)}")
            else:
                valid = None
            if valid is None or valid.all():
                seq_ids, counts, index = list(self.seq_ids), [n] * b, None
            else:
                counts_all = valid.sum(axis=1)
                seq_ids = [s for s, c in zip(self.seq_ids, counts_all) if c > 0]
                counts = [int(c) for c in counts_all if c > 0]
                flat = np.flatnonzero(valid.reshape(-1))
                index = torch.from_numpy(flat).to(device)
            self._seen += n
        pos = np.concatenate([np.arange(self.positions[s], self.positions[s] + c)
                              for s, c in zip(seq_ids, counts)]) if seq_ids else np.zeros(0, np.int64)
        for s, c in zip(seq_ids, counts):
            self.positions[s] += c
        cu = torch.zeros(len(seq_ids) + 1, dtype=torch.int32)
        if seq_ids:
            cu[1:] = torch.tensor(np.cumsum(counts), dtype=torch.int32)
        self._plan = _Plan(seq_ids=seq_ids, cu_seqlens=cu,
                           positions=torch.from_numpy(pos.astype(np.int64)).to(device),
                           index=index, max_position=int(pos.max()) if pos.size else 0,
                           counts=counts)

    def _end(self) -> None:
        self._plan = None


# ----------------------------------------------------------------------------- generation

@dataclass
class GenerationResult:
    """sequences[i][j]: the tokens generated for prompt i, sample j (the prompt excluded)."""
    sequences: List[List[List[int]]]
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0
    stats: Dict[str, object] = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")


def _sample(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float,
            generator: Optional[torch.Generator]) -> torch.Tensor:
    logits = logits.float()
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits / max(float(temperature), 1e-6)
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        srt, idx = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(srt, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(srt, dim=-1) > top_p
        srt = srt.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, srt)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 32,
             num_samples: int = 1, do_sample: bool = False, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, eos_token_id: Union[int, Sequence[int], None] = None,
             cache: Optional[DMSCacheHF] = None, block_size: int = 64,
             prefill_chunk_tokens: int = 4096, generator: Optional[torch.Generator] = None,
             callback: Optional[Callable[[int, List[int], DMSCacheHF], None]] = None) -> GenerationResult:
    """Batched generation over DMSCache without padding: prompts of different lengths are packed
    (prefilled in chunks of at most ``prefill_chunk_tokens`` tokens), each prompt is forked into
    ``num_samples`` sequences after its prefill (parallel sampling shares the prompt's cache
    contents by copy), every decode step packs one token per live sequence, and a sequence is
    released as soon as it emits ``eos_token_id`` or reaches ``max_new_tokens``.

    ``callback(step, live_seq_ids, cache)`` runs after every decode step (before releases)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: expected a non-empty list of non-empty token lists")
    if num_samples < 1:
        raise ValueError(f"num_samples: expected >= 1, got {num_samples}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
    _state_of(model)
    dev = next(model.parameters()).device
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    total = len(prompts) * num_samples
    if cache is None:
        longest = max(len(p) for p in prompts) + max_new_tokens
        cache = DMSCacheHF.from_model(model, max_seqs=total, max_tokens=longest, block_size=block_size)

    def forward(seq_ids: List[int], chunks: List[List[int]]) -> torch.Tensor:
        counts = [len(c) for c in chunks]
        ids = torch.tensor([t for c in chunks for t in c], dtype=torch.long, device=dev)[None]
        last = torch.tensor(np.cumsum(counts) - 1, dtype=torch.long, device=dev)
        cache.set_packed(seq_ids, counts)
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=last)
        return out.logits[0]                                   # [n, vocab]

    t0 = time.perf_counter()
    base = [cache.add_sequence() for _ in prompts]
    last_logits: Dict[int, torch.Tensor] = {}
    # Prefill: pack prompt pieces up to the token budget per call.
    offs = [0] * len(prompts)
    while any(o < len(p) for o, p in zip(offs, prompts)):
        budget = max(1, int(prefill_chunk_tokens))
        sids, chunks, owners = [], [], []
        for i, p in enumerate(prompts):
            if offs[i] >= len(p) or budget <= 0:
                continue
            take = min(len(p) - offs[i], budget)
            sids.append(base[i])
            chunks.append(list(p[offs[i]:offs[i] + take]))
            owners.append(i)
            offs[i] += take
            budget -= take
        logits = forward(sids, chunks)
        for row, i in enumerate(owners):
            if offs[i] == len(prompts[i]):
                last_logits[i] = logits[row]
    # Parallel sampling: every sample of a prompt starts from the prompt's cache (fork).
    seqs: List[List[List[int]]] = [[[] for _ in range(num_samples)] for _ in prompts]
    live: List[tuple] = []                                      # (seq_id, prompt, sample)
    for i in range(len(prompts)):
        first = _sample(last_logits[i][None].expand(num_samples, -1), do_sample, temperature,
                        top_k, top_p, generator).tolist()
        ids = [base[i]] + [cache.fork(base[i]) for _ in range(num_samples - 1)]
        for j, (sid, tok) in enumerate(zip(ids, first)):
            seqs[i][j].append(int(tok))
            live.append((sid, i, j))
    _sync(dev)
    t1 = time.perf_counter()

    def finished(i, j):
        s = seqs[i][j]
        return len(s) >= max_new_tokens or (s and s[-1] in eos)

    steps = tokens = 0
    still = []
    for sid, i, j in live:
        if finished(i, j):
            cache.release(sid)
        else:
            still.append((sid, i, j))
    live = still
    while live:
        sids = [s for s, _, _ in live]
        logits = forward(sids, [[seqs[i][j][-1]] for _, i, j in live])
        nxt = _sample(logits, do_sample, temperature, top_k, top_p, generator).tolist()
        steps += 1
        tokens += len(live)
        if callback is not None:
            callback(steps, sids, cache)
        still = []
        for (sid, i, j), tok in zip(live, nxt):
            seqs[i][j].append(int(tok))
            if finished(i, j):
                cache.release(sid)
            else:
                still.append((sid, i, j))
        live = still
    _sync(dev)
    t2 = time.perf_counter()
    return GenerationResult(sequences=seqs, prefill_s=t1 - t0, decode_s=t2 - t1,
                            decode_steps=steps, decode_tokens=tokens)
