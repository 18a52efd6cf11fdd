#include "kernels/cpu/small_gemm.h"

#include <immintrin.h>

namespace xq::cpu {
namespace {

#if defined(__AVX2__) && defined(__FMA__)
// A tile of kRows rows of C by 16 columns in 2 * kRows registers: each step of
// k loads 16 values of B once and broadcasts one value of A per row. The
// accumulators are named variables, not an array: GCC writes an array of
// vectors back to the stack on every step.
template <int kRows>
void tile_16(int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
             int64_t ldc, bool accumulate) {
  static_assert(kRows >= 1 && kRows <= 6);
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
         c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t p = 0; p < k; ++p) {
    const __m256 b0 = _mm256_loadu_ps(b + p * ldb), b1 = _mm256_loadu_ps(b + p * ldb + 8);
    __m256 av = _mm256_broadcast_ss(a + p);
    c00 = _mm256_fmadd_ps(av, b0, c00);
    c01 = _mm256_fmadd_ps(av, b1, c01);
    if constexpr (kRows > 1) {
      av = _mm256_broadcast_ss(a + lda + p);
      c10 = _mm256_fmadd_ps(av, b0, c10);
      c11 = _mm256_fmadd_ps(av, b1, c11);
    }
    if constexpr (kRows > 2) {
      av = _mm256_broadcast_ss(a + 2 * lda + p);
      c20 = _mm256_fmadd_ps(av, b0, c20);
      c21 = _mm256_fmadd_ps(av, b1, c21);
    }
    if constexpr (kRows > 3) {
      av = _mm256_broadcast_ss(a + 3 * lda + p);
      c30 = _mm256_fmadd_ps(av, b0, c30);
      c31 = _mm256_fmadd_ps(av, b1, c31);
    }
    if constexpr (kRows > 4) {
      av = _mm256_broadcast_ss(a + 4 * lda + p);
      c40 = _mm256_fmadd_ps(av, b0, c40);
      c41 = _mm256_fmadd_ps(av, b1, c41);
    }
    if constexpr (kRows > 5) {
      av = _mm256_broadcast_ss(a + 5 * lda + p);
      c50 = _mm256_fmadd_ps(av, b0, c50);
      c51 = _mm256_fmadd_ps(av, b1, c51);
    }
  }
  const __m256 tile[6][2] = {{c00, c01}, {c10, c11}, {c20, c21},
                             {c30, c31}, {c40, c41}, {c50, c51}};
  for (int r = 0; r < kRows; ++r) {
    __m256 lo = tile[r][0], hi = tile[r][1];
    if (accumulate) {
      lo = _mm256_add_ps(lo, _mm256_loadu_ps(c + r * ldc));
      hi = _mm256_add_ps(hi, _mm256_loadu_ps(c + r * ldc + 8));
    }
    _mm256_storeu_ps(c + r * ldc, lo);
    _mm256_storeu_ps(c + r * ldc + 8, hi);
  }
}
#endif

void scalar_block(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                  int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      float sum = accumulate ? c[i * ldc + j] : 0.0f;
      for (int64_t p = 0; p < k; ++p) sum += a[i * lda + p] * b[p * ldb + j];
      c[i * ldc + j] = sum;
    }
}

}  // namespace

void gemm_small(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
  for (; j + 16 <= n; j += 16) {
    int64_t i = 0;
    for (; i + 6 <= m; i += 6)
      tile_16<6>(k, a + i * lda, lda, b + j, ldb, c + i * ldc + j, ldc, accumulate);
    switch (m - i) {
      case 5:
        tile_16<5>(k, a + i * lda, lda, b + j, ldb, c + i * ldc + j, ldc, accumulate);
        break;
      case 4:
        tile_16<4>(k, a + i * lda, lda, b + j, ldb, c + i * ldc + j, ldc, accumulate);
        break;
      case 3:
        tile_16<3>(k, a + i * lda, lda, b + j, ldb, c + i * ldc + j, ldc, accumulate);
        break;
      case 2:
        tile_16<2>(k, a + i * lda, lda, b + j, ldb, c + i * ldc + j, ldc, accumulate);
        break;
      case 1:
        tile_16<1>(k, a + i * lda, lda, b + j, ldb, c + i * ldc + j, ldc, accumulate);
        break;
      default:
        break;
    }
  }
#endif
  if (j < n) scalar_block(m, n - j, k, a, lda, b + j, ldb, c + j, ldc, accumulate);
}

namespace {

#if defined(__AVX2__) && defined(__FMA__)
// The eight lane sums of v0..v7 as one vector: result[j] = sum of vj's lanes.
inline __m256 sum_lanes_8(__m256 v0, __m256 v1, __m256 v2, __m256 v3, __m256 v4, __m256 v5,
                          __m256 v6, __m256 v7) {
  const __m256 s01 = _mm256_hadd_ps(v0, v1), s23 = _mm256_hadd_ps(v2, v3);
  const __m256 s45 = _mm256_hadd_ps(v4, v5), s67 = _mm256_hadd_ps(v6, v7);
  const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
  // s0123 = [0 1 2 3 | 0 1 2 3] partial halves (low lanes, high lanes); likewise s4567.
  const __m256 low = _mm256_permute2f128_ps(s0123, s4567, 0x20);
  const __m256 high = _mm256_permute2f128_ps(s0123, s4567, 0x31);
  return _mm256_add_ps(low, high);
}
#endif

}  // namespace

void scores_against_rows(int64_t rows, int64_t n, const float* queries, int64_t ldq, int64_t count,
                         const float* keys, int64_t ldk, float scale, float* out, int64_t ldo) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* query = queries + r * ldq;
    float* dst = out + r * ldo;
    int64_t t = 0;
#if defined(__AVX2__) && defined(__FMA__)
    if (n % 8 == 0) {
      const __m256 scale8 = _mm256_set1_ps(scale);
      for (; t + 8 <= count; t += 8) {
        __m256 acc[8];
        for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
        for (int64_t i = 0; i < n; i += 8) {
          const __m256 qv = _mm256_loadu_ps(query + i);
          for (int j = 0; j < 8; ++j)
            acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(keys + (t + j) * ldk + i), acc[j]);
        }
        _mm256_storeu_ps(dst + t,
                         _mm256_mul_ps(scale8, sum_lanes_8(acc[0], acc[1], acc[2], acc[3], acc[4],
                                                           acc[5], acc[6], acc[7])));
      }
    }
#endif
    for (; t < count; ++t) {
      float sum = 0.0f;
      for (int64_t i = 0; i < n; ++i) sum += query[i] * keys[t * ldk + i];
      dst[t] = sum * scale;
    }
  }
}

}  // namespace xq::cpu
