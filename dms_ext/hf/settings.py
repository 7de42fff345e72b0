"""DMS settings of a transformers config, the per-model state of a patched model, and what this
module needs to know about the installed transformers (which name the cache argument has)."""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import nn

try:
    import transformers
    from transformers import PretrainedConfig  # noqa: F401  (re-exported for loading)
except ImportError as _e:  # pragma: no cover - exercised only without transformers
    raise ImportError("dms_ext.hf needs transformers>=5.0,<6 "
                      "(pip install 'transformers>=5.0,<6')") from _e

SUPPORTED_MODEL_TYPES = ("qwen3", "llama")
VARIANTS = ("borrowed", "adapter", "none")
TRANSFORMERS_VERSION = transformers.__version__


class DMSCacheBypassed(RuntimeError):
    """A DMSCacheHF was passed to a patched model, but the forward did not run through it (the
    model would have run dense instead): raised rather than falling back silently."""


def bypass_error(what: str) -> DMSCacheBypassed:
    return DMSCacheBypassed(
        f"DMSCacheHF: {what}, so this call would run dense attention instead of the DMS cache. "
        f"transformers {TRANSFORMERS_VERSION} passes the cache in a way dms_ext.hf does not "
        f"handle; supported: transformers >=5.0,<6 (tested 5.0.0, 5.17.0 and 5.24.0). Please report it.")


def cache_arg_name(model: nn.Module) -> str:
    """The keyword the model's forward takes the cache under in this transformers release:
    ``"cache"`` (newer 5.x, where ``past_key_values`` is deprecated) or ``"past_key_values"``."""
    fwd = type(model).forward
    params = inspect.signature(fwd).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: nn.Module, cache) -> Dict[str, object]:
    """``{name: cache}`` for ``model(...)`` / ``model.generate(...)`` under the argument name of
    the installed transformers (no deprecation warning on any 5.x)."""
    return {cache_arg_name(model): cache}


# ----------------------------------------------------------------------------- settings

@dataclass
class DMSSettings:
    """DMS fields of a model config (names of NVIDIA's Qwen3ConfigDMS in brackets).

    window [dms_window_size], alpha_scale [dms_alpha_scale], alpha_offset
    [dms_initial_alpha_offset], variant "adapter" iff [dms_separate_alpha], alpha_per
    [dms_alpha_per] "head" or "layer", disable_eviction [dms_disable_eviction]. variant "none"
    is a plain model run through the cache (nothing is ever evicted).

    Inference-time fields of the public checkpoints: chunked_prefill [dms_chunked_prefill]
    (a forward with a DMSCacheHF runs its tokens through the layers in chunks of at most this
    many columns; hf.generate prefills in chunks of this many tokens), preallocate_for_tokens
    [dms_preallocate_for_tokens] (DMSCacheHF.from_model's default max_tokens), block_size
    [dms_paged_attention_block_size] (from_model's default block_size), manual_inference_mode
    [dms_manual_inference_mode] (read and kept; nothing to do here: prefill and decode are
    chosen per call from the shapes, there is no mode to switch)."""
    window: int = 512
    alpha_scale: float = 100.0
    alpha_offset: float = 5.0
    variant: str = "borrowed"
    alpha_per: str = "head"
    disable_eviction: bool = False
    chunked_prefill: Optional[int] = None
    preallocate_for_tokens: Optional[int] = None
    block_size: Optional[int] = None
    manual_inference_mode: bool = False

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
        for name in ("chunked_prefill", "preallocate_for_tokens", "block_size"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name}: expected None or an int >= 1, got {v!r}")
        if self.block_size is not None and self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size: expected a power of two, got {self.block_size}")

    @property
    def evicts(self) -> bool:
        return self.variant != "none" and not self.disable_eviction


def _cfg_get(config, name, default=None):
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


_NVIDIA_FIELDS = (("dms_window_size", "window"), ("dms_alpha_scale", "alpha_scale"),
                  ("dms_initial_alpha_offset", "alpha_offset"), ("dms_alpha_per", "alpha_per"),
                  ("dms_disable_eviction", "disable_eviction"),
                  ("dms_chunked_prefill", "chunked_prefill"),
                  ("dms_preallocate_for_tokens", "preallocate_for_tokens"),
                  ("dms_paged_attention_block_size", "block_size"),
                  ("dms_manual_inference_mode", "manual_inference_mode"))


def dms_settings(config, **overrides) -> DMSSettings:
    """DMSSettings from a transformers config or config.json dict.

    Reads NVIDIA's fields (dms_window_size, dms_alpha_scale, dms_initial_alpha_offset,
    dms_separate_alpha, dms_alpha_per, dms_disable_eviction, dms_chunked_prefill,
    dms_preallocate_for_tokens, dms_paged_attention_block_size, dms_manual_inference_mode), else
    the ``"dms"`` block that dms_ext.models writes ({"window", "alpha_scale", "alpha_offset",
    "variant"}); ``overrides`` (DMSSettings field names) win over both."""
    s = {}
    ext = _cfg_get(config, "dms", None) or {}
    if isinstance(ext, dict):
        for key in ("window", "alpha_scale", "alpha_offset", "variant"):
            if key in ext:
                s[key] = ext[key]
    for src, dst in _NVIDIA_FIELDS:
        v = _cfg_get(config, src, None)
        if v is not None:
            s[dst] = v
    sep = _cfg_get(config, "dms_separate_alpha", None)
    if sep is not None:
        s["variant"] = "adapter" if sep else "borrowed"
    s.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("window", "chunked_prefill", "preallocate_for_tokens", "block_size"):
        if isinstance(s.get(key), float) and float(s[key]).is_integer():
            s[key] = int(s[key])
    return DMSSettings(**s)


def write_settings(config, st: DMSSettings) -> None:
    """Mirror the settings into the config under NVIDIA's names (save_pretrained keeps them)."""
    config.dms_window_size = st.window
    config.dms_alpha_scale = float(st.alpha_scale)
    config.dms_initial_alpha_offset = float(st.alpha_offset)
    config.dms_separate_alpha = st.variant == "adapter"
    config.dms_alpha_per = st.alpha_per
    config.dms_disable_eviction = bool(st.disable_eviction or st.variant == "none")
    for src, dst in _NVIDIA_FIELDS[5:]:
        v = getattr(st, dst)
        if v is not None and (v is not False or _cfg_get(config, src, None) is not None):
            setattr(config, src, v)


# ----------------------------------------------------------------------------- model state

class ModelState:
    """Per patched model: settings, the RoPE table for the dms ops, the forward's padding mask.

    Kept out of the module tree (a plain attribute), so it never lands in a state dict."""

    def __init__(self, model: nn.Module, settings: DMSSettings):
        self.settings = settings
        self.rotary = model.model.rotary_emb
        self.num_layers = len(model.model.layers)
        self.tables: Dict[torch.device, torch.Tensor] = {}
        self.mask2d: Optional[torch.Tensor] = None
        self.cache = None          # the DMSCacheHF of the running forward
        self.dense_cache = None    # the transformers Cache of the running dense forward

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


def state_of(model) -> ModelState:
    st = model.__dict__.get("_dms_state")
    if st is None:
        raise ValueError("model: not a DMS model; load it with load_dms_model or patch_model")
    return st


def check_type(mtype) -> None:
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"path_or_config: model_type must be one of {SUPPORTED_MODEL_TYPES}, got {mtype!r}")
