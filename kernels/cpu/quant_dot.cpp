// Activation quantization and the dot products of decode: weight rows times one
// prepared activation row, in integer arithmetic for the 32-element block types
// and in fp32 for the rest. See quant.h for the activation layout.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "kernels/cpu/quant.h"
#include "kernels/cpu/unaligned_load.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define XQ_QUANT_AVX2 1
#include <immintrin.h>
#endif

namespace xq::cpu {
namespace {

constexpr int64_t kQ8BlockElems = 32;
constexpr size_t kBufferAlignment = 64;

size_t round_up(size_t value, size_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// Multiplier of the activation block sum in block_terms()[2b + 1]: the weight
// offset m_w (see quant.h) is `m` for the types that store one and d_w for the
// symmetric 4/5-bit types, whose quants are stored unsigned with a bias.
float activation_sum_factor(TensorType weight_type) {
  switch (weight_type) {
    case TensorType::kQ4_1:
    case TensorType::kQ5_1:
      return 1.0f;
    case TensorType::kQ4_0:
      return -8.0f;
    case TensorType::kQ5_0:
      return -16.0f;
    default:
      return 0.0f;
  }
}

void check_prepared(TensorType weight_type, const QuantizedActivations& x, int64_t n) {
  if (x.weight_type() != weight_type || x.size() != n ||
      x.encoding() != activation_encoding(weight_type)) {
    throw std::invalid_argument(std::string("dot_row: activations were prepared for ") +
                                std::to_string(x.size()) + " values of " +
                                tensor_type_name(x.weight_type()) + ", not " + std::to_string(n) +
                                " values of " + tensor_type_name(weight_type));
  }
}

// ---------------------------------------------------------------------------
// Weight block formats of the kQ8 path. Each describes one 32-element block as
// integers q (multiplied by the activation quants) plus d_w and m_w, so that
// the block's values are d_w * q + c * m_w, with c as in quant.h.

// Q4_0, Q4_1, Q5_0, Q5_1: fp16 d, then fp16 m where the type has one, then the
// 32 fifth bits where it has them, then 16 bytes of nibbles (element i low,
// element i + 16 high). Quants are taken unsigned; Q4_0/Q5_0's bias of 8/16
// goes into the offset term with m_w = d_w.
template <int64_t kBlockBytes, bool kWithMin, bool kWithFifthBit>
struct NibbleWeights {
  static constexpr int64_t kBytes = kBlockBytes;
  static constexpr bool kHasMin = kWithMin;
  static constexpr bool kFiveBit = kWithFifthBit;
  static constexpr int kHighBits = kHasMin ? 4 : 2;
  static constexpr int kQuants = kHighBits + (kFiveBit ? 4 : 0);
  static void decode(const uint8_t* b, int* q, float* d, float* m) {
    *d = fp16_to_fp32(load_u16(b));
    *m = kHasMin ? fp16_to_fp32(load_u16(b + 2)) : *d;
    const uint32_t high = kFiveBit ? load_u32(b + kHighBits) : 0;
    for (int i = 0; i < 16; ++i) {
      q[i] = (b[kQuants + i] & 0x0f) | static_cast<int>(((high >> i) & 1) << 4);
      q[i + 16] = (b[kQuants + i] >> 4) | static_cast<int>(((high >> (i + 16)) & 1) << 4);
    }
  }
};
using Q4_0Weights = NibbleWeights<18, false, false>;
using Q4_1Weights = NibbleWeights<20, true, false>;
using Q5_0Weights = NibbleWeights<22, false, true>;
using Q5_1Weights = NibbleWeights<24, true, true>;

template <int64_t kBlockBytes, int kQuantOffset>
struct Q8Weights {
  static constexpr int64_t kBytes = kBlockBytes;
  static constexpr int kQuants = kQuantOffset;
  static void decode(const uint8_t* b, int* q, float* d, float* m) {
    *d = fp16_to_fp32(load_u16(b));
    *m = 0;
    for (int i = 0; i < 32; ++i) q[i] = static_cast<int8_t>(b[kQuants + i]);
  }
};
using Q8_0Weights = Q8Weights<34, 2>;
using Q8_1Weights = Q8Weights<36, 4>;

template <class Weights>
float dot_q8_scalar(const uint8_t* row, const int8_t* quants, const float* terms, int64_t blocks) {
  float sum = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    int q[32];
    float d, m;
    Weights::decode(row + b * Weights::kBytes, q, &d, &m);
    int32_t products = 0;
    for (int i = 0; i < 32; ++i) products += q[i] * quants[32 * b + i];
    sum += d * terms[2 * b] * static_cast<float>(products) + m * terms[2 * b + 1];
  }
  return sum;
}

// Weight rows of F32, F16, BF16 against fp32 activations.
template <class Element>
float to_float(const uint8_t* row, int64_t i);
template <>
float to_float<float>(const uint8_t* row, int64_t i) {
  float v;
  std::memcpy(&v, row + 4 * i, 4);
  return v;
}
struct Half {};
struct BFloat {};
template <>
float to_float<Half>(const uint8_t* row, int64_t i) {
  return fp16_to_fp32(load_u16(row + 2 * i));
}
template <>
float to_float<BFloat>(const uint8_t* row, int64_t i) {
  return bf16_to_fp32(load_u16(row + 2 * i));
}

template <class Element>
float dot_float_scalar(const uint8_t* row, const float* x, int64_t n) {
  float sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += to_float<Element>(row, i) * x[i];
  return sum;
}

// Types without a direct path (K-quants, Q8_K): the row is dequantized in
// pieces to a buffer that stays in L1, then dotted in fp32.
template <float (*kDot)(const float*, const float*, int64_t)>
float dot_dequantized(TensorType type, const uint8_t* row, const float* x, int64_t n) {
  const TensorTypeTraits& traits = tensor_type_traits(type);
  constexpr int64_t kBufferElems = 2048;  // a multiple of every block size
  alignas(64) float buffer[kBufferElems];
  float sum = 0;
  for (int64_t start = 0; start < n; start += kBufferElems) {
    const int64_t count = std::min(kBufferElems, n - start);
    dequantize_row(type, row + start / traits.block_elems * traits.block_bytes, buffer, count);
    sum += kDot(buffer, x + start, count);
  }
  return sum;
}

float dot_f32_scalar(const float* a, const float* b, int64_t n) {
  float sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

void quantize_q8_block_scalar(const float* x, float sum_factor, int8_t* q, float* terms) {
  float max_abs = 0;
  for (int i = 0; i < 32; ++i) max_abs = std::max(max_abs, std::fabs(x[i]));
  const float inverse = max_abs > 0 ? 127.0f / max_abs : 0.0f;
  int sum = 0;
  for (int i = 0; i < 32; ++i) {
    // nearbyint rounds half to even like the vector conversion, so both paths
    // produce the same quants.
    q[i] = static_cast<int8_t>(std::nearbyint(x[i] * inverse));
    sum += q[i];
  }
  const float d = max_abs / 127.0f;
  terms[0] = d;
  terms[1] = d * (sum_factor * static_cast<float>(sum));
}

#if XQ_QUANT_AVX2
// ---------------------------------------------------------------------------
// AVX2

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// {sum(a), sum(b), sum(c), sum(d)}: four reductions for the price of ~two.
inline __m128 horizontal_sum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 ab = _mm256_hadd_ps(a, b);
  const __m256 cd = _mm256_hadd_ps(c, d);
  const __m256 abcd = _mm256_hadd_ps(ab, cd);
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

inline int horizontal_sum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

// The kernels walk kRows rows side by side: several short streams a row
// apart, which the hardware prefetchers follow poorly. So each step also
// prefetches the bytes it consumes, kPrefetchDistance ahead, as if the rows
// were read linearly; consecutive row groups are contiguous, so this runs
// smoothly from one call to the next. (Prefetches never fault, so reaching
// past the last row is harmless.)
constexpr int64_t kPrefetchDistance = 4096;  // best of 1-16 KB measured on Zen 3

template <int64_t kStepBytes>
inline void prefetch_step(const uint8_t* cursor) {
  // Lines at most 64 bytes apart from each step's start cover every line.
  for (int64_t offset = 0; offset < kStepBytes; offset += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(cursor + offset), _MM_HINT_T0);
  }
}

// 0x10 in byte i where bit i of the 32-bit word is set: the fifth bit of Q5.
inline __m256i spread_high_bits(uint32_t bits) {
  // Byte i looks at byte i / 8 of the word (shuffles stay in 128-bit lanes, and
  // both lanes hold the whole word), then tests its bit i % 8.
  const __m256i byte_of_bit = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2,
                                               2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit_in_byte = _mm256_set1_epi64x(0x8040201008040201LL);
  const __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)), byte_of_bit);
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit_in_byte), bit_in_byte);
  return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}

