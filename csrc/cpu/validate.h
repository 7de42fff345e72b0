// The data checks of the CPU twins, shared by all of them: each refusal records a message that
// names the argument and the bad value (read back with dms::cpu::last_error()), so the torch
// CPU ops can raise it as is and check nothing themselves. The checks themselves are
// dms/validate.h's (the same ones DMS_VALIDATE runs on the device); argument names are the
// torch ops' (seq_slots for AppendParams::rows, ...).
#pragma once
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "dms/cpu.h"
#include "dms/validate.h"

namespace dms {
namespace cpu {
namespace detail {

void set_error(std::string message);
void clear_error();  // every twin starts with this: last_error() is "" after a success

// Records why a twin refused and returns s: refuse(kInvalidArgument, "x = ", 3, " is ...").
template <typename... A>
Status refuse(Status s, const A&... parts) {
  std::ostringstream o;
  (o << ... << parts);
  set_error(o.str());
  return s;
}

inline int64_t blocks_for(int64_t slots, int block_size) {
  return (slots + block_size - 1) / block_size;
}

// Every data check of the op (dms/validate.h: validate_params(p) says which): the first
// violation is refused with describe()'s message.
Status check_data(const ValidateParams& p);

}  // namespace detail
}  // namespace cpu
}  // namespace dms
