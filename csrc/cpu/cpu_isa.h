// Runtime choice of the instruction-set level for the CPU hot loops (AdamW chunk loop, micro-batch accumulate).
//
// The wheel is built for baseline x86-64 (SSE2), but the loops are divide/sqrt-bound at SSE2 width, so they are
// compiled once more per ISA level (cpu_kernels_avx2.cpp, cpu_kernels_avx512.cpp: the same cpu_kernels.inc under
// `#pragma GCC target`) and the level is picked at run time from CPUID. Every level computes the same fp32
// operations in the same order (no FMA contraction: -ffp-contract=off) and the reductions use a fixed lane
// assignment, so all levels give bitwise identical results.
//
// Selection: PNEKERN_CPU_ISA=auto|baseline|avx2|avx512 (read once, at the first kernel call; a level the CPU lacks
// falls back to the best one it has), or cpu_isa_set() at any time (pnekern._C.set_cpu_isa from Python).
#pragma once

#include <cstdint>

#include "cpu_kernels.h"

// x86 with GCC/clang: the extra levels are compiled and dispatched. Elsewhere only the baseline exists.
#if !defined(PNEKERN_NO_ISA_DISPATCH) && (defined(__x86_64__) || defined(__i386__)) && \
    (defined(__GNUC__) || defined(__clang__))
#define PNEKERN_X86_ISA_DISPATCH 1
#else
#define PNEKERN_X86_ISA_DISPATCH 0
#endif

namespace pnekern {

enum class CpuIsa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr int kNumCpuIsa = 3;

// "baseline", "avx2" (AVX2+FMA), "avx512" (AVX-512 F/BW/VL).
const char* cpu_isa_name(CpuIsa isa);

// Compiled into this library.
bool cpu_isa_compiled(CpuIsa isa);

// Compiled and usable on the running CPU and OS (CPUID + XGETBV, via __builtin_cpu_supports).
bool cpu_isa_supported(CpuIsa isa);

// The best supported level.
CpuIsa cpu_isa_best();

// The level the kernels use now. The first call resolves PNEKERN_CPU_ISA (unset/"auto": the best level; a known
// level the CPU lacks: the best supported level below it). Throws std::invalid_argument on an unknown name.
CpuIsa cpu_isa_selected();

// Selects a level by name: "auto" re-reads PNEKERN_CPU_ISA; an explicit level must be supported (a missing one
// throws std::invalid_argument rather than running into SIGILL). Takes effect for the next kernel call; do not call
// it concurrently with running kernels if results must come from one level.
void cpu_isa_set(const char* name);

// The raw value of PNEKERN_CPU_ISA seen at resolution time ("" when unset).
const char* cpu_isa_env_request();

// Kernel table of a level (must be compiled) and of the selected level.
const CpuKernels& cpu_kernels_for(CpuIsa isa);
const CpuKernels& cpu_kernels();

}  // namespace pnekern
