// Argument structs shared by the CPU and CUDA fused AdamW launchers (plain data, no torch, no CUDA types).
#pragma once

#include <cmath>
#include <cstdint>

namespace pnekern {

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
};

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
};

// Number of columns of a stats row; see adamw_step_cpu.
constexpr int kAdamWStatsCols = 4;

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
