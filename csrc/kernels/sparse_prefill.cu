// Sparse prefill attention with the DMS visibility rule (docs/semantics.md), on tensor cores.
//
// Why it is cheaper than dense causal: for a query tile whose first token is i0, a chunk key
// j < i0 - w is outside the window of every query of the tile, so it is visible to all of them
// iff it was kept (d_j == 0). Those keys are attended through a compacted index list, with no
// per-pair mask; only the band [i0 - w, i1) needs the per-pair rule. The cached keys split the
// same way: survivors (always visible) and the ring of the last w + 1 positions, of which only
// the flagged entries need the rule (and only for queries i < w).
//
// Two launches on the caller's stream, no host sync, no allocation:
//   prepare_kernel  CTAs per (chunk, kv head, segment of the chunk): compacted list + prefix
//                   counts of the kept chunk keys, a bitmap of the flagged ring slots and a list of them with their
//                   positions. Everything lives in the caller's workspace.
//   prefill_kernel  one CTA per (query tile, kv head). Rows of a tile are (token, head in the
//                   GQA group) pairs, row = token * G + head, so each K/V tile feeds the whole
//                   group. FA2-style: mma.sync m16n8k16 (bf16/fp16 in, fp32 accumulate),
//                   ldmatrix from XOR-swizzled shared memory, cp.async loads (gathered rows),
//                   online softmax in fp32. 128 rows per CTA, 32 per warp (two m-tiles
//                   share every K/V fragment); a key tile visible to the whole query tile
//                   skips the mask. Key tiles come from four segments, in this order:
//                     0 cached slots [0, seq_len)          flagged ring slots masked out
//                     1 flagged ring slots (list)          visible iff t - p <= w
//                     2 kept chunk keys j < i0 - w (list)  always visible
//                     3 band j in [max(0, i0 - w), i1)     j <= i and (i - j <= w or !d_j)
//                   Every key of a tile carries [a, b]: query i sees it iff a <= i <= b.
//                   (On sm_90a, head_dim 64 / 128 with any of these pools, fp8 included, and
//                   head_dim 256 with bf16 / fp16 pools: v2 runs instead, sparse_prefill_sm90.cu.)
//                   An fp8 e4m3 pool (q / k / v / out bf16 or fp16): segments 0 and 1 are
//                   copied as fp8 bytes and converted (exactly) in shared memory before the
//                   ldmatrix path; k_scale scales their scores, v_scale their share of O.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "dms/dms.h"
#include "kernels/prefill_slots.cuh"
#include "kernels/prefill_sm90/launch.h"
#include "kernels/primitives.cuh"
#include "kernels/sparse_prefill_small.h"

