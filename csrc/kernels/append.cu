// dms::append: appends packed chunks with the DMS delayed-eviction rule (docs/semantics.md).
//
// The rule is a serial recurrence per (row, KV head) over cheap ints; the K/V writes are the
// bytes. Two shapes:
// * decode (every chunk one token, the graph-captured hot path): ONE launch, a CTA per row
//   with a warp per KV head. Lane 0 runs the rule while the warp's loads of the token's K/V
//   rows are in flight; then the warp stores them at the slot. num_tokens of the row is bumped
//   by the CTA after all its warps read it.
// * chunks (prefill, mixed batches): a CTA per (chunk, KV head) takes the chunk in batches of
//   S = min(NT, w + 1) tokens (NT = 256 threads, 1024 for long chunks). Within a batch, token t reads only ring entries of tokens
//   <= t - (w+1), i.e. written before the batch, so the whole batch is decided at once: a
//   CTA-wide prefix count of the appended tokens gives their slots, and the blocks they open
//   are popped with one atomic. Then the batch's K/V rows are copied: by the same CTA's NT
//   threads, or (chunks of >= 1024 tokens on sm_90) by the 7 other CTAs of a cluster of 8 per
//   (chunk, KV head), reading the batch's cache rows from the deciding CTA's shared memory while
//   it decides the next batch. A second tiny kernel bumps num_tokens, since other heads' CTAs of
//   the same row read it.
// An fp8 e4m3 pool stores saturate(x / scale) (dev::store_row_e4m3, bitwise as the CPU twin)
// instead of raw bytes: the decode shape then skips the prefetch, the chunk shape converts a
// token's rows per warp.
// Blocks come off the shared free stack with atomics, so block ids may differ from the CPU
// twin; the logical state (seq_lens, ring, num_tokens, K/V per slot) is identical.
#include "dms/dms.h"
#include "kernels/step.cuh"

