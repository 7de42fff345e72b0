// sparse_prefill v2: warp-specialized wgmma kernel for Hopper (sm_90a). Same op, same DMS rule
// and same key segments as sparse_prefill.cu (see prefill_sm90/scheduler.cuh); the launcher of
// sparse_prefill.cu dispatches here after its prepare_kernel (sm_90 device, bf16 / fp16, head_dim
// 64 / 128 / 256 (pools of q's dtype or fp8 e4m3; 64-key tiles at 256, two producer threads
// per key); DMS_PREFILL_V2=0 forces the old kernel).
//
// Work items are (query tile of kBlockM = 128 (token, head) rows, kv head); a CTA of 3
// warpgroups (384 threads) walks items blockIdx.x, then snake order over rounds of gridDim.x
// (persistent grid of one CTA per SM; DMS_PREFILL_V2_PERSISTENT=0: one CTA per item):
//   WG0      producer: per item, its TileCtx (scheduler.cuh) and Q (once Q's previous item is
//            done with it), then per key tile resolves the 128 keys (source row + visibility
//            interval), gathers K and V rows with cp.async into the 128-byte-swizzled GMMA
//            layout and arrives on the stage's mbarrier (fence + cp.async.mbarrier.arrive.noinc);
//            band tiles (the chunk's own keys, a strided box of k / v) come by TMA instead
//            (thread 0: arrive.expect_tx + one box per 64 columns; DMS_PREFILL_V2_TMA=0: the
//            cp.async gathers), and with TMA a kept list holding >= 31/32 of the keys before
//            the band is merged into it (a fresh CR 1 prompt: every chunk key by TMA);
//            K runs one tile ahead of V. setmaxnreg 56 (56 * 128 + 224 * 256 = 168 * 384:
//            the launch allocation).
//   WG1, WG2 consumers, 64 query rows each (the wgmma M). setmaxnreg 224. Per key tile j:
//              S_j = Q K_j^T        wgmma SS (m64 n128 k16, D / 16 steps), issued async
//              O  += P_{j-1} V_{j-1}  wgmma RS (P from registers, V MN-major), issued async
//              wait S_j; mask + online softmax of S_j while P_{j-1} V_{j-1} runs
//              wait P V; P_j = bf16(S_j); O *= alpha_j
//            (FA3's intra-warpgroup overlap) with the two warpgroups taking turns on the GEMM
//            issue (ping-pong; DMS_PREFILL_V2_PINGPONG=0 turns it off); the epilogue stores
//            O / l from the accumulators (the Q tile may already hold the next item's Q).
// Pipeline: kS K and kSV V stages (D 128: 3 K / 2 V, DMS_PREFILL_V2_KSTAGES=2: 2 / 2; D 64:
// 3 / 3), each with a full (producer -> consumers, 128 arrivals) and an empty (consumers ->
// producer, 256 arrivals) mbarrier; the tile counter runs on across items, stage counter %
// stages, parity (counter / stages) & 1. Q: q_full / q_empty, the item's TileCtx
// published with it (by item parity); a TileCtx with ntiles 0 ends the consumers' loop.
#include <cuda.h>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <type_traits>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "dms/dms.h"
#include "kernels/common.cuh"
#include "kernels/prefill_sm90/gmma.cuh"
#include "kernels/prefill_sm90/launch.h"
#include "kernels/prefill_sm90/producer.cuh"
#include "kernels/prefill_sm90/scheduler.cuh"
#include "kernels/prefill_sm90/softmax.cuh"
#include "kernels/prefill_sm90/sync.cuh"
#include "kernels/primitives.cuh"

