// Device primitives shared by the dms kernels, one place per concept:
//   conversion   to_float / from_float<T> (float, __half, __nv_bfloat16), pack2<T> (two floats
//                into one 32-bit MMA operand), dtype_size (params.h)
//   fp8 e4m3     e4m3x4_to<T> (4 stored bytes -> two T2 MMA registers, exact), float_to_e4m3
//                (saturating store, as csrc/cpu/convert.h), store_row_e4m3 (x / scale, a row)
//   vectors      Vec8 / load_n / store_n / load_f32_n (8 elements per 16-byte access),
//                copy_row (raw bytes), aligned16
//   async copies smem_u32, cp_async16 (with the zero-fill form), cp_async_commit,
//                cp_async_wait<N>
//   tiles        swz<D> (16-byte chunks XOR-swizzled by row % 8, conflict-free ldmatrix),
//                ldsm_x4 / ldsm_x4_trans (cute SM75 ldmatrix atoms at a 32-bit shared address),
//                MmaAtom<T> / mma_16x8x16, movmatrix_trans, opaque
//                (cute SM80 m16n8k16 fp32-accumulate atoms), kLog2e, ex2
//   launches     launch_with (one launch attribute), launch_pdl, pdl_wait, pdl_launch_dependents
//                (programmatic dependent launch)
//   clusters     cluster_rank, cluster_size, cluster_sync, ld_cluster_s64 (a load from another
//                CTA's shared memory), launch_cluster (sm_90)
// Host-side macros (DMS_CUDA_CHECK, DMS_DISPATCH_DTYPE) are in kernels/common.cuh.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/mma_sm80.hpp>

#include <cstdint>
#include <utility>

#include "dms/params.h"

namespace dms {
namespace dev {

// ---------------------------------------------------------------------------------------------
// Conversion and vectors.

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// 8 consecutive elements <-> 8 floats. The caller guarantees 16-byte alignment of p
// (2-byte types: one 16-byte access; float: two).
template <typename T> struct Vec8;
template <> struct Vec8<float> {
  __device__ __forceinline__ static void load(const float* p, float (&x)[8]) {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w;
    x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
  }
  __device__ __forceinline__ static void store(float* p, const float (&x)[8]) {
    reinterpret_cast<float4*>(p)[0] = make_float4(x[0], x[1], x[2], x[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(x[4], x[5], x[6], x[7]);
  }
};
template <typename H> struct Vec8Half {
  __device__ __forceinline__ static void load(const H* p, float (&x)[8]) {
    uint4 u = *reinterpret_cast<const uint4*>(p);
    const H* h = reinterpret_cast<const H*>(&u);
#pragma unroll
    for (int i = 0; i < 8; ++i) x[i] = to_float(h[i]);
  }
  __device__ __forceinline__ static void store(H* p, const float (&x)[8]) {
    uint4 u;
    H* h = reinterpret_cast<H*>(&u);
#pragma unroll
    for (int i = 0; i < 8; ++i) h[i] = from_float<H>(x[i]);
    *reinterpret_cast<uint4*>(p) = u;
  }
};
template <> struct Vec8<__half> : Vec8Half<__half> {};
template <> struct Vec8<__nv_bfloat16> : Vec8Half<__nv_bfloat16> {};

// Loads / stores N consecutive elements (N = 8: vectorized, the caller guarantees alignment;
// N = 1: scalar fallback for head dims or pointers that are not 16-byte aligned).
template <int N, typename T>
__device__ __forceinline__ void load_n(const T* p, float (&x)[N]) {
  if constexpr (N == 8) {
    Vec8<T>::load(p, x);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) x[i] = to_float(p[i]);
  }
}
template <int N, typename T>
__device__ __forceinline__ void store_n(T* p, const float (&x)[N]) {
  if constexpr (N == 8) {
    Vec8<T>::store(p, x);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = from_float<T>(x[i]);
  }
}
template <int N>
__device__ __forceinline__ void load_f32_n(const float* p, float (&x)[N]) {
  if constexpr (N == 8) {
    Vec8<float>::load(p, x);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) x[i] = p[i];
  }
}

// Copies `bytes` (a multiple of 16 when vec16, else of 2) from src to dst with `nthreads`
// threads, thread `tid` of them. Raw bytes: the cache stores exactly what the caller gave.
__device__ __forceinline__ void copy_row(void* dst, const void* src, int bytes, bool vec16,
                                         int tid, int nthreads) {
  if (vec16) {
    uint4* d = static_cast<uint4*>(dst);
    const uint4* s = static_cast<const uint4*>(src);
    for (int i = tid; i < bytes / 16; i += nthreads) d[i] = s[i];
  } else {
    uint16_t* d = static_cast<uint16_t*>(dst);
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (int i = tid; i < bytes / 2; i += nthreads) d[i] = s[i];
  }
}

__host__ __device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// Two floats rounded (to nearest even) into one 32-bit register of T pairs, low half first:
// an MMA A operand.
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// ---------------------------------------------------------------------------------------------
// fp8 e4m3 ("fn": no inf, max 448) pools (sm_89+ conversion instructions).

// Four stored e4m3 bytes (byte 0 lowest) -> two registers of T pairs (lo: bytes 0, 1; hi: bytes
// 2, 3, low half first), exactly: every e4m3 value, subnormals and NaN included, is a half and
// a bfloat16. One cvt.rn.f16x2.e4m3x2 per pair; bf16 goes through float.
template <typename T> __device__ __forceinline__ void e4m3x4_to(uint32_t x, uint32_t& lo, uint32_t& hi);
template <> __device__ __forceinline__ void e4m3x4_to<__half>(uint32_t x, uint32_t& lo, uint32_t& hi) {
  const __half2_raw a = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(x & 0xffffu), __NV_E4M3);
  const __half2_raw b = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(x >> 16), __NV_E4M3);
  lo = uint32_t(a.x) | (uint32_t(a.y) << 16);
  hi = uint32_t(b.x) | (uint32_t(b.y) << 16);
}
template <> __device__ __forceinline__ void e4m3x4_to<__nv_bfloat16>(uint32_t x, uint32_t& lo, uint32_t& hi) {
  const __half2 a(__nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(x & 0xffffu), __NV_E4M3));
  const __half2 b(__nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(x >> 16), __NV_E4M3));
  const float2 fa = __half22float2(a), fb = __half22float2(b);
  lo = pack2<__nv_bfloat16>(fa.x, fa.y);
  hi = pack2<__nv_bfloat16>(fb.x, fb.y);
}

