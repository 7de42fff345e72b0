#include "torch/tensor_params.h"

#include <cmath>
#include <limits>
#include <initializer_list>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace dms {
namespace torch_ext {

namespace {

constexpr int64_t kAny = -1;

std::string shape_str(c10::IntArrayRef s) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << "]";
  return o.str();
}

std::string expect_str(const std::vector<int64_t>& e) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < e.size(); ++i) {
    o << (i ? ", " : "");
    if (e[i] == kAny) o << "*"; else o << e[i];
  }
  o << "]";
  return o.str();
}

// `what` names the dims, e.g. "[T, Hkv, D]"; `e` holds the sizes already fixed by other
// arguments (kAny where this argument is the one that defines them).
void check_shape(const char* op, const at::Tensor& t, const char* name, const char* what,
                 const std::vector<int64_t>& e) {
  bool ok = t.dim() == int64_t(e.size());
  for (size_t i = 0; ok && i < e.size(); ++i) ok = e[i] == kAny || t.size(i) == e[i];
  TORCH_CHECK_VALUE(ok, op, ": ", name, " must have shape ", what, " = ", expect_str(e),
                    ", got ", shape_str(t.sizes()));
}

void check_device(const char* op, const at::Tensor& t, const char* name, const at::Device& d,
                  const char* ref) {
  TORCH_CHECK_VALUE(t.device() == d, op, ": ", name, " must be on the same device as ", ref,
                    " (", d, "), got ", t.device());
}

void check_dtype(const char* op, const at::Tensor& t, const char* name, at::ScalarType s) {
  TORCH_CHECK_VALUE(t.scalar_type() == s, op, ": ", name, " must have dtype ", s, ", got ",
                    t.scalar_type());
}

void check_contiguous(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// One helper for the common "int32, contiguous, this shape, this device" state tensors.
void check_index(const char* op, const at::Tensor& t, const char* name, const char* what,
                 const std::vector<int64_t>& e, const at::Device& d, const char* ref) {
  check_device(op, t, name, d, ref);
  check_dtype(op, t, name, at::kInt);
  check_shape(op, t, name, what, e);
  check_contiguous(op, t, name);
}

int to_int(const char* op, int64_t v, const char* what) {
  TORCH_CHECK_VALUE(v >= 0 && v <= std::numeric_limits<int32_t>::max(), op, ": ", what, " = ",
                    v, " does not fit in int32");
  return int(v);
}

// Element offsets are int64 in the kernels, but every size must be an int.
void check_numel(const char* op, const at::Tensor& t, const char* name) {
  for (int64_t i = 0; i < t.dim(); ++i) to_int(op, t.size(i), name);
}

void check_float_tensor(const char* op, const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK_VALUE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, op, ": ", name,
                    " must be float32, float16 or bfloat16, got ", s);
}

Device device_kind(const at::Tensor& t) { return t.is_cuda() ? Device::kCUDA : Device::kCPU; }

