// The one registration block of the dms op library: every schema, each with its contract.
// CPU impls live in ops_cpu.cpp, CUDA impls in ops_cuda.cpp, fake (meta) impls in
// dms_ext/ops.py. Tensors named in a schema follow csrc/include/dms/params.h.
#include <Python.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "dms/capabilities.h"
#include "torch/validate.h"

// dms_ext._C is imported only for its side effect of running this block.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace {

// torch.ops.dms.supported: the capability table of dms/capabilities.h, whatever this build
// compiled (a CPU-only build answers for "cuda" too).
bool to_dtype(c10::ScalarType s, dms::DType* t) {
  switch (s) {
    case c10::ScalarType::Float: *t = dms::DType::kFloat32; return true;
    case c10::ScalarType::Half: *t = dms::DType::kFloat16; return true;
    case c10::ScalarType::BFloat16: *t = dms::DType::kBFloat16; return true;
    case c10::ScalarType::Float8_e4m3fn: *t = dms::DType::kFloat8E4M3; return true;
    default: return false;
  }
}

bool supported_op(c10::string_view op, c10::string_view device, c10::ScalarType dtype,
                  int64_t head_dim, int64_t block_size, std::optional<c10::ScalarType> kv_dtype) {
  const std::string name(op.data(), op.size()), dev(device.data(), device.size());
  dms::Op id;
  TORCH_CHECK_VALUE(dms::op_from_name(name.c_str(), &id), "supported: op must name a dms op "
                    "(sparse_decode, sparse_prefill, append, eviction_rope, decode_step, fork, "
                    "release), got '", name, "'");
  TORCH_CHECK_VALUE(dev == "cpu" || dev == "cuda", "supported: device must be 'cpu' or 'cuda', "
                    "got '", dev, "'");
  TORCH_CHECK_VALUE(head_dim >= 0 && block_size >= 0 && head_dim <= INT32_MAX &&
                    block_size <= INT32_MAX, "supported: head_dim and block_size must be in "
                    "[0, 2^31) (0: not asked), got ", head_dim, " and ", block_size);
  dms::DType t, kv;
  if (!to_dtype(dtype, &t) || !to_dtype(kv_dtype.value_or(dtype), &kv)) return false;
  return dms::supported(id, dev == "cuda" ? dms::Device::kCUDA : dms::Device::kCPU, t,
                        int(head_dim), int(block_size), kv);
}

}  // namespace

