"""Retrofit DMS into a small model, and compare learned eviction with training-free heuristics.

    python bench/retrofit_experiment.py --seed 0            # the H200 run (~8 minutes)
    python bench/retrofit_experiment.py --small --seed 0    # CPU run that learns (~10-15 min)
    python bench/retrofit_experiment.py --tiny --seed 0     # CPU smoke run (< 2 minutes)

1. Pretrain a small Qwen3-style decoder from scratch: first on dense induction data (random
   tokens whose second half copies chunks of the first half) until an induction head forms,
   then on multi-query associative recall hidden in filler (dms_ext.retrofit.associative_recall):
   N-token sequences with P (key, value) bigrams scattered among random filler, then P queries;
   only 2P tokens of the context matter. (On recall data alone, small models sit for thousands
   of steps at "copy some value of the context"; after the induction phase recall is learned
   in tens of steps.)
2. For each target compression ratio (default 4 and 8): convert the model to DMS (borrowed
   neuron by default) and retrofit it for at most 1000 steps against the frozen model
   (dms_ext.retrofit.retrofit: logistic-noise relaxation, KL + one-sided hinge).
3. Evaluate on held-out sequences: the vanilla model (dense causal), DMS through DMSCache and
   the dms kernels (prefill the context, decode the queries one token at a time), and sliding
   window / H2O / TOVA at the same live-token budget per head (the mean DMS keeps, rounded
   up), with greedy next-token accuracy at the answer positions.
4. Write bench/results/retrofit_<date>.md (table, sizes, wall times), the per-step logs (TSV),
   and a PNG of the curves (when matplotlib is installed). Checkpoints (dms_ext.models
   save_pretrained folders) go to --ckpt-dir.

Every size and schedule entry of a preset can be changed with --set KEY=VALUE (e.g.
--set r_steps=600 --set r_evict_lr=1e-5); --vanilla DIR skips pretraining.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import dms_ext  # noqa: E402,F401  (loads the op library)
from dms_ext.models import DMSForCausalLM, ModelConfig, convert_to_dms  # noqa: E402
from dms_ext.retrofit import (Progress, Recall, RetrofitConfig, accuracy_cache,  # noqa: E402
                              accuracy_dense, accuracy_heuristic, associative_recall,
                              plot_history, retrofit, write_log)

FULL = dict(seq_len=2048, pairs=64, vocab=512, hidden=384, layers=6, heads=8, kv_heads=2,
            head_dim=64, intermediate=1536, window=64, batch=32, rbatch=8, pre_steps=1500,
            ind_steps=600, ind_len=256, pre_lr=1e-3, pre_cap_s=240.0, curr_start=384,
            curr_frac=0.4, r_steps=800, r_lr=5e-4, r_evict_lr=None, r_margin=0.0,
            r_answer_weight=0.0, r_hinge=1.0, r_hinge_adapt=0.0, eval_seqs=64, eval_batch=32,
            block_size=64)
# CPU presets. SMALL learns the task and the retrofit for real (about 10-15 minutes on 2 cores);
# TINY only exercises every path (under 2 minutes; its model is too small to learn recall).
SMALL = dict(seq_len=256, pairs=8, vocab=128, hidden=128, layers=2, heads=4, kv_heads=2,
             head_dim=32, intermediate=256, window=8, batch=64, rbatch=16, pre_steps=300,
             ind_steps=300, ind_len=64, pre_lr=2e-3, pre_cap_s=None, curr_start=64,
             curr_frac=0.4, r_steps=800, r_lr=5e-4, r_evict_lr=None, r_margin=0.0,
             r_answer_weight=0.0, r_hinge=1.0, r_hinge_adapt=0.0, eval_seqs=32, eval_batch=32,
             block_size=16)
TINY = dict(SMALL, seq_len=128, pairs=6, vocab=64, hidden=64, head_dim=16, intermediate=128,
            batch=16, ind_steps=100, pre_steps=300, pre_lr=3e-3, r_steps=60, r_lr=1e-3,
            eval_seqs=8, eval_batch=8)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def induction_batch(batch, seq_len, vocab, generator, device, chunk=8):
    """Random tokens whose second half is made of chunks copied from random places of the
    first half; targets: every copied token but the first of its chunk. Dense, content-based
    induction signal (a copy's source offset varies, so no positional shortcut)."""
    half = seq_len // 2
    ids = torch.randint(1, vocab, (batch, seq_len), generator=generator)
    nch = (seq_len - half) // chunk
    starts = torch.randint(0, half - chunk, (batch, nch), generator=generator)
    src = (starts[:, :, None] + torch.arange(chunk)).reshape(batch, -1)
    ids[:, half:half + nch * chunk] = torch.gather(ids, 1, src)
    target = torch.zeros(batch, seq_len, dtype=torch.bool)
    m = torch.ones(nch, chunk, dtype=torch.bool)
    m[:, 0] = False
    target[:, half:half + nch * chunk] = m.reshape(-1)
    return ids.to(device), target.to(device)


def pretrain(model, S, dev, gen, steps, lr, desc="pretrain", stop_acc=0.99):
    """Phase 1 (at most ind_steps): induction batches only, until the copy accuracy passes 0.9.
    Recall needs an induction head (find the earlier occurrence of the query key, copy the
    token after it); on recall data alone a small model sits for thousands of steps on the
    plateau of "copy some value of the context", while dense induction data forms the head in
    a few hundred steps at a large batch.
    Phase 2: recall batches (plus 1 in 5 induction batches), LM loss on every position plus the
    mean loss of the answer positions (the only ones that need memory). The sequences grow from
    curr_start to seq_len tokens over the first curr_frac of the steps (same pairs, more filler,
    same tokens per step). Stops once the running answer accuracy at full length passes
    stop_acc, or after pre_cap_s seconds (both phases)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.05,
                            fused=dev.type == "cuda")
    warm = max(steps // 20, 10)
    n_full, n0 = S["seq_len"], min(S["curr_start"], S["seq_len"])
    ramp = int(S["curr_frac"] * steps)
    tokens = S["batch"] * n_full
    hist = []
    t0 = time.perf_counter()
    model.train()

    def step_on(ids, target, lm_weight):
        b = ids.shape[0]
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            logits = model(ids)
        ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, S["vocab"]),
                             ids[:, 1:].reshape(-1), reduction="none").view(b, -1)
        tgt = target[:, :-1]
        loss = ce[tgt].mean() + lm_weight * ce.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            acc = (logits[:, :-1].argmax(-1) == ids[:, 1:])[tgt].float().mean().item()
        return float(loss.detach()), acc

    # Phase 1: induction.
    ind_len = S["ind_len"]
    ind_batch = max(1, tokens // ind_len)
    ema, n_ind = 0.0, 0
    bar = Progress(S["ind_steps"], "induction")
    for step in range(S["ind_steps"]):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warm)
        ids, tgt = induction_batch(ind_batch, ind_len, S["vocab"], gen, dev)
        loss, acc = step_on(ids, tgt, 0.0)
        ema = acc if step == 0 else 0.9 * ema + 0.1 * acc
        n_ind += 1
        hist.append({"step": step + 1, "phase": "induction", "loss": loss, "acc": acc,
                     "seq_len": ind_len, "seconds": time.perf_counter() - t0})
        bar.update(1, loss=loss, acc=ema)
        if ema >= 0.85 and step >= 30:
            break
    bar.close()
    log(f"induction phase: {n_ind} steps, copy accuracy {ema:.3f}")

    # Phase 2: recall.
    ema, full_steps = 0.0, 0
    bar = Progress(steps, desc)
    for step in range(steps):
        n = n_full if step >= ramp else min(n_full, -(-int(n0 + (n_full - n0) * step / ramp) // 64) * 64)
        b = max(1, tokens // n)
        # Constant after phase 1's warmup; the last 20% decays linearly to 10%.
        f = min(1.0, max(0.1, (steps - step) / (0.2 * steps)))
        for g in opt.param_groups:
            g["lr"] = lr * f
        if step % 5 == 4:
            ids, tgt = induction_batch(ind_batch, ind_len, S["vocab"], gen, dev)
            step_on(ids, tgt, 0.0)
            continue
        task = associative_recall(b, n, S["pairs"], vocab=S["vocab"], generator=gen, device=dev)
        loss, acc = step_on(task.ids, task.answer, S.get("lm_weight", 1.0))
        ema = acc if step == 0 else 0.8 * ema + 0.2 * acc
        full_steps += n == n_full
        el = time.perf_counter() - t0
        hist.append({"step": n_ind + step + 1, "phase": "recall", "loss": loss, "acc": acc,
                     "seq_len": n, "seconds": el})
        bar.update(1, loss=loss, acc=ema, N=n)
        if ema >= stop_acc and full_steps >= 20:
            log(f"{desc}: answer accuracy {ema:.4f} >= {stop_acc} at full length, step {step + 1}")
            break
        if S["pre_cap_s"] is not None and el > S["pre_cap_s"]:
            log(f"{desc}: time cap {S['pre_cap_s']:.0f} s reached at step {step + 1} "
                f"(N {n}, running accuracy {ema:.4f})")
            break
    bar.close()
    model.eval()
    return hist


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run (under 2 minutes)")
    ap.add_argument("--small", action="store_true",
                    help="CPU run that learns for real (about 10-15 minutes on 2 cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--crs", default="4,8", help="target compression ratios, comma separated")
    ap.add_argument("--variant", default="borrowed", choices=("borrowed", "adapter"))
    ap.add_argument("--mode", default="full", choices=("full", "adapter"))
    ap.add_argument("--pretrain-steps", type=int, default=None)
    ap.add_argument("--pretrain-cap", type=float, default=None,
                    help="seconds of pretraining at most (default: 240 on the full run)")
    ap.add_argument("--retrofit-steps", type=int, default=None, help="at most 1000 per CR")
    ap.add_argument("--retrofit-lr", type=float, default=None)
    ap.add_argument("--eval-seqs", type=int, default=None)
    ap.add_argument("--window", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--pairs", type=int, default=None)
    ap.add_argument("--cache-device", default=None,
                    help="device of the DMSCache (default: the model's when the dms ops have "
                         "kernels there, else cpu)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--ckpt-dir", default=None,
                    help="checkpoints (default: $OUT/retrofit_ckpt or /tmp/retrofit_ckpt)")
    ap.add_argument("--vanilla", default=None,
                    help="load this vanilla checkpoint (a save_pretrained folder) instead of pretraining")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a size / schedule entry of the preset (repeatable)")
    a = ap.parse_args(argv)

    t_start = time.perf_counter()
    S = dict(TINY if a.tiny else SMALL if a.small else FULL)
    preset = "tiny" if a.tiny else "small" if a.small else "full"
    suffix = "" if preset == "full" else "_" + preset
    for kv in a.set:
        k, _, v = kv.partition("=")
        if k not in S:
            ap.error(f"--set: unknown key {k!r} (known: {', '.join(S)})")
        S[k] = None if v == "None" else type(S[k] if S[k] is not None else 0.0)(v)
    for k in ("window", "seq_len", "pairs"):
        if getattr(a, k) is not None:
            S[k] = getattr(a, k)
    if a.pretrain_steps is not None:
        S["pre_steps"] = a.pretrain_steps
    if a.pretrain_cap is not None:
        S["pre_cap_s"] = a.pretrain_cap
    if a.retrofit_steps is not None:
        S["r_steps"] = a.retrofit_steps
    if a.retrofit_lr is not None:
        S["r_lr"] = a.retrofit_lr
    if a.eval_seqs is not None:
        S["eval_seqs"] = a.eval_seqs
    if S["r_steps"] > 1000:
        ap.error("--retrofit-steps: at most 1000")
    crs = [float(x) for x in a.crs.split(",") if x]
    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cdev = torch.device(a.cache_device) if a.cache_device else dev
    if a.cache_device is None and dev.type == "cuda":
        has = all(torch._C._dispatch_has_kernel_for_dispatch_key(f"dms::{op}", "CUDA")
                  for op in ("append", "sparse_prefill", "sparse_decode"))
        if not has:
            cdev = torch.device("cpu")
            log("the dms ops have no CUDA kernels in this build: DMSCache runs on the CPU")
    ckpt_root = a.ckpt_dir or os.path.join(os.environ.get("OUT", "/tmp"), "retrofit_ckpt")
    os.makedirs(a.out, exist_ok=True)
    torch.manual_seed(a.seed)
    # logsigmoid(-z) and sigmoid(z) of strongly negative z land in float32 denormals, which
    # slow CPU arithmetic by orders of magnitude; they carry no usable gradient anyway.
    torch.set_flush_denormal(True)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    gen = torch.Generator().manual_seed(a.seed)

    cfg = ModelConfig(hidden=S["hidden"], layers=S["layers"], heads=S["heads"],
                      kv_heads=S["kv_heads"], head_dim=S["head_dim"], vocab=S["vocab"],
                      window=S["window"], intermediate=S["intermediate"],
                      max_position=max(S["seq_len"], 256))
    model = DMSForCausalLM(cfg).to(dev)
    nparam = sum(p.numel() for p in model.parameters())
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    log(f"device {dev_name}; model {nparam / 1e6:.2f} M parameters; sizes {S}")

    # 1. vanilla model from scratch
    t = time.perf_counter()
    if a.vanilla:
        model = DMSForCausalLM.from_pretrained(a.vanilla).to(dev).eval()
        pre_hist = []
        log(f"loaded the vanilla model from {a.vanilla}")
    else:
        pre_hist = pretrain(model, S, dev, gen, S["pre_steps"], S["pre_lr"])
        model.save_pretrained(os.path.join(ckpt_root, "vanilla"))
    sync(dev)
    t_pre = time.perf_counter() - t
    eval_task = associative_recall(S["eval_seqs"], S["seq_len"], S["pairs"], vocab=S["vocab"],
                                   generator=torch.Generator().manual_seed(a.seed + 10_000),
                                   device=dev)
    acc_vanilla = accuracy_dense(model, eval_task, "causal", batch=S["eval_batch"])
    log(f"pretrained in {t_pre:.0f} s ({len(pre_hist)} steps): vanilla accuracy {acc_vanilla:.4f}")

    rows, runs, times = [], {"pretrain": pre_hist}, {"pretrain": t_pre}
    for cr in crs:
        # 2. retrofit
        torch.manual_seed(a.seed + int(cr * 100))
        student = convert_to_dms(model, a.variant)
        rcfg = RetrofitConfig(target_cr=cr, steps=S["r_steps"], mode=a.mode, lr=S["r_lr"],
                              evict_lr=S["r_evict_lr"], target_margin=S["r_margin"],
                              hinge_weight=S["r_hinge"], hinge_adapt=S["r_hinge_adapt"])
        rgen = torch.Generator().manual_seed(a.seed + 1 + int(cr * 100))

        def data(step, rgen=rgen):
            task = associative_recall(S["rbatch"], S["seq_len"], S["pairs"], vocab=S["vocab"],
                                      generator=rgen, device=dev)
            w = None
            if S["r_answer_weight"] > 0:
                # Per-token KL, with the answer positions (the only ones whose teacher output
                # depends on distant tokens) weighted up.
                w = 1.0 + S["r_answer_weight"] * task.answer.float()
            return task.ids, w

        t = time.perf_counter()
        hist = retrofit(student, model, data, rcfg, ckpt_dir=os.path.join(ckpt_root, f"dms_cr{cr:g}"),
                        desc=f"retrofit CR {cr:g}")
        sync(dev)
        t_r = time.perf_counter() - t
        runs[f"CR {cr:g}"] = hist
        times[f"retrofit CR {cr:g}"] = t_r
        write_log(hist, os.path.join(a.out, f"retrofit{suffix}_cr{cr:g}_log.tsv"))
        log(f"retrofit CR {cr:g}: {t_r:.0f} s, final KL {hist[-1]['kl']:.4g}, "
            f"decisions {hist[-1]['evict_hard']:.3f}, est. CR {hist[-1]['cr_est']:.2f}")

        # 3. evaluation
        t = time.perf_counter()
        acc_mask = accuracy_dense(student, eval_task, "dms", batch=S["eval_batch"])
        res = accuracy_cache(student, eval_task, batch=S["eval_batch"], block_size=S["block_size"],
                             device=cdev)
        budget = int(math.ceil(res["live"]))
        row = {"cr_target": cr, "dms_mask": acc_mask, "dms": res["acc"], "dms_cr": res["cr"],
               "live": res["live"], "live_max": res["live_max"], "budget": budget}
        log(f"DMS CR {cr:g}: cache accuracy {res['acc']:.4f} (dense mask {acc_mask:.4f}), "
            f"measured CR {res['cr']:.2f}, live {res['live']:.1f} per head (max {res['live_max']})")
        for pol in ("window", "h2o", "tova"):
            # One lockstep batch on the GPU: the heuristics run a Python loop per token.
            hb = S["eval_seqs"] if dev.type == "cuda" else S["eval_batch"]
            h = accuracy_heuristic(model, eval_task, pol, budget, batch=hb)
            row[pol] = h["acc"]
            log(f"  {pol:6s} at budget {budget}: accuracy {h['acc']:.4f} ({h['seconds']:.0f} s)")
        times[f"eval CR {cr:g}"] = time.perf_counter() - t
        rows.append(row)

    wall = time.perf_counter() - t_start
    # 4. report
    date = datetime.date.today().isoformat()
    png = os.path.join(a.out, f"retrofit_{date}{suffix}.png")
    plotted = (not a.no_plot) and plot_history(runs, png)
    write_log(pre_hist, os.path.join(a.out, f"retrofit{suffix}_pretrain_log.tsv"))
    table = [
        "| target CR | measured CR | live / head (max) | vanilla | DMS (cache) | DMS (dense mask) "
        "| window | H2O | TOVA | DMS / vanilla | DMS - best heuristic |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        best = max(r["window"], r["h2o"], r["tova"])
        table.append(
            f"| {r['cr_target']:g} | {r['dms_cr']:.2f} | {r['live']:.1f} ({r['live_max']}) "
            f"| {acc_vanilla:.4f} | {r['dms']:.4f} | {r['dms_mask']:.4f} | {r['window']:.4f} "
            f"| {r['h2o']:.4f} | {r['tova']:.4f} | {100 * r['dms'] / max(acc_vanilla, 1e-9):.1f}% "
            f"| {100 * (r['dms'] - best):+.1f} pts |")
    lines = [
        f"# DMS retrofit vs training-free eviction ({date}{'' if preset == 'full' else ', ' + preset})",
        "",
        f"Command: `python bench/retrofit_experiment.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
        f"Device: {dev_name} (DMSCache on {cdev}); torch {torch.__version__}; seed {a.seed}; "
        f"wall time {wall:.0f} s.",
        "",
        "Task: multi-query associative recall in filler: "
        f"{S['seq_len']}-token sequences, {S['pairs']} key-value pairs scattered among random filler, "
        f"then {S['pairs']} queries (key, value); {2 * S['pairs']} needed tokens "
        f"({100 * 2 * S['pairs'] / S['seq_len']:.1f}% of the context). Accuracy: greedy next token at "
        f"the {S['pairs']} answer positions of {S['eval_seqs']} held-out sequences.",
        (f"Pretraining: {sum(r['phase'] == 'induction' for r in pre_hist)} induction steps "
         f"({S['ind_len']}-token copy sequences), then {sum(r['phase'] == 'recall' for r in pre_hist)} "
         f"logged recall steps (plus one induction step in five; curriculum {S['curr_start']} -> "
         f"{S['seq_len']} tokens over {S['curr_frac']:.0%} of {S['pre_steps']} planned steps), "
         f"{S['batch'] * S['seq_len']} tokens per step." if pre_hist else
         f"Pretraining: skipped, vanilla model loaded from {a.vanilla}."),
        f"Model: Qwen3-style, {cfg.layers} layers, hidden {cfg.hidden}, Hq {cfg.heads}, Hkv {cfg.kv_heads}, "
        f"D {cfg.head_dim}, SwiGLU {cfg.intermediate}, vocab {cfg.vocab}, {nparam / 1e6:.2f} M parameters; "
        f"DMS {a.variant} variant, window {cfg.window}, {a.mode} retrofit, {S['r_steps']} steps per CR.",
        f"Heuristics at the DMS budget (mean live tokens per head, rounded up), plain torch, "
        f"H2O with half the budget recent; measured CR = tokens / mean live tokens at the end.",
        "",
        *table,
        "",
        "Wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()) + f", total {wall:.0f}.",
        "",
        f"Curves: {'`' + os.path.basename(png) + '`' if plotted else '(matplotlib missing: no PNG)'}; "
        f"per-step logs: `retrofit{suffix}_pretrain_log.tsv`, " +
        ", ".join(f"`retrofit{suffix}_cr{cr:g}_log.tsv`" for cr in crs) + ".",
    ]
    md = os.path.join(a.out, f"retrofit_{date}{suffix}.md")
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(table))
    log(f"wrote {md}; total wall time {wall:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