namespace dms {
namespace {

constexpr int kMaxDecodeWarps = 8;
// CTAs per (chunk, KV head) of long chunks on sm_90: one runs the rule, the others copy.
constexpr int kAppendCluster = 8;

// Vector path. Raw copies: 16-byte rows. fp8 pools (rows converted, 8 values per access): D a
// multiple of 8 (k / v rows then start 16-byte aligned, cache rows 8-byte aligned).
inline bool kv_vec16(const AppendParams& p) {
  const bool f8 = is_fp8(p.kv.dtype);
  return (f8 ? p.kv.head_dim % 8 == 0 : (int64_t(p.kv.head_dim) * dtype_size(p.kv.dtype)) % 16 == 0) &&
         dev::aligned16(p.k) && dev::aligned16(p.v) && dev::aligned16(p.kv.k_cache) &&
         dev::aligned16(p.kv.v_cache);
}

// fp8 pool: token `src_row` of k and v (act_dtype) into cache row `cache_row`, stored as
// e4m3(x / k_scale) and e4m3(x / v_scale), by threads tid, tid + n, ...
__device__ __forceinline__ void store_kv_e4m3(const AppendParams& p, int64_t src_row,
                                              int64_t cache_row, bool vec8, int tid, int n) {
  const int D = p.kv.head_dim;
  uint8_t* kd = static_cast<uint8_t*>(p.kv.k_cache) + cache_row * D;
  uint8_t* vd = static_cast<uint8_t*>(p.kv.v_cache) + cache_row * D;
  const int64_t off = src_row * D;
  switch (p.act_dtype) {
    case DType::kFloat32:
      dev::store_row_e4m3(kd, static_cast<const float*>(p.k) + off, D, p.kv.k_scale, vec8, tid, n);
      dev::store_row_e4m3(vd, static_cast<const float*>(p.v) + off, D, p.kv.v_scale, vec8, tid, n);
      break;
    case DType::kFloat16:
      dev::store_row_e4m3(kd, static_cast<const __half*>(p.k) + off, D, p.kv.k_scale, vec8, tid, n);
      dev::store_row_e4m3(vd, static_cast<const __half*>(p.v) + off, D, p.kv.v_scale, vec8, tid, n);
      break;
    default:
      dev::store_row_e4m3(kd, static_cast<const __nv_bfloat16*>(p.k) + off, D, p.kv.k_scale, vec8, tid, n);
      dev::store_row_e4m3(vd, static_cast<const __nv_bfloat16*>(p.v) + off, D, p.kv.v_scale, vec8, tid, n);
      break;
  }
}

// ---------------------------------------------------------------------------------------------
// Decode: one token per chunk.

__global__ void append_decode_kernel(AppendParams p, bool vec16) {
  const int c = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
  const int row = p.rows[c];
  const int tok = c;  // one token per chunk: cu_seqlens[c] == c
  const int t = p.state.num_tokens[row];
  const int H = p.kv.num_kv_heads, D = p.kv.head_dim, es = dtype_size(p.kv.dtype);
  const int row_bytes = D * es;
  for (int g = warp; g < H; g += nwarps) {
    const int64_t rg = int64_t(row) * H + g;
    const char* ksrc = static_cast<const char*>(p.k) + (int64_t(tok) * H + g) * row_bytes;
    const char* vsrc = static_cast<const char*>(p.v) + (int64_t(tok) * H + g) * row_bytes;
    // Prefetch: K/V rows do not depend on the slot, so their latency overlaps the rule's.
    const int nvec = vec16 ? row_bytes / 16 : 0;
    constexpr int kPre = 4;
    uint4 pre[kPre];
    const bool f8 = is_fp8(p.kv.dtype);  // rows are converted, not copied: no prefetch
    const bool prefetch = !f8 && vec16 && 2 * nvec <= 32 * kPre;
    if (prefetch) {
#pragma unroll
      for (int j = 0; j < kPre; ++j) {
        const int i = lane + 32 * j;
        if (i < 2 * nvec) {
          pre[j] = i < nvec ? reinterpret_cast<const uint4*>(ksrc)[i]
                            : reinterpret_cast<const uint4*>(vsrc)[i - nvec];
        }
      }
    }
    int64_t cache_row = -1;
    if (lane == 0) {
      dev::HeadState s{p.state.ring + rg * (p.state.window + 1), p.state.pages.seq_lens + rg,
                       p.state.pages.block_table + rg * p.state.pages.max_blocks_per_head};
      cache_row = dev::step_token(s, t, p.logits[int64_t(tok) * H + g], p.state.window,
                                  p.kv.block_size, p.state.pages.max_blocks_per_head,
                                  p.kv.num_blocks, p.free, p.error);
    }
    cache_row = __shfl_sync(0xffffffffu, cache_row, 0);
    if (cache_row < 0) continue;
    if (f8) {
      store_kv_e4m3(p, int64_t(tok) * H + g, cache_row, vec16, lane, 32);
      continue;
    }
    char* kdst = static_cast<char*>(p.kv.k_cache) + cache_row * row_bytes;
    char* vdst = static_cast<char*>(p.kv.v_cache) + cache_row * row_bytes;
    if (prefetch) {
#pragma unroll
      for (int j = 0; j < kPre; ++j) {
        const int i = lane + 32 * j;
        if (i < nvec) reinterpret_cast<uint4*>(kdst)[i] = pre[j];
        else if (i < 2 * nvec) reinterpret_cast<uint4*>(vdst)[i - nvec] = pre[j];
      }
    } else {
      dev::copy_row(kdst, ksrc, row_bytes, vec16, lane, 32);
      dev::copy_row(vdst, vsrc, row_bytes, vec16, lane, 32);
    }
  }
  __syncthreads();  // every warp has read num_tokens[row]
  if (threadIdx.x == 0) p.state.num_tokens[row] = t + 1;
}

// ---------------------------------------------------------------------------------------------
// Chunks.

// Exclusive prefix count of `flag` over the CTA and the total, with warp ballots.
template <int NT>
__device__ __forceinline__ int block_prefix_count(bool flag, int* s_warp, int* total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const unsigned ballot = __ballot_sync(0xffffffffu, flag);
  if (lane == 0) s_warp[warp] = __popc(ballot);
  __syncthreads();
  int before = 0, sum = 0;
  for (int w = 0; w < NT / 32; ++w) {
    const int n = s_warp[w];
    before += w < warp ? n : 0;
    sum += n;
  }
  __syncthreads();  // s_warp may be reused by the next call
  *total = sum;
  return before + __popc(ballot & ((1u << lane) - 1u));
}

// A chunk's rows are decided batch by batch (the rule: one CTA), and copied by the CTAs of its
// cluster. kCluster: a cluster of cluster_size() CTAs per (chunk, KV head), consecutive along x
// (long chunks on sm_90: one CTA per head copies at a fraction of the bandwidth); CTA 0 runs the
// rule and publishes each batch's cache rows in its shared memory, the others copy them
// (reading them across the cluster) while CTA 0 decides the next batch. Otherwise one CTA per
// (chunk, KV head) does both. The cache rows of batch b go to s_cache_row[b % 2]: the rule of
// batch b + 1 writes the buffer the copies of batch b - 1 read, which all finished before the
// barrier of batch b.
template <int NT, bool kCluster>
__global__ void __launch_bounds__(NT) append_chunk_kernel(AppendParams p, bool vec16) {
  __shared__ int s_warp[NT / 32];
  __shared__ int s_base;
  __shared__ int64_t s_cache_row[2][NT];
  const int ncl = kCluster ? int(dev::cluster_size()) : 1;
  const int rank = kCluster ? int(dev::cluster_rank()) : 0;
  const bool rules = rank == 0;                 // this CTA runs the rule
  const bool copies = ncl == 1 || rank > 0;     // ... and / or copies
  const int crank = ncl == 1 ? 0 : rank - 1, ncopy = ncl == 1 ? 1 : ncl - 1;
  const int H = p.kv.num_kv_heads, D = p.kv.head_dim, es = dtype_size(p.kv.dtype);
  const int pair = blockIdx.x / ncl;
  const int c = pair / H, g = pair % H;
  const int row = p.rows[c];
  const int start = p.cu_seqlens[c], len = p.cu_seqlens[c + 1] - start;
  const int t0 = p.state.num_tokens[row];
  const int R = p.state.window + 1, bs = p.kv.block_size, M = p.state.pages.max_blocks_per_head;
  const int64_t rg = int64_t(row) * H + g;
  int32_t* ring = p.state.ring + rg * R;
  int32_t* blocks = p.state.pages.block_table + rg * M;
  const float* logits = p.logits + int64_t(start) * H + g;  // logits[i * H]: token i of the chunk
  const int S = R < NT ? R : NT;
  const int i = threadIdx.x;
  int seq_len = rules ? p.state.pages.seq_lens[rg] : 0;

  // The chunk's first logit decides the previous call's last token.
  if (rules && i == 0 && t0 >= 1 && len > 0) {
    int32_t& e = ring[(t0 - 1) % R];
    e = (e & ~1) | int32_t(logits[0] > 0.f);
  }
  if (rules) __syncthreads();

  const int row_bytes = D * es;
  for (int b0 = 0, it = 0; b0 < len; b0 += S, ++it) {
    const int nb = min(S, len - b0);
    int64_t* cache_rows = s_cache_row[it & 1];
    if (rules) {
      const bool active = i < nb;
      const int t = t0 + b0 + i;
      // Decision of token t comes with token t+1; the chunk's last token waits for the next call.
      const bool d = active && b0 + i + 1 < len && logits[int64_t(b0 + i + 1) * H] > 0.f;
      bool reuse = false;
      int slot = 0;
      if (active && t >= R) {
        const int32_t old = ring[t % R];
        reuse = old & 1;
        slot = old >> 1;
      }
      // Block ids the row held before this batch, loaded while the batch is counted: a reused
      // slot's (held since an earlier batch) and the last block's when it is partly filled
      // (where this batch's first fresh slots go).
      const int have = (seq_len + bs - 1) / bs;
      const int32_t held = reuse && slot >= 0 && slot < seq_len ? blocks[slot / bs] : -1;
      const int32_t partial = seq_len % bs != 0 ? blocks[have - 1] : -1;
      int fresh;
      const int order = block_prefix_count<NT>(active && !reuse, s_warp, &fresh);  // among the fresh
      if (active && !reuse) slot = seq_len + order;
      // Appended slots are seq_len .. seq_len+fresh-1; the blocks they open are the multiples
      // of bs among them, popped together by one atomic.
      const int need_total = (seq_len + fresh + bs - 1) / bs;
      const int nblk = need_total - have;
      if (i == 0) {
        int base = 0;
        if (need_total > M) {
          dev::set_error(p.error, Status::kInvalidArgument);
          base = -1;
        } else if (nblk > 0) {
          base = atomicSub(p.free.top, nblk);
          if (base < nblk) {
            atomicAdd(p.free.top, nblk);
            dev::set_error(p.error, Status::kOutOfBlocks);
            base = -1;
          }
        }
        s_base = base;
      }
      __syncthreads();
      const int base = s_base;
      if (active) {
        if (reuse && (slot < 0 || slot >= seq_len)) dev::set_error(p.error, Status::kInvalidArgument);
        ring[t % R] = (slot << 1) | int32_t(d);
        int64_t cr = -1;
        if (base >= 0 && slot >= 0 && slot < seq_len + fresh) {
          const int bi = slot / bs;
          int32_t blk;
          if (bi >= have) {  // opened by this batch: popped (its first slot's thread enters it)
            blk = p.free.stack[base - 1 - (bi - have)];
            if (!reuse && slot % bs == 0) blocks[bi] = blk;
          } else {  // held before: a reused slot's, or the partly filled last block
            blk = reuse && slot < seq_len ? held : partial;
          }
          if (blk >= 0 && blk < p.kv.num_blocks) cr = int64_t(blk) * bs + slot % bs;
          else dev::set_error(p.error, Status::kInvalidArgument);
        }
        cache_rows[i] = cr;
      }
      seq_len += base >= 0 ? fresh : 0;
    }
    // The batch's cache rows (and ring entries) are visible to the copiers (and the next batch's
    // rule).
    if (kCluster) dev::cluster_sync();
    else __syncthreads();
    if (!copies) continue;
    // This CTA's tokens of the batch: k = crank, crank + ncopy, ... (m of them).
    const int m = nb > crank ? (nb - crank + ncopy - 1) / ncopy : 0;
    auto cache_row = [&](int k) -> int64_t {
      return kCluster ? dev::ld_cluster_s64(cache_rows + k, 0) : cache_rows[k];
    };
    // fp8 pools: a warp converts a token's rows.
    if (is_fp8(p.kv.dtype)) {
      for (int j = i / 32; j < m; j += NT / 32) {
        const int k = crank + j * ncopy;
        const int64_t cr = cache_row(k);
        if (cr >= 0) store_kv_e4m3(p, (int64_t(start) + b0 + k) * H + g, cr, vec16, i % 32, 32);
      }
    } else if (vec16) {
      // 16-byte pieces j of the m tokens' K and V rows, kUnroll per thread at once: every load
      // of a round is issued before its stores.
      constexpr int kUnroll = 4;
      const int nvec = row_bytes / 16, per_tok = 2 * nvec, total = m * per_tok;
      for (int j0 = i; j0 < total; j0 += kUnroll * NT) {
        uint4 x[kUnroll];
        uint4* dp[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int j = j0 + u * NT;
          dp[u] = nullptr;
          if (j >= total) continue;
          const int k = crank + (j / per_tok) * ncopy, r = j % per_tok;
          const int64_t cr = cache_row(k);
          if (cr < 0) continue;
          const int64_t src = (int64_t(start) + b0 + k) * H + g;
          const bool is_k = r < nvec;
          const int v = is_k ? r : r - nvec;
          x[u] = reinterpret_cast<const uint4*>(static_cast<const char*>(is_k ? p.k : p.v) + src * row_bytes)[v];
          dp[u] = reinterpret_cast<uint4*>(static_cast<char*>(is_k ? p.kv.k_cache : p.kv.v_cache) +
                                           cr * row_bytes) + v;
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
          if (dp[u]) *dp[u] = x[u];
      }
    } else {
      for (int j = i / 32; j < m; j += NT / 32) {
        const int k = crank + j * ncopy;
        const int64_t cr = cache_row(k);
        if (cr < 0) continue;
        const int64_t src = ((int64_t(start) + b0 + k) * H + g) * row_bytes;
        dev::copy_row(static_cast<char*>(p.kv.k_cache) + cr * row_bytes,
                      static_cast<const char*>(p.k) + src, row_bytes, false, i % 32, 32);
        dev::copy_row(static_cast<char*>(p.kv.v_cache) + cr * row_bytes,
                      static_cast<const char*>(p.v) + src, row_bytes, false, i % 32, 32);
      }
    }
  }
  if (rules && i == 0) p.state.pages.seq_lens[rg] = seq_len;
  if (kCluster) dev::cluster_sync();  // CTA 0's shared memory outlives the other CTAs' reads
}

__global__ void advance_num_tokens_kernel(const int32_t* rows, const int32_t* cu_seqlens,
                                          int32_t* num_tokens, int n) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c < n) num_tokens[rows[c]] += cu_seqlens[c + 1] - cu_seqlens[c];
}

}  // namespace

