// DMS_VALIDATE for the CUDA ops: dms::validate on the current stream, one sync, and the first
// violation raised with the CPU twins' message (dms::describe) before the op's kernel runs.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/types.h>

#include <string>

#include "dms/dms.h"
#include "torch/validate.h"

namespace dms {
namespace torch_ext {

void validate_device_data(const char* op, const ValidateParams& v) {
  if (!validate_enabled() || v.num_rows == 0) return;
  int64_t items = 0;
  for (int s = 0; s < validate_detail::kNumStages; ++s) items += validate_detail::stage_items(v, s);
  if (items == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // A sync is illegal while a graph is being captured: the captured call is not checked.
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capturing));
  if (capturing != cudaStreamCaptureStatusNone) return;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  at::Tensor buf = at::empty({int64_t(sizeof(ValidationReport))},
                             at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device));
  auto* report = reinterpret_cast<ValidationReport*>(buf.data_ptr());
  const Status st = validate(v, report, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  TORCH_CHECK(st == Status::kSuccess, op, ": DMS_VALIDATE: ", status_string(st));
  ValidationReport host;
  C10_CUDA_CHECK(cudaMemcpyAsync(&host, report, sizeof(host), cudaMemcpyDeviceToHost, stream));
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  if (Violation(host.violation) == Violation::kNone) return;
  const std::string why = describe(host);
  TORCH_CHECK(Status(host.status) != Status::kOutOfBlocks, op, ": ",
              status_string(Status::kOutOfBlocks), ": ", why, " (DMS_VALIDATE)");
  TORCH_CHECK_VALUE(false, op, ": ", why, " (DMS_VALIDATE)");
}

}  // namespace torch_ext
}  // namespace dms
