// Scalar conversions, dequantization of every GGUF block type, and the
// fp32 -> Q4_0/Q4_1/Q8_0/F16 quantizers.
#include "kernels/cpu/quant.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "kernels/cpu/unaligned_load.h"

#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace xq::cpu {

static_assert(sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20 && sizeof(BlockQ5_0) == 22 &&
              sizeof(BlockQ5_1) == 24 && sizeof(BlockQ8_0) == 34 && sizeof(BlockQ8_1) == 36);
static_assert(sizeof(BlockQ2_K) == 84 && sizeof(BlockQ3_K) == 110 && sizeof(BlockQ4_K) == 144 &&
              sizeof(BlockQ5_K) == 176 && sizeof(BlockQ6_K) == 210 && sizeof(BlockQ8_K) == 292);

// ---------------------------------------------------------------------------
// Scalar conversions

namespace portable {

float fp16_to_fp32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return std::bit_cast<float>(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {
    // Zero or denormal: mantissa * 2^-24 is exact in float.
    const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
    return sign ? -magnitude : magnitude;
  }
  // Rebias the exponent from 15 to 127.
  return std::bit_cast<float>(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

uint16_t fp32_to_fp16(float f) {
  const uint32_t bits = std::bit_cast<uint32_t>(f);
  const auto sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) {
    // NaN: keep the top payload bits and force the quiet bit, so a payload that
    // lives only in the low bits cannot turn into infinity.
    return sign | 0x7e00u | static_cast<uint16_t>((magnitude >> 13) & 0x3ffu);
  }
  // 65520 is halfway between the largest half (65504) and 2^16; the tie goes to
  // the even neighbour, which is the overflow to infinity.
  if (magnitude >= 0x477ff000u) return sign | 0x7c00u;
  if (magnitude < 0x38800000u) {
    // Below 2^-14 the result is a denormal: round(value / 2^-24). Up to 2^-25
    // (inclusive: a tie with zero) everything rounds to zero.
    if (magnitude <= 0x33000000u) return sign;
    const uint32_t significand = (magnitude & 0x7fffffu) | 0x800000u;
    const int shift = 126 - static_cast<int>(magnitude >> 23);  // 14..24
    uint32_t result = significand >> shift;
    const uint32_t remainder = significand & ((1u << shift) - 1);
    const uint32_t half = 1u << (shift - 1);
    if (remainder > half || (remainder == half && (result & 1))) ++result;
    return sign | static_cast<uint16_t>(result);  // 0x400 (smallest normal) is right too
  }
  // Normal: rebias and round 23 mantissa bits to 10. A carry out of the
  // mantissa correctly bumps the exponent.
  const uint32_t rebiased = magnitude - (112u << 23);
  uint32_t result = rebiased >> 13;
  const uint32_t remainder = rebiased & 0x1fffu;
  if (remainder > 0x1000u || (remainder == 0x1000u && (result & 1))) ++result;
  return sign | static_cast<uint16_t>(result);
}

}  // namespace portable

float fp16_to_fp32(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return portable::fp16_to_fp32(h);
#endif
}

uint16_t fp32_to_fp16(float f) {
#if defined(__F16C__)
  return static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  return portable::fp32_to_fp16(f);
#endif
}

float bf16_to_fp32(uint16_t h) {
  return std::bit_cast<float>(static_cast<uint32_t>(h) << 16);
}

uint16_t fp32_to_bf16(float f) {
  const uint32_t bits = std::bit_cast<uint32_t>(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  // Adding 0x7fff plus the lowest kept bit rounds to nearest with ties to even.
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1)) >> 16);
}

