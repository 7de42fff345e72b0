// dms::sparse_decode v2: a persistent, length-balanced decode over the paged per-head KV layout.
//
// Pieces (top to bottom):
//   Scheduler  every work row (b, g, head tile) costs one unit of fixed work plus one unit per
//              64-key tile; the line of units is cut into `n` equal ranges, one per CTA of the
//              persistent attention kernel, so every CTA gets the same number of tiles whatever
//              the length distribution (stream-K). Each CTA scans seq_lens itself at its start
//              (streamk::locate): no plan kernel, no host plan, no host sync; graph replays may
//              change every length. With few rows (at most 16) every CTA instead takes one
//              piece of one row, the row's share of the grid set by its tiles
//              (streamk::locate_rows): no CTA pays a second row's latencies.
//   Mainloop   a CTA walks its range row segment by row segment. For each segment it loads the
//              group's queries once and streams the segment's keys (the many-CTA pipelines issue
//              the next segment's queries and first slices as soon as a segment's keys are
//              consumed, before its warp merge and epilogue; a segment without keys loads
//              nothing): 4 warps, each with its own
//              16-key slice of every 64-key tile, gathered through the block table by 16-byte
//              cp.async into XOR-swizzled shared memory, in a private kStages-deep pipeline
//              (no CTA-wide barrier in the loop). The whole GQA group rides in the M dimension
//              of m16n8k16 tensor-core MMAs, so each K/V byte is read once per group.
//   Softmax    online softmax per warp in the log2 domain; the 4 warp states merge in shared
//              memory at the end of a segment (each warp's o in its own last stages, one weight
//              per warp and head row, float4 columns).
//   Epilogue   a segment that covers its whole row writes the output (and lse) directly. A row
//              cut by range boundaries gets one fp32 partial (o, lse) per CTA that touches it, at
//              most two per CTA (its first and its last segment), and the attention kernel never
//              waits: a merge kernel combines the partials of every cut row, over many CTAs.
// The merge kernel is launched with programmatic dependent launch, so its launch overlaps the
// attention kernel's tail. The scratch is bounded by the grid, not by the
// lengths: the workspace depends on sizes only (and holds nothing from one call to the next).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <type_traits>

#include "dms/dms.h"
#include "kernels/common.cuh"
#include "kernels/decode_probe.cuh"
#include "kernels/primitives.cuh"
#include "kernels/streamk.cuh"

