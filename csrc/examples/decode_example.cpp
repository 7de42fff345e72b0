// decode_example: an engine that owns its memory, driving the dms C++ API directly.
//
// It allocates a paged DMS cache with cudaMalloc (docs/layout.md layout plus the ring /
// free-list state of params.h), then runs what a serving loop runs:
//   prefill   dms::sparse_prefill (attention of packed prompt chunks) + dms::append
//   decode    dms::decode_step (norm + borrowed-neuron logit + RoPE + eviction + KV write)
//             + dms::sparse_decode, first eagerly, then replayed from one captured CUDA graph
//   turn 2    a second prefill chunk for some sequences between graph replays
// Every result is checked twice: against the CPU twins (dms::cpu::*) run on host copies of the
// same state, and against a small independent host model that keeps every token's K/V and
// eviction flag and applies the visibility rule (docs/semantics.md) directly (no ring, slots,
// blocks).
//
//   decode_example [--quick]      exit 0: pass, 1: mismatch or error, 77: no usable GPU (skip)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <dms/cpu.h>
#include <dms/dms.h>

#ifndef DMS_EXAMPLE_CUDA_ARCH
#define DMS_EXAMPLE_CUDA_ARCH "90a"
#endif

namespace {

constexpr int kSkip = 77;

// ------------------------------------------------------------------ small utilities

#define CUDA_OK(expr)                                                                    \
  do {                                                                                   \
    cudaError_t e_ = (expr);                                                             \
    if (e_ != cudaSuccess) {                                                             \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_)); \
      std::exit(1);                                                                      \
    }                                                                                    \
  } while (0)

#define DMS_OK(expr)                                                                     \
  do {                                                                                   \
    dms::Status s_ = (expr);                                                             \
    if (s_ != dms::Status::kSuccess) {                                                   \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, dms::status_string(s_)); \
      std::exit(1);                                                                      \
    }                                                                                    \
  } while (0)

template <typename T>
struct DevBuf {
  T* p = nullptr;
  size_t n = 0;
  DevBuf() = default;
  explicit DevBuf(size_t count) : n(count) {
    CUDA_OK(cudaMalloc(reinterpret_cast<void**>(&p), std::max<size_t>(count, 1) * sizeof(T)));
  }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  ~DevBuf() { if (p) cudaFree(p); }
  void upload(const std::vector<T>& h, cudaStream_t s) {
    CUDA_OK(cudaMemcpyAsync(p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice, s));
  }
  std::vector<T> download(cudaStream_t s) const {
    std::vector<T> h(n);
    CUDA_OK(cudaMemcpyAsync(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost, s));
    CUDA_OK(cudaStreamSynchronize(s));
    return h;
  }
  // 0xFF bytes are NaN in bf16, fp16 and fp32: a kernel that skips an output is caught.
  void poison(cudaStream_t s) { CUDA_OK(cudaMemsetAsync(p, 0xFF, n * sizeof(T), s)); }
};

// bf16 and fp16 elements are both kept as uint16_t bits on the host.
float to_f(uint16_t x, dms::DType t) {
  if (t == dms::DType::kBFloat16) {
    __nv_bfloat16_raw r;
    r.x = x;
    return __bfloat162float(__nv_bfloat16(r));
  }
  __half_raw r;
  r.x = x;
  return __half2float(__half(r));
}
uint16_t from_f(float f, dms::DType t) {
  if (t == dms::DType::kBFloat16) return __nv_bfloat16_raw(__float2bfloat16_rn(f)).x;
  return __half_raw(__float2half_rn(f)).x;
}
float round_to(double f, dms::DType t) { return to_f(from_f(float(f), t), t); }

// Largest |a - b| over a check, NaN counts as infinite.
struct Check {
  std::string name;
  double tol, worst = 0;
  void add(double a, double b) {
    const double e = std::fabs(a - b);
    worst = std::isnan(e) ? INFINITY : std::max(worst, e);
  }
  void exact(bool ok) { if (!ok) worst = INFINITY; }
};

struct Report {
  std::deque<Check> checks;  // deque: references from get() stay valid as checks are added
  Check& get(const std::string& name, double tol) {
    for (auto& c : checks) if (c.name == name) return c;
    checks.push_back(Check{name, tol});
    return checks.back();
  }
  bool print() const {
    bool ok = true;
    for (const auto& c : checks) {
      const bool pass = c.worst <= c.tol;
      ok = ok && pass;
      std::printf("  %-44s max err %-10.3g tol %-8.3g %s\n", c.name.c_str(), c.worst, c.tol,
                  pass ? "ok" : "MISMATCH");
    }
    return ok;
  }
};

// ------------------------------------------------------------------ one scenario
struct Config {
  const char* name;
  dms::DType dtype;
  int head_dim, num_kv_heads, group, block_size, window;
  bool norm;                      // Qwen3-style q_norm / k_norm weights in the decode step
  std::vector<int> turn1_rows, turn1_lens, turn2_rows, turn2_lens;
  std::vector<int> decode_rows;   // the decode batch, in batch order (rows of the state)
  int eager_steps, graph_steps_1, graph_steps_2;
  int min_chunk = 0;              // sparse_decode keys per split; small forces the split + merge path
};

// The independent model: every token ever appended, per (row, KV head), with its decision.
struct RefHead {
  std::vector<std::vector<float>> k, v;  // as stored (rounded to the dtype)
  std::vector<int> flag;                 // d_t; -1 while token t is the newest
};

