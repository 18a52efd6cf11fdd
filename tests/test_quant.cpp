// Quantized formats: conversions against exhaustive references, dequantization
// against element-by-element formulas written here from the GGUF block layouts,
// quantizer error bounds, and the dot products (vector and scalar paths)
// against double-precision sums.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <random>
#include <stdexcept>
#include <vector>

#include "kernels/cpu/quant.h"

namespace xq::cpu {
namespace {

constexpr TensorType kAllTypes[] = {
    TensorType::kF32,  TensorType::kF16,  TensorType::kBF16, TensorType::kQ4_0, TensorType::kQ4_1,
    TensorType::kQ5_0, TensorType::kQ5_1, TensorType::kQ8_0, TensorType::kQ8_1, TensorType::kQ2_K,
    TensorType::kQ3_K, TensorType::kQ4_K, TensorType::kQ5_K, TensorType::kQ6_K, TensorType::kQ8_K,
};

const char* name(TensorType type) {
  return tensor_type_name(type);
}

uint16_t u16_at(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
uint32_t u32_at(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
float f32_at(const uint8_t* p) {
  float v;
  std::memcpy(&v, p, 4);
  return v;
}

// Half -> double from the definition: (-1)^s * 2^(e-15) * 1.m, or 2^-14 * 0.m.
double half_reference(uint16_t h) {
  const int sign = h >> 15, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  double magnitude;
  if (exponent == 0x1f) {
    magnitude = mantissa ? NAN : INFINITY;
  } else if (exponent == 0) {
    magnitude = std::ldexp(mantissa, -24);
  } else {
    magnitude = std::ldexp(1024 + mantissa, exponent - 25);
  }
  return sign ? -magnitude : magnitude;
}

bool same_float(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return std::bit_cast<uint32_t>(a) == std::bit_cast<uint32_t>(b);
}

TEST(Quant, Fp16ToFp32AllValues) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const auto expected = static_cast<float>(half_reference(static_cast<uint16_t>(h)));
    ASSERT_TRUE(same_float(fp16_to_fp32(static_cast<uint16_t>(h)), expected)) << std::hex << h;
    ASSERT_TRUE(same_float(portable::fp16_to_fp32(static_cast<uint16_t>(h)), expected))
        << std::hex << h;
  }
}

TEST(Quant, Fp16RoundTripsEveryFiniteHalf) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const auto half = static_cast<uint16_t>(h);
    if ((half & 0x7c00) == 0x7c00) {  // inf and NaN: class must survive
      const float f = fp16_to_fp32(half);
      EXPECT_EQ(std::isnan(fp16_to_fp32(fp32_to_fp16(f))), std::isnan(f));
      EXPECT_EQ(std::isnan(fp16_to_fp32(portable::fp32_to_fp16(f))), std::isnan(f));
      continue;
    }
    ASSERT_EQ(fp32_to_fp16(fp16_to_fp32(half)), half) << std::hex << h;
    ASSERT_EQ(portable::fp32_to_fp16(fp16_to_fp32(half)), half) << std::hex << h;
  }
}

// The nearest half by search over the ordered positive halves; ties to even.
uint16_t nearest_half_reference(float f) {
  const double magnitude = std::fabs(static_cast<double>(f));
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  if (magnitude >= 65520.0) return sign | 0x7c00;  // halfway to 2^16 and beyond
  uint16_t low = 0, high = 0x7bff;                 // largest half <= magnitude
  while (low < high) {
    const auto mid = static_cast<uint16_t>((low + high + 1) / 2);
    if (half_reference(mid) <= magnitude) {
      low = mid;
    } else {
      high = static_cast<uint16_t>(mid - 1);
    }
  }
  const uint16_t below = low, above = static_cast<uint16_t>(low + 1);
  const double to_below = magnitude - half_reference(below);
  const double to_above = half_reference(above) - magnitude;
  if (to_below < to_above) return sign | below;
  if (to_above < to_below) return sign | above;
  return sign | ((below & 1) ? above : below);
}

