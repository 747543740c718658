// See microbatch_cpu.h. One streaming pass over x (and v, sumsq): the hook runs once per micro-batch per parameter,
// so it must cost about one read of the gradient.
#include "microbatch_cpu.h"

#include <cmath>
#include <vector>

#include "pnekern/macros.h"

namespace pnekern {
namespace {

template <typename T, bool HAS_V, bool HAS_SUMSQ>
void microbatch_chunk(const T* __restrict__ x, const T* __restrict__ v, float* __restrict__ sumsq, int64_t n,
                      float inv_sqrt_bc2, float eps, float scale, double* out) {
  using S = Storage<T>;
  double s0 = 0.0, s1 = 0.0;
#pragma omp simd reduction(+ : s0, s1)
  for (int64_t i = 0; i < n; ++i) {
    const float y = scale * S::load(x[i]);
    const float y2 = y * y;
    float a = 1.0f;
    if (HAS_V) a = 1.0f / (std::sqrt(S::load(v[i])) * inv_sqrt_bc2 + eps);
    s0 += static_cast<double>(y2);
    s1 += static_cast<double>(a * a * y2);
    if (HAS_SUMSQ) sumsq[i] += y2;
  }
  out[0] = s0;
  out[1] = s1;
}

template <typename T>
void microbatch_typed(const T* x, const T* v, int64_t numel, float inv_sqrt_bc2, float eps, float scale,
                      double* acc, float* sumsq, int nthreads) {
  const int64_t nchunks = (numel + kMicrobatchChunk - 1) / kMicrobatchChunk;
  std::vector<double> partials(static_cast<size_t>(nchunks) * 2, 0.0);
  double* partial_base = partials.data();
  // Small tensors (most of a model's biases/norms) would pay more for waking threads than for the work.
  const int threads = nchunks > 1 ? nthreads : 1;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t b = c * kMicrobatchChunk;
    const int64_t n = (b + kMicrobatchChunk < numel ? b + kMicrobatchChunk : numel) - b;
    const T* vc = v ? v + b : nullptr;
    float* qc = sumsq ? sumsq + b : nullptr;
    double* out = partial_base + 2 * c;
    if (v) {
      if (sumsq) microbatch_chunk<T, true, true>(x + b, vc, qc, n, inv_sqrt_bc2, eps, scale, out);
      else microbatch_chunk<T, true, false>(x + b, vc, qc, n, inv_sqrt_bc2, eps, scale, out);
    } else {
      if (sumsq) microbatch_chunk<T, false, true>(x + b, vc, qc, n, inv_sqrt_bc2, eps, scale, out);
      else microbatch_chunk<T, false, false>(x + b, vc, qc, n, inv_sqrt_bc2, eps, scale, out);
    }
  }
  double t0 = 0.0, t1 = 0.0;
  for (int64_t c = 0; c < nchunks; ++c) {
    t0 += partials[2 * c];
    t1 += partials[2 * c + 1];
  }
  acc[0] += t0;
  acc[1] += t1;
}

}  // namespace

void microbatch_accumulate_cpu(DType dtype, const void* x, const void* v, int64_t numel, float inv_sqrt_bc2,
                               float eps, float scale, double* acc, float* sumsq, int nthreads) {
  PNEKERN_CHECK(numel >= 0, "numel must be >= 0, got " << numel);
  PNEKERN_CHECK(acc != nullptr, "acc is null");
  PNEKERN_CHECK(numel == 0 || x != nullptr, "x is null");
  if (nthreads < 1) nthreads = 1;
  switch (dtype) {
    case DType::kFloat32:
      microbatch_typed<float>(static_cast<const float*>(x), static_cast<const float*>(v), numel, inv_sqrt_bc2, eps,
                              scale, acc, sumsq, nthreads);
      break;
    case DType::kBFloat16:
      microbatch_typed<bf16_t>(static_cast<const bf16_t*>(x), static_cast<const bf16_t*>(v), numel, inv_sqrt_bc2,
                               eps, scale, acc, sumsq, nthreads);
      break;
    case DType::kFloat16:
      microbatch_typed<fp16_t>(static_cast<const fp16_t*>(x), static_cast<const fp16_t*>(v), numel, inv_sqrt_bc2,
                               eps, scale, acc, sumsq, nthreads);
      break;
    default:
      PNEKERN_CHECK(false, "unsupported dtype " << static_cast<int>(dtype));
  }
}

}  // namespace pnekern