class Scenario {
 public:
  Scenario(const Config& c, uint32_t seed) : c_(c), rng_(seed) {
    H_ = c.num_kv_heads;
    Hq_ = H_ * c.group;
    D_ = c.head_dim;
    R_ = c.window + 1;
    B_ = int(c.decode_rows.size());
    int most = 0;  // tokens one row can reach: sizes the block table and the pool
    for (int r = 0; r < kMaxSeqs; ++r) {
      int n = c.eager_steps + c.graph_steps_1 + c.graph_steps_2;
      for (size_t i = 0; i < c.turn1_rows.size(); ++i) n += c.turn1_rows[i] == r ? c.turn1_lens[i] : 0;
      for (size_t i = 0; i < c.turn2_rows.size(); ++i) n += c.turn2_rows[i] == r ? c.turn2_lens[i] : 0;
      most = std::max(most, n);
    }
    M_ = (most + c.block_size - 1) / c.block_size;
    // Worst case (no eviction at all) for every head of every row: this example never runs dry.
    // A real engine reserves blocks per call instead (DMSCache does, see dms_ext/cache.py).
    num_blocks_ = kMaxSeqs * H_ * M_;
    max_position_ = most + 3;
    scale_ = 2.f / std::sqrt(float(D_));  // peakier than 1/sqrt(D), so a wrong key set shows
    ref_.assign(size_t(kMaxSeqs) * H_, RefHead{});
    const bool bf = c.dtype == dms::DType::kBFloat16;
    tol_out_ = bf ? 3e-2 : 5e-3;   // attention outputs, values in (-1, 1)
    tol_row_ = bf ? 4e-2 : 8e-3;   // normed / roped rows, one rounding apart at magnitude ~2
  }

  bool run() {
    CUDA_OK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    allocate();
    prefill(c_.turn1_rows, c_.turn1_lens);
    for (int s = 0; s < c_.eager_steps; ++s) decode(false);
    for (int s = 0; s < c_.graph_steps_1; ++s) decode(true);
    // A new turn for some sequences between graph replays: the graph holds pointers only, the
    // state it reads lives on the device, so the replays after this see the new tokens.
    prefill(c_.turn2_rows, c_.turn2_lens);
    for (int s = 0; s < c_.graph_steps_2; ++s) decode(true);
    all_rows_decode();
    content_check();
    int32_t err = 0;
    CUDA_OK(cudaMemcpy(&err, d_error_.p, sizeof(err), cudaMemcpyDeviceToHost));
    rep_.get("device error flag (append, decode_step)", 0).exact(err == 0);
    if (graph_exec_) CUDA_OK(cudaGraphExecDestroy(graph_exec_));
    if (graph_) CUDA_OK(cudaGraphDestroy(graph_));
    CUDA_OK(cudaStreamDestroy(stream_));
    std::printf("%s: %s, Hkv %d x G %d, D %d, block %d, window %d%s; %d steps (%d eager, %d graph)\n",
                c_.name, c_.dtype == dms::DType::kBFloat16 ? "bf16" : "fp16", H_, c_.group, D_,
                c_.block_size, c_.window, c_.norm ? ", q/k norm" : "", steps_, c_.eager_steps,
                steps_ - c_.eager_steps);
    return rep_.print();
  }

 private:
  static constexpr int kMaxSeqs = 4;  // rows of the state; row 1 is never used (empty heads)

  std::vector<uint16_t> random_rows(size_t n) {
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    std::vector<uint16_t> x(n);
    for (auto& e : x) e = from_f(u(rng_), c_.dtype);
    return x;
  }
  float f(const std::vector<uint16_t>& x, size_t i) const { return to_f(x[i], c_.dtype); }

