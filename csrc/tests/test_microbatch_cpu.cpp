// microbatch_accumulate_cpu against a scalar double loop: both sums, the optional sumsq buffer, v = null (a = 1),
// accumulation across calls, assign_sumsq on the first call (the buffer's old values must be gone), odd sizes, all
// three storage dtypes, and thread-count independence.
#include "cpu/microbatch_cpu.h"

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "test_util.h"

using namespace pnekern;
using pnekern_test::close;

namespace {

template <typename T>
void run(DType dtype) {
  std::mt19937_64 rng(7);
  const float inv_sqrt_bc2 = 1.0f / std::sqrt(1.0f - std::pow(0.999f, 3.0f));
  const float eps = 1e-8f, scale = 0.25f;
  for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{1023}, int64_t{65537}, int64_t{200001}}) {
    for (bool with_v : {false, true}) {
      for (int sumsq_mode = 0; sumsq_mode < 3; ++sumsq_mode) {  // none, accumulate, assign on the first call
        const bool with_sumsq = sumsq_mode > 0, assign_first = sumsq_mode == 2;
        const std::string ctx = std::string(dtype_name(dtype)) + " n=" + std::to_string(n) +
                                " v=" + std::to_string(with_v) + " sumsq_mode=" + std::to_string(sumsq_mode);
        std::vector<T> x(static_cast<size_t>(n)), v(static_cast<size_t>(n));
        std::vector<float> sumsq = pnekern_test::randn(rng, n), ref_sumsq;
        for (auto& q : sumsq) q = q * q;
        ref_sumsq = sumsq;
        double acc[2] = {0.5, 0.25};  // accumulates onto existing values
        double ref[2] = {0.5, 0.25};
        for (int call = 0; call < 2; ++call) {  // two micro-batches
          const std::vector<float> xs = pnekern_test::randn(rng, n), vs = pnekern_test::randn(rng, n, 1e-3f);
          for (int64_t i = 0; i < n; ++i) {
            x[i] = Storage<T>::store(xs[i]);
            v[i] = Storage<T>::store(vs[i] * vs[i]);
          }
          microbatch_accumulate_cpu(dtype, x.data(), with_v ? v.data() : nullptr, n, inv_sqrt_bc2, eps, scale, acc,
                                    with_sumsq ? sumsq.data() : nullptr, 2, assign_first && call == 0);
          for (int64_t i = 0; i < n; ++i) {
            const double y = static_cast<double>(scale) * Storage<T>::load(x[i]);
            const double a =
                with_v ? 1.0 / (std::sqrt(static_cast<double>(Storage<T>::load(v[i]))) * inv_sqrt_bc2 + eps) : 1.0;
            ref[0] += y * y;
            ref[1] += a * a * y * y;
            const double before = assign_first && call == 0 ? 0.0 : static_cast<double>(ref_sumsq[i]);
            ref_sumsq[i] = static_cast<float>(before + y * y);
          }
        }
        EXPECT_TRUE(close(acc[0], ref[0], 1e-6, 0.0), "%s acc[0] %.12g vs %.12g", ctx.c_str(), acc[0], ref[0]);
        EXPECT_TRUE(close(acc[1], ref[1], 1e-5, 0.0), "%s acc[1] %.12g vs %.12g", ctx.c_str(), acc[1], ref[1]);
        if (with_sumsq) {
          int bad = 0;
          for (int64_t i = 0; i < n && bad < 3; ++i)
            if (!close(sumsq[i], ref_sumsq[i], 1e-6, 0.0)) {
              ++bad;
              EXPECT_TRUE(false, "%s sumsq[%lld] %.9g vs %.9g", ctx.c_str(), static_cast<long long>(i), sumsq[i],
                          ref_sumsq[i]);
            }
        }
      }
    }
  }
}

void determinism() {
  std::mt19937_64 rng(3);
  const int64_t n = 300007;
  const std::vector<float> x = pnekern_test::randn(rng, n), v0 = pnekern_test::randn(rng, n);
  std::vector<float> v(v0.size());
  for (size_t i = 0; i < v.size(); ++i) v[i] = v0[i] * v0[i];
  double a1[2] = {0, 0}, a3[2] = {0, 0};
  microbatch_accumulate_cpu(DType::kFloat32, x.data(), v.data(), n, 1.0f, 1e-8f, 1.0f, a1, nullptr, 1);
  microbatch_accumulate_cpu(DType::kFloat32, x.data(), v.data(), n, 1.0f, 1e-8f, 1.0f, a3, nullptr, 3);
  EXPECT_TRUE(std::memcmp(a1, a3, sizeof a1) == 0, "sums depend on the thread count");
}

}  // namespace

int main() {
  run<float>(DType::kFloat32);
  run<bf16_t>(DType::kBFloat16);
  run<fp16_t>(DType::kFloat16);
  determinism();
  return pnekern_test::finish("test_microbatch_cpu");
}