namespace dms {
namespace {

using dev::cp_async16;
using dev::cp_async_commit;
using dev::cp_async_wait;
using dev::kLog2e;
using dev::launch_pdl;
using dev::pdl_launch_dependents;
using dev::pdl_wait;

constexpr int kHeadTile = 16;   // query heads of one work row (MMA M)
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
// Workspace: sizes only, never data. Everything the scheduler writes is rewritten every call.
struct Layout {
  int64_t cut, part_o, part_lse, bytes;
};
__host__ __device__ inline int64_t align256(int64_t x) { return (x + 255) & ~int64_t(255); }
__host__ __device__ inline Layout layout(int grid, int D) {
  Layout l;
  l.cut = 0;                                            // streamk::CutRow [grid]
  l.part_o = align256((int64_t)grid * sizeof(streamk::CutRow));  // f32 [2 grid][16][D]
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
using streamk::kMergeThreads;

// ------------------------------------------------------------------------------------------------
// Attention kernel pieces.

// dev::e4m3x4_to<__half> as one asm block: the same two cvt.rn.f16x2.e4m3x2 (bytes 0, 1 -> lo,
// bytes 2, 3 -> hi, low half first), but the high pair is read as the register's upper half
// (no shift instruction).
__device__ __forceinline__ void e4m3x4_to_f16(uint32_t x, uint32_t& lo, uint32_t& hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm("{\n .reg .b16 l, h;\n mov.b32 {l, h}, %2;\n cvt.rn.f16x2.e4m3x2 %0, l;\n"
      " cvt.rn.f16x2.e4m3x2 %1, h;\n}\n"
      : "=r"(lo), "=r"(hi)
      : "r"(x));
#else
  dev::e4m3x4_to<__half>(x, lo, hi);  // the intrinsics' emulation below sm_89
#endif
}
template <typename T, int D, int S, bool F8 = false> struct Decode {
  using C = Cfg<D, S, F8>;
  using KV = typename std::conditional<F8, uint8_t, T>::type;  // pool element
  // MMA operand type: fp8 pools compute in f16 whatever q's dtype (e4m3 -> f16 is one exact
  // cvt per pair, -> bf16 four instructions); a bf16 q is rescaled per head row into f16.
  using MT = typename std::conditional<F8, __half, T>::type;
  static constexpr bool kScaledQ = F8 && std::is_same<T, __nv_bfloat16>::value;
  // fp8: the running max the state keeps is the true one minus kPOff, so that P = exp2(s - m)
  // lies in [0, 2^15] (f16 keeps 11 bits of P down to 2^-29 of the max, a bf16 P 8 bits). l
  // and o scale by 2^kPOff with it: o / l and m + log2(l) (the lse) are unchanged.
  static constexpr float kPOff = F8 ? 15.f : 0.f;
  static constexpr int kStages = C::kStages, kSliceElems = C::kSliceElems;
  static constexpr int kQChunks = D / 8;                         // 16-byte chunks of a q row
  static constexpr int kChunkElems = 16 / int(sizeof(KV));       // pool elements per chunk
  static constexpr int kChunks = D / kChunkElems;                // 16-byte chunks per pool row
  static constexpr int kRowsPerLane = 16 * kChunks / 32;         // rows of a slice one lane copies
  static constexpr int kRowStep = 32 / kChunks > 0 ? 32 / kChunks : 1;

  // Per-warp softmax state over the keys it streamed. Accumulator layout (m16n8): c0,c1 -> head
  // row lane/4, c2,c3 -> row lane/4 + 8.
  struct State {
    float o[D / 8][4];
    float m[2], l[2];
  };

  // Chunk offset (in 16-byte chunks) of (row r, chunk c) of a warp's fp8 slice [16][D bytes]:
  // XOR-swizzled so that the 8 lanes of a conversion phase (rows r .. r+7, one chunk column)
  // read 8 different bank groups (D 64: two rows share a 128-byte line).
  static __device__ __forceinline__ int swz8(int r, int c) {
    constexpr int kRowsPerLine = kChunks >= 8 ? 1 : 8 / kChunks;
    constexpr int kMask = (kChunks >= 8 ? 8 : kChunks) - 1;
    return r * kChunks + (c ^ ((r / kRowsPerLine) & kMask));
  }
  // Stage offset (pool elements) of (row r, chunk c) of a slice.
  static __device__ __forceinline__ int stage_off(int r, int c) {
    if constexpr (F8) return swz8(r, c) * 16;
    else return dev::swz<D>(r, c);
  }

  // exp2 of the mainloop's softmax. fp8: ex2.approx.ftz, exp2f's instruction without its
  // subnormal-result fixup (3 instructions): results below 2^-126 become 0, where a P (at most
  // 2^15, packed to f16) rounds to 0 anyway and an alpha leaves 2^-126 of the old state.
  static __device__ __forceinline__ float sexp2(float x) {
    if constexpr (F8) return dev::ex2(x);
    else return exp2f(x);
  }

  // One warp's stream of slices over keys [kbeg, kend) of a row: slice t (16 keys from
  // kbeg + t * kTileKeys + warp * 16) goes to stage t % kStages of the warp's stages sW.
  struct Stream {
    const KV* __restrict__ kc;
    const KV* __restrict__ vc;
    const int32_t* __restrict__ bt;
    KV* stages;
    int kbeg, kend, bs_shift, warp, r0, cc;

    __device__ __forceinline__ Stream(const SparseDecodeParams& p, const int32_t* __restrict__ bt_,
                                      int kbeg_, int kend_, int bs_shift_, unsigned char* sW)
        : kc(reinterpret_cast<const KV*>(p.kv.k_cache)), vc(reinterpret_cast<const KV*>(p.kv.v_cache)),
          bt(bt_), stages(reinterpret_cast<KV*>(sW)), kbeg(kbeg_), kend(kend_), bs_shift(bs_shift_),
          warp(threadIdx.x >> 5), r0(kChunks >= 32 ? 0 : (threadIdx.x & 31) / kChunks),
          cc((threadIdx.x & 31) % kChunks) {}
    __device__ __forceinline__ int ntiles() const {
      return kend > kbeg ? (kend - kbeg + kTileKeys - 1) / kTileKeys : 0;
    }
    __device__ __forceinline__ int slice0(int t) const { return kbeg + t * kTileKeys + warp * 16; }
    // Blocks of >= 16 slots: a slice (16 slots from a multiple of 16) lies in one block, so one
    // block id and one 64-bit base per slice; the lane's rows are constant offsets from it
    // (rows past kend are not read: cp.async zero-fills them). Smaller blocks: an id per row.
    __device__ __forceinline__ bool one_block() const { return bs_shift >= 4; }
    __device__ __forceinline__ int slice_block(int t) const {
      return slice0(t) < kend ? __ldg(bt + (slice0(t) >> bs_shift)) : 0;
    }
    __device__ __forceinline__ void fetch_ids(int t, int (&ids)[kRowsPerLane]) const {
      if (one_block()) {
        ids[0] = slice_block(t);
        return;
      }
      const int s0 = slice0(t) + r0;
#pragma unroll
      for (int n = 0; n < kRowsPerLane; ++n) {
        const int slot = s0 + n * kRowStep;
        ids[n] = slot < kend ? __ldg(bt + (slot >> bs_shift)) : 0;
      }
    }
    __device__ __forceinline__ void load_slice(int t, const int (&ids)[kRowsPerLane]) const {
      if (slice0(t) >= kend) return;  // nothing of this warp in the tail tile
      const int bs_mask = (1 << bs_shift) - 1;
      KV* sK = stages + (t % kStages) * 2 * kSliceElems;
      KV* sV = sK + kSliceElems;
      if (one_block()) {
        const int sl = slice0(t);
        const int64_t base = (((int64_t)ids[0] << bs_shift) + (sl & bs_mask) + r0) * D + cc * kChunkElems;
#pragma unroll
        for (int n = 0; n < kRowsPerLane; ++n) {
          const int r = r0 + n * kRowStep;
          const bool valid = sl + r < kend;
          cp_async16(sK + stage_off(r, cc), kc + base + n * kRowStep * D, valid);
          cp_async16(sV + stage_off(r, cc), vc + base + n * kRowStep * D, valid);
        }
        return;
      }
      const int s0 = slice0(t) + r0;
#pragma unroll
      for (int n = 0; n < kRowsPerLane; ++n) {
        const int r = r0 + n * kRowStep, slot = s0 + n * kRowStep;
        const bool valid = slot < kend;
        const int64_t off =
            valid ? (((int64_t)ids[n] << bs_shift) + (slot & bs_mask)) * D + cc * kChunkElems : 0;
        cp_async16(sK + stage_off(r, cc), kc + off, valid);
        cp_async16(sV + stage_off(r, cc), vc + off, valid);
      }
    }
  };

  // The block ids of a segment's first kStages slices (one block per slice), loaded at once:
  // one memory latency before the first copies, not one per stage.
  struct Pre {
    int id[kStages];
  };
  // The ids of prologue slice t (a compile-time index): from pre (one block per slice) or
  // loaded per row.
  static __device__ __forceinline__ void take_ids(const Stream& w, const Pre& pre, int t, int (&ids)[kRowsPerLane]) {
    if (w.one_block()) ids[0] = pre.id[t];
    else w.fetch_ids(t, ids);
  }

  // The segment's first kPre slices, one cp.async group each (the caller's query copies ride in
  // the first): issued before the previous segment's warp merge and epilogue, so that they are
  // in flight while those run. `pre` keeps the ids of the later prologue slices for mainloop.
  static __device__ __forceinline__ void begin(const Stream& w, Pre& pre) {
    const int ntiles = w.ntiles();
#pragma unroll
    for (int t = 0; t < kStages; ++t) pre.id[t] = w.one_block() && t < ntiles ? w.slice_block(t) : 0;
#pragma unroll
    for (int t = 0; t < C::kPre; ++t) {
      if (t < ntiles) {
        int ids[kRowsPerLane];
        take_ids(w, pre, t, ids);
        w.load_slice(t, ids);
      }
      cp_async_commit();
    }
  }

  // Mainloop: the rest of the segment begun by begin(w, pre), with the head tile's queries in
  // sQ's copy group (the first of begin's). Streams this warp's slices; returns its softmax
  // state (unreduced row sums). An fp8 pool's k_scale is folded into the score scale here;
  // v_scale is applied by the epilogue.
  static __device__ __forceinline__ void mainloop(const SparseDecodeParams& p, const Stream& w, const Pre& pre,
                                                  const T* sQ, State& st) {
    const int lane = threadIdx.x & 31;
    const int ntiles = w.ntiles();
    const int kend = w.kend;
    int ids[kRowsPerLane];
#pragma unroll
    for (int t = C::kPre; t < kStages - 1; ++t) {
      if (t < ntiles) {
        take_ids(w, pre, t, ids);
        w.load_slice(t, ids);
      }
      cp_async_commit();
    }
    if (kStages - 1 < ntiles) take_ids(w, pre, kStages - 1, ids);

#pragma unroll
    for (int j = 0; j < D / 8; ++j) st.o[j][0] = st.o[j][1] = st.o[j][2] = st.o[j][3] = 0.f;
    st.m[0] = st.m[1] = -INFINITY;
    st.l[0] = st.l[1] = 0.f;
    uint32_t qa[D / 16][4];
    float qf[2] = {1.f, 1.f};  // kScaledQ: the per-row factor of the scores (rows lane/4, +8)
    const float sl2 = F8 ? p.scale * p.kv.k_scale * kLog2e : p.scale * kLog2e;

    for (int t = 0; t < ntiles; ++t) {
      __syncwarp();  // every lane is done reading slice t-1 before it is overwritten
      if (t + kStages - 1 < ntiles) {
        w.load_slice(t + kStages - 1, ids);
        if (t + kStages < ntiles) w.fetch_ids(t + kStages, ids);  // lands while this slice computes
      }
      cp_async_commit();
      cp_async_wait<kStages - 1>();  // this lane's copies of slice t (and Q) have landed
      __syncwarp();                  // ... and the other lanes'
      if (t == 0) {
        __syncthreads();  // Q was copied by the whole CTA
        if constexpr (F8) {
          // Block k's contraction index i (lane quad position t: i = 2t, 2t+1, 2t+8, 2t+9)
          // is d = 16k + 4t + {0, 1, 2, 3}: the d order of the K fragments below. a0 / a2 are
          // 4 consecutive d of head row lane/4 (one 8-byte load), a1 / a3 of row lane/4 + 8.
#pragma unroll
          for (int k = 0; k < D / 16; ++k) {
            const int g = lane >> 2, t4 = lane & 3;
            const int c = 2 * k + (t4 >> 1), e = (t4 & 1) * 4;
            const uint2 x0 = *reinterpret_cast<const uint2*>(sQ + dev::swz<D>(g, c) + e);
            const uint2 x1 = *reinterpret_cast<const uint2*>(sQ + dev::swz<D>(g + 8, c) + e);
            qa[k][0] = x0.x;
            qa[k][1] = x1.x;
            qa[k][2] = x0.y;
            qa[k][3] = x1.y;
          }
          if constexpr (kScaledQ) {
            // bf16 q -> f16: head row r times 2^(14 - E_r), E_r = floor(log2 max_d |q_r|)
            // clamped to [-112, 127] (biased exponent field [15, 254]). The scaled row stays
            // below 2^15 (no f16 overflow; inf / NaN stay), and every element within 2^31 of
            // the row's max stays exact (8 significant bits >= 2^-24); smaller ones are off by
            // at most 2^-39 of the max. The scores are scaled back by qf = 2^(E_r - 14), a
            // normal float, exactly: the fp32 sums are the bf16 MMA's times a power of two.
            const uint32_t kHi = 0xffff0000u;
            float mq[2] = {0.f, 0.f};  // rows lane/4 (registers 0, 2) and lane/4 + 8 (1, 3)
#pragma unroll
            for (int k = 0; k < D / 16; ++k)
#pragma unroll
              for (int i = 0; i < 4; ++i)
                mq[i & 1] = fmaxf(mq[i & 1], fmaxf(fabsf(__uint_as_float(qa[k][i] << 16)),
                                                   fabsf(__uint_as_float(qa[k][i] & kHi))));
            float up[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) {  // the quad holds the row's D elements
              mq[i] = fmaxf(mq[i], __shfl_xor_sync(0xffffffffu, mq[i], 1));
              mq[i] = fmaxf(mq[i], __shfl_xor_sync(0xffffffffu, mq[i], 2));
              const int eb = min(max(int((__float_as_uint(mq[i]) >> 23) & 0xffu), 15), 254);
              up[i] = __uint_as_float(uint32_t(268 - eb) << 23);  // 2^(141 - eb) = 2^(14 - E)
              qf[i] = __uint_as_float(uint32_t(eb - 14) << 23);   // 2^(eb - 141) = 2^(E - 14)
            }
#pragma unroll
            for (int k = 0; k < D / 16; ++k)
#pragma unroll
              for (int i = 0; i < 4; ++i)
                qa[k][i] = dev::pack2<__half>(__uint_as_float(qa[k][i] << 16) * up[i & 1],
                                              __uint_as_float(qa[k][i] & kHi) * up[i & 1]);
          }
        } else {
#pragma unroll
          for (int k = 0; k < D / 16; ++k) {
            const int r = (lane & 7) + ((lane >> 3) & 1) * 8, c = 2 * k + (lane >> 4);
            dev::ldsm_x4(dev::smem_u32(sQ + dev::swz<D>(r, c)), qa[k]);
          }
        }
      }
      const int key0 = w.slice0(t);
      if (key0 >= kend) continue;
      const KV* sK = w.stages + (t % kStages) * 2 * kSliceElems;
      const KV* sV = sK + kSliceElems;

      // S = Q K^T over the warp's 16 keys: two n-tiles of 8 keys.
      float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
      if constexpr (F8) {
        // One ldmatrix.x4 per two 16-byte chunks (= d blocks k, k + 1): matrices (keys 0-7,
        // chunk k), (keys 8-15, k), (keys 0-7, k + 1), (keys 8-15, k + 1). Lane l gets key
        // l / 4, bytes d = 16 chunk + 4 (l % 4) .. + 3: the B fragment (b0, b1) of its n-tile
        // in Q's d order. swz8 keeps each matrix's 8 rows on 8 different bank groups.
#pragma unroll
        for (int k = 0; k < D / 16; k += 2) {
          uint32_t kr[4];
          const int r = (lane & 7) + ((lane >> 3) & 1) * 8, c = k + (lane >> 4);
          dev::ldsm_x4(dev::smem_u32(sK + swz8(r, c) * 16), kr);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            uint32_t b0, b1;
            e4m3x4_to_f16(kr[i], b0, b1);
            dev::mma_16x8x16<MT>(s[i & 1], qa[k + (i >> 1)], b0, b1);
          }
        }
      } else {
#pragma unroll
        for (int k = 0; k < D / 16; ++k) {
          uint32_t kb[4];
          const int r = (lane & 7) + (lane >> 4) * 8;
          const int c = 2 * k + ((lane >> 3) & 1);
          dev::ldsm_x4(dev::smem_u32(sK + dev::swz<D>(r, c)), kb);
          dev::mma_16x8x16<T>(s[0], qa[k], kb[0], kb[1]);
          dev::mma_16x8x16<T>(s[1], qa[k], kb[2], kb[3]);
        }
      }
      // Online softmax (log2 domain), keys past the segment end masked.
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = key0 + n * 8 + 2 * (lane & 3) + (e & 1);
          float sv = s[n][e];
          if constexpr (kScaledQ) sv *= qf[e >> 1];  // exact: the bf16 q's score
          s[n][e] = key < kend ? sv * sl2 : -INFINITY;
          mx[e >> 1] = fmaxf(mx[e >> 1], s[n][e]);
        }
      float alpha[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
        const float m_new = fmaxf(st.m[i], mx[i] - kPOff);  // finite: key0 < kend gives one real key
        alpha[i] = sexp2(st.m[i] - m_new);
        st.m[i] = m_new;
        st.l[i] *= alpha[i];
      }
      uint32_t pa[4];
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        const float p0 = sexp2(s[n][0] - st.m[0]), p1 = sexp2(s[n][1] - st.m[0]);
        const float p2 = sexp2(s[n][2] - st.m[1]), p3 = sexp2(s[n][3] - st.m[1]);
        st.l[0] += p0 + p1;
        st.l[1] += p2 + p3;
        pa[2 * n] = dev::pack2<MT>(p0, p1);
        pa[2 * n + 1] = dev::pack2<MT>(p2, p3);
      }
      // fp8: the rescale only when some lane's max moved (alpha != 1; o * 1 == o exactly):
      // past the first tiles of a long row the max rarely moves, and the D / 2 FMULs are the
      // largest item of the tile after the conversions.
      if (!F8 || __any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
          st.o[j][0] *= alpha[0]; st.o[j][1] *= alpha[0];
          st.o[j][2] *= alpha[1]; st.o[j][3] *= alpha[1];
        }
      }
      // O += P V: V rows are [key][d], the B operand wants [d][key]: ldmatrix.trans.
      if constexpr (F8) {
        // Matrices (keys 0-7, chunk j), (keys 8-15, j), (keys 0-7, j + 1), (keys 8-15, j + 1)
        // of byte pairs, transposed: lane l (g = l / 4, t = l % 4) gets the bytes
        // [V(2t, 2g), V(2t, 2g + 1), V(2t + 1, 2g), V(2t + 1, 2g + 1)] (key, d within the
        // block). Permuted to [V(2t, 2g), V(2t + 1, 2g), V(2t, 2g + 1), V(2t + 1, 2g + 1)]
        // and converted: the key pair of d = 2g (B fragment of the even-d n-tile, st.o[2 jj])
        // and of d = 2g + 1 (the odd-d n-tile, st.o[2 jj + 1]).
#pragma unroll
        for (int j = 0; j < D / 16; j += 2) {
          uint32_t vr[4];
          const int r = (lane & 7) + ((lane >> 3) & 1) * 8, c = j + (lane >> 4);
          dev::ldsm_x4_trans(dev::smem_u32(sV + swz8(r, c) * 16), vr);
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            uint32_t e0, o0, e1, o1;
            e4m3x4_to_f16(__byte_perm(vr[2 * h], 0u, 0x3120), e0, o0);     // keys 2t, 2t + 1
            e4m3x4_to_f16(__byte_perm(vr[2 * h + 1], 0u, 0x3120), e1, o1);  // keys 2t + 8, 2t + 9
            dev::mma_16x8x16<MT>(st.o[2 * (j + h)], pa, e0, e1);
            dev::mma_16x8x16<MT>(st.o[2 * (j + h) + 1], pa, o0, o1);
          }
        }
      } else {
#pragma unroll
        for (int j = 0; j < D / 16; ++j) {
          uint32_t vb[4];
          const int r = (lane & 7) + ((lane >> 3) & 1) * 8;
          const int c = 2 * j + (lane >> 4);
          dev::ldsm_x4_trans(dev::smem_u32(sV + dev::swz<D>(r, c)), vb);
          dev::mma_16x8x16<T>(st.o[2 * j], pa, vb[0], vb[1]);
          dev::mma_16x8x16<T>(st.o[2 * j + 1], pa, vb[2], vb[3]);
        }
      }
    }
    cp_async_wait<0>();
