"""fp8_quality: measured quality of fp8 e4m3 KV pools vs pools of the compute dtype.

    python bench/fp8_quality.py [--prompts 4] [--prompt-len 128] [--new-tokens 64] [--device cpu]
    python bench/fp8_quality.py --smoke        # tiny sizes, no results file
    python bench/fp8_quality.py --retrofit-ckpt /tmp/retro/small9/ckpt/dms.pt [--models retrofit]

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

(iii) with --retrofit-ckpt PATH (a bench/retrofit_experiment.py ckpt/dms.pt; --retrofit-run picks
the run, "borrowed:8" or its key "borrowed_cr8", when the file holds several): the retrofitted DMS
model, loaded and run through DMSCache as that script's eval phase does (prefill the recall
context, decode the queries), on the first --retrofit-seqs sequences of its unseen eval set
(dms_ext.retrofit.associative_recall, the checkpoint's preset sizes and data seed); calibration
on --calib-prompts sequences of its tuning set. Every run is teacher-forced on the true tokens;
the metrics are taken at the answer positions only (KL, greedy agreement with the reference
run, and answer accuracy of each). --models retrofit runs (iii) alone.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

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


def at(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """x's entries where mask is True (all of x when mask is None)."""
    return x if mask is None else x[mask]


def compare(ref_logits: torch.Tensor, ref_tokens: torch.Tensor, tf_logits: torch.Tensor,
            free_tokens: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
            targets: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """ref_logits / tf_logits [P, N, V] (tf: teacher-forced on the reference run's inputs),
    ref_tokens [P, N] (the reference run's greedy tokens): the table row's numbers. Optional:
    free_tokens [P, N] (a free-running run: div_min / div_mean), mask [P, N] bool (KL, agreement
    and accuracy over these positions only), targets [P, N] (the right tokens: acc_ref / acc,
    % of positions whose argmax is right, reference run / this run; lost / gained: positions
    right in the reference run and wrong in this one / the other way round)."""
    kl = kl_per_token(ref_logits, tf_logits)
    pred = tf_logits.float().argmax(-1)
    agree = (pred == ref_tokens).double()
    kl, agree = at(kl, mask), at(agree, mask)
    r = dict(kl_mean=float(kl.mean()), kl_max=float(kl.max()), agree=100.0 * float(agree.mean()),
             tokens=int(kl.numel()))
    if free_tokens is not None:
        div = [tokens_until_divergence(a.tolist(), f.tolist()) for a, f in zip(ref_tokens, free_tokens)]
        r.update(div_min=min(div), div_mean=sum(div) / len(div))
    if targets is not None:
        ok_ref, ok = at(ref_logits.float().argmax(-1) == targets, mask), at(pred == targets, mask)
        r.update(acc_ref=100.0 * float(ok_ref.double().mean()), acc=100.0 * float(ok.double().mean()),
                 lost=int((ok_ref & ~ok).sum()), gained=int((ok & ~ok_ref).sum()))
    return r


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
             window: int, rest: str, hidden: Optional[int] = None) -> str:
    """The results file's line for a model: what it is, its shape (hidden: heads x head_dim
    unless given), then ``rest``."""
    hidden = heads * head_dim if hidden is None else hidden
    return (f"{model}: {layers} layers, hidden {hidden}, Hq {heads}, Hkv {kv_heads}, "
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
    return desc, lambda: evaluate(make, a.hf_vocab, a), []


def dms_cache_maker(m, seqs: int, total: int, dtype, device, block_size: int = 16) -> Callable:
    """make(kv_dtype=None, k_scale=1.0, v_scale=1.0) -> a ModelRunner of the DMSForCausalLM ``m``
    over a fresh DMSCache for ``seqs`` sequences of up to ``total`` tokens."""
    from dms_ext.cache import DMSCache
    cfg = m.cfg
    nb = seqs * cfg.kv_heads * -(-total // block_size)

    def make(kv_dtype=None, k_scale=1.0, v_scale=1.0):
        c = DMSCache(cfg.layers, cfg.kv_heads, cfg.head_dim, window=cfg.window,
                     block_size=block_size, num_blocks=nb, max_seqs=seqs, dtype=dtype,
                     device=device, kv_dtype=kv_dtype, k_scale=k_scale, v_scale=v_scale)
        return ModelRunner(m, c)

    return make


def demo_model(a, dtype, device):
    """dms_ext.demo's default model: random borrowed-neuron DMSForCausalLM (its own init)."""
    from dms_ext.demo import random_model
    torch.manual_seed(a.seed)
    total = a.prompt_len + a.new_tokens
    m = random_model(layers=4, heads=8, kv_heads=2, head_dim=64, window=a.demo_window,
                     evict_rate=0.8, max_position=max(4096, total))
    m = m.to(device=device, dtype=dtype).eval()
    m.cos_sin = m.cos_sin.float()
    cfg = m.cfg
    make = dms_cache_maker(m, a.prompts, total, dtype, device)
    desc = describe("dms_ext.demo default model (dms_ext.models.DMSForCausalLM, random weights "
                    "with its own init N(0, 0.02^2), no checkpoint)", cfg.layers, cfg.heads,
                    cfg.kv_heads, cfg.head_dim, cfg.vocab, cfg.window,
                    f"aimed eviction rate 0.8, seed {a.seed}; through DMSCache")
    return desc, lambda: evaluate(make, cfg.vocab, a), []


def retrofit_run(a, rx) -> Tuple[str, dict, Optional[dict], Optional[str]]:
    """The --retrofit-ckpt run: (its key, its dms.pt entry, the retrofit_<preset>.json results of
    the experiment that wrote it (next to its ckpt dir, as --out <dir> --ckpt-dir <dir>/ckpt
    leaves them) or None, that json's path)."""
    import glob
    import json
    runs = torch.load(a.retrofit_ckpt, map_location="cpu", weights_only=False)
    want = a.retrofit_run
    if want and ":" in want:
        want = rx.run_name(*rx.parse_runs(want)[0])
    if not want:
        if len(runs) != 1:
            raise SystemExit(f"{a.retrofit_ckpt}: runs {sorted(runs)}; pick one with --retrofit-run")
        want = next(iter(runs))
    if want not in runs:
        raise SystemExit(f"{a.retrofit_ckpt}: no run {want!r} (it has {sorted(runs)})")
    e = runs[want]
    out = os.path.dirname(os.path.dirname(os.path.abspath(a.retrofit_ckpt)))
    for path in sorted(glob.glob(os.path.join(out, "retrofit_*.json"))):
        with open(path) as f:
            R = json.load(f)
        if want in R.get("runs", {}) and all(R.get("sizes", {}).get(k) == v
                                              for k, v in e["cfg"].items() if k in R.get("sizes", {})):
            return want, e, R, path
    return want, e, None, None


def retrofit_model(a, dtype, device):
    """(iii) the retrofitted DMS model of a bench/retrofit_experiment.py run, through DMSCache,
    on that experiment's recall data (its eval phase's sets)."""
    import shlex
    import retrofit_experiment as rx
    from dms_ext.retrofit import Recall
    name, e, R, rpath = retrofit_run(a, rx)
    cfg = e["cfg"]
    if R is not None:
        S, seed, preset = R["sizes"], R["seed"], R["preset"]
    else:  # no results json: the preset whose model sizes the checkpoint has, data seed --retrofit-seed
        keys = ("hidden", "layers", "heads", "kv_heads", "head_dim", "vocab", "window", "intermediate")
        found = [p for p, P in rx.PRESETS.items() if all(P[k] == cfg[k] for k in keys)]
        if not found:
            raise SystemExit(f"{a.retrofit_ckpt}: no retrofit_*.json next to it and no preset "
                             f"with its sizes {cfg}")
        preset, seed = found[-1], a.retrofit_seed
        S = rx.PRESETS[preset]
    a.retrofit_seqs = a.retrofit_seqs or S["eval_seqs"]
    if a.retrofit_seqs > S["eval_seqs"]:
        raise SystemExit(f"--retrofit-seqs: the unseen set has {S['eval_seqs']} sequences")
    sets = rx.eval_sets(S, seed, "cpu")
    first = lambda t, k: Recall(t.ids[:k], t.answer[:k], t.prefix)  # noqa: E731
    task, calib = first(sets["eval"], a.retrofit_seqs), first(sets["tune"], a.calib_prompts)
    m = rx._model_from(e, "cpu")
    cos_sin = m.cos_sin.float()               # the rope table stays float32 (as in the eval)
    m = m.to(device=device, dtype=dtype).eval()
    m.cos_sin = cos_sin.to(device)
    n, p = task.ids.shape[1], task.prefix
    bs = S["block_size"]
    make = dms_cache_maker(m, max(a.retrofit_seqs, a.calib_prompts), n, dtype, device, bs)
    mc = m.cfg
    desc = describe(f"retrofitted DMS model, run {name} of bench/retrofit_experiment.py "
                    f"(preset {preset}), checkpoint {a.retrofit_ckpt}", mc.layers, mc.heads,
                    mc.kv_heads, mc.head_dim, mc.vocab, mc.window,
                    f"{e['variant']} variant, target CR {e['cr']:g}, alpha {mc.alpha_scale:g}/"
                    f"{mc.alpha_offset:g}; through DMSCache", hidden=mc.hidden)
    cmds = ["`python3 bench/retrofit_experiment.py " + " ".join(shlex.quote(x) for x in i["argv"]) + "`"
            for i in (R or {}).get("invocations", [])]
    notes = [f"- checkpoint: {os.path.abspath(a.retrofit_ckpt)} (run {name}: {len(e['hist'])} "
             f"retrofit steps, {e['seconds']:.0f} s; the vanilla model it was retrofitted from: "
             f"pretrain.pt beside it), written by "
             + (" then ".join(cmds) + f" (the argv recorded in {rpath})" if cmds else
                "an unrecorded command (no retrofit_*.json beside its ckpt dir)"),
             f"- data: dms_ext.retrofit.associative_recall, {n} tokens, {S['pairs']} pairs, vocab "
             f"{S['vocab']}: the first {a.retrofit_seqs} of the {S['eval_seqs']} sequences of the "
             f"experiment's unseen eval set (data seed EVAL_SEED + seed = {rx.EVAL_SEED + seed}); "
             f"each run prefills the {p}-token context (sequences packed, one chunk each), then "
             f"decodes the {n - p} query tokens teacher-forced on the true tokens ({n - p - 1} "
             f"decode steps), as the experiment's accuracy_cache does; the metrics are over the "
             f"{int(task.answer.sum())} answer positions (a query key's logits, whose right "
             f"next token is its value). Block size {bs}.",
             f"- calibration for amax/448: the first {a.calib_prompts} sequence(s) of the experiment's "
             f"tuning set (data seed TUNE_SEED + seed = {rx.TUNE_SEED + seed}), the same prefill + "
             f"teacher-forced decode through a {a.dtype}-pool cache"]
    if R is not None and "eval" in R.get("runs", {}).get(name, {}):
        ev = R["runs"][name]["eval"]
        notes.append(f"- the experiment's own eval of this run (model and pools float32, all "
                     f"{S['eval_seqs']} sequences, {S['eval_seqs'] * S['pairs']} answers): accuracy "
                     f"{100 * ev['acc']:.1f} %, measured CR {ev['cr']:.2f}, live {ev['live']:.1f} "
                     f"tokens per head")
    return desc, lambda: evaluate_recall(make, task, calib, a), notes


# ----------------------------------------------------------------------------- one model

def calibrate(make: Callable, feed: Callable) -> tuple:
    """Per-layer amax (dms_ext.fp8.record_amax) while ``feed(runner)`` runs the model through a
    compute-dtype cache; returns it and the fp8 scale settings (name, k_scale, v_scale)."""
    from dms_ext.fp8 import record_amax
    cal = make()
    with record_amax(cal.cache) as amax:
        feed(cal)
    return amax, [("1.0", 1.0, 1.0), ("amax/448", amax.k_scales(), amax.v_scales())]


def run_info(amax, ref_logits: torch.Tensor, cache, tokens: int,
             again: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None) -> dict:
    """The notes under a model's table: calibrated amax and scales, the reference run's mean top-1
    probability and layer-0 live slots per sequence (summed over KV heads; of ``tokens`` x
    heads), the self-check's max KL (``again``: a second reference run) over ``mask``."""
    return dict(k_amax=amax.k, v_amax=amax.v, k_scales=amax.k_scales(), v_scales=amax.v_scales(),
                live_layer0=[int(cache.live_tokens(0, s).sum()) for s in cache.seq_ids],
                live_of=cache.num_kv_heads * tokens,
                ref_self_kl_max=0.0 if again is None else float(at(kl_per_token(ref_logits, again), mask).max()),
                ref_top1=float(at(torch.softmax(ref_logits.double(), -1).max(-1).values, mask).mean()))


def evaluate(make: Callable, vocab: int, a) -> tuple:
    """Models (i) / (ii): random prompts, greedy generation."""
    gen = torch.Generator().manual_seed(a.seed + 1)
    prompts = [torch.randint(vocab, (a.prompt_len,), generator=gen) for _ in range(a.prompts)]
    calib = [torch.randint(vocab, (a.prompt_len,), generator=gen) for _ in range(a.calib_prompts)]
    ref = make()
    ref_logits, ref_tokens = decode(ref, prompts, a.new_tokens)
    # Calibration: a compute-dtype cache over other prompts (prefill + greedy decode).
    amax, settings = calibrate(make, lambda r: decode(r, calib, a.calib_tokens))
    rows = []
    for name, ks, vs in settings:
        tf_logits, _ = decode(make(FP8, ks, vs), prompts, a.new_tokens, forced=ref_tokens)
        _, free_tokens = decode(make(FP8, ks, vs), prompts, a.new_tokens)
        rows.append((name, compare(ref_logits, ref_tokens, tf_logits, free_tokens)))
    again = None
    if a.self_check:  # a second compute-dtype run: the noise floor (expected 0, deterministic)
        again, _ = decode(make(), prompts, a.new_tokens, forced=ref_tokens)
    return rows, run_info(amax, ref_logits, ref.cache, a.prompt_len + a.new_tokens - 1, again)


def evaluate_recall(make: Callable, task, calib, a) -> tuple:
    """Model (iii): recall sequences; prefill the context, then the queries teacher-forced on the
    true tokens. Metrics at the answer positions."""
    n, p = task.ids.shape[1], task.prefix

    def run(runner, t):   # logits [B, n - p, V]: position j predicts the token at p + j
        return decode(runner, list(t.ids[:, :p]), n - p, forced=t.ids[:, p:])[0]

    ref = make()
    ref_logits = run(ref, task)
    mask, targets = task.answer[:, p - 1:n - 1], task.ids[:, p:]
    amax, settings = calibrate(make, lambda r: run(r, calib))
    rows = [(name, compare(ref_logits, ref_logits.argmax(-1), run(make(FP8, ks, vs), task),
                           mask=mask, targets=targets)) for name, ks, vs in settings]
    again = run(make(), task) if a.self_check else None
    return rows, run_info(amax, ref_logits, ref.cache, n - 1, again, mask)


def table(rows, ref: str = "bf16") -> str:
    """The markdown table of a model's rows; the free-running column when the rows have it, the
    answer-accuracy columns when they have those."""
    r0 = rows[0][1]
    hdr = ["scales", "mean KL", "max KL", "teacher-forced greedy agreement %"]
    if "div_min" in r0:
        hdr.append("free-running tokens until divergence (min / mean)")
    if "acc" in r0:
        hdr += [f"answer accuracy % ({ref} pools)", "answer accuracy % (fp8 pools)",
                f"answers right with {ref} / fp8 pools only"]
    hdr.append("answers evaluated" if "acc" in r0 else "tokens evaluated")
    out = []
    for n, r in rows:
        row = [n, f"{r['kl_mean']:.3g}", f"{r['kl_max']:.3g}", f"{r['agree']:.1f}"]
        if "div_min" in r:
            row.append(f"{r['div_min']} / {r['div_mean']:.1f}")
        if "acc" in r:
            row += [f"{r['acc_ref']:.1f}", f"{r['acc']:.1f}", f"{r['lost']} / {r['gained']}"]
        out.append(row + [r["tokens"]])
    return common.md_table(hdr, out)


def summary(model: str, scales: str, r: dict, a) -> str:
    s = (f"{model} scales {scales}: KL mean {r['kl_mean']:.3g} max {r['kl_max']:.3g}, "
         f"agree {r['agree']:.1f}%")
    if "div_min" in r:
        s += f", diverge min {r['div_min']} mean {r['div_mean']:.1f} of {a.new_tokens}"
    if "acc" in r:
        s += (f", answer accuracy {a.dtype} {r['acc_ref']:.1f}% fp8 {r['acc']:.1f}% of {r['tokens']} "
              f"(right with {a.dtype} only {r['lost']}, with fp8 only {r['gained']})")
    return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--calib-prompts", type=int, default=2,
                    help="calibration prompts (random; recall sequences for --retrofit-ckpt)")
    ap.add_argument("--calib-tokens", type=int, default=16, help="greedy tokens per calib prompt")
    ap.add_argument("--models", default=None,
                    help="comma separated of hf, demo, retrofit (default: hf,demo, and retrofit "
                         "with --retrofit-ckpt)")
    ap.add_argument("--hf-layers", type=int, default=2)
    ap.add_argument("--hf-heads", type=int, default=4)
    ap.add_argument("--hf-kv-heads", type=int, default=2)
    ap.add_argument("--hf-head-dim", type=int, default=64)
    ap.add_argument("--hf-vocab", type=int, default=512)
    ap.add_argument("--hf-window", type=int, default=16)
    ap.add_argument("--demo-window", type=int, default=64)
    ap.add_argument("--retrofit-ckpt", default=None,
                    help="ckpt/dms.pt of a bench/retrofit_experiment.py run: model (iii)")
    ap.add_argument("--retrofit-run", default=None,
                    help="its run, variant:CR or the key (default: the only one in the file)")
    ap.add_argument("--retrofit-seqs", type=int, default=None,
                    help="recall sequences: the first ones of the experiment's unseen eval set "
                         "(default: all of it)")
    ap.add_argument("--retrofit-seed", type=int, default=0,
                    help="the experiment's --seed, when no retrofit_*.json lies beside the ckpt dir")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--self-check", action="store_true",
                    help="also rerun the compute-dtype pools teacher-forced (KL floor, expect 0)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, no results file")
    ap.add_argument("--results-dir", default=common.RESULTS_DIR)
    a = ap.parse_args(argv)
    if a.models is None:
        a.models = "hf,demo" + (",retrofit" if a.retrofit_ckpt else "")
    models = [m for m in a.models.split(",") if m]
    builders = {"hf": hf_model, "demo": demo_model, "retrofit": retrofit_model}
    bad = [m for m in models if m not in builders]
    if bad:
        ap.error(f"--models: unknown {bad} (known: {', '.join(builders)})")
    if "retrofit" in models and not a.retrofit_ckpt:
        ap.error("--models retrofit needs --retrofit-ckpt")
    if a.smoke:
        a.prompts, a.prompt_len, a.new_tokens, a.calib_prompts, a.calib_tokens = 2, 24, 6, 1, 4
        a.hf_window = a.demo_window = 8
        a.retrofit_seqs = min(a.retrofit_seqs or 2, 2)
    if a.threads:
        torch.set_num_threads(a.threads)
    import dms_ext  # noqa: F401  registers torch.ops.dms
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    device = torch.device(a.device)
    t0 = time.time()
    parts = [f"Device: {device} ({'CPU twins of the ops' if device.type == 'cpu' else 'CUDA kernels'}), "
             f"compute dtype {a.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads. "
             f"KL(P_{a.dtype} || P_fp8) in nats, float64, per evaluated position; amax/448: per-layer "
             f"scales from dms_ext.fp8.record_amax over calibration data through a {a.dtype}-pool "
             f"cache.", ""]
    if "hf" in models or "demo" in models:
        parts += [f"Models hf and demo: {a.prompts} random prompts x {a.prompt_len} tokens, "
                  f"{a.new_tokens} generated tokens each (the prefill's next-token logits + "
                  f"{a.new_tokens - 1} decode steps); calibration: {a.calib_prompts} other random "
                  f"prompts x {a.prompt_len} tokens + {a.calib_tokens} greedy tokens each. Block "
                  f"size 16. KL per generated position.", ""]
    summ = []
    for name in models:
        t1 = time.time()
        desc, run, notes = builders[name](a, dtype, device)
        rows, info = run()
        fmt = lambda xs: ", ".join(f"{x:.3g}" for x in xs)  # noqa: E731
        where = "answer positions" if "acc" in rows[0][1] else "generated positions"
        parts += [f"## {name}: {desc}", "", *(notes + [""] if notes else []), table(rows, a.dtype), "",
                  f"- calibrated amax per layer: K [{fmt(info['k_amax'])}], V [{fmt(info['v_amax'])}]"
                  f" -> k_scale [{fmt(info['k_scales'])}], v_scale [{fmt(info['v_scales'])}]",
                  f"- reference run: mean top-1 probability {info['ref_top1']:.3g} (over the {where}); "
                  f"layer-0 live slots per sequence at the end (summed over KV heads) "
                  f"{info['live_layer0']} of {info['live_of']} tokens x heads"]
        if a.self_check:
            parts.append(f"- self-check: a second {a.dtype}-pool run, teacher-forced: max KL "
                         f"{info['ref_self_kl_max']:.3g}")
        parts += [f"- this model: {time.time() - t1:.0f} s", ""]
        summ += [summary(name, n, r, a) for n, r in rows]
        print(f"{name}:\n{table(rows, a.dtype)}", flush=True)
    parts.append(f"- wall time {time.time() - t0:.0f} s")
    body = "\n".join(parts)
    print(body)
    print("SUMMARY: " + "; ".join(summ), flush=True)
    if not a.smoke:
        path = common.write_results("fp8_quality", "FP8 KV pools vs compute-dtype pools: "
                                    "measured quality", body, a.results_dir)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
