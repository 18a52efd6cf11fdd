// fp32 GEMM with a fixed summation order per element (see float_gemm.h).
//
// Tiling, in plain words: the weight rows are taken 16 at a time (a panel).
// For each range of up to 256 values of k, the panel's weights are copied
// transposed into a small buffer (panel[k][16], 16 KB, which stays in L1), so
// that one step of k is two vectors of 16 weights. Every row of x then passes
// over the panel in tiles of 6 rows: 12 accumulators of 8 lanes, each lane
// one output element; per step of k each row's x[k] is broadcast and
// multiplied into both vectors. Between ranges of k the running sums go to y
// and come back unchanged, so an element's chain of fma's is the same whether
// k was cut or not, and the same in every tile shape (a short last tile of x,
// a panel padded with zero rows) and in the scalar code.
#include "kernels/cpu/float_gemm.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/cpu/quant.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define XQ_FLOAT_GEMM_AVX2 1
#include <immintrin.h>
#endif

namespace xq::cpu {
namespace {

constexpr int kPanelRows = 16;
constexpr int64_t kDepth = 256;  // values of k per packed panel
constexpr int kTileRows = 6;     // rows of x per tile

inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void prefetch_line(const uint8_t* p) {
#if XQ_FLOAT_GEMM_AVX2
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
#else
  (void)p;
#endif
}

// Weights that are neither F32 nor F16 are dequantized a panel at a time.
bool read_directly(TensorType type) {
  return type == TensorType::kF32 || type == TensorType::kF16;
}

// Weight (row r, column k) as fp32, for F32 / F16 in place or from the rows
// dequantized into `dequantized` (row r - first at (r - first) * cols).
inline float weight_at(const WeightMatrix& w, const float* dequantized, int64_t first, int64_t r,
                       int64_t k) {
  if (w.type == TensorType::kF32) {
    float v;
    std::memcpy(&v, w.row(r) + 4 * k, sizeof(v));
    return v;
  }
  if (w.type == TensorType::kF16) return fp16_to_fp32(load_u16(w.row(r) + 2 * k));
  return dequantized[(r - first) * w.cols + k];
}

#if XQ_FLOAT_GEMM_AVX2
// In place: rows become columns of the 8 x 8 block.
inline void transpose8(__m256 (&v)[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
  const __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
  const __m256 t4 = _mm256_unpacklo_ps(v[4], v[5]), t5 = _mm256_unpackhi_ps(v[4], v[5]);
  const __m256 t6 = _mm256_unpacklo_ps(v[6], v[7]), t7 = _mm256_unpackhi_ps(v[6], v[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xee);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xee);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xee);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xee);
  v[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  v[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  v[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  v[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  v[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  v[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  v[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  v[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

#endif

// panel[p * 16 + c] = weight (first + c, k0 + p) for p < depth, c < 16; rows
// at or past first + count are zero.
#if XQ_FLOAT_GEMM_AVX2
// The vector part of the pack for one source format (0: fp32 rows at a
// stride, 1: fp16 rows at a stride), so that the loop holds no branch on the
// type. `rows[c]` points at row c's value k0; rows past count are zeros.
template <int kFormat>
void pack_vector(const uint8_t* const* rows, int count, int64_t depth, float* panel) {
  for (int64_t p = 0; p + 8 <= depth; p += 8) {
    for (int group = 0; group < kPanelRows; group += 8) {
      __m256 v[8];
      for (int c = 0; c < 8; ++c) {
        const uint8_t* row = rows[group + c];
        if (group + c >= count) {
          v[c] = _mm256_setzero_ps();
        } else if constexpr (kFormat == 1) {
          v[c] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * p)));
        } else {
          v[c] = _mm256_loadu_ps(reinterpret_cast<const float*>(row) + p);
        }
      }
      transpose8(v);
      for (int t = 0; t < 8; ++t) _mm256_storeu_ps(panel + (p + t) * kPanelRows + group, v[t]);
    }
  }
}
#endif

template <bool kVector>
void pack_panel(const WeightMatrix& w, const float* dequantized, int64_t first, int count,
                int64_t k0, int64_t depth, float* panel) {
  int64_t p = 0;
#if XQ_FLOAT_GEMM_AVX2
  if constexpr (kVector) {
    const uint8_t* rows[kPanelRows];
    for (int c = 0; c < kPanelRows; ++c) {
      const int64_t r = first + std::min(c, count - 1);
      if (w.type == TensorType::kF32 || w.type == TensorType::kF16) {
        rows[c] = w.row(r) + k0 * (w.type == TensorType::kF16 ? 2 : 4);
      } else {
        rows[c] = reinterpret_cast<const uint8_t*>(dequantized + (r - first) * w.cols + k0);
      }
    }
    if (w.type == TensorType::kF16) {
      pack_vector<1>(rows, count, depth, panel);
    } else {
      pack_vector<0>(rows, count, depth, panel);
    }
    p = depth / 8 * 8;
  }
#endif
  for (; p < depth; ++p) {
    for (int c = 0; c < kPanelRows; ++c) {
      panel[p * kPanelRows + c] =
          c < count ? weight_at(w, dequantized, first, first + c, k0 + p) : 0.0f;
    }
  }
}

#if XQ_FLOAT_GEMM_AVX2
inline void row_step(const float* a, __m256 b0, __m256 b1, __m256& lo, __m256& hi) {
  const __m256 av = _mm256_broadcast_ss(a);
  lo = _mm256_fmadd_ps(av, b0, lo);
  hi = _mm256_fmadd_ps(av, b1, hi);
}

// R rows of x (ldx apart, from column k0 already applied) times the panel over
// `depth` steps into c (R x 16, ldc apart). With `resume` the sums continue
// from c's values. The accumulators are named variables: GCC keeps an array
// of vectors on the stack.
template <int R>
void tile(int64_t depth, const float* x, int64_t ldx, const float* panel, float* c, int64_t ldc,
          bool resume) {
  static_assert(R >= 1 && R <= kTileRows);
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
         c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  if (resume) {
    auto load = [&](int r, __m256& lo, __m256& hi) {
      lo = _mm256_loadu_ps(c + r * ldc);
      hi = _mm256_loadu_ps(c + r * ldc + 8);
    };
    load(0, c00, c01);
    if constexpr (R > 1) load(1, c10, c11);
    if constexpr (R > 2) load(2, c20, c21);
    if constexpr (R > 3) load(3, c30, c31);
    if constexpr (R > 4) load(4, c40, c41);
    if constexpr (R > 5) load(5, c50, c51);
  }
  for (int64_t p = 0; p < depth; ++p) {
    const __m256 b0 = _mm256_loadu_ps(panel + p * kPanelRows);
    const __m256 b1 = _mm256_loadu_ps(panel + p * kPanelRows + 8);
    row_step(x + p, b0, b1, c00, c01);
    if constexpr (R > 1) row_step(x + ldx + p, b0, b1, c10, c11);
    if constexpr (R > 2) row_step(x + 2 * ldx + p, b0, b1, c20, c21);
    if constexpr (R > 3) row_step(x + 3 * ldx + p, b0, b1, c30, c31);
    if constexpr (R > 4) row_step(x + 4 * ldx + p, b0, b1, c40, c41);
    if constexpr (R > 5) row_step(x + 5 * ldx + p, b0, b1, c50, c51);
  }
  auto store = [&](int r, __m256 lo, __m256 hi) {
    _mm256_storeu_ps(c + r * ldc, lo);
    _mm256_storeu_ps(c + r * ldc + 8, hi);
  };
  store(0, c00, c01);
  if constexpr (R > 1) store(1, c10, c11);
  if constexpr (R > 2) store(2, c20, c21);
  if constexpr (R > 3) store(3, c30, c31);
  if constexpr (R > 4) store(4, c40, c41);
  if constexpr (R > 5) store(5, c50, c51);
}

void tile_rows_vector(int rows, int64_t depth, const float* x, int64_t ldx, const float* panel,
                      float* c, int64_t ldc, bool resume) {
  switch (rows) {
    case 6:
      return tile<6>(depth, x, ldx, panel, c, ldc, resume);
    case 5:
      return tile<5>(depth, x, ldx, panel, c, ldc, resume);
    case 4:
      return tile<4>(depth, x, ldx, panel, c, ldc, resume);
    case 3:
      return tile<3>(depth, x, ldx, panel, c, ldc, resume);
    case 2:
      return tile<2>(depth, x, ldx, panel, c, ldc, resume);
    default:
      return tile<1>(depth, x, ldx, panel, c, ldc, resume);
  }
}
#endif

// The same chain per element as the vector tile, one element at a time.
void tile_rows_scalar(int rows, int64_t depth, const float* x, int64_t ldx, const float* panel,
                      float* c, int64_t ldc, bool resume) {
  for (int r = 0; r < rows; ++r) {
    for (int j = 0; j < kPanelRows; ++j) {
      float sum = resume ? c[r * ldc + j] : 0.0f;
      for (int64_t p = 0; p < depth; ++p)
        sum = std::fma(x[r * ldx + p], panel[p * kPanelRows + j], sum);
      c[r * ldc + j] = sum;
    }
  }
}

template <bool kVector>
void tile_rows(int rows, int64_t depth, const float* x, int64_t ldx, const float* panel, float* c,
               int64_t ldc, bool resume) {
#if XQ_FLOAT_GEMM_AVX2
  if constexpr (kVector) return tile_rows_vector(rows, depth, x, ldx, panel, c, ldc, resume);
#endif
  tile_rows_scalar(rows, depth, x, ldx, panel, c, ldc, resume);
}

template <bool kVector>
void float_gemm_with(const WeightMatrix& w, const float* x, int64_t n, int64_t row_begin,
                     int64_t row_end, float* y) {
  // Per thread and grow-only: no allocation once the largest shape was seen.
  static thread_local std::vector<float> panel_buffer, dequantized_buffer;
  std::vector<float>& panel = panel_buffer;
  if (panel.size() < static_cast<size_t>(kPanelRows * kDepth)) panel.resize(kPanelRows * kDepth);
  const bool direct = read_directly(w.type);
  if (!direct && dequantized_buffer.size() < static_cast<size_t>(kPanelRows * w.cols))
    dequantized_buffer.resize(static_cast<size_t>(kPanelRows * w.cols));
  const int64_t ldy = w.rows;
  for (int64_t first = row_begin; first < row_end; first += kPanelRows) {
    const int count = static_cast<int>(std::min<int64_t>(kPanelRows, row_end - first));
    if (!direct) {
      for (int c = 0; c < count; ++c)
        dequantize_row(w.type, w.row(first + c), dequantized_buffer.data() + c * w.cols, w.cols);
    }
    // The pack reads 16 rows side by side, a short run of each, which the
    // hardware prefetchers follow poorly; decode would wait on memory. Each
    // range of k therefore prefetches its share of the next panel's bytes.
    const int64_t ranges = (w.cols + kDepth - 1) / kDepth;
    const size_t next_bytes =
        direct && first + kPanelRows < row_end
            ? static_cast<size_t>(std::min<int64_t>(kPanelRows, row_end - first - kPanelRows)) *
                  w.row_bytes
            : 0;
    const size_t share = (next_bytes / static_cast<size_t>(ranges) + 63) / 64 * 64;
    for (int64_t k0 = 0; k0 < w.cols; k0 += kDepth) {
      const int64_t depth = std::min(kDepth, w.cols - k0);
      const uint8_t* ahead = next_bytes ? w.row(first + kPanelRows) : nullptr;
      for (size_t offset = static_cast<size_t>(k0 / kDepth) * share;
           ahead && offset < std::min(next_bytes, static_cast<size_t>(k0 / kDepth + 1) * share);
           offset += 64)
        prefetch_line(ahead + offset);
      pack_panel<kVector>(w, dequantized_buffer.data(), first, count, k0, depth, panel.data());
      const bool resume = k0 > 0;
      for (int64_t i0 = 0; i0 < n; i0 += kTileRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kTileRows, n - i0));
        const float* xs = x + i0 * w.cols + k0;
        float* ys = y + i0 * ldy + first;
        if (count == kPanelRows) {
          tile_rows<kVector>(rows, depth, xs, w.cols, panel.data(), ys, ldy, resume);
        } else {
          // A panel padded with zero rows: its tile goes through a buffer so
          // that y's columns past the panel are not written.
          float partial[kTileRows * kPanelRows] = {};
          for (int r = 0; r < rows && resume; ++r)
            std::memcpy(partial + r * kPanelRows, ys + r * ldy, count * sizeof(float));
          tile_rows<kVector>(rows, depth, xs, w.cols, panel.data(), partial, kPanelRows, resume);
          for (int r = 0; r < rows; ++r)
            std::memcpy(ys + r * ldy, partial + r * kPanelRows, count * sizeof(float));
        }
      }
    }
  }
}

}  // namespace

void float_gemm(const WeightMatrix& w, const float* x, int64_t n, int64_t row_begin,
                int64_t row_end, float* y) {
  float_gemm_with<true>(w, x, n, row_begin, row_end, y);
}

namespace portable {
void float_gemm(const WeightMatrix& w, const float* x, int64_t n, int64_t row_begin,
                int64_t row_end, float* y) {
  float_gemm_with<false>(w, x, n, row_begin, row_end, y);
}
}  // namespace portable

}  // namespace xq::cpu
