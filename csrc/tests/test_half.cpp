// Exhaustive checks of the branch-free fp16/bf16 converters in pnekern/half.h against straightforward (slow,
// branchy) decoders written from the IEEE formats, and round-to-nearest-even checks at every rounding midpoint.
#include "pnekern/half.h"

#include <cmath>
#include <cstring>

#include "test_util.h"

using namespace pnekern;

namespace {

// IEEE binary16 decoded by the textbook formula.
double fp16_value(uint16_t h) {
  const int sign = h >> 15, e = (h >> 10) & 0x1f, m = h & 0x3ff;
  double v;
  if (e == 0) v = std::ldexp(static_cast<double>(m), -24);
  else if (e == 31) v = m ? NAN : INFINITY;
  else v = std::ldexp(1.0 + m / 1024.0, e - 15);
  return sign ? -v : v;
}

bool same_float(float a, double b) {
  if (std::isnan(b)) return std::isnan(a);
  return static_cast<double>(a) == b && std::signbit(a) == std::signbit(b);
}

}  // namespace

int main() {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = fp16_to_float(fp16_t{static_cast<uint16_t>(h)});
    EXPECT_TRUE(same_float(f, fp16_value(static_cast<uint16_t>(h))), "fp16_to_float(%04x) = %a", h, f);
    // Every finite/inf fp16 round-trips exactly; NaN stays NaN.
    const uint16_t back = float_to_fp16(f).bits;
    if (std::isnan(f)) EXPECT_TRUE((back & 0x7c00u) == 0x7c00u && (back & 0x3ffu) != 0, "NaN round trip %04x", h);
    else EXPECT_TRUE(back == h, "fp16 round trip %04x -> %04x", h, back);

    const float b = bf16_to_float(bf16_t{static_cast<uint16_t>(h)});
    uint32_t bits;
    std::memcpy(&bits, &b, 4);
    EXPECT_TRUE(bits == h << 16, "bf16_to_float(%04x)", h);
    const uint16_t bback = float_to_bf16(b).bits;
    if (std::isnan(b)) EXPECT_TRUE(std::isnan(bf16_to_float(bf16_t{bback})), "bf16 NaN round trip %04x", h);
    else EXPECT_TRUE(bback == h, "bf16 round trip %04x -> %04x", h, bback);
  }

  // Midpoints between consecutive finite fp16 values round to the even neighbour; just above goes up.
  for (uint32_t h = 0; h < 0x7bff; ++h) {
    const double lo = fp16_value(static_cast<uint16_t>(h)), hi = fp16_value(static_cast<uint16_t>(h + 1));
    const float mid = static_cast<float>((lo + hi) / 2);  // exact in fp32 (fp16 has 11 significant bits)
    const uint16_t even = (h & 1u) ? static_cast<uint16_t>(h + 1) : static_cast<uint16_t>(h);
    EXPECT_TRUE(float_to_fp16(mid).bits == even, "fp16 tie at %04x: got %04x", h, float_to_fp16(mid).bits);
    EXPECT_TRUE(float_to_fp16(std::nextafter(mid, INFINITY)).bits == h + 1, "fp16 above tie at %04x", h);
    EXPECT_TRUE(float_to_fp16(-mid).bits == (even | 0x8000u), "fp16 negative tie at %04x", h);
  }
  // Overflow: values that round past the largest fp16 (65504) become inf; 65519.99 still rounds down.
  EXPECT_TRUE(float_to_fp16(65520.0f).bits == 0x7c00u, "65520 -> inf");
  EXPECT_TRUE(float_to_fp16(65519.0f).bits == 0x7bffu, "65519 -> 65504");
  EXPECT_TRUE(float_to_fp16(1e30f).bits == 0x7c00u, "1e30 -> inf");
  EXPECT_TRUE(float_to_fp16(1e-30f).bits == 0u, "1e-30 -> +0");

  // bf16 ties to even on the dropped 16 bits, and overflow to inf.
  EXPECT_TRUE(float_to_bf16(bf16_to_float(bf16_t{0x3f80}) + 0x1.0p-8f).bits == 0x3f80u, "bf16 tie to even (down)");
  EXPECT_TRUE(float_to_bf16(bf16_to_float(bf16_t{0x3f81}) + 0x1.0p-8f).bits == 0x3f82u, "bf16 tie to even (up)");
  EXPECT_TRUE(float_to_bf16(3.4028235e38f).bits == 0x7f80u, "bf16 overflow -> inf");
  EXPECT_TRUE(float_to_bf16(NAN).bits != 0x7f80u && std::isnan(bf16_to_float(float_to_bf16(NAN))), "bf16 NaN");
  return pnekern_test::finish("test_half");
}
