"""dms_ext.hf: transformers Qwen3 / Llama models on DMSCache, against a float64 oracle.

Tiny random models built from configs (nothing is downloaded). The oracle is written here from
docs/semantics.md on top of dms_ext.reference (eviction_rope, dms_attention), in float64, so it
shares no code with the patched attention it checks. Here: the model builders and the oracle
(test_hf_generate.py imports them), settings, the cached path against the oracle, checkpoints,
and the cache-argument / eviction-rounding cases of issue 12. Generation (hf.generate,
transformers' generate, forks, beam search, CUDA graphs, fp8 pools) is in test_hf_generate.py.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dms_ext import reference  # noqa: E402
from dms_ext import hf  # noqa: E402

CUDA = torch.cuda.is_available()


def tiny_config(model_type="qwen3", variant="borrowed", *, heads=6, kv_heads=2, head_dim=16,
                layers=2, window=4, vocab=97, alpha_scale=100.0, alpha_offset=5.0, **extra):
    cfg = dict(model_type=model_type, vocab_size=vocab, hidden_size=heads * head_dim,
               intermediate_size=64, num_hidden_layers=layers, num_attention_heads=heads,
               num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=256,
               dms_window_size=window, dms_alpha_scale=alpha_scale,
               dms_initial_alpha_offset=alpha_offset, dms_separate_alpha=variant == "adapter")
    cfg.update(extra)
    return cfg


def make_model(seed=0, dtype=torch.float32, device="cpu", **kw):
    torch.manual_seed(seed)
    m = hf.load_dms_model(tiny_config(**kw), dtype=dtype, device=device)
    with torch.no_grad():
        for p in m.parameters():
            # Random norms and larger weights than HF's std 0.02 init, so logits, norms and the
            # eviction decisions all carry signal.
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() == 1 else 0.15) + (1.0 if p.dim() == 1 else 0.0))
        for layer in m.model.layers:
            a = layer.self_attn
            if hasattr(a, "dms_proj_alpha"):
                # Adapter logits ~ N(-offset, (scale * 0.05 * sqrt(hidden))^2): about a third evict.
                a.dms_proj_alpha.weight.normal_(0, 0.05)
    return m


# ----------------------------------------------------------------------------- oracle

def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()


def oracle_logits(model, ids):
    """float64 next-token logits [N, V] of one sequence (positions 0..N-1), DMS mask from
    reference.dms_attention; projections read from the model's weights. Also returns the
    eviction logits [N, Hkv] of every layer."""
    cfg = model.config
    st = hf.dms_settings(cfg)
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.head_dim
    n = ids.shape[0]
    eps = cfg.rms_norm_eps
    theta = cfg.rope_parameters["rope_theta"]
    cs = reference.rope_cache(n, d, theta).double()
    pos = torch.arange(n)
    lin = lambda mod, x: x @ mod.weight.double().t() + (mod.bias.double() if mod.bias is not None else 0)  # noqa: E731
    x = model.model.embed_tokens.weight.double()[ids.cpu()]
    per_layer = []
    for layer in model.model.layers:
        a = layer.self_attn
        h = _rms(x, layer.input_layernorm.weight, eps)
        q = lin(a.q_proj, h).view(n, hq, d)
        k = lin(a.k_proj, h).view(n, hkv, d)
        v = lin(a.v_proj, h).view(n, hkv, d)
        qn = a.q_norm.weight.double() if hasattr(a, "q_norm") else None
        kn = a.k_norm.weight.double() if hasattr(a, "k_norm") else None
        if st.variant == "borrowed":
            q, k, logits = reference.eviction_rope(q, k, pos, cs.float(), st.alpha_scale,
                                                   st.alpha_offset, qn, kn, eps)
            logits = logits.double()
        else:
            if qn is not None:
                q, k = _rms(q, qn, eps), _rms(k, kn, eps)
            c, s = cs[:, None, : d // 2], cs[:, None, d // 2:]
            rot = lambda t: torch.cat([t[..., : d // 2] * c - t[..., d // 2:] * s,  # noqa: E731
                                       t[..., d // 2:] * c + t[..., : d // 2] * s], -1)
            q, k = rot(q), rot(k)
            logits = lin(a.dms_proj_alpha, _rms(x, a.dms_proj_alpha_norm.weight, eps)) \
                * st.alpha_scale - st.alpha_offset
        if st.alpha_per == "layer":
            logits = logits[:, :1].expand(n, hkv)
        per_layer.append(logits)
        o = reference.dms_attention(q, k, v, logits, st.window, a.scaling)
        x = x + lin(a.o_proj, o.reshape(n, hq * d))
        h = _rms(x, layer.post_attention_layernorm.weight, eps)
        mlp = layer.mlp
        x = x + lin(mlp.down_proj, torch.nn.functional.silu(lin(mlp.gate_proj, h)) * lin(mlp.up_proj, h))
    x = _rms(x, model.model.norm.weight, eps)
    return lin(model.lm_head, x), per_layer


def assert_close(ours, ref, rtol, what):
    ours, ref = ours.double().cpu(), ref.double().cpu()
    err = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rtol * scale, f"{what}: max err {err:.3g} vs logit scale {scale:.3g}"


def run_turns(model, cache, seqs, turns):
    """Feeds each turn (list of per-row token chunks, equal lengths per call) through the cache;
    returns per row the logits of every fed token, concatenated."""
    outs = [[] for _ in seqs]
    for chunk in turns:
        ids = torch.stack([torch.as_tensor(c) for c in chunk]).to(next(model.parameters()).device)
        with torch.no_grad():
            lg = model(input_ids=ids, **hf.cache_kwargs(model, cache), use_cache=True).logits
        for b in range(len(seqs)):
            outs[b].append(lg[b])
    return [torch.cat(o, 0) for o in outs]


# ----------------------------------------------------------------------------- settings

def test_settings_read_nvidia_fields_and_models_block():
    s = hf.dms_settings({"dms_window_size": 512, "dms_alpha_scale": 100.0,
                         "dms_initial_alpha_offset": 5.0, "dms_separate_alpha": False})
    assert (s.window, s.alpha_scale, s.alpha_offset, s.variant) == (512, 100.0, 5.0, "borrowed")
    s = hf.dms_settings({"dms_separate_alpha": True, "dms_alpha_per": "layer"})
    assert (s.variant, s.alpha_per) == ("adapter", "layer")
    s = hf.dms_settings({"dms": {"window": 64, "alpha_scale": 50.0, "alpha_offset": 2.0,
                                 "variant": "adapter"}})
    assert (s.window, s.alpha_scale, s.alpha_offset, s.variant) == (64, 50.0, 2.0, "adapter")
    assert hf.dms_settings({"dms_window_size": 8}, window=16).window == 16
    with pytest.raises(ValueError, match="window"):
        hf.dms_settings({"dms_window_size": 0})
    with pytest.raises(ValueError, match="alpha_per"):
        hf.dms_settings({"dms_alpha_per": "token"})


def test_unsupported_model_type_and_missing_folder_raise():
    with pytest.raises(ValueError, match="model_type"):
        hf.load_dms_model(dict(tiny_config(), model_type="gpt2"))
    with pytest.raises(ValueError, match="path_or_config"):
        hf.load_dms_model("/nonexistent/folder")


# ----------------------------------------------------------------------------- equivalence

CASES = [("qwen3", "borrowed", 6, 2), ("qwen3", "adapter", 6, 2), ("llama", "borrowed", 6, 2),
         ("llama", "adapter", 6, 2), ("qwen3", "borrowed", 3, 3), ("qwen3", "borrowed", 5, 1),
         ("llama", "borrowed", 14, 2)]


@pytest.mark.parametrize("model_type,variant,heads,kv_heads", CASES)
def test_cached_path_matches_dense_dms_oracle(model_type, variant, heads, kv_heads):
    """Prefill, one-token decode steps, then a second-turn prefill chunk and more decode: every
    fed token's logits equal the float64 dense-mask oracle run over the whole sequence."""
    m = make_model(seed=1, model_type=model_type, variant=variant, heads=heads, kv_heads=kv_heads,
                   head_dim=16 if heads * 16 <= 224 else 8)
    gen = torch.Generator().manual_seed(2)
    B, n = 2, 31
    seqs = torch.randint(0, m.config.vocab_size, (B, n), generator=gen)
    cache = hf.DMSCacheHF.from_model(m, max_seqs=B, max_tokens=64, block_size=4)
    turns = [seqs[:, :11]] + [seqs[:, t:t + 1] for t in range(11, 19)] + [seqs[:, 19:28]] \
        + [seqs[:, t:t + 1] for t in range(28, 31)]
    ours = run_turns(m, cache, list(range(B)), [[c[b] for b in range(B)] for c in turns])
    evicted = 0
    for b in range(B):
        ref, per_layer = oracle_logits(m, seqs[b])
        assert_close(ours[b], ref, 1e-4, f"row {b}")
        for layer, logits in enumerate(per_layer):
            live = cache.live_tokens(layer, cache.seq_ids[b]).long()
            assert live.tolist() == reference.live_counts(logits, 4).tolist(), f"layer {layer}"
            evicted += int((n - live).sum())
    assert evicted > 0, "the test model never evicted: the comparison would prove nothing"


