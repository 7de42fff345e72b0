// CUDA impls of every dms op: validate (tensor_params.h; shapes and dtypes only, never device
// data, so no host sync), allocate outputs, launch on the current stream (anything else breaks
// CUDA-graph capture), and turn a dms::Status into a Python exception.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <cstdlib>
#include <torch/library.h>
#include <torch/types.h>

#include "dms/dms.h"
#include "torch/tensor_params.h"
#include "torch/validate.h"

namespace dms {
namespace torch_ext {
namespace {

void check_launch(Status s, const char* op) {
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  TORCH_CHECK_VALUE(s != Status::kInvalidArgument, op, ": ", status_string(s));
  TORCH_CHECK_NOT_IMPLEMENTED(s != Status::kUnsupported, op, ": ", status_string(s));
  TORCH_CHECK(s == Status::kSuccess, op, ": ", status_string(s));
}

int sm_count(const at::Device& d) {
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, d.index()));
  return n;
}

void check_cuda(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
}

// The kernel's scratch: `bytes` on q's device, held by the returned tensor until the launch is
// queued (the caching allocator keeps it for the stream); p.workspace stays null when none.
template <class Params>
at::Tensor workspace_for(Params& p, size_t bytes, const at::Tensor& q) {
  if (bytes == 0) return at::Tensor();
  at::Tensor workspace = at::empty({int64_t(bytes)}, q.options().dtype(at::kByte));
  p.workspace = workspace.data_ptr();
  return workspace;
}

// Tuning knobs for benchmarks only (bench/sweep_decode.py), read once per process; unset means
// the library default (0).
struct DecodeKnobs {
  int max_splits = 0, min_chunk = 0;
};

const DecodeKnobs& decode_knobs() {
  static const DecodeKnobs knobs = [] {
    DecodeKnobs k;
    if (const char* e = std::getenv("DMS_DECODE_MAX_SPLITS")) k.max_splits = std::atoi(e);
    if (const char* e = std::getenv("DMS_DECODE_MIN_CHUNK")) k.min_chunk = std::atoi(e);
    return k;
  }();
  return knobs;
}

std::tuple<at::Tensor, at::Tensor> sparse_decode_impl(const at::Tensor& q, const at::Tensor& k_cache,
                                                      const at::Tensor& v_cache,
                                                      const at::Tensor& block_table,
                                                      const at::Tensor& seq_lens, double scale,
                                                      double k_scale, double v_scale,
                                                      bool want_lse) {
  check_cuda("sparse_decode", q, "q");
  SparseDecodeParams p = sparse_decode_params(q, k_cache, v_cache, block_table, seq_lens, scale,
                                                  k_scale, v_scale);
  const c10::cuda::CUDAGuard guard(q.device());
  validate_device_data("sparse_decode", validate_params(p));  // DMS_VALIDATE=1 only
  // The kernel moves q rows with 16-byte copies: a view with odd strides or offset is copied.
  at::Tensor qc = q;
  if (q.stride(0) % 8 != 0 || q.stride(1) % 8 != 0 || reinterpret_cast<uintptr_t>(q.data_ptr()) % 16 != 0) {
    qc = q.clone(at::MemoryFormat::Contiguous);  // contiguous() would keep a misaligned base
    p.q = qc.data_ptr();
    p.q_stride_b = qc.stride(0);
    p.q_stride_h = qc.stride(1);
  }
  auto outputs = sparse_decode_outputs(p, q, want_lse);
  if (p.batch == 0 || p.num_q_heads == 0) return outputs;
  const DecodeKnobs& knobs = decode_knobs();
  p.max_splits = knobs.max_splits;
  p.min_chunk = knobs.min_chunk;
  const int num_sms = sm_count(q.device());
  const at::Tensor workspace = workspace_for(p, sparse_decode_workspace_bytes(p, num_sms), q);
  check_launch(sparse_decode(p, c10::cuda::getCurrentCUDAStream()), "sparse_decode");
  return outputs;
}

at::Tensor sparse_decode_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                              const at::Tensor& block_table, const at::Tensor& seq_lens, double scale,
                              double k_scale, double v_scale) {
  return std::get<0>(sparse_decode_impl(q, k_cache, v_cache, block_table, seq_lens, scale, k_scale,
                                        v_scale, false));
}

