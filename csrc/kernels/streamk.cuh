// Stream-K over a persistent grid, shared by sparse_decode (sparse_decode.cu) and the short-chunk
// sparse_prefill (sparse_prefill_small.cu). Device code only; no torch.
//
// The plan kernel of each op lays the work rows on one line of U units (a row of L keys costs
// ceil(L / tile) + 1 units), writes the inclusive prefix `prefix[v]` and, per CTA c, the first
// row its range [c U / n, (c + 1) U / n) touches (`cta_row[c]`; meta = {n, U}). The attention
// kernel walks its range: a row whole inside it is written directly, a cut row's pieces go to
// float32 partials (two slots per CTA: slot 2c for the first piece of c's range, 2c + 1 for the
// last), and the merge below, one CTA per cut row (the CTA where the row starts), combines
// them. What differs between the ops (rows per work row, where an output row is stored) stays
// with the op: the Store functor.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/primitives.cuh"

namespace dms {
namespace streamk {

// First unit of CTA c when U units are cut into n ranges, and the CTA owning unit u.
__device__ __forceinline__ int64_t range_begin(int64_t c, int64_t U, int64_t n) { return c * U / n; }
__device__ __forceinline__ int owner_of(int64_t u, int64_t U, int64_t n) {
  return (int)(((u + 1) * n - 1) / U);
}

// The plan, run by one CTA of kThreads threads: prefix[v] = sum of cost(v') over v' <= v for the
// rows_v work rows (cost(v): that row's units, evaluated once per row, in order of v per thread),
// then n = clamp(U / min_units, 1, grid) CTAs get work and cta_row[c] = the row holding unit
// floor(c U / n); meta = {n (0 when U = 0: nothing to do), U}.
template <int kThreads, typename Cost>
__device__ __forceinline__ void plan_line(int64_t rows_v, int grid, int min_units, int32_t* prefix,
                                          int32_t* cta_row, int32_t* meta, Cost&& cost) {
  __shared__ int warp_sums[kThreads / 32];
  __shared__ int carry_s;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (tid == 0) carry_s = 0;
  __syncthreads();
  for (int64_t base = 0; base < rows_v; base += kThreads) {
    const int64_t v = base + tid;
    int x = v < rows_v ? cost(v) : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, x, o);
      if (lane >= o) x += y;
    }
    if (lane == 31) warp_sums[warp] = x;
    __syncthreads();
    if (warp == 0) {
      int w = warp_sums[lane];
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, w, o);
        if (lane >= o) w += y;
      }
      warp_sums[lane] = w;  // inclusive over warps
    }
    __syncthreads();
    const int carry = carry_s;
    if (v < rows_v) prefix[v] = carry + (warp > 0 ? warp_sums[warp - 1] : 0) + x;
    __syncthreads();
    if (tid == 0) carry_s = carry + warp_sums[kThreads / 32 - 1];
    __syncthreads();
  }  // the loop's last barrier made prefix[] (global writes of this CTA) visible to all of it
  const int64_t U = carry_s;
  int64_t n = U / (min_units > 0 ? min_units : 1);
  n = n < 1 ? 1 : (n > grid ? grid : n);
  // CTA c starts in row v when floor(c U / n) lies in [P_v, P_end_v): c in [ceil(P n / U), ceil(P_end n / U)).
  if (U > 0) {
    for (int64_t v = tid; v < rows_v; v += kThreads) {
      const int64_t P = v > 0 ? prefix[v - 1] : 0, P_end = prefix[v];
      const int64_t c_lo = (P * n + U - 1) / U, c_hi = (P_end * n + U - 1) / U;
      for (int64_t c = c_lo; c < c_hi; ++c) cta_row[c] = (int32_t)v;
    }
  }
  if (tid == 0) {
    meta[0] = U > 0 ? (int32_t)n : 0;
    meta[1] = (int32_t)U;
  }
}

constexpr int kMergeThreads = 256;

// CTA c's share of the unit line (meta = {n, U}): units [a0, b0); false when c gets none.
struct CtaRange {
  int n;
  int64_t U, a0, b0;
};

__device__ __forceinline__ bool cta_range(const int32_t* meta, int c, CtaRange& r) {
  r.n = meta[0];
  if (c >= r.n) return false;
  r.U = meta[1];
  r.a0 = range_begin(c, r.U, r.n);
  r.b0 = range_begin(c + 1, r.U, r.n);
  return true;
}

// The cut row CTA c merges, if any: row v, its first unit P, c's first unit a0 and its number
// of pieces k (CTAs c .. c + k - 1).
struct CutRow {
  int64_t v, P, a0;
  int k;
};

