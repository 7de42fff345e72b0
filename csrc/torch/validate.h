// DMS_VALIDATE (docs/errors.md section 4): the CUDA ops check the device data they read (block
// ids, lengths, rows, ring entries, the free list, positions: dms/validate.h) before the real
// kernel runs, at the cost of a sync, and raise what the CPU ops raise. Off by default.
#pragma once
#include <optional>

#include "dms/validate.h"

namespace dms {
namespace torch_ext {

// DMS_VALIDATE=1 in the environment at the first call (read once), unless set_validate said
// otherwise since.
bool validate_enabled();

// torch.ops.dms.validate_mode: enabled None asks, true / false sets the mode for this process.
// Returns the mode in effect before the call.
bool set_validate(std::optional<bool> enabled);

#ifdef DMS_WITH_CUDA
// When validate_enabled() and the current stream is not capturing a graph: runs dms::validate
// for `v` on the current stream, syncs, and raises the first violation (ValueError; a fork the
// free list cannot hold: RuntimeError) as "<op>: <describe()> (DMS_VALIDATE)". No-op otherwise.
void validate_device_data(const char* op, const ValidateParams& v);
#endif

}  // namespace torch_ext
}  // namespace dms
