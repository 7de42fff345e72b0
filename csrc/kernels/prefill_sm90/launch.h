// sparse_prefill v2 (sm_90a, csrc/kernels/sparse_prefill_sm90.cu): the entry the launcher of
// sparse_prefill.cu dispatches to. The workspace is the one prepare_kernel fills (compacted kept
// chunk keys, flagged ring slots), handed over as plain pointers.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "dms/params.h"

namespace dms {
namespace sm90 {

struct PrefillWs {
  int32_t* cnt;        // [Hkv][T + n] prefix counts of kept chunk keys (chunk c at cu[c] + c)
  int32_t* idx;        // [Hkv][T] compacted kept chunk keys (chunk c at cu[c])
  uint32_t* bitmap;    // [n][Hkv][cap_words] flagged ring slots
  int2* flist;         // [n][Hkv][w + 1] (slot, position) of the flagged ring slots
  int32_t* fcount;     // [n][Hkv]
  long long cnt_stride;
  long long cap_words;
  // fp8 pools: the blocks the call's rows hold, dequantized to the compute dtype T (stored
  // values, exact; the scales stay with the kernel) by dequant_pools; null otherwise. Two
  // layouts of [blocks, block_size, head_dim] each, from sizes only (pre_compact): compact,
  // block j of (chunk c, kv head g) at (c * Hkv + g) * max_blocks_per_head + j, when that is
  // fewer blocks than the pool; else at its block id in the pool.
  void* kpre = nullptr;
  void* vpre = nullptr;
  bool pre_compact = false;
  // The kept chunk keys in T, compacted per (kv head, chunk) for TMA (compact_kept): [Hkv][rows]
  // [head_dim] each, rows = T + kKeptPad * n; chunk c's kept key m (idx order) of head g at row
  // cu[c] + kKeptPad * c + m; null when v2 does not take the call.
  void* ck = nullptr;
  void* cv = nullptr;
};

// Rows after a chunk's compacted kept keys (a kept tile's box reads up to a key tile past the
// list; they are zeroed: masked scores give P = 0, and 0 * NaN would still poison P V).
constexpr int kKeptPad = 128;

// Whether chunk c's kept keys are compacted (its kept tiles then come by TMA): more than 1 / 32
// of its keys evicted. At <= 1 / 32 every query tile's kept list merges into the band
// (make_tile) or nearly so, and copying the chunk's keys would cost more than it saves.
__host__ __device__ inline bool kept_compacted(int kept, int L) { return (long long)(L - kept) * 32 > L; }

// Rows of one head in a compacted kept-key buffer: every chunk's keys and its kKeptPad rows.
inline long long kept_rows(const SparsePrefillParams& p) {
  return (long long)p.total_tokens + (long long)kKeptPad * p.num_seqs;
}

// Bytes of one compacted kept-key buffer (PrefillWs::ck or cv) when v2 takes the call, else 0.
size_t kept_bytes(const SparsePrefillParams& p);

// Whether the dequantized blocks take the compact layout (PrefillWs::pre_compact).
inline bool pre_compact(const SparsePrefillParams& p) {
  return (long long)p.num_seqs * p.kv.num_kv_heads * p.state.pages.max_blocks_per_head < p.kv.num_blocks;
}

// Bytes of one dequantized pool (kpre or vpre) for this call when v2 takes an fp8-pool call, else
// 0: block_size * head_dim elements of the compute dtype per block of its layout (pre_compact).
size_t pre_pool_bytes(const SparsePrefillParams& p);

// Whether v2 takes this call: an sm_90 device, bf16 / fp16 pool, a head_dim it is built for,
// and DMS_PREFILL_V2 not set to 0 (read once per process).
bool prefill_v2_supported(const SparsePrefillParams& p);

// Launches the v2 kernel (after prepare_kernel on the same stream). fp8 pools: first converts
// the blocks the call's rows hold (block_table entries below ceil(seq_lens / block_size)) into
// ws.kpre / ws.vpre, once per call, so the producer gathers T rows with cp.async as for a T pool
// instead of converting every cached tile in every work item that reads it.
Status sparse_prefill_v2(const SparsePrefillParams& p, const PrefillWs& ws, cudaStream_t stream);

}  // namespace sm90
}  // namespace dms
