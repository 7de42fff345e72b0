// dms::fork and dms::release: whole-row state moves (not on the per-token path).
//
// fork: raw bytes by the pool's element size (fp8 pools included: 1 byte). A CTA per KV head pops that head's blocks with one atomic and copies seq_len and the
// ring (ring entries hold slots, not block ids, so they stay valid under the new block
// table); then a grid-stride copy moves the used rows of every block, K and V.
// release: a CTA per KV head pushes [0, ceil(seq_len / bs)) back with one atomic, sets that
// head's block table row to -1 and clears seq_len and the ring; CTA 0 clears num_tokens.
// Neither can report an error (no error slot in their params): the caller checked capacity
// (fork) and owns a consistent row (release). A fork that finds the stack short anyway
// leaves that head of dst empty instead of writing out of bounds.
#include "dms/dms.h"
#include "kernels/common.cuh"
#include "kernels/primitives.cuh"

namespace dms {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) fork_state_kernel(ForkParams p) {
  __shared__ int s_base;
  const int g = blockIdx.x, H = p.kv.num_kv_heads, M = p.state.pages.max_blocks_per_head;
  const int R = p.state.window + 1;
  const int64_t src = int64_t(p.src) * H + g, dst = int64_t(p.dst) * H + g;
  const int len = p.state.pages.seq_lens[src];
  int n = (len + p.kv.block_size - 1) / p.kv.block_size;
  if (n > M) n = M;
  if (threadIdx.x == 0) {
    int base = n > 0 ? atomicSub(p.free.top, n) : n;
    if (base < n) {
      atomicAdd(p.free.top, n);
      base = -1;
    }
    s_base = base;
  }
  __syncthreads();
  const int base = s_base;
  int32_t* bt = p.state.pages.block_table + dst * M;
  for (int j = threadIdx.x; j < n; j += kThreads) {
    bt[j] = base >= 0 ? p.free.stack[base - 1 - j] : -1;
  }
  const int32_t* rs = p.state.ring + src * R;
  int32_t* rd = p.state.ring + dst * R;
  for (int j = threadIdx.x; j < R; j += kThreads) rd[j] = base >= 0 ? rs[j] : 0;
  if (threadIdx.x == 0) p.state.pages.seq_lens[dst] = base >= 0 ? len : 0;
  if (g == 0 && threadIdx.x == 0) p.state.num_tokens[p.dst] = p.state.num_tokens[p.src];
}

// vec16: 16-byte copies; else 2-byte ones, or single bytes when bytes1 (an fp8 pool of odd
// head_dim: rows of odd size, at odd addresses).
__global__ void __launch_bounds__(kThreads) fork_copy_kernel(ForkParams p, bool vec16, bool bytes1) {
  const int H = p.kv.num_kv_heads, M = p.state.pages.max_blocks_per_head, bs = p.kv.block_size;
  const int row_bytes = p.kv.head_dim * dtype_size(p.kv.dtype);
  const int64_t items = int64_t(H) * M;
  for (int64_t idx = blockIdx.x; idx < items; idx += gridDim.x) {
    const int g = int(idx / M), j = int(idx % M);
    // seq_lens[dst] is 0 for a head whose fork failed, so nothing is copied there.
    const int len = p.state.pages.seq_lens[int64_t(p.dst) * H + g];
    if (int64_t(j) * bs >= len) continue;
    const int rows = min(bs, len - j * bs);
    const int32_t from = p.state.pages.block_table[(int64_t(p.src) * H + g) * M + j];
    const int32_t to = p.state.pages.block_table[(int64_t(p.dst) * H + g) * M + j];
    if (from < 0 || from >= p.kv.num_blocks || to < 0 || to >= p.kv.num_blocks) continue;
    const int64_t off_from = int64_t(from) * bs * row_bytes, off_to = int64_t(to) * bs * row_bytes;
    if (bytes1) {
      uint8_t* k = static_cast<uint8_t*>(p.kv.k_cache);
      uint8_t* v = static_cast<uint8_t*>(p.kv.v_cache);
      for (int i = threadIdx.x; i < rows * row_bytes; i += kThreads) {
        k[off_to + i] = k[off_from + i];
        v[off_to + i] = v[off_from + i];
      }
      continue;
    }
    dev::copy_row(static_cast<char*>(p.kv.k_cache) + off_to,
                  static_cast<const char*>(p.kv.k_cache) + off_from, rows * row_bytes, vec16,
                  threadIdx.x, kThreads);
    dev::copy_row(static_cast<char*>(p.kv.v_cache) + off_to,
                  static_cast<const char*>(p.kv.v_cache) + off_from, rows * row_bytes, vec16,
                  threadIdx.x, kThreads);
  }
}

