"""fp8_quality: measured quality of fp8 e4m3 KV pools vs pools of the compute dtype.

    python bench/fp8_quality.py [--prompts 4] [--prompt-len 128] [--new-tokens 64] [--device cpu]
    python bench/fp8_quality.py --smoke        # tiny sizes, no results file

For each model the reference run decodes greedily with pools of the compute dtype (bf16). Then,
per scale setting of the fp8 pools ((a) k_scale = v_scale = 1.0, (b) per-layer scales from
dms_ext.fp8: record_amax on calibration prompts through a compute-dtype cache, then
scales_from_amax = amax / 448):

* teacher-forced: the fp8 run is fed the reference run's tokens, so every position sees the same
  prefix; per generated position KL(P_ref || P_fp8) of the next-token distributions (mean and
  max over all positions of all prompts) and greedy agreement (argmax of the fp8 logits ==
  the reference token);
* free-running: the fp8 run decodes greedily on its own; the tokens it produces before its
  first token that differs from the reference run (min / mean over prompts; = new tokens when
  it never diverges).

Models: (i) a tiny random-weight Qwen3 built by dms_ext.hf.load_dms_model from a config dict
(the weights drawn as tests/test_hf.py does), run through DMSCacheHF (hf.DMSCacheHF.from_model
with kv_dtype / k_scale / v_scale); (ii) dms_ext.demo's default model (dms_ext.models
DMSForCausalLM, random weights, 80 % aimed eviction rate) through DMSCache. Prompts are random
token ids. Both run in the compute dtype with pools of that dtype or fp8; everything else equal.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

FP8 = torch.float8_e4m3fn


# ----------------------------------------------------------------------------- metrics

def kl_per_token(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(ref) || softmax(logits)) over the last dim, in float64: [..., V] -> [...]."""
    lp = torch.log_softmax(ref_logits.double(), dim=-1)
    lq = torch.log_softmax(logits.double(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)


def tokens_until_divergence(ref: Sequence[int], other: Sequence[int]) -> int:
    """How many leading tokens of ``other`` equal those of ``ref`` (len(ref) when all do)."""
    n = 0
    for a, b in zip(ref, other):
        if a != b:
            break
        n += 1
    return n


def compare(ref_logits: torch.Tensor, ref_tokens: torch.Tensor, tf_logits: torch.Tensor,
            free_tokens: torch.Tensor) -> Dict[str, float]:
    """ref_logits / tf_logits [P, N, V] (tf: teacher-forced on ref_tokens), ref_tokens /
    free_tokens [P, N]: the table row's numbers."""
    kl = kl_per_token(ref_logits, tf_logits)
    agree = (tf_logits.float().argmax(-1) == ref_tokens).double()
    div = [tokens_until_divergence(r.tolist(), f.tolist()) for r, f in zip(ref_tokens, free_tokens)]
    return dict(kl_mean=float(kl.mean()), kl_max=float(kl.max()), agree=100.0 * float(agree.mean()),
                div_min=min(div), div_mean=sum(div) / len(div), tokens=int(kl.numel()))


# ----------------------------------------------------------------------------- decoding

@torch.no_grad()
def decode(runner, prompts: List[torch.Tensor], new_tokens: int,
           forced: Optional[torch.Tensor] = None) -> tuple:
    """Prefill all prompts packed, then new_tokens - 1 decode steps. Returns the logits of every
    generated position [P, N, V] (float32) and the tokens [P, N]: greedy, or ``forced`` [P, N]
    (teacher forcing: position j is fed forced[:, j - 1])."""
    sids = [runner.add() for _ in prompts]
    ids = torch.cat(prompts).to(runner.device)
    logits = runner.forward(sids, ids, [len(p) for p in prompts])
    outs, toks = [logits], [logits.argmax(-1) if forced is None else forced[:, 0].to(logits.device)]
    for j in range(1, new_tokens):
        logits = runner.forward(sids, toks[-1].to(runner.device), [1] * len(prompts))
        outs.append(logits)
        toks.append(logits.argmax(-1) if forced is None else forced[:, j].to(logits.device))
    return torch.stack(outs, 1).float().cpu(), torch.stack(toks, 1).cpu()


class ModelRunner:
    """dms_ext.models.DMSForCausalLM over a DMSCache (demo's runner)."""

    def __init__(self, model, cache):
        from dms_ext.demo import _ModelRunner
        self.r, self.device = _ModelRunner(model, cache), cache.device
        self.cache = cache
        self.add, self.forward = self.r.add, self.r.forward


class HFRunner:
    """A patched transformers model over a DMSCacheHF (demo's runner)."""

    def __init__(self, model, hfc):
        from dms_ext.demo import _HFRunner
        self.r, self.device = _HFRunner(model, hfc), next(model.parameters()).device
        self.cache = hfc.dms
        self.add, self.forward = self.r.add, self.r.forward


# ----------------------------------------------------------------------------- models

def describe(model: str, layers: int, heads: int, kv_heads: int, head_dim: int, vocab: int,
             window: int, rest: str) -> str:
    """The results file's line for a model: what it is, its shape (hidden = heads x head_dim in
    both models here), then ``rest``."""
    return (f"{model}: {layers} layers, hidden {heads * head_dim}, Hq {heads}, Hkv {kv_heads}, "
            f"D {head_dim}, vocab {vocab}, window {window}, {rest}")


def hf_model(a, dtype, device):
    """Tiny random-weight Qwen3 via dms_ext.hf.load_dms_model (weights as tests/test_hf.py draws
    them: matrices N(0, 0.15^2), norms N(1, 0.3^2), so logits and eviction carry signal)."""
    from dms_ext import hf
    cfg = dict(model_type="qwen3", vocab_size=a.hf_vocab, hidden_size=a.hf_heads * a.hf_head_dim,
               intermediate_size=4 * a.hf_heads * a.hf_head_dim, num_hidden_layers=a.hf_layers,
               num_attention_heads=a.hf_heads, num_key_value_heads=a.hf_kv_heads,
               head_dim=a.hf_head_dim, max_position_embeddings=4096, dms_window_size=a.hf_window,
               dms_alpha_scale=100.0, dms_initial_alpha_offset=5.0, dms_separate_alpha=False)
    torch.manual_seed(a.seed)
    m = hf.load_dms_model(cfg, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() == 1 else 0.15) + (1.0 if p.dim() == 1 else 0.0))
    m = m.to(device=device, dtype=dtype).eval()
    total = a.prompt_len + a.new_tokens

    def make(kv_dtype=None, k_scale=1.0, v_scale=1.0):
        hfc = hf.DMSCacheHF.from_model(m, max_seqs=a.prompts, max_tokens=total, block_size=16,
                                       dtype=dtype, device=device, cuda_graphs=False,
                                       kv_dtype=kv_dtype, k_scale=k_scale, v_scale=v_scale)
        return HFRunner(m, hfc)

    desc = describe("tiny random-weight Qwen3 (dms_ext.hf.load_dms_model, borrowed variant)",
                    a.hf_layers, a.hf_heads, a.hf_kv_heads, a.hf_head_dim, a.hf_vocab, a.hf_window,
                    f"alpha 100/5; weights N(0, 0.15^2), norms N(1, 0.3^2), seed {a.seed}; "
                    "through DMSCacheHF")
    return make, a.hf_vocab, desc


