"""Retrofitting DMS into a trained model (docs/semantics.md section 10), and evaluating the result.

Training relaxation (``DMSForCausalLM.forward(attention="relaxed")``): every layer's eviction
logits l get logistic noise, z = (l + noise) / tau (tau 0.1); the score of key j for a query
more than ``window`` tokens later gets + log(1 - sigmoid(z_{j+1})), so a token that is going to
be evicted fades out of the attention smoothly and the KL term can push back on its logit.

Loss per step (:func:`dms_loss`): KL(student || teacher) per token, teacher = the frozen model
with eviction off, plus max(0, target_fraction - mean of the straight-through hard decisions
(z > 0)); the target compression ratio rises linearly from 1 to ``target_cr``.

Modes (:class:`RetrofitConfig`.mode): ``"full"`` trains every weight; ``"adapter"`` freezes the
base model and trains only what produces the logits (the donor rows of q_proj for the borrowed
variant, dms_norm / dms_proj for the adapter variant) plus optional LoRA on the attention
projections (merged when saving). AdamW; checkpoints are ``DMSForCausalLM.save_pretrained``
folders; the history is a list of dicts (loss, KL, hinge, decision rate, compression) that
:func:`write_log` and :func:`plot_history` turn into a TSV and a PNG.

Evaluation on the synthetic task (:func:`associative_recall`): :func:`accuracy_dense` (dense
forward, modes a / b), :func:`accuracy_cache` (through ``DMSCache`` and the kernels) and
:func:`accuracy_heuristic` (sliding window, H2O, TOVA at a per-head budget).
"""
from __future__ import annotations

import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .models import DMSForCausalLM, HeuristicCache, st_decisions

__all__ = [
    "RetrofitConfig", "Recall", "associative_recall", "dms_loss", "target_fraction", "retrofit",
    "accuracy_dense", "accuracy_cache", "accuracy_heuristic", "write_log", "plot_history",
    "Progress",
]


# ----------------------------------------------------------------------------- the task

@dataclass
class Recall:
    """A batch of the multi-query associative-recall task.

    ids [B, N]; answer [B, N] bool marks positions whose next token is an answer (a query key;
    the target is ids[:, p + 1]); prefix: length of the context part (queries start there)."""
    ids: torch.Tensor
    answer: torch.Tensor
    prefix: int


