// sparse_decode (csrc/kernels/sparse_decode.cu): the merge of a segment's 4 warp states. Each
// warp's fp32 o goes to its own last stage(s), its m / l to shared memory; one weight per warp and
// head row (row_factors); the merged float4 columns (merged4) feed the epilogue's stores.
// Device code only; no torch.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/decode/config.cuh"
#include "kernels/decode/mainloop.cuh"

namespace dms {
namespace decode {

// K: the segment's Decode<T, D, S, F8, NT>.
template <typename K> struct WarpMerge {
  using C = typename K::C;
  using State = typename K::State;
  static constexpr int D = K::kD, kStages = K::kStages;
  static constexpr bool F8 = K::kF8;

  // The warp merge. Warp w's fp32 o [16][D] (head rows; a head row's columns XOR-swizzled in
  // groups of 8 by col()) goes to its own last kScratchStages stages (those the next segment's
  // begin() leaves alone), its m / l to sM / sL [warp][16] (log2 domain).
  static __device__ __forceinline__ float* scratch_of(unsigned char* sStages, int w) {
    return reinterpret_cast<float*>(sStages + w * C::kWarpBytes + (kStages - C::kScratchStages) * C::kStageBytes);
  }
  // Column d of head row r in the scratch: the 4 t of a store (rows 2t, 2t + 1 of an n-tile,
  // the same 8 or 16 columns) land on 4 different bank groups; float4 groups stay whole.
  static __device__ __forceinline__ int col(int r, int d) { return d ^ (8 * ((r >> 1) & 3)); }
  static __device__ __forceinline__ void merge_warps(const State& st, unsigned char* sStages, float* sM, float* sL) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float* wo = scratch_of(sStages, warp);
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int n = 0; n < K::kNT; ++n) {
      const int h0 = 8 * n + 2 * t, h1 = h0 + 1;
#pragma unroll
      for (int j = 0; j < D / 16; ++j) {
        if constexpr (F8) {  // M rows g / g + 8: d 16j + 2g / + 1
          const int d = 16 * j + 2 * g;
          *reinterpret_cast<float2*>(wo + h0 * D + col(h0, d)) = make_float2(st.o[j][n][0], st.o[j][n][2]);
          *reinterpret_cast<float2*>(wo + h1 * D + col(h1, d)) = make_float2(st.o[j][n][1], st.o[j][n][3]);
        } else {  // M rows g / g + 8: d 16j + g / + 8
          const int d = 16 * j + g;
          wo[h0 * D + col(h0, d)] = st.o[j][n][0];
          wo[h1 * D + col(h1, d)] = st.o[j][n][1];
          wo[h0 * D + col(h0, d + 8)] = st.o[j][n][2];
          wo[h1 * D + col(h1, d + 8)] = st.o[j][n][3];
        }
      }
      if (g == 0) {  // m and the finished l are the same on the 8 lanes of a t
        sM[warp * kHeadTile + h0] = st.m[n][0];
        sM[warp * kHeadTile + h1] = st.m[n][1];
        sL[warp * kHeadTile + h0] = st.l[n][0];
        sL[warp * kHeadTile + h1] = st.l[n][1];
      }
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
      const float4 x = *reinterpret_cast<const float4*>(scratch_of(sStages, w) + r * D + col(r, d));
      acc.x += f * x.x; acc.y += f * x.y; acc.z += f * x.z; acc.w += f * x.w;
    }
    return acc;
  }
};

}  // namespace decode
}  // namespace dms
