// sparse_prefill for short chunks (T = 1 .. 16 new tokens per sequence: speculative-decoding
// verification, MTP, multi-token decode). The general kernel (sparse_prefill.cu) tiles 128
// (token, head) rows per CTA and leaves most of them empty at T = 4; this one is built like
// sparse_decode: one work row is (chunk, KV head, row group) and streams that head's keys ONCE
// for all the G x T query rows of the group packed into the MMA M dimension.
//
//   rows      row = token * G + head in the GQA group (as the general kernel), groups of
//             kRows = 16 * MT rows (MT = 1, 2, 4 m16 tiles, picked on the host from the average
//             chunk length: G * T <= 16 one tile, <= 32 two, else four; a chunk with more rows
//             gets several groups).
//   keys      the key line of a work row is [0, seq_len) cached slots, then the chunk's own keys
//             j in [0, i1) (i1: one past the group's last token). Visibility as the general
//             kernel's: every key carries [a, b], query i sees it iff a <= i <= b:
//               cached slot                 [0, INT_MAX]
//               flagged ring slot (pos p)   [0, p + w - n]   (flag of n-1 from the chunk's first
//                                                             logit; only ring positions
//                                                             p <= n - w + i1 - 2 can hide from a
//                                                             query of the group: at most i1 of
//                                                             them, listed in shared memory)
//               chunk key j                 [j, d_j ? j + w : INT_MAX], d_j = logit[j+1] > 0
//   schedule  stream-K as sparse_decode: a plan kernel scans the work rows' costs (one unit per
//             64-key tile plus one per row) on the device and cuts the line into equal ranges,
//             one per resident CTA; rows cut by a range boundary leave fp32 partials (o, lse)
//             that a merge kernel combines. No host plan, no sync: graph replays may change
//             every length. The three kernels are chained with programmatic dependent launch.
//   mainloop  4 warps, warp w owns m-tile w % MT and the key slice w / MT of every 64-key tile
//             (16 * MT keys), so each warp holds one m-tile of O, like sparse_decode's warps.
//             K/V tiles are gathered through the block table by 16-byte cp.async into XOR-
//             swizzled shared memory, kStages deep, one CTA barrier per tile. Online softmax in
//             the log2 domain per warp; the warps of an m-tile merge in shared memory at the end
//             of a segment.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "dms/dms.h"
#include "kernels/common.cuh"
#include "kernels/prefill_slots.cuh"
#include "kernels/primitives.cuh"
#include "kernels/streamk.cuh"
#include "kernels/sparse_prefill_small.h"