TEST(Quant, Fp32ToFp16RoundsToNearestEven) {
  std::vector<float> cases;
  // Every midpoint between neighbouring halves (exact in float): the ties.
  for (uint16_t h = 0; h < 0x7bff; ++h) {
    const double mid = (half_reference(h) + half_reference(static_cast<uint16_t>(h + 1))) / 2;
    cases.push_back(static_cast<float>(mid));
    cases.push_back(-static_cast<float>(mid));
  }
  // Random floats from 2^-30 to 2^17: denormal halves, normals, overflow.
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> exponent(-30, 17);
  for (int i = 0; i < 200000; ++i) {
    const float f = std::exp2(exponent(rng));
    cases.push_back(i % 2 ? f : -f);
  }
  cases.insert(cases.end(), {0.0f, -0.0f, 65504.0f, 65519.99f, 65520.0f, 1e10f, INFINITY, -INFINITY,
                             0x1p-25f, 0x1.000002p-25f, 0x1p-24f, 0x1.8p-24f});
  for (float f : cases) {
    const uint16_t expected = nearest_half_reference(f);
    ASSERT_EQ(fp32_to_fp16(f), expected) << f;
    ASSERT_EQ(portable::fp32_to_fp16(f), expected) << f;
  }
  EXPECT_TRUE(std::isnan(fp16_to_fp32(fp32_to_fp16(NAN))));
  EXPECT_TRUE(std::isnan(fp16_to_fp32(portable::fp32_to_fp16(NAN))));
  // A NaN whose payload is only in the low bits must not become infinity.
  const float low_payload_nan = std::bit_cast<float>(0x7f800001u);
  EXPECT_TRUE(std::isnan(fp16_to_fp32(portable::fp32_to_fp16(low_payload_nan))));
}

TEST(Quant, Bf16Conversions) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = bf16_to_fp32(static_cast<uint16_t>(h));
    EXPECT_EQ(std::bit_cast<uint32_t>(f), h << 16);
    if (!std::isnan(f)) {
      ASSERT_EQ(fp32_to_bf16(f), h);
    }
  }
  // Ties go to even; just above a tie goes up.
  EXPECT_EQ(fp32_to_bf16(std::bit_cast<float>(0x3f808000u)), 0x3f80);
  EXPECT_EQ(fp32_to_bf16(std::bit_cast<float>(0x3f818000u)), 0x3f82);
  EXPECT_EQ(fp32_to_bf16(std::bit_cast<float>(0x3f808001u)), 0x3f81);
  EXPECT_TRUE(std::isnan(bf16_to_fp32(fp32_to_bf16(std::bit_cast<float>(0x7f800001u)))));
}

// ---------------------------------------------------------------------------
// Reference dequantization: element i of one block, from the layout.

struct Layout {
  int64_t elems;
  int64_t bytes;
};

Layout layout(TensorType type) {
  const TensorTypeTraits& t = tensor_type_traits(type);
  return {t.block_elems, t.block_bytes};
}

double h(const uint8_t* b, int offset) {
  return half_reference(u16_at(b + offset));
}

// Q4_K/Q5_K 6-bit scale and min of 32-element group g.
void k_scale_min(const uint8_t* s, int g, int* scale, int* min) {
  if (g < 4) {
    *scale = s[g] & 0x3f;
    *min = s[g + 4] & 0x3f;
  } else {
    *scale = (s[g + 4] & 0xf) | ((s[g - 4] >> 6) << 4);
    *min = (s[g + 4] >> 4) | ((s[g] >> 6) << 4);
  }
}