// The quants of one nibble block in element order: low nibbles (elements
// 0-15) in the low lane, high nibbles (16-31) in the high lane.
template <class Weights>
inline __m256i block_nibbles(const uint8_t* block) {
  const __m128i packed =
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + Weights::kQuants));
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
  __m256i q = _mm256_and_si256(both, _mm256_set1_epi8(0x0f));
  if constexpr (Weights::kFiveBit) {
    q = _mm256_or_si256(q, spread_high_bits(load_u32(block + Weights::kHighBits)));
  }
  return q;
}

// The quants of two nibble blocks a and b: `low` holds elements 0-15 of a and
// of b, `high` elements 16-31 of a and of b.
template <class Weights>
inline void pair_nibbles(const uint8_t* a, const uint8_t* b, __m256i* low, __m256i* high) {
  const __m256i packed =
      _mm256_set_m128i(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + Weights::kQuants)),
                       _mm_loadu_si128(reinterpret_cast<const __m128i*>(a + Weights::kQuants)));
  const __m256i mask = _mm256_set1_epi8(0x0f);
  *low = _mm256_and_si256(packed, mask);
  *high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask);
  if constexpr (Weights::kFiveBit) {
    const uint32_t bits_a = load_u32(a + Weights::kHighBits);
    const uint32_t bits_b = load_u32(b + Weights::kHighBits);
    *low = _mm256_or_si256(*low, spread_high_bits((bits_a & 0xffffu) | (bits_b << 16)));
    *high = _mm256_or_si256(*high, spread_high_bits((bits_a >> 16) | (bits_b & 0xffff0000u)));
  }
}

