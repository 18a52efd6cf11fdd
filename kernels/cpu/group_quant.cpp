// Bit packing, group quantizers and dequantizers of the XQuant caches (CPU).
// The dequantizers are the hot part: attention runs them over every cached
// token at every decode step, so they have AVX2 paths that turn 8 codes into
// 8 floats with one broadcast (plus a byte shuffle for 5..7 bits), one
// variable shift, one mask, one conversion and one multiply-add.
#include "kernels/cpu/group_quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/cpu/quant.h"
#include "kernels/error.h"
#include "kernels/group_quant.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace xq::cpu {
namespace {

void check_bits(int bits) {
  if (bits < 1 || bits > 8) {
    throw std::invalid_argument("group quantization: bits must be 1..8, got " +
                                std::to_string(bits));
  }
}

void check_groups(int64_t count, int64_t group_size) {
  if (group_size <= 0 || count < 0 || count % group_size != 0) {
    throw std::invalid_argument("group quantization: count " + std::to_string(count) +
                                " is not a multiple of group size " + std::to_string(group_size));
  }
}

// Calls f with std::integral_constant<int, bits>, so each kernel is compiled
// once per bit width with its shifts and masks as constants.
template <class F>
void with_bits(int bits, F&& f) {
  switch (bits) {
    case 1:
      return f(std::integral_constant<int, 1>{});
    case 2:
      return f(std::integral_constant<int, 2>{});
    case 3:
      return f(std::integral_constant<int, 3>{});
    case 4:
      return f(std::integral_constant<int, 4>{});
    case 5:
      return f(std::integral_constant<int, 5>{});
    case 6:
      return f(std::integral_constant<int, 6>{});
    case 7:
      return f(std::integral_constant<int, 7>{});
    case 8:
      return f(std::integral_constant<int, 8>{});
    default:
      check_bits(bits);
  }
}

// ---------------------------------------------------------------------------
// Bit stream. Eight codes fill exactly kBits bytes, so whole chunks of 8 are
// packed through one 64-bit word (no code straddles a chunk); the few codes
// after the last whole chunk go bit by bit.

template <int kBits>
constexpr unsigned kCodeMask = (1u << kBits) - 1;

template <int kBits>
inline void pack_chunk(const uint8_t* codes, uint8_t* out) {
  if constexpr (kBits == 8) {
    std::memcpy(out, codes, 8);
  } else {
    uint64_t word = 0;
    for (int i = 0; i < 8; ++i) {
      word |= static_cast<uint64_t>(codes[i] & kCodeMask<kBits>) << (i * kBits);
    }
    // Byte by byte rather than memcpy of the word: the stream is little-endian
    // by definition, whatever the machine.
    for (int b = 0; b < kBits; ++b) out[b] = static_cast<uint8_t>(word >> (8 * b));
  }
}

template <int kBits>
inline void unpack_chunk(const uint8_t* packed, uint8_t* codes) {
  if constexpr (kBits == 8) {
    std::memcpy(codes, packed, 8);
  } else {
    uint64_t word = 0;
    for (int b = 0; b < kBits; ++b) word |= static_cast<uint64_t>(packed[b]) << (8 * b);
    for (int i = 0; i < 8; ++i) {
      codes[i] = static_cast<uint8_t>((word >> (i * kBits)) & kCodeMask<kBits>);
    }
  }
}

// The code at stream index `index`. A code spans at most two bytes; the
// second is read only when the code reaches into it, so this never reads past
// the stream.
inline unsigned read_code(const uint8_t* packed, int64_t index, int bits) {
  const int64_t bit = index * bits;
  const int shift = static_cast<int>(bit & 7);
  unsigned window = packed[bit >> 3];
  if (shift + bits > 8) window |= static_cast<unsigned>(packed[(bit >> 3) + 1]) << 8;
  return (window >> shift) & ((1u << bits) - 1);
}

template <int kBits>
void pack_stream(const uint8_t* codes, int64_t count, uint8_t* out) {
  const int64_t chunks = count / 8;
  for (int64_t j = 0; j < chunks; ++j) pack_chunk<kBits>(codes + 8 * j, out + kBits * j);
  // Tail: fewer than 8 codes, fewer than kBits bytes, starting byte-aligned.
  uint8_t* tail = out + kBits * chunks;
  uint32_t pending = 0;
  int pending_bits = 0;
  for (int64_t i = 8 * chunks; i < count; ++i) {
    pending |= (codes[i] & kCodeMask<kBits>) << pending_bits;
    pending_bits += kBits;
    if (pending_bits >= 8) {
      *tail++ = static_cast<uint8_t>(pending);
      pending >>= 8;
      pending_bits -= 8;
    }
  }
  if (pending_bits > 0) *tail = static_cast<uint8_t>(pending);
}

template <int kBits>
void unpack_stream(const uint8_t* packed, int64_t count, uint8_t* codes) {
  const int64_t chunks = count / 8;
  for (int64_t j = 0; j < chunks; ++j) unpack_chunk<kBits>(packed + kBits * j, codes + 8 * j);
  for (int64_t i = 8 * chunks; i < count; ++i) {
    codes[i] = static_cast<uint8_t>(read_code(packed, i, kBits));
  }
}

// ---------------------------------------------------------------------------
// Grids <-> stored parameters

GroupGrid grid_of(GroupParams params) {
  return GroupGrid{fp16_to_fp32(params.scale_fp16), fp16_to_fp32(params.zero_fp16)};
}

GroupParams params_of(GroupGrid grid) {
  // Exact: choose_group_grid returns fp16 values.
  return GroupParams{fp32_to_fp16(grid.scale), fp32_to_fp16(grid.zero)};
}

std::string describe_unstorable(float value) {
  if (std::isnan(value)) return "NaN";
  if (std::isinf(value)) return value > 0 ? "+infinity" : "-infinity";
  return std::to_string(value) + ", beyond the fp16 range (|x| <= 65504)";
}

bool storable(float value) {
  return std::fabs(value) <= kFp16Max;  // false for NaN too
}

GroupGrid grid_for_group(float min, float max, int bits) {
  GroupGrid grid{};
  // Cannot fail: every value was checked to be storable first.
  choose_group_grid(min, max, bits, &grid);
  return grid;
}

// ---------------------------------------------------------------------------
// Scalar dequantization of a run of stream indices [first, first + n); value
// i of the run uses grid_at(i). Whole chunks of 8 go through unpack_chunk.

template <int kBits, class GridAt>
void decode_run_scalar(const uint8_t* packed, int64_t first, int64_t n, const GridAt& grid_at,
                       float* out) {
  int64_t i = 0;
  for (; i < n && (first + i) % 8 != 0; ++i) {
    out[i] = group_decode(static_cast<int>(read_code(packed, first + i, kBits)), grid_at(i));
  }
  uint8_t codes[8];
  for (; i + 8 <= n; i += 8) {
    unpack_chunk<kBits>(packed + (first + i) / 8 * kBits, codes);
    for (int k = 0; k < 8; ++k) out[i + k] = group_decode(codes[k], grid_at(i + k));
  }
  for (; i < n; ++i) {
    out[i] = group_decode(static_cast<int>(read_code(packed, first + i, kBits)), grid_at(i));
  }
}

// Per-channel grids of columns [first_col, first_col + n) as floats, in
// blocks that fit on the stack, so a tile of rows reuses one conversion.
constexpr int64_t kColumnBlock = 256;

void column_grids(const GroupParams* params, int64_t first_col, int64_t n, float* scales,
                  float* zeros) {
  for (int64_t c = 0; c < n; ++c) {
    const GroupGrid grid = grid_of(params[first_col + c]);
    scales[c] = grid.scale;
    zeros[c] = grid.zero;
  }
}

#if defined(__AVX2__)
// ---------------------------------------------------------------------------
// AVX2 dequantization: 8 codes (kBits bytes at a chunk boundary) -> 8 int32
// lanes. Up to 4 bits the chunk fits one 32-bit word, broadcast and shifted
// per lane; 8 bits is a zero extension; 5..7 bits broadcast the 64-bit chunk
// and give each lane, by a byte shuffle, the 32-bit window its code starts
// in. kWide allows loading 4 (or 8) bytes even when the chunk is shorter:
// only where the caller knows that many bytes exist. The narrow load
// assembles the word in registers (a short memcpy into a word goes through
// the stack and stalls store forwarding).

template <int kBits, bool kWide, class Word>
inline Word load_word(const uint8_t* src) {
  Word word = 0;
  if constexpr (kWide) {
    std::memcpy(&word, src, sizeof(Word));
  } else {
    for (int b = 0; b < kBits; ++b) word |= static_cast<Word>(src[b]) << (8 * b);
  }
  return word;
}

// For 5..7 bits: the vpshufb control putting bytes [i*kBits/8, +4) of the
// chunk (zero past its 8 bytes) in lane i, and the shifts left within them.
template <int kBits>
struct WindowTables {
  alignas(32) int8_t shuffle[32];
  alignas(32) int32_t shifts[8];
  constexpr WindowTables() : shuffle{}, shifts{} {
    for (int lane = 0; lane < 8; ++lane) {
      const int first_byte = lane * kBits / 8;
      for (int b = 0; b < 4; ++b) {
        const int byte = first_byte + b;
        shuffle[4 * lane + b] = static_cast<int8_t>(byte < 8 ? byte : -128);
      }
      shifts[lane] = lane * kBits % 8;
    }
  }
};

template <int kBits>
constexpr WindowTables<kBits> kWindowTables{};

template <int kBits, bool kWide>
inline __m256i load_codes8(const uint8_t* src) {
  if constexpr (kBits == 8) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src)));
  } else if constexpr (kBits <= 4) {
    const auto word = load_word<kBits, kWide, uint32_t>(src);
    const __m256i shifts = _mm256_setr_epi32(0, kBits, 2 * kBits, 3 * kBits, 4 * kBits, 5 * kBits,
                                             6 * kBits, 7 * kBits);
    return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts),
                            _mm256_set1_epi32(kCodeMask<kBits>));
  } else {
    const auto word = load_word<kBits, kWide, uint64_t>(src);
    const __m256i chunk = _mm256_set1_epi64x(static_cast<int64_t>(word));
    const auto& tables = kWindowTables<kBits>;
    const __m256i windows = _mm256_shuffle_epi8(
        chunk, _mm256_load_si256(reinterpret_cast<const __m256i*>(tables.shuffle)));
    return _mm256_and_si256(
        _mm256_srlv_epi32(windows,
                          _mm256_load_si256(reinterpret_cast<const __m256i*>(tables.shifts))),
        _mm256_set1_epi32(kCodeMask<kBits>));
  }
}