def test_dense_path_with_dynamic_cache_matches_no_cache():
    m = make_model(seed=3)
    ids = torch.randint(0, m.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = m(ids, use_cache=False).logits
        dc = transformers.DynamicCache(config=m.config)
        a = m(ids[:, :12], **hf.cache_kwargs(m, dc), use_cache=True).logits
        parts = [a] + [m(ids[:, t:t + 1], **hf.cache_kwargs(m, dc), use_cache=True).logits
                       for t in range(12, 20)]
    assert_close(torch.cat(parts, 1), full, 1e-5, "DynamicCache")
    for b in range(2):
        assert_close(full[b], oracle_logits(m, ids[b])[0], 1e-4, f"dense row {b}")


def test_alpha_per_layer_and_disabled_eviction():
    m = make_model(seed=5, dms_alpha_per="layer")
    ids = torch.randint(0, m.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(6))
    cache = hf.DMSCacheHF.from_model(m, max_seqs=1, max_tokens=32, block_size=4)
    with torch.no_grad():
        ours = m(ids, **hf.cache_kwargs(m, cache), use_cache=True).logits[0]
    assert_close(ours, oracle_logits(m, ids[0])[0], 1e-4, "alpha_per=layer")
    live = cache.live_tokens(0, cache.seq_ids[0])
    assert int(live.min()) == int(live.max()), "one decision per layer: every head keeps the same"
    m2 = make_model(seed=5, dms_disable_eviction=True)
    cache = hf.DMSCacheHF.from_model(m2, max_seqs=1, max_tokens=32, block_size=4)
    with torch.no_grad():
        m2(ids, **hf.cache_kwargs(m2, cache), use_cache=True)
    assert cache.live_tokens(1, cache.seq_ids[0]).tolist() == [24, 24]


# ----------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("variant", ["borrowed", "adapter"])
def test_save_and_load_local_checkpoint(tmp_path, variant):
    m = make_model(seed=19, variant=variant)
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["dms_separate_alpha"] == (variant == "adapter")
    m2 = hf.load_dms_model(str(tmp_path), dtype=torch.float32)
    ids = torch.randint(0, m.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(20))
    with torch.no_grad():
        assert torch.equal(m(ids, use_cache=False).logits, m2(ids, use_cache=False).logits)


def test_load_dms_ext_models_checkpoint(tmp_path):
    """A checkpoint in dms_ext.models' format (pytorch_model.bin, "dms" block, dms_norm /
    dms_proj) loads, and its logits match that module's own dense DMS forward."""
    models = pytest.importorskip("dms_ext.models")
    try:
        mc = models.ModelConfig(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, vocab=61,
                                window=4, variant="adapter", intermediate=96, qk_norm=True)
        torch.manual_seed(21)
        ref = models.DMSForCausalLM(mc)
        with torch.no_grad():
            for name, p in ref.named_parameters():
                p.copy_(torch.randn_like(p) * (0.3 if p.dim() == 1 else 0.15)
                        + (1.0 if p.dim() == 1 else 0.0))
                if "dms_proj" in name:
                    p.normal_(0, 0.05)
        ref.save_pretrained(str(tmp_path))
    except (TypeError, AttributeError) as e:  # that module's API moved: nothing to cross-check
        pytest.skip(f"dms_ext.models API differs: {e}")
    m = hf.load_dms_model(str(tmp_path), dtype=torch.float32)
    assert hf.dms_settings(m.config).variant == "adapter"
    ids = torch.randint(0, 61, (1, 20), generator=torch.Generator().manual_seed(22))
    with torch.no_grad():
        want = ref(ids, attention="dms")
        cache = hf.DMSCacheHF.from_model(m, max_seqs=1, max_tokens=32, block_size=4)
        got = m(ids, **hf.cache_kwargs(m, cache), use_cache=True).logits
    assert_close(got, want, 1e-4, "dms_ext.models checkpoint")


def test_adapter_checkpoint_without_adapter_weights_raises(tmp_path):
    m = make_model(seed=23, variant="borrowed")
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["dms_separate_alpha"] = True
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="dms_proj_alpha"):
        hf.load_dms_model(str(tmp_path))