#pragma unroll
    for (int i = 0; i < 2; ++i) {  // row sums were kept per lane: finish them across the quad
      st.l[i] += __shfl_xor_sync(0xffffffffu, st.l[i], 1);
      st.l[i] += __shfl_xor_sync(0xffffffffu, st.l[i], 2);
    }
  }

  // The warp merge. Warp w's fp32 o [16][D] goes to its own last kScratchStages stages (those
  // the next segment's begin() leaves alone), its m / l to sM / sL [warp][16] (log2 domain).
  static __device__ __forceinline__ float* scratch_of(unsigned char* sStages, int w) {
    return reinterpret_cast<float*>(sStages + w * C::kWarpBytes + (kStages - C::kScratchStages) * C::kStageBytes);
  }
  static __device__ __forceinline__ void merge_warps(const State& st, unsigned char* sStages, float* sM, float* sL) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float* wo = scratch_of(sStages, warp);
    const int r = lane >> 2, c = 2 * (lane & 3);
    if constexpr (F8) {  // block j: st.o[2j] holds d = 16j + 4t + {0, 2}, st.o[2j + 1] d + 1
#pragma unroll
      for (int j = 0; j < D / 16; ++j) {
        *reinterpret_cast<float4*>(wo + r * D + 16 * j + 2 * c) =
            make_float4(st.o[2 * j][0], st.o[2 * j + 1][0], st.o[2 * j][1], st.o[2 * j + 1][1]);
        *reinterpret_cast<float4*>(wo + (r + 8) * D + 16 * j + 2 * c) =
            make_float4(st.o[2 * j][2], st.o[2 * j + 1][2], st.o[2 * j][3], st.o[2 * j + 1][3]);
      }
    } else {
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        *reinterpret_cast<float2*>(wo + r * D + 8 * j + c) = make_float2(st.o[j][0], st.o[j][1]);
        *reinterpret_cast<float2*>(wo + (r + 8) * D + 8 * j + c) = make_float2(st.o[j][2], st.o[j][3]);
      }
    }
    if ((lane & 3) == 0) {
      sM[warp * kHeadTile + r] = st.m[0];
      sM[warp * kHeadTile + r + 8] = st.m[1];
      sL[warp * kHeadTile + r] = st.l[0];
      sL[warp * kHeadTile + r + 8] = st.l[1];
    }
  }

  // Per head row r < nrows (one thread each), after merge_warps: the weight of each warp's
  // unnormalized o, sF[warp][r] = 2^(m_w - M) / l (0 for a warp without keys, and for a row
  // without any key), and the row's lse (log2 domain, -inf when empty).
  static __device__ __forceinline__ void row_factors(int nrows, const float* sM, const float* sL, float* sF,
                                                     float* sLse) {
    const int r = threadIdx.x;
    if (r >= nrows) return;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, sM[w * kHeadTile + r]);
    float f[kWarps], l = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      f[w] = M == -INFINITY ? 0.f : exp2f(sM[w * kHeadTile + r] - M);  // no keys: m = -inf, f = 0
      l += f[w] * sL[w * kHeadTile + r];
    }
    const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sF[w * kHeadTile + r] = f[w] * inv;
    sLse[r] = l > 0.f ? M + log2f(l) : -INFINITY;
  }

  // Columns d .. d + 3 of merged head row r: sum over the warps of sF * o.
  static __device__ __forceinline__ float4 merged4(unsigned char* sStages, const float* sF, int r, int d) {
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float f = sF[w * kHeadTile + r];
      const float4 x = *reinterpret_cast<const float4*>(scratch_of(sStages, w) + r * D + d);
      acc.x += f * x.x; acc.y += f * x.y; acc.z += f * x.z; acc.w += f * x.w;
    }
    return acc;
  }
};

