// Timeline probe of sparse_decode for tuning on a GPU; compiled only into builds with
// -DDMS_DECODE_PROBE (DMS_NVCC_EXTRA="-DDMS_DECODE_PROBE" python setup.py build_ext), never into
// the library's normal build. With it, launch number DMS_DECODE_PROBE_CALL (default 10) of the
// process (and the DMS_DECODE_PROBE_N - 1 after it) prints one line per CTA of the attention
// kernel (globaltimer at start / end, clock64 cycles of locate, mainloops, warp merges,
// epilogues) and per working CTA of the merge kernel (globaltimer at start, after its
// grid-dependency wait, at the end). The stage knob alone, without the timelines' printf and
// registers (for sweeps): -DDMS_DECODE_STAGES_KNOB. With either, DMS_DECODE_STAGES = 2 .. 6
// forces the stage count (and its resident grid) at D 128, any pool dtype.
// bench/decode_probe.py and bench/sweep_decode.py (SWEEP_STAGES) set it.
#pragma once
#if defined(DMS_DECODE_PROBE) && !defined(DMS_DECODE_STAGES_KNOB)
#define DMS_DECODE_STAGES_KNOB
#endif
#ifdef DMS_DECODE_STAGES_KNOB
#include <cstdlib>
namespace dms {
namespace probe {
inline int env_int(const char* name, int dflt) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoi(v) : dflt;
}
inline int stages() {
  static const int s = env_int("DMS_DECODE_STAGES", 0);
  return s;
}
}  // namespace probe
}  // namespace dms
#endif
#ifdef DMS_DECODE_PROBE
#include <cstdio>
#define DMS_PROBE(...) __VA_ARGS__
namespace dms {
namespace probe {
__device__ __forceinline__ unsigned long long gtime() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ unsigned smid() {
  unsigned s;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(s));
  return s;
}
// The probed launches: DMS_DECODE_PROBE_N (default 1) consecutive ones from launch number
// DMS_DECODE_PROBE_CALL; returns 1, 2, ... on them (printed as `call`), 0 on the others.
inline int take_call() {
  static int calls = 0;
  static const int at = env_int("DMS_DECODE_PROBE_CALL", 10);
  static const int n = env_int("DMS_DECODE_PROBE_N", 1);
  ++calls;
  return calls >= at && calls < at + n ? calls - at + 1 : 0;
}
}  // namespace probe
}  // namespace dms
#else
#define DMS_PROBE(...)
#endif
