// dms::sparse_decode: paged, per-(sequence, KV head) variable-length decode attention.
//
// Work item: (row = (b, g), head tile of up to 16 query heads of g's GQA group, KV split).
// The whole group rides in the M dimension of one m16n8k16 tensor-core MMA, so each K/V byte
// is read from HBM once per group (decode is memory-bound: ~4 FLOP per byte at G = 4, the
// tensor cores idle most of the time; what matters is keeping enough bytes in flight).
// Split-KV is decided per row on the device from seq_lens (num_splits_for below), so a step
// needs no host plan and no sync, and graph replays may change every length. Rows that fit in
// one split write the output directly; the others write (o, lse) partials that a small merge
// kernel combines in fp32.
//
// Pipeline: 4 warps; each warp streams its own 16-key slice of every 64-key tile (K and V rows
// gathered through the block table with 16-byte cp.async into XOR-swizzled shared memory, so
// ldmatrix is conflict-free) through a private STAGES-deep pipeline that syncs only within the
// warp. Each warp keeps its own online-softmax state; the 4 states merge at the end.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>

#include "dms/dms.h"
#include "kernels/primitives.cuh"

namespace dms {
namespace {

using dev::cp_async16;
using dev::cp_async_commit;
using dev::cp_async_wait;
using dev::kLog2e;
using dev::swz;

// NW warps per CTA, 16 keys each per pipeline stage (tile = 16 * NW keys). Only NW = 4 is
// instantiated: 2-warp CTAs (4 resident per SM) measured slower on every bench shape.
constexpr int kHeadTile = 16;           // query heads per CTA (MMA M)

// Splits for a row of L keys: at least min_chunk keys each, at most max_splits, whole tiles.
__device__ __forceinline__ int split_chunk(int L, int max_splits, int min_chunk, int kTileKeys) {
  int n = (L + min_chunk - 1) / min_chunk;
  n = n < 1 ? 1 : (n > max_splits ? max_splits : n);
  int chunk = (L + n - 1) / n;
  return (chunk + kTileKeys - 1) / kTileKeys * kTileKeys;
}
__device__ __forceinline__ int num_splits_for(int L, int chunk) {
  return L <= 0 ? 1 : (L + chunk - 1) / chunk;
}

template <int D, int NW> struct Cfg {
  static constexpr int kWarps = NW, kThreads = NW * 32, kTileKeys = 16 * NW;
  static constexpr int kStages = D <= 128 ? 3 : 2;
  static constexpr int kTileElems = kTileKeys * D;  // one K (or V) tile
  static constexpr int kSmemBytes = (kHeadTile * D + kStages * 2 * kTileElems) * 2;
  static constexpr int kMergeBytes = kWarps * (kHeadTile * D + 2 * kHeadTile) * 4;
  static_assert(kMergeBytes <= kStages * 2 * kTileElems * 2, "merge scratch must fit the stages");
};

// Launch shape resolved on the host from sizes only (never from seq_lens).
struct Resolved {
  int max_splits, min_chunk, head_tiles, rows, bs_shift;
};

template <typename T, int D, int NW>
__global__ void __launch_bounds__(NW * 32)
sparse_decode_kernel(const SparseDecodeParams p, const Resolved rs) {
  const int max_splits = rs.max_splits, min_chunk = rs.min_chunk, head_tiles = rs.head_tiles;
  using Op = typename dev::MmaAtom<T>::Op;
  using C = Cfg<D, NW>;
  constexpr int kStages = C::kStages, kWarps = C::kWarps, kThreads = C::kThreads, kTileKeys = C::kTileKeys;
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sKV = sQ + kHeadTile * D;  // stage s: K at sKV + s*2*tile, V right after

  const int G = p.num_q_heads / p.kv.num_kv_heads;
  const int row = blockIdx.x;  // b * Hkv + g: grid.x, so the row count has no 65535 limit
  const int b = row / p.kv.num_kv_heads, g = row % p.kv.num_kv_heads;
  const int ht = blockIdx.z;
  const int h0 = ht * kHeadTile;
  const int nh = min(kHeadTile, G - h0);
  const int L = p.pages.seq_lens[row];
  const int chunk = split_chunk(L, max_splits, min_chunk, 16 * NW);
  const int nsplit = num_splits_for(L, chunk);
  const int split = blockIdx.y;
  if (split >= nsplit) return;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int qh0 = g * G + h0;  // first query head of this CTA

  if (L <= 0) {  // empty head: zeros (and lse -inf), SPEC section 4
    for (int i = tid; i < nh * D; i += kThreads) {
      int r = i / D, d = i % D;
      T* o = reinterpret_cast<T*>(p.out) + b * p.o_stride_b + (qh0 + r) * p.o_stride_h + d;
      *o = dev::from_float<T>(0.f);
    }
    if (p.lse && tid < nh) p.lse[(int64_t)b * p.num_q_heads + qh0 + tid] = -INFINITY;
    return;
  }
  const int kbeg = split * chunk;
  const int kend = min(L, kbeg + chunk);
  const int ntiles = (kend - kbeg + kTileKeys - 1) / kTileKeys;

  const T* __restrict__ kc = reinterpret_cast<const T*>(p.kv.k_cache);
  const T* __restrict__ vc = reinterpret_cast<const T*>(p.kv.v_cache);
  const int32_t* __restrict__ bt = p.pages.block_table + (int64_t)row * p.pages.max_blocks_per_head;

  // Q tile: rows beyond the group are zero so their scores are finite and simply unused.
  {
    const T* q = reinterpret_cast<const T*>(p.q) + b * p.q_stride_b + qh0 * p.q_stride_h;
    for (int i = tid; i < kHeadTile * kChunks; i += kThreads) {
      int r = i / kChunks, c = i % kChunks;
      cp_async16(sQ + swz<D>(r, c), r < nh ? q + r * p.q_stride_h + c * 8 : q, r < nh);
    }
  }
  // Each warp streams its own 16-key slice of every 64-key tile through a private kStages-deep
  // cp.async pipeline and synchronizes only with itself: no CTA-wide barrier in the main loop,
  // so one slow warp never holds the others' next copies back. A lane always copies the same
  // 16-byte column cc of rows r0, r0 + kRowStep, ...; their block ids are fetched one slice
  // ahead into registers so the block-table read overlaps the wait.
  constexpr int kSliceElems = 16 * D;
  constexpr int kRowsPerLane = 16 * kChunks / 32;
  constexpr int kRowStep = 32 / kChunks > 0 ? 32 / kChunks : 1;
  const int r0 = kChunks >= 32 ? 0 : lane / kChunks, cc = lane % kChunks;
  const int bs_shift = rs.bs_shift, bs_mask = p.kv.block_size - 1;
  T* const sW = sKV + warp * kStages * 2 * kSliceElems;  // this warp's stages
  int ids[kRowsPerLane];
  auto slice0 = [&](int t) { return kbeg + t * kTileKeys + warp * 16; };
  auto fetch_ids = [&](int t) {
    const int s0 = slice0(t) + r0;
#pragma unroll
    for (int n = 0; n < kRowsPerLane; ++n) {
      const int slot = s0 + n * kRowStep;
      ids[n] = slot < kend ? __ldg(bt + (slot >> bs_shift)) : 0;
    }
  };
  auto load_slice = [&](int t) {
    if (slice0(t) >= kend) return;  // nothing of this warp in the tail tile
    T* sK = sW + (t % kStages) * 2 * kSliceElems;
    T* sV = sK + kSliceElems;
    const int s0 = slice0(t) + r0;
#pragma unroll
    for (int n = 0; n < kRowsPerLane; ++n) {
      const int r = r0 + n * kRowStep, slot = s0 + n * kRowStep;
      const bool valid = slot < kend;
      const int64_t off = valid ? (((int64_t)ids[n] << bs_shift) + (slot & bs_mask)) * D + cc * 8 : 0;
      cp_async16(sK + swz<D>(r, cc), kc + off, valid);
      cp_async16(sV + swz<D>(r, cc), vc + off, valid);
    }
  };
#pragma unroll
  for (int t = 0; t < kStages - 1; ++t) {
    if (t < ntiles) {
      fetch_ids(t);
      load_slice(t);
    }
    cp_async_commit();  // the Q copies ride in group 0
  }
  if (kStages - 1 < ntiles) fetch_ids(kStages - 1);

  // Per-warp state. Accumulator layout (m16n8): c0,c1 -> row lane/4, c2,c3 -> row lane/4 + 8.
  float o[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  uint32_t qa[D / 16][4];
  const float sl2 = p.scale * kLog2e;

  for (int t = 0; t < ntiles; ++t) {
    // Refill the stage slice t-1 used before waiting for slice t: kStages slices in flight.
    __syncwarp();  // every lane is done reading slice t-1 (ldmatrix) before it is overwritten
    if (t + kStages - 1 < ntiles) {
      load_slice(t + kStages - 1);
      if (t + kStages < ntiles) fetch_ids(t + kStages);  // lands while this slice computes
    }
    cp_async_commit();
    cp_async_wait<kStages - 1>();  // this lane's copies of slice t (and Q) have landed
    __syncwarp();                  // ... and the other lanes'
    if (t == 0) {
      __syncthreads();  // Q was copied by the whole CTA
#pragma unroll
      for (int k = 0; k < D / 16; ++k) {
        const int r = (lane & 7) + ((lane >> 3) & 1) * 8, c = 2 * k + (lane >> 4);
        cute::SM75_U32x4_LDSM_N::copy(*reinterpret_cast<const cute::uint128_t*>(sQ + swz<D>(r, c)),
                                      qa[k][0], qa[k][1], qa[k][2], qa[k][3]);
      }
    }
    const T* sK = sW + (t % kStages) * 2 * kSliceElems;
    const T* sV = sK + kSliceElems;
    const int key0 = slice0(t);  // first key of this warp's 16
    if (key0 >= kend) continue;  // this warp has nothing in the tail tile

    // S = Q K^T over the warp's 16 keys: two n-tiles of 8 keys.
    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int k = 0; k < D / 16; ++k) {
      uint32_t b0, b1, b2, b3;
      const int r = (lane & 7) + (lane >> 4) * 8;          // key within the warp's 16
      const int c = 2 * k + ((lane >> 3) & 1);              // 16-byte chunk along D
      cute::SM75_U32x4_LDSM_N::copy(
          *reinterpret_cast<const cute::uint128_t*>(sK + swz<D>(r, c)), b0, b1, b2, b3);
      Op::fma(s[0][0], s[0][1], s[0][2], s[0][3], qa[k][0], qa[k][1], qa[k][2], qa[k][3], b0, b1,
              s[0][0], s[0][1], s[0][2], s[0][3]);
      Op::fma(s[1][0], s[1][1], s[1][2], s[1][3], qa[k][0], qa[k][1], qa[k][2], qa[k][3], b2, b3,
              s[1][0], s[1][1], s[1][2], s[1][3]);
    }
    // Scale into the log2 domain, mask keys past the split end, online softmax per head row.
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = key0 + n * 8 + 2 * (lane & 3) + (e & 1);
        s[n][e] = key < kend ? s[n][e] * sl2 : -INFINITY;
        mx[e >> 1] = fmaxf(mx[e >> 1], s[n][e]);
      }
    float alpha[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
      const float m_new = fmaxf(m_run[i], mx[i]);  // finite: key0 < kend gives one real key
      alpha[i] = exp2f(m_run[i] - m_new);
      m_run[i] = m_new;
      l_run[i] *= alpha[i];
    }
    uint32_t pa[4];
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      const float p0 = exp2f(s[n][0] - m_run[0]), p1 = exp2f(s[n][1] - m_run[0]);
      const float p2 = exp2f(s[n][2] - m_run[1]), p3 = exp2f(s[n][3] - m_run[1]);
      l_run[0] += p0 + p1;
      l_run[1] += p2 + p3;
      pa[2 * n] = dev::pack2<T>(p0, p1);      // A fragment: rows lane/4, keys 8n + ...
      pa[2 * n + 1] = dev::pack2<T>(p2, p3);  // rows lane/4 + 8
    }
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      o[j][0] *= alpha[0]; o[j][1] *= alpha[0];
      o[j][2] *= alpha[1]; o[j][3] *= alpha[1];
    }
    // O += P V: V rows are [key][d], the B operand wants [d][key]: ldmatrix.trans.
#pragma unroll
    for (int j = 0; j < D / 16; ++j) {
      uint32_t b0, b1, b2, b3;
      const int r = (lane & 7) + ((lane >> 3) & 1) * 8;
      const int c = 2 * j + (lane >> 4);
      cute::SM75_U16x8_LDSM_T::copy(
          *reinterpret_cast<const cute::uint128_t*>(sV + swz<D>(r, c)), b0, b1, b2, b3);
      Op::fma(o[2 * j][0], o[2 * j][1], o[2 * j][2], o[2 * j][3], pa[0], pa[1], pa[2], pa[3], b0, b1,
              o[2 * j][0], o[2 * j][1], o[2 * j][2], o[2 * j][3]);
      Op::fma(o[2 * j + 1][0], o[2 * j + 1][1], o[2 * j + 1][2], o[2 * j + 1][3], pa[0], pa[1], pa[2],
              pa[3], b2, b3, o[2 * j + 1][0], o[2 * j + 1][1], o[2 * j + 1][2], o[2 * j + 1][3]);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // stages are free: reuse them for the cross-warp merge

  // Row sums were kept per lane; finish them across the quad.
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 1);
    l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 2);
  }
  float* sO = reinterpret_cast<float*>(sKV);               // [warp][16][D]
  float* sM = sO + kWarps * kHeadTile * D;                  // [warp][16]
  float* sL = sM + kWarps * kHeadTile;                      // [warp][16]
  {
    float* wo = sO + warp * kHeadTile * D;
    const int r = lane >> 2, c = 2 * (lane & 3);
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      *reinterpret_cast<float2*>(wo + r * D + 8 * j + c) = make_float2(o[j][0], o[j][1]);
      *reinterpret_cast<float2*>(wo + (r + 8) * D + 8 * j + c) = make_float2(o[j][2], o[j][3]);
    }
    if ((lane & 3) == 0) {
      sM[warp * kHeadTile + r] = m_run[0];
      sM[warp * kHeadTile + r + 8] = m_run[1];
      sL[warp * kHeadTile + r] = l_run[0];
      sL[warp * kHeadTile + r + 8] = l_run[1];
    }
  }
  __syncthreads();

  const bool direct = nsplit == 1;
  const int64_t ws_row = ((int64_t)(row * head_tiles + ht) * max_splits + split) * kHeadTile;
  float* ws_o = reinterpret_cast<float*>(p.workspace);
  float* ws_lse = ws_o + (int64_t)gridDim.x * head_tiles * max_splits * kHeadTile * D;
  for (int i = tid; i < nh * D; i += kThreads) {
    const int r = i / D, d = i % D;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, sM[w * kHeadTile + r]);
    float acc = 0.f, l = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float f = exp2f(sM[w * kHeadTile + r] - M);  // a warp with no keys has m = -inf: f = 0
      acc += f * sO[(w * kHeadTile + r) * D + d];
      l += f * sL[w * kHeadTile + r];
    }
    if (direct) {
      T* out = reinterpret_cast<T*>(p.out) + b * p.o_stride_b + (qh0 + r) * p.o_stride_h + d;
      *out = dev::from_float<T>(acc / l);
      if (p.lse && d == 0) p.lse[(int64_t)b * p.num_q_heads + qh0 + r] = (M + log2f(l)) / kLog2e;
    } else {
      ws_o[(ws_row + r) * D + d] = acc / l;
      if (d == 0) ws_lse[ws_row + r] = M + log2f(l);  // log2 domain
    }
  }
}

