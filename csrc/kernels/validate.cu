// dms::validate (dms.h): the data checks of dms/validate.h on the device. One thread per item
// of every stage; a violating item atomicMins its key (stage << 56 | item), so the lowest
// (the one the CPU twins would report first) wins whatever the schedule; one thread then fills
// the report from that item. Reads the state, writes only the report.
#include "dms/dms.h"
#include "kernels/common.cuh"

namespace dms {
namespace {

using validate_detail::kNumStages;

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 2048;
constexpr int kKeyShift = 56;

struct Stages {
  int64_t begin[kNumStages + 1];  // item x belongs to stage s when begin[s] <= x < begin[s + 1]
};

__global__ void __launch_bounds__(kThreads)
find_first(const ValidateParams p, const Stages t, ValidationReport* report) {
  const int64_t total = t.begin[kNumStages];
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t x = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; x < total; x += stride) {
    int s = 0;
    while (x >= t.begin[s + 1]) ++s;
    const int64_t k = x - t.begin[s];
    if (validate_detail::check_item(p, s, k, nullptr)) {
      atomicMin(&report->first,
                (static_cast<unsigned long long>(s) << kKeyShift) | static_cast<unsigned long long>(k));
    }
  }
}

__global__ void fill_report(const ValidateParams p, ValidationReport* report) {
  ValidationReport r;
  r.first = report->first;
  if (r.first != ~0ull) {
    validate_detail::check_item(p, int(r.first >> kKeyShift),
                                int64_t(r.first & ((1ull << kKeyShift) - 1)), &r);
  }
  *report = r;
}

}  // namespace

Status validate(const ValidateParams& p, ValidationReport* report, cudaStream_t stream) {
  if (!report || p.num_rows < 0 || p.num_kv_heads < 0 || p.block_size <= 0 ||
      p.num_blocks < 0 || p.pages.max_blocks_per_head < 0 || p.window < 0) {
    return Status::kInvalidArgument;
  }
  Stages t;
  t.begin[0] = 0;
  for (int s = 0; s < kNumStages; ++s) {
    const int64_t n = validate_detail::stage_items(p, s);
    if (n >= (int64_t(1) << kKeyShift)) return Status::kInvalidArgument;
    t.begin[s + 1] = t.begin[s] + n;
  }
  DMS_CUDA_CHECK(cudaMemsetAsync(&report->first, 0xff, sizeof(report->first), stream));
  const int64_t total = t.begin[kNumStages];
  if (total > 0) {
    const int blocks = int((total + kThreads - 1) / kThreads < kMaxBlocks
                               ? (total + kThreads - 1) / kThreads
                               : kMaxBlocks);
    find_first<<<blocks, kThreads, 0, stream>>>(p, t, report);
    DMS_LAUNCH_CHECK();
  }
  fill_report<<<1, 1, 0, stream>>>(p, report);
  DMS_LAUNCH_CHECK();
  return Status::kSuccess;
}

}  // namespace dms
