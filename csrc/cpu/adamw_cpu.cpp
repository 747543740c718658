// Fused multi-tensor AdamW for CPU: OpenMP over fixed-size chunks, `omp simd` inside a chunk, fp32 math for every
// storage dtype. See adamw_cpu.h for the contract.
#include "adamw_cpu.h"

#include <cmath>
#include <vector>

#include "pnekern/macros.h"

namespace pnekern {
namespace {

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// Statistics mode: none, the three gradient sums, or those plus Σ a_new² q (a sumsq buffer exists).
enum StatsMode { kNoStats = 0, kStats = 1, kStatsWithSumsq = 2 };

// One chunk [begin, end) of one tensor. Template flags turn the optional work into separate loops so each inner loop
// is straight-line code GCC vectorizes (it needs -fno-math-errno for sqrt).
// SMALL_W picks torch's lerp formula (it switches at |weight| = 0.5 for accuracy); a template flag because a
// loop-invariant ternary inside the loop defeats GCC's if-conversion and hence vectorization.
template <typename T, bool AMSGRAD, int STATS, bool UNSCALE, bool SMALL_W>
void adamw_chunk(const AdamWTensor& t, const TensorCoeffs& c, float w1, float beta2, float one_minus_beta2,
                 float eps, float sign, float scale, int64_t begin, int64_t end, double* partial) {
  using S = Storage<T>;
  T* __restrict__ p = static_cast<T*>(t.param) + begin;
  T* __restrict__ gp = static_cast<T*>(t.grad) + begin;
  T* __restrict__ mp = static_cast<T*>(t.exp_avg) + begin;
  T* __restrict__ vp = static_cast<T*>(t.exp_avg_sq) + begin;
  T* __restrict__ vmaxp = AMSGRAD ? static_cast<T*>(t.max_exp_avg_sq) + begin : nullptr;
  const float* __restrict__ qp = STATS == kStatsWithSumsq ? t.sumsq + begin : nullptr;
  const int64_t n = end - begin;

  const float decay = c.decay, neg_step_size = c.neg_step_size, bc2_sqrt = c.bc2_sqrt;
  const float inv_prev_bc2_sqrt = c.inv_prev_bc2_sqrt;
  const float prev_on = c.has_prev ? 1.0f : 0.0f;  // a_prev = prev_on*a + (1-prev_on): a blend without a branch
  const float w1m1 = w1 - 1.0f;

  // Stats: fp32 sums over blocks of kStatsBlock elements (each SIMD lane adds at most kStatsBlock/4 terms, error
  // ~1e-7 relative), blocks added in double. Summing fp32 products straight into double costs ~15% more time at
  // SSE2 width; both are deterministic (fixed blocks, fixed lane assignment).
  constexpr int64_t kStatsBlock = 256;
  const int64_t block = STATS != kNoStats ? kStatsBlock : n;
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  for (int64_t b0 = 0; b0 < n; b0 += block) {
    const int64_t b1 = b0 + block < n ? b0 + block : n;
    float f0 = 0.0f, f1 = 0.0f, f2 = 0.0f, f3 = 0.0f;
#pragma omp simd reduction(+ : f0, f1, f2, f3)
    for (int64_t i = b0; i < b1; ++i) {
      float g = S::load(gp[i]);
      if (UNSCALE) {
        g = g / scale;
        gp[i] = S::store(g);
      }
      g = g * sign;  // maximize: sign = -1 (exact)
      float param = S::load(p[i]) * decay;
      const float m_old = S::load(mp[i]);
      const float m = SMALL_W ? m_old + w1 * (g - m_old) : g + w1m1 * (g - m_old);
      const float v_old = S::load(vp[i]);
      const float v = v_old * beta2 + one_minus_beta2 * g * g;
      float v_use = v;
      float v_prev = v_old;
      if (AMSGRAD) {
        const float vmax_old = S::load(vmaxp[i]);
        // torch.maximum propagates NaN. A NaN in v makes the comparison false and selects v; a NaN already in vmax
        // came from a NaN v in an earlier step, and v stays NaN from then on, so one comparison suffices.
        v_use = !(vmax_old >= v) ? v : vmax_old;
        vmaxp[i] = S::store(v_use);
        v_prev = vmax_old;
      }
      const float denom = std::sqrt(v_use) / bc2_sqrt + eps;
      param = param + neg_step_size * m / denom;
      p[i] = S::store(param);
      mp[i] = S::store(m);
      vp[i] = S::store(v);
      if (STATS != kNoStats) {
        // a_new = 1/denom and a_prev = 1/d_prev from one division (the loop is divide-bound at SSE2 width);
        // a_prev multiplies by the reciprocal bias correction for the same reason. Neither is torch-matched math.
        const float d_prev = std::sqrt(v_prev) * inv_prev_bc2_sqrt + eps;
        const float r = 1.0f / (denom * d_prev);
        const float a_new = r * d_prev;
        const float a_prev = prev_on * (r * denom) + (1.0f - prev_on);
        const float g2 = g * g;
        f0 += g2;
        f1 += a_prev * a_prev * g2;
        f2 += a_new * a_new * g2;
        if (STATS == kStatsWithSumsq) f3 += a_new * a_new * qp[i];
      }
    }
    s0 += f0;
    s1 += f1;
    s2 += f2;
    s3 += f3;
  }
  if (STATS != kNoStats) {
    partial[0] = s0;
    partial[1] = s1;
    partial[2] = s2;
    partial[3] = s3;
  }
}

template <typename T, bool AMSGRAD, bool UNSCALE, bool SMALL_W>
void run_chunk_w(int stats_mode, const AdamWTensor& t, const TensorCoeffs& c, float w1, float beta2,
                 float one_minus_beta2, float eps, float sign, float scale, int64_t begin, int64_t end,
                 double* partial) {
  switch (stats_mode) {
    case kNoStats:
      adamw_chunk<T, AMSGRAD, kNoStats, UNSCALE, SMALL_W>(t, c, w1, beta2, one_minus_beta2, eps, sign, scale, begin,
                                                          end, partial);
      break;
    case kStats:
      adamw_chunk<T, AMSGRAD, kStats, UNSCALE, SMALL_W>(t, c, w1, beta2, one_minus_beta2, eps, sign, scale, begin,
                                                        end, partial);
      break;
    default:
      adamw_chunk<T, AMSGRAD, kStatsWithSumsq, UNSCALE, SMALL_W>(t, c, w1, beta2, one_minus_beta2, eps, sign, scale,
                                                                 begin, end, partial);
      break;
  }
}

template <typename T, bool AMSGRAD, bool UNSCALE>
void run_chunk(int stats_mode, const AdamWTensor& t, const TensorCoeffs& c, float w1, float beta2,
               float one_minus_beta2, float eps, float sign, float scale, int64_t begin, int64_t end,
               double* partial) {
  if (std::fabs(w1) < 0.5f)
    run_chunk_w<T, AMSGRAD, UNSCALE, true>(stats_mode, t, c, w1, beta2, one_minus_beta2, eps, sign, scale, begin, end,
                                           partial);
  else
    run_chunk_w<T, AMSGRAD, UNSCALE, false>(stats_mode, t, c, w1, beta2, one_minus_beta2, eps, sign, scale, begin,
                                            end, partial);
}

template <typename T>
void adamw_step_typed(const AdamWTensor* tensors, int64_t ntensors, const AdamWHyper& h, const float* grad_scale,
                      double* stats, int nthreads) {
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

  // Scalars rounded to fp32 once, as torch does when a Python float multiplies an fp32 tensor.
  const float w1 = static_cast<float>(1.0 - h.beta1);
  const float beta2 = static_cast<float>(h.beta2);
  const float one_minus_beta2 = static_cast<float>(1.0 - h.beta2);
  const float eps = static_cast<float>(h.eps);
  const float sign = h.maximize ? -1.0f : 1.0f;
  const bool unscale = grad_scale != nullptr;
  const float scale = unscale ? *grad_scale : 1.0f;
  const bool amsgrad = h.amsgrad;
  const Chunk* chunk_list = chunks.data();
  double* partial_base = partials.data();
  const TensorCoeffs* coeff_list = coeffs.data();

  // Static schedule: chunks are equal-sized, so contiguous blocks of chunks balance well and each thread streams
  // through neighbouring memory.
  // Never more threads than chunks: waking idle threads costs more than a small model's whole step, and under
  // a loaded machine an oversubscribed team can stall for milliseconds.
  const int threads = static_cast<int>(nchunks < nthreads ? (nchunks > 0 ? nchunks : 1) : nthreads);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t ci = 0; ci < nchunks; ++ci) {
    const Chunk& ch = chunk_list[ci];
    const AdamWTensor& t = tensors[ch.tensor];
    const int stats_mode = stats == nullptr ? kNoStats : (t.sumsq != nullptr ? kStatsWithSumsq : kStats);
    double* partial = stats ? partial_base + ci * kAdamWStatsCols : nullptr;
    const TensorCoeffs& c = coeff_list[ch.tensor];
    if (amsgrad) {
      if (unscale)
        run_chunk<T, true, true>(stats_mode, t, c, w1, beta2, one_minus_beta2, eps, sign, scale, ch.begin, ch.end,
                                 partial);
      else
        run_chunk<T, true, false>(stats_mode, t, c, w1, beta2, one_minus_beta2, eps, sign, scale, ch.begin, ch.end,
                                  partial);
    } else {
      if (unscale)
        run_chunk<T, false, true>(stats_mode, t, c, w1, beta2, one_minus_beta2, eps, sign, scale, ch.begin, ch.end,
                                  partial);
      else
        run_chunk<T, false, false>(stats_mode, t, c, w1, beta2, one_minus_beta2, eps, sign, scale, ch.begin,
                                   ch.end, partial);
    }
  }