// x -> e4m3 as csrc/cpu/convert.h's float_to_e4m3: round to nearest even, |x| >= 448 (inf
// included) saturates to +-448 (the satfinite conversion), NaN stays NaN with x's sign.
__device__ __forceinline__ uint8_t float_to_e4m3(float x) {
  const uint8_t r = uint8_t(__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3));
  return x != x ? uint8_t(((__float_as_uint(x) >> 24) & 0x80u) | 0x7fu) : r;
}

// One row of n values of T (the compute dtype) into an fp8 pool: dst[i] = e4m3(src[i] / scale)
// (a true division, as the CPU twin's store_kv), by threads tid, tid + nthreads, ... vec8: n a
// multiple of 8, src 16-byte and dst 8-byte aligned.
template <typename T>
__device__ __forceinline__ void store_row_e4m3(uint8_t* dst, const T* src, int n, float scale,
                                               bool vec8, int tid, int nthreads) {
  if (vec8) {
    for (int c = tid; c < n / 8; c += nthreads) {
      float x[8];
      load_n<8>(src + 8 * c, x);
      uint32_t w[2] = {0u, 0u};
#pragma unroll
      for (int i = 0; i < 8; ++i) w[i / 4] |= uint32_t(float_to_e4m3(__fdiv_rn(x[i], scale))) << (8 * (i % 4));
      *reinterpret_cast<uint2*>(dst + 8 * c) = make_uint2(w[0], w[1]);
    }
  } else {
    for (int i = tid; i < n; i += nthreads) dst[i] = float_to_e4m3(__fdiv_rn(to_float(src[i]), scale));
  }
}

// ---------------------------------------------------------------------------------------------
// Asynchronous global -> shared copies (sm_80+).

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy to a 32-bit shared address (smem_u32); valid == false copies 0 source
// bytes, i.e. zero-fills the destination (masked rows must hold zeros, not stale bits: P = 0
// times a NaN pattern still poisons P.V). gmem must be a readable address either way.
__device__ __forceinline__ void cp_async16(uint32_t smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(valid ? 16 : 0)
               : "memory");
}
// The same at a generic pointer into shared memory.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  cp_async16(smem_u32(smem), gmem, valid);
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Waits until at most N of this thread's committed groups are still in flight.
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ---------------------------------------------------------------------------------------------
// Tensor-core tiles: m16n8k16, bf16 / fp16 in, fp32 accumulate (sm_80+; fine on sm_90a).

constexpr float kLog2e = 1.4426950408889634f;

// 2^x, approximate, flushing denormals (the softmax of the prefill kernel).
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Element offset of (row r, 16-byte chunk c) in a [rows][D] tile of 2-byte elements: chunks
// are XOR-swizzled by r % 8, so the 8 rows one ldmatrix phase reads land in 8 different bank
// groups. swz(r, 2 * x + b) == swz(r, b) ^ (x << 4), since r * D has no bits below D.
template <int D>
__device__ __forceinline__ int swz(int r, int c) {
  return r * D + ((c ^ (r & 7)) << 3);
}

