// ns per element of the fused C++ AdamW step on one thread without noise and with in-step noise (isotropic δ, and a
// per-element δ array), the noise's cost as the difference: adamw_step_cpu called directly, min over 7 rounds of
// `reps` calls per variant (rounds interleave the variants). Built against the CMake library:
//
//   cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release && cmake --build build/cmake --target pnekern_cpu
//   g++ -O2 -std=c++17 -fopenmp -Icsrc/include -Icsrc benchmarks/noise_step_ns.cpp build/cmake/libpnekern_cpu.a \
//       -o build/noise_step_ns
//   build/noise_step_ns 65536 2000      # L2-resident tensor
//   build/noise_step_ns 32000000 3      # 32M elements
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cpu/adamw_cpu.h"

using namespace pnekern;

int main(int argc, char** argv) {
  const int64_t n = argc > 1 ? std::atoll(argv[1]) : 65536;
  const int reps = argc > 2 ? std::atoi(argv[2]) : 2000;
  if (n < 1 || reps < 1) {
    std::fprintf(stderr, "usage: noise_step_ns [numel >= 1] [reps >= 1]\n");
    return 2;
  }
  std::vector<float> p(n), g(n), m(n), v(n), var(n);
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> unif(0.f, 1.f);
  for (int64_t i = 0; i < n; ++i) {
    p[i] = unif(rng);
    g[i] = unif(rng) - 0.5f;
    m[i] = 1e-3f * unif(rng);
    v[i] = 1e-4f * unif(rng);
    var[i] = 1e-2f * unif(rng);
  }
  AdamWTensor base;
  base.param = p.data();
  base.grad = g.data();
  base.exp_avg = m.data();
  base.exp_avg_sq = v.data();
  base.numel = n;
  base.step = 5;
  auto run = [&](int variant) {  // 0: no noise, 1: isotropic δ, 2: per-element δ
    AdamWTensor t = base;
    AdamWHyper h;
    if (variant) {
      h.noise_mode = kNoiseIntoV;
      h.noise_seed = 7;
      h.noise_counter = 5;
      t.noise_on = true;
      if (variant == 2) t.noise_var = var.data();
      else t.noise_sd = 0.1f;
    }
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; ++r) adamw_step_cpu(DType::kFloat32, &t, 1, h, nullptr, nullptr, nullptr, 1);
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps / n * 1e9;
  };
  double best[3] = {1e300, 1e300, 1e300};
  for (int k = 0; k < 7; ++k)
    for (int variant = 0; variant < 3; ++variant) best[variant] = std::min(best[variant], run(variant));
  std::printf("n=%lld ns/elem: off %.3f iso %.3f diag %.3f (noise adds iso %.3f, diag %.3f)\n",
              static_cast<long long>(n), best[0], best[1], best[2], best[1] - best[0], best[2] - best[0]);
  return 0;
}