// grid_of without a call per group: F16C converts in registers.
inline GroupGrid grid_of_inline(GroupParams params) {
#if defined(__F16C__)
  return GroupGrid{_cvtsh_ss(params.scale_fp16), _cvtsh_ss(params.zero_fp16)};
#else
  return grid_of(params);
#endif
}

struct UniformGridAvx2 {
  __m256 scale, zero;
  __m256 scale_at(int64_t) const { return scale; }
  __m256 zero_at(int64_t) const { return zero; }
};

struct ColumnGridsAvx2 {
  const float* scales;
  const float* zeros;
  __m256 scale_at(int64_t chunk) const { return _mm256_loadu_ps(scales + 8 * chunk); }
  __m256 zero_at(int64_t chunk) const { return _mm256_loadu_ps(zeros + 8 * chunk); }
};

// `chunks` chunks of 8 codes starting at src (chunks * kBits bytes) -> out.
// `readable_bytes` (>= chunks * kBits) may be read from src: the rest of the
// stream, so that only the last chunk or two of a call load narrowly.
template <int kBits, class Grids>
inline void decode_chunks_avx2(const uint8_t* src, int64_t chunks, int64_t readable_bytes,
                               const Grids& grids, float* out) {
  constexpr int64_t kWideBytes = kBits <= 4 ? 4 : 8;
  // Chunk j may load kWideBytes when j * kBits + kWideBytes <= readable_bytes.
  const int64_t wide_end =
      std::min(chunks, readable_bytes >= kWideBytes ? (readable_bytes - kWideBytes) / kBits + 1
                                                    : int64_t{0});
  int64_t j = 0;
#pragma GCC unroll 4
  for (; j < wide_end; ++j) {
    const __m256 codes = _mm256_cvtepi32_ps(load_codes8<kBits, true>(src + j * kBits));
    _mm256_storeu_ps(out + 8 * j, _mm256_fmadd_ps(codes, grids.scale_at(j), grids.zero_at(j)));
  }
  for (; j < chunks; ++j) {
    const __m256 codes = _mm256_cvtepi32_ps(load_codes8<kBits, false>(src + j * kBits));
    _mm256_storeu_ps(out + 8 * j, _mm256_fmadd_ps(codes, grids.scale_at(j), grids.zero_at(j)));
  }
}