def demo_model(a, dtype, device):
    """dms_ext.demo's default model: random borrowed-neuron DMSForCausalLM (its own init)."""
    from dms_ext.cache import DMSCache
    from dms_ext.demo import random_model
    torch.manual_seed(a.seed)
    total = a.prompt_len + a.new_tokens
    m = random_model(layers=4, heads=8, kv_heads=2, head_dim=64, window=a.demo_window,
                     evict_rate=0.8, max_position=max(4096, total))
    m = m.to(device=device, dtype=dtype).eval()
    m.cos_sin = m.cos_sin.float()
    cfg = m.cfg
    bs = 16
    nb = a.prompts * cfg.kv_heads * -(-total // bs)

    def make(kv_dtype=None, k_scale=1.0, v_scale=1.0):
        c = DMSCache(cfg.layers, cfg.kv_heads, cfg.head_dim, window=cfg.window, block_size=bs,
                     num_blocks=nb, max_seqs=a.prompts, dtype=dtype, device=device,
                     kv_dtype=kv_dtype, k_scale=k_scale, v_scale=v_scale)
        return ModelRunner(m, c)

    desc = describe("dms_ext.demo default model (dms_ext.models.DMSForCausalLM, random weights "
                    "with its own init N(0, 0.02^2), no checkpoint)", cfg.layers, cfg.heads,
                    cfg.kv_heads, cfg.head_dim, cfg.vocab, cfg.window,
                    f"aimed eviction rate 0.8, seed {a.seed}; through DMSCache")
    return make, cfg.vocab, desc


# ----------------------------------------------------------------------------- one model

def evaluate(make: Callable, vocab: int, a, gen: torch.Generator) -> tuple:
    prompts = [torch.randint(vocab, (a.prompt_len,), generator=gen) for _ in range(a.prompts)]
    calib = [torch.randint(vocab, (a.prompt_len,), generator=gen) for _ in range(a.calib_prompts)]
    ref = make()
    ref_logits, ref_tokens = decode(ref, prompts, a.new_tokens)
    live = [int(ref.cache.live_tokens(0, s).sum()) for s in ref.cache.seq_ids]
    # Calibration: a compute-dtype cache over other prompts (prefill + greedy decode).
    from dms_ext.fp8 import record_amax
    cal = make()
    with record_amax(cal.cache) as amax:
        decode(cal, calib, a.calib_tokens)
    settings = [("1.0", 1.0, 1.0), ("amax/448", amax.k_scales(), amax.v_scales())]
    rows = []
    for name, ks, vs in settings:
        tf_logits, _ = decode(make(FP8, ks, vs), prompts, a.new_tokens, forced=ref_tokens)
        _, free_tokens = decode(make(FP8, ks, vs), prompts, a.new_tokens)
        rows.append((name, compare(ref_logits, ref_tokens, tf_logits, free_tokens)))
    ref_kl = 0.0
    if a.self_check:  # a second compute-dtype run: the noise floor (expected 0, deterministic)
        again, _ = decode(make(), prompts, a.new_tokens, forced=ref_tokens)
        ref_kl = float(kl_per_token(ref_logits, again).max())
    info = dict(k_amax=amax.k, v_amax=amax.v, k_scales=amax.k_scales(), v_scales=amax.v_scales(),
                live_layer0=live, ref_self_kl_max=ref_kl,
                ref_top1=float(torch.softmax(ref_logits.double(), -1).max(-1).values.mean()))
    return rows, info


def table(rows) -> str:
    hdr = ["scales", "mean KL", "max KL", "teacher-forced greedy agreement %",
           "free-running tokens until divergence (min / mean)", "tokens evaluated"]
    out = [[n, f"{r['kl_mean']:.3g}", f"{r['kl_max']:.3g}", f"{r['agree']:.1f}",
            f"{r['div_min']} / {r['div_mean']:.1f}", r["tokens"]] for n, r in rows]
    return common.md_table(hdr, out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--calib-prompts", type=int, default=2)
    ap.add_argument("--calib-tokens", type=int, default=16, help="greedy tokens per calib prompt")
    ap.add_argument("--models", default="hf,demo")
    ap.add_argument("--hf-layers", type=int, default=2)
    ap.add_argument("--hf-heads", type=int, default=4)
    ap.add_argument("--hf-kv-heads", type=int, default=2)
    ap.add_argument("--hf-head-dim", type=int, default=64)
    ap.add_argument("--hf-vocab", type=int, default=512)
    ap.add_argument("--hf-window", type=int, default=16)
    ap.add_argument("--demo-window", type=int, default=64)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--self-check", action="store_true",
                    help="also rerun the compute-dtype pools teacher-forced (KL floor, expect 0)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, no results file")
    ap.add_argument("--results-dir", default=common.RESULTS_DIR)
    a = ap.parse_args(argv)
    if a.smoke:
        a.prompts, a.prompt_len, a.new_tokens, a.calib_prompts, a.calib_tokens = 2, 24, 6, 1, 4
        a.hf_window = a.demo_window = 8
    if a.threads:
        torch.set_num_threads(a.threads)
    import dms_ext  # noqa: F401  registers torch.ops.dms
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    device = torch.device(a.device)
    t0 = time.time()
    builders = {"hf": hf_model, "demo": demo_model}
    parts = [f"Device: {device} ({'CPU twins of the ops' if device.type == 'cpu' else 'CUDA kernels'}), "
             f"compute dtype {a.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads. "
             f"{a.prompts} random prompts x {a.prompt_len} tokens, {a.new_tokens} generated tokens "
             f"each (the prefill's next-token logits + {a.new_tokens - 1} decode steps); "
             f"calibration for amax/448: {a.calib_prompts} other random prompts x {a.prompt_len} "
             f"tokens + {a.calib_tokens} greedy tokens each through a {a.dtype}-pool cache "
             f"(dms_ext.fp8.record_amax). Block size 16. KL(P_{a.dtype} || P_fp8) in nats, "
             f"float64, per generated position.", ""]
    summary = []
    for name in [m for m in a.models.split(",") if m]:
        make, vocab, desc = builders[name](a, dtype, device)
        gen = torch.Generator().manual_seed(a.seed + 1)
        rows, info = evaluate(make, vocab, a, gen)
        fmt = lambda xs: ", ".join(f"{x:.3g}" for x in xs)  # noqa: E731
        parts += [f"## {name}: {desc}", "", table(rows), "",
                  f"- calibrated amax per layer: K [{fmt(info['k_amax'])}], V [{fmt(info['v_amax'])}]"
                  f" -> k_scale [{fmt(info['k_scales'])}], v_scale [{fmt(info['v_scales'])}]",
                  f"- reference run: mean top-1 probability {info['ref_top1']:.3g}; layer-0 live "
                  f"slots per sequence at the end (summed over KV heads) {info['live_layer0']} of "
                  f"{2 * (a.prompt_len + a.new_tokens - 1)} tokens x heads"]
        if a.self_check:
            parts.append(f"- self-check: a second {a.dtype}-pool run, teacher-forced: max KL "
                         f"{info['ref_self_kl_max']:.3g}")
        parts.append("")
        for n, r in rows:
            summary.append(f"{name} scales {n}: KL mean {r['kl_mean']:.3g} max {r['kl_max']:.3g}, "
                           f"agree {r['agree']:.1f}%, diverge min {r['div_min']} mean "
                           f"{r['div_mean']:.1f} of {a.new_tokens}")
        print(f"{name}:\n{table(rows)}", flush=True)
    parts.append(f"- wall time {time.time() - t0:.0f} s")
    body = "\n".join(parts)
    print(body)
    print("SUMMARY: " + "; ".join(summary), flush=True)
    if not a.smoke:
        path = common.write_results("fp8_quality", "FP8 KV pools vs compute-dtype pools: "
                                    "measured quality", body, a.results_dir)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
