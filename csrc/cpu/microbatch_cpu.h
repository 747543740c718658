// Per-contribution reduction for micro-batch gradient statistics (SPEC §2), run from a parameter's gradient hook on
// each backward call's contribution x before it is accumulated into p.grad. Raw pointers, no torch.
#pragma once

#include <cstdint>

#include "pnekern/half.h"

namespace pnekern {

// Elements per reduction work item; fixed so results do not depend on the thread count.
constexpr int64_t kMicrobatchChunk = 1 << 16;

// With y = scale·x and a = 1/(sqrt(v)·inv_sqrt_bc2 + eps) (a = 1 when v is null):
//   acc[0] += Σ y²          (θ²-units of the gradient, e.g. for tr Σ)
//   acc[1] += Σ a² y²       (the preconditioned S1 of SPEC §2)
//   sumsq[i] += y_i²        (optional fp32 buffer, diag mode; same pass; assign_sumsq: sumsq[i] = y_i², for the
//                            step's first contribution, so the buffer is never zeroed nor read then)
// x and v share the storage dtype `dtype` (the param's); acc is double[2]; sums are per-chunk doubles added in chunk
// order (deterministic for any nthreads).
void microbatch_accumulate_cpu(DType dtype, const void* x, const void* v, int64_t numel, float inv_sqrt_bc2,
                               float eps, float scale, double* acc, float* sumsq, int nthreads,
                               bool assign_sumsq = false);

}  // namespace pnekern
