// Host-side bf16 / fp16 / fp8 e4m3 <-> float conversion by bit manipulation, so the CPU twins
// need neither torch nor CUDA headers. Narrowing rounds to nearest even, like the hardware;
// fp8 saturates (clamps to +-448, as vLLM's and the hardware's satfinite conversions do), and
// every fp8 pool access of the twins goes through load_kv / store_kv below (the one place the
// scales are applied).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "dms/params.h"

namespace dms {
namespace cpu {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float bf16_to_float(uint16_t h) { return bits_float(uint32_t(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) {
    return uint16_t((u >> 16) | 0x0040u);  // keep NaN a NaN (quiet) after truncation
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float fp16_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    if (man == 0) return bits_float(sign);
    // Subnormal: value = man * 2^-24, exact in float.
    float v = std::ldexp(float(man), -24);
    return sign ? -v : v;
  }
  return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
}

inline uint16_t float_to_fp16(float f) {
  uint32_t u = float_bits(f);
  uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return uint16_t(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u));
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520: overflow to inf
  if (a < 0x38800000u) {
    // Result is subnormal (or zero) in half: units of 2^-24, rounded to nearest even.
    if (a < 0x33000000u) return sign;  // below half of the smallest subnormal
    uint32_t exp = a >> 23;
    uint32_t man = (a & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126u - exp;  // 113 + 13 - exp: bits to drop to reach units of 2^-24
    uint32_t r = man >> shift;
    uint32_t rem = man & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return uint16_t(sign | r);
  }
  uint32_t r = a - 0x38000000u;  // rebias exponent 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);
  return uint16_t(sign | (r >> 13));
}

// float8 e4m3 "fn" (bias 7, 3 mantissa bits, no inf, 0x7f / 0xff NaN, max 448).
inline float e4m3_to_float(uint8_t b) {
  const uint32_t sign = uint32_t(b & 0x80u) << 24;
  const uint32_t exp = (b >> 3) & 0xfu, man = b & 0x7u;
  if (exp == 0xf && man == 0x7) return bits_float(sign | 0x7fc00000u);
  if (exp == 0) {
    const float v = std::ldexp(float(man), -9);  // subnormal: man * 2^-9, exact
    return sign ? -v : v;
  }
  return bits_float(sign | ((exp + 120u) << 23) | (man << 20));
}

// Saturating: |x| >= 448 (inf included) stores +-448; NaN stays NaN.
inline uint8_t float_to_e4m3(float f) {
  const uint32_t u = float_bits(f);
  const uint8_t sign = uint8_t((u >> 24) & 0x80u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint8_t(sign | 0x7fu);
  if (a >= 0x43e00000u) return uint8_t(sign | 0x7eu);  // >= 448
  if (a < 0x3c800000u) {
    // Below 2^-6: a subnormal (or zero) in units of 2^-9, rounded to nearest even.
    if (a < 0x3a800000u) return sign;  // below half of the smallest subnormal 2^-9
    const uint32_t exp = a >> 23;
    const uint32_t man = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 141u - exp;  // 150 - 9 - exp: bits to drop to reach units of 2^-9
    uint32_t r = man >> shift;
    const uint32_t rem = man & ((1u << shift) - 1u), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return uint8_t(sign | r);  // r == 8 is 2^-6, the smallest normal: the encoding matches
  }
  uint32_t r = a - 0x3c000000u;  // rebias exponent 127 -> 7
  r += 0x7ffffu + ((r >> 20) & 1u);
  return uint8_t(sign | (r >> 20));  // < 448 here: never reaches the NaN encoding
}

inline float load(const void* base, int64_t i, DType t) {
  switch (t) {
    case DType::kFloat32: return static_cast<const float*>(base)[i];
    case DType::kFloat8E4M3: return e4m3_to_float(static_cast<const uint8_t*>(base)[i]);
    case DType::kFloat16: return fp16_to_float(static_cast<const uint16_t*>(base)[i]);
    default: return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
  }
}

inline void store(void* base, int64_t i, DType t, float v) {
  switch (t) {
    case DType::kFloat32: static_cast<float*>(base)[i] = v; break;
    case DType::kFloat8E4M3: static_cast<uint8_t*>(base)[i] = float_to_e4m3(v); break;
    case DType::kFloat16: static_cast<uint16_t*>(base)[i] = float_to_fp16(v); break;
    default: static_cast<uint16_t*>(base)[i] = float_to_bf16(v); break;
  }
}

// A pool element as the ops read it: stored * scale (scale 1 for a non-fp8 pool), exact in
// double (4 significant bits times 24).
inline double load_kv(const void* base, int64_t i, DType t, float scale) {
  return double(load(base, i, t)) * double(scale);
}

// A pool element as the ops write it: x / scale (in float), then narrowed to the pool dtype.
inline void store_kv(void* base, int64_t i, DType t, float scale, float x) {
  store(base, i, t, is_fp8(t) ? x / scale : x);
}

}  // namespace cpu
}  // namespace dms
