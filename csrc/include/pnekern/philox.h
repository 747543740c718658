// Philox4x32-10 counter-based RNG (Salmon, Moraes, Dror & Shaw, SC'11; Random123 constants), header-only, for C++
// and CUDA. A draw is a pure function of (key, counter), so noise depends only on *which* element it is for, never
// on block sizes, grids, thread counts or backend (STYLE.md practice 10, SPEC §5).
//
// ---------------------------------------------------------------------------------------------------------------
// pnekern stream layout (CONTRACT: the reference, Triton and CUDA ports must match this bit for bit)
//
//   key     = { seed_lo, seed_hi }                    seed: uint64, seed_lo = seed & 0xffffffff, seed_hi = seed >> 32
//   counter = { grp_lo, grp_hi, tensor_idx, step }    grp = elem >> 2, elem: uint64 flat element index in the tensor
//                                                     tensor_idx: uint32 index of the tensor in the optimizer's list
//                                                     step: uint32 optimizer step (the value the step uses)
//   out     = philox4x32_10(counter, key)             4 uint32 words out[0..3]
//
// One counter per group of four consecutive elements 4·grp .. 4·grp + 3; element e has lane l = e & 3 and uses the
// word pair p = l >> 1, (out[2p], out[2p+1]):
//   u1 = uniform_open0(out[2p]),  u2 = uniform_open0(out[2p+1])     (both in (0, 1], exactly representable)
//   ρ  = sqrt(-2 ln u1),  θ = fp32(2π · u2)
//   z  = ρ · cos θ  (l even),   z = ρ · sin θ  (l odd)               (Box–Muller: both normals of each pair)
// and the uniform of element e is uniform_open0(out[l]). Four normals per Philox evaluation and one log and sqrt per
// two normals: the CPU kernels' in-step noise takes 0.46–0.59 of the time of one counter per element
// (benchmarks/RESULTS.md).
//
// uniform_open0(x) = ((x >> 8) + 1) * 2^-24: the top 24 bits of the word, shifted to (0, 1]. Every step is exact in
// fp32, so uniforms agree bit for bit on every backend; u1 > 0 keeps log finite. The normal goes through log/sin/cos,
// whose last-ulp rounding differs between libm, CUDA and Triton: normals agree to a few ulp, not bitwise (the
// polynomial normal below is bitwise the same on every CPU ISA level and, built with --fmad=false, on CUDA).
// ---------------------------------------------------------------------------------------------------------------
#pragma once

#include <cmath>
#include <cstdint>

#include "pnekern/macros.h"

namespace pnekern {
namespace philox {

// Random123's Philox4x32 multipliers and Weyl key increments (golden ratio and sqrt(3)-1 in 32-bit fixed point).
constexpr uint32_t kM0 = 0xD2511F53u;
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;
constexpr uint32_t kW1 = 0xBB67AE85u;
constexpr int kRounds = 10;

struct U32x4 {
  uint32_t v[4];
};
struct U32x2 {
  uint32_t v[2];
};

PNEKERN_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#ifdef __CUDA_ARCH__
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
#endif
}

// One Philox S-box round: two 32x32->64 multiplies, the high halves are mixed with the other words and the key,
// and the words are permuted (Random123's _philox4x32round).
PNEKERN_HD U32x4 round(U32x4 c, U32x2 k) {
  uint32_t hi0, lo0, hi1, lo1;
  mulhilo32(kM0, c.v[0], hi0, lo0);
  mulhilo32(kM1, c.v[2], hi1, lo1);
  U32x4 r;
  r.v[0] = hi1 ^ c.v[1] ^ k.v[0];
  r.v[1] = lo1;
  r.v[2] = hi0 ^ c.v[3] ^ k.v[1];
  r.v[3] = lo0;
  return r;
}

// Philox4x32 with 10 rounds; the key is bumped by the Weyl constants between rounds (9 bumps).
PNEKERN_HD U32x4 philox4x32_10(U32x4 counter, U32x2 key) {
  counter = round(counter, key);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 1; r < kRounds; ++r) {
    key.v[0] += kW0;
    key.v[1] += kW1;
    counter = round(counter, key);
  }
  return counter;
}

// The pnekern key/counter layout (see the header comment).
PNEKERN_HD U32x2 make_key(uint64_t seed) {
  return U32x2{{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)}};
}
// The counter of group `grp` (elements 4·grp .. 4·grp + 3).
PNEKERN_HD U32x4 make_counter(uint64_t grp, uint32_t tensor_idx, uint32_t step) {
  return U32x4{{static_cast<uint32_t>(grp), static_cast<uint32_t>(grp >> 32), tensor_idx, step}};
}

// uint32 -> uniform float in (0, 1]: ((x >> 8) + 1) * 2^-24, exact in fp32 on every backend.
PNEKERN_HD float uniform_open0(uint32_t x) {
  return static_cast<float>((x >> 8) + 1u) * 0x1.0p-24f;
}

// Box–Muller: the cos (use_sin false) or sin normal of two uniforms in (0, 1].
PNEKERN_HD float box_muller(float u1, float u2, bool use_sin) {
  constexpr float kTwoPi = 6.283185307179586f;
  const float theta = kTwoPi * u2;
#ifdef __CUDA_ARCH__
  return sqrtf(-2.0f * logf(u1)) * (use_sin ? sinf(theta) : cosf(theta));
#else
  return std::sqrt(-2.0f * std::log(u1)) * (use_sin ? std::sin(theta) : std::cos(theta));
#endif
}

// The standard normal for element `elem` of tensor `tensor_idx` at optimizer step `step` under `seed` (libm).
PNEKERN_HD float normal(uint64_t seed, uint64_t elem, uint32_t tensor_idx, uint32_t step) {
  const U32x4 out = philox4x32_10(make_counter(elem >> 2, tensor_idx, step), make_key(seed));
  const uint32_t lane = static_cast<uint32_t>(elem) & 3u;
  const uint32_t pair = lane & 2u;
  return box_muller(uniform_open0(out.v[pair]), uniform_open0(out.v[pair + 1]), (lane & 1u) != 0);
}

// Portable fp32 log/sin/cos (no libm): bitwise identical on every ISA level and compiler; what the CPU and CUDA
// kernels' in-step noise uses (normal_poly.inc). Agrees with normal() / the reference to ~1e-6.
#define PNEKERN_POLY_FN PNEKERN_HD
#include "pnekern/normal_poly.inc"
#undef PNEKERN_POLY_FN

PNEKERN_HD float normal_poly(uint64_t seed, uint64_t elem, uint32_t tensor_idx, uint32_t step) {
  return philox_normal_poly(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), elem, tensor_idx, step);
}

// The uniform in (0, 1] of the same element (word elem & 3 of its group), for dropout-like uses and for
// cross-backend tests.
PNEKERN_HD float uniform(uint64_t seed, uint64_t elem, uint32_t tensor_idx, uint32_t step) {
  const U32x4 out = philox4x32_10(make_counter(elem >> 2, tensor_idx, step), make_key(seed));
  return uniform_open0(out.v[static_cast<uint32_t>(elem) & 3u]);
}

}  // namespace philox
}  // namespace pnekern
