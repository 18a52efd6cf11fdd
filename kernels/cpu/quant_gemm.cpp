// Int8 GEMM for the 32-element block weight types (see quant_gemm.h).
//
// Tiling, in plain words: the weight rows a thread owns are cut into chunks
// of about 16 KB (they stay in L1/L2 while every row of x passes by). For each
// chunk, x is walked in tiles of up to 8 rows; a tile multiplies J weight rows
// by R x rows, J * R <= 8 accumulators of 8 lanes. Each weight unit (a pair of
// nibble blocks, or one Q8 block) is loaded and unpacked to int8 once per
// tile and meets all R x rows there, so the weights cost one read per tile of
// x rather than one per row of x. Full tiles take R = 8, J = 1; the last,
// shorter tile of x (all of decode) takes more weight rows side by side.
//
// The integer part: maddubs multiplies unsigned weight bytes by signed x
// bytes and adds pairs into int16, madd adds pairs of those into int32 (or
// VNNI's dpbusd does both), so each of the 8 lanes holds an exact sum of 8
// products (nibbles: elements 4p..4p+3 and 16+4p..16+4p+3 of a block, lanes
// 0-3 for the first block of a pair and 4-7 for the second; Q8: elements
// 4p..4p+3). Per unit every lane then does acc = fma(isum, d_w * d_x, acc),
// and the lanes are reduced as ((0+1)+(2+3)) + ((4+5)+(6+7)).
//
// The weight offset term of the nibble types (m_w per block, or d_w for the
// types without m, times x's t per block) is summed apart, o = fma(m_w, t_x,
// o) over the blocks in order, in a vector whose lanes are the tile's x rows
// (t is stored with 8 rows side by side): one fma per weight block for the
// whole tile instead of one per x row. The element is reduce(acc) + o.
//
// This sequence is the same for every tile shape and in the scalar code,
// which is why a row of y does not depend on n.
#include "kernels/cpu/quant_gemm.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "kernels/cpu/quant.h"
#include "kernels/cpu/unaligned_load.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define XQ_GEMM_AVX2 1
#include <immintrin.h>
// dpbusd adds four u8 x s8 products into each int32 lane in one instruction:
// the same exact integer lane sums as maddubs + madd, so the same bits.
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define XQ_GEMM_VNNI 1
#define XQ_GEMM_DPBUSD(acc, a, b) _mm256_dpbusd_epi32(acc, a, b)
#elif defined(__AVXVNNI__)
#define XQ_GEMM_VNNI 1
#define XQ_GEMM_DPBUSD(acc, a, b) _mm256_dpbusd_avx_epi32(acc, a, b)
#endif
#endif

