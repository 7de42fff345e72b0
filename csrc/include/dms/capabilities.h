// dms_ext public C++ API: what each op implements on each device. No torch, no CUDA headers;
// compiled into every build (CPU-only and CUDA). This table is the one source of truth: the
// CUDA entry points return kUnsupported outside it, the torch ops raise ValueError outside it,
// and dms_ext.DMSCache asks it (torch.ops.dms.supported) before allocating anything.
//
//   op              device  dtypes                    head_dim            block_size
//   sparse_decode   cpu     float32 float16 bfloat16  any                 any
//                   cuda    float16 bfloat16          64, 128 or 256      a power of two
//   sparse_prefill  cpu     float32 float16 bfloat16  any                 any
//                   cuda    float16 bfloat16          64, 128 or 256      any
//   append          cpu     float32 float16 bfloat16  any                 any
//                   cuda    float32 float16 bfloat16  any                 any
//   eviction_rope   both    float32 float16 bfloat16  even                (none)
//   decode_step     both    float32 float16 bfloat16  even                any
//   fork            both    float32 float16 bfloat16  any                 any
//   release         both    (none)                    (none)              any
//
// Pool dtype (kv_dtype) vs compute dtype (dtype, of q / k / v / out): a pool has the compute
// dtype, or float8 e4m3 (dms::is_fp8) with k_scale / v_scale where the op's kv_fp8 says so:
//   fp8 pools       cpu     sparse_decode, sparse_prefill, append, decode_step, fork, release
//                   cuda    sparse_decode, sparse_prefill, append, decode_step, fork, release
//                           (the attention kernels convert fp8 tiles to q's dtype in shared
//                           memory; eviction_rope takes no pool)
// fork and release take no compute tensors: their `dtype` is the pool's (fork on cpu takes
// float8_e4m3fn there).
//
// Size limits that depend on more than these three values stay with the op (see dms.h):
// append and decode_step need max_blocks_per_head * block_size <= 2^30, decode_step on CUDA
// needs num_kv_heads * head_dim * 2 * dtype size <= 48 KB.
#pragma once
#include "dms/params.h"

namespace dms {

enum class Op : int {
  kSparseDecode = 0,
  kSparsePrefill,
  kAppend,
  kEvictionRope,
  kDecodeStep,
  kFork,
  kRelease,
};

enum class Device : int { kCPU = 0, kCUDA = 1 };

// What one op implements on one device. A property the op does not take (the block size of
// eviction_rope, the dtype and head_dim of release) is unconstrained.
struct Capability {
  bool dtype[kNumDTypes];   // indexed by int(DType): the compute dtypes (fork / release: pool's)
  bool kv_fp8;              // the pool may be fp8 (e4m3) while the compute dtype is one of dtype
  int head_dims[4];         // the allowed head dims, when num_head_dims > 0
  int num_head_dims;
  int head_dim_multiple;    // otherwise: any positive multiple of this (1: any, 2: even)
  bool block_size_pow2;     // block_size a power of two (else any >= 1)
  // The same, in words, for error messages: "float16 or bfloat16", "64, 128 or 256", ...
  const char* dtypes_text;
  const char* kv_dtypes_text;  // "as q, or float8_e4m3fn" / "as q" ...
  const char* head_dims_text;
  const char* block_sizes_text;
};

const Capability& capability(Op op, Device device);

bool supports_dtype(Op op, Device device, DType dtype);          // the compute dtype
// A pool of kv_dtype with compute dtype `dtype`: kv_dtype == dtype, or fp8 where kv_fp8.
bool supports_kv_dtype(Op op, Device device, DType dtype, DType kv_dtype);
bool supports_head_dim(Op op, Device device, int head_dim);      // head_dim >= 1
bool supports_block_size(Op op, Device device, int block_size);  // block_size >= 1
// All three; a head_dim or block_size of 0 is not asked about.
bool supported(Op op, Device device, DType dtype, int head_dim, int block_size);
// The same with the pool's dtype (supports_kv_dtype too).
bool supported(Op op, Device device, DType dtype, int head_dim, int block_size, DType kv_dtype);

const char* op_name(Op op);                  // "sparse_decode", ...
bool op_from_name(const char* name, Op* op);  // false for an unknown name
const char* device_name(Device device);      // "cpu" / "cuda"

}  // namespace dms
