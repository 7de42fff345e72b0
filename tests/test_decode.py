"""sparse_decode / sparse_decode_lse against the float64 oracle, on every device (a `device`
parameter: "cpu" always, "cuda" skipped without a GPU; tests of CUDA-only behaviour are marked
`cuda`). Was tests/test_cuda_decode.py; the CPU twin runs the device-generic tests too.

Data is fresh random bf16/fp16; block tables are random permutations of the pool; every cache
row the (row, head) does not own holds a large finite value (K 50, V 1000) so reading one shows
as a large error, and the last test puts NaN there and -1 in unused table entries. Outputs are
poisoned with NaN before the kernel writes them (through the caching allocator, or filled in
place for graph outputs). Tolerance: helpers.attention_bound, the error bound of the algorithm
(float32 scores with the condition sum |q_i k_i| of each dot product, float32 sums, P rounded
to the dtype for the PV product, output rounding), per element, for outputs and lse. Every case
prints its worst error / bound, so a GPU round shows where a kernel is off.
"""
import math

import pytest
import torch

import dms_ext  # noqa: F401  (registers torch.ops.dms)
from helpers import DEVICES, assert_within_bound, bound_violations, decode_bound, poison_allocator


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
K_GARBAGE, V_GARBAGE = 50.0, 1000.0


class Case:
    def __init__(self, q, k, v, table, lens):
        self.q, self.k, self.v, self.table, self.lens = q, k, v, table, lens

    @property
    def args(self):
        return self.q, self.k, self.v, self.table, self.lens


def make_case(lens, G, D, bs, dtype, *, max_blocks=None, num_blocks=None, unused="garbage",
              device="cuda"):
    """Random q/K/V in a shuffled pool. lens: [B, Hkv] slots per (row, kv head).

    unused = "garbage": cache rows no head owns hold K 50 / V 1000, unused table entries point
    at real (spare) blocks; "nan": those rows are NaN and unused table entries are -1.
    """
    lens = torch.as_tensor(lens, dtype=torch.int32).reshape(len(lens), -1)
    B, hkv = lens.shape
    nb = (lens.long() + bs - 1) // bs
    need = int(nb.sum())
    maxb = max_blocks if max_blocks is not None else max(1, int(nb.max()))
    nblk = num_blocks if num_blocks is not None else need + 3
    assert maxb >= int(nb.max()) and nblk >= need
    perm = torch.randperm(nblk).to(torch.int32)
    owned = torch.arange(maxb)[None, None, :] < nb[..., None]
    if unused == "nan":
        table = torch.full((B, hkv, maxb), -1, dtype=torch.int32)
    else:
        spare = perm[need:] if nblk > need else perm
        table = spare[torch.randint(0, spare.numel(), (B, hkv, maxb))].clone()
    table[owned] = perm[:need]

    k = torch.randn(nblk, bs, D)
    v = torch.randn(nblk, bs, D)
    # Rows in use, per owned block (memory O(owned blocks x bs), so a 1M-token head is cheap).
    used = torch.zeros(nblk, bs, dtype=torch.bool)
    i = torch.arange(maxb)[None, None, :].expand_as(owned)
    rows_in = (lens[..., None].long() - i * bs).clamp(0, bs)[owned]          # [owned]
    used[table[owned].long()] = torch.arange(bs)[None, :] < rows_in[:, None]
    if unused == "nan":
        k[~used] = float("nan")
        v[~used] = float("nan")
    else:
        sign = torch.randint(0, 2, (int((~used).sum()), D)).float() * 2 - 1
        k[~used] = K_GARBAGE * sign
        v[~used] = V_GARBAGE * sign
    q = torch.randn(B, G * hkv, D)
    return Case(q.to(dtype).to(device), k.to(dtype).to(device), v.to(dtype).to(device),
                table.to(device), lens.to(device))


def run_op(c: Case, scale, with_lse=False):
    B, hq, D = c.q.shape
    poison_allocator(((B, hq, D), c.q.dtype), ((B, hq), torch.float32))
    if with_lse:
        return torch.ops.dms.sparse_decode_lse(*c.args, scale)
    return torch.ops.dms.sparse_decode(*c.args, scale)


