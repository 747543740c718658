// Philox4x32-10 known-answer vectors from the Random123 distribution (tests/kat_vectors: zero, all-ones and the
// pi-digits counter/key), plus the pnekern stream layout and uniform/normal mapping documented in philox.h.
#include "pnekern/philox.h"

#include <cmath>

#include "test_util.h"

using namespace pnekern::philox;

namespace {

void check_kat(U32x4 ctr, U32x2 key, U32x4 want, const char* name) {
  const U32x4 got = philox4x32_10(ctr, key);
  for (int i = 0; i < 4; ++i)
    EXPECT_TRUE(got.v[i] == want.v[i], "%s word %d: got %08x want %08x", name, i, got.v[i], want.v[i]);
}

}  // namespace

int main() {
  check_kat({{0u, 0u, 0u, 0u}}, {{0u, 0u}}, {{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}}, "zero");
  check_kat({{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}}, {{0xffffffffu, 0xffffffffu}},
            {{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}}, "all-ones");
  check_kat({{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}}, {{0xa4093822u, 0x299f31d0u}},
            {{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}}, "pi-digits");

  // Layout: key = {seed_lo, seed_hi}, counter = {grp_lo, grp_hi, tensor_idx, step} with grp = elem >> 2.
  const U32x2 key = make_key(0x0123456789abcdefull);
  EXPECT_TRUE(key.v[0] == 0x89abcdefu && key.v[1] == 0x01234567u, "make_key split");
  const U32x4 ctr = make_counter(0x00000005fffffffeull, 7u, 42u);
  EXPECT_TRUE(ctr.v[0] == 0xfffffffeu && ctr.v[1] == 5u && ctr.v[2] == 7u && ctr.v[3] == 42u, "make_counter layout");

  // uniform_open0 covers (0, 1] exactly: the extremes map to 2^-24 and 1.
  EXPECT_TRUE(uniform_open0(0u) == 0x1.0p-24f, "uniform_open0(0) = %a", uniform_open0(0u));
  EXPECT_TRUE(uniform_open0(0xffffffffu) == 1.0f, "uniform_open0(max) = %a", uniform_open0(0xffffffffu));
  EXPECT_TRUE(uniform_open0(0x80000000u) == 0.5f + 0x1.0p-24f, "uniform_open0(mid)");

  // normal() of elements 4·12345 .. +3: the cos and sin normals of words (0, 1), then of words (2, 3), of counter
  // (12345, tensor, step); uniform() is the lane's own word.
  const U32x4 out = philox4x32_10(make_counter(12345u, 3u, 9u), make_key(2024u));
  for (uint32_t lane = 0; lane < 4; ++lane) {
    const uint32_t pair = lane & 2u;
    const float want = box_muller(uniform_open0(out.v[pair]), uniform_open0(out.v[pair + 1]), (lane & 1u) != 0);
    const uint64_t elem = 4u * 12345u + lane;
    EXPECT_TRUE(normal(2024u, elem, 3u, 9u) == want, "normal() lane %u must use its word pair of counter elem>>2",
                lane);
    EXPECT_TRUE(uniform(2024u, elem, 3u, 9u) == uniform_open0(out.v[lane]), "uniform() lane %u", lane);
    // the portable polynomial normal is the same normal to ~1e-6
    const float poly = normal_poly(2024u, elem, 3u, 9u);
    EXPECT_TRUE(std::fabs(poly - want) <= 2e-6f * std::fmax(1.0f, std::fabs(want)), "normal_poly lane %u: %g vs %g",
                lane, poly, want);
  }

  // Moments of 2^20 normals: mean 0 ± 5σ/sqrt(n), variance 1 ± 1%; all finite (u1 > 0 keeps log finite).
  const int n = 1 << 20;
  double s1 = 0.0, s2 = 0.0;
  bool finite = true;
  for (int e = 0; e < n; ++e) {
    const float z = normal(7u, static_cast<uint64_t>(e), 1u, 1u);
    finite = finite && std::isfinite(z);
    s1 += z;
    s2 += static_cast<double>(z) * z;
  }
  const double mean = s1 / n, var = s2 / n - mean * mean;
  EXPECT_TRUE(finite, "non-finite normal");
  EXPECT_TRUE(std::fabs(mean) < 5.0 / std::sqrt(static_cast<double>(n)), "mean %g", mean);
  EXPECT_TRUE(std::fabs(var - 1.0) < 0.01, "variance %g", var);
  return pnekern_test::finish("test_philox");
}
