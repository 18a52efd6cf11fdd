// fp32 GEMM with a fixed summation order per element (see float_gemm.h).
//
// Tiling, in plain words: both operands keep k contiguous (rows of W and rows
// of x), so a tile is a set of dot products: J weight rows by R x rows, J * R
// accumulators of 8 lanes. Each step of k loads 8 values of each of the J
// weight rows and of the R x rows once and does J * R fma's. A full tile is
// 3 weight rows by 4 x rows (12 accumulators, 3 weight vectors: 15 of the 16
// registers); fewer x rows (all of decode) take more weight rows side by side
// so that enough independent fma's are in flight. Weight rows are walked in
// chunks that stay in L1 while every tile of x passes over them. Nothing is
// packed: decode streams W once, as a matrix-vector product should. Weights
// that are neither F32 nor F16 are dequantized a chunk of rows at a time.
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

constexpr int64_t kChunkRows = 24;  // weight rows per chunk (a multiple of 3, 4, 6, 8)

inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Rows as the kernels read them: F32 and F16 in place, the rest dequantized.
struct Rows {
  const uint8_t* data;
  size_t stride;
  bool half;  // fp16 values, else fp32
};

inline float value_at(const Rows& rows, int64_t r, int64_t k) {
  const uint8_t* row = rows.data + static_cast<size_t>(r) * rows.stride;
  if (rows.half) return fp16_to_fp32(load_u16(row + 2 * k));
  float v;
  std::memcpy(&v, row + 4 * k, sizeof(v));
  return v;
}

// Reduction shared by every path.
inline float reduce_lanes(const float* a) {
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

// One element, lane by lane: what a build without AVX2 runs, and the same
// float operations in the same order as the vector tile.
float element_scalar(const Rows& w, int64_t r, const float* x, int64_t cols) {
  float acc[8] = {};
  for (int64_t k0 = 0; k0 < cols; k0 += 8) {
    for (int lane = 0; lane < 8; ++lane) {
      const int64_t k = k0 + lane;
      const float wk = k < cols ? value_at(w, r, k) : 0.0f;
      const float xk = k < cols ? x[k] : 0.0f;
      acc[lane] = std::fma(xk, wk, acc[lane]);
    }
  }
  return reduce_lanes(acc);
}

void rows_scalar(const Rows& w, int64_t first, int64_t count, const float* x, int64_t n,
                 int64_t cols, float* y, int64_t ldy) {
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t r = 0; r < count; ++r) y[i * ldy + r] = element_scalar(w, r, x + i * cols, cols);
  }
  (void)first;
}

#if XQ_FLOAT_GEMM_AVX2
inline __m256 load8(const Rows& w, int64_t r, int64_t k) {
  const uint8_t* row = w.data + static_cast<size_t>(r) * w.stride;
  if (w.half) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * k)));
  }
  return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + k);
}

// The last, partial group of 8 values of k, zero-padded (never read past).
inline __m256 load_tail(const Rows& w, int64_t r, int64_t k, int64_t count) {
  alignas(32) float v[8] = {};
  for (int64_t t = 0; t < count; ++t) v[t] = value_at(w, r, k + t);
  return _mm256_load_ps(v);
}

inline __m256 load_x_tail(const float* x, int64_t count) {
  alignas(32) float v[8] = {};
  std::memcpy(v, x, static_cast<size_t>(count) * sizeof(float));
  return _mm256_load_ps(v);
}

// {reduce(a), reduce(b), reduce(c), reduce(d)} in reduce_lanes' order.
inline __m128 reduce4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// Decode's weight rows are read once, J side by side; tiles of one or two x
// rows prefetch them this far ahead.
constexpr int64_t kPrefetchDistance = 2048;

