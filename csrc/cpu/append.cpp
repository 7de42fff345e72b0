// CPU twin of dms::append: the ring bookkeeping of docs/semantics.md, token by token.
// All-or-nothing: every check (sizes, state consistency, blocks needed) runs on a dry run
// before the first write, so an error leaves the state exactly as it was.
#include <cstring>
#include <vector>

#include "cpu/convert.h"
#include "dms/cpu.h"

namespace dms {
namespace cpu {

namespace {

struct HeadState {
  int32_t* ring;      // [window + 1]
  int32_t* seq_len;
  int32_t* blocks;    // [max_blocks_per_head]
};

// Runs the DMS rule for tokens [n0, n0 + len) of one (row, head). With `commit` false it only
// counts the blocks it would pop (on copies of ring and seq_len) and validates the state.
template <typename OnSlot>
Status run_head(const AppendParams& p, int32_t* ring, int32_t& seq_len, int n0, int len,
                const float* logits, int* new_blocks, OnSlot on_slot) {
  const int W = p.window, R = p.window + 1;
  for (int i = 0; i < len; ++i) {
    const int t = n0 + i;
    const bool flag_prev = logits[int64_t(i) * p.num_kv_heads] > 0.f;
    if (t >= 1) {
      int32_t& e = ring[(t - 1) % R];
      e = (e & ~1) | int32_t(flag_prev);
    }
    int slot;
    const int32_t old = ring[t % R];
    if (t >= W + 1 && (old & 1)) {
      // Token t - (w+1) was flagged and has just left the window of every later query:
      // t takes over its slot, so memory never holds an invisible key.
      slot = old >> 1;
      if (slot < 0 || slot >= seq_len) return Status::kInvalidArgument;
    } else {
      slot = seq_len;
      if (int64_t(slot) >= int64_t(p.max_blocks_per_head) * p.block_size) {
        return Status::kInvalidArgument;
      }
      ++seq_len;
      if (slot % p.block_size == 0) ++*new_blocks;
    }
    on_slot(i, slot, t >= W + 1 && (old & 1));
    ring[t % R] = slot << 1;
  }
  return Status::kSuccess;
}

}  // namespace

Status append(const AppendParams& p) {
  if (p.num_seqs < 0 || p.total_tokens < 0 || p.max_seqs < 0 || p.num_kv_heads <= 0 ||
      p.head_dim <= 0 || p.block_size <= 0 || p.max_blocks_per_head < 0 || p.num_blocks < 0 ||
      p.window < 1 || !valid_dtype(p.dtype)) {
    return Status::kInvalidArgument;
  }
  if (p.num_seqs == 0) return p.total_tokens == 0 ? Status::kSuccess : Status::kInvalidArgument;
  if (!p.seq_slots || !p.cu_seqlens || !p.block_table || !p.seq_lens || !p.ring ||
      !p.num_tokens || !p.free_stack || !p.free_top ||
      (p.total_tokens > 0 && (!p.k || !p.v || !p.logits || !p.k_cache || !p.v_cache))) {
    return Status::kInvalidArgument;
  }
  const int H = p.num_kv_heads, R = p.window + 1, M = p.max_blocks_per_head, bs = p.block_size;
  // Packing: chunks tile [0, total_tokens) in order, each at least one token, rows distinct.
  if (p.cu_seqlens[0] != 0 || p.cu_seqlens[p.num_seqs] != p.total_tokens) {
    return Status::kInvalidArgument;
  }
  std::vector<char> seen(p.max_seqs, 0);
  for (int c = 0; c < p.num_seqs; ++c) {
    const int row = p.seq_slots[c];
    if (p.cu_seqlens[c + 1] <= p.cu_seqlens[c]) return Status::kInvalidArgument;
    if (row < 0 || row >= p.max_seqs || seen[row]) return Status::kInvalidArgument;
    seen[row] = 1;
    if (p.num_tokens[row] < 0 ||
        int64_t(p.num_tokens[row]) + (p.cu_seqlens[c + 1] - p.cu_seqlens[c]) > INT32_MAX) {
      return Status::kInvalidArgument;
    }
  }
  const int free_top = *p.free_top;
  if (free_top < 0 || free_top > p.num_blocks) return Status::kInvalidArgument;

  // Dry run: blocks needed and state sanity, on copies.
  int64_t need = 0;
  std::vector<int32_t> ring_copy(R);
  for (int c = 0; c < p.num_seqs; ++c) {
    const int row = p.seq_slots[c], start = p.cu_seqlens[c], len = p.cu_seqlens[c + 1] - start;
    for (int g = 0; g < H; ++g) {
      const int64_t rh = int64_t(row) * H + g;
      int32_t seq_len = p.seq_lens[rh];
      if (seq_len < 0 || int64_t(seq_len) > int64_t(M) * bs) return Status::kInvalidArgument;
      for (int b = 0; b < (seq_len + bs - 1) / bs; ++b) {
        const int32_t blk = p.block_table[rh * M + b];
        if (blk < 0 || blk >= p.num_blocks) return Status::kInvalidArgument;
      }
      std::memcpy(ring_copy.data(), p.ring + rh * R, sizeof(int32_t) * R);
      int nb = 0;
      Status s = run_head(p, ring_copy.data(), seq_len, p.num_tokens[row], len,
                          p.logits + int64_t(start) * H + g, &nb, [](int, int, bool) {});
      if (s != Status::kSuccess) return s;
      need += nb;
    }
  }
  if (need > free_top) return Status::kOutOfBlocks;
  for (int i = free_top - int(need); i < free_top; ++i) {
    if (p.free_stack[i] < 0 || p.free_stack[i] >= p.num_blocks) return Status::kInvalidArgument;
  }

  // Commit.
  const int64_t D = p.head_dim, es = dtype_size(p.dtype);
  int32_t* top = p.free_top;
  for (int c = 0; c < p.num_seqs; ++c) {
    const int row = p.seq_slots[c], start = p.cu_seqlens[c], len = p.cu_seqlens[c + 1] - start;
    for (int g = 0; g < H; ++g) {
      const int64_t rh = int64_t(row) * H + g;
      int32_t* blocks = p.block_table + rh * M;
      int nb = 0;
      run_head(p, p.ring + rh * R, p.seq_lens[rh], p.num_tokens[row], len,
               p.logits + int64_t(start) * H + g, &nb, [&](int i, int slot, bool reused) {
                 if (!reused && slot % bs == 0) blocks[slot / bs] = p.free_stack[--*top];
                 const int64_t dst = (int64_t(blocks[slot / bs]) * bs + slot % bs) * D * es;
                 const int64_t src = ((int64_t(start) + i) * H + g) * D * es;
                 std::memcpy(static_cast<char*>(p.k_cache) + dst,
                             static_cast<const char*>(p.k) + src, size_t(D * es));
                 std::memcpy(static_cast<char*>(p.v_cache) + dst,
                             static_cast<const char*>(p.v) + src, size_t(D * es));
               });
    }
    p.num_tokens[row] += len;
  }
  return Status::kSuccess;
}

}  // namespace cpu
}  // namespace dms
