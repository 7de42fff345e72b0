"""transformers integration: Qwen3 / Llama DMS models in generate() on DMSCache and the dms ops.

    model = load_dms_model("path/to/checkpoint")            # or a config / dict: random weights
    cache = DMSCacheHF.from_model(model, max_seqs=4, max_tokens=4096)
    out = model.generate(ids, attention_mask=mask, **cache_kwargs(model, cache), max_new_tokens=64)

or, with fork for parallel sampling and sequences released as they finish (no padding at all):

    result = generate(model, [prompt_a, prompt_b], max_new_tokens=64, num_samples=4,
                      do_sample=True, eos_token_id=tok.eos_token_id)

What the patch does (docs/semantics.md), per attention layer of a transformers Qwen3ForCausalLM or
LlamaForCausalLM (transformers >=5.0,<6, the cache passed as ``cache=`` or ``past_key_values=``):

* Borrowed neuron (``dms_separate_alpha`` false, the public nvidia/Qwen3-8B-DMS-8x checkpoint):
  the eviction logit of KV head g is channel D-1 of query head g*G after q_norm and before RoPE,
  times ``dms_alpha_scale`` minus ``dms_initial_alpha_offset``, computed in the model dtype as
  NVIDIA's reference does (bf16: the product rounded to bf16, then the difference; the kernels
  do the same); that channel is zeroed before and after RoPE. On the cached path this is the
  fused ``dms.eviction_rope`` op (q/k RMSNorm inside).
* Adapter (``dms_separate_alpha`` true, NVIDIA's naming): ``dms_proj_alpha(dms_proj_alpha_norm(h))``
  of the layer input h (before input_layernorm), one logit per KV head; q keeps every channel.
  Checkpoints written by dms_ext.models (``dms_norm`` / ``dms_proj``) load under these names.
* ``dms_alpha_per == "layer"``: KV head 0's logit decides for every head of the layer.
* Attention then goes through ``DMSCache.attend`` (sparse prefill / sparse decode kernels);
  decode steps on CUDA replay a CUDA graph.

Without a DMSCacheHF (no cache, or a transformers DynamicCache) the same model runs a dense
plain-torch forward masked by the DMS visibility rule: the oracle the cached path is tested
against. With a DMSCacheHF the cache is always used, or :class:`DMSCacheBypassed` is raised.

Modules: settings (config fields, transformers version), attention, patching, graphs (decode
step, CUDA graphs), cache (DMSCacheHF), loading, generate.
"""
from .cache import DMSCacheHF
from .generate import GenerationResult, generate
from .loading import load_dms_model
from .patching import patch_model
from .settings import (SUPPORTED_MODEL_TYPES, TRANSFORMERS_VERSION, DMSCacheBypassed, DMSSettings,
                       cache_arg_name, cache_kwargs, dms_settings)

__all__ = ["DMSSettings", "dms_settings", "patch_model", "load_dms_model", "DMSCacheHF",
           "generate", "GenerationResult", "SUPPORTED_MODEL_TYPES", "DMSCacheBypassed",
           "cache_kwargs", "cache_arg_name", "TRANSFORMERS_VERSION"]
