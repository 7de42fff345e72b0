// CPU twin of dms::decode_step: literally eviction_rope then append (one token per sequence),
// so the fused CUDA kernel has a reference that is right by construction. All-or-nothing:
// q, the logits and the state are written only when every check has passed.
#include <cstring>
#include <vector>

#include "cpu/validate.h"
#include "dms/cpu.h"

namespace dms {
namespace cpu {

Status decode_step(const DecodeStepParams& p) {
  detail::clear_error();
  const DType act = compute_dtype(p.kv, p.act_dtype);  // q / k / v / norm weights
  if (p.batch < 0 || p.state.max_seqs < 0 || p.max_position < 0 || p.num_q_heads <= 0 ||
      p.kv.num_kv_heads <= 0 || p.kv.head_dim <= 0 || p.num_q_heads % p.kv.num_kv_heads != 0 ||
      !supported(Op::kDecodeStep, Device::kCPU, act, p.kv.head_dim, 0, p.kv.dtype) ||
      !valid_scales(p.kv)) {
    return Status::kInvalidArgument;
  }
  if (p.batch == 0) return Status::kSuccess;
  if (!p.q || !p.k || !p.v || !p.rows || !has_pointers(p.state) || !has_pointers(p.free) ||
      !p.logits) {
    return Status::kInvalidArgument;
  }
  const int B = p.batch, Hq = p.num_q_heads, H = p.kv.num_kv_heads, D = p.kv.head_dim;
  const size_t es = size_t(dtype_size(act));
  // Rows (distinct, in range), positions, then what append checks (dms/validate.h).
  std::vector<int32_t> positions(B), cu(B + 1);
  for (int b = 0; b <= B; ++b) cu[b] = b;
  const Status st = detail::check_data(validate_params(p));
  if (st != Status::kSuccess) return st;
  for (int b = 0; b < B; ++b) positions[b] = p.state.num_tokens[p.rows[b]];
  // Work on copies: k is an input, and q must stay untouched if append refuses the batch.
  const size_t q_bytes = size_t(B) * Hq * D * es, k_bytes = size_t(B) * H * D * es;
  std::vector<unsigned char> q(q_bytes), k(k_bytes);
  std::memcpy(q.data(), p.q, q_bytes);
  std::memcpy(k.data(), p.k, k_bytes);
  std::vector<float> logits(size_t(B) * H);

  EvictionRopeParams e;
  e.positions = positions.data();
  e.positions_is_int64 = false;
  e.cos_sin_cache = p.cos_sin_cache;
  e.num_tokens = B;
  e.head_dim = D;
  e.max_position = p.max_position;
  e.alpha_scale = p.alpha_scale;
  e.alpha_offset = p.alpha_offset;
  e.dtype = act;
  e.norm_eps = p.norm_eps;
  if (!p.logits_in) {
    e.q = q.data();
    e.k = k.data();
    e.logits = logits.data();
    e.num_q_heads = Hq;
    e.num_kv_heads = H;
    e.q_norm_weight = p.q_norm_weight;
    e.k_norm_weight = p.k_norm_weight;
    Status s = eviction_rope(e);
    if (s != Status::kSuccess) return s;
  } else {
    // Adapter logits: q keeps every channel. eviction_rope only borrows from its q argument,
    // so q and k each go through it in the k role (no donor), with a throwaway q of one head
    // per KV head.
    std::memcpy(logits.data(), p.logits_in, sizeof(float) * logits.size());
    std::vector<float> scratch_logits(size_t(B) * Hq);
    auto norm_rope = [&](void* x, int heads, const void* weight) {
      std::vector<unsigned char> dummy(size_t(B) * heads * D * es, 0);
      EvictionRopeParams f = e;
      f.q = dummy.data();
      f.k = x;
      f.logits = scratch_logits.data();
      f.num_q_heads = heads;
      f.num_kv_heads = heads;
      f.q_norm_weight = nullptr;
      f.k_norm_weight = weight;
      return eviction_rope(f);
    };
    Status s = norm_rope(q.data(), Hq, p.q_norm_weight);
    if (s != Status::kSuccess) return s;
    s = norm_rope(k.data(), H, p.k_norm_weight);
    if (s != Status::kSuccess) return s;
  }

  AppendParams a;
  a.k = k.data();
  a.v = p.v;
  a.logits = logits.data();
  a.rows = p.rows;
  a.cu_seqlens = cu.data();
  a.kv = p.kv;
  a.state = p.state;
  a.free = p.free;
  a.num_seqs = B;
  a.total_tokens = B;
  a.act_dtype = act;
  Status s = append(a);
  if (s != Status::kSuccess) return s;
  std::memcpy(p.q, q.data(), q_bytes);
  std::memcpy(p.logits, logits.data(), sizeof(float) * logits.size());
  return Status::kSuccess;
}

}  // namespace cpu
}  // namespace dms
