// dms::eviction_rope: optional per-head RMSNorm, borrowed-neuron eviction logits, channel
// zeroing and rotate-half RoPE of q and k, in place (docs/semantics.md section 10, docs/ops.md).
//
// One group of `tpr` threads per head vector (T * (Hq + Hkv) vectors), each thread owning
// whole RoPE pairs, so the only exchange is the RMSNorm sum. Memory-bound: 16-byte accesses
// when D % 16 == 0 and every pointer is 16-byte aligned, scalar otherwise.
#include "dms/dms.h"
#include "kernels/step.cuh"

namespace dms {
namespace {

constexpr int kThreads = 256;

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    eviction_rope_kernel(EvictionRopeParams p, int tpr) {
  const int D = p.head_dim, Hq = p.num_q_heads, Hkv = p.num_kv_heads, G = Hq / Hkv;
  const int heads = Hq + Hkv;
  const int64_t rows = int64_t(p.num_tokens) * heads;
  const int64_t r = int64_t(blockIdx.x) * (kThreads / tpr) + threadIdx.x / tpr;
  const int gl = threadIdx.x % tpr;
  bool active = r < rows;
  const int t = active ? int(r / heads) : 0;
  const int h = active ? int(r % heads) : 0;
  int64_t pos = 0;
  if (active) {
    pos = p.positions_is_int64 ? static_cast<const int64_t*>(p.positions)[t]
                               : int64_t(static_cast<const int32_t*>(p.positions)[t]);
  }
  const bool is_q = h < Hq;
  T* x = is_q ? static_cast<T*>(p.q) + (int64_t(t) * Hq + h) * D
              : static_cast<T*>(p.k) + (int64_t(t) * Hkv + (h - Hq)) * D;
  // An out-of-range position has no cos/sin row: poison that vector (and its logit) instead of
  // reading past the table, so the caller's error is visible downstream.
  const bool bad_pos = active && (pos < 0 || pos >= p.max_position);
  if (bad_pos) active = false;
  const bool donor = is_q && h % G == 0;
  float* logit_dst = p.logits + int64_t(t) * Hkv + h / G;
  const T* w = static_cast<const T*>(is_q ? p.q_norm_weight : p.k_norm_weight);
  dev::rope_row<T, VEC>(x, x, p.cos_sin_cache + (active ? pos : 0) * D, w, p.norm_eps, D, active,
                        donor, logit_dst, p.alpha_scale, p.alpha_offset, gl, tpr);
  if (bad_pos) {
    for (int i = gl; i < D; i += tpr) x[i] = dev::from_float<T>(__int_as_float(0x7fffffff));
    if (donor && gl == 0) *logit_dst = __int_as_float(0x7fffffff);
  }
}

template <typename T, int VEC>
Status launch(const EvictionRopeParams& p, cudaStream_t stream) {
  const int tpr = dev::rope_threads_per_row(p.head_dim, VEC);
  const int64_t rows = int64_t(p.num_tokens) * (p.num_q_heads + p.num_kv_heads);
  const int per_block = kThreads / tpr;
  const int64_t grid = (rows + per_block - 1) / per_block;
  if (grid > INT32_MAX) return Status::kUnsupported;
  eviction_rope_kernel<T, VEC><<<unsigned(grid), kThreads, 0, stream>>>(p, tpr);
  DMS_LAUNCH_CHECK();
  return Status::kSuccess;
}

}  // namespace

Status eviction_rope(const EvictionRopeParams& p, cudaStream_t stream) {
  if (p.num_tokens < 0 || p.num_q_heads <= 0 || p.num_kv_heads <= 0 || p.head_dim <= 0 ||
      p.num_q_heads % p.num_kv_heads != 0 || p.max_position < 0) {
    return Status::kInvalidArgument;
  }
  if (!supported(Op::kEvictionRope, Device::kCUDA, p.dtype, p.head_dim, 0)) {
    return Status::kUnsupported;
  }
  if (p.num_tokens == 0) return Status::kSuccess;
  if (!p.q || !p.k || !p.positions || !p.cos_sin_cache || !p.logits) {
    return Status::kInvalidArgument;
  }
  const bool vec = p.head_dim % 16 == 0 && dev::aligned16(p.q) && dev::aligned16(p.k) &&
                   dev::aligned16(p.cos_sin_cache) &&
                   (!p.q_norm_weight || dev::aligned16(p.q_norm_weight)) &&
                   (!p.k_norm_weight || dev::aligned16(p.k_norm_weight));
  return DMS_DISPATCH_DTYPE(p.dtype, T, {
    return vec ? launch<T, 8>(p, stream) : launch<T, 1>(p, stream);
  });
}

}  // namespace dms
