// CPU impls of every dms op: validate (shapes via tensor_params.h, and here also the data,
// which is free to read on the host), then run the CPU twin.
#include <torch/library.h>
#include <torch/types.h>

#include <vector>

#include "dms/cpu.h"
#include "torch/tensor_params.h"

namespace dms {
namespace torch_ext {
namespace {

void check_status(Status s, const char* op) {
  TORCH_CHECK_VALUE(s != Status::kInvalidArgument, op, ": ", status_string(s));
  TORCH_CHECK(s == Status::kSuccess, op, ": ", status_string(s));
}

// Every (row, head) in `rows`: 0 <= seq_len <= max_blocks * block_size and its blocks in range.
void check_heads(const char* op, const std::vector<int>& rows, const at::Tensor& block_table,
                 const at::Tensor& seq_lens, int64_t block_size, int64_t num_blocks) {
  const int64_t H = block_table.size(1), M = block_table.size(2);
  const int32_t* bt = block_table.data_ptr<int32_t>();
  const int32_t* sl = seq_lens.data_ptr<int32_t>();
  for (int r : rows) {
    for (int64_t g = 0; g < H; ++g) {
      const int64_t n = sl[r * H + g];
      TORCH_CHECK_VALUE(n >= 0 && n <= M * block_size, op, ": seq_lens[", r, ", ", g, "] = ", n,
                        " is outside [0, max_blocks_per_head * block_size = ", M * block_size, "]");
      for (int64_t b = 0; b < (n + block_size - 1) / block_size; ++b) {
        const int32_t id = bt[(r * H + g) * M + b];
        TORCH_CHECK_VALUE(id >= 0 && id < num_blocks, op, ": block_table[", r, ", ", g, ", ", b,
                          "] = ", id, " is not a block id in [0, ", num_blocks, ")");
      }
    }
  }
}

std::vector<int> all_rows(int64_t n) {
  std::vector<int> r(n);
  for (int64_t i = 0; i < n; ++i) r[i] = int(i);
  return r;
}

// seq_slots in range and distinct, cu_seqlens from 0 to T with every chunk >= 1 token.
std::vector<int> check_chunks(const char* op, const at::Tensor& seq_slots,
                              const at::Tensor& cu_seqlens, int64_t T, int64_t max_seqs) {
  const int64_t n = seq_slots.size(0);
  const int32_t* slots = seq_slots.data_ptr<int32_t>();
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(cu[0] == 0, op, ": cu_seqlens[0] must be 0, got ", cu[0]);
  TORCH_CHECK_VALUE(cu[n] == T, op, ": cu_seqlens[n] must equal the number of tokens ", T,
                    ", got ", cu[n]);
  std::vector<char> seen(max_seqs, 0);
  std::vector<int> rows;
  for (int64_t c = 0; c < n; ++c) {
    TORCH_CHECK_VALUE(cu[c + 1] > cu[c], op, ": cu_seqlens must increase (chunks of >= 1 token), got cu_seqlens[",
                      c, "] = ", cu[c], ", cu_seqlens[", c + 1, "] = ", cu[c + 1]);
    const int r = slots[c];
    TORCH_CHECK_VALUE(r >= 0 && r < max_seqs, op, ": seq_slots[", c, "] = ", r,
                      " is not a row in [0, ", max_seqs, ")");
    TORCH_CHECK_VALUE(!seen[r], op, ": seq_slots must be distinct, row ", r, " repeats");
    seen[r] = 1;
    rows.push_back(r);
  }
  return rows;
}

void check_ring(const char* op, const std::vector<int>& rows, const at::Tensor& ring,
                const at::Tensor& seq_lens, const at::Tensor& num_tokens) {
  const int64_t H = ring.size(1), R = ring.size(2);
  const int32_t* rg = ring.data_ptr<int32_t>();
  const int32_t* sl = seq_lens.data_ptr<int32_t>();
  const int32_t* nt = num_tokens.data_ptr<int32_t>();
  for (int r : rows) {
    TORCH_CHECK_VALUE(nt[r] >= 0, op, ": num_tokens[", r, "] = ", nt[r], " is negative");
    for (int64_t g = 0; g < H; ++g) {
      for (int64_t j = std::max<int64_t>(0, nt[r] - R); j < nt[r]; ++j) {
        const int32_t slot = rg[(r * H + g) * R + j % R] >> 1;
        TORCH_CHECK_VALUE(slot >= 0 && slot < sl[r * H + g], op, ": ring[", r, ", ", g, ", ",
                          j % R, "] holds slot ", slot, ", outside seq_lens[", r, ", ", g,
                          "] = ", sl[r * H + g]);
      }
    }
  }
}

void check_free(const char* op, const at::Tensor& free_stack, const at::Tensor& free_top) {
  const int32_t top = free_top.data_ptr<int32_t>()[0];
  const int64_t nb = free_stack.size(0);
  TORCH_CHECK_VALUE(top >= 0 && top <= nb, op, ": free_top = ", top, " is outside [0, ", nb, "]");
  const int32_t* fs = free_stack.data_ptr<int32_t>();
  for (int32_t i = 0; i < top; ++i) {
    TORCH_CHECK_VALUE(fs[i] >= 0 && fs[i] < nb, op, ": free_stack[", i, "] = ", fs[i],
                      " is not a block id in [0, ", nb, ")");
  }
}

std::tuple<at::Tensor, at::Tensor> sparse_decode_impl(const at::Tensor& q, const at::Tensor& k_cache,
                                                      const at::Tensor& v_cache,
                                                      const at::Tensor& block_table,
                                                      const at::Tensor& seq_lens, double scale,
                                                      bool want_lse) {
  SparseDecodeParams p = sparse_decode_params(q, k_cache, v_cache, block_table, seq_lens, scale);
  check_heads("sparse_decode", all_rows(p.batch), block_table, seq_lens, p.block_size, p.num_blocks);
  auto outputs = sparse_decode_outputs(p, q, want_lse);
  check_status(cpu::sparse_decode(p), "sparse_decode");
  return outputs;
}

at::Tensor sparse_decode_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& block_table, const at::Tensor& seq_lens, double scale) {
  return std::get<0>(sparse_decode_impl(q, k_cache, v_cache, block_table, seq_lens, scale, false));
}

std::tuple<at::Tensor, at::Tensor> sparse_decode_lse_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                                         const at::Tensor& v_cache,
                                                         const at::Tensor& block_table,
                                                         const at::Tensor& seq_lens, double scale) {
  return sparse_decode_impl(q, k_cache, v_cache, block_table, seq_lens, scale, true);
}

at::Tensor eviction_rope_cpu(at::Tensor& q, at::Tensor& k, const at::Tensor& positions,
                             const at::Tensor& cos_sin_cache, double alpha_scale, double alpha_offset,
                             const std::optional<at::Tensor>& q_norm_weight,
                             const std::optional<at::Tensor>& k_norm_weight, double norm_eps) {
  EvictionRopeParams p = eviction_rope_params(q, k, positions, cos_sin_cache, alpha_scale,
                                              alpha_offset, q_norm_weight, k_norm_weight, norm_eps);
  for (int t = 0; t < p.num_tokens; ++t) {
    const int64_t pos = p.positions_is_int64 ? positions.data_ptr<int64_t>()[t]
                                             : int64_t(positions.data_ptr<int32_t>()[t]);
    TORCH_CHECK_VALUE(pos >= 0 && pos < p.max_position, "eviction_rope: positions[", t, "] = ", pos,
                      " is outside cos_sin_cache's [0, ", p.max_position, ")");
  }
  at::Tensor logits = eviction_logits_output(q, k);
  p.logits = logits.data_ptr<float>();
  check_status(cpu::eviction_rope(p), "eviction_rope");
  return logits;
}

void append_cpu(const at::Tensor& k, const at::Tensor& v, const at::Tensor& logits,
                const at::Tensor& seq_slots, const at::Tensor& cu_seqlens, at::Tensor& k_cache,
                at::Tensor& v_cache, at::Tensor& block_table, at::Tensor& seq_lens, at::Tensor& ring,
                at::Tensor& num_tokens, at::Tensor& free_stack, at::Tensor& free_top) {
  AppendParams p = append_params(k, v, logits, seq_slots, cu_seqlens, k_cache, v_cache, block_table,
                                 seq_lens, ring, num_tokens, free_stack, free_top);
  const auto rows = check_chunks("append", seq_slots, cu_seqlens, p.total_tokens, p.max_seqs);
  check_heads("append", rows, block_table, seq_lens, p.block_size, p.num_blocks);
  check_ring("append", rows, ring, seq_lens, num_tokens);
  check_free("append", free_stack, free_top);
  check_status(cpu::append(p), "append");
}

at::Tensor sparse_prefill_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& logits, const at::Tensor& seq_slots,
                              const at::Tensor& cu_seqlens, const at::Tensor& k_cache,
                              const at::Tensor& v_cache, const at::Tensor& block_table,
                              const at::Tensor& seq_lens, const at::Tensor& ring,
                              const at::Tensor& num_tokens, double scale) {
  SparsePrefillParams p = sparse_prefill_params(q, k, v, logits, seq_slots, cu_seqlens, k_cache,
                                                v_cache, block_table, seq_lens, ring, num_tokens, scale);
  const auto rows = check_chunks("sparse_prefill", seq_slots, cu_seqlens, p.total_tokens, p.max_seqs);
  check_heads("sparse_prefill", rows, block_table, seq_lens, p.block_size, p.num_blocks);
  check_ring("sparse_prefill", rows, ring, seq_lens, num_tokens);
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
  check_heads("fork", {p.src}, block_table, seq_lens, p.block_size, p.num_blocks);
  const int32_t* sl = seq_lens.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(num_tokens.data_ptr<int32_t>()[p.dst] == 0, "fork: dst row ", p.dst,
                    " must be empty (num_tokens[dst] == 0)");
  for (int g = 0; g < p.num_kv_heads; ++g) {
    TORCH_CHECK_VALUE(sl[int64_t(p.dst) * p.num_kv_heads + g] == 0, "fork: dst row ", p.dst,
                      " must be empty (seq_lens[dst, ", g, "] == 0)");
  }
  check_free("fork", free_stack, free_top);
  check_status(cpu::fork(p), "fork");
}