  if (stats) {
    // Fixed-order second stage: chunks of a tensor are consecutive in `chunks`, so summing in list order is
    // deterministic and independent of how chunks were assigned to threads.
    for (int64_t ti = 0; ti < ntensors; ++ti)
      for (int k = 0; k < kAdamWStatsCols; ++k) stats[ti * kAdamWStatsCols + k] = 0.0;
    for (int64_t ci = 0; ci < nchunks; ++ci) {
      double* row = stats + chunks[ci].tensor * kAdamWStatsCols;
      for (int k = 0; k < kAdamWStatsCols; ++k) row[k] += partials[ci * kAdamWStatsCols + k];
    }
  }
}

}  // namespace

void adamw_step_cpu(DType dtype, const AdamWTensor* tensors, int64_t ntensors, const AdamWHyper& hyper,
                    const float* grad_scale, const float* found_inf, double* stats, int nthreads) {
  PNEKERN_CHECK(ntensors >= 0, "ntensors must be >= 0, got " << ntensors);
  PNEKERN_CHECK(ntensors == 0 || tensors != nullptr, "tensors is null");
  for (int64_t i = 0; i < ntensors; ++i) {
    const AdamWTensor& t = tensors[i];
    PNEKERN_CHECK(t.numel >= 0, "tensor " << i << ": numel < 0");
    PNEKERN_CHECK(t.numel == 0 || (t.param && t.grad && t.exp_avg && t.exp_avg_sq),
                  "tensor " << i << ": param/grad/exp_avg/exp_avg_sq must be non-null");
    PNEKERN_CHECK(!hyper.amsgrad || t.numel == 0 || t.max_exp_avg_sq,
                  "tensor " << i << ": amsgrad needs max_exp_avg_sq");
    PNEKERN_CHECK(t.step >= 1.0, "tensor " << i << ": step must be >= 1 (already incremented), got " << t.step);
  }
  if (found_inf != nullptr && *found_inf != 0.0f) {
    // A skipped (inf/nan) step changes nothing; the stats of a step that did not happen are zero, not stale.
    if (stats)
      for (int64_t i = 0; i < ntensors * kAdamWStatsCols; ++i) stats[i] = 0.0;
    return;
  }
  if (nthreads < 1) nthreads = 1;
  switch (dtype) {
    case DType::kFloat32:
      adamw_step_typed<float>(tensors, ntensors, hyper, grad_scale, stats, nthreads);
      break;
    case DType::kBFloat16:
      adamw_step_typed<bf16_t>(tensors, ntensors, hyper, grad_scale, stats, nthreads);
      break;
    case DType::kFloat16:
      adamw_step_typed<fp16_t>(tensors, ntensors, hyper, grad_scale, stats, nthreads);
      break;
    default:
      PNEKERN_CHECK(false, "unsupported dtype " << static_cast<int>(dtype));
  }
}

}  // namespace pnekern
