// Device pieces of the per-token step shared by eviction_rope.cu, append.cu and
// decode_step.cu: the norm + logit + RoPE of one head vector, and the single-token DMS ring
// bookkeeping (docs/semantics.md).
#pragma once
#include "kernels/common.cuh"
#include "kernels/primitives.cuh"

namespace dms {
namespace dev {

// Threads per head vector: each thread owns whole rotate-half pairs (i, i + D/2) in chunks of
// VEC, so RoPE needs no exchange and only the RMSNorm sum crosses threads. A power of two that
// divides 32, so groups never straddle a warp.
__host__ __device__ inline int rope_threads_per_row(int head_dim, int vec) {
  const int chunks = head_dim / 2 / vec;
  int tpr = 1;
  while (tpr < chunks && tpr < 32) tpr *= 2;
  return tpr;
}

// One head vector x = in[0 .. D): optional RMSNorm (weight w in T), then for a donor head the
// borrowed logit x[D-1] * alpha_scale - alpha_offset (rounded in T, see below) goes to *logit_dst and x[D-1] is zeroed
// before and after the rotate-half RoPE (cs: D/2 cos then D/2 sin). Result to out (may be in).
// Called by every lane of the warp (active or not): the norm reduction shuffles across the
// `tpr` lanes of the group, `gl` is this lane's index in it. Math in float, one rounding at
// the store. Explicit _rn intrinsics pin every rounding, so that eviction_rope and the fused
// decode step (different kernels, different contraction choices otherwise) agree bit for bit.
// x rounded to T (to nearest even) and back: what storing a float result in T does.
template <typename T>
__device__ __forceinline__ float round_to(float x) { return to_float(from_float<T>(x)); }

template <typename T, int VEC>
__device__ __forceinline__ void rope_row(const T* in, T* out, const float* cs, const T* w,
                                         float eps, int D, bool active, bool donor,
                                         float* logit_dst, float alpha_scale,
                                         float alpha_offset, int gl, int tpr) {
  const int half = D / 2, chunks = half / VEC;
  float ss = 0.f;
  if (active) {
    for (int c = gl; c < chunks; c += tpr) {
      float a[VEC], b[VEC];
      load_n<VEC>(in + c * VEC, a);
      load_n<VEC>(in + half + c * VEC, b);
#pragma unroll
      for (int j = 0; j < VEC; ++j) ss = __fmaf_rn(b[j], b[j], __fmaf_rn(a[j], a[j], ss));
    }
  }
  // Unconditional, so that groups with and without a norm weight may share a warp.
  for (int o = tpr >> 1; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if (!active) return;
  const float rinv = rsqrtf(__fadd_rn(__fdiv_rn(ss, float(D)), eps));
  for (int c = gl; c < chunks; c += tpr) {
    const int i0 = c * VEC;
    float a[VEC], b[VEC], co[VEC], si[VEC];
    load_n<VEC>(in + i0, a);
    load_n<VEC>(in + half + i0, b);
    const float raw_last = b[VEC - 1];  // channel D-1 before the norm (for the donor's logit)
    if (w) {
      float wa[VEC], wb[VEC];
      load_n<VEC>(w + i0, wa);
      load_n<VEC>(w + half + i0, wb);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        a[j] = __fmul_rn(__fmul_rn(a[j], rinv), wa[j]);
        b[j] = __fmul_rn(__fmul_rn(b[j], rinv), wb[j]);
      }
    }
    // Channel D-1 is the last element of the last chunk's second half.
    const bool owns_last = donor && i0 + VEC == half;
    if (owns_last) {
      // As NVIDIA's reference computes it in the model dtype T with torch ops: q_D-1 as HF's
      // RMSNorm returns it, round(w * round(x * r)), then round(round(q * scale) - offset).
      float qv = raw_last;
      if (w) qv = round_to<T>(__fmul_rn(round_to<T>(__fmul_rn(raw_last, rinv)), to_float(w[D - 1])));
      *logit_dst = round_to<T>(__fsub_rn(round_to<T>(__fmul_rn(qv, alpha_scale)), alpha_offset));
      b[VEC - 1] = 0.f;
    }
    load_f32_n<VEC>(cs + i0, co);
    load_f32_n<VEC>(cs + half + i0, si);
    float oa[VEC], ob[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      oa[j] = __fmaf_rn(a[j], co[j], -__fmul_rn(b[j], si[j]));
      ob[j] = __fmaf_rn(b[j], co[j], __fmul_rn(a[j], si[j]));
    }
    // RoPE pairs channel D-1 with D/2-1: the zeroed neuron must stay zero after the rotation.
    if (owns_last) ob[VEC - 1] = 0.f;
    store_n<VEC>(out + i0, oa);
    store_n<VEC>(out + half + i0, ob);
  }
}

__device__ __forceinline__ void set_error(int32_t* error, Status s) {
  if (error) atomicExch(error, int32_t(s));
}

// Pops one block off the shared free stack; -1 (and an error) when it ran dry, which means the
// caller's reservation was wrong.
__device__ __forceinline__ int32_t pop_block(const FreeList& free, int32_t* error) {
  const int idx = atomicSub(free.top, 1) - 1;
  if (idx < 0) {
    atomicAdd(free.top, 1);
    set_error(error, Status::kOutOfBlocks);
    return -1;
  }
  return free.stack[idx];
}

struct HeadState {
  int32_t* ring;         // [window + 1] of (row, g)
  int32_t* seq_len;      // &seq_lens[row, g]
  int32_t* blocks;       // &block_table[row, g, 0]
};

// The DMS rule for one token at position t of (row, g), run by a single thread, except the
// flag of token t-1 (see step_token): take over the slot of token t-(w+1) if it is flagged (it
// has just left the window of every later query), else append at seq_len, opening a block when
// the slot starts one. The decision of t-1 cannot change t's choice (t-1 != t-(w+1) for
// w >= 1), which lets the fused step run this before the logit exists. Returns the cache row
// (block * block_size + slot % block_size) to write, or -1 when the state or the pool is
// inconsistent (error set, nothing to write).
__device__ __forceinline__ int64_t step_token_slot(const HeadState& s, int t, int window,
                                                   int block_size, int max_blocks,
                                                   int num_blocks, const FreeList& free,
                                                   int32_t* error) {
  const int R = window + 1;
  const int32_t old = t >= R ? s.ring[t % R] : 0;
  const int32_t len = *s.seq_len;
  int slot;
  int32_t blk;
  if (t >= R && (old & 1)) {
    slot = old >> 1;
    if (slot < 0 || slot >= len) {
      set_error(error, Status::kInvalidArgument);
      return -1;
    }
    blk = s.blocks[slot / block_size];
  } else {
    slot = len;
    if (slot / block_size >= max_blocks) {
      set_error(error, Status::kInvalidArgument);
      return -1;
    }
    *s.seq_len = len + 1;
    if (slot % block_size == 0) {
      blk = pop_block(free, error);
      s.blocks[slot / block_size] = blk;
    } else {
      blk = s.blocks[slot / block_size];
    }
  }
  s.ring[t % R] = slot << 1;
  if (blk < 0 || blk >= num_blocks) {
    set_error(error, blk < 0 ? Status::kOutOfBlocks : Status::kInvalidArgument);
    return -1;
  }
  return int64_t(blk) * block_size + slot % block_size;
}

// The whole rule for one token: d_{t-1} = (logit_t > 0) into the ring, then the slot.
__device__ __forceinline__ int64_t step_token(const HeadState& s, int t, float logit, int window,
                                              int block_size, int max_blocks, int num_blocks,
                                              const FreeList& free, int32_t* error) {
  if (t >= 1) {
    int32_t& e = s.ring[(t - 1) % (window + 1)];
    e = (e & ~1) | int32_t(logit > 0.f);
  }
  return step_token_slot(s, t, window, block_size, max_blocks, num_blocks, free, error);
}

}  // namespace dev
}  // namespace dms