namespace dms {
namespace {

using dev::aligned16;
using dev::cp_async16;
using dev::cp_async_commit;
using dev::cp_async_wait;
using dev::ex2;
using dev::kLog2e;
using dev::ldsm_x4;
using dev::ldsm_x4_trans;
using dev::swz;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
// 32 query rows (token, head) per warp, two 16-row m-tiles: every K/V fragment a warp reads
// from shared memory feeds two MMAs per n-tile instead of one (the kernel is bound by
// shared-memory reads, not by the tensor cores). At D 256 one m-tile (16 rows per warp, 64 per
// CTA): two would hold 256 fp32 accumulators of O per thread.
template <int D> constexpr int kMTilesFor = D >= 256 ? 1 : 2;
template <int D> constexpr int kTileRowsFor = 16 * kMTilesFor<D> * kWarps;  // query rows per CTA
constexpr int kTileKeys = 64;           // keys per tile
constexpr int kPrepThreads = 1024;

// Workspace layout, from sizes only (never from device data), so a caller can size it on the
// host: cnt [Hkv][T + n] int32 (chunk c at cu[c] + c, L + 1 prefix counts of kept keys),
// idx [Hkv][T] int32 (chunk c at cu[c]), bitmap [n][Hkv][cap_words] uint32 (flagged ring slots),
// flist [n][Hkv][w + 1] int2 (slot, position), fcount [n][Hkv] int32.
struct WsLayout {
  size_t cnt = 0, idx = 0, bitmap = 0, flist = 0, fcount = 0, kpre = 0, vpre = 0, pre = 0, ck = 0, cv = 0,
         kept = 0, total = 0;
  long long cnt_stride = 0;
  long long cap_words = 0;
};

inline size_t align_up(size_t x) { return (x + 255) & ~size_t(255); }

WsLayout ws_layout(const SparsePrefillParams& p) {
  WsLayout l;
  const long long T = p.total_tokens, n = p.num_seqs, H = p.kv.num_kv_heads;
  const long long cap = (long long)p.state.pages.max_blocks_per_head * p.kv.block_size;
  l.cnt_stride = T + n;
  l.cap_words = (cap + 31) / 32;
  size_t off = 0;
  l.cnt = off;    off = align_up(off + sizeof(int32_t) * H * (T + n));
  l.idx = off;    off = align_up(off + sizeof(int32_t) * H * T);
  l.bitmap = off; off = align_up(off + sizeof(uint32_t) * n * H * l.cap_words);
  l.flist = off;  off = align_up(off + sizeof(int2) * n * H * (long long)(p.state.window + 1));
  l.fcount = off; off = align_up(off + sizeof(int32_t) * n * H);
  // fp8 pools on the wgmma kernel: both pools dequantized to the compute dtype (sm90::PrefillWs).
  l.pre = sm90::pre_pool_bytes(p);
  l.kpre = off;   off = align_up(off + l.pre);
  l.vpre = off;   off = align_up(off + l.pre);
  // The wgmma kernel's compacted kept chunk keys, K and V (sm90::PrefillWs::ck / cv).
  l.kept = sm90::kept_bytes(p);
  l.ck = off;     off = align_up(off + l.kept);
  l.cv = off;     off = align_up(off + l.kept);
  l.total = off;
  return l;
}

struct WsPtrs {
  int32_t* cnt;
  int32_t* idx;
  uint32_t* bitmap;
  int2* flist;
  int32_t* fcount;
  long long cnt_stride;
  long long cap_words;
  void* kpre;   // null when the layout has no dequantized pools
  void* vpre;
  void* ck;     // null when the layout has no compacted kept keys
  void* cv;
};

WsPtrs ws_ptrs(const SparsePrefillParams& p, const WsLayout& l) {
  char* base = static_cast<char*>(p.workspace);
  return WsPtrs{reinterpret_cast<int32_t*>(base + l.cnt), reinterpret_cast<int32_t*>(base + l.idx),
                reinterpret_cast<uint32_t*>(base + l.bitmap), reinterpret_cast<int2*>(base + l.flist),
                reinterpret_cast<int32_t*>(base + l.fcount), l.cnt_stride, l.cap_words,
                l.pre ? base + l.kpre : nullptr, l.pre ? base + l.vpre : nullptr,
                l.kept ? base + l.ck : nullptr, l.kept ? base + l.cv : nullptr};
}

// ---------------------------------------------------------------------------------------------
// Per (chunk, kv head) preparation.

// Whether key j of the chunk starting at `start` (L keys) is kept for kv head g: d_j == 0, d_j =
// logits[start + j + 1] > 0 (the chunk's last key has no decision yet and is never listed).
__device__ __forceinline__ bool prep_kept(const SparsePrefillParams& p, int start, int L, int g, int j) {
  return j < L - 1 && !(p.logits[(long long)(start + j + 1) * p.kv.num_kv_heads + g] > 0.f);
}

// Grid (chunk c, kv head g, segment z): segment z of gridDim.z lists the chunk keys
// [z * seg, (z + 1) * seg), seg = ceil(L / gridDim.z) rounded up to 32, after counting the kept
// keys before it itself (independent loads, one CTA reduction); segment 0 also lists the
// flagged ring slots.
__global__ void __launch_bounds__(kPrepThreads) prepare_kernel(const SparsePrefillParams p, WsPtrs ws) {
  // The sm_90a chain after this kernel (dequant_pools, compact_kept, the attention kernel) is
  // launched programmatically: those kernels may start launching now; each waits (pdl_wait)
  // for its predecessor to finish before it touches global memory.
  dev::pdl_launch_dependents();
  const int c = blockIdx.x, g = blockIdx.y, z = blockIdx.z, tid = threadIdx.x;
  const int H = p.kv.num_kv_heads, w = p.state.window;
  const long long ch = (long long)c * H + g;
  __shared__ int s_fcount;
  __shared__ int s_warp[kPrepThreads / 32];
  __shared__ int s_running;
  if (tid == 0) { s_fcount = 0; s_running = 0; }

  const int start = p.cu_seqlens[c], end = p.cu_seqlens[c + 1];
  const int r = p.rows[c];
  const bool ok =
      start >= 0 && end >= start && end <= p.total_tokens && r >= 0 && r < p.state.max_seqs;
  if (!ok) {  // malformed chunk: the main kernel skips it too
    if (tid == 0 && z == 0) ws.fcount[ch] = 0;
    return;
  }
  const int L = end - start;
  const int lane = tid & 31, warp = tid >> 5;
  if (z == 0) {
    const int n = p.state.num_tokens[r];
    const long long cap = (long long)p.state.pages.max_blocks_per_head * p.kv.block_size;
    const int seq_len =
        (int)min((long long)max(p.state.pages.seq_lens[(long long)r * H + g], 0), cap);
    // Cached side. The ring holds positions max(0, n-w-1) .. n-1; the flag of n-1 is decided by
    // this chunk's first logit. Unflagged ring entries behave like survivors for every query of
    // the chunk (t >= n), so only flagged ones are listed.
    uint32_t* bm = ws.bitmap + ch * ws.cap_words;
    int2* fl = ws.flist + ch * (long long)(w + 1);
    const int words = (seq_len + 31) >> 5;
    for (int i = tid; i < words; i += kPrepThreads) bm[i] = 0u;
    __syncthreads();
    if (L > 0 && n > 0) {
      const int32_t* ring = p.state.ring + ((long long)r * H + g) * (w + 1);
      const bool last_flag = p.logits[(long long)start * H + g] > 0.f;
      for (int pos = max(0, n - w - 1) + tid; pos < n; pos += kPrepThreads) {
        const int e = ring[pos % (w + 1)];
        const int slot = e >> 1;
        const bool flag = (pos == n - 1) ? last_flag : (e & 1) != 0;
        if (flag && slot >= 0 && slot < seq_len) {
          atomicOr(&bm[slot >> 5], 1u << (slot & 31));
          const int k = atomicAdd(&s_fcount, 1);
          fl[k] = make_int2(slot, pos);
        }
      }
    }
    __syncthreads();
    if (tid == 0) ws.fcount[ch] = s_fcount;
  }

  // Chunk side: this segment's keys [j0, j1), after the kept count of [0, j0).
  const int seg = ((L + (int)gridDim.z - 1) / (int)gridDim.z + 31) & ~31;
  const int j0 = min(L, z * seg), j1 = min(L, j0 + seg);
  if (j0 >= j1 && !(z == 0 && L == 0)) return;
  int32_t* cnt = ws.cnt + (long long)g * ws.cnt_stride + start + c;
  int32_t* idx = ws.idx + (long long)g * p.total_tokens + start;
  if (j0 > 0) {
    int mine = 0;
#pragma unroll 8
    for (int j = tid; j < j0; j += kPrepThreads) mine += prep_kept(p, start, L, g, j) ? 1 : 0;
    mine = __reduce_add_sync(0xffffffffu, mine);
    __syncthreads();  // s_running's initial store is visible
    if (lane == 0) atomicAdd(&s_running, mine);
  }
  __syncthreads();
  for (int base = j0; base < j1; base += kPrepThreads) {
    const int j = base + tid;
    const bool kept = j < j1 && prep_kept(p, start, L, g, j);
    const unsigned ballot = __ballot_sync(0xffffffffu, kept);
    if (lane == 0) s_warp[warp] = __popc(ballot);
    __syncthreads();
    int before = s_running;
    for (int k = 0; k < warp; ++k) before += s_warp[k];
    before += __popc(ballot & ((1u << lane) - 1u));
    if (j < j1) cnt[j] = before;
    if (kept) idx[before] = j;
    __syncthreads();  // everyone has read s_running and s_warp
    if (tid == kPrepThreads - 1) s_running = before + (kept ? 1 : 0);
    __syncthreads();
  }
  if (tid == 0 && j1 == L) cnt[L] = s_running;
}

struct TileCtx {
  long long r0;
  int start, L, n, seq_len, num_flagged, num_kept, band_start;
  int end_cached, end_flagged, end_kept;  // tile index where each key segment ends
  int i0, i1, r, c;
};

// F8 (fp8 e4m3 pool): plus one stage of kTileKeys fp8 rows, shared by K and V (see the kernel).
template <int D, bool F8 = false>
constexpr int smem_bytes() {
  return (kTileRowsFor<D> + 2 * kTileKeys) * D * 2 + kTileKeys * (int)(sizeof(int) + sizeof(int2)) +
         (F8 ? kTileKeys * D : 0);
}

// ---------------------------------------------------------------------------------------------

// F8: the pool is fp8 e4m3 (q / k / v / out are T). Cached key tiles (segments 0 and 1) are
// copied as fp8 bytes (half of T's) into a stage, then each thread converts the bytes it copied
// itself into sK / sV (e4m3 -> T is exact), before the barrier that publishes the tile: the
// ldmatrix / MMA path is unchanged. One stage serves K and V: V(t)'s bytes are issued after
// K(t)'s conversion and barrier, K(t + 1)'s after V(t)'s. k_scale is folded into the score
// scale of cached tiles; v_scale multiplies O once, when the first chunk tile (segments 2, 3)
// comes (cached tiles come first, and a tile always has a band tile): O then holds exactly
// the cached keys' sum P.V_stored.
template <typename T, int D, bool F8 = false>
__global__ void __launch_bounds__(kThreads) prefill_kernel(const SparsePrefillParams p, WsPtrs ws) {
  constexpr int kMTiles = kMTilesFor<D>;                   // 16-row m-tiles per warp
  constexpr int kWarpRows = 16 * kMTiles;
  constexpr int kTileRows = kTileRowsFor<D>;
  constexpr int kChunksPerRow = D / 8;                     // 16-byte chunks per row
  constexpr int kRowsPerPass = kThreads / kChunksPerRow;    // key rows per loader pass
  constexpr int kLoadPasses = kTileKeys / kRowsPerPass;     // loader passes per tile
  constexpr int kKeysPerWarpPass = 32 / kChunksPerRow;      // keys per warp per pass
  constexpr int kLoaderLanes = kLoadPasses * kKeysPerWarpPass;  // lanes that resolve a key
  constexpr int kQkSteps = D / 16;                          // k-steps of Q.K^T
  constexpr int kKeyNTiles = kTileKeys / 8;                 // 8-key n-tiles of S
  constexpr int kDimNTiles = D / 8;                         // 8-dim n-tiles of O
  // At D 128 Q fragments in registers would not fit next to O and S (32 rows per warp), so
  // they are re-read from shared memory; at D 64 they fit.
  constexpr bool kQInRegs = D <= 64;
  static_assert(kTileKeys % kRowsPerPass == 0 && (kTileRows * kChunksPerRow) % kThreads == 0,
                "tile shapes");
  static_assert(kLoaderLanes <= 32 && kLoaderLanes * kWarps == kTileKeys, "loader lanes");
  // F8 stage copies: a warp copies the kLoaderLanes keys its lanes resolved, kKeys8PerPass per
  // pass (16-byte chunks of D fp8 bytes).
  constexpr int kChunks8 = D / 16;
  constexpr int kKeys8PerPass = 32 / kChunks8;
  constexpr int kLoadPasses8 = kLoaderLanes / kKeys8PerPass;
  static_assert(kLoaderLanes % kKeys8PerPass == 0, "fp8 loader passes");

  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + kTileRows * D;
  T* sV = sK + kTileKeys * D;
  int* sRow = reinterpret_cast<int*>(sV + kTileKeys * D);
  int2* sMeta = reinterpret_cast<int2*>(sRow + kTileKeys);
  uint8_t* s8 = reinterpret_cast<uint8_t*>(sMeta + kTileKeys);  // F8: [kTileKeys][D] stage

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = blockIdx.y;
  const int H = p.kv.num_kv_heads, Hq = p.num_q_heads, G = Hq / H, w = p.state.window;

  // Tile -> chunk without a host plan: chunk c owns tile slots starting at
  // floor(cu[c] * G / kTileRows) + c, which is strictly increasing in c and leaves room for
  // ceil(L * G / kTileRows) tiles; the grid covers floor(T * G / kTileRows) + n slots. Heavy
  // tiles (late in a chunk, more keys) are launched first.
  const long long b = (long long)gridDim.x - 1 - blockIdx.x;
  const int c = prefill_slots::chunk_of_slot(p, b, G, kTileRows);
  if (c < 0) return;
  const int start = p.cu_seqlens[c], end = p.cu_seqlens[c + 1];
  const int r = p.rows[c];
  if (start < 0 || end < start || end > p.total_tokens || r < 0 || r >= p.state.max_seqs) return;
  const int L = end - start;
  const long long rows_total = (long long)L * G;
  const long long r0 = (b - prefill_slots::slot_start(p, c, G, kTileRows)) * kTileRows;
  if (r0 >= rows_total) return;

  const int n = p.state.num_tokens[r];
  const long long cap = (long long)p.state.pages.max_blocks_per_head * p.kv.block_size;
  const int seq_len =
      (int)min((long long)max(p.state.pages.seq_lens[(long long)r * H + g], 0), cap);
  const int i0 = (int)(r0 / G);
  const int i1 = (int)min((long long)L, (r0 + kTileRows - 1) / G + 1);
  const long long ch = (long long)c * H + g;

  // Key segments of this tile, as tile index ranges: [0, end_cached) cached slots,
  // [end_cached, end_flagged) flagged ring slots, [end_flagged, end_kept) kept chunk keys,
  // [end_kept, ntiles) the band. Flagged ring keys matter only to queries i < w.
  const int num_flagged = i0 < w ? ws.fcount[ch] : 0;
  const int num_kept = i0 - w > 0 ? ws.cnt[(long long)g * ws.cnt_stride + start + c + (i0 - w)] : 0;
  const int band_start = max(0, i0 - w);
  const int end_cached = (seq_len + kTileKeys - 1) / kTileKeys;
  const int end_flagged = end_cached + (num_flagged + kTileKeys - 1) / kTileKeys;
  const int end_kept = end_flagged + (num_kept + kTileKeys - 1) / kTileKeys;
  const int ntiles = end_kept + (i1 - band_start + kTileKeys - 1) / kTileKeys;

  // The tile's scalars live in shared memory: held in registers across the main loop they
  // would push the O and S accumulators into local memory at D 128. The loader and the
  // epilogue re-read them (the barriers keep the compiler from hoisting the reads).
  __shared__ TileCtx s_ctx;
  if (tid == 0) {
    s_ctx.start = start; s_ctx.L = L; s_ctx.n = n; s_ctx.seq_len = seq_len;
    s_ctx.num_flagged = num_flagged; s_ctx.num_kept = num_kept; s_ctx.band_start = band_start;
    s_ctx.end_cached = end_cached; s_ctx.end_flagged = end_flagged; s_ctx.end_kept = end_kept;
    s_ctx.i0 = i0; s_ctx.i1 = i1; s_ctx.r = r; s_ctx.c = c; s_ctx.r0 = r0;
  }
  __syncthreads();
  const float* lg = p.logits;
  const T* q = static_cast<const T*>(p.q);
  const T* kc = static_cast<const T*>(p.kv.k_cache);  // !F8 only
  const T* vc = static_cast<const T*>(p.kv.v_cache);
  const T* kk = static_cast<const T*>(p.k);
  const T* vv = static_cast<const T*>(p.v);

  // F8: the key and 16-byte fp8 chunk this thread copies in stage pass `pass`: keys resolved by
  // lane (pass * kKeys8PerPass + lane / kChunks8) of this warp (the same key mapping as load_k).
  auto lane8 = [&](int pass) { return pass * kKeys8PerPass + lane / kChunks8; };
  auto key8 = [&](int pass) {
    const int l = lane8(pass);
    return warp * kKeysPerWarpPass + l % kKeysPerWarpPass + (l / kKeysPerWarpPass) * kRowsPerPass;
  };
  // F8: converts the stage chunks this thread copied (after its cp_async_wait) into dst, the T
  // tile ldmatrix reads. Chunk c8 becomes T chunks 2 c8, 2 c8 + 1; the upper half of a 128-byte
  // row stores them in the other order, so that each store's 8-lane phase hits 8 bank groups.
  auto convert8 = [&](T* dst) {
#pragma unroll
    for (int pass = 0; pass < kLoadPasses8; ++pass) {
      const int key = key8(pass), c8 = lane % kChunks8;
      const uint4 x = *reinterpret_cast<const uint4*>(s8 + key * D + c8 * 16);
      uint4 lo, hi;
      dev::e4m3x4_to<T>(x.x, lo.x, lo.y);
      dev::e4m3x4_to<T>(x.y, lo.z, lo.w);
      dev::e4m3x4_to<T>(x.z, hi.x, hi.y);
      dev::e4m3x4_to<T>(x.w, hi.z, hi.w);
      const bool sw = (c8 >> 2) & 1;
      *reinterpret_cast<uint4*>(dst + swz<D>(key, 2 * c8 + sw)) = sw ? hi : lo;
      *reinterpret_cast<uint4*>(dst + swz<D>(key, 2 * c8 + !sw)) = sw ? lo : hi;
    }
  };

  // Issues the K tile `tile` and records, per key, its source row and visibility interval.
  // Each key's source is worked out once, by one lane of the warp that copies it (the copies
  // of one key are kChunksPerRow lanes of one warp), and handed to the others by shuffles. Returns
  // whether every key this thread looked at is visible to every query token of the tile.
  auto load_k = [&](int tile) -> bool {
    const TileCtx x = s_ctx;
    const int ch16 = tid % kChunksPerRow;
    const T* src = tile < x.end_flagged ? kc : kk;
    int mrow = -1, ma = INT_MAX, mb = INT_MIN;
    if (lane < kLoaderLanes) {
      const int start = x.start, L = x.L, n = x.n, band_start = x.band_start, i1 = x.i1;
      const int end_cached = x.end_cached, end_flagged = x.end_flagged, end_kept = x.end_kept;
      const int seq_len = x.seq_len, num_flagged = x.num_flagged, num_kept = x.num_kept;
      const long long ch = (long long)x.c * H + g;
      const int32_t* bt = p.state.pages.block_table +
                          ((long long)x.r * H + g) * p.state.pages.max_blocks_per_head;
      const uint32_t* bm = ws.bitmap + ch * ws.cap_words;
      const int2* fl = ws.flist + ch * (long long)(w + 1);
      const int32_t* cidx = ws.idx + (long long)g * p.total_tokens + start;
      auto cache_row = [&](int s) -> int {
        const int blk = bt[s / p.kv.block_size];
        const int bs = p.kv.block_size;
        return (blk >= 0 && blk < p.kv.num_blocks) ? blk * bs + s % bs : -1;
      };
      const int key = warp * kKeysPerWarpPass + lane % kKeysPerWarpPass +
                      (lane / kKeysPerWarpPass) * kRowsPerPass;
      if (tile < end_cached) {
        const int s = tile * kTileKeys + key;
        if (s < seq_len) {
          mrow = cache_row(s);
          if (mrow >= 0 && !((bm[s >> 5] >> (s & 31)) & 1u)) { ma = 0; mb = INT_MAX; }
        }
      } else if (tile < end_flagged) {
        const int m = (tile - end_cached) * kTileKeys + key;
        if (m < num_flagged) {
          const int2 e = fl[m];
          mrow = cache_row(e.x);
          if (mrow >= 0) { ma = 0; mb = e.y + w - n; }  // t - p <= w  <=>  i <= p + w - n
        }
      } else if (tile < end_kept) {
        const int m = (tile - end_flagged) * kTileKeys + key;
        if (m < num_kept) {
          mrow = (start + cidx[m]) * H + g;
          ma = 0; mb = INT_MAX;
        }
      } else {
        const int j = band_start + (tile - end_kept) * kTileKeys + key;
        if (j < i1) {
          mrow = (start + j) * H + g;
          const bool flagged = j < L - 1 && lg[(long long)(start + j + 1) * H + g] > 0.f;
          ma = j; mb = flagged ? j + w : INT_MAX;
        }
      }
      sRow[key] = mrow;
      sMeta[key] = make_int2(ma, mb);
    }
    const bool all_vis = lane >= kLoaderLanes || (mrow >= 0 && ma <= x.i0 && mb >= x.i1 - 1);
    if constexpr (F8) {
      if (tile < x.end_flagged) {  // fp8 bytes into the stage (converted by convert8)
        const uint8_t* k8 = static_cast<const uint8_t*>(p.kv.k_cache);
#pragma unroll
        for (int pass = 0; pass < kLoadPasses8; ++pass) {
          const int row = __shfl_sync(0xffffffffu, mrow, lane8(pass));
          const int c8 = lane % kChunks8;
          const uint8_t* gp = row >= 0 ? k8 + (long long)row * D + c8 * 16 : k8;
          cp_async16(s8 + key8(pass) * D + c8 * 16, gp, row >= 0);
        }
        return all_vis;
      }
    }
#pragma unroll
    for (int pass = 0; pass < kLoadPasses; ++pass) {
      const int key = tid / kChunksPerRow + pass * kRowsPerPass;
      const int row = __shfl_sync(0xffffffffu, mrow, pass * kKeysPerWarpPass + lane / kChunksPerRow);
      const T* gp = row >= 0 ? src + (long long)row * D + ch16 * 8 : src;
      cp_async16(sK + swz<D>(key, ch16), gp, row >= 0);
    }
    return all_vis;
  };
  // Pulls into L1 the first-level metadata load_k(tile) will read (block table, bitmap, list
  // entries, logits), so that its reads after the barrier do not wait on L2 in front of P.V.
  // Prefetches hold no registers; the second-level read (block table of a listed slot) is not
  // covered.
  auto prefetch_k = [&](int tile) {
    if (lane < kLoaderLanes) {
      const TileCtx x = s_ctx;
      const int key = warp * kKeysPerWarpPass + lane % kKeysPerWarpPass +
                      (lane / kKeysPerWarpPass) * kRowsPerPass;
      const long long ch = (long long)x.c * H + g;
      const void* a = nullptr;
      const void* a2 = nullptr;
      if (tile < x.end_cached) {
        const int s = tile * kTileKeys + key;
        if (s < x.seq_len) {
          a = p.state.pages.block_table +
              ((long long)x.r * H + g) * p.state.pages.max_blocks_per_head + s / p.kv.block_size;
          a2 = ws.bitmap + ch * ws.cap_words + (s >> 5);
        }
      } else if (tile < x.end_flagged) {
        const int m = (tile - x.end_cached) * kTileKeys + key;
        if (m < x.num_flagged) a = ws.flist + ch * (long long)(w + 1) + m;
      } else if (tile < x.end_kept) {
        const int m = (tile - x.end_flagged) * kTileKeys + key;
        if (m < x.num_kept) a = ws.idx + (long long)g * p.total_tokens + x.start + m;
      } else {
        const int j = x.band_start + (tile - x.end_kept) * kTileKeys + key;
        if (j < x.i1 && j < x.L - 1) a = lg + (long long)(x.start + j + 1) * H + g;
      }
      if (a) asm volatile("prefetch.global.L1 [%0];\n" :: "l"(a));
      if (a2) asm volatile("prefetch.global.L1 [%0];\n" :: "l"(a2));
    }
  };
  // V rows are the ones recorded by the K load of the same tile (visible after a barrier).
  auto load_v = [&](int tile) {
    if constexpr (F8) {
      if (tile < s_ctx.end_flagged) {  // fp8 bytes into the stage (converted by convert8)
        const uint8_t* v8 = static_cast<const uint8_t*>(p.kv.v_cache);
#pragma unroll
        for (int pass = 0; pass < kLoadPasses8; ++pass) {
          const int row = sRow[key8(pass)];
          const int c8 = lane % kChunks8;
          const uint8_t* gp = row >= 0 ? v8 + (long long)row * D + c8 * 16 : v8;
          cp_async16(s8 + key8(pass) * D + c8 * 16, gp, row >= 0);
        }
        return;
      }
    }
    const int ch16 = tid % kChunksPerRow;
    const T* src = tile < s_ctx.end_flagged ? vc : vv;
#pragma unroll
    for (int pass = 0; pass < kLoadPasses; ++pass) {
      const int key = tid / kChunksPerRow + pass * kRowsPerPass;
      const int row = sRow[key];
      const T* gp = row >= 0 ? src + (long long)row * D + ch16 * 8 : src;
      cp_async16(sV + swz<D>(key, ch16), gp, row >= 0);
    }
  };

  // Q rows: row = token * G + head; rows past the chunk are zero-filled and never stored.
#pragma unroll
  for (int it = 0; it < kTileRows * kChunksPerRow / kThreads; ++it) {
    const int e = tid + it * kThreads;
    const int row = e / kChunksPerRow, ch16 = e % kChunksPerRow;
    const long long R = r0 + row;
    const bool valid = R < rows_total;
    const T* gp = q;
    if (valid) {
      const int i = (int)(R / G), hh = (int)(R % G);
      gp = q + ((long long)(start + i) * Hq + (long long)g * G + hh) * D + ch16 * 8;
    }
    cp_async16(sQ + swz<D>(row, ch16), gp, valid);
  }
  bool vis_next = load_k(0);
  cp_async_commit();

  // This warp owns rows warp * 32 + [0, 32): m-tiles mt = 0, 1 of 16 rows. This thread's
  // accumulator rows in m-tile mt are lane / 4 and lane / 4 + 8.
  int qi[kMTiles][2];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int rs = 0; rs < 2; ++rs) {
      const long long R = r0 + warp * kWarpRows + mt * 16 + (lane >> 2) + rs * 8;
      qi[mt][rs] = R < rows_total ? (int)(R / G) : -1;  // -1: every key masked, row never stored
    }
  }
  const float sl2 = p.scale * kLog2e;

