// See microbatch_cpu.h. One streaming pass over x (and v, sumsq): the hook runs once per micro-batch per parameter,
// so it must cost about one read of the gradient. The chunk loop is cpu_kernels.inc, compiled per ISA level.
#include "microbatch_cpu.h"

#include <vector>

#include "cpu_isa.h"
#include "pnekern/macros.h"

namespace pnekern {
namespace {

void microbatch_chunks(DType dtype, const void* x, const void* v, int64_t numel, float inv_sqrt_bc2, float eps,
                       float scale, double* acc, float* sumsq, bool assign_sumsq, int nthreads) {
  // The loop of the selected ISA level (cpu_isa.h), resolved once per call: every level gives the same bits.
  const MicrobatchChunkFn run_chunk = cpu_kernels().microbatch_chunk;
  const int64_t nchunks = (numel + kMicrobatchChunk - 1) / kMicrobatchChunk;
  std::vector<double> partials(static_cast<size_t>(nchunks) * 2, 0.0);
  double* partial_base = partials.data();
  // Small tensors (most of a model's biases/norms) would pay more for waking threads than for the work.
  const int threads = nchunks > 1 ? nthreads : 1;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t b = c * kMicrobatchChunk;
    const int64_t n = (b + kMicrobatchChunk < numel ? b + kMicrobatchChunk : numel) - b;
    run_chunk(dtype, x, v, sumsq, assign_sumsq, b, n, inv_sqrt_bc2, eps, scale, partial_base + 2 * c);
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
                               float eps, float scale, double* acc, float* sumsq, int nthreads, bool assign_sumsq) {
  PNEKERN_CHECK(numel >= 0, "numel must be >= 0, got " << numel);
  PNEKERN_CHECK(acc != nullptr, "acc is null");
  PNEKERN_CHECK(numel == 0 || x != nullptr, "x is null");
  if (nthreads < 1) nthreads = 1;
  PNEKERN_CHECK(dtype == DType::kFloat32 || dtype == DType::kBFloat16 || dtype == DType::kFloat16,
                "unsupported dtype " << static_cast<int>(dtype));
  microbatch_chunks(dtype, x, v, numel, inv_sqrt_bc2, eps, scale, acc, sumsq, assign_sumsq, nthreads);
}

}  // namespace pnekern
