// Memory and MMA primitives shared by the attention kernels (sparse_decode, sparse_prefill):
// 16-byte cp.async with zero fill, the XOR swizzle for ldmatrix-friendly tiles, the m16n8k16
// tensor-core atom per dtype (CuTe), and float <-> storage conversions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/mma_sm80.hpp>

#include <cstdint>
#include <utility>

namespace dms {

constexpr float kLog2e = 1.4426950408889634f;

template <typename T> struct MmaAtom;
template <> struct MmaAtom<__nv_bfloat16> { using Op = cute::SM80_16x8x16_F32BF16BF16F32_TN; };
template <> struct MmaAtom<__half> { using Op = cute::SM80_16x8x16_F32F16F16F32_TN; };

__device__ __forceinline__ uint32_t pack2(float a, float b, __nv_bfloat16*) {
  __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&v);
}
__device__ __forceinline__ uint32_t pack2(float a, float b, __half*) {
  __half2 v = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&v);
}
__device__ __forceinline__ void from_float(float x, __nv_bfloat16* p) { *p = __float2bfloat16(x); }
__device__ __forceinline__ void from_float(float x, __half* p) { *p = __float2half(x); }

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16-byte async copy; valid = false zero-fills (rows past a range end must hold zeros, not stale
// bits: P = 0 times a NaN pattern would still poison the PV product).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Element offset of row r, 16-byte chunk c of a [rows][D] tile: chunks are XOR-swizzled by r % 8
// so the 8 rows an ldmatrix phase touches land in 8 different bank groups.
template <int D>
__device__ __forceinline__ int swizzle(int r, int c) {
  return r * D + ((c ^ (r & 7)) << 3);
}

// Programmatic dependent launch (sm_90): a kernel launched with launch_pdl may start while the
// previous kernel on the stream still runs; pdl_wait() blocks until that kernel has finished and
// its memory is visible, pdl_launch_dependents() lets the next kernel start launching early.
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }
__device__ __forceinline__ void pdl_launch_dependents() {
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
}
template <typename... KArgs, typename... Args>
cudaError_t launch_pdl(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                       Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

}  // namespace dms