namespace xq::cpu {
namespace {

constexpr int64_t kBlockElems = 32;
constexpr size_t kAlignment = 64;
constexpr int kMaxTileRows = 8;  // rows of x per tile

// Q4_0, Q4_1, Q5_0, Q5_1: fp16 d, fp16 m where the type has one, the 32 fifth
// bits where it has them, 16 bytes of nibbles (element i low, i + 16 high).
// Quants are read unsigned; the types without m take m_w = d_w, their bias
// (-8, -16) being folded into x's offset term t.
template <int64_t kBlockBytes, bool kWithMin, bool kWithFifthBit>
struct NibbleFormat {
  static constexpr bool kNibbles = true;
  static constexpr int64_t kBytes = kBlockBytes;
  static constexpr bool kHasMin = kWithMin;
  static constexpr bool kFiveBit = kWithFifthBit;
  static constexpr int kHighBits = kHasMin ? 4 : 2;
  static constexpr int kQuants = kHighBits + (kFiveBit ? 4 : 0);
  static constexpr int64_t kUnitBytes = 96;  // of x, per pair of blocks
};
using Q4_0Format = NibbleFormat<18, false, false>;
using Q4_1Format = NibbleFormat<20, true, false>;
using Q5_0Format = NibbleFormat<22, false, true>;
using Q5_1Format = NibbleFormat<24, true, true>;

// Q8_0, Q8_1: fp16 d (Q8_1 then a sum this product does not need), 32 int8.
template <int64_t kBlockBytes, int kQuantOffset>
struct ByteFormat {
  static constexpr bool kNibbles = false;
  static constexpr int64_t kBytes = kBlockBytes;
  static constexpr int kQuants = kQuantOffset;
  static constexpr int64_t kUnitBytes = 64;  // of x, per block
};
using Q8_0Format = ByteFormat<34, 2>;
using Q8_1Format = ByteFormat<36, 4>;

bool nibble_type(TensorType type) {
  return type == TensorType::kQ4_0 || type == TensorType::kQ4_1 || type == TensorType::kQ5_0 ||
         type == TensorType::kQ5_1;
}

// The j-th of the 8 int32 lanes' element sets (see the top of the file).
inline int nibble_lane_element(int p, int e) {  // e = 0..7 within lane p (0..3)
  return e < 4 ? 4 * p + e : 16 + 4 * p + (e - 4);
}

// Reduction shared by every path: ((0+1)+(2+3)) + ((4+5)+(6+7)).
inline float reduce_lanes(const float* a) {
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

// ---------------------------------------------------------------------------
// Scalar form of the kernel: one output element, lane by lane. It is what a
// build without AVX2 runs, and it performs the same float operations in the
// same order as the vector code.

// terms: the offset terms of x's row, 8 floats apart (offset_terms).
template <class F>
float element_scalar(const uint8_t* w_row, const uint8_t* x_row, const float* terms,
                     int64_t blocks) {
  float acc[8] = {};
  if constexpr (F::kNibbles) {
    float offset = 0;
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* block = w_row + b * F::kBytes;
      const float m = fp16_to_fp32(load_u16(block + (F::kHasMin ? 2 : 0)));
      offset = std::fma(m, terms[8 * b], offset);
    }
    for (int64_t u = 0; u < (blocks + 1) / 2; ++u) {
      const uint8_t* xu = x_row + u * F::kUnitBytes;
      float x_scale[8];
      std::memcpy(x_scale, xu + 64, sizeof(x_scale));
      for (int half = 0; half < 2; ++half) {
        const int64_t b = 2 * u + half;
        int q[32] = {};
        float d = 0;
        if (b < blocks) {
          const uint8_t* block = w_row + b * F::kBytes;
          d = fp16_to_fp32(load_u16(block));
          const uint32_t high = F::kFiveBit ? load_u32(block + F::kHighBits) : 0;
          for (int i = 0; i < 16; ++i) {
            q[i] = (block[F::kQuants + i] & 0x0f) | static_cast<int>(((high >> i) & 1) << 4);
            q[i + 16] =
                (block[F::kQuants + i] >> 4) | static_cast<int>(((high >> (i + 16)) & 1) << 4);
          }
        }
        for (int p = 0; p < 4; ++p) {
          const int lane = 4 * half + p;
          int32_t isum = 0;
          for (int e = 0; e < 8; ++e) {
            const int element = nibble_lane_element(p, e);
            // x's quants 0-15 of this block sit at 16 * half in the first
            // 32 bytes of the unit, 16-31 at 16 * half in the second.
            const int at = element < 16 ? 16 * half + element : 32 + 16 * half + element - 16;
            isum += q[element] * static_cast<int8_t>(xu[at]);
          }
          const float scale = d * x_scale[lane];
          acc[lane] = std::fma(static_cast<float>(isum), scale, acc[lane]);
        }
      }
    }
    return reduce_lanes(acc) + offset;
  } else {
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* block = w_row + b * F::kBytes;
      const uint8_t* xu = x_row + b * F::kUnitBytes;
      float x_scale[8];
      std::memcpy(x_scale, xu + 32, sizeof(x_scale));
      const float d = fp16_to_fp32(load_u16(block));
      for (int lane = 0; lane < 8; ++lane) {
        int32_t isum = 0;
        for (int e = 4 * lane; e < 4 * lane + 4; ++e) {
          isum += static_cast<int8_t>(block[F::kQuants + e]) * static_cast<int8_t>(xu[e]);
        }
        const float scale = d * x_scale[lane];
        acc[lane] = std::fma(static_cast<float>(isum), scale, acc[lane]);
      }
    }
  }
  return reduce_lanes(acc);
}

template <class F>
void gemm_scalar(const WeightMatrix& w, const Q8Rows& x, int64_t row_begin, int64_t row_end,
                 float* y) {
  const int64_t blocks = w.cols / kBlockElems;
  for (int64_t i = 0; i < x.rows(); ++i) {
    const float* terms =
        F::kNibbles ? x.offset_terms(i / kMaxTileRows) + i % kMaxTileRows : nullptr;
    for (int64_t r = row_begin; r < row_end; ++r)
      y[i * w.rows + r] = element_scalar<F>(w.row(r), x.row(i), terms, blocks);
  }
}

#if XQ_GEMM_AVX2
// ---------------------------------------------------------------------------
// AVX2

// 0x10 in byte i where bit i of `bits` is set: Q5's fifth bits, placed.
inline __m256i spread_fifth_bits(uint32_t bits) {
  const __m256i word = _mm256_set1_epi32(static_cast<int>(bits));
  // Byte i takes byte i / 8 of the word (lanes of 16 bytes index their own copy).
  const __m256i bytes =
      _mm256_shuffle_epi8(word, _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2,
                                                 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i select = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ull));
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, select), select);
  return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}