  cp_async_wait<0>();
  if constexpr (F8) {
    if (0 < s_ctx.end_flagged) convert8(sK);
  }
  bool full = __syncthreads_and(vis_next);

  uint32_t qf[kQInRegs ? kMTiles : 1][kQInRegs ? kQkSteps : 1][4];
  if constexpr (kQInRegs) {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int ks = 0; ks < kQkSteps; ++ks) {
        const int row = warp * kWarpRows + mt * 16 + (lane & 15);
        ldsm_x4(dev::smem_u32(sQ + swz<D>(row, ks * 2 + (lane >> 4))), qf[mt][ks]);
      }
    }
  }

  float o[kMTiles][kDimNTiles][4];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int d = 0; d < kDimNTiles; ++d) o[mt][d][0] = o[mt][d][1] = o[mt][d][2] = o[mt][d][3] = 0.f;
  float m_run[kMTiles][2], l_run[kMTiles][2];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int rs = 0; rs < 2; ++rs) { m_run[mt][rs] = -INFINITY; l_run[mt][rs] = 0.f; }

  // ldmatrix addresses (32-bit shared addresses: 64-bit pointers here spill at D 128):
  // swz(row, 2 * x + b) == swz(row, b) ^ (x << 4) (row * D has no bits below D), so each
  // fragment is a per-thread offset XOR an immediate plus a row step.
  const uint32_t q_addr = dev::smem_u32(sQ), k_addr = dev::smem_u32(sK);
  const uint32_t v_addr = dev::smem_u32(sV);
  const int q_off = swz<D>(warp * kWarpRows + (lane & 15), lane >> 4);
  const int k_off = swz<D>(((lane >> 4) << 3) + (lane & 7), (lane >> 3) & 1);
  const int v_off = swz<D>((((lane >> 3) & 1) << 3) + (lane & 7), lane >> 4);

  for (int tile = 0; tile < ntiles; ++tile) {
    if (tile > 0) {
      cp_async_wait<0>();
      if constexpr (F8) {
        if (tile < s_ctx.end_flagged) convert8(sK);
      }
      // K(tile) landed; every warp is done with V(tile - 1). Also: is K(tile) fully visible?
      full = __syncthreads_and(vis_next);
    }
    load_v(tile);
    cp_async_commit();
    if (tile + 1 < ntiles) prefetch_k(tile + 1);

    // S = Q.K^T; each K fragment feeds both m-tiles.
    float s[kMTiles][kKeyNTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int t = 0; t < kKeyNTiles; ++t) s[mt][t][0] = s[mt][t][1] = s[mt][t][2] = s[mt][t][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kQkSteps; ++ks) {
      uint32_t qa[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        if constexpr (kQInRegs) {
#pragma unroll
          for (int e = 0; e < 4; ++e) qa[mt][e] = qf[mt][ks][e];
        } else {
          ldsm_x4(q_addr + mt * 16 * D * 2 + ((q_off ^ (ks << 4)) << 1), qa[mt]);
        }
      }
#pragma unroll
      for (int pr = 0; pr < kKeyNTiles / 2; ++pr) {
        uint32_t bfr[4];
        ldsm_x4(k_addr + pr * 16 * D * 2 + ((k_off ^ (ks << 4)) << 1), bfr);
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          dev::mma_16x8x16<T>(s[mt][2 * pr], qa[mt], bfr[0], bfr[1]);
          dev::mma_16x8x16<T>(s[mt][2 * pr + 1], qa[mt], bfr[2], bfr[3]);
        }
      }
    }

    // Mask + scale into the log2 domain; masked scores are -inf. A tile whose keys are all
    // visible to every query token of the tile needs no mask (rows past the chunk see it too,
    // harmlessly: never stored).
    float mx[kMTiles][2];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) mx[mt][0] = mx[mt][1] = -INFINITY;
    // F8: cached tiles read K as stored * k_scale; at the first chunk tile O (the cached keys'
    // P.V_stored so far) takes v_scale.
    float sc = sl2, o_scale = 1.f;
    if constexpr (F8) {
      const int end_flagged = s_ctx.end_flagged;
      if (tile < end_flagged) sc = p.scale * p.kv.k_scale * kLog2e;
      if (tile == end_flagged) o_scale = p.kv.v_scale;
    }
    if (full) {
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int t = 0; t < kKeyNTiles; ++t)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            s[mt][t][e] *= sc;
            mx[mt][e >> 1] = fmaxf(mx[mt][e >> 1], s[mt][t][e]);
          }
    } else {
#pragma unroll
      for (int t = 0; t < kKeyNTiles; ++t) {
#pragma unroll
        for (int e2 = 0; e2 < 2; ++e2) {
          const int2 ab = sMeta[t * 8 + ((lane & 3) << 1) + e2];
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
            for (int rs = 0; rs < 2; ++rs) {
              const bool vis = ab.x <= qi[mt][rs] && qi[mt][rs] <= ab.y;
              float& x = s[mt][t][rs * 2 + e2];
              x = vis ? x * sc : -INFINITY;
              mx[mt][rs] = fmaxf(mx[mt][rs], x);
            }
          }
        }
      }
    }
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int rs = 0; rs < 2; ++rs) {
        float m = mx[mt][rs];
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
        const float m_new = fmaxf(m_run[mt][rs], m);
        // A row with nothing visible yet keeps base 0, so exp2(-inf - 0) = 0 and no NaN appears.
        const float base = m_new == -INFINITY ? 0.f : m_new;
        const float alpha = ex2(m_run[mt][rs] - base);
        m_run[mt][rs] = m_new;
        l_run[mt][rs] *= alpha;
        const float oa = F8 ? alpha * o_scale : alpha;
#pragma unroll
        for (int d = 0; d < kDimNTiles; ++d) { o[mt][d][rs * 2] *= oa; o[mt][d][rs * 2 + 1] *= oa; }
        mx[mt][rs] = base;
      }
