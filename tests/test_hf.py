"""dms_ext.hf: transformers Qwen3 / Llama models on DMSCache, against a float64 oracle.

Tiny random models built from configs (nothing is downloaded). The oracle is written here from
docs/semantics.md on top of dms_ext.reference (eviction_rope, dms_attention), in float64, so it
shares no code with the patched attention it checks.
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


# ----------------------------------------------------------------------------- generation

@pytest.mark.parametrize("model_type,variant", [("qwen3", "borrowed"), ("llama", "adapter")])
def test_hf_generate_left_padded_batch_matches_each_prompt_alone(model_type, variant):
    m = make_model(seed=7, model_type=model_type, variant=variant)
    gen = torch.Generator().manual_seed(8)
    lens = [9, 4, 13]
    width = max(lens)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    prompts = []
    for b, n in enumerate(lens):
        p = torch.randint(1, m.config.vocab_size, (n,), generator=gen)
        prompts.append(p)
        ids[b, width - n:] = p
        mask[b, width - n:] = 1
    cache = hf.DMSCacheHF.from_model(m, max_seqs=3, max_tokens=32, block_size=4)
    out = m.generate(ids, attention_mask=mask, **hf.cache_kwargs(m, cache), max_new_tokens=10,
                     do_sample=False, pad_token_id=0)
    for b, p in enumerate(prompts):
        alone = m.generate(p[None], max_new_tokens=10, do_sample=False, use_cache=False,
                           pad_token_id=0)
        assert out[b, width:].tolist() == alone[0, len(p):].tolist(), f"row {b}"
    # The cache holds exactly the valid tokens of each row (pads never entered it).
    for b, n in enumerate(lens):
        assert cache.positions[cache.seq_ids[b]] == n + 9


def test_hf_generate_second_turn_continues_the_cache():
    m = make_model(seed=9)
    gen = torch.Generator().manual_seed(10)
    p1 = torch.randint(1, m.config.vocab_size, (1, 7), generator=gen)
    cache = hf.DMSCacheHF.from_model(m, max_seqs=1, max_tokens=64, block_size=4)
    o1 = m.generate(p1, **hf.cache_kwargs(m, cache), max_new_tokens=6, do_sample=False, pad_token_id=0)
    turn2 = torch.cat([o1, torch.randint(1, m.config.vocab_size, (1, 5), generator=gen)], 1)
    o2 = m.generate(turn2, **hf.cache_kwargs(m, cache), max_new_tokens=6, do_sample=False, pad_token_id=0)
    alone = m.generate(turn2, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert o2.tolist() == alone.tolist()
    assert cache.positions[cache.seq_ids[0]] == turn2.shape[1] + 5


def test_fork_gives_independent_continuations():
    m = make_model(seed=11)
    gen = torch.Generator().manual_seed(12)
    prompt = torch.randint(0, m.config.vocab_size, (15,), generator=gen)
    tails = [torch.randint(0, m.config.vocab_size, (6,), generator=gen) for _ in range(3)]
    cache = hf.DMSCacheHF.from_model(m, max_seqs=3, max_tokens=32, block_size=4)
    s0 = cache.add_sequence()
    cache.set_packed([s0], [15])
    with torch.no_grad():
        m(input_ids=prompt[None], **hf.cache_kwargs(m, cache), use_cache=True)
    sids = [s0, cache.fork(s0), cache.fork(s0)]
    got = [[] for _ in sids]
    for t in range(6):
        cache.set_packed(sids, [1, 1, 1])
        with torch.no_grad():
            lg = m(input_ids=torch.stack([x[t] for x in tails])[None], **hf.cache_kwargs(m, cache),
                   use_cache=True).logits[0]
        for i in range(3):
            got[i].append(lg[i])
    for i, tail in enumerate(tails):
        ref, _ = oracle_logits(m, torch.cat([prompt, tail]))
        assert_close(torch.stack(got[i]), ref[15:], 1e-4, f"fork {i}")


def test_generate_packs_forks_and_releases():
    m = make_model(seed=13)
    gen = torch.Generator().manual_seed(14)
    prompts = [torch.randint(0, m.config.vocab_size, (n,), generator=gen).tolist() for n in (5, 17, 9)]
    cache = hf.DMSCacheHF.from_model(m, max_seqs=6, max_tokens=40, block_size=4)
    free0 = cache.dms.num_free_blocks
    greedy = hf.generate(m, prompts, max_new_tokens=8, cache=cache, prefill_chunk_tokens=10)
    assert len(cache.dms) == 0 and cache.dms.num_free_blocks == free0, "finished sequences released"
    for p, s in zip(prompts, greedy.sequences):
        alone = m.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, use_cache=False,
                           pad_token_id=0)
        assert s[0] == alone[0, len(p):].tolist()
    # An eos stops that sequence only; forked samples with greedy decoding stay identical.
    eos = greedy.sequences[1][0][3]
    r = hf.generate(m, prompts, max_new_tokens=8, num_samples=2, eos_token_id=eos, cache=cache)
    for i, (samples, g) in enumerate(zip(r.sequences, greedy.sequences)):
        cut = g[0].index(eos) + 1 if eos in g[0] else 8
        assert samples[0] == samples[1] == g[0][:cut], f"prompt {i}"
    assert len(cache.dms) == 0 and cache.dms.num_free_blocks == free0
    # Sampling: every sample is a valid continuation under the oracle (nonzero probability at
    # temperature 1 is trivial, so check top-k = 3 membership instead).
    g = torch.Generator().manual_seed(15)
    r = hf.generate(m, prompts[:1], max_new_tokens=6, num_samples=3, do_sample=True, top_k=3,
                    cache=cache, generator=g)
    for s in r.sequences[0]:
        ref, _ = oracle_logits(m, torch.tensor(prompts[0] + s[:-1]))
        for t, tok in enumerate(s):
            top = torch.topk(ref[len(prompts[0]) - 1 + t], 3).indices.tolist()
            assert tok in top
    assert r.decode_tokens == sum(len(s) - 1 for s in r.sequences[0])


def test_cache_errors():
    m = make_model(seed=16)
    cache = hf.DMSCacheHF.from_model(m, max_seqs=2, max_tokens=16, block_size=4)
    ids = torch.randint(0, m.config.vocab_size, (2, 5))
    with torch.no_grad():
        m(ids, **hf.cache_kwargs(m, cache), use_cache=True)
        with pytest.raises(ValueError, match="batch size"):
            m(ids[:1], **hf.cache_kwargs(m, cache), use_cache=True)
    with pytest.raises(NotImplementedError):
        cache.crop(1)
    with pytest.raises(ValueError, match="counts"):
        cache.set_packed([cache.seq_ids[0]], [0])
    with pytest.raises(ValueError, match="cache"):
        hf.DMSCacheHF("not a cache")


def test_batch_select_and_repeat_fork_and_release():
    m = make_model(seed=17)
    ids = torch.randint(0, m.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(18))
    cache = hf.DMSCacheHF.from_model(m, max_seqs=4, max_tokens=16, block_size=4)
    with torch.no_grad():
        m(ids, **hf.cache_kwargs(m, cache), use_cache=True)
        cache.batch_repeat_interleave(2)                  # rows a a b b
        assert len(cache.seq_ids) == 4 and len(cache.dms) == 4
        nxt = torch.randint(0, m.config.vocab_size, (4, 1))
        lg = m(nxt, **hf.cache_kwargs(m, cache), use_cache=True).logits[:, 0]
    for r in range(4):
        ref, _ = oracle_logits(m, torch.cat([ids[r // 2], nxt[r]]))
        assert_close(lg[r], ref[-1], 1e-4, f"row {r}")
    cache.batch_select_indices(torch.tensor([3]))
    assert len(cache.dms) == 1


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


def test_hf_beam_search_reorders_by_fork_and_release():
    """Beam search reorders the cache every step: repeats fork, dropped beams release."""
    m = make_model(seed=2)
    p = torch.randint(1, m.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(3))
    cache = hf.DMSCacheHF.from_model(m, max_seqs=3, max_tokens=32, block_size=4)
    got = m.generate(p, **hf.cache_kwargs(m, cache), max_new_tokens=8, num_beams=3, do_sample=False,
                     pad_token_id=0)
    want = m.generate(p, max_new_tokens=8, num_beams=3, do_sample=False, use_cache=False,
                      pad_token_id=0)
    assert got.tolist() == want.tolist()
    assert len(cache.dms) == 3


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


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_generate_and_hf_generate_run_on_the_kernels():
    m = make_model(seed=28, dtype=torch.bfloat16, device="cuda", heads=8, kv_heads=2,
                   head_dim=64, window=8)
    gen = torch.Generator().manual_seed(29)
    prompts = [torch.randint(0, m.config.vocab_size, (n,), generator=gen).tolist() for n in (7, 30)]
    cache = hf.DMSCacheHF.from_model(m, max_seqs=6, max_tokens=64, block_size=16)
    free0 = cache.dms.num_free_blocks
    r = hf.generate(m, prompts, max_new_tokens=12, num_samples=3, do_sample=True, top_k=5,
                    cache=cache, generator=torch.Generator(device="cuda").manual_seed(30))
    assert [[len(s) for s in p] for p in r.sequences] == [[12] * 3] * 2
    assert len(cache.dms) == 0 and cache.dms.num_free_blocks == free0
    ids = torch.zeros(2, 30, dtype=torch.long)
    mask = torch.zeros(2, 30, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, 30 - len(p):] = torch.tensor(p)
        mask[b, 30 - len(p):] = 1
    out = m.generate(ids.cuda(), attention_mask=mask.cuda(), **hf.cache_kwargs(m, cache),
                     max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 42)
    assert [cache.positions[s] for s in cache.seq_ids] == [7 + 11, 30 + 11]
    assert cache.graph_replays > 0, "decode steps of generate() replay a CUDA graph"
    # Values: the same generate() without graphs gives the same tokens, and every step's cached
    # logits equal the dense-mask forward of the same model over the generated text (bf16).
    cache2 = hf.DMSCacheHF.from_model(m, max_seqs=6, max_tokens=64, block_size=16, cuda_graphs=False)
    out2 = m.generate(ids.cuda(), attention_mask=mask.cuda(), **hf.cache_kwargs(m, cache2),
                      max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert out.tolist() == out2.tolist() and cache2.graph_replays == 0
    for b, p in enumerate(prompts):
        full = out[b, 30 - len(p):][None]
        c3 = hf.DMSCacheHF.from_model(m, max_seqs=1, max_tokens=64, block_size=16)
        with torch.no_grad():
            cached = m(full, **hf.cache_kwargs(m, c3), use_cache=True).logits.float()
            dense = m(full, use_cache=False).logits.float()
        err = (cached - dense).abs().max().item()
        assert err <= 0.05 * dense.abs().max().item(), f"row {b}: cached vs dense {err}"


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


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", ["borrowed", "adapter"])
def test_cuda_graph_generate_equals_eager_token_for_token(variant):
    m = make_model(seed=47, dtype=torch.bfloat16, device="cuda", heads=8, kv_heads=2,
                   head_dim=64, window=8, variant=variant)
    gen = torch.Generator().manual_seed(48)
    prompts = [torch.randint(0, m.config.vocab_size, (n,), generator=gen).tolist() for n in (5, 21, 40)]
    runs = []
    for graphs in (False, True):
        r = hf.generate(m, prompts, max_new_tokens=24, num_samples=2, eos_token_id=prompts[1][3],
                        cuda_graphs=graphs)
        runs.append(r)
    assert runs[0].sequences == runs[1].sequences
    assert runs[1].stats["graph_replays"] > 0 and runs[0].stats["graph_replays"] == 0


def test_dmscachehf_fp8_pools_generate_and_read_what_they_stored():
    """DMSCacheHF.from_model(kv_dtype=float8_e4m3fn, k_scale, v_scale) with per-layer scales from
    dms_ext.fp8.record_amax: the pools are fp8 with those scales, hf.generate runs and releases,
    the first token (from the prefill, which reads its own chunk unquantized) is the compute-pool
    run's, the prefill logits are the float64 oracle's, and the decode steps are those of a
    float32 pool whose K / V writes are rounded through fp8 (same values read, float32 bound)."""
    from dms_ext.fp8 import record_amax
    F8 = torch.float8_e4m3fn
    m = make_model(seed=21)
    gen = torch.Generator().manual_seed(22)
    prompts = [torch.randint(0, m.config.vocab_size, (n,), generator=gen).tolist() for n in (12, 7)]
    calib = hf.DMSCacheHF.from_model(m, max_seqs=2, max_tokens=40, block_size=4)
    with record_amax(calib.dms) as amax:
        ref = hf.generate(m, prompts, max_new_tokens=8, cache=calib)
    ks, vs = amax.k_scales(), amax.v_scales()
    assert all(0 < s < 1 for s in ks + vs), (ks, vs)                  # amax of a few, not 448
    cache = hf.DMSCacheHF.from_model(m, max_seqs=2, max_tokens=40, block_size=4, kv_dtype=F8,
                                     k_scale=ks, v_scale=vs)
    assert cache.dms.kv_dtype == F8 and cache.dms.dtype == torch.float32
    free0 = cache.dms.num_free_blocks
    out = hf.generate(m, prompts, max_new_tokens=8, cache=cache)
    assert len(cache.dms) == 0 and cache.dms.num_free_blocks == free0
    for s, r in zip(out.sequences, ref.sequences):
        assert len(s[0]) == 8 and s[0][0] == r[0][0]
    # Token by token (decode steps read every cached key / value back from fp8).
    cache = hf.DMSCacheHF.from_model(m, max_seqs=1, max_tokens=40, block_size=4, kv_dtype=F8,
                                     k_scale=ks, v_scale=vs)
    ids = torch.tensor(prompts[0] + ref.sequences[0][0])
    got = run_turns(m, cache, [0], [[ids[:6]]] + [[ids[t:t + 1]] for t in range(6, len(ids))])[0]
    oracle, _ = oracle_logits(m, ids)
    assert_close(got[:6], oracle[:6], 1e-4, "fp8 prefill (own chunk, unquantized)")
    # Decode steps read every cached K / V back from fp8: compare with a float32 pool holding
    # the same values: its prefill as the fp8 run's (the chunk reads itself unquantized), then
    # its pools rounded through fp8 (quantize_fp8, then stored * scale), then decode steps whose
    # K / V writes are rounded the same way. Both runs read the same values, so they agree to
    # float32 rounding (the prefill's bound; measured 2e-6 of the logit scale); a scale left off
    # a read, or a wrong rounding, is far outside it.
    from dms_ext import reference

    def rounded(x, scale):
        return reference.dequantize_fp8(reference.quantize_fp8(x, scale), scale).to(x.dtype)

    twin = hf.DMSCacheHF.from_model(m, max_seqs=1, max_tokens=40, block_size=4)
    pre = run_turns(m, twin, [0], [[ids[:6]]])[0]
    for lay, k, v in zip(twin.dms._layers, ks, vs):
        lay.k_cache.copy_(rounded(lay.k_cache, k))
        lay.v_cache.copy_(rounded(lay.v_cache, v))
    attend = twin.dms.attend
    twin.dms.attend = lambda layer, sids, cu, q, k, v, lg, *a, **kw: attend(
        layer, sids, cu, q, rounded(k, ks[layer]), rounded(v, vs[layer]), lg, *a, **kw)
    want = run_turns(m, twin, [0], [[ids[t:t + 1]] for t in range(6, len(ids))])[0]
    assert_close(pre, got[:6], 1e-4, "prefill, float32 pool vs fp8 pool")
    assert_close(got[6:], want, 1e-4, "fp8 decode steps vs fp8-rounded float32 pool")
    for layer, k, v in zip(cache.dms._layers, ks, vs):
        assert layer.k_cache.dtype == layer.v_cache.dtype == F8
        assert (layer.k_scale, layer.v_scale) == (k, v)
