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
    as a head holds more than ``budget``, so no head ever exceeds it after a step.

    The position lives on the device too (``pos``, advanced by :meth:`advance`) and a step reads
    no host value of it, so a one-token step can be captured in a CUDA graph and replayed
    (:func:`dms_ext.retrofit.accuracy_heuristic` does). With ``static`` set (for the capture)
    ``attend`` covers all ``max_len`` positions (those not written yet are not held, so masked),
    else the ``length + T`` written so far: the same results. ``length`` is the host's count;
    after replays the caller sets it."""

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
        self.pos = torch.zeros((), dtype=torch.long, device=device)    # == length, on the device
        self.static = False
        self.max_len = max_len
        self._arange = torch.arange(max_len, device=device)

    def live(self, layer: int) -> torch.Tensor:
        """int64 [B, Hkv]: tokens held."""
        return self.keep[layer].sum(-1)

    def advance(self, t: int) -> None:
        self.length += t
        self.pos += t

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, T, Hq, D], k, v [B, T, Hkv, D] of the tokens at positions length..length+T-1."""
        b, t, hq, d = q.shape
        s0 = self.length
        if s0 + t > self.max_len:
            raise ValueError(f"q: cache of {self.max_len} positions is full")
        if t > 1 and s0 + t > self.budget:
            raise ValueError("q: a chunk of several tokens must fit in the budget; step one by one")
        n = self.max_len if self.static else s0 + t            # positions attended over
        kc, vc, keep, score = self.k[layer], self.v[layer], self.keep[layer], self.score[layer]
        idx = self.pos + self._arange[:t]                      # the new tokens' positions
        kc.index_copy_(2, idx, k.transpose(1, 2).to(kc.dtype))
        vc.index_copy_(2, idx, v.transpose(1, 2).to(vc.dtype))
        keep.index_fill_(2, idx, True)
        g = self.group
        qh = q.transpose(1, 2).to(kc.dtype).view(b, -1, g, t, d)          # [B, Hkv, G, T, D]
        s = torch.einsum("bkgtd,bknd->bkgtn", qh.float(), kc[:, :, :n].float()) * d ** -0.5
        # Held and not after the query (within a chunk: causal).
        vis = keep[:, :, None, None, :n] & (self._arange[:n] <= idx[:, None])
        p = torch.softmax(s.masked_fill(~vis, float("-inf")), dim=-1)
        out = torch.einsum("bkgtn,bknd->bkgtd", p, vc[:, :, :n].float())
        score[:, :, :n] += p.sum(dim=(2, 3))
        if t == 1:  # a chunk fits in the budget (checked above): only single steps evict
            self._evict(keep[:, :, :n], score[:, :, :n], p[:, :, :, -1].mean(dim=2), idx[-1] + 1)
        return out.reshape(b, hq, t, d).transpose(1, 2)

    def _evict(self, live, score, last_p, held) -> None:
        """One eviction per (sequence, head) where ``held`` (a device count: the positions
        written) exceeds the budget; live / score / last_p cover the attended positions."""
        inf = float("inf")
        if self.policy == "window":
            victim = live.to(torch.int8).argmax(dim=-1)                   # oldest held token
        elif self.policy == "h2o":
            old = self._arange[:live.shape[-1]] < held - self.recent     # outside the recent
            victim = score.masked_fill(~(live & old), inf).argmin(dim=-1)
        else:
            victim = last_p.masked_fill(~live, inf).argmin(dim=-1)
        at = victim[..., None]
        live.scatter_(2, at, live.gather(2, at) & (held <= self.budget))