Status append(const AppendParams& p, cudaStream_t stream) {
  if (p.num_seqs < 0 || p.total_tokens < 0 || !valid_sizes(p.kv) || !valid_sizes(p.state)) {
    return Status::kInvalidArgument;
  }
  // k / v of the compute dtype; the pool of that dtype (raw copies) or fp8 e4m3 (converted).
  if (!supported(Op::kAppend, Device::kCUDA, compute_dtype(p.kv, p.act_dtype), p.kv.head_dim,
                 p.kv.block_size, p.kv.dtype)) {
    return Status::kUnsupported;
  }
  if (!valid_scales(p.kv)) return Status::kInvalidArgument;
  if (p.num_seqs == 0) return p.total_tokens == 0 ? Status::kSuccess : Status::kInvalidArgument;
  if (p.total_tokens < p.num_seqs) return Status::kInvalidArgument;  // chunks hold >= 1 token
  if (!p.rows || !p.cu_seqlens || !p.k || !p.v || !p.logits || !has_pointers(p.kv) ||
      !has_pointers(p.state) || !has_pointers(p.free)) {
    return Status::kInvalidArgument;
  }
  // Slots are stored as slot << 1 in the ring.
  if (int64_t(p.state.pages.max_blocks_per_head) * p.kv.block_size > (int64_t(1) << 30)) {
    return Status::kUnsupported;
  }
  const bool vec16 = kv_vec16(p);
  if (p.total_tokens == p.num_seqs) {
    // Every chunk has exactly one token (each has at least one): the decode shape.
    const int warps = p.kv.num_kv_heads < kMaxDecodeWarps ? p.kv.num_kv_heads : kMaxDecodeWarps;
    append_decode_kernel<<<p.num_seqs, warps * 32, 0, stream>>>(p, vec16);
    DMS_LAUNCH_CHECK();
    return Status::kSuccess;
  }
  const int64_t grid = int64_t(p.num_seqs) * p.kv.num_kv_heads;
  if (grid > INT32_MAX) return Status::kUnsupported;
  // Long chunks: more tokens per batch and more copies in flight per CTA, and on sm_90 a cluster
  // of kAppendCluster CTAs per (chunk, KV head) (one sequence's prefill has only Hkv of them).
  // Short ones (mixed batches): small CTAs, more per SM.
  if (p.total_tokens / p.num_seqs >= 1024) {
    int dev_id = 0, major = 0;
    DMS_CUDA_CHECK(cudaGetDevice(&dev_id));
    DMS_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev_id));
    bool clustered = false;
    if (major >= 9 && grid * kAppendCluster <= INT32_MAX) {
      clustered = dev::launch_cluster(append_chunk_kernel<1024, true>, dim3(unsigned(grid * kAppendCluster)),
                                      dim3(1024), kAppendCluster, stream, p, vec16) == cudaSuccess;
      // Not launched (clusters unavailable here): the one-CTA kernel below (a launch error
      // leaves nothing to undo); an earlier sticky error fails that launch too.
      if (!clustered) (void)cudaGetLastError();
    }
    if (!clustered) append_chunk_kernel<1024, false><<<unsigned(grid), 1024, 0, stream>>>(p, vec16);
  } else {
    append_chunk_kernel<256, false><<<unsigned(grid), 256, 0, stream>>>(p, vec16);
  }
  DMS_LAUNCH_CHECK();
  advance_num_tokens_kernel<<<(p.num_seqs + 255) / 256, 256, 0, stream>>>(
      p.rows, p.cu_seqlens, p.state.num_tokens, p.num_seqs);
  DMS_LAUNCH_CHECK();
  return Status::kSuccess;
}

}  // namespace dms
