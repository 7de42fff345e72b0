// sparse_prefill v2 (sm_90a): the synchronisation pieces of the warp-specialized kernel.
//   mbarriers      init / arrive / cp.async-arrive / parity wait (the K, V and Q pipelines)
//   named barriers bar.sync on ids 1.. (warpgroup-local steps; id 0 is __syncthreads)
//   registers      setmaxnreg (the producer warpgroup gives registers to the consumers)
//   proxy fence    fence.proxy.async: cp.async writes (generic proxy) before wgmma reads them
//   TMA            cp.async.bulk.tensor 3-D loads completing on an mbarrier (expect_tx)
// Everything here is only used under __CUDA_ARCH_FEAT_SM90_ALL (sparse_prefill_sm90.cu).
#pragma once
#include <cstdint>

namespace dms {
namespace sm90 {

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Plain arrive: release semantics, so this thread's earlier shared stores (the key metadata)
// are visible to a thread whose wait sees the phase complete.
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar)
               : "memory");
}
// A producer thread's one arrival of the phase after its cp.async copies: a block-scope fence
// (release: the thread's earlier shared stores, the key metadata) and the non-incrementing
// cp.async arrive, which counts as the thread's arrival once its earlier copies have landed.
// (The incrementing form plus a plain arrive completes the same phase, but compute-sanitizer's
// synccheck reports it as "Missing wait"; this form is clean there.)
__device__ __forceinline__ void mbar_copies_arrive(uint32_t bar) {
  __threadfence_block();
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ bool mbar_try_wait(uint32_t bar, uint32_t parity) {
  uint32_t ok;
  asm volatile(
      "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      " selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(ok)
      : "r"(bar), "r"(parity)
      : "memory");
  return ok != 0;
}
// Waits until the phase of parity `parity` has completed (a fresh barrier: parity 1 passes).
// Called by whole warps; the lanes leave the spin together (the .aligned wgmma / setmaxnreg
// that follow want a converged warp).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  while (!mbar_try_wait(bar, parity)) {
  }
  __syncwarp();
}

__device__ __forceinline__ void named_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

template <int N> __device__ __forceinline__ void reg_dealloc() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N> __device__ __forceinline__ void reg_alloc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

// Arrive (one of the barrier's counted arrivals, release semantics like mbar_arrive) and add
// `bytes` to the transaction count the phase waits for (the TMA copies that follow complete it).
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}

// Adds `bytes` to the transaction count of the barrier's current phase without arriving (a
// thread that issues TMA copies before its own counted arrival).
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}

// TMA: box at coordinates (c0, c1, c2) of the 3-D tensor map `tmap` (the address of a
// __grid_constant__ kernel parameter) into shared memory at `dst`; its bytes complete_tx on
// mbarrier `bar`. Elements outside the tensor are zero-filled (and still counted).
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const void* tmap, uint32_t bar, int c0,
                                            int c1, int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(tmap)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
}

__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

}  // namespace sm90
}  // namespace dms
