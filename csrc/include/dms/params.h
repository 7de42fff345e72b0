// dms_ext public C++ API: parameter structs shared by the CUDA kernels and the CPU twins.
// No torch, no CUDA headers: an engine that owns its memory fills these with raw pointers.
//
// The op structs are built from four shared pieces (flashinfer paged_kv_t / FA3 Qkv_params
// style), so an engine fills each piece once per layer and assigns it:
//   KVPool    one layer's paged K/V memory (docs/layout.md):
//               k_cache, v_cache  [num_blocks, block_size, head_dim]  contiguous, dtype `dtype`
//               (the POOL dtype: float32 / float16 / bfloat16, or float8 e4m3 with one
//               dequantization scale per pool, k_scale / v_scale)
//   PageTable per (row, KV head) page lists:
//               block_table  int32 [rows, num_kv_heads, max_blocks_per_head]
//               seq_lens     int32 [rows, num_kv_heads]   slots in use of (row, kv head)
//             Slot i of (row, g) lives at offset i % block_size of block
//             block_table[row, g, i / block_size]. A "slot" is only ever such a token position
//             in a page list; a "row" is a row of the state (a sequence of the cache).
//   DMSState  the DMS bookkeeping (owned by the cache, updated by dms::append): the page table
//             (rows = max_seqs) plus the delayed-eviction ring:
//               ring         int32 [max_seqs, num_kv_heads, window + 1]
//                            entry for the token at position p is ring[.., p % (window + 1)] =
//                            (slot << 1) | flag, flag = eviction decision d_p (set when p + 1
//                            arrives). Holds the last min(n, window + 1) positions of a row
//                            with n tokens.
//               num_tokens   int32 [max_seqs]   tokens seen so far (positions 0 .. n-1)
//   FreeList  the pool's free block ids:
//               stack        int32 [num_blocks]   free ids in stack[0 .. *top)
//               top          int32 [1]            number of free blocks
// num_kv_heads, head_dim, block_size, num_blocks and the pool dtype are the KVPool's; every
// other struct reads them from there.
//
// Pool dtype vs compute dtype. q / k / v / out of an op (SparseDecodeParams, AppendParams,
// SparsePrefillParams, DecodeStepParams) have the pool's dtype, unless the pool is float8: then
// they have the op struct's `act_dtype` (float32 / float16 / bfloat16), see compute_dtype().
// An fp8 pool follows vLLM's convention: a stored value x8 reads as float(x8) * k_scale (V:
// v_scale); a write stores saturate_e4m3(x / k_scale), rounded to nearest even and clamped to
// +-448 (NaN stays NaN). For a pool of any other dtype both scales must be 1. act_dtype is read
// only for an fp8 pool, so an engine written before fp8 pools keeps working unchanged.
#pragma once
#include <cstddef>
#include <cstdint>