// The capability table (dms/capabilities.h) for the device of `t`, the tensor that defines the
// op's dtype: its dtype, head_dim (0: not asked) and the pool's block_size (0: not asked).
void check_supported(const char* op, Op id, const at::Tensor& t, const char* name,
                     int64_t head_dim, int64_t block_size) {
  const Device d = device_kind(t);
  const Capability& c = capability(id, d);
  TORCH_CHECK_VALUE(supports_dtype(id, d, dtype_of(t, name)), op, ": ", name, " must be ",
                    c.dtypes_text, " on ", device_name(d), ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(head_dim == 0 || supports_head_dim(id, d, int(head_dim)), op, ": ", name,
                    " head_dim must be ", c.head_dims_text, " on ", device_name(d), ", got ",
                    head_dim);
  TORCH_CHECK_VALUE(block_size == 0 || supports_block_size(id, d, int(block_size)), op,
                    ": k_cache block_size (dim 1) must be ", c.block_sizes_text, " on ",
                    device_name(d), ", got ", block_size);
}

void check_scale(const char* op, double scale) {
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be finite, got ", scale);
}

// The pool's dtype against the capability table (after check_supported passed for the compute
// dtype of `ref`) and its dequantization scales: finite and > 0 as a float, and 1 unless the
// pool is fp8. An fp8 pool where the table has none is NotImplementedError:
// a valid request this build does not implement, never a silently wrong answer.
void check_kv(const char* op, Op id, const at::Tensor& ref, const at::Tensor& k_cache,
              double k_scale, double v_scale) {
  const DType kv = dtype_of(k_cache, "k_cache");
  for (auto [name, s] : {std::pair<const char*, double>{"k_scale", k_scale}, {"v_scale", v_scale}}) {
    const float f = float(s);
    TORCH_CHECK_VALUE(std::isfinite(s) && std::isfinite(f) && f > 0.f, op, ": ", name,
                      " must be finite and > 0 (as a float32), got ", s);
    TORCH_CHECK_VALUE(is_fp8(kv) || f == 1.f, op, ": ", name, " must be 1.0 unless the pool "
                      "(k_cache) is float8_e4m3fn, got ", s, " for a ", k_cache.scalar_type(),
                      " pool");
  }
  const Device d = device_kind(ref);
  TORCH_CHECK_NOT_IMPLEMENTED(supports_kv_dtype(id, d, dtype_of(ref, "q"), kv), op,
                              ": kv dtype (k_cache / v_cache) ", k_cache.scalar_type(),
                              " is not implemented on ", device_name(d), " (kv dtype must be ",
                              capability(id, d).kv_dtypes_text, "; see torch.ops.dms.supported)");
}

void set_scales(KVPool& kv, double k_scale, double v_scale) {
  kv.k_scale = float(k_scale);
  kv.v_scale = float(v_scale);
}

// The KV pool: [num_blocks, block_size, D], both caches alike.
void check_caches(const char* op, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& ref, const char* ref_name, int64_t D) {
  check_device(op, k_cache, "k_cache", ref.device(), ref_name);
  check_device(op, v_cache, "v_cache", ref.device(), ref_name);
  // The pool has the compute dtype of `ref`, or is fp8 (e4m3fn); both caches alike.
  TORCH_CHECK_VALUE(k_cache.scalar_type() == ref.scalar_type() ||
                        k_cache.scalar_type() == at::kFloat8_e4m3fn,
                    op, ": k_cache must have dtype ", ref.scalar_type(), " (as ", ref_name,
                    ") or Float8_e4m3fn, got ", k_cache.scalar_type());
  TORCH_CHECK_VALUE(v_cache.scalar_type() == k_cache.scalar_type(), op,
                    ": v_cache must have the dtype of k_cache (", k_cache.scalar_type(),
                    "), got ", v_cache.scalar_type());
  check_shape(op, k_cache, "k_cache", "[num_blocks, block_size, D]", {kAny, kAny, D});
  check_shape(op, v_cache, "v_cache", "[num_blocks, block_size, D] (as k_cache)",
              {k_cache.size(0), k_cache.size(1), D});
  check_contiguous(op, k_cache, "k_cache");
  check_contiguous(op, v_cache, "v_cache");
  TORCH_CHECK_VALUE(k_cache.size(1) >= 1, op, ": k_cache block_size (dim 1) must be >= 1");
  check_numel(op, k_cache, "k_cache size");
}

// q [n, Hq, D] and k [n, Hkv, D] of the RoPE ops (eviction_rope: n = T, decode_step: n = B).
struct QKSizes {
  int64_t n, Hq, Hkv, D;
};

// Also what the op implements for q's dtype and head_dim (even: rotate-half RoPE), before the
// shapes of the other arguments are checked against D.
QKSizes check_rope_qk(const char* op, Op id, const at::Tensor& q, const at::Tensor& k,
                      const char* n) {
  check_float_tensor(op, q, "q");
  TORCH_CHECK_VALUE(q.dim() == 3, op, ": q must have shape [", n, ", Hq, D], got ",
                    shape_str(q.sizes()));
  check_contiguous(op, q, "q");
  QKSizes s{q.size(0), q.size(1), 0, q.size(2)};
  TORCH_CHECK_VALUE(s.D >= 1, op, ": q head_dim must be >= 1");
  check_supported(op, id, q, "q", s.D, 0);
  const std::string k_what = std::string("[") + n + ", Hkv, D]";
  check_device(op, k, "k", q.device(), "q");
  check_dtype(op, k, "k", q.scalar_type());
  check_shape(op, k, "k", k_what.c_str(), {s.n, kAny, s.D});
  check_contiguous(op, k, "k");
  s.Hkv = k.size(1);
  TORCH_CHECK_VALUE(s.Hkv >= 1 && s.Hq % s.Hkv == 0, op, ": q heads (", s.Hq,
                    ") must be a multiple of k heads (", s.Hkv, ")");
  return s;
}

void check_cos_sin(const char* op, const at::Tensor& cos_sin_cache, const at::Tensor& q,
                   int64_t D) {
  check_device(op, cos_sin_cache, "cos_sin_cache", q.device(), "q");
  check_dtype(op, cos_sin_cache, "cos_sin_cache", at::kFloat);
  check_shape(op, cos_sin_cache, "cos_sin_cache", "[max_position, D]", {kAny, D});
  check_contiguous(op, cos_sin_cache, "cos_sin_cache");
}

void check_rope_scalars(const char* op, double alpha_scale, double alpha_offset,
                        double norm_eps) {
  TORCH_CHECK_VALUE(std::isfinite(alpha_scale) && std::isfinite(alpha_offset), op,
                    ": alpha_scale and alpha_offset must be finite");
  TORCH_CHECK_VALUE(std::isfinite(norm_eps) && norm_eps >= 0, op,
                    ": norm_eps must be finite and >= 0, got ", norm_eps);
}

// The optional q/k RMSNorm weight [D]; nullptr when absent.
const void* norm_weight(const char* op, const std::optional<at::Tensor>& w, const char* name,
                        const at::Tensor& q, int64_t D) {
  if (!w.has_value()) return nullptr;
  check_device(op, *w, name, q.device(), "q");
  check_dtype(op, *w, name, q.scalar_type());
  check_shape(op, *w, name, "[D]", {D});
  check_contiguous(op, *w, name);
  return w->data_ptr();
}

// The per-row DMS state (block_table, seq_lens, ring, num_tokens and, where the op pops or
// pushes blocks, free_stack / free_top). block_table must be on `dev` (the device of the
// caller's `table_ref` argument); the other state tensors are reported against `ref`. Hkv is
// kAny where block_table is the argument that defines it (fork, release).
struct StateSizes {
  int64_t S, Hkv, M, W;
};

StateSizes check_state(const char* op, const at::Device& dev, const char* table_ref,
                       const char* ref, int64_t Hkv, const at::Tensor& block_table,
                       const at::Tensor& seq_lens, const at::Tensor& ring,
                       const at::Tensor& num_tokens, const at::Tensor* free_stack,
                       const at::Tensor* free_top, int64_t num_blocks) {
  check_index(op, block_table, "block_table", "[max_seqs, Hkv, max_blocks_per_head]",
              {kAny, Hkv, kAny}, dev, table_ref);
  StateSizes s{block_table.size(0), block_table.size(1), block_table.size(2), 0};
  TORCH_CHECK_VALUE(s.Hkv >= 1, op, ": block_table must have Hkv >= 1 (dim 1)");
  check_index(op, seq_lens, "seq_lens", "[max_seqs, Hkv]", {s.S, s.Hkv}, dev, ref);
  check_index(op, ring, "ring", "[max_seqs, Hkv, window + 1]", {s.S, s.Hkv, kAny}, dev, ref);
  s.W = ring.size(2) - 1;
  TORCH_CHECK_VALUE(s.W >= 1, op, ": ring must have window + 1 >= 2 entries in dim 2, got ",
                    ring.size(2));
  check_index(op, num_tokens, "num_tokens", "[max_seqs]", {s.S}, dev, ref);
  if (free_stack) {
    check_index(op, *free_stack, "free_stack", "[num_blocks]", {num_blocks}, dev, ref);
    check_index(op, *free_top, "free_top", "[1]", {1}, dev, ref);
  }
  check_numel(op, block_table, "block_table size");
  check_numel(op, ring, "ring size");
  if (free_stack) check_numel(op, *free_stack, "free_stack size");
  return s;
}

// Fillers of the shared pieces of params.h, one per piece, from already validated tensors.

// k_cache / v_cache [num_blocks, block_size, D]; num_kv_heads comes from the page table.
KVPool kv_pool(const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t num_kv_heads) {
  KVPool kv;
  kv.k_cache = k_cache.data_ptr();
  kv.v_cache = v_cache.data_ptr();
  kv.num_blocks = int(k_cache.size(0));
  kv.block_size = int(k_cache.size(1));
  kv.num_kv_heads = int(num_kv_heads);
  kv.head_dim = int(k_cache.size(2));
  kv.dtype = dtype_of(k_cache, "k_cache");
  return kv;
}

// block_table [rows, Hkv, max_blocks_per_head], seq_lens [rows, Hkv].
PageTable page_table(const at::Tensor& block_table, const at::Tensor& seq_lens) {
  PageTable t;
  t.block_table = block_table.data_ptr<int32_t>();
  t.seq_lens = seq_lens.data_ptr<int32_t>();
  t.max_blocks_per_head = int(block_table.size(2));
  return t;
}

// The page table (rows = max_seqs), ring [max_seqs, Hkv, window + 1], num_tokens [max_seqs].
DMSState dms_state(const at::Tensor& block_table, const at::Tensor& seq_lens,
                   const at::Tensor& ring, const at::Tensor& num_tokens) {
  DMSState s;
  s.pages = page_table(block_table, seq_lens);
  s.ring = ring.data_ptr<int32_t>();
  s.num_tokens = num_tokens.data_ptr<int32_t>();
  s.max_seqs = int(block_table.size(0));
  s.window = int(ring.size(2) - 1);
  return s;
}

FreeList free_list(const at::Tensor& free_stack, const at::Tensor& free_top) {
  FreeList f;
  f.stack = free_stack.data_ptr<int32_t>();
  f.top = free_top.data_ptr<int32_t>();
  return f;
}

}  // namespace

DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat8_e4m3fn: return DType::kFloat8E4M3;
    default: TORCH_CHECK_VALUE(false, name, " must be float32, float16, bfloat16 or float8_e4m3fn, got ", t.scalar_type());
  }
  return DType::kFloat32;
}

SparseDecodeParams sparse_decode_params(const at::Tensor& q, const at::Tensor& k_cache,
                                        const at::Tensor& v_cache, const at::Tensor& block_table,
                                        const at::Tensor& seq_lens, double scale,
                                        double k_scale, double v_scale) {
  const char* op = "sparse_decode";
  check_float_tensor(op, q, "q");
  TORCH_CHECK_VALUE(q.dim() == 3, op, ": q must have shape [B, Hq, D], got ", shape_str(q.sizes()));
  TORCH_CHECK_VALUE(q.size(2) == 1 || q.stride(2) == 1, op, ": q must have unit stride in its last dim");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  TORCH_CHECK_VALUE(D >= 1, op, ": q head_dim must be >= 1");
  check_caches(op, k_cache, v_cache, q, "q", D);
  check_device(op, block_table, "block_table", q.device(), "q");
  check_dtype(op, block_table, "block_table", at::kInt);
  check_shape(op, block_table, "block_table", "[B, Hkv, max_blocks_per_head]", {B, kAny, kAny});
  check_contiguous(op, block_table, "block_table");
  const int64_t Hkv = block_table.size(1);
  TORCH_CHECK_VALUE(Hkv >= 1 && Hq % Hkv == 0, op, ": q heads (", Hq,
                    ") must be a multiple of block_table's KV heads (", Hkv, ")");
  check_index(op, seq_lens, "seq_lens", "[B, Hkv]", {B, Hkv}, q.device(), "q");
  check_scale(op, scale);
  check_numel(op, q, "q size");
  check_numel(op, block_table, "block_table size");
  check_supported(op, Op::kSparseDecode, q, "q", D, k_cache.size(1));
  check_kv(op, Op::kSparseDecode, q, k_cache, k_scale, v_scale);
  SparseDecodeParams p;
  p.q = q.data_ptr();
  p.q_stride_b = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.kv = kv_pool(k_cache, v_cache, Hkv);
  set_scales(p.kv, k_scale, v_scale);
  p.act_dtype = dtype_of(q, "q");
  p.pages = page_table(block_table, seq_lens);
  p.batch = int(B);
  p.num_q_heads = int(Hq);
  p.scale = float(scale);
  return p;
}