// fp16 bits of d_w and m_w (d_w twice where the type has no m) of a block.
template <class Weights>
inline uint32_t scale_bits(const uint8_t* block) {
  if constexpr (Weights::kHasMin) {
    return load_u32(block);
  } else {
    return load_u16(block) * 0x10001u;
  }
}

// {d_w, m_w, 0, 0}. The upper lanes must be zero, not neighbouring quant bytes
// read as halves: those could be infinities, and inf * 0 would poison the sum.
template <class Weights>
inline __m128 block_scales(const uint8_t* block) {
  return _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(scale_bits<Weights>(block))));
}

// {d_w, m_w} of block a and of block b, converted together. (Combining the
// bits in general registers measured faster than vector inserts.)
template <class Weights>
inline __m128 pair_scales(const uint8_t* a, const uint8_t* b) {
  const uint64_t bits = scale_bits<Weights>(a) | (uint64_t{scale_bits<Weights>(b)} << 32);
  return _mm_cvtph_ps(_mm_cvtsi64_si128(static_cast<long long>(bits)));
}

// Lane 1 + lane 3: the offset terms m_w * (c * d_x * sum(x quants)).
inline float odd_lane_sum(__m128 v) {
  const __m128 odd = _mm_movehdup_ps(v);
  return _mm_cvtss_f32(_mm_add_ss(odd, _mm_movehl_ps(odd, odd)));
}

// Stores the kRows row sums (plus per-row scalars) to out.
template <int kRows>
inline void store_sums(__m256 (&acc)[kRows], const float (&extra)[kRows], float* out) {
  if constexpr (kRows == 4) {
    const __m128 sums = horizontal_sum4(acc[0], acc[1], acc[2], acc[3]);
    _mm_storeu_ps(out, _mm_add_ps(sums, _mm_loadu_ps(extra)));
  } else {
    for (int r = 0; r < kRows; ++r) out[r] = horizontal_sum(acc[r]) + extra[r];
  }
}

