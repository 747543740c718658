// Fused multi-tensor AdamW step on raw pointers (no torch): one pass over param/grad/exp_avg/exp_avg_sq
// (+max_exp_avg_sq) per element, optionally producing the per-tensor preconditioned-gradient statistics of SPEC §2.
#pragma once

#include <cstdint>

#include "pnekern/adamw_types.h"
#include "pnekern/half.h"

namespace pnekern {

// Elements per work item. Fixed (not derived from the thread count) so the chunked reductions, and hence the stats,
// are bitwise identical for any number of threads. 64K fp32 elements = 256 KiB per stream: large enough to amortise
// scheduling, small enough to balance 100s of tensors over a few threads.
constexpr int64_t kAdamWChunk = 1 << 16;

// Applies one AdamW step (torch.optim.AdamW(foreach=False) semantics, SPEC §1) to every tensor.
//   grad_scale: optional; when given the gradient used is grad / *grad_scale and that unscaled value is written
//               back into grad (what torch's fused kernels do for GradScaler).
//   found_inf:  optional; when *found_inf != 0 nothing is modified (the caller must then not count the step) and the
//               stats rows are zeroed.
//   stats:      optional [ntensors][hyper.stats_cols] doubles, overwritten (stats_cols 2: columns [0] and [1]
//               only; stats_cols 3: columns [0], [2], [3]). With g the unscaled (and maximize-signed) gradient:
//                 [0] Σ g²
//                 [1] Σ a_prev² g²   a_prev = 1/(sqrt(v_prev)/sqrt(1-β2^(step-1)) + eps), v_prev the second moment
//                                     before this step (max_exp_avg_sq with amsgrad); a_prev = 1 when step-1 == 0
//                 [2] Σ a_new² g²    a_new = 1/denom of this step
//                 [3] Σ a_new² q     q = the tensor's sumsq buffer; 0 without one
//               Deterministic for any nthreads: fp32 sums over fixed 256-element blocks, added in double per chunk,
//               chunk partials summed per tensor in chunk order (no atomics). a_prev uses 1/sqrt(bc2_prev) as a
//               multiplier and a_new/a_prev share one division, so the stats agree with a float64 computation to
//               ~1e-6 relative rather than reproducing torch's rounding (only the update itself must).
//   nthreads:   OpenMP threads (the torch layer passes at::get_num_threads()).
void adamw_step_cpu(DType dtype, const AdamWTensor* tensors, int64_t ntensors, const AdamWHyper& hyper,
                    const float* grad_scale, const float* found_inf, double* stats, int nthreads);

}  // namespace pnekern
