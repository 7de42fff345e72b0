// dms_ext public C++ API: the data checks of the state ops, in one place.
//
// The CUDA entry points trust their device data (dms.h, "Status"): block ids, lengths, rows,
// ring entries and the free list must be right, or a kernel reads or writes out of bounds.
// The CPU twins (cpu.h) check that data before their first write. Both use the checks below:
//   * the CPU twins run validate_host() (csrc/cpu/validate.cpp) on the host pointers;
//   * dms::validate() (dms.h, csrc/kernels/validate.cu) runs the same check_item() on the
//     device, one thread per item, and writes the first violation into a ValidationReport
//     in device memory; the torch CUDA ops call it first when DMS_VALIDATE=1 (docs/errors.md).
// Either way describe() turns the report into the message (the argument and the bad value),
// so a bad block id reads the same on both devices:
//   "block_table[3, 1, 7] = 9001 is not a block id in [0, 4096)".
//
// What is checked (for the op's rows only; ValidateParams of each op: validate_params()):
//   cu_seqlens   [0] = 0, [n] = total_tokens, increasing (append, sparse_prefill)
//   rows         in [0, max_seqs) and distinct (seq_slots of append, sparse_prefill, decode_step)
//   positions    decode_step: num_tokens[row] in [0, max_position) (a cos_sin_cache row)
//   pages        0 <= seq_lens[row, g] <= max_blocks_per_head * block_size, and every block
//                holding one of its slots is an id in [0, num_blocks) (every op but
//                eviction_rope; sparse_decode: rows 0..B-1)
//   num_tokens   >= 0 (append, sparse_prefill, decode_step, fork's src)
//   ring         the entries of the last min(n, window + 1) positions hold slots < seq_lens
//   fork dst     empty (num_tokens and every seq_lens 0)
//   free list    0 <= free_top <= num_blocks, free ids below it in [0, num_blocks) (append,
//                decode_step, fork)
//   tail         append / decode_step: num_tokens + the chunk fits int32; fork: the free list
//                holds the copy (kOutOfBlocks); release: free_top + the row's blocks <= num_blocks
// Not checked on the device: whether append / decode_step's chunk fits the free list or
// max_blocks_per_head (that needs the eviction rule run ahead; the CPU twins do it in a dry
// run, DMSCache reserves on the host).
//
// The first violation is the same on both devices: items are numbered in the order the CPU
// twins check them (stage, then row, KV head, block ...), and the device keeps the lowest.
#pragma once
#include <cstdint>
#include <string>

#include "dms/params.h"