void release_cpu(int64_t row, at::Tensor& block_table, at::Tensor& seq_lens, at::Tensor& ring,
                 at::Tensor& num_tokens, at::Tensor& free_stack, at::Tensor& free_top,
                 int64_t block_size) {
  ReleaseParams p = release_params(row, block_table, seq_lens, ring, num_tokens, free_stack,
                                   free_top, block_size);
  check_heads("release", {p.row}, block_table, seq_lens, p.block_size, p.num_blocks);
  check_status(cpu::release(p), "release");
}

at::Tensor decode_step_cpu(at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& cos_sin_cache, const at::Tensor& seq_slots,
                           at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& block_table,
                           at::Tensor& seq_lens, at::Tensor& ring, at::Tensor& num_tokens,
                           at::Tensor& free_stack, at::Tensor& free_top, double alpha_scale,
                           double alpha_offset, const std::optional<at::Tensor>& q_norm_weight,
                           const std::optional<at::Tensor>& k_norm_weight, double norm_eps,
                           const std::optional<at::Tensor>& logits) {
  DecodeStepParams p = decode_step_params(q, k, v, cos_sin_cache, seq_slots, k_cache, v_cache,
                                          block_table, seq_lens, ring, num_tokens, free_stack,
                                          free_top, alpha_scale, alpha_offset, q_norm_weight,
                                          k_norm_weight, norm_eps, logits);
  const int32_t* slots = seq_slots.data_ptr<int32_t>();
  const int32_t* nt = num_tokens.data_ptr<int32_t>();
  std::vector<char> seen(p.max_seqs, 0);
  std::vector<int> rows;
  for (int b = 0; b < p.batch; ++b) {
    const int r = slots[b];
    TORCH_CHECK_VALUE(r >= 0 && r < p.max_seqs, "decode_step: seq_slots[", b, "] = ", r,
                      " is not a row in [0, ", p.max_seqs, ")");
    TORCH_CHECK_VALUE(!seen[r], "decode_step: seq_slots must be distinct, row ", r, " repeats");
    seen[r] = 1;
    rows.push_back(r);
    TORCH_CHECK_VALUE(nt[r] >= 0 && nt[r] < p.max_position, "decode_step: position num_tokens[",
                      r, "] = ", nt[r], " is outside cos_sin_cache's [0, ", p.max_position, ")");
  }
  check_heads("decode_step", rows, block_table, seq_lens, p.block_size, p.num_blocks);
  check_ring("decode_step", rows, ring, seq_lens, num_tokens);
  check_free("decode_step", free_stack, free_top);
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