// fp8: the residency the grid assumes is promised to ptxas (3 CTAs at D 128: <= 168 registers).
template <typename T, int D, int S, bool F8>
__global__ void __launch_bounds__(kThreads, F8 ? Cfg<D, S, F8>::kCtasPerSm : 0)
sparse_decode_kernel(const SparseDecodeParams p, const Resolved rs) {
  using K = Decode<T, D, S, F8>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* const sQbuf = reinterpret_cast<T*>(smem_raw);  // [kQBuffers][kHeadTile][D]: segments alternate
  unsigned char* const sStages = smem_raw + K::C::kQBuffers * K::C::kQBytes;
  __shared__ float sM[kWarps * kHeadTile], sL[kWarps * kHeadTile], sF[kWarps * kHeadTile], sLse[kHeadTile];

  unsigned char* ws = reinterpret_cast<unsigned char*>(p.workspace);
  streamk::CutRow* cut = reinterpret_cast<streamk::CutRow*>(ws + rs.ws.cut);
  float* part_o = reinterpret_cast<float*>(ws + rs.ws.part_o);
  float* part_lse = reinterpret_cast<float*>(ws + rs.ws.part_lse);

  DMS_PROBE(const unsigned long long pt0 = probe::gtime(); const long long pc0 = clock64();
            long long p_main = 0, p_epi = 0, p_mw = 0; int p_seg = 0, p_keys = 0;)
  pdl_launch_dependents();  // the merge kernel may launch; it waits for this grid to finish
  const int c = blockIdx.x;
  const int tid = threadIdx.x, warp = tid >> 5;
  const int32_t* __restrict__ seq_lens = p.pages.seq_lens;
  // Few rows: one piece of one row per CTA. Else a stream-K range of the unit line.
  const streamk::Place* pl;
  if (rs.aligned) {
    auto tiles = [&](int v) { return (__ldg(seq_lens + v / rs.head_tiles) + kTileKeys - 1) / kTileKeys; };
    pl = streamk::locate_rows<kThreads>((int)rs.rows_v, rs.grid, rs.min_units, kRowCost, c, tiles);
  } else {
    auto cost = [&](int64_t v) { return units_of(__ldg(seq_lens + (int)v / rs.head_tiles)); };
    pl = streamk::locate<kThreads>(rs.rows_v, rs.grid, rs.min_units, c, cost);
  }
  if (!pl) {
    if (tid == 0 && !rs.aligned) cut[c] = streamk::no_cut_row();  // row-aligned: records by row
    DMS_PROBE(if (rs.probe && tid == 0) printf("PROBE I call %d c %d sm %u t0 %llu t1 %llu cyc %lld\n", rs.probe, c,
                                               probe::smid(), pt0, probe::gtime(), clock64() - pc0);)
    return;
  }
  DMS_PROBE(const long long pc1 = clock64();)
  const int G = p.num_q_heads / p.kv.num_kv_heads;
  unsigned char* const sW = sStages + warp * K::C::kWarpBytes;  // this warp's stages
  // An fp8 pool's V reads as stored * v_scale: o = v_scale * (P V_stored) / l, exactly.
  const float o_scale = F8 ? p.kv.v_scale : 1.f;

  // A segment: row v = units [P, P_end), this CTA's part of it [a, hi), its keys [kbeg, kend).
  struct Seg {
    int v, P, P_end, a, hi, row, b, qh0, nh, kbeg, kend;
  };
  auto segment = [&](int v, int P, int a) {
    Seg s;
    s.v = v;
    s.P = P;
    s.a = a;
    s.row = (int)(v / rs.head_tiles);
    const int L = __ldg(seq_lens + s.row);
    s.P_end = P + units_of(L);  // = P + cost(v)
    s.hi = min(pl->b0, s.P_end);
    const int ht = (int)(v % rs.head_tiles);
    s.b = s.row / p.kv.num_kv_heads;
    const int g = s.row % p.kv.num_kv_heads;
    const int h0 = ht * kHeadTile;
    s.nh = min(kHeadTile, G - h0);
    s.qh0 = g * G + h0;
    s.kbeg = (s.a - s.P - kRowCost > 0 ? s.a - s.P - kRowCost : 0) * kTileKeys;
    s.kend = min(L, (s.hi - s.P - kRowCost > 0 ? s.hi - s.P - kRowCost : 0) * kTileKeys);
    return s;
  };
  auto stream_of = [&](const Seg& s) {
    return typename K::Stream(p, p.pages.block_table + (int64_t)s.row * p.pages.max_blocks_per_head, s.kbeg,
                              s.kend, rs.bs_shift, sW);
  };
  // The queries of a segment's head tile (rows beyond the group are zero: finite, unused
  // scores) into sQ, by the whole CTA, then the warp's first slices: one cp.async group.
  auto begin = [&](const Seg& s, T* sQ, typename K::Pre& pre) {
    const T* q = reinterpret_cast<const T*>(p.q) + s.b * p.q_stride_b + s.qh0 * p.q_stride_h;
    for (int i = tid; i < kHeadTile * K::kQChunks; i += kThreads) {
      const int r = i / K::kQChunks, cc = i % K::kQChunks;
      cp_async16(sQ + dev::swz<D>(r, cc), r < s.nh ? q + r * p.q_stride_h + cc * 8 : q, r < s.nh);
    }
    K::begin(stream_of(s), pre);
  };

  // The walk. Segment n + 1's queries and first slices are issued as soon as segment n's
  // mainloop is done, before its warp merge and epilogue. A segment without keys (an empty row,
  // or a piece holding only the row's fixed unit) loads nothing and writes zeros.
  Seg cur = segment(pl->v, pl->P, pl->a0);
  typename K::Pre pre;
  int qb = 0;
  if (cur.kend > cur.kbeg) begin(cur, sQbuf, pre);
  for (;;) {
    const bool has_keys = cur.kend > cur.kbeg;
    typename K::State st;
    DMS_PROBE(const long long pm0 = clock64();)
    if (has_keys) K::mainloop(p, stream_of(cur), pre, sQbuf + qb * kHeadTile * D, st);
    DMS_PROBE(const long long pm1 = clock64(); p_main += pm1 - pm0; ++p_seg;
              p_keys += has_keys ? cur.kend - cur.kbeg : 0;)
    // The next segment (never past the range's last unit: a < b0 <= U) starts now.
    const bool more = cur.hi < pl->b0;
    Seg nxt = cur;
    if (more) {
      nxt = segment(cur.v + 1, cur.P_end, cur.hi);
      if constexpr (K::C::kEarlyNext) {
        __syncwarp();  // the warp's lanes are done with the stages the next slices overwrite
        if (nxt.kend > nxt.kbeg) begin(nxt, sQbuf + (qb ^ 1) * kHeadTile * D, pre);
      }
    }
    const bool whole = cur.P >= pl->a0 && cur.P_end <= pl->b0;
    const int64_t slot = 2 * (int64_t)c + (cur.a == pl->a0 ? 0 : 1);
    if (has_keys) {
      // The merge scratch is the warp's last stage(s): every lane's ldmatrix reads of them are
      // done before any lane writes (compute-sanitizer racecheck reported the WAR at D 256
      // without this barrier, gpu_round_2026-11-30_1332.md).
      __syncwarp();
      K::merge_warps(st, sStages, sM, sL);
      __syncthreads();
      K::row_factors(cur.nh, sM, sL, sF, sLse);
      __syncthreads();
    }
    DMS_PROBE(p_mw += clock64() - pm1;)
    // The whole row is ours: write it. A piece of a cut row: its partial, for the merge kernel.
    for (int i = tid; i < cur.nh * (D / 4); i += kThreads) {
      const int r = i / (D / 4), d = (i % (D / 4)) * 4;
      float4 o = has_keys ? K::merged4(sStages, sF, r, d) : make_float4(0.f, 0.f, 0.f, 0.f);
      if constexpr (F8) {
        o.x *= o_scale; o.y *= o_scale; o.z *= o_scale; o.w *= o_scale;
      }
      const float lse2 = has_keys ? sLse[r] : -INFINITY;
      if (whole) {
        T* out = reinterpret_cast<T*>(p.out) + cur.b * p.o_stride_b + (cur.qh0 + r) * p.o_stride_h + d;
        out[0] = dev::from_float<T>(o.x);
        out[1] = dev::from_float<T>(o.y);
        out[2] = dev::from_float<T>(o.z);
        out[3] = dev::from_float<T>(o.w);
        if (p.lse && d == 0) p.lse[(int64_t)cur.b * p.num_q_heads + cur.qh0 + r] = lse2 / kLog2e;
      } else {
        *reinterpret_cast<float4*>(part_o + (slot * kHeadTile + r) * D + d) = o;
        if (d == 0) part_lse[slot * kHeadTile + r] = lse2;
      }
    }
    DMS_PROBE(p_epi += clock64() - pm1;)
    if (!more) break;
    if (has_keys) __syncthreads();  // the scratch and the factors are read before they are rewritten
    if constexpr (!K::C::kEarlyNext) {
      if (nxt.kend > nxt.kbeg) begin(nxt, sQbuf, pre);  // one query buffer
    } else {
      qb ^= 1;
    }
    cur = nxt;
  }
  if (tid == 0) {  // the last segment's row
    if (!rs.aligned) cut[c] = streamk::cut_record(*pl, c, cur.v, cur.P, cur.P_end);
    else if (streamk::writes_piece_record(*pl)) cut[pl->v] = streamk::piece_record(*pl, c);
  }
  DMS_PROBE(if (rs.probe && tid == 0)
              printf("PROBE A call %d c %d sm %u t0 %llu t1 %llu loc %lld main %lld epi %lld mw %lld tot %lld seg %d keys %d\n", rs.probe, c,
                     probe::smid(), pt0, probe::gtime(), pc1 - pc0, p_main, p_epi, p_mw, clock64() - pc0, p_seg, p_keys);)
}


