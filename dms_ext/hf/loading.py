"""Loading: a local checkpoint folder (NVIDIA's public DMS checkpoints or dms_ext.models'
format), a transformers config or a config dict (random weights), patched for DMS."""
from __future__ import annotations

import json
import os
import warnings
from typing import Dict, Optional

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from .patching import patch_model
from .settings import check_type, dms_settings


_ADAPTER_RENAMES = ((".self_attn.dms_norm.", ".self_attn.dms_proj_alpha_norm."),
                    (".self_attn.dms_proj.", ".self_attn.dms_proj_alpha."))


def read_dms_tensors(path: str) -> Dict[str, torch.Tensor]:
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
        check_type(raw.get("model_type"))
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
            extra = read_dms_tensors(path)
            want = {k for k in model.state_dict() if ".dms_proj_alpha" in k}
            missing = sorted(want - set(extra))
            if missing:
                raise ValueError(f"path_or_config: adapter checkpoint lacks {missing[:3]}"
                                 f"{' ...' if len(missing) > 3 else ''}")
            model.load_state_dict({k: extra[k] for k in want}, strict=False)
    else:
        if isinstance(path_or_config, dict):
            raw = dict(path_or_config)
            check_type(raw.get("model_type"))
            config = AutoConfig.for_model(**raw)
        elif isinstance(path_or_config, PretrainedConfig):
            config = path_or_config
            check_type(getattr(config, "model_type", None))
        else:
            raise ValueError(f"path_or_config: expected a folder, a config or a dict, got "
                             f"{type(path_or_config).__name__}")
        st = dms_settings(config, **overrides)
        # Built on the target device: random initialisation of an 8B model on the CPU in
        # float32 takes minutes, on the GPU a second.
        with torch.device(device if device is not None else "cpu"):
            model = AutoModelForCausalLM.from_config(config)
        if dtype is not None:
            model = model.to(dtype)
        patch_model(model, st)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model