namespace dms {

enum class Status : int {
  kSuccess = 0,
  kInvalidArgument = 1,  // a size, pointer or stride is out of contract
  kUnsupported = 2,      // a valid request this build does not implement (e.g. head_dim 96)
  kCudaError = 3,        // a CUDA call or a launch failed
  kOutOfBlocks = 4,      // the free list ran dry (the caller's reservation was wrong)
};

const char* status_string(Status s);

// kFloat8E4M3: OCP float8 e4m3 "fn" (torch.float8_e4m3fn: no inf, max 448), pools only.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat8E4M3 = 3 };
constexpr int kNumDTypes = 4;

inline constexpr bool is_fp8(DType t) { return t == DType::kFloat8E4M3; }

// One layer's paged K/V memory.
struct KVPool {
  void* k_cache = nullptr;   // [num_blocks, block_size, head_dim] contiguous
  void* v_cache = nullptr;   // [num_blocks, block_size, head_dim] contiguous
  int num_blocks = 0, block_size = 0, num_kv_heads = 0, head_dim = 0;
  DType dtype = DType::kBFloat16;   // the pool's (storage) dtype, both caches alike
  // Dequantization scales of an fp8 pool (> 0, finite): K reads as stored * k_scale, V as
  // stored * v_scale. Must be 1 for any other pool dtype.
  float k_scale = 1.f, v_scale = 1.f;
};

// The dtype of an op's q / k / v / out: the pool's, unless the pool is fp8 (then `act_dtype`,
// the op struct's field).
inline constexpr DType compute_dtype(const KVPool& kv, DType act_dtype) {
  return is_fp8(kv.dtype) ? act_dtype : kv.dtype;
}

// Per (row, KV head) page lists: slot i of (row, g) is at block_table[row, g, i / block_size],
// offset i % block_size.
struct PageTable {
  int32_t* block_table = nullptr;  // [rows, num_kv_heads, max_blocks_per_head] contiguous
  int32_t* seq_lens = nullptr;     // [rows, num_kv_heads] contiguous
  int max_blocks_per_head = 0;
};

// DMS bookkeeping: the page table plus the delayed-eviction ring.
struct DMSState {
  PageTable pages;                 // rows = max_seqs
  int32_t* ring = nullptr;         // [max_seqs, num_kv_heads, window + 1]
  int32_t* num_tokens = nullptr;   // [max_seqs]
  int max_seqs = 0, window = 0;
};

// The pool's free block ids: stack[0 .. *top).
struct FreeList {
  int32_t* stack = nullptr;        // [num_blocks]
  int32_t* top = nullptr;          // [1]
};

// o[b, h] = softmax(scale * q[b, h] . K[b, h / G]) V[b, h / G] over the slots of (b, h / G).
struct SparseDecodeParams {
  const void* q = nullptr;            // [B, Hq, D], element strides q_stride_b, q_stride_h, 1
  void* out = nullptr;                // [B, Hq, D], strides o_stride_b, o_stride_h, 1
  float* lse = nullptr;               // optional [B, Hq] natural-log sum-exp of the scaled scores
  int64_t q_stride_b = 0, q_stride_h = 0;
  int64_t o_stride_b = 0, o_stride_h = 0;
  KVPool kv;                          // read only
  PageTable pages;                    // rows = batch: row b is batch entry b (read only)
  int batch = 0, num_q_heads = 0;
  float scale = 1.f;
  DType act_dtype = DType::kBFloat16;  // q / out dtype when kv.dtype is fp8 (compute_dtype())
  // CUDA only: the partials of rows cut between CTAs. Size from sparse_decode_workspace_bytes()
  // (> 0 whenever batch > 0); required.
  void* workspace = nullptr;
  int max_splits = 0;     // > 0: at most this many CTAs in the persistent grid (0: all resident)
  int min_chunk = 0;      // > 0: the fewest keys a CTA's range holds (0: library default, 256)
};

// Borrowed-neuron logits (docs/semantics.md) + channel zeroing + rotate-half RoPE, in place.
struct EvictionRopeParams {
  void* q = nullptr;                 // [T, Hq, D] contiguous
  void* k = nullptr;                 // [T, Hkv, D] contiguous
  const void* positions = nullptr;   // [T], int32 or int64 (positions_is_int64)
  bool positions_is_int64 = false;
  const float* cos_sin_cache = nullptr;  // [max_position, D]: D/2 cos then D/2 sin
  float* logits = nullptr;           // [T, Hkv] out
  int num_tokens = 0, num_q_heads = 0, num_kv_heads = 0, head_dim = 0, max_position = 0;
  float alpha_scale = 100.f, alpha_offset = 5.f;
  DType dtype = DType::kBFloat16;
  // Optional per-head RMSNorm (Qwen3 q_norm / k_norm) applied before the logit is read:
  // x * rsqrt(mean(x^2) + norm_eps) * weight, weight [D] in `dtype`; null skips that norm.
  const void* q_norm_weight = nullptr;
  const void* k_norm_weight = nullptr;
  float norm_eps = 1e-6f;
};

// Appends packed chunks to rows with the delayed-eviction rule (docs/semantics.md):
// for each token t of a chunk, set d_{t-1} = (logit_t > 0) in the ring; if the token
// t - (window + 1) is flagged, t takes over its slot; else t goes to slot seq_len (a new
// block is popped from the free list when the slot opens a block). K and V are written.
struct AppendParams {
  const void* k = nullptr;           // [T, Hkv, D] contiguous, compute_dtype(kv, act_dtype)
  const void* v = nullptr;           // [T, Hkv, D] contiguous
  const float* logits = nullptr;     // [T, Hkv] contiguous
  const int32_t* rows = nullptr;     // [n] distinct state rows: chunk c continues rows[c]
  const int32_t* cu_seqlens = nullptr;  // [n + 1]
  KVPool kv;                         // an fp8 pool stores saturate_e4m3(k / k_scale), v alike
  DMSState state;
  FreeList free;
  int32_t* error = nullptr;          // optional [1]: set to a Status on a device-side failure
  int num_seqs = 0, total_tokens = 0;
  DType act_dtype = DType::kBFloat16;  // k / v dtype when kv.dtype is fp8 (compute_dtype())
};

// Prefill attention of packed chunks: query i of chunk c (position p = num_tokens[row] + i)
// attends to (a) the slots row already holds: older survivors always, ring tokens by the
// rule (position q - p <= window or not flagged; the flag of position num_tokens-1 comes
// from the chunk's first logit), and (b) the chunk itself, causally, with the same rule
// (d_j = logits[j + 1] > 0 inside the chunk). The cache and the state are read, never written.
// With an fp8 pool the cached keys / values are read dequantized, the chunk's own k / v as given.
struct SparsePrefillParams {
  const void* q = nullptr;           // [T, Hq, D] contiguous, compute_dtype(kv, act_dtype)
  const void* k = nullptr;           // [T, Hkv, D] contiguous
  const void* v = nullptr;           // [T, Hkv, D] contiguous
  const float* logits = nullptr;     // [T, Hkv]
  const int32_t* rows = nullptr;     // [n] distinct state rows
  const int32_t* cu_seqlens = nullptr;  // [n + 1]
  void* out = nullptr;               // [T, Hq, D]
  KVPool kv;                         // read only
  DMSState state;                    // read only
  int num_seqs = 0, total_tokens = 0, num_q_heads = 0;
  float scale = 1.f;
  DType act_dtype = DType::kBFloat16;  // q / k / v / out dtype when kv.dtype is fp8
  // CUDA only: scratch for the compacted key lists. Size from sparse_prefill_workspace_bytes()
  // (sizes only, never data); may be null when that returns 0. The CPU twin ignores it.
  void* workspace = nullptr;
  // CUDA only: 0 keeps calls of short chunks (<= 16 tokens per chunk on average) on the general
  // kernel instead of the small-chunk kernel (A/B benchmarks; the torch op sets it from the
  // environment variable DMS_PREFILL_SMALL). Same output either way, up to rounding.
  int small_chunks = 1;
};

// Copy of a row's whole state (fork): new blocks from the free list, K/V copied.
struct ForkParams {
  int src = 0, dst = 0;              // state rows
  KVPool kv;
  DMSState state;
  FreeList free;
};

// Returns every block of a row to the free list and clears its state. Of `kv` only the sizes
// are read (num_kv_heads, block_size: how many blocks a head holds, num_blocks: the range of
// block ids); k_cache / v_cache may be null, head_dim and dtype are ignored.
struct ReleaseParams {
  int row = 0;
  KVPool kv;
  DMSState state;
  FreeList free;
};

// The fused decode step (one token per row): eviction_rope + append in one kernel.
// q, k, v are the projections BEFORE norm / RoPE. The position of batch entry b is
// num_tokens[row] (read on the device), row = rows[b]. q is normed and roped in place; k is
// normed and roped on the way into the cache (the k buffer is not written); v is copied.
// Logits come from the borrowed neuron (logits_in null: q's channel D-1 of head g*G, zeroed
// around RoPE) or from the caller (logits_in [B, Hkv]: adapter variant, q keeps all its
// channels); either way they are written to logits. Same state updates as dms::append.
struct DecodeStepParams {
  void* q = nullptr;                 // [B, Hq, D] contiguous, in place, compute dtype
  const void* k = nullptr;           // [B, Hkv, D] contiguous
  const void* v = nullptr;           // [B, Hkv, D] contiguous
  const float* cos_sin_cache = nullptr;  // [max_position, D]: D/2 cos then D/2 sin
  const int32_t* rows = nullptr;     // [B] distinct state rows
  const float* logits_in = nullptr;  // optional [B, Hkv]
  float* logits = nullptr;           // [B, Hkv] out
  const void* q_norm_weight = nullptr;   // optional [D], compute dtype
  const void* k_norm_weight = nullptr;   // optional [D], compute dtype
  float norm_eps = 1e-6f;
  float alpha_scale = 100.f, alpha_offset = 5.f;
  KVPool kv;
  DMSState state;
  FreeList free;
  int32_t* error = nullptr;          // optional [1]: set to a Status on a device-side failure
  int batch = 0, max_position = 0, num_q_heads = 0;
  DType act_dtype = DType::kBFloat16;  // q / k / v / norm weight dtype when kv.dtype is fp8
};

// Bytes per element of `t`; usable in device code too (nvcc sees the annotation).
#if defined(__CUDACC__)
#define DMS_HOST_DEVICE __host__ __device__
#else
#define DMS_HOST_DEVICE
#endif
DMS_HOST_DEVICE inline int dtype_size(DType t) {
  return t == DType::kFloat32 ? 4 : t == DType::kFloat8E4M3 ? 1 : 2;
}


// Host-side contract checks shared by the entry points and the CPU twins (sizes in range,
// pointers set). A ReleaseParams' KVPool is checked by hand: its head_dim and caches are unused.
inline bool valid_sizes(const KVPool& kv) {
  return kv.num_kv_heads > 0 && kv.head_dim > 0 && kv.block_size > 0 && kv.num_blocks >= 0;
}
inline bool valid_sizes(const DMSState& s) {
  return s.max_seqs >= 0 && s.window >= 1 && s.pages.max_blocks_per_head >= 0;
}
inline bool has_pointers(const KVPool& kv) { return kv.k_cache && kv.v_cache; }
// The pool's scales: finite and > 0, and exactly 1 unless the pool is fp8.
inline bool valid_scales(const KVPool& kv) {
  auto ok = [&](float s) {
    return is_fp8(kv.dtype) ? (s > 0.f && s <= 3.4028235e38f) : s == 1.f;
  };
  return ok(kv.k_scale) && ok(kv.v_scale);
}
// The compute dtype of an op that reads q / k / v: float32, float16 or bfloat16.
inline bool valid_compute_dtype(DType t) { return !is_fp8(t) && int(t) >= 0 && int(t) < 3; }
inline bool has_pointers(const PageTable& t) { return t.block_table && t.seq_lens; }
inline bool has_pointers(const DMSState& s) {
  return has_pointers(s.pages) && s.ring && s.num_tokens;
}
inline bool has_pointers(const FreeList& f) { return f.stack && f.top; }

}  // namespace dms