double reference_value(TensorType type, const uint8_t* b, int i) {
  auto nibble = [&](int qs_offset) {
    return i < 16 ? b[qs_offset + i] & 0xf : b[qs_offset + i - 16] >> 4;
  };
  switch (type) {
    case TensorType::kF32:
      return f32_at(b);
    case TensorType::kF16:
      return h(b, 0);
    case TensorType::kBF16:
      return std::bit_cast<float>(static_cast<uint32_t>(u16_at(b)) << 16);
    case TensorType::kQ4_0:
      return (nibble(2) - 8) * h(b, 0);
    case TensorType::kQ4_1:
      return nibble(4) * h(b, 0) + h(b, 2);
    case TensorType::kQ5_0:
      return ((nibble(6) | static_cast<int>(((u32_at(b + 2) >> i) & 1) << 4)) - 16) * h(b, 0);
    case TensorType::kQ5_1:
      return (nibble(8) | static_cast<int>(((u32_at(b + 4) >> i) & 1) << 4)) * h(b, 0) + h(b, 2);
    case TensorType::kQ8_0:
      return static_cast<int8_t>(b[2 + i]) * h(b, 0);
    case TensorType::kQ8_1:
      return static_cast<int8_t>(b[4 + i]) * h(b, 0);
    case TensorType::kQ2_K: {
      // scales[16] @0, qs[64] @16, d @80, dmin @82.
      const int half = i / 128, group = (i % 128) / 32, l = i % 32;
      const int q = (b[16 + 32 * half + l] >> (2 * group)) & 3;
      const int packed = b[i / 16];
      return h(b, 80) * (packed & 0xf) * q - h(b, 82) * (packed >> 4);
    }
    case TensorType::kQ3_K: {
      // hmask[32] @0, qs[64] @32, scales[12] @96, d @108.
      const int half = i / 128, group = (i % 128) / 32, l = i % 32;
      const int low = (b[32 + 32 * half + l] >> (2 * group)) & 3;
      const int high_bit = (b[l] >> (4 * half + group)) & 1;
      const int k = i / 16;
      const int scale_low = k < 8 ? b[96 + k] & 0xf : b[96 + k - 8] >> 4;
      const int scale_high = (b[96 + 8 + k % 4] >> (2 * (k / 4))) & 3;
      const int scale = (scale_low | (scale_high << 4)) - 32;
      return h(b, 108) * scale * (low - (high_bit ? 0 : 4));
    }
    case TensorType::kQ4_K:
    case TensorType::kQ5_K: {
      // d @0, dmin @2, scales[12] @4, (Q5_K: qh[32] @16), qs[128] after.
      const int group = i / 32, l = i % 32;
      const int qs = type == TensorType::kQ4_K ? 16 : 48;
      int q = (b[qs + 32 * (i / 64) + l] >> (4 * (group % 2))) & 0xf;
      if (type == TensorType::kQ5_K) q |= ((b[16 + l] >> group) & 1) << 4;
      int scale, min;
      k_scale_min(b + 4, group, &scale, &min);
      return h(b, 0) * scale * q - h(b, 2) * min;
    }
    case TensorType::kQ6_K: {
      // ql[128] @0, qh[64] @128, scales[16] (int8) @192, d @208.
      const int half = i / 128, quarter = (i % 128) / 32, l = i % 32;
      const int ql = b[64 * half + l + 32 * (quarter % 2)];
      const int low = quarter < 2 ? ql & 0xf : ql >> 4;
      const int high = (b[128 + 32 * half + l] >> (2 * quarter)) & 3;
      return h(b, 208) * static_cast<int8_t>(b[192 + i / 16]) * ((low | (high << 4)) - 32);
    }
    case TensorType::kQ8_K:
      return f32_at(b) * static_cast<int8_t>(b[4 + i]);
  }
  return NAN;
}

// The size of the terms the formula adds, for rounding tolerances.
double reference_magnitude(TensorType type, const uint8_t* b, int i) {
  switch (type) {
    case TensorType::kQ4_1:
      return std::fabs(15 * h(b, 0)) + std::fabs(h(b, 2));
    case TensorType::kQ5_1:
      return std::fabs(31 * h(b, 0)) + std::fabs(h(b, 2));
    case TensorType::kQ2_K:
      return std::fabs(h(b, 80)) * 45 + std::fabs(h(b, 82)) * 15;
    case TensorType::kQ4_K:
    case TensorType::kQ5_K:
      return (std::fabs(h(b, 0)) * 31 + std::fabs(h(b, 2))) * 63;
    default:
      return std::fabs(reference_value(type, b, i));
  }
}

