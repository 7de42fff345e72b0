// The DMS_VALIDATE switch (csrc/torch/validate.h); the CUDA side is validate_cuda.cpp.
#include "torch/validate.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace dms {
namespace torch_ext {
namespace {

std::atomic<int>& mode() {
  static std::atomic<int> m([] {
    const char* e = std::getenv("DMS_VALIDATE");
    return (e && *e && std::strcmp(e, "0") != 0) ? 1 : 0;
  }());
  return m;
}

}  // namespace

bool validate_enabled() { return mode().load(std::memory_order_relaxed) != 0; }

bool set_validate(std::optional<bool> enabled) {
  if (!enabled) return validate_enabled();
  return mode().exchange(*enabled ? 1 : 0) != 0;
}

}  // namespace torch_ext
}  // namespace dms