// ------------------------------------------------------------------------------------------------
// Merge: CTA c combines the partials of the row that starts in c's range and is cut (at most one:
// a cut row extends past c's end, so it is c's last segment): streamk::merge_pieces. Row-aligned
// (kAligned): one CTA per row, row c's record, its pieces from the record's first CTA on; rows of
// many pieces, so the pieces' loads are issued before the lse phase (kPrefetch: the A/B measured
// it 4-7% faster on the B 1 rows, and 0-4% slower on large batches where it ran the stream-K
// merge at twice the registers, bench/results/decode_ab_2026-11-30_x_pf.md, _y.md).
inline size_t merge_smem_bytes(int grid) { return streamk::merge_smem_bytes(grid, kHeadTile); }

template <typename T, int D, bool kAligned>
__global__ void __launch_bounds__(kMergeThreads)
sparse_decode_merge_kernel(const SparseDecodeParams p, const Resolved rs) {
  extern __shared__ __align__(16) float merge_smem[];
  DMS_PROBE(const unsigned long long pt0 = probe::gtime();)
  pdl_wait();  // the attention kernel's partials and direct outputs are written
  DMS_PROBE(const unsigned long long pt1 = probe::gtime();)

  unsigned char* ws = reinterpret_cast<unsigned char*>(p.workspace);
  const float* part_o = reinterpret_cast<const float*>(ws + rs.ws.part_o);
  const float* part_lse = reinterpret_cast<const float*>(ws + rs.ws.part_lse);
  const int c = blockIdx.x;
  const streamk::CutRow cr = reinterpret_cast<const streamk::CutRow*>(ws + rs.ws.cut)[c];
  if (cr.v < 0) {
    DMS_PROBE(if (rs.probe && threadIdx.x == 0 && c == 0)
                printf("PROBE MI call %d c %d sm %u t0 %llu tw %llu t1 %llu\n", rs.probe, c, probe::smid(), pt0, pt1,
                       probe::gtime());)
    return;
  }
  const int row = (int)(cr.v / rs.head_tiles), ht = (int)(cr.v % rs.head_tiles);
  const int G = p.num_q_heads / p.kv.num_kv_heads;
  const int b = row / p.kv.num_kv_heads, g = row % p.kv.num_kv_heads;
  const int h0 = ht * kHeadTile, nh = min(kHeadTile, G - h0), qh0 = g * G + h0;
  streamk::merge_pieces<D, kHeadTile, 8, kAligned>(
      cr, kAligned ? cr.P : c, nh, part_o, part_lse, merge_smem,
      [&](int r, int d, float4 acc, float inv, const float* sSum, const float* sMax) {
        T* out = reinterpret_cast<T*>(p.out) + b * p.o_stride_b + (qh0 + r) * p.o_stride_h + d;
        out[0] = dev::from_float<T>(acc.x * inv);
        out[1] = dev::from_float<T>(acc.y * inv);
        out[2] = dev::from_float<T>(acc.z * inv);
        out[3] = dev::from_float<T>(acc.w * inv);
        const float l = sSum[r];
        if (p.lse && d == 0)
          p.lse[(int64_t)b * p.num_q_heads + qh0 + r] = l > 0.f ? (sMax[r] + log2f(l)) / kLog2e : -INFINITY;
      });
  DMS_PROBE(if (rs.probe && threadIdx.x == 0)
              printf("PROBE M call %d c %d sm %u t0 %llu tw %llu t1 %llu k %d\n", rs.probe, c, probe::smid(), pt0, pt1,
                     probe::gtime(), cr.k);)
}