#pragma unroll
      for (int t = 0; t < kKeyNTiles; ++t) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[mt][t][e] = ex2(s[mt][t][e] - mx[mt][e >> 1]);
          l_run[mt][e >> 1] += s[mt][t][e];
        }
      }
    }

    cp_async_wait<0>();
    if constexpr (F8) {
      if (tile < s_ctx.end_flagged) convert8(sV);
    }
    __syncthreads();  // V(tile) landed; every warp is done with K(tile) and its metadata
    if (tile + 1 < ntiles) {
      vis_next = load_k(tile + 1);
      cp_async_commit();
    }

    // O += P.V with P straight from the S accumulators (C layout == A layout); each V fragment
    // feeds both m-tiles.
#pragma unroll
    for (int ks = 0; ks < kTileKeys / 16; ++ks) {
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        a[mt][0] = dev::pack2<T>(s[mt][2 * ks][0], s[mt][2 * ks][1]);
        a[mt][1] = dev::pack2<T>(s[mt][2 * ks][2], s[mt][2 * ks][3]);
        a[mt][2] = dev::pack2<T>(s[mt][2 * ks + 1][0], s[mt][2 * ks + 1][1]);
        a[mt][3] = dev::pack2<T>(s[mt][2 * ks + 1][2], s[mt][2 * ks + 1][3]);
      }