  // ---------------------------------------------------------------- allocation
  void allocate() {
    const size_t cache = size_t(num_blocks_) * c_.block_size * D_;
    d_kc_ = std::make_unique<DevBuf<uint16_t>>(cache);
    d_vc_ = std::make_unique<DevBuf<uint16_t>>(cache);
    d_bt_ = std::make_unique<DevBuf<int32_t>>(size_t(kMaxSeqs) * H_ * M_);
    d_sl_ = std::make_unique<DevBuf<int32_t>>(size_t(kMaxSeqs) * H_);
    d_ring_ = std::make_unique<DevBuf<int32_t>>(size_t(kMaxSeqs) * H_ * R_);
    d_nt_ = std::make_unique<DevBuf<int32_t>>(kMaxSeqs);
    d_fs_ = std::make_unique<DevBuf<int32_t>>(num_blocks_);
    d_ft_ = std::make_unique<DevBuf<int32_t>>(1);
    // Empty state: no blocks owned (-1), every block on the free stack. The host twin starts
    // from the same values; block ids may diverge later (the GPU pops concurrently).
    h_kc_ = random_rows(cache);  // garbage where nothing was written: never read
    h_vc_ = random_rows(cache);
    h_bt_.assign(d_bt_->n, -1);
    h_sl_.assign(d_sl_->n, 0);
    h_ring_.assign(d_ring_->n, 0);
    h_nt_.assign(kMaxSeqs, 0);
    h_fs_.resize(num_blocks_);
    for (int i = 0; i < num_blocks_; ++i) h_fs_[i] = i;
    h_ft_ = {num_blocks_};
    d_kc_->upload(h_kc_, stream_);
    d_vc_->upload(h_vc_, stream_);
    d_bt_->upload(h_bt_, stream_);
    d_sl_->upload(h_sl_, stream_);
    d_ring_->upload(h_ring_, stream_);
    d_nt_->upload(h_nt_, stream_);
    d_fs_->upload(h_fs_, stream_);
    d_ft_->upload(h_ft_, stream_);
    CUDA_OK(cudaMemsetAsync(d_error_.p, 0, sizeof(int32_t), stream_));

    // RoPE table: row p = D/2 cos then D/2 sin of p * theta^(-2i/D).
    h_cs_.resize(size_t(max_position_) * D_);
    for (int p = 0; p < max_position_; ++p) {
      for (int i = 0; i < D_ / 2; ++i) {
        const double a = p * std::pow(10000.0, -2.0 * i / D_);
        h_cs_[size_t(p) * D_ + i] = float(std::cos(a));
        h_cs_[size_t(p) * D_ + D_ / 2 + i] = float(std::sin(a));
      }
    }
    d_cs_ = std::make_unique<DevBuf<float>>(h_cs_.size());
    d_cs_->upload(h_cs_, stream_);
    if (c_.norm) {
      std::uniform_real_distribution<float> u(0.5f, 1.5f);
      h_qw_.resize(D_);
      h_kw_.resize(D_);
      for (int d = 0; d < D_; ++d) h_qw_[d] = from_f(u(rng_), c_.dtype);
      for (int d = 0; d < D_; ++d) h_kw_[d] = from_f(u(rng_), c_.dtype);
      d_qw_ = std::make_unique<DevBuf<uint16_t>>(D_);
      d_kw_ = std::make_unique<DevBuf<uint16_t>>(D_);
      d_qw_->upload(h_qw_, stream_);
      d_kw_->upload(h_kw_, stream_);
    }

    // Fixed buffers of the decode batch: a captured graph replays with these pointers.
    d_q_ = std::make_unique<DevBuf<uint16_t>>(size_t(B_) * Hq_ * D_);
    d_k_ = std::make_unique<DevBuf<uint16_t>>(size_t(B_) * H_ * D_);
    d_v_ = std::make_unique<DevBuf<uint16_t>>(size_t(B_) * H_ * D_);
    d_slots_ = std::make_unique<DevBuf<int32_t>>(B_);
    d_slots_->upload(c_.decode_rows, stream_);
    d_logits_ = std::make_unique<DevBuf<float>>(size_t(B_) * H_);
    d_bt_batch_ = std::make_unique<DevBuf<int32_t>>(size_t(B_) * H_ * M_);
    d_sl_batch_ = std::make_unique<DevBuf<int32_t>>(size_t(B_) * H_);
    d_out_ = std::make_unique<DevBuf<uint16_t>>(size_t(B_) * Hq_ * D_);

    dp_ = state_step_params(d_q_->p, d_k_->p, d_v_->p, d_slots_->p, d_logits_->p, true);
    sp_ = decode_params(d_q_->p, d_bt_batch_->p, d_sl_batch_->p, d_out_->p, B_, int64_t(Hq_) * D_,
                        int64_t(Hq_) * D_, nullptr, true);
    sp_.min_chunk = c_.min_chunk;
    // Sized from the sizes alone, for this device's SM count: allocate once, replay forever.
    int dev = 0, sms = 0;
    CUDA_OK(cudaGetDevice(&dev));
    CUDA_OK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    num_sms_ = sms;
    const size_t ws = dms::sparse_decode_workspace_bytes(sp_, num_sms_);
    d_ws_ = std::make_unique<DevBuf<uint8_t>>(ws);
    sp_.workspace = ws ? d_ws_->p : nullptr;
    CUDA_OK(cudaStreamSynchronize(stream_));
  }

  // The shared pieces of every params struct, filled once here; `device` picks the device
  // buffers or their host copies (the CPU twins run on those).
  dms::KVPool pool(bool device) {
    dms::KVPool kv;
    kv.k_cache = device ? static_cast<void*>(d_kc_->p) : h_kc_.data();
    kv.v_cache = device ? static_cast<void*>(d_vc_->p) : h_vc_.data();
    kv.num_blocks = num_blocks_;
    kv.block_size = c_.block_size;
    kv.num_kv_heads = H_;
    kv.head_dim = D_;
    kv.dtype = c_.dtype;
    return kv;
  }
  dms::DMSState state(bool device) {
    dms::DMSState st;
    st.pages.block_table = device ? d_bt_->p : h_bt_.data();
    st.pages.seq_lens = device ? d_sl_->p : h_sl_.data();
    st.pages.max_blocks_per_head = M_;
    st.ring = device ? d_ring_->p : h_ring_.data();
    st.num_tokens = device ? d_nt_->p : h_nt_.data();
    st.max_seqs = kMaxSeqs;
    st.window = c_.window;
    return st;
  }
  dms::FreeList free_list(bool device) {
    return dms::FreeList{device ? d_fs_->p : h_fs_.data(), device ? d_ft_->p : h_ft_.data()};
  }

  // Params of the state-updating decode step.
  dms::DecodeStepParams state_step_params(void* q, const void* k, const void* v,
                                          const int32_t* rows, float* logits, bool device) {
    dms::DecodeStepParams p;
    p.q = q;
    p.k = k;
    p.v = v;
    p.cos_sin_cache = device ? d_cs_->p : h_cs_.data();
    p.rows = rows;
    p.logits = logits;
    if (c_.norm) {
      p.q_norm_weight = device ? static_cast<const void*>(d_qw_->p) : h_qw_.data();
      p.k_norm_weight = device ? static_cast<const void*>(d_kw_->p) : h_kw_.data();
    }
    p.kv = pool(device);
    p.state = state(device);
    p.free = free_list(device);
    p.error = device ? d_error_.p : nullptr;
    p.batch = B_;
    p.max_position = max_position_;
    p.num_q_heads = Hq_;
    return p;
  }

  // A prefill call's packed chunks (device or host pointers): sparse_prefill and append take
  // the same inputs, over the cache of the same side.
  struct Chunk {
    const void* k;
    const void* v;
    const float* logits;
    const int32_t* rows;
    const int32_t* cu_seqlens;
    int num_seqs, total_tokens;
  };
  template <class Params>
  void set_chunk(Params& p, const Chunk& c, bool device) {
    p.k = c.k;
    p.v = c.v;
    p.logits = c.logits;
    p.rows = c.rows;
    p.cu_seqlens = c.cu_seqlens;
    p.kv = pool(device);
    p.state = state(device);
    p.num_seqs = c.num_seqs;
    p.total_tokens = c.total_tokens;
  }
  // workspace is left unset (the caller sizes it; the CPU twin needs none).
  dms::SparsePrefillParams prefill_params(const void* q, void* out, const Chunk& c, bool device) {
    dms::SparsePrefillParams p;
    set_chunk(p, c, device);
    p.q = q;
    p.out = out;
    p.num_q_heads = Hq_;
    p.scale = scale_;
    return p;
  }
  dms::AppendParams append_params(const Chunk& c, bool device) {
    dms::AppendParams p;
    set_chunk(p, c, device);
    p.free = free_list(device);
    p.error = device ? d_error_.p : nullptr;
    return p;
  }

