// Stream-K over a persistent grid, shared by sparse_decode (sparse_decode.cu) and the short-chunk
// sparse_prefill (sparse_prefill_small.cu). Device code only; no torch.
//
// The work rows of an op lie on one line of U units (a row of L keys costs ceil(L / tile) + 1
// units; a row may cost 0). CTA c of the n working CTAs owns units [c U / n, (c + 1) U / n).
// sparse_decode has no plan kernel: every CTA finds its own place on the line (locate: one
// block scan of the row costs, loaded at once), then walks its range row by row, summing the
// costs as it goes (with few rows, locate_rows instead gives every CTA one piece of one row,
// as a Place of the same walk). The short-chunk sparse_prefill, whose row cost is a search over
// the chunks, keeps a one-CTA plan kernel (plan_line, cta_range, cut_row_of at the end of this file). A row
// whole inside the range is written directly, a cut row's pieces go to float32 partials (two
// slots per CTA: slot 2c for the first piece of c's range, 2c + 1 for the last), and the merge
// kernel combines the pieces of the row cut in CTA c (merge_pieces over its CutRow): sparse_decode's
// merge kernel finds that row with the attention kernel's own search before it waits (locate with
// kLast, cut_record; row_record in the row-aligned form), the plan-kernel form reads it from the
// plan (cut_row_of). What differs between the ops (rows per work row, where an output row
// is stored) stays with the op: the Store functor.
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

// Inclusive prefix sum of x over the lanes of a (converged) warp.
__device__ __forceinline__ int warp_inclusive_scan(int x, int lane) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  return x;
}

// CTA c's place on the line: n CTAs get work, c's units are [a0, b0), its first row is v with
// first unit P (the row holding unit a0; locate<..., kLast>: the row holding b0 - 1) and length
// x (the value len(v) the search read, so that the walk's first segment does not load it again;
// -1: not known). int32: the ops keep U below 2^31.
struct Place {
  int n, U, a0, b0, v, P, x;
};

// Run by all kThreads threads of CTA c (barriers inside; call it where every thread does).
// Row v costs units(len(v)) >= 0 units. Thread t sums the costs over its block of consecutive rows
// (len(v) loaded at most twice per row), a block scan gives each block's first unit and U, then
// n = clamp(U / min_units, 1, grid) and the thread whose block holds unit a0 (kLast: b0 - 1)
// finds its row.
// Returns the CTA's place in shared memory (read it where needed rather than keeping copies in
// registers across the mainloop), or nullptr: c gets no work.
// len4(v) (used when vec4): len of rows v .. v + 3 as an int4, v a multiple of 4: one 16-byte
// load where len(v) would take four. A thread's rows are consecutive, so its scalar loads hit
// every line `per` times, and every CTA of the grid loads the same lines at its start.
// kLast: the place's row is the one holding c's last unit b0 - 1 instead of a0 (the row of c's
// last segment: what the merge kernel needs, cut_record).
template <int kThreads, bool kLast = false, typename Len, typename Units, typename Len4>
__device__ __forceinline__ const Place* locate(int64_t rows_v, int grid, int min_units, int c, Len&& len,
                                               Units&& units, bool vec4, Len4&& len4) {
  // Up to kHeld rows per thread: all their costs are loaded at once (independent loads, one
  // memory latency) and kept in registers for the owner's search; more rows: a loop.
  constexpr int kHeld = 8;
  __shared__ int s_warp[kThreads / 32];
  __shared__ Place s_place;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t per = (rows_v + kThreads - 1) / kThreads;
  const int64_t v_lo = min(rows_v, (int64_t)tid * per), v_hi = min(rows_v, v_lo + per);
  int held[kHeld];
  int sum = 0;
  if (per <= kHeld) {
    // held[i]: len(v_lo + i) (rows past the block: 0 units, never found)
    if (vec4 && per % 4 == 0) {  // v_lo = tid * per: a multiple of 4
#pragma unroll
      for (int i = 0; i < kHeld; i += 4) {
        if (v_lo + i + 3 < v_hi) {
          const int4 x = len4(v_lo + i);
          held[i] = x.x; held[i + 1] = x.y; held[i + 2] = x.z; held[i + 3] = x.w;
        } else {
#pragma unroll
          for (int j = 0; j < 4; ++j) held[i + j] = v_lo + i + j < v_hi ? len(v_lo + i + j) : 0;
        }
      }
    } else {
#pragma unroll
      for (int i = 0; i < kHeld; ++i) held[i] = v_lo + i < v_hi ? len(v_lo + i) : 0;
    }
#pragma unroll
    for (int i = 0; i < kHeld; ++i) sum += v_lo + i < v_hi ? units(held[i]) : 0;
  } else {
    for (int64_t v = v_lo; v < v_hi; ++v) sum += units(len(v));
  }
  const int x = warp_inclusive_scan(sum, lane);  // then over the CTA
  if (lane == 31) s_warp[warp] = x;
  __syncthreads();
  int before = 0, U = 0;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) {
    if (w < warp) before += s_warp[w];
    U += s_warp[w];
  }
  const int excl = before + x - sum;  // first unit of this thread's block
  int n = U / (min_units > 0 ? min_units : 1);
  n = n < 1 ? 1 : (n > grid ? grid : n);
  if (U == 0 || c >= n) return nullptr;  // uniform over the CTA
  const int a0 = (int)range_begin(c, U, n), b0 = (int)range_begin(c + 1, U, n);
  const int t = kLast ? b0 - 1 : a0;  // the unit whose row is searched (a0 < b0: c has work)
  if (excl <= t && t < excl + sum) {  // exactly one thread: the blocks partition the units
    int P = excl, L = 0;  // the row's first unit and length
    int64_t v = v_lo;
    if (per <= kHeld) {
      bool found = false;
#pragma unroll
      for (int i = 0; i < kHeld; ++i) {
        const int u = v_lo + i < v_hi ? units(held[i]) : 0;
        if (!found && P + u > t) {
          v = v_lo + i;
          L = held[i];
          found = true;
        }
        if (!found) P += u;
      }
    } else {
      for (;; ++v) {
        L = len(v);
        const int e = P + units(L);
        if (e > t) break;
        P = e;
      }
    }
    s_place = Place{n, U, a0, b0, (int)v, P, L};
  }
  __syncthreads();
  return &s_place;
}