#pragma unroll
      for (int pr = 0; pr < kDimNTiles / 2; ++pr) {
        uint32_t bfr[4];
        ldsm_x4_trans(v_addr + ks * 16 * D * 2 + ((v_off ^ (pr << 4)) << 1), bfr);
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          dev::mma_16x8x16<T>(o[mt][2 * pr], a[mt], bfr[0], bfr[1]);
          dev::mma_16x8x16<T>(o[mt][2 * pr + 1], a[mt], bfr[2], bfr[3]);
        }
      }
    }
  }

  // Epilogue: normalise, stage this warp's rows in its own part of sQ (only this warp ever
  // read them), store 16-byte chunks.
  __syncwarp();
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int rs = 0; rs < 2; ++rs) {
      float l = l_run[mt][rs];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      l_run[mt][rs] = l > 0.f ? 1.f / l : 0.f;
    }
#pragma unroll
    for (int d = 0; d < kDimNTiles; ++d) {
#pragma unroll
      for (int rs = 0; rs < 2; ++rs) {
        const int row = warp * kWarpRows + mt * 16 + (lane >> 2) + rs * 8;
        const uint32_t v = dev::pack2<T>(o[mt][d][rs * 2] * l_run[mt][rs],
                                        o[mt][d][rs * 2 + 1] * l_run[mt][rs]);
        *reinterpret_cast<uint32_t*>(sQ + swz<D>(row, d) + ((lane & 3) << 1)) = v;
      }
    }
  }
  __syncthreads();
  T* out = static_cast<T*>(p.out);
  const int o_start = s_ctx.start;
  const long long o_r0 = s_ctx.r0, o_rows = (long long)s_ctx.L * G;
