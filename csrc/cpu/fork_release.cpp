// CPU twins of dms::fork and dms::release. Both check everything before the first write, so
// a failure (kOutOfBlocks for fork) leaves the state untouched.
#include <cstring>

#include "dms/cpu.h"

namespace dms {
namespace cpu {

namespace {
int blocks_of(int seq_len, int bs) { return (seq_len + bs - 1) / bs; }
}  // namespace

Status fork(const ForkParams& p) {
  if (p.max_seqs <= 0 || p.num_kv_heads <= 0 || p.head_dim <= 0 || p.block_size <= 0 ||
      p.max_blocks_per_head < 0 || p.num_blocks < 0 || p.window < 1 || p.src < 0 ||
      p.src >= p.max_seqs || p.dst < 0 || p.dst >= p.max_seqs || p.src == p.dst ||
      (p.dtype != DType::kFloat32 && p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16)) {
    return Status::kInvalidArgument;
  }
  if (!p.k_cache || !p.v_cache || !p.block_table || !p.seq_lens || !p.ring || !p.num_tokens ||
      !p.free_stack || !p.free_top) {
    return Status::kInvalidArgument;
  }
  const int H = p.num_kv_heads, M = p.max_blocks_per_head, bs = p.block_size, R = p.window + 1;
  // dst must be empty: a fork target is a freshly added (or released) row.
  if (p.num_tokens[p.dst] != 0 || p.num_tokens[p.src] < 0) return Status::kInvalidArgument;
  int64_t need = 0;
  for (int g = 0; g < H; ++g) {
    if (p.seq_lens[int64_t(p.dst) * H + g] != 0) return Status::kInvalidArgument;
    const int n = p.seq_lens[int64_t(p.src) * H + g];
    if (n < 0 || int64_t(n) > int64_t(M) * bs) return Status::kInvalidArgument;
    for (int b = 0; b < blocks_of(n, bs); ++b) {
      const int32_t blk = p.block_table[(int64_t(p.src) * H + g) * M + b];
      if (blk < 0 || blk >= p.num_blocks) return Status::kInvalidArgument;
    }
    need += blocks_of(n, bs);
  }
  const int top = *p.free_top;
  if (top < 0 || top > p.num_blocks) return Status::kInvalidArgument;
  if (need > top) return Status::kOutOfBlocks;
  for (int i = top - int(need); i < top; ++i) {
    if (p.free_stack[i] < 0 || p.free_stack[i] >= p.num_blocks) return Status::kInvalidArgument;
  }

  const size_t block_bytes = size_t(bs) * p.head_dim * dtype_size(p.dtype);
  for (int g = 0; g < H; ++g) {
    const int64_t s = int64_t(p.src) * H + g, d = int64_t(p.dst) * H + g;
    const int n = p.seq_lens[s];
    for (int b = 0; b < blocks_of(n, bs); ++b) {
      const int32_t from = p.block_table[s * M + b];
      const int32_t to = p.free_stack[--*p.free_top];
      p.block_table[d * M + b] = to;
      std::memcpy(static_cast<char*>(p.k_cache) + to * block_bytes,
                  static_cast<const char*>(p.k_cache) + from * block_bytes, block_bytes);
      std::memcpy(static_cast<char*>(p.v_cache) + to * block_bytes,
                  static_cast<const char*>(p.v_cache) + from * block_bytes, block_bytes);
    }
    p.seq_lens[d] = n;
    // Ring entries hold per-head slot numbers, not block ids, so they carry over unchanged.
    std::memcpy(p.ring + d * R, p.ring + s * R, sizeof(int32_t) * R);
  }
  p.num_tokens[p.dst] = p.num_tokens[p.src];
  return Status::kSuccess;
}

Status release(const ReleaseParams& p) {
  if (p.row < 0 || p.row >= p.max_seqs || p.num_kv_heads <= 0 || p.block_size <= 0 ||
      p.max_blocks_per_head < 0 || p.num_blocks < 0 || p.window < 1) {
    return Status::kInvalidArgument;
  }
  if (!p.block_table || !p.seq_lens || !p.ring || !p.num_tokens || !p.free_stack || !p.free_top) {
    return Status::kInvalidArgument;
  }
  const int H = p.num_kv_heads, M = p.max_blocks_per_head, bs = p.block_size, R = p.window + 1;
  int64_t count = 0;
  for (int g = 0; g < H; ++g) {
    const int64_t rh = int64_t(p.row) * H + g;
    const int n = p.seq_lens[rh];
    if (n < 0 || int64_t(n) > int64_t(M) * bs) return Status::kInvalidArgument;
    for (int b = 0; b < blocks_of(n, bs); ++b) {
      if (p.block_table[rh * M + b] < 0 || p.block_table[rh * M + b] >= p.num_blocks) {
        return Status::kInvalidArgument;
      }
    }
    count += blocks_of(n, bs);
  }
  const int top = *p.free_top;
  if (top < 0 || int64_t(top) + count > p.num_blocks) return Status::kInvalidArgument;
  for (int g = 0; g < H; ++g) {
    const int64_t rh = int64_t(p.row) * H + g;
    for (int b = 0; b < blocks_of(p.seq_lens[rh], bs); ++b) {
      p.free_stack[(*p.free_top)++] = p.block_table[rh * M + b];
    }
    // -1 marks "no block": a stale id in a released row can never alias a live block.
    for (int b = 0; b < M; ++b) p.block_table[rh * M + b] = -1;
    p.seq_lens[rh] = 0;
    for (int i = 0; i < R; ++i) p.ring[rh * R + i] = 0;
  }
  p.num_tokens[p.row] = 0;
  return Status::kSuccess;
}

}  // namespace cpu
}  // namespace dms
