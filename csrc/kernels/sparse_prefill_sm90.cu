// sparse_prefill v2: warp-specialized wgmma kernel for Hopper (sm_90a). Same op, same DMS rule
// and same key segments as sparse_prefill.cu (see prefill_sm90/scheduler.cuh); the launcher of
// sparse_prefill.cu dispatches here after its prepare_kernel (sm_90 device, bf16 / fp16, head_dim
// 64 / 128; DMS_PREFILL_V2=0 forces the old kernel).
//
// One CTA per (query tile of kBlockM = 128 rows, kv head), 3 warpgroups (384 threads):
//   WG0      producer: Q once, then per key tile resolves the 128 keys (source row + visibility
//            interval), gathers K and V rows with cp.async into the 128-byte-swizzled GMMA
//            layout, arrives on the stage's mbarrier (cp.async.mbarrier.arrive + arrive).
//            setmaxnreg 56 (56 * 128 + 224 * 256 = 168 * 384: the launch allocation).
//   WG1, WG2 consumers, 64 query rows each (the wgmma M). setmaxnreg 224. Per key tile j:
//              S_j = Q K_j^T        wgmma SS (m64 n128 k16, D / 16 steps), issued async
//              O  += P_{j-1} V_{j-1}  wgmma RS (P from registers, V MN-major), issued async
//              wait S_j; mask + online softmax of S_j while P_{j-1} V_{j-1} runs
//              wait P V; P_j = bf16(S_j); O *= alpha_j
//            (FA3's intra-warpgroup overlap), then the epilogue: O / l -> bf16 -> the
//            warpgroup's rows of the Q tile in shared memory -> 16-byte global stores.
// Pipeline: kStages K stages and kStages V stages, each with a full (producer -> consumers,
// 128 arrivals) and an empty (consumers -> producer, 256 arrivals) mbarrier; parity of tile j
// is (j / kStages) & 1.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
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
constexpr int kBlockN = 128;   // keys per key tile (= producer threads: one key each)
constexpr int kThreads = 384;
[[maybe_unused]] constexpr int kProducerRegs = 56;
[[maybe_unused]] constexpr int kConsumerRegs = 224;

// DMS_PREFILL_V2_DEBUG bits (bisection on a GPU; results stay exact, only slower):
constexpr int kDebugAlwaysMask = 1;  // mask every key tile (no fully-visible fast path)
constexpr int kDebugSerial = 2;      // wait for every wgmma batch at once (no GEMM / softmax overlap)

template <int D> constexpr int stages() { return D <= 64 ? 3 : 2; }

