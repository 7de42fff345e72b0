"""End-to-end demo: a small random Qwen3-shaped decoder generating through DMSCache.

    python -m dms_ext.demo [--layers 4] [--prompt-len 256] [--new-tokens 256] [--window 64]
                           [--batch 1] [--device cuda|cpu] [--plot out.png] [--seed 0]
    python -m dms_ext.demo --model path/to/qwen3-dms-checkpoint [--prompt "text"]

No downloads: by default the model is built from a config with random weights. Its borrowed
query channel (SPEC section 2) is biased so that about --evict-rate of the eviction logits are
positive, so the cache really evicts. --model runs a local transformers Qwen3 / Llama DMS
checkpoint through dms_ext.hf instead. The demo shows a progress bar and tokens/s, prints how much
each layer keeps and what that saves against a dense cache, and writes a PNG of the live tokens
of every (layer, KV head) of the first sequence over the generated steps.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import struct
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import nn
import torch.nn.functional as F

from .cache import DMSCache
from .models import RMSNorm
from .reference import rope_cache


@dataclass
class TinyConfig:
    vocab_size: int = 4096
    num_layers: int = 4
    num_q_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 1024
    rope_theta: float = 1_000_000.0
    rms_eps: float = 1e-6
    max_position: int = 8192
    alpha_scale: float = 100.0   # borrowed-neuron logit = q[g*G, D-1] * alpha_scale - alpha_offset
    alpha_offset: float = 5.0
    evict_rate: float = 0.8      # wanted fraction of positive logits (random model only)

    @property
    def hidden_size(self) -> int:
        return self.num_q_heads * self.head_dim


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.cfg = cfg
        self.input_layernorm = RMSNorm(h, cfg.rms_eps)
        self.q_proj = nn.Linear(h, cfg.num_q_heads * d, bias=False)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_q_heads * d, h, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_eps)
        self.k_norm = RMSNorm(d, cfg.rms_eps)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_eps)
        self.gate_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, h, bias=False)
        # A trained DMS model learns when to flag a token; a random one would flag about half
        # of them at random, or none (logit = x * 100 - 5 needs x > 0.05). A constant offset on
        # the borrowed channel (before q_norm; channels are ~N(0, 1) there) sets the rate.
        g = cfg.num_q_heads // cfg.num_kv_heads
        bias = torch.zeros(cfg.num_q_heads, d)
        shift = statistics.NormalDist().inv_cdf(min(max(cfg.evict_rate, 1e-4), 1 - 1e-4))
        bias[::g, d - 1] = shift + cfg.alpha_offset / cfg.alpha_scale
        self.register_buffer("borrowed_bias", bias.reshape(-1), persistent=False)

    def forward(self, x, cache: DMSCache, layer: int, seq_ids, cu_seqlens, positions, cos_sin):
        cfg, T = self.cfg, x.shape[0]
        hin = self.input_layernorm(x)
        q = (self.q_proj(hin) + self.borrowed_bias.to(x.dtype)).view(T, cfg.num_q_heads, cfg.head_dim)
        k = self.k_proj(hin).view(T, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(hin).view(T, cfg.num_kv_heads, cfg.head_dim)
        q, k = q.contiguous(), k.contiguous()
        # q/k RMSNorm, borrowed-neuron logits, channel zeroing and RoPE in one op (in place).
        logits = torch.ops.dms.eviction_rope(q, k, positions, cos_sin, cfg.alpha_scale,
                                             cfg.alpha_offset, self.q_norm.weight, self.k_norm.weight,
                                             cfg.rms_eps)
        att = cache.attend(layer, seq_ids, cu_seqlens, q, k, v.contiguous(), logits)
        x = x + self.o_proj(att.reshape(T, -1))
        hmid = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(hmid)) * self.up_proj(hmid))


class TinyQwen3(nn.Module):
    """Qwen3-shaped decoder (q/k norm, GQA, SwiGLU) whose attention is DMSCache."""

    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("cos_sin", rope_cache(cfg.max_position, cfg.head_dim, cfg.rope_theta),
                             persistent=False)
        self._init_weights()

    def _init_weights(self):
        for name, p in self.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                # Unit-variance outputs per channel, which the borrowed-channel bias assumes.
                nn.init.normal_(p, std=1.0 / math.sqrt(p.shape[1]) if "embed" not in name else 1.0)

    def new_cache(self, *, window: int, block_size: int, num_blocks: int, max_seqs: int,
                  device, dtype) -> DMSCache:
        c = self.cfg
        return DMSCache(c.num_layers, c.num_kv_heads, c.head_dim, window=window,
                        block_size=block_size, num_blocks=num_blocks, max_seqs=max_seqs,
                        dtype=dtype, device=device)

    @torch.no_grad()
    def forward(self, cache: DMSCache, seq_ids: Sequence[int], cu_seqlens: torch.Tensor,
                input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Packed chunks in, next-token logits of the last token of each chunk out [n, vocab]."""
        cos_sin = self.cos_sin.to(torch.float32)
        x = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, cache, i, seq_ids, cu_seqlens, positions, cos_sin)
        last = cu_seqlens[1:].to(torch.long).to(x.device) - 1
        return self.lm_head(self.norm(x.index_select(0, last))).float()


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- runners