// ldmatrix x4 (cute SM75 atoms) at a 32-bit shared-memory address (smem_u32): address math in
// 32 bits keeps the hot loops of the prefill kernel free of 64-bit pointers (which spill at
// D 128). `addr` points at this lane's row of its 8x8 matrix.
__device__ __forceinline__ const cute::uint128_t& smem_ref(uint32_t addr) {
  return *static_cast<const cute::uint128_t*>(__cvta_shared_to_generic(addr));
}
__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t (&r)[4]) {
  cute::SM75_U32x4_LDSM_N::copy(smem_ref(addr), r[0], r[1], r[2], r[3]);
}
// The transposed form: a [key][d] tile read as the B operand [d][key] of P.V.
__device__ __forceinline__ void ldsm_x4_trans(uint32_t addr, uint32_t (&r)[4]) {
  cute::SM75_U16x8_LDSM_T::copy(smem_ref(addr), r[0], r[1], r[2], r[3]);
}

// x, opaque to the compiler: a value computed once (say, from the thread index) stays in its
// register instead of being recomputed where it is used.
__device__ __forceinline__ uint32_t opaque(uint32_t x) {
  asm volatile("" : "+r"(x));
  return x;
}

// An 8x8 matrix of 16-bit elements transposed in registers (lane l holds row l / 4, columns
// 2 (l % 4), + 1 in and out): an m16n8 accumulator pair, packed, into a B operand register.
__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

template <typename T> struct MmaAtom;
template <> struct MmaAtom<__nv_bfloat16> { using Op = cute::SM80_16x8x16_F32BF16BF16F32_TN; };
template <> struct MmaAtom<__half> { using Op = cute::SM80_16x8x16_F32F16F16F32_TN; };

// c += a * b for one m16n8k16 tile: a the 4 A registers, (b0, b1) the B registers, c the 4
// fp32 accumulators (rows lane / 4 and lane / 4 + 8).
template <typename T>
__device__ __forceinline__ void mma_16x8x16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                            uint32_t b1) {
  MmaAtom<T>::Op::fma(c[0], c[1], c[2], c[3], a[0], a[1], a[2], a[3], b0, b1, c[0], c[1], c[2],
                      c[3]);
}

// ---------------------------------------------------------------------------------------------
// Programmatic dependent launch (sm_90): a kernel launched with launch_pdl may start while the
// previous kernel on the stream still runs; pdl_wait() blocks until that kernel has finished and
// its memory is visible, pdl_launch_dependents() lets the next kernel start launching early.
// Both are no-ops below sm_90 (no programmatic launch there).
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
// A launch with one launch attribute (launch_pdl, launch_cluster).
template <typename... KArgs, typename... Args>
cudaError_t launch_with(const cudaLaunchAttribute& attr, void (*kernel)(KArgs...), dim3 grid, dim3 block,
                        size_t smem, cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute a[1] = {attr};
  cfg.attrs = a;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}
template <typename... KArgs, typename... Args>
cudaError_t launch_pdl(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                       Args&&... args) {
  cudaLaunchAttribute attr = {};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  return launch_with(attr, kernel, grid, block, smem, stream, std::forward<Args>(args)...);
}

// ---------------------------------------------------------------------------------------------
// Thread-block clusters (sm_90): the CTAs of a cluster share their shared memory. Below sm_90
// these trap (the host launches clusters only on sm_90+, launch_cluster).
// %cluster_nctarank (kSize: CTAs per cluster) or %cluster_ctarank (this CTA's rank in it).
template <bool kSize> __device__ __forceinline__ unsigned cluster_reg() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  unsigned r;
  if constexpr (kSize) asm volatile("mov.u32 %0, %%cluster_nctarank;\n" : "=r"(r));
  else asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
#else
  return kSize ? 1 : 0;
#endif
}
__device__ __forceinline__ unsigned cluster_rank() { return cluster_reg<false>(); }
__device__ __forceinline__ unsigned cluster_size() { return cluster_reg<true>(); }
// Every thread of every CTA of the cluster: shared (and global) writes before it are visible to
// the cluster's threads after it.
__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}
// The 8 bytes at `p`'s offset in the shared memory of the cluster's CTA `rank`.
__device__ __forceinline__ long long ld_cluster_s64(const void* p, unsigned rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t a;
  long long v;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(a) : "r"(smem_u32(p)), "r"(rank));
  asm volatile("ld.shared::cluster.s64 %0, [%1];\n" : "=l"(v) : "r"(a) : "memory");
  return v;
#else
  __trap();
  return 0;
#endif
}
// A launch in clusters of `cluster` CTAs along x (grid.x a multiple of it).
template <typename... KArgs, typename... Args>
cudaError_t launch_cluster(void (*kernel)(KArgs...), dim3 grid, dim3 block, unsigned cluster, cudaStream_t stream,
                           Args&&... args) {
  cudaLaunchAttribute attr = {};
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = cluster;
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  return launch_with(attr, kernel, grid, block, 0, stream, std::forward<Args>(args)...);
}

}  // namespace dev
}  // namespace dms
