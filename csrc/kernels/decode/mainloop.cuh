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

// e4m3 bytes x = [b3 b2 b1 b0] by integer ops (shift and mask, no conversion unit): f16x2
// even = {b0, b2}, odd = {b1, b3} (low half first), each 2^-8 times the e4m3 value: the 7 bits
// below the sign go to f16 bits 13..7, so the e4m3 exponent (bias 7) reads with f16's bias 15;
// subnormals land on f16 subnormals the same way. Exact for every finite byte; the NaN bytes
// (0x7f, 0xff) read as +-480 * 2^-8.
#ifndef DMS_F8_ALU
#define DMS_F8_ALU 0  // 0: cvt for K and V; 1: V by integer ops; 2: K and V by integer ops
#endif
__device__ __forceinline__ void e4m3x4_to_f16_alu(uint32_t x, uint32_t& even, uint32_t& odd) {
  odd = (x & 0x80008000u) | ((x >> 1) & 0x3f803f80u);
  const uint32_t y = x << 8;
  even = (y & 0x80008000u) | ((y >> 1) & 0x3f803f80u);
}

// One warp's stream and mainloop for a segment of keys (T: q / out dtype; D: head dim; S: stages
// per warp; F8: an fp8 e4m3 pool).
template <typename T, int D, int S, bool F8 = false> struct Decode {
  using C = Cfg<D, S, F8>;
  static constexpr int kD = D;
  static constexpr bool kF8 = F8;
  using KV = typename std::conditional<F8, uint8_t, T>::type;  // pool element
  // MMA operand type: fp8 pools compute in f16 whatever q's dtype (e4m3 -> f16 is one exact
  // cvt per pair, -> bf16 four instructions); a bf16 q is rescaled per head row into f16.
  using MT = typename std::conditional<F8, __half, T>::type;
  static constexpr bool kScaledQ = F8 && std::is_same<T, __nv_bfloat16>::value;
  // fp8 operands converted by integer ops (e4m3x4_to_f16_alu) read 2^-8 times their value: K's
  // factor is folded into the score scale, V's into the epilogue's (kVUnit).
  static constexpr bool kAluK = F8 && DMS_F8_ALU >= 2, kAluV = F8 && DMS_F8_ALU >= 1;
  static constexpr float kVUnit = kAluV ? 256.f : 1.f;
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
    const float sl2 = F8 ? p.scale * p.kv.k_scale * (kAluK ? 256.f : 1.f) * kLog2e : p.scale * kLog2e;

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
            uint2 x0 = *reinterpret_cast<const uint2*>(sQ + dev::swz<D>(g, c) + e);
            uint2 x1 = *reinterpret_cast<const uint2*>(sQ + dev::swz<D>(g + 8, c) + e);
            if constexpr (kAluK) {  // the K fragments hold d {4t, 4t + 2} and {4t + 1, 4t + 3}
              x0 = make_uint2(__byte_perm(x0.x, x0.y, 0x5410), __byte_perm(x0.x, x0.y, 0x7632));
              x1 = make_uint2(__byte_perm(x1.x, x1.y, 0x5410), __byte_perm(x1.x, x1.y, 0x7632));
            }
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
            if constexpr (kAluK) e4m3x4_to_f16_alu(kr[i], b0, b1);
            else e4m3x4_to_f16(kr[i], b0, b1);
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
            if constexpr (kAluV) {  // even / odd bytes are the key pairs already
              e4m3x4_to_f16_alu(vr[2 * h], e0, o0);
              e4m3x4_to_f16_alu(vr[2 * h + 1], e1, o1);
            } else {
              e4m3x4_to_f16(__byte_perm(vr[2 * h], 0u, 0x3120), e0, o0);     // keys 2t, 2t + 1
              e4m3x4_to_f16(__byte_perm(vr[2 * h + 1], 0u, 0x3120), e1, o1);  // keys 2t + 8, 2t + 9
            }
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
};

}  // namespace decode
}  // namespace dms
