#include "cpu/validate.h"

#include <algorithm>

namespace dms {
namespace cpu {

namespace {
thread_local std::string g_last_error;
}  // namespace

const char* last_error() { return g_last_error.c_str(); }

namespace detail {

void set_error(std::string message) { g_last_error = std::move(message); }

void clear_error() { g_last_error.clear(); }

Status check_chunks(const int32_t* rows, const int32_t* cu, int n, int total_tokens,
                    int max_seqs, std::vector<int>* out) {
  if (cu[0] != 0) {
    return refuse(Status::kInvalidArgument, "cu_seqlens[0] must be 0, got ", cu[0]);
  }
  if (cu[n] != total_tokens) {
    return refuse(Status::kInvalidArgument, "cu_seqlens[n] must equal the number of tokens ",
                  total_tokens, ", got ", cu[n]);
  }
  std::vector<char> seen(size_t(std::max(max_seqs, 0)), 0);
  out->clear();
  for (int c = 0; c < n; ++c) {
    if (cu[c + 1] <= cu[c]) {
      return refuse(Status::kInvalidArgument,
                    "cu_seqlens must increase (chunks of >= 1 token), got cu_seqlens[", c,
                    "] = ", cu[c], ", cu_seqlens[", c + 1, "] = ", cu[c + 1]);
    }
    const int r = rows[c];
    if (r < 0 || r >= max_seqs) {
      return refuse(Status::kInvalidArgument, "seq_slots (rows)[", c, "] = ", r,
                    " is not a row in [0, ", max_seqs, ")");
    }
    if (seen[r]) {
      return refuse(Status::kInvalidArgument, "seq_slots (rows) must be distinct, row ", r,
                    " repeats");
    }
    seen[r] = 1;
    out->push_back(r);
  }
  return Status::kSuccess;
}

Status check_pages(const PageTable& pages, const KVPool& kv, const std::vector<int>& rows) {
  const int H = kv.num_kv_heads, M = pages.max_blocks_per_head, bs = kv.block_size;
  const int64_t cap = int64_t(M) * bs;
  for (int r : rows) {
    for (int g = 0; g < H; ++g) {
      const int64_t rg = int64_t(r) * H + g;
      const int n = pages.seq_lens[rg];
      if (n < 0 || n > cap) {
        return refuse(Status::kInvalidArgument, "seq_lens[", r, ", ", g, "] = ", n,
                      " is outside [0, max_blocks_per_head * block_size = ", cap, "]");
      }
      for (int64_t b = 0; b < blocks_for(n, bs); ++b) {
        const int32_t id = pages.block_table[rg * M + b];
        if (id < 0 || id >= kv.num_blocks) {
          return refuse(Status::kInvalidArgument, "block_table[", r, ", ", g, ", ", b, "] = ", id,
                        " is not a block id in [0, ", kv.num_blocks, ")");
        }
      }
    }
  }
  return Status::kSuccess;
}

Status check_ring(const DMSState& state, int num_kv_heads, const std::vector<int>& rows) {
  const int H = num_kv_heads, R = state.window + 1;
  for (int r : rows) {
    const int n = state.num_tokens[r];
    if (n < 0) {
      return refuse(Status::kInvalidArgument, "num_tokens[", r, "] = ", n, " is negative");
    }
    for (int g = 0; g < H; ++g) {
      const int64_t rg = int64_t(r) * H + g;
      const int len = state.pages.seq_lens[rg];
      for (int64_t j = std::max(0, n - R); j < n; ++j) {
        const int32_t slot = state.ring[rg * R + j % R] >> 1;
        if (slot < 0 || slot >= len) {
          return refuse(Status::kInvalidArgument, "ring[", r, ", ", g, ", ", j % R,
                        "] holds slot ", slot, ", outside seq_lens[", r, ", ", g, "] = ", len);
        }
      }
    }
  }
  return Status::kSuccess;
}

Status check_chunk_rows(const int32_t* rows, const int32_t* cu_seqlens, int n, int total_tokens,
                        const KVPool& kv, const DMSState& state, std::vector<int>* out) {
  Status st = check_chunks(rows, cu_seqlens, n, total_tokens, state.max_seqs, out);
  if (st == Status::kSuccess) st = check_pages(state.pages, kv, *out);
  if (st == Status::kSuccess) st = check_ring(state, kv.num_kv_heads, *out);
  return st;
}

Status check_free(const FreeList& free, int num_blocks) {
  const int32_t top = *free.top;
  if (top < 0 || top > num_blocks) {
    return refuse(Status::kInvalidArgument, "free_top = ", top, " is outside [0, ", num_blocks,
                  "]");
  }
  for (int32_t i = 0; i < top; ++i) {
    if (free.stack[i] < 0 || free.stack[i] >= num_blocks) {
      return refuse(Status::kInvalidArgument, "free_stack[", i, "] = ", free.stack[i],
                    " is not a block id in [0, ", num_blocks, ")");
    }
  }
  return Status::kSuccess;
}

}  // namespace detail
}  // namespace cpu
}  // namespace dms