std::tuple<at::Tensor, at::Tensor> sparse_decode_lse_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                                                          const at::Tensor& v_cache,
                                                          const at::Tensor& block_table,
                                                          const at::Tensor& seq_lens, double scale,
                                                          double k_scale, double v_scale) {
  return sparse_decode_impl(q, k_cache, v_cache, block_table, seq_lens, scale, k_scale, v_scale,
                            true);
}

at::Tensor eviction_rope_cuda(at::Tensor& q, at::Tensor& k, const at::Tensor& positions,
                              const at::Tensor& cos_sin_cache, double alpha_scale, double alpha_offset,
                              const std::optional<at::Tensor>& q_norm_weight,
                              const std::optional<at::Tensor>& k_norm_weight, double norm_eps) {
  check_cuda("eviction_rope", q, "q");
  EvictionRopeParams p = eviction_rope_params(q, k, positions, cos_sin_cache, alpha_scale,
                                              alpha_offset, q_norm_weight, k_norm_weight, norm_eps);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor logits = eviction_logits_output(q, k);
  p.logits = logits.data_ptr<float>();
  if (p.num_tokens == 0) return logits;
  check_launch(eviction_rope(p, c10::cuda::getCurrentCUDAStream()), "eviction_rope");
  return logits;
}

void append_cuda(const at::Tensor& k, const at::Tensor& v, const at::Tensor& logits,
                 const at::Tensor& seq_slots, const at::Tensor& cu_seqlens, at::Tensor& k_cache,
                 at::Tensor& v_cache, at::Tensor& block_table, at::Tensor& seq_lens, at::Tensor& ring,
                 at::Tensor& num_tokens, at::Tensor& free_stack, at::Tensor& free_top,
                 double k_scale, double v_scale) {
  check_cuda("append", k, "k");
  AppendParams p = append_params(k, v, logits, seq_slots, cu_seqlens, k_cache, v_cache, block_table,
                                 seq_lens, ring, num_tokens, free_stack, free_top, k_scale,
                                 v_scale);
  const c10::cuda::CUDAGuard guard(k.device());
  validate_device_data("append", validate_params(p));  // DMS_VALIDATE=1 only
  if (p.num_seqs == 0) return;
  check_launch(append(p, c10::cuda::getCurrentCUDAStream()), "append");
}

at::Tensor sparse_prefill_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& logits, const at::Tensor& seq_slots,
                               const at::Tensor& cu_seqlens, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const at::Tensor& block_table,
                               const at::Tensor& seq_lens, const at::Tensor& ring,
                               const at::Tensor& num_tokens, double scale, double k_scale,
                              double v_scale) {
  check_cuda("sparse_prefill", q, "q");
  SparsePrefillParams p = sparse_prefill_params(q, k, v, logits, seq_slots, cu_seqlens, k_cache,
                                                v_cache, block_table, seq_lens, ring, num_tokens, scale,
                                                k_scale, v_scale);
  const c10::cuda::CUDAGuard guard(q.device());
  validate_device_data("sparse_prefill", validate_params(p));  // DMS_VALIDATE=1 only
  at::Tensor out = at::empty(q.sizes(), q.options());
  p.out = out.data_ptr();
  if (p.num_seqs == 0) return out;
  // A/B knob for benchmarks, read once per process: DMS_PREFILL_SMALL=0 keeps short chunks on
  // the general kernel (unset: the library default, the small-chunk kernel).
  static const int small_chunks = [] {
    const char* e = std::getenv("DMS_PREFILL_SMALL");
    return e && std::atoi(e) == 0 ? 0 : 1;
  }();
  p.small_chunks = small_chunks;
  const at::Tensor workspace = workspace_for(p, sparse_prefill_workspace_bytes(p), q);
  check_launch(sparse_prefill(p, c10::cuda::getCurrentCUDAStream()), "sparse_prefill");
  return out;
}