namespace dms {

enum class Violation : int32_t {
  kNone = 0,
  kCuSeqlensFirst,     // cu_seqlens[0] = value, must be 0
  kCuSeqlensLast,      // cu_seqlens[n] = value, must be bound (total_tokens)
  kCuSeqlensOrder,     // cu_seqlens[index0] = value >= cu_seqlens[index0 + 1] = value2
  kRowRange,           // seq_slots[index0] = value outside [0, bound)
  kRowRepeat,          // row value appears twice
  kPosition,           // num_tokens[index0] = value outside [0, bound) (decode_step)
  kSeqLen,             // seq_lens[index0, index1] = value outside [0, bound]
  kBlockId,            // block_table[index0, index1, index2] = value outside [0, bound)
  kNumTokens,          // num_tokens[index0] = value < 0
  kRingSlot,           // ring[index0, index1, index2] holds slot value, not below bound
  kDstTokens,          // fork: num_tokens[dst = index0] = value, must be 0
  kDstSeqLen,          // fork: seq_lens[dst = index0, index1] = value, must be 0
  kFreeTop,            // free_top = value outside [0, bound]
  kFreeStack,          // free_stack[index0] = value outside [0, bound)
  kTokensOverflow,     // num_tokens[index0] = value + value2 chunk tokens > INT32_MAX
  kForkBlocks,         // fork needs value blocks, free_top = bound (kOutOfBlocks)
  kReleaseOverflow,    // release: free_top = value plus value2 blocks > bound (num_blocks)
  kCount
};

// One violation. `first` is the device search's scratch: ~0 (no violation) before the search,
// the lowest violating item's key after it.
struct ValidationReport {
  unsigned long long first = ~0ull;
  int32_t violation = 0;   // Violation
  int32_t status = 0;      // Status: kInvalidArgument, or kOutOfBlocks (fork)
  int64_t index[3] = {0, 0, 0};
  int64_t value = 0, value2 = 0, bound = 0;
};

// What one call reads. Pointers are device memory for dms::validate(), host memory for
// validate_host(); every optional piece is skipped when its pointer is null / flag unset.
struct ValidateParams {
  // The rows the op touches: rows[0 .. num_rows) when `rows` is set (seq_slots), else
  // row_base + i (sparse_decode: 0..B-1; fork: src; release: row).
  const int32_t* rows = nullptr;
  int num_rows = 0, row_base = 0;
  int max_rows = 0;             // rows of the page table (max_seqs; sparse_decode: B)
  bool check_rows = false;      // rows in [0, max_rows) and distinct
  const int32_t* cu_seqlens = nullptr;  // optional [num_rows + 1]
  int total_tokens = 0;
  PageTable pages;
  int num_kv_heads = 0, block_size = 0, num_blocks = 0;
  const int32_t* num_tokens = nullptr;  // optional [max_rows]: >= 0
  const int32_t* ring = nullptr;        // optional [max_rows, num_kv_heads, window + 1]
  int window = 0;
  bool check_position = false;  // decode_step: 0 <= num_tokens[row] < max_position
  int max_position = 0;
  int fork_dst = -1;            // >= 0: fork's dst row must be empty
  FreeList free;                // optional: free_top and the free ids below it
  bool check_free = false;
  bool tokens_overflow = false; // num_tokens[row] + its chunk (cu_seqlens, else 1) fits int32
  bool fork_capacity = false;   // the free list holds a copy of row row_base
  bool release_capacity = false;  // free_top + the row's blocks <= num_blocks
};

// The ValidateParams of each op: what its kernel reads (the CUDA ops) / its twin checks.
ValidateParams validate_params(const SparseDecodeParams& p);
ValidateParams validate_params(const SparsePrefillParams& p);
ValidateParams validate_params(const AppendParams& p);
ValidateParams validate_params(const DecodeStepParams& p);
ValidateParams validate_params(const ForkParams& p);
ValidateParams validate_params(const ReleaseParams& p);

// Checks in the order of the stages (a lower stage first), items in order within a stage.
namespace validate_detail {

enum Stage : int {
  kStageCu = 0, kStageRows, kStagePosition, kStagePages, kStageTokens, kStageDst, kStageFree,
  kStageTail, kNumStages
};

DMS_HOST_DEVICE inline int64_t blocks_for(int64_t slots, int block_size) {
  return (slots + block_size - 1) / block_size;
}

DMS_HOST_DEVICE inline int row_of(const ValidateParams& p, int i) {
  return p.rows ? p.rows[i] : p.row_base + i;
}
DMS_HOST_DEVICE inline bool row_ok(const ValidateParams& p, int r) {
  return r >= 0 && r < p.max_rows;
}
DMS_HOST_DEVICE inline bool seq_len_ok(const ValidateParams& p, int64_t n) {
  return n >= 0 && n <= int64_t(p.pages.max_blocks_per_head) * p.block_size;
}
DMS_HOST_DEVICE inline int chunk_len(const ValidateParams& p, int c) {
  return p.cu_seqlens ? p.cu_seqlens[c + 1] - p.cu_seqlens[c] : 1;
}

// Items of each stage (the device grid covers their sum).
DMS_HOST_DEVICE inline int64_t stage_items(const ValidateParams& p, int stage) {
  const int64_t n = p.num_rows, H = p.num_kv_heads;
  switch (stage) {
    case kStageCu: return p.cu_seqlens ? 2 : 0;
    case kStageRows: return (p.cu_seqlens || p.check_rows) ? 3 * n : 0;
    case kStagePosition: return p.check_position ? n : 0;
    case kStagePages: return p.pages.block_table ? n * H * (int64_t(p.pages.max_blocks_per_head) + 1) : 0;
    case kStageTokens: return p.num_tokens ? n * (1 + (p.ring ? H * (p.window + 1) : 0)) : 0;
    case kStageDst: return p.fork_dst >= 0 ? 1 + H : 0;
    case kStageFree: return p.check_free ? 1 + int64_t(p.num_blocks) : 0;
    case kStageTail:
      return p.tokens_overflow ? n : (p.fork_capacity || p.release_capacity) ? 1 : 0;
  }
  return 0;
}

DMS_HOST_DEVICE inline bool fail(ValidationReport* r, Violation v, int64_t i0, int64_t i1,
                                 int64_t i2, int64_t value, int64_t value2, int64_t bound,
                                 Status status = Status::kInvalidArgument) {
  if (r) {
    r->violation = int32_t(v);
    r->status = int32_t(status);
    r->index[0] = i0;
    r->index[1] = i1;
    r->index[2] = i2;
    r->value = value;
    r->value2 = value2;
    r->bound = bound;
  }
  return true;
}

// Item `k` of `stage`: true (and the report filled, when r is set) when it is violated.
// Reads only memory that the lower items vouch for: an item whose premise is broken (a row out
// of range, a length out of range) passes, the lower item reports.
DMS_HOST_DEVICE inline bool check_item(const ValidateParams& p, int stage, int64_t k,
                                       ValidationReport* r) {
  const int H = p.num_kv_heads;
  switch (stage) {
    case kStageCu: {
      const int n = p.num_rows;
      if (k == 0 && p.cu_seqlens[0] != 0) {
        return fail(r, Violation::kCuSeqlensFirst, 0, 0, 0, p.cu_seqlens[0], 0, 0);
      }
      if (k == 1 && p.cu_seqlens[n] != p.total_tokens) {
        return fail(r, Violation::kCuSeqlensLast, n, 0, 0, p.cu_seqlens[n], 0, p.total_tokens);
      }
      return false;
    }
    case kStageRows: {
      const int c = int(k / 3), sub = int(k % 3);
      if (sub == 0) {
        if (p.cu_seqlens && p.cu_seqlens[c + 1] <= p.cu_seqlens[c]) {
          return fail(r, Violation::kCuSeqlensOrder, c, 0, 0, p.cu_seqlens[c],
                      p.cu_seqlens[c + 1], 0);
        }
        return false;
      }
      if (!p.check_rows) return false;
      const int row = row_of(p, c);
      if (sub == 1) {
        return row_ok(p, row) ? false
                              : fail(r, Violation::kRowRange, c, 0, 0, row, 0, p.max_rows);
      }
      if (!row_ok(p, row)) return false;
      for (int e = 0; e < c; ++e) {
        if (row_of(p, e) == row) return fail(r, Violation::kRowRepeat, c, e, 0, row, 0, 0);
      }
      return false;
    }
    case kStagePosition: {
      const int row = row_of(p, int(k));
      if (!row_ok(p, row)) return false;
      const int pos = p.num_tokens[row];
      if (pos < 0 || pos >= p.max_position) {
        return fail(r, Violation::kPosition, row, 0, 0, pos, 0, p.max_position);
      }
      return false;
    }
    case kStagePages: {
      const int64_t M = p.pages.max_blocks_per_head, per = M + 1;
      const int i = int(k / (H * per)), g = int(k / per % H);
      const int64_t b = k % per - 1;  // -1: the length itself
      const int row = row_of(p, i);
      if (!row_ok(p, row)) return false;
      const int64_t rg = int64_t(row) * H + g;
      const int n = p.pages.seq_lens[rg];
      if (!seq_len_ok(p, n)) {
        return b < 0 ? fail(r, Violation::kSeqLen, row, g, 0, n, 0, M * p.block_size) : false;
      }
      if (b < 0 || b >= blocks_for(n, p.block_size)) return false;
      const int32_t id = p.pages.block_table[rg * M + b];
      if (id < 0 || id >= p.num_blocks) {
        return fail(r, Violation::kBlockId, row, g, b, id, 0, p.num_blocks);
      }
      return false;
    }
    case kStageTokens: {
      const int64_t per = 1 + (p.ring ? int64_t(H) * (p.window + 1) : 0);
      const int i = int(k / per);
      const int64_t s = k % per;
      const int row = row_of(p, i);
      if (!row_ok(p, row)) return false;
      const int n = p.num_tokens[row];
      if (s == 0) return n < 0 ? fail(r, Violation::kNumTokens, row, 0, 0, n, 0, 0) : false;
      if (n < 0) return false;
      const int R = p.window + 1, g = int((s - 1) / R), j0 = n > R ? n - R : 0;
      const int64_t j = j0 + (s - 1) % R;
      if (j >= n) return false;
      const int64_t rg = int64_t(row) * H + g;
      const int len = p.pages.seq_lens[rg];
      const int32_t slot = p.ring[rg * R + j % R] >> 1;
      if (slot < 0 || slot >= len) {
        return fail(r, Violation::kRingSlot, row, g, j % R, slot, 0, len);
      }
      return false;
    }
    case kStageDst: {
      const int d = p.fork_dst;
      if (k == 0) {
        const int n = p.num_tokens[d];
        return n != 0 ? fail(r, Violation::kDstTokens, d, 0, 0, n, 0, 0) : false;
      }
      const int g = int(k - 1), n = p.pages.seq_lens[int64_t(d) * H + g];
      return n != 0 ? fail(r, Violation::kDstSeqLen, d, g, 0, n, 0, 0) : false;
    }
    case kStageFree: {
      const int32_t top = *p.free.top;
      if (k == 0) {
        return (top < 0 || top > p.num_blocks)
                   ? fail(r, Violation::kFreeTop, 0, 0, 0, top, 0, p.num_blocks)
                   : false;
      }
      const int64_t i = k - 1;
      if (top < 0 || top > p.num_blocks || i >= top) return false;
      const int32_t id = p.free.stack[i];
      return (id < 0 || id >= p.num_blocks)
                 ? fail(r, Violation::kFreeStack, i, 0, 0, id, 0, p.num_blocks)
                 : false;
    }
    case kStageTail: {
      if (p.tokens_overflow) {
        const int row = row_of(p, int(k));
        if (!row_ok(p, row)) return false;
        const int64_t n = p.num_tokens[row], len = chunk_len(p, int(k));
        return n + len > INT32_MAX
                   ? fail(r, Violation::kTokensOverflow, row, 0, 0, n, len, INT32_MAX)
                   : false;
      }
      // fork / release: the row's blocks against the free list (lengths vouched for above).
      const int row = p.row_base;
      int64_t count = 0;
      for (int g = 0; g < H; ++g) {
        const int n = p.pages.seq_lens[int64_t(row) * H + g];
        if (!seq_len_ok(p, n)) return false;
        count += blocks_for(n, p.block_size);
      }
      const int32_t top = *p.free.top;
      if (p.fork_capacity) {
        return count > top ? fail(r, Violation::kForkBlocks, row, 0, 0, count, 0, top,
                                  Status::kOutOfBlocks)
                           : false;
      }
      return (top < 0 || top + count > p.num_blocks)
                 ? fail(r, Violation::kReleaseOverflow, row, 0, 0, top, count, p.num_blocks)
                 : false;
    }
  }
  return false;
}

}  // namespace validate_detail

// Runs every check on host memory in order; the first violation fills *report and returns
// its status (kSuccess: none, report->violation is kNone).
Status validate_host(const ValidateParams& p, ValidationReport* report);

// The message of a violation: names the argument and the bad value (docs/errors.md).
std::string describe(const ValidationReport& report);

}  // namespace dms