namespace dms {
namespace sm90 {
namespace {

constexpr int kBlockM = 128;   // query rows per CTA (two consumer warpgroups of 64)
// Keys per key tile: 128 (one per producer thread) up to D 128; 64 at D 256 (O takes 128
// registers there; two producer threads per key, each copying half of its row).
template <int D> constexpr int block_n() { return D > 128 ? 64 : 128; }
constexpr int kThreads = 384;
[[maybe_unused]] constexpr int kProducerRegs = 56;
[[maybe_unused]] constexpr int kConsumerRegs = 224;

// DMS_PREFILL_V2_DEBUG bits (bisection on a GPU; results stay exact, only slower):
[[maybe_unused]] constexpr int kDebugAlwaysMask = 1;  // mask every key tile (no fully-visible fast path)
[[maybe_unused]] constexpr int kDebugSerial = 2;      // wait for every wgmma batch at once (no GEMM / softmax overlap)

// Timeline probe (tuning builds only: DMS_NVCC_EXTRA="-DDMS_PREFILL_PROBE", bench/prefill_probe.py):
// with DMS_PREFILL_V2_DEBUG bit 4 (16), lane 0 of each consumer warpgroup's first warp sums clock64
// cycles per phase of its work items (waiting for Q, tile 0, the steady loop and the mbarrier
// waits inside it, the last P V, the epilogue) into g_prefill_probe; launch() prints one PPROBE
// line per warpgroup after the kernel.
[[maybe_unused]] constexpr int kDebugProbe = 16;
#ifdef DMS_PREFILL_PROBE
#include <cstdio>
#define DMS_PP(...) __VA_ARGS__
// Per (CTA, consumer warpgroup): ns, cycles, tiles, the cycles of the phases, items; written by the
// kernel (no device printf: a call would serialize every wgmma), printed by launch() after it.
constexpr int kProbeCtas = 1024, kProbeFields = 10;
__device__ long long g_prefill_probe[2 * kProbeCtas][kProbeFields];
// Per CTA, the producer's thread 0: cycles in all, working items out (make_tile), waiting for the
// consumers' release of Q, issuing Q, waiting for free K stages, waiting for free V stages. (The
// probe build spills a few producer registers at D 64 / 128: its producer times run a bit slow.)
constexpr int kProdFields = 6;
__device__ long long g_prefill_probe_prod[kProbeCtas][kProdFields];
#else
#define DMS_PP(...)
#endif

template <int D> constexpr int stages() { return D <= 64 ? 3 : 2; }  // D 256: 64-key tiles, 2
// K stages: the V stage count, or (D 128, DMS_PREFILL_V2_KSTAGES unset / not 2) one more: K(j)
// is needed a tile before V(j), and the gathered kept list is latency-bound (~197 KB smem).
template <int D> constexpr int k_stages_deep() { return D == 128 ? 3 : stages<D>(); }

// Dynamic shared memory, from a 1024-byte aligned base (the swizzle works on address bits).
template <int D, int KS>
struct SmemLayout {
  static constexpr int kBlockN = block_n<D>();
  static constexpr int kS = KS;              // K stages (meta / full flags go with K)
  static constexpr int kSV = stages<D>();    // V stages
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kBlockM * D * 2;
  static constexpr int kV = kK + kS * kBlockN * D * 2;
  static constexpr int kMeta = kV + kSV * kBlockN * D * 2;         // int2 [kS][kBlockN]
  static constexpr int kFull = kMeta + kS * kBlockN * 8;            // int [kS][4]
  static constexpr int kBars = kFull + kS * 16;                     // uint64 [2 + 2 kS + 2 kSV]
  static constexpr int kCtx = kBars + (2 + 2 * kS + 2 * kSV) * 8;   // TileCtx [2] (consumers)
  static constexpr int kCtxP = kCtx + 2 * (int)sizeof(TileCtx);      // TileCtx [2] (producer)
  static constexpr int kBytes = kCtxP + 2 * (int)sizeof(TileCtx) + 1024; // + alignment slack
};

// F8: the pool is fp8 e4m3 (q / k / v / out are T). dequant_pools has converted the call's
// cached blocks exactly to T (ws.kpre / ws.vpre, the stored values), so the producer gathers the
// cached tiles (tiles < end_flagged) from there as from a T pool; the consumers fold k_scale
// into those tiles' score scale and multiply the output accumulated over them by v_scale at the
// first chunk tile (the cached tiles come first), or at the end when every tile is cached.
template <typename T, int D, int KS, bool F8 = false>
__global__ void __launch_bounds__(kThreads, 1)
    prefill_v2_kernel(const SparsePrefillParams p, const PrefillWs ws, const int num_slots,
                      const int pingpong, const int debug, const int tma,
                      const __grid_constant__ CUtensorMap tm_k,
                      const __grid_constant__ CUtensorMap tm_v,
                      const __grid_constant__ CUtensorMap tm_ck,
                      const __grid_constant__ CUtensorMap tm_cv,
                      const __grid_constant__ CUtensorMap tm_kc,
                      const __grid_constant__ CUtensorMap tm_vc, const int cbox) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = SmemLayout<D, KS>;
  constexpr int kS = L::kS, kSV = L::kSV;
  constexpr int kBlockN = L::kBlockN;
  constexpr int kKeyParts = 128 / kBlockN;   // producer threads per key
  constexpr int kChunks = D / 8;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t raw = dev::smem_u32(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  unsigned char* const sbase = smem_raw + (base - raw);
  TileCtx* const ctxs = reinterpret_cast<TileCtx*>(sbase + L::kCtx);  // [2]: by item parity
  TileCtx* const ctxp = reinterpret_cast<TileCtx*>(sbase + L::kCtxP);
  const uint32_t sQ = base + L::kQ;
  auto sK = [&](int s) { return base + L::kK + (uint32_t)s * (kBlockN * D * 2); };
  auto sV = [&](int s) { return base + L::kV + (uint32_t)s * (kBlockN * D * 2); };
  int2* const meta = reinterpret_cast<int2*>(sbase + L::kMeta);
  int* const fullf = reinterpret_cast<int*>(sbase + L::kFull);
  const uint32_t bars = base + L::kBars;
  const uint32_t q_full = bars, q_empty = bars + 8u;
  auto k_full = [&](int s) { return bars + 8u * (2 + s); };
  auto k_empty = [&](int s) { return bars + 8u * (2 + kS + s); };
  auto v_full = [&](int s) { return bars + 8u * (2 + 2 * kS + s); };
  auto v_empty = [&](int s) { return bars + 8u * (2 + 2 * kS + kSV + s); };

  const int tid = threadIdx.x;
  const int H = p.kv.num_kv_heads, Hq = p.num_q_heads, G = Hq / H;
  // The real body owns static shared memory, the empty one does not (prefill_v2_supported);
  // a volatile store keeps the compiler from dropping it.
  __shared__ int s_flag;
  if (tid == 0) {
    *reinterpret_cast<volatile int*>(&s_flag) = 1;
    mbar_init(q_full, 128);
    mbar_init(q_empty, 256);
#pragma unroll
    for (int s = 0; s < kS; ++s) {
      mbar_init(k_full(s), 128);
      mbar_init(k_empty(s), 256);
    }
#pragma unroll
    for (int s = 0; s < kSV; ++s) {
      mbar_init(v_full(s), 128);
      mbar_init(v_empty(s), 256);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  dev::pdl_wait();  // the chain's previous kernel (prepare / dequant / compact) has finished

  const int wg = tid / 128;
  const int t = tid % 128, warp = t / 32, lane = t % 32;
  const long long num_items = (long long)num_slots * H;

  if (wg == 0) {
    // ---------------------------------------------------------------- producer warpgroup
    // Work items w = blockIdx.x, + gridDim.x, ...: query tile slot num_slots - 1 - w / H (heavy
    // first), kv head w % H. Per valid item: wait until the consumers are done with Q, publish
    // the item's TileCtx, load Q, then the K / V tiles (stage / parity from a counter that runs
    // on across items). A TileCtx with ntiles 0 tells the consumers to stop.
    reg_dealloc<kProducerRegs>();
    DMS_PP(const bool pprobe = (debug & kDebugProbe) && t == 0;
           long long pp_make = 0, pp_qe = 0, pp_q = 0, pp_ke = 0, pp_ve = 0; const long long pp0 = clock64();)
    const T* q = static_cast<const T*>(p.q);
    // The cached rows in T: the pools themselves, or (F8) their dequantized copies.
    const T* kc = static_cast<const T*>(F8 ? ws.kpre : p.kv.k_cache);
    const T* vc = static_cast<const T*>(F8 ? ws.vpre : p.kv.v_cache);
    const T* kk = static_cast<const T*>(p.k);
    const T* vv = static_cast<const T*>(p.v);
    int item = 0, it = 0, cand = 0;
    // Snake order over rounds of gridDim.x items (forward, backward, ...): with items sorted
    // heavy first, every CTA of a persistent grid gets about the same work.
    for (long long round = 0; round * gridDim.x < num_items; ++round) {
      const long long w = round * gridDim.x +
                          ((round & 1) ? gridDim.x - 1 - blockIdx.x : blockIdx.x);
      if (w >= num_items) continue;
      const int g = (int)(w % H);
      // Thread 0 works the item out into the producer's own slot (by candidate parity: the
      // other threads may still read the previous candidate's, never an older one: all passed
      // its barrier); the rest read it from there (in registers across the loop it would not
      // fit the producer's 56).
      TileCtx& x = ctxp[cand++ & 1];
      if (t == 0) {
        DMS_PP(const long long c0 = clock64();)
        if (make_tile<kBlockM, kBlockN>(p, ws, num_slots - 1 - w / H, g, x, tma != 0)) x.g = g;
        else x.ntiles = -1;
        DMS_PP(if (pprobe) pp_make += clock64() - c0;)
      }
      named_sync(5, 128);
      if (x.ntiles < 0) continue;
      DMS_PP(long long pc0 = clock64();)
      mbar_wait(q_empty, ((uint32_t)item & 1u) ^ 1u);
      DMS_PP(if (pprobe) { const long long c = clock64(); pp_qe += c - pc0; pc0 = c; })
      if (t == 0) ctxs[item & 1] = x;
      // Q rows: row = token * G + head; rows past the chunk are zero-filled and never stored.
      // This thread copies chunk c16 of rows row0, row0 + kQStep, ...: their (token, head) =
      // (i, hh) come from one division and then step by (kQStep / G, kQStep % G) with a carry
      // (a division per row cost ~77 instructions, 16 rows per item at D 128, on the SM's
      // MUFU pipe the consumers' exponentials use: the probe measured 4.3 us per item waiting
      // for Q, prefill_probe_2026-12-01.md).
      {
        constexpr int kQStep = 128 / kChunks;
        const int row0 = t / kChunks, c16 = t % kChunks;
        const long long R0 = x.r0 + row0;
        const int i0 = (int)(R0 / G);
        int hh = (int)(R0 - (long long)i0 * G);
        const int dh = kQStep % G;
        // q row (token start + i, head g G + hh); a step moves it by (kQStep / G) tokens and dh
        // heads, a carry by one more token and G heads back.
        const T* gp = q + ((long long)(x.start + i0) * Hq + (long long)g * G + hh) * D + c16 * 8;
        const long long step = ((long long)(kQStep / G) * Hq + dh) * D, carry = (long long)(Hq - G) * D;
        const long long left = x.rows_total - x.r0;
        const int valid_rows = left < kBlockM ? (int)left : kBlockM;
#pragma unroll 4
        for (int i8 = 0; i8 < kBlockM * kChunks / 128; ++i8) {
          const int row = row0 + i8 * kQStep;
          const bool valid = row < valid_rows;
          dev::cp_async16(sQ + tile_off<kBlockM>(row, c16), valid ? gp : q, valid);
          gp += step;
          hh += dh;
          if (hh >= G) {
            hh -= G;
            gp += carry;
          }
        }
      }
      mbar_copies_arrive(q_full);
      DMS_PP(if (pprobe) pp_q += clock64() - pc0;)

      // K runs one tile ahead of V (FA3's order): K(j + 1) needs only the K stage of tile
      // j + 1 - kS, so it is in flight while the consumers still wait for V(j).
      // Band tiles (tma): the tile's keys are rows start + j0 + [0, kBlockN) of head g of the
      // chunk's k / v, one TMA box of [kBlockN][64] per 64 columns (tensor map: 128-byte
      // swizzle, the layout of tile_off); thread 0 arrives with the tile's bytes as the
      // barrier's transaction count and issues the boxes, the other 127 threads arrive plainly
      // (128 arrivals as on the cp.async path; their meta stores are released by the arrive).
      // Keys j >= i1 of the last band tile are loaded but masked (resolve_key: never visible);
      // rows past the tensor are zero-filled.
      // Kept tiles of a compacted chunk (x.kept_row >= 0) likewise, from ws.ck / cv (head-major
      // maps: coordinates (column, row, head)); keys past the list are masked (zero rows).
      auto tma_tile = [&](uint32_t dst, const CUtensorMap* tm, uint32_t bar, int tile) {
        if (t == 0) {
          mbar_arrive_expect_tx(bar, (uint32_t)(kBlockN * D * 2));
          // Order this stage's earlier reads / cp.async writes (generic proxy, completed: the
          // consumers released the stage after them) before the async-proxy writes.
          fence_proxy_async();
          const bool band = tile >= x.end_kept;
          const int row = band ? x.start + x.band_start + (tile - x.end_kept) * kBlockN
                               : x.kept_row + (tile - x.end_flagged) * kBlockN;
#pragma unroll
          for (int cb = 0; cb < D / 64; ++cb) {
            if (band) tma_load_3d(dst + (uint32_t)cb * (kBlockN * 128), tm, bar, cb * 64, g, row);
            else tma_load_3d(dst + (uint32_t)cb * (kBlockN * 128), tm, bar, cb * 64, row, g);
          }
        } else {
          mbar_arrive(bar);
        }
      };
      auto by_tma = [&](int tile) { return tma && (tile >= x.end_kept || (tile >= x.end_flagged && x.kept_row >= 0)); };
      // Cached tiles (cbox > 0: TMA maps over the cached rows, kc / vc): a warp whose 32 keys all
      // have a cached row (none past seq_len or in a block outside the pool) loads them as boxes
      // of cbox rows (cbox divides 32 and the block size, so a box lies in one block: consecutive rows),
      // lane 0 adding their bytes to the stage's transaction count before its arrival; the other
      // warps gather. Masked keys there (flagged ring slots) are held rows: finite.
      auto cached_by_tma = [&](int tile, int mrow) {
        return cbox > 0 && tile < x.end_cached && __all_sync(0xffffffffu, mrow >= 0);
      };
      auto cached_tma = [&](uint32_t dst, const CUtensorMap* tm, uint32_t bar, int mrow) {
        if (lane == 0 && warp < kBlockN / 32) {
          mbar_expect_tx(bar, (uint32_t)(32 * D * 2));
          fence_proxy_async();
        }
        const uint32_t d0 = dst + (uint32_t)(warp % (kBlockN / 32)) * 32u * 128u;
        // kKeyParts 2 (D 256, 64 keys): warps 2 and 3 hold the keys of warps 0 and 1 (the same
        // rows, so the same __all_sync verdict): they only arrive.
        for (int i = 0; i < (warp < kBlockN / 32 ? 32 : 0); i += cbox) {
          const int row = __shfl_sync(0xffffffffu, mrow, i);
          if (lane == 0) {
#pragma unroll
            for (int cb = 0; cb < D / 64; ++cb)
              tma_load_3d(d0 + (uint32_t)cb * (kBlockN * 128) + (uint32_t)i * 128u, tm, bar, cb * 64, row, 0);
          }
        }
        mbar_arrive(bar);
      };
      auto load_k = [&](int tile) -> int {
        const int s = (it + tile) % kS;
        int mrow, ma, mb;
        resolve_key<kBlockN>(p, ws, x, g, tile, t % kBlockN, mrow, ma, mb);
        const bool vis = mrow >= 0 && ma <= x.i0 && mb >= x.i1 - 1;
        const bool all_vis = __all_sync(0xffffffffu, vis);
        DMS_PP(const long long kc0 = pprobe ? clock64() : 0;)
        mbar_wait(k_empty(s), ((uint32_t)((it + tile) / kS) & 1u) ^ 1u);
        DMS_PP(if (pprobe) pp_ke += clock64() - kc0;)
        if (t < kBlockN) meta[s * kBlockN + t] = make_int2(ma, mb);
        if (lane == 0) fullf[s * 4 + warp] = all_vis ? 1 : 0;
        if (by_tma(tile)) {
          tma_tile(sK(s), tile >= x.end_kept ? &tm_k : &tm_ck, k_full(s), tile);
        } else if (cached_by_tma(tile, mrow)) {
          cached_tma(sK(s), &tm_kc, k_full(s), mrow);
        } else {
          copy_rows<T, D, kBlockN, kKeyParts>(sK(s), tile < x.end_flagged ? kc : kk, mrow, warp, lane);
          mbar_copies_arrive(k_full(s));
        }
        return mrow;
      };
      auto load_v = [&](int tile, int mrow) {
        const int s = (it + tile) % kSV;
        DMS_PP(const long long vc0 = pprobe ? clock64() : 0;)
        mbar_wait(v_empty(s), ((uint32_t)((it + tile) / kSV) & 1u) ^ 1u);
        DMS_PP(if (pprobe) pp_ve += clock64() - vc0;)
        if (by_tma(tile)) {
          tma_tile(sV(s), tile >= x.end_kept ? &tm_v : &tm_cv, v_full(s), tile);
        } else if (cached_by_tma(tile, mrow)) {
          cached_tma(sV(s), &tm_vc, v_full(s), mrow);
        } else {
          copy_rows<T, D, kBlockN, kKeyParts>(sV(s), tile < x.end_flagged ? vc : vv, mrow, warp, lane);
          mbar_copies_arrive(v_full(s));
        }
      };
      int mrow_v = load_k(0);
      for (int tile = 0; tile < x.ntiles; ++tile) {
        const int mrow_next = tile + 1 < x.ntiles ? load_k(tile + 1) : -1;
        load_v(tile, mrow_v);
        mrow_v = mrow_next;
      }
      it += x.ntiles;
      ++item;
    }
    mbar_wait(q_empty, ((uint32_t)item & 1u) ^ 1u);
    if (t == 0) ctxs[item & 1].ntiles = 0;
    mbar_arrive(q_full);
    DMS_PP(if (pprobe && blockIdx.x < kProbeCtas) {
      long long* r = g_prefill_probe_prod[blockIdx.x];
      r[0] = clock64() - pp0; r[1] = pp_make; r[2] = pp_qe; r[3] = pp_q; r[4] = pp_ke; r[5] = pp_ve;
    })
    // Keep the CTA alive until the copies have landed (the consumers wait on them anyway).
    asm volatile("cp.async.wait_all;\n" ::: "memory");
    return;
  }

  // ------------------------------------------------------------------ consumer warpgroups
  reg_alloc<kConsumerRegs>();
  const int cw = wg - 1;
  const float sl2 = p.scale * dev::kLog2e;
  const float sl2_cached = F8 ? sl2 * p.kv.k_scale : sl2;  // F8: cached tiles hold K / k_scale
  const bool pos_scale = sl2 > 0.f;                        // (k_scale > 0: the same sign)
  // Descriptors: Q rows cw * 64 .. of the Q tile (K-major), K / V stage tiles.
  const uint64_t q_desc = make_desc(sQ + cw * 64 * 128, 16, 1024);
  float o[D / 2];
  float s[kBlockN / 2];
  uint32_t pf[kBlockN / 16][4];
  OnlineSoftmax<kBlockN> sm;

  auto gemm_s = [&](int st) {
    const uint64_t k_desc = make_desc(sK(st), 16, 1024);
    fence_regs(s);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      const uint32_t qo = (uint32_t)((ks >> 2) * kBlockM * 128 + (ks & 3) * 32) >> 4;
      const uint32_t ko = (uint32_t)((ks >> 2) * kBlockN * 128 + (ks & 3) * 32) >> 4;
      wgmma_ss<T, kBlockN>(q_desc + qo, k_desc + ko, s, ks > 0);
    }
    wgmma_commit();
    if (debug & kDebugSerial) wgmma_wait<0>();
    fence_regs(s);
  };
  auto gemm_pv = [&](int st) {
    const uint64_t v_desc = make_desc(sV(st), kBlockN * 128, 1024);
    fence_regs(o);
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) fence_regs(pf[kk]);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk)
      wgmma_rs<T, D>(pf[kk], v_desc + (uint64_t)((kk * 16 * 128) >> 4), o);
    wgmma_commit();
    if (debug & kDebugSerial) wgmma_wait<0>();
    fence_regs(o);
  };
  auto pack_p = [&]() {
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk)
#pragma unroll
      for (int e = 0; e < 4; ++e) pf[kk][e] = dev::pack2<T>(s[8 * kk + 2 * e], s[8 * kk + 2 * e + 1]);
  };
  auto rescale_o = [&](const float (&alpha)[2]) {
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] *= alpha[(i >> 1) & 1];
  };
  auto is_full = [&](int st) {
    const int4 f = *reinterpret_cast<const int4*>(fullf + st * 4);
    return (f.x & f.y & f.z & f.w) != 0 && !(debug & kDebugAlwaysMask);
  };
  auto meta_of = [&](int st) { return reinterpret_cast<const int4*>(meta + st * kBlockN); };

