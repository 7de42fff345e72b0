// sparse_prefill v2 (sm_90a): the producer warpgroup. Resolves, per key of a key tile, where
// the key lives (cache row or chunk row) and its visibility interval [a, b] (query i sees it
// iff a <= i <= b; the rule of sparse_prefill.cu's load_k, unchanged), then gathers the K and V
// rows with cp.async straight into the 128-byte-swizzled GMMA layout and signals the stage's
// mbarrier when they land. One thread per key (kBlockN = 128 = the warpgroup; at kBlockN 64 two,
// each copying half the row); the 16-byte chunks of a key row are copied by the lanes of a warp
// that resolved it (shuffles), so a warp reads whole rows (or halves).
#pragma once
#include <climits>
#include <cstdint>

#include "dms/params.h"
#include "kernels/prefill_sm90/gmma.cuh"
#include "kernels/prefill_sm90/scheduler.cuh"
#include "kernels/primitives.cuh"

namespace dms {
namespace sm90 {

// Source row (element row of k_cache / k, -1: none, zero-filled) and visibility interval of
// key `key` of key tile `tile`.
template <int kBlockN>
__device__ __forceinline__ void resolve_key(const SparsePrefillParams& p, const PrefillWs& ws,
                                            const TileCtx& x, int g, int tile, int key,
                                            int& mrow, int& ma, int& mb) {
  const int H = p.kv.num_kv_heads, w = p.state.window;
  mrow = -1; ma = INT_MAX; mb = INT_MIN;
  const long long ch = (long long)x.c * H + g;
  // The row of slot s in the pool, or (fp8 pools, compact layout) in the dequantized blocks.
  auto cache_row = [&](int s) -> int {
    const int32_t* bt = p.state.pages.block_table +
                        ((long long)x.r * H + g) * p.state.pages.max_blocks_per_head;
    const int bs = p.kv.block_size;
    const int blk = bt[s / bs];
    if (blk < 0 || blk >= p.kv.num_blocks) return -1;
    if (ws.pre_compact) return (int)((ch * p.state.pages.max_blocks_per_head + s / bs) * bs + s % bs);
    return blk * bs + s % bs;
  };
  if (tile < x.end_cached) {
    const int s = tile * kBlockN + key;
    if (s < x.seq_len) {
      mrow = cache_row(s);
      const uint32_t* bm = ws.bitmap + ch * ws.cap_words;
      if (mrow >= 0 && !((bm[s >> 5] >> (s & 31)) & 1u)) { ma = 0; mb = INT_MAX; }
    }
  } else if (tile < x.end_flagged) {
    const int m = (tile - x.end_cached) * kBlockN + key;
    if (m < x.num_flagged) {
      const int2 e = ws.flist[ch * (long long)(w + 1) + m];
      mrow = cache_row(e.x);
      if (mrow >= 0) { ma = 0; mb = e.y + w - x.n; }  // t - p <= w  <=>  i <= p + w - n
    }
  } else if (tile < x.end_kept) {
    const int m = (tile - x.end_flagged) * kBlockN + key;
    if (m < x.num_kept) {  // (TMA from the compacted keys: the row is not needed)
      mrow = x.kept_row >= 0 ? 0 : (x.start + ws.idx[(long long)g * p.total_tokens + x.start + m]) * H + g;
      ma = 0; mb = INT_MAX;
    }
  } else {
    const int j = x.band_start + (tile - x.end_kept) * kBlockN + key;
    if (j < x.i1) {
      mrow = (x.start + j) * H + g;
      const bool flagged = j < x.L - 1 && p.logits[(long long)(x.start + j + 1) * H + g] > 0.f;
      ma = j; mb = flagged ? j + w : INT_MAX;
    }
  }
}

// Which key and 16-byte chunk column of a [kBlockN][D] tile a producer lane moves. kParts
// producer threads share a key (thread t resolved key t % kBlockN): warp w moves keys
// (w % (kBlockN / 32)) * 32 + [0, 32), chunks part w / (kBlockN / 32) of kParts, kPasses passes
// of kKeysPerPass keys, kChunkIters chunks of its key per lane and pass; the row of key kw of the
// warp is shfl(mrow, kw).
template <int D, int kBlockN, int kParts>
struct RowChunks {
  static_assert(kParts * kBlockN == 128, "one producer warpgroup");
  static constexpr int kChunks = D / 8 / kParts;            // 16-byte chunks of a row this warp moves
  static constexpr int kLanesPerKey = kChunks >= 32 ? 32 : kChunks;
  static constexpr int kKeysPerPass = 32 / kLanesPerKey;
  static constexpr int kPasses = 32 / kKeysPerPass;
  static constexpr int kChunkIters = kChunks / kLanesPerKey;
  // The key (within the warp's 32) of this lane in pass `pass`.
  static __device__ __forceinline__ int kw(int pass, int lane) { return pass * kKeysPerPass + lane / kLanesPerKey; }
  // Its key in the tile, and its chunk column in chunk iteration ci.
  static __device__ __forceinline__ int key(int kw, int warp) { return (warp % (kBlockN / 32)) * 32 + kw; }
  static __device__ __forceinline__ int c16(int ci, int warp, int lane) {
    return (warp / (kBlockN / 32)) * kChunks + lane % kLanesPerKey + ci * kLanesPerKey;
  }
};

// Copies rows into a [kBlockN][D] tile at shared address `dst` (RowChunks' lanes).
template <typename T, int D, int kBlockN, int kParts>
__device__ __forceinline__ void copy_rows(uint32_t dst, const T* src, int mrow, int warp, int lane) {
  using RC = RowChunks<D, kBlockN, kParts>;
#pragma unroll 4
  for (int pass = 0; pass < RC::kPasses; ++pass) {
    const int kw = RC::kw(pass, lane);
    const int row = __shfl_sync(0xffffffffu, mrow, kw);
    const int key = RC::key(kw, warp);
#pragma unroll
    for (int ci = 0; ci < RC::kChunkIters; ++ci) {
      const int c16 = RC::c16(ci, warp, lane);
      const T* gp = row >= 0 ? src + (long long)row * D + c16 * 8 : src;
      dev::cp_async16(dst + tile_off<kBlockN>(key, c16), gp, row >= 0);
    }
  }
}

}  // namespace sm90
}  // namespace dms
