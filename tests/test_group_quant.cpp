// XQuant group quantizer: the bit stream against a bit-by-bit reference and
// hand-computed bytes, the error bound |x - x̂| <= scale/2 on adversarial
// groups (checked exactly, plus: the chosen code is the nearest grid point and
// the scale is not inflated), rejection of unstorable values, the per-channel
// layout against the per-token one on transposed data, and the AVX2
// dequantizers against the scalar ones bit for bit.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/group_quant.h"
#include "kernels/cpu/quant.h"
#include "kernels/error.h"
#include "kernels/group_quant.h"

namespace xq::cpu {
namespace {

// Independent of the implementation: sets stream bit i*bits + k to bit k of
// code i, one bit at a time.
std::vector<uint8_t> reference_pack(const std::vector<uint8_t>& codes, int bits) {
  std::vector<uint8_t> out((codes.size() * bits + 7) / 8, 0);
  for (size_t i = 0; i < codes.size(); ++i) {
    for (int k = 0; k < bits; ++k) {
      const size_t bit = i * bits + k;
      if ((codes[i] >> k) & 1) out[bit / 8] |= static_cast<uint8_t>(1u << (bit % 8));
    }
  }
  return out;
}

std::vector<uint8_t> random_codes(size_t n, int bits, std::mt19937& rng) {
  std::uniform_int_distribution<int> code(0, (1 << bits) - 1);
  std::vector<uint8_t> codes(n);
  for (auto& c : codes) c = static_cast<uint8_t>(code(rng));
  return codes;
}

constexpr float kLargestFp16 = 65504.0f;

// Spacing of fp16 values at magnitude |v|, from the format's definition.
double fp16_ulp(double v) {
  v = std::fabs(v);
  if (v < 0x1p-14) return 0x1p-24;
  return std::ldexp(1.0, std::ilogb(v) - 10);
}

TEST(GroupQuant, PackedSizeIsExactlyBitsTimesCount) {
  for (int bits = 1; bits <= 8; ++bits) {
    for (int64_t n : {0, 1, 2, 3, 7, 8, 9, 127, 128, 129, 1000, 4097}) {
      EXPECT_EQ(packed_bytes(bits, n), static_cast<size_t>((bits * n + 7) / 8))
          << bits << " bits, " << n << " values";
    }
  }
  // 3 bits really is 3 bits: values straddle bytes, no padding per byte.
  EXPECT_EQ(packed_bytes(3, 128), 48u);
  EXPECT_EQ(packed_bytes(3, 3), 2u);
  EXPECT_THROW(packed_bytes(0, 8), std::invalid_argument);
  EXPECT_THROW(packed_bytes(9, 8), std::invalid_argument);
}

TEST(GroupQuant, PackMatchesHandComputedBytes) {
  // LSB first: code i at bits [i*B, i*B + B).
  const std::vector<uint8_t> eight = {0, 1, 2, 3, 4, 5, 6, 7};
  std::vector<uint8_t> out(3);
  pack_codes(eight.data(), 8, 3, out.data());
  EXPECT_EQ(out, (std::vector<uint8_t>{0x88, 0xc6, 0xfa}));

  const std::vector<uint8_t> three = {5, 3, 6};  // 9 bits: the last one alone in byte 1
  out.assign(2, 0xff);
  pack_codes(three.data(), 3, 3, out.data());
  EXPECT_EQ(out, (std::vector<uint8_t>{0x9d, 0x01}));

  const std::vector<uint8_t> nibbles = {0x1, 0x2, 0xf};
  out.assign(2, 0xff);
  pack_codes(nibbles.data(), 3, 4, out.data());
  EXPECT_EQ(out, (std::vector<uint8_t>{0x21, 0x0f}));

  const std::vector<uint8_t> pairs = {1, 2, 3, 0, 3};
  out.assign(2, 0xff);
  pack_codes(pairs.data(), 5, 2, out.data());
  EXPECT_EQ(out, (std::vector<uint8_t>{0x39, 0x03}));
}

TEST(GroupQuant, PackUnpackRoundTripsEveryWidth) {
  std::mt19937 rng(1234);
  for (int bits = 1; bits <= 8; ++bits) {
    for (size_t n : {1, 3, 5, 7, 8, 9, 15, 17, 33, 127, 129, 1001, 4099}) {
      SCOPED_TRACE(std::to_string(bits) + " bits, " + std::to_string(n) + " codes");
      const std::vector<uint8_t> codes = random_codes(n, bits, rng);
      const size_t bytes = packed_bytes(bits, static_cast<int64_t>(n));
      // Sentinels after the stream catch writes past packed_bytes.
      std::vector<uint8_t> packed(bytes + 16, 0xa5);
      pack_codes(codes.data(), static_cast<int64_t>(n), bits, packed.data());
      const std::vector<uint8_t> expected = reference_pack(codes, bits);
      ASSERT_TRUE(std::equal(expected.begin(), expected.end(), packed.begin()));
      for (size_t i = bytes; i < packed.size(); ++i) ASSERT_EQ(packed[i], 0xa5) << "byte " << i;

      std::vector<uint8_t> unpacked(n + 8, 0xee);
      unpack_codes(packed.data(), static_cast<int64_t>(n), bits, unpacked.data());
      ASSERT_TRUE(std::equal(codes.begin(), codes.end(), unpacked.begin()));
      for (size_t i = n; i < unpacked.size(); ++i) ASSERT_EQ(unpacked[i], 0xee);
    }
  }
}

TEST(GroupQuant, PackIgnoresBitsAboveTheWidth) {
  std::mt19937 rng(5);
  for (int bits = 1; bits <= 7; ++bits) {
    std::vector<uint8_t> codes = random_codes(37, bits, rng);
    std::vector<uint8_t> dirty = codes;
    for (auto& c : dirty) c = static_cast<uint8_t>(c | (0xff << bits));
    std::vector<uint8_t> a(packed_bytes(bits, 37)), b(a.size());
    pack_codes(codes.data(), 37, bits, a.data());
    pack_codes(dirty.data(), 37, bits, b.data());
    EXPECT_EQ(a, b) << bits << " bits";
  }
}

// Everything the quantizer produced for x, plus the codes unpacked.
struct Quantized {
  std::vector<uint8_t> packed;
  std::vector<GroupParams> params;
  std::vector<uint8_t> codes;
  std::vector<float> decoded;
};

Quantized quantize(const std::vector<float>& x, int64_t group_size, int bits) {
  const auto n = static_cast<int64_t>(x.size());
  Quantized q;
  q.packed.assign(packed_bytes(bits, n), 0);
  q.params.assign(static_cast<size_t>(n / group_size), GroupParams{0, 0});
  quantize_groups(x.data(), n, group_size, bits, q.packed.data(), q.params.data());
  q.codes.resize(x.size());
  unpack_codes(q.packed.data(), n, bits, q.codes.data());
  q.decoded.resize(x.size());
  dequantize_groups(q.packed.data(), q.params.data(), n, group_size, bits, q.decoded.data());
  return q;
}

// Checks, for every group of x, with s and z the stored fp16 scale and zero:
//  * decoding is exact: x̂ == code * s + z (evaluated in double, where it is
//    exact: both are fp16, the code has 8 bits);
//  * the bound x̂ - s/2 <= x <= x̂ + s/2, exactly (the ends are sums of fp16
//    multiples of 2^-25 below 2^18, exact in double). This is the whole bound:
//    the zero point is rounded down to fp16 and the scale chosen after it, so
//    the zero's fp16 rounding is absorbed by the scale and adds no term here;
//  * the code is the nearest grid point (no other code is strictly closer);
//  * that absorption stays small: s exceeds the nominal (max - min) / (2^B-1)
//    by at most the zero's rounding step (one fp16 ulp of |min|, or the grid
//    unit 2^-20 * max|x|) spread over the levels, plus two rounding steps of
//    s itself. A quantizer that met the bound by inflating the scale fails.
void expect_group_bound(const std::vector<float>& x, int64_t group_size, int bits,
                        const std::string& label) {
  SCOPED_TRACE(label + ", " + std::to_string(bits) + " bits");
  const Quantized q = quantize(x, group_size, bits);
  const int levels = (1 << bits) - 1;
  for (size_t g = 0; g < q.params.size(); ++g) {
    const double s = fp16_to_fp32(q.params[g].scale_fp16);
    const double z = fp16_to_fp32(q.params[g].zero_fp16);
    const auto begin = x.begin() + static_cast<int64_t>(g) * group_size;
    const double min = *std::min_element(begin, begin + group_size);
    const double max = *std::max_element(begin, begin + group_size);
    ASSERT_GE(s, 0.0) << "group " << g;
    // The grid covers the group, so no value is clamped (except the 1-bit
    // grid for spans beyond 65504, which cannot).
    if (!(bits == 1 && max - min > 65504)) {
      EXPECT_TRUE(z <= min && z + levels * s >= max)
          << "group " << g << " [" << min << ", " << max << "] not covered by zero " << z
          << ", scale " << s;
    }
    const double largest = std::max(std::fabs(min), std::fabs(max));
    const double unit = std::max(largest * 0x1p-20, 0x1p-24);
    const double allowed_scale = (max - min + std::max(fp16_ulp(min), unit)) / levels;
    const double scale_step = std::max(fp16_ulp(allowed_scale), unit);
    EXPECT_LE(s, allowed_scale + 2 * scale_step)
        << "group " << g << " [" << min << ", " << max << "]: scale inflated";
    for (int64_t k = 0; k < group_size; ++k) {
      const size_t i = static_cast<size_t>(g * group_size + k);
      const double value = x[i], decoded = q.decoded[i];
      const int code = q.codes[i];
      ASSERT_LE(code, levels);
      ASSERT_EQ(decoded, code * s + z) << "index " << i << ": decoding is not exact";
      ASSERT_TRUE(decoded - s / 2 <= value && value <= decoded + s / 2)
          << "index " << i << ": x = " << value << ", x̂ = " << decoded << ", scale = " << s
          << ", zero = " << z << ", code " << code;
      const double error = std::fabs(value - decoded);
      for (int other = 0; other <= levels; ++other) {
        ASSERT_GE(std::fabs(value - (other * s + z)), error)
            << "index " << i << ": code " << other << " is closer than " << code;
      }
    }
  }
}

std::vector<float> normal_values(size_t n, float mean, float sigma, std::mt19937& rng) {
  std::normal_distribution<float> dist(mean, sigma);
  std::vector<float> x(n);
  for (auto& v : x) v = dist(rng);
  return x;
}

TEST(GroupQuant, BoundHoldsOnRandomGroups) {
  std::mt19937 rng(42);
  for (int bits = 1; bits <= 8; ++bits) {
    for (float sigma : {1e-4f, 1.0f, 37.0f, 3000.0f}) {
      std::vector<float> x = normal_values(128 * 16, sigma * 0.3f, sigma, rng);
      for (auto& v : x) v = std::clamp(v, -kLargestFp16 / 2, kLargestFp16 / 2);
      expect_group_bound(x, 128, bits, "normal sigma " + std::to_string(sigma));
    }
    // Odd group sizes go through the scalar paths.
    expect_group_bound(normal_values(13 * 7, 0, 2, rng), 13, bits, "group of 13");
    expect_group_bound(normal_values(1 * 5, 0, 2, rng), 1, bits, "group of 1");
  }
}

TEST(GroupQuant, AllEqualGroupsDecodeToMinOrBetterThanHalfAnFp16Ulp) {
  const float representable[] = {0.0f, 1.5f, -3.25f, 65504.0f, -65504.0f, 0x1p-24f, -0x1p-20f};
  const float not_representable[] = {1.0001f, -3.14159f, 1e-8f, -1e-8f, 60000.3f, 0.1f, 2047.7f};
  for (int bits = 1; bits <= 8; ++bits) {
    for (float v : representable) {
      const std::vector<float> x(128, v);
      const Quantized q = quantize(x, 128, bits);
      EXPECT_EQ(fp16_to_fp32(q.params[0].scale_fp16), 0.0f) << v;
      for (size_t i = 0; i < x.size(); ++i) {
        ASSERT_EQ(q.codes[i], 0) << v;
        ASSERT_EQ(q.decoded[i], v) << v << ": an fp16 min must come back exactly";
      }
    }
    for (float v : not_representable) {
      const std::vector<float> x(128, v);
      expect_group_bound(x, 128, bits, "all equal " + std::to_string(v));
      const Quantized q = quantize(x, 128, bits);
      // The documented bound for this case: no worse than storing v as the
      // nearest fp16 would be in the worst case (half an ulp of |v|).
      for (size_t i = 0; i < x.size(); ++i) {
        ASSERT_LE(std::fabs(static_cast<double>(q.decoded[i]) - v), fp16_ulp(v) / 2) << v;
      }
    }
  }
}

TEST(GroupQuant, BoundHoldsWithOneHugeOutlier) {
  std::mt19937 rng(7);
  for (int bits = 1; bits <= 8; ++bits) {
    for (float outlier : {60000.0f, -65504.0f, 65504.0f, 1000.5f}) {
      std::vector<float> x = normal_values(128, 0, 1, rng);
      x[37] = outlier;
      expect_group_bound(x, 128, bits, "outlier " + std::to_string(outlier));
    }
  }
}

TEST(GroupQuant, BoundHoldsOnDenormalsAndTinyValues) {
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> unit(-1, 1);
  for (int bits = 1; bits <= 8; ++bits) {
    std::vector<float> fp32_denormals(128), fp16_denormals(128), mixed(128);
    for (size_t i = 0; i < 128; ++i) {
      fp32_denormals[i] = unit(rng) * 1e-39f;  // below FLT_MIN
      fp16_denormals[i] = unit(rng) * 3e-5f;   // below fp16's 2^-14
      mixed[i] = i % 3 == 0 ? 0.0f : (i % 3 == 1 ? 1e-41f : -2e-7f);
    }
    expect_group_bound(fp32_denormals, 128, bits, "fp32 denormals");
    expect_group_bound(fp16_denormals, 128, bits, "fp16 denormals");
    expect_group_bound(mixed, 128, bits, "zeros and denormals");
    expect_group_bound(std::vector<float>(128, 1e-40f), 128, bits, "all one denormal");
    expect_group_bound(std::vector<float>(128, -0x1p-25f), 128, bits, "all -2^-25");
    // max - zero rounds down in fp32 (the tiny max is lost next to 1), so the
    // first scale falls short of max and has to be stepped up.
    std::vector<float> lost_in_rounding(128, -1.0f);
    lost_in_rounding[5] = 1.5f * 0x1p-30f;
    expect_group_bound(lost_in_rounding, 128, bits, "max lost in rounding");
  }
}

TEST(GroupQuant, BoundHoldsOnTinyRangesNegativeGroupsAndMixedMagnitudes) {
  std::mt19937 rng(99);
  std::uniform_int_distribution<int> steps(0, 40);
  std::uniform_real_distribution<float> exponent(-20, 15.9f);
  std::bernoulli_distribution negative(0.5);
  for (int bits = 1; bits <= 8; ++bits) {
    // A few fp32 ulps wide, far from zero: range far below fp16's resolution.
    std::vector<float> tiny_range(256);
    for (size_t i = 0; i < tiny_range.size(); ++i) {
      float base = i < 128 ? 1000.0f : -1.0f;
      for (int k = steps(rng); k > 0; --k) base = std::nextafter(base, 1e9f);
      tiny_range[i] = base;
    }
    expect_group_bound(tiny_range, 128, bits, "tiny ranges");

    std::vector<float> negative_only = normal_values(256, -40, 5, rng);
    for (auto& v : negative_only) v = -std::fabs(v) - 1;
    for (size_t i = 128; i < 256; ++i) negative_only[i] = -65504.0f + static_cast<float>(i);
    expect_group_bound(negative_only, 128, bits, "negative only");

    std::vector<float> mixed(128 * 8);
    for (auto& v : mixed) {
      v = std::min(std::exp2(exponent(rng)), kLargestFp16) * (negative(rng) ? -1.0f : 1.0f);
    }
    expect_group_bound(mixed, 128, bits, "mixed magnitudes");
  }
  // The widest span there is.
  std::vector<float> full_range(128, 0.0f);
  full_range[0] = -kLargestFp16;
  full_range[1] = kLargestFp16;
  for (int bits = 1; bits <= 8; ++bits) expect_group_bound(full_range, 128, bits, "full range");
}

// The CPU quantizers (vector code and scalar tails) give exactly the codes of
// the shared per-element encoder the GPU runs, ties included: a value on a
// midpoint goes to the upper code, its float neighbours to the nearer one.
// The scale 3 makes estimates of (x - zero) / scale inexact, so the encoders'
// corrections in both directions are needed.
TEST(GroupQuant, CodesMatchTheSharedEncoderIncludingTies) {
  std::mt19937 rng(21);
  for (int bits = 1; bits <= 8; ++bits) {
    const int levels = (1 << bits) - 1;
    // Group of 8 * 16 + 3 values (vector chunks and a scalar tail) on the grid
    // zero 0, scale 3: min 0, max 3 * levels, midpoints 3c + 1.5 and their
    // neighbours. expected[i] is the nearest code.
    const int64_t group = 131;
    std::vector<float> x(static_cast<size_t>(group * 2));
    std::vector<int> expected(static_cast<size_t>(group));
    std::uniform_int_distribution<int> midpoint(0, levels - 1);
    for (int64_t i = 0; i < group; ++i) {
      const int below = midpoint(rng);
      const float mid = 3.0f * static_cast<float>(below) + 1.5f;
      // On the midpoint, the float below it, the float above it.
      const float candidates[3] = {mid, std::nextafter(mid, -1.0f), std::nextafter(mid, 1e9f)};
      x[i] = candidates[i % 3];
      expected[i] = i % 3 == 1 ? below : below + 1;
    }
    x[7] = 0.0f;
    expected[7] = 0;
    x[100] = 3.0f * static_cast<float>(levels);
    expected[100] = levels;
    std::normal_distribution<float> dist(0, 3);
    for (int64_t i = group; i < 2 * group; ++i) x[i] = dist(rng);
    const Quantized q = quantize(x, group, bits);
    ASSERT_EQ(fp16_to_fp32(q.params[0].scale_fp16), 3.0f);
    ASSERT_EQ(fp16_to_fp32(q.params[0].zero_fp16), 0.0f);
    for (size_t i = 0; i < x.size(); ++i) {
      const GroupGrid grid{fp16_to_fp32(q.params[i / group].scale_fp16),
                           fp16_to_fp32(q.params[i / group].zero_fp16)};
      ASSERT_EQ(q.codes[i], group_encode(x[i], grid, bits)) << bits << " bits, index " << i;
      if (static_cast<int64_t>(i) < group) {
        ASSERT_EQ(q.codes[i], expected[i]) << bits << " bits, x = " << x[i];
      }
    }
    // The same through the per-channel quantizer: one column of 131 rows next
    // to columns of random data, 11 columns (vector chunk plus scalar tail).
    const int64_t cols = 11;
    std::vector<float> block(static_cast<size_t>(group * cols));
    for (int64_t r = 0; r < group; ++r) {
      for (int64_t c = 0; c < cols; ++c) block[r * cols + c] = c == 9 ? x[r] : dist(rng);
    }
    std::vector<uint8_t> packed(packed_bytes(bits, group * cols)), codes(block.size());
    std::vector<GroupParams> params(cols);
    quantize_strided(block.data(), group, cols, cols, bits, packed.data(), params.data());
    unpack_codes(packed.data(), group * cols, bits, codes.data());
    for (int64_t r = 0; r < group; ++r) {
      for (int64_t c = 0; c < cols; ++c) {
        const GroupGrid grid{fp16_to_fp32(params[c].scale_fp16), fp16_to_fp32(params[c].zero_fp16)};
        ASSERT_EQ(codes[r * cols + c], group_encode(block[r * cols + c], grid, bits))
            << bits << " bits, row " << r << ", column " << c;
      }
    }
  }
}

// x - zero can round up onto a midpoint: zero -1000, scale 8, x just below
// the midpoint 4 = -1000 + 125.5 * 8. x - zero = 1004 - 2^-22 rounds to 1004,
// the estimate is 125.5 -> 126, and only the exact comparison finds 125.
TEST(GroupQuant, EstimateRoundedOntoAMidpointIsCorrected) {
  std::vector<float> x(16, 0.0f);
  x[0] = -1000.0f;
  x[1] = 1040.0f;  // -1000 + 255 * 8
  const int odd_codes[] = {123, 125, 127};
  for (int k = 0; k < 3; ++k) {
    const float mid = -1000.0f + (static_cast<float>(odd_codes[k]) + 0.5f) * 8.0f;
    x[2 + k] = std::nextafter(mid, -1e9f);
    x[8 + k] = mid;
  }
  const Quantized q = quantize(x, 16, 8);
  ASSERT_EQ(fp16_to_fp32(q.params[0].scale_fp16), 8.0f);
  ASSERT_EQ(fp16_to_fp32(q.params[0].zero_fp16), -1000.0f);
  const GroupGrid grid{8.0f, -1000.0f};
  for (int k = 0; k < 3; ++k) {
    EXPECT_EQ(q.codes[2 + k], odd_codes[k]) << "just below midpoint " << k;
    EXPECT_EQ(q.codes[8 + k], odd_codes[k] + 1) << "on midpoint " << k;
    EXPECT_EQ(group_encode(x[2 + k], grid, 8), odd_codes[k]) << "shared encoder, " << k;
  }
}

TEST(GroupQuant, OneBitGroupWiderThanAnFp16StepStillMeetsTheBound) {
  // A 1-bit step over a span beyond 65504 is not an fp16 value; the quantizer
  // falls back to the grid {-32752, 32752} with step 65504.
  std::vector<float> x(128, 0.0f);
  x[0] = -40000.0f;
  x[1] = 40000.0f;
  expect_group_bound(x, 128, 1, "1-bit span 80000");
  const Quantized q = quantize(x, 128, 1);
  EXPECT_EQ(fp16_to_fp32(q.params[0].scale_fp16), 65504.0f);
  EXPECT_EQ(fp16_to_fp32(q.params[0].zero_fp16), -32752.0f);
  x[0] = -30000.0f;
  x[1] = 30000.0f;  // span 60000: the ordinary grid
  expect_group_bound(x, 128, 1, "1-bit span 60000");
  EXPECT_EQ(fp16_to_fp32(quantize(x, 128, 1).params[0].zero_fp16), -30000.0f);
}

// Expects quantize_groups to throw xq::Error whose message contains `needle`,
// without having written params.
void expect_rejected(std::vector<float> x, const std::string& needle) {
  std::vector<uint8_t> packed(packed_bytes(4, static_cast<int64_t>(x.size())), 0x5a);
  std::vector<GroupParams> params(x.size() / 32, GroupParams{0x1234, 0x5678});
  try {
    quantize_groups(x.data(), static_cast<int64_t>(x.size()), 32, 4, packed.data(), params.data());
    ADD_FAILURE() << "no error for " << needle;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
  for (const auto& p : params) EXPECT_TRUE(p.scale_fp16 == 0x1234 && p.zero_fp16 == 0x5678);
  for (uint8_t b : packed) EXPECT_EQ(b, 0x5a);
}

TEST(GroupQuant, NanInfAndOutOfRangeValuesAreRejectedNamingTheIndex) {
  std::vector<float> x(96, 0.5f);
  x[70] = std::nanf("");
  expect_rejected(x, "index 70 is NaN");
  x[70] = 0.5f;
  x[3] = INFINITY;
  expect_rejected(x, "index 3 is +infinity");
  x[3] = 0.5f;
  x[95] = -INFINITY;
  expect_rejected(x, "index 95 is -infinity");
  x[95] = 0.5f;
  x[40] = std::nextafter(kLargestFp16, INFINITY);  // just beyond the largest fp16
  expect_rejected(x, "index 40");
  x[40] = -65536.0f;
  expect_rejected(x, "beyond the fp16 range");

  // Strided: row and column.
  std::vector<float> block(8 * 10, 1.0f);
  block[3 * 10 + 5] = NAN;
  std::vector<uint8_t> packed(packed_bytes(2, 80));
  std::vector<GroupParams> params(10);
  try {
    quantize_strided(block.data(), 8, 10, 10, 2, packed.data(), params.data());
    ADD_FAILURE() << "no error for a NaN in a strided block";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("row 3, column 5 is NaN"), std::string::npos) << e.what();
  }
}

// The per-channel quantizer is the per-token one on the transposed block:
// same params per column, same codes, same decoded values. Also checks that
// dequantize writes only cols values per row of a strided output.
void expect_strided_matches_transposed(int64_t rows, int64_t cols, int bits, std::mt19937& rng) {
  SCOPED_TRACE(std::to_string(rows) + " x " + std::to_string(cols) + ", " + std::to_string(bits) +
               " bits");
  const int64_t row_stride = cols + 3;
  std::vector<float> block(static_cast<size_t>(rows * row_stride), NAN);  // padding: NaN
  std::normal_distribution<float> dist(0, 1);
  std::vector<float> transposed(static_cast<size_t>(rows * cols));
  for (int64_t c = 0; c < cols; ++c) {
    const float channel_scale = std::exp2(static_cast<float>(c % 9) - 4);  // per-channel spread
    for (int64_t r = 0; r < rows; ++r) {
      float v = dist(rng) * channel_scale + (c == 0 ? 20.0f : 0.0f);
      if (c == 3) v = 1.5f;  // constant channels: scale 0, and a tiny scale
      if (c == 5) v = 0.1f;
      block[r * row_stride + c] = v;
      transposed[c * rows + r] = v;
    }
  }
  std::vector<uint8_t> strided_packed(packed_bytes(bits, rows * cols));
  std::vector<GroupParams> strided_params(cols);
  quantize_strided(block.data(), rows, cols, row_stride, bits, strided_packed.data(),
                   strided_params.data());
  const Quantized contiguous = quantize(transposed, rows, bits);

  std::vector<uint8_t> strided_codes(static_cast<size_t>(rows * cols));
  unpack_codes(strided_packed.data(), rows * cols, bits, strided_codes.data());
  const int64_t out_stride = cols + 5;
  std::vector<float> out(static_cast<size_t>(rows * out_stride), -7.0f);
  dequantize_strided(strided_packed.data(), strided_params.data(), rows, cols, bits, out.data(),
                     out_stride);
  for (int64_t c = 0; c < cols; ++c) {
    ASSERT_EQ(strided_params[c].scale_fp16, contiguous.params[c].scale_fp16) << "column " << c;
    ASSERT_EQ(strided_params[c].zero_fp16, contiguous.params[c].zero_fp16) << "column " << c;
    for (int64_t r = 0; r < rows; ++r) {
      ASSERT_EQ(strided_codes[r * cols + c], contiguous.codes[c * rows + r]) << r << ", " << c;
      ASSERT_EQ(out[r * out_stride + c], contiguous.decoded[c * rows + r]) << r << ", " << c;
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = cols; c < out_stride; ++c) ASSERT_EQ(out[r * out_stride + c], -7.0f);
  }
}

TEST(GroupQuant, StridedEqualsContiguousOnTransposedData) {
  std::mt19937 rng(2024);
  for (int bits = 1; bits <= 8; ++bits) {
    expect_strided_matches_transposed(128, 64, bits, rng);
    expect_strided_matches_transposed(128, 264, bits, rng);  // two column blocks
    expect_strided_matches_transposed(13, 12, bits, rng);    // scalar path, rows straddle bytes
    expect_strided_matches_transposed(1, 7, bits, rng);
  }
}

TEST(GroupQuant, StridedRowRangeEqualsTheSameRowsOfTheWholeBlock) {
  std::mt19937 rng(3);
  for (int bits = 1; bits <= 8; ++bits) {
    for (int64_t cols : {64, 20}) {
      const int64_t rows = 128;
      const std::vector<float> block = normal_values(static_cast<size_t>(rows * cols), 0, 1, rng);
      std::vector<uint8_t> packed(packed_bytes(bits, rows * cols));
      std::vector<GroupParams> params(cols);
      quantize_strided(block.data(), rows, cols, cols, bits, packed.data(), params.data());
      std::vector<float> whole(static_cast<size_t>(rows * cols)), tile(5 * cols);
      dequantize_strided(packed.data(), params.data(), rows, cols, bits, whole.data(), cols);
      dequantize_strided_rows(packed.data(), params.data(), cols, bits, 37, 5, tile.data(), cols);
      ASSERT_TRUE(std::equal(tile.begin(), tile.end(), whole.begin() + 37 * cols))
          << bits << " bits, " << cols << " columns";
    }
  }
}

TEST(GroupQuant, WholeGroupRangesDequantizeOnTheirOwn) {
  std::mt19937 rng(8);
  for (int bits = 1; bits <= 8; ++bits) {
    const std::vector<float> x = normal_values(128 * 10, 0, 1, rng);
    const Quantized q = quantize(x, 128, bits);
    std::vector<float> part(128 * 3);
    dequantize_groups(q.packed.data() + packed_bytes(bits, 128 * 4), q.params.data() + 4, 128 * 3,
                      128, bits, part.data());
    ASSERT_TRUE(std::equal(part.begin(), part.end(), q.decoded.begin() + 128 * 4)) << bits;
  }
}

TEST(GroupQuant, VectorAndScalarDequantizeAgreeBitForBit) {
  std::mt19937 rng(77);
  for (int bits = 1; bits <= 8; ++bits) {
    for (int64_t group_size : {128, 64, 8, 24, 13}) {
      SCOPED_TRACE(std::to_string(bits) + " bits, group " + std::to_string(group_size));
      const int64_t n = group_size * 9;
      std::vector<float> x = normal_values(static_cast<size_t>(n), 0.5f, 3, rng);
      x[5] = 900.0f;  // an outlier group
      const Quantized q = quantize(x, group_size, bits);
      std::vector<float> fast(static_cast<size_t>(n)), scalar(static_cast<size_t>(n));
      dequantize_groups(q.packed.data(), q.params.data(), n, group_size, bits, fast.data());
      portable::dequantize_groups(q.packed.data(), q.params.data(), n, group_size, bits,
                                  scalar.data());
      ASSERT_EQ(std::memcmp(fast.data(), scalar.data(), fast.size() * sizeof(float)), 0);
    }
    for (int64_t cols : {8, 64, 264, 1024}) {
      SCOPED_TRACE(std::to_string(bits) + " bits, " + std::to_string(cols) + " columns");
      const int64_t rows = 32;
      const std::vector<float> block = normal_values(static_cast<size_t>(rows * cols), 0, 2, rng);
      std::vector<uint8_t> packed(packed_bytes(bits, rows * cols));
      std::vector<GroupParams> params(cols);
      quantize_strided(block.data(), rows, cols, cols, bits, packed.data(), params.data());
      for (int64_t first_row : {0, 31, 7}) {
        const int64_t count = first_row == 7 ? 9 : rows - first_row;
        std::vector<float> fast(static_cast<size_t>(count * cols));
        std::vector<float> scalar(fast.size());
        dequantize_strided_rows(packed.data(), params.data(), cols, bits, first_row, count,
                                fast.data(), cols);
        portable::dequantize_strided_rows(packed.data(), params.data(), cols, bits, first_row,
                                          count, scalar.data(), cols);
        ASSERT_EQ(std::memcmp(fast.data(), scalar.data(), fast.size() * sizeof(float)), 0)
            << "rows from " << first_row;
      }
    }
  }
}

TEST(GroupQuant, BadArgumentsAreRejected) {
  std::vector<float> x(100, 1.0f);
  std::vector<uint8_t> packed(200);
  std::vector<GroupParams> params(10);
  EXPECT_THROW(quantize_groups(x.data(), 100, 32, 4, packed.data(), params.data()),
               std::invalid_argument);
  EXPECT_THROW(quantize_groups(x.data(), 96, 32, 0, packed.data(), params.data()),
               std::invalid_argument);
  EXPECT_THROW(quantize_groups(x.data(), 96, 32, 9, packed.data(), params.data()),
               std::invalid_argument);
  std::vector<float> out(100);
  EXPECT_THROW(dequantize_groups(packed.data(), params.data(), 100, 32, 4, out.data()),
               std::invalid_argument);
  EXPECT_THROW(pack_codes(packed.data(), 8, 0, packed.data() + 100), std::invalid_argument);
}

}  // namespace
}  // namespace xq::cpu