namespace {

// ---------------------------------------------------------------------------
// Dequantization, one block at a time. `y` receives block_elems values.

void check_row(TensorType type, int64_t n, const char* what) {
  const TensorTypeTraits* traits = tensor_type_traits(static_cast<uint32_t>(type));
  if (traits == nullptr) {
    throw std::invalid_argument(std::string(what) + ": unknown tensor type " +
                                std::to_string(static_cast<uint32_t>(type)));
  }
  if (n < 0 || n % traits->block_elems != 0) {
    throw std::invalid_argument(std::string(what) + ": " + std::to_string(n) +
                                " values is not a whole number of " + traits->name + " blocks");
  }
}

// Element i of a 4-bit block sits in the low nibble of byte i for i < 16 and in
// the high nibble of byte i - 16 otherwise.
inline void unpack_nibbles(const uint8_t* qs, int* q) {
  for (int i = 0; i < 16; ++i) {
    q[i] = qs[i] & 0x0f;
    q[i + 16] = qs[i] >> 4;
  }
}

void dequantize_q4_0(const BlockQ4_0& b, float* y) {
  const float d = fp16_to_fp32(b.d);
  int q[32];
  unpack_nibbles(b.qs, q);
  for (int i = 0; i < 32; ++i) y[i] = static_cast<float>(q[i] - 8) * d;
}

void dequantize_q4_1(const BlockQ4_1& b, float* y) {
  const float d = fp16_to_fp32(b.d);
  const float m = fp16_to_fp32(b.m);
  int q[32];
  unpack_nibbles(b.qs, q);
  for (int i = 0; i < 32; ++i) y[i] = static_cast<float>(q[i]) * d + m;
}

void dequantize_q5_0(const BlockQ5_0& b, float* y) {
  const float d = fp16_to_fp32(b.d);
  const uint32_t high_bits = load_u32(b.qh);
  int q[32];
  unpack_nibbles(b.qs, q);
  for (int i = 0; i < 32; ++i) {
    y[i] = static_cast<float>((q[i] | static_cast<int>(((high_bits >> i) & 1) << 4)) - 16) * d;
  }
}

void dequantize_q5_1(const BlockQ5_1& b, float* y) {
  const float d = fp16_to_fp32(b.d);
  const float m = fp16_to_fp32(b.m);
  const uint32_t high_bits = load_u32(b.qh);
  int q[32];
  unpack_nibbles(b.qs, q);
  for (int i = 0; i < 32; ++i) {
    y[i] = static_cast<float>(q[i] | static_cast<int>(((high_bits >> i) & 1) << 4)) * d + m;
  }
}

void dequantize_q8_0(const BlockQ8_0& b, float* y) {
  const float d = fp16_to_fp32(b.d);
  for (int i = 0; i < 32; ++i) y[i] = static_cast<float>(b.qs[i]) * d;
}

void dequantize_q8_1(const BlockQ8_1& b, float* y) {
  const float d = fp16_to_fp32(b.d);
  for (int i = 0; i < 32; ++i) y[i] = static_cast<float>(b.qs[i]) * d;
}

// Q2_K: 16 groups of 16 elements, each with a 4-bit scale and 4-bit min. Byte l
// of each 32-byte half of qs holds four 2-bit quants, for elements l, l+32,
// l+64 and l+96 of that half's 128 elements (bits 0-1, 2-3, 4-5, 6-7).
void dequantize_q2_k(const BlockQ2_K& b, float* y) {
  const float d = fp16_to_fp32(b.d);
  const float dmin = fp16_to_fp32(b.dmin);
  for (int half = 0; half < 2; ++half) {
    const uint8_t* qs = b.qs + 32 * half;
    for (int shift_index = 0; shift_index < 4; ++shift_index) {
      for (int part = 0; part < 2; ++part) {
        const uint8_t packed_scale = b.scales[8 * half + 2 * shift_index + part];
        const float scale = d * static_cast<float>(packed_scale & 0x0f);
        const float min = dmin * static_cast<float>(packed_scale >> 4);
        for (int l = 0; l < 16; ++l) {
          const int q = (qs[16 * part + l] >> (2 * shift_index)) & 3;
          *y++ = scale * static_cast<float>(q) - min;
        }
      }
    }
  }
}

// Q3_K: like Q2_K's 2-bit layout plus a third bit in hmask (bit k of hmask[l]
// for the k-th group of 32 elements); a clear bit subtracts 4. Sixteen 6-bit
// scales: low 4 bits in the nibbles of scales[0..7], high 2 bits in
// scales[8..11].
void dequantize_q3_k(const BlockQ3_K& b, float* y) {
  const float d = fp16_to_fp32(b.d);
  int scales[16];
  for (int i = 0; i < 16; ++i) {
    const int low = i < 8 ? b.scales[i] & 0x0f : b.scales[i - 8] >> 4;
    const int high = (b.scales[8 + i % 4] >> (2 * (i / 4))) & 3;
    scales[i] = (low | (high << 4)) - 32;
  }
  int group = 0;  // 32-element group index, selects the hmask bit
  for (int half = 0; half < 2; ++half) {
    const uint8_t* qs = b.qs + 32 * half;
    for (int shift_index = 0; shift_index < 4; ++shift_index, ++group) {
      for (int part = 0; part < 2; ++part) {
        const float scale = d * static_cast<float>(scales[8 * half + 2 * shift_index + part]);
        for (int l = 0; l < 16; ++l) {
          const int index = 16 * part + l;
          const int low = (qs[index] >> (2 * shift_index)) & 3;
          const int q = low - ((b.hmask[index] >> group) & 1 ? 0 : 4);
          *y++ = scale * static_cast<float>(q);
        }
      }
    }
  }
}

// Q4_K/Q5_K: eight 32-element groups, each with a 6-bit scale and a 6-bit min
// packed into 12 bytes: groups 0-3 in the low 6 bits of bytes 0-3 (scales) and
// 4-7 (mins); groups 4-7 take their low 4 bits from the nibbles of bytes 8-11
// and their high 2 bits from the top bits of bytes 0-3 (scales) and 4-7 (mins).
inline void k4_scale_min(const uint8_t* packed, int group, int* scale, int* min) {
  if (group < 4) {
    *scale = packed[group] & 63;
    *min = packed[group + 4] & 63;
  } else {
    *scale = (packed[group + 4] & 0x0f) | ((packed[group - 4] >> 6) << 4);
    *min = (packed[group + 4] >> 4) | ((packed[group] >> 6) << 4);
  }
}

// Byte l of each 32-byte chunk of qs holds elements l (low nibble) and l + 32
// (high nibble) of that chunk's 64 elements.
void dequantize_q4_k(const BlockQ4_K& b, float* y) {
  const float d = fp16_to_fp32(b.d);
  const float dmin = fp16_to_fp32(b.dmin);
  for (int chunk = 0; chunk < 4; ++chunk) {
    const uint8_t* qs = b.qs + 32 * chunk;
    for (int part = 0; part < 2; ++part) {
      int scale, min;
      k4_scale_min(b.scales, 2 * chunk + part, &scale, &min);
      const float ds = d * static_cast<float>(scale);
      const float dm = dmin * static_cast<float>(min);
      for (int l = 0; l < 32; ++l) {
        const int q = (qs[l] >> (4 * part)) & 0x0f;
        *y++ = ds * static_cast<float>(q) - dm;
      }
    }
  }
}

// As Q4_K with a fifth bit: bit g of qh[l] for element l of 32-element group g.
void dequantize_q5_k(const BlockQ5_K& b, float* y) {
  const float d = fp16_to_fp32(b.d);
  const float dmin = fp16_to_fp32(b.dmin);
  for (int chunk = 0; chunk < 4; ++chunk) {
    const uint8_t* qs = b.qs + 32 * chunk;
    for (int part = 0; part < 2; ++part) {
      const int group = 2 * chunk + part;
      int scale, min;
      k4_scale_min(b.scales, group, &scale, &min);
      const float ds = d * static_cast<float>(scale);
      const float dm = dmin * static_cast<float>(min);
      for (int l = 0; l < 32; ++l) {
        const int q = ((qs[l] >> (4 * part)) & 0x0f) | (((b.qh[l] >> group) & 1) << 4);
        *y++ = ds * static_cast<float>(q) - dm;
      }
    }
  }
}

// Q6_K: two halves of 128 elements. In each, ql byte l (l < 64) gives the low
// 4 bits of elements l (low nibble) and l + 64 (high nibble); qh byte l (l < 32)
// gives the top 2 bits of elements l, l+32, l+64, l+96. 8-bit signed scales per
// 16 elements; quants are biased by 32.
void dequantize_q6_k(const BlockQ6_K& b, float* y) {
  const float d = fp16_to_fp32(b.d);
  for (int half = 0; half < 2; ++half) {
    const uint8_t* ql = b.ql + 64 * half;
    const uint8_t* qh = b.qh + 32 * half;
    const int8_t* scales = b.scales + 8 * half;
    for (int i = 0; i < 128; ++i) {
      const int quarter = i / 32, l = i % 32;
      const int low = (ql[l + 32 * (quarter & 1)] >> (4 * (quarter >> 1))) & 0x0f;
      const int high = (qh[l] >> (2 * quarter)) & 3;
      const float scale = d * static_cast<float>(scales[i / 16]);
      y[128 * half + i] = scale * static_cast<float>((low | (high << 4)) - 32);
    }
  }
}

void dequantize_q8_k(const BlockQ8_K& b, float* y) {
  for (int i = 0; i < 256; ++i) y[i] = b.d * static_cast<float>(b.qs[i]);
}

template <class Block, void (*kDecode)(const Block&, float*)>
void dequantize_blocks(const void* src, float* dst, int64_t blocks, int64_t block_elems) {
  const auto* bytes = static_cast<const uint8_t*>(src);
  for (int64_t i = 0; i < blocks; ++i) {
    Block block;  // copied out: GGUF rows need not be aligned for Block
    std::memcpy(&block, bytes + i * static_cast<int64_t>(sizeof(Block)), sizeof(Block));
    kDecode(block, dst + i * block_elems);
  }
}

// ---------------------------------------------------------------------------
// Quantization. Scales are rounded to fp16 away from the data so the grid
// covers the block: then no value is clamped and every error is at most half
// a step of the stored scale.

// The smallest half >= f (f finite, >= 0, within the half range).
uint16_t fp16_at_least(float f) {
  uint16_t h = fp32_to_fp16(f);
  if (fp16_to_fp32(h) < f) ++h;  // positive halves are ordered like their bits
  return h;
}

// The largest half <= f (f finite, within the half range).
uint16_t fp16_at_most(float f) {
  uint16_t h = fp32_to_fp16(f);
  if (fp16_to_fp32(h) > f) h = (h & 0x8000u) ? h + 1 : h - 1;  // one step towards -infinity
  return h;
}

inline int round_to_int(float v) {
  return static_cast<int>(std::nearbyint(v));
}

void quantize_q4_0(const float* x, BlockQ4_0& b) {
  float min = 0, max = 0;
  for (int i = 0; i < 32; ++i) {
    min = std::min(min, x[i]);
    max = std::max(max, x[i]);
  }
  // Quants are -8..7 steps: the step must reach down to min and up to max.
  b.d = fp16_at_least(std::max(-min / 8, max / 7));
  const float d = fp16_to_fp32(b.d);
  const float inverse = d > 0 ? 1.0f / d : 0.0f;
  uint8_t q[32];
  for (int i = 0; i < 32; ++i) {
    q[i] = static_cast<uint8_t>(std::clamp(round_to_int(x[i] * inverse) + 8, 0, 15));
  }
  for (int i = 0; i < 16; ++i) b.qs[i] = static_cast<uint8_t>(q[i] | (q[i + 16] << 4));
}

void quantize_q4_1(const float* x, BlockQ4_1& b) {
  float min = x[0], max = x[0];
  for (int i = 1; i < 32; ++i) {
    min = std::min(min, x[i]);
    max = std::max(max, x[i]);
  }
  b.m = fp16_at_most(min);
  const float m = fp16_to_fp32(b.m);
  b.d = fp16_at_least((max - m) / 15);
  const float d = fp16_to_fp32(b.d);
  const float inverse = d > 0 ? 1.0f / d : 0.0f;
  uint8_t q[32];
  for (int i = 0; i < 32; ++i) {
    q[i] = static_cast<uint8_t>(std::clamp(round_to_int((x[i] - m) * inverse), 0, 15));
  }
  for (int i = 0; i < 16; ++i) b.qs[i] = static_cast<uint8_t>(q[i] | (q[i + 16] << 4));
}

void quantize_q8_0(const float* x, BlockQ8_0& b) {
  float max_abs = 0;
  for (int i = 0; i < 32; ++i) max_abs = std::max(max_abs, std::fabs(x[i]));
  b.d = fp16_at_least(max_abs / 127);
  const float d = fp16_to_fp32(b.d);
  const float inverse = d > 0 ? 1.0f / d : 0.0f;
  for (int i = 0; i < 32; ++i) {
    b.qs[i] = static_cast<int8_t>(std::clamp(round_to_int(x[i] * inverse), -127, 127));
  }
}

template <class Block, void (*kEncode)(const float*, Block&)>
void quantize_blocks(const float* src, void* dst, int64_t blocks) {
  auto* bytes = static_cast<uint8_t*>(dst);
  for (int64_t i = 0; i < blocks; ++i) {
    Block block;
    kEncode(src + 32 * i, block);
    std::memcpy(bytes + i * static_cast<int64_t>(sizeof(Block)), &block, sizeof(Block));
  }
}

}  // namespace