void dequantize_groups_avx2(const uint8_t* packed_codes, const GroupParams* params, int64_t count,
                            int64_t group_size, int bits, float* out) {
  with_bits(bits, [&](auto bits_constant) {
    constexpr int kBits = decltype(bits_constant)::value;
    const int64_t groups = count / group_size;
    const auto stream_bytes = static_cast<int64_t>(packed_bytes(kBits, count));
    for (int64_t g = 0; g < groups; ++g) {
      const GroupGrid grid = grid_of_inline(params[g]);
      const UniformGridAvx2 grids{_mm256_set1_ps(grid.scale), _mm256_set1_ps(grid.zero)};
      const int64_t first_byte = g * group_size / 8 * kBits;
      decode_chunks_avx2<kBits>(packed_codes + first_byte, group_size / 8,
                                stream_bytes - first_byte, grids, out + g * group_size);
    }
  });
}

void dequantize_strided_rows_avx2(const uint8_t* packed_codes, const GroupParams* params,
                                  int64_t cols, int bits, int64_t first_row, int64_t row_count,
                                  float* out, int64_t out_stride) {
  alignas(32) float scales[kColumnBlock];
  alignas(32) float zeros[kColumnBlock];
  with_bits(bits, [&](auto bits_constant) {
    constexpr int kBits = decltype(bits_constant)::value;
    // The caller's stream ends with the last row asked for.
    const auto stream_bytes =
        static_cast<int64_t>(packed_bytes(kBits, (first_row + row_count) * cols));
    for (int64_t first_col = 0; first_col < cols; first_col += kColumnBlock) {
      const int64_t width = std::min(kColumnBlock, cols - first_col);
      column_grids(params, first_col, width, scales, zeros);
      const ColumnGridsAvx2 grids{scales, zeros};
      for (int64_t r = 0; r < row_count; ++r) {
        const int64_t first_byte = ((first_row + r) * cols + first_col) / 8 * kBits;
        decode_chunks_avx2<kBits>(packed_codes + first_byte, width / 8, stream_bytes - first_byte,
                                  grids, out + r * out_stride + first_col);
      }
    }
  });
}
#endif  // __AVX2__

