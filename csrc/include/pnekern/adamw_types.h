// Argument structs shared by the CPU and CUDA fused AdamW launchers (plain data, no torch, no CUDA types).
#pragma once

#include <cmath>
#include <cstdint>

#include "pnekern/macros.h"

namespace pnekern {

// Number of columns of a full stats row, of a trace-only row (its first two columns), and of an A_t row (columns
// 0, 2, 3: what the diag/lowrank statistics read, without a_prev); see adamw_step_cpu.
constexpr int kAdamWStatsCols = 4;
constexpr int kAdamWTraceStatsCols = 2;
constexpr int kAdamWNewStatsCols = 3;

// The full-row column that column k of a `cols`-wide row holds (the CPU second stage and the CUDA finalize).
PNEKERN_HD constexpr int stats_row_source(int cols, int k) { return cols == kAdamWNewStatsCols && k > 0 ? k + 1 : k; }

inline constexpr bool valid_stats_cols(int cols) {
  return cols == kAdamWStatsCols || cols == kAdamWTraceStatsCols || cols == kAdamWNewStatsCols;
}

// AdamW hyper-parameters of one call (one param group). Python floats arrive as double; the kernel rounds them to
// fp32 exactly where torch's foreach=False path does (scalars of fp32 tensor ops).
struct AdamWHyper {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double weight_decay = 1e-2;
  double eps = 1e-8;
  bool amsgrad = false;
  bool maximize = false;
  // In-step noise (SPEC §5), call-wide part; the per-tensor part is AdamWTensor::noise_*. ε of element e is
  //   ε_e = (z_e · sqrt(max(δ_e, 0)) + Σ_j U[e, j] · c_j) · noise_mult        (fp32, in this order, j ascending)
  // with z_e the Philox normal keyed (noise_seed, noise_counter, tensor_idx, e). Modes (kNoise*):
  //   into_v:    g ← g + ε before m and v (the gradient-space default)
  //   outside_v: m and the update use g + ε, v uses g
  //   param:     after the update θ ← θ + noise_param_coef · a_new · ε, a_new = 1/denom of this step
  // The statistics columns always see the clean gradient.
  int noise_mode = 0;
  uint64_t noise_seed = 0;
  uint32_t noise_counter = 0;
  bool noise_has_mult = false;  // false: no multiply (not even by 1)
  float noise_mult = 1.0f;      // sqrt(controller scale), rounded to fp32
  double noise_param_coef = 0.0;  // η·sqrt(κ) (param mode), rounded to fp32 once
  // Columns of each stats row: kAdamWStatsCols (all four sums), kAdamWTraceStatsCols (Σ g², Σ a_prev² g² only:
  // trace mode, whose per-element work is then about half) or kAdamWNewStatsCols (Σ g², Σ a_new² g², Σ a_new² q:
  // diag/lowrank mode, which never reads a_prev, so the CPU kernel skips its sqrt and division).
  int stats_cols = kAdamWStatsCols;
};

// Noise modes of AdamWHyper::noise_mode.
enum AdamWNoiseMode : int { kNoiseOff = 0, kNoiseIntoV = 1, kNoiseOutsideV = 2, kNoiseParam = 3 };

// One parameter tensor. All buffers are contiguous with `numel` elements of the call's storage dtype, except
// `sumsq` (fp32, optional). `step` is the step count *after* this step's increment (torch semantics: the first
// step uses step == 1).
struct AdamWTensor {
  void* param = nullptr;
  void* grad = nullptr;            // read; written back unscaled when grad_scale is given
  void* exp_avg = nullptr;
  void* exp_avg_sq = nullptr;
  void* max_exp_avg_sq = nullptr;  // required iff amsgrad
  const float* sumsq = nullptr;    // optional Σ_k x_k² buffer ("diag mode"), feeds stats column 3
  int64_t numel = 0;
  double step = 1.0;
  // In-step noise of this tensor (see AdamWHyper); used when noise_on and the call's noise_mode != off.
  bool noise_on = false;
  const float* noise_var = nullptr;    // δ [numel] fp32 per-element variance; null: isotropic noise_sd
  bool noise_var_broadcast = false;    // noise_var holds one δ for every element (CUDA: δ stays on the device)
  float noise_sd = 0.0f;               // sqrt(max(δ, 0)) of an isotropic δ (fp32 sqrt of the fp32 δ)
  const float* noise_basis = nullptr;  // U [numel, noise_rank] fp32 row-major; null when noise_rank == 0
  const float* noise_coef = nullptr;   // c [noise_rank] fp32 (c_j = sqrt(s_j)·z_r[j], drawn outside the kernel)
  int64_t noise_rank = 0;
  uint32_t noise_tensor_idx = 0;       // the Philox counter's tensor word
};

// Per-tensor coefficients, computed once on the host in double and rounded to fp32 the way torch's foreach=False
// path rounds its Python-float scalars when they meet fp32 tensors.
// Shared by the CPU and CUDA launchers so both backends round the scalars identically.
struct TensorCoeffs {
  float decay;          // 1 - lr*wd                     (param.mul_)
  float neg_step_size;  // -lr / (1 - β1^step)           (param.addcdiv_ value)
  float bc2_sqrt;       // sqrt(1 - β2^step)             (denominator of sqrt(v))
  float inv_prev_bc2_sqrt;  // 1/sqrt(1 - β2^(step-1)), stats only (a multiply: a_prev is not torch-matched math)
  bool has_prev;        // step-1 > 0: a_prev uses the previous state, else a_prev = 1
};

inline TensorCoeffs make_coeffs(const AdamWHyper& h, double step) {
  TensorCoeffs c;
  const double bc1 = 1.0 - std::pow(h.beta1, step);
  const double bc2 = 1.0 - std::pow(h.beta2, step);
  c.decay = static_cast<float>(1.0 - h.lr * h.weight_decay);
  c.neg_step_size = static_cast<float>(-(h.lr / bc1));
  c.bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  c.has_prev = step - 1.0 > 0.0;
  // 1.0 when there is no previous state only keeps the (discarded) a_prev lane finite.
  c.inv_prev_bc2_sqrt = c.has_prev ? static_cast<float>(1.0 / std::sqrt(1.0 - std::pow(h.beta2, step - 1.0))) : 1.0f;
  return c;
}

}  // namespace pnekern
