// CPU feature detection and the cached ISA selection (see cpu_isa.h). Compiled at the build's baseline target.
#include "cpu_isa.h"

#include <atomic>
#include <cctype>
#include <cstdlib>
#include <string>

#include "pnekern/macros.h"

namespace pnekern {
namespace {

const CpuKernels kTables[kNumCpuIsa] = {
    {&isa_baseline::adamw_chunk, &isa_baseline::microbatch_chunk},
#if PNEKERN_X86_ISA_DISPATCH
    {&isa_avx2::adamw_chunk, &isa_avx2::microbatch_chunk},
    {&isa_avx512::adamw_chunk, &isa_avx512::microbatch_chunk},
#else
    {nullptr, nullptr},
    {nullptr, nullptr},
#endif
};

constexpr const char* kNames[kNumCpuIsa] = {"baseline", "avx2", "avx512"};

bool cpu_has(CpuIsa isa) {
#if PNEKERN_X86_ISA_DISPATCH
  // libgcc / compiler-rt check CPUID and that the OS saves the YMM/ZMM state (XGETBV) before reporting a feature.
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  switch (isa) {
    case CpuIsa::kBaseline:
      return true;
    case CpuIsa::kAvx2:
      return avx2;
    case CpuIsa::kAvx512:
      return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl");
  }
  return false;
#else
  return isa == CpuIsa::kBaseline;
#endif
}

// -1: not resolved yet.
std::atomic<int> g_selected{-1};

// Index of a level name, kNumCpuIsa for "auto" (or empty), -1 when unknown. Case-insensitive.
int parse_isa(const char* name) {
  std::string s;
  for (const char* c = name; c && *c; ++c) s.push_back(static_cast<char>(std::tolower(static_cast<unsigned char>(*c))));
  if (s.empty() || s == "auto") return kNumCpuIsa;
  for (int i = 0; i < kNumCpuIsa; ++i)
    if (s == kNames[i]) return i;
  return -1;
}

std::string supported_list() {
  std::string out;
  for (int i = 0; i < kNumCpuIsa; ++i)
    if (cpu_isa_supported(static_cast<CpuIsa>(i))) out += (out.empty() ? "" : ", ") + std::string(kNames[i]);
  return out;
}

// PNEKERN_CPU_ISA: unset/auto -> best; a known level the CPU lacks -> the best supported level below it (a job
// script shared by machines of different generations keeps working); unknown -> error.
int resolve_from_env() {
  const char* env = std::getenv("PNEKERN_CPU_ISA");
  const int want = parse_isa(env);
  PNEKERN_CHECK(want >= 0, "PNEKERN_CPU_ISA=" << env << " is not one of auto, baseline, avx2, avx512");
  int level = want == kNumCpuIsa ? kNumCpuIsa - 1 : want;
  while (level > 0 && !cpu_isa_supported(static_cast<CpuIsa>(level))) --level;
  return level;
}

}  // namespace

const char* cpu_isa_name(CpuIsa isa) {
  const int i = static_cast<int>(isa);
  return i >= 0 && i < kNumCpuIsa ? kNames[i] : "unknown";
}

bool cpu_isa_compiled(CpuIsa isa) {
  const int i = static_cast<int>(isa);
  return i >= 0 && i < kNumCpuIsa && kTables[i].adamw_chunk != nullptr;
}

bool cpu_isa_supported(CpuIsa isa) { return cpu_isa_compiled(isa) && cpu_has(isa); }

CpuIsa cpu_isa_best() {
  int level = kNumCpuIsa - 1;
  while (level > 0 && !cpu_isa_supported(static_cast<CpuIsa>(level))) --level;
  return static_cast<CpuIsa>(level);
}

CpuIsa cpu_isa_selected() {
  int s = g_selected.load(std::memory_order_acquire);
  if (s < 0) {
    s = resolve_from_env();
    g_selected.store(s, std::memory_order_release);
  }
  return static_cast<CpuIsa>(s);
}

void cpu_isa_set(const char* name) {
  const int want = parse_isa(name);
  PNEKERN_CHECK(want >= 0, "unknown CPU ISA level '" << (name ? name : "") << "'; expected auto, baseline, avx2 or avx512");
  if (want == kNumCpuIsa) {
    g_selected.store(resolve_from_env(), std::memory_order_release);
    return;
  }
  PNEKERN_CHECK(cpu_isa_supported(static_cast<CpuIsa>(want)),
                "CPU ISA level '" << kNames[want] << "' is "
                                  << (cpu_isa_compiled(static_cast<CpuIsa>(want)) ? "not supported by this CPU"
                                                                                  : "not compiled into this build")
                                  << " (supported: " << supported_list() << ")");
  g_selected.store(want, std::memory_order_release);
}

const char* cpu_isa_env_request() {
  const char* env = std::getenv("PNEKERN_CPU_ISA");
  return env ? env : "";
}

const CpuKernels& cpu_kernels_for(CpuIsa isa) {
  PNEKERN_CHECK(cpu_isa_compiled(isa), "CPU ISA level " << static_cast<int>(isa) << " is not compiled");
  return kTables[static_cast<int>(isa)];
}

const CpuKernels& cpu_kernels() { return kTables[static_cast<int>(cpu_isa_selected())]; }

}  // namespace pnekern
