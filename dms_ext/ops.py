"""Python face of the dms op library: fake (meta) kernels for torch.compile / opcheck, and thin
wrappers with defaults over torch.ops.dms.*. Schemas and contracts: csrc/torch/registration.cpp.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from . import _C  # noqa: F401  (registers torch.ops.dms)

__all__ = [
    "sparse_decode", "sparse_decode_lse", "eviction_rope", "append", "sparse_prefill", "fork",
    "release", "decode_step",
]


# Fake kernels: shapes and dtypes only, never data (no sync, graph- and compile-safe).


def has_kernel(op: str, device: torch.device) -> bool:
    """Whether ``torch.ops.dms.<op>`` has a kernel for ``device``'s type (CPU or CUDA)."""
    key = "CUDA" if device.type == "cuda" else "CPU"
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"dms::{op}", key)
    except RuntimeError:
        return False


def _same_device(op, ref_name, ref, **tensors):
    """A meta tensor among real ones dispatches to the fake kernel, which must then reject it as
    the real kernels reject a tensor on another device: ValueError naming the argument."""
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{op}: {name} must be on the same device as {ref_name} "
                             f"({ref.device}), got {t.device}")


@torch.library.register_fake("dms::sparse_decode")
def _sparse_decode_fake(q, k_cache, v_cache, block_table, seq_lens, scale, k_scale=1.0,
                        v_scale=1.0):
    _same_device("sparse_decode", "q", q, k_cache=k_cache, v_cache=v_cache,
                 block_table=block_table, seq_lens=seq_lens)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.register_fake("dms::sparse_decode_lse")
def _sparse_decode_lse_fake(q, k_cache, v_cache, block_table, seq_lens, scale, k_scale=1.0,
                            v_scale=1.0):
    _same_device("sparse_decode_lse", "q", q, k_cache=k_cache, v_cache=v_cache,
                 block_table=block_table, seq_lens=seq_lens)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty((q.shape[0], q.shape[1]), dtype=torch.float32)
    return out, lse


@torch.library.register_fake("dms::eviction_rope")
def _eviction_rope_fake(q, k, positions, cos_sin_cache, alpha_scale, alpha_offset,
                        q_norm_weight=None, k_norm_weight=None, norm_eps=1e-6):
    _same_device("eviction_rope", "q", q, k=k, positions=positions, cos_sin_cache=cos_sin_cache,
                 q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight)
    return q.new_empty((q.shape[0], k.shape[1]), dtype=torch.float32)


@torch.library.register_fake("dms::append")
def _append_fake(k, v, logits, seq_slots, cu_seqlens, k_cache, v_cache, block_table, seq_lens,
                 ring, num_tokens, free_stack, free_top, k_scale=1.0, v_scale=1.0):
    _same_device("append", "k", k, v=v, logits=logits, seq_slots=seq_slots, cu_seqlens=cu_seqlens,
                 k_cache=k_cache, v_cache=v_cache, block_table=block_table, seq_lens=seq_lens,
                 ring=ring, num_tokens=num_tokens, free_stack=free_stack, free_top=free_top)
    return None


@torch.library.register_fake("dms::sparse_prefill")
def _sparse_prefill_fake(q, k, v, logits, seq_slots, cu_seqlens, k_cache, v_cache, block_table,
                         seq_lens, ring, num_tokens, scale, k_scale=1.0, v_scale=1.0):
    _same_device("sparse_prefill", "k", k, q=q, v=v, logits=logits, seq_slots=seq_slots,
                 cu_seqlens=cu_seqlens, k_cache=k_cache, v_cache=v_cache, block_table=block_table,
                 seq_lens=seq_lens, ring=ring, num_tokens=num_tokens)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.register_fake("dms::fork")
def _fork_fake(src, dst, k_cache, v_cache, block_table, seq_lens, ring, num_tokens, free_stack,
               free_top):
    _same_device("fork", "k_cache", k_cache, v_cache=v_cache, block_table=block_table,
                 seq_lens=seq_lens, ring=ring, num_tokens=num_tokens, free_stack=free_stack,
                 free_top=free_top)
    return None


@torch.library.register_fake("dms::release")
def _release_fake(row, block_table, seq_lens, ring, num_tokens, free_stack, free_top, block_size):
    _same_device("release", "block_table", block_table, seq_lens=seq_lens, ring=ring,
                 num_tokens=num_tokens, free_stack=free_stack, free_top=free_top)
    return None


@torch.library.register_fake("dms::decode_step")
def _decode_step_fake(q, k, v, cos_sin_cache, seq_slots, k_cache, v_cache, block_table, seq_lens,
                      ring, num_tokens, free_stack, free_top, alpha_scale, alpha_offset,
                      q_norm_weight=None, k_norm_weight=None, norm_eps=1e-6, logits=None,
                      k_scale=1.0, v_scale=1.0):
    _same_device("decode_step", "q", q, k=k, v=v, cos_sin_cache=cos_sin_cache, seq_slots=seq_slots,
                 k_cache=k_cache, v_cache=v_cache, block_table=block_table, seq_lens=seq_lens,
                 ring=ring, num_tokens=num_tokens, free_stack=free_stack, free_top=free_top,
                 q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, logits=logits)
    return q.new_empty((q.shape[0], k.shape[1]), dtype=torch.float32)


