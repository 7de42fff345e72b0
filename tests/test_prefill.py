"""sparse_prefill against the float64 oracle (reference.dms_attention) on every device (a `device`
parameter: "cpu" always, "cuda" skipped without a GPU; CUDA-only behaviour is marked `cuda`).
Was tests/test_cuda_prefill.py. The float64 CPU twin runs a case when it has at most
CPU_PAIR_LIMIT (query, key) pairs; on CUDA such a case is also compared with the CPU op.

Each case builds per-sequence state with torch.ops.dms.append (history split into prefill
pieces and one-token decode steps, rows scattered, blocks shuffled, free slots NaN), then runs
ONE sparse_prefill call over the packed new chunks and compares every sequence's rows with the
oracle over its whole history + chunk (chunking invariance). The tolerance is
helpers.attention_bound (the error bound of float32 scores and sums with P rounded for the PV
product), per element. Every case prints its errors, so a GPU round shows where a kernel is off.
"""
import math
import random

import pytest
import torch
import torch.nn.functional as F

import dms_ext  # noqa: F401  (registers torch.ops.dms)
from dms_ext import reference
from helpers import (DEVICES, assert_within_bound, bound_violations, dms_bound, make_logits,
                     poison_allocator)

# The float64 CPU twin (CPU device, or the CPU comparison of a CUDA case) only where it stays fast.
CPU_PAIR_LIMIT = 3_000_000


def split_history(n, rng, step_frac=0.3):
    """History of n tokens as a list of append sizes: prefill pieces and one-token steps."""
    pieces = []
    while n > 0:
        if rng.random() < step_frac:
            s = 1
        else:
            s = min(n, rng.choice([2, 3, 17, 64, 65, rng.randint(1, 700)]))
        pieces.append(s)
        n -= s
    return pieces


class State:
    """One layer of DMS state on `device`: paged pool + bookkeeping tensors, as DMSCache keeps."""

    def __init__(self, max_seqs, hkv, d, window, block_size, num_blocks, max_blocks, dtype,
                 device, gen):
        i32 = dict(dtype=torch.int32, device=device)
        # NaN in every slot the cache does not own: reading one poisons the output.
        self.k_cache = torch.full((num_blocks, block_size, d), float("nan"), dtype=dtype, device=device)
        self.v_cache = torch.full((num_blocks, block_size, d), float("nan"), dtype=dtype, device=device)
        self.block_table = torch.zeros(max_seqs, hkv, max_blocks, **i32)
        self.seq_lens = torch.zeros(max_seqs, hkv, **i32)
        self.ring = torch.zeros(max_seqs, hkv, window + 1, **i32)
        self.num_tokens = torch.zeros(max_seqs, **i32)
        # Shuffled free list: a sequence's blocks are scattered over the pool.
        self.free_stack = torch.randperm(num_blocks, generator=gen).to(**i32)
        self.free_top = torch.full((1,), num_blocks, **i32)

    def tensors(self):
        return (self.k_cache, self.v_cache, self.block_table, self.seq_lens, self.ring,
                self.num_tokens)

    def append(self, k, v, lg, rows, lens):
        dev = k.device
        cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(dev)
        torch.ops.dms.append(k, v, lg, torch.tensor(rows, dtype=torch.int32, device=dev), cu,
                             *self.tensors(), self.free_stack, self.free_top)


