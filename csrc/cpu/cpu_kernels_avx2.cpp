// The hot loops compiled for AVX2+FMA (Haswell and later), picked at run time by cpu_isa.cpp.
// Headers first, at the build's baseline target; only the loops of cpu_kernels.inc are compiled under the AVX2 target
// (see the ODR rule in cpu_kernels.h). FMA is enabled but never contracted into: -ffp-contract=off keeps the fp32
// results identical to the baseline build's.
#include <cmath>
#include <cstdint>

#include <immintrin.h>  // before the target switch (ODR rule in cpu_kernels.h); its intrinsics carry their own targets

#include "cpu_isa.h"
#include "cpu_kernels.h"

#if PNEKERN_X86_ISA_DISPATCH
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

#define PNEKERN_ISA_NS isa_avx2
#define PNEKERN_AVX2_INTRINSICS 1  // hand-vectorized Philox words and low-rank rows in cpu_kernels.inc
#include "cpu_kernels.inc"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // PNEKERN_X86_ISA_DISPATCH
