// Host-side macros of the dms entry points: error checks that turn CUDA failures into
// dms::Status, and a dtype switch. Device code lives in kernels/primitives.cuh.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "dms/params.h"

// Entry points return Status, never throw: a failed CUDA call leaves the function here.
#define DMS_CUDA_CHECK(expr)                               \
  do {                                                     \
    if ((expr) != cudaSuccess) return ::dms::Status::kCudaError; \
  } while (0)

namespace dms {
// SMs of the current device, for sizing persistent grids (sparse_decode, the short-chunk
// sparse_prefill); 132 (an H100 / H200) when the runtime cannot say.
inline int device_sms() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 132;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return 132;
  return n;
}
}  // namespace dms

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