TORCH_LIBRARY(dms, m) {
  // What each op implements per device (dms/capabilities.h, the one table the ops, the C++ API
  // and DMSCache check against): op "sparse_decode" ... "release", device "cpu" or "cuda";
  // head_dim / block_size 0 are not asked about. A dtype no op takes gives False. dtype is the
  // compute dtype (q / k / v / out; fork and release: the pool's), kv_dtype the pool's
  // (None: dtype), e.g. (op, device, torch.bfloat16, kv_dtype=torch.float8_e4m3fn).
  m.def("supported(str op, str device, ScalarType dtype, int head_dim=0, int block_size=0, "
        "ScalarType? kv_dtype=None) -> bool",
        &supported_op);
  // DMS_VALIDATE mode (docs/errors.md section 4): the CUDA ops check the device data they read
  // (block ids, lengths, rows, ring entries, the free list, positions) before running, with a
  // sync, and raise what the CPU ops raise. Starts as the environment says (DMS_VALIDATE=1);
  // enabled=None asks, True / False sets it for this process. Returns the mode before the call.
  m.def("validate_mode(bool? enabled=None) -> bool", &dms::torch_ext::set_validate);
  // Pools: k_cache / v_cache have the compute dtype, or are float8_e4m3fn (both alike): a value
  // reads as stored * k_scale (v_scale), a write stores saturate(x / k_scale) (round to nearest
  // even, +-448). Every op that reads or writes the pools takes trailing k_scale / v_scale
  // (> 0, finite; 1.0 for a non-fp8 pool).
  // Paged per-head variable-length decode attention. q [B, Hq, D]; k_cache, v_cache
  // [num_blocks, block_size, D]; block_table int32 [B, Hkv, max_blocks]; seq_lens int32
  // [B, Hkv]. Query head h reads KV head h // (Hq / Hkv). Returns out [B, Hq, D] (q's dtype);
  // seq_lens[b, g] == 0 gives zeros.
  m.def(
      "sparse_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, "
      "Tensor seq_lens, float scale, float k_scale=1.0, float v_scale=1.0) -> Tensor");
  // sparse_decode that also returns lse float32 [B, Hq] (natural log of the softmax
  // denominator of the scaled scores; -inf for an empty head), for merging with other states.
  m.def(
      "sparse_decode_lse(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, "
      "Tensor seq_lens, float scale, float k_scale=1.0, float v_scale=1.0) -> (Tensor, Tensor)");
  // Borrowed-neuron eviction logits + channel zeroing + rotate-half RoPE, in place on q [T, Hq, D]
  // and k [T, Hkv, D]. logit[t, g] = q[t, g*G, D-1] * alpha_scale - alpha_offset, read after the
  // optional per-head RMSNorm (q_norm_weight / k_norm_weight [D], Qwen3) and before RoPE.
  // positions int32/int64 [T]; cos_sin_cache float32 [max_position, D]. Returns float32 [T, Hkv].
  m.def(
      "eviction_rope(Tensor(a!) q, Tensor(b!) k, Tensor positions, Tensor cos_sin_cache, "
      "float alpha_scale, float alpha_offset, Tensor? q_norm_weight=None, "
      "Tensor? k_norm_weight=None, float norm_eps=1e-6) -> Tensor");
  // Appends packed chunks (k, v [T, Hkv, D], logits float32 [T, Hkv], chunk i = rows
  // cu_seqlens[i]..cu_seqlens[i+1] continues state row seq_slots[i]) with DMS delayed eviction:
  // sets the previous token's flag, reuses the slot of a flagged token leaving the window,
  // else appends (popping blocks from free_stack), writes K/V, updates every state tensor.
  m.def(
      "append(Tensor k, Tensor v, Tensor logits, Tensor seq_slots, Tensor cu_seqlens, "
      "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) block_table, Tensor(d!) seq_lens, "
      "Tensor(e!) ring, Tensor(f!) num_tokens, Tensor(g!) free_stack, Tensor(h!) free_top, "
      "float k_scale=1.0, float v_scale=1.0) -> ()");
  // Prefill attention of packed chunks over (what each sequence already holds) + (the chunk,
  // causal), both with the DMS visibility rule. Reads the cache, writes nothing there; call
  // append afterwards. q [T, Hq, D]; returns out [T, Hq, D].
  m.def(
      "sparse_prefill(Tensor q, Tensor k, Tensor v, Tensor logits, Tensor seq_slots, "
      "Tensor cu_seqlens, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seq_lens, "
      "Tensor ring, Tensor num_tokens, float scale, float k_scale=1.0, float v_scale=1.0) -> Tensor");
  // Copies state row src into the empty row dst: new blocks from free_stack, K/V copied.
  m.def(
      "fork(int src, int dst, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) block_table, "
      "Tensor(d!) seq_lens, Tensor(e!) ring, Tensor(f!) num_tokens, Tensor(g!) free_stack, "
      "Tensor(h!) free_top) -> ()");
  // Pushes every block of state row `row` back on free_stack and clears the row (seq_lens,
  // num_tokens and ring to 0, block_table row to -1). block_size (the pool's dim 1) says how many
  // blocks a head holds: ceil(seq_len / block_size); no other argument carries it.
  m.def(
      "release(int row, Tensor(a!) block_table, Tensor(b!) seq_lens, Tensor(c!) ring, "
      "Tensor(d!) num_tokens, Tensor(e!) free_stack, Tensor(f!) free_top, int block_size) -> ()");
  // Fused decode step, one token per sequence (eviction_rope + append in one kernel):
  // q [B, Hq, D], k, v [B, Hkv, D] BEFORE norm / RoPE; row b continues state row seq_slots[b]
  // at position num_tokens[row] (read on the device). q is normed and roped in place, k normed
  // and roped into the cache, v copied; the state is updated as append does. Returns the
  // eviction logits float32 [B, Hkv]: the borrowed neuron, or `logits` (adapter variant, q keeps
  // every channel) when given.
  m.def(
      "decode_step(Tensor(a!) q, Tensor k, Tensor v, Tensor cos_sin_cache, Tensor seq_slots, "
      "Tensor(b!) k_cache, Tensor(c!) v_cache, Tensor(d!) block_table, Tensor(e!) seq_lens, "
      "Tensor(f!) ring, Tensor(g!) num_tokens, Tensor(h!) free_stack, Tensor(i!) free_top, "
      "float alpha_scale, float alpha_offset, Tensor? q_norm_weight=None, "
      "Tensor? k_norm_weight=None, float norm_eps=1e-6, Tensor? logits=None, float k_scale=1.0, "
      "float v_scale=1.0) -> Tensor");
}