  // Ping-pong (FA3's warp scheduler barrier): the two consumer warpgroups take turns issuing
  // their GEMMs of a step, so one's softmax runs while the other's GEMMs hold the tensor cores.
  // Named barrier 3 + cw gates warpgroup cw (256 = its 128 syncing + the other's 128 arriving).
  // Per item, warpgroup 0 gets the first turn and warpgroup 1 skips its last hand-over, so the
  // arrivals balance within every item.
  auto turn_wait = [&]() { if (pingpong) named_sync(3 + cw, 256); };
  auto turn_pass = [&](bool last) {
    if (pingpong && !(last && cw == 1)) named_arrive(3 + (cw ^ 1), 256);
  };

  T* const out = static_cast<T*>(p.out);
  DMS_PP(const bool probe = (debug & kDebugProbe) && warp == 0 && lane == 0;
         long long pc = 0, pq = 0, pfirst = 0, ploop = 0, pwait = 0, plast = 0, pepi = 0, ptiles = 0, pitems = 0;
         long long pstart = clock64(); unsigned long long gt0;
         asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(gt0));
         auto ptick = [&](long long& acc) { if (probe) { const long long c = clock64(); acc += c - pc; pc = c; } };)
  for (int item = 0, it = 0;; ++item) {
    DMS_PP(if (probe) pc = clock64();)
    mbar_wait(q_full, (uint32_t)item & 1u);
    DMS_PP(ptick(pq);)
    const TileCtx* const ctx = ctxs + (item & 1);
    const int ntiles = ctx->ntiles;
    if (ntiles == 0) break;
    const long long r0 = ctx->r0, rows_total = ctx->rows_total;
    const int o_start = ctx->start, g = ctx->g;
    const int ef = F8 ? ctx->end_flagged : 0;  // F8: tiles [0, ef) come from the fp8 pool
    // This thread's rows R and R + 8: token qi (-1 past the chunk) and head qh, one division.
    int qi[2], qh[2];
    {
      const long long R = r0 + cw * 64 + warp * 16 + (lane >> 2);
      qi[0] = (int)(R / G);
      qh[0] = (int)(R - (long long)qi[0] * G);
      qi[1] = qi[0] + 8 / G;
      qh[1] = qh[0] + 8 % G;
      if (qh[1] >= G) {
        qh[1] -= G;
        ++qi[1];
      }
#pragma unroll
      for (int rs = 0; rs < 2; ++rs)
        if (R + rs * 8 >= rows_total) qi[rs] = -1;
    }
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
    sm.init();
    if (pingpong && cw == 1) named_arrive(3, 256);

    // Tile 0: S_0 and its softmax, nothing to overlap with yet.
    {
      const int st = it % kS;
      mbar_wait(k_full(st), (uint32_t)(it / kS) & 1u);
      fence_proxy_async();
      turn_wait();
      gemm_s(st);
      turn_pass(ntiles == 1);
      wgmma_wait<0>();
      fence_regs(s);
      if (ntiles == 1) mbar_arrive(q_empty);  // the last read of Q is done
      float alpha[2];
      const float sc = 0 < ef ? sl2_cached : sl2;
      if (pos_scale) sm.template step<true>(s, is_full(st), meta_of(st), qi, sc, lane, alpha);
      else sm.template step<false>(s, is_full(st), meta_of(st), qi, sc, lane, alpha);
      mbar_arrive(k_empty(st));
      pack_p();
    }
    DMS_PP(ptick(pfirst); ptiles += ntiles; ++pitems;)
#pragma unroll 1
    for (int j = 1; j < ntiles; ++j) {
      const int st = (it + j) % kS, sp = (it + j - 1) % kSV;
      DMS_PP(const long long pw0 = probe ? clock64() : 0;)
      mbar_wait(k_full(st), (uint32_t)((it + j) / kS) & 1u);
      mbar_wait(v_full(sp), (uint32_t)((it + j - 1) / kSV) & 1u);
      DMS_PP(if (probe) pwait += clock64() - pw0;)
      fence_proxy_async();
      turn_wait();
      gemm_s(st);
      gemm_pv(sp);
      turn_pass(j == ntiles - 1);
      wgmma_wait<1>();
      fence_regs(s);
      if (j == ntiles - 1) mbar_arrive(q_empty);
      float alpha[2];
      const float sc = j < ef ? sl2_cached : sl2;
      if (pos_scale) sm.template step<true>(s, is_full(st), meta_of(st), qi, sc, lane, alpha);
      else sm.template step<false>(s, is_full(st), meta_of(st), qi, sc, lane, alpha);
      if (F8 && j == ef) {  // o holds exactly the cached tiles' P V (stored V): times v_scale
        alpha[0] *= p.kv.v_scale;
        alpha[1] *= p.kv.v_scale;
      }
      mbar_arrive(k_empty(st));
      wgmma_wait<0>();
      fence_regs(o);
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) fence_regs(pf[kk]);
      mbar_arrive(v_empty(sp));
      pack_p();
      rescale_o(alpha);
    }
    DMS_PP(ptick(ploop);)
    {
      const int sp = (it + ntiles - 1) % kSV;
      mbar_wait(v_full(sp), (uint32_t)((it + ntiles - 1) / kSV) & 1u);
      fence_proxy_async();
      gemm_pv(sp);
      wgmma_wait<0>();
      fence_regs(o);
      mbar_arrive(v_empty(sp));
    }
    DMS_PP(ptick(plast);)
    it += ntiles;

    // Epilogue: O / l straight from the accumulators (the Q tile may already hold the next
    // item's Q): per 8-column block, 4 lanes write 16 contiguous bytes of a row.
    float inv[2];
    sm.finish(inv);
    if (F8 && ef >= ntiles) {  // every tile was cached: v_scale not applied yet
      inv[0] *= p.kv.v_scale;
      inv[1] *= p.kv.v_scale;
    }
    // Lane q of a quad holds columns 8c + 2q, 8c + 2q + 1 of every 8-column block c. Lanes q and
    // q ^ 1 swap one pair per two blocks, so that each holds 4 consecutive columns: the even
    // lane 8c + 2q .. + 3 of block c, the odd one 8(c + 1) + 2(q - 1) .. + 3 of block c + 1; one
    // 8-byte store each, half the store instructions of 4-byte ones (the probe measured 1.3 us
    // per item in this epilogue, prefill_probe_2026-12-01.md). Every lane takes part in the
    // shuffles; rows past the chunk store nothing (both lanes of a pair hold the same row).
    // (D 256 keeps 4-byte stores: the shuffled form made ptxas spill more of its 128-register O.)
    const bool odd = (lane & 1) != 0;
