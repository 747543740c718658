// The hot loops at the build's own target (baseline x86-64 = SSE2 for the portable wheel, or -march=native).
// Always compiled: the fallback on every CPU and the only level on non-x86 machines.
#include <cmath>
#include <cstdint>

#include "cpu_kernels.h"

#define PNEKERN_ISA_NS isa_baseline
#include "cpu_kernels.inc"