void fork_cuda(int64_t src, int64_t dst, at::Tensor& k_cache, at::Tensor& v_cache,
               at::Tensor& block_table, at::Tensor& seq_lens, at::Tensor& ring, at::Tensor& num_tokens,
               at::Tensor& free_stack, at::Tensor& free_top) {
  check_cuda("fork", k_cache, "k_cache");
  ForkParams p = fork_params(src, dst, k_cache, v_cache, block_table, seq_lens, ring, num_tokens,
                             free_stack, free_top);
  const c10::cuda::CUDAGuard guard(k_cache.device());
  validate_device_data("fork", validate_params(p));  // DMS_VALIDATE=1 only
  check_launch(fork(p, c10::cuda::getCurrentCUDAStream()), "fork");
}

void release_cuda(int64_t row, at::Tensor& block_table, at::Tensor& seq_lens, at::Tensor& ring,
                  at::Tensor& num_tokens, at::Tensor& free_stack, at::Tensor& free_top,
                  int64_t block_size) {
  check_cuda("release", block_table, "block_table");
  ReleaseParams p = release_params(row, block_table, seq_lens, ring, num_tokens, free_stack,
                                   free_top, block_size);
  const c10::cuda::CUDAGuard guard(block_table.device());
  validate_device_data("release", validate_params(p));  // DMS_VALIDATE=1 only
  check_launch(release(p, c10::cuda::getCurrentCUDAStream()), "release");
}

at::Tensor decode_step_cuda(at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& cos_sin_cache, const at::Tensor& seq_slots,
                            at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& block_table,
                            at::Tensor& seq_lens, at::Tensor& ring, at::Tensor& num_tokens,
                            at::Tensor& free_stack, at::Tensor& free_top, double alpha_scale,
                            double alpha_offset, const std::optional<at::Tensor>& q_norm_weight,
                            const std::optional<at::Tensor>& k_norm_weight, double norm_eps,
                            const std::optional<at::Tensor>& logits, double k_scale,
                           double v_scale) {
  check_cuda("decode_step", q, "q");
  DecodeStepParams p = decode_step_params(q, k, v, cos_sin_cache, seq_slots, k_cache, v_cache,
                                          block_table, seq_lens, ring, num_tokens, free_stack,
                                          free_top, alpha_scale, alpha_offset, q_norm_weight,
                                          k_norm_weight, norm_eps, logits, k_scale, v_scale);
  const c10::cuda::CUDAGuard guard(q.device());
  validate_device_data("decode_step", validate_params(p));  // DMS_VALIDATE=1 only
  at::Tensor out = eviction_logits_output(q, k);
  p.logits = out.data_ptr<float>();
  if (p.batch == 0) return out;
  // Misaligned pointers take the kernel's scalar path; nothing to copy here (q is in place).
  check_launch(decode_step(p, at::cuda::getCurrentCUDAStream()), "decode_step");
  return out;
}

}  // namespace
}  // namespace torch_ext
}  // namespace dms

TORCH_LIBRARY_IMPL(dms, CUDA, m) {
  using namespace dms::torch_ext;
  m.impl("sparse_decode", &sparse_decode_cuda);
  m.impl("sparse_decode_lse", &sparse_decode_lse_cuda);
  m.impl("eviction_rope", &eviction_rope_cuda);
  m.impl("append", &append_cuda);
  m.impl("sparse_prefill", &sparse_prefill_cuda);
  m.impl("fork", &fork_cuda);
  m.impl("release", &release_cuda);
  m.impl("decode_step", &decode_step_cuda);
}