uint16_t random_finite_half(std::mt19937& rng) {
  uint16_t h;
  do {
    h = static_cast<uint16_t>(rng());
  } while ((h & 0x7c00) == 0x7c00);
  return h;
}

// A half in +-[2^-8, 2^-2]: scales that keep dot products far from overflow.
uint16_t moderate_half(std::mt19937& rng) {
  std::uniform_real_distribution<float> exponent(-8, -2);
  const float value = std::exp2(exponent(rng));
  return fp32_to_fp16(rng() % 2 ? value : -value);
}

// Offsets of the fp16 scale fields of each block type (Q8_K's scale is fp32).
std::vector<int> scale_offsets(TensorType type) {
  switch (type) {
    case TensorType::kQ4_0:
    case TensorType::kQ5_0:
    case TensorType::kQ8_0:
      return {0};
    case TensorType::kQ4_1:
    case TensorType::kQ5_1:
    case TensorType::kQ4_K:
    case TensorType::kQ5_K:
    case TensorType::kQ8_1:
      return {0, 2};
    case TensorType::kQ2_K:
      return {80, 82};
    case TensorType::kQ3_K:
      return {108};
    case TensorType::kQ6_K:
      return {208};
    default:
      return {};
  }
}

// Random blocks: random bytes for the quant bits, then finite scales: any
// finite half when `full_range`, otherwise a moderate one.
std::vector<uint8_t> random_row(TensorType type, int64_t n, std::mt19937& rng, bool full_range) {
  const Layout l = layout(type);
  std::vector<uint8_t> row(static_cast<size_t>(n / l.elems * l.bytes));
  for (auto& byte : row) byte = static_cast<uint8_t>(rng());
  std::normal_distribution<float> normal(0, 1);
  for (int64_t b = 0; b < n / l.elems; ++b) {
    uint8_t* block = row.data() + b * l.bytes;
    auto half = [&] { return full_range ? random_finite_half(rng) : moderate_half(rng); };
    switch (type) {
      case TensorType::kF32: {
        const float v =
            full_range ? std::ldexp(normal(rng), static_cast<int>(rng() % 200) - 100) : normal(rng);
        std::memcpy(block, &v, 4);
        break;
      }
      case TensorType::kF16: {
        const uint16_t v = full_range ? random_finite_half(rng) : fp32_to_fp16(normal(rng));
        std::memcpy(block, &v, 2);
        break;
      }
      case TensorType::kBF16: {
        uint16_t v = full_range ? static_cast<uint16_t>(rng()) : fp32_to_bf16(normal(rng));
        if ((v & 0x7f80) == 0x7f80) v &= 0xbfff;  // keep it finite
        std::memcpy(block, &v, 2);
        break;
      }
      case TensorType::kQ8_K: {
        const float d = full_range ? std::ldexp(normal(rng), static_cast<int>(rng() % 60) - 30)
                                   : std::ldexp(normal(rng), -7);
        std::memcpy(block, &d, 4);
        break;
      }
      default:
        for (int offset : scale_offsets(type)) {
          const uint16_t v = half();
          std::memcpy(block + offset, &v, 2);
        }
    }
  }
  return row;
}

TEST(Quant, DequantizeMatchesBlockFormulas) {
  std::mt19937 rng(1);
  for (TensorType type : kAllTypes) {
    const Layout l = layout(type);
    const int64_t n = l.elems == 1 ? 1000 : 64 * l.elems;
    for (bool full_range : {true, false}) {
      const std::vector<uint8_t> row = random_row(type, n, rng, full_range);
      std::vector<float> out(static_cast<size_t>(n), NAN);
      dequantize_row(type, row.data(), out.data(), n);
      for (int64_t i = 0; i < n; ++i) {
        const uint8_t* block = row.data() + i / l.elems * l.bytes;
        const int in_block = static_cast<int>(i % l.elems);
        const double expected = reference_value(type, block, in_block);
        // The formula's few float operations (fused or not) round at most a few
        // times at the size of its terms.
        const double tolerance = 4 * 0x1p-24 * reference_magnitude(type, block, in_block);
        ASSERT_NEAR(out[i], expected, tolerance)
            << name(type) << " element " << i << (full_range ? " full range" : "");
      }
    }
  }
}

