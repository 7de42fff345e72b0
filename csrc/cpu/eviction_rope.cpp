// CPU twin of dms::eviction_rope (docs/semantics.md section 10, borrowed neuron), float64 math on
// each head vector; q and k are rounded to the storage dtype once, at the end. The eviction
// logit follows the model dtype's rounding instead (borrowed_logit below).
#include <cmath>
#include <vector>

#include "cpu/convert.h"
#include "cpu/validate.h"
#include "dms/cpu.h"

namespace dms {
namespace cpu {

namespace {

// Returns the normalizing factor r (1 without a weight: no norm).
double rms_norm(std::vector<double>& x, const void* w, DType t, float eps) {
  if (!w) return 1.0;
  double ss = 0.0;
  for (double v : x) ss += v * v;
  const double r = 1.0 / std::sqrt(ss / double(x.size()) + double(eps));
  for (size_t d = 0; d < x.size(); ++d) x[d] = x[d] * r * double(load(w, int64_t(d), t));
  return r;
}

// v rounded to the storage dtype t (to nearest even), back as a float.
float round_to(float v, DType t) {
  if (t == DType::kFloat32) return v;
  return t == DType::kFloat16 ? fp16_to_float(float_to_fp16(v)) : bf16_to_float(float_to_bf16(v));
}

// The borrowed logit as NVIDIA's DMS reference computes it in the model dtype t with torch ops:
// q_D-1 as HF's RMSNorm returns it (round(w * round(x * r)); x itself without a norm), then
// round(round(q * alpha_scale) - alpha_offset), each product / difference in float32.
float borrowed_logit(double raw, double r, const void* w, int d, DType t, float alpha_scale,
                     float alpha_offset) {
  float q = float(raw);
  if (w) q = round_to(round_to(float(raw * r), t) * load(w, d, t), t);
  return round_to(round_to(q * alpha_scale, t) - alpha_offset, t);
}

// Rotate-half (NeoX / HF Llama-Qwen): pairs (i, i + D/2) rotate by the angle of frequency i.
void rope(std::vector<double>& x, const float* cs) {
  const size_t half = x.size() / 2;
  for (size_t i = 0; i < half; ++i) {
    const double c = cs[i], s = cs[half + i];
    const double x1 = x[i], x2 = x[i + half];
    x[i] = x1 * c - x2 * s;
    x[i + half] = x2 * c + x1 * s;
  }
}

}  // namespace

Status eviction_rope(const EvictionRopeParams& p) {
  detail::clear_error();
  if (p.num_tokens < 0 || p.num_q_heads <= 0 || p.num_kv_heads <= 0 || p.head_dim <= 0 ||
      p.num_q_heads % p.num_kv_heads != 0 || p.max_position < 0 ||
      !supported(Op::kEvictionRope, Device::kCPU, p.dtype, p.head_dim, 0)) {
    return Status::kInvalidArgument;
  }
  if (p.num_tokens == 0) return Status::kSuccess;
  if (!p.q || !p.k || !p.positions || !p.cos_sin_cache || !p.logits) {
    return Status::kInvalidArgument;
  }
  auto position = [&](int t) -> int64_t {
    return p.positions_is_int64 ? static_cast<const int64_t*>(p.positions)[t]
                                : int64_t(static_cast<const int32_t*>(p.positions)[t]);
  };
  for (int t = 0; t < p.num_tokens; ++t) {
    if (position(t) < 0 || position(t) >= p.max_position) {
      return detail::refuse(Status::kInvalidArgument, "positions[", t, "] = ", position(t),
                            " is outside cos_sin_cache's [0, ", p.max_position, ")");
    }
  }
  const int G = p.num_q_heads / p.num_kv_heads, D = p.head_dim;
  std::vector<double> x(D);
  for (int t = 0; t < p.num_tokens; ++t) {
    const float* cs = p.cos_sin_cache + position(t) * D;
    for (int h = 0; h < p.num_q_heads; ++h) {
      const int64_t off = (int64_t(t) * p.num_q_heads + h) * D;
      for (int d = 0; d < D; ++d) x[d] = load(p.q, off + d, p.dtype);
      const double raw = x[D - 1];
      const double r = rms_norm(x, p.q_norm_weight, p.dtype, p.norm_eps);
      // The first query head of each group lends its last channel to the eviction logit and
      // must not use it for attention; RoPE moves channel D-1 into D/2-1, so zero it both before
      // and after the rotation.
      const bool donor = h % G == 0;
      if (donor) {
        p.logits[int64_t(t) * p.num_kv_heads + h / G] = borrowed_logit(
            raw, r, p.q_norm_weight, D - 1, p.dtype, p.alpha_scale, p.alpha_offset);
        x[D - 1] = 0.0;
      }
      rope(x, cs);
      if (donor) x[D - 1] = 0.0;
      for (int d = 0; d < D; ++d) store(p.q, off + d, p.dtype, float(x[d]));
    }
    for (int g = 0; g < p.num_kv_heads; ++g) {
      const int64_t off = (int64_t(t) * p.num_kv_heads + g) * D;
      for (int d = 0; d < D; ++d) x[d] = load(p.k, off + d, p.dtype);
      rms_norm(x, p.k_norm_weight, p.dtype, p.norm_eps);
      rope(x, cs);
      for (int d = 0; d < D; ++d) store(p.k, off + d, p.dtype, float(x[d]));
    }
  }
  return Status::kSuccess;
}

}  // namespace cpu
}  // namespace dms
