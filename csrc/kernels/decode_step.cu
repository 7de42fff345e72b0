// dms::decode_step: the whole per-token DMS step of a decode batch in ONE kernel: RMSNorm,
// borrowed-neuron logit, channel zeroing, RoPE of q (in place) and k, the ring bookkeeping and
// the K/V write into the paged cache (an fp8 e4m3 pool stores saturate(x / scale)). One CTA per
// sequence.
//
// The step is latency-bound (a few KB per sequence), so the CTA overlaps its two dependent
// chains: warp 0 runs the slot choice of every KV head (ring, seq_len, block pops: pointer
// chasing through global memory) while the other warps norm and rotate q and k and stage the
// roped k and the v rows in shared memory. This is legal because the only input of the rule
// that needs the logit is the flag of token t-1, and that flag cannot change token t's slot
// (t-1 != t-(w+1) for w >= 1). After one barrier the flags are set from the logits and the
// staged rows go to their slots.
#include "dms/dms.h"
#include "kernels/step.cuh"

namespace dms {
namespace {

constexpr int kRopeWarps = 8;
constexpr int kThreads = 32 * (1 + kRopeWarps);
constexpr int kMaxSmem = 48 * 1024;

struct Smem {
  size_t cr, prev, logit, k, v, total;
};

__host__ __device__ inline size_t round16(size_t x) { return (x + 15) / 16 * 16; }

// Shared memory layout: per KV head the cache row, the ring entry of token t-1, the logit,
// then the staged k and v rows (16-byte aligned for vector copies).
__host__ __device__ inline Smem smem_layout(int H, int D, int es) {
  Smem s;
  s.cr = 0;
  s.prev = round16(s.cr + sizeof(int64_t) * H);
  s.logit = round16(s.prev + sizeof(int32_t) * H);
  s.k = round16(s.logit + sizeof(float) * H);
  s.v = round16(s.k + size_t(H) * D * es);
  s.total = round16(s.v + size_t(H) * D * es);
  return s;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) decode_step_kernel(DecodeStepParams p, int tpr) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int H = p.kv.num_kv_heads, Hq = p.num_q_heads, D = p.kv.head_dim, G = Hq / H;
  const int R = p.state.window + 1;
  const Smem L = smem_layout(H, D, int(sizeof(T)));
  int64_t* s_cr = reinterpret_cast<int64_t*>(smem + L.cr);
  int32_t* s_prev = reinterpret_cast<int32_t*>(smem + L.prev);
  float* s_logit = reinterpret_cast<float*>(smem + L.logit);
  T* s_k = reinterpret_cast<T*>(smem + L.k);
  T* s_v = reinterpret_cast<T*>(smem + L.v);

  const int b = blockIdx.x;
  const int row = p.rows[b];
  const int t = p.state.num_tokens[row];
  if (t < 0 || t >= p.max_position) {
    // No cos/sin row for this position: leave the state alone, report, poison the logits.
    if (threadIdx.x == 0) dev::set_error(p.error, Status::kInvalidArgument);
    for (int g = threadIdx.x; g < H; g += kThreads) {
      p.logits[int64_t(b) * H + g] = __int_as_float(0x7fffffff);
    }
    return;
  }

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (warp == 0) {
    for (int g = lane; g < H; g += 32) {
      const int64_t rg = int64_t(row) * H + g;
      dev::HeadState s{p.state.ring + rg * R, p.state.pages.seq_lens + rg,
                       p.state.pages.block_table + rg * p.state.pages.max_blocks_per_head};
      s_prev[g] = t >= 1 ? s.ring[(t - 1) % R] : 0;
      s_cr[g] = dev::step_token_slot(s, t, p.state.window, p.kv.block_size,
                                     p.state.pages.max_blocks_per_head, p.kv.num_blocks, p.free,
                                     p.error);
    }
  } else {
    const int rt = threadIdx.x - 32, nrt = kThreads - 32;
    const bool borrowed = p.logits_in == nullptr;
    if (!borrowed) {
      for (int g = rt; g < H; g += nrt) s_logit[g] = p.logits_in[int64_t(b) * H + g];
    }
    const float* cs = p.cos_sin_cache + int64_t(t) * D;
    const int groups = nrt / tpr, gl = rt % tpr, rows = Hq + H;
    for (int r0 = 0; r0 < rows; r0 += groups) {
      const int r = r0 + rt / tpr;
      const bool active = r < rows, is_q = r < Hq;
      const int h = is_q ? r : r - Hq;
      const T* in;
      T* out;
      if (is_q) {
        out = static_cast<T*>(p.q) + (int64_t(b) * Hq + h) * D;
        in = out;
      } else {
        in = static_cast<const T*>(p.k) + (int64_t(b) * H + (active ? h : 0)) * D;
        out = s_k + (active ? h : 0) * D;
      }
      const T* w = static_cast<const T*>(is_q ? p.q_norm_weight : p.k_norm_weight);
      dev::rope_row<T, VEC>(in, out, cs, w, p.norm_eps, D, active,
                            borrowed && is_q && h % G == 0, s_logit + (is_q ? h / G : 0),
                            p.alpha_scale, p.alpha_offset, gl, tpr);
    }
    // Stage v next to k so that the write phase reads nothing from global memory.
    const int bytes = H * D * int(sizeof(T));
    dev::copy_row(s_v, static_cast<const T*>(p.v) + int64_t(b) * H * D, bytes, VEC == 8, rt, nrt);
  }
  __syncthreads();

