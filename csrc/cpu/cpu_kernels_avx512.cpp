// The hot loops compiled for AVX-512 F/BW/VL (Skylake-SP and later), picked at run time by cpu_isa.cpp.
// Same structure as cpu_kernels_avx2.cpp: headers at the baseline target, only cpu_kernels.inc under AVX-512.
#include <cmath>
#include <cstdint>

#include <immintrin.h>  // before the target switch (ODR rule in cpu_kernels.h); its intrinsics carry their own targets

#include "cpu_isa.h"
#include "cpu_kernels.h"

#if PNEKERN_X86_ISA_DISPATCH
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl")
#endif

#define PNEKERN_ISA_NS isa_avx512
#define PNEKERN_AVX512_PHILOX 1  // hand-vectorized Philox words in cpu_kernels.inc
#include "cpu_kernels.inc"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // PNEKERN_X86_ISA_DISPATCH
