// Fused multi-tensor AdamW for CPU: OpenMP over fixed-size chunks; the chunk loop itself (`omp simd`, fp32 math for
// every storage dtype) is cpu_kernels.inc, compiled per ISA level and picked at run time. See adamw_cpu.h for the
// contract.
#include "adamw_cpu.h"

#include <cmath>
#include <vector>

#include "cpu_isa.h"
#include "pnekern/macros.h"

namespace pnekern {

AdamWScalars make_scalars(DType dtype, const AdamWHyper& h, const float* grad_scale) {
  // Rounded to fp32 once, as torch does when a Python float multiplies an fp32 tensor.
  AdamWScalars s;
  s.dtype = dtype;
  s.amsgrad = h.amsgrad;
  s.unscale = grad_scale != nullptr;
  s.w1 = static_cast<float>(1.0 - h.beta1);
  s.beta2 = static_cast<float>(h.beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - h.beta2);
  s.eps = static_cast<float>(h.eps);
  s.sign = h.maximize ? -1.0f : 1.0f;
  s.scale = s.unscale ? *grad_scale : 1.0f;
  s.noise_mode = h.noise_mode;
  s.noise_key0 = static_cast<uint32_t>(h.noise_seed);
  s.noise_key1 = static_cast<uint32_t>(h.noise_seed >> 32);
  s.noise_counter = h.noise_counter;
  s.noise_has_mult = h.noise_has_mult;
  s.noise_mult = h.noise_mult;
  s.noise_in_v = h.noise_mode == kNoiseIntoV ? 1.0f : 0.0f;
  s.noise_in_m = (h.noise_mode == kNoiseIntoV || h.noise_mode == kNoiseOutsideV) ? 1.0f : 0.0f;
  s.noise_param = h.noise_mode == kNoiseParam ? static_cast<float>(h.noise_param_coef) : 0.0f;
  return s;
}

namespace {

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

void adamw_step_chunks(DType dtype, const AdamWTensor* tensors, int64_t ntensors, const AdamWHyper& h,
                       const float* grad_scale, double* stats, int nthreads) {
  // The loops of the selected ISA level (cpu_isa.h), resolved once per call: every level gives the same bits.
  const AdamWChunkFn run_chunk = cpu_kernels().adamw_chunk;
  std::vector<TensorCoeffs> coeffs(static_cast<size_t>(ntensors));
  std::vector<Chunk> chunks;
  for (int64_t ti = 0; ti < ntensors; ++ti) {
    const AdamWTensor& t = tensors[ti];
    coeffs[ti] = make_coeffs(h, t.step);
    for (int64_t b = 0; b < t.numel; b += kAdamWChunk) {
      chunks.push_back(Chunk{ti, b, b + kAdamWChunk < t.numel ? b + kAdamWChunk : t.numel});
    }
  }
  const int64_t nchunks = static_cast<int64_t>(chunks.size());
  std::vector<double> partials(stats ? static_cast<size_t>(nchunks) * kAdamWStatsCols : 0, 0.0);

  const AdamWScalars s = make_scalars(dtype, h, grad_scale);
  const Chunk* chunk_list = chunks.data();
  double* partial_base = partials.data();
  const TensorCoeffs* coeff_list = coeffs.data();
  const int cols = h.stats_cols;
  const bool trace_only = cols == kAdamWTraceStatsCols;
  const bool new_only = cols == kAdamWNewStatsCols;

  // Static schedule: chunks are equal-sized, so contiguous blocks of chunks balance well and each thread streams
  // through neighbouring memory.
  // Never more threads than chunks: waking idle threads costs more than a small model's whole step, and under
  // a loaded machine an oversubscribed team can stall for milliseconds.
  const int threads = static_cast<int>(nchunks < nthreads ? (nchunks > 0 ? nchunks : 1) : nthreads);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t ci = 0; ci < nchunks; ++ci) {
    const Chunk& ch = chunk_list[ci];
    const AdamWTensor& t = tensors[ch.tensor];
    // Trace rows skip a_new; at step 1 (a_prev = 1) the full loop gives column 1 = column 0 exactly. A_t rows
    // skip a_prev; without a sumsq buffer they take the full loop (column 3 is then 0).
    const int stats_mode = stats == nullptr                                     ? kNoStats
                           : t.sumsq != nullptr && new_only                     ? kStatsNewWithSumsq
                           : t.sumsq != nullptr                                 ? kStatsWithSumsq
                           : trace_only && coeff_list[ch.tensor].has_prev       ? kStatsTrace
                                                                                : kStats;
    double* partial = stats ? partial_base + ci * kAdamWStatsCols : nullptr;
    run_chunk(s, stats_mode, t, coeff_list[ch.tensor], ch.begin, ch.end, partial);
  }

