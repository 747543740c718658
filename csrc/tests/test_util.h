// Tiny test harness for the ctest unit tests (no third-party framework: the raw kernels must build anywhere).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

namespace pnekern_test {

inline int& failures() {
  static int n = 0;
  return n;
}

#define EXPECT_TRUE(cond, ...)                                              \
  do {                                                                      \
    if (!(cond)) {                                                          \
      ++pnekern_test::failures();                                           \
      if (pnekern_test::failures() <= 20) {                                 \
        std::fprintf(stderr, "%s:%d: FAILED %s: ", __FILE__, __LINE__, #cond); \
        std::fprintf(stderr, __VA_ARGS__);                                  \
        std::fprintf(stderr, "\n");                                         \
      }                                                                     \
    }                                                                       \
  } while (0)

// |a - b| <= atol + rtol·|b|, NaN-aware (both NaN counts as equal).
inline bool close(double a, double b, double rtol, double atol) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return std::fabs(a - b) <= atol + rtol * std::fabs(b);
}

inline int finish(const char* name) {
  if (failures() == 0) {
    std::printf("%s: all checks passed\n", name);
    return 0;
  }
  std::printf("%s: %d check(s) failed\n", name, failures());
  return 1;
}

inline std::vector<float> randn(std::mt19937_64& rng, int64_t n, float scale = 1.0f) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = d(rng);
  return v;
}

}  // namespace pnekern_test
