"""Long-context retrieval evaluation of a DMS checkpoint: ``python -m dms_ext.eval``.

    python -m dms_ext.eval --model CKPT --lengths 4096,8192,16384,32768 --out bench/results/longctx

CKPT is a local checkpoint folder, either this project's (``DMSForCausalLM.save_pretrained``:
config.json with a ``"dms"`` block) or a transformers DMS checkpoint in the reference's format
(Qwen3 / Llama config with ``dms_window_size``, ``dms_alpha_scale``, ``dms_initial_alpha_offset``,
``dms_separate_alpha``; safetensors, sharded or not, or pytorch_model.bin), or a ``dms.pt`` of
``bench/retrofit_experiment.py`` (``--run borrowed_cr8`` picks one of its retrofits). Every
model runs as :class:`dms_ext.models.DMSForCausalLM` (same parameter names), with its RoPE table
extended to the longest context.

Tasks (RULER-style, generated locally in the token space of the associative-recall models:
keys, values and filler are disjoint vocabulary ranges, see ``dms_ext.retrofit.associative_recall``):

* ``niah``: one (key, value) needle at a depth in [0.05, 0.95] of a haystack of filler, then the
  key: the answer is the value.
* ``mk`` (multi-key): ``--pairs`` (key, value) pairs in the haystack, ``--queries`` of their keys
  asked (each answer must come from the right key among many distractors).
* ``mv`` (multi-value): one key followed by ``--values`` values in the haystack (plus distractor
  pairs); the query is the key then its values, each one an answer.

Methods: ``dms`` (DMSCache and the dms kernels: prefill the context, decode the queries),
``dense`` (the same model with eviction disabled), ``window`` / ``h2o`` / ``tova`` (training-free
eviction at the DMS run's live KV per head, rounded up). Accuracy: greedy next token at the
answer positions. Writes ``longctx.md`` (table: accuracy and achieved compression per task,
length, method), ``longctx.json`` and ``longctx.png`` (accuracy against context length and
against compression; needs matplotlib) into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace
from typing import Dict, List, Optional

import torch

from .models import DMSForCausalLM, ModelConfig
from .retrofit import (Progress, Recall, accuracy_cache, accuracy_dense, accuracy_heuristic,
                       associative_recall)

__all__ = ["load_model", "make_task", "evaluate", "main", "TASKS", "METHODS"]

TASKS = ("niah", "mk", "mv")
METHODS = ("dms", "dense", "window", "h2o", "tova")
_ADAPTER_NAMES = ((".self_attn.dms_proj_alpha_norm.", ".self_attn.dms_norm."),
                  (".self_attn.dms_proj_alpha.", ".self_attn.dms_proj."))


# ----------------------------------------------------------------------------- loading

def _read_weights(path: str) -> Dict[str, torch.Tensor]:
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if files:
        from safetensors.torch import load_file
        sd = {}
        for f in files:
            sd.update(load_file(os.path.join(path, f)))
        return sd
    bins = sorted(f for f in os.listdir(path) if f.endswith(".bin"))
    if not bins:
        raise ValueError(f"model: no safetensors or .bin weights in {path}")
    sd = {}
    for f in bins:
        sd.update(torch.load(os.path.join(path, f), map_location="cpu", weights_only=True))
    return sd


def _config_from_hf(d: dict) -> ModelConfig:
    """This project's config.json, or a reference-format DMS config (dms_* fields)."""
    if "dms_ext_config" in d or "dms" in d:
        return ModelConfig.from_hf_dict(d)
    if d.get("dms_alpha_per", "head") != "head":
        raise ValueError("model: dms_alpha_per 'layer' is not supported by this evaluation")
    variant = "none"
    if "dms_window_size" in d and not d.get("dms_disable_eviction", False):
        variant = "adapter" if d.get("dms_separate_alpha", False) else "borrowed"
    dd = dict(d, dms={"window": d.get("dms_window_size", 512),
                      "alpha_scale": d.get("dms_alpha_scale", 100.0),
                      "alpha_offset": d.get("dms_initial_alpha_offset", 5.0), "variant": variant})
    return ModelConfig.from_hf_dict(dd)