#pragma unroll
    for (int rs = 0; rs < 2; ++rs) {
      const long long R = r0 + cw * 64 + warp * 16 + (lane >> 2) + rs * 8;
      const bool row_ok = R < rows_total;
      if constexpr (D > 128) {
        if (row_ok) {
          T* const orow = out + ((long long)(o_start + qi[rs]) * Hq + (long long)g * G + qh[rs]) * D + (lane & 3) * 2;
#pragma unroll
          for (int c = 0; c < D / 8; ++c)
            *reinterpret_cast<uint32_t*>(orow + c * 8) =
                dev::pack2<T>(o[4 * c + 2 * rs] * inv[rs], o[4 * c + 2 * rs + 1] * inv[rs]);
        }
        continue;
      }
      T* const orow = out + (row_ok ? ((long long)(o_start + qi[rs]) * Hq + (long long)g * G + qh[rs]) * D : 0);
#pragma unroll
      for (int c = 0; c < D / 8; c += 2) {
        const uint32_t v0 = dev::pack2<T>(o[4 * c + 2 * rs] * inv[rs], o[4 * c + 2 * rs + 1] * inv[rs]);
        const uint32_t v1 = dev::pack2<T>(o[4 * c + 4 + 2 * rs] * inv[rs], o[4 * c + 4 + 2 * rs + 1] * inv[rs]);
        const uint32_t recv = __shfl_xor_sync(0xffffffffu, odd ? v0 : v1, 1);
        const int col = odd ? 8 * c + 8 + 2 * ((lane & 3) - 1) : 8 * c + 2 * (lane & 3);
        if (row_ok) *reinterpret_cast<uint2*>(orow + col) = odd ? make_uint2(recv, v1) : make_uint2(v0, recv);
      }
    }
    DMS_PP(ptick(pepi);)
  }
  DMS_PP(if (probe && blockIdx.x < kProbeCtas) {
    unsigned long long gt1;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(gt1));
    long long* r = g_prefill_probe[blockIdx.x * 2 + cw];
    r[0] = (long long)(gt1 - gt0); r[1] = clock64() - pstart; r[2] = ptiles; r[3] = pq; r[4] = pfirst;
    r[5] = ploop; r[6] = pwait; r[7] = plast; r[8] = pepi; r[9] = pitems;
  })