namespace dms {
namespace prefill_small {
namespace {

using dev::cp_async16;
using dev::cp_async_commit;
using dev::cp_async_wait;
using dev::ex2;
using dev::kLog2e;
using dev::launch_pdl;
using dev::pdl_launch_dependents;
using dev::pdl_wait;
using dev::swz;

constexpr int kWarps = 4, kThreads = 32 * kWarps;
constexpr int kTileKeys = 64;     // keys per pipeline tile
constexpr int kRowCost = 1;       // scheduling units charged per work row besides its tiles
constexpr int kPlanThreads = 1024;
constexpr int kPlanSeqs = 2048;   // chunks whose cu_seqlens / rows the plan stages in shared memory
using streamk::kMergeThreads;
constexpr int kMaxExc = 64;       // ring positions listed in shared memory (more: read the ring)

template <int D> constexpr int kStagesFor = D == 64 ? 3 : 2;

template <int D, int MT> struct Cfg {
  static constexpr int kRows = 16 * MT;          // query rows of a work row
  static constexpr int kStages = kStagesFor<D>;
  static constexpr int kTileElems = kTileKeys * D;
  static constexpr int kStageBytes = kStages * 2 * kTileElems * 2;
  static constexpr int kSmemBytes =
      kRows * D * 2 + kStageBytes + kStages * kTileKeys * 8 + kMaxExc * 8;
  static constexpr int kMergeBytes = kWarps * (16 * D + 2 * 16) * 4;
  static_assert(kMergeBytes <= kStageBytes, "merge scratch must fit the stages");
};

// ------------------------------------------------------------------------------------------------
// Workspace: sizes only. Work row v = slot * H + g; chunk c owns slots [tstart(c), tstart(c+1)),
// tstart(c) = floor(cu[c] * G / kRows) + c, which leaves room for its ceil(L * G / kRows) groups.
struct Layout {
  int64_t meta, prefix, vinfo, cta_row, part_o, part_lse, bytes;
};
inline int64_t align256(int64_t x) { return (x + 255) & ~int64_t(255); }
inline Layout layout(int64_t rows_v, int grid, int rows, int D) {
  Layout l;
  l.meta = 0;                                              // int32 [4]: n, U
  l.prefix = 256;                                          // int32 [rows_v]: inclusive unit prefix
  l.vinfo = align256(l.prefix + rows_v * 4);               // int2 [rows_v]: (chunk, group)
  l.cta_row = align256(l.vinfo + rows_v * 8);              // int32 [grid]
  l.part_o = align256(l.cta_row + (int64_t)grid * 4);      // f32 [2 grid][rows][D]
  l.part_lse = align256(l.part_o + (int64_t)2 * grid * rows * D * 4);  // f32 [2 grid][rows]
  l.bytes = align256(l.part_lse + (int64_t)2 * grid * rows * 4);
  return l;
}

struct Resolved {
  int mt, rows, grid, min_units, bs_shift;  // bs_shift < 0: block_size not a power of two
  int64_t slots, rows_v;
  Layout ws;
};

// D 128, one m-tile: 3 CTAs per SM (69 KB of shared memory each) if the registers allow it,
// so ptxas is held to 168.
template <int D, int MT> constexpr int kMinCtas = D == 128 && MT == 1 ? 3 : 0;
template <typename T, int D, int MT>
__global__ void __launch_bounds__(kThreads, kMinCtas<D, MT>) attn_kernel(const SparsePrefillParams p, const Resolved rs);

// Resident CTAs per SM of one instantiation (registers and shared memory): the persistent grid.
// The same answer for both dtypes (same code shape); asked of the bf16 kernel.
template <int D, int MT> int occupancy() {
  static const int n = [] {
    auto* k = attn_kernel<__nv_bfloat16, D, MT>;
    int blocks = 0;
    if (cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg<D, MT>::kSmemBytes) !=
            cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, k, kThreads, Cfg<D, MT>::kSmemBytes) !=
            cudaSuccess)
      blocks = 1;
    return blocks < 1 ? 1 : blocks;
  }();
  return n;
}
template <int MT> int ctas_per_sm(int D) {
  if (D == 256) return occupancy<256, MT>();
  return D == 64 ? occupancy<64, MT>() : occupancy<128, MT>();
}

Resolved resolve(const SparsePrefillParams& p) {
  Resolved r;
  const int H = p.kv.num_kv_heads, G = p.num_q_heads / H;
  const int64_t avg = (p.total_tokens + p.num_seqs - 1) / p.num_seqs;
  const int64_t rows_avg = avg * G;
  r.mt = rows_avg <= 16 ? 1 : rows_avg <= 32 ? 2 : 4;
  r.rows = 16 * r.mt;
  const int per_sm = r.mt == 1 ? ctas_per_sm<1>(p.kv.head_dim)
                               : r.mt == 2 ? ctas_per_sm<2>(p.kv.head_dim) : ctas_per_sm<4>(p.kv.head_dim);
  r.grid = std::max(device_sms(), 1) * per_sm;
  r.min_units = std::max(1, 256 / kTileKeys);  // a piece of a row is worth it over 256 keys
  r.bs_shift = -1;
  for (int s = 0; s < 31; ++s)
    if ((1 << s) == p.kv.block_size) r.bs_shift = s;
  r.slots = (int64_t)p.total_tokens * G / r.rows + p.num_seqs;
  r.rows_v = r.slots * H;
  r.ws = layout(r.rows_v, r.grid, r.rows, p.kv.head_dim);
  return r;
}


// The chunk of a slot (-1: before chunk 0's first slot).
using prefill_slots::chunk_of_slot;
using prefill_slots::slot_start;

__device__ __forceinline__ int clamped_seq_len(const SparsePrefillParams& p, int r, int g) {
  const long long cap = (long long)p.state.pages.max_blocks_per_head * p.kv.block_size;
  return (int)min((long long)max(p.state.pages.seq_lens[(long long)r * p.kv.num_kv_heads + g], 0), cap);
}

// ------------------------------------------------------------------------------------------------
// Plan: one CTA. Units of every work row (0 for an unused slot or a malformed chunk), their
// inclusive prefix, the CTAs that get work and each one's first row (as sparse_decode's plan).
__global__ void __launch_bounds__(kPlanThreads)
plan_kernel(const SparsePrefillParams p, const Resolved rs) {
  unsigned char* ws = static_cast<unsigned char*>(p.workspace);
  int2* vinfo = reinterpret_cast<int2*>(ws + rs.ws.vinfo);
  pdl_launch_dependents();  // the attention kernel may launch; it waits for our writes
  const int H = p.kv.num_kv_heads, G = p.num_q_heads / H;
  // cu_seqlens and rows in shared memory (one round of loads) when they fit: every work row's
  // binary search over the chunks then reads shared memory, not a chain of dependent global loads.
  __shared__ int32_t s_cu[kPlanSeqs + 1], s_rows[kPlanSeqs];
  const bool staged = p.num_seqs <= kPlanSeqs;
  if (staged) {
    for (int i = threadIdx.x; i <= p.num_seqs; i += kPlanThreads) {
      s_cu[i] = p.cu_seqlens[i];
      if (i < p.num_seqs) s_rows[i] = p.rows[i];
    }
  }
  __syncthreads();
  const int32_t* cu = staged ? s_cu : p.cu_seqlens;
  const int32_t* rows = staged ? s_rows : p.rows;
  streamk::plan_line<kPlanThreads>(
      rs.rows_v, rs.grid, rs.min_units, reinterpret_cast<int32_t*>(ws + rs.ws.prefix),
      reinterpret_cast<int32_t*>(ws + rs.ws.cta_row), reinterpret_cast<int32_t*>(ws + rs.ws.meta),
      [&](int64_t v) {  // also records the row's (chunk, row group)
        int x = 0;
        const int64_t slot = v / H;
        const int g = (int)(v % H);
        const int c = chunk_of_slot(cu, p.num_seqs, slot, G, rs.rows);
        int2 info = make_int2(-1, 0);
        if (c >= 0) {
          const int start = cu[c], end = cu[c + 1], r = rows[c];
          const int64_t rg = slot - slot_start(cu, c, G, rs.rows);
          const int64_t R0 = rg * rs.rows, L = end - start;
          if (start >= 0 && end >= start && end <= p.total_tokens && r >= 0 && r < p.state.max_seqs &&
              R0 < L * G) {
            const int i1 = (int)min(L, (R0 + rs.rows - 1) / G + 1);
            const int keys = clamped_seq_len(p, r, g) + i1;
            x = (keys + kTileKeys - 1) / kTileKeys + kRowCost;
            info = make_int2(c, (int)rg);
          }
        }
        vinfo[v] = info;
        return x;
      });
}

// The first row after v whose units end past unit a (prefix: inclusive unit prefix over rows_v
// rows; a < U, so one exists), found by a converged warp, 32 rows per round of loads.
__device__ __forceinline__ int64_t next_row(const int32_t* prefix, int64_t v, int64_t a, int64_t rows_v, int lane) {
  for (int64_t base = v + 1;; base += 32) {
    const int64_t u = base + lane;
    const unsigned m = __ballot_sync(0xffffffffu, u >= rows_v || prefix[u] > a);
    if (m) return base + __ffs(m) - 1;
  }
}

// Scalars of the current work row, in shared memory (registers are kept for the accumulators).
struct SegCtx {
  int start, L, n, seq_len, r, g, R0, nrows, i1, kbeg, kend, pstart, npos;
};

// ------------------------------------------------------------------------------------------------
template <typename T, int D, int MT>
__global__ void __launch_bounds__(kThreads, kMinCtas<D, MT>)
attn_kernel(const SparsePrefillParams p, const Resolved rs) {
  using C = Cfg<D, MT>;
  constexpr int kRows = C::kRows, kStages = C::kStages;
  constexpr int kKS = kWarps / MT;            // key slices per tile
  constexpr int kKW = kTileKeys / kKS;        // keys per warp per tile (16 * MT)
  constexpr int kChunks = D / 8;              // 16-byte chunks per row
  constexpr int kRowsPerPass = kThreads / kChunks;
  constexpr int kPasses = kTileKeys / kRowsPerPass;
  constexpr bool kQInRegs = D <= 128;
  static_assert(kTileKeys % kRowsPerPass == 0, "tile shape");

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sStages = sQ + kRows * D;                                         // [stage][K | V][64][D]
  int2* sMeta = reinterpret_cast<int2*>(sStages + kStages * 2 * C::kTileElems);  // [stage][64]
  int2* sExc = sMeta + kStages * kTileKeys;                            // [kMaxExc]
  float* scratch = reinterpret_cast<float*>(sStages);
  __shared__ SegCtx s_ctx;

  unsigned char* ws = static_cast<unsigned char*>(p.workspace);
  const int32_t* meta = reinterpret_cast<const int32_t*>(ws + rs.ws.meta);
  const int32_t* prefix = reinterpret_cast<const int32_t*>(ws + rs.ws.prefix);
  const int2* vinfo = reinterpret_cast<const int2*>(ws + rs.ws.vinfo);
  const int32_t* cta_row = reinterpret_cast<const int32_t*>(ws + rs.ws.cta_row);
  float* part_o = reinterpret_cast<float*>(ws + rs.ws.part_o);
  float* part_lse = reinterpret_cast<float*>(ws + rs.ws.part_lse);

  pdl_launch_dependents();  // the merge kernel may launch; it waits for this grid to finish
  pdl_wait();               // the plan is written
  const int cta = blockIdx.x;
  streamk::CtaRange range;
  if (!streamk::cta_range(meta, cta, range)) return;
  const int64_t a0 = range.a0, b0 = range.b0;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int mt = warp % MT, ks = warp / MT;
  const int H = p.kv.num_kv_heads, Hq = p.num_q_heads, G = Hq / H, w = p.state.window;
  const T* kc = static_cast<const T*>(p.kv.k_cache);
  const T* vc = static_cast<const T*>(p.kv.v_cache);
  const T* kk = static_cast<const T*>(p.k);
  const T* vv = static_cast<const T*>(p.v);
  const float sl2 = p.scale * kLog2e;

  int64_t v = cta_row[cta];
  int64_t a = a0;
  while (a < b0) {
    const int64_t P = v > 0 ? prefix[v - 1] : 0, P_end = prefix[v];
    if (P_end == P) {  // unused slot
      ++v;
      continue;
    }
    const int64_t seg_lo = a, seg_hi = b0 < P_end ? b0 : P_end;

    __syncthreads();  // the previous segment is done with shared memory
    if (tid == 0) {
      const int2 info = vinfo[v];
      SegCtx x;
      x.g = (int)(v % H);
      x.start = p.cu_seqlens[info.x];
      x.L = p.cu_seqlens[info.x + 1] - x.start;
      x.r = p.rows[info.x];
      x.n = p.state.num_tokens[x.r];
      x.seq_len = clamped_seq_len(p, x.r, x.g);
      x.R0 = info.y * kRows;
      x.nrows = min(kRows, x.L * G - x.R0);
      x.i1 = min(x.L, (x.R0 + kRows - 1) / G + 1);
      const int keys = x.seq_len + x.i1;
      x.kbeg = (int)(seg_lo - P - kRowCost > 0 ? seg_lo - P - kRowCost : 0) * kTileKeys;
      x.kend = min(keys, (int)(seg_hi - P - kRowCost > 0 ? seg_hi - P - kRowCost : 0) * kTileKeys);
      // Ring positions that may hide from a query of the group: p + w - n < i1 - 1.
      x.pstart = max(0, x.n - w - 1);
      const int pend = min(x.n - 1, x.n - w + x.i1 - 2);
      x.npos = max(0, pend - x.pstart + 1);
      s_ctx = x;
    }
    __syncthreads();
    {
      const SegCtx x = s_ctx;
      // Queries of the group; rows past the chunk are zero (finite, never stored).
      const T* q = static_cast<const T*>(p.q);
      for (int e = tid; e < kRows * kChunks; e += kThreads) {
        const int row = e / kChunks, ch = e % kChunks;
        const bool valid = row < x.nrows;
        const T* src = q;
        if (valid) {
          const int R = x.R0 + row, i = R / G, hh = R % G;
          src = q + ((int64_t)(x.start + i) * Hq + (int64_t)x.g * G + hh) * D + ch * 8;
        }
        cp_async16(sQ + swz<D>(row, ch), src, valid);
      }
      if (x.npos <= kMaxExc) {
        const int32_t* ring = p.state.ring + ((int64_t)x.r * H + x.g) * (w + 1);
        for (int k = tid; k < x.npos; k += kThreads) {
          const int pos = x.pstart + k;
          const int e = ring[pos % (w + 1)];
          const int slot = e >> 1;
          const bool flag = pos == x.n - 1 ? p.logits[(int64_t)x.start * H + x.g] > 0.f : (e & 1) != 0;
          sExc[k] = flag && slot >= 0 && slot < x.seq_len ? make_int2(slot, pos + w - x.n) : make_int2(-1, 0);
        }
      }
    }
    __syncthreads();

    // Issues the K / V copies of tile t into stage t % kStages and its keys' [a, b].
    auto issue = [&](int t) {
      const SegCtx x = s_ctx;
      const int stage = t % kStages;
      T* sK = sStages + stage * 2 * C::kTileElems;
      T* sV = sK + C::kTileElems;
      const int k0 = x.kbeg + t * kTileKeys;
      const int32_t* bt = p.state.pages.block_table + ((int64_t)x.r * H + x.g) * p.state.pages.max_blocks_per_head;
      const int bs = p.kv.block_size;
      auto cache_row = [&](int s) -> int64_t {  // -1: a block id outside the pool
        const int bi = rs.bs_shift >= 0 ? s >> rs.bs_shift : s / bs;
        const int off = rs.bs_shift >= 0 ? s & (bs - 1) : s % bs;
        const int blk = bt[bi];
        return blk >= 0 && blk < p.kv.num_blocks ? (int64_t)blk * bs + off : -1;
      };
      // Every pass's block id is read before the first copy is issued: the copies are ordered
      // (asm volatile), so reading each id just before its copy would serialize kPasses
      // dependent global loads per tile.
      const int ch = tid % kChunks;
      int64_t off[kPasses];
      int src[kPasses];  // 0: nothing (zero fill), 1: the pool, 2: the chunk's own k / v
#pragma unroll
      for (int pass = 0; pass < kPasses; ++pass) {
        const int key = k0 + tid / kChunks + pass * kRowsPerPass;
        off[pass] = 0;
        src[pass] = 0;
        if (key < x.kend) {
          if (key < x.seq_len) {
            const int64_t cr = cache_row(key);
            src[pass] = cr >= 0 ? 1 : 0;
            off[pass] = cr >= 0 ? cr * D + ch * 8 : 0;
          } else {
            src[pass] = 2;
            off[pass] = ((int64_t)(x.start + key - x.seq_len) * H + x.g) * D + ch * 8;
          }
        }
      }
#pragma unroll
      for (int pass = 0; pass < kPasses; ++pass) {
        const int row = tid / kChunks + pass * kRowsPerPass;
        const T* ks_ = src[pass] == 2 ? kk : kc;
        const T* vs_ = src[pass] == 2 ? vv : vc;
        cp_async16(sK + swz<D>(row, ch), ks_ + off[pass], src[pass] != 0);
        cp_async16(sV + swz<D>(row, ch), vs_ + off[pass], src[pass] != 0);
      }
      // The keys' [a, b] after the copies are in flight (read by the compute of tile t only).
      if (tid < kTileKeys) {
        const int key = k0 + tid;
        int2 m = make_int2(INT_MAX, INT_MIN);
        if (key < x.kend) {
          if (key < x.seq_len) {
            if (cache_row(key) >= 0) {
              int b = INT_MAX;
              if (x.npos <= kMaxExc) {
                for (int k = 0; k < x.npos; ++k) {
                  const int2 e = sExc[k];
                  if (e.x == key) b = e.y;
                }
              } else {  // a long chunk: read the ring itself
                const int32_t* ring = p.state.ring + ((int64_t)x.r * H + x.g) * (w + 1);
                for (int k = 0; k < x.npos; ++k) {
                  const int pos = x.pstart + k;
                  const int e = ring[pos % (w + 1)];
                  const bool flag =
                      pos == x.n - 1 ? p.logits[(int64_t)x.start * H + x.g] > 0.f : (e & 1) != 0;
                  if (flag && (e >> 1) == key) b = pos + w - x.n;
                }
              }
              m = make_int2(0, b);
            }
          } else {
            const int j = key - x.seq_len;
            const bool flagged = j < x.L - 1 && p.logits[(int64_t)(x.start + j + 1) * H + x.g] > 0.f;
            m = make_int2(j, flagged ? j + w : INT_MAX);
          }
        }
        sMeta[stage * kTileKeys + tid] = m;
      }
    };

    const int kbeg = s_ctx.kbeg, kend = s_ctx.kend;
    const int ntiles = kend > kbeg ? (kend - kbeg + kTileKeys - 1) / kTileKeys : 0;
#pragma unroll
    for (int t = 0; t < kStages - 1; ++t) {
      if (t < ntiles) issue(t);
      cp_async_commit();  // the Q copies ride in group 0
    }

    // This lane's query tokens (accumulator rows lane / 4 and lane / 4 + 8 of m-tile mt).
    int qi[2];
    {
      const int R0 = s_ctx.R0, nrows = s_ctx.nrows;
#pragma unroll
      for (int rs2 = 0; rs2 < 2; ++rs2) {
        const int row = mt * 16 + (lane >> 2) + rs2 * 8;
        qi[rs2] = row < nrows ? (R0 + row) / G : -1;  // -1: every key hidden, row never stored
      }
    }

    float o[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
    uint32_t qa[kQInRegs ? D / 16 : 1][4];
    const uint32_t q_addr = dev::smem_u32(sQ);

    for (int t = 0; t < ntiles; ++t) {
      cp_async_wait<kStages - 2>();
      __syncthreads();  // tile t (and Q) landed for every thread; everyone is done with t - 1
      if (t + kStages - 1 < ntiles) issue(t + kStages - 1);
      cp_async_commit();
      if constexpr (kQInRegs) {
        if (t == 0) {
#pragma unroll
          for (int k = 0; k < D / 16; ++k) {
            const int r = mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, c = 2 * k + (lane >> 4);
            dev::ldsm_x4(q_addr + swz<D>(r, c) * 2, qa[k]);
          }
        }
      }
      const int stage = t % kStages;
      const T* sK = sStages + stage * 2 * C::kTileElems;
      const T* sV = sK + C::kTileElems;
      const int2* meta_t = sMeta + stage * kTileKeys + ks * kKW;
      const uint32_t k_addr = dev::smem_u32(sK), v_addr = dev::smem_u32(sV);

      // S = Q K^T over this warp's kKW keys.
      float s[kKW / 8][4];
#pragma unroll
      for (int n = 0; n < kKW / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
      for (int k = 0; k < D / 16; ++k) {
        uint32_t a4[4];
        if constexpr (kQInRegs) {
#pragma unroll
          for (int e = 0; e < 4; ++e) a4[e] = qa[k][e];
        } else {
          const int r = mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, c = 2 * k + (lane >> 4);
          dev::ldsm_x4(q_addr + swz<D>(r, c) * 2, a4);
        }
#pragma unroll
        for (int pr = 0; pr < kKW / 16; ++pr) {
          uint32_t kb[4];
          const int r = ks * kKW + pr * 16 + (lane & 7) + (lane >> 4) * 8;
          const int c = 2 * k + ((lane >> 3) & 1);
          dev::ldsm_x4(k_addr + swz<D>(r, c) * 2, kb);
          dev::mma_16x8x16<T>(s[2 * pr], a4, kb[0], kb[1]);
          dev::mma_16x8x16<T>(s[2 * pr + 1], a4, kb[2], kb[3]);
        }
      }
      // Visibility + scale (log2 domain); hidden scores are -inf.
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int n = 0; n < kKW / 8; ++n) {
#pragma unroll
        for (int e2 = 0; e2 < 2; ++e2) {
          const int2 ab = meta_t[n * 8 + 2 * (lane & 3) + e2];
#pragma unroll
          for (int rs2 = 0; rs2 < 2; ++rs2) {
            const bool vis = ab.x <= qi[rs2] && qi[rs2] <= ab.y;
            float& xv = s[n][rs2 * 2 + e2];
            xv = vis ? xv * sl2 : -INFINITY;
            mx[rs2] = fmaxf(mx[rs2], xv);
          }
        }
      }
      float base[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
        const float m_new = fmaxf(m_run[i], mx[i]);
        // A row with nothing visible yet keeps base 0: exp2(-inf - 0) = 0, no NaN.
        base[i] = m_new == -INFINITY ? 0.f : m_new;
        const float alpha = ex2(m_run[i] - base[i]);
        m_run[i] = m_new;
        l_run[i] *= alpha;
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
          o[j][2 * i] *= alpha;
          o[j][2 * i + 1] *= alpha;
        }
      }
      // O += P V, P straight from the S accumulators (C layout == A layout).
#pragma unroll
      for (int kv = 0; kv < kKW / 16; ++kv) {
        uint32_t pa[4];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int n = 2 * kv + h;
          const float p0 = ex2(s[n][0] - base[0]), p1 = ex2(s[n][1] - base[0]);
          const float p2 = ex2(s[n][2] - base[1]), p3 = ex2(s[n][3] - base[1]);
          l_run[0] += p0 + p1;
          l_run[1] += p2 + p3;
          pa[2 * h] = dev::pack2<T>(p0, p1);
          pa[2 * h + 1] = dev::pack2<T>(p2, p3);
        }
#pragma unroll
        for (int j = 0; j < D / 16; ++j) {
          uint32_t vb[4];
          const int r = ks * kKW + kv * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
          const int c = 2 * j + (lane >> 4);
          dev::ldsm_x4_trans(v_addr + swz<D>(r, c) * 2, vb);
          dev::mma_16x8x16<T>(o[2 * j], pa, vb[0], vb[1]);
          dev::mma_16x8x16<T>(o[2 * j + 1], pa, vb[2], vb[3]);
        }
      }
    }
    cp_async_wait<0>();
#pragma unroll
    for (int i = 0; i < 2; ++i) {  // row sums were kept per lane: finish them across the quad
      l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 1);
      l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 2);
    }
    __syncthreads();  // every warp is done with the stages: they become the merge scratch
    {
      float* sO = scratch;                       // [warp][16][D]
      float* sM = sO + kWarps * 16 * D;          // [warp][16]
      float* sL = sM + kWarps * 16;              // [warp][16]
      float* wo = sO + warp * 16 * D;
      const int r = lane >> 2, c = 2 * (lane & 3);
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        *reinterpret_cast<float2*>(wo + r * D + 8 * j + c) = make_float2(o[j][0], o[j][1]);
        *reinterpret_cast<float2*>(wo + (r + 8) * D + 8 * j + c) = make_float2(o[j][2], o[j][3]);
      }
      if ((lane & 3) == 0) {
        sM[warp * 16 + r] = m_run[0];
        sM[warp * 16 + r + 8] = m_run[1];
        sL[warp * 16 + r] = l_run[0];
        sL[warp * 16 + r + 8] = l_run[1];
      }
    }
    __syncthreads();

    // The whole row is ours: write it. A piece of a cut row: its partial, for the merge kernel.
    {
      const SegCtx x = s_ctx;
      const float* sO = scratch;
      const float* sM = sO + kWarps * 16 * D;
      const float* sL = sM + kWarps * 16;
      const bool whole = P >= a0 && P_end <= b0;
      const int64_t pslot = 2 * (int64_t)cta + (seg_lo == a0 ? 0 : 1);
      T* out = static_cast<T*>(p.out);
      // Four columns per thread: float4 reads of the warp states, 8-byte output stores.
      for (int e = tid; e < x.nrows * (D / 4); e += kThreads) {
        const int row = e / (D / 4), d = (e % (D / 4)) * 4;
        const int tm = row >> 4, r16 = row & 15;
        float M = -INFINITY;
#pragma unroll
        for (int k2 = 0; k2 < kKS; ++k2) M = fmaxf(M, sM[(k2 * MT + tm) * 16 + r16]);
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
        float l = 0.f;
        if (M != -INFINITY) {
#pragma unroll
          for (int k2 = 0; k2 < kKS; ++k2) {
            const int wv = k2 * MT + tm;
            const float f = ex2(sM[wv * 16 + r16] - M);  // a warp with no keys: m = -inf, f = 0
            const float4 ov = *reinterpret_cast<const float4*>(sO + (wv * 16 + r16) * D + d);
            acc.x += f * ov.x;
            acc.y += f * ov.y;
            acc.z += f * ov.z;
            acc.w += f * ov.w;
            l += f * sL[wv * 16 + r16];
          }
        }
        const float inv = l > 0.f ? 1.f / l : 0.f;
        acc.x *= inv;
        acc.y *= inv;
        acc.z *= inv;
        acc.w *= inv;
        if (whole) {
          const int R = x.R0 + row, i = R / G, hh = R % G;
          uint2 pk;
          pk.x = dev::pack2<T>(acc.x, acc.y);
          pk.y = dev::pack2<T>(acc.z, acc.w);
          *reinterpret_cast<uint2*>(out + ((int64_t)(x.start + i) * Hq + (int64_t)x.g * G + hh) * D + d) = pk;
        } else {
          *reinterpret_cast<float4*>(part_o + (pslot * kRows + row) * D + d) = acc;
          if (d == 0) part_lse[pslot * kRows + row] = l > 0.f ? M + log2f(l) : -INFINITY;
        }
      }
    }
    a = seg_hi;
    // The next row holding unit a: the first v' > v with prefix[v'] > a, 32 rows per load round
    // (unused slots cost no units and sit in runs of H rows, e.g. every other slot at G 4, T 4;
    // skipping them one dependent load at a time kept a CTA several microseconds).
    if (a < b0) v = next_row(prefix, v, a, rs.rows_v, lane);
  }
}