def load_model(path: str, run: Optional[str] = None, max_position: Optional[int] = None,
               device="cpu") -> DMSForCausalLM:
    """A DMSForCausalLM from a checkpoint folder or a retrofit_experiment ``dms.pt``."""
    if os.path.isfile(path):
        runs = torch.load(path, map_location="cpu", weights_only=False)
        if "model" in runs and "cfg" in runs:
            runs = {"model": runs}
        if run is None:
            if len(runs) != 1:
                raise ValueError(f"run: {path} holds {sorted(runs)}; pick one with --run")
            run = next(iter(runs))
        if run not in runs:
            raise ValueError(f"run: {run!r} not in {sorted(runs)}")
        cfg = ModelConfig(**runs[run]["cfg"])
        sd = {k: v.float() for k, v in runs[run]["model"].items()}
    else:
        with open(os.path.join(path, "config.json")) as f:
            cfg = _config_from_hf(json.load(f))
        sd = _read_weights(path)
        for a, b in _ADAPTER_NAMES:
            sd = {k.replace(a, b): v for k, v in sd.items()}
        sd = {k: v.float() for k, v in sd.items()}
    if max_position is not None and max_position > cfg.max_position:
        cfg = replace(cfg, max_position=max_position)
    model = DMSForCausalLM(cfg)
    model.load_state_dict(sd, strict=not cfg.tie_embeddings)
    return model.to(device).eval()


# ----------------------------------------------------------------------------- tasks

def _layout(vocab: int):
    nk, nv = (vocab - 1) // 2, (vocab - 1) // 4
    return 1, 1 + nk, 1 + nk + nv, nk, nv, vocab - (1 + nk + nv)   # k0, v0, f0, nk, nv, nf


def make_task(kind: str, batch: int, length: int, vocab: int, generator: torch.Generator,
              pairs: int = 16, queries: int = 4, values: int = 4,
              depth: Optional[float] = None) -> Recall:
    """One batch of a task (see the module docstring). ``depth``: the needle's relative position
    (niah; default uniform in [0.05, 0.95] per sequence)."""
    if kind not in TASKS:
        raise ValueError(f"kind: expected one of {TASKS}, got {kind!r}")
    if kind == "mk":
        return associative_recall(batch, length, pairs, queries=queries, vocab=vocab,
                                  generator=generator)
    k0, v0, f0, nk, nv, nf = _layout(vocab)
    g = generator
    ids = torch.randint(f0, f0 + nf, (batch, length), generator=g)
    ids[:, 0] = 0
    answer = torch.zeros(batch, length, dtype=torch.bool)
    m = 1 if kind == "niah" else values
    q = length - (m + 1)                      # the query: key then its m values
    if q < m + 3:
        raise ValueError(f"length: {length} is too short for the {kind} task")
    for b in range(batch):
        d = depth if depth is not None else 0.05 + 0.9 * float(torch.rand((), generator=g))
        keys = torch.randperm(nk, generator=g)[: 1 + (pairs if kind == "mv" else 0)] + k0
        vals = torch.randperm(nv, generator=g)[:m] + v0
        room = q - (m + 1) - 1
        at = 1 + min(max(int(d * room), 0), room)
        ids[b, at] = keys[0]
        ids[b, at + 1:at + 1 + m] = vals
        if kind == "mv" and pairs:
            free = [p for p in range(1, q - 1) if p + 1 < at or p > at + m]
            pick = torch.randperm(len(free), generator=g)
            used = set()
            n = 0
            for i in pick.tolist():
                p = free[i]
                if p in used or p + 1 in used or p + 1 >= q or (at <= p + 1 <= at + m):
                    continue
                used.update((p, p + 1))
                ids[b, p] = keys[1 + n]
                ids[b, p + 1] = torch.randint(v0, v0 + nv, (), generator=g)
                n += 1
                if n == pairs:
                    break
        ids[b, q] = keys[0]
        ids[b, q + 1:q + 1 + m] = vals
        answer[b, q:q + m] = True
    return Recall(ids, answer, q)