// Weight rows [r, r + J) times x rows [0, R) (ldx apart) into y (row i at
// y + i * ldy, column j at + j).
template <int J, int R>
void tile(const Rows& w, int64_t r, const float* x, int64_t ldx, int64_t cols, float* y,
          int64_t ldy) {
  __m256 acc[J][R];
  for (int j = 0; j < J; ++j) {
    for (int i = 0; i < R; ++i) acc[j][i] = _mm256_setzero_ps();
  }
  const int64_t element_bytes = w.half ? 2 : 4;
  int64_t k = 0;
  for (; k + 8 <= cols; k += 8) {
    __m256 wv[J];
    for (int j = 0; j < J; ++j) {
      if constexpr (R <= 2) {
        _mm_prefetch(reinterpret_cast<const char*>(w.data + (r + j) * w.stride + k * element_bytes +
                                                   kPrefetchDistance),
                     _MM_HINT_T0);
      }
      wv[j] = load8(w, r + j, k);
    }
    for (int i = 0; i < R; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + i * ldx + k);
      for (int j = 0; j < J; ++j) acc[j][i] = _mm256_fmadd_ps(xv, wv[j], acc[j][i]);
    }
  }
  if (k < cols) {
    __m256 wv[J];
    for (int j = 0; j < J; ++j) wv[j] = load_tail(w, r + j, k, cols - k);
    for (int i = 0; i < R; ++i) {
      const __m256 xv = load_x_tail(x + i * ldx + k, cols - k);
      for (int j = 0; j < J; ++j) acc[j][i] = _mm256_fmadd_ps(xv, wv[j], acc[j][i]);
    }
  }
  const __m256 zero = _mm256_setzero_ps();
  for (int i = 0; i < R; ++i) {
    for (int j = 0; j < J; j += 4) {
      const __m128 sums =
          reduce4(acc[j][i], j + 1 < J ? acc[j + 1][i] : zero, j + 2 < J ? acc[j + 2][i] : zero,
                  j + 3 < J ? acc[j + 3][i] : zero);
      alignas(16) float out[4];
      _mm_store_ps(out, sums);
      for (int t = 0; t < 4 && j + t < J; ++t) y[i * ldy + j + t] = out[t];
    }
  }
}

// Weight rows [0, count) of w against x rows [0, R).
template <int J, int R>
void tile_rows(const Rows& w, int64_t count, const float* x, int64_t cols, float* y, int64_t ldy) {
  int64_t r = 0;
  for (; r + J <= count; r += J) tile<J, R>(w, r, x, cols, cols, y + r, ldy);
  for (; r < count; ++r) tile<1, R>(w, r, x, cols, cols, y + r, ldy);
}

void rows_vector(const Rows& w, int64_t count, const float* x, int64_t n, int64_t cols, float* y,
                 int64_t ldy) {
  constexpr int64_t kTileRows = 4;
  for (int64_t i0 = 0; i0 < n; i0 += kTileRows) {
    const float* xs = x + i0 * cols;
    float* ys = y + i0 * ldy;
    // Fewer x rows leave registers for more weight rows side by side.
    switch (std::min(kTileRows, n - i0)) {
      case 4:
        tile_rows<3, 4>(w, count, xs, cols, ys, ldy);
        break;
      case 3:
        tile_rows<4, 3>(w, count, xs, cols, ys, ldy);
        break;
      case 2:
        tile_rows<6, 2>(w, count, xs, cols, ys, ldy);
        break;
      default:
        tile_rows<8, 1>(w, count, xs, cols, ys, ldy);
        break;
    }
  }
}
#endif

template <bool kVector>
void float_gemm_with(const WeightMatrix& w, const float* x, int64_t n, int64_t row_begin,
                     int64_t row_end, float* y) {
  // Per thread and grow-only: no allocation once the largest shape was seen.
  static thread_local std::vector<float> dequantized_buffer;
  const bool direct = w.type == TensorType::kF32 || w.type == TensorType::kF16;
  if (!direct && dequantized_buffer.size() < static_cast<size_t>(kChunkRows * w.cols))
    dequantized_buffer.resize(static_cast<size_t>(kChunkRows * w.cols));
  for (int64_t first = row_begin; first < row_end; first += kChunkRows) {
    const int64_t count = std::min(kChunkRows, row_end - first);
    Rows rows{w.row(first), w.row_bytes, w.type == TensorType::kF16};
    if (!direct) {
      for (int64_t c = 0; c < count; ++c)
        dequantize_row(w.type, w.row(first + c), dequantized_buffer.data() + c * w.cols, w.cols);
      rows = Rows{reinterpret_cast<const uint8_t*>(dequantized_buffer.data()),
                  static_cast<size_t>(w.cols) * sizeof(float), false};
    }
#if XQ_FLOAT_GEMM_AVX2
    if constexpr (kVector) {
      rows_vector(rows, count, x, n, w.cols, y + first, w.rows);
      continue;
    }
#endif
    rows_scalar(rows, first, count, x, n, w.cols, y + first, w.rows);
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