# ----------------------------------------------------------------------------- CUDA

@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("model_type,variant", [("qwen3", "borrowed"), ("llama", "adapter")])
def test_cuda_bf16_cached_path_matches_dense(model_type, variant):
    """bf16 on the GPU: the kernels' path (eviction_rope, sparse_prefill, append, sparse_decode)
    against the dense masked forward of the same bf16 model, prefill + decode + second turn."""
    m = make_model(seed=24, dtype=torch.bfloat16, device="cuda", model_type=model_type,
                   variant=variant, heads=8, kv_heads=2, head_dim=64, window=8)
    gen = torch.Generator().manual_seed(25)
    B, n = 3, 60
    seqs = torch.randint(0, m.config.vocab_size, (B, n), generator=gen)
    cache = hf.DMSCacheHF.from_model(m, max_seqs=B, max_tokens=n, block_size=16)
    turns = [seqs[:, :23]] + [seqs[:, t:t + 1] for t in range(23, 40)] + [seqs[:, 40:55]] \
        + [seqs[:, t:t + 1] for t in range(55, 60)]
    ours = run_turns(m, cache, list(range(B)), [[c[b] for b in range(B)] for c in turns])
    with torch.no_grad():
        dense = m(seqs.cuda(), use_cache=False).logits.float()
    m64 = copy.deepcopy(m).double().cpu()
    for b in range(B):
        ref64, _ = oracle_logits(m64, seqs[b])
        base = (dense[b].double().cpu() - ref64).abs().max().item()
        err = (ours[b].double().cpu() - ref64).abs().max().item()
        # Within a few times what plain PyTorch bf16 gets against the same float64 oracle.
        assert err <= 4 * base + 1e-3 * ref64.abs().max().item(), f"row {b}: {err} vs torch {base}"


