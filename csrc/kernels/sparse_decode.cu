// dms::sparse_decode v2: a persistent, length-balanced decode over the paged per-head KV layout.
//
// The pieces, each in its own file:
//   Scheduler  streamk.cuh (shared with the short-chunk sparse_prefill). Every work row (b, g,
//              head tile) costs one unit of fixed work plus one unit per 64-key tile; the line of
//              units is cut into `n` equal ranges, one per CTA of the persistent attention
//              kernel, so every CTA gets the same number of tiles whatever the length
//              distribution (stream-K). Each CTA scans seq_lens itself at its start
//              (streamk::locate): no plan kernel, no host plan, no host sync; graph replays may
//              change every length. With few rows (at most 16) every CTA instead takes one piece
//              of one row, the row's share of the grid set by its tiles (streamk::locate_rows):
//              no CTA pays a second row's latencies. The launch shape: decode/config.cuh.
//   Mainloop   decode/mainloop.cuh. A CTA walks its range row segment by row segment (the walk
//              is the attention kernel below). For each segment it loads the group's queries
//              once and streams the segment's keys (the many-CTA pipelines issue the next
//              segment's queries and first slices as soon as a segment's keys are consumed,
//              before its warp merge and epilogue; a segment without keys loads nothing): 4
//              warps, each with its own 16-key slice of every 64-key tile, gathered through the
//              block table by 16-byte cp.async into XOR-swizzled shared memory, in a private
//              kStages-deep pipeline (no CTA-wide barrier in the loop). The whole GQA group
//              rides in the N dimension of m16n8k16 tensor-core MMAs (S^T = K Q^T, O^T = V^T
//              P^T: keys and d in M, one n-tile of 8 heads for G <= 8, two for 9-16), so each
//              K/V byte is read once per group and a group of 4 fills half an n-tile, not a
//              quarter of M. Online softmax per warp and head column in the log2 domain.
//   Merge      decode/merge.cuh: the 4 warp states merge in shared memory at the end of a
//              segment (each warp's o in its own last stages, one weight per warp and head row,
//              float4 columns); streamk::merge_pieces: the merge kernel below, over the partials
//              of cut rows.
//   Epilogue   the attention kernel below: a segment that covers its whole row writes the output
//              (and lse) directly. A row cut by range boundaries gets one fp32 partial (o, lse)
//              per CTA that touches it, at most two per CTA (its first and its last segment), and
//              the attention kernel never waits: a merge kernel combines the partials of every
//              cut row, over many CTAs.
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
#include "kernels/decode/config.cuh"
#include "kernels/decode/mainloop.cuh"
#include "kernels/decode/merge.cuh"
#include "kernels/decode_probe.cuh"
#include "kernels/primitives.cuh"
#include "kernels/streamk.cuh"

