// Per-ISA hot loops of the CPU kernels: plain-data arguments and the entry points each ISA level exports.
//
// ODR rule for the ISA translation units (cpu_kernels_<isa>.cpp): they include this header and the system headers
// *before* switching the target, and everything they define after the switch lives in the namespace of their level
// (pnekern::isa_avx2, ...) or in an anonymous namespace. An inline function or template instantiation with external
// linkage emitted under `target("avx2")` could otherwise be the copy the linker keeps for baseline callers (SIGILL on
// older CPUs). No std containers or other library templates are used after the switch.
#pragma once

#include <cstdint>

#include "pnekern/adamw_types.h"
#include "pnekern/half.h"

namespace pnekern {

// Statistics mode of an AdamW chunk: none, the three gradient sums, those plus Σ a_new² q (a sumsq buffer exists), or
// only Σ g² and Σ a_prev² g² (trace mode's two columns; partial[2..3] are written as 0). kStatsTrace is the cheap
// one: no a_new, no blend, a_prev = 1/d_prev from one division. The driver uses kStats for it when there is no
// previous state (a_prev = 1), so kStatsTrace may assume has_prev. kStatsNewWithSumsq is kStatsWithSumsq without
// column 1 (written as 0): a_new = 1/denom is its only extra divider op (A_t rows, diag/lowrank mode).
enum AdamWStatsMode : int { kNoStats = 0, kStats = 1, kStatsWithSumsq = 2, kStatsTrace = 3, kStatsNewWithSumsq = 4 };

// Call-wide AdamW scalars, already rounded to fp32 the way torch rounds them.
struct AdamWScalars {
  DType dtype;
  bool amsgrad;
  bool unscale;  // grad is divided by `scale` and written back
  float w1;      // 1 - β1
  float beta2;
  float one_minus_beta2;
  float eps;
  float sign;    // -1 for maximize
  float scale;
  // In-step noise (AdamWHyper's noise_*): active for a tensor when noise_mode != kNoiseOff and t.noise_on.
  int noise_mode;
  uint32_t noise_key0, noise_key1;  // Philox key (seed lo, hi)
  uint32_t noise_counter;
  bool noise_has_mult;
  float noise_mult;
  float noise_in_v;     // 1: ε enters v (into_v), else 0
  float noise_in_m;     // 1: ε enters m and the update (gradient modes), else 0
  float noise_param;    // fp32(η·sqrt(κ)) in param mode, else 0
};

// The call's scalars from its hyperparameters (grad_scale: null, or the loss scale to divide by). adamw_step_cpu
// uses it; tests that call one ISA level's chunk directly use it too, so both see the same rounding.
AdamWScalars make_scalars(DType dtype, const AdamWHyper& h, const float* grad_scale);

// One chunk [begin, end) of one tensor (see adamw_step_cpu for the stats contract). partial: double[4], written
// when stats_mode != kNoStats.
using AdamWChunkFn = void (*)(const AdamWScalars& s, int stats_mode, const AdamWTensor& t, const TensorCoeffs& c,
                              int64_t begin, int64_t end, double* partial);

// Elements [begin, begin+n) of microbatch_accumulate_cpu's x (and v, sumsq); out: double[2], overwritten.
// assign_sumsq: sumsq[i] = y² instead of += y² (the step's first contribution; no zeroing pass, no read).
using MicrobatchChunkFn = void (*)(DType dtype, const void* x, const void* v, float* sumsq, bool assign_sumsq,
                                   int64_t begin, int64_t n, float inv_sqrt_bc2, float eps, float scale, double* out);

struct CpuKernels {
  AdamWChunkFn adamw_chunk;
  MicrobatchChunkFn microbatch_chunk;
};

#define PNEKERN_DECLARE_CPU_KERNELS(ns)                                                                            \
  namespace ns {                                                                                                   \
  void adamw_chunk(const AdamWScalars& s, int stats_mode, const AdamWTensor& t, const TensorCoeffs& c,             \
                   int64_t begin, int64_t end, double* partial);                                                   \
  void microbatch_chunk(DType dtype, const void* x, const void* v, float* sumsq, bool assign_sumsq, int64_t begin, \
                        int64_t n, float inv_sqrt_bc2, float eps, float scale, double* out);                       \
  }

PNEKERN_DECLARE_CPU_KERNELS(isa_baseline)
PNEKERN_DECLARE_CPU_KERNELS(isa_avx2)
PNEKERN_DECLARE_CPU_KERNELS(isa_avx512)

}  // namespace pnekern