TEST(Quant, DequantizeRejectsPartialBlocks) {
  float out[64];
  uint8_t in[64] = {};
  EXPECT_THROW(dequantize_row(TensorType::kQ4_1, in, out, 33), std::invalid_argument);
  EXPECT_THROW(dequantize_row(static_cast<TensorType>(99), in, out, 32), std::invalid_argument);
  EXPECT_THROW(quantize_row(TensorType::kQ4_K, out, in, 256), std::invalid_argument);
}

// ---------------------------------------------------------------------------
// Quantizers

// Rows that stress the scale choice: signs mixed, all positive far from zero,
// outliers, constants, zeros, tiny values, offsets much larger than the spread.
std::vector<float> quantizer_input(int kind, int64_t n, std::mt19937& rng) {
  std::normal_distribution<float> normal(0, 1);
  std::vector<float> x(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    float v = normal(rng);
    switch (kind) {
      case 0:
        break;
      case 1:
        v = 100 + 0.5f * v;
        break;  // offset block, tiny range
      case 2:
        v = (i % 29 == 0) ? 40 * v : v;
        break;  // outliers
      case 3:
        v = -3.3f;
        break;  // constant, not a half
      case 4:
        v = 0;
        break;
      case 5:
        v = 1e-6f * v;
        break;  // scales in the fp16 denormal range
      case 6:
        v = -std::fabs(v);
        break;
      case 7:
        v = 1000 + 1e-3f * v;
        break;  // offset far beyond the range: fp16
      case 8:
        v = -1000.3f + 1e-3f * v;
        break;  // rounding of the min matters
    }
    x[static_cast<size_t>(i)] = v;
  }
  return x;
}

TEST(Quant, QuantizeRowErrorWithinHalfStep) {
  std::mt19937 rng(2);
  for (TensorType type : {TensorType::kQ4_0, TensorType::kQ4_1, TensorType::kQ8_0}) {
    const Layout l = layout(type);
    for (int kind = 0; kind < 9; ++kind) {
      const int64_t n = 32 * 40;
      const std::vector<float> x = quantizer_input(kind, n, rng);
      std::vector<uint8_t> q(static_cast<size_t>(n / 32 * l.bytes));
      quantize_row(type, x.data(), q.data(), n);
      std::vector<float> y(static_cast<size_t>(n));
      dequantize_row(type, q.data(), y.data(), n);
      for (int64_t i = 0; i < n; ++i) {
        const double step = half_reference(u16_at(q.data() + i / 32 * l.bytes));
        ASSERT_GE(step, 0) << name(type);
        // Half a step, plus float rounding of the value and of x / step.
        const double bound = step / 2 * (1 + 1e-5) + 1e-6 * std::fabs(x[i]);
        ASSERT_LE(std::fabs(y[i] - x[i]), bound)
            << name(type) << " input kind " << kind << " element " << i << " x=" << x[i];
      }
    }
  }
}

TEST(Quant, QuantizeRowFloatTypes) {
  std::mt19937 rng(3);
  const std::vector<float> x = quantizer_input(2, 77, rng);
  std::vector<uint16_t> halves(77);
  quantize_row(TensorType::kF16, x.data(), halves.data(), 77);
  for (size_t i = 0; i < x.size(); ++i) EXPECT_EQ(halves[i], nearest_half_reference(x[i]));
  quantize_row(TensorType::kBF16, x.data(), halves.data(), 77);
  for (size_t i = 0; i < x.size(); ++i) EXPECT_EQ(halves[i], fp32_to_bf16(x[i]));
}

// ---------------------------------------------------------------------------
// Dot products

