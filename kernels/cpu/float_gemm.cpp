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
#include "kernels/cpu/unaligned_load.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define XQ_FLOAT_GEMM_AVX2 1
#include <immintrin.h>
#endif

namespace xq::cpu {
namespace {

constexpr int kPanelRows = 16;
constexpr int64_t kDepth = 256;  // values of k per packed panel
constexpr int kTileRows = 6;     // rows of x per tile

inline void prefetch_line(const uint8_t* p) {
#if XQ_FLOAT_GEMM_AVX2
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1);
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

#if XQ_FLOAT_GEMM_AVX2
// Few rows of x (decode): packing a panel costs more than the few products
// that use it, and each weight is wanted once. The weights instead stream
// through registers: 32 weight rows at a time, 8 values of k at a time, each
// 8 x 8 block of (row, k) loaded and transposed in registers so that vector
// t holds value k + t of 8 rows. Each x row keeps 4 accumulators (lanes:
// the 32 weight rows), so 4 chains per x row are in flight while each lane is
// still one fma chain over k in order. While a group is summed, the next
// group's bytes are prefetched into L2, a share per step of k: its 32 rows
// are otherwise 32 short streams that the hardware prefetchers follow poorly
// (into L2, not L1: a group is larger than L1, and prefetching it there
// evicted the lines still in use, at half the bandwidth). Up to 8 rows of x
// this beats packing panels.
constexpr int kStreamRows = 32;
constexpr int64_t kStreamTileX = 4;  // rows of x per pass over a group
constexpr int64_t kMaxStreamX = 8;   // rows of x up to which W streams

template <int kFormat, int R>
void stream_group(const uint8_t* const* rows, int count, int64_t cols, const float* x, int64_t ldx,
                  float* y, int64_t ldy, const uint8_t* ahead, size_t ahead_bytes) {
  constexpr int kBlocks = kStreamRows / 8;
  __m256 acc[R][kBlocks];
  for (int i = 0; i < R; ++i) {
    for (int b = 0; b < kBlocks; ++b) acc[i][b] = _mm256_setzero_ps();
  }
  const int64_t steps = cols / 8;
  const size_t share = steps > 0 ? (ahead_bytes / static_cast<size_t>(steps) + 64) / 64 * 64 : 0;
  size_t prefetched = 0;
  for (int64_t k = 0; k + 8 <= cols; k += 8) {
    for (size_t end = std::min(ahead_bytes, prefetched + share); prefetched < end; prefetched += 64)
      _mm_prefetch(reinterpret_cast<const char*>(ahead + prefetched), _MM_HINT_T1);
#pragma GCC unroll 4
    for (int b = 0; b < kBlocks; ++b) {
      __m256 v[8];
      for (int c = 0; c < 8; ++c) {
        const uint8_t* row = rows[8 * b + c];
        if constexpr (kFormat == 1) {
          v[c] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * k)));
        } else {
          v[c] = _mm256_loadu_ps(reinterpret_cast<const float*>(row) + k);
        }
      }
      transpose8(v);
      for (int t = 0; t < 8; ++t) {
        for (int i = 0; i < R; ++i)
          acc[i][b] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + i * ldx + k + t), v[t], acc[i][b]);
      }
    }
  }
  // Values of k past the last multiple of 8 continue each lane's chain.
  const int64_t done = steps * 8;
  for (int i = 0; i < R; ++i) {
    alignas(32) float sums[kStreamRows];
    for (int b = 0; b < kBlocks; ++b) _mm256_store_ps(sums + 8 * b, acc[i][b]);
    for (int c = 0; c < count; ++c) {
      float sum = sums[c];
      for (int64_t k = done; k < cols; ++k) {
        const float w = kFormat == 1 ? fp16_to_fp32(load_u16(rows[c] + 2 * k))
                                     : reinterpret_cast<const float*>(rows[c])[k];
        sum = std::fma(x[i * ldx + k], w, sum);
      }
      y[i * ldy + c] = sum;
    }
  }
}

template <int kFormat>
void stream_group_rows(int64_t n, const uint8_t* const* rows, int count, int64_t cols,
                       const float* x, float* y, int64_t ldy, const uint8_t* ahead,
                       size_t ahead_bytes) {
  switch (n) {
    case 4:
      return stream_group<kFormat, 4>(rows, count, cols, x, cols, y, ldy, ahead, ahead_bytes);
    case 3:
      return stream_group<kFormat, 3>(rows, count, cols, x, cols, y, ldy, ahead, ahead_bytes);
    case 2:
      return stream_group<kFormat, 2>(rows, count, cols, x, cols, y, ldy, ahead, ahead_bytes);
    default:
      return stream_group<kFormat, 1>(rows, count, cols, x, cols, y, ldy, ahead, ahead_bytes);
  }
}

// Weight rows [row_begin, row_end) against n <= kMaxStreamX rows of x.
void float_gemm_stream(const WeightMatrix& w, const float* x, int64_t n, int64_t row_begin,
                       int64_t row_end, float* y) {
  static thread_local std::vector<float> dequantized_buffer;
  const bool direct = read_directly(w.type);
  if (!direct && dequantized_buffer.size() < static_cast<size_t>(kStreamRows * w.cols))
    dequantized_buffer.resize(static_cast<size_t>(kStreamRows * w.cols));
  for (int64_t first = row_begin; first < row_end; first += kStreamRows) {
    const int count = static_cast<int>(std::min<int64_t>(kStreamRows, row_end - first));
    // Rows past count repeat the last one; their sums are not stored.
    const uint8_t* rows[kStreamRows];
    for (int c = 0; c < kStreamRows; ++c) {
      const int64_t r = first + std::min(c, count - 1);
      rows[c] =
          direct
              ? w.row(r)
              : reinterpret_cast<const uint8_t*>(dequantized_buffer.data() + (r - first) * w.cols);
    }
    if (!direct) {
      for (int c = 0; c < count; ++c)
        dequantize_row(w.type, w.row(first + c), dequantized_buffer.data() + c * w.cols, w.cols);
    }
    const int64_t next = first + kStreamRows;
    const uint8_t* ahead = direct && next < row_end ? w.row(next) : nullptr;
    const size_t ahead_bytes =
        ahead ? static_cast<size_t>(std::min<int64_t>(kStreamRows, row_end - next)) * w.row_bytes
              : 0;
    // More than 4 rows of x go 4 at a time over the group, which stays in L2;
    // the first pass prefetches the next group.
    for (int64_t i0 = 0; i0 < n; i0 += kStreamTileX) {
      const int64_t tile = std::min(kStreamTileX, n - i0);
      const float* xs = x + i0 * w.cols;
      float* ys = y + i0 * w.rows + first;
      const size_t bytes = i0 == 0 ? ahead_bytes : 0;
      if (w.type == TensorType::kF16) {
        stream_group_rows<1>(tile, rows, count, w.cols, xs, ys, w.rows, ahead, bytes);
      } else {
        stream_group_rows<0>(tile, rows, count, w.cols, xs, ys, w.rows, ahead, bytes);
      }
    }
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
#if XQ_FLOAT_GEMM_AVX2
  if constexpr (kVector) {
    if (n <= kMaxStreamX) return float_gemm_stream(w, x, n, row_begin, row_end, y);
  }
#endif
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
    // hardware prefetchers follow poorly. Each range of k therefore prefetches
    // its share of the next panel's bytes into L2.
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
