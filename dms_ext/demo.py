"""End-to-end demo: a small random Qwen3-shaped decoder generating through DMSCache.

    python -m dms_ext.demo [--layers 4] [--prompt-len 512] [--new-tokens 64] [--window 64]
                           [--device cuda|cpu] [--seed 0]

No downloads: the model is built from a config with random weights. Its borrowed query channel
(SPEC section 2) is biased so that about --evict-rate of the eviction logits are positive, so the
cache really evicts; the demo prints how much each layer keeps and what that saves.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import nn
import torch.nn.functional as F

from .cache import DMSCache


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


def rope_cos_sin(max_position: int, head_dim: int, theta: float) -> torch.Tensor:
    """float32 [max_position, D]: D/2 cos values then D/2 sin values (rotate-half RoPE)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = torch.arange(max_position, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat([ang.cos(), ang.sin()], dim=1).to(torch.float32)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


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
        self.register_buffer("cos_sin", rope_cos_sin(cfg.max_position, cfg.head_dim, cfg.rope_theta),
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


@torch.no_grad()
def generate(model: TinyQwen3, cache: DMSCache, prompts: List[torch.Tensor], new_tokens: int):
    """Greedy decoding of several prompts at once. Returns (seq_ids, generated ids [n, new],
    prefill seconds, decode seconds)."""
    dev = cache.device
    seq_ids = [cache.add_sequence() for _ in prompts]
    lens = [len(p) for p in prompts]
    cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    ids = torch.cat(prompts).to(dev)
    pos = torch.cat([torch.arange(n, dtype=torch.int32) for n in lens]).to(dev)
    _sync(dev)
    t0 = time.perf_counter()
    nxt = model(cache, seq_ids, cu, ids, pos).argmax(-1)
    _sync(dev)
    t1 = time.perf_counter()
    out = [nxt]
    step_cu = torch.arange(len(prompts) + 1, dtype=torch.int32)
    pos = torch.tensor(lens, dtype=torch.int32, device=dev)
    for _ in range(new_tokens - 1):
        nxt = model(cache, seq_ids, step_cu, nxt, pos).argmax(-1)
        out.append(nxt)
        pos = pos + 1
    _sync(dev)
    t2 = time.perf_counter()
    return seq_ids, torch.stack(out, 1).cpu(), t1 - t0, t2 - t1


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dms_ext.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1, help="prompts decoded together")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--evict-rate", type=float, default=0.8,
                    help="fraction of positive eviction logits the random model aims for")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    for name in ("layers", "prompt_len", "new_tokens", "window", "batch", "block_size"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")

    import dms_ext  # noqa: F401  (loads the op library)

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(a.seed)
    cfg = TinyConfig(num_layers=a.layers, evict_rate=a.evict_rate,
                     max_position=max(8192, a.prompt_len + a.new_tokens))
    model = TinyQwen3(cfg).to(device=device, dtype=dtype)
    model.cos_sin = model.cos_sin.float()
    total = a.prompt_len + a.new_tokens
    blocks_per_head = -(-total // a.block_size)
    cache = model.new_cache(window=a.window, block_size=a.block_size,
                            num_blocks=a.batch * cfg.num_kv_heads * blocks_per_head,
                            max_seqs=a.batch, device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(a.seed)
    prompts = [torch.randint(cfg.vocab_size, (a.prompt_len,), generator=gen) for _ in range(a.batch)]

    print(f"dms_ext demo: {cfg.num_layers} layers, Hq {cfg.num_q_heads}, Hkv {cfg.num_kv_heads}, "
          f"D {cfg.head_dim}, window {a.window}, block {a.block_size}, {device}, {dtype}")
    seq_ids, out, t_pre, t_dec = generate(model, cache, prompts, a.new_tokens)
    print(f"prefill: {a.batch} x {a.prompt_len} tokens in {t_pre:.3f} s "
          f"({a.batch * a.prompt_len / t_pre:.0f} tok/s)")
    steps = max(a.new_tokens - 1, 1)
    print(f"decode:  {a.batch} x {a.new_tokens} tokens, {a.batch * steps / max(t_dec, 1e-9):.1f} tok/s "
          f"({1e3 * t_dec / steps:.2f} ms/step)")
    print("first tokens:", out[0, :16].tolist())
    # The last generated token has not been run through the model, so it is not cached yet.
    for line in report(cache, seq_ids, [total - 1] * a.batch):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