double offset_magnitude(TensorType type, const uint8_t* block) {
  switch (type) {
    case TensorType::kQ4_1:
    case TensorType::kQ5_1:
      return std::fabs(h(block, 2));
    case TensorType::kQ4_0:
      return 8 * std::fabs(h(block, 0));
    case TensorType::kQ5_0:
      return 16 * std::fabs(h(block, 0));
    default:
      return 0;
  }
}

struct Reference {
  double dot;        // of the dequantized weights with x, in double
  double magnitude;  // sum over i of |x_i| * (|w_i| + |block offset|): size of the float terms
};

Reference reference_dot(TensorType type, const uint8_t* row, const float* x, int64_t n) {
  const Layout l = layout(type);
  std::vector<float> w(static_cast<size_t>(n));
  dequantize_row(type, row, w.data(), n);  // checked against the formulas above
  Reference r{0, 0};
  for (int64_t i = 0; i < n; ++i) {
    r.dot += static_cast<double>(w[i]) * x[i];
    const double offset = offset_magnitude(type, row + i / l.elems * l.bytes);
    r.magnitude += std::fabs(x[i]) * (std::fabs(w[i]) + offset);
  }
  return r;
}

// Float evaluation of a sum of n terms of total size M errs by at most about
// (terms summed in sequence) * 2^-24 * M; blocks are summed in sequence and
// each adds a few roundings (scale products, conversion), hence this bound.
double rounding_tolerance(int64_t n, double magnitude) {
  return (static_cast<double>(n) / 32 + 16) * 0x1p-23 * magnitude + 1e-30;
}

std::vector<int64_t> row_lengths(TensorType type) {
  switch (layout(type).elems) {
    case 1:
      return {1, 7, 8, 33, 576, 1000};
    case 32:
      return {32, 64, 96, 160, 224, 576, 1536};
    default:
      return {256, 768, 1536, 2560};  // 2560: more than one dequantized piece
  }
}

// x whose every 32-block is 2^e * (integers in [-127, 127], one of them +-127):
// exactly what the activation quantizer can represent, so it reproduces x.
std::vector<float> representable_x(int64_t n, std::mt19937& rng, std::vector<int>* quants,
                                   std::vector<float>* scales) {
  std::uniform_int_distribution<int> q(-127, 127), exponent(-10, 3), position(0, 31);
  std::vector<float> x(static_cast<size_t>(n));
  quants->assign(static_cast<size_t>(n), 0);
  scales->clear();
  for (int64_t b = 0; b < (n + 31) / 32; ++b) {
    const int e = exponent(rng);
    const int peak = position(rng);
    for (int i = 0; i < 32 && 32 * b + i < n; ++i) {
      int value = q(rng);
      if (i == peak) value = rng() % 2 ? 127 : -127;
      (*quants)[static_cast<size_t>(32 * b + i)] = value;
      x[static_cast<size_t>(32 * b + i)] = std::ldexp(static_cast<float>(value), e);
    }
    scales->push_back(std::ldexp(1.0f, e));
  }
  return x;
}

float sum_factor(TensorType type) {
  switch (type) {
    case TensorType::kQ4_1:
    case TensorType::kQ5_1:
      return 1;
    case TensorType::kQ4_0:
      return -8;
    case TensorType::kQ5_0:
      return -16;
    default:
      return 0;
  }
}

TEST(Quant, ActivationsReproduceRepresentableX) {
  std::mt19937 rng(4);
  for (TensorType type :
       {TensorType::kQ4_0, TensorType::kQ4_1, TensorType::kQ5_0, TensorType::kQ8_0}) {
    std::vector<int> quants;
    std::vector<float> scales;
    const std::vector<float> x = representable_x(576, rng, &quants, &scales);
    for (bool vector_path : {true, false}) {
      QuantizedActivations a;
      if (vector_path) {
        quantize_activations(type, x.data(), 576, a);
      } else {
        portable::quantize_activations(type, x.data(), 576, a);
      }
      ASSERT_EQ(a.encoding(), ActivationEncoding::kQ8);
      for (int64_t i = 0; i < 576; ++i) ASSERT_EQ(a.quants()[i], quants[i]) << i;
      for (int64_t b = 0; b < 18; ++b) {
        int sum = 0;
        for (int i = 0; i < 32; ++i) sum += quants[32 * b + i];
        EXPECT_EQ(a.block_terms()[2 * b], scales[b]);
        EXPECT_EQ(a.block_terms()[2 * b + 1], scales[b] * sum_factor(type) * sum);
      }
    }
  }
}