  for (int g = threadIdx.x; g < H; g += kThreads) {
    p.logits[int64_t(b) * H + g] = s_logit[g];
    if (t >= 1) {
      const int64_t rg = int64_t(row) * H + g;
      p.state.ring[rg * R + (t - 1) % R] = (s_prev[g] & ~1) | int32_t(s_logit[g] > 0.f);
    }
  }
  const int row_bytes = D * int(sizeof(T));
  if (is_fp8(p.kv.dtype)) {
    // fp8 pool: the staged rows (already rounded to T, as the CPU twin) stored as
    // e4m3(x / scale); wpr threads per row (D / 8 of them, or 32).
    const int wpr = VEC == 8 ? min(32, D / 8) : 32, rows_at_once = kThreads / wpr;
    const int j0 = threadIdx.x < rows_at_once * wpr ? threadIdx.x / wpr : 2 * H;
    for (int j = j0; j < 2 * H; j += rows_at_once) {
      const int g = j >> 1;
      const int64_t cr = s_cr[g];
      if (cr < 0) continue;
      const bool is_k = (j & 1) == 0;
      dev::store_row_e4m3(static_cast<uint8_t*>(is_k ? p.kv.k_cache : p.kv.v_cache) + cr * D,
                          (is_k ? s_k : s_v) + g * D, D, is_k ? p.kv.k_scale : p.kv.v_scale,
                          VEC == 8, threadIdx.x % wpr, wpr);
    }
  } else if (VEC == 8) {
    const int nvec = row_bytes / 16, per_head = 2 * nvec;
    for (int j = threadIdx.x; j < H * per_head; j += kThreads) {
      const int g = j / per_head, r = j % per_head;
      const int64_t cr = s_cr[g];
      if (cr < 0) continue;
      const bool is_k = r < nvec;
      const int v = is_k ? r : r - nvec;
      const uint4* src = reinterpret_cast<const uint4*>((is_k ? s_k : s_v) + g * D);
      uint4* dst =
          reinterpret_cast<uint4*>(static_cast<T*>(is_k ? p.kv.k_cache : p.kv.v_cache) + cr * D);
      dst[v] = src[v];
    }
  } else {
    for (int j = threadIdx.x; j < H * D; j += kThreads) {
      const int g = j / D, d = j % D;
      const int64_t cr = s_cr[g];
      if (cr < 0) continue;
      static_cast<T*>(p.kv.k_cache)[cr * D + d] = s_k[g * D + d];
      static_cast<T*>(p.kv.v_cache)[cr * D + d] = s_v[g * D + d];
    }
  }
  __syncthreads();  // every thread has read num_tokens[row]
  if (threadIdx.x == 0) p.state.num_tokens[row] = t + 1;
}

template <typename T, int VEC>
Status launch(const DecodeStepParams& p, size_t smem, cudaStream_t stream) {
  const int tpr = dev::rope_threads_per_row(p.kv.head_dim, VEC);
  decode_step_kernel<T, VEC><<<p.batch, kThreads, smem, stream>>>(p, tpr);
  DMS_LAUNCH_CHECK();
  return Status::kSuccess;
}

}  // namespace

Status decode_step(const DecodeStepParams& p, cudaStream_t stream) {
  if (p.batch < 0 || p.max_position < 0 || p.num_q_heads <= 0 || !valid_sizes(p.kv) ||
      !valid_sizes(p.state) || p.num_q_heads % p.kv.num_kv_heads != 0) {
    return Status::kInvalidArgument;
  }
  // q / k / v / norm weights of the compute dtype; the pool of that dtype or fp8 e4m3.
  const DType act = compute_dtype(p.kv, p.act_dtype);
  if (!supported(Op::kDecodeStep, Device::kCUDA, act, p.kv.head_dim, p.kv.block_size, p.kv.dtype)) {
    return Status::kUnsupported;
  }
  if (!valid_scales(p.kv)) return Status::kInvalidArgument;
  if (p.batch == 0) return Status::kSuccess;
  if (!p.q || !p.k || !p.v || !p.cos_sin_cache || !p.rows || !p.logits || !has_pointers(p.kv) ||
      !has_pointers(p.state) || !has_pointers(p.free)) {
    return Status::kInvalidArgument;
  }
  if (int64_t(p.state.pages.max_blocks_per_head) * p.kv.block_size > (int64_t(1) << 30)) {
    return Status::kUnsupported;  // slots are stored as slot << 1 in the ring
  }
  // k and v are staged in the compute dtype (an fp8 pool converts them on the way out).
  const size_t smem = smem_layout(p.kv.num_kv_heads, p.kv.head_dim, dtype_size(act)).total;
  if (smem > size_t(kMaxSmem)) return Status::kUnsupported;
  // Vector path: whole 16-byte chunks of every row, of each RoPE half, and of cos/sin rows.
  const bool vec = p.kv.head_dim % 16 == 0 && dev::aligned16(p.q) && dev::aligned16(p.k) &&
                   dev::aligned16(p.v) && dev::aligned16(p.cos_sin_cache) &&
                   dev::aligned16(p.kv.k_cache) && dev::aligned16(p.kv.v_cache) &&
                   (!p.q_norm_weight || dev::aligned16(p.q_norm_weight)) &&
                   (!p.k_norm_weight || dev::aligned16(p.k_norm_weight));
  return DMS_DISPATCH_DTYPE(act, T, {
    return vec ? launch<T, 8>(p, smem, stream) : launch<T, 1>(p, smem, stream);
  });
}

}  // namespace dms