// One weight unit in registers: for nibble types the quants of a pair of
// blocks (`low`: elements 0-15 of both, `high`: 16-31) with {d_a x4, d_b x4},
// {m_a x8} and {m_b x8}; for Q8 types the block's quants, their absolute
// values, and {d x8}.
struct WeightUnit {
  __m256i low, high;
  __m256 scale, offset_a, offset_b;
};

// kHalf: an odd last block, paired with zeros (its second half reads nothing).
template <class F, bool kHalf>
inline WeightUnit load_unit(const uint8_t* block) {
  WeightUnit unit;
  if constexpr (F::kNibbles) {
    const uint8_t* next = block + F::kBytes;
    const __m128i first = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + F::kQuants));
    const __m128i second =
        kHalf ? _mm_setzero_si128()
              : _mm_loadu_si128(reinterpret_cast<const __m128i*>(next + F::kQuants));
    const __m256i packed = _mm256_set_m128i(second, first);
    const __m256i mask = _mm256_set1_epi8(0x0f);
    unit.low = _mm256_and_si256(packed, mask);
    unit.high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask);
    if constexpr (F::kFiveBit) {
      const uint32_t bits_a = load_u32(block + F::kHighBits);
      const uint32_t bits_b = kHalf ? 0 : load_u32(next + F::kHighBits);
      unit.low = _mm256_or_si256(unit.low, spread_fifth_bits((bits_a & 0xffffu) | (bits_b << 16)));
      unit.high =
          _mm256_or_si256(unit.high, spread_fifth_bits((bits_a >> 16) | (bits_b & 0xffff0000u)));
    }
    if constexpr (F::kHasMin) {
      // {d_a, m_a, d_b, m_b}
      const uint64_t bits =
          load_u32(block) | (kHalf ? uint64_t{0} : uint64_t{load_u32(next)} << 32);
      const __m256 halves =
          _mm256_castps128_ps256(_mm_cvtph_ps(_mm_cvtsi64_si128(static_cast<long long>(bits))));
      unit.scale = _mm256_permutevar8x32_ps(halves, _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2));
      unit.offset_a = _mm256_permutevar8x32_ps(halves, _mm256_set1_epi32(1));
      unit.offset_b = _mm256_permutevar8x32_ps(halves, _mm256_set1_epi32(3));
    } else {
      // {d_a, d_b, 0, 0}; m_w = d_w.
      const uint32_t bits = load_u16(block) | (kHalf ? 0u : uint32_t{load_u16(next)} << 16);
      const __m256 halves =
          _mm256_castps128_ps256(_mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(bits))));
      unit.scale = _mm256_permutevar8x32_ps(halves, _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
      unit.offset_a = _mm256_permutevar8x32_ps(halves, _mm256_set1_epi32(0));
      unit.offset_b = _mm256_permutevar8x32_ps(halves, _mm256_set1_epi32(1));
    }
  } else {
    unit.low = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + F::kQuants));
    unit.high = _mm256_abs_epi8(unit.low);
    unit.scale = _mm256_set1_ps(_mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(load_u16(block)))));
  }
  return unit;
}