def check_out(out, c: Case, scale, label=""):
    """out within helpers.attention_bound of the float64 reference (per element), finite,
    exact zeros for empty heads."""
    B, hq, D = c.q.shape
    assert out.shape == (B, hq, D) and out.dtype == c.q.dtype and out.device == c.q.device
    ref, _, tol, _ = decode_bound(*c.args, scale, device=c.q.device)
    nonfinite = int((~torch.isfinite(out)).sum())
    print(f"{label} lens {int(c.lens.min()) if c.lens.numel() else 0}.."
          f"{int(c.lens.max()) if c.lens.numel() else 0}: non-finite {nonfinite}")
    assert nonfinite == 0, f"{label}: {nonfinite} non-finite outputs (unwritten or stale rows read)"
    hkv = c.lens.shape[1]
    empty = (c.lens == 0).repeat_interleave(hq // hkv, dim=1)
    assert bool((out[empty] == 0).all()), f"{label}: empty heads must give exact zeros"
    if ref.numel():
        assert_within_bound(out, ref, tol, label)


def check_lse(lse, c: Case, scale, label=""):
    B, hq, _ = c.q.shape
    assert lse.shape == (B, hq) and lse.dtype == torch.float32
    ref, want, tol, tol_lse = decode_bound(*c.args, scale, device=c.q.device)
    empty = torch.isneginf(want)
    assert bool(torch.isneginf(lse.cpu()[empty]).all()), f"{label}: lse of an empty head must be -inf"
    if (~empty).any():
        nbad, worst, first = bound_violations(lse.cpu()[~empty], want[~empty], tol_lse[~empty])
        print(f"{label} lse max err / bound {worst:.3g}")
        assert nbad == 0, f"{label}: lse off, {worst:.3g} x bound"


def random_lens(B, hkv, lo, hi, specials=()):
    lens = torch.randint(lo, hi + 1, (B, hkv), dtype=torch.int32)
    flat = lens.view(-1)
    for i, n in enumerate(specials):
        flat[i % flat.numel()] = n
    return lens


# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("G", [1, 3, 4, 5, 6, 7, 8, 12, 16, 17])
def test_groups_head_dims_dtypes(G, D, dtype, device):
    bs = 64
    lens = random_lens(3, 2, 1, 700, specials=(0, bs, 1, 2 * bs + 1))
    c = make_case(lens, G, D, bs, DTYPES[dtype], max_blocks=14, device=device)
    check_out(run_op(c, D ** -0.5), c, D ** -0.5, f"G{G} D{D} {dtype}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("bs", [16, 32, 64, 128, 256])
def test_block_sizes_and_edge_lengths(bs, dtype, device):
    maxb = 5
    full = maxb * bs
    edges = [0, 1, bs - 1, bs, bs + 1, 2 * bs + 7, full, 3 * bs - 1]
    lens = torch.tensor(edges, dtype=torch.int32).view(2, 4)
    c = make_case(lens, 4, 128, bs, DTYPES[dtype], max_blocks=maxb, device=device)
    check_out(run_op(c, 128 ** -0.5), c, 128 ** -0.5, f"bs{bs} {dtype}")


@pytest.mark.cuda
@pytest.mark.parametrize("G,D,dtype", [(4, 128, "bf16"), (1, 64, "bf16"), (7, 256, "fp16"),
                                       (16, 128, "fp16"), (5, 64, "fp16"), (8, 256, "bf16")])
def test_long_heads_split_kv(G, D, dtype):
    # Few rows and long heads: the launcher splits the keys over many CTAs and merges partials;
    # short and empty heads ride in the same launch.
    lens = torch.tensor([[5000, 0], [20011, 1], [8191, 300]], dtype=torch.int32)
    c = make_case(lens, G, D, 64, DTYPES[dtype])
    check_out(run_op(c, D ** -0.5), c, D ** -0.5, f"long G{G} D{D} {dtype}")
    # The lse of split heads comes from the merge of the partial lses.
    out, lse = run_op(c, D ** -0.5, with_lse=True)
    check_out(out, c, D ** -0.5, f"long G{G} D{D} {dtype} (lse op)")
    check_lse(lse, c, D ** -0.5, f"long G{G} D{D} {dtype}")


@pytest.mark.cuda
@pytest.mark.parametrize("rows", [16, 17, 40])
def test_d128_both_pipelines(rows):
    # D 128 bf16 / fp16 pools: up to 16 work rows (batch x KV heads x head tiles) take the
    # deep-pipeline grid (6 stages, one CTA per SM), more rows the 2-stage one. Both sides of
    # the cut, with long, short and empty heads and the lse of split rows.
    torch.manual_seed(rows)
    lens = random_lens(rows, 1, 0, 9000, specials=(0, 1, 64, 8191))
    c = make_case(lens, 4, 128, 64, torch.bfloat16)
    out, lse = run_op(c, 128 ** -0.5, with_lse=True)
    check_out(out, c, 128 ** -0.5, f"rows {rows}")
    check_lse(lse, c, 128 ** -0.5, f"rows {rows}")


@pytest.mark.cuda
@pytest.mark.parametrize("G,D,bs", [(4, 128, 64), (3, 64, 16), (5, 256, 128), (12, 128, 64), (20, 64, 32)])
def test_few_rows_row_aligned_pieces(G, D, bs):
    # Up to 16 work rows take row-aligned pieces (each CTA one piece of one row, a row's share
    # of the grid set by its tiles; csrc/kernels/streamk.cuh locate_rows). One row long enough
    # for ~100 pieces beside a row of one tile, rows ending one key past / at a 64-key tile and a
    # block boundary, and empty rows; its lse comes from the per-row merge. G 12: two n-tiles of
    # head rows; G 20: two head tiles per kv head (16 work rows).
    torch.manual_seed(G * 1000 + D)
    lens = torch.tensor([[70000 + 3, 0, 1, 64], [65, bs * 7, 0, 4097]], dtype=torch.int32)
    c = make_case(lens, G, D, bs, torch.bfloat16)
    out, lse = run_op(c, D ** -0.5, with_lse=True)
    check_out(out, c, D ** -0.5, f"aligned G{G} D{D} bs{bs}")
    check_lse(lse, c, D ** -0.5, f"aligned G{G} D{D} bs{bs}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_one_very_long_head_many_splits(dtype):
    c = make_case([[65536 + 17]], 8, 128, 64, DTYPES[dtype])
    check_out(run_op(c, 128 ** -0.5), c, 128 ** -0.5, f"65k {dtype}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_peaky_scores_merge_across_splits(dtype):
    # scale 1: scores spread over ~+-40, so the running max moves a lot between tiles and
    # splits; a wrong rescale in the online softmax or the merge shows up here.
    lens = torch.tensor([[12000, 7], [4097, 3000]], dtype=torch.int32)
    c = make_case(lens, 4, 128, 64, DTYPES[dtype])
    check_out(run_op(c, 1.0), c, 1.0, f"peaky {dtype}")


@pytest.mark.cuda
def test_all_heads_empty_give_zeros_and_neg_inf_lse():
    c = make_case(torch.zeros(3, 4, dtype=torch.int32), 4, 128, 64, torch.bfloat16, max_blocks=3,
                  num_blocks=5)
    out, lse = run_op(c, 0.1, with_lse=True)
    torch.cuda.synchronize()
    assert bool((out == 0).all())
    assert bool(torch.isneginf(lse).all())


@pytest.mark.cuda
def test_empty_batch():
    c = make_case(torch.zeros(1, 2, dtype=torch.int32), 4, 128, 64, torch.bfloat16, num_blocks=2)
    q = c.q[:0]
    out = torch.ops.dms.sparse_decode(q, c.k, c.v, c.table[:0], c.lens[:0], 0.1)
    assert out.shape == (0, 8, 128)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("G,D", [(4, 128), (1, 64), (7, 256)])
def test_lse_matches_logsumexp(G, D, dtype, device):
    lens = torch.tensor([[0, 1, 63, 64], [65, 9000, 700, 2]], dtype=torch.int32)
    c = make_case(lens, G, D, 64, DTYPES[dtype], device=device)
    scale = D ** -0.5
    out, lse = run_op(c, scale, with_lse=True)
    check_out(out, c, scale, f"lse G{G} D{D} {dtype}")
    check_lse(lse, c, scale, f"lse G{G} D{D} {dtype}")
    # Same output with and without lse.
    out2 = run_op(c, scale)
    assert torch.equal(out, out2)


@pytest.mark.cuda
def test_cuda_graph_replays_follow_in_place_metadata_changes():
    B, hkv, maxb = 4, 2, 160
    replay_scenarios([
        random_lens(B, hkv, 1, 300),
        torch.tensor([[9000, 0], [1, 64], [maxb * 64, 5000], [65, 700]], dtype=torch.int32),
        torch.zeros(B, hkv, dtype=torch.int32),
        random_lens(B, hkv, 0, maxb * 64),
        random_lens(B, hkv, 1, 40),
    ], B, hkv, 4, 128, 64, maxb, torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_cuda_graph_replays_jump_between_all_empty_and_all_full(dtype):
    # Captured with short heads; every head then jumps between 0 and the whole block table
    # (the split count the capture saw must not limit the replay).
    B, hkv, G, D, bs, maxb = 3, 4, 5, 128, 32, 96
    empty = torch.zeros(B, hkv, dtype=torch.int32)
    full = torch.full((B, hkv), maxb * bs, dtype=torch.int32)
    replay_scenarios([random_lens(B, hkv, 1, 8), empty, full, empty, full, random_lens(B, hkv, 0, 9)],
                     B, hkv, G, D, bs, maxb, DTYPES[dtype])


def replay_scenarios(scenarios, B, hkv, G, D, bs, maxb, dtype):
    """One graph of sparse_decode + sparse_decode_lse captured on scenarios[0], replayed on each
    scenario's fresh data written in place (outputs NaN-filled before every replay)."""
    nblk = B * hkv * maxb + 8
    scale = D ** -0.5
    first = make_case(scenarios[0], G, D, bs, dtype, max_blocks=maxb, num_blocks=nblk)
    q, k, v, table, lens = (x.clone() for x in first.args)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.ops.dms.sparse_decode(q, k, v, table, lens, scale)
        torch.ops.dms.sparse_decode_lse(q, k, v, table, lens, scale)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = torch.ops.dms.sparse_decode(q, k, v, table, lens, scale)
        out2, lse = torch.ops.dms.sparse_decode_lse(q, k, v, table, lens, scale)
    for i, sl in enumerate(scenarios):
        c = make_case(sl, G, D, bs, dtype, max_blocks=maxb, num_blocks=nblk)
        for dst, src in zip((q, k, v, table, lens), c.args):
            dst.copy_(src)
        out.fill_(float("nan"))
        out2.fill_(float("nan"))
        lse.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        check_out(out, c, scale, f"replay {i}")
        check_out(out2, c, scale, f"replay {i} (lse op)")
        check_lse(lse, c, scale, f"replay {i}")


@pytest.mark.cuda
@pytest.mark.parametrize("op", ["sparse_decode", "sparse_decode_lse"])
def test_opcheck(op):
    lens = torch.tensor([[0, 5], [64, 130]], dtype=torch.int32)
    c = make_case(lens, 3, 64, 32, torch.bfloat16)
    torch.library.opcheck(getattr(torch.ops.dms, op).default, (*c.args, 0.125))


@pytest.mark.cuda
def test_large_batch_beyond_992_rows():
    # B * Hkv = 2048 rows: more rows than FA3 keeps split-KV for; a few long heads among them.
    B, hkv, G, D = 256, 8, 4, 128
    lens = random_lens(B, hkv, 1, 400, specials=(0, 1, 64, 65))
    long_idx = torch.randperm(B * hkv)[:16]
    lens.view(-1)[long_idx] = torch.randint(3000, 6001, (16,), dtype=torch.int32)
    c = make_case(lens, G, D, 64, torch.bfloat16)
    check_out(run_op(c, D ** -0.5), c, D ** -0.5, "B256 x Hkv8")


@pytest.mark.cuda
@pytest.mark.parametrize("B,hkv,D,offset", [(64, 8, 128, 0), (128, 8, 64, 0), (449, 2, 128, 0), (64, 8, 64, 1)])
def test_many_rows_lengths_loaded_four_at_a_time(B, hkv, D, offset):
    # 385-512 and 897-1024 work rows: each thread of the scheduler's scan holds 4 or 8 rows and
    # loads their lengths 16 bytes at a time (898 rows: the last thread's block is partial, its
    # rows loaded one by one); offset 1: seq_lens 4 bytes past a 16-byte boundary (scalar loads).
    lens = random_lens(B, hkv, 0, 300, specials=(0, 1, 16, 17, 64, 65, 900))
    c = make_case(lens, 4, D, 16, torch.bfloat16)
    if offset:
        buf = torch.zeros(B * hkv + offset, dtype=torch.int32, device="cuda")
        buf[offset:] = c.lens.reshape(-1)
        c.lens = buf[offset:].view(B, hkv)
        assert c.lens.data_ptr() % 16 != 0
    out, lse = run_op(c, D ** -0.5, with_lse=True)
    torch.cuda.synchronize()
    check_out(out, c, D ** -0.5, f"{B * hkv} rows D{D} offset {offset}")
    check_lse(lse, c, D ** -0.5, f"{B * hkv} rows D{D} offset {offset}")


@pytest.mark.cuda
def test_q_views_with_other_strides():
    lens = torch.tensor([[100, 0, 2000], [1, 64, 65]], dtype=torch.int32)
    c = make_case(lens, 4, 128, 64, torch.bfloat16)
    B, hq, D = c.q.shape
    hkv = 3
    # q as the head slice of a packed qkv projection (aligned strides) ...
    qkv = torch.randn(B, hq + 2 * hkv, D, device="cuda").to(torch.bfloat16)
    qkv[:, :hq] = c.q
    qv = qkv[:, :hq]
    assert not qv.is_contiguous()
    out = torch.ops.dms.sparse_decode(qv, c.k, c.v, c.table, c.lens, D ** -0.5)
    check_out(out, c, D ** -0.5, "q slice of qkv")
    # ... and at an odd element offset (not 16-byte aligned).
    buf = torch.empty(B * hq * D + 1, device="cuda", dtype=torch.bfloat16)
    qo = buf[1:].view(B, hq, D)
    qo.copy_(c.q)
    out = torch.ops.dms.sparse_decode(qo, c.k, c.v, c.table, c.lens, D ** -0.5)
    check_out(out, c, D ** -0.5, "q at odd offset")


@pytest.mark.cuda
def test_head_dim_96_raises_clear_error():
    c = make_case(torch.tensor([[10, 20]], dtype=torch.int32), 2, 96, 64, torch.bfloat16)
    with pytest.raises((ValueError, NotImplementedError, RuntimeError), match=r"(?i)head.?dim|96"):
        torch.ops.dms.sparse_decode(*c.args, 0.1)
        torch.cuda.synchronize()


@pytest.mark.cuda
def test_bad_metadata_raises_value_error_naming_argument():
    c = make_case(torch.tensor([[10, 20]], dtype=torch.int32), 2, 64, 64, torch.bfloat16)
    q, k, v, table, lens = c.args
    with pytest.raises(ValueError, match="block_table"):
        torch.ops.dms.sparse_decode(q, k, v, table.long(), lens, 0.1)
    with pytest.raises(ValueError, match="seq_lens"):
        torch.ops.dms.sparse_decode(q, k, v, table, lens.cpu(), 0.1)
    with pytest.raises(ValueError, match="v_cache"):
        torch.ops.dms.sparse_decode(q, k, v.half(), table, lens, 0.1)


@pytest.mark.cuda
def test_all_heads_empty_with_poisoned_outputs_many_shapes():
    for B, hkv, G, D in ((1, 1, 1, 64), (17, 3, 5, 256), (300, 8, 12, 128)):
        c = make_case(torch.zeros(B, hkv, dtype=torch.int32), G, D, 16, torch.float16,
                      max_blocks=2, num_blocks=4)
        out, lse = run_op(c, D ** -0.5, with_lse=True)
        torch.cuda.synchronize()
        assert bool((out == 0).all()) and bool(torch.isneginf(lse).all()), (B, hkv, G, D)
        check_out(run_op(c, D ** -0.5), c, D ** -0.5, f"all empty B{B} Hkv{hkv} G{G} D{D}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_one_million_token_head_beside_thousands_of_short_ones(dtype):
    # 1M keys of D 128 are 2 x 256 MiB; 4095 heads of 1..40 keys beside it (< 1 GiB in all).
    B, hkv, G, D, bs = 512, 8, 4, 128, 256
    lens = random_lens(B, hkv, 1, 40, specials=(0, 1))
    lens[B // 2, 3] = 1 << 20
    c = make_case(lens, G, D, bs, DTYPES[dtype])
    out, lse = run_op(c, D ** -0.5, with_lse=True)
    torch.cuda.synchronize()
    rows = [0, 1, B // 2, B - 1] + torch.randint(0, B, (12,)).tolist()
    check_rows(out, lse, c, D ** -0.5, rows, f"1M head {dtype}")


@pytest.mark.cuda
def test_more_than_65535_rows():
    # B * Hkv = 65,600 (row) CTAs: beyond a 65,535 grid y / z limit.
    B, hkv, G, D, bs = 8200, 8, 1, 64, 16
    lens = random_lens(B, hkv, 0, 20, specials=(0, 1, 16, 17))
    c = make_case(lens, G, D, bs, torch.bfloat16)
    out, lse = run_op(c, D ** -0.5, with_lse=True)
    torch.cuda.synchronize()
    assert int((~torch.isfinite(out)).sum()) == 0
    rows = list(range(8)) + list(range(B - 8, B)) + torch.randint(0, B, (48,)).tolist()
    check_rows(out, lse, c, D ** -0.5, rows, "65,600 rows")


def check_rows(out, lse, c: Case, scale, rows, label):
    """check_out / check_lse on a subset of the batch rows (the bound is float64 per head)."""
    rows = sorted(set(rows))
    idx = torch.tensor(rows, device=c.q.device)
    sub = Case(c.q[idx], c.k, c.v, c.table[idx], c.lens[idx])
    check_out(out[idx], sub, scale, label)
    check_lse(lse[idx], sub, scale, label)


@pytest.mark.cuda
def test_zz_stale_nan_rows_and_unset_table_entries_are_never_read():
    # Last in the file on purpose: a kernel that dereferences a -1 table entry faults, and a
    # CUDA fault ends the process; every other test has already run by then.
    for bs, G, D in ((16, 4, 128), (64, 1, 64), (64, 7, 256), (256, 4, 128)):
        lens = torch.tensor([[0, 1, bs - 1], [bs, bs + 1, 3000], [2 * bs, 5, 6000]], dtype=torch.int32)
        nb = (lens.long() + bs - 1) // bs
        c = make_case(lens, G, D, bs, torch.bfloat16, max_blocks=int(nb.max()) + 3,
                      num_blocks=int(nb.sum()) + 5, unused="nan")
        out, lse = run_op(c, D ** -0.5, with_lse=True)
        torch.cuda.synchronize()
        check_out(out, c, D ** -0.5, f"stale NaN bs{bs} G{G} D{D}")
        check_lse(lse, c, D ** -0.5, f"stale NaN bs{bs} G{G} D{D}")