def associative_recall(batch: int, seq_len: int, pairs: int, queries: Optional[int] = None,
                       vocab: int = 512, generator: Optional[torch.Generator] = None,
                       device="cpu", repeat: float = 0.0, value_first: bool = False) -> Recall:
    """Multi-query associative recall hidden in filler: token 0 = BOS, then a context of
    ``seq_len - 2 * queries`` tokens with ``pairs`` (key, value) bigrams at random places among
    random filler, then ``queries`` (key, value) pairs for keys of the context (each key once,
    random order). Vocabulary: 0 BOS, keys [1, 1 + V/2), values [1 + V/2, 1 + 3V/4), filler the
    rest. Keys of one sequence are distinct; only keys and values need to be remembered:
    2 * pairs tokens of the context.

    repeat: probability that a filler token copies the filler token two places back (else it is
    uniform). Local structure of this kind rewards a previous-token attention head at every
    filler position, which the recall circuit (previous-token head + induction head) builds on;
    it needs nothing beyond the last few tokens, so it stays evictable."""
    q = pairs if queries is None else queries
    if q > pairs:
        raise ValueError(f"queries: at most pairs={pairs}, got {q}")
    ctx = seq_len - 2 * q
    free = ctx - 1 - 2 * pairs              # filler tokens in the context (after BOS)
    if free < 0:
        raise ValueError(f"seq_len: {seq_len} is too short for {pairs} pairs and {q} queries")
    nk = (vocab - 1) // 2
    nv = (vocab - 1) // 4
    k0, v0, f0 = 1, 1 + nk, 1 + nk + nv
    nf = vocab - f0
    if nk < pairs or nv < 1 or nf < 1:
        raise ValueError(f"vocab: {vocab} is too small for {pairs} distinct keys")
    g = generator
    keys = torch.argsort(torch.rand(batch, nk, generator=g), dim=1)[:, :pairs] + k0
    vals = torch.randint(v0, v0 + nv, (batch, pairs), generator=g)
    ids = torch.randint(f0, f0 + nf, (batch, seq_len), generator=g)
    if repeat > 0:
        # f[t] = f[t-2] with probability `repeat`: f[t] = u[s] for the last fresh s <= t of
        # the same parity.
        fresh = torch.rand(batch, seq_len, generator=g) >= repeat
        fresh[:, :2] = True
        pos = torch.arange(seq_len).expand(batch, seq_len)
        src = torch.where(fresh, pos, torch.zeros_like(pos))
        for par in (0, 1):
            src[:, par::2] = torch.cummax(src[:, par::2], dim=1).values
        ids = torch.gather(ids, 1, src)
    ids[:, 0] = 0
    # Pair i goes after the i-th of `pairs` sorted random cut points among the filler slots:
    # uniform placement without overlap.
    cuts = torch.sort(torch.argsort(torch.rand(batch, free + pairs, generator=g), dim=1)[:, :pairs],
                      dim=1).values                          # distinct positions in the merged list
    kpos = 1 + cuts + torch.arange(pairs)                     # each earlier pair adds one extra token
    rows = torch.arange(batch)[:, None]
    ids[rows, kpos + int(value_first)] = keys
    ids[rows, kpos + 1 - int(value_first)] = vals
    order = torch.argsort(torch.rand(batch, pairs, generator=g), dim=1)[:, :q]
    qpos = ctx + 2 * torch.arange(q)
    ids[rows, qpos] = torch.gather(keys, 1, order)
    ids[rows, qpos + 1] = torch.gather(vals, 1, order)
    answer = torch.zeros(batch, seq_len, dtype=torch.bool)
    answer[:, qpos] = True
    return Recall(ids.to(device), answer.to(device), ctx)


# ----------------------------------------------------------------------------- the loss

def target_fraction(cr: float, seq_len: Optional[int] = None, window: Optional[int] = None) -> float:
    """Fraction of decisions that must be "evict" for compression ratio ``cr``. Without
    seq_len / window: 1 - 1/cr. With them, the window is accounted for: a sequence of N tokens
    keeps (N - w - 1) * (1 - f) + w + 1 tokens, which must equal N / cr."""
    if cr <= 1:
        return 0.0
    if seq_len is None or window is None:
        return 1.0 - 1.0 / cr
    old = seq_len - window - 1
    if old <= 0:
        return 0.0
    return float(min(max(1.0 - (seq_len / cr - window - 1) / old, 0.0), 1.0))


def dms_loss(student: torch.Tensor, teacher: torch.Tensor, zs: Sequence[torch.Tensor],
             target: float, token_weights: Optional[torch.Tensor] = None,
             hinge_weight: float = 1.0) -> Tuple[torch.Tensor, Dict[str, float]]:
    """KL(student || teacher) per token (mean, or weighted by token_weights [B, N]) +
    hinge_weight * max(0, target - mean straight-through decision). zs: per-layer z [B, N, Hkv];
    z[:, t] decides about token t-1, so z[:, 0] carries no decision and is left out."""
    ls = F.log_softmax(student.float(), dim=-1)
    lt = F.log_softmax(teacher.float(), dim=-1)
    kl_tok = (ls.exp() * (ls - lt)).sum(-1)
    if token_weights is None:
        kl = kl_tok.mean()
    else:
        w = token_weights.to(kl_tok.dtype)
        kl = (kl_tok * w).sum() / w.sum().clamp_min(1e-9)
    if zs:
        d = torch.cat([st_decisions(z[:, 1:].float()).reshape(-1) for z in zs]).mean()
    else:
        d = kl.new_zeros(())
    hinge = torch.clamp(target - d, min=0.0)
    loss = kl + hinge_weight * hinge
    return loss, {"kl": float(kl.detach()), "hinge": float(hinge.detach()), "decisions": float(d.detach())}


# ----------------------------------------------------------------------------- the trainer