// The 8 int32 lane sums of unsigned a times signed b (four bytes per lane),
// and of c times d added to them when kTwo.
template <bool kVnni, bool kTwo>
inline __m256i lane_sums(__m256i a, __m256i b, __m256i c, __m256i d, __m256i ones) {
#if XQ_GEMM_VNNI
  if constexpr (kVnni) {
    const __m256i sums = XQ_GEMM_DPBUSD(_mm256_setzero_si256(), a, b);
    return kTwo ? XQ_GEMM_DPBUSD(sums, c, d) : sums;
  }
#endif
  // Nibbles: at most 2 * 2 * 31 * 127 per int16. Q8: |q| <= 128 and |x| <= 127
  // keep each pair below 2^15. No saturation either way.
  __m256i pairs = _mm256_maddubs_epi16(a, b);
  if constexpr (kTwo) pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(c, d));
  return _mm256_madd_epi16(pairs, ones);
}

// One unit of one weight row against one x row (xu: the unit in Q8Rows).
template <class F, bool kVnni>
inline __m256 unit_step(const WeightUnit& unit, const uint8_t* xu, __m256i ones, __m256 acc) {
  if constexpr (F::kNibbles) {
    const __m256i x_low = _mm256_load_si256(reinterpret_cast<const __m256i*>(xu));
    const __m256i x_high = _mm256_load_si256(reinterpret_cast<const __m256i*>(xu + 32));
    const __m256i sums = lane_sums<kVnni, true>(unit.low, x_low, unit.high, x_high, ones);
    const __m256 scale =
        _mm256_mul_ps(unit.scale, _mm256_load_ps(reinterpret_cast<const float*>(xu + 64)));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc);
  } else {
    // The products want an unsigned operand: |q| there, q's sign moved onto x.
    const __m256i x = _mm256_load_si256(reinterpret_cast<const __m256i*>(xu));
    const __m256i sums =
        lane_sums<kVnni, false>(unit.high, _mm256_sign_epi8(x, unit.low), ones, ones, ones);
    const __m256 scale =
        _mm256_mul_ps(unit.scale, _mm256_load_ps(reinterpret_cast<const float*>(xu + 32)));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc);
  }
}

// {reduce(a), reduce(b), reduce(c), reduce(d)} in reduce_lanes' order: the
// hadds form (0+1), (2+3), then their sum, per 128-bit half; the halves add last.
inline __m128 reduce4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// The weights of decode are read once, several rows side by side, which the
// hardware prefetchers follow poorly: the tiles of one or two x rows prefetch
// the bytes they consume this far ahead, as if the rows were one stream.
constexpr int64_t kPrefetchDistance = 4096;