#endif
}

// An A/B knob (read once per process by its caller): the environment variable `name` is set to
// exactly `value`.
bool env_is(const char* name, const char* value) {
  const char* e = std::getenv(name);
  return e && std::strcmp(e, value) == 0;
}

int debug_bits() {
  static const int bits = [] {
    const char* e = std::getenv("DMS_PREFILL_V2_DEBUG");
    return e ? std::atoi(e) : 0;
  }();
  return bits;
}

// The A/B knobs (docs/ops.md), each read once per process: on unless its environment variable
// is set to `off`.
enum class Knob { kV2, kPersistent, kPingpong, kTma, kKDeep, kCached, kKept };
template <Knob K> bool knob_on(const char* name, const char* off = "0") {
  static const bool on = !env_is(name, off);
  return on;
}
bool v2_enabled() { return knob_on<Knob::kV2>("DMS_PREFILL_V2"); }
bool persistent_enabled() { return knob_on<Knob::kPersistent>("DMS_PREFILL_V2_PERSISTENT"); }
bool pingpong_enabled() { return knob_on<Knob::kPingpong>("DMS_PREFILL_V2_PINGPONG"); }
bool tma_enabled() { return knob_on<Knob::kTma>("DMS_PREFILL_V2_TMA"); }
// DMS_PREFILL_V2_KSTAGES=2: 2 K stages at head_dim 128.
bool k_deep_enabled() { return knob_on<Knob::kKDeep>("DMS_PREFILL_V2_KSTAGES", "2"); }
// DMS_PREFILL_V2_CACHED=0: the cached tiles are gathered with cp.async (no TMA boxes).
bool cached_tma_enabled() { return knob_on<Knob::kCached>("DMS_PREFILL_V2_CACHED"); }
// DMS_PREFILL_V2_KEPT=0: the kept tiles are gathered with cp.async (no compacted copy).
bool kept_keys_enabled() { return knob_on<Knob::kKept>("DMS_PREFILL_V2_KEPT"); }