// Merges the split partials of rows that needed more than one split. One CTA per
// (row, query head), one thread per output column: each thread reads the <= 16 split lse
// values and its column of partials with independent loads (one latency, not one per split:
// at B 1 the merge is on the critical path of a ~20 us step).
template <typename T, int D, int NW>
__global__ void __launch_bounds__(D)
sparse_decode_merge_kernel(const SparseDecodeParams p, const Resolved rs) {
  const int max_splits = rs.max_splits, min_chunk = rs.min_chunk, head_tiles = rs.head_tiles;
  const int G = p.num_q_heads / p.kv.num_kv_heads;
  const int row = blockIdx.x, r = blockIdx.y, ht = blockIdx.z;
  const int h0 = ht * kHeadTile;
  if (h0 + r >= G) return;
  const int L = p.pages.seq_lens[row];
  const int nsplit = num_splits_for(L, split_chunk(L, max_splits, min_chunk, 16 * NW));
  if (nsplit <= 1) return;
  const int b = row / p.kv.num_kv_heads, g = row % p.kv.num_kv_heads, qh = g * G + h0 + r, d = threadIdx.x;
  const float* ws_o = reinterpret_cast<const float*>(p.workspace);
  const float* ws_lse = ws_o + (int64_t)gridDim.x * head_tiles * max_splits * kHeadTile * D;
  const int64_t base = (int64_t)(row * head_tiles + ht) * max_splits * kHeadTile + r;
  float lse[16], part[16];
#pragma unroll
  for (int s = 0; s < 16; ++s) {
    lse[s] = s < nsplit ? ws_lse[base + s * kHeadTile] : -INFINITY;
    part[s] = s < nsplit ? ws_o[(base + s * kHeadTile) * D + d] : 0.f;
  }
  float M = -INFINITY;
#pragma unroll
  for (int s = 0; s < 16; ++s) M = fmaxf(M, lse[s]);
  float acc = 0.f, l = 0.f;
#pragma unroll
  for (int s = 0; s < 16; ++s) {
    const float w = exp2f(lse[s] - M);  // 0 for the unused slots
    acc += w * part[s];
    l += w;
  }
  reinterpret_cast<T*>(p.out)[b * p.o_stride_b + qh * p.o_stride_h + d] = dev::from_float<T>(acc / l);
  if (p.lse && d == 0) p.lse[(int64_t)b * p.num_q_heads + qh] = (M + log2f(l)) / kLog2e;
}



