"""DMS state tensors (params.h) and their logical comparison, CPU and CUDA alike (test_decode_step,
test_fp8, test_validate, test_compile, test_bad_inputs, mutation_check).

`new_state` / `state_args` / `clone_state` (the tensors one state op takes, in STATE_KEYS order),
`logical_view` / `compare_logical` / `assert_same_logical` (what a query can see, independent of
block ids), `assert_pool_consistent` (every block free or owned once). Re-exported by helpers, so
`from helpers import new_state` works too.
"""
from __future__ import annotations

import math

import torch


STATE_KEYS = ("k_cache", "v_cache", "block_table", "seq_lens", "ring", "num_tokens", "free_stack",
              "free_top")


def new_state(max_seqs, hkv, dim, num_blocks, block_size, window, max_blocks, dtype, device,
              gen=None):
    """Empty state per params.h. Caches start as NaN so that a read of an unwritten row shows;
    the free stack is a random permutation so that block ids are not accidentally positional."""
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    return dict(
        k_cache=torch.full((num_blocks, block_size, dim), math.nan, dtype=dtype, device=device),
        v_cache=torch.full((num_blocks, block_size, dim), math.nan, dtype=dtype, device=device),
        block_table=torch.full((max_seqs, hkv, max_blocks), -1, dtype=torch.int32, device=device),
        seq_lens=torch.zeros(max_seqs, hkv, dtype=torch.int32, device=device),
        ring=torch.zeros(max_seqs, hkv, window + 1, dtype=torch.int32, device=device),
        num_tokens=torch.zeros(max_seqs, dtype=torch.int32, device=device),
        free_stack=perm.to(device),
        free_top=torch.tensor([num_blocks], dtype=torch.int32, device=device),
    )


def state_args(st):
    return [st[k] for k in STATE_KEYS]


def clone_state(st, device=None):
    return {k: v.clone() if device is None else v.to(device).clone() for k, v in st.items()}


def logical_view(st):
    """What a query can see, independent of block ids, for every (row, head) at once (CPU):
    num_tokens [S], seq_lens [S, H], the ring masked to the entries of the last min(n, w+1)
    positions [S, H, w+1], live [S, H, L] (slot < seq_len, L = max_blocks * block_size), and
    K and V [live slots, D] gathered through the block table in (row, head, slot) order."""
    st = {k: v.cpu() for k, v in st.items()}
    nt, lens, ring, bt = st["num_tokens"].long(), st["seq_lens"].long(), st["ring"], st["block_table"]
    r = ring.shape[2]
    idx = torch.arange(r)
    valid = (nt[:, None] >= r) | (idx[None, :] < nt[:, None])            # [S, R]
    ring = torch.where(valid[:, None, :], ring, torch.zeros_like(ring))
    bs = st["k_cache"].shape[1]
    slots = torch.arange(bt.shape[2] * bs)
    live = slots[None, None, :] < lens[:, :, None]                        # [S, H, L]
    blocks = bt.long()[:, :, slots // bs][live]                           # [live slots]
    within = (slots % bs)[None, None, :].expand_as(live)[live]
    return [nt, lens, ring, live, st["k_cache"][blocks, within], st["v_cache"][blocks, within]]


def _where_rows(live, diff):
    """(row, head, slot) of the first differing live slots."""
    return live.nonzero()[diff.any(-1)][:5].tolist()


def compare_logical(a, b, k_rtol=0.0, where=""):
    """a, b: logical_view()s. Same tokens, lengths, ring entries (slot and flag), K/V at every
    live slot (K within k_rtol when it was roped in float on one side, double on the other)."""
    na, la, ra, live, ka, va = a
    nb, lb, rb, _, kb, vb = b
    assert torch.equal(na, nb), f"num_tokens differ {where}: {na.tolist()} vs {nb.tolist()}"
    assert torch.equal(la, lb), f"seq_lens differ {where}: {(la != lb).nonzero().tolist()}"
    assert torch.equal(ra, rb), f"ring entries differ {where} at (row, head) " \
        f"{(ra != rb).any(-1).nonzero().tolist()}"
    for x, name in ((ka, "K"), (va, "V"), (kb, "K"), (vb, "V")):
        assert not torch.isnan(x).any(), f"unwritten {name} slot read {where}"
    if k_rtol == 0.0:
        assert torch.equal(ka, kb), f"K differs {where} at (row, head) " \
            f"{_where_rows(live, ka != kb)}"
    else:
        torch.testing.assert_close(ka.float(), kb.float(), rtol=k_rtol, atol=k_rtol,
                                   msg=lambda m: f"K {where}: {m}")
    assert torch.equal(va, vb), f"V differs {where} at (row, head) " \
        f"{_where_rows(live, va != vb)}"


def assert_same_logical(a, b, rows=None, hkv=None, k_rtol=0.0, where=""):
    """States a and b hold the same logical content (rows/hkv kept for the old call form)."""
    compare_logical(logical_view(a), logical_view(b), k_rtol, where)
    assert int(a["free_top"][0]) == int(b["free_top"][0]), f"free_top differs {where}"


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
