// CPU impls of every dms op: validate the shapes (tensor_params.h), then run the CPU twin,
// which validates the data (free to read on the host) before it writes anything.
#include <torch/library.h>
#include <torch/types.h>

#include <string>

#include "dms/cpu.h"
#include "torch/tensor_params.h"

namespace dms {
namespace torch_ext {
namespace {

// The CPU twins validate the data themselves (block ids, lengths, ring entries, the free list,
// chunk packing, positions) before writing anything; their message names the argument.
void check_status(Status s, const char* op) {
  if (s == Status::kSuccess) return;
  const std::string why = cpu::last_error();
  const char* what = why.empty() ? status_string(s) : why.c_str();
  TORCH_CHECK_VALUE(s != Status::kInvalidArgument, op, ": ", what);
  TORCH_CHECK(false, op, ": ", status_string(s), why.empty() ? "" : ": ", why);
}

std::tuple<at::Tensor, at::Tensor> sparse_decode_impl(const at::Tensor& q, const at::Tensor& k_cache,
                                                      const at::Tensor& v_cache,
                                                      const at::Tensor& block_table,
                                                      const at::Tensor& seq_lens, double scale,
                                                      double k_scale, double v_scale,
                                                      bool want_lse) {
  SparseDecodeParams p = sparse_decode_params(q, k_cache, v_cache, block_table, seq_lens, scale,
                                                  k_scale, v_scale);
  auto outputs = sparse_decode_outputs(p, q, want_lse);
  check_status(cpu::sparse_decode(p), "sparse_decode");
  return outputs;
}

at::Tensor sparse_decode_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& block_table, const at::Tensor& seq_lens, double scale,
                              double k_scale, double v_scale) {
  return std::get<0>(sparse_decode_impl(q, k_cache, v_cache, block_table, seq_lens, scale, k_scale,
                                        v_scale, false));
}

std::tuple<at::Tensor, at::Tensor> sparse_decode_lse_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                                         const at::Tensor& v_cache,
                                                         const at::Tensor& block_table,
                                                         const at::Tensor& seq_lens, double scale,
                                                          double k_scale, double v_scale) {
  return sparse_decode_impl(q, k_cache, v_cache, block_table, seq_lens, scale, k_scale, v_scale,
                            true);
}

at::Tensor eviction_rope_cpu(at::Tensor& q, at::Tensor& k, const at::Tensor& positions,
                             const at::Tensor& cos_sin_cache, double alpha_scale, double alpha_offset,
                             const std::optional<at::Tensor>& q_norm_weight,
                             const std::optional<at::Tensor>& k_norm_weight, double norm_eps) {
  EvictionRopeParams p = eviction_rope_params(q, k, positions, cos_sin_cache, alpha_scale,
                                              alpha_offset, q_norm_weight, k_norm_weight, norm_eps);
  at::Tensor logits = eviction_logits_output(q, k);
  p.logits = logits.data_ptr<float>();
  check_status(cpu::eviction_rope(p), "eviction_rope");
  return logits;
}

void append_cpu(const at::Tensor& k, const at::Tensor& v, const at::Tensor& logits,
                const at::Tensor& seq_slots, const at::Tensor& cu_seqlens, at::Tensor& k_cache,
                at::Tensor& v_cache, at::Tensor& block_table, at::Tensor& seq_lens, at::Tensor& ring,
                at::Tensor& num_tokens, at::Tensor& free_stack, at::Tensor& free_top,
                double k_scale, double v_scale) {
  AppendParams p = append_params(k, v, logits, seq_slots, cu_seqlens, k_cache, v_cache, block_table,
                                 seq_lens, ring, num_tokens, free_stack, free_top, k_scale,
                                 v_scale);
  check_status(cpu::append(p), "append");
}

at::Tensor sparse_prefill_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& logits, const at::Tensor& seq_slots,
                              const at::Tensor& cu_seqlens, const at::Tensor& k_cache,
                              const at::Tensor& v_cache, const at::Tensor& block_table,
                              const at::Tensor& seq_lens, const at::Tensor& ring,
                              const at::Tensor& num_tokens, double scale, double k_scale,
                              double v_scale) {
  SparsePrefillParams p = sparse_prefill_params(q, k, v, logits, seq_slots, cu_seqlens, k_cache,
                                                v_cache, block_table, seq_lens, ring, num_tokens, scale,
                                                k_scale, v_scale);
  at::Tensor out = at::empty(q.sizes(), q.options());
  p.out = out.data_ptr();
  check_status(cpu::sparse_prefill(p), "sparse_prefill");
  return out;
}

void fork_cpu(int64_t src, int64_t dst, at::Tensor& k_cache, at::Tensor& v_cache,
              at::Tensor& block_table, at::Tensor& seq_lens, at::Tensor& ring, at::Tensor& num_tokens,
              at::Tensor& free_stack, at::Tensor& free_top) {
  ForkParams p = fork_params(src, dst, k_cache, v_cache, block_table, seq_lens, ring, num_tokens,
                             free_stack, free_top);
  check_status(cpu::fork(p), "fork");
}

void release_cpu(int64_t row, at::Tensor& block_table, at::Tensor& seq_lens, at::Tensor& ring,
                 at::Tensor& num_tokens, at::Tensor& free_stack, at::Tensor& free_top,
                 int64_t block_size) {
  ReleaseParams p = release_params(row, block_table, seq_lens, ring, num_tokens, free_stack,
                                   free_top, block_size);
  check_status(cpu::release(p), "release");
}

at::Tensor decode_step_cpu(at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& cos_sin_cache, const at::Tensor& seq_slots,
                           at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& block_table,
                           at::Tensor& seq_lens, at::Tensor& ring, at::Tensor& num_tokens,
                           at::Tensor& free_stack, at::Tensor& free_top, double alpha_scale,
                           double alpha_offset, const std::optional<at::Tensor>& q_norm_weight,
                           const std::optional<at::Tensor>& k_norm_weight, double norm_eps,
                           const std::optional<at::Tensor>& logits, double k_scale,
                           double v_scale) {
  DecodeStepParams p = decode_step_params(q, k, v, cos_sin_cache, seq_slots, k_cache, v_cache,
                                          block_table, seq_lens, ring, num_tokens, free_stack,
                                          free_top, alpha_scale, alpha_offset, q_norm_weight,
                                          k_norm_weight, norm_eps, logits, k_scale, v_scale);
  at::Tensor out = eviction_logits_output(q, k);
  p.logits = out.data_ptr<float>();
  check_status(cpu::decode_step(p), "decode_step");
  return out;
}

}  // namespace
}  // namespace torch_ext
}  // namespace dms

TORCH_LIBRARY_IMPL(dms, CPU, m) {
  using namespace dms::torch_ext;
  m.impl("sparse_decode", &sparse_decode_cpu);
  m.impl("sparse_decode_lse", &sparse_decode_lse_cpu);
  m.impl("eviction_rope", &eviction_rope_cpu);
  m.impl("append", &append_cpu);
  m.impl("sparse_prefill", &sparse_prefill_cpu);
  m.impl("fork", &fork_cpu);
  m.impl("release", &release_cpu);
  m.impl("decode_step", &decode_step_cpu);
}
