// dms_ext public C++ API: CUDA entry points. Each takes a params struct (params.h) whose
// pointers are device memory and launches on `stream`; nothing here synchronizes the host,
// allocates, or plans on the host, so every call can be captured in a CUDA graph.
// Errors are returned as dms::Status, never thrown.
//
// This is the only way into the kernels: the torch ops (csrc/torch/ops_cuda.cpp) fill the same
// structs and call these functions on the current torch stream. Link dms::kernels (CMake:
// find_package(dms CONFIG)); csrc/examples/decode_example.cpp drives a whole serving loop.
//
// Contract shared by every entry point
// ------------------------------------
// Memory. Every pointer in the struct is device memory of the current device (cudaSetDevice),
// owned by the caller; the library allocates nothing, not even scratch: sparse_decode and
// sparse_prefill take a caller-sized `workspace` (see their *_workspace_bytes). cudaMalloc'd
// buffers satisfy every alignment below (256 bytes). Layouts and the state tensors are those of
// params.h (docs/layout.md): each struct is built from the shared pieces KVPool, PageTable,
// DMSState and FreeList, so an engine fills those once per layer and assigns them; strides are
// in elements.
//
// Support. What each entry point implements (dtypes, head_dims, block sizes) is the table of
// capabilities.h, queried with dms::supported(op, Device::kCUDA, ...); a request outside it
// returns kUnsupported. sparse_decode and sparse_prefill: float16 / bfloat16 only.
// FP8 pools (KVPool::dtype kFloat8E4M3, the op's act_dtype float16 / bfloat16 for q / k / v /
// out): sparse_decode, sparse_prefill, append, decode_step and fork have fp8 kernels (a value
// reads as stored * k_scale / v_scale; writes store saturate(x / scale)); a scale that is not
// finite and > 0, or other than 1 on a non-fp8 pool, is kInvalidArgument (fork and release
// ignore the scales). sparse_prefill over an fp8 pool runs its mma.sync kernel (v2, the sm_90a
// wgmma kernel, takes float16 / bfloat16 pools).
//
// Stream. The call reads the struct on the host, validates sizes and pointers (never device
// data), enqueues its kernels on `stream` (0, cudaStreamPerThread or any stream) and returns
// at once; the struct may be reused or destroyed right after. Device data (seq_lens,
// num_tokens, block tables, inputs) is read when the kernels run, so it may be produced by
// earlier work on the same stream; outputs are ready when that stream's work is. Calls that
// write one pool's state (append, decode_step, fork, release) and calls that read it
// (sparse_decode, sparse_prefill) must be ordered by the caller: one stream, or events.
//
// Graphs. No call synchronizes, allocates, copies host data or reads device data on the host,
// so each can be captured (the torch tests capture sparse_decode, decode_step and
// sparse_prefill with torch.cuda.graph; the example captures decode_step + sparse_decode in
// cudaStreamCaptureModeGlobal). A captured call keeps its params: pointers, sizes, scale,
// dtype, and the grid size sparse_decode derived from them. Replays read the pointed-to
// device data anew, so the state may grow between replays (the decode loop); a different batch
// size, new buffers or a different pool need a new capture. Host-side CUDA calls made inside
// an entry point: cudaGetDevice / cudaDeviceGetAttribute (sparse_decode: SM count) and
// cudaFuncSetAttribute (kernels with more than 48 KB of shared memory); all legal during
// capture. Make one eager call per process and device before capturing anyway: the first
// call loads the module.
//
// Status. Host-side checks run before anything is enqueued: kInvalidArgument (a size, pointer,
// alignment or stride out of contract) and kUnsupported (a valid request this build has no
// kernel for: outside the capabilities.h table, or a size limit below) leave device memory
// untouched. kCudaError: a launch failed (configuration, no kernel image for this GPU, or a
// sticky error of earlier work: the check is cudaGetLastError, which also clears non-sticky
// errors); part of the call may already be enqueued, so treat the state it writes as lost.
// Device-side failures depend on data and cannot be returned without a sync: append and
// decode_step report them in the optional `error` word (int32 device memory the caller zeroes;
// a failing token stores int(Status): kOutOfBlocks when the free stack ran dry,
// kInvalidArgument for inconsistent state or a position without a cos/sin row), and the rows
// they hit are then in an unspecified state. The device path is not all-or-nothing (the CPU
// twins are): reserve instead. Appending n tokens pops at most ceil(n / block_size) blocks per
// (row, KV head), a decode step at most one; keep *free.top at least that (dms_ext.DMSCache
// does this bookkeeping on the host, see dms_ext/cache.py).
// sparse_decode and sparse_prefill trust seq_lens <= max_blocks_per_head * block_size and
// block ids < num_blocks for the slots they read.
//
// The CPU twins (cpu.h) take the same structs with host pointers, validate device-side data
// as well, are all-or-nothing, and are the reference the kernels are tested against.
#pragma once
#include <cuda_runtime_api.h>
#include "dms/capabilities.h"
#include "dms/params.h"
#include "dms/validate.h"