  // Attention over a page table of `batch` rows (bt [batch, H, M], sl [batch, H]).
  dms::SparseDecodeParams decode_params(const void* q, int32_t* bt, int32_t* sl, void* out,
                                        int batch, int64_t q_stride_b, int64_t o_stride_b, float* lse,
                                        bool device) {
    dms::SparseDecodeParams p;
    p.q = q;
    p.out = out;
    p.lse = lse;
    p.q_stride_b = q_stride_b;
    p.q_stride_h = D_;
    p.o_stride_b = o_stride_b;
    p.o_stride_h = D_;
    p.kv = pool(device);
    p.pages = dms::PageTable{bt, sl, M_};
    p.batch = batch;
    p.num_q_heads = Hq_;
    p.scale = scale_;
    return p;
  }

  // ---------------------------------------------------------------- the independent model
  RefHead& ref(int row, int g) { return ref_[size_t(row) * H_ + g]; }

  // docs/semantics.md: token t's logit decides about t-1.
  void ref_append(int row, int g, std::vector<float> k, std::vector<float> v, float logit) {
    RefHead& r = ref(row, g);
    const size_t t = r.k.size();
    if (t >= 1) r.flag[t - 1] = logit > 0.f;
    r.k.push_back(std::move(k));
    r.v.push_back(std::move(v));
    r.flag.push_back(-1);
  }

  // Query at position t: key j is visible iff j <= t and (t - j <= w or d_j == 0).
  bool visible(const RefHead& r, int t, int j) const {
    return j <= t && (t - j <= c_.window || r.flag[j] == 0);
  }

  std::vector<double> ref_attention(int row, int g, const float* q, int t) {
    const RefHead& r = ref(row, g);
    std::vector<double> out(D_, 0.0);
    std::vector<double> s;
    std::vector<int> keys;
    double m = -INFINITY;
    for (int j = 0; j <= t && j < int(r.k.size()); ++j) {
      if (!visible(r, t, j)) continue;
      double dot = 0;
      for (int d = 0; d < D_; ++d) dot += double(q[d]) * r.k[j][d];
      keys.push_back(j);
      s.push_back(dot * scale_);
      m = std::max(m, s.back());
    }
    double l = 0;
    for (size_t i = 0; i < keys.size(); ++i) {
      const double e = std::exp(s[i] - m);
      l += e;
      for (int d = 0; d < D_; ++d) out[d] += e * r.v[keys[i]][d];
    }
    for (int d = 0; d < D_; ++d) out[d] = keys.empty() ? 0.0 : out[d] / l;
    return out;
  }

  // docs/semantics.md: after token t, (sequence, g) stores exactly the keys query t can see.
  int ref_live(int row, int g) {
    const RefHead& r = ref(row, g);
    const int n = int(r.k.size());
    int live = 0;
    for (int j = 0; j < n; ++j) live += visible(r, n - 1, j);
    return live;
  }

  // Borrowed-neuron step of one head vector, as docs/semantics.md section 10 says, in double.
  std::vector<float> ref_norm_rope(const uint16_t* x, const std::vector<uint16_t>& w, int pos,
                                   bool donor, float* logit) {
    std::vector<double> y(D_);
    for (int d = 0; d < D_; ++d) y[d] = to_f(x[d], c_.dtype);
    if (!w.empty()) {
      double ss = 0;
      for (double e : y) ss += e * e;
      const double r = 1.0 / std::sqrt(ss / D_ + 1e-6);
      for (int d = 0; d < D_; ++d) y[d] *= r * to_f(w[d], c_.dtype);
    }
    if (donor) {
      *logit = float(y[D_ - 1] * 100.0 - 5.0);
      y[D_ - 1] = 0;
    }
    const float* cs = h_cs_.data() + size_t(pos) * D_;
    const int half = D_ / 2;
    for (int i = 0; i < half; ++i) {
      const double a = y[i], b = y[i + half];
      y[i] = a * cs[i] - b * cs[half + i];
      y[i + half] = b * cs[i] + a * cs[half + i];
    }
    if (donor) y[D_ - 1] = 0;
    std::vector<float> out(D_);
    for (int d = 0; d < D_; ++d) out[d] = round_to(y[d], c_.dtype);
    return out;
  }