namespace dms {
namespace {

using namespace decode;  // the pieces (config.cuh, mainloop.cuh, merge.cuh; cp_async16, kLog2e)
using dev::launch_pdl;
using dev::pdl_launch_dependents;
using dev::pdl_wait;
using streamk::kMergeThreads;

// Length of work row v (every place the kernels read one), and the tiles of a length (row-aligned
// form).
struct RowLen {
  const int32_t* seq_lens;
  int head_tiles;
  __device__ __forceinline__ int operator()(int v) const { return __ldg(seq_lens + v / head_tiles); }
};
struct TilesOf {
  __device__ __forceinline__ int operator()(int L) const { return (L + kTileKeys - 1) / kTileKeys; }
};

// The stream-K place of CTA c (run by all kThreads threads): the attention kernel's (kLast false:
// the row holding c's first unit) and the merge kernel's (kLast: the row of c's last segment, the
// one c may have cut). One head tile per row (G <= 16) and 16-byte aligned lengths: the scan loads
// four rows per load.
template <int kThreads, bool kLast>
__device__ __forceinline__ const streamk::Place* line_place(const SparseDecodeParams& p, const Resolved& rs, int c) {
  const int32_t* __restrict__ seq_lens = p.pages.seq_lens;
  auto len = [&](int64_t v) { return RowLen{seq_lens, rs.head_tiles}((int)v); };
  auto units = [](int L) { return units_of(L); };
  const bool vec4 = rs.head_tiles == 1 && (reinterpret_cast<uintptr_t>(seq_lens) & 15) == 0;
  auto len4 = [&](int64_t v) { return __ldg(reinterpret_cast<const int4*>(seq_lens + v)); };
  return streamk::locate<kThreads, kLast>(rs.rows_v, rs.grid, rs.min_units, c, len, units, vec4, len4);
}

// The residency the grid assumes (Cfg::kCtasPerSm) is promised to ptxas, on every pool dtype: at
// most 168 registers at 3 CTAs per SM (D 128). Without it on bf16 / fp16 pools the D 128 kernel
// for G 9-16 took 254 registers: 2 CTAs per SM under a grid of 3 per SM.
// NT: n-tiles of 8 head rows (1: G <= 8).
template <typename T, int D, int S, bool F8, int NT>
__global__ void __launch_bounds__(kThreads, Cfg<D, S, F8>::kCtasPerSm)
sparse_decode_kernel(const SparseDecodeParams p, const Resolved rs) {
  using K = Decode<T, D, S, F8, NT>;
  using W = WarpMerge<K>;
  // 1024-aligned: the mainloop XORs block offsets into whole shared addresses (decode/mainloop.cuh).
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  T* const sQbuf = reinterpret_cast<T*>(smem_raw);  // [kQBuffers][kHeadTile][D]: segments alternate
  unsigned char* const sStages = smem_raw + K::C::kQBuffers * K::C::kQBytes;
  __shared__ float sM[kWarps * kHeadTile], sL[kWarps * kHeadTile], sF[kWarps * kHeadTile], sLse[kHeadTile];

  unsigned char* ws = reinterpret_cast<unsigned char*>(p.workspace);
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
    pl = streamk::locate_rows<kThreads>((int)rs.rows_v, rs.grid, rs.min_units, kRowCost, c,
                                        RowLen{seq_lens, rs.head_tiles}, TilesOf{});
  } else {
    pl = line_place<kThreads, false>(p, rs, c);
  }
  if (!pl) {
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
  // L: the row's length (the first segment's from the place; else loaded).
  auto segment = [&](int v, int P, int a, int L) {
    Seg s;
    s.v = v;
    s.P = P;
    s.a = a;
    s.row = (int)(v / rs.head_tiles);
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
  Seg cur = segment(pl->v, pl->P, pl->a0, pl->x);
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
      nxt = segment(cur.v + 1, cur.P_end, cur.hi, RowLen{seq_lens, rs.head_tiles}(cur.v + 1));
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
      W::merge_warps(st, sStages, sM, sL);
      __syncthreads();
      W::row_factors(cur.nh, sM, sL, sF, sLse);
      __syncthreads();
    }
    DMS_PROBE(p_mw += clock64() - pm1;)
    // The whole row is ours: write it. A piece of a cut row: its partial, for the merge kernel.
    for (int i = tid; i < cur.nh * (D / 4); i += kThreads) {
      const int r = i / (D / 4), d = (i % (D / 4)) * 4;
      float4 o = has_keys ? W::merged4(sStages, sF, r, d) : make_float4(0.f, 0.f, 0.f, 0.f);
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
  DMS_PROBE(if (rs.probe && tid == 0)
              printf("PROBE A call %d c %d sm %u t0 %llu t1 %llu loc %lld main %lld epi %lld mw %lld tot %lld seg %d keys %d\n", rs.probe, c,
                     probe::smid(), pt0, probe::gtime(), pc1 - pc0, p_main, p_epi, p_mw, clock64() - pc0, p_seg, p_keys);)
}


// ------------------------------------------------------------------------------------------------
// Merge: CTA c combines the partials of the row that starts in c's range and is cut (at most one:
// a cut row extends past c's end, so it is c's last segment): streamk::merge_pieces. The row and
// its pieces come from the attention kernel's own scan of seq_lens, repeated here before the wait
// (line_place with kLast; row_record in the row-aligned form): nothing passes between the two
// kernels but the partials, and no record load follows the wait. Row-aligned
// (kAligned): kMergeParts CTAs per row, each a share of its columns (a quarter at D 128), row
// blockIdx / kMergeParts's pieces from its first CTA on; rows of many
// pieces (B 1: 16-60), so the pieces' loads are issued before the lse phase (kPrefetch: the A/B
// measured it 4-7% faster on the B 1 rows, and 0-4% slower on large batches where it ran the
// stream-K merge at twice the registers, bench/results/decode_ab_2026-11-30_x_pf.md, _y.md), and
// a thread sums about k / 8 pieces at G 4, not k / 2.
inline size_t merge_smem_bytes(int grid) { return streamk::merge_smem_bytes(grid, kHeadTile); }

template <int D> constexpr int kMergeParts = D / 32;  // 8 float4 columns of a row per part

template <typename T, int D, bool kAligned>
__global__ void __launch_bounds__(kMergeThreads)
sparse_decode_merge_kernel(const SparseDecodeParams p, const Resolved rs) {
  extern __shared__ __align__(16) float merge_smem[];
  DMS_PROBE(const unsigned long long pt0 = probe::gtime();)
  unsigned char* ws = reinterpret_cast<unsigned char*>(p.workspace);
  const int c = kAligned ? blockIdx.x / kMergeParts<D> : blockIdx.x;
  // Row c's pieces (row-aligned) or CTA c's cut row (stream-K) from the attention kernel's own
  // search over seq_lens (an input, so before the wait: it overlaps the attention kernel's tail
  // when this CTA starts early).
  __shared__ streamk::CutRow s_cr;
  if constexpr (kAligned) {
    if (threadIdx.x < 32) {
      const streamk::CutRow r = streamk::row_record((int)rs.rows_v, rs.grid, rs.min_units, c,
                                                    RowLen{p.pages.seq_lens, rs.head_tiles}, TilesOf{});
      if (threadIdx.x == 0) s_cr = r;
    }
  } else {
    const streamk::Place* pl = line_place<kMergeThreads, true>(p, rs, c);
    if (threadIdx.x == 0)
      s_cr = pl ? streamk::cut_record(*pl, c, pl->v, pl->P, pl->P + units_of(pl->x)) : streamk::no_cut_row();
  }
  __syncthreads();
  pdl_wait();  // the attention kernel's partials and direct outputs are written
  DMS_PROBE(const unsigned long long pt1 = probe::gtime();)

  const float* part_o = reinterpret_cast<const float*>(ws + rs.ws.part_o);
  const float* part_lse = reinterpret_cast<const float*>(ws + rs.ws.part_lse);
  const streamk::CutRow cr = s_cr;
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
      },
      kAligned ? (int)(blockIdx.x % kMergeParts<D>) : 0, kAligned ? kMergeParts<D> : 1);
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
  // A group of at most 8 query heads fills one n-tile of the MMAs; 9-16 take two.
  const int G = p.num_q_heads / p.kv.num_kv_heads;
  auto kernel = G <= 8 ? sparse_decode_kernel<T, D, S, F8, 1> : sparse_decode_kernel<T, D, S, F8, 2>;
  DMS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  auto merge = r.aligned ? sparse_decode_merge_kernel<T, D, true> : sparse_decode_merge_kernel<T, D, false>;
  DMS_CUDA_CHECK(cudaFuncSetAttribute(merge, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)merge_smem));
  // Both kernels prefer the largest shared-memory carveout: switching the L1 / shared split
  // between back-to-back kernels would drain the SMs.
  DMS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, 100));
  DMS_CUDA_CHECK(cudaFuncSetAttribute(merge, cudaFuncAttributePreferredSharedMemoryCarveout, 100));
  // A plain launch (the op's first kernel): launched programmatically after the previous call's
  // merge kernel, every row of bench_decode ran 4-20 us slower (bench/results/decode_ab_*.md).
  kernel<<<r.grid, kThreads, smem, stream>>>(p, r);
  DMS_LAUNCH_CHECK();
  DMS_CUDA_CHECK(launch_pdl(merge, dim3(r.aligned ? (int)r.rows_v * kMergeParts<D> : r.grid), dim3(kMergeThreads), merge_smem,
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