def run_case(name, *, hist, chunks, hkv, group, d, window, rate, dtype=torch.bfloat16,
             block_size=16, seed=0, device="cuda", check_cpu=None, scale=None, stale_call=False):
    """hist[i] / chunks[i]: tokens already held / new chunk length of sequence i (chunk i of the
    packed call). stale_call (CUDA): the same call runs first on NaN k / v with few evictions
    (rate 0.05), so the workspace the caching allocator hands the checked call again holds NaN
    rows where that call's compacted kept lists end (a row it reads but did not write poisons
    the output). Returns the max error against the oracle."""
    hq = hkv * group
    pairs = sum(c * (h + c) for h, c in zip(hist, chunks)) * hq
    if str(device) == "cpu" and pairs > CPU_PAIR_LIMIT:
        pytest.skip(f"{pairs} (query, key) pairs: too slow for the float64 CPU twin")
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    n_seq = len(chunks)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    rows = rng.sample(range(n_seq + 3), n_seq)               # scattered state rows
    max_blocks = max(1, max(math.ceil(h / block_size) for h in hist))
    num_blocks = sum(hkv * math.ceil(h / block_size) for h in hist) + 5
    st = State(n_seq + 3, hkv, d, window, block_size, num_blocks, max_blocks, dtype, device, gen)

    full = []
    for i in range(n_seq):
        n = hist[i] + chunks[i]
        full.append((torch.randn(n, hq, d, generator=gen).to(dtype),
                     torch.randn(n, hkv, d, generator=gen).to(dtype),
                     torch.randn(n, hkv, d, generator=gen).to(dtype),
                     make_logits(gen, n, hkv, rate)))

    # History, in rounds: each round appends the next piece of every sequence that has one.
    plans = [split_history(h, rng) for h in hist]
    done = [0] * n_seq
    for r in range(max((len(p) for p in plans), default=0)):
        ids = [i for i in range(n_seq) if r < len(plans[i])]
        rng.shuffle(ids)
        lens = [plans[i][r] for i in ids]
        cat = lambda j: torch.cat([full[i][j][done[i]:done[i] + plans[i][r]] for i in ids]).to(device)
        st.append(cat(1), cat(2), cat(3), [rows[i] for i in ids], lens)
        for i in ids:
            done[i] += plans[i][r]
    assert done == list(hist)

    # The prefill call: chunk i continues sequence i.
    cat = lambda j: torch.cat([full[i][j][hist[i]:] for i in range(n_seq)]).contiguous().to(device)
    q, k, v, lg = cat(0), cat(1), cat(2), cat(3)
    cu_list = [0]
    for c in chunks:
        cu_list.append(cu_list[-1] + c)
    cu = torch.tensor(cu_list, dtype=torch.int32, device=device)
    slots = torch.tensor(rows, dtype=torch.int32, device=device)
    before = [t.clone() for t in st.tensors()]
    if stale_call and str(device).startswith("cuda"):
        lg0 = make_logits(gen, lg.shape[0], hkv, 0.05).to(device)
        nan_k, nan_v = torch.full_like(k, math.nan), torch.full_like(v, math.nan)
        torch.ops.dms.sparse_prefill(q, nan_k, nan_v, lg0, slots, cu, *st.tensors(), scale)
        del nan_k, nan_v, lg0
    poison_allocator(((q.numel(),), dtype))
    out = torch.ops.dms.sparse_prefill(q, k, v, lg, slots, cu, *st.tensors(), scale)
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    assert out.shape == q.shape and out.dtype == dtype
    for a, b in zip(before, st.tensors()):                   # read, never written
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())

    err, worst = 0.0, 0.0
    refs = []
    for i in range(n_seq):
        qf, kf, vf, lf = full[i]
        n = hist[i] + chunks[i]
        # The float64 oracle runs where the case runs (a CUDA case: on the GPU, same math).
        ref, _, tol_i, _ = dms_bound(qf, kf, vf, lf, window, scale, rows=range(hist[i], n),
                                     device=device)
        refs.append((ref, tol_i))
        o = out[cu_list[i]:cu_list[i + 1]].double().cpu()
        err = max(err, (o - ref).abs().max().item())
        worst = max(worst, bound_violations(o, ref, tol_i)[1])

    if check_cpu is None:
        check_cpu = pairs <= CPU_PAIR_LIMIT
    cpu_err = float("nan")
    if check_cpu and str(device).startswith("cuda"):
        out_cpu = torch.ops.dms.sparse_prefill(q.cpu(), k.cpu(), v.cpu(), lg.cpu(), slots.cpu(),
                                               cu.cpu(), *(t.cpu() for t in st.tensors()), scale)
        cpu_err = (out.cpu().double() - out_cpu.double()).abs().max().item()
    print(f"[prefill] {name}: max|out-ref| {err:.3e}  max err / bound {worst:.3g}"
          f"  max|out-cpu| {cpu_err:.3e}")
    for i, (ref, tol_i) in enumerate(refs):
        assert_within_bound(out[cu_list[i]:cu_list[i + 1]], ref, tol_i, f"{name} seq {i}")
        if check_cpu and str(device).startswith("cuda"):
            assert_within_bound(out_cpu[cu_list[i]:cu_list[i + 1]], ref, tol_i, f"{name} seq {i} (CPU op)")
    return err