// The cut row CTA c starts, for the merge kernel (v < 0: none): row v, its first unit P, the
// CTA's first unit a0 and the row's number of pieces k (CTAs c .. c + k - 1). Computed from the
// lengths each call (never stored between the kernels), so nothing is left from a previous call.
struct CutRow {
  int v, P, a0, k;
};

// The record of CTA c whose last segment is row v = [P, P_end) (c's range [a0, b0), n CTAs over
// U units): the row when it is cut and starts in c, else none.
__device__ __forceinline__ CutRow no_cut_row() { return CutRow{-1, 0, 0, 0}; }
__device__ __forceinline__ CutRow cut_record(const Place& pl, int c, int v, int P, int P_end) {
  if ((P_end > pl.b0 || P < pl.a0) && owner_of(P, pl.U, pl.n) == c)
    return CutRow{v, P, pl.a0, owner_of(P_end - 1, pl.U, pl.n) - c + 1};
  return no_cut_row();
}

// ---- The row-aligned form, for few rows (at most 32, and no more than the grid): every CTA takes
// one piece of one row, so no CTA pays a second row's query, block-id and first-slice latencies
// after its first row (with one CTA per SM, the CTAs whose stream-K range held two rows ended
// last: bench/results/decode_probe_dump_2026-11-30_1325.md). Row v of T_v tiles gets
// n_v = max(1, ceil(T_v / lam)) CTAs, lam (tiles per CTA at most) the smallest value >= max(1,
// min_tiles) with sum n_v <= grid: a search of a few steps in one warp (row_pieces). Piece j of
// row v holds tiles [j T_v / n_v, (j + 1) T_v / n_v) (an empty row: one piece of none); the
// pieces of a row are consecutive CTAs, from first_v = sum of n_u over u < v. The merge kernel
// runs the same search for its row (the lengths are inputs, not written by the attention
// kernel, so before its wait for the attention grid): no record between the kernels.