Resolved resolve(const SparseDecodeParams& p, int num_sms) {
  Resolved r;
  const int G = p.kv.num_kv_heads > 0 ? p.num_q_heads / p.kv.num_kv_heads : 1;
  r.head_tiles = (G + kHeadTile - 1) / kHeadTile;
  r.rows = p.batch * p.kv.num_kv_heads;
  // Measured on H200 (bench/sweep_decode.py): splitting only pays while the rows alone do not
  // fill one wave of resident CTAs; beyond that every extra split costs its own prologue,
  // partial write and merge. So: enough splits for about one wave, at least min_chunk keys each.
  const int64_t work_items = std::max<int64_t>(1, (int64_t)r.rows * r.head_tiles);
  const int resident = num_sms * 2;  // 2 CTAs of ~100 KB shared memory per SM
  const int ms = p.max_splits > 0 ? p.max_splits : (int)((resident + work_items - 1) / work_items);
  r.max_splits = std::min(std::max(ms, 1), 16);
  r.min_chunk = p.min_chunk > 0 ? p.min_chunk : 256;
  r.bs_shift = 0;
  while ((1 << r.bs_shift) < p.kv.block_size) ++r.bs_shift;
  return r;
}

int device_sms() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 132;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return 132;
  return n;
}

template <typename T, int D, int NW>
Status launch(const SparseDecodeParams& p, const Resolved& r, cudaStream_t stream) {
  constexpr int smem = Cfg<D, NW>::kSmemBytes;
  // Set on every launch (a cheap host call, legal during capture): the attribute is per
  // device, so caching it in a static would miss the second GPU.
  if (cudaFuncSetAttribute(sparse_decode_kernel<T, D, NW>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           smem) != cudaSuccess)
    return Status::kCudaError;
  dim3 grid(r.rows, r.max_splits, r.head_tiles);
  sparse_decode_kernel<T, D, NW><<<grid, NW * 32, smem, stream>>>(p, r);
  if (cudaGetLastError() != cudaSuccess) return Status::kCudaError;
  if (r.max_splits > 1) {
    dim3 mgrid(r.rows, kHeadTile, r.head_tiles);
    sparse_decode_merge_kernel<T, D, NW><<<mgrid, D, 0, stream>>>(p, r);
    if (cudaGetLastError() != cudaSuccess) return Status::kCudaError;
  }
  return Status::kSuccess;
}