void dequantize_row(TensorType type, const void* src, float* dst, int64_t n) {
  check_row(type, n, "dequantize_row");
  const int64_t block_elems = tensor_type_traits(type).block_elems;
  const int64_t blocks = n / block_elems;
  switch (type) {
    case TensorType::kF32:
      std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
      return;
    case TensorType::kF16: {
      const auto* halves = static_cast<const uint8_t*>(src);
      int64_t i = 0;
#if defined(__F16C__)
      for (; i + 8 <= n; i += 8) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(halves + 2 * i));
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
      }
#endif
      for (; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, halves + 2 * i, 2);
        dst[i] = fp16_to_fp32(h);
      }
      return;
    }
    case TensorType::kBF16: {
      const auto* halves = static_cast<const uint8_t*>(src);
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, halves + 2 * i, 2);
        dst[i] = bf16_to_fp32(h);
      }
      return;
    }
    case TensorType::kQ4_0:
      return dequantize_blocks<BlockQ4_0, dequantize_q4_0>(src, dst, blocks, block_elems);
    case TensorType::kQ4_1:
      return dequantize_blocks<BlockQ4_1, dequantize_q4_1>(src, dst, blocks, block_elems);
    case TensorType::kQ5_0:
      return dequantize_blocks<BlockQ5_0, dequantize_q5_0>(src, dst, blocks, block_elems);
    case TensorType::kQ5_1:
      return dequantize_blocks<BlockQ5_1, dequantize_q5_1>(src, dst, blocks, block_elems);
    case TensorType::kQ8_0:
      return dequantize_blocks<BlockQ8_0, dequantize_q8_0>(src, dst, blocks, block_elems);
    case TensorType::kQ8_1:
      return dequantize_blocks<BlockQ8_1, dequantize_q8_1>(src, dst, blocks, block_elems);
    case TensorType::kQ2_K:
      return dequantize_blocks<BlockQ2_K, dequantize_q2_k>(src, dst, blocks, block_elems);
    case TensorType::kQ3_K:
      return dequantize_blocks<BlockQ3_K, dequantize_q3_k>(src, dst, blocks, block_elems);
    case TensorType::kQ4_K:
      return dequantize_blocks<BlockQ4_K, dequantize_q4_k>(src, dst, blocks, block_elems);
    case TensorType::kQ5_K:
      return dequantize_blocks<BlockQ5_K, dequantize_q5_k>(src, dst, blocks, block_elems);
    case TensorType::kQ6_K:
      return dequantize_blocks<BlockQ6_K, dequantize_q6_k>(src, dst, blocks, block_elems);
    case TensorType::kQ8_K:
      return dequantize_blocks<BlockQ8_K, dequantize_q8_k>(src, dst, blocks, block_elems);
  }
  throw std::invalid_argument("dequantize_row: unhandled tensor type");
}