__global__ void __launch_bounds__(kThreads) release_kernel(ReleaseParams p) {
  __shared__ int s_base;
  const int g = blockIdx.x, H = p.kv.num_kv_heads, M = p.state.pages.max_blocks_per_head;
  const int R = p.state.window + 1;
  const int64_t rg = int64_t(p.row) * H + g;
  int n = (p.state.pages.seq_lens[rg] + p.kv.block_size - 1) / p.kv.block_size;
  if (n > M) n = M;
  if (n < 0) n = 0;
  if (threadIdx.x == 0) s_base = n > 0 ? atomicAdd(p.free.top, n) : 0;
  __syncthreads();
  int32_t* bt = p.state.pages.block_table + rg * M;
  for (int j = threadIdx.x; j < n; j += kThreads) p.free.stack[s_base + j] = bt[j];
  __syncthreads();  // the pushes above read bt
  // -1 everywhere, as the CPU twin: a stale id in a released row never aliases a live block.
  for (int j = threadIdx.x; j < M; j += kThreads) bt[j] = -1;
  int32_t* ring = p.state.ring + rg * R;
  for (int j = threadIdx.x; j < R; j += kThreads) ring[j] = 0;
  // Every thread has read seq_lens[rg] above; clear it only after the barrier.
  __syncthreads();
  if (threadIdx.x == 0) p.state.pages.seq_lens[rg] = 0;
  if (g == 0 && threadIdx.x == 0) p.state.num_tokens[p.row] = 0;
}

}  // namespace

Status fork(const ForkParams& p, cudaStream_t stream) {
  if (!valid_sizes(p.kv) || !valid_sizes(p.state) || p.src < 0 || p.src >= p.state.max_seqs ||
      p.dst < 0 || p.dst >= p.state.max_seqs || p.src == p.dst) {
    return Status::kInvalidArgument;
  }
  if (!has_pointers(p.kv) || !has_pointers(p.state) || !has_pointers(p.free)) {
    return Status::kInvalidArgument;
  }
  if (!supported(Op::kFork, Device::kCUDA, p.kv.dtype, p.kv.head_dim, p.kv.block_size)) {
    return Status::kUnsupported;
  }
  fork_state_kernel<<<p.kv.num_kv_heads, kThreads, 0, stream>>>(p);
  DMS_LAUNCH_CHECK();
  const int64_t items = int64_t(p.kv.num_kv_heads) * p.state.pages.max_blocks_per_head;
  if (items == 0) return Status::kSuccess;
  const bool vec16 = (int64_t(p.kv.head_dim) * dtype_size(p.kv.dtype)) % 16 == 0 &&
                     dev::aligned16(p.kv.k_cache) && dev::aligned16(p.kv.v_cache);
  const int grid = int(items < 4096 ? items : 4096);
  const bool bytes1 = (int64_t(p.kv.head_dim) * dtype_size(p.kv.dtype)) % 2 != 0;
  fork_copy_kernel<<<grid, kThreads, 0, stream>>>(p, vec16, bytes1);
  DMS_LAUNCH_CHECK();
  return Status::kSuccess;
}

Status release(const ReleaseParams& p, cudaStream_t stream) {
  if (p.kv.num_kv_heads <= 0 || p.kv.block_size <= 0 || !valid_sizes(p.state) || p.row < 0 ||
      p.row >= p.state.max_seqs) {
    return Status::kInvalidArgument;
  }
  if (!has_pointers(p.state) || !has_pointers(p.free)) return Status::kInvalidArgument;
  release_kernel<<<p.kv.num_kv_heads, kThreads, 0, stream>>>(p);
  DMS_LAUNCH_CHECK();
  return Status::kSuccess;
}

}  // namespace dms