  if (stats) {
    // Fixed-order second stage: chunks of a tensor are consecutive in `chunks`, so summing in list order is
    // deterministic and independent of how chunks were assigned to threads.
    for (int64_t i = 0; i < ntensors * cols; ++i) stats[i] = 0.0;
    for (int64_t ci = 0; ci < nchunks; ++ci) {
      double* row = stats + chunks[ci].tensor * cols;
      for (int k = 0; k < cols; ++k) row[k] += partials[ci * kAdamWStatsCols + stats_row_source(cols, k)];
    }
  }
}

}  // namespace

void adamw_step_cpu(DType dtype, const AdamWTensor* tensors, int64_t ntensors, const AdamWHyper& hyper,
                    const float* grad_scale, const float* found_inf, double* stats, int nthreads) {
  PNEKERN_CHECK(ntensors >= 0, "ntensors must be >= 0, got " << ntensors);
  PNEKERN_CHECK(valid_stats_cols(hyper.stats_cols),
                "stats_cols must be " << kAdamWStatsCols << ", " << kAdamWNewStatsCols << " or "
                                      << kAdamWTraceStatsCols << ", got " << hyper.stats_cols);
  PNEKERN_CHECK(ntensors == 0 || tensors != nullptr, "tensors is null");
  for (int64_t i = 0; i < ntensors; ++i) {
    const AdamWTensor& t = tensors[i];
    PNEKERN_CHECK(t.numel >= 0, "tensor " << i << ": numel < 0");
    PNEKERN_CHECK(t.numel == 0 || (t.param && t.grad && t.exp_avg && t.exp_avg_sq),
                  "tensor " << i << ": param/grad/exp_avg/exp_avg_sq must be non-null");
    PNEKERN_CHECK(!hyper.amsgrad || t.numel == 0 || t.max_exp_avg_sq,
                  "tensor " << i << ": amsgrad needs max_exp_avg_sq");
    PNEKERN_CHECK(t.step >= 1.0, "tensor " << i << ": step must be >= 1 (already incremented), got " << t.step);
    PNEKERN_CHECK(!t.noise_on || t.numel == 0 || t.noise_rank == 0 || (t.noise_basis && t.noise_coef),
                  "tensor " << i << ": noise_rank > 0 needs noise_basis and noise_coef");
    PNEKERN_CHECK(t.noise_rank >= 0, "tensor " << i << ": noise_rank < 0");
  }
  if (found_inf != nullptr && *found_inf != 0.0f) {
    // A skipped (inf/nan) step changes nothing; the stats of a step that did not happen are zero, not stale.
    if (stats)
      for (int64_t i = 0; i < ntensors * hyper.stats_cols; ++i) stats[i] = 0.0;
    return;
  }
  PNEKERN_CHECK(hyper.noise_mode >= kNoiseOff && hyper.noise_mode <= kNoiseParam,
                "noise_mode must be 0..3, got " << hyper.noise_mode);
  if (nthreads < 1) nthreads = 1;
  PNEKERN_CHECK(dtype == DType::kFloat32 || dtype == DType::kBFloat16 || dtype == DType::kFloat16,
                "unsupported dtype " << static_cast<int>(dtype));
  adamw_step_chunks(dtype, tensors, ntensors, hyper, grad_scale, stats, nthreads);
}

}  // namespace pnekern