#pragma unroll
  for (int it = 0; it < kTileRows * kChunksPerRow / kThreads; ++it) {
    const int e = tid + it * kThreads;
    const int row = e / kChunksPerRow, ch16 = e % kChunksPerRow;
    const long long R = o_r0 + row;
    if (R < o_rows) {
      const int i = (int)(R / G), hh = (int)(R % G);
      T* gp = out + ((long long)(o_start + i) * Hq + (long long)g * G + hh) * D + ch16 * 8;
      *reinterpret_cast<uint4*>(gp) = *reinterpret_cast<const uint4*>(sQ + swz<D>(row, ch16));
    }
  }
}

template <typename T, int D, bool F8 = false>
Status launch(const SparsePrefillParams& p, const WsPtrs& ws, cudaStream_t stream) {
  constexpr int bytes = smem_bytes<D, F8>();
  // Above 48 KiB the kernel must opt in (per device, so on every call; it is cheap).
  if (cudaFuncSetAttribute(prefill_kernel<T, D, F8>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           bytes) != cudaSuccess)
    return Status::kCudaError;
  const int G = p.num_q_heads / p.kv.num_kv_heads;
  const long long slots = (long long)p.total_tokens * G / kTileRowsFor<D> + p.num_seqs;
  if (slots > INT_MAX) return Status::kUnsupported;
  prefill_kernel<T, D, F8><<<dim3((unsigned)slots, p.kv.num_kv_heads), kThreads, bytes, stream>>>(p, ws);
  return cudaGetLastError() == cudaSuccess ? Status::kSuccess : Status::kCudaError;
}