// ------------------------------------------------------------------------------------------------
// Merge: CTA c combines the partials of the row that starts in c's range and is cut (at most
// one): streamk::merge_pieces, as sparse_decode's merge kernel.
template <int MT>
inline size_t merge_smem_bytes(int grid) {
  return streamk::merge_smem_bytes(grid, 16 * MT);
}

template <typename T, int D, int MT>
__global__ void __launch_bounds__(kMergeThreads)
merge_kernel(const SparsePrefillParams p, const Resolved rs) {
  constexpr int kRows = 16 * MT;
  extern __shared__ __align__(16) float merge_smem[];
  pdl_wait();  // the attention kernel's partials and direct outputs are written

  unsigned char* ws = static_cast<unsigned char*>(p.workspace);
  const int32_t* meta = reinterpret_cast<const int32_t*>(ws + rs.ws.meta);
  const int32_t* prefix = reinterpret_cast<const int32_t*>(ws + rs.ws.prefix);
  const int2* vinfo = reinterpret_cast<const int2*>(ws + rs.ws.vinfo);
  const int32_t* cta_row = reinterpret_cast<const int32_t*>(ws + rs.ws.cta_row);
  const float* part_o = reinterpret_cast<const float*>(ws + rs.ws.part_o);
  const float* part_lse = reinterpret_cast<const float*>(ws + rs.ws.part_lse);
  const int c = blockIdx.x;
  streamk::CutRow cr;  // (never an unused slot: those cost no unit)
  if (!streamk::cut_row_of(meta, prefix, cta_row, c, cr)) return;
  const int H = p.kv.num_kv_heads, Hq = p.num_q_heads, G = Hq / H;
  const int2 info = vinfo[cr.v];
  const int g = (int)(cr.v % H);
  const int start = p.cu_seqlens[info.x], L = p.cu_seqlens[info.x + 1] - start;
  const int R0 = info.y * kRows, nrows = min(kRows, L * G - R0);
  T* out = static_cast<T*>(p.out);
  streamk::merge_pieces<D, kRows, 4>(
      cr, c, nrows, part_o, part_lse, merge_smem,
      [&](int r, int d, float4 acc, float inv, const float*, const float*) {
        const int R = R0 + r, i = R / G, hh = R % G;
        T* o = out + ((int64_t)(start + i) * Hq + (int64_t)g * G + hh) * D + d;
        o[0] = dev::from_float<T>(acc.x * inv);
        o[1] = dev::from_float<T>(acc.y * inv);
        o[2] = dev::from_float<T>(acc.z * inv);
        o[3] = dev::from_float<T>(acc.w * inv);
      });
}

