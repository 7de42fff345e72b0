// CPU twin of dms::sparse_decode: per (row, query head), a two-pass softmax over the slots of
// its KV head, float64 accumulation. Slow on purpose: it is the thing the kernels are checked
// against.
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/convert.h"
#include "dms/cpu.h"

namespace dms {
namespace cpu {

Status sparse_decode(const SparseDecodeParams& p) {
  if (p.batch < 0 || p.num_q_heads < 0 || p.num_kv_heads <= 0 || p.head_dim <= 0 ||
      p.block_size <= 0 || p.max_blocks_per_head < 0 || p.num_blocks < 0 ||
      p.num_q_heads % p.num_kv_heads != 0 || !valid_dtype(p.dtype)) {
    return Status::kInvalidArgument;
  }
  if (p.batch == 0 || p.num_q_heads == 0) return Status::kSuccess;
  if (!p.q || !p.k_cache || !p.v_cache || !p.block_table || !p.seq_lens || !p.out) {
    return Status::kInvalidArgument;
  }
  const int G = p.num_q_heads / p.num_kv_heads, D = p.head_dim, bs = p.block_size;
  const int64_t cap = int64_t(p.max_blocks_per_head) * bs;
  // Validate every length and referenced block before writing anything.
  for (int b = 0; b < p.batch; ++b) {
    for (int g = 0; g < p.num_kv_heads; ++g) {
      const int n = p.seq_lens[int64_t(b) * p.num_kv_heads + g];
      if (n < 0 || n > cap) return Status::kInvalidArgument;
      const int32_t* bt = p.block_table + (int64_t(b) * p.num_kv_heads + g) * p.max_blocks_per_head;
      for (int i = 0; i < (n + bs - 1) / bs; ++i) {
        if (bt[i] < 0 || bt[i] >= p.num_blocks) return Status::kInvalidArgument;
      }
    }
  }
  std::vector<double> qv(D), acc(D), scores;
  for (int b = 0; b < p.batch; ++b) {
    for (int g = 0; g < p.num_kv_heads; ++g) {
      const int n = p.seq_lens[int64_t(b) * p.num_kv_heads + g];
      const int32_t* bt = p.block_table + (int64_t(b) * p.num_kv_heads + g) * p.max_blocks_per_head;
      scores.assign(n, 0.0);
      for (int hh = 0; hh < G; ++hh) {
        const int h = g * G + hh;
        const int64_t qoff = b * p.q_stride_b + h * p.q_stride_h;
        const int64_t ooff = b * p.o_stride_b + h * p.o_stride_h;
        for (int d = 0; d < D; ++d) qv[d] = load(p.q, qoff + d, p.dtype);
        double m = -std::numeric_limits<double>::infinity();
        for (int i = 0; i < n; ++i) {
          const int64_t row = (int64_t(bt[i / bs]) * bs + i % bs) * D;
          double s = 0.0;
          for (int d = 0; d < D; ++d) s += qv[d] * load(p.k_cache, row + d, p.dtype);
          scores[i] = s * p.scale;
          m = std::max(m, scores[i]);
        }
        double l = 0.0;
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int i = 0; i < n; ++i) {
          const double e = std::exp(scores[i] - m);
          l += e;
          const int64_t row = (int64_t(bt[i / bs]) * bs + i % bs) * D;
          for (int d = 0; d < D; ++d) acc[d] += e * load(p.v_cache, row + d, p.dtype);
        }
        // An empty head has no keys: zeros out, lse = -inf (the identity of an lse merge).
        for (int d = 0; d < D; ++d) store(p.out, ooff + d, p.dtype, n ? float(acc[d] / l) : 0.f);
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