template <typename T>
Status launch_d(const SparsePrefillParams& p, const WsPtrs& ws, cudaStream_t stream) {
  const bool f8 = is_fp8(p.kv.dtype);
  switch (p.kv.head_dim) {
    case 64: return f8 ? launch<T, 64, true>(p, ws, stream) : launch<T, 64>(p, ws, stream);
    case 128: return f8 ? launch<T, 128, true>(p, ws, stream) : launch<T, 128>(p, ws, stream);
    case 256: return f8 ? launch<T, 256, true>(p, ws, stream) : launch<T, 256>(p, ws, stream);
    default: return Status::kUnsupported;
  }
}

}  // namespace

size_t sparse_prefill_workspace_bytes(const SparsePrefillParams& p) {
  if (p.total_tokens <= 0 || p.num_seqs <= 0 || p.kv.num_kv_heads <= 0 || p.state.window < 1) return 0;
  // Either kernel may take the call (short chunks: sparse_prefill_small.cu): room for both.
  return std::max(ws_layout(p).total, prefill_small::workspace_bytes(p));
}

Status sparse_prefill(const SparsePrefillParams& p, cudaStream_t stream) {
  if (p.num_seqs < 0 || p.total_tokens < 0 || p.num_q_heads <= 0 || !valid_sizes(p.kv) ||
      !valid_sizes(p.state) || p.num_q_heads % p.kv.num_kv_heads != 0)
    return Status::kInvalidArgument;
  // bf16 / fp16 q / k / v / out, head_dim 64 / 128 / 256 (D 256 off sm_90a or with fp8 pools:
  // this kernel's 64-row tiles); the pool of q's dtype or fp8 e4m3 (then q / k / v / out have act_dtype).
  const DType act = compute_dtype(p.kv, p.act_dtype);
  if (!supported(Op::kSparsePrefill, Device::kCUDA, act, p.kv.head_dim, p.kv.block_size, p.kv.dtype))
    return Status::kUnsupported;
  if (!valid_scales(p.kv)) return Status::kInvalidArgument;
  if (p.total_tokens == 0 || p.num_seqs == 0) return Status::kSuccess;
  if (!p.q || !p.k || !p.v || !p.logits || !p.rows || !p.cu_seqlens || !has_pointers(p.kv) ||
      !has_pointers(p.state) || !p.out || !p.workspace)
    return Status::kInvalidArgument;
  // Rows are moved as 16-byte chunks.
  if (!aligned16(p.q) || !aligned16(p.k) || !aligned16(p.v) || !aligned16(p.kv.k_cache) ||
      !aligned16(p.kv.v_cache) || !aligned16(p.out) || !aligned16(p.workspace))
    return Status::kInvalidArgument;

  // ---- Short chunks (<= 16 tokens per chunk on average): sparse_prefill_small.cu. ----
  if (prefill_small::applies(p)) return prefill_small::launch(p, stream);

  const WsLayout l = ws_layout(p);
  const WsPtrs ws = ws_ptrs(p, l);
  // Segments per chunk: about 2048 keys each at the average chunk length, at most 16. Segment z
  // reads z segments' logits to count their kept keys, L * segs / 2 reads per (chunk, head) in
  // all: at 32k keys, 64 segments of 512 took 21.6 us on the H200 (one CTA, no segments: 44.5).
  const long long avg = (long long)p.total_tokens / p.num_seqs;
  const unsigned segs = (unsigned)std::min<long long>(16, std::max<long long>(1, (avg + 2047) / 2048));
  prepare_kernel<<<dim3(p.num_seqs, p.kv.num_kv_heads, segs), kPrepThreads, 0, stream>>>(p, ws);
  if (cudaGetLastError() != cudaSuccess) return Status::kCudaError;
  // Hopper: the warp-specialized wgmma kernel (sparse_prefill_sm90.cu) for what it supports.
  if (sm90::prefill_v2_supported(p))
    return sm90::sparse_prefill_v2(
        p, sm90::PrefillWs{ws.cnt, ws.idx, ws.bitmap, ws.flist, ws.fcount, ws.cnt_stride, ws.cap_words,
                           ws.kpre, ws.vpre, ws.kpre != nullptr && sm90::pre_compact(p), ws.ck, ws.cv},
        stream);
  return act == DType::kBFloat16 ? launch_d<__nv_bfloat16>(p, ws, stream)
                                 : launch_d<__half>(p, ws, stream);
}

}  // namespace dms