// ------------------------------------------------------------------------------------------------
// Pipeline stages per warp and resident CTAs per SM, per head dim: 3 stages at D 64 (4 CTAs),
// 2 at D 128 (3 CTAs: faster than 3 stages and 2 CTAs on every swept row but B1 x 32k skewed,
// bench/results/sweep_2026-11-29_2120.txt), 2 at D 256 (1 CTA).
template <int D> constexpr int kStagesFor = D == 64 ? 3 : 2;
// fp8 pools: a stage is half the bytes and there is no conversion slice, so every head dim
// takes 4 stages: D 64 at 4 CTAs (34 KB), D 128 at 3 CTAs (68 KB; 4 CTAs at 3 stages would
// hold ptxas to 128 registers, which spills in the loop), D 256 at 1 CTA (136 KB). Not swept
// yet (bench/sweep_decode.py).
template <int D> constexpr int kStagesFor8 = 4;
template <int D> constexpr int ctas_for(bool fp8) {
  return fp8 ? Cfg<D, kStagesFor8<D>, true>::kCtasPerSm : Cfg<D, kStagesFor<D>>::kCtasPerSm;
}
int ctas_per_sm(int head_dim, bool fp8, bool deep) {
  if (deep) return fp8 ? Cfg<128, kDeepStages8, true>::kCtasPerSm : Cfg<128, kDeepStages>::kCtasPerSm;
  switch (head_dim) {
    case 64: return ctas_for<64>(fp8);
    case 128: return ctas_for<128>(fp8);
    default: return ctas_for<256>(fp8);
  }
}