// Dynamic shared memory, from a 1024-byte aligned base (the swizzle works on address bits).
template <int D>
struct SmemLayout {
  static constexpr int kS = stages<D>();
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kBlockM * D * 2;
  static constexpr int kV = kK + kS * kBlockN * D * 2;
  static constexpr int kMeta = kV + kS * kBlockN * D * 2;          // int2 [kS][kBlockN]
  static constexpr int kFull = kMeta + kS * kBlockN * 8;            // int [kS][4]
  static constexpr int kBars = kFull + kS * 16;                     // uint64 [1 + 4 kS]
  static constexpr int kCtx = kBars + (1 + 4 * kS) * 8;             // TileCtx
  static constexpr int kBytes = kCtx + (int)sizeof(TileCtx) + 1024; // + alignment slack
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1)
    prefill_v2_kernel(const SparsePrefillParams p, const PrefillWs ws, const int pingpong,
                      const int debug) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = SmemLayout<D>;
  constexpr int kS = L::kS;
  constexpr int kChunks = D / 8;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t raw = dev::smem_u32(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  unsigned char* const sbase = smem_raw + (base - raw);
  TileCtx* const ctx = reinterpret_cast<TileCtx*>(sbase + L::kCtx);
  const uint32_t sQ = base + L::kQ;
  auto sK = [&](int s) { return base + L::kK + (uint32_t)s * (kBlockN * D * 2); };
  auto sV = [&](int s) { return base + L::kV + (uint32_t)s * (kBlockN * D * 2); };
  int2* const meta = reinterpret_cast<int2*>(sbase + L::kMeta);
  int* const fullf = reinterpret_cast<int*>(sbase + L::kFull);
  const uint32_t bars = base + L::kBars;
  const uint32_t q_full = bars;
  auto k_full = [&](int s) { return bars + 8u * (1 + s); };
  auto k_empty = [&](int s) { return bars + 8u * (1 + kS + s); };
  auto v_full = [&](int s) { return bars + 8u * (1 + 2 * kS + s); };
  auto v_empty = [&](int s) { return bars + 8u * (1 + 3 * kS + s); };

  const int tid = threadIdx.x;
  const int g = blockIdx.y;
  const int H = p.kv.num_kv_heads, Hq = p.num_q_heads, G = Hq / H;
  __shared__ int s_valid;
  if (tid == 0) {
    const long long b = (long long)gridDim.x - 1 - blockIdx.x;
    s_valid = make_tile<kBlockM, kBlockN>(p, ws, b, g, *ctx) ? 1 : 0;
    mbar_init(q_full, 128);
#pragma unroll
    for (int s = 0; s < kS; ++s) {
      mbar_init(k_full(s), 128);
      mbar_init(v_full(s), 128);
      mbar_init(k_empty(s), 256);
      mbar_init(v_empty(s), 256);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  if (!s_valid) return;

  const int wg = tid / 128;
  const int t = tid % 128, warp = t / 32, lane = t % 32;

  if (wg == 0) {
    // ---------------------------------------------------------------- producer warpgroup
    reg_dealloc<kProducerRegs>();
    const TileCtx x = *ctx;
    const T* q = static_cast<const T*>(p.q);
    // Q rows: row = token * G + head; rows past the chunk are zero-filled and never stored.
#pragma unroll 4
    for (int it = 0; it < kBlockM * kChunks / 128; ++it) {
      const int e = t + it * 128;
      const int row = e / kChunks, c16 = e % kChunks;
      const long long R = x.r0 + row;
      const bool valid = R < x.rows_total;
      const T* gp = q;
      if (valid) {
        const int i = (int)(R / G), hh = (int)(R % G);
        gp = q + ((long long)(x.start + i) * Hq + (long long)g * G + hh) * D + c16 * 8;
      }
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(sQ + tile_off<kBlockM>(row, c16)),
                   "l"(gp), "r"(valid ? 16 : 0)
                   : "memory");
    }
    mbar_cp_async_arrive(q_full);
    mbar_arrive(q_full);

    const T* kc = static_cast<const T*>(p.kv.k_cache);
    const T* vc = static_cast<const T*>(p.kv.v_cache);
    const T* kk = static_cast<const T*>(p.k);
    const T* vv = static_cast<const T*>(p.v);
    // K runs one tile ahead of V (FA3's order): K(j + 1) needs only the K stage of tile
    // j + 1 - kS, so it is in flight while the consumers still wait for V(j).
    auto load_k = [&](int tile) -> int {
      const int s = tile % kS;
      int mrow, ma, mb;
      resolve_key<kBlockN>(p, ws, x, g, tile, t, mrow, ma, mb);
      const bool vis = mrow >= 0 && ma <= x.i0 && mb >= x.i1 - 1;
      const bool all_vis = __all_sync(0xffffffffu, vis);
      mbar_wait(k_empty(s), ((uint32_t)(tile / kS) & 1u) ^ 1u);
      meta[s * kBlockN + t] = make_int2(ma, mb);
      if (lane == 0) fullf[s * 4 + warp] = all_vis ? 1 : 0;
      copy_rows<T, D, kBlockN>(sK(s), tile < x.end_flagged ? kc : kk, mrow, warp, lane);
      mbar_cp_async_arrive(k_full(s));
      mbar_arrive(k_full(s));
      return mrow;
    };
    auto load_v = [&](int tile, int mrow) {
      const int s = tile % kS;
      mbar_wait(v_empty(s), ((uint32_t)(tile / kS) & 1u) ^ 1u);
      copy_rows<T, D, kBlockN>(sV(s), tile < x.end_flagged ? vc : vv, mrow, warp, lane);
      mbar_cp_async_arrive(v_full(s));
      mbar_arrive(v_full(s));
    };
    int mrow_v = load_k(0);
    for (int tile = 0; tile < x.ntiles; ++tile) {
      const int mrow_next = tile + 1 < x.ntiles ? load_k(tile + 1) : -1;
      load_v(tile, mrow_v);
      mrow_v = mrow_next;
    }
    // Keep the CTA alive until the copies have landed (the consumers wait on them anyway).
    asm volatile("cp.async.wait_all;\n" ::: "memory");
    return;
  }

  // ------------------------------------------------------------------ consumer warpgroups
  reg_alloc<kConsumerRegs>();
  const int cw = wg - 1;
  const long long r0 = ctx->r0, rows_total = ctx->rows_total;
  const int ntiles = ctx->ntiles;
  int qi[2];
#pragma unroll
  for (int rs = 0; rs < 2; ++rs) {
    const long long R = r0 + cw * 64 + warp * 16 + (lane >> 2) + rs * 8;
    qi[rs] = R < rows_total ? (int)(R / G) : -1;
  }
  const float sl2 = p.scale * dev::kLog2e;

  // Descriptors: Q rows cw * 64 .. of the Q tile (K-major), K / V stage tiles.
  const uint64_t q_desc = make_desc(sQ + cw * 64 * 128, 16, 1024);
  float o[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
  float s[kBlockN / 2];
  uint32_t pf[kBlockN / 16][4];
  OnlineSoftmax<kBlockN> sm;
  sm.init();

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
  // Named barrier 3 + cw gates warpgroup cw (256 = its 128 syncing + the other's 128 arriving);
  // warpgroup 0 gets the first turn, and warpgroup 1 skips its last hand-over so that no arrival
  // is left pending at exit.
  auto turn_wait = [&]() { if (pingpong) named_sync(3 + cw, 256); };
  auto turn_pass = [&](bool last) {
    if (pingpong && !(last && cw == 1)) named_arrive(3 + (cw ^ 1), 256);
  };
  if (pingpong && cw == 1) named_arrive(3, 256);

  mbar_wait(q_full, 0);
  // Tile 0: S_0 and its softmax, nothing to overlap with yet.
  mbar_wait(k_full(0), 0);
  fence_proxy_async();
  turn_wait();
  gemm_s(0);
  turn_pass(ntiles == 1);
  wgmma_wait<0>();
  fence_regs(s);
  {
    float alpha[2];
    sm.step(s, is_full(0), meta_of(0), qi, sl2, lane, alpha);
  }
  mbar_arrive(k_empty(0));
  pack_p();

#pragma unroll 1
  for (int j = 1; j < ntiles; ++j) {
    const int st = j % kS, sp = (j - 1) % kS;
    mbar_wait(k_full(st), (uint32_t)(j / kS) & 1u);
    mbar_wait(v_full(sp), (uint32_t)((j - 1) / kS) & 1u);
    fence_proxy_async();
    turn_wait();
    gemm_s(st);
    gemm_pv(sp);
    turn_pass(j == ntiles - 1);
    wgmma_wait<1>();
    fence_regs(s);
    float alpha[2];
    sm.step(s, is_full(st), meta_of(st), qi, sl2, lane, alpha);
    mbar_arrive(k_empty(st));
    wgmma_wait<0>();
    fence_regs(o);
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) fence_regs(pf[kk]);
    mbar_arrive(v_empty(sp));
    pack_p();
    rescale_o(alpha);
  }
  {
    const int sp = (ntiles - 1) % kS;
    mbar_wait(v_full(sp), (uint32_t)((ntiles - 1) / kS) & 1u);
    fence_proxy_async();
    gemm_pv(sp);
    wgmma_wait<0>();
    fence_regs(o);
    mbar_arrive(v_empty(sp));
  }

  // Epilogue: O / l in the warpgroup's own rows of the Q tile (only it read them), then
  // 16-byte stores of whole rows.
  float inv[2];
  sm.finish(inv);
#pragma unroll
  for (int i = 0; i < D / 8; ++i) {
#pragma unroll
    for (int rs = 0; rs < 2; ++rs) {
      const int row = cw * 64 + warp * 16 + (lane >> 2) + rs * 8;
      const uint32_t v = dev::pack2<T>(o[4 * i + 2 * rs] * inv[rs], o[4 * i + 2 * rs + 1] * inv[rs]);
      const uint32_t addr = sQ + tile_off<kBlockM>(row, i) + (lane & 3) * 4;
      asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
    }
  }
  named_sync(1 + cw, 128);
  T* out = static_cast<T*>(p.out);
  const int o_start = ctx->start;
#pragma unroll 4
  for (int it = 0; it < 64 * kChunks / 128; ++it) {
    const int e = t + it * 128;
    const int row = e / kChunks, c16 = e % kChunks;
    const long long R = r0 + cw * 64 + row;
    if (R < rows_total) {
      const int i = (int)(R / G), hh = (int)(R % G);
      T* gp = out + ((long long)(o_start + i) * Hq + (long long)g * G + hh) * D + c16 * 8;
      uint4 v;
      asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                   : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                   : "r"(sQ + tile_off<kBlockM>(cw * 64 + row, c16)));
      *reinterpret_cast<uint4*>(gp) = v;
    }
  }
#endif
}

