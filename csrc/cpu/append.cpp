// CPU twin of dms::append: the ring bookkeeping of docs/semantics.md, token by token.
// All-or-nothing: every check (sizes, state consistency, blocks needed) runs on a dry run
// before the first write, so an error leaves the state exactly as it was.
#include <cstring>
#include <vector>

#include "cpu/convert.h"
#include "cpu/validate.h"
#include "dms/cpu.h"

namespace dms {
namespace cpu {

namespace {

struct HeadState {
  int32_t* ring;      // [window + 1]
  int32_t* seq_len;
  int32_t* blocks;    // [max_blocks_per_head]
};

// Runs the DMS rule for tokens [n0, n0 + len) of one (row, head), counting the blocks it pops
// and calling on_slot(i, slot, reused) per token. The dry run runs it on copies of the ring and
// seq_len; kInvalidArgument when the page list would overflow (or a reused slot is out of range,
// which the ring check before it rules out).
template <typename OnSlot>
Status run_head(const AppendParams& p, int32_t* ring, int32_t& seq_len, int n0, int len,
                const float* logits, int* new_blocks, OnSlot on_slot) {
  const int W = p.state.window, R = p.state.window + 1;
  for (int i = 0; i < len; ++i) {
    const int t = n0 + i;
    const bool flag_prev = logits[int64_t(i) * p.kv.num_kv_heads] > 0.f;
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
      if (int64_t(slot) >= int64_t(p.state.pages.max_blocks_per_head) * p.kv.block_size) {
        return Status::kInvalidArgument;
      }
      ++seq_len;
      if (slot % p.kv.block_size == 0) ++*new_blocks;
    }
    on_slot(i, slot, t >= W + 1 && (old & 1));
    ring[t % R] = slot << 1;
  }
  return Status::kSuccess;
}

}  // namespace

Status append(const AppendParams& p) {
  detail::clear_error();
  const DType act = compute_dtype(p.kv, p.act_dtype);  // k / v
  if (p.num_seqs < 0 || p.total_tokens < 0 || !valid_sizes(p.kv) || !valid_sizes(p.state) ||
      !supports_dtype(Op::kAppend, Device::kCPU, act) ||
      !supports_kv_dtype(Op::kAppend, Device::kCPU, act, p.kv.dtype) || !valid_scales(p.kv)) {
    return Status::kInvalidArgument;
  }
  if (p.num_seqs == 0) return p.total_tokens == 0 ? Status::kSuccess : Status::kInvalidArgument;
  if (!p.rows || !p.cu_seqlens || !has_pointers(p.state) || !has_pointers(p.free) ||
      (p.total_tokens > 0 && (!p.k || !p.v || !p.logits || !has_pointers(p.kv)))) {
    return Status::kInvalidArgument;
  }
  const int H = p.kv.num_kv_heads, R = p.state.window + 1, M = p.state.pages.max_blocks_per_head;
  const int bs = p.kv.block_size;
  // Packing, rows, their pages and ring entries, the free list: every check before a write.
  // (num_tokens + each chunk fitting int32 included.)
  Status st = detail::check_data(validate_params(p));
  if (st != Status::kSuccess) return st;
  const int32_t* rows = p.rows;
  const int free_top = *p.free.top;

  // Dry run on copies: blocks needed, and room in every page list.
  int64_t need = 0;
  std::vector<int32_t> ring_copy(R);
  for (int c = 0; c < p.num_seqs; ++c) {
    const int row = rows[c], start = p.cu_seqlens[c], len = p.cu_seqlens[c + 1] - start;
    for (int g = 0; g < H; ++g) {
      const int64_t rh = int64_t(row) * H + g;
      int32_t seq_len = p.state.pages.seq_lens[rh];
      std::memcpy(ring_copy.data(), p.state.ring + rh * R, sizeof(int32_t) * R);
      int nb = 0;
      st = run_head(p, ring_copy.data(), seq_len, p.state.num_tokens[row], len,
                    p.logits + int64_t(start) * H + g, &nb, [](int, int, bool) {});
      if (st != Status::kSuccess) {
        return detail::refuse(st, "row ", row, ", KV head ", g,
                              ": the chunk needs more than max_blocks_per_head * block_size = ",
                              int64_t(M) * bs, " slots");
      }
      need += nb;
    }
  }
  if (need > free_top) {
    return detail::refuse(Status::kOutOfBlocks, "needs ", need, " blocks, ", free_top, " free");
  }

  // Commit.
  const int64_t D = p.kv.head_dim, es = dtype_size(p.kv.dtype);
  const bool same = act == p.kv.dtype;  // a byte copy; else quantized element by element
  int32_t* top = p.free.top;
  for (int c = 0; c < p.num_seqs; ++c) {
    const int row = p.rows[c], start = p.cu_seqlens[c], len = p.cu_seqlens[c + 1] - start;
    for (int g = 0; g < H; ++g) {
      const int64_t rh = int64_t(row) * H + g;
      int32_t* blocks = p.state.pages.block_table + rh * M;
      int nb = 0;
      run_head(p, p.state.ring + rh * R, p.state.pages.seq_lens[rh], p.state.num_tokens[row], len,
               p.logits + int64_t(start) * H + g, &nb, [&](int i, int slot, bool reused) {
                 if (!reused && slot % bs == 0) blocks[slot / bs] = p.free.stack[--*top];
                 const int64_t dst = (int64_t(blocks[slot / bs]) * bs + slot % bs) * D;
                 const int64_t src = ((int64_t(start) + i) * H + g) * D;
                 if (same) {
                   std::memcpy(static_cast<char*>(p.kv.k_cache) + dst * es,
                               static_cast<const char*>(p.k) + src * es, size_t(D * es));
                   std::memcpy(static_cast<char*>(p.kv.v_cache) + dst * es,
                               static_cast<const char*>(p.v) + src * es, size_t(D * es));
                   return;
                 }
                 for (int64_t d = 0; d < D; ++d) {
                   store_kv(p.kv.k_cache, dst + d, p.kv.dtype, p.kv.k_scale,
                            load(p.k, src + d, act));
                   store_kv(p.kv.v_cache, dst + d, p.kv.dtype, p.kv.v_scale,
                            load(p.v, src + d, act));
                 }
               });
    }
    p.state.num_tokens[row] += len;
  }
  return Status::kSuccess;
}

}  // namespace cpu
}  // namespace dms