class _TinyRunner:
    """The embedded model over a DMSCache: packed chunks, positions kept per sequence."""

    def __init__(self, model: TinyQwen3, cache: DMSCache):
        self.model, self.dms, self.pos = model, cache, {}

    def add(self) -> int:
        sid = self.dms.add_sequence()
        self.pos[sid] = 0
        return sid

    def forward(self, seq_ids: List[int], ids: torch.Tensor, counts: List[int]) -> torch.Tensor:
        dev = self.dms.device
        cu = torch.tensor([0] + list(counts), dtype=torch.int32).cumsum(0, dtype=torch.int32)
        pos = torch.cat([torch.arange(self.pos[s], self.pos[s] + c, dtype=torch.int32)
                         for s, c in zip(seq_ids, counts)]).to(dev, non_blocking=True)
        for s, c in zip(seq_ids, counts):
            self.pos[s] += c
        return self.model(self.dms, seq_ids, cu, ids, pos)


class _HFRunner:
    """A transformers checkpoint patched by dms_ext.hf, over its DMSCacheHF."""

    def __init__(self, model, cache):
        self.model, self.hfc, self.dms = model, cache, cache.dms

    def add(self) -> int:
        return self.hfc.add_sequence()

    def forward(self, seq_ids: List[int], ids: torch.Tensor, counts: List[int]) -> torch.Tensor:
        last = torch.tensor(counts).cumsum(0).to(ids.device) - 1
        self.hfc.set_packed(seq_ids, counts)
        out = self.model(input_ids=ids[None], past_key_values=self.hfc, use_cache=True,
                         logits_to_keep=last)
        return out.logits[0].float()


class _Progress:
    """One-line progress bar on stderr (a line per 10% when stderr is not a terminal)."""

    def __init__(self, total: int, enabled: bool, width: int = 30):
        self.total, self.enabled, self.width = max(total, 1), enabled, width
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.shown = -1

    def update(self, done: int, tokens: int) -> None:
        if not self.enabled:
            return
        tenth = 10 * done // self.total
        if not self.tty and tenth == self.shown and done != self.total:
            return
        self.shown = tenth
        dt = max(time.perf_counter() - self.t0, 1e-9)
        fill = self.width * done // self.total
        line = (f"decode [{'#' * fill}{'.' * (self.width - fill)}] {done}/{self.total} steps "
                f"{tokens / dt:8.1f} tok/s")
        sys.stderr.write(("\r" + line) if self.tty else (line + "\n"))
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


@dataclass
class Run:
    seq_ids: List[int]
    tokens: torch.Tensor          # [n, new_tokens] generated ids (CPU)
    prefill_s: float
    decode_s: float
    history: torch.Tensor         # [steps + 1, layers, Hkv] live tokens of the first sequence
    dense_history: List[int]      # tokens the first sequence holds in a dense cache, per entry