int debug_bits() {
  static const int bits = [] {
    const char* e = std::getenv("DMS_PREFILL_V2_DEBUG");
    return e ? std::atoi(e) : 0;
  }();
  return bits;
}

bool pingpong_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("DMS_PREFILL_V2_PINGPONG");
    return !(e && std::strcmp(e, "0") == 0);
  }();
  return on;
}

template <typename T, int D>
Status launch(const SparsePrefillParams& p, const PrefillWs& ws, cudaStream_t stream) {
  constexpr int bytes = SmemLayout<D>::kBytes;
  DMS_CUDA_CHECK(cudaFuncSetAttribute(prefill_v2_kernel<T, D>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  const int G = p.num_q_heads / p.kv.num_kv_heads;
  const long long slots = (long long)p.total_tokens * G / kBlockM + p.num_seqs;
  if (slots > INT_MAX) return Status::kUnsupported;
  prefill_v2_kernel<T, D><<<dim3((unsigned)slots, p.kv.num_kv_heads), kThreads, bytes, stream>>>(
      p, ws, pingpong_enabled() ? 1 : 0, debug_bits());
  DMS_LAUNCH_CHECK();
  return Status::kSuccess;
}

bool v2_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("DMS_PREFILL_V2");
    return !(e && std::strcmp(e, "0") == 0);
  }();
  return on;
}

}  // namespace

bool prefill_v2_supported(const SparsePrefillParams& p) {
  if (!v2_enabled()) return false;
  if (p.kv.dtype != DType::kBFloat16 && p.kv.dtype != DType::kFloat16) return false;
  if (p.kv.head_dim != 64 && p.kv.head_dim != 128) return false;
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
    return cudaFuncGetAttributes(&a, prefill_v2_kernel<__nv_bfloat16, 128>) == cudaSuccess &&
           a.sharedSizeBytes > 0;
  }();
  return has_body;
}

Status sparse_prefill_v2(const SparsePrefillParams& p, const PrefillWs& ws, cudaStream_t stream) {
  if (p.kv.dtype == DType::kBFloat16) {
    if (p.kv.head_dim == 128) return launch<__nv_bfloat16, 128>(p, ws, stream);
    if (p.kv.head_dim == 64) return launch<__nv_bfloat16, 64>(p, ws, stream);
  } else if (p.kv.dtype == DType::kFloat16) {
    if (p.kv.head_dim == 128) return launch<__half, 128>(p, ws, stream);
    if (p.kv.head_dim == 64) return launch<__half, 64>(p, ws, stream);
  }
  return Status::kUnsupported;
}

}  // namespace sm90
}  // namespace dms
