// sparse_decode (csrc/kernels/sparse_decode.cu): the mainloop. One warp's stream of 16-key slices
// of a segment through the block table into its private cp.async pipeline (Stream, begin), and
// the m16n8k16 QK^T / online softmax / PV loop over them (mainloop), bf16 / fp16 or fp8 pools.
// Device code only; no torch.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "dms/dms.h"
#include "kernels/decode/config.cuh"
#include "kernels/primitives.cuh"

namespace dms {
namespace decode {

using dev::cp_async16;
using dev::cp_async_commit;
using dev::cp_async_wait;
using dev::kLog2e;

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

// One warp's stream and mainloop for a segment of keys (T: q / out dtype; D: head dim; S: stages
// per warp; F8: an fp8 e4m3 pool).
template <typename T, int D, int S, bool F8 = false, int NT = 1> struct Decode {
  using C = Cfg<D, S, F8>;
  static_assert(NT == 1 || NT == 2, "8 or 16 head rows per work row");
  static constexpr int kNT = NT;
  static constexpr int kD = D;
  static constexpr bool kF8 = F8;
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
  // A warp's stage t % kStages (C::kStageBytes) holds slice t: K, then V, kSliceBytes each.
  static constexpr uint32_t kSliceBytes = C::kStageBytes / 2;
  static __device__ __forceinline__ uint32_t stage_bytes(int t) { return uint32_t(t % kStages) * C::kStageBytes; }
  static constexpr int kQChunks = D / 8;                         // 16-byte chunks of a q row
  static constexpr int kChunkElems = 16 / int(sizeof(KV));       // pool elements per chunk
  static constexpr int kChunks = D / kChunkElems;                // 16-byte chunks per pool row
  static constexpr int kRowsPerLane = 16 * kChunks / 32;         // rows of a slice one lane copies
  static constexpr int kRowStep = 32 / kChunks > 0 ? 32 / kChunks : 1;

  // The head rows sit in the MMAs' N (NT tiles of 8), the keys (S^T = K Q^T) and the d (O^T =
  // V^T P^T) in M: a group of G <= 8 heads fills one n-tile, where M = 16 head rows filled 4 of
  // 16 at G 4. Lane (g = lane / 4, t = lane % 4) of an m16n8 accumulator holds c0 (M row g, head
  // 8n + 2t), c1 (row g, head 8n + 2t + 1), c2 / c3 (row g + 8, the same heads).
  // Per-warp softmax state over the keys it streamed: o = O^T, block j of d (M row g / g + 8 is
  // d 16j + g / 16j + g + 8; fp8 pools 16j + 2g / 16j + 2g + 1, the key-pair layout of
  // ldmatrix.trans on bytes); m / l per head 8n + 2t + i (l: this lane's keys only until the
  // mainloop's end).
  struct State {
    float o[D / 16][NT][4];
    float m[NT][2], l[NT][2];
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
    // Shared addresses of the lane's copies in stage 0 (K): rows r0 + n kRowStep for n < kPat;
    // row n + kPat lies 8 rows below row n (the same swizzle), so a fixed offset from it. Held
    // in registers (dev::opaque): the compiler otherwise recomputed them in every slice.
    // More than 4 (bf16 / fp16 at D 256: 8) would cost registers that kernel does not have: those
    // addresses are computed per copy.
    static constexpr int kPat = kRowStep >= 8 ? 1 : (kRowsPerLane < 8 / kRowStep ? kRowsPerLane : 8 / kRowStep);
    static constexpr bool kHold = kPat <= 4;
    uint32_t dst[kHold ? kPat : 1];

    __device__ __forceinline__ Stream(const SparseDecodeParams& p, const int32_t* __restrict__ bt_,
                                      int kbeg_, int kend_, int bs_shift_, unsigned char* sW)
        : kc(reinterpret_cast<const KV*>(p.kv.k_cache)), vc(reinterpret_cast<const KV*>(p.kv.v_cache)),
          bt(bt_), stages(reinterpret_cast<KV*>(sW)), kbeg(kbeg_), kend(kend_), bs_shift(bs_shift_),
          warp(threadIdx.x >> 5), r0(kChunks >= 32 ? 0 : (threadIdx.x & 31) / kChunks),
          cc((threadIdx.x & 31) % kChunks) {
      if constexpr (kHold) {
#pragma unroll
        for (int i = 0; i < kPat; ++i)
          dst[i] = dev::opaque(dev::smem_u32(stages + stage_off(r0 + i * kRowStep, cc)));
      }
    }
    // Shared address of row r0 + n kRowStep of slice t's K (V: + the slice's bytes).
    __device__ __forceinline__ uint32_t dst_of(int t, int n) const {
      if constexpr (kHold) return dst[n % kPat] + stage_bytes(t) + uint32_t((n / kPat) * 8 * D * sizeof(KV));
      else return dev::smem_u32(stages + stage_off(r0 + n * kRowStep, cc)) + stage_bytes(t);
    }
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
      if (one_block()) {
        const int sl = slice0(t);
        const int64_t base = (((int64_t)ids[0] << bs_shift) + (sl & bs_mask) + r0) * D + cc * kChunkElems;
#pragma unroll
        for (int n = 0; n < kRowsPerLane; ++n) {
          const bool valid = sl + r0 + n * kRowStep < kend;
          const uint32_t d = dst_of(t, n);
          cp_async16(d, kc + base + n * kRowStep * D, valid);
          cp_async16(d + kSliceBytes, vc + base + n * kRowStep * D, valid);
        }
        return;
      }
      const int s0 = slice0(t) + r0;
#pragma unroll
      for (int n = 0; n < kRowsPerLane; ++n) {
        const int slot = s0 + n * kRowStep;
        const bool valid = slot < kend;
        const int64_t off =
            valid ? (((int64_t)ids[n] << bs_shift) + (slot & bs_mask)) * D + cc * kChunkElems : 0;
        const uint32_t d = dst_of(t, n);
        cp_async16(d, kc + off, valid);
        cp_async16(d + kSliceBytes, vc + off, valid);
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
    const int g = lane >> 2, t4 = lane & 3;
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
    for (int j = 0; j < D / 16; ++j)
#pragma unroll
      for (int n = 0; n < NT; ++n) st.o[j][n][0] = st.o[j][n][1] = st.o[j][n][2] = st.o[j][n][3] = 0.f;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      st.m[n][0] = st.m[n][1] = -INFINITY;
      st.l[n][0] = st.l[n][1] = 0.f;
    }
    // Q^T as the B operand of S^T = K Q^T: block k of d, n-tile n: (b0, b1) of head 8n + g.
    uint32_t qb[D / 16][NT][2];
    float qf[NT][2];  // kScaledQ: the factor of the scores of heads 8n + 2t + i
#pragma unroll
    for (int n = 0; n < NT; ++n) qf[n][0] = qf[n][1] = 1.f;
    const float sl2 = F8 ? p.scale * p.kv.k_scale * kLog2e : p.scale * kLog2e;
    // ldmatrix addresses: this lane's row of its matrix in a slice (bytes). Block k of d (fp8:
    // the block pair k, k + 1) XORs k << 5 (fp8: k << 4) into it: swz(r, 2k + b) = swz(r, b) ^
    // (k << 4) elements, and swz8 alike. The XOR touches bits 5-8 only, and every slice starts
    // 1024-aligned (smem_raw is __align__(1024); the query buffers and slices are multiples of
    // 1 KB), so it may be applied to the whole address. fp8: K's and V's lanes read the same rows.
    const int lr = (lane & 7) + ((lane >> 3) & 1) * 8;  // K (and fp8 V) matrices' row
    const uint32_t lane_k = F8 ? uint32_t(swz8(lr, lane >> 4) * 16) : uint32_t(dev::swz<D>(lr, lane >> 4) * 2);
    const uint32_t lane_v =
        F8 ? lane_k : uint32_t(dev::swz<D>((lane & 7) + (lane >> 4) * 8, (lane >> 3) & 1) * 2);
    const uint32_t stages_u32 = dev::smem_u32(w.stages);
    // Kept in registers: without the opaque moves the compiler recomputed them from the thread
    // index in every slice (about 20 instructions of a 200-instruction fp8 slice).
    const uint32_t base_k = dev::opaque(stages_u32 + lane_k), base_v = F8 ? base_k : dev::opaque(stages_u32 + lane_v);
    static_assert(kSliceBytes % 1024 == 0 && C::kQBytes % 1024 == 0, "slices start 1024-aligned");

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
          // is d = 16k + 4t + {0, 1, 2, 3}: the d order of the K fragments below. b0 / b1 are
          // 4 consecutive d of head 8n + g (one 8-byte load).
#pragma unroll
          for (int k = 0; k < D / 16; ++k) {
            const int c = 2 * k + (t4 >> 1), e = (t4 & 1) * 4;
#pragma unroll
            for (int n = 0; n < NT; ++n) {
              const uint2 x = *reinterpret_cast<const uint2*>(sQ + dev::swz<D>(8 * n + g, c) + e);
              qb[k][n][0] = x.x;
              qb[k][n][1] = x.y;
            }
          }
          if constexpr (kScaledQ) {
            // bf16 q -> f16: head row r times 2^(14 - E_r), E_r = floor(log2 max_d |q_r|)
            // clamped to [-112, 127] (biased exponent field [15, 254]). The scaled row stays
            // below 2^15 (no f16 overflow; inf / NaN stay), and every element within 2^31 of
            // the row's max stays exact (8 significant bits >= 2^-24); smaller ones are off by
            // at most 2^-39 of the max. The scores are scaled back by qf = 2^(E_r - 14), a
            // normal float, exactly: the fp32 sums are the bf16 MMA's times a power of two.
            const uint32_t kHi = 0xffff0000u;
#pragma unroll
            for (int n = 0; n < NT; ++n) {
              float mq = 0.f;  // head 8n + g: the quad holds its D elements
#pragma unroll
              for (int k = 0; k < D / 16; ++k)
#pragma unroll
                for (int i = 0; i < 2; ++i)
                  mq = fmaxf(mq, fmaxf(fabsf(__uint_as_float(qb[k][n][i] << 16)),
                                       fabsf(__uint_as_float(qb[k][n][i] & kHi))));
              mq = fmaxf(mq, __shfl_xor_sync(0xffffffffu, mq, 1));
              mq = fmaxf(mq, __shfl_xor_sync(0xffffffffu, mq, 2));
              const int eb = min(max(int((__float_as_uint(mq) >> 23) & 0xffu), 15), 254);
              const float up = __uint_as_float(uint32_t(268 - eb) << 23);  // 2^(141 - eb) = 2^(14 - E)
              const float back = __uint_as_float(uint32_t(eb - 14) << 23);  // 2^(eb - 141) = 2^(E - 14)
#pragma unroll
              for (int k = 0; k < D / 16; ++k)
#pragma unroll
                for (int i = 0; i < 2; ++i)
                  qb[k][n][i] = dev::pack2<__half>(__uint_as_float(qb[k][n][i] << 16) * up,
                                                   __uint_as_float(qb[k][n][i] & kHi) * up);
              // The scores' columns are heads 2t, 2t + 1: their factors from lanes 4 (2t + i).
              qf[n][0] = __shfl_sync(0xffffffffu, back, 8 * t4);
              qf[n][1] = __shfl_sync(0xffffffffu, back, 8 * t4 + 4);
            }
          }
        } else {
          // Matrices (heads 0-7, d lo), (heads 0-7, d hi), (heads 8-15, d lo), (8-15, d hi).
#pragma unroll
          for (int k = 0; k < D / 16; ++k) {
            uint32_t x[4];
            const int r = (lane & 7) + (lane >> 4) * 8, c = 2 * k + ((lane >> 3) & 1);
            dev::ldsm_x4(dev::smem_u32(sQ + dev::swz<D>(r, c)), x);
#pragma unroll
            for (int n = 0; n < NT; ++n) {
              qb[k][n][0] = x[2 * n];
              qb[k][n][1] = x[2 * n + 1];
            }
          }
        }
      }
      const int key0 = w.slice0(t);
      if (key0 >= kend) continue;
      const uint32_t aK = base_k + stage_bytes(t);
      const uint32_t aV = base_v + stage_bytes(t) + kSliceBytes;