// J weight rows (from w, row_bytes apart) times R x rows (from x, x_stride
// apart) into y (row i at y + i * ldy, column j at + j).
// terms: the offset terms of the x rows' group (offset_terms), nibble types.
template <class F, bool kVnni, int J, int R>
void tile(const uint8_t* w, size_t row_bytes, const uint8_t* x, size_t x_stride, const float* terms,
          int64_t blocks, float* y, int64_t ldy) {
  __m256 acc[J][R], offset[J];
  for (int j = 0; j < J; ++j) {
    for (int i = 0; i < R; ++i) acc[j][i] = _mm256_setzero_ps();
    offset[j] = _mm256_setzero_ps();
  }
  const __m256i ones = _mm256_set1_epi16(1);
  constexpr int64_t kBlocksPerUnit = F::kNibbles ? 2 : 1;
  constexpr int64_t kWeightUnitBytes = kBlocksPerUnit * F::kBytes;
  auto step = [&](int64_t u, auto half) {
    if constexpr (R <= 2) {
      const uint8_t* ahead = w + u * J * kWeightUnitBytes + kPrefetchDistance;
      for (int64_t offset = 0; offset < J * kWeightUnitBytes; offset += 64)
        _mm_prefetch(reinterpret_cast<const char*>(ahead + offset), _MM_HINT_T0);
    }
    for (int j = 0; j < J; ++j) {
      const WeightUnit unit =
          load_unit<F, decltype(half)::value>(w + j * row_bytes + u * kWeightUnitBytes);
      for (int i = 0; i < R; ++i)
        acc[j][i] =
            unit_step<F, kVnni>(unit, x + i * x_stride + u * F::kUnitBytes, ones, acc[j][i]);
      if constexpr (F::kNibbles) {
        offset[j] = _mm256_fmadd_ps(unit.offset_a, _mm256_loadu_ps(terms + 16 * u), offset[j]);
        if constexpr (!decltype(half)::value)
          offset[j] =
              _mm256_fmadd_ps(unit.offset_b, _mm256_loadu_ps(terms + 16 * u + 8), offset[j]);
      }
    }
  };
  const int64_t full_units = blocks / kBlocksPerUnit;
  for (int64_t u = 0; u < full_units; ++u) step(u, std::false_type{});
  if (full_units * kBlocksPerUnit < blocks) step(full_units, std::true_type{});

  const __m256 zero = _mm256_setzero_ps();
  for (int j = 0; j < J; ++j) {
    for (int i = 0; i < R; i += 4) {
      __m128 sums = reduce4(acc[j][i], i + 1 < R ? acc[j][i + 1] : zero,
                            i + 2 < R ? acc[j][i + 2] : zero, i + 3 < R ? acc[j][i + 3] : zero);
      if constexpr (F::kNibbles)
        sums = _mm_add_ps(
            sums, i == 0 ? _mm256_castps256_ps128(offset[j]) : _mm256_extractf128_ps(offset[j], 1));
      alignas(16) float out[4];
      _mm_store_ps(out, sums);
      for (int t = 0; t < 4 && i + t < R; ++t) y[(i + t) * ldy + j] = out[t];
    }
  }
}

// Weight rows [begin, end) against rows [i0, i0 + R) of x.
template <class F, bool kVnni, int J, int R>
void tile_row_range(const WeightMatrix& w, const Q8Rows& x, int64_t i0, int64_t begin, int64_t end,
                    float* y) {
  const int64_t blocks = w.cols / kBlockElems;
  const uint8_t* xs = x.row(i0);
  const float* terms = F::kNibbles ? x.offset_terms(i0 / kMaxTileRows) : nullptr;
  float* yi = y + i0 * w.rows;
  int64_t r = begin;
  for (; r + J <= end; r += J)
    tile<F, kVnni, J, R>(w.row(r), w.row_bytes, xs, x.stride(), terms, blocks, yi + r, w.rows);
  for (; r < end; ++r)
    tile<F, kVnni, 1, R>(w.row(r), w.row_bytes, xs, x.stride(), terms, blocks, yi + r, w.rows);
}

template <class F, bool kVnni>
void gemm_avx2(const WeightMatrix& w, const Q8Rows& x, int64_t row_begin, int64_t row_end,
               float* y) {
  // A chunk of weight rows of about 16 KB stays in L1/L2 while every tile of x
  // passes over it.
  const int64_t chunk = std::max<int64_t>(4, static_cast<int64_t>(16384 / w.row_bytes) / 4 * 4);
  for (int64_t begin = row_begin; begin < row_end; begin += chunk) {
    const int64_t end = std::min(row_end, begin + chunk);
    for (int64_t i0 = 0; i0 < x.rows(); i0 += kMaxTileRows) {
      // Fewer x rows leave registers for more weight rows side by side.
      switch (std::min<int64_t>(kMaxTileRows, x.rows() - i0)) {
        case 8:
          tile_row_range<F, kVnni, 1, 8>(w, x, i0, begin, end, y);
          break;
        case 7:
          tile_row_range<F, kVnni, 1, 7>(w, x, i0, begin, end, y);
          break;
        case 6:
          tile_row_range<F, kVnni, 1, 6>(w, x, i0, begin, end, y);
          break;
        case 5:
          tile_row_range<F, kVnni, 1, 5>(w, x, i0, begin, end, y);
          break;
        case 4:
          tile_row_range<F, kVnni, 2, 4>(w, x, i0, begin, end, y);
          break;
        case 3:
          tile_row_range<F, kVnni, 2, 3>(w, x, i0, begin, end, y);
          break;
        case 2:
          tile_row_range<F, kVnni, 4, 2>(w, x, i0, begin, end, y);
          break;
        default:
          tile_row_range<F, kVnni, 4, 1>(w, x, i0, begin, end, y);
          break;
      }
    }
  }
}
#endif  // XQ_GEMM_AVX2

