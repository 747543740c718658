// Fused multi-tensor AdamW (+ SPEC §2 stats) for CUDA on raw device pointers. Same contract as adamw_step_cpu
// (csrc/cpu/adamw_cpu.h); only the launcher's memory arguments differ.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "pnekern/adamw_types.h"
#include "pnekern/half.h"

namespace pnekern {

// Elements per thread block work item. Fixed, so the two-stage stats reduction is deterministic.
constexpr int64_t kAdamWCudaChunk = 1 << 14;
constexpr int kAdamWCudaThreads = 256;

// Device workspace the launcher needs for `tensors` (tensor table, chunk table, per-chunk stats partials).
size_t adamw_cuda_workspace_bytes(const AdamWTensor* tensors, int64_t ntensors);

// tensors: host array whose pointers (param, grad, state, sumsq) are device pointers. grad_scale, found_inf:
// optional device pointers to one float (found_inf != 0 -> the kernels change nothing and zero the stats; the
// caller decides whether the step counts). stats: optional device [ntensors][hyper.stats_cols] doubles, overwritten.
// workspace: device memory of at least adamw_cuda_workspace_bytes(...). Everything is enqueued on `stream`; the
// host table is copied with cudaMemcpyAsync from pageable memory, which is staged before the call returns, so
// `tensors` need not outlive the call. Throws std::runtime_error on a CUDA error.
void adamw_step_cuda(DType dtype, const AdamWTensor* tensors, int64_t ntensors, const AdamWHyper& hyper,
                     const float* grad_scale, const float* found_inf, double* stats, void* workspace,
                     size_t workspace_bytes, cudaStream_t stream);

}  // namespace pnekern
