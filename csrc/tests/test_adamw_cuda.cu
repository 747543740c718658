// CUDA fused AdamW vs the CPU kernel (itself checked against a scalar double loop by test_adamw_cpu) on the same
// inputs: several tensors of odd sizes, fp32/bf16/fp16, amsgrad/maximize/grad_scale/found_inf, stats with and
// without sumsq. Both kernels do the same fp32 operations with IEEE rounding and no contraction, so the state
// must agree to ~1 ulp; the stats differ only in summation order. Exits 77 (ctest: skipped) without a GPU.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "cpu/adamw_cpu.h"
#include "cuda/adamw_cuda.h"

using namespace pnekern;

namespace {

int g_failures = 0;

#define CHECK_CUDA(expr)                                                                 \
  do {                                                                                   \
    cudaError_t e_ = (expr);                                                             \
    if (e_ != cudaSuccess) {                                                             \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_)); \
      std::exit(1);                                                                      \
    }                                                                                    \
  } while (0)

template <typename T>
void* to_device(const std::vector<T>& h) {
  void* d = nullptr;
  CHECK_CUDA(cudaMalloc(&d, std::max<size_t>(h.size() * sizeof(T), 1)));
  CHECK_CUDA(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

template <typename T>
std::vector<T> to_host(const void* d, size_t n) {
  std::vector<T> h(n);
  CHECK_CUDA(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

template <typename T>
void compare(const std::vector<T>& a, const std::vector<T>& b, const char* what, int variant) {
  for (size_t i = 0; i < a.size(); ++i) {
    const double x = Storage<T>::load(a[i]), y = Storage<T>::load(b[i]);
    if (!(std::fabs(x - y) <= 1e-6 * std::fabs(y) + 1e-30) && !(std::isnan(x) && std::isnan(y))) {
      if (++g_failures < 10) std::fprintf(stderr, "variant %d %s[%zu]: cuda %.9g cpu %.9g\n", variant, what, i, x, y);
      return;
    }
  }
}

template <typename T>
// noise_mode != 0: in-step noise (kNoise*) with per-element δ on even tensors, an isotropic δ on odd ones (the
// CPU gets noise_sd, the GPU the same δ as a broadcast device value) and a rank-`rank` basis on every tensor.
void run(DType dtype, int variant, bool amsgrad, bool maximize, bool scaled, bool inf, bool with_q,
         int noise_mode = 0, int rank = 0, int cols = kAdamWStatsCols) {
  const std::vector<int64_t> sizes = {1, 7, 1023, 65537, 40000};
  std::mt19937_64 rng(static_cast<uint64_t>(variant));
  std::normal_distribution<float> nd;
  AdamWHyper h;
  h.lr = 1e-2;
  h.weight_decay = 0.1;
  h.amsgrad = amsgrad;
  h.maximize = maximize;
  h.noise_mode = noise_mode;
  h.noise_seed = 0xFEDCBA9876543210ull;
  h.noise_counter = 17;
  h.noise_has_mult = noise_mode != 0;
  h.noise_mult = 1.3f;
  h.noise_param_coef = 0.05;
  h.stats_cols = cols;  // 2: both kernels write only Σ g², Σ a_prev² g²; 3: Σ g², Σ a_new² g², Σ a_new² q
  const size_t nt = sizes.size();
  std::vector<std::vector<T>> bufs[5];  // p, g, m, v, vmax
  std::vector<std::vector<float>> q(nt);
  for (size_t t = 0; t < nt; ++t) {
    for (int b = 0; b < 5; ++b) {
      std::vector<T> x(static_cast<size_t>(sizes[t]));
      for (auto& e : x) e = Storage<T>::store(b == 0 || b == 1 ? nd(rng) * (b == 1 && scaled ? 64.0f : 1.0f)
                                                                 : (b == 2 ? 0.1f * nd(rng) : 1e-3f * std::fabs(nd(rng))));
      bufs[b].push_back(x);
    }
    q[t].resize(static_cast<size_t>(sizes[t]));
    for (auto& e : q[t]) e = std::fabs(nd(rng));
  }
  // Device copies.
  std::vector<void*> dev[5];
  std::vector<float*> dq(nt);
  std::vector<AdamWTensor> hv(nt), dv(nt);
  for (size_t t = 0; t < nt; ++t) {
    for (int b = 0; b < 5; ++b) dev[b].push_back(to_device(bufs[b][t]));
    dq[t] = static_cast<float*>(to_device(q[t]));
    const double step = 3.0;
    hv[t] = AdamWTensor{bufs[0][t].data(), bufs[1][t].data(), bufs[2][t].data(), bufs[3][t].data(),
                        amsgrad ? bufs[4][t].data() : nullptr, with_q ? q[t].data() : nullptr, sizes[t], step};
    dv[t] = AdamWTensor{dev[0][t], dev[1][t], dev[2][t], dev[3][t], amsgrad ? dev[4][t] : nullptr,
                        with_q ? dq[t] : nullptr, sizes[t], step};
  }
  // Noise operands, host and device copies.
  std::vector<std::vector<float>> nvar(nt), nbasis(nt), ncoef(nt);
  std::vector<void*> dnoise;
  for (size_t t = 0; t < nt && noise_mode != 0; ++t) {
    const bool per_elem = t % 2 == 0;
    nvar[t].resize(per_elem ? static_cast<size_t>(sizes[t]) : 1);
    for (auto& e : nvar[t]) e = std::fabs(nd(rng)) + 0.1f;
    nbasis[t].resize(static_cast<size_t>(sizes[t] * rank));
    for (auto& e : nbasis[t]) e = nd(rng);
    ncoef[t].resize(static_cast<size_t>(rank));
    for (auto& e : ncoef[t]) e = nd(rng);
    for (AdamWTensor* a : {&hv[t], &dv[t]}) {
      a->noise_on = true;
      a->noise_tensor_idx = static_cast<uint32_t>(t + 3);
      a->noise_rank = rank;
    }
    void* dvar = to_device(nvar[t]);
    void* dbasis = to_device(nbasis[t]);
    void* dcoef = to_device(ncoef[t]);
    dnoise.insert(dnoise.end(), {dvar, dbasis, dcoef});
    if (per_elem) {
      hv[t].noise_var = nvar[t].data();
    } else {
      hv[t].noise_sd = std::sqrt(nvar[t][0]);
      dv[t].noise_var_broadcast = true;
    }
    dv[t].noise_var = static_cast<const float*>(dvar);
    if (rank > 0) {
      hv[t].noise_basis = nbasis[t].data();
      hv[t].noise_coef = ncoef[t].data();
      dv[t].noise_basis = static_cast<const float*>(dbasis);
      dv[t].noise_coef = static_cast<const float*>(dcoef);
    }
  }
  const float scale = 64.0f, found = inf ? 1.0f : 0.0f;
  float* d_scale = static_cast<float*>(to_device(std::vector<float>{scale}));
  float* d_found = static_cast<float*>(to_device(std::vector<float>{found}));
  double* d_stats = static_cast<double*>(to_device(std::vector<double>(nt * cols, NAN)));
  const size_t ws = adamw_cuda_workspace_bytes(dv.data(), static_cast<int64_t>(nt));
  void* d_ws = nullptr;
  CHECK_CUDA(cudaMalloc(&d_ws, ws));
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  adamw_step_cuda(dtype, dv.data(), static_cast<int64_t>(nt), h, scaled ? d_scale : nullptr, d_found, d_stats, d_ws,
                  ws, stream);
  CHECK_CUDA(cudaStreamSynchronize(stream));
  std::vector<double> stats(nt * cols, NAN);
  adamw_step_cpu(dtype, hv.data(), static_cast<int64_t>(nt), h, scaled ? &scale : nullptr, &found, stats.data(), 2);
  const std::vector<double> dstats = to_host<double>(d_stats, nt * cols);
  const char* names[5] = {"param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"};
  for (size_t t = 0; t < nt; ++t)
    for (int b = 0; b < (amsgrad ? 5 : 4); ++b)
      // Noise included: the same fp32 operations (the normal's polynomial is not FMA-contracted, --fmad=false).
      compare(to_host<T>(dev[b][t], bufs[b][t].size()), bufs[b][t], names[b], variant);
  for (size_t i = 0; i < nt * cols; ++i)
    if (!(std::fabs(dstats[i] - stats[i]) <= 1e-5 * std::fabs(stats[i]))) {
      if (++g_failures < 10) std::fprintf(stderr, "variant %d stats[%zu]: cuda %.12g cpu %.12g\n", variant, i,
                                          dstats[i], stats[i]);
    }
  for (size_t t = 0; t < nt; ++t) {
    for (int b = 0; b < 5; ++b) CHECK_CUDA(cudaFree(dev[b][t]));
    CHECK_CUDA(cudaFree(dq[t]));
  }
  for (void* d : dnoise) CHECK_CUDA(cudaFree(d));
  CHECK_CUDA(cudaFree(d_scale));
  CHECK_CUDA(cudaFree(d_found));
  CHECK_CUDA(cudaFree(d_stats));
  CHECK_CUDA(cudaFree(d_ws));
  CHECK_CUDA(cudaStreamDestroy(stream));
}

}  // namespace

int main() {
  int ndev = 0;
  if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
    std::printf("test_adamw_cuda: no CUDA device, skipped\n");
    return 77;
  }
  int variant = 0;
  for (bool amsgrad : {false, true})
    for (bool maximize : {false, true})
      for (bool scaled : {false, true})
        for (bool with_q : {false, true}) {
          run<float>(DType::kFloat32, variant++, amsgrad, maximize, scaled, false, with_q);
          run<bf16_t>(DType::kBFloat16, variant++, amsgrad, maximize, scaled, false, with_q);
          run<fp16_t>(DType::kFloat16, variant++, amsgrad, maximize, scaled, false, with_q);
        }
  run<float>(DType::kFloat32, variant++, true, false, true, true, true);  // found_inf: both leave everything as is
  // In-step noise: every mode, with and without a low-rank part; found_inf with noise changes nothing either.
  for (int mode : {kNoiseIntoV, kNoiseOutsideV, kNoiseParam})
    for (int rank : {0, 3}) {
      run<float>(DType::kFloat32, variant++, false, mode == kNoiseOutsideV, true, false, true, mode, rank);
      run<bf16_t>(DType::kBFloat16, variant++, true, false, false, false, false, mode, rank);
    }
  run<float>(DType::kFloat32, variant++, false, false, true, true, false, kNoiseIntoV, 2);
  // Trace-mode rows (2 columns), with and without sumsq buffers.
  run<float>(DType::kFloat32, variant++, false, false, true, false, false, 0, 0, kAdamWTraceStatsCols);
  run<float>(DType::kFloat32, variant++, true, true, false, false, true, 0, 0, kAdamWTraceStatsCols);
  // A_t rows (3 columns: 0, 2, 3): the CPU's loop without a_prev (sumsq buffers) or its full loop, sliced.
  run<float>(DType::kFloat32, variant++, false, false, true, false, true, 0, 0, kAdamWNewStatsCols);
  run<bf16_t>(DType::kBFloat16, variant++, true, true, false, false, false, kNoiseIntoV, 2, kAdamWNewStatsCols);
  if (g_failures) {
    std::printf("test_adamw_cuda: %d failure(s)\n", g_failures);
    return 1;
  }
  std::printf("test_adamw_cuda: all checks passed\n");
  return 0;
}
