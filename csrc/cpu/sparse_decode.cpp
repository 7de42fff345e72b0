// CPU twin of dms::sparse_decode: per (row, query head), a two-pass softmax over the slots of
// its KV head, float64 accumulation. Slow on purpose: it is the thing the kernels are checked
// against.
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/convert.h"
#include "cpu/validate.h"
#include "dms/cpu.h"

namespace dms {
namespace cpu {

Status sparse_decode(const SparseDecodeParams& p) {
  detail::clear_error();
  const DType act = compute_dtype(p.kv, p.act_dtype);  // q / out
  if (p.batch < 0 || p.num_q_heads < 0 || !valid_sizes(p.kv) || p.pages.max_blocks_per_head < 0 ||
      p.num_q_heads % p.kv.num_kv_heads != 0 ||
      !supports_dtype(Op::kSparseDecode, Device::kCPU, act) ||
      !supports_kv_dtype(Op::kSparseDecode, Device::kCPU, act, p.kv.dtype) ||
      !valid_scales(p.kv)) {
    return Status::kInvalidArgument;
  }
  if (p.batch == 0 || p.num_q_heads == 0) return Status::kSuccess;
  if (!p.q || !has_pointers(p.kv) || !has_pointers(p.pages) || !p.out) {
    return Status::kInvalidArgument;
  }
  const int G = p.num_q_heads / p.kv.num_kv_heads, D = p.kv.head_dim, bs = p.kv.block_size;
  // Validate every length and referenced block before writing anything.
  const Status st = detail::check_data(validate_params(p));
  if (st != Status::kSuccess) return st;
  std::vector<double> qv(D), acc(D), scores;
  for (int b = 0; b < p.batch; ++b) {
    for (int g = 0; g < p.kv.num_kv_heads; ++g) {
      const int n = p.pages.seq_lens[int64_t(b) * p.kv.num_kv_heads + g];
      const int32_t* bt =
          p.pages.block_table + (int64_t(b) * p.kv.num_kv_heads + g) * p.pages.max_blocks_per_head;
      scores.assign(n, 0.0);
      for (int hh = 0; hh < G; ++hh) {
        const int h = g * G + hh;
        const int64_t qoff = b * p.q_stride_b + h * p.q_stride_h;
        const int64_t ooff = b * p.o_stride_b + h * p.o_stride_h;
        for (int d = 0; d < D; ++d) qv[d] = load(p.q, qoff + d, act);
        double m = -std::numeric_limits<double>::infinity();
        for (int i = 0; i < n; ++i) {
          const int64_t row = (int64_t(bt[i / bs]) * bs + i % bs) * D;
          double s = 0.0;
          for (int d = 0; d < D; ++d) s += qv[d] * load_kv(p.kv.k_cache, row + d, p.kv.dtype, p.kv.k_scale);
          scores[i] = s * p.scale;
          m = std::max(m, scores[i]);
        }
        double l = 0.0;
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int i = 0; i < n; ++i) {
          const double e = std::exp(scores[i] - m);
          l += e;
          const int64_t row = (int64_t(bt[i / bs]) * bs + i % bs) * D;
          for (int d = 0; d < D; ++d) acc[d] += e * load_kv(p.kv.v_cache, row + d, p.kv.dtype, p.kv.v_scale);
        }
        // An empty head has no keys: zeros out, lse = -inf (the identity of an lse merge).
        for (int d = 0; d < D; ++d) store(p.out, ooff + d, act, n ? float(acc[d] / l) : 0.f);
        if (p.lse) {
          p.lse[int64_t(b) * p.num_q_heads + h] =
              n ? float(m + std::log(l)) : -std::numeric_limits<float>::infinity();
        }
      }
    }
  }
  return Status::kSuccess;
}

}  // namespace cpu
}  // namespace dms
