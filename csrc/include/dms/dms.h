// dms_ext public C++ API: CUDA entry points. Each takes a params struct (params.h) whose
// pointers are device memory and launches on `stream`; nothing here synchronizes the host,
// allocates, or plans on the host, so every call can be captured in a CUDA graph.
// Errors are returned as dms::Status, never thrown.
#pragma once
#include <cuda_runtime_api.h>
#include "dms/params.h"

namespace dms {

// Bytes of split-KV scratch sparse_decode needs for these sizes (params.max_splits and
// params.min_chunk resolved as the launcher resolves them). Depends on sizes only, never on
// seq_lens, so a caller can allocate once and reuse it across graph replays.
size_t sparse_decode_workspace_bytes(const SparseDecodeParams& p, int num_sms);
Status sparse_decode(const SparseDecodeParams& p, cudaStream_t stream);

Status eviction_rope(const EvictionRopeParams& p, cudaStream_t stream);
Status append(const AppendParams& p, cudaStream_t stream);
// Bytes of scratch sparse_prefill needs (p.workspace): depends on total_tokens, num_seqs,
// num_kv_heads, window, max_blocks_per_head * block_size only.
size_t sparse_prefill_workspace_bytes(const SparsePrefillParams& p);
Status sparse_prefill(const SparsePrefillParams& p, cudaStream_t stream);
Status fork(const ForkParams& p, cudaStream_t stream);
Status release(const ReleaseParams& p, cudaStream_t stream);
Status decode_step(const DecodeStepParams& p, cudaStream_t stream);

}  // namespace dms