def test_nvidia_style_checkpoint_loads_with_library_classes(tmp_path):
    """config.json as the public nvidia/Qwen3-8B-DMS-8x ships it (its own architecture name,
    auto_map to remote code, extra dms_* fields): loads as transformers' Qwen3 without running
    any remote code, with the DMS settings read from the dms_* fields."""
    m = make_model(seed=26, window=7, alpha_scale=50.0, alpha_offset=2.0)
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(architectures=["Qwen3ForCausalLMDMS"], dms_cr=8, dms_tau=0.1,
               dms_paged_attention_block_size=256,
               auto_map={"AutoConfig": "configuration_qwen3_dms.Qwen3Config",
                         "AutoModelForCausalLM": "modeling_qwen3_dms.Qwen3ForCausalLM"})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m2 = hf.load_dms_model(str(tmp_path))
    assert type(m2).__name__ == "Qwen3ForCausalLM"
    st = hf.dms_settings(m2.config)
    assert (st.window, st.alpha_scale, st.alpha_offset, st.variant) == (7, 50.0, 2.0, "borrowed")
    ids = torch.randint(0, m.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(27))
    with torch.no_grad():
        assert torch.equal(m(ids, use_cache=False).logits, m2(ids, use_cache=False).logits)


# ----------------------------------------------------------------------------- issue 12

@pytest.mark.parametrize("name", ["past_key_values", "cache"])
def test_cache_is_used_under_either_argument_name(name):
    """The bypass test: after the forward the sequences are in the cache (tokens held, positions
    advanced) and the cached logits equal the dense-mask logits; either argument name."""
    import warnings
    m = make_model(seed=40)
    ids = torch.randint(0, m.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(41))
    cache = hf.DMSCacheHF.from_model(m, max_seqs=2, max_tokens=32, block_size=4)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)     # the old name is deprecated in newer 5.x
        got = m(ids, use_cache=True, **{name: cache}).logits
        dense = m(ids, use_cache=False).logits
    assert len(cache.dms) == 2 and [cache.positions[s] for s in cache.seq_ids] == [13, 13]
    assert int(cache.live_tokens(0, cache.seq_ids[0]).sum()) > 0
    assert_close(got, dense, 1e-4, f"cached ({name}) vs dense")


