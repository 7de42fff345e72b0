// sparse_prefill v2 (sm_90a): shared-memory tile layout and the wgmma calls.
//
// Tile layout (Q, K and V alike): a [rows][D] tile of 2-byte elements is stored as D / 64
// column blocks of [rows][64]; a 128-byte row of a block holds 8 16-byte chunks XOR-swizzled by
// row % 8 (the GMMA / TMA 128-byte swizzle: byte-address bits [4,7) ^= bits [7,10), so every
// block starts 1024-byte aligned). This is cute's tile_to_shape(GMMA::Layout_K_SW128_Atom<T>,
// (rows, D)), written out so the producer can place its cp.async chunks by hand.
//
// Descriptors (cute make_gmma_desc, 128-byte swizzle, in 16-byte units):
//   K-major  ((8,n),2):((8,SBO),1)        S = Q.K^T: A = Q rows, B = K rows; SBO = 1024 B
//                                          (8 rows of 128 B), LBO unused (1). k-step ks of 16
//                                          elements: + (ks % 4) * 32 B inside a block,
//                                          + (ks / 4) * rows * 128 B across blocks.
//   MN-major ((8,n),(8,k)):((1,LBO),(8,SBO))  O += P.V: B = V [key][d] read as [d][key]:
//                                          LBO = rows * 128 B (next 64 dims), SBO = 1024 B (next
//                                          8 keys); k-step of 16 keys: + 16 * 128 B.
// Register fragments (m64nNk16, per warp w of the warpgroup, lane l): accumulator c[4i + e]
// is row 16w + l/4 + 8*(e/2), column 8i + 2*(l%4) + e%2, the mma.sync m16n8 layout per 8
// columns; the A operand from registers for k-step kk is (c[8kk..8kk+7] packed in pairs), so
// P goes from the S accumulators to the P.V A operand without a shuffle.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cute/arch/mma_sm90_gmma.hpp>

#include <cstdint>
#include <utility>

namespace dms {
namespace sm90 {

// Byte offset of (row r, 16-byte chunk c) in a tile of `Rows` rows (c counts D / 8 chunks).
template <int Rows>
__device__ __forceinline__ uint32_t tile_off(int r, int c) {
  return (uint32_t)((c >> 3) * (Rows * 128) + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}

__device__ __forceinline__ uint64_t make_desc(uint32_t smem_addr, uint32_t lbo_bytes,
                                              uint32_t sbo_bytes) {
  uint64_t d = 0;
  d |= (uint64_t)((smem_addr & 0x3FFFFu) >> 4);
  d |= (uint64_t)((lbo_bytes >> 4) & 0x3FFFu) << 16;
  d |= (uint64_t)((sbo_bytes >> 4) & 0x3FFFu) << 32;
  d |= 1ull << 62;  // 128-byte swizzle
  return d;
}

namespace G = cute::SM90::GMMA;

template <typename T, int N> struct GmmaOps;
#define DMS_SM90_GMMA(TT, NN, NAME)                                                        \
  template <> struct GmmaOps<TT, NN> {                                                     \
    using SS = G::MMA_64x##NN##x16_F32##NAME##_SS<G::Major::K, G::Major::K>;               \
    using RS = G::MMA_64x##NN##x16_F32##NAME##_RS<G::Major::K, G::Major::MN>;              \
  };
DMS_SM90_GMMA(__nv_bfloat16, 64, BF16BF16)
DMS_SM90_GMMA(__nv_bfloat16, 128, BF16BF16)
DMS_SM90_GMMA(__nv_bfloat16, 256, BF16BF16)
DMS_SM90_GMMA(__half, 64, F16F16)
DMS_SM90_GMMA(__half, 128, F16F16)
DMS_SM90_GMMA(__half, 256, F16F16)
#undef DMS_SM90_GMMA

template <class Op, int N, int... I>
__device__ __forceinline__ void ss_fma(uint64_t a, uint64_t b, float (&d)[N], bool acc,
                                       std::integer_sequence<int, I...>) {
  Op::fma(a, b, d[I]..., acc ? G::ScaleOut::One : G::ScaleOut::Zero);
}
template <class Op, int N, int... I>
__device__ __forceinline__ void rs_fma(const uint32_t (&a)[4], uint64_t b, float (&d)[N],
                                       std::integer_sequence<int, I...>) {
  Op::fma(a[0], a[1], a[2], a[3], b, d[I]..., G::ScaleOut::One);
}

// d (m64 x N fp32, N / 2 per thread) (+)= A(desc) . B(desc)^T, one k16 step.
template <typename T, int N>
__device__ __forceinline__ void wgmma_ss(uint64_t a, uint64_t b, float (&d)[N / 2], bool acc) {
  ss_fma<typename GmmaOps<T, N>::SS>(a, b, d, acc, std::make_integer_sequence<int, N / 2>{});
}
template <typename T, int N>
__device__ __forceinline__ void wgmma_rs(const uint32_t (&a)[4], uint64_t b, float (&d)[N / 2]) {
  rs_fma<typename GmmaOps<T, N>::RS>(a, b, d, std::make_integer_sequence<int, N / 2>{});
}

template <int N> __device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N> __device__ __forceinline__ void fence_regs(uint32_t (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

}  // namespace sm90
}  // namespace dms
