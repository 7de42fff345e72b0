// Small device helpers shared by the dms kernels: error checks that turn CUDA failures into
// dms::Status, dtype traits (float <-> storage), 16-byte vector loads/stores of 8 elements,
// and a dtype switch. Kept small and stable: several kernel files include it.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "dms/params.h"

// Entry points return Status, never throw: a failed CUDA call leaves the function here.
#define DMS_CUDA_CHECK(expr)                               \
  do {                                                     \
    if ((expr) != cudaSuccess) return ::dms::Status::kCudaError; \
  } while (0)

// After a launch: configuration errors (grid too large, too much shared memory) surface only
// through cudaGetLastError.
#define DMS_LAUNCH_CHECK() DMS_CUDA_CHECK(cudaGetLastError())

// Instantiates `...` with T = the storage type of `dtype` (float, __half, __nv_bfloat16).
#define DMS_DISPATCH_DTYPE(dtype, T, ...)                          \
  [&]() -> ::dms::Status {                                         \
    switch (dtype) {                                               \
      case ::dms::DType::kFloat32: { using T = float; __VA_ARGS__ } \
      case ::dms::DType::kFloat16: { using T = __half; __VA_ARGS__ } \
      case ::dms::DType::kBFloat16: { using T = __nv_bfloat16; __VA_ARGS__ } \
    }                                                              \
    return ::dms::Status::kInvalidArgument;                        \
  }()

namespace dms {
namespace dev {

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

// dms::dtype_size is host-only (params.h carries no CUDA annotations).
__host__ __device__ __forceinline__ int elem_bytes(DType t) { return t == DType::kFloat32 ? 4 : 2; }

__host__ __device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

}  // namespace dev
}  // namespace dms