__device__ __forceinline__ bool cut_row_of(const int32_t* meta, const int32_t* prefix,
                                           const int32_t* cta_row, int c, CutRow& out) {
  CtaRange cr;
  if (!cta_range(meta, c, cr)) return false;
  const int n = cr.n;
  const int64_t U = cr.U, a0 = cr.a0, b0 = cr.b0;
  int64_t v = cta_row[c];
  while (prefix[v] < b0) ++v;  // the row holding c's last unit
  const int64_t P = v > 0 ? prefix[v - 1] : 0, P_end = prefix[v];
  if (P_end <= b0 && P >= a0) return false;  // whole in c: written directly
  if (owner_of(P, U, n) != c) return false;  // starts in an earlier CTA, merged there
  out.v = v;
  out.P = P;
  out.a0 = a0;
  out.k = owner_of(P_end - 1, U, n) - c + 1;
  return true;
}

// Shared memory of merge_pieces for up to `grid` pieces of kRows rows.
__host__ __device__ constexpr size_t merge_smem_bytes(int grid, int kRows) {
  return (size_t)grid * kRows * 4 + kMergeThreads * 16 + 2 * kRows * 4;
}

// Merges the k pieces of cut row `cr` (CTA c) for its first nrows rows: part_lse [slot][kRows]
// (log2 domain), part_o [slot][kRows][D] (unnormalized). Two phases, each a few independent loads
// per thread: the pieces' lse give per-row weights (shared memory), then every thread sums
// weighted float4 columns over a share of the pieces. store(r, d, acc, inv) writes row r,
// columns d .. d + 3 of the output: acc * inv; sSum[r] / sMax[r] hold the row's sum and max
// (lse = sMax + log2(sSum)). kUnroll: the unroll of the piece loop.
template <int D, int kRows, int kUnroll, typename Store>
__device__ __forceinline__ void merge_pieces(const CutRow& cr, int c, int nrows,
                                             const float* part_o, const float* part_lse,
                                             float* merge_smem, Store&& store) {
  constexpr int kVec = D / 4;  // float4 columns per row
  float4* sAcc = reinterpret_cast<float4*>(merge_smem);  // [kMergeThreads]
  float* sMax = merge_smem + kMergeThreads * 4;          // [kRows]
  float* sSum = sMax + kRows;                            // [kRows]
  float* sW = sSum + kRows;                              // [pieces][kRows]
  const int k = cr.k;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  // Piece j of the row is CTA c + j's first segment (slot 0), except for j = 0 when c's range
  // starts before the row (then it is c's last segment, slot 1).
  auto slot_of = [&](int j) { return 2 * (int64_t)(c + j) + (j == 0 && cr.a0 < cr.P ? 1 : 0); };

  for (int i = tid; i < k * nrows; i += kMergeThreads) {  // phase 1: lse of every piece and row
    const int j = i / nrows, r = i % nrows;
    sW[j * kRows + r] = part_lse[slot_of(j) * kRows + r];
  }
  __syncthreads();
  for (int r = warp; r < nrows; r += kMergeThreads / 32) {  // a warp per row: max, weights, sum
    float M = -INFINITY;
    for (int j = lane; j < k; j += 32) M = fmaxf(M, sW[j * kRows + r]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
    float l = 0.f;
    for (int j = lane; j < k; j += 32) {
      const float w = M == -INFINITY ? 0.f : exp2f(sW[j * kRows + r] - M);  // empty piece: 0
      sW[j * kRows + r] = w;
      l += w;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
    if (lane == 0) {
      sMax[r] = M;
      sSum[r] = l;
    }
  }
  __syncthreads();
  // Phase 2: E float4 columns; groups of threads split the pieces when E < the CTA.
  const int E = nrows * kVec;
  const int groups = E >= kMergeThreads ? 1 : kMergeThreads / E;
  const int grp = tid / E < groups ? tid / E : groups;  // threads past groups * E idle in the sum
  for (int e0 = 0; e0 < E; e0 += kMergeThreads) {
    const int e = e0 + (groups > 1 ? tid % E : tid);
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    if (e < E && grp < groups) {
      const int r = e / kVec, d4 = e % kVec;
#pragma unroll kUnroll
      for (int j = grp; j < k; j += groups) {
        const float w = sW[j * kRows + r];
        const float4 x = __ldg(reinterpret_cast<const float4*>(part_o + (slot_of(j) * kRows + r) * D) + d4);
        acc.x += w * x.x; acc.y += w * x.y; acc.z += w * x.z; acc.w += w * x.w;
      }
    }
    if (groups > 1) {
      sAcc[tid] = acc;
      __syncthreads();
      if (tid < E) {
        for (int q = 1; q < groups; ++q) {
          const float4 y = sAcc[q * E + tid];
          acc.x += y.x; acc.y += y.y; acc.z += y.z; acc.w += y.w;
        }
      }
    }
    if (e < E && (groups == 1 || tid < E)) {
      const int r = e / kVec, d = (e % kVec) * 4;
      const float l = sSum[r], inv = l > 0.f ? 1.f / l : 0.f;
      store(r, d, acc, inv, sSum, sMax);
    }
  }
}

}  // namespace streamk
}  // namespace dms