// kRows rows of a nibble type (Q4_0, Q4_1, Q5_0, Q5_1) times kQ8 activations.
// Two blocks per step: their 32 quant bytes fill one register, so masking and
// shifting yield 64 quants with one load, and one madd/convert/FMA serves both
// blocks. x is rearranged to match (two lane shuffles per step, shared by the
// rows). Each block's d_w * d_x scales its half of the products; the offset
// m_w * c * d_x * sum(x quants) accumulates in lanes 1 and 3 of `offsets`.
template <class Weights, int kRows>
void dot_nibbles_avx2(const uint8_t* weights, size_t row_bytes, const int8_t* quants,
                      const float* terms, int64_t blocks, float* out) {
  // One row alone would wait on its FMA chain, so it alternates two sums.
  constexpr int kChains = kRows == 1 ? 2 : 1;
  __m256 acc[kChains][kRows];
  __m128 offsets[kRows];
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < kChains; ++c) acc[c][r] = _mm256_setzero_ps();
    offsets[r] = _mm_setzero_ps();
  }
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i pair_lanes = _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2);
  const uint8_t* prefetch = weights + kPrefetchDistance;

  auto pair_step = [&](int64_t b, int c) {
    prefetch_step<2 * kRows * Weights::kBytes>(prefetch + b * kRows * Weights::kBytes);
    const __m256i x_a = _mm256_load_si256(reinterpret_cast<const __m256i*>(quants + 32 * b));
    const __m256i x_b = _mm256_load_si256(reinterpret_cast<const __m256i*>(quants + 32 * b + 32));
    const __m256i x_low = _mm256_permute2x128_si256(x_a, x_b, 0x20);
    const __m256i x_high = _mm256_permute2x128_si256(x_a, x_b, 0x31);
    const __m128 x_terms = _mm_load_ps(terms + 2 * b);  // {d_x, sum term} of a, then of b
    for (int r = 0; r < kRows; ++r) {
      const uint8_t* block_a = weights + r * row_bytes + b * Weights::kBytes;
      const uint8_t* block_b = block_a + Weights::kBytes;
      __m256i low, high;
      pair_nibbles<Weights>(block_a, block_b, &low, &high);
      // At most 2 * 2 * 31 * 127 per int16: no saturation.
      const __m256i products =
          _mm256_add_epi16(_mm256_maddubs_epi16(low, x_low), _mm256_maddubs_epi16(high, x_high));
      const __m128 scaled = _mm_mul_ps(pair_scales<Weights>(block_a, block_b), x_terms);
      offsets[r] = _mm_add_ps(offsets[r], scaled);
      const __m256 scale8 = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(scaled), pair_lanes);
      acc[c][r] =
          _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(products, ones)), scale8, acc[c][r]);
    }
  };

  int64_t b = 0;
  for (; b + 2 * kChains <= blocks; b += 2 * kChains) {
    for (int c = 0; c < kChains; ++c) pair_step(b + 2 * c, c);
  }
  for (; b + 2 <= blocks; b += 2) pair_step(b, 0);
  if (b < blocks) {  // an odd last block
    const __m256i x = _mm256_load_si256(reinterpret_cast<const __m256i*>(quants + 32 * b));
    const __m128 x_terms =
        _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(terms + 2 * b)));
    for (int r = 0; r < kRows; ++r) {
      const uint8_t* block = weights + r * row_bytes + b * Weights::kBytes;
      const __m128 scaled = _mm_mul_ps(block_scales<Weights>(block), x_terms);
      offsets[r] = _mm_add_ps(offsets[r], scaled);
      const __m256i sums =
          _mm256_madd_epi16(_mm256_maddubs_epi16(block_nibbles<Weights>(block), x), ones);
      acc[0][r] =
          _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_broadcastss_ps(scaled), acc[0][r]);
    }
  }

  float offset_sums[kRows];
  for (int r = 0; r < kRows; ++r) {
    for (int c = 1; c < kChains; ++c) acc[0][r] = _mm256_add_ps(acc[0][r], acc[c][r]);
    offset_sums[r] = odd_lane_sum(offsets[r]);
  }
  store_sums<kRows>(acc[0], offset_sums, out);
}