// Row v's pieces: run by one converged warp, lane v < rows_v for row v (L = len(v), T =
// tiles(L) >= 0 tiles); lanes past rows_v get n = 0. rows_v <= 32 and <= grid.
struct RowPieces {
  int T, n, first, L;
};
template <typename Len, typename Tiles>
__device__ __forceinline__ RowPieces row_pieces(int rows_v, int grid, int min_tiles, int lane, Len&& len,
                                                Tiles&& tiles) {
  const bool mine = lane < rows_v;
  const int L = mine ? len(lane) : 0;
  const int T = mine ? tiles(L) : 0;
  auto warp_sum = [](int x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
  };
  auto pieces = [&](int lam) { return mine ? max(1, (T + lam - 1) / lam) : 0; };
  // lam lies in [ceil(S / grid), ceil(S / (grid - rows_v))] (S the tiles of all rows): below,
  // sum ceil(T_v / lam) >= S / lam > grid; at the top, sum (T_v / lam + 1) <= grid. Without a
  // spare CTA the top is the longest row. A search of a few steps, not one over the lengths.
  int S = T, tmax = T;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    S += __shfl_xor_sync(0xffffffffu, S, o);
    tmax = max(tmax, __shfl_xor_sync(0xffffffffu, tmax, o));
  }
  const int spare = grid - rows_v;
  int lo = max(max(1, min_tiles), (S + grid - 1) / grid);
  int hi = max(lo, spare > 0 ? (S + spare - 1) / spare : tmax);
  while (lo < hi) {  // uniform over the warp
    const int mid = lo + (hi - lo) / 2;
    if (warp_sum(pieces(mid)) <= grid) hi = mid;
    else lo = mid + 1;
  }
  const int n = pieces(lo);
  return RowPieces{T, n, warp_inclusive_scan(n, lane) - n, L};
}

// CTA c's piece as a Place of the stream-K walk over the row alone (P = 0, the row's row_cost
// fixed units first, then its tiles): range [a0, b0) holds exactly the piece's tiles (and the
// fixed units when j = 0), so the walk takes one segment, writes the row directly when it has
// one piece, and its partial in slot 2c otherwise. Run by all kThreads threads of CTA c.
// Returns the CTA's place in shared memory, or nullptr: c gets none.
template <int kThreads, typename Len, typename Tiles>
__device__ __forceinline__ const Place* locate_rows(int rows_v, int grid, int min_tiles, int row_cost, int c,
                                                    Len&& len, Tiles&& tiles) {
  __shared__ Place s_place;
  __shared__ int s_has;
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    const RowPieces rp = row_pieces(rows_v, grid, min_tiles, lane, len, tiles);
    const int T = rp.T, n = rp.n, incl = rp.first + n;
    if (n > 0 && rp.first <= c && c < incl) {
      const int j = c - rp.first;
      const int t0 = (int)((int64_t)j * T / n), t1 = (int)((int64_t)(j + 1) * T / n);
      s_place = Place{grid, row_cost + T, j == 0 ? 0 : row_cost + t0, row_cost + t1, lane, 0, rp.L};
    }
    if (lane == 31) s_has = c < incl;  // incl of lane 31: the pieces of all rows
  }
  __syncthreads();
  return s_has ? &s_place : nullptr;
}

// The row-aligned form's merge record of row v (run by one converged warp, every lane gets it):
// the row when it is cut, with P = a0 = its first CTA (the merge reads piece j from CTA
// P + j's slot 2 (P + j)), else none.
template <typename Len, typename Tiles>
__device__ __forceinline__ CutRow row_record(int rows_v, int grid, int min_tiles, int v, Len&& len, Tiles&& tiles) {
  const RowPieces rp = row_pieces(rows_v, grid, min_tiles, threadIdx.x & 31, len, tiles);
  const int n = __shfl_sync(0xffffffffu, rp.n, v), first = __shfl_sync(0xffffffffu, rp.first, v);
  return n > 1 ? CutRow{v, first, first, n} : no_cut_row();
}

constexpr int kMergeThreads = 256;