  // ---------------------------------------------------------------- prefill
  void prefill(const std::vector<int>& rows, const std::vector<int>& lens) {
    const int n = int(rows.size());
    std::vector<int32_t> cu(n + 1, 0);
    for (int i = 0; i < n; ++i) cu[i + 1] = cu[i] + lens[i];
    const int T = cu[n];
    std::vector<uint16_t> q = random_rows(size_t(T) * Hq_ * D_);
    std::vector<uint16_t> k = random_rows(size_t(T) * H_ * D_);  // RoPE already applied
    std::vector<uint16_t> v = random_rows(size_t(T) * H_ * D_);
    std::vector<float> logits(size_t(T) * H_);
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    for (auto& l : logits) l = u(rng_);  // adapter-style logits: about half the tokens flagged
    std::vector<int32_t> positions_before(n);
    for (int i = 0; i < n; ++i) positions_before[i] = h_nt_[rows[i]];

    DevBuf<uint16_t> dq(q.size()), dk(k.size()), dv(v.size()), dout(q.size());
    DevBuf<float> dl(logits.size());
    DevBuf<int32_t> dslots(n), dcu(n + 1);
    dq.upload(q, stream_);
    dk.upload(k, stream_);
    dv.upload(v, stream_);
    dl.upload(logits, stream_);
    dslots.upload(rows, stream_);
    dcu.upload(cu, stream_);
    dout.poison(stream_);

    // Attention first: sparse_prefill reads the cache as it was before this chunk and takes
    // the chunk's own keys from k / v; append then writes them.
    const Chunk on_gpu{dk.p, dv.p, dl.p, dslots.p, dcu.p, n, T};
    dms::SparsePrefillParams pp = prefill_params(dq.p, dout.p, on_gpu, true);
    DevBuf<uint8_t> ws(dms::sparse_prefill_workspace_bytes(pp));
    pp.workspace = ws.p;  // cudaMalloc'd: 256-byte aligned, as the kernels want
    DMS_OK(dms::sparse_prefill(pp, stream_));
    DMS_OK(dms::append(append_params(on_gpu, true), stream_));
    const std::vector<uint16_t> out_gpu = dout.download(stream_);

    // The CPU twins on the host copy of the state, same inputs.
    std::vector<uint16_t> out_cpu(q.size());
    const Chunk on_host{k.data(), v.data(), logits.data(), rows.data(), cu.data(), n, T};
    DMS_OK(dms::cpu::sparse_prefill(prefill_params(q.data(), out_cpu.data(), on_host, false)));
    DMS_OK(dms::cpu::append(append_params(on_host, false)));

    Check& vs_cpu = rep_.get("prefill out: GPU vs CPU twin", tol_out_);
    for (size_t i = 0; i < q.size(); ++i) vs_cpu.add(f(out_gpu, i), f(out_cpu, i));

    // The model: all tokens of a chunk enter first (their flags come from the next token's
    // logit), then every query of the chunk looks at what it may see.
    Check& vs_ref = rep_.get("prefill out: GPU vs host model", tol_out_);
    for (int c = 0; c < n; ++c) {
      for (int i = cu[c]; i < cu[c + 1]; ++i) {
        for (int g = 0; g < H_; ++g) {
          std::vector<float> kr(D_), vr(D_);
          for (int d = 0; d < D_; ++d) {
            kr[d] = f(k, (size_t(i) * H_ + g) * D_ + d);
            vr[d] = f(v, (size_t(i) * H_ + g) * D_ + d);
          }
          ref_append(rows[c], g, std::move(kr), std::move(vr), logits[size_t(i) * H_ + g]);
        }
      }
      for (int i = cu[c]; i < cu[c + 1]; ++i) {
        const int t = positions_before[c] + (i - cu[c]);
        for (int h = 0; h < Hq_; ++h) {
          std::vector<float> qf(D_);
          for (int d = 0; d < D_; ++d) qf[d] = f(q, (size_t(i) * Hq_ + h) * D_ + d);
          const std::vector<double> o = ref_attention(rows[c], h / c_.group, qf.data(), t);
          for (int d = 0; d < D_; ++d) vs_ref.add(f(out_gpu, (size_t(i) * Hq_ + h) * D_ + d), o[d]);
        }
      }
    }
    state_check();
  }

  // ---------------------------------------------------------------- decode
  // What one decode step enqueues: the fused step on the cache rows, the gather of the batch's
  // block-table rows (the engine's row -> batch mapping), attention. No host sync, no
  // allocation, no host-side plan: the whole sequence is capturable.
  void enqueue_step() {
    DMS_OK(dms::decode_step(dp_, stream_));
    for (int b = 0; b < B_; ++b) {
      const int row = c_.decode_rows[b];
      CUDA_OK(cudaMemcpyAsync(d_bt_batch_->p + size_t(b) * H_ * M_, d_bt_->p + size_t(row) * H_ * M_,
                              sizeof(int32_t) * H_ * M_, cudaMemcpyDeviceToDevice, stream_));
      CUDA_OK(cudaMemcpyAsync(d_sl_batch_->p + size_t(b) * H_, d_sl_->p + size_t(row) * H_,
                              sizeof(int32_t) * H_, cudaMemcpyDeviceToDevice, stream_));
    }
    DMS_OK(dms::sparse_decode(sp_, stream_));
  }