// kRows rows of Q8_0/Q8_1 times kQ8 activations, one block per step. maddubs
// wants one unsigned operand, so the weight's sign moves onto x: |q| <= 128 and
// |x| <= 127 keep each pair sum below 2^15.
template <class Weights, int kRows>
void dot_q8_avx2(const uint8_t* weights, size_t row_bytes, const int8_t* quants, const float* terms,
                 int64_t blocks, float* out) {
  constexpr int kChains = kRows == 1 ? 2 : 1;
  __m256 acc[kChains][kRows];
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < kChains; ++c) acc[c][r] = _mm256_setzero_ps();
  }
  const __m256i ones = _mm256_set1_epi16(1);
  const uint8_t* prefetch = weights + kPrefetchDistance;
  auto step = [&](int64_t b, int c) {
    prefetch_step<kRows * Weights::kBytes>(prefetch + b * kRows * Weights::kBytes);
    const __m256i x = _mm256_load_si256(reinterpret_cast<const __m256i*>(quants + 32 * b));
    const __m128 d_x = _mm_load_ss(terms + 2 * b);
    for (int r = 0; r < kRows; ++r) {
      const uint8_t* block = weights + r * row_bytes + b * Weights::kBytes;
      const __m256i q =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + Weights::kQuants));
      const __m256i products = _mm256_maddubs_epi16(_mm256_abs_epi8(q), _mm256_sign_epi8(x, q));
      const __m128 d_w = _mm_cvtph_ps(_mm_cvtsi32_si128(load_u16(block)));
      const __m256 scale = _mm256_broadcastss_ps(_mm_mul_ss(d_w, d_x));
      acc[c][r] =
          _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(products, ones)), scale, acc[c][r]);
    }
  };
  int64_t b = 0;
  for (; b + kChains <= blocks; b += kChains) {
    for (int c = 0; c < kChains; ++c) step(b + c, c);
  }
  for (; b < blocks; ++b) step(b, 0);
  const float no_offsets[kRows] = {};
  for (int r = 0; r < kRows; ++r) {
    for (int c = 1; c < kChains; ++c) acc[0][r] = _mm256_add_ps(acc[0][r], acc[c][r]);
  }
  store_sums<kRows>(acc[0], no_offsets, out);
}

template <class Element>
inline __m256 load8(const uint8_t* row, int64_t i);
template <>
inline __m256 load8<float>(const uint8_t* row, int64_t i) {
  return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + i);
}
template <>
inline __m256 load8<Half>(const uint8_t* row, int64_t i) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * i)));
}
template <>
inline __m256 load8<BFloat>(const uint8_t* row, int64_t i) {
  const __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * i));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
}

// kRows rows of F32/F16/BF16 weights times fp32 x. Enough independent FMA
// chains to cover the FMA latency whatever the row count.
template <class Element, int kRows>
void dot_float_avx2(const uint8_t* weights, size_t row_bytes, const float* x, int64_t n,
                    float* out) {
  constexpr int kChains = kRows == 1 ? 4 : 2;
  __m256 acc[kRows][kChains];
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < kChains; ++c) acc[r][c] = _mm256_setzero_ps();
  }
  constexpr int64_t kElementBytes = std::is_same_v<Element, float> ? 4 : 2;
  const uint8_t* prefetch = weights + kPrefetchDistance;
  int64_t i = 0;
  for (; i + 8 * kChains <= n; i += 8 * kChains) {
    prefetch_step<kRows * 8 * kChains * kElementBytes>(prefetch + i * kRows * kElementBytes);
    for (int c = 0; c < kChains; ++c) {
      const __m256 xv = _mm256_loadu_ps(x + i + 8 * c);
      for (int r = 0; r < kRows; ++r) {
        acc[r][c] =
            _mm256_fmadd_ps(load8<Element>(weights + r * row_bytes, i + 8 * c), xv, acc[r][c]);
      }
    }
  }
  for (; i + 8 <= n; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i);
    for (int r = 0; r < kRows; ++r) {
      acc[r][0] = _mm256_fmadd_ps(load8<Element>(weights + r * row_bytes, i), xv, acc[r][0]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int c = 1; c < kChains; ++c) acc[r][0] = _mm256_add_ps(acc[r][0], acc[r][c]);
    float tail = 0;
    for (int64_t j = i; j < n; ++j) tail += to_float<Element>(weights + r * row_bytes, j) * x[j];
    out[r] = horizontal_sum(acc[r][0]) + tail;
  }
}

float dot_f32_avx2(const float* a, const float* b, int64_t n) {
  float result;
  dot_float_avx2<float, 1>(reinterpret_cast<const uint8_t*>(a), 0, b, n, &result);
  return result;
}