EvictionRopeParams eviction_rope_params(const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& positions,
                                        const at::Tensor& cos_sin_cache, double alpha_scale,
                                        double alpha_offset,
                                        const std::optional<at::Tensor>& q_norm_weight,
                                        const std::optional<at::Tensor>& k_norm_weight,
                                        double norm_eps) {
  const char* op = "eviction_rope";
  const QKSizes s = check_rope_qk(op, Op::kEvictionRope, q, k, "T");
  const int64_t T = s.n, Hq = s.Hq, Hkv = s.Hkv, D = s.D;
  check_device(op, positions, "positions", q.device(), "q");
  TORCH_CHECK_VALUE(positions.scalar_type() == at::kInt || positions.scalar_type() == at::kLong,
                    op, ": positions must be int32 or int64, got ", positions.scalar_type());
  check_shape(op, positions, "positions", "[T]", {T});
  check_contiguous(op, positions, "positions");
  check_cos_sin(op, cos_sin_cache, q, D);
  check_rope_scalars(op, alpha_scale, alpha_offset, norm_eps);
  check_numel(op, q, "q size");
  check_numel(op, cos_sin_cache, "cos_sin_cache size");
  EvictionRopeParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.positions = positions.data_ptr();
  p.positions_is_int64 = positions.scalar_type() == at::kLong;
  p.cos_sin_cache = cos_sin_cache.data_ptr<float>();
  p.num_tokens = int(T);
  p.num_q_heads = int(Hq);
  p.num_kv_heads = int(Hkv);
  p.head_dim = int(D);
  p.max_position = int(cos_sin_cache.size(0));
  p.alpha_scale = float(alpha_scale);
  p.alpha_offset = float(alpha_offset);
  p.dtype = dtype_of(q, "q");
  p.q_norm_weight = norm_weight(op, q_norm_weight, "q_norm_weight", q, D);
  p.k_norm_weight = norm_weight(op, k_norm_weight, "k_norm_weight", q, D);
  p.norm_eps = float(norm_eps);
  return p;
}

