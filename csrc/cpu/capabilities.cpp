// The capability table of dms/capabilities.h. Compiled in every build: the CPU-only torch
// extension, the CUDA one and the CMake library all answer from this one table.
#include "dms/capabilities.h"

#include <cstring>

namespace dms {

namespace {

constexpr int kNumOps = 7;

// {f32, f16, bf16, fp8 e4m3}, kv_fp8, head dims, count, multiple, block_size pow2, texts.
constexpr const char* kFloats = "float32, float16 or bfloat16";
constexpr const char* kAsQ = "the compute dtype (no fp8 pools)";
constexpr const char* kAsQOrFp8 = "the compute dtype or float8_e4m3fn";
constexpr Capability kAny{{true, true, true, false}, false, {0, 0, 0, 0}, 0, 1, false,
                          kFloats, kAsQ, "any", "any"};
constexpr Capability kEven{{true, true, true, false}, false, {0, 0, 0, 0}, 0, 2, false,
                           kFloats, kAsQ, "even", "any"};
constexpr Capability kStateOnly{{true, true, true, true}, true, {0, 0, 0, 0}, 0, 1, false,
                                "any (not read)", "any (not read)", "any (not read)", "any"};
// The CPU twins read fp8 pools dequantized and quantize on the write.
constexpr Capability kAnyFp8{{true, true, true, false}, true, {0, 0, 0, 0}, 0, 1, false,
                             kFloats, kAsQOrFp8, "any", "any"};
constexpr Capability kEvenFp8{{true, true, true, false}, true, {0, 0, 0, 0}, 0, 2, false,
                              kFloats, kAsQOrFp8, "even", "any"};
// fork takes the pool only: its dtype is the pool's, fp8 included (byte copies).
constexpr Capability kForkFp8{{true, true, true, true}, true, {0, 0, 0, 0}, 0, 1, false,
                              "float32, float16, bfloat16 or float8_e4m3fn", kAsQOrFp8, "any",
                              "any"};

constexpr Capability kCpu[kNumOps] = {kAnyFp8, kAnyFp8, kAnyFp8, kEven,
                                      kEvenFp8, kForkFp8, kStateOnly};

// CUDA fp8 pools: sparse_decode and sparse_prefill (converted to the compute dtype in shared
// memory), append and decode_step (saturating stores), fork (byte copies), release.
constexpr Capability kCuda[kNumOps] = {
    // sparse_decode: tensor-core kernels instantiated per head_dim; slots map by shift.
    {{false, true, true, false}, true, {64, 128, 256, 0}, 3, 1, true, "float16 or bfloat16",
     kAsQOrFp8, "64, 128 or 256", "a power of two"},
    // sparse_prefill: tensor-core kernels instantiated per head_dim (and per pool: fp8 or q's).
    {{false, true, true, false}, true, {64, 128, 256, 0}, 3, 1, false, "float16 or bfloat16",
     kAsQOrFp8, "64, 128 or 256", "any"},
    kAnyFp8,     // append
    kEven,       // eviction_rope (rotate-half RoPE)
    kEvenFp8,    // decode_step
    kForkFp8,    // fork (raw byte copies)
    kStateOnly,  // release
};

constexpr const char* kNames[kNumOps] = {"sparse_decode", "sparse_prefill", "append",
                                         "eviction_rope", "decode_step",    "fork",
                                         "release"};

}  // namespace

const Capability& capability(Op op, Device device) {
  const int i = int(op) >= 0 && int(op) < kNumOps ? int(op) : 0;
  return device == Device::kCUDA ? kCuda[i] : kCpu[i];
}

bool supports_dtype(Op op, Device device, DType dtype) {
  const int i = int(dtype);
  return i >= 0 && i < kNumDTypes && capability(op, device).dtype[i];
}

bool supports_kv_dtype(Op op, Device device, DType dtype, DType kv_dtype) {
  const int i = int(kv_dtype);
  if (i < 0 || i >= kNumDTypes) return false;
  return kv_dtype == dtype || (is_fp8(kv_dtype) && capability(op, device).kv_fp8);
}

bool supports_head_dim(Op op, Device device, int head_dim) {
  const Capability& c = capability(op, device);
  if (head_dim < 1) return false;
  if (c.num_head_dims == 0) return head_dim % c.head_dim_multiple == 0;
  for (int i = 0; i < c.num_head_dims; ++i) {
    if (c.head_dims[i] == head_dim) return true;
  }
  return false;
}

bool supports_block_size(Op op, Device device, int block_size) {
  if (block_size < 1) return false;
  return !capability(op, device).block_size_pow2 || (block_size & (block_size - 1)) == 0;
}

bool supported(Op op, Device device, DType dtype, int head_dim, int block_size) {
  return supports_dtype(op, device, dtype) &&
         (head_dim == 0 || supports_head_dim(op, device, head_dim)) &&
         (block_size == 0 || supports_block_size(op, device, block_size));
}

bool supported(Op op, Device device, DType dtype, int head_dim, int block_size, DType kv_dtype) {
  return supported(op, device, dtype, head_dim, block_size) &&
         supports_kv_dtype(op, device, dtype, kv_dtype);
}

const char* op_name(Op op) {
  return int(op) >= 0 && int(op) < kNumOps ? kNames[int(op)] : "unknown op";
}

bool op_from_name(const char* name, Op* op) {
  for (int i = 0; i < kNumOps; ++i) {
    if (name && std::strcmp(name, kNames[i]) == 0) {
      *op = Op(i);
      return true;
    }
  }
  return false;
}

const char* device_name(Device device) { return device == Device::kCUDA ? "cuda" : "cpu"; }

}  // namespace dms