void quantize_q8_block_avx2(const float* x, float sum_factor, int8_t* q, float* terms) {
  const __m256 v0 = _mm256_loadu_ps(x);
  const __m256 v1 = _mm256_loadu_ps(x + 8);
  const __m256 v2 = _mm256_loadu_ps(x + 16);
  const __m256 v3 = _mm256_loadu_ps(x + 24);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 max01 = _mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1));
  const __m256 max23 = _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3));
  const __m256 max8 = _mm256_max_ps(max01, max23);
  __m128 max4 = _mm_max_ps(_mm256_castps256_ps128(max8), _mm256_extractf128_ps(max8, 1));
  max4 = _mm_max_ps(max4, _mm_movehl_ps(max4, max4));
  max4 = _mm_max_ss(max4, _mm_movehdup_ps(max4));
  const float max_abs = _mm_cvtss_f32(max4);
  const __m256 inverse = _mm256_set1_ps(max_abs > 0 ? 127.0f / max_abs : 0.0f);
  // cvtps rounds half to even (the default MXCSR mode), like nearbyint.
  const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, inverse));
  const __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, inverse));
  const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, inverse));
  const __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, inverse));
  const int sum =
      horizontal_sum_i32(_mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3)));
  // The packs work per 128-bit lane, leaving 4-byte groups in the order
  // i0lo i1lo i2lo i3lo | i0hi i1hi i2hi i3hi; the permute restores it.
  const __m256i packed16_01 = _mm256_packs_epi32(i0, i1);
  const __m256i packed16_23 = _mm256_packs_epi32(i2, i3);
  const __m256i packed8 = _mm256_packs_epi16(packed16_01, packed16_23);
  const __m256i ordered =
      _mm256_permutevar8x32_epi32(packed8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_store_si256(reinterpret_cast<__m256i*>(q), ordered);
  const float d = max_abs / 127.0f;
  terms[0] = d;
  terms[1] = d * (sum_factor * static_cast<float>(sum));
}
#endif  // XQ_QUANT_AVX2

// ---------------------------------------------------------------------------
// Dispatch

template <void (*kQuantizeBlock)(const float*, float, int8_t*, float*)>
void quantize_activations_with(TensorType weight_type, const float* x, int64_t n,
                               QuantizedActivations& out) {
  out.prepare(weight_type, n);
  if (out.encoding() == ActivationEncoding::kF32) {
    if (n > 0) std::memcpy(out.mutable_values(), x, static_cast<size_t>(n) * sizeof(float));
    return;
  }
  const float sum_factor = activation_sum_factor(weight_type);
  int8_t* quants = out.mutable_quants();
  float* terms = out.mutable_block_terms();
  for (int64_t b = 0; b < n / kQ8BlockElems; ++b) {
    kQuantizeBlock(x + kQ8BlockElems * b, sum_factor, quants + kQ8BlockElems * b, terms + 2 * b);
  }
}

float dot_row_scalar(TensorType type, const uint8_t* row, const QuantizedActivations& x,
                     int64_t n) {
  const int64_t blocks = n / kQ8BlockElems;
  switch (type) {
    case TensorType::kQ4_0:
      return dot_q8_scalar<Q4_0Weights>(row, x.quants(), x.block_terms(), blocks);
    case TensorType::kQ4_1:
      return dot_q8_scalar<Q4_1Weights>(row, x.quants(), x.block_terms(), blocks);
    case TensorType::kQ5_0:
      return dot_q8_scalar<Q5_0Weights>(row, x.quants(), x.block_terms(), blocks);
    case TensorType::kQ5_1:
      return dot_q8_scalar<Q5_1Weights>(row, x.quants(), x.block_terms(), blocks);
    case TensorType::kQ8_0:
      return dot_q8_scalar<Q8_0Weights>(row, x.quants(), x.block_terms(), blocks);
    case TensorType::kQ8_1:
      return dot_q8_scalar<Q8_1Weights>(row, x.quants(), x.block_terms(), blocks);
    case TensorType::kF32:
      return dot_float_scalar<float>(row, x.values(), n);
    case TensorType::kF16:
      return dot_float_scalar<Half>(row, x.values(), n);
    case TensorType::kBF16:
      return dot_float_scalar<BFloat>(row, x.values(), n);
    default:
      return dot_dequantized<dot_f32_scalar>(type, row, x.values(), n);
  }
}

#if XQ_QUANT_AVX2
template <void (*kKernel4)(const uint8_t*, size_t, const int8_t*, const float*, int64_t, float*),
          void (*kKernel3)(const uint8_t*, size_t, const int8_t*, const float*, int64_t, float*),
          void (*kKernel2)(const uint8_t*, size_t, const int8_t*, const float*, int64_t, float*),
          void (*kKernel1)(const uint8_t*, size_t, const int8_t*, const float*, int64_t, float*)>