      // S^T = K Q^T over the warp's 16 keys (M) and the head tiles (N); the even and the odd
      // blocks of d into two accumulators (two dependent MMA chains of D / 32, not one of D / 16).
      float s[NT][4], s2[NT][4];
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] = s2[n][e] = 0.f;
      if constexpr (F8) {
        // One ldmatrix.x4 per two 16-byte chunks (= d blocks k, k + 1): matrices (keys 0-7,
        // chunk k), (keys 8-15, k), (keys 0-7, k + 1), (keys 8-15, k + 1). Lane l gets key
        // l / 4 (+ 8), bytes d = 16 chunk + 4 (l % 4) .. + 3: its A registers (a0, a2) / (a1,
        // a3) in Q's d order. swz8 keeps each matrix's 8 rows on 8 different bank groups.
#pragma unroll
        for (int k = 0; k < D / 16; k += 2) {
          uint32_t kr[4];
          dev::ldsm_x4(aK ^ (k << 4), kr);
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            uint32_t a[4];
            e4m3x4_to_f16(kr[2 * h], a[0], a[2]);
            e4m3x4_to_f16(kr[2 * h + 1], a[1], a[3]);
#pragma unroll
            for (int n = 0; n < NT; ++n)
              dev::mma_16x8x16<MT>(h ? s2[n] : s[n], a, qb[k + h][n][0], qb[k + h][n][1]);
          }
        }
      } else {
        // Matrices (keys 0-7, d lo), (keys 8-15, d lo), (keys 0-7, d hi), (keys 8-15, d hi).
#pragma unroll
        for (int k = 0; k < D / 16; ++k) {
          uint32_t a[4];
          dev::ldsm_x4(aK ^ (k << 5), a);
#pragma unroll
          for (int n = 0; n < NT; ++n) dev::mma_16x8x16<T>((k & 1) ? s2[n] : s[n], a, qb[k][n][0], qb[k][n][1]);
        }
      }
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] += s2[n][e];
      // Online softmax (log2 domain) per head column, keys past the segment end masked: a
      // column's 16 keys are c0 / c2 of the 8 lanes of one t.
      float mx[NT][2];
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        mx[n][0] = mx[n][1] = -INFINITY;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = key0 + g + (e >> 1) * 8;
          float sv = s[n][e];
          if constexpr (kScaledQ) sv *= qf[n][e & 1];  // exact: the bf16 q's score
          s[n][e] = key < kend ? sv * sl2 : -INFINITY;
          mx[n][e & 1] = fmaxf(mx[n][e & 1], s[n][e]);
        }
      }
      float alpha[NT][2];
      bool moved = false;
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          mx[n][i] = fmaxf(mx[n][i], __shfl_xor_sync(0xffffffffu, mx[n][i], 4));
          mx[n][i] = fmaxf(mx[n][i], __shfl_xor_sync(0xffffffffu, mx[n][i], 8));
          mx[n][i] = fmaxf(mx[n][i], __shfl_xor_sync(0xffffffffu, mx[n][i], 16));
          const float m_new = fmaxf(st.m[n][i], mx[n][i] - kPOff);  // finite: key0 < kend is a real key
          alpha[n][i] = sexp2(st.m[n][i] - m_new);
          moved |= alpha[n][i] != 1.f;
          st.m[n][i] = m_new;
          st.l[n][i] *= alpha[n][i];
        }
      // P^T as the B operand of O^T = V^T P^T: the accumulator pairs (key g or g + 8; heads 2t,
      // 2t + 1) transposed in registers to (keys 2t, 2t + 1 (+ 8); head g).
      uint32_t pb[NT][2];
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const float p0 = sexp2(s[n][0] - st.m[n][0]), p1 = sexp2(s[n][1] - st.m[n][1]);
        const float p2 = sexp2(s[n][2] - st.m[n][0]), p3 = sexp2(s[n][3] - st.m[n][1]);
        st.l[n][0] += p0 + p2;
        st.l[n][1] += p1 + p3;
        pb[n][0] = dev::movmatrix_trans(dev::pack2<MT>(p0, p1));
        pb[n][1] = dev::movmatrix_trans(dev::pack2<MT>(p2, p3));
      }
      // fp8: the rescale only when some lane's max moved (alpha != 1; o * 1 == o exactly):
      // past the first tiles of a long row the max rarely moves, and the D / 4 FMULs per
      // n-tile are the largest item of the tile after the conversions.
      if (!F8 || __any_sync(0xffffffffu, moved)) {
#pragma unroll
        for (int j = 0; j < D / 16; ++j)
#pragma unroll
          for (int n = 0; n < NT; ++n) {
            st.o[j][n][0] *= alpha[n][0]; st.o[j][n][1] *= alpha[n][1];
            st.o[j][n][2] *= alpha[n][0]; st.o[j][n][3] *= alpha[n][1];
          }
      }
      // O^T += V^T P^T: V rows are [key][d], the A operand wants [d][key]: ldmatrix.trans.
      if constexpr (F8) {
        // Matrices (keys 0-7, chunk j), (keys 8-15, j), (keys 0-7, j + 1), (keys 8-15, j + 1)
        // of byte pairs, transposed: lane l (g = l / 4, t = l % 4) gets the bytes
        // [V(2t, 2g), V(2t, 2g + 1), V(2t + 1, 2g), V(2t + 1, 2g + 1)] (key, d within the
        // block). Permuted to [V(2t, 2g), V(2t + 1, 2g), V(2t, 2g + 1), V(2t + 1, 2g + 1)]
        // and converted: the key pair of d = 2g (A row g) and of d = 2g + 1 (A row g + 8).
#pragma unroll
        for (int j = 0; j < D / 16; j += 2) {
          uint32_t vr[4];
          dev::ldsm_x4_trans(aV ^ (j << 4), vr);
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            uint32_t a[4];
            e4m3x4_to_f16(__byte_perm(vr[2 * h], 0u, 0x3120), a[0], a[1]);      // keys 2t, 2t + 1
            e4m3x4_to_f16(__byte_perm(vr[2 * h + 1], 0u, 0x3120), a[2], a[3]);  // keys 2t + 8, 2t + 9
#pragma unroll
            for (int n = 0; n < NT; ++n) dev::mma_16x8x16<MT>(st.o[j + h][n], a, pb[n][0], pb[n][1]);
          }
        }
      } else {
        // Matrices (keys 0-7, d lo), (keys 0-7, d hi), (keys 8-15, d lo), (keys 8-15, d hi).
#pragma unroll
        for (int j = 0; j < D / 16; ++j) {
          uint32_t a[4];
          dev::ldsm_x4_trans(aV ^ (j << 5), a);
#pragma unroll
          for (int n = 0; n < NT; ++n) dev::mma_16x8x16<T>(st.o[j][n], a, pb[n][0], pb[n][1]);
        }
      }
    }
    cp_async_wait<0>();
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int i = 0; i < 2; ++i) {  // column sums were kept per lane: finish them over the 8 lanes of a t
        st.l[n][i] += __shfl_xor_sync(0xffffffffu, st.l[n][i], 4);
        st.l[n][i] += __shfl_xor_sync(0xffffffffu, st.l[n][i], 8);
        st.l[n][i] += __shfl_xor_sync(0xffffffffu, st.l[n][i], 16);
      }
  }
};

}  // namespace decode
}  // namespace dms
