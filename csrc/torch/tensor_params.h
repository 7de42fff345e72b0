// Tensor -> params struct, shared by the CPU and CUDA impls. The pools (k_cache / v_cache) have
// the compute dtype of q / k, or float8_e4m3fn with k_scale / v_scale (dms/params.h); an fp8 pool
// on a device whose kernels lack it is NotImplementedError (dms/capabilities.h).
// Validates what can be checked
// without reading device memory (dtype, device, shape, contiguity, sizes) and raises
// ValueError (TORCH_CHECK_VALUE) naming the argument, including what the op implements on the
// tensors' device (dms/capabilities.h: dtype, head_dim, block_size). Data-dependent checks
// (block ids, lengths, slots) are the CPU impl's business; a CUDA launch must not sync to do
// them. Each params struct is built from the fillers of its shared pieces (KVPool, PageTable,
// DMSState, FreeList), one filler per piece.
#pragma once
#include <torch/types.h>

#include <optional>
#include <tuple>

#include "dms/capabilities.h"
#include "dms/params.h"

namespace dms {
namespace torch_ext {

DType dtype_of(const at::Tensor& t, const char* name);

// out / lse are left unset: the caller allocates them after validation.
SparseDecodeParams sparse_decode_params(const at::Tensor& q, const at::Tensor& k_cache,
                                        const at::Tensor& v_cache, const at::Tensor& block_table,
                                        const at::Tensor& seq_lens, double scale,
                                        double k_scale = 1.0, double v_scale = 1.0);

// logits is left unset.
EvictionRopeParams eviction_rope_params(const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& positions,
                                        const at::Tensor& cos_sin_cache, double alpha_scale,
                                        double alpha_offset,
                                        const std::optional<at::Tensor>& q_norm_weight,
                                        const std::optional<at::Tensor>& k_norm_weight,
                                        double norm_eps);

AppendParams append_params(const at::Tensor& k, const at::Tensor& v, const at::Tensor& logits,
                           const at::Tensor& seq_slots, const at::Tensor& cu_seqlens,
                           const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_table, const at::Tensor& seq_lens,
                           const at::Tensor& ring, const at::Tensor& num_tokens,
                           const at::Tensor& free_stack, const at::Tensor& free_top,
                           double k_scale = 1.0, double v_scale = 1.0);

// out is left unset.
SparsePrefillParams sparse_prefill_params(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& logits,
    const at::Tensor& seq_slots, const at::Tensor& cu_seqlens, const at::Tensor& k_cache,
    const at::Tensor& v_cache, const at::Tensor& block_table, const at::Tensor& seq_lens,
    const at::Tensor& ring, const at::Tensor& num_tokens, double scale, double k_scale = 1.0,
    double v_scale = 1.0);

ForkParams fork_params(int64_t src, int64_t dst, const at::Tensor& k_cache,
                       const at::Tensor& v_cache, const at::Tensor& block_table,
                       const at::Tensor& seq_lens, const at::Tensor& ring,
                       const at::Tensor& num_tokens, const at::Tensor& free_stack,
                       const at::Tensor& free_top);

ReleaseParams release_params(int64_t row, const at::Tensor& block_table,
                             const at::Tensor& seq_lens, const at::Tensor& ring,
                             const at::Tensor& num_tokens, const at::Tensor& free_stack,
                             const at::Tensor& free_top, int64_t block_size);

// logits (the output) is left unset; logits_in is the optional adapter input.
DecodeStepParams decode_step_params(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos_sin_cache,
    const at::Tensor& seq_slots, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& block_table, const at::Tensor& seq_lens, const at::Tensor& ring,
    const at::Tensor& num_tokens, const at::Tensor& free_stack, const at::Tensor& free_top,
    double alpha_scale, double alpha_offset, const std::optional<at::Tensor>& q_norm_weight,
    const std::optional<at::Tensor>& k_norm_weight, double norm_eps,
    const std::optional<at::Tensor>& logits, double k_scale = 1.0, double v_scale = 1.0);

// Outputs, allocated alike on every device once the params have been validated.
// sparse_decode: out [B, Hq, D] like q and lse float32 [B, Hq]; sets p.out, its strides and
// p.lse (nullptr unless want_lse: the kernel then skips writing it).
std::tuple<at::Tensor, at::Tensor> sparse_decode_outputs(SparseDecodeParams& p,
                                                         const at::Tensor& q, bool want_lse);

// eviction_rope / decode_step: the eviction logits float32 [rows of q, KV heads of k].
at::Tensor eviction_logits_output(const at::Tensor& q, const at::Tensor& k);

}  // namespace torch_ext
}  // namespace dms
