"""Decode steps over a DMSCacheHF without HF's forward plumbing: one code path for the eager
step (CPU, and the first step of a batch on CUDA) and the CUDA-graph replay."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .attention import cached_attention
from .cache import DMSCacheHF, ForwardPlan
from .settings import ModelState


def rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """A transformers Qwen3 / Llama RMSNorm module's output in two ops instead of its eight
    (to float32, pow, mean, add, rsqrt, mul, to the dtype, times the weight): F.rms_norm without
    a weight gives round(x * rsqrt(mean(x^2) + eps)) in x's dtype, as the module's normalised
    value, then the module's weight product rounds again. Bitwise equal to the module on the CPU
    (tests/test_hf_generate.py); on CUDA the float32 rsqrt's reduction order may differ, so an
    element can round one unit away near a tie (as docs/ops.md says of eviction_rope's norm)."""
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None:
        return norm(x)
    return F.rms_norm(x, (x.shape[-1],), None, eps) * norm.weight


def gate_up_weight(mlp) -> Optional[torch.Tensor]:
    """A [2, I, H] tensor whose halves ARE the storage of a SwiGLU MLP's gate_proj and up_proj
    weights (the first call stacks them once and points both parameters at the halves: same
    values, no second copy), so a decode step reads both with one batched GEMM whose outputs
    are contiguous. None where that does not apply (biases, another activation, a capture or
    autograd in progress before the weights were stacked): then the module runs as is. A
    weight moved or replaced since is noticed (storage pointers) and stacked again."""
    g, u = getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)
    if (not isinstance(g, nn.Linear) or not isinstance(u, nn.Linear) or g.bias is not None
            or u.bias is not None or type(getattr(mlp, "act_fn", None)).__name__ not in ("SiLU", "SiLUActivation")
            or not hasattr(mlp, "down_proj") or torch.is_grad_enabled()):
        return None
    wg, wu = g.weight, u.weight
    w = getattr(mlp, "_dms_gate_up", None)
    if (w is not None and w.device == wg.device and w.dtype == wg.dtype
            and w[0].data_ptr() == wg.data_ptr() and w[1].data_ptr() == wu.data_ptr()):
        return w
    if (wg.shape != wu.shape or wg.dtype != wu.dtype or wg.device != wu.device
            or wg.device.type == "meta"
            or (wg.is_cuda and torch.cuda.is_current_stream_capturing())):
        return None
    w = torch.stack([wg.detach(), wu.detach()])
    wg.data, wu.data = w[0], w[1]
    mlp._dms_gate_up = w
    return w


def mlp_forward(mlp, x: torch.Tensor) -> torch.Tensor:
    """``mlp(x)`` of a Qwen3 / Llama SwiGLU MLP, x [n, hidden]: with :func:`gate_up_weight`,
    one batched GEMM for gate and up (instead of two), then silu and the product in place on
    its contiguous halves; the same roundings as the module (silu(g) and g * u in x's dtype)."""
    w = gate_up_weight(mlp)
    if w is None:
        return mlp(x)
    gu = torch.matmul(x, w.transpose(1, 2))             # [2, n, I]
    h = F.silu(gu[0], inplace=True).mul_(gu[1])
    return mlp.down_proj(h)


def decode_hidden(model, state: ModelState, dms, plan: ForwardPlan,
                  tokens: torch.Tensor) -> torch.Tensor:
    """tokens [n] (one per sequence of ``plan``) -> the final-norm hidden states [n, hidden].
    The decoder layers of Qwen3 / Llama, called module by module (capturable); the RMSNorms as
    :func:`rms_norm` (two norms of eight small kernels each per layer were a visible share of a
    decode step: 576 kernels per step at 36 layers)."""
    base = model.model
    x = base.embed_tokens(tokens)
    for layer in base.layers:
        attn = layer.self_attn
        o = cached_attention(attn, state, dms, plan, rms_norm(layer.input_layernorm, x), x)
        x = x + attn.o_proj(o.to(x.dtype))
        x = x + mlp_forward(layer.mlp, rms_norm(layer.post_attention_layernorm, x))
    return rms_norm(base.norm, x)


class DecodeGraph:
    """A captured decode step over every layer for a fixed batch of sequences: static token and
    position buffers, a :class:`dms_ext.DecodePlan` whose ``advance`` pays for each replay."""

    def __init__(self, model, state: ModelState, cache: DMSCacheHF, seq_ids, device):
        dms = cache.dms
        n = len(seq_ids)
        self.seq_ids = tuple(seq_ids)
        cfg = model.config
        rows = max(int(getattr(cfg, "max_position_embeddings", 0) or 0),
                   max(cache.positions[s] for s in seq_ids) + 1024)
        # Allocated before the capture and kept: the graph reads it on every replay.
        self.table = state.rope_table(device, rows)
        self.limit = self.table.shape[0]
        self.tokens = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.plan = dms.prepare_decode(list(seq_ids), steps=16,
                                       max_len=dms.max_blocks_per_head * dms.block_size)
        fplan = ForwardPlan(seq_ids=list(seq_ids), cu_seqlens=torch.arange(n + 1, dtype=torch.int32),
                            positions=self.positions, index=None, max_position=self.limit - 1,
                            counts=[1] * n)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = decode_hidden(model, state, dms, fplan, self.tokens)

    def valid_for(self, seq_ids, max_position: int) -> bool:
        """Whether this graph can run the step of ``seq_ids``: its own batch, or another batch
        on the same state rows in the same order (the next generate call of the same size
        gets the rows of the last one), whose plan is then re-opened (no capture)."""
        from ..cache import RecaptureNeeded
        if max_position >= self.limit:
            return False
        ids = tuple(seq_ids)
        if self.plan.open and ids == self.seq_ids:
            return True
        try:
            self.plan.reopen(list(ids))
        except (ValueError, RecaptureNeeded):
            return False
        self.seq_ids = ids
        return True

    def replay(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.plan.advance()             # raises OutOfBlocks / RecaptureNeeded before the replay
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.graph.replay()
        return self.out.clone()


def decode_step(model, state: ModelState, cache: DMSCacheHF, plan: ForwardPlan,
                tokens: torch.Tensor) -> torch.Tensor:
    """The step of ``plan`` (a decode plan from ``cache.begin``): [n, hidden]. On CUDA with
    ``cache.cuda_graphs``: the first step of a batch runs eagerly (it is also the warm-up), the
    second captures, later ones replay, and so does the next batch on the same state rows
    (DecodeGraph.valid_for); elsewhere always eager."""
    from ..cache import RecaptureNeeded
    dev = tokens.device
    ids = tuple(plan.seq_ids)
    use_graph = dev.type == "cuda" and cache.cuda_graphs and not torch.is_grad_enabled()
    g: Optional[DecodeGraph] = cache._graph
    if use_graph and g is not None and g.valid_for(ids, plan.max_position):
        try:
            out = g.replay(tokens, plan.positions)
            cache.graph_replays += 1
            plan.layers_done = len(model.model.layers)
            return out
        except RecaptureNeeded:
            cache._graph = g = None
    if use_graph and cache._last_decode == ids:
        # Seen this batch before: capture now (nothing runs), then replay this step.
        if g is not None:
            g.plan.close()
        cache._graph = None
        cache._graph = DecodeGraph(model, state, cache, ids, dev)
        cache.graph_captures += 1
        return decode_step(model, state, cache, plan, tokens)
    cache._last_decode = ids
    # Eager (also the warm-up of a batch that may be captured at its next step).
    return decode_hidden(model, state, cache.dms, plan, tokens)