template <class F, bool kVnni>
void gemm(const WeightMatrix& w, const Q8Rows& x, int64_t row_begin, int64_t row_end, float* y) {
#if XQ_GEMM_AVX2
  gemm_avx2<F, kVnni>(w, x, row_begin, row_end, y);
#else
  gemm_scalar<F>(w, x, row_begin, row_end, y);
#endif
}

}  // namespace

bool has_q8_gemm(TensorType weight_type) {
  return nibble_type(weight_type) || weight_type == TensorType::kQ8_0 ||
         weight_type == TensorType::kQ8_1;
}

void Q8Rows::FreeAligned::operator()(uint8_t* p) const {
  std::free(p);
}

void Q8Rows::reset(TensorType weight_type, int64_t n, int64_t cols) {
  if (!has_q8_gemm(weight_type) || n < 0 || cols < 0 || cols % kBlockElems != 0) {
    throw std::invalid_argument(std::string("Q8Rows: ") + std::to_string(cols) +
                                " values of weight type " + tensor_type_name(weight_type) +
                                " have no int8 product");
  }
  const int64_t blocks = cols / kBlockElems;
  const size_t row = nibble_type(weight_type) ? static_cast<size_t>((blocks + 1) / 2) * 96
                                              : static_cast<size_t>(blocks) * 64;
  // Offset terms: groups of 8 rows; rows past n stay zero.
  terms_stride_ = nibble_type(weight_type) ? static_cast<size_t>(blocks) * kMaxTileRows : 0;
  const size_t terms = terms_stride_ * static_cast<size_t>((n + kMaxTileRows - 1) / kMaxTileRows);
  if (terms > terms_capacity_) {
    terms_.reset(new float[terms]);
    terms_capacity_ = terms;
  }
  if (terms > 0) std::fill(terms_.get(), terms_.get() + terms, 0.0f);
  const size_t bytes = row * static_cast<size_t>(n);
  if (bytes > capacity_) {
    const size_t capacity = (bytes + kAlignment - 1) / kAlignment * kAlignment;
    auto* memory = static_cast<uint8_t*>(std::aligned_alloc(kAlignment, capacity));
    if (memory == nullptr) throw std::bad_alloc();
    buffer_.reset(memory);
    capacity_ = capacity;
  }
  weight_type_ = weight_type;
  n_ = n;
  cols_ = cols;
  stride_ = row;
}

void Q8Rows::quantize(const float* x, int64_t begin, int64_t end) {
  // quantize_activations rounds exactly as the decode dot products do; its
  // output is then rearranged. One per thread: workers fill rows in parallel.
  static thread_local QuantizedActivations prepared;
  const int64_t blocks = cols_ / kBlockElems;
  const bool nibbles = nibble_type(weight_type_);
  for (int64_t i = begin; i < end; ++i) {
    quantize_activations(weight_type_, x + i * cols_, cols_, prepared);
    const int8_t* quants = prepared.quants();
    const float* terms = prepared.block_terms();
    uint8_t* out = buffer_.get() + static_cast<size_t>(i) * stride_;
    if (nibbles) {
      float* offsets =
          terms_.get() + static_cast<size_t>(i / kMaxTileRows) * terms_stride_ + i % kMaxTileRows;
      for (int64_t b = 0; b < blocks; ++b) offsets[kMaxTileRows * b] = terms[2 * b + 1];
      for (int64_t u = 0; u < (blocks + 1) / 2; ++u) {
        uint8_t* unit = out + u * 96;
        std::memset(unit, 0, 96);
        float scale[8] = {};
        for (int64_t half = 0; half < 2 && 2 * u + half < blocks; ++half) {
          const int64_t b = 2 * u + half;
          std::memcpy(unit + 16 * half, quants + 32 * b, 16);
          std::memcpy(unit + 32 + 16 * half, quants + 32 * b + 16, 16);
          for (int lane = 0; lane < 4; ++lane) scale[4 * half + lane] = terms[2 * b];
        }
        std::memcpy(unit + 64, scale, sizeof(scale));
      }
    } else {
      for (int64_t b = 0; b < blocks; ++b) {
        uint8_t* unit = out + b * 64;
        std::memcpy(unit, quants + 32 * b, 32);
        float scale[8];
        std::fill(scale, scale + 8, terms[2 * b]);
        std::memcpy(unit + 32, scale, sizeof(scale));
      }
    }
  }
}

