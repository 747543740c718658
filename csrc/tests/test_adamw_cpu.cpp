// adamw_step_cpu against a scalar double-precision loop of the SPEC §1 update (and the SPEC §2 stats), over several
// tensors of odd sizes in one call, for fp32 and bf16 storage and the amsgrad / maximize / weight-decay /
// grad_scale / found_inf variants; and the in-step normals against philox.h's per-element normal_poly. Usage:
// test_adamw_cpu step|stats|determinism|noise
#include "cpu/adamw_cpu.h"
#include "cpu/cpu_isa.h"
#include "cpu/cpu_kernels.h"
#include "pnekern/philox.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "test_util.h"

using namespace pnekern;
using pnekern_test::close;

namespace {

const std::vector<int64_t> kSizes = {1, 7, 1023, 65537};

template <typename T>
T store(double x) {
  return Storage<T>::store(static_cast<float>(x));
}
template <typename T>
double load(T x) {
  return Storage<T>::load(x);
}

// One tensor's buffers in storage type T, plus its step count.
template <typename T>
struct Buffers {
  std::vector<T> p, g, m, v, vmax;
  std::vector<float> q;
  double step = 0.0;
};

template <typename T>
Buffers<T> make_buffers(std::mt19937_64& rng, int64_t n, float grad_scale) {
  Buffers<T> b;
  auto conv = [](const std::vector<float>& src) {
    std::vector<T> out(src.size());
    for (size_t i = 0; i < src.size(); ++i) out[i] = Storage<T>::store(src[i]);
    return out;
  };
  b.p = conv(pnekern_test::randn(rng, n));
  std::vector<float> g = pnekern_test::randn(rng, n);
  for (auto& x : g) x *= grad_scale;  // a GradScaler-scaled gradient
  b.g = conv(g);
  b.m = conv(std::vector<float>(static_cast<size_t>(n), 0.0f));
  b.v = b.m;
  b.vmax = b.m;
  b.q = pnekern_test::randn(rng, n);
  for (auto& x : b.q) x = x * x;  // Σ_k x_k² is non-negative
  return b;
}

struct Variant {
  bool amsgrad, maximize;
  double weight_decay;
  bool grad_scale;
};

// The scalar double-precision oracle: SPEC §1 step and §2 stats, loading/storing through T so that only the
// arithmetic precision differs from the kernel.
template <typename T>
void reference_step(Buffers<T>& b, const AdamWHyper& h, const float* grad_scale, double* stats) {
  const double s = b.step;
  const double bc1 = 1.0 - std::pow(h.beta1, s), bc2 = 1.0 - std::pow(h.beta2, s);
  const double bc2_prev = 1.0 - std::pow(h.beta2, s - 1.0);
  double acc[4] = {0, 0, 0, 0};
  for (size_t i = 0; i < b.p.size(); ++i) {
    double g = load(b.g[i]);
    if (grad_scale) {
      g /= *grad_scale;
      b.g[i] = store<T>(g);
    }
    if (h.maximize) g = -g;
    double p = load(b.p[i]) * (1.0 - h.lr * h.weight_decay);
    const double m = load(b.m[i]) + (1.0 - h.beta1) * (g - load(b.m[i]));
    const double v_old = load(b.v[i]);
    const double v = h.beta2 * v_old + (1.0 - h.beta2) * g * g;
    double v_use = v, v_prev = v_old;
    if (h.amsgrad) {
      v_prev = load(b.vmax[i]);
      v_use = std::max(v_prev, v);
      b.vmax[i] = store<T>(v_use);
    }
    const double denom = std::sqrt(v_use) / std::sqrt(bc2) + h.eps;
    p -= (h.lr / bc1) * m / denom;
    b.p[i] = store<T>(p);
    b.m[i] = store<T>(m);
    b.v[i] = store<T>(v);
    const double a_new = 1.0 / denom;
    const double a_prev = s - 1.0 > 0.0 ? 1.0 / (std::sqrt(v_prev) / std::sqrt(bc2_prev) + h.eps) : 1.0;
    acc[0] += g * g;
    acc[1] += a_prev * a_prev * g * g;
    acc[2] += a_new * a_new * g * g;
    acc[3] += a_new * a_new * b.q[i];
  }
  if (stats)
    for (int k = 0; k < 4; ++k) stats[k] = acc[k];
}

template <typename T>
AdamWTensor view(Buffers<T>& b, bool amsgrad, bool with_q) {
  AdamWTensor t;
  t.param = b.p.data();
  t.grad = b.g.data();
  t.exp_avg = b.m.data();
  t.exp_avg_sq = b.v.data();
  t.max_exp_avg_sq = amsgrad ? b.vmax.data() : nullptr;
  t.sumsq = with_q ? b.q.data() : nullptr;
  t.numel = static_cast<int64_t>(b.p.size());
  t.step = b.step;
  return t;
}

// Buffer comparison with a dtype tolerance: |a-b| <= rtol·(|b| + rms(b)). The rms term absorbs cancellation near
// zero (lerp of m, a param crossing 0), where a relative bound alone would be meaningless.
template <typename T>
void expect_buffers_close(const std::vector<T>& got, const std::vector<T>& want, double rtol, const char* what,
                          const std::string& ctx) {
  double ss = 0.0;
  for (const T& x : want) ss += load(x) * load(x);
  const double rms = std::sqrt(ss / std::max<size_t>(want.size(), 1));
  int bad = 0;
  for (size_t i = 0; i < got.size() && bad < 3; ++i) {
    const double a = load(got[i]), b = load(want[i]);
    if (!close(a, b, rtol, rtol * rms)) {
      ++bad;
      EXPECT_TRUE(false, "%s %s[%zu]: kernel %.9g reference %.9g", ctx.c_str(), what, i, a, b);
    }
  }
}

template <typename T>
bool bitwise_equal(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

template <typename T>
void run_variant(DType dtype, const Variant& var, double rtol, bool check_stats, int cols = kAdamWStatsCols) {
  // cols == kAdamWTraceStatsCols: trace rows (Σ g², Σ a_prev² g²) and no sumsq buffers, i.e. the trace-only loop.
  std::mt19937_64 rng(1234);
  AdamWHyper h;
  h.stats_cols = cols;
  h.lr = 1e-2;
  h.beta1 = 0.9;
  h.beta2 = 0.999;
  h.eps = 1e-8;
  h.weight_decay = var.weight_decay;
  h.amsgrad = var.amsgrad;
  h.maximize = var.maximize;
  const float scale_value = 1024.0f;
  const float* scale = var.grad_scale ? &scale_value : nullptr;
  std::vector<Buffers<T>> kern, ref;
  for (int64_t n : kSizes) kern.push_back(make_buffers<T>(rng, n, var.grad_scale ? scale_value : 1.0f));
  ref = kern;
  const std::string ctx = std::string(dtype_name(dtype)) + " amsgrad=" + std::to_string(var.amsgrad) +
                          " maximize=" + std::to_string(var.maximize) + " wd=" + std::to_string(var.weight_decay) +
                          " grad_scale=" + std::to_string(var.grad_scale) + " cols=" + std::to_string(cols);
  const size_t nt = kSizes.size();
  for (int it = 0; it < 5; ++it) {
    const bool inf_step = it == 2;  // a GradScaler-skipped step in the middle
    if (inf_step) {
      std::vector<Buffers<T>> before = kern;
      std::vector<AdamWTensor> views;
      for (auto& b : kern) views.push_back(view(b, var.amsgrad, true));
      for (auto& v : views) v.step = kern[0].step + 1;  // what a caller would pass if it counted; must not matter
      std::vector<double> stats(nt * cols, NAN);
      const float found_inf = 1.0f;
      adamw_step_cpu(dtype, views.data(), static_cast<int64_t>(nt), h, scale, &found_inf, stats.data(), 2);
      for (size_t t = 0; t < nt; ++t) {
        EXPECT_TRUE(bitwise_equal(kern[t].p, before[t].p) && bitwise_equal(kern[t].g, before[t].g) &&
                        bitwise_equal(kern[t].m, before[t].m) && bitwise_equal(kern[t].v, before[t].v) &&
                        bitwise_equal(kern[t].vmax, before[t].vmax),
                    "%s: found_inf step modified tensor %zu", ctx.c_str(), t);
        for (int k = 0; k < cols; ++k)
          EXPECT_TRUE(stats[t * cols + k] == 0.0, "%s: found_inf stats not zero", ctx.c_str());
      }
      continue;
    }
    std::vector<AdamWTensor> views;
    std::vector<double> stats(nt * cols, NAN), ref_stats(nt * 4, NAN);  // poisoned: every row must be written
    for (size_t t = 0; t < nt; ++t) {
      kern[t].step += 1;
      ref[t].step += 1;
      // Half the tensors have a sumsq buffer (full rows only).
      views.push_back(view(kern[t], var.amsgrad, cols == kAdamWStatsCols && t % 2 == 0));
      reference_step(ref[t], h, scale, &ref_stats[t * 4]);
      if (t % 2 != 0 || cols != kAdamWStatsCols) ref_stats[t * 4 + 3] = 0.0;
    }
    adamw_step_cpu(dtype, views.data(), static_cast<int64_t>(nt), h, scale, nullptr,
                   check_stats ? stats.data() : nullptr, 2);
    const std::string sctx = ctx + " step " + std::to_string(it);
    for (size_t t = 0; t < nt; ++t) {
      const std::string tctx = sctx + " tensor " + std::to_string(t) + " (n=" + std::to_string(kSizes[t]) + ")";
      expect_buffers_close(kern[t].p, ref[t].p, rtol, "param", tctx);
      expect_buffers_close(kern[t].m, ref[t].m, rtol, "exp_avg", tctx);
      expect_buffers_close(kern[t].v, ref[t].v, rtol, "exp_avg_sq", tctx);
      if (var.amsgrad) expect_buffers_close(kern[t].vmax, ref[t].vmax, rtol, "max_exp_avg_sq", tctx);
      expect_buffers_close(kern[t].g, ref[t].g, rtol, "grad (unscaled write-back)", tctx);
      if (check_stats)
        for (int k = 0; k < cols; ++k)
          EXPECT_TRUE(close(stats[t * cols + k], ref_stats[t * 4 + k], 1e-5, 0.0),
                      "%s stats[%d]: kernel %.12g ref %.12g", tctx.c_str(), k, stats[t * cols + k],
                      ref_stats[t * 4 + k]);
      // Keep the reference on the kernel's trajectory so errors do not compound across steps in low precision.
      ref[t] = kern[t];
    }
    // Fresh gradients for the next step.
    for (size_t t = 0; t < nt; ++t) {
      std::vector<float> g = pnekern_test::randn(rng, kSizes[t], var.grad_scale ? scale_value : 1.0f);
      for (size_t i = 0; i < g.size(); ++i) kern[t].g[i] = ref[t].g[i] = Storage<T>::store(g[i]);
    }
  }
}

std::vector<Variant> variants() {
  return {{false, false, 0.0, false}, {false, false, 0.1, false}, {true, false, 0.1, false},
          {false, true, 0.1, false},  {true, true, 0.0, true},    {false, false, 0.1, true}};
}

// The stats and the update must not depend on the thread count (fixed chunking, fixed-order second stage).
void determinism() {
  std::mt19937_64 rng(99);
  AdamWHyper h;
  h.amsgrad = true;
  std::vector<Buffers<float>> a;
  for (int64_t n : {int64_t{200003}, int64_t{7}, int64_t{131072}}) a.push_back(make_buffers<float>(rng, n, 1.0f));
  std::vector<Buffers<float>> b = a;
  for (int it = 0; it < 3; ++it) {
    std::vector<AdamWTensor> va, vb;
    for (auto& x : a) x.step += 1, va.push_back(view(x, true, true));
    for (auto& x : b) x.step += 1, vb.push_back(view(x, true, true));
    std::vector<double> sa(a.size() * 4), sb(b.size() * 4);
    adamw_step_cpu(DType::kFloat32, va.data(), static_cast<int64_t>(va.size()), h, nullptr, nullptr, sa.data(), 1);
    adamw_step_cpu(DType::kFloat32, vb.data(), static_cast<int64_t>(vb.size()), h, nullptr, nullptr, sb.data(), 3);
    EXPECT_TRUE(std::memcmp(sa.data(), sb.data(), sa.size() * sizeof(double)) == 0, "stats differ 1 vs 3 threads");
    for (size_t t = 0; t < a.size(); ++t)
      EXPECT_TRUE(bitwise_equal(a[t].p, b[t].p) && bitwise_equal(a[t].v, b[t].v), "params differ across threads");
  }
}

// The kernel evaluates each Philox counter once for its four elements (normals_block); the CUDA kernel and
// philox::normal_poly evaluate it per element. Read ε off a zero-gradient outside_v step with β1 = 0 and δ = 1
// (m = g + ε = z exactly) and require the per-element normal's bits, on every compiled ISA level, for 1 and 3
// threads, over odd sizes, a chunk boundary and a seed above 2^63.
void noise_stream() {
  const uint64_t seed = 0x9E3779B97F4A7C15ull;
  const uint32_t counter = 41;
  const std::vector<int64_t> sizes = {1, 5, 4099, kAdamWChunk + 3, 2 * kAdamWChunk - 1};
  for (int isa = 0; isa < kNumCpuIsa; ++isa) {
    const CpuIsa level = static_cast<CpuIsa>(isa);
    if (!cpu_isa_compiled(level) || !cpu_isa_supported(level)) continue;
    cpu_isa_set(cpu_isa_name(level));
    for (int threads : {1, 3}) {
      std::vector<std::vector<float>> p, g, m, v;
      std::vector<AdamWTensor> views;
      for (int64_t n : sizes) {
        p.emplace_back(static_cast<size_t>(n), 0.0f);
        g.emplace_back(static_cast<size_t>(n), 0.0f);
        m.emplace_back(static_cast<size_t>(n), 0.0f);
        v.emplace_back(static_cast<size_t>(n), 0.0f);
      }
      for (size_t t = 0; t < sizes.size(); ++t) {
        AdamWTensor x;
        x.param = p[t].data();
        x.grad = g[t].data();
        x.exp_avg = m[t].data();
        x.exp_avg_sq = v[t].data();
        x.numel = sizes[t];
        x.noise_on = true;
        x.noise_sd = 1.0f;
        x.noise_tensor_idx = static_cast<uint32_t>(3 * t + 1);
        views.push_back(x);
      }
      AdamWHyper h;
      h.beta1 = 0.0;
      h.noise_mode = kNoiseOutsideV;
      h.noise_seed = seed;
      h.noise_counter = counter;
      adamw_step_cpu(DType::kFloat32, views.data(), static_cast<int64_t>(views.size()), h, nullptr, nullptr,
                     nullptr, threads);
      for (size_t t = 0; t < sizes.size(); ++t) {
        int64_t bad = -1;
        for (int64_t e = 0; e < sizes[t] && bad < 0; ++e) {
          const float want = philox::normal_poly(seed, static_cast<uint64_t>(e), views[t].noise_tensor_idx, counter);
          if (std::memcmp(&m[t][static_cast<size_t>(e)], &want, sizeof(float)) != 0) bad = e;
        }
        EXPECT_TRUE(bad < 0, "%s, %d threads, tensor of %lld: element %lld is not normal_poly's bits",
                    cpu_isa_name(level), threads, static_cast<long long>(sizes[t]), static_cast<long long>(bad));
      }
    }
  }
}

// Group indices past 2^32 (elements past 2^34, far more than a test can allocate): one chunk of one ISA level's
// loop, called directly with its pointers moved back by the chunk's start, so element e = begin + i lives at
// buffer[i]. The start is unaligned (e0 mod 4 = 1) and the 16-group vectors straddle group 2^32, so the Philox
// counter's carry into the group's high word and the generator's 32- and 16-group pieces are all checked.
void noise_stream_far() {
  const uint64_t seed = 0x0123456789ABCDEFull;
  const uint32_t counter = 7, tensor_idx = 5;
  const int64_t begin = (int64_t{1} << 34) - 83, n = 300;
  AdamWHyper h;
  h.beta1 = 0.0;  // m = g + ε = z exactly (zero gradient, δ = 1)
  h.noise_mode = kNoiseOutsideV;
  h.noise_seed = seed;
  h.noise_counter = counter;
  const AdamWScalars s = make_scalars(DType::kFloat32, h, nullptr);
  const TensorCoeffs c = make_coeffs(h, 1.0);
  for (int isa = 0; isa < kNumCpuIsa; ++isa) {
    const CpuIsa level = static_cast<CpuIsa>(isa);
    if (!cpu_isa_compiled(level) || !cpu_isa_supported(level)) continue;
    std::vector<float> p(n, 0.0f), g(n, 0.0f), m(n, 0.0f), v(n, 0.0f);
    auto back = [&](std::vector<float>& b) {  // &b[0] - begin, without forming an out-of-range pointer in C++
      return reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(b.data()) - static_cast<uintptr_t>(begin) * 4u);
    };
    AdamWTensor t;
    t.param = back(p);
    t.grad = back(g);
    t.exp_avg = back(m);
    t.exp_avg_sq = back(v);
    t.numel = begin + n;
    t.noise_on = true;
    t.noise_sd = 1.0f;
    t.noise_tensor_idx = tensor_idx;
    cpu_kernels_for(level).adamw_chunk(s, kNoStats, t, c, begin, begin + n, nullptr);
    int64_t bad = -1;
    for (int64_t i = 0; i < n && bad < 0; ++i) {
      const float want = philox::normal_poly(seed, static_cast<uint64_t>(begin + i), tensor_idx, counter);
      if (std::memcmp(&m[static_cast<size_t>(i)], &want, sizeof(float)) != 0) bad = i;
    }
    EXPECT_TRUE(bad < 0, "%s: element 2^34 - 83 + %lld is not normal_poly's bits", cpu_isa_name(level),
                static_cast<long long>(bad));
  }
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "step";
  if (mode == "step" || mode == "stats") {
    const bool stats = mode == "stats";
    // fp32 vs double: a handful of fp32 roundings per element. bf16: the kernel rounds fp32 once per stored value
    // and the oracle rounds a double once; these differ by at most one bf16 ulp (2^-8 relative) at a tie.
    for (const Variant& v : variants()) {
      run_variant<float>(DType::kFloat32, v, 2e-6, stats);
      run_variant<bf16_t>(DType::kBFloat16, v, 1.0 / 128, stats);
      run_variant<fp16_t>(DType::kFloat16, v, 1.0 / 1024, stats);
      if (stats) {
        run_variant<float>(DType::kFloat32, v, 2e-6, true, kAdamWTraceStatsCols);
        run_variant<bf16_t>(DType::kBFloat16, v, 1.0 / 128, true, kAdamWTraceStatsCols);
      }
    }
  } else if (mode == "determinism") {
    determinism();
  } else if (mode == "noise") {
    noise_stream();
    noise_stream_far();
  } else {
    std::fprintf(stderr, "unknown mode %s\n", mode.c_str());
    return 2;
  }
  return pnekern_test::finish(("test_adamw_cpu " + mode).c_str());
}