namespace {

// Checks shared by append and sparse_prefill: the packed chunk tensors and the per-row state.
struct Packed {
  int64_t T, Hkv, D, n;
};

Packed check_packed(const char* op, Op id, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& logits, const at::Tensor& seq_slots,
                    const at::Tensor& cu_seqlens, const at::Tensor& k_cache,
                    const at::Tensor& v_cache, const at::Tensor& block_table,
                    const at::Tensor& seq_lens, const at::Tensor& ring,
                    const at::Tensor& num_tokens, const at::Tensor* free_stack,
                    const at::Tensor* free_top, double k_scale, double v_scale) {
  check_float_tensor(op, k, "k");
  TORCH_CHECK_VALUE(k.dim() == 3, op, ": k must have shape [T, Hkv, D], got ", shape_str(k.sizes()));
  check_contiguous(op, k, "k");
  Packed s{};
  s.T = k.size(0);
  s.Hkv = k.size(1);
  s.D = k.size(2);
  TORCH_CHECK_VALUE(s.Hkv >= 1 && s.D >= 1, op, ": k must have Hkv >= 1 and D >= 1, got ",
                    shape_str(k.sizes()));
  const auto dev = k.device();
  check_device(op, v, "v", dev, "k");
  check_dtype(op, v, "v", k.scalar_type());
  check_shape(op, v, "v", "[T, Hkv, D]", {s.T, s.Hkv, s.D});
  check_contiguous(op, v, "v");
  check_device(op, logits, "logits", dev, "k");
  check_dtype(op, logits, "logits", at::kFloat);
  check_shape(op, logits, "logits", "[T, Hkv]", {s.T, s.Hkv});
  check_contiguous(op, logits, "logits");
  check_index(op, seq_slots, "seq_slots", "[n]", {kAny}, dev, "k");
  s.n = seq_slots.size(0);
  check_index(op, cu_seqlens, "cu_seqlens", "[n + 1]", {s.n + 1}, dev, "k");
  check_caches(op, k_cache, v_cache, k, "k", s.D);
  check_state(op, dev, "k", "k", s.Hkv, block_table, seq_lens, ring, num_tokens, free_stack,
              free_top, k_cache.size(0));
  check_numel(op, k, "k size");
  check_supported(op, id, k, "k", s.D, k_cache.size(1));
  check_kv(op, id, k, k_cache, k_scale, v_scale);
  return s;
}

// The chunk inputs and the shared pieces of append and sparse_prefill.
template <typename P>
void set_packed(P& p, const at::Tensor& k, const at::Tensor& v, const at::Tensor& logits,
                const at::Tensor& seq_slots, const at::Tensor& cu_seqlens,
                const at::Tensor& k_cache, const at::Tensor& v_cache,
                const at::Tensor& block_table, const at::Tensor& seq_lens,
                const at::Tensor& ring, const at::Tensor& num_tokens, const Packed& s,
                double k_scale, double v_scale) {
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.logits = logits.data_ptr<float>();
  p.rows = seq_slots.data_ptr<int32_t>();
  p.cu_seqlens = cu_seqlens.data_ptr<int32_t>();
  p.num_seqs = int(s.n);
  p.total_tokens = int(s.T);
  p.kv = kv_pool(k_cache, v_cache, s.Hkv);
  set_scales(p.kv, k_scale, v_scale);
  p.act_dtype = dtype_of(k, "k");
  p.state = dms_state(block_table, seq_lens, ring, num_tokens);
}

}  // namespace

