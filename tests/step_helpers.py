"""Shared by test_decode_step.py (CPU) and test_cuda_step.py: DMS state tensors, random step
inputs with a chosen eviction rate, and a logical comparison of two states (block ids may
differ between implementations; what a query can see may not)."""
from __future__ import annotations

import math
import zlib

import torch

from dms_ext import reference


def seed_of(*args):
    """A seed fixed by the test's parameters (hash() of a str changes from run to run)."""
    return zlib.crc32(repr(args).encode()) & 0x7FFFFFFF


def new_state(max_seqs, hkv, dim, num_blocks, block_size, window, max_blocks, dtype, device,
              gen=None):
    """Empty state per params.h. Caches start as NaN so that a read of an unwritten row shows;
    the free stack is a random permutation so that block ids are not accidentally positional."""
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    return dict(
        k_cache=torch.full((num_blocks, block_size, dim), float("nan"), dtype=dtype, device=device),
        v_cache=torch.full((num_blocks, block_size, dim), float("nan"), dtype=dtype, device=device),
        block_table=torch.full((max_seqs, hkv, max_blocks), -1, dtype=torch.int32, device=device),
        seq_lens=torch.zeros(max_seqs, hkv, dtype=torch.int32, device=device),
        ring=torch.zeros(max_seqs, hkv, window + 1, dtype=torch.int32, device=device),
        num_tokens=torch.zeros(max_seqs, dtype=torch.int32, device=device),
        free_stack=perm.to(device),
        free_top=torch.tensor([num_blocks], dtype=torch.int32, device=device),
    )


STATE_KEYS = ("k_cache", "v_cache", "block_table", "seq_lens", "ring", "num_tokens", "free_stack",
              "free_top")


def state_args(st):
    return [st[k] for k in STATE_KEYS]


def clone_state(st, device=None):
    return {k: v.clone() if device is None else v.to(device).clone() for k, v in st.items()}


def signed_logits(shape, evict_p, gen, device="cpu"):
    """float32 logits, positive (evict) with probability evict_p, never near 0."""
    mag = torch.rand(shape, generator=gen) + 0.25
    sign = torch.where(torch.rand(shape, generator=gen) < evict_p, 1.0, -1.0)
    return (mag * sign).to(device)


def step_inputs(b, hq, hkv, dim, dtype, evict_p, gen, device="cpu"):
    """q, k, v [b, *, dim] (before norm / RoPE) with the donor channel D-1 of each group's first
    query head pushed far from the decision threshold, positive with probability evict_p."""
    q = torch.randn(b, hq, dim, generator=gen)
    k = torch.randn(b, hkv, dim, generator=gen)
    v = torch.randn(b, hkv, dim, generator=gen)
    group = hq // hkv
    q[:, ::group, dim - 1] = signed_logits((b, hkv), evict_p, gen) * 4.0
    return q.to(dtype).to(device), k.to(dtype).to(device), v.to(dtype).to(device)


def norm_weights(dim, dtype, gen, device="cpu"):
    # Positive, so the norm keeps the sign of the donor channel.
    return ((torch.rand(dim, generator=gen) + 0.5).to(dtype).to(device),
            (torch.rand(dim, generator=gen) + 0.5).to(dtype).to(device))


def logical_head(st, row, g):
    """(num_tokens, seq_len, ring entries of the last min(n, w+1) positions in position order,
    K rows [seq_len, D], V rows) of one (row, head), all on the CPU."""
    n = int(st["num_tokens"][row])
    length = int(st["seq_lens"][row, g])
    ring = st["ring"][row, g].cpu()
    r = ring.numel()
    entries = [int(ring[p % r]) for p in range(max(0, n - r), n)]
    bt = st["block_table"][row, g].cpu()
    k = reference.paged_gather(st["k_cache"].cpu(), bt, length)
    v = reference.paged_gather(st["v_cache"].cpu(), bt, length)
    return n, length, entries, k, v


def assert_same_logical(a, b, rows, hkv):
    """Same tokens, lengths, ring entries (slot and flag) and K/V at every live slot."""
    for row in rows:
        for g in range(hkv):
            na, la, ea, ka, va = logical_head(a, row, g)
            nb, lb, eb, kb, vb = logical_head(b, row, g)
            where = f"row {row} head {g}"
            assert na == nb, f"num_tokens differ at {where}: {na} vs {nb}"
            assert la == lb, f"seq_lens differ at {where}: {la} vs {lb}"
            assert ea == eb, f"ring entries differ at {where}"
            assert not torch.isnan(ka.float()).any(), f"unwritten K slot read at {where}"
            assert torch.equal(ka, kb), f"K differs at {where}"
            assert torch.equal(va, vb), f"V differs at {where}"
    assert int(a["free_top"][0]) == int(b["free_top"][0]), "free_top differs"


def assert_pool_consistent(st, rows_live, block_size):
    """Every block is either free or owned by exactly one live (row, head) block-table entry."""
    nb = st["k_cache"].shape[0]
    top = int(st["free_top"][0])
    owned = []
    for row in rows_live:
        for g in range(st["seq_lens"].shape[1]):
            n = math.ceil(int(st["seq_lens"][row, g]) / block_size)
            owned += st["block_table"][row, g, :n].cpu().tolist()
    free = st["free_stack"][:top].cpu().tolist()
    assert len(owned) + len(free) == nb, f"{len(owned)} owned + {len(free)} free != {nb} blocks"
    assert sorted(owned + free) == list(range(nb)), "a block is lost or owned twice"