# ----------------------------------------------------------------------------- evaluation

class _Bar:
    def __init__(self, total: int, enabled: bool):
        self.tq = None
        if enabled:
            try:
                from tqdm import tqdm
                self.tq = tqdm(total=total, desc="longctx", dynamic_ncols=True)
            except ImportError:
                pass
        self.p = None if self.tq is not None else Progress(total, "longctx", enabled)

    def update(self, **info):
        if self.tq is not None:
            self.tq.set_postfix(info)
            self.tq.update(1)
        else:
            self.p.update(1, **info)

    def close(self):
        (self.tq or self.p).close()


@torch.no_grad()
def evaluate(model: DMSForCausalLM, tasks=TASKS, lengths=(4096, 8192, 16384, 32768),
             methods=METHODS, samples: int = 8, batch: int = 8, seed: int = 0, pairs: int = 16,
             queries: int = 4, values: int = 4, cache_device=None, progress: bool = True,
             deadline: Optional[float] = None) -> List[dict]:
    """Rows {task, length, method, acc, cr, live, answers, seconds}: heuristics run at the live
    KV that ``dms`` reached on the same sequences (dms is run first when asked for).
    deadline: a ``time.perf_counter()`` value after which no new (task, length) is started."""
    methods = list(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"methods: unknown {bad} (known: {METHODS})")
    if any(m in ("window", "h2o", "tova") for m in methods) and "dms" not in methods:
        raise ValueError("methods: the heuristics need 'dms' (they run at its live KV)")
    if "dms" in methods and model.cfg.variant == "none":
        raise ValueError("methods: 'dms' needs a DMS checkpoint (variant 'none' never evicts)")
    need = max(lengths)
    if need > model.cfg.max_position:
        raise ValueError(f"lengths: {need} > max_position {model.cfg.max_position} "
                         "(load_model(max_position=...))")
    dev = next(model.parameters()).device
    order = (["dms"] if "dms" in methods else []) + [m for m in methods if m != "dms"]
    rows = []
    bar = _Bar(len(tasks) * len(lengths) * len(order), progress)
    for n in lengths:                      # short contexts of every task first (deadline)
        for ti, kind in enumerate(tasks):
            if deadline is not None and time.perf_counter() > deadline:
                break
            g = torch.Generator().manual_seed(seed * 1_000_003 + ti * 7919 + n)
            task = make_task(kind, samples, n, model.cfg.vocab, g, pairs=pairs, queries=queries,
                             values=values)
            task = Recall(task.ids.to(dev), task.answer.to(dev), task.prefix)
            answers = int(task.answer.sum())
            live = None
            for m in order:
                t0 = time.perf_counter()
                if m == "dms":
                    r = accuracy_cache(model, task, batch=batch, device=cache_device)
                    live = r["live"]
                    acc, cr, lv = r["acc"], r["cr"], r["live"]
                elif m == "dense":
                    acc = accuracy_dense(model, task, "causal", batch=batch)
                    cr, lv = 1.0, float(n)
                else:
                    budget = int(math.ceil(live))
                    acc = accuracy_heuristic(model, task, m, budget, batch=batch)["acc"]
                    cr, lv = n / budget, float(budget)
                rows.append({"task": kind, "length": n, "method": m, "acc": acc, "cr": cr,
                             "live": lv, "answers": answers,
                             "seconds": time.perf_counter() - t0})
                bar.update(task=kind, N=n, method=m, acc=f"{acc:.3f}")
    bar.close()
    return rows