AppendParams append_params(const at::Tensor& k, const at::Tensor& v, const at::Tensor& logits,
                           const at::Tensor& seq_slots, const at::Tensor& cu_seqlens,
                           const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_table, const at::Tensor& seq_lens,
                           const at::Tensor& ring, const at::Tensor& num_tokens,
                           const at::Tensor& free_stack, const at::Tensor& free_top,
                           double k_scale, double v_scale) {
  const char* op = "append";
  const Packed s = check_packed(op, Op::kAppend, k, v, logits, seq_slots, cu_seqlens, k_cache,
                                v_cache, block_table, seq_lens, ring, num_tokens, &free_stack,
                                &free_top, k_scale, v_scale);
  AppendParams p;
  set_packed(p, k, v, logits, seq_slots, cu_seqlens, k_cache, v_cache, block_table, seq_lens,
             ring, num_tokens, s, k_scale, v_scale);
  p.free = free_list(free_stack, free_top);
  return p;
}

SparsePrefillParams sparse_prefill_params(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& logits,
    const at::Tensor& seq_slots, const at::Tensor& cu_seqlens, const at::Tensor& k_cache,
    const at::Tensor& v_cache, const at::Tensor& block_table, const at::Tensor& seq_lens,
    const at::Tensor& ring, const at::Tensor& num_tokens, double scale, double k_scale,
    double v_scale) {
  const char* op = "sparse_prefill";
  const Packed s = check_packed(op, Op::kSparsePrefill, k, v, logits, seq_slots, cu_seqlens,
                                k_cache, v_cache, block_table, seq_lens, ring, num_tokens, nullptr,
                                nullptr, k_scale, v_scale);
  check_device(op, q, "q", k.device(), "k");
  check_dtype(op, q, "q", k.scalar_type());
  check_shape(op, q, "q", "[T, Hq, D]", {s.T, kAny, s.D});
  check_contiguous(op, q, "q");
  const int64_t Hq = q.size(1);
  TORCH_CHECK_VALUE(Hq >= 1 && Hq % s.Hkv == 0, op, ": q heads (", Hq,
                    ") must be a multiple of k heads (", s.Hkv, ")");
  check_scale(op, scale);
  check_numel(op, q, "q size");
  SparsePrefillParams p;
  set_packed(p, k, v, logits, seq_slots, cu_seqlens, k_cache, v_cache, block_table, seq_lens,
             ring, num_tokens, s, k_scale, v_scale);
  p.q = q.data_ptr();
  p.num_q_heads = int(Hq);
  p.scale = float(scale);
  return p;
}