template <typename T>
Status dispatch_dim(const SparseDecodeParams& p, const Resolved& r, cudaStream_t s) {
  switch (p.kv.head_dim) {
    case 64: return launch<T, 64, 4>(p, r, s);
    case 128: return launch<T, 128, 4>(p, r, s);
    case 256: return launch<T, 256, 4>(p, r, s);
    default: return Status::kUnsupported;
  }
}

}  // namespace

size_t sparse_decode_workspace_bytes(const SparseDecodeParams& p, int num_sms) {
  const Resolved r = resolve(p, num_sms);
  if (r.max_splits <= 1) return 0;
  return (size_t)r.rows * r.head_tiles * r.max_splits * kHeadTile * (p.kv.head_dim + 1) * sizeof(float);
}

Status sparse_decode(const SparseDecodeParams& p, cudaStream_t stream) {
  if (p.batch < 0 || !valid_sizes(p.kv) || p.num_q_heads <= 0 ||
      p.num_q_heads % p.kv.num_kv_heads != 0 || p.pages.max_blocks_per_head <= 0 || !p.q ||
      !has_pointers(p.kv) || !has_pointers(p.pages) || !p.out)
    return Status::kInvalidArgument;
  // bf16 / fp16, head_dim 64 / 128 / 256, block_size a power of two (slots map by shift).
  if (!supported(Op::kSparseDecode, Device::kCUDA, p.kv.dtype, p.kv.head_dim, p.kv.block_size))
    return Status::kUnsupported;
  if (p.batch == 0) return Status::kSuccess;
  const Resolved r = resolve(p, device_sms());
  if (r.max_splits > 1 && !p.workspace) return Status::kInvalidArgument;
  if (r.head_tiles > 65535) return Status::kUnsupported;  // grid z limit
  return p.kv.dtype == DType::kBFloat16 ? dispatch_dim<__nv_bfloat16>(p, r, stream)
                                     : dispatch_dim<__half>(p, r, stream);
}

}  // namespace dms