@dataclass
class RetrofitConfig:
    """target_cr: final compression ratio; the target rises linearly from CR 1 at step 0 to
    target_cr at step ``ramp_steps`` (default 3/4 of ``steps``), then stays.
    window_aware: translate CR into an eviction fraction with :func:`target_fraction` counting
    the window (so tokens / live tokens reaches target_cr), else 1 - 1/CR of the decisions.
    target_margin: added to the eviction fraction (the hinge is one-sided, KL pulls below it).
    mode: "full" or "adapter" (base frozen; eviction parameters + LoRA of rank ``lora_rank``)."""
    target_cr: float = 8.0
    steps: int = 1000
    ramp_steps: Optional[int] = None
    window_aware: bool = True
    target_margin: float = 0.0
    mode: str = "full"
    lora_rank: int = 8
    lr: float = 3e-4
    # Learning rate of what produces the logits (borrowed q_proj rows / dms_proj): default
    # lr / alpha_scale, since the logit moves alpha_scale times faster than an activation; at
    # lr, logits leave the noise band (|l| of a few units) within a few steps and the decisions
    # freeze before the KL term can tell needed tokens from filler.
    evict_lr: Optional[float] = None
    weight_decay: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 20
    tau: float = 0.1
    hinge_weight: float = 1.0
    # > 0: the hinge weight is a Lagrange multiplier, raised by hinge_adapt * (target - d) after
    # every step (d: the noise-free eviction fraction) and never below hinge_weight, so the
    # compression follows its target even where the KL term pulls back harder than expected.
    hinge_adapt: float = 0.0
    grad_clip: float = 1.0
    flex: Optional[bool] = None           # FlexAttention for the relaxation (default: on CUDA)
    autocast: bool = True                 # bf16 autocast on CUDA
    log_every: int = 10
    ckpt_every: int = 0                   # 0: only the final checkpoint
    progress: bool = True

    def __post_init__(self):
        if self.mode not in ("full", "adapter"):
            raise ValueError(f"mode: expected 'full' or 'adapter', got {self.mode!r}")
        if self.target_cr < 1:
            raise ValueError(f"target_cr: expected >= 1, got {self.target_cr}")
        if self.steps < 1:
            raise ValueError(f"steps: expected >= 1, got {self.steps}")
        if self.tau <= 0:
            raise ValueError(f"tau: expected > 0, got {self.tau}")

    def cr_at(self, step: int) -> float:
        ramp = self.ramp_steps if self.ramp_steps is not None else max(1, (3 * self.steps) // 4)
        return 1.0 + (self.target_cr - 1.0) * min(1.0, step / max(ramp, 1))


class Progress:
    """A dependency-free progress bar (one line, redrawn on a terminal, every 10% otherwise)."""

    def __init__(self, total: int, desc: str = "", enabled: bool = True, stream=None):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.t0 = time.perf_counter()
        self.n = 0
        self._last_dec = -1
        self._last_t = 0.0

    def update(self, n: int = 1, **info) -> None:
        self.n += n
        if not self.enabled:
            return
        now = time.perf_counter()
        dec = (10 * self.n) // max(self.total, 1)
        done = self.n >= self.total
        if self.tty and now - self._last_t < 0.2 and not done:
            return
        if not self.tty and dec == self._last_dec and not done:
            return
        self._last_dec, self._last_t = dec, now
        el = now - self.t0
        frac = self.n / max(self.total, 1)
        eta = el / frac - el if frac > 0 else 0.0
        bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
        extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
        line = f"{self.desc} [{bar}] {self.n}/{self.total} {el:.0f}s<{eta:.0f}s {extra}"
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _param_groups(model: DMSForCausalLM, cfg: RetrofitConfig):
    """(param groups, gradient hooks, row-lr fixups). A fixup (param, rows, ratio) marks rows of a
    base matrix (the borrowed q_proj rows, full mode) that train at evict_lr: Adam's step does
    not scale with the gradient, so their step is scaled after the optimizer runs."""
    evict = model.eviction_parameters()
    evict_lr = cfg.evict_lr if cfg.evict_lr is not None else cfg.lr / model.cfg.alpha_scale
    hooks, fixups = [], []
    if cfg.mode == "full":
        ev_ids = {id(p) for _, p, rows in evict if rows is None}
        base = [p for p in model.parameters() if id(p) not in ev_ids]
        groups = [{"params": base, "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
        ev = [p for _, p, rows in evict if rows is None]
        if ev:
            groups.append({"params": ev, "lr": evict_lr, "weight_decay": 0.0})
        if evict_lr != cfg.lr and cfg.lr > 0:
            fixups = [(p, rows, evict_lr / cfg.lr) for _, p, rows in evict if rows is not None]
        return groups, hooks, fixups
    for p in model.parameters():
        p.requires_grad_(False)
    groups = []
    ev = []
    for _, p, rows in evict:
        p.requires_grad_(True)
        if rows is not None:
            # Only the donor rows of q_proj are eviction parameters; the rest of the matrix is
            # base model and stays frozen (its gradient is masked, and no weight decay).
            mask = (rows[:, None] if p.dim() == 2 else rows).to(p.dtype)
            hooks.append(p.register_hook(lambda g, m=mask: g * m))
        ev.append(p)
    groups.append({"params": ev, "lr": evict_lr, "weight_decay": 0.0})
    if cfg.lora_rank > 0:
        lora = model.add_lora(cfg.lora_rank)
        groups.append({"params": lora, "lr": cfg.lr, "weight_decay": cfg.weight_decay})
    return groups, hooks, fixups


def retrofit(model: DMSForCausalLM, teacher: DMSForCausalLM,
             data: Callable[[int], Tuple[torch.Tensor, Optional[torch.Tensor]]],
             cfg: RetrofitConfig, ckpt_dir: Optional[str] = None,
             generator: Optional[torch.Generator] = None,
             desc: str = "retrofit", deadline: Optional[float] = None) -> Optional[List[dict]]:
    """Trains ``model`` (a DMS variant, e.g. from :func:`dms_ext.models.convert_to_dms`) to
    follow the frozen ``teacher`` at compression ``cfg.target_cr``.

    data(step) -> (input_ids [B, N], token_weights [B, N] or None). Returns the history: one dict
    per step (step, loss, kl, hinge, decisions, target_cr, target, evict_hard (noise-free
    fraction of l > 0), cr_est (the compression that fraction gives at this N and window),
    lr, seconds). In "adapter" mode the LoRA weights are merged into the model at the end.

    deadline: a ``time.perf_counter()`` value; after 10 steps the run is projected (from the rate
    of steps 6-10), and if it
    would end past the deadline it stops there and returns None (the model is then half
    trained: discard it)."""
    if model.cfg.variant == "none":
        raise ValueError("model: needs a DMS variant ('borrowed' or 'adapter'); see convert_to_dms")
    dev = next(model.parameters()).device
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    model.train()
    groups, hooks, fixups = _param_groups(model, cfg)
    opt = torch.optim.AdamW(groups, betas=cfg.betas, fused=dev.type == "cuda")
    base_lrs = [g["lr"] for g in groups]
    use_amp = cfg.autocast and dev.type == "cuda"
    w = model.cfg.window
    use_flex = cfg.flex
    hist: List[dict] = []
    lam = cfg.hinge_weight
    bar = Progress(cfg.steps, desc, cfg.progress)
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        ids, weights = data(step)
        n = ids.shape[1]
        cr = cfg.cr_at(step)
        tgt = target_fraction(cr, n, w) if cfg.window_aware else target_fraction(cr)
        tgt = min(tgt + (cfg.target_margin if cr > 1 else 0.0), 1.0)
        scale = min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * scale
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp):
            with torch.no_grad():
                t_logits = teacher(ids, attention="causal")
            try:
                s_logits, aux = model(ids, attention="relaxed", tau=cfg.tau, flex=use_flex,
                                      generator=generator, return_aux=True)
            except Exception as e:  # noqa: BLE001  (FlexAttention compile / backend failure)
                if step > 0 or use_flex is False or dev.type != "cuda":
                    raise
                print(f"{desc}: FlexAttention failed ({type(e).__name__}: {e}); "
                      "falling back to dense masked attention", file=sys.stderr)
                use_flex = False
                s_logits, aux = model(ids, attention="relaxed", tau=cfg.tau, flex=False,
                                      generator=generator, return_aux=True)
        loss, parts = dms_loss(s_logits, t_logits, aux["z"], tgt, weights, lam)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.grad_clip)
        saved = [p.detach()[rows].clone() for p, rows, _ in fixups]
        opt.step()
        with torch.no_grad():
            for (p, rows, ratio), old in zip(fixups, saved):
                p[rows] = old + (p[rows] - old) * ratio
        with torch.no_grad():
            ev = torch.cat([l[:, 1:].reshape(-1) > 0 for l in aux["logits"]]).float().mean().item()
        hw = lam
        if cfg.hinge_adapt > 0:
            lam = max(cfg.hinge_weight, lam + cfg.hinge_adapt * (tgt - ev))
        old = max(n - w - 1, 0)
        live = old * (1 - ev) + min(n, w + 1)
        if step == 0 and use_flex is None:
            use_flex = dev.type == "cuda"
        rec = {"step": step + 1, "loss": float(loss.detach()), **parts, "target_cr": cr,
               "target": tgt, "evict_hard": ev, "cr_est": n / live, "grad_norm": float(gn),
               "hinge_weight": hw, "lr": opt.param_groups[0]["lr"],
               "seconds": time.perf_counter() - t0}
        hist.append(rec)
        bar.update(1, kl=rec["kl"], d=rec["decisions"], cr=rec["cr_est"], tgt=cr)
        if step == 4:
            t5 = time.perf_counter()              # after compilation / warm-up
        if deadline is not None and step == 9 and step + 1 < cfg.steps:
            now = time.perf_counter()
            if now + (now - t5) / 5 * (cfg.steps - step - 1) > deadline:
                bar.close()
                for h in hooks:
                    h.remove()
                return None
        if ckpt_dir and cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0 and step + 1 < cfg.steps:
            model.save_pretrained(os.path.join(ckpt_dir, f"step{step + 1}"))
    bar.close()
    for h in hooks:
        h.remove()
    model.merge_lora()
    model.eval()
    if ckpt_dir:
        model.save_pretrained(ckpt_dir)
    return hist


def write_log(hist: Sequence[dict], path: str) -> None:
    """TSV of the history (one row per step)."""
    if not hist:
        return
    keys = list(hist[0])
    with open(path, "w") as f:
        f.write("\t".join(keys) + "\n")
        for r in hist:
            f.write("\t".join(f"{r[k]:.6g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + "\n")


def plot_history(runs: Dict[str, Sequence[dict]], path: str) -> bool:
    """PNG of the curves (pretraining loss / accuracy; per retrofit run KL, compression vs
    target, hinge and evicted fraction); False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(1, 4, figsize=(20, 4))
    for name, hist in runs.items():
        if not hist:
            continue
        s = [r["step"] for r in hist]
        if "kl" not in hist[0]:                      # a pretraining history: loss + accuracy
            ax[0].plot(s, [r["loss"] for r in hist], label=f"{name} loss", lw=0.8)
            if "acc" in hist[0]:
                ax0b = ax[0].twinx()
                ax0b.plot(s, [r["acc"] for r in hist], color="tab:green", lw=0.6,
                          label=f"{name} accuracy")
                ax0b.set_ylim(0, 1.02)
                ax0b.legend(fontsize=7, loc="center right")
            continue
        ax[1].plot(s, [r["kl"] for r in hist], label=f"{name} KL", lw=0.8)
        ax[2].plot(s, [r["cr_est"] for r in hist], label=f"{name} CR (l > 0)", lw=0.8)
        ax[2].plot(s, [r["target_cr"] for r in hist], "--", label=f"{name} target", lw=0.8)
        ax[3].plot(s, [r["hinge"] for r in hist], label=f"{name} hinge", lw=0.8)
        ax[3].plot(s, [r["evict_hard"] for r in hist], ":", label=f"{name} evicted fraction", lw=0.8)
    ax[0].set_yscale("log")
    ax[1].set_yscale("log")
    ax[0].set_title("pretraining: loss (log) and answer accuracy")
    ax[1].set_title("retrofit: KL(student || teacher)")
    ax[2].set_title("retrofit: compression ratio")
    ax[3].set_title("retrofit: hinge and evicted fraction")
    for a in ax:
        a.set_xlabel("step")
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- evaluation

class _Tally:
    """Answers right over answers asked (greedy next token at the answer positions), summed
    over the batches of a task, and the seconds since it was made."""

    def __init__(self):
        self.right = self.total = 0
        self.t0 = time.perf_counter()

    def add(self, logits: torch.Tensor, task: Recall, first: int = 0) -> None:
        """logits [b, >= n - 1 - first, V]: position j predicts the token at first + j + 1."""
        n = task.ids.shape[1]
        pred = logits[:, :n - 1 - first].argmax(-1)
        m = task.answer[:, first:n - 1]
        self.right += int((pred == task.ids[:, first + 1:])[m].sum())
        self.total += int(m.sum())

    @property
    def acc(self) -> float:
        return self.right / max(self.total, 1)

    def result(self, **more) -> Dict[str, float]:
        return {"acc": self.acc, **more, "seconds": time.perf_counter() - self.t0}


def _batches(task: Recall, batch: int):
    """The task's sequences, ``batch`` at a time, as tasks of their own."""
    for i in range(0, task.ids.shape[0], batch):
        yield Recall(task.ids[i:i + batch], task.answer[i:i + batch], task.prefix)


@torch.no_grad()
def accuracy_dense(model: DMSForCausalLM, task: Recall, attention: str = "causal",
                   batch: int = 16) -> float:
    """Fraction of answers right (greedy next token at the answer positions), dense forward."""
    model.eval()
    dev = next(model.parameters()).device
    tally = _Tally()
    for sub in _batches(task, batch):
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            logits = model(sub.ids, attention=attention)
        tally.add(logits.float(), sub)
    return tally.acc


@torch.no_grad()
def accuracy_cache(model: DMSForCausalLM, task: Recall, *, batch: int = 16, block_size: int = 64,
                   dtype: Optional[torch.dtype] = None, device=None,
                   use_kernel: bool = True) -> Dict[str, float]:
    """Through ``DMSCache``: prefill the context in one chunk per sequence (packed), then decode
    the query part one token per step. Returns acc, cr (tokens / live tokens at the end, over
    layers, heads and sequences), live (mean live tokens per head at the end), live_max."""
    from .cache import DMSCache
    model.eval()
    mdev = next(model.parameters()).device
    cdev = torch.device(device) if device is not None else mdev
    if dtype is None:
        dtype = torch.bfloat16 if cdev.type == "cuda" else torch.float32
    c = model.cfg
    n = task.ids.shape[1]
    p = task.prefix
    tally = _Tally()
    live_sum = live_cnt = live_max = 0
    for sub in _batches(task, batch):
        ids = sub.ids
        b = ids.shape[0]
        blocks = b * c.kv_heads * (-(-n // block_size)) + b * c.kv_heads
        cache = DMSCache(c.layers, c.kv_heads, c.head_dim, window=c.window, block_size=block_size,
                         num_blocks=blocks, max_seqs=b, dtype=dtype, device=cdev)
        sids = [cache.add_sequence() for _ in range(b)]
        cu = torch.arange(b + 1, dtype=torch.int32) * p
        flat = ids[:, :p].reshape(-1)
        pos = torch.arange(p, device=mdev).repeat(b)
        with torch.autocast(device_type=mdev.type, dtype=torch.bfloat16, enabled=mdev.type == "cuda"):
            out = [model.forward_cache(cache, sids, cu, flat, pos, use_kernel).view(b, p, -1)[:, -1:]]
            step_cu = torch.arange(b + 1, dtype=torch.int32)
            for t in range(p, n - 1):
                tok = ids[:, t]
                pos_t = torch.full((b,), t, device=mdev, dtype=torch.long)
                out.append(model.forward_cache(cache, sids, step_cu, tok, pos_t, use_kernel)[:, None])
        # out[j] predicts token p + j (j = 0 from the prefill's last position, p - 1).
        tally.add(torch.cat(out, dim=1), sub, first=p - 1)
        for layer in range(c.layers):
            for s in sids:
                lv = cache.live_tokens(layer, s)
                live_sum += int(lv.sum())
                live_cnt += lv.numel()
                live_max = max(live_max, int(lv.max()))
    live = live_sum / max(live_cnt, 1)
    return tally.result(cr=n / live, live=live, live_max=live_max)


@torch.no_grad()
def _heuristic_steps(model: DMSForCausalLM, hc: HeuristicCache, ids: torch.Tensor, lo: int,
                     hi: int) -> List[torch.Tensor]:
    """Logits of the one-token steps t = lo .. hi - 1 (each evicts as its policy says). On CUDA
    the step is captured once in a CUDA graph and replayed (it reads no host value of the
    position: the cache keeps it on the device), a few hundred launches per step fewer; on the
    CPU, or for fewer than 3 steps, eager."""
    if not ids.is_cuda or hi - lo < 3:
        return _eager_steps(model, hc, ids, lo, hi)
    hc.static = True
    try:
        return _graph_steps(model, hc, ids, lo, hi)
    finally:
        hc.static = False


def _eager_steps(model, hc, ids, lo, hi):
    return [model.forward_heuristic(hc, ids[:, t:t + 1]) for t in range(lo, hi)]


def _graph_steps(model, hc, ids, lo, hi):
    out = []
    # The first step runs eagerly on a side stream (warm-up before capture: cuBLAS handles,
    # autocast), the capture then records one step without running it.
    side = torch.cuda.Stream(ids.device)
    side.wait_stream(torch.cuda.current_stream(ids.device))
    with torch.cuda.stream(side):
        out.append(model.forward_heuristic(hc, ids[:, lo:lo + 1]))
    torch.cuda.current_stream(ids.device).wait_stream(side)
    step_ids = ids[:, lo + 1:lo + 2].clone()
    graph = torch.cuda.CUDAGraph()
    length = hc.length
    try:
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, cache_enabled=False):
            with torch.cuda.graph(graph):
                step_out = model.forward_heuristic(hc, step_ids)
    except RuntimeError as e:  # nothing ran during the capture: the same steps, eagerly
        warnings.warn(f"accuracy_heuristic: CUDA-graph capture failed ({e}); eager steps")
        hc.length = length
        return out + _eager_steps(model, hc, ids, lo + 1, hi)
    hc.length = length                     # the capture ran advance() on the host only
    for t in range(lo + 1, hi):
        step_ids.copy_(ids[:, t:t + 1])
        graph.replay()
        out.append(step_out.clone())
    hc.length = hi
    return out


@torch.no_grad()
def accuracy_heuristic(model: DMSForCausalLM, task: Recall, policy: str, budget: int, *,
                       batch: int = 16, recent: Optional[int] = None) -> Dict[str, float]:
    """Training-free eviction at ``budget`` live tokens per (sequence, KV head), plain torch:
    the first ``budget`` tokens are one dense chunk (nothing to evict yet), then one token per
    step with eviction, queries included."""
    model.eval()
    dev = next(model.parameters()).device
    c = model.cfg
    n = task.ids.shape[1]
    tally = _Tally()
    live_max = 0
    for sub in _batches(task, batch):
        ids = sub.ids
        hc = HeuristicCache(policy, budget, c.layers, ids.shape[0], c.kv_heads, c.heads,
                            c.head_dim, n, dev,
                            dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32,
                            recent=recent)
        first = min(budget, n)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            out = [model.forward_heuristic(hc, ids[:, :first])]
            out += _heuristic_steps(model, hc, ids, first, n - 1)
        live_max = max(live_max, max(int(hc.live(layer).max()) for layer in range(c.layers)))
        tally.add(torch.cat(out, dim=1), sub)                  # positions 0 .. n-2 (or n-1)
    return tally.result(budget=budget, live_max=live_max)