namespace dms {

// sparse_decode: one query token per batch entry, attention over the slots of (b, h / G).
//   dtype bf16 or fp16; head_dim 64, 128 or 256; block_size a power of two (capabilities.h);
//   any G = num_q_heads / kv.num_kv_heads >= 1. Entry b reads row b of `pages` (rows = batch,
//   contiguous): an engine whose batch is a subset of its state rows gathers those rows of
//   its block table and seq_lens first (the example does, with cudaMemcpyAsync).
//   q is read with 16-byte copies: q 16-byte aligned, q_stride_b and q_stride_h multiples of
//   8 elements; k_cache / v_cache 16-byte aligned. out is written per element (any strides).
//   An empty head (seq_lens 0) gives zeros and lse -inf. lse is optional (null: not written).
//   The kernel is persistent and length-balanced: every CTA scans seq_lens on the device and
//   takes its equal range of the (row, 64-key tile) work, one range per resident CTA (with at
//   most 16 work rows, one piece of one row per CTA); rows cut between CTAs are merged in fp32
//   by a merge kernel (two launches, chained with programmatic dependent launch; no host plan,
//   no sync).
// Bytes of scratch sparse_decode needs for these sizes (the cut rows' partials;
// params.max_splits and params.min_chunk resolved as the launcher resolves them). Depends on
// sizes only, never on seq_lens, so a caller can allocate once and reuse it across graph
// replays. num_sms MUST be the multiprocessor count of the device the call runs on
// (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device)): the launcher derives
// the grid from that device, and a smaller num_sms here under-sizes the scratch.
// Required (> 0 bytes) whenever batch > 0. The scratch holds nothing between calls.
size_t sparse_decode_workspace_bytes(const SparseDecodeParams& p, int num_sms);
Status sparse_decode(const SparseDecodeParams& p, cudaStream_t stream);

// eviction_rope: borrowed-neuron logits + channel zeroing + rotate-half RoPE of q and k in
// place (docs/semantics.md). float32, fp16, bf16; head_dim even; positions < max_position.
// (Its struct carries its own sizes: it touches no pool.)
Status eviction_rope(const EvictionRopeParams& p, cudaStream_t stream);

// append: packed chunks (>= 1 token each, cu_seqlens[0] = 0, cu_seqlens[n] = total_tokens,
// distinct state rows in `rows`) go into the cache with the delayed-eviction rule; k, v,
// logits are [total_tokens, ...] inputs (k after RoPE). float32, fp16, bf16; any head_dim;
// max_blocks_per_head * block_size <= 2^30 (else kUnsupported). Reserve blocks first (see
// Status above).
Status append(const AppendParams& p, cudaStream_t stream);

// sparse_prefill: attention of packed chunks over (cache as it is) + (the chunk itself),
// visibility rule of docs/semantics.md. Call it BEFORE append of the same chunk: it reads the cache, never
// writes it, and takes the chunk's own keys from k / v. bf16 or fp16; head_dim 64, 128 or 256; any
// block_size;
// q, k, v, k_cache, v_cache, out and workspace 16-byte aligned (else kInvalidArgument);
// q, k, v, out contiguous.
// Bytes of scratch sparse_prefill needs (p.workspace): depends on total_tokens, num_seqs,
// num_q_heads, num_kv_heads, head_dim, window, max_blocks_per_head * block_size,
// small_chunks and the current device's SM count only (never on device data); with an fp8 pool
// on the sm_90 kernel also num_blocks: it then holds the blocks the call's rows hold, both pools,
// dequantized to the compute dtype, written once per call (2 * B * block_size * head_dim * 2
// bytes, B = num_seqs * num_kv_heads * max_blocks_per_head when that is fewer than num_blocks,
// else num_blocks). On the sm_90 kernel it also holds the chunks' kept keys compacted for TMA:
// 2 * (total_tokens + 128 * num_seqs) * num_kv_heads * head_dim * 2 bytes. The workspace is
// required (never null) whenever the call has tokens; it holds nothing between calls.
// Calls of short chunks (total_tokens <= 16 * num_seqs, small_chunks != 0) take a decode-style
// kernel (stream-K over the heads' keys); the others the tiled prefill kernel.
size_t sparse_prefill_workspace_bytes(const SparsePrefillParams& p);
Status sparse_prefill(const SparsePrefillParams& p, cudaStream_t stream);

// fork: row dst (empty: never used, or released) becomes an independent copy of row src;
// pops ceil(seq_lens[src, g] / block_size) blocks per KV head and copies their K/V (any dtype:
// raw bytes). No error word: a head the free list cannot serve is left empty in dst, so check
// capacity first.
// release: the row's blocks go back to the free list, its state is cleared. The row must be
// consistent (its seq_lens and block table as append left them). Of its KVPool only
// num_kv_heads, block_size and num_blocks are read.
Status fork(const ForkParams& p, cudaStream_t stream);
Status release(const ReleaseParams& p, cudaStream_t stream);

// decode_step: one token for each of `batch` distinct state rows (`rows`), fused: optional q/k
// RMSNorm, logit (borrowed neuron, or logits_in), RoPE at position num_tokens[row] (read on
// the device; must be < max_position), eviction bookkeeping, K/V write. q is updated in place
// and is then what sparse_decode wants; k and v are not written. float32, fp16, bf16; head_dim
// even; num_kv_heads * head_dim * 2 * dtype size must fit in 48 KB of shared memory
// (kUnsupported otherwise). Pops at most one block per (row, KV head).
Status decode_step(const DecodeStepParams& p, cudaStream_t stream);

// validate: the data checks of dms/validate.h on the device, for an op's validate_params(p)
// (device pointers), BEFORE that op is enqueued on the same stream. Writes the first violation
// into *report (device memory, sizeof(ValidationReport), any contents): report->violation is
// kNone (0) when the data is good. Read it back (a sync) and dms::describe() it; the op must not
// be launched on bad data. Two small kernels and a memset, no host sync; capturable, though
// reading the report back is not. The torch CUDA ops run it when DMS_VALIDATE=1.
Status validate(const ValidateParams& p, ValidationReport* report, cudaStream_t stream);

}  // namespace dms