// ------------------------------------------------------------------------------------------------
template <typename T, int D, int MT>
Status launch_t(const SparsePrefillParams& p, const Resolved& r, cudaStream_t stream) {
  constexpr int smem = Cfg<D, MT>::kSmemBytes;
  const size_t msmem = merge_smem_bytes<MT>(r.grid);
  DMS_CUDA_CHECK(cudaFuncSetAttribute(attn_kernel<T, D, MT>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  DMS_CUDA_CHECK(cudaFuncSetAttribute(merge_kernel<T, D, MT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      (int)msmem));
  DMS_CUDA_CHECK(cudaFuncSetAttribute(plan_kernel, cudaFuncAttributePreferredSharedMemoryCarveout, 100));
  DMS_CUDA_CHECK(cudaFuncSetAttribute(attn_kernel<T, D, MT>, cudaFuncAttributePreferredSharedMemoryCarveout, 100));
  DMS_CUDA_CHECK(cudaFuncSetAttribute(merge_kernel<T, D, MT>, cudaFuncAttributePreferredSharedMemoryCarveout, 100));
  plan_kernel<<<1, kPlanThreads, 0, stream>>>(p, r);
  DMS_LAUNCH_CHECK();
  DMS_CUDA_CHECK(launch_pdl(attn_kernel<T, D, MT>, dim3(r.grid), dim3(kThreads), smem, stream, p, r));
  DMS_CUDA_CHECK(launch_pdl(merge_kernel<T, D, MT>, dim3(r.grid), dim3(kMergeThreads), msmem, stream, p, r));
  return Status::kSuccess;
}

template <typename T, int D>
Status launch_mt(const SparsePrefillParams& p, const Resolved& r, cudaStream_t stream) {
  switch (r.mt) {
    case 1: return launch_t<T, D, 1>(p, r, stream);
    case 2: return launch_t<T, D, 2>(p, r, stream);
    default: return launch_t<T, D, 4>(p, r, stream);
  }
}

template <typename T>
Status launch_d(const SparsePrefillParams& p, const Resolved& r, cudaStream_t stream) {
  switch (p.kv.head_dim) {
    case 64: return launch_mt<T, 64>(p, r, stream);
    case 128: return launch_mt<T, 128>(p, r, stream);
    case 256: return launch_mt<T, 256>(p, r, stream);
    default: return Status::kUnsupported;
  }
}

}  // namespace

bool applies(const SparsePrefillParams& p) {
  if (!p.small_chunks || p.num_seqs <= 0 || p.total_tokens <= 0 || p.kv.num_kv_heads <= 0 ||
      p.num_q_heads <= 0 || p.state.window < 1)
    return false;
  if ((int64_t)p.total_tokens > (int64_t)kMaxAvgChunk * p.num_seqs) return false;
  if (p.kv.head_dim != 64 && p.kv.head_dim != 128 && p.kv.head_dim != 256) return false;
  if (p.kv.dtype != DType::kBFloat16 && p.kv.dtype != DType::kFloat16) return false;
  // The unit line is int32: every work row at its longest key line must fit.
  const int G = p.num_q_heads / p.kv.num_kv_heads;
  const int64_t rows = 16;  // the smallest group: the most work rows
  const int64_t slots = (int64_t)p.total_tokens * G / rows + p.num_seqs;
  const int64_t cap = (int64_t)p.state.pages.max_blocks_per_head * p.kv.block_size;
  const int64_t max_units = slots * p.kv.num_kv_heads * ((cap + p.total_tokens) / kTileKeys + 1 + kRowCost);
  return max_units < INT32_MAX;
}

size_t workspace_bytes(const SparsePrefillParams& p) {
  if (!applies(p)) return 0;
  return (size_t)resolve(p).ws.bytes;
}

Status launch(const SparsePrefillParams& p, cudaStream_t stream) {
  const Resolved r = resolve(p);
  return p.kv.dtype == DType::kBFloat16 ? launch_d<__nv_bfloat16>(p, r, stream)
                                        : launch_d<__half>(p, r, stream);
}

}  // namespace prefill_small
}  // namespace dms
