// Query-tile slots of a packed sparse_prefill call, shared by its three kernels (the mma.sync
// kernel in sparse_prefill.cu, the sm_90a kernel's scheduler, the short-chunk kernel). With
// `rows` query rows (token * G + head) per tile, chunk c owns slots [slot_start(c),
// slot_start(c + 1)), slot_start(c) = floor(cu_seqlens[c] * G / rows) + c: strictly increasing
// in c, with room for the chunk's ceil(L * G / rows) tiles, and a grid of
// floor(total_tokens * G / rows) + num_seqs slots covers every chunk. Device code only.
#pragma once
#include <cstdint>

#include "dms/params.h"

namespace dms {
namespace prefill_slots {

// Chunk c's first slot from its first token `start` (cu[c]).
__device__ __forceinline__ int64_t slot_start_at(int start, int c, int G, int rows) {
  return (int64_t)start * G / rows + c;
}
// cu: the call's cu_seqlens, or a copy of it (e.g. in shared memory), num_seqs + 1 entries.
__device__ __forceinline__ int64_t slot_start(const int32_t* cu, int c, int G, int rows) {
  return slot_start_at(cu[c], c, G, rows);
}
__device__ __forceinline__ int64_t slot_start(const SparsePrefillParams& p, int c, int G, int rows) {
  return slot_start(p.cu_seqlens, c, G, rows);
}

// The chunk owning `slot`: -1 when there is none (no chunks, or before chunk 0's first slot).
__device__ __forceinline__ int chunk_of_slot(const int32_t* cu, int num_seqs, int64_t slot, int G, int rows) {
  if (num_seqs <= 0 || slot_start(cu, 0, G, rows) > slot) return -1;
  int lo = 0, hi = num_seqs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (slot_start(cu, mid, G, rows) <= slot) lo = mid; else hi = mid - 1;
  }
  return lo;
}
__device__ __forceinline__ int chunk_of_slot(const SparsePrefillParams& p, int64_t slot, int G, int rows) {
  return chunk_of_slot(p.cu_seqlens, p.num_seqs, slot, G, rows);
}

}  // namespace prefill_slots
}  // namespace dms