# -------------------------------------------------------------------------------------------
# Fresh prompts (empty cache): chunk sizes around tile edges, every G, both head dims.

@pytest.mark.parametrize("length", [1, 2, 15, 16, 17, 63, 64, 65, 200, 1000])
@pytest.mark.parametrize("group", [1, 3, 4, 5, 8])
@pytest.mark.parametrize("device", DEVICES)
def test_fresh_prompt_chunk_sizes_and_groups(length, group, device):
    run_case(f"fresh L={length} G={group}", hist=[0], chunks=[length], hkv=2, group=group, d=128,
             window=16, rate=0.6, seed=length * 10 + group, device=device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("group", [1, 7])
@pytest.mark.parametrize("device", DEVICES)
def test_dtypes_and_head_dims(dtype, d, group, device):
    if d == 256 and device == "cpu":
        pytest.skip("D 256 is for the CUDA kernel's 64-row tiles; the CPU twin takes any D (20 s here)")
    run_case(f"dtype {dtype} D={d} G={group}", hist=[300], chunks=[333], hkv=2, group=group, d=d,
             window=64, rate=0.5, dtype=dtype, seed=d + group, device=device)


@pytest.mark.parametrize("length", [1, 15, 16, 17, 63, 64, 65, 200])
@pytest.mark.parametrize("group", [1, 4, 5])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.cuda)])
def test_head_dim_256_tile_edges(length, group, device):
    """D 256 takes 64-row query tiles (one m-tile per warp; 128 rows at D 64 / 128): chunk
    lengths around those edges for several G, over a cache of 130 tokens (blocks of 16)."""
    run_case(f"D256 L={length} G={group}", hist=[130, 0], chunks=[length, max(1, length // 2)],
             hkv=2, group=group, d=256, window=16, rate=0.6, seed=length * 7 + group,
             device=device)


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("window", [1, 2, 16, 100, 1024])
@pytest.mark.parametrize("device", DEVICES)
def test_eviction_rates_and_windows(rate, window, device):
    run_case(f"rate {rate} w={window}", hist=[700], chunks=[900], hkv=2, group=4, d=128,
             window=window, rate=rate, seed=int(rate * 100) + window, device=device)


# -------------------------------------------------------------------------------------------
# Over a cache built by append: ring wrap, the pending flag of position n-1, older survivors.

@pytest.mark.parametrize("hist", [1, 5, 16, 17, 18, 40, 300, 2000])
@pytest.mark.parametrize("device", DEVICES)
def test_prefill_after_history(hist, device):
    run_case(f"history {hist}", hist=[hist], chunks=[50], hkv=3, group=3, d=64, window=16,
             rate=0.7, block_size=7, seed=hist, device=device)


@pytest.mark.parametrize("chunk", [1, 2, 16, 17, 100])
@pytest.mark.parametrize("device", DEVICES)
def test_short_chunk_inside_window_of_flagged_ring(chunk, device):
    # Chunk shorter than the window: flagged ring entries are visible to its first queries only.
    run_case(f"ring chunk {chunk}", hist=[500], chunks=[chunk], hkv=2, group=5, d=128,
             window=64, rate=0.9, seed=chunk, device=device)


@pytest.mark.parametrize("block_size", [1, 5, 16, 64, 256])
@pytest.mark.parametrize("device", DEVICES)
def test_block_sizes(block_size, device):
    run_case(f"block_size {block_size}", hist=[400], chunks=[130], hkv=2, group=2, d=64,
             window=32, rate=0.5, block_size=block_size, seed=block_size, device=device)


# -------------------------------------------------------------------------------------------
# Many sequences per call: mixed histories and chunk lengths, 1-token chunks among them.

@pytest.mark.parametrize("group", [1, 3, 4, 5, 8])
@pytest.mark.parametrize("device", DEVICES)
def test_many_sequences_one_call(group, device):
    hist = [0, 1, 37, 600, 5, 129, 0, 2048]
    chunks = [1, 64, 1, 257, 3, 1000, 17, 65]
    run_case(f"batch G={group}", hist=hist, chunks=chunks, hkv=2, group=group, d=128, window=48,
             rate=0.6, seed=group, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_many_sequences_fp16_d64_odd_heads(device):
    hist = [10, 0, 333, 1]
    chunks = [100, 2, 513, 1]
    run_case("batch fp16 D64 Hkv3 G7", hist=hist, chunks=chunks, hkv=3, group=7, d=64, window=20,
             rate=0.4, dtype=torch.float16, seed=11, device=device)


# -------------------------------------------------------------------------------------------
# Long chunks (CUDA only: too many pairs for the CPU twin).

@pytest.mark.cuda
@pytest.mark.parametrize("length,window,rate", [(2048, 512, 0.8), (4096, 512, 0.875),
                                                (4096, 1024, 0.3), (3000, 16, 0.95)])
def test_long_chunks(length, window, rate):
    run_case(f"long L={length} w={window} rate={rate}", hist=[0], chunks=[length], hkv=2,
             group=4, d=128, window=window, rate=rate, seed=length + window, check_cpu=False)


@pytest.mark.cuda
@pytest.mark.parametrize("rate", [0.02, 0.05, 0.5, 0.875, 0.97])
@pytest.mark.parametrize("dtype,d,group", [(torch.bfloat16, 128, 4), (torch.float16, 64, 5),
                                           (torch.bfloat16, 128, 1), (torch.bfloat16, 256, 3)])
def test_compacted_kept_keys_by_tma(rate, dtype, d, group):
    # The wgmma kernel's kept tiles of a chunk with more than 1 / 32 of its keys evicted come by
    # TMA from a compacted copy (compact_kept_kernel; rates around that threshold leave some
    # chunks gathered instead), read a key tile past the list (zero rows, masked): chunks of
    # 1-3000 tokens, kept lists ending on / off the 128-key tile, behind histories (cached and
    # flagged tiles first), after a call that left NaN rows in the workspace (stale_call).
    hist = [0, 0, 700, 0, 129, 3000, 0]
    chunks = [3000, 1, 2049, 640, 255, 1500, 33]
    run_case(f"kept by TMA rate={rate} {dtype} D{d} G{group}", hist=hist, chunks=chunks, hkv=2,
             group=group, d=d, window=64, rate=rate, dtype=dtype, block_size=64,
             seed=int(rate * 1000) + d + group, check_cpu=False, stale_call=True)


@pytest.mark.cuda
@pytest.mark.parametrize("block_size", [8, 16, 24, 32, 40, 64, 128, 256])
@pytest.mark.parametrize("rate", [0.0, 0.7])
def test_cached_tiles_by_tma(block_size, rate):
    # The wgmma kernel loads a cached tile's warp of 32 keys as TMA boxes of gcd(block size, 32)
    # rows when all 32 have a cached row (block sizes that are multiples of 8); a warp with a key
    # past seq_len gathers. Histories ending on / off a block and a 128-key tile, several
    # sequences in one call (each its own block table), flagged ring slots masked (rate 0.7),
    # G 4, 5 and 3, D 128, 64 and 256 (64-key tiles: of the two producer warps holding 32 keys,
    # one loads them).
    hist = [1000, 129, 2 * block_size, 4000 + 7, 96]
    chunks = [300, 1, 700, 64, 2049]
    for d, group in ((128, 4), (64, 5), (256, 3)):
        run_case(f"cached by TMA bs={block_size} rate={rate} D{d} G{group}", hist=hist, chunks=chunks,
                 hkv=2, group=group, d=d, window=100, rate=rate, block_size=block_size,
                 seed=block_size * 10 + d + int(rate * 10), check_cpu=False)


@pytest.mark.cuda
@pytest.mark.parametrize("rate", [0.3, 0.9])
def test_prepare_segments(rate):
    # prepare_kernel splits each chunk's keys into gridDim.z segments (about 2048 keys each at the
    # call's average chunk length): here 3, so a long chunk spans three, a short one a first
    # segment of 32 keys and a second of 1, and the third segment of the short chunks is empty;
    # each segment counts the kept keys before it itself.
    run_case(f"prepare segments rate={rate}", hist=[0, 600, 0, 90], chunks=[9000, 4991, 33, 4500],
             hkv=2, group=4, d=128, window=256, rate=rate, block_size=64, seed=int(rate * 100) + 7,
             check_cpu=False)


@pytest.mark.cuda
def test_long_chunk_over_long_history():
    run_case("long over history", hist=[3000], chunks=[2500], hkv=2, group=4, d=128, window=512,
             rate=0.8, block_size=64, seed=5, check_cpu=False)


@pytest.mark.parametrize("device", DEVICES)
def test_scale_argument(device):
    run_case("scale 0.3", hist=[100], chunks=[200], hkv=2, group=2, d=64, window=32, rate=0.5,
             scale=0.3, seed=3, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_cache_tensors_shapes_and_repeatability(device):
    # Two calls over the same state give identical outputs (no state kept in the workspace).
    gen = torch.Generator().manual_seed(0)
    st = State(2, 2, 64, 8, 16, 8, 4, torch.bfloat16, device, gen)
    T = 70
    q = torch.randn(T, 4, 64, generator=gen).to(torch.bfloat16).to(device)
    k = torch.randn(T, 2, 64, generator=gen).to(torch.bfloat16).to(device)
    v = torch.randn(T, 2, 64, generator=gen).to(torch.bfloat16).to(device)
    lg = make_logits(gen, T, 2, 0.5).to(device)
    cu = torch.tensor([0, 30, 70], dtype=torch.int32, device=device)
    slots = torch.tensor([1, 0], dtype=torch.int32, device=device)
    a = torch.ops.dms.sparse_prefill(q, k, v, lg, slots, cu, *st.tensors(), 0.125)
    b = torch.ops.dms.sparse_prefill(q, k, v, lg, slots, cu, *st.tensors(), 0.125)
    assert torch.equal(a, b) and torch.isfinite(a).all()


def _small_inputs(seed=0, T=(40, 1, 90), hkv=2, group=3, d=64, window=8, device="cuda"):
    gen = torch.Generator().manual_seed(seed)
    st = State(len(T) + 1, hkv, d, window, 16, 64, 8, torch.bfloat16, device, gen)
    n = sum(T)
    # A short history for rows 0 and 2, so cached keys and the ring take part.
    kh = torch.randn(50, hkv, d, generator=gen).to(torch.bfloat16).to(device)
    vh = torch.randn(50, hkv, d, generator=gen).to(torch.bfloat16).to(device)
    lh = make_logits(gen, 50, hkv, 0.5).to(device)
    st.append(kh, vh, lh, [0, 2], [20, 30])
    q = torch.randn(n, hkv * group, d, generator=gen).to(torch.bfloat16).to(device)
    k = torch.randn(n, hkv, d, generator=gen).to(torch.bfloat16).to(device)
    v = torch.randn(n, hkv, d, generator=gen).to(torch.bfloat16).to(device)
    lg = make_logits(gen, n, hkv, 0.5).to(device)
    cu = torch.tensor([0] + list(T), dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    slots = torch.tensor([2, 3, 0], dtype=torch.int32, device=device)
    return (q, k, v, lg, slots, cu, *st.tensors(), 1.0 / math.sqrt(d))


def _assert_graph_replay_equals_eager(args):
    """sparse_prefill(*args) captured in a CUDA graph: the replay writes every element of the
    (NaN-poisoned) output, bitwise what eager wrote."""
    eager = torch.ops.dms.sparse_prefill(*args)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.ops.dms.sparse_prefill(*args)                  # warm-up off the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.dms.sparse_prefill(*args)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


@pytest.mark.cuda
def test_cuda_graph_capture_and_replay():
    _assert_graph_replay_equals_eager(_small_inputs(1))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    torch.library.opcheck(torch.ops.dms.sparse_prefill, _small_inputs(2, device=device))


# -------------------------------------------------------------------------------------------
# Short chunks (T = 1 .. 16 tokens per sequence: speculative verification, MTP, multi-token
# decode). A call whose chunks hold <= 16 tokens on average takes the small-chunk kernel on CUDA
# (csrc/kernels/sparse_prefill_small.cu: G x T rows of a KV head in the MMA M dimension, keys
# streamed once, stream-K split with a merge); the CPU twin is the same code as above. Rows
# per work row are 16, 32 or 64 (G * T), so G 16 x T 16 takes four groups of 64 rows.

SMALL_HIST = [0, 1, 17, 300, 1500, 64, 129]


@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 8, 11, 16])
@pytest.mark.parametrize("group", [1, 3, 4, 5, 16])
@pytest.mark.parametrize("device", DEVICES)
def test_small_chunks(T, group, device):
    # Different T per sequence (the average stays <= 16) over very different cache lengths,
    # an empty cache first.
    chunks = [T, max(1, T - 1), T, 1, T, min(16, T + 3), T]
    run_case(f"small T={T} G={group}", hist=SMALL_HIST, chunks=chunks, hkv=2, group=group,
             d=128, window=64, rate=0.8, seed=100 * T + group, device=device)


@pytest.mark.parametrize("T", [1, 4, 16])
@pytest.mark.parametrize("dtype,d", [(torch.float16, 64), (torch.bfloat16, 64),
                                     (torch.float16, 128), (torch.bfloat16, 256),
                                     (torch.float16, 256)])
@pytest.mark.parametrize("device", DEVICES)
def test_small_chunks_dtypes_head_dims(T, dtype, d, device):
    run_case(f"small T={T} {dtype} D={d}", hist=[40, 700, 3], chunks=[T, T, T], hkv=3, group=4,
             d=d, window=32, rate=0.7, dtype=dtype, seed=T + d, device=device)


@pytest.mark.parametrize("window", [1, 2, 5, 8, 15, 16, 17, 600])
@pytest.mark.parametrize("T", [2, 7, 16])
@pytest.mark.parametrize("device", DEVICES)
def test_small_chunks_cross_the_window(window, T, device):
    # Histories around the window: flagged ring entries that the chunk's later queries no longer
    # see (t - p > w), the pending flag of position n - 1 (the chunk's first logit), a ring not
    # yet full (n < w + 1), and chunk keys that leave the window inside the chunk (T > w).
    hist = [window - 1, window, window + 1, window + 2, 2 * window + 3, 3, 0]
    run_case(f"small cross w={window} T={T}", hist=hist, chunks=[T] * len(hist), hkv=2, group=3,
             d=64, window=window, rate=0.9, seed=window * 31 + T, device=device)


@pytest.mark.parametrize("rate", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("device", DEVICES)
def test_small_chunks_eviction_rates(rate, device):
    run_case(f"small rate {rate}", hist=[200, 513, 90], chunks=[4, 4, 9], hkv=2, group=5, d=128,
             window=16, rate=rate, seed=int(rate * 10) + 7, device=device)


@pytest.mark.parametrize("block_size", [1, 7, 16, 64])
@pytest.mark.parametrize("device", DEVICES)
def test_small_chunks_block_boundaries(block_size, device):
    # Cache lengths on and around block (and 64-key tile) boundaries; any block size, also not
    # a power of two.
    hist = [63, 64, 65, 127, 128, 129, 1]
    run_case(f"small block_size {block_size}", hist=hist, chunks=[4, 3, 16, 1, 8, 4, 2], hkv=2,
             group=4, d=64, window=8, rate=0.95, block_size=block_size, seed=block_size,
             device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_small_chunks_skewed_lengths(device):
    # One long head among short ones: the stream-K plan cuts the long rows over several CTAs
    # and the merge combines the pieces.
    hist = [6000, 2, 40, 0, 3000, 9]
    run_case("small skewed", hist=hist, chunks=[4, 4, 4, 1, 16, 4], hkv=2, group=4, d=128,
             window=128, rate=0.9, block_size=32, seed=77, device=device)


@pytest.mark.parametrize("group", [1, 7])
@pytest.mark.parametrize("device", DEVICES)
def test_small_chunks_with_one_long_chunk(group, device):
    # A mixed call (one prompt chunk among one-token decodes, <= 16 tokens per chunk on average):
    # the small-chunk kernel takes it and cuts the long chunk into row groups; with a window
    # above 64, its ring positions that a query can no longer see outnumber the shared list.
    hist = [600, 5, 0, 300, 1200, 1, 77, 64, 2, 3, 150, 0, 9, 700, 31, 8]
    chunks = [120] + [1] * 15
    run_case(f"small + long G={group}", hist=hist, chunks=chunks, hkv=2, group=group, d=64,
             window=100, rate=0.8, seed=5 + group, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_small_chunks_many_sequences(device):
    # 64 sequences of T = 1 .. 16 in one call (graph-capturable: nothing read on the host).
    rng = random.Random(3)
    hist = [rng.choice([0, 1, 30, 200, 900]) for _ in range(64)]
    chunks = [rng.randint(1, 16) for _ in range(64)]
    run_case("small 64 sequences", hist=hist, chunks=chunks, hkv=2, group=4, d=128, window=32,
             rate=0.85, seed=9, device=device)


@pytest.mark.parametrize("hkv", [33, 40])
@pytest.mark.parametrize("device", DEVICES)
def test_small_chunks_long_runs_of_unused_rows(hkv, device):
    # Chunks of 4 tokens at G 1 fill 4 of the 16 rows of a query slot, and every 4th chunk owns a
    # slot it does not use (prefill_slots.cuh): with 33 / 40 KV heads that is a run of 33 / 40
    # unused work rows, so a CTA's walk skips past it in two 32-row search rounds (next_row).
    hist = [300, 5, 40, 700, 9, 64, 0, 129, 17]
    run_case(f"small unused-row runs H={hkv}", hist=hist, chunks=[4] * len(hist), hkv=hkv, group=1,
             d=64, window=16, rate=0.8, seed=hkv, device=device)


@pytest.mark.cuda
def test_small_chunks_cuda_graph_capture_and_replay():
    # Chunks of 4, 1 and 16 tokens (the small-chunk kernel): the plan is made on the device, so
    # a replay recomputes it from whatever the state holds.
    # Eager's values on these shapes are held to the oracle's error bound by the small-chunk
    # run_case tests.
    _assert_graph_replay_equals_eager(_small_inputs(4, T=(4, 1, 16)))


# -------------------------------------------------------------------------------------------
# Edges of the sm_90a kernel (sparse_prefill_sm90.cu, dispatched on Hopper): 128-row query tiles
# of (token, head) rows, 128-key tiles, the four key segments, several chunks per launch.

@pytest.mark.parametrize("length,group", [(127, 1), (128, 1), (129, 1), (255, 1), (257, 1),
                                          (31, 4), (32, 4), (33, 4), (95, 4), (16, 8), (17, 8),
                                          (43, 3), (77, 5), (200, 6)])
@pytest.mark.parametrize("device", DEVICES)
def test_v2_query_tile_edges(length, group, device):
    run_case(f"v2 tile L={length} G={group}", hist=[130], chunks=[length], hkv=2, group=group,
             d=128, window=24, rate=0.6, block_size=16, seed=length * 7 + group, device=device)


@pytest.mark.parametrize("hist", [127, 128, 129, 256, 383])
@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("device", DEVICES)
def test_v2_cached_key_tile_and_block_boundaries(hist, block_size, device):
    # Cached slots end exactly on / around a 128-key tile and a block; ring of 65 flagged-heavy.
    run_case(f"v2 cache hist={hist} bs={block_size}", hist=[hist], chunks=[70], hkv=2, group=4,
             d=64, window=64, rate=0.8, block_size=block_size, seed=hist + block_size,
             device=device)


@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("device", DEVICES)
def test_v2_unequal_chunks_and_empty_caches(group, device):
    # Very unequal chunks in one launch; fresh rows (every head's cache empty) next to long ones.
    hist = [0, 900, 0, 3, 260, 0]
    chunks = [1, 300, 129, 2, 5, 40]
    run_case(f"v2 unequal G={group}", hist=hist, chunks=chunks, hkv=2, group=group, d=128,
             window=32, rate=0.7, block_size=32, seed=40 + group, device=device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("device", DEVICES)
def test_v2_all_kept_and_all_flagged(dtype, d, device):
    # rate 0: every key tile fully visible (the unmasked path); rate 1: only the window band.
    for rate in (0.0, 1.0):
        run_case(f"v2 rate={rate} {dtype} D={d}", hist=[400], chunks=[300], hkv=1, group=4, d=d,
                 window=40, rate=rate, dtype=dtype, block_size=64, seed=d, device=device)


@pytest.mark.cuda
@pytest.mark.parametrize("group", [1, 4, 5, 8])
def test_v2_long_unequal_batch(group):
    hist = [0, 5000, 17, 1200]
    chunks = [3000, 1, 2048, 700]
    run_case(f"v2 long unequal G={group}", hist=hist, chunks=chunks, hkv=2, group=group, d=128,
             window=512, rate=0.85, block_size=64, seed=group, check_cpu=False)


@pytest.mark.cuda
@pytest.mark.parametrize("d,dtype", [(128, torch.bfloat16), (64, torch.float16)])
def test_v2_long_prompt_chunked_into_cache(d, dtype):
    """A 16k prompt in four 4k chunks: sparse_prefill then append per chunk, as an engine runs
    it; every chunk against the oracle over the whole prefix (a subset of rows, to keep the
    float64 oracle short)."""
    device = "cuda"
    hkv, group, window, bs, chunk, n_chunks = 2, 4, 512, 64, 4096, 4
    hq, N = hkv * group, chunk * n_chunks
    gen = torch.Generator().manual_seed(16)
    st = State(2, hkv, d, window, bs, hkv * N // bs + 4, N // bs, dtype, device, gen)
    q = torch.randn(N, hq, d, generator=gen).to(dtype)
    k = torch.randn(N, hkv, d, generator=gen).to(dtype)
    v = torch.randn(N, hkv, d, generator=gen).to(dtype)
    lg = make_logits(gen, N, hkv, 0.9)
    slots = torch.tensor([1], dtype=torch.int32, device=device)
    cu = torch.tensor([0, chunk], dtype=torch.int32, device=device)
    scale = 1.0 / math.sqrt(d)
    for c in range(n_chunks):
        sl = slice(c * chunk, (c + 1) * chunk)
        qc, kc, vc, lc = (t[sl].contiguous().to(device) for t in (q, k, v, lg))
        poison_allocator(((qc.numel(),), dtype))
        out = torch.ops.dms.sparse_prefill(qc, kc, vc, lc, slots, cu, *st.tensors(), scale)
        torch.cuda.synchronize()
        rows = list(range(c * chunk, c * chunk + 256)) + list(range((c + 1) * chunk - 256, (c + 1) * chunk))
        end = (c + 1) * chunk
        ref, _, tol, _ = dms_bound(q[:end], k[:end], v[:end], lg[:end], window, scale, rows=rows,
                                   device=device)   # the float64 oracle on the GPU (CPU: ~80 s a chunk)
        local = torch.tensor(rows) - c * chunk
        got = out.cpu()[local]
        print(f"[prefill] chunked 16k D={d} chunk {c}: max|out-ref| "
              f"{(got.double() - ref).abs().max().item():.3e}  max err / bound "
              f"{bound_violations(got, ref, tol)[1]:.3g}")
        assert_within_bound(got, ref, tol, f"chunked 16k D={d} chunk {c}")
        st.append(kc, vc, lc, [1], [chunk])
