// Timeline probe of sparse_decode for tuning on a GPU; compiled only into builds with
// -DDMS_DECODE_PROBE (DMS_NVCC_EXTRA="-DDMS_DECODE_PROBE" python setup.py build_ext), never into
// the library's normal build. With it, launch number DMS_DECODE_PROBE_CALL (default 10) of the
// process (and the DMS_DECODE_PROBE_N - 1 after it) prints one line per CTA of the attention
// kernel (globaltimer at start / end, clock64 cycles of locate, mainloops, warp merges,
// epilogues) and per working CTA of the merge kernel (globaltimer at start, after its
// grid-dependency wait, at the end); DMS_DECODE_STAGES = 2 / 3 / 4 / 6 forces the stage count
// (and its resident grid) at D 128 bf16 / fp16. bench/decode_probe.py reads it.
#pragma once
#ifdef DMS_DECODE_PROBE
#include <cstdio>
#include <cstdlib>
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
inline int env_int(const char* name, int dflt) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoi(v) : dflt;
}
inline int stages() {
  static const int s = env_int("DMS_DECODE_STAGES", 0);
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
