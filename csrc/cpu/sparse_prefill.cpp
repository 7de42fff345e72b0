// CPU twin of dms::sparse_prefill: for each chunk and KV head, list every key a query of the
// chunk could see (cached slots tagged with their position when still in the ring, then the
// chunk's own keys), and apply the visibility rule (docs/semantics.md section 4) per pair. float64
// math.
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/convert.h"
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
  if (p.num_seqs < 0 || p.total_tokens < 0 || p.max_seqs < 0 || p.num_q_heads <= 0 ||
      p.num_kv_heads <= 0 || p.num_q_heads % p.num_kv_heads != 0 || p.head_dim <= 0 ||
      p.block_size <= 0 || p.max_blocks_per_head < 0 || p.num_blocks < 0 || p.window < 1 ||
      !valid_dtype(p.dtype)) {
    return Status::kInvalidArgument;
  }
  if (p.num_seqs == 0) return p.total_tokens == 0 ? Status::kSuccess : Status::kInvalidArgument;
  if (!p.q || !p.k || !p.v || !p.logits || !p.seq_slots || !p.cu_seqlens || !p.block_table ||
      !p.seq_lens || !p.ring || !p.num_tokens || !p.out) {
    return Status::kInvalidArgument;
  }
  const int H = p.num_kv_heads, Hq = p.num_q_heads, G = Hq / H, D = p.head_dim;
  const int W = p.window, R = W + 1, M = p.max_blocks_per_head, bs = p.block_size;
  if (p.cu_seqlens[0] != 0 || p.cu_seqlens[p.num_seqs] != p.total_tokens) {
    return Status::kInvalidArgument;
  }
  std::vector<char> seen(p.max_seqs, 0);
  for (int c = 0; c < p.num_seqs; ++c) {
    const int row = p.seq_slots[c];
    if (p.cu_seqlens[c + 1] <= p.cu_seqlens[c]) return Status::kInvalidArgument;
    if (row < 0 || row >= p.max_seqs || seen[row] || p.num_tokens[row] < 0) {
      return Status::kInvalidArgument;
    }
    seen[row] = 1;
    for (int g = 0; g < H; ++g) {
      const int64_t rh = int64_t(row) * H + g;
      const int n = p.seq_lens[rh];
      if (n < 0 || int64_t(n) > int64_t(M) * bs) return Status::kInvalidArgument;
      if (n > 0 && (!p.k_cache || !p.v_cache)) return Status::kInvalidArgument;
      for (int b = 0; b < (n + bs - 1) / bs; ++b) {
        if (p.block_table[rh * M + b] < 0 || p.block_table[rh * M + b] >= p.num_blocks) {
          return Status::kInvalidArgument;
        }
      }
      const int n0 = p.num_tokens[row];
      for (int64_t j = std::max(0, n0 - R); j < n0; ++j) {
        const int slot = p.ring[rh * R + j % R] >> 1;
        if (slot < 0 || slot >= n) return Status::kInvalidArgument;
      }
    }
  }

  std::vector<Key> keys;
  std::vector<int64_t> slot_pos;
  std::vector<char> slot_flag;
  std::vector<double> qv(D), acc(D), scores;
  for (int c = 0; c < p.num_seqs; ++c) {
    const int row = p.seq_slots[c], start = p.cu_seqlens[c], len = p.cu_seqlens[c + 1] - start;
    const int n0 = p.num_tokens[row];
    for (int g = 0; g < H; ++g) {
      const int64_t rh = int64_t(row) * H + g;
      const int n = p.seq_lens[rh];
      const int32_t* bt = p.block_table + rh * M;
      // Cached slots referenced by the ring hold the last min(n0, w+1) positions; every other
      // slot is an older survivor (unflagged, so visible forever).
      slot_pos.assign(n, -1);
      slot_flag.assign(n, 0);
      for (int64_t j = std::max(0, n0 - R); j < n0; ++j) {
        const int32_t e = p.ring[rh * R + j % R];
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
          for (int d = 0; d < D; ++d) qv[d] = load(p.q, qoff + d, p.dtype);
          double m = -std::numeric_limits<double>::infinity();
          for (size_t k = 0; k < keys.size(); ++k) {
            const Key& key = keys[k];
            const bool visible =
                key.pos < 0 || (key.pos <= t && (t - key.pos <= W || !key.flag));
            if (!visible) {
              scores[k] = -std::numeric_limits<double>::infinity();
              continue;
            }
            const void* kb = key.cached ? p.k_cache : p.k;
            double s = 0.0;
            for (int d = 0; d < D; ++d) s += qv[d] * load(kb, key.row + d, p.dtype);
            scores[k] = s * p.scale;
            m = std::max(m, scores[k]);
          }
          double l = 0.0;
          std::fill(acc.begin(), acc.end(), 0.0);
          for (size_t k = 0; k < keys.size(); ++k) {
            if (scores[k] == -std::numeric_limits<double>::infinity()) continue;
            const double e = std::exp(scores[k] - m);
            l += e;
            const void* vb = keys[k].cached ? p.v_cache : p.v;
            for (int d = 0; d < D; ++d) acc[d] += e * load(vb, keys[k].row + d, p.dtype);
          }
          // A query always sees itself, so l > 0.
          for (int d = 0; d < D; ++d) store(p.out, qoff + d, p.dtype, float(acc[d] / l));
        }
      }
    }
  }
  return Status::kSuccess;
}

}  // namespace cpu
}  // namespace dms