void dot_rows_blocks(const uint8_t* weights, size_t row_bytes, int64_t rows,
                     const QuantizedActivations& x, int64_t n, float* out) {
  const int64_t blocks = n / kQ8BlockElems;
  const int8_t* quants = x.quants();
  const float* terms = x.block_terms();
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    kKernel4(weights + r * row_bytes, row_bytes, quants, terms, blocks, out + r);
  }
  const uint8_t* rest = weights + r * row_bytes;
  switch (rows - r) {
    case 3:
      return kKernel3(rest, row_bytes, quants, terms, blocks, out + r);
    case 2:
      return kKernel2(rest, row_bytes, quants, terms, blocks, out + r);
    case 1:
      return kKernel1(rest, row_bytes, quants, terms, blocks, out + r);
  }
}

template <class Weights>
void dot_rows_nibbles(const uint8_t* weights, size_t row_bytes, int64_t rows,
                      const QuantizedActivations& x, int64_t n, float* out) {
  dot_rows_blocks<dot_nibbles_avx2<Weights, 4>, dot_nibbles_avx2<Weights, 3>,
                  dot_nibbles_avx2<Weights, 2>, dot_nibbles_avx2<Weights, 1>>(weights, row_bytes,
                                                                              rows, x, n, out);
}

template <class Weights>
void dot_rows_q8(const uint8_t* weights, size_t row_bytes, int64_t rows,
                 const QuantizedActivations& x, int64_t n, float* out) {
  dot_rows_blocks<dot_q8_avx2<Weights, 4>, dot_q8_avx2<Weights, 3>, dot_q8_avx2<Weights, 2>,
                  dot_q8_avx2<Weights, 1>>(weights, row_bytes, rows, x, n, out);
}

template <class Element>
void dot_rows_float(const uint8_t* weights, size_t row_bytes, int64_t rows,
                    const QuantizedActivations& x, int64_t n, float* out) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    dot_float_avx2<Element, 4>(weights + r * row_bytes, row_bytes, x.values(), n, out + r);
  }
  const uint8_t* rest = weights + r * row_bytes;
  switch (rows - r) {
    case 3:
      return dot_float_avx2<Element, 3>(rest, row_bytes, x.values(), n, out + r);
    case 2:
      return dot_float_avx2<Element, 2>(rest, row_bytes, x.values(), n, out + r);
    case 1:
      return dot_float_avx2<Element, 1>(rest, row_bytes, x.values(), n, out + r);
  }
}

void dot_rows_avx2(TensorType type, const uint8_t* weights, size_t row_bytes, int64_t rows,
                   const QuantizedActivations& x, int64_t n, float* out) {
  switch (type) {
    case TensorType::kQ4_0:
      return dot_rows_nibbles<Q4_0Weights>(weights, row_bytes, rows, x, n, out);
    case TensorType::kQ4_1:
      return dot_rows_nibbles<Q4_1Weights>(weights, row_bytes, rows, x, n, out);
    case TensorType::kQ5_0:
      return dot_rows_nibbles<Q5_0Weights>(weights, row_bytes, rows, x, n, out);
    case TensorType::kQ5_1:
      return dot_rows_nibbles<Q5_1Weights>(weights, row_bytes, rows, x, n, out);
    case TensorType::kQ8_0:
      return dot_rows_q8<Q8_0Weights>(weights, row_bytes, rows, x, n, out);
    case TensorType::kQ8_1:
      return dot_rows_q8<Q8_1Weights>(weights, row_bytes, rows, x, n, out);
    case TensorType::kF32:
      return dot_rows_float<float>(weights, row_bytes, rows, x, n, out);
    case TensorType::kF16:
      return dot_rows_float<Half>(weights, row_bytes, rows, x, n, out);
    case TensorType::kBF16:
      return dot_rows_float<BFloat>(weights, row_bytes, rows, x, n, out);
    default:
      for (int64_t r = 0; r < rows; ++r) {
        out[r] = dot_dequantized<dot_f32_avx2>(type, weights + r * row_bytes, x.values(), n);
      }
  }
}
#endif  // XQ_QUANT_AVX2

}  // namespace

// ---------------------------------------------------------------------------
// QuantizedActivations

void QuantizedActivations::FreeAligned::operator()(std::byte* p) const {
  std::free(p);
}