namespace {

void check_prepared(const WeightMatrix& w, const Q8Rows& x) {
  if (x.weight_type() != w.type || x.cols() != w.cols) {
    throw std::invalid_argument(std::string("q8_gemm: activations prepared for ") +
                                std::to_string(x.cols()) + " values of " +
                                tensor_type_name(x.weight_type()) + ", weights are " +
                                std::to_string(w.cols) + " of " + tensor_type_name(w.type));
  }
}

template <template <class> class kRun>
void dispatch(const WeightMatrix& w, const Q8Rows& x, int64_t row_begin, int64_t row_end,
              float* y) {
  check_prepared(w, x);
  switch (w.type) {
    case TensorType::kQ4_0:
      return kRun<Q4_0Format>::run(w, x, row_begin, row_end, y);
    case TensorType::kQ4_1:
      return kRun<Q4_1Format>::run(w, x, row_begin, row_end, y);
    case TensorType::kQ5_0:
      return kRun<Q5_0Format>::run(w, x, row_begin, row_end, y);
    case TensorType::kQ5_1:
      return kRun<Q5_1Format>::run(w, x, row_begin, row_end, y);
    case TensorType::kQ8_0:
      return kRun<Q8_0Format>::run(w, x, row_begin, row_end, y);
    case TensorType::kQ8_1:
      return kRun<Q8_1Format>::run(w, x, row_begin, row_end, y);
    default:
      throw std::invalid_argument(std::string("q8_gemm: no int8 product for ") +
                                  tensor_type_name(w.type));
  }
}

template <class F>
struct Scalar {
  static void run(const WeightMatrix& w, const Q8Rows& x, int64_t row_begin, int64_t row_end,
                  float* y) {
    gemm_scalar<F>(w, x, row_begin, row_end, y);
  }
};

template <class F>
struct Default {
  static void run(const WeightMatrix& w, const Q8Rows& x, int64_t row_begin, int64_t row_end,
                  float* y) {
    gemm<F, true>(w, x, row_begin, row_end, y);
  }
};

template <class F>
struct WithoutVnni {
  static void run(const WeightMatrix& w, const Q8Rows& x, int64_t row_begin, int64_t row_end,
                  float* y) {
    gemm<F, false>(w, x, row_begin, row_end, y);
  }
};

}  // namespace

void q8_gemm(const WeightMatrix& w, const Q8Rows& x, int64_t row_begin, int64_t row_end, float* y) {
  dispatch<Default>(w, x, row_begin, row_end, y);
}

namespace portable {
void q8_gemm(const WeightMatrix& w, const Q8Rows& x, int64_t row_begin, int64_t row_end, float* y) {
  dispatch<Scalar>(w, x, row_begin, row_end, y);
}
}  // namespace portable

namespace without_vnni {
void q8_gemm(const WeightMatrix& w, const Q8Rows& x, int64_t row_begin, int64_t row_end, float* y) {
  dispatch<WithoutVnni>(w, x, row_begin, row_end, y);
}
}  // namespace without_vnni

bool q8_gemm_uses_vnni() {
#if XQ_GEMM_VNNI
  return true;
#else
  return false;
#endif
}

}  // namespace xq::cpu