// The stage knob (builds with -DDMS_DECODE_STAGES_KNOB, decode_probe.cuh): DMS_DECODE_STAGES
// 2-6 forces that many stages at D 128, with its resident grid; 0 / other values: the rule above.
#ifdef DMS_DECODE_STAGES_KNOB
inline int knob_stages() {
  const int s = probe::stages();
  return s >= 2 && s <= 6 ? s : 0;
}
template <bool F8> int knob_ctas() {
  switch (knob_stages()) {
    case 2: return Cfg<128, 2, F8>::kCtasPerSm;
    case 3: return Cfg<128, 3, F8>::kCtasPerSm;
    case 4: return Cfg<128, 4, F8>::kCtasPerSm;
    case 5: return Cfg<128, 5, F8>::kCtasPerSm;
    default: return Cfg<128, 6, F8>::kCtasPerSm;
  }
}
#endif

Resolved resolve(const SparseDecodeParams& p, int num_sms) {
  Resolved r;
  const int G = p.kv.num_kv_heads > 0 ? p.num_q_heads / p.kv.num_kv_heads : 1;
  r.head_tiles = (G + kHeadTile - 1) / kHeadTile;
  r.rows_v = (int64_t)p.batch * p.kv.num_kv_heads * r.head_tiles;
  r.deep = p.kv.head_dim == 128 && r.rows_v <= kDeepMaxRows;
  // The resident CTAs of a pipeline, capped by max_splits: the persistent grid.
  auto grid_of = [&](bool deep) {
    int resident = std::max(num_sms, 1) * ctas_per_sm(p.kv.head_dim, is_fp8(p.kv.dtype), deep);
#ifdef DMS_DECODE_STAGES_KNOB
    if (deep == r.deep && knob_stages() && p.kv.head_dim == 128)
      resident = std::max(num_sms, 1) * (is_fp8(p.kv.dtype) ? knob_ctas<true>() : knob_ctas<false>());
#endif
    return p.max_splits > 0 ? std::min(p.max_splits, resident) : resident;
  };
  r.grid = grid_of(r.deep);
#ifdef DMS_DECODE_STAGES_KNOB
  if (knob_stages() && p.kv.head_dim == 128) r.deep = false;  // forced stages
#endif
  // The workspace is sized for the standard pipeline's grid whatever this call takes (the deep
  // one launches fewer CTAs), so that it depends on head_dim, pool dtype, the SM count and
  // max_splits only: an engine may size it once and vary the batch.
  const int ws_grid = std::max(r.grid, grid_of(false));
  // At least this many units per CTA: a piece of a row costs a query load and a partial write,
  // worth it only over a few tiles (bench/sweep_decode.py).
  const int min_chunk = p.min_chunk > 0 ? p.min_chunk : 256;
  r.min_units = std::max(1, (min_chunk + kTileKeys - 1) / kTileKeys);
  r.bs_shift = 0;
  while ((1 << r.bs_shift) < p.kv.block_size) ++r.bs_shift;
  // Row-aligned pieces for as many rows as the deep pipeline takes (any head dim), when the grid
  // has a CTA for each.
  r.aligned = r.rows_v <= kDeepMaxRows && r.rows_v <= r.grid;
  r.ws = layout(ws_grid, p.kv.head_dim);
  return r;
}

