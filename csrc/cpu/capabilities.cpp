// The capability table of dms/capabilities.h. Compiled in every build: the CPU-only torch
// extension, the CUDA one and the CMake library all answer from this one table.
#include "dms/capabilities.h"

#include <cstring>

namespace dms {

namespace {

constexpr int kNumOps = 7;

// {f32, f16, bf16}, head dims, count, multiple, block_size pow2, texts.
constexpr Capability kAny{{true, true, true}, {0, 0, 0, 0}, 0, 1, false,
                          "float32, float16 or bfloat16", "any", "any"};
constexpr Capability kEven{{true, true, true}, {0, 0, 0, 0}, 0, 2, false,
                           "float32, float16 or bfloat16", "even", "any"};
constexpr Capability kStateOnly{{true, true, true}, {0, 0, 0, 0}, 0, 1, false,
                                "any (not read)", "any (not read)", "any"};

constexpr Capability kCpu[kNumOps] = {kAny, kAny, kAny, kEven, kEven, kAny, kStateOnly};

constexpr Capability kCuda[kNumOps] = {
    // sparse_decode: tensor-core kernels instantiated per head_dim; slots map by shift.
    {{false, true, true}, {64, 128, 256, 0}, 3, 1, true, "float16 or bfloat16",
     "64, 128 or 256", "a power of two"},
    // sparse_prefill: tensor-core kernels instantiated per head_dim.
    {{false, true, true}, {64, 128, 0, 0}, 2, 1, false, "float16 or bfloat16", "64 or 128",
     "any"},
    kAny,        // append
    kEven,       // eviction_rope (rotate-half RoPE)
    kEven,       // decode_step
    kAny,        // fork (raw byte copies)
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
  return i >= 0 && i < 3 && capability(op, device).dtype[i];
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
