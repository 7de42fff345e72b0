// dms_ext public C++ API: CPU twins. Same params structs as the CUDA entry points, host
// pointers. Simple and obviously right: these are what CI checks and what the CUDA kernels
// are compared with. Unlike the kernels they also validate the data (block ids, lengths, ring
// entries, the free list, chunk packing) before the first write: all-or-nothing, and the one
// place those checks live (the torch CPU ops rely on them; see last_error()). What they take: dms/capabilities.h (every dtype, any head_dim the op
// allows).
#pragma once
#include "dms/capabilities.h"
#include "dms/params.h"

namespace dms {
namespace cpu {

// Why the last twin called on this thread refused (kInvalidArgument, kOutOfBlocks): names the
// argument and the bad value, e.g. "seq_lens[1, 0] = 99 is outside [0, max_blocks_per_head *
// block_size = 64]". "" after a success, and for a size or pointer out of contract (then
// status_string says it all). Valid until the next twin call on this thread.
const char* last_error();

Status sparse_decode(const SparseDecodeParams& p);
Status eviction_rope(const EvictionRopeParams& p);
Status append(const AppendParams& p);
Status sparse_prefill(const SparsePrefillParams& p);
Status fork(const ForkParams& p);
Status release(const ReleaseParams& p);
Status decode_step(const DecodeStepParams& p);

}  // namespace cpu
}  // namespace dms