// ---------------------------------------------------------------------------
// Quantizer helpers. The encoders give exactly group_encode's codes (the
// nearest grid point, ties up, decided by exact midpoint comparisons); the
// vector one only starts from a different estimate (a multiply by the
// reciprocal instead of a division), which the midpoint correction absorbs.

// Index of the first value that is NaN, infinite or beyond the fp16 range, or
// -1 when all are storable.
int64_t first_unstorable(const float* x, int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__)
  const __m256 limit = _mm256_set1_ps(kFp16Max);
  const __m256 magnitude_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (; i + 8 <= n; i += 8) {
    const __m256 magnitude = _mm256_and_ps(_mm256_loadu_ps(x + i), magnitude_mask);
    // Ordered compare: NaN fails it like a value beyond the range.
    if (_mm256_movemask_ps(_mm256_cmp_ps(magnitude, limit, _CMP_LE_OQ)) != 0xff) break;
  }
#endif
  for (; i < n; ++i) {
    if (!storable(x[i])) return i;
  }
  return -1;
}

struct MinMax {
  float min, max;
};

// Of n >= 1 storable values.
MinMax min_max(const float* x, int64_t n) {
  MinMax range{x[0], x[0]};
  int64_t i = 0;
#if defined(__AVX2__)
  if (n >= 8) {
    __m256 low = _mm256_loadu_ps(x), high = low;
    for (i = 8; i + 8 <= n; i += 8) {
      const __m256 v = _mm256_loadu_ps(x + i);
      low = _mm256_min_ps(low, v);
      high = _mm256_max_ps(high, v);
    }
    alignas(32) float lows[8], highs[8];
    _mm256_store_ps(lows, low);
    _mm256_store_ps(highs, high);
    range = MinMax{lows[0], highs[0]};
    for (int k = 1; k < 8; ++k) {
      range.min = std::min(range.min, lows[k]);
      range.max = std::max(range.max, highs[k]);
    }
  }
#endif
  for (; i < n; ++i) {
    range.min = std::min(range.min, x[i]);
    range.max = std::max(range.max, x[i]);
  }
  return range;
}