// cuTensorMapEncodeTiled through the runtime's driver entry point (no -lcuda); null when the
// driver does not have it (then the band is gathered with cp.async like the other segments).
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                   const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                   const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                   CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
EncodeTiledFn encode_tiled() {
  static const EncodeTiledFn fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
#if CUDART_VERSION >= 12050
    const cudaError_t e =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q);
#else
    const cudaError_t e = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &f, cudaEnableDefault, &q);
#endif
    if (e != cudaSuccess || q != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      return static_cast<EncodeTiledFn>(nullptr);
    }
    return reinterpret_cast<EncodeTiledFn>(f);
  }();
  return fn;
}

// Tensor map of the chunk's k or v, [T][Hkv][D] row-major, as the 3-D tensor (D, Hkv, T);
// box (64, 1, kBlockN): 64 columns (128 bytes, the swizzle span) of kBlockN keys of one head,
// 128-byte swizzle (= tile_off's layout per 64-column block). Rows past T are zero-filled.
// head_major: the compacted kept keys instead, [Hkv][T][D] (T = their rows) as (D, T, Hkv), box
// (64, kBlockN, 1): the same shared-memory tile.
template <typename T, int D>
bool make_kv_map(CUtensorMap* m, const void* ptr, int H, long long total_tokens, int block_n, bool head_major = false) {
  const EncodeTiledFn fn = encode_tiled();
  if (!fn || !ptr || (reinterpret_cast<uintptr_t>(ptr) & 15u) || total_tokens <= 0 || H <= 0)
    return false;
  const cuuint64_t rows = (cuuint64_t)total_tokens;
  const cuuint64_t dims[3] = {(cuuint64_t)D, head_major ? rows : (cuuint64_t)H, head_major ? (cuuint64_t)H : rows};
  const cuuint64_t strides[2] = {(cuuint64_t)D * sizeof(T),
                                 head_major ? rows * D * sizeof(T) : (cuuint64_t)H * D * sizeof(T)};
  const cuuint32_t box[3] = {64u, head_major ? (cuuint32_t)block_n : 1u, head_major ? 1u : (cuuint32_t)block_n};
  const cuuint32_t estr[3] = {1u, 1u, 1u};
  const CUtensorMapDataType dt = std::is_same<T, __half>::value ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                                                : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  return fn(m, dt, 3, const_cast<void*>(ptr), dims, strides, box, estr,
            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// The kept chunk keys of compacted chunks (kept_compacted) into ws.ck / cv (PrefillWs), with
// kKeptPad zero rows after each list. Grid (num_seqs * Hkv, y): CTA (cg, y) moves 16-byte
// pieces y * 256 + tid, + 256 * gridDim.y, ... of its (chunk, head)'s rows; a row's pieces are
// consecutive threads (coalesced).
template <typename T, int D>
__global__ void __launch_bounds__(256) compact_kept_kernel(const SparsePrefillParams p, const PrefillWs ws,
                                                            const long long rows) {
  dev::pdl_launch_dependents();  // the chain's next kernel may launch (it waits for this one)
  dev::pdl_wait();               // prepare_kernel's counts / lists are written
  const int H = p.kv.num_kv_heads;
  const int c = blockIdx.x / H, g = blockIdx.x % H;
  const int start = p.cu_seqlens[c], end = p.cu_seqlens[c + 1], r = p.rows[c];
  // A malformed chunk (prepare_kernel left its counts unset): make_tile skips it too.
  if (start < 0 || end < start || end > p.total_tokens || r < 0 || r >= p.state.max_seqs) return;
  const int L = end - start;
  const int K = kept_before(ws, g, start, c, L);
  if (!kept_compacted(K, L)) return;
  constexpr int kPieces = D / 8;  // 16-byte pieces of a row
  const int32_t* idx = ws.idx + (long long)g * p.total_tokens + start;
  const long long dst0 = ((long long)g * rows + start + (long long)kKeptPad * c) * D;
  const uint4* k = static_cast<const uint4*>(p.k);
  const uint4* v = static_cast<const uint4*>(p.v);
  uint4* ck = static_cast<uint4*>(ws.ck) + dst0 / 8;
  uint4* cv = static_cast<uint4*>(ws.cv) + dst0 / 8;
  const long long n = (long long)(K + kKeptPad) * kPieces;
  for (long long i = (long long)blockIdx.y * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.y * blockDim.x) {
    const int m = (int)(i / kPieces), pc = (int)(i % kPieces);
    uint4 xk = make_uint4(0u, 0u, 0u, 0u), xv = xk;
    if (m < K) {
      const long long src = ((long long)(start + idx[m]) * H + g) * kPieces + pc;
      xk = k[src];
      xv = v[src];
    }
    ck[i] = xk;
    cv[i] = xv;
  }
}

template <typename T, int D>
Status compact_kept(const SparsePrefillParams& p, const PrefillWs& ws, long long rows, cudaStream_t stream) {
  const long long x = (long long)p.num_seqs * p.kv.num_kv_heads;
  if (x > INT_MAX) return Status::kUnsupported;
  // About 4 pieces per thread for an average chunk, at most 64 CTAs along one (chunk, head).
  const long long per = ((long long)p.total_tokens / std::max(p.num_seqs, 1) + kKeptPad) * (D / 8);
  const int y = (int)std::min<long long>(64, std::max<long long>(1, (per + 1023) / 1024));
  DMS_CUDA_CHECK(dev::launch_pdl(compact_kept_kernel<T, D>, dim3((unsigned)x, (unsigned)y), dim3(256), 0, stream,
                                 p, ws, rows));
  return Status::kSuccess;
}

template <typename T, int D, int KS, bool F8 = false>
Status launch(const SparsePrefillParams& p, const PrefillWs& ws, cudaStream_t stream) {
  using L = SmemLayout<D, KS>;
  constexpr int bytes = L::kBytes;
  static_assert(bytes + 1024 <= 227 * 1024, "shared memory (dynamic + the static flag's 1 KB)");
  DMS_CUDA_CHECK(cudaFuncSetAttribute(prefill_v2_kernel<T, D, KS, F8>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  const int G = p.num_q_heads / p.kv.num_kv_heads;
  const long long slots = (long long)p.total_tokens * G / kBlockM + p.num_seqs;
  const long long items = slots * p.kv.num_kv_heads;
  if (items > INT_MAX) return Status::kUnsupported;
  // Persistent: one CTA per SM (the shared memory allows no second) walking the items;
  // otherwise one CTA per item.
  long long grid = items;
  if (persistent_enabled()) {
    int dev = 0, sms = 0;
    DMS_CUDA_CHECK(cudaGetDevice(&dev));
    DMS_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    grid = std::min<long long>(items, std::max(sms, 1));
  }
  // TMA for the band (and merged kept list): both maps or neither; otherwise cp.async.
  CUtensorMap tm_k{}, tm_v{}, tm_ck{}, tm_cv{};  // zero: unused where the maps are not made
  const bool tma = tma_enabled() &&
                   make_kv_map<T, D>(&tm_k, p.k, p.kv.num_kv_heads, p.total_tokens, L::kBlockN) &&
                   make_kv_map<T, D>(&tm_v, p.v, p.kv.num_kv_heads, p.total_tokens, L::kBlockN);
  // The compacted kept keys (TMA for the kept tiles of compacted chunks): with the band's maps
  // only; without them (ws.ck null) make_tile leaves every kept tile to the gather.
  PrefillWs w = ws;
  const long long rows_k = kept_rows(p);
  if (!tma || !kept_keys_enabled() || rows_k >= INT_MAX ||  // (TMA coordinates are int32)
      !make_kv_map<T, D>(&tm_ck, ws.ck, p.kv.num_kv_heads, rows_k, L::kBlockN, true) ||
      !make_kv_map<T, D>(&tm_cv, ws.cv, p.kv.num_kv_heads, rows_k, L::kBlockN, true))
    w.ck = w.cv = nullptr;
  if (w.ck) {
    const Status st = compact_kept<T, D>(p, w, rows_k, stream);
    if (st != Status::kSuccess) return st;
  }
  // The cached rows (the pools, or F8 their dequantized copies) as (D, rows, 1), boxes of cbox
  // rows: block sizes that are multiples of 8 (a box then starts on a 1024-byte boundary of the
  // 128-byte swizzle), cbox = gcd(block size, 32): it divides a warp's 32 keys and the block, so
  // a box's keys (slot a multiple of cbox) lie in one block.
  CUtensorMap tm_kc{}, tm_vc{};
  const int bs = p.kv.block_size;
  int cbox = 0;
  if (tma && cached_tma_enabled() && bs >= 8 && bs % 8 == 0) {
    const long long rows = F8 ? (long long)(pre_pool_bytes(p) / ((size_t)D * 2)) : (long long)p.kv.num_blocks * bs;
    const void* kc = F8 ? ws.kpre : p.kv.k_cache;
    const void* vc = F8 ? ws.vpre : p.kv.v_cache;
    const int box = bs % 32 == 0 ? 32 : (bs % 16 == 0 ? 16 : 8);  // gcd(bs, 32)
    if (rows > 0 && rows < INT_MAX && make_kv_map<T, D>(&tm_kc, kc, 1, rows, box, true) &&
        make_kv_map<T, D>(&tm_vc, vc, 1, rows, box, true))
      cbox = box;
  }
  // Launched programmatically after the chain's previous kernel: its CTAs set up their barriers
  // while that kernel's last CTAs run, then wait for it (pdl_wait).
  DMS_CUDA_CHECK(dev::launch_pdl(prefill_v2_kernel<T, D, KS, F8>, dim3((unsigned)grid), dim3(kThreads), bytes, stream,
                                 p, w, (int)slots, pingpong_enabled() ? 1 : 0, debug_bits(), tma ? 1 : 0, tm_k, tm_v,
                                 tm_ck, tm_cv, tm_kc, tm_vc, cbox));
  DMS_PP(if (debug_bits() & kDebugProbe) {
    static long long host[2 * kProbeCtas][kProbeFields];
    DMS_CUDA_CHECK(cudaStreamSynchronize(stream));
    DMS_CUDA_CHECK(cudaMemcpyFromSymbol(host, g_prefill_probe, sizeof(host)));
    for (long long c = 0; c < std::min<long long>(grid, kProbeCtas) * 2; ++c) {
      const long long* r = host[c];
      std::printf("PPROBE cta %lld wg %lld ns %lld cyc %lld tiles %lld q %lld first %lld loop %lld wait %lld "
                  "last %lld epi %lld items %lld\n", c / 2, c % 2, r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9]);
    }
    static long long prod[kProbeCtas][kProdFields];
    DMS_CUDA_CHECK(cudaMemcpyFromSymbol(prod, g_prefill_probe_prod, sizeof(prod)));
    for (long long c = 0; c < std::min<long long>(grid, kProbeCtas); ++c)
      std::printf("PPROD cta %lld cyc %lld make %lld qe %lld q %lld ke %lld ve %lld\n", c, prod[c][0], prod[c][1],
                  prod[c][2], prod[c][3], prod[c][4], prod[c][5]);
    std::fflush(stdout);
  })
  return Status::kSuccess;
}

// fp8 pools: the blocks (row c of the call, head g) holds, block j < ceil(seq_lens / bs), from
// e4m3 to T (exact: e4m3 values are T values), at (c * Hkv + g) * max_blocks_per_head + j when
// compact, else at the same block id. Grid (num_seqs * Hkv, y):
// CTA (cg, y) takes blocks y, y + gridDim.y, ... of its head; 8 bytes per thread and step.
template <typename T>
__global__ void __launch_bounds__(256) dequant_pools_kernel(const SparsePrefillParams p, T* kpre, T* vpre,
                                                             bool compact) {
  dev::pdl_launch_dependents();  // the chain's next kernel may launch (it waits for this one)
  dev::pdl_wait();               // the previous kernel (prepare_kernel) has finished
  const int H = p.kv.num_kv_heads, bs = p.kv.block_size, D = p.kv.head_dim;
  const int c = blockIdx.x / H, g = blockIdx.x % H;
  const long long rg = (long long)p.rows[c] * H + g;
  const int len = p.state.pages.seq_lens[rg];
  const int nb = (len + bs - 1) / bs;
  const int32_t* bt = p.state.pages.block_table + rg * p.state.pages.max_blocks_per_head;
  const int per_block = bs * D / 8;  // uint2 chunks of 8 stored bytes
  const uint8_t* k8 = static_cast<const uint8_t*>(p.kv.k_cache);
  const uint8_t* v8 = static_cast<const uint8_t*>(p.kv.v_cache);
  const long long first = ((long long)c * H + g) * p.state.pages.max_blocks_per_head;  // compact
  for (int j = blockIdx.y; j < nb; j += gridDim.y) {
    // An id outside the pool: skipped, as the producer's cache_row reads such a slot as none
    // (never read or written here, whatever the table holds).
    const int blk = bt[j];
    if (blk < 0 || blk >= p.kv.num_blocks) continue;
    const long long base = (long long)blk * bs * D;  // element (= byte) offset of the block
    const long long dst = compact ? (first + j) * bs * D : base;
    for (int i = threadIdx.x; i < per_block; i += blockDim.x) {
      const long long e = base + (long long)i * 8, o = dst + (long long)i * 8;
      const uint2 xk = __ldg(reinterpret_cast<const uint2*>(k8 + e));
      const uint2 xv = __ldg(reinterpret_cast<const uint2*>(v8 + e));
      uint4 yk, yv;
      dev::e4m3x4_to<T>(xk.x, yk.x, yk.y);
      dev::e4m3x4_to<T>(xk.y, yk.z, yk.w);
      dev::e4m3x4_to<T>(xv.x, yv.x, yv.y);
      dev::e4m3x4_to<T>(xv.y, yv.z, yv.w);
      *reinterpret_cast<uint4*>(kpre + o) = yk;
      *reinterpret_cast<uint4*>(vpre + o) = yv;
    }
  }
}

template <typename T>
Status dequant_pools(const SparsePrefillParams& p, const PrefillWs& ws, cudaStream_t stream) {
  if (!ws.kpre || !ws.vpre) return Status::kInvalidArgument;
  // Up to 64 CTAs along a head: enough to spread a long head over the SMs, few empty ones.
  const int y = (int)std::min<long long>(64, std::max(1, p.state.pages.max_blocks_per_head));
  const long long x = (long long)p.num_seqs * p.kv.num_kv_heads;
  if (x > INT_MAX) return Status::kUnsupported;
  DMS_CUDA_CHECK(dev::launch_pdl(dequant_pools_kernel<T>, dim3((unsigned)x, (unsigned)y), dim3(256), 0, stream, p,
                                 static_cast<T*>(ws.kpre), static_cast<T*>(ws.vpre), ws.pre_compact));
  return Status::kSuccess;
}

}  // namespace

bool prefill_v2_supported(const SparsePrefillParams& p) {
  if (!v2_enabled()) return false;
  // bf16 / fp16, the pool of that dtype or fp8 e4m3.
  const DType act = compute_dtype(p.kv, p.act_dtype);
  if (act != DType::kBFloat16 && act != DType::kFloat16) return false;
  if (p.kv.dtype != act && !is_fp8(p.kv.dtype)) return false;
  // D 64 / 128 / 256 (64-key tiles at D 256), any of these pools.
  if (p.kv.head_dim != 64 && p.kv.head_dim != 128 && p.kv.head_dim != 256) return false;
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess)
    return false;
  if (major != 9 || minor != 0) return false;
  // A build for compute_90 without the "a" features compiles the kernel to an empty body (no
  // wgmma / setmaxnreg): that body declares no shared memory, the real one does.
  static const bool has_body = [] {
    cudaFuncAttributes a{};
    return cudaFuncGetAttributes(&a, prefill_v2_kernel<__nv_bfloat16, 128, stages<128>()>) == cudaSuccess &&
           a.sharedSizeBytes > 0;
  }();
  return has_body;
}

size_t kept_bytes(const SparsePrefillParams& p) {
  if (!prefill_v2_supported(p)) return 0;
  return (size_t)kept_rows(p) * p.kv.num_kv_heads * p.kv.head_dim * 2;  // T is 2 bytes
}

size_t pre_pool_bytes(const SparsePrefillParams& p) {
  if (!is_fp8(p.kv.dtype) || !prefill_v2_supported(p)) return 0;
  const long long blocks = pre_compact(p) ? (long long)p.num_seqs * p.kv.num_kv_heads * p.state.pages.max_blocks_per_head
                                          : p.kv.num_blocks;
  return (size_t)blocks * p.kv.block_size * p.kv.head_dim * 2;  // T is 2 bytes
}

Status sparse_prefill_v2(const SparsePrefillParams& p, const PrefillWs& ws, cudaStream_t stream) {
  const bool deep = k_deep_enabled();
  const DType act = compute_dtype(p.kv, p.act_dtype);
  if (is_fp8(p.kv.dtype)) {  // one stage count (3 K stages at D 128): no KSTAGES A/B variant
    const Status st = act == DType::kBFloat16 ? dequant_pools<__nv_bfloat16>(p, ws, stream)
                                              : dequant_pools<__half>(p, ws, stream);
    if (st != Status::kSuccess) return st;
    if (act == DType::kBFloat16) {
      if (p.kv.head_dim == 128) return launch<__nv_bfloat16, 128, k_stages_deep<128>(), true>(p, ws, stream);
      if (p.kv.head_dim == 64) return launch<__nv_bfloat16, 64, stages<64>(), true>(p, ws, stream);
      if (p.kv.head_dim == 256) return launch<__nv_bfloat16, 256, stages<256>(), true>(p, ws, stream);
    } else if (act == DType::kFloat16) {
      if (p.kv.head_dim == 128) return launch<__half, 128, k_stages_deep<128>(), true>(p, ws, stream);
      if (p.kv.head_dim == 64) return launch<__half, 64, stages<64>(), true>(p, ws, stream);
      if (p.kv.head_dim == 256) return launch<__half, 256, stages<256>(), true>(p, ws, stream);
    }
    return Status::kUnsupported;
  }
  if (p.kv.dtype == DType::kBFloat16) {
    if (p.kv.head_dim == 128)
      return deep ? launch<__nv_bfloat16, 128, k_stages_deep<128>()>(p, ws, stream)
                  : launch<__nv_bfloat16, 128, stages<128>()>(p, ws, stream);
    if (p.kv.head_dim == 64) return launch<__nv_bfloat16, 64, stages<64>()>(p, ws, stream);
    if (p.kv.head_dim == 256) return launch<__nv_bfloat16, 256, stages<256>()>(p, ws, stream);
  } else if (p.kv.dtype == DType::kFloat16) {
    if (p.kv.head_dim == 128)
      return deep ? launch<__half, 128, k_stages_deep<128>()>(p, ws, stream)
                  : launch<__half, 128, stages<128>()>(p, ws, stream);
    if (p.kv.head_dim == 64) return launch<__half, 64, stages<64>()>(p, ws, stream);
    if (p.kv.head_dim == 256) return launch<__half, 256, stages<256>()>(p, ws, stream);
  }
  return Status::kUnsupported;
}

}  // namespace sm90
}  // namespace dms