@torch.no_grad()
def generate(runner, prompts: List[torch.Tensor], new_tokens: int,
             progress: bool = False) -> Run:
    """Greedy decoding of several prompts at once (one packed prefill, then one token per
    sequence per step). Records the live tokens of every (layer, KV head) of the first sequence
    after the prefill and after every step, on the device (no sync per step)."""
    cache = runner.dms
    dev = cache.device
    seq_ids = [runner.add() for _ in prompts]
    lens = [len(p) for p in prompts]
    ids = torch.cat(prompts).to(dev)
    layers = range(cache.num_layers)

    def snapshot():
        return torch.stack([cache.live_tokens(layer, seq_ids[0]) for layer in layers])

    _sync(dev)
    t0 = time.perf_counter()
    nxt = runner.forward(seq_ids, ids, lens).argmax(-1)
    hist = [snapshot()]
    _sync(dev)
    t1 = time.perf_counter()
    out = [nxt]
    bar = _Progress(new_tokens - 1, progress)
    ones = [1] * len(prompts)
    for step in range(new_tokens - 1):
        nxt = runner.forward(seq_ids, nxt, ones).argmax(-1)
        out.append(nxt)
        hist.append(snapshot())
        bar.update(step + 1, (step + 1) * len(prompts))
    _sync(dev)
    t2 = time.perf_counter()
    bar.close()
    dense = [lens[0] + i for i in range(len(hist))]
    return Run(seq_ids, torch.stack(out, 1).cpu(), t1 - t0, t2 - t1,
               torch.stack(hist).cpu(), dense)


def report(cache: DMSCache, seq_ids: Sequence[int], tokens_per_seq: Sequence[int]) -> List[str]:
    """Per-layer compression and live KV bytes against a dense cache of the same tokens."""
    elt = torch.tensor([], dtype=cache.dtype).element_size()
    per_tok = 2 * cache.head_dim * elt   # K and V of one head
    dense_tokens = sum(tokens_per_seq) * cache.num_kv_heads
    # Counts are (token, KV head) pairs: what a dense cache stores against what DMS keeps.
    lines = [f"{'layer':>5} {'tokens':>8} {'live':>8} {'CR':>6} {'live KV':>10} {'dense KV':>10}"]
    tot_live = 0
    for layer in range(cache.num_layers):
        live = sum(int(cache.live_tokens(layer, s).sum()) for s in seq_ids)
        tot_live += live
        lines.append(f"{layer:>5} {dense_tokens:>8} {live:>8} {dense_tokens / max(live, 1):>6.2f} "
                     f"{_mib(live * per_tok):>10} {_mib(dense_tokens * per_tok):>10}")
    dense_all = dense_tokens * cache.num_layers
    lines.append(f"{'all':>5} {dense_all:>8} {tot_live:>8} {dense_all / max(tot_live, 1):>6.2f} "
                 f"{_mib(tot_live * per_tok):>10} {_mib(dense_all * per_tok):>10}")
    used = cache.num_layers * cache.num_blocks - cache.num_free_blocks
    lines.append(f"blocks in use: {used} of {cache.num_layers * cache.num_blocks} "
                 f"({_mib(used * cache.block_size * per_tok)} incl. partly filled blocks)")
    return lines


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.3f} MiB"


# ----------------------------------------------------------------------------- the plot