#if defined(__AVX2__)
// A chunk of 8 codes; lane k uses scale[k], zero[k], inverse[k] (1 / scale,
// or 0) and max_code[k] (0 for a zero scale, so such lanes stay at code 0).
inline void encode8_avx2(const float* x, __m256 scale, __m256 zero, __m256 inverse, __m256 max_code,
                         uint8_t* codes) {
  const __m256 value = _mm256_loadu_ps(x);
  const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
  __m256 code = _mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(value, zero), inverse),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  code = _mm256_min_ps(_mm256_max_ps(code, _mm256_setzero_ps()), max_code);
  // Exact midpoints (see kernels/group_quant.h): step up, then down.
  const __m256 upper_mid = _mm256_fmadd_ps(_mm256_add_ps(code, half), scale, zero);
  const __m256 up = _mm256_and_ps(_mm256_cmp_ps(code, max_code, _CMP_LT_OQ),
                                  _mm256_cmp_ps(value, upper_mid, _CMP_GE_OQ));
  code = _mm256_add_ps(code, _mm256_and_ps(up, one));
  const __m256 lower_mid = _mm256_fmadd_ps(_mm256_sub_ps(code, half), scale, zero);
  const __m256 down = _mm256_and_ps(_mm256_cmp_ps(code, _mm256_setzero_ps(), _CMP_GT_OQ),
                                    _mm256_cmp_ps(value, lower_mid, _CMP_LT_OQ));
  code = _mm256_sub_ps(code, _mm256_and_ps(down, one));
  const __m256i lanes = _mm256_cvtps_epi32(code);
  const __m128i words =
      _mm_packus_epi32(_mm256_castsi256_si128(lanes), _mm256_extracti128_si256(lanes, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(codes), _mm_packus_epi16(words, words));
}
#endif

// Codes of n values of one group.
void encode_uniform(const float* x, int64_t n, GroupGrid grid, int bits, uint8_t* codes) {
  int64_t i = 0;
#if defined(__AVX2__)
  const bool flat = !(grid.scale > 0.0f);
  const __m256 scale = _mm256_set1_ps(grid.scale), zero = _mm256_set1_ps(grid.zero);
  const __m256 inverse = _mm256_set1_ps(flat ? 0.0f : 1.0f / grid.scale);
  const __m256 max_code = _mm256_set1_ps(flat ? 0.0f : static_cast<float>(group_max_code(bits)));
  for (; i + 8 <= n; i += 8) encode8_avx2(x + i, scale, zero, inverse, max_code, codes + i);
#endif
  for (; i < n; ++i) codes[i] = static_cast<uint8_t>(group_encode(x[i], grid, bits));
}

// Codes of rows whose column c is a group with its own grid.
class ColumnEncoder {
 public:
  ColumnEncoder(int64_t cols, int bits)
      : cols_(cols), bits_(bits), grids_(static_cast<size_t>(cols)) {
#if defined(__AVX2__)
    for (auto* lanes : {&scales_, &zeros_, &inverses_, &max_codes_}) {
      lanes->resize(static_cast<size_t>(cols));
    }
#endif
  }

  void set_column(int64_t c, GroupGrid grid) {
    grids_[c] = grid;
#if defined(__AVX2__)
    const bool flat = !(grid.scale > 0.0f);
    scales_[c] = grid.scale;
    zeros_[c] = grid.zero;
    inverses_[c] = flat ? 0.0f : 1.0f / grid.scale;
    max_codes_[c] = flat ? 0.0f : static_cast<float>(group_max_code(bits_));
#endif
  }

