// The data checks of the CPU twins, shared by all of them: each refusal records a message that
// names the argument and the bad value (read back with dms::cpu::last_error()), so the torch
// CPU ops can raise it as is and check nothing themselves. Argument names are the torch ops'
// (seq_slots for AppendParams::rows, ...), the C++ name in parentheses where they differ.
#pragma once
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "dms/cpu.h"

namespace dms {
namespace cpu {
namespace detail {

void set_error(std::string message);
void clear_error();  // every twin starts with this: last_error() is "" after a success

// Records why a twin refused and returns s: refuse(kInvalidArgument, "x = ", 3, " is ...").
template <typename... A>
Status refuse(Status s, const A&... parts) {
  std::ostringstream o;
  (o << ... << parts);
  set_error(o.str());
  return s;
}

inline int64_t blocks_for(int64_t slots, int block_size) {
  return (slots + block_size - 1) / block_size;
}

// cu_seqlens [n + 1] tiles [0, total_tokens) with chunks of >= 1 token; rows [n] are distinct
// rows in [0, max_seqs). On success `out` holds the rows in chunk order.
Status check_chunks(const int32_t* rows, const int32_t* cu_seqlens, int n, int total_tokens,
                    int max_seqs, std::vector<int>* out);

// Every (row, g) of `rows`: 0 <= seq_lens <= max_blocks_per_head * block_size, and the blocks
// holding its slots are ids in [0, kv.num_blocks).
Status check_pages(const PageTable& pages, const KVPool& kv, const std::vector<int>& rows);

// Every row of `rows`: num_tokens >= 0, and the ring entries of its last min(n, window + 1)
// positions hold slots below seq_lens.
Status check_ring(const DMSState& state, int num_kv_heads, const std::vector<int>& rows);

// The packed-chunk checks of append and sparse_prefill: check_chunks, then check_pages and
// check_ring of the rows it returns in `out`.
Status check_chunk_rows(const int32_t* rows, const int32_t* cu_seqlens, int n, int total_tokens,
                        const KVPool& kv, const DMSState& state, std::vector<int>* out);

// 0 <= *top <= num_blocks and every free id below top in [0, num_blocks).
Status check_free(const FreeList& free, int num_blocks);

}  // namespace detail
}  // namespace cpu
}  // namespace dms