ForkParams fork_params(int64_t src, int64_t dst, const at::Tensor& k_cache,
                       const at::Tensor& v_cache, const at::Tensor& block_table,
                       const at::Tensor& seq_lens, const at::Tensor& ring,
                       const at::Tensor& num_tokens, const at::Tensor& free_stack,
                       const at::Tensor& free_top) {
  const char* op = "fork";
  const auto kdt = k_cache.scalar_type();
  TORCH_CHECK_VALUE(kdt == at::kFloat || kdt == at::kHalf || kdt == at::kBFloat16 ||
                        kdt == at::kFloat8_e4m3fn,
                    op, ": k_cache must be float32, float16, bfloat16 or float8_e4m3fn, got ", kdt);
  TORCH_CHECK_VALUE(k_cache.dim() == 3, op, ": k_cache must have shape [num_blocks, block_size, D], got ",
                    shape_str(k_cache.sizes()));
  check_caches(op, k_cache, v_cache, k_cache, "k_cache", k_cache.size(2));
  const StateSizes s = check_state(op, k_cache.device(), "k_cache", "block_table", kAny,
                                   block_table, seq_lens, ring, num_tokens, &free_stack,
                                   &free_top, k_cache.size(0));
  TORCH_CHECK_VALUE(src >= 0 && src < s.S, op, ": src must be in [0, ", s.S, "), got ", src);
  TORCH_CHECK_VALUE(dst >= 0 && dst < s.S, op, ": dst must be in [0, ", s.S, "), got ", dst);
  TORCH_CHECK_VALUE(src != dst, op, ": dst must differ from src, got ", src, " for both");
  // fork copies the pool's bytes: its dtype is the pool's. An fp8 pool where the table has none
  // is NotImplementedError, as for the other ops.
  TORCH_CHECK_NOT_IMPLEMENTED(
      !is_fp8(dtype_of(k_cache, "k_cache")) ||
          supports_dtype(Op::kFork, device_kind(k_cache), DType::kFloat8E4M3),
      op, ": kv dtype (k_cache / v_cache) ", kdt, " is not implemented on ",
      device_name(device_kind(k_cache)), " (see torch.ops.dms.supported)");
  check_supported(op, Op::kFork, k_cache, "k_cache", k_cache.size(2), k_cache.size(1));
  ForkParams p;
  p.src = int(src);
  p.dst = int(dst);
  p.kv = kv_pool(k_cache, v_cache, s.Hkv);
  p.state = dms_state(block_table, seq_lens, ring, num_tokens);
  p.free = free_list(free_stack, free_top);
  return p;
}

ReleaseParams release_params(int64_t row, const at::Tensor& block_table,
                             const at::Tensor& seq_lens, const at::Tensor& ring,
                             const at::Tensor& num_tokens, const at::Tensor& free_stack,
                             const at::Tensor& free_top, int64_t block_size) {
  const char* op = "release";
  TORCH_CHECK_VALUE(free_stack.dim() == 1, op, ": free_stack must have shape [num_blocks], got ",
                    shape_str(free_stack.sizes()));
  // block_table is the reference: its device check cannot fail.
  const StateSizes s = check_state(op, block_table.device(), "block_table", "block_table", kAny,
                                   block_table, seq_lens, ring, num_tokens, &free_stack,
                                   &free_top, free_stack.size(0));
  TORCH_CHECK_VALUE(row >= 0 && row < s.S, op, ": row must be in [0, ", s.S, "), got ", row);
  TORCH_CHECK_VALUE(block_size >= 1 && block_size <= std::numeric_limits<int32_t>::max(), op,
                    ": block_size must be >= 1, got ", block_size);
  TORCH_CHECK_VALUE(supports_block_size(Op::kRelease, device_kind(block_table), int(block_size)),
                    op, ": block_size must be ",
                    capability(Op::kRelease, device_kind(block_table)).block_sizes_text, ", got ",
                    block_size);
  ReleaseParams p;
  p.row = int(row);
  // No K/V tensors: the pool's sizes only (see ReleaseParams).
  p.kv.num_blocks = int(free_stack.size(0));
  p.kv.block_size = int(block_size);
  p.kv.num_kv_heads = int(s.Hkv);
  p.state = dms_state(block_table, seq_lens, ring, num_tokens);
  p.free = free_list(free_stack, free_top);
  return p;
}