  void encode_row(const float* row, uint8_t* codes) const {
    int64_t c = 0;
#if defined(__AVX2__)
    for (; c + 8 <= cols_; c += 8) {
      encode8_avx2(row + c, _mm256_loadu_ps(&scales_[c]), _mm256_loadu_ps(&zeros_[c]),
                   _mm256_loadu_ps(&inverses_[c]), _mm256_loadu_ps(&max_codes_[c]), codes + c);
    }
#endif
    for (; c < cols_; ++c) codes[c] = static_cast<uint8_t>(group_encode(row[c], grids_[c], bits_));
  }

 private:
  int64_t cols_;
  int bits_;
  std::vector<GroupGrid> grids_;
#if defined(__AVX2__)
  std::vector<float> scales_, zeros_, inverses_, max_codes_;
#endif
};

}  // namespace

// ---------------------------------------------------------------------------
// Packing

size_t packed_bytes(int bits, int64_t count) {
  check_bits(bits);
  return static_cast<size_t>((static_cast<int64_t>(bits) * count + 7) / 8);
}

void pack_codes(const uint8_t* codes, int64_t count, int bits, uint8_t* out) {
  with_bits(bits, [&](auto bits_constant) {
    pack_stream<decltype(bits_constant)::value>(codes, count, out);
  });
}

void unpack_codes(const uint8_t* packed, int64_t count, int bits, uint8_t* codes) {
  with_bits(bits, [&](auto bits_constant) {
    unpack_stream<decltype(bits_constant)::value>(packed, count, codes);
  });
}

// ---------------------------------------------------------------------------
// Quantization. Every value is checked before anything is written, so a bad
// activation leaves the cache untouched; codes go through a bounded scratch
// buffer, flushed at multiples of 8 codes so each flush starts on a byte.

void quantize_groups(const float* x, int64_t count, int64_t group_size, int bits,
                     uint8_t* packed_codes, GroupParams* params) {
  check_bits(bits);
  check_groups(count, group_size);
  const int64_t bad = first_unstorable(x, count);
  if (bad >= 0) {
    throw Error("group quantization: value at index " + std::to_string(bad) + " is " +
                describe_unstorable(x[bad]));
  }
  const int64_t groups = count / group_size;
  // 8 groups at a time: 8 * group_size codes always end on a byte boundary.
  const int64_t groups_per_flush = 8;
  std::vector<uint8_t> codes(static_cast<size_t>(std::min(groups, groups_per_flush) * group_size));
  for (int64_t first_group = 0; first_group < groups; first_group += groups_per_flush) {
    const int64_t flush_groups = std::min(groups_per_flush, groups - first_group);
    for (int64_t k = 0; k < flush_groups; ++k) {
      const int64_t g = first_group + k;
      const float* values = x + g * group_size;
      const MinMax range = min_max(values, group_size);
      const GroupGrid grid = grid_for_group(range.min, range.max, bits);
      params[g] = params_of(grid);
      encode_uniform(values, group_size, grid, bits, codes.data() + k * group_size);
    }
    pack_codes(codes.data(), flush_groups * group_size, bits,
               packed_codes + packed_bytes(bits, first_group * group_size));
  }
}