ActivationEncoding activation_encoding(TensorType weight_type) {
  switch (weight_type) {
    case TensorType::kQ4_0:
    case TensorType::kQ4_1:
    case TensorType::kQ5_0:
    case TensorType::kQ5_1:
    case TensorType::kQ8_0:
    case TensorType::kQ8_1:
      return ActivationEncoding::kQ8;
    default:
      return ActivationEncoding::kF32;
  }
}

QuantizedActivations::QuantizedActivations(QuantizedActivations&& other) noexcept {
  *this = std::move(other);
}

QuantizedActivations& QuantizedActivations::operator=(QuantizedActivations&& other) noexcept {
  // The moved-from object must not keep a capacity without its buffer.
  weight_type_ = other.weight_type_;
  encoding_ = std::exchange(other.encoding_, ActivationEncoding::kNone);
  n_ = std::exchange(other.n_, 0);
  terms_offset_ = std::exchange(other.terms_offset_, 0);
  capacity_ = std::exchange(other.capacity_, 0);
  buffer_ = std::move(other.buffer_);
  return *this;
}

void QuantizedActivations::prepare(TensorType weight_type, int64_t n) {
  const TensorTypeTraits* traits = tensor_type_traits(static_cast<uint32_t>(weight_type));
  if (traits == nullptr || n < 0 || n % traits->block_elems != 0) {
    throw std::invalid_argument("quantize_activations: " + std::to_string(n) +
                                " values do not fill whole blocks of weight type " +
                                std::to_string(static_cast<uint32_t>(weight_type)));
  }
  const ActivationEncoding encoding = activation_encoding(weight_type);
  size_t bytes;
  if (encoding == ActivationEncoding::kQ8) {
    terms_offset_ = round_up(static_cast<size_t>(n), kBufferAlignment);
    bytes = terms_offset_ + static_cast<size_t>(n / kQ8BlockElems) * 2 * sizeof(float);
  } else {
    terms_offset_ = 0;
    bytes = static_cast<size_t>(n) * sizeof(float);
  }
  if (bytes > capacity_) {
    const size_t capacity = round_up(bytes, kBufferAlignment);
    auto* memory = static_cast<std::byte*>(std::aligned_alloc(kBufferAlignment, capacity));
    if (memory == nullptr) throw std::bad_alloc();
    buffer_.reset(memory);
    capacity_ = capacity;
  }
  weight_type_ = weight_type;
  encoding_ = encoding;
  n_ = n;
}

// ---------------------------------------------------------------------------
// Public entry points

namespace portable {

void quantize_activations(TensorType weight_type, const float* x, int64_t n,
                          QuantizedActivations& out) {
  quantize_activations_with<quantize_q8_block_scalar>(weight_type, x, n, out);
}

float dot_row(TensorType weight_type, const void* weight_row, const QuantizedActivations& x,
              int64_t n) {
  check_prepared(weight_type, x, n);
  return dot_row_scalar(weight_type, static_cast<const uint8_t*>(weight_row), x, n);
}

}  // namespace portable

void quantize_activations(TensorType weight_type, const float* x, int64_t n,
                          QuantizedActivations& out) {
#if XQ_QUANT_AVX2
  quantize_activations_with<quantize_q8_block_avx2>(weight_type, x, n, out);
#else
  quantize_activations_with<quantize_q8_block_scalar>(weight_type, x, n, out);
#endif
}

float dot_row(TensorType weight_type, const void* weight_row, const QuantizedActivations& x,
              int64_t n) {
  check_prepared(weight_type, x, n);
#if XQ_QUANT_AVX2
  float result;
  dot_rows_avx2(weight_type, static_cast<const uint8_t*>(weight_row), 0, 1, x, n, &result);
  return result;
#else
  return dot_row_scalar(weight_type, static_cast<const uint8_t*>(weight_row), x, n);
#endif
}

void dot_rows(TensorType weight_type, const void* weights, size_t row_bytes, int64_t rows,
              const QuantizedActivations& x, int64_t n, float* out) {
  check_prepared(weight_type, x, n);
  const auto* bytes = static_cast<const uint8_t*>(weights);
#if XQ_QUANT_AVX2
  dot_rows_avx2(weight_type, bytes, row_bytes, rows, x, n, out);
#else
  for (int64_t r = 0; r < rows; ++r)
    out[r] = dot_row_scalar(weight_type, bytes + r * row_bytes, x, n);
#endif
}

}  // namespace xq::cpu
