"""Training-free eviction baselines (sliding window, H2O, TOVA) at a fixed per-head budget."""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["HeuristicCache", "POLICIES"]

POLICIES = ("window", "h2o", "tova")


class HeuristicCache:
    """Dense per-head KV cache with a keep mask, for training-free eviction at a fixed budget of
    live tokens per (sequence, KV head); all sequences advance in lockstep.

    policy: "window" keeps the newest ``budget`` tokens; "h2o" (Zhang et al. 2023) keeps the
    ``recent`` newest tokens plus the heavy hitters with the largest attention accumulated over
    all queries so far (summed over the query heads of the group); "tova" (Oren et al. 2024)
    evicts, after each query, the token with the lowest attention of that query (mean over the
    group's query heads), the newest token included. Evictions happen one token per step as soon
    as a head holds more than ``budget``, so no head ever exceeds it after a step."""

    def __init__(self, policy: str, budget: int, num_layers: int, batch: int, kv_heads: int,
                 heads: int, head_dim: int, max_len: int, device, dtype=torch.float32,
                 recent: Optional[int] = None):
        if policy not in POLICIES:
            raise ValueError(f"policy: expected one of {POLICIES}, got {policy!r}")
        if budget < 1:
            raise ValueError(f"budget: expected >= 1, got {budget}")
        self.policy, self.budget = policy, int(budget)
        self.recent = max(1, budget // 2) if recent is None else int(recent)
        if policy == "h2o" and not 1 <= self.recent < self.budget + (self.budget == 1):
            raise ValueError(f"recent: expected 1 <= recent < budget, got {self.recent}")
        self.group = heads // kv_heads
        shape = (num_layers, batch, kv_heads, max_len)
        self.k = torch.zeros(*shape, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.keep = torch.zeros(shape, dtype=torch.bool, device=device)
        self.score = torch.zeros(shape, dtype=torch.float32, device=device)
        self.length = 0
        self.max_len = max_len

    def live(self, layer: int) -> torch.Tensor:
        """int64 [B, Hkv]: tokens held."""
        return self.keep[layer].sum(-1)

    def advance(self, t: int) -> None:
        self.length += t

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, T, Hq, D], k, v [B, T, Hkv, D] of the tokens at positions length..length+T-1."""
        b, t, hq, d = q.shape
        s0 = self.length
        if s0 + t > self.max_len:
            raise ValueError(f"q: cache of {self.max_len} positions is full")
        if t > 1 and s0 + t > self.budget:
            raise ValueError("q: a chunk of several tokens must fit in the budget; step one by one")
        kc, vc, keep, score = self.k[layer], self.v[layer], self.keep[layer], self.score[layer]
        kc[:, :, s0:s0 + t] = k.transpose(1, 2).to(kc.dtype)
        vc[:, :, s0:s0 + t] = v.transpose(1, 2).to(vc.dtype)
        keep[:, :, s0:s0 + t] = True
        n = s0 + t
        g = self.group
        qh = q.transpose(1, 2).to(kc.dtype).view(b, -1, g, t, d)          # [B, Hkv, G, T, D]
        s = torch.einsum("bkgtd,bknd->bkgtn", qh.float(), kc[:, :, :n].float()) * d ** -0.5
        vis = keep[:, :, None, None, :n].clone()
        if t > 1:
            pos = torch.arange(n, device=q.device)
            vis = vis & (pos[None, :] <= (s0 + torch.arange(t, device=q.device))[:, None])
        p = torch.softmax(s.masked_fill(~vis, float("-inf")), dim=-1)
        out = torch.einsum("bkgtn,bknd->bkgtd", p, vc[:, :, :n].float())
        score[:, :, :n] += p.sum(dim=(2, 3))
        if n > self.budget:
            self._evict(keep, score, p[:, :, :, -1].mean(dim=2), n)
        return out.reshape(b, hq, t, d).transpose(1, 2)

    def _evict(self, keep, score, last_p, n: int) -> None:
        inf = float("inf")
        live = keep[:, :, :n]
        if self.policy == "window":
            victim = live.to(torch.int8).argmax(dim=-1)                   # oldest held token
        elif self.policy == "h2o":
            cand = live.clone()
            cand[:, :, max(n - self.recent, 0):] = False
            victim = score[:, :, :n].masked_fill(~cand, inf).argmin(dim=-1)
        else:
            victim = last_p.masked_fill(~live, inf).argmin(dim=-1)
        keep.scatter_(2, victim[..., None], False)