def plot_history(path: str, history: torch.Tensor, dense: Sequence[int], title: str) -> str:
    """PNG of live tokens per (layer, KV head) over the steps, with the dense count for scale.
    matplotlib when it is installed, else a small built-in PNG writer (no dependency)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _plot_builtin(path, history, dense, title)
        return "built-in PNG writer"
    steps = list(range(history.shape[0]))
    fig, ax = plt.subplots(figsize=(9, 5), dpi=100)
    ax.plot(steps, dense, color="0.5", lw=2.5, label="dense cache")
    cmap = plt.get_cmap("tab10")
    for layer in range(history.shape[1]):
        for h in range(history.shape[2]):
            ax.plot(steps, history[:, layer, h].tolist(), color=cmap(layer % 10), lw=1,
                    alpha=0.9, label=f"layer {layer}" if h == 0 else None)
    ax.set_xlabel("generated step")
    ax.set_ylabel("live tokens per KV head")
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return "matplotlib"


# 3x5 pixel glyphs, rows top to bottom, for the built-in writer's labels.
_FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111",
    "3": "111001111001111", "4": "101101111001001", "5": "111100111001111",
    "6": "111100111101111", "7": "111001001001001", "8": "111101111101111",
    "9": "111101111001111", "A": "010101111101101", "B": "110101110101110",
    "C": "011100100100011", "D": "110101101101110", "E": "111100110100111",
    "F": "111100110100100", "G": "011100101101011", "H": "101101111101101",
    "I": "111010010010111", "J": "001001001101010", "K": "101101110101101",
    "L": "100100100100111", "M": "101111111101101", "N": "110101101101101",
    "O": "010101101101010", "P": "110101110100100", "Q": "010101101110011",
    "R": "110101110101101", "S": "011100010001110", "T": "111010010010010",
    "U": "101101101101111", "V": "101101101101010", "W": "101101111111101",
    "X": "101101010101101", "Y": "101101010010010", "Z": "111001010100111",
    " ": "000000000000000", "(": "010100100100010", ")": "010001001001010",
    ".": "000000000000010", ",": "000000000010100", "-": "000000111000000",
    "/": "001001010100100", ":": "000010000010000", "=": "000111000111000",
}
_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207), (127, 127, 127)]


class _Canvas:
    def __init__(self, w: int, h: int):
        self.w, self.h = w, h
        self.px = bytearray(b"\xff" * (w * h * 3))

    def dot(self, x: int, y: int, c, r: int = 0) -> None:
        for yy in range(y - r, y + r + 1):
            for xx in range(x - r, x + r + 1):
                if 0 <= xx < self.w and 0 <= yy < self.h:
                    i = 3 * (yy * self.w + xx)
                    self.px[i:i + 3] = bytes(c)

    def line(self, x0, y0, x1, y1, c, r: int = 0) -> None:
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            self.dot(x0, y0, c, r)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def text(self, x: int, y: int, s: str, c=(0, 0, 0), scale: int = 2) -> None:
        for ch in s.upper():
            g = _FONT.get(ch, _FONT[" "])
            for i, bit in enumerate(g):
                if bit == "1":
                    for dy in range(scale):
                        for dx in range(scale):
                            self.dot(x + (i % 3) * scale + dx, y + (i // 3) * scale + dy, c)
            x += 4 * scale

    def save(self, path: str) -> None:
        row = 3 * self.w
        raw = b"".join(b"\x00" + bytes(self.px[y * row:(y + 1) * row]) for y in range(self.h))

        def chunk(tag: bytes, data: bytes) -> bytes:
            return (struct.pack(">I", len(data)) + tag + data
                    + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

        with open(path, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n"
                    + chunk(b"IHDR", struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0))
                    + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def _nice_ticks(vmax: float, n: int = 5) -> List[int]:
    raw = max(vmax, 1) / n
    mag = 10 ** int(math.floor(math.log10(raw)))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    return [int(i * step) for i in range(int(vmax // step) + 1)]


def _plot_builtin(path: str, history: torch.Tensor, dense: Sequence[int], title: str) -> None:
    W, H, L, R, T, B = 900, 500, 80, 20, 50, 60
    cv = _Canvas(W, H)
    S = history.shape[0]
    ymax = max(max(dense), int(history.max())) * 1.05
    px = lambda i: L + round((W - L - R) * i / max(S - 1, 1))  # noqa: E731
    py = lambda v: H - B - round((H - T - B) * v / ymax)  # noqa: E731
    grid, ink = (225, 225, 225), (0, 0, 0)
    for v in _nice_ticks(ymax):
        cv.line(L, py(v), W - R, py(v), grid)
        lab = str(v)
        cv.text(L - 8 - 8 * len(lab), py(v) - 5, lab)
    for i in _nice_ticks(S - 1, 6):
        cv.line(px(i), H - B, px(i), H - B + 5, ink)
        lab = str(i)
        cv.text(px(i) - 4 * len(lab), H - B + 10, lab)
    cv.line(L, T, L, H - B, ink)
    cv.line(L, H - B, W - R, H - B, ink)
    for i in range(S - 1):
        cv.line(px(i), py(dense[i]), px(i + 1), py(dense[i + 1]), (150, 150, 150), 1)
    for layer in range(history.shape[1]):
        c = _PALETTE[layer % len(_PALETTE)]
        for h in range(history.shape[2]):
            v = history[:, layer, h].tolist()
            for i in range(S - 1):
                cv.line(px(i), py(v[i]), px(i + 1), py(v[i + 1]), c)
    cv.text(L, 15, title)
    cv.text(L + (W - L - R) // 2 - 80, H - 25, "GENERATED STEP")
    x = W - R - 10
    for layer in reversed(range(history.shape[1])):
        lab = f"L{layer}"
        x -= 8 * len(lab) + 22
        cv.line(x, T + 12, x + 12, T + 12, _PALETTE[layer % len(_PALETTE)], 1)
        cv.text(x + 16, T + 7, lab)
    x -= 8 * 5 + 22
    cv.line(x, T + 12, x + 12, T + 12, (150, 150, 150), 1)
    cv.text(x + 16, T + 7, "DENSE")
    cv.save(path)


# ----------------------------------------------------------------------------- main

def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dms_ext.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None,
                    help="local Qwen3/Llama DMS checkpoint folder (needs transformers); default: "
                         "the embedded random model")
    ap.add_argument("--prompt", default=None, help="text prompt (--model with a tokenizer only)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden-heads", type=int, default=8, help="query heads of the embedded model")
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1, help="prompts decoded together")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--evict-rate", type=float, default=0.8,
                    help="fraction of positive eviction logits the random model aims for")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default=os.path.join(tempfile.gettempdir(), "dms_live_tokens.png"),
                    help="PNG of live tokens per head over the steps ('' for none)")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    a = ap.parse_args(argv)
    for name in ("layers", "prompt_len", "new_tokens", "window", "batch", "block_size",
                 "hidden_heads", "kv_heads", "head_dim"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.hidden_heads % a.kv_heads or a.head_dim % 2:
        ap.error("--hidden-heads must be a multiple of --kv-heads and --head-dim even")

    import dms_ext  # noqa: F401  (loads the op library)

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    total = a.prompt_len + a.new_tokens
    prompts = None
    if a.model:
        from . import hf
        model = hf.load_dms_model(a.model, dtype=dtype, device=device)
        c = model.config
        vocab = c.vocab_size
        if a.prompt is not None:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(a.model, local_files_only=True)
            prompts = [torch.tensor(tok(a.prompt)["input_ids"]) for _ in range(a.batch)]
            total = len(prompts[0]) + a.new_tokens
        hfc = hf.DMSCacheHF.from_model(model, max_seqs=a.batch, max_tokens=total,
                                       block_size=a.block_size)
        runner = _HFRunner(model, hfc)
        desc = (f"{a.model}: {c.num_hidden_layers} layers, Hq {c.num_attention_heads}, Hkv "
                f"{c.num_key_value_heads}, window {hfc.dms.window}, variant "
                f"{hf.dms_settings(c).variant}")
    else:
        cfg = TinyConfig(num_layers=a.layers, num_q_heads=a.hidden_heads, num_kv_heads=a.kv_heads,
                         head_dim=a.head_dim, evict_rate=a.evict_rate,
                         max_position=max(8192, total))
        model = TinyQwen3(cfg).to(device=device, dtype=dtype)
        model.cos_sin = model.cos_sin.float()
        vocab = cfg.vocab_size
        blocks_per_head = -(-total // a.block_size)
        cache = model.new_cache(window=a.window, block_size=a.block_size,
                                num_blocks=a.batch * cfg.num_kv_heads * blocks_per_head,
                                max_seqs=a.batch, device=device, dtype=dtype)
        runner = _TinyRunner(model, cache)
        desc = (f"embedded random Qwen3-shaped model: {cfg.num_layers} layers, Hq "
                f"{cfg.num_q_heads}, Hkv {cfg.num_kv_heads}, D {cfg.head_dim}, window {a.window}")
    if prompts is None:
        prompts = [torch.randint(vocab, (a.prompt_len,), generator=gen) for _ in range(a.batch)]
    plen = len(prompts[0])
    cache = runner.dms
    print(f"dms_ext demo: {desc}, block {cache.block_size}, {device}, {dtype}")
    run = generate(runner, prompts, a.new_tokens, progress=a.progress)
    print(f"prefill: {a.batch} x {plen} tokens in {run.prefill_s:.3f} s "
          f"({a.batch * plen / run.prefill_s:.0f} tok/s)")
    steps = max(a.new_tokens - 1, 1)
    print(f"decode:  {a.batch} x {a.new_tokens} tokens, "
          f"{a.batch * steps / max(run.decode_s, 1e-9):.1f} tok/s ({1e3 * run.decode_s / steps:.2f} ms/step)")
    if a.model and a.prompt is not None:
        print("text:", tok.decode(run.tokens[0].tolist()))
    else:
        print("first tokens:", run.tokens[0, :16].tolist())
    # The last generated token has not been run through the model, so it is not cached yet.
    for line in report(cache, run.seq_ids, [plen + a.new_tokens - 1] * a.batch):
        print(line)
    if device.type == "cuda":
        print(f"peak GPU memory allocated: {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")
    if a.plot:
        how = plot_history(a.plot, run.history, run.dense_history,
                           "Live tokens per KV head, sequence 0")
        print(f"plot: {a.plot} ({run.history.shape[1]} layers x {run.history.shape[2]} KV heads "
              f"over {run.history.shape[0] - 1} steps; gray = dense cache; {how})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
