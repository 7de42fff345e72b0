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

// K: the segment's Decode<T, D, S, F8>.
template <typename K> struct WarpMerge {
  using C = typename K::C;
  using State = typename K::State;
  static constexpr int D = K::kD, kStages = K::kStages;
  static constexpr bool F8 = K::kF8;

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

}  // namespace decode
}  // namespace dms
