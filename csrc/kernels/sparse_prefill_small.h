// sparse_prefill for short chunks (speculative verification, MTP, multi-token decode): the
// decode-style kernel of sparse_prefill_small.cu. Host-side entry points, called from the
// launcher in sparse_prefill.cu (no torch, no device code here).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>

#include "dms/params.h"

namespace dms {
namespace prefill_small {

// The small-chunk kernel takes a call whose chunks hold at most this many tokens on average
// (total_tokens <= kMaxAvgChunk * num_seqs): the host cannot see the chunk lengths (cu_seqlens
// lives on the device), so it decides from sizes only. A longer chunk in such a call is still
// computed exactly, only less efficiently (its rows are cut into groups of at most 64 (token,
// head) rows that each stream the head's keys).
constexpr int kMaxAvgChunk = 16;

// Whether launch() takes this call: small_chunks on, average chunk <= kMaxAvgChunk, head_dim
// 64 / 128, and a unit line that fits int32. Sizes only (never device data).
bool applies(const SparsePrefillParams& p);
// Workspace bytes launch() needs (0 when !applies(p)); sizes only, and the device's SM count.
size_t workspace_bytes(const SparsePrefillParams& p);
// Plan + attention + merge on `stream`. The caller validated p (sparse_prefill()).
Status launch(const SparsePrefillParams& p, cudaStream_t stream);

}  // namespace prefill_small
}  // namespace dms
