// CPU twin of dms::sparse_prefill: for each chunk and KV head, list every key a query of the
// chunk could see (cached slots tagged with their position when still in the ring, then the
// chunk's own keys), and apply the visibility rule (docs/semantics.md section 4) per pair. float64
// math.
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/convert.h"
#include "cpu/validate.h"
#include "dms/cpu.h"

namespace dms {
namespace cpu {

namespace {
struct Key {
  int64_t row;   // element offset of the key / value vector (cache or chunk)
  bool cached;
  int64_t pos;   // absolute position; -1: an older survivor, visible to every later query
  bool flag;     // d_pos (eviction decision), meaningful when pos >= 0
};
}  // namespace

Status sparse_prefill(const SparsePrefillParams& p) {
  detail::clear_error();
  const DType act = compute_dtype(p.kv, p.act_dtype);  // q / k / v / out
  if (p.num_seqs < 0 || p.total_tokens < 0 || p.num_q_heads <= 0 || !valid_sizes(p.kv) ||
      !valid_sizes(p.state) || p.num_q_heads % p.kv.num_kv_heads != 0 ||
      !supports_dtype(Op::kSparsePrefill, Device::kCPU, act) ||
      !supports_kv_dtype(Op::kSparsePrefill, Device::kCPU, act, p.kv.dtype) ||
      !valid_scales(p.kv)) {
    return Status::kInvalidArgument;
  }
  if (p.num_seqs == 0) return p.total_tokens == 0 ? Status::kSuccess : Status::kInvalidArgument;
  if (!p.q || !p.k || !p.v || !p.logits || !p.rows || !p.cu_seqlens || !has_pointers(p.state) ||
      !p.out) {
    return Status::kInvalidArgument;
  }
  const int H = p.kv.num_kv_heads, Hq = p.num_q_heads, G = Hq / H, D = p.kv.head_dim;
  const int W = p.state.window, R = W + 1, M = p.state.pages.max_blocks_per_head;
  const int bs = p.kv.block_size;
  const Status st = detail::check_data(validate_params(p));
  if (st != Status::kSuccess) return st;
  for (int c = 0; c < p.num_seqs; ++c) {
    const int row = p.rows[c];
    for (int g = 0; g < H; ++g) {
      if (p.state.pages.seq_lens[int64_t(row) * H + g] > 0 && !has_pointers(p.kv)) {
        return Status::kInvalidArgument;
      }
    }
  }

  std::vector<Key> keys;
  std::vector<int64_t> slot_pos;
  std::vector<char> slot_flag;
  std::vector<double> qv(D), acc(D), scores;
  for (int c = 0; c < p.num_seqs; ++c) {
    const int row = p.rows[c], start = p.cu_seqlens[c], len = p.cu_seqlens[c + 1] - start;
    const int n0 = p.state.num_tokens[row];
    for (int g = 0; g < H; ++g) {
      const int64_t rh = int64_t(row) * H + g;
      const int n = p.state.pages.seq_lens[rh];
      const int32_t* bt = p.state.pages.block_table + rh * M;
      // Cached slots referenced by the ring hold the last min(n0, w+1) positions; every other
      // slot is an older survivor (unflagged, so visible forever).
      slot_pos.assign(n, -1);
      slot_flag.assign(n, 0);
      for (int64_t j = std::max(0, n0 - R); j < n0; ++j) {
        const int32_t e = p.state.ring[rh * R + j % R];
        slot_pos[e >> 1] = j;
        // The decision on the newest cached token arrives with this chunk's first logit.
        slot_flag[e >> 1] = j == n0 - 1 ? char(p.logits[int64_t(start) * H + g] > 0.f) : char(e & 1);
      }
      keys.clear();
      for (int s = 0; s < n; ++s) {
        keys.push_back({(int64_t(bt[s / bs]) * bs + s % bs) * D, true, slot_pos[s], slot_flag[s] != 0});
      }
      for (int i = 0; i < len; ++i) {
        const bool flag = i + 1 < len && p.logits[(int64_t(start) + i + 1) * H + g] > 0.f;
        keys.push_back({((int64_t(start) + i) * H + g) * D, false, int64_t(n0) + i, flag});
      }
      scores.assign(keys.size(), 0.0);
      for (int i = 0; i < len; ++i) {
        const int64_t t = int64_t(n0) + i;
        for (int hh = 0; hh < G; ++hh) {
          const int h = g * G + hh;
          const int64_t qoff = ((int64_t(start) + i) * Hq + h) * D;
          for (int d = 0; d < D; ++d) qv[d] = load(p.q, qoff + d, act);
          double m = -std::numeric_limits<double>::infinity();
          for (size_t k = 0; k < keys.size(); ++k) {
            const Key& key = keys[k];
            const bool visible =
                key.pos < 0 || (key.pos <= t && (t - key.pos <= W || !key.flag));
            if (!visible) {
              scores[k] = -std::numeric_limits<double>::infinity();
              continue;
            }
            double s = 0.0;
            if (key.cached) {  // the pool, dequantized
              for (int d = 0; d < D; ++d) {
                s += qv[d] * load_kv(p.kv.k_cache, key.row + d, p.kv.dtype, p.kv.k_scale);
              }
            } else {  // the chunk, as given
              for (int d = 0; d < D; ++d) s += qv[d] * load(p.k, key.row + d, act);
            }
            scores[k] = s * p.scale;
            m = std::max(m, scores[k]);
          }
          double l = 0.0;
          std::fill(acc.begin(), acc.end(), 0.0);
          for (size_t k = 0; k < keys.size(); ++k) {
            if (scores[k] == -std::numeric_limits<double>::infinity()) continue;
            const double e = std::exp(scores[k] - m);
            l += e;
            const int64_t r = keys[k].row;
            if (keys[k].cached) {
              for (int d = 0; d < D; ++d) {
                acc[d] += e * load_kv(p.kv.v_cache, r + d, p.kv.dtype, p.kv.v_scale);
              }
            } else {
              for (int d = 0; d < D; ++d) acc[d] += e * load(p.v, r + d, act);
            }
          }
          // A query always sees itself, so l > 0.
          for (int d = 0; d < D; ++d) store(p.out, qoff + d, act, float(acc[d] / l));
        }
      }
    }
  }
  return Status::kSuccess;
}

}  // namespace cpu
}  // namespace dms
