// sparse_prefill v2 (sm_90a): DMS mask + online softmax on a warpgroup's S accumulators.
//
// S is m64 x kBlockN fp32 per consumer warpgroup; this thread holds rows rs = 0, 1
// (16 * warp + lane / 4 + 8 * rs) and, per 8-column block i, columns 8i + 2 * (lane % 4) + e.
// A key tile the producer marked fully visible (every key visible to every query token of the
// tile) skips the mask; otherwise key k carries [a, b] (sMeta) and query qi sees it iff
// a <= qi <= b. Rows past the chunk have qi = -1 (never visible on masked tiles; never stored).
// Scores go to the log2 domain (scale * log2 e): for scale > 0 through the exponent's FFMA
// after a max on the raw scores, otherwise before the max (any sign of scale works).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/primitives.cuh"

namespace dms {
namespace sm90 {

template <int kBlockN>
struct OnlineSoftmax {
  float m[2], l[2];

  __device__ __forceinline__ void init() {
    m[0] = m[1] = -INFINITY;
    l[0] = l[1] = 0.f;
  }

  // Masks and scales s in place, turns it into exp2(s - running max), updates (m, l) and
  // returns in alpha the factor the output accumulated so far must be scaled by.
  // kPos (sl2 > 0): the max is taken on the raw scores and scaled once, and the scale folds
  // into the exponent (one FFMA per score, FA3's form); otherwise every score is scaled first.
  template <bool kPos>
  __device__ __forceinline__ void step(float (&s)[kBlockN / 2], bool full, const int4* meta,
                                       const int (&qi)[2], float sl2, int lane, float (&alpha)[2]) {
    float mx[2] = {-INFINITY, -INFINITY};
    if (full) {
#pragma unroll
      for (int i = 0; i < kBlockN / 2; ++i) {
        if constexpr (!kPos) s[i] *= sl2;
        mx[(i >> 1) & 1] = fmaxf(mx[(i >> 1) & 1], s[i]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < kBlockN / 8; ++i) {
        const int4 ab = meta[i * 4 + (lane & 3)];  // columns 8i + 2 (lane % 4) + {0, 1}
#pragma unroll
        for (int rs = 0; rs < 2; ++rs) {
          const int q = qi[rs];
          float& x0 = s[4 * i + 2 * rs];
          float& x1 = s[4 * i + 2 * rs + 1];
          x0 = (ab.x <= q && q <= ab.y) ? (kPos ? x0 : x0 * sl2) : -INFINITY;
          x1 = (ab.z <= q && q <= ab.w) ? (kPos ? x1 : x1 * sl2) : -INFINITY;
          mx[rs] = fmaxf(mx[rs], fmaxf(x0, x1));
        }
      }
    }
    float base[2];
#pragma unroll
    for (int rs = 0; rs < 2; ++rs) {
      float v = mx[rs];
      v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
      v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
      if constexpr (kPos) v *= sl2;   // -inf stays -inf
      const float m_new = fmaxf(m[rs], v);
      // A row with nothing visible yet keeps base 0: exp2(-inf - 0) = 0, never NaN.
      base[rs] = m_new == -INFINITY ? 0.f : m_new;
      alpha[rs] = dev::ex2(m[rs] - base[rs]);
      m[rs] = m_new;
      l[rs] *= alpha[rs];
    }
#pragma unroll
    for (int i = 0; i < kBlockN / 2; ++i) {
      const int rs = (i >> 1) & 1;
      s[i] = kPos ? dev::ex2(fmaf(s[i], sl2, -base[rs])) : dev::ex2(s[i] - base[rs]);
      l[rs] += s[i];
    }
  }

  // 1 / (row sum over the quad), 0 for a row that saw nothing.
  __device__ __forceinline__ void finish(float (&inv)[2]) {
#pragma unroll
    for (int rs = 0; rs < 2; ++rs) {
      float v = l[rs];
      v += __shfl_xor_sync(0xffffffffu, v, 1);
      v += __shfl_xor_sync(0xffffffffu, v, 2);
      inv[rs] = v > 0.f ? 1.f / v : 0.f;
    }
  }
};

}  // namespace sm90
}  // namespace dms
