// Links the installed dms::kernels and runs one CPU twin: one sequence, one KV head, two
// query heads, two cached keys; checks softmax attention by hand.
#include <cmath>
#include <cstdio>

#include <dms/cpu.h>
#ifdef CONSUMER_WITH_CUDA
#include <dms/dms.h>
#endif

int main() {
  const int D = 4;
  float q[2 * D] = {0.5f, -1.f, 0.25f, 2.f, -0.75f, 0.1f, 1.5f, -0.3f};
  float kc[2 * D] = {1.f, 0.2f, -0.4f, 0.3f, -0.6f, 0.9f, 0.7f, -1.1f};  // block 0: 2 slots
  float vc[2 * D] = {0.3f, -0.2f, 1.2f, 0.8f, -0.9f, 0.4f, 0.05f, 1.7f};
  int32_t block_table[1] = {0}, seq_lens[1] = {2};
  float out[2 * D];
  dms::KVPool kv;
  kv.k_cache = kc; kv.v_cache = vc;
  kv.num_blocks = 1; kv.block_size = 2; kv.num_kv_heads = 1; kv.head_dim = D;
  kv.dtype = dms::DType::kFloat32;
  dms::SparseDecodeParams p;
  p.q = q; p.out = out;
  p.q_stride_b = 2 * D; p.q_stride_h = D; p.o_stride_b = 2 * D; p.o_stride_h = D;
  p.kv = kv;
  p.pages = dms::PageTable{block_table, seq_lens, 1};
  p.batch = 1; p.num_q_heads = 2;
  p.scale = 0.5f;
  if (!dms::supported(dms::Op::kSparseDecode, dms::Device::kCPU, kv.dtype, D, kv.block_size)) {
    std::printf("dms::supported: the CPU twin should take float32, head_dim 4\n");
    return 1;
  }
  const dms::Status s = dms::cpu::sparse_decode(p);
  if (s != dms::Status::kSuccess) {
    std::printf("dms::cpu::sparse_decode: %s\n", dms::status_string(s));
    return 1;
  }
  double err = 0;
  for (int h = 0; h < 2; ++h) {
    double sc[2];
    for (int j = 0; j < 2; ++j) {
      sc[j] = 0;
      for (int d = 0; d < D; ++d) sc[j] += double(q[h * D + d]) * kc[j * D + d];
      sc[j] *= p.scale;
    }
    const double m = std::fmax(sc[0], sc[1]);
    const double e0 = std::exp(sc[0] - m), e1 = std::exp(sc[1] - m);
    for (int d = 0; d < D; ++d) {
      const double ref = (e0 * vc[d] + e1 * vc[D + d]) / (e0 + e1);
      err = std::fmax(err, std::fabs(ref - out[h * D + d]));
    }
  }
#ifdef CONSUMER_WITH_CUDA
  // Link check of the CUDA entry points (no GPU needed to take their addresses).
  volatile auto f = &dms::sparse_decode;
  (void)f;
#endif
  std::printf("dms package consumer: cpu sparse_decode max error %.3g\n", err);
  return err < 1e-5 ? 0 : 1;
}