def table(rows: List[dict]) -> str:
    """Markdown: one row per (task, length), accuracy (and CR) per method."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    out = ["| task | length | answers | " + " | ".join(methods) + " |",
           "|---|---|---|" + "---|" * len(methods)]
    keys = list(dict.fromkeys((r["task"], r["length"]) for r in rows))
    for k in keys:
        rs = {r["method"]: r for r in rows if (r["task"], r["length"]) == k}
        cells = [f"{rs[m]['acc']:.3f} (CR {rs[m]['cr']:.1f})" if m in rs else "" for m in methods]
        out.append(f"| {k[0]} | {k[1]} | {next(iter(rs.values()))['answers']} | "
                   + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(rows: List[dict], path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, ax = plt.subplots(2, len(tasks), figsize=(5 * len(tasks), 7), squeeze=False)
    for j, t in enumerate(tasks):
        for m in dict.fromkeys(r["method"] for r in rows):
            rs = sorted((r for r in rows if r["task"] == t and r["method"] == m),
                        key=lambda r: r["length"])
            sty = "o-" if m in ("dms", "dense") else "s:"
            ax[0, j].plot([r["length"] for r in rs], [r["acc"] for r in rs], sty, label=m)
            ax[1, j].plot([r["cr"] for r in rs], [r["acc"] for r in rs], sty, label=m)
        ax[0, j].set_xscale("log", base=2)
        ax[0, j].set_title(f"{t}: accuracy vs context length")
        ax[0, j].set_xlabel("tokens")
        ax[1, j].set_title(f"{t}: accuracy vs achieved compression")
        ax[1, j].set_xlabel("tokens / live KV")
        for a in ax[:, j]:
            a.set_ylim(-0.02, 1.02)
            a.set_ylabel("accuracy")
            a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dms_ext.eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint folder or retrofit dms.pt")
    ap.add_argument("--run", default=None, help="which retrofit of a dms.pt (e.g. borrowed_cr8)")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--lengths", default="4096,8192,16384,32768")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--samples", type=int, default=8, help="sequences per (task, length)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--queries", type=int, default=4)
    ap.add_argument("--values", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=os.path.join("bench", "results", "longctx"))
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no new (task, length) after this many seconds")
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lengths = [int(x) for x in a.lengths.split(",") if x]
    tasks = [x for x in a.tasks.split(",") if x]
    methods = [x for x in a.methods.split(",") if x]
    from . import ops  # noqa: F401  (loads the op library)
    model = load_model(a.model, a.run, max_position=max(lengths), device=dev)
    t0 = time.perf_counter()
    rows = evaluate(model, tasks, lengths, methods, samples=a.samples, batch=a.batch,
                    seed=a.seed, pairs=a.pairs, queries=a.queries, values=a.values,
                    progress=not a.no_progress,
                    deadline=None if a.budget_s is None else t_start + a.budget_s)
    os.makedirs(a.out, exist_ok=True)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    c = model.cfg
    md = [f"# Long-context retrieval: {a.model}{' [' + a.run + ']' if a.run else ''}", "",
          f"Device {name}; torch {torch.__version__}; model {c.layers} layers, hidden {c.hidden}, "
          f"Hkv {c.kv_heads}, DMS {c.variant} window {c.window}; trained positions may be fewer "
          f"than the lengths here (RoPE table extended to {c.max_position}). {a.samples} "
          f"sequences per cell, seed {a.seed}, pairs {a.pairs}, queries {a.queries}, values "
          f"{a.values}; wall time {time.perf_counter() - t0:.0f} s.",
          "Cells: accuracy (achieved compression: tokens / live KV per head; heuristics at the "
          "DMS live KV of the same sequences).", "", table(rows)]
    with open(os.path.join(a.out, "longctx.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    with open(os.path.join(a.out, "longctx.json"), "w") as f:
        json.dump({"argv": sys.argv[1:] if argv is None else argv, "device": name, "rows": rows}, f,
                  indent=1)
    plotted = plot(rows, os.path.join(a.out, "longctx.png"))
    print("\n".join(md))
    print(f"wrote {a.out}/longctx.md, longctx.json" + (", longctx.png" if plotted else ""))
    return 0


if __name__ == "__main__":
    # Denormals flushed for speed on the CPU; process-wide, so only when run as a program (a
    # test calling main() must not change how later tests round).
    torch.set_flush_denormal(True)
    raise SystemExit(main())