void quantize_strided(const float* x, int64_t rows, int64_t cols, int64_t row_stride, int bits,
                      uint8_t* packed_codes, GroupParams* params) {
  check_bits(bits);
  if (rows <= 0 || cols < 0 || row_stride < cols) {
    throw std::invalid_argument("group quantization: bad strided block " + std::to_string(rows) +
                                " x " + std::to_string(cols) + ", row stride " +
                                std::to_string(row_stride));
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t bad = first_unstorable(x + r * row_stride, cols);
    if (bad >= 0) {
      throw Error("group quantization: value at row " + std::to_string(r) + ", column " +
                  std::to_string(bad) + " is " + describe_unstorable(x[r * row_stride + bad]));
    }
  }
  // Row by row, so x is read contiguously: running column minima and maxima.
  std::vector<float> col_min(x, x + cols), col_max(x, x + cols);
  for (int64_t r = 1; r < rows; ++r) {
    const float* row = x + r * row_stride;
    for (int64_t c = 0; c < cols; ++c) {
      col_min[c] = row[c] < col_min[c] ? row[c] : col_min[c];
      col_max[c] = row[c] > col_max[c] ? row[c] : col_max[c];
    }
  }
  ColumnEncoder encoder(cols, bits);
  for (int64_t c = 0; c < cols; ++c) {
    const GroupGrid grid = grid_for_group(col_min[c], col_max[c], bits);
    params[c] = params_of(grid);
    encoder.set_column(c, grid);
  }
  // Token-major codes (see the header), 8 rows per flush: 8 * cols codes end
  // on a byte boundary whatever cols is.
  const int64_t rows_per_flush = 8;
  std::vector<uint8_t> codes(static_cast<size_t>(std::min(rows, rows_per_flush) * cols));
  for (int64_t first_row = 0; first_row < rows; first_row += rows_per_flush) {
    const int64_t flush_rows = std::min(rows_per_flush, rows - first_row);
    for (int64_t k = 0; k < flush_rows; ++k) {
      encoder.encode_row(x + (first_row + k) * row_stride, codes.data() + k * cols);
    }
    pack_codes(codes.data(), flush_rows * cols, bits,
               packed_codes + packed_bytes(bits, first_row * cols));
  }
}

// ---------------------------------------------------------------------------
// Dequantization

namespace portable {

void dequantize_groups(const uint8_t* packed_codes, const GroupParams* params, int64_t count,
                       int64_t group_size, int bits, float* out) {
  check_groups(count, group_size);
  with_bits(bits, [&](auto bits_constant) {
    constexpr int kBits = decltype(bits_constant)::value;
    for (int64_t g = 0; g < count / group_size; ++g) {
      const GroupGrid grid = grid_of(params[g]);
      decode_run_scalar<kBits>(
          packed_codes, g * group_size, group_size, [grid](int64_t) { return grid; },
          out + g * group_size);
    }
  });
}

void dequantize_strided_rows(const uint8_t* packed_codes, const GroupParams* params, int64_t cols,
                             int bits, int64_t first_row, int64_t row_count, float* out,
                             int64_t out_stride) {
  float scales[kColumnBlock];
  float zeros[kColumnBlock];
  with_bits(bits, [&](auto bits_constant) {
    constexpr int kBits = decltype(bits_constant)::value;
    for (int64_t first_col = 0; first_col < cols; first_col += kColumnBlock) {
      const int64_t width = std::min(kColumnBlock, cols - first_col);
      column_grids(params, first_col, width, scales, zeros);
      const auto grid_at = [&](int64_t i) { return GroupGrid{scales[i], zeros[i]}; };
      for (int64_t r = 0; r < row_count; ++r) {
        decode_run_scalar<kBits>(packed_codes, (first_row + r) * cols + first_col, width, grid_at,
                                 out + r * out_stride + first_col);
      }
    }
  });
}

}  // namespace portable

void dequantize_groups(const uint8_t* packed_codes, const GroupParams* params, int64_t count,
                       int64_t group_size, int bits, float* out) {
#if defined(__AVX2__)
  check_bits(bits);
  check_groups(count, group_size);
  if (group_size % 8 == 0) {
    dequantize_groups_avx2(packed_codes, params, count, group_size, bits, out);
    return;
  }
#endif
  portable::dequantize_groups(packed_codes, params, count, group_size, bits, out);
}

void dequantize_strided_rows(const uint8_t* packed_codes, const GroupParams* params, int64_t cols,
                             int bits, int64_t first_row, int64_t row_count, float* out,
                             int64_t out_stride) {
#if defined(__AVX2__)
  check_bits(bits);
  if (cols % 8 == 0) {
    dequantize_strided_rows_avx2(packed_codes, params, cols, bits, first_row, row_count, out,
                                 out_stride);
    return;
  }
#endif
  portable::dequantize_strided_rows(packed_codes, params, cols, bits, first_row, row_count, out,
                                    out_stride);
}

void dequantize_strided(const uint8_t* packed_codes, const GroupParams* params, int64_t rows,
                        int64_t cols, int bits, float* out, int64_t out_stride) {
  dequantize_strided_rows(packed_codes, params, cols, bits, 0, rows, out, out_stride);
}

}  // namespace xq::cpu