DecodeStepParams decode_step_params(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos_sin_cache,
    const at::Tensor& seq_slots, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& block_table, const at::Tensor& seq_lens, const at::Tensor& ring,
    const at::Tensor& num_tokens, const at::Tensor& free_stack, const at::Tensor& free_top,
    double alpha_scale, double alpha_offset, const std::optional<at::Tensor>& q_norm_weight,
    const std::optional<at::Tensor>& k_norm_weight, double norm_eps,
    const std::optional<at::Tensor>& logits, double k_scale, double v_scale) {
  const char* op = "decode_step";
  const QKSizes qk = check_rope_qk(op, Op::kDecodeStep, q, k, "B");
  const int64_t B = qk.n, Hq = qk.Hq, Hkv = qk.Hkv, D = qk.D;
  const auto dev = q.device();
  check_device(op, v, "v", dev, "q");
  check_dtype(op, v, "v", q.scalar_type());
  check_shape(op, v, "v", "[B, Hkv, D]", {B, Hkv, D});
  check_contiguous(op, v, "v");
  check_cos_sin(op, cos_sin_cache, q, D);
  check_index(op, seq_slots, "seq_slots", "[B]", {B}, dev, "q");
  check_caches(op, k_cache, v_cache, q, "q", D);
  check_state(op, dev, "q", "q", Hkv, block_table, seq_lens, ring, num_tokens, &free_stack,
              &free_top, k_cache.size(0));
  check_rope_scalars(op, alpha_scale, alpha_offset, norm_eps);
  const float* logits_in = nullptr;
  if (logits.has_value()) {
    check_device(op, *logits, "logits", dev, "q");
    check_dtype(op, *logits, "logits", at::kFloat);
    check_shape(op, *logits, "logits", "[B, Hkv]", {B, Hkv});
    check_contiguous(op, *logits, "logits");
    logits_in = logits->data_ptr<float>();
  }
  check_numel(op, q, "q size");
  check_numel(op, cos_sin_cache, "cos_sin_cache size");
  check_supported(op, Op::kDecodeStep, q, "q", 0, k_cache.size(1));
  check_kv(op, Op::kDecodeStep, q, k_cache, k_scale, v_scale);
  DecodeStepParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.cos_sin_cache = cos_sin_cache.data_ptr<float>();
  p.rows = seq_slots.data_ptr<int32_t>();
  p.logits_in = logits_in;
  p.q_norm_weight = norm_weight(op, q_norm_weight, "q_norm_weight", q, D);
  p.k_norm_weight = norm_weight(op, k_norm_weight, "k_norm_weight", q, D);
  p.norm_eps = float(norm_eps);
  p.alpha_scale = float(alpha_scale);
  p.alpha_offset = float(alpha_offset);
  p.kv = kv_pool(k_cache, v_cache, Hkv);
  set_scales(p.kv, k_scale, v_scale);
  p.act_dtype = dtype_of(q, "q");
  p.state = dms_state(block_table, seq_lens, ring, num_tokens);
  p.free = free_list(free_stack, free_top);
  p.batch = int(B);
  p.max_position = int(cos_sin_cache.size(0));
  p.num_q_heads = int(Hq);
  return p;
}

std::tuple<at::Tensor, at::Tensor> sparse_decode_outputs(SparseDecodeParams& p,
                                                         const at::Tensor& q, bool want_lse) {
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1)}, q.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  p.o_stride_b = out.stride(0);
  p.o_stride_h = out.stride(1);
  p.lse = want_lse ? lse.data_ptr<float>() : nullptr;
  return {out, lse};
}

at::Tensor eviction_logits_output(const at::Tensor& q, const at::Tensor& k) {
  return at::empty({q.size(0), k.size(1)}, q.options().dtype(at::kFloat));
}

}  // namespace torch_ext
}  // namespace dms
