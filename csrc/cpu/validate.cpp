// The data checks of dms/validate.h on the host (the CPU twins), each op's ValidateParams, and
// the messages (shared with the CUDA ops' DMS_VALIDATE mode, csrc/torch/validate_cuda.cpp).
#include "cpu/validate.h"

#include <algorithm>

namespace dms {

namespace {

ValidateParams pages_of(const PageTable& pages, const KVPool& kv) {
  ValidateParams v;
  v.pages = pages;
  v.num_kv_heads = kv.num_kv_heads;
  v.block_size = kv.block_size;
  v.num_blocks = kv.num_blocks;
  return v;
}

ValidateParams chunks_of(const int32_t* rows, const int32_t* cu_seqlens, int n, int total_tokens,
                         const KVPool& kv, const DMSState& s) {
  ValidateParams v = pages_of(s.pages, kv);
  v.rows = rows;
  v.num_rows = n;
  v.max_rows = s.max_seqs;
  v.check_rows = true;
  v.cu_seqlens = cu_seqlens;
  v.total_tokens = total_tokens;
  v.num_tokens = s.num_tokens;
  v.ring = s.ring;
  v.window = s.window;
  return v;
}

}  // namespace

ValidateParams validate_params(const SparseDecodeParams& p) {
  ValidateParams v = pages_of(p.pages, p.kv);
  v.num_rows = v.max_rows = p.batch;
  return v;
}

ValidateParams validate_params(const SparsePrefillParams& p) {
  return chunks_of(p.rows, p.cu_seqlens, p.num_seqs, p.total_tokens, p.kv, p.state);
}

ValidateParams validate_params(const AppendParams& p) {
  ValidateParams v = chunks_of(p.rows, p.cu_seqlens, p.num_seqs, p.total_tokens, p.kv, p.state);
  v.free = p.free;
  v.check_free = true;
  v.tokens_overflow = true;
  return v;
}

ValidateParams validate_params(const DecodeStepParams& p) {
  ValidateParams v = chunks_of(p.rows, nullptr, p.batch, p.batch, p.kv, p.state);
  v.check_position = true;
  v.max_position = p.max_position;
  v.free = p.free;
  v.check_free = true;
  v.tokens_overflow = true;
  return v;
}

// One state row (fork's source, release's row) and the free list.
template <typename P>
ValidateParams one_row_of(const P& p, int row) {
  ValidateParams v = pages_of(p.state.pages, p.kv);
  v.row_base = row;
  v.num_rows = 1;
  v.max_rows = p.state.max_seqs;
  v.free = p.free;
  return v;
}

ValidateParams validate_params(const ForkParams& p) {
  ValidateParams v = one_row_of(p, p.src);
  v.num_tokens = p.state.num_tokens;
  v.fork_dst = p.dst;
  v.check_free = true;
  v.fork_capacity = true;
  return v;
}

ValidateParams validate_params(const ReleaseParams& p) {
  ValidateParams v = one_row_of(p, p.row);
  v.release_capacity = true;
  return v;
}

Status validate_host(const ValidateParams& p, ValidationReport* report) {
  *report = ValidationReport();
  for (int s = 0; s < validate_detail::kNumStages; ++s) {
    const int64_t n = validate_detail::stage_items(p, s);
    for (int64_t k = 0; k < n; ++k) {
      if (validate_detail::check_item(p, s, k, report)) {
        report->first = (static_cast<unsigned long long>(s) << 56) | static_cast<unsigned long long>(k);
        return Status(report->status);
      }
    }
  }
  return Status::kSuccess;
}

std::string describe(const ValidationReport& r) {
  std::ostringstream o;
  const int64_t* i = r.index;
  switch (Violation(r.violation)) {
    case Violation::kNone: return "";
    case Violation::kCuSeqlensFirst: o << "cu_seqlens[0] must be 0, got " << r.value; break;
    case Violation::kCuSeqlensLast:
      o << "cu_seqlens[n] must equal the number of tokens " << r.bound << ", got " << r.value;
      break;
    case Violation::kCuSeqlensOrder:
      o << "cu_seqlens must increase (chunks of >= 1 token), got cu_seqlens[" << i[0]
        << "] = " << r.value << ", cu_seqlens[" << i[0] + 1 << "] = " << r.value2;
      break;
    case Violation::kRowRange:
      o << "seq_slots (rows)[" << i[0] << "] = " << r.value << " is not a row in [0, " << r.bound
        << ")";
      break;
    case Violation::kRowRepeat:
      o << "seq_slots (rows) must be distinct, row " << r.value << " repeats";
      break;
    case Violation::kPosition:
      o << "position num_tokens[" << i[0] << "] = " << r.value
        << " is outside cos_sin_cache's [0, " << r.bound << ")";
      break;
    case Violation::kSeqLen:
      o << "seq_lens[" << i[0] << ", " << i[1] << "] = " << r.value
        << " is outside [0, max_blocks_per_head * block_size = " << r.bound << "]";
      break;
    case Violation::kBlockId:
      o << "block_table[" << i[0] << ", " << i[1] << ", " << i[2] << "] = " << r.value
        << " is not a block id in [0, " << r.bound << ")";
      break;
    case Violation::kNumTokens:
      o << "num_tokens[" << i[0] << "] = " << r.value << " is negative";
      break;
    case Violation::kRingSlot:
      o << "ring[" << i[0] << ", " << i[1] << ", " << i[2] << "] holds slot " << r.value
        << ", outside seq_lens[" << i[0] << ", " << i[1] << "] = " << r.bound;
      break;
    case Violation::kDstTokens:
      o << "dst row " << i[0] << " must be empty (num_tokens[dst] == 0)";
      break;
    case Violation::kDstSeqLen:
      o << "dst row " << i[0] << " must be empty (seq_lens[dst, " << i[1] << "] == 0)";
      break;
    case Violation::kFreeTop:
      o << "free_top = " << r.value << " is outside [0, " << r.bound << "]";
      break;
    case Violation::kFreeStack:
      o << "free_stack[" << i[0] << "] = " << r.value << " is not a block id in [0, " << r.bound
        << ")";
      break;
    case Violation::kTokensOverflow:
      o << "num_tokens[" << i[0] << "] + the chunk's tokens overflow int32";
      break;
    case Violation::kForkBlocks: o << "needs " << r.value << " blocks, " << r.bound << " free"; break;
    case Violation::kReleaseOverflow:
      o << "free_top = " << r.value << " plus the row's " << r.value2
        << " blocks exceeds num_blocks = " << r.bound;
      break;
    default: o << "violation " << r.violation; break;
  }
  return o.str();
}

namespace cpu {

namespace {
thread_local std::string g_last_error;
}  // namespace

const char* last_error() { return g_last_error.c_str(); }

namespace detail {

void set_error(std::string message) { g_last_error = std::move(message); }

void clear_error() { g_last_error.clear(); }

Status check_data(const ValidateParams& p) {
  ValidationReport r;
  const Status st = validate_host(p, &r);
  if (st != Status::kSuccess) set_error(describe(r));
  return st;
}

}  // namespace detail
}  // namespace cpu
}  // namespace dms