template <typename T, int D, int S, bool F8>
Status launch(const SparseDecodeParams& p, const Resolved& r0, cudaStream_t stream) {
  Resolved r = r0;
  DMS_PROBE(r.probe = probe::take_call();)
  constexpr int smem = Cfg<D, S, F8>::kSmemBytes;
  // Set on every launch (cheap host calls, legal during capture): the attributes are per device.
  const size_t merge_smem = merge_smem_bytes(r.grid);
  DMS_CUDA_CHECK(cudaFuncSetAttribute(sparse_decode_kernel<T, D, S, F8>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  auto merge = r.aligned ? sparse_decode_merge_kernel<T, D, true> : sparse_decode_merge_kernel<T, D, false>;
  DMS_CUDA_CHECK(cudaFuncSetAttribute(merge, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)merge_smem));
  // Both kernels prefer the largest shared-memory carveout: switching the L1 / shared split
  // between back-to-back kernels would drain the SMs.
  DMS_CUDA_CHECK(cudaFuncSetAttribute(sparse_decode_kernel<T, D, S, F8>,
                                      cudaFuncAttributePreferredSharedMemoryCarveout, 100));
  DMS_CUDA_CHECK(cudaFuncSetAttribute(merge, cudaFuncAttributePreferredSharedMemoryCarveout, 100));
  // A plain launch (the op's first kernel): launched programmatically after the previous call's
  // merge kernel, every row of bench_decode ran 4-20 us slower (bench/results/decode_ab_*.md).
  sparse_decode_kernel<T, D, S, F8><<<r.grid, kThreads, smem, stream>>>(p, r);
  DMS_LAUNCH_CHECK();
  DMS_CUDA_CHECK(launch_pdl(merge, dim3(r.aligned ? (int)r.rows_v : r.grid), dim3(kMergeThreads), merge_smem,
                            stream, p, r));
  return Status::kSuccess;
}

#ifdef DMS_DECODE_STAGES_KNOB
template <typename T, bool F8>
Status launch_knob(const SparseDecodeParams& p, const Resolved& r, cudaStream_t s) {
  switch (knob_stages()) {
    case 2: return launch<T, 128, 2, F8>(p, r, s);
    case 3: return launch<T, 128, 3, F8>(p, r, s);
    case 4: return launch<T, 128, 4, F8>(p, r, s);
    case 5: return launch<T, 128, 5, F8>(p, r, s);
    default: return launch<T, 128, 6, F8>(p, r, s);
  }
}
#endif

template <typename T>
Status dispatch_dim(const SparseDecodeParams& p, const Resolved& r, cudaStream_t s) {
  const bool f8 = is_fp8(p.kv.dtype);
  switch (p.kv.head_dim) {
    case 64: return f8 ? launch<T, 64, kStagesFor8<64>, true>(p, r, s) : launch<T, 64, kStagesFor<64>, false>(p, r, s);
    case 128:
#ifdef DMS_DECODE_STAGES_KNOB
      if (knob_stages()) return f8 ? launch_knob<T, true>(p, r, s) : launch_knob<T, false>(p, r, s);
#endif
      if (f8) return r.deep ? launch<T, 128, kDeepStages8, true>(p, r, s) : launch<T, 128, kStagesFor8<128>, true>(p, r, s);
      return r.deep ? launch<T, 128, kDeepStages, false>(p, r, s) : launch<T, 128, kStagesFor<128>, false>(p, r, s);
    case 256: return f8 ? launch<T, 256, kStagesFor8<256>, true>(p, r, s) : launch<T, 256, kStagesFor<256>, false>(p, r, s);
    default: return Status::kUnsupported;
  }
}

}  // namespace

size_t sparse_decode_workspace_bytes(const SparseDecodeParams& p, int num_sms) {
  if (p.batch <= 0 || p.kv.num_kv_heads <= 0 || p.num_q_heads <= 0) return 0;
  return (size_t)resolve(p, num_sms).ws.bytes;
}

Status sparse_decode(const SparseDecodeParams& p, cudaStream_t stream) {
  if (p.batch < 0 || !valid_sizes(p.kv) || p.num_q_heads <= 0 ||
      p.num_q_heads % p.kv.num_kv_heads != 0 || p.pages.max_blocks_per_head <= 0 || !p.q ||
      !has_pointers(p.kv) || !has_pointers(p.pages) || !p.out)
    return Status::kInvalidArgument;
  // bf16 / fp16 q / out, head_dim 64 / 128 / 256, block_size a power of two (slots map by
  // shift); the pool of q's dtype or fp8 e4m3 (then q / out have act_dtype).
  const DType act = compute_dtype(p.kv, p.act_dtype);
  if (!supported(Op::kSparseDecode, Device::kCUDA, act, p.kv.head_dim, p.kv.block_size, p.kv.dtype))
    return Status::kUnsupported;
  if (!valid_scales(p.kv)) return Status::kInvalidArgument;
  if (p.batch == 0) return Status::kSuccess;
  const Resolved r = resolve(p, device_sms());
  if (!p.workspace) return Status::kInvalidArgument;
  // The scheduler's unit line is int32: rows * (tiles per row + 1) must fit.
  const int64_t max_units = r.rows_v * ((int64_t)p.pages.max_blocks_per_head * p.kv.block_size / kTileKeys + 1 + kRowCost);
  if (max_units >= INT32_MAX) return Status::kUnsupported;
  return act == DType::kBFloat16 ? dispatch_dim<__nv_bfloat16>(p, r, stream)
                                 : dispatch_dim<__half>(p, r, stream);
}

}  // namespace dms
