// sparse_decode (csrc/kernels/sparse_decode.cu): the launch shape. Tile sizes, the pipelines'
// stages and residency per head dim and pool dtype (Cfg), the workspace layout, and what the host
// resolves from sizes (Resolved). Device code only; no torch.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/streamk.cuh"

namespace dms {
namespace decode {

constexpr int kHeadTile = 16;   // query heads of one work row (MMA N: one or two n-tiles of 8)
constexpr int kWarps = 4, kThreads = kWarps * 32;
constexpr int kTileKeys = 16 * kWarps;  // keys per pipeline tile: 16 per warp
// Scheduling units charged per work row besides its tiles: the query load, the warp merge and
// the epilogue of a segment.
constexpr int kRowCost = 1;

// F8: the pool is fp8 e4m3. Each warp's stages then hold fp8 slices (half the bytes of a
// bf16 / fp16 slice) that the MMA path reads directly, no converted copy in shared memory:
// ldmatrix (b16 elements = byte pairs) hands each lane 4 bytes, converted in registers
// (e4m3 -> bf16 / fp16 is exact). K: a lane gets 4 consecutive d of one key, so the MMA's
// contraction index runs over d in a permuted order, and Q's A fragment is loaded in the same
// order (a dot product does not depend on the order of its terms). V: ldmatrix.trans gives
// two keys x two d per lane; a byte permute makes key pairs, one for the even d and one for
// the odd d of the 16-d block, so the two n-tiles of a block hold the even and the odd d
// (merge_warps writes them back in place).
// Few work rows (a small batch, e.g. one long reasoning trace): bf16 / fp16 at D 128 take 6
// stages per warp at one CTA per SM (196 KB): the range of a CTA is long, and 5 slices per warp
// in flight hide the memory latency that 3 CTAs of 2 stages each did not. A/B on the H200
// (bench/results/decode_ab_2026-11-30_deep.md): B1 x 128k 0.74-0.89x the time of the 2-stage
// grid, B1 x 32k skewed 0.82x; B >= 8 and B64 x 8k rows 1.01-1.15x slower, hence the row cap.
constexpr int kDeepStages = 6, kDeepMaxRows = 16;
// fp8 pools take the deep pipeline too, at 12 stages (half the bytes per stage, the same 196 KB):
// B1 x 32k / 128k fp8 0.97x the time of 4 stages at 3 CTAs, B >= 16 equal
// (bench/results/decode_ab_2026-11-30_d8deep.md).
constexpr int kDeepStages8 = 12;
template <int D, int S, bool F8 = false> struct Cfg {
  static constexpr int kStages = S;
  static constexpr int kSliceElems = 16 * D;  // one warp's 16 keys of K (or V)
  static constexpr int kKVBytes = F8 ? 1 : 2;  // pool element size
  static constexpr int kStageBytes = 2 * kSliceElems * kKVBytes;     // K + V of one stage
  static constexpr int kWarpBytes = kStages * kStageBytes;
  // The many-CTA pipelines issue the next segment before the warp merge, into a second query
  // buffer; the deep pipelines (one CTA per SM, few rows, mostly one segment per CTA) after the
  // epilogue, into the one buffer: early or late measured the same on the B 1 rows
  // (bench/results/decode_ab_2026-11-30_xseg.md vs _xseg2.md), and late saves 4 KB.
  static constexpr bool kEarlyNext = S != (F8 ? kDeepStages8 : kDeepStages);
  static constexpr int kQBytes = kHeadTile * D * 2;
  static constexpr int kQBuffers = kEarlyNext ? 2 : 1;
  static constexpr int kSmemBytes = kQBuffers * kQBytes + kWarps * kWarpBytes;
  // A warp's fp32 state for the warp merge ([16][D]) lives in its own last kScratchStages
  // stages; the next segment's first kPre slices go to the stages before them, so they can be
  // in flight while the merge and the epilogue of this segment run.
  static constexpr int kScratchBytes = kHeadTile * D * 4;
  static constexpr int kScratchStages = (kScratchBytes + kStageBytes - 1) / kStageBytes;
  static constexpr int kPre = kStages - kScratchStages < kStages - 1 ? kStages - kScratchStages : kStages - 1;
  static_assert(kPre >= 0, "the merge scratch must fit a warp's stages");
  // Resident CTAs per SM on H100/H200 (228 KB shared memory, 1 KB reserved per CTA, 64K
  // registers): the persistent grid. bf16 / fp16 pools as swept; fp8 ones from shared memory,
  // at most 4 (the register budget of 128-thread CTAs at up to 128 registers).
  static constexpr int kBySmem = (228 * 1024) / (kSmemBytes + 1024);
  static constexpr int kCap = F8 ? 4 : (D == 64 ? 4 : (D == 128 ? (S == 2 ? 3 : 2) : 1));
  static constexpr int kCtasPerSm = kBySmem < 1 ? 1 : (kBySmem < kCap ? kBySmem : kCap);
};

// ------------------------------------------------------------------------------------------------
// Workspace: sizes only, never data. The partials are rewritten every call before they are read.
struct Layout {
  int64_t part_o, part_lse, bytes;
};
__host__ __device__ inline int64_t align256(int64_t x) { return (x + 255) & ~int64_t(255); }
__host__ __device__ inline Layout layout(int grid, int D) {
  Layout l;
  l.part_o = 0;                                         // f32 [2 grid][16][D]
  l.part_lse = align256(l.part_o + (int64_t)2 * grid * kHeadTile * D * 4);  // f32 [2 grid][16]
  l.bytes = align256(l.part_lse + (int64_t)2 * grid * kHeadTile * 4);
  return l;
}

// Launch shape resolved on the host from sizes only (never from seq_lens).
struct Resolved {
  int grid, head_tiles, min_units, bs_shift;
  bool deep;       // the deep-pipeline variant (kDeepStages, one CTA per SM): few work rows
  bool aligned;    // few work rows: row-aligned pieces (streamk::locate_rows), one per CTA
  int probe = 0;   // decode_probe.cuh builds: this launch prints its timeline
  int64_t rows_v;  // batch * num_kv_heads * head_tiles
  Layout ws;
};

__device__ __forceinline__ int units_of(int L) {
  return (L > 0 ? (L + kTileKeys - 1) / kTileKeys : 0) + kRowCost;
}

}  // namespace decode
}  // namespace dms
