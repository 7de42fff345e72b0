// dms_ext public C++ API: CPU twins. Same params structs as the CUDA entry points, host
// pointers. Simple and obviously right: these are what CI checks and what the CUDA kernels
// are compared with. float32, float16 and bfloat16.
#pragma once
#include "dms/params.h"

namespace dms {
namespace cpu {

Status sparse_decode(const SparseDecodeParams& p);
Status eviction_rope(const EvictionRopeParams& p);
Status append(const AppendParams& p);
Status sparse_prefill(const SparsePrefillParams& p);
Status fork(const ForkParams& p);
Status release(const ReleaseParams& p);
Status decode_step(const DecodeStepParams& p);

}  // namespace cpu
}  // namespace dms