  void decode(bool graph) {
    ++steps_;
    std::vector<uint16_t> q = random_rows(size_t(B_) * Hq_ * D_);  // before norm and RoPE
    std::vector<uint16_t> k = random_rows(size_t(B_) * H_ * D_);
    std::vector<uint16_t> v = random_rows(size_t(B_) * H_ * D_);
    d_q_->upload(q, stream_);
    d_k_->upload(k, stream_);
    d_v_->upload(v, stream_);
    d_out_->poison(stream_);
    d_logits_->poison(stream_);
    if (graph) {
      if (!graph_exec_) {
        CUDA_OK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeGlobal));
        enqueue_step();
        CUDA_OK(cudaStreamEndCapture(stream_, &graph_));
        CUDA_OK(cudaGraphInstantiate(&graph_exec_, graph_, 0));
      }
      CUDA_OK(cudaGraphLaunch(graph_exec_, stream_));
    } else {
      enqueue_step();
    }
    const std::vector<uint16_t> q_gpu = d_q_->download(stream_);  // normed + roped in place
    const std::vector<float> logits_gpu = d_logits_->download(stream_);
    const std::vector<uint16_t> out_gpu = d_out_->download(stream_);

    // CPU twins: the same step on the host state, attention over the gathered rows.
    std::vector<int32_t> positions(B_);
    for (int b = 0; b < B_; ++b) positions[b] = h_nt_[c_.decode_rows[b]];
    std::vector<uint16_t> q_cpu = q;
    std::vector<float> logits_cpu(size_t(B_) * H_);
    dms::DecodeStepParams hp =
        state_step_params(q_cpu.data(), k.data(), v.data(), c_.decode_rows.data(), logits_cpu.data(), false);
    DMS_OK(dms::cpu::decode_step(hp));
    std::vector<int32_t> bt(size_t(B_) * H_ * M_), sl(size_t(B_) * H_);
    for (int b = 0; b < B_; ++b) {
      const int row = c_.decode_rows[b];
      std::copy_n(h_bt_.begin() + size_t(row) * H_ * M_, H_ * M_, bt.begin() + size_t(b) * H_ * M_);
      std::copy_n(h_sl_.begin() + size_t(row) * H_, H_, sl.begin() + size_t(b) * H_);
    }
    std::vector<uint16_t> out_cpu(q.size());
    DMS_OK(dms::cpu::sparse_decode(decode_params(q_cpu.data(), bt.data(), sl.data(), out_cpu.data(), B_,
                                                 int64_t(Hq_) * D_, int64_t(Hq_) * D_, nullptr, false)));
    Check& q_vs_cpu = rep_.get("decode q after norm + RoPE: GPU vs CPU twin", tol_row_);
    Check& l_vs_cpu = rep_.get("decode logits (relative): GPU vs CPU twin", 1e-4);
    Check& o_vs_cpu = rep_.get("decode out: GPU vs CPU twin", tol_out_);
    for (size_t i = 0; i < q.size(); ++i) q_vs_cpu.add(f(q_gpu, i), f(q_cpu, i));
    for (size_t i = 0; i < logits_cpu.size(); ++i) {
      const double s = std::max(1.0, double(std::fabs(logits_cpu[i])));
      l_vs_cpu.add(logits_gpu[i] / s, logits_cpu[i] / s);
    }
    for (size_t i = 0; i < q.size(); ++i) o_vs_cpu.add(f(out_gpu, i), f(out_cpu, i));

    // The model, from the raw projections.
    Check& q_vs_ref = rep_.get("decode q after norm + RoPE: GPU vs host model", tol_row_);
    Check& l_vs_ref = rep_.get("decode logits (relative): GPU vs host model", 1e-4);
    Check& o_vs_ref = rep_.get("decode out: GPU vs host model", tol_out_);
    for (int b = 0; b < B_; ++b) {
      const int row = c_.decode_rows[b], t = positions[b];
      std::vector<float> logit(H_, 0.f);
      std::vector<std::vector<float>> qr(Hq_);
      for (int h = 0; h < Hq_; ++h) {
        const bool donor = h % c_.group == 0;
        qr[h] = ref_norm_rope(&q[(size_t(b) * Hq_ + h) * D_], h_qw_, t, donor, &logit[h / c_.group]);
        for (int d = 0; d < D_; ++d) q_vs_ref.add(f(q_gpu, (size_t(b) * Hq_ + h) * D_ + d), qr[h][d]);
      }
      for (int g = 0; g < H_; ++g) {
        const double s = std::max(1.0, double(std::fabs(logit[g])));
        l_vs_ref.add(logits_gpu[size_t(b) * H_ + g] / s, logit[g] / s);
        std::vector<float> kr = ref_norm_rope(&k[(size_t(b) * H_ + g) * D_], h_kw_, t, false, nullptr);
        std::vector<float> vr(D_);
        for (int d = 0; d < D_; ++d) vr[d] = f(v, (size_t(b) * H_ + g) * D_ + d);
        ref_append(row, g, std::move(kr), std::move(vr), logit[g]);
      }
      for (int h = 0; h < Hq_; ++h) {
        const std::vector<double> o = ref_attention(row, h / c_.group, qr[h].data(), t);
        for (int d = 0; d < D_; ++d) o_vs_ref.add(f(out_gpu, (size_t(b) * Hq_ + h) * D_ + d), o[d]);
      }
    }
    state_check();
  }

  // One attention call straight over every row of the state (row 1 never held a token: its
  // query heads must come back as zeros, lse -inf), with padded batch strides and lse.
  void all_rows_decode() {
    const int64_t qs = int64_t(Hq_) * D_ + 64, os = int64_t(Hq_) * D_ + 32;
    std::vector<uint16_t> q = random_rows(size_t(kMaxSeqs) * qs);
    DevBuf<uint16_t> dq(q.size()), dout(size_t(kMaxSeqs) * os);
    DevBuf<float> dlse(size_t(kMaxSeqs) * Hq_);
    dq.upload(q, stream_);
    dout.poison(stream_);
    dlse.poison(stream_);
    dms::SparseDecodeParams p = decode_params(dq.p, d_bt_->p, d_sl_->p, dout.p, kMaxSeqs, qs, os, dlse.p, true);
    p.min_chunk = c_.min_chunk;
    DevBuf<uint8_t> ws(dms::sparse_decode_workspace_bytes(p, num_sms_));
    p.workspace = ws.n ? ws.p : nullptr;
    DMS_OK(dms::sparse_decode(p, stream_));
    const std::vector<uint16_t> out_gpu = dout.download(stream_);
    const std::vector<float> lse_gpu = dlse.download(stream_);

    std::vector<uint16_t> out_cpu(dout.n);
    std::vector<float> lse_cpu(dlse.n);
    DMS_OK(dms::cpu::sparse_decode(
        decode_params(q.data(), h_bt_.data(), h_sl_.data(), out_cpu.data(), kMaxSeqs, qs, os, lse_cpu.data(), false)));
    Check& o_cpu = rep_.get("all-rows decode out: GPU vs CPU twin", tol_out_);
    Check& o_ref = rep_.get("all-rows decode out: GPU vs host model", tol_out_);
    Check& lse = rep_.get("all-rows decode lse: GPU vs CPU twin", 2e-3);
    for (int r = 0; r < kMaxSeqs; ++r) {
      for (int h = 0; h < Hq_; ++h) {
        const int g = h / c_.group;
        const int t = int(ref(r, g).k.size()) - 1;  // the newest token's query position
        std::vector<float> qf(D_);
        for (int d = 0; d < D_; ++d) qf[d] = f(q, size_t(r) * qs + size_t(h) * D_ + d);
        const std::vector<double> o = ref_attention(r, g, qf.data(), t);
        for (int d = 0; d < D_; ++d) {
          const size_t i = size_t(r) * os + size_t(h) * D_ + d;
          o_cpu.add(f(out_gpu, i), f(out_cpu, i));
          o_ref.add(f(out_gpu, i), o[d]);
        }
        const float a = lse_gpu[size_t(r) * Hq_ + h], b = lse_cpu[size_t(r) * Hq_ + h];
        if (std::isinf(b)) lse.exact(std::isinf(a) && a < 0);
        else lse.add(a, b);
      }
    }
  }

  // ---------------------------------------------------------------- state checks
  struct DevState {
    std::vector<int32_t> bt, sl, ring, nt, fs, ft;
    std::vector<uint16_t> kc, vc;
  };
  DevState download_state() {
    DevState s;
    s.bt = d_bt_->download(stream_);
    s.sl = d_sl_->download(stream_);
    s.ring = d_ring_->download(stream_);
    s.nt = d_nt_->download(stream_);
    s.fs = d_fs_->download(stream_);
    s.ft = d_ft_->download(stream_);
    s.kc = d_kc_->download(stream_);
    s.vc = d_vc_->download(stream_);
    return s;
  }
  size_t cache_row(const std::vector<int32_t>& bt, int row, int g, int slot) const {
    const int32_t blk = bt[(size_t(row) * H_ + g) * M_ + slot / c_.block_size];
    return (size_t(blk) * c_.block_size + slot % c_.block_size) * D_;
  }

  // GPU state vs the CPU twin's (block ids may differ: the GPU pops blocks concurrently, so
  // K/V are compared slot by slot through each side's own block table), and the GPU state vs
  // the memory rule of docs/semantics.md section 6 and the pool's accounting.
  void state_check() {
    const DevState s = download_state();
    rep_.get("state: num_tokens, seq_lens, ring, free_top = CPU twin", 0)
        .exact(s.nt == h_nt_ && s.sl == h_sl_ && s.ring == h_ring_ && s.ft == h_ft_);
    Check& kv = rep_.get("state: K/V by slot, GPU vs CPU twin", tol_row_);
    Check& live = rep_.get("state: live tokens per head = docs/semantics.md count", 0);
    Check& pool = rep_.get("state: blocks owned once, none lost", 0);
    std::vector<int> owner(num_blocks_, 0);
    int used = 0;
    for (int r = 0; r < kMaxSeqs; ++r) {
      for (int g = 0; g < H_; ++g) {
        const int n = s.sl[size_t(r) * H_ + g];
        live.exact(n == ref_live(r, g) && s.nt[r] == int(ref(r, g).k.size()));
        if (s.sl != h_sl_) continue;
        for (int i = 0; i < n; ++i) {
          const size_t a = cache_row(s.bt, r, g, i), b = cache_row(h_bt_, r, g, i);
          for (int d = 0; d < D_; ++d) {
            kv.add(f(s.kc, a + d), f(h_kc_, b + d));
            kv.add(f(s.vc, a + d), f(h_vc_, b + d));
          }
        }
        for (int j = 0; j < (n + c_.block_size - 1) / c_.block_size; ++j) {
          const int32_t blk = s.bt[(size_t(r) * H_ + g) * M_ + j];
          pool.exact(blk >= 0 && blk < num_blocks_);
          if (blk >= 0 && blk < num_blocks_) ++owner[blk];
          ++used;
        }
      }
    }
    const int top = s.ft[0];
    pool.exact(top >= 0 && top + used == num_blocks_);
    for (int i = 0; i < top && i < num_blocks_; ++i) {
      const int32_t blk = s.fs[i];
      pool.exact(blk >= 0 && blk < num_blocks_);
      if (blk >= 0 && blk < num_blocks_) ++owner[blk];
    }
    for (int o : owner) pool.exact(o == 1);
  }

  // The cache holds exactly the model's visible keys of the newest query, in whatever slot
  // order: every visible token's K/V must sit in a distinct slot (matched greedily).
  void content_check() {
    const DevState s = download_state();
    Check& c = rep_.get("state: cache holds exactly the visible K/V", 0);
    for (int r = 0; r < kMaxSeqs; ++r) {
      for (int g = 0; g < H_; ++g) {
        const RefHead& h = ref(r, g);
        const int n = s.sl[size_t(r) * H_ + g], t = int(h.k.size()) - 1;
        std::vector<char> taken(n, 0);
        int matched = 0, visible_count = 0;
        for (int j = 0; j <= t; ++j) {
          if (!visible(h, t, j)) continue;
          ++visible_count;
          for (int i = 0; i < n; ++i) {
            if (taken[i]) continue;
            const size_t a = cache_row(s.bt, r, g, i);
            bool same = true;
            for (int d = 0; d < D_ && same; ++d) {
              same = std::fabs(f(s.kc, a + d) - h.k[j][d]) <= tol_row_ &&
                     std::fabs(f(s.vc, a + d) - h.v[j][d]) <= tol_row_;
            }
            if (same) {
              taken[i] = 1;
              ++matched;
              break;
            }
          }
        }
        c.exact(matched == visible_count && visible_count == n);
      }
    }
  }

  const Config& c_;
  std::mt19937 rng_;
  int H_, Hq_, D_, R_, B_, M_, num_blocks_, max_position_, num_sms_ = 0, steps_ = 0;
  float scale_;
  double tol_out_, tol_row_;
  cudaStream_t stream_ = nullptr;
  cudaGraph_t graph_ = nullptr;
  cudaGraphExec_t graph_exec_ = nullptr;
  Report rep_;
  std::vector<RefHead> ref_;

  // Device state (docs/layout.md + params.h) and its host twin.
  std::unique_ptr<DevBuf<uint16_t>> d_kc_, d_vc_, d_qw_, d_kw_;
  std::unique_ptr<DevBuf<int32_t>> d_bt_, d_sl_, d_ring_, d_nt_, d_fs_, d_ft_;
  DevBuf<int32_t> d_error_{1};
  std::unique_ptr<DevBuf<float>> d_cs_;
  std::vector<uint16_t> h_kc_, h_vc_, h_qw_, h_kw_;
  std::vector<int32_t> h_bt_, h_sl_, h_ring_, h_nt_, h_fs_, h_ft_;
  std::vector<float> h_cs_;

  // The decode batch's fixed buffers and params (what the graph replays).
  std::unique_ptr<DevBuf<uint16_t>> d_q_, d_k_, d_v_, d_out_;
  std::unique_ptr<DevBuf<int32_t>> d_slots_, d_bt_batch_, d_sl_batch_;
  std::unique_ptr<DevBuf<float>> d_logits_;
  std::unique_ptr<DevBuf<uint8_t>> d_ws_;
  dms::DecodeStepParams dp_;
  dms::SparseDecodeParams sp_;
};

