#include "dms/params.h"

namespace dms {

const char* status_string(Status s) {
  switch (s) {
    case Status::kSuccess: return "success";
    case Status::kInvalidArgument: return "invalid argument (a size, pointer or stride is out of contract)";
    case Status::kUnsupported: return "unsupported by this build (e.g. this head_dim or dtype)";
    case Status::kCudaError: return "CUDA error (a CUDA call or a kernel launch failed)";
    case Status::kOutOfBlocks: return "out of blocks (the free list ran dry)";
  }
  return "unknown dms::Status";
}

}  // namespace dms
