// fp16 / bf16 <-> fp32 conversion in plain C++ (and CUDA), no torch and no compiler extensions.
//
// Why our own: the raw kernels must build without torch (ctest) and must vectorize under `#pragma omp simd`, so the
// conversions are branch-free bit manipulation that GCC turns into blends. Both narrowing conversions round to
// nearest, ties to even, exactly like torch's `.to(torch.bfloat16)` / `.to(torch.float16)`; NaN stays NaN (quiet),
// overflow goes to ±inf, fp16 subnormals are exact.
//
// The fp16 routines use the float-arithmetic formulation of the conversion (scale by powers of two so that the FPU
// does the rounding and the subnormal handling), which needs IEEE round-to-nearest and no -ffast-math (we never use
// it: only -fno-math-errno, which does not touch rounding).
#pragma once

#include <cstdint>
#include <cstring>

#include "pnekern/macros.h"

namespace pnekern {

// Storage tags: a 16-bit payload that the kernels load/store through the converters below. Distinct types (not raw
// uint16_t) so templates on the storage type cannot confuse the two formats.
struct bf16_t {
  uint16_t bits;
};
struct fp16_t {
  uint16_t bits;
};
static_assert(sizeof(bf16_t) == 2 && sizeof(fp16_t) == 2, "16-bit storage types must be 2 bytes");

PNEKERN_HD uint32_t float_to_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

PNEKERN_HD float bits_to_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// bf16 is the top half of an fp32: widening is a shift.
PNEKERN_HD float bf16_to_float(bf16_t h) { return bits_to_float(static_cast<uint32_t>(h.bits) << 16); }

PNEKERN_HD bf16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  // Adding 0x7FFF plus the lowest kept bit rounds to nearest with ties to even; a carry into the exponent is the
  // correct round-up (up to inf for values just below overflow).
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  // NaN: rounding could carry a NaN with a low-only payload into inf, so keep the sign/exponent and force the quiet
  // bit instead.
  const bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  const uint32_t nan = (u >> 16) | 0x0040u;
  return bf16_t{static_cast<uint16_t>(is_nan ? nan : rounded)};
}

PNEKERN_HD float fp16_to_float(fp16_t h) {
  // Put the half's exponent+mantissa at the top of a word (dropping the sign), then either
  //  - normal/inf/nan: shift into fp32 position and rebias by multiplying with 2^-112 (exponent bias 127-15 = 112;
  //    the multiplication also maps the all-ones exponent to fp32 inf/nan because we pre-add 0xE0 to the exponent);
  //  - subnormal/zero: build 0.5 + m·2^-24... as a float with a fixed exponent and subtract 0.5, which is exact.
  const uint32_t w = static_cast<uint32_t>(h.bits) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;  // exponent+mantissa, sign shifted out
  const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t denorm_cutoff = 1u << 27;  // two_w below this <=> half exponent field == 0
  // Selects are written as mask arithmetic: GCC does not if-convert a ternary between two bit casts, which would
  // stop `omp simd` loops over fp16 data from vectorizing.
  const uint32_t denorm_mask = 0u - static_cast<uint32_t>(two_w < denorm_cutoff);
  const uint32_t body = (float_to_bits(denormalized) & denorm_mask) | (float_to_bits(normalized) & ~denorm_mask);
  return bits_to_float(sign | body);
}

PNEKERN_HD fp16_t float_to_fp16(float f) {
  // Scale |f| up by 2^112 then down by 2^-110: values too large for fp16 become inf (the first product overflows),
  // and the FPU rounds the mantissa at the position fp16 keeps once we add a power of two ("bias") that aligns the
  // result's exponent with fp16's; subnormals fall out because the bias is clamped at the smallest normal exponent.
  const float scale_to_inf = 0x1.0p+112f;
  const float scale_to_zero = 0x1.0p-110f;
  const uint32_t w = float_to_bits(f);
  const float abs_f = bits_to_float(w & 0x7FFFFFFFu);
  float base = (abs_f * scale_to_inf) * scale_to_zero;
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t exp_w = shl1_w & 0xFF000000u;
  const uint32_t low_mask = 0u - static_cast<uint32_t>(exp_w < 0x71000000u);  // mask form of max(exp_w, 0x71000000)
  const uint32_t bias = (0x71000000u & low_mask) | (exp_w & ~low_mask);
  base = bits_to_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_to_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  const uint32_t nan_mask = 0u - static_cast<uint32_t>(shl1_w > 0xFF000000u);  // NaN -> canonical quiet NaN
  const uint32_t out = (sign >> 16) | (0x7E00u & nan_mask) | (nonsign & ~nan_mask);
  return fp16_t{static_cast<uint16_t>(out)};
}

// Uniform load/store interface used by kernels templated on the storage type: math is always fp32.
template <typename T>
struct Storage;

template <>
struct Storage<float> {
  static PNEKERN_HD float load(float x) { return x; }
  static PNEKERN_HD float store(float x) { return x; }
};
template <>
struct Storage<bf16_t> {
  static PNEKERN_HD float load(bf16_t x) { return bf16_to_float(x); }
  static PNEKERN_HD bf16_t store(float x) { return float_to_bf16(x); }
};
template <>
struct Storage<fp16_t> {
  static PNEKERN_HD float load(fp16_t x) { return fp16_to_float(x); }
  static PNEKERN_HD fp16_t store(float x) { return float_to_fp16(x); }
};

// Runtime dtype tag for the raw entry points (the torch layer maps at::ScalarType onto it).
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::kFloat32: return "float32";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat16: return "float16";
  }
  return "unknown";
}

}  // namespace pnekern