def test_bypassed_cache_raises_naming_the_transformers_version():
    m = make_model(seed=42)
    ids = torch.randint(0, m.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(43))
    cache = hf.DMSCacheHF.from_model(m, max_seqs=1, max_tokens=16, block_size=4)
    kw = hf.cache_kwargs(m, cache)
    # A release whose causal LM does not hand the cache to its decoder model.
    orig = m.forward
    m.forward = lambda *a, **k: orig(*a, **{x: v for x, v in k.items() if v is not cache})
    with torch.no_grad(), pytest.raises(hf.DMSCacheBypassed, match=transformers.__version__):
        m(ids, use_cache=True, **kw)
    del m.forward
    # A release whose decoder does not call the (patched) attention of one layer.
    attn = m.model.layers[1].self_attn
    patched = attn.forward
    attn.forward = lambda hidden_states, *a, **k: (attn.o_proj(torch.zeros(
        *hidden_states.shape[:-1], attn.o_proj.in_features)), None)
    with torch.no_grad(), pytest.raises(hf.DMSCacheBypassed, match="1 of 2 attention layers"):
        m(ids, use_cache=True, **kw)
    attn.forward = patched


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm", [False, True])
def test_eviction_logit_rounds_like_the_reference_at_the_threshold(dtype, norm):
    """q_D-1 * 100 - 5 on every representable q near 0.05 (the decision threshold): the op
    (CPU twin) and hf's torch path give torch's own dtype arithmetic bit for bit, as NVIDIA's
    code computes it (q from HF's RMSNorm when there is a q_norm)."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm
    from dms_ext import ops
    lo, hi = torch.tensor(0.0490, dtype=dtype), torch.tensor(0.0510, dtype=dtype)
    vals = [lo]
    while vals[-1] < hi:
        vals.append((vals[-1].view(torch.int16) + 1).view(dtype))    # next representable
    vals = torch.stack(vals)
    t, hkv, g, d = vals.numel(), 2, 3, 16
    gen = torch.Generator().manual_seed(44)
    q = (torch.randn(t, hkv * g, d, generator=gen) * 0.05).to(dtype)
    q[:, ::g, d - 1] = vals[:, None]
    k = torch.randn(t, hkv, d, generator=gen).to(dtype)
    cs = reference.rope_cache(64, d)
    pos = torch.zeros(t, dtype=torch.int64)
    w = None
    qd = q
    if norm:
        rms = Qwen3RMSNorm(d, eps=1e-6).to(dtype)
        with torch.no_grad():
            rms.weight.copy_((torch.rand(d, generator=gen) + 0.5).to(dtype))
            qd = rms(q)
        w = rms.weight.detach()
    want = (qd[:, ::g, d - 1] * 100.0 - 5.0).float()         # torch in the model dtype
    logits = ops.eviction_rope(q.clone(), k.clone(), pos, cs, 100.0, 5.0, w, None if w is None else w)
    same = (logits == want)
    assert same.float().mean() >= (0.98 if norm else 1.0), f"{(~same).sum()} logits differ"
    # Where fp32 math would flip the decision, the dtype arithmetic keeps the reference's.
    assert torch.equal(logits > 0, want > 0) or norm
    fp32 = qd[:, ::g, d - 1].float() * 100.0 - 5.0
    assert ((fp32 > 0) != (want > 0)).any() or norm, "the grid must contain a flipping value"
    _, _, lref = reference.eviction_rope(q, k, pos, cs, 100.0, 5.0, w, w)
    assert torch.equal(lref, logits) or norm


def test_chunked_prefill_and_config_fields():
    """dms_chunked_prefill splits a long forward (same logits), dms_preallocate_for_tokens and
    dms_paged_attention_block_size size from_model, dms_manual_inference_mode is read."""
    m = make_model(seed=45, dms_chunked_prefill=5, dms_preallocate_for_tokens=40,
                   dms_paged_attention_block_size=8, dms_manual_inference_mode=True)
    st = hf.dms_settings(m.config)
    assert (st.chunked_prefill, st.preallocate_for_tokens, st.block_size,
            st.manual_inference_mode) == (5, 40, 8, True)
    cache = hf.DMSCacheHF.from_model(m, max_seqs=2)
    assert cache.dms.block_size == 8 and cache.dms.max_blocks_per_head == 5
    ids = torch.randint(0, m.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(46))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        got = m(ids, attention_mask=mask, use_cache=True, **hf.cache_kwargs(m, cache)).logits
    assert [cache.positions[s] for s in cache.seq_ids] == [17, 13]
    ref0, _ = oracle_logits(m, ids[0])
    ref1, _ = oracle_logits(m, ids[1, 4:])
    assert_close(got[0], ref0, 1e-4, "chunked row 0")
    assert_close(got[1, 4:], ref1, 1e-4, "chunked row 1 (left padded)")
