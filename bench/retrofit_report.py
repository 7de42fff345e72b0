"""Phase 4 of bench/retrofit_experiment.py: its report from the accumulated results.

report() writes <out>/retrofit_<preset>.md (header: GPU, sequence length; accuracy tables for
the unseen and the tuning set against vanilla and the training-free heuristics; retrofit cost),
one TSV of every per-step log, and (matplotlib, unless --no-plot) one PNG: accuracy against CR
(plot_acc_cr) above the training curves (dms_ext.retrofit.plot_history).
"""
from __future__ import annotations

import datetime
import os

import torch

from dms_ext.retrofit import plot_history


def report(R, S, dms, st, a, preset, dev_name, cdev, runs, eval_seed, tune_seed):
    date = datetime.date.today().isoformat()
    base = os.path.join(a.out, f"retrofit_{preset}")
    # One TSV of every per-step log, with a "run" column.
    with open(base + "_logs.tsv", "w") as f:
        logs = [("pretrain", st["hist"] if st else [])] + [(n, e["hist"]) for n, e in dms.items()]
        keys = sorted({k for _, h in logs for r in h for k in r})
        f.write("run\t" + "\t".join(keys) + "\n")
        for n, h in logs:
            for r in h:
                f.write(n + "\t" + "\t".join(
                    (f"{r[k]:.6g}" if isinstance(r[k], float) else str(r[k])) if k in r else ""
                    for k in keys) + "\n")
    png = None
    if not a.no_plot:
        # One PNG (a device run returns at most 8 files): accuracy against CR above the curves.
        png = base + ".png"
        ok = plot_history({"pretrain": st["hist"] if st else [],
                           **{n: e["hist"] for n, e in dms.items()}}, png + ".curves.png")
        ok = ok and plot_acc_cr(R, png + ".acc.png")
        if ok:
            import matplotlib.pyplot as plt
            import numpy as np
            ims = [plt.imread(png + ".acc.png"), plt.imread(png + ".curves.png")]
            w = max(i.shape[1] for i in ims)
            ims = [np.pad(i, ((0, 0), (0, w - i.shape[1]), (0, 0)), constant_values=1.0) for i in ims]
            plt.imsave(png, np.concatenate(ims, axis=0))
        for f in (png + ".curves.png", png + ".acc.png"):
            if os.path.exists(f):
                os.remove(f)
        png = png if ok else None
    van = R["vanilla"]
    lines = [
        f"# DMS retrofit vs training-free eviction ({date}, preset {preset})", "",
        f"GPU / device: **{dev_name}** (DMSCache on {cdev}); sequence length **{S['seq_len']}**; "
        f"{S['pairs']} pairs; torch {torch.__version__}; seed {a.seed}.",
        "Invocations: " + "; ".join(f"`{' '.join(i['argv'])}` ({i.get('seconds', 0):.0f} s)"
                                   for i in R["invocations"]), "",
        f"Task: multi-query associative recall in filler, {S['seq_len']} tokens, {S['pairs']} "
        f"key-value pairs among random filler, then {S['pairs']} queries; vocab {S['vocab']}. "
        f"Accuracy: greedy next token at the answer positions, {S['eval_seqs'] * S['pairs']} "
        f"answers per set. Sets: **unseen** (data seed {eval_seed}+seed, never used while tuning) "
        f"and **tune** (data seed {tune_seed}+seed).",
    ]
    if "pretrain" in R:
        p = R["pretrain"]
        lines.append(
            f"Model: Qwen3-style, {S['layers']} layers, hidden {S['hidden']}, Hq {S['heads']}, "
            f"Hkv {S['kv_heads']}, D {S['head_dim']}, {R.get('params', 0) / 1e6:.2f} M parameters. "
            f"Pretraining: {p['step']} steps, {p['seconds']:.0f} s, {S['tokens']} tokens per step, "
            f"curriculum (seq_len:pairs at step, seconds) "
            + ", ".join(f"{n}:{q} at {s} ({t:.0f} s)" for n, q, s, t in p["stage_steps"])
            + f" (induction: copy task, vocab {S['ind_vocab']}, {S['ind_len']} tokens)"
            + ("" if p["done"] else " **(unfinished)**") + ".")
    lines.append(f"Retrofit: {a.mode} mode, {S['r_steps']} steps of {S['rbatch']} x {S['seq_len']} "
                 f"tokens, lr {S['r_lr']}, DMS window {S['window']}. Heuristics at each run's live "
                 "KV (mean live tokens per head, rounded up); H2O keeps half its budget recent.")
    for k, title in (("eval", "unseen seed"), ("tune", "tuning seed")):
        lines += ["", f"## {title}", "",
                  "| run | measured CR | live / head (max) | vanilla | DMS (cache) | DMS (dense mask) "
                  "| window | H2O | TOVA | DMS / vanilla | DMS - best heuristic |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        v = van.get(k)
        lines.append(f"| vanilla | 1.00 | {S['seq_len']} | {v if v is None else f'{v:.4f}'} "
                     "| | | | | | | |")
        for name, r in R["runs"].items():
            if k not in r:
                continue
            e = r[k]
            h = R["heur"].get(f"{k}_{e['budget']}", {})
            hs = [h.get(p) for p in ("window", "h2o", "tova")]
            best = max((x for x in hs if x is not None), default=None)
            fmt = lambda x: "" if x is None else f"{x:.4f}"
            lines.append(
                f"| DMS {r['variant']} CR {r['cr_target']:g} | {e['cr']:.2f} | {e['live']:.1f} "
                f"({e['live_max']}) | {fmt(v)} | {e['acc']:.4f} | {e['dense_mask']:.4f} | "
                + " | ".join(fmt(x) for x in hs)
                + " | " + ("" if not v else f"{100 * e['acc'] / v:.1f}%") + " | "
                + ("" if best is None else f"{100 * (e['acc'] - best):+.1f} pts") + " |")
    lines += ["", "## Retrofit cost", "",
              "| run | steps | seconds | training tokens/s | peak memory |", "|---|---|---|---|---|"]
    for name, r in R["runs"].items():
        if "seconds" in r:
            pm = r.get("peak_mem")
            lines.append(f"| {name} | {r['steps']} | {r['seconds']:.0f} | {r['tokens_per_s']:.0f} | "
                         + ("n/a" if pm is None else f"{pm / 2**20:.0f} MiB") + " |")
    lines += ["", "Reference cost (paper / model card): Qwen3-8B retrofitted to DMS 8x in about "
              "4 hours on 8 H100s.", "",
              f"Plot (accuracy against CR on the unseen set, then the training curves): "
              f"{os.path.basename(png) if png else '(no matplotlib)'}; per-step logs: "
              f"{os.path.basename(base)}_logs.tsv."]
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot_acc_cr(R, path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 4))
    if R["vanilla"].get("eval") is not None:
        ax.axhline(R["vanilla"]["eval"], color="k", ls="--", lw=0.8, label="vanilla")
    series = {}
    for name, r in R["runs"].items():
        if "eval" not in r:
            continue
        e = r["eval"]
        series.setdefault(f"DMS {r['variant']}", []).append((e["cr"], e["acc"]))
        h = R["heur"].get(f"eval_{e['budget']}", {})
        for pol in ("window", "h2o", "tova"):
            if pol in h:
                series.setdefault(pol, []).append((e["cr"], h[pol]))
    for lab, pts in series.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if "DMS" in lab else "s:", label=lab)
    ax.set_xlabel("compression ratio (tokens / live KV)")
    ax.set_ylabel("answer accuracy (unseen seed)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
