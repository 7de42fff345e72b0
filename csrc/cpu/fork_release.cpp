// CPU twins of dms::fork and dms::release. Both check everything before the first write, so
// a failure (kOutOfBlocks for fork) leaves the state untouched.
#include <cstring>

#include "cpu/validate.h"
#include "dms/cpu.h"

namespace dms {
namespace cpu {


Status fork(const ForkParams& p) {
  detail::clear_error();
  if (!valid_sizes(p.kv) || !valid_sizes(p.state) || p.src < 0 || p.src >= p.state.max_seqs ||
      p.dst < 0 || p.dst >= p.state.max_seqs || p.src == p.dst ||
      !supports_dtype(Op::kFork, Device::kCPU, p.kv.dtype)) {
    return Status::kInvalidArgument;
  }
  if (!has_pointers(p.kv) || !has_pointers(p.state) || !has_pointers(p.free)) {
    return Status::kInvalidArgument;
  }
  const int H = p.kv.num_kv_heads, M = p.state.pages.max_blocks_per_head, bs = p.kv.block_size;
  const int R = p.state.window + 1;
  // src's pages and num_tokens, dst empty (a fork target is a freshly added or released row),
  // the free list and room in it for the copy (kOutOfBlocks): dms/validate.h.
  const Status st = detail::check_data(validate_params(p));
  if (st != Status::kSuccess) return st;

  const size_t block_bytes = size_t(bs) * p.kv.head_dim * dtype_size(p.kv.dtype);
  for (int g = 0; g < H; ++g) {
    const int64_t s = int64_t(p.src) * H + g, d = int64_t(p.dst) * H + g;
    const int n = p.state.pages.seq_lens[s];
    for (int b = 0; b < detail::blocks_for(n, bs); ++b) {
      const int32_t from = p.state.pages.block_table[s * M + b];
      const int32_t to = p.free.stack[--*p.free.top];
      p.state.pages.block_table[d * M + b] = to;
      std::memcpy(static_cast<char*>(p.kv.k_cache) + to * block_bytes,
                  static_cast<const char*>(p.kv.k_cache) + from * block_bytes, block_bytes);
      std::memcpy(static_cast<char*>(p.kv.v_cache) + to * block_bytes,
                  static_cast<const char*>(p.kv.v_cache) + from * block_bytes, block_bytes);
    }
    p.state.pages.seq_lens[d] = n;
    // Ring entries hold per-head slot numbers, not block ids, so they carry over unchanged.
    std::memcpy(p.state.ring + d * R, p.state.ring + s * R, sizeof(int32_t) * R);
  }
  p.state.num_tokens[p.dst] = p.state.num_tokens[p.src];
  return Status::kSuccess;
}

Status release(const ReleaseParams& p) {
  detail::clear_error();
  if (p.row < 0 || p.row >= p.state.max_seqs || p.kv.num_kv_heads <= 0 || p.kv.block_size <= 0 ||
      p.kv.num_blocks < 0 || !valid_sizes(p.state)) {
    return Status::kInvalidArgument;
  }
  if (!has_pointers(p.state) || !has_pointers(p.free)) return Status::kInvalidArgument;
  const int H = p.kv.num_kv_heads, M = p.state.pages.max_blocks_per_head, bs = p.kv.block_size;
  const int R = p.state.window + 1;
  // The row's pages, and room for its blocks on the free list: dms/validate.h.
  const Status st = detail::check_data(validate_params(p));
  if (st != Status::kSuccess) return st;
  for (int g = 0; g < H; ++g) {
    const int64_t rh = int64_t(p.row) * H + g;
    for (int b = 0; b < detail::blocks_for(p.state.pages.seq_lens[rh], bs); ++b) {
      p.free.stack[(*p.free.top)++] = p.state.pages.block_table[rh * M + b];
    }
    // -1 marks "no block": a stale id in a released row can never alias a live block.
    for (int b = 0; b < M; ++b) p.state.pages.block_table[rh * M + b] = -1;
    p.state.pages.seq_lens[rh] = 0;
    for (int i = 0; i < R; ++i) p.state.ring[rh * R + i] = 0;
  }
  p.state.num_tokens[p.row] = 0;
  return Status::kSuccess;
}

}  // namespace cpu
}  // namespace dms