TEST(Quant, VectorAndScalarActivationQuantizersAgree) {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0, 1);
  std::vector<float> x(1536);
  for (auto& v : x) v = normal(rng) * (rng() % 50 == 0 ? 30 : 1);
  x[100] = 0;
  std::fill(x.begin() + 64, x.begin() + 96, 0.0f);  // an all-zero block
  QuantizedActivations a, b;
  quantize_activations(TensorType::kQ4_1, x.data(), 1536, a);
  portable::quantize_activations(TensorType::kQ4_1, x.data(), 1536, b);
  EXPECT_EQ(std::memcmp(a.quants(), b.quants(), 1536), 0);
  EXPECT_EQ(std::memcmp(a.block_terms(), b.block_terms(), 48 * 2 * sizeof(float)), 0);
}

// dot_row with x exactly representable by the activation quantizer: only float
// rounding separates it from the double-precision dot of dequantized weights.
TEST(Quant, DotRowMatchesDequantizedDotExactly) {
  std::mt19937 rng(6);
  for (TensorType type : kAllTypes) {
    for (int64_t n : row_lengths(type)) {
      const std::vector<uint8_t> row = random_row(type, n, rng, false);
      std::vector<int> quants;
      std::vector<float> scales;
      const std::vector<float> x = representable_x(n, rng, &quants, &scales);
      const Reference ref = reference_dot(type, row.data(), x.data(), n);
      const double tolerance = rounding_tolerance(n, ref.magnitude);
      QuantizedActivations a;
      quantize_activations(type, x.data(), n, a);
      EXPECT_NEAR(dot_row(type, row.data(), a, n), ref.dot, tolerance) << name(type) << " n=" << n;
      EXPECT_NEAR(portable::dot_row(type, row.data(), a, n), ref.dot, tolerance)
          << name(type) << " n=" << n << " (scalar)";
    }
  }
}

// With arbitrary x the activation quantizer moves each x_i by at most half its
// block's step, max|x| / 127 / 2, so the dot moves by at most
// sum over blocks of (max|x| / 254) * sum |w_i|; float rounding comes on top.
TEST(Quant, DotRowWithinActivationQuantizationError) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0, 1);
  for (TensorType type : kAllTypes) {
    for (int64_t n : row_lengths(type)) {
      const std::vector<uint8_t> row = random_row(type, n, rng, false);
      std::vector<float> x(static_cast<size_t>(n));
      for (auto& v : x) v = normal(rng) * (rng() % 40 == 0 ? 20.0f : 1.0f);
      const Reference ref = reference_dot(type, row.data(), x.data(), n);
      double bound = rounding_tolerance(n, ref.magnitude);
      if (activation_encoding(type) == ActivationEncoding::kQ8) {
        std::vector<float> w(static_cast<size_t>(n));
        dequantize_row(type, row.data(), w.data(), n);
        for (int64_t b = 0; b < n / 32; ++b) {
          double max_abs = 0, weight_sum = 0;
          for (int i = 0; i < 32; ++i) {
            max_abs = std::max(max_abs, std::fabs(static_cast<double>(x[32 * b + i])));
            weight_sum += std::fabs(w[32 * b + i]);
          }
          bound += max_abs / 254 * weight_sum * (1 + 1e-5);
        }
      }
      QuantizedActivations a;
      quantize_activations(type, x.data(), n, a);
      EXPECT_NEAR(dot_row(type, row.data(), a, n), ref.dot, bound) << name(type) << " n=" << n;
      EXPECT_NEAR(portable::dot_row(type, row.data(), a, n), ref.dot, bound)
          << name(type) << " n=" << n << " (scalar)";
    }
  }
}