// No GPU, or one this build has no kernels for: skip (ctest SKIP_RETURN_CODE 77).
bool usable_gpu(std::string* why) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess || n == 0) {
    *why = e != cudaSuccess ? cudaGetErrorString(e) : "no CUDA device";
    return false;
  }
  cudaDeviceProp prop;
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) {
    *why = "cudaGetDeviceProperties failed";
    return false;
  }
  // Built as sm_XY[a] cubins without PTX: only those exact compute capabilities can run.
  const std::string cc = std::to_string(prop.major) + std::to_string(prop.minor);
  std::string archs = DMS_EXAMPLE_CUDA_ARCH;
  std::replace(archs.begin(), archs.end(), ';', ',');
  size_t pos = 0;
  while (pos <= archs.size()) {
    size_t end = archs.find(',', pos);
    if (end == std::string::npos) end = archs.size();
    std::string a = archs.substr(pos, end - pos);
    a.erase(std::remove_if(a.begin(), a.end(), [](char ch) { return !std::isdigit(ch); }), a.end());
    if (a == cc) return true;
    pos = end + 1;
  }
  *why = std::string(prop.name) + " is sm_" + cc + ", the library was built for " + DMS_EXAMPLE_CUDA_ARCH;
  return false;
}

// Host only (runs without a GPU too): sparse_decode's workspace depends on head_dim, the pool
// dtype, the SM count and max_splits, never on the batch or the table width, so an engine sizes
// it once (the kernel's pipeline, and with it the grid, does change with the batch).
bool workspace_fits_every_batch() {
  using dms::DType;
  bool ok = true;
  for (int D : {64, 128, 256}) {
    for (DType dt : {DType::kBFloat16, DType::kFloat8E4M3}) {
      dms::SparseDecodeParams p;
      p.kv.num_kv_heads = 8;
      p.num_q_heads = 32;
      p.kv.head_dim = D;
      p.kv.dtype = dt;
      p.kv.block_size = 64;
      size_t first = 0;
      for (int batch : {1, 2, 4, 16, 64, 1000}) {
        for (int width : {1, 64, 4096}) {
          p.batch = batch;
          p.pages.max_blocks_per_head = width;
          const size_t w = dms::sparse_decode_workspace_bytes(p, 132);
          if (first == 0) first = w;
          if (w == 0 || w != first) {
            std::printf("FAIL: workspace D %d %s batch %d width %d: %zu bytes, batch 1: %zu\n", D,
                        dt == DType::kBFloat16 ? "bf16" : "fp8", batch, width, w, first);
            ok = false;
          }
        }
      }
    }
  }
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  if (!workspace_fits_every_batch()) return 1;
  std::string why;
  if (!usable_gpu(&why)) {
    std::printf("SKIP: %s\n", why.c_str());
    return kSkip;
  }
  using dms::DType;
  // Rows {2, 0, 3} decode in that batch order; row 1 stays empty. Turn 2 continues rows 3 and 2.
  std::vector<Config> configs = {
      {"bf16 G3", DType::kBFloat16, 128, 2, 3, 16, 13, false,
       {2, 0, 3}, {37, 5, 70}, {3, 2}, {9, 20}, {2, 0, 3}, 6, 12, 10},
      {"fp16 G5 norm", DType::kFloat16, 64, 3, 5, 8, 21, true,
       {0, 3, 2}, {12, 64, 1}, {2, 0}, {33, 2}, {3, 2, 0}, 4, 10, 8},
      {"bf16 G1 window 1", DType::kBFloat16, 64, 4, 1, 32, 1, true,
       {3, 2, 0}, {70, 3, 40}, {0}, {17}, {0, 2, 3}, 3, 8, 5, 16},
      // Qwen3-8B heads; heads long enough for several default-sized splits.
      {"bf16 Qwen3-8B heads", DType::kBFloat16, 128, 8, 4, 64, 32, true,
       {1, 3}, {700, 260}, {3}, {90}, {3, 1}, 3, 6, 4},
  };
  if (quick) {
    configs.resize(1);
    configs[0].graph_steps_1 = 4;
    configs[0].graph_steps_2 = 3;
  }
  bool ok = true;
  uint32_t seed = 1234;
  for (const Config& c : configs) {
    Scenario s(c, seed++);
    ok = s.run() && ok;
  }
  std::printf("%s\n", ok ? "PASS" : "FAIL");
  return ok ? 0 : 1;
}
