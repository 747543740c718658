// Portability macros shared by the C++ (gcc/clang) and CUDA (nvcc) builds of pnekern's raw kernels.
// Nothing here may include torch: the raw kernels and their ctest unit tests build without it.
#pragma once

// Functions that must run on both the host and a CUDA device (Philox, dtype conversion) carry this marker; a plain
// C++ compiler sees an ordinary inline function.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define PNEKERN_HD __host__ __device__ __forceinline__
#else
#define PNEKERN_HD inline
#endif

// Raw kernels report misuse (bad sizes, null pointers) by throwing, so the torch layer and the C++ tests both see a
// message with the file and line instead of a crash. The torch layer validates arguments itself first with
// TORCH_CHECK; these checks guard the raw entry points for other callers.
#ifndef __CUDA_ARCH__
#include <sstream>
#include <stdexcept>
#define PNEKERN_CHECK(cond, ...)                                                        \
  do {                                                                                  \
    if (!(cond)) {                                                                      \
      std::ostringstream pnekern_check_os_;                                             \
      pnekern_check_os_ << __FILE__ << ":" << __LINE__ << ": check `" #cond "` failed: " \
                        << __VA_ARGS__;                                                 \
      throw std::invalid_argument(pnekern_check_os_.str());                             \
    }                                                                                   \
  } while (0)
#endif
