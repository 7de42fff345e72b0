"""dms_ext.hf generation: hf.generate and transformers' generate on DMSCacheHF, for tiny random
Qwen3 / Llama models (test_hf.py's builders and float64 oracle): left-padded batches and second
turns equal to each prompt alone, forks and their packing and release, cache errors,
batch_select / repeat, beam search (fork and release per step), the CUDA kernels' path and CUDA
graphs (tests marked `cuda`, skipped without a GPU), and fp8 pools with recorded scales.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dms_ext import hf  # noqa: E402
from test_hf import CUDA, assert_close, make_model, oracle_logits, run_turns  # noqa: E402


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


def test_read_ahead_gives_the_same_tokens_and_releases_everything(monkeypatch):
    """generate() launches step t + 1 before it reads step t's tokens (_READ_AHEAD = 1). With EOS
    stopping rows at different steps, forks and sampling, the sequences, token counts and the
    pool equal the step-by-step loop's (_READ_AHEAD = 0, and a callback, which forces it)."""
    import importlib
    gmod = importlib.import_module("dms_ext.hf.generate")
    m = make_model(seed=21)
    gen = torch.Generator().manual_seed(22)
    prompts = [torch.randint(0, m.config.vocab_size, (n,), generator=gen).tolist() for n in (4, 13, 7)]
    cache = hf.DMSCacheHF.from_model(m, max_seqs=6, max_tokens=40, block_size=4)
    free0 = cache.dms.num_free_blocks
    greedy = hf.generate(m, prompts, max_new_tokens=10, cache=cache)
    eos = greedy.sequences[0][0][2]                   # stops prompt 0 early, others maybe not
    runs = []
    for ahead, cb in ((1, None), (0, None), (1, lambda *a: None)):
        monkeypatch.setattr(gmod, "_READ_AHEAD", ahead)
        for kw in (dict(), dict(do_sample=True, top_k=5, generator=torch.Generator().manual_seed(3))):
            r = hf.generate(m, prompts, max_new_tokens=10, num_samples=2, eos_token_id=eos,
                            cache=cache, callback=cb, **kw)
            assert len(cache.dms) == 0 and cache.dms.num_free_blocks == free0, (ahead, kw)
            runs.append((r.sequences, r.decode_tokens, r.decode_steps))
    # Greedy: the same tokens, counts and steps whichever loop. Sampling draws one token per
    # row of the batch from the generator, and read-ahead keeps a just-finished row one step
    # longer, so only the step-by-step runs (ahead 0 and the callback's) must agree; the
    # read-ahead run's rows stop at EOS or at 10 tokens and its counts add up.
    assert runs[0] == runs[2] == runs[4] and runs[3] == runs[5]
    assert runs[0][0][0][0][-1] == eos and len(runs[0][0][0][0]) == 3
    # Read-ahead launches no step past max_new_tokens: one prefill call, then one call a step.
    calls = []
    hook = m.register_forward_pre_hook(lambda *a: calls.append(1))
    monkeypatch.setattr(gmod, "_READ_AHEAD", 1)
    r = hf.generate(m, prompts, max_new_tokens=10, cache=cache)
    hook.remove()
    assert r.sequences == greedy.sequences and len(calls) == 1 + r.decode_steps == 10
    seqs, toks, _ = runs[1]
    for samples in seqs:
        for t in samples:
            assert (t[-1] == eos and eos not in t[:-1]) or (len(t) == 10 and eos not in t)
    assert toks == sum(len(t) - 1 for samples in seqs for t in samples)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("model_type", ["qwen3", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_rms_norm_equals_the_module(model_type, dtype, device):
    """graphs.rms_norm (two ops) against the transformers RMSNorm module it replaces in the
    decode step: bitwise on the CPU; on CUDA within one unit of the dtype (the float32 rsqrt's
    reduction order may move a value across a rounding tie), and equal almost everywhere."""
    if device == "cuda" and not CUDA:
        pytest.skip("needs a CUDA GPU")
    if device == "cuda" and dtype == torch.float32:
        pytest.skip("the CUDA decode path runs bf16 / fp16")
    from dms_ext.hf.graphs import rms_norm
    m = make_model(seed=61, model_type=model_type, dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(62)
    norms = [m.model.norm] + [n for layer in m.model.layers
                              for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_((torch.rand(norm.weight.shape, generator=gen) + 0.5).to(dtype))
            x = (torch.randn(33, norm.weight.shape[0], generator=gen) * 3).to(dtype).to(device)
            want, got = norm(x), rms_norm(norm, x)
            assert got.dtype == want.dtype and got.shape == want.shape
            if device == "cpu":
                assert torch.equal(got, want)
            else:
                ulp = torch.finfo(dtype).eps * want.float().abs().clamp_min(torch.finfo(dtype).tiny)
                assert bool(((got.float() - want.float()).abs() <= ulp).all())
                assert float((got != want).double().mean()) < 0.01
            # Mutation: a norm without the weight product (or with eps 0) is not the module.
            assert not torch.equal(torch.nn.functional.rms_norm(x, (x.shape[-1],), None, 1e-6), want)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_mlp_one_gemm_for_gate_and_up(dtype, device, tmp_path):
    """graphs.mlp_forward: gate and up as halves of one stacked weight that IS the parameters'
    storage (no copy, values unchanged), one batched GEMM, within the error bound of the module
    (both are float32-accumulated GEMMs of the same products, rounded to the dtype, so each
    differs from the exact result by at most the bound below; a swapped half fails it); a weight
    replaced later is stacked again; under autograd the module runs as is."""
    if device == "cuda" and not CUDA:
        pytest.skip("needs a CUDA GPU")
    from dms_ext.hf.graphs import gate_up_weight, mlp_forward
    m = make_model(seed=63, dtype=dtype, device=device)
    mlp = m.model.layers[0].mlp
    with torch.enable_grad():
        assert gate_up_weight(mlp) is None
    gen = torch.Generator().manual_seed(64)
    hdim, inter = mlp.gate_proj.in_features, mlp.gate_proj.out_features
    x = torch.randn(9, hdim, generator=gen).to(device, dtype)
    before = [mlp.gate_proj.weight.detach().clone(), mlp.up_proj.weight.detach().clone()]
    with torch.no_grad():
        want = mlp(x)
        w = gate_up_weight(mlp)
        assert w.shape == (2, inter, hdim)
        assert w[0].data_ptr() == mlp.gate_proj.weight.data_ptr()
        assert w[1].data_ptr() == mlp.up_proj.weight.data_ptr()
        assert torch.equal(w[0], before[0]) and torch.equal(w[1], before[1])
        assert gate_up_weight(mlp) is w                      # stacked once
        got = mlp_forward(mlp, x)
        # The bound: float32 accumulation (gamma_n = n u / (1 - n u), u = 2^-24) plus one
        # rounding to the dtype per stored result (u_d), propagated through silu (|silu'| <= 1.1)
        # and the product into down_proj; twice it (each side's own error).
        u, ud = 2.0 ** -24, torch.finfo(dtype).eps / 2
        gam = lambda n: n * u / (1 - n * u)  # noqa: E731
        xd = x.double()
        wg, wu, wd = (p.weight.double() for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        g, up = xd @ wg.T, xd @ wu.T
        sg = torch.nn.functional.silu(g)
        eg = gam(hdim) * (xd.abs() @ wg.abs().T) + ud * g.abs() * 1.01
        eu = gam(hdim) * (xd.abs() @ wu.abs().T) + ud * up.abs() * 1.01
        h = sg * up
        eh = 1.1 * eg * up.abs() + (sg.abs() + 1.1 * eg) * eu + 2.02 * ud * h.abs()
        bound = 2 * ((eh @ wd.abs().T) + gam(inter) * ((h.abs() + eh) @ wd.abs().T)
                     + ud * (h @ wd.T).abs() * 1.01)
        err = (got.double() - want.double()).abs()
        assert bool((err <= bound).all()), float((err - bound).max())
        # Mutation: gate and up swapped is far outside the bound.
        bad = mlp.down_proj(torch.nn.functional.silu(x @ w[1].T) * (x @ w[0].T))
        assert not bool(((bad.double() - want.double()).abs() <= bound).all())
        # A replaced weight is noticed and stacked again (values of the new weight).
        mlp.up_proj.weight = torch.nn.Parameter(before[1] * 2)
        w2 = gate_up_weight(mlp)
        assert w2 is not w and torch.equal(w2[1], before[1] * 2)
        assert w2[1].data_ptr() == mlp.up_proj.weight.data_ptr()
    # The stacked halves share one storage: save_pretrained and a reload still give the values.
    m.save_pretrained(tmp_path)
    again = hf.load_dms_model(str(tmp_path), dtype=dtype, device=device)
    for name, p in m.state_dict().items():
        assert torch.equal(again.state_dict()[name], p), name


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


@pytest.mark.cuda
def test_cuda_next_generate_on_the_same_rows_replays_the_captured_graph():
    """A second generate of the same batch size on the same cache lands on the rows of the first
    (lowest free rows), re-opens the captured graph's plan and replays it from its first step:
    no capture, and the tokens of an eager run on a fresh cache."""
    m = make_model(seed=49, dtype=torch.bfloat16, device="cuda", heads=8, kv_heads=2,
                   head_dim=64, window=8)
    gen = torch.Generator().manual_seed(50)
    first, second = ([torch.randint(0, m.config.vocab_size, (n,), generator=gen).tolist()
                      for n in lens] for lens in ((9, 30), (17, 4)))
    cache = hf.DMSCacheHF.from_model(m, max_seqs=2, max_tokens=64, block_size=16)
    hf.generate(m, first, max_new_tokens=12, cache=cache)
    caps, reps = cache.graph_captures, cache.graph_replays
    assert caps == 1
    r = hf.generate(m, second, max_new_tokens=12, cache=cache)
    assert cache.graph_captures == caps and cache.graph_replays - reps == r.decode_steps == 11
    eager = hf.generate(m, second, max_new_tokens=12, cuda_graphs=False)
    assert r.sequences == eager.sequences


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

    def step(layer, sids, q, k, v, table, a_s, a_o, qn=None, kn=None, eps=1e-6, logits=None,
             scale=None):
        # The fused step as its two documented halves (eviction_rope, then attend with the
        # rounded k / v): the borrowed variant of make_model, positions = the token counts.
        assert logits is None
        pos = twin.dms._layers[layer].num_tokens[twin.dms._rows_of(sids)]
        k = k.clone()
        lg = torch.ops.dms.eviction_rope(q, k, pos, table, a_s, a_o, qn, kn, eps)
        cu = torch.arange(len(sids) + 1, dtype=torch.int32)
        return twin.dms.attend(layer, sids, cu, q, k, v, lg, scale=scale), lg

    twin.dms.decode_step = step
    want = run_turns(m, twin, [0], [[ids[t:t + 1]] for t in range(6, len(ids))])[0]
    assert_close(pre, got[:6], 1e-4, "prefill, float32 pool vs fp8 pool")
    assert_close(got[6:], want, 1e-4, "fp8 decode steps vs fp8-rounded float32 pool")
    for layer, k, v in zip(cache.dms._layers, ks, vs):
        assert layer.k_cache.dtype == layer.v_cache.dtype == F8
        assert (layer.k_scale, layer.v_scale) == (k, v)