def _scale(scale: Optional[float], head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def validate_mode(enabled: Optional[bool] = None) -> bool:
    """DMS_VALIDATE mode of the CUDA ops (docs/errors.md section 4): when on, each CUDA op checks
    the device data it reads (block ids, lengths, rows, ring entries, free list, positions)
    before it runs, with a sync, and raises the CPU ops' ValueError. Starts as the environment
    says (DMS_VALIDATE=1); None asks, True / False sets it for the process. Returns the mode
    before the call."""
    return torch.ops.dms.validate_mode(enabled)


def sparse_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  block_table: torch.Tensor, seq_lens: torch.Tensor,
                  scale: Optional[float] = None, k_scale: float = 1.0,
                  v_scale: float = 1.0) -> torch.Tensor:
    """Paged per-head decode attention: out [B, Hq, D]; scale defaults to 1/sqrt(D). An fp8
    pool (float8_e4m3fn) reads as stored * k_scale / v_scale."""
    return torch.ops.dms.sparse_decode(q, k_cache, v_cache, block_table, seq_lens,
                                       _scale(scale, q.shape[-1]), float(k_scale), float(v_scale))


def sparse_decode_lse(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_table: torch.Tensor, seq_lens: torch.Tensor,
                      scale: Optional[float] = None, k_scale: float = 1.0,
                      v_scale: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """sparse_decode plus lse float32 [B, Hq] (-inf for an empty head)."""
    return torch.ops.dms.sparse_decode_lse(q, k_cache, v_cache, block_table, seq_lens,
                                           _scale(scale, q.shape[-1]), float(k_scale),
                                           float(v_scale))


def eviction_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                  cos_sin_cache: torch.Tensor, alpha_scale: float = 100.0,
                  alpha_offset: float = 5.0, q_norm_weight: Optional[torch.Tensor] = None,
                  k_norm_weight: Optional[torch.Tensor] = None,
                  norm_eps: float = 1e-6) -> torch.Tensor:
    """In place on q [T, Hq, D] and k [T, Hkv, D]; returns eviction logits float32 [T, Hkv]."""
    return torch.ops.dms.eviction_rope(q, k, positions, cos_sin_cache, float(alpha_scale),
                                       float(alpha_offset), q_norm_weight, k_norm_weight,
                                       float(norm_eps))


def append(k, v, logits, seq_slots, cu_seqlens, k_cache, v_cache, block_table, seq_lens, ring,
           num_tokens, free_stack, free_top, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Appends packed chunks with DMS delayed eviction, updating the state tensors in place. An
    fp8 pool stores saturate(k / k_scale), saturate(v / v_scale)."""
    torch.ops.dms.append(k, v, logits, seq_slots, cu_seqlens, k_cache, v_cache, block_table,
                         seq_lens, ring, num_tokens, free_stack, free_top, float(k_scale),
                         float(v_scale))


def sparse_prefill(q, k, v, logits, seq_slots, cu_seqlens, k_cache, v_cache, block_table,
                   seq_lens, ring, num_tokens, scale: Optional[float] = None,
                   k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Prefill attention of packed chunks over cache + chunk with the DMS rule: out [T, Hq, D].
    The cached keys of an fp8 pool read dequantized, the chunk's own k / v as given."""
    return torch.ops.dms.sparse_prefill(q, k, v, logits, seq_slots, cu_seqlens, k_cache, v_cache,
                                        block_table, seq_lens, ring, num_tokens,
                                        _scale(scale, q.shape[-1]), float(k_scale),
                                        float(v_scale))


def fork(src: int, dst: int, k_cache, v_cache, block_table, seq_lens, ring, num_tokens,
         free_stack, free_top) -> None:
    """Copies state row src into the empty row dst (new blocks, K/V copied)."""
    torch.ops.dms.fork(int(src), int(dst), k_cache, v_cache, block_table, seq_lens, ring,
                       num_tokens, free_stack, free_top)


def release(row: int, block_table, seq_lens, ring, num_tokens, free_stack, free_top,
            block_size: int) -> None:
    """Returns every block of state row `row` to free_stack and clears the row."""
    torch.ops.dms.release(int(row), block_table, seq_lens, ring, num_tokens, free_stack, free_top,
                          int(block_size))


def decode_step(q, k, v, cos_sin_cache, seq_slots, k_cache, v_cache, block_table, seq_lens, ring,
                num_tokens, free_stack, free_top, alpha_scale: float = 100.0,
                alpha_offset: float = 5.0, q_norm_weight: Optional[torch.Tensor] = None,
                k_norm_weight: Optional[torch.Tensor] = None, norm_eps: float = 1e-6,
                logits: Optional[torch.Tensor] = None, k_scale: float = 1.0,
                v_scale: float = 1.0) -> torch.Tensor:
    """Fused decode step (eviction_rope + append, one token per sequence, positions from
    num_tokens): q roped in place, k/v written to the cache; returns logits float32 [B, Hkv]."""
    return torch.ops.dms.decode_step(q, k, v, cos_sin_cache, seq_slots, k_cache, v_cache,
                                     block_table, seq_lens, ring, num_tokens, free_stack,
                                     free_top, float(alpha_scale), float(alpha_offset),
                                     q_norm_weight, k_norm_weight, float(norm_eps), logits,
                                     float(k_scale), float(v_scale))