// dot_rows takes rows four at a time; every remainder and a stride that is not
// the row size (rows of a wider matrix, unaligned) must give dot_row's answers.
TEST(Quant, DotRowsMatchesDotRowForOddRowCounts) {
  std::mt19937 rng(8);
  std::normal_distribution<float> normal(0, 1);
  for (TensorType type : kAllTypes) {
    const int64_t n = layout(type).elems == 256 ? 512 : 96;
    const Layout l = layout(type);
    const size_t row_size = static_cast<size_t>(n / l.elems * l.bytes);
    const size_t stride = row_size + 7;
    for (int64_t rows : {1, 2, 3, 4, 5, 6, 7, 13}) {
      std::vector<uint8_t> matrix(stride * static_cast<size_t>(rows) + 1);
      for (int64_t r = 0; r < rows; ++r) {
        const std::vector<uint8_t> row = random_row(type, n, rng, false);
        std::memcpy(matrix.data() + 1 + r * stride, row.data(), row_size);  // +1: unaligned
      }
      std::vector<float> x(static_cast<size_t>(n));
      for (auto& v : x) v = normal(rng);
      QuantizedActivations a;
      quantize_activations(type, x.data(), n, a);
      std::vector<float> out(static_cast<size_t>(rows) + 1, 12345.0f);
      dot_rows(type, matrix.data() + 1, stride, rows, a, n, out.data());
      EXPECT_EQ(out[rows], 12345.0f) << "wrote past the last row";
      for (int64_t r = 0; r < rows; ++r) {
        const uint8_t* row = matrix.data() + 1 + r * stride;
        const Reference ref = reference_dot(type, row, x.data(), n);
        // Same quantized x; only the summation order differs.
        EXPECT_NEAR(out[r], dot_row(type, row, a, n), rounding_tolerance(n, ref.magnitude))
            << name(type) << " rows=" << rows << " row " << r;
      }
    }
  }
}

TEST(Quant, DotRowRejectsActivationsForAnotherType) {
  std::vector<float> x(64, 1.0f);
  std::vector<uint8_t> row(64 * 4);
  QuantizedActivations a;
  quantize_activations(TensorType::kQ4_0, x.data(), 64, a);
  EXPECT_THROW(dot_row(TensorType::kQ4_1, row.data(), a, 64), std::invalid_argument);
  EXPECT_THROW(dot_row(TensorType::kQ4_0, row.data(), a, 32), std::invalid_argument);
  EXPECT_THROW(quantize_activations(TensorType::kQ8_0, x.data(), 40, a), std::invalid_argument);
}

TEST(Quant, ActivationsReuseTheirBuffer) {
  std::vector<float> x(1536, 0.5f);
  QuantizedActivations a;
  quantize_activations(TensorType::kF32, x.data(), 1536, a);
  const float* first = a.values();
  EXPECT_EQ(reinterpret_cast<uintptr_t>(first) % 32, 0u);
  quantize_activations(TensorType::kQ4_1, x.data(), 576, a);
  EXPECT_EQ(static_cast<const void*>(a.quants()), static_cast<const void*>(first));
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a.block_terms()) % 16, 0u);
  EXPECT_EQ(a.size(), 576);
  EXPECT_EQ(a.weight_type(), TensorType::kQ4_1);
  // Moved-from and moved-to objects stay usable (kept in vectors by callers).
  std::vector<QuantizedActivations> many;
  many.push_back(std::move(a));
  many.resize(4);
  quantize_activations(TensorType::kQ8_0, x.data(), 64, many[3]);
  EXPECT_EQ(many[3].size(), 64);
  EXPECT_EQ(many[0].size(), 576);
  EXPECT_EQ(static_cast<const void*>(many[0].quants()), static_cast<const void*>(first));
  quantize_activations(TensorType::kQ4_1, x.data(), 64, a);  // a was moved from
  EXPECT_EQ(a.size(), 64);
  EXPECT_EQ(a.quants()[0], 127);
}

}  // namespace
}  // namespace xq::cpu