// ---- The plan-kernel form, for an op whose row cost is too dear to evaluate in every CTA (the
// short-chunk sparse_prefill: a binary search over the chunks per row; evaluated by every CTA it
// cost 35 us per call at T 4, bench/results/prefill_small_2026-11-30_020501.md). One plan CTA
// writes the prefix of the row costs and each CTA's first row; the attention kernel reads its
// range (cta_range) and the merge kernel finds its cut row (cut_row_of).
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
    const int x = warp_inclusive_scan(v < rows_v ? cost(v) : 0, lane);
    if (lane == 31) warp_sums[warp] = x;
    __syncthreads();
    if (warp == 0) {
      warp_sums[lane] = warp_inclusive_scan(warp_sums[lane], lane);  // inclusive over warps
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

// The cut row CTA c merges (plan-kernel form), if any.
__device__ __forceinline__ bool cut_row_of(const int32_t* meta, const int32_t* prefix,
                                           const int32_t* cta_row, int c, CutRow& out) {
  CtaRange cr;
  if (!cta_range(meta, c, cr)) return false;
  const int n = cr.n;
  const int64_t U = cr.U, a0 = cr.a0, b0 = cr.b0;
  int64_t v = cta_row[c];
  while (prefix[v] < b0) ++v;  // the row holding c's last unit
  const int64_t P = v > 0 ? prefix[v - 1] : 0, P_end = prefix[v];
  // The rule of the in-kernel form: a row cut and starting in c (else whole in c, written
  // directly, or merged by the earlier CTA where it starts).
  out = cut_record(Place{n, (int)U, (int)a0, (int)b0, 0, 0, -1}, c, (int)v, (int)P, (int)P_end);
  return out.v >= 0;
}

// Shared memory of merge_pieces for up to `grid` pieces of kRows rows.
__host__ __device__ constexpr size_t merge_smem_bytes(int grid, int kRows) {
  return (size_t)grid * kRows * 4 + kMergeThreads * 16 + 2 * kRows * 4;
}

// Merges the k pieces of cut row `cr` (CTA c) for its first nrows rows: part_lse [slot][kRows]
// (log2 domain), part_o [slot][kRows][D] (unnormalized). Two phases, each a few independent loads
// per thread: the pieces' lse give per-row weights (shared memory), then every thread sums
// weighted float4 columns over a share of the pieces. kPrefetch: a thread's first kUnroll pieces
// of the first round of columns are loaded before the lse phase, so that both loads are in
// flight at once (for rows of many pieces, where it measured faster; it costs registers).
// store(r, d, acc, inv) writes row r, columns d .. d + 3 of the output: acc * inv; sSum[r] /
// sMax[r] hold the row's sum and max (lse = sMax + log2(sSum)). kUnroll: the unroll of the piece
// loop. part / parts: this CTA merges float4 columns [part, part + 1) * D / 4 / parts of every
// row (parts divides D / 4), so that `parts` CTAs share a row of many pieces, each thread summing
// fewer of them.
template <int D, int kRows, int kUnroll, bool kPrefetch = false, typename Store>
__device__ __forceinline__ void merge_pieces(const CutRow& cr, int c, int nrows,
                                             const float* part_o, const float* part_lse,
                                             float* merge_smem, Store&& store, int part = 0, int parts = 1) {
  const int kVec = D / 4 / parts;  // float4 columns per row of this CTA
  const int col0 = part * kVec;
  float4* sAcc = reinterpret_cast<float4*>(merge_smem);  // [kMergeThreads]
  float* sMax = merge_smem + kMergeThreads * 4;          // [kRows]
  float* sSum = sMax + kRows;                            // [kRows]
  float* sW = sSum + kRows;                              // [pieces][kRows]
  const int k = cr.k;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  // Piece j of the row is CTA c + j's first segment (slot 0), except for j = 0 when c's range
  // starts before the row (then it is c's last segment, slot 1).
  auto slot_of = [&](int j) { return 2 * (int64_t)(c + j) + (j == 0 && cr.a0 < cr.P ? 1 : 0); };

  // Phase 2's split, and its first column round's first loads.
  const int E = nrows * kVec;
  const int groups = E >= kMergeThreads ? 1 : kMergeThreads / E;
  const int grp = tid / E < groups ? tid / E : groups;  // threads past groups * E idle in the sum
  float4 pf[kPrefetch ? kUnroll : 1];
  if constexpr (kPrefetch) {
    const int e = groups > 1 ? tid % E : tid;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = grp + u * groups;
      pf[u] = make_float4(0.f, 0.f, 0.f, 0.f);
      if (e < E && grp < groups && j < k)
        pf[u] = __ldg(reinterpret_cast<const float4*>(part_o + (slot_of(j) * kRows + e / kVec) * D) + col0 + e % kVec);
    }
  }
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
  for (int e0 = 0; e0 < E; e0 += kMergeThreads) {
    const int e = e0 + (groups > 1 ? tid % E : tid);
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    if (e < E && grp < groups) {
      const int r = e / kVec, d4 = col0 + e % kVec;
      int j0 = grp;
      if constexpr (kPrefetch) {
        if (e0 == 0) {  // the prefetched pieces (zeros past k)
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            const int j = grp + u * groups;
            const float w = j < k ? sW[j * kRows + r] : 0.f;
            acc.x += w * pf[u].x; acc.y += w * pf[u].y; acc.z += w * pf[u].z; acc.w += w * pf[u].w;
          }
          j0 = grp + kUnroll * groups;
        }
      }
#pragma unroll kUnroll
      for (int j = j0; j < k; j += groups) {
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
      const int r = e / kVec, d = (col0 + e % kVec) * 4;
      const float l = sSum[r], inv = l > 0.f ? 1.f / l : 0.f;
      store(r, d, acc, inv, sSum, sMax);
    }
  }
}

}  // namespace streamk
}  // namespace dms