bool can_quantize(TensorType type) {
  switch (type) {
    case TensorType::kF32:
    case TensorType::kF16:
    case TensorType::kBF16:
    case TensorType::kQ4_0:
    case TensorType::kQ4_1:
    case TensorType::kQ8_0:
      return true;
    default:
      return false;
  }
}

void quantize_row(TensorType type, const float* src, void* dst, int64_t n) {
  check_row(type, n, "quantize_row");
  const int64_t blocks = n / tensor_type_traits(type).block_elems;
  auto* bytes = static_cast<uint8_t*>(dst);
  switch (type) {
    case TensorType::kF32:
      std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
      return;
    case TensorType::kF16: {
      int64_t i = 0;
#if defined(__F16C__)
      for (; i + 8 <= n; i += 8) {
        const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(bytes + 2 * i), h);
      }
#endif
      for (; i < n; ++i) {
        const uint16_t h = fp32_to_fp16(src[i]);
        std::memcpy(bytes + 2 * i, &h, 2);
      }
      return;
    }
    case TensorType::kBF16:
      for (int64_t i = 0; i < n; ++i) {
        const uint16_t h = fp32_to_bf16(src[i]);
        std::memcpy(bytes + 2 * i, &h, 2);
      }
      return;
    case TensorType::kQ4_0:
      return quantize_blocks<BlockQ4_0, quantize_q4_0>(src, dst, blocks);
    case TensorType::kQ4_1:
      return quantize_blocks<BlockQ4_1, quantize_q4_1>(src, dst, blocks);
    case TensorType::kQ8_0:
      return quantize_blocks<BlockQ8_0, quantize_q8_0>(src, dst, blocks);
    default:
      throw std::invalid_argument(std::string("quantize_row: cannot quantize to ") +
                                  tensor_type_name(type));
  }
}

}  // namespace xq::cpu
