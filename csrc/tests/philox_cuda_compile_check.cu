// Compile-only check (no GPU on the build machine) that pnekern/philox.h and pnekern/half.h are valid device code:
// a kernel drawing the documented per-element normals into fp32/bf16/fp16 buffers. Built by CMake when a CUDA
// compiler is found; never linked into the extension.
#include <cuda_runtime.h>

#include "pnekern/half.h"
#include "pnekern/philox.h"

namespace pnekern {

template <typename T>
__global__ void philox_fill_normal_kernel(T* out, int64_t n, uint64_t seed, uint32_t tensor_idx, uint32_t step) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[e] = Storage<T>::store(philox::normal(seed, static_cast<uint64_t>(e), tensor_idx, step));
}

template __global__ void philox_fill_normal_kernel<float>(float*, int64_t, uint64_t, uint32_t, uint32_t);
template __global__ void philox_fill_normal_kernel<bf16_t>(bf16_t*, int64_t, uint64_t, uint32_t, uint32_t);
template __global__ void philox_fill_normal_kernel<fp16_t>(fp16_t*, int64_t, uint64_t, uint32_t, uint32_t);

}  // namespace pnekern
