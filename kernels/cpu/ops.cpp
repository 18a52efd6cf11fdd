#include "kernels/cpu/ops.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "kernels/cpu/quant.h"
#include "kernels/cpu/thread_pool.h"

namespace xq::cpu {

void rmsnorm(const float* x, const float* gamma, float* out, int64_t rows, int64_t dim, float eps) {
  parallel_for(
      rows,
      [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const float* row = x + r * dim;
          double sum_sq =
              0;  // double: a long row of large activations must not lose the small ones
          for (int64_t i = 0; i < dim; ++i) sum_sq += static_cast<double>(row[i]) * row[i];
          float scale = 1.0f / std::sqrt(static_cast<float>(sum_sq / dim) + eps);
          float* dst = out + r * dim;
          for (int64_t i = 0; i < dim; ++i) dst[i] = row[i] * scale * gamma[i];
        }
      },
      16);
}

void rope_table(float* cos_sin, int64_t max_position, int64_t rope_dim, float theta) {
  for (int64_t p = 0; p < max_position; ++p) {
    for (int64_t i = 0; i < rope_dim / 2; ++i) {
      // double for the angle: positions up to 10^5 times frequencies near 1 lose
      // digits in float before the cosine is taken.
      double inv_freq = std::pow(static_cast<double>(theta), -2.0 * i / rope_dim);
      double angle = static_cast<double>(p) * inv_freq;
      cos_sin[(p * (rope_dim / 2) + i) * 2] = static_cast<float>(std::cos(angle));
      cos_sin[(p * (rope_dim / 2) + i) * 2 + 1] = static_cast<float>(std::sin(angle));
    }
  }
}

void rope(float* x, const int32_t* positions, int64_t rows, int64_t heads, int64_t head_dim,
          int64_t rope_dim, RopeLayout layout, const float* cos_sin) {
  const int64_t pairs = rope_dim / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const float* table = cos_sin + static_cast<int64_t>(positions[r]) * pairs * 2;
    for (int64_t h = 0; h < heads; ++h) {
      float* head = x + (r * heads + h) * head_dim;
      int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
      if (layout == RopeLayout::kInterleaved) {
        // Four pairs at a time: x = [a0 b0 a1 b1 ..], table = [c0 s0 c1 s1 ..];
        // even lanes a c - b s, odd lanes b c + a s.
        for (; i + 4 <= pairs; i += 4) {
          const __m256 x = _mm256_loadu_ps(head + 2 * i), t = _mm256_loadu_ps(table + 2 * i);
          const __m256 swapped = _mm256_permute_ps(x, 0xB1);
          _mm256_storeu_ps(head + 2 * i,
                           _mm256_fmaddsub_ps(x, _mm256_moveldup_ps(t),
                                              _mm256_mul_ps(swapped, _mm256_movehdup_ps(t))));
        }
      }
#endif
      for (; i < pairs; ++i) {
        float c = table[2 * i], s = table[2 * i + 1];
        if (layout == RopeLayout::kInterleaved) {
          rope_rotate(head[2 * i], head[2 * i + 1], c, s);
        } else {
          rope_rotate(head[i], head[i + pairs], c, s);
        }
      }
    }
  }
}

void swiglu(const float* gate, float* x, int64_t n) {
  parallel_for(
      n,
      [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) x[i] *= silu(gate[i]);
      },
      4096);
}

namespace {

#if defined(__AVX2__) && defined(__FMA__)
// exp(x) for 8 floats: x = k ln2 + r with |r| <= ln2/2, exp(r) by a degree-6
// polynomial (relative error ~2e-7, i.e. float rounding), 2^k built in the
// exponent bits. Inputs below -87 flush to 0, as softmax wants.
inline __m256 exp8(__m256 x) {
  const __m256 max_x = _mm256_set1_ps(88.0f), min_x = _mm256_set1_ps(-87.0f);
  x = _mm256_min_ps(_mm256_max_ps(x, min_x), max_x);
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  __m256i exponent =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(exponent));
}
#endif

}  // namespace

float exp_shifted(float* x, int64_t n, float shift) {
  int64_t i = 0;
  double sum = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 shift8 = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), shift8));
    _mm256_storeu_ps(x + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, acc);
  for (float lane : lanes) sum += lane;
#endif
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - shift);
    sum += x[i];
  }
  return static_cast<float>(sum);
}

float softmax(float* x, int64_t n) {
  float max_value = -INFINITY;
  for (int64_t i = 0; i < n; ++i) max_value = std::max(max_value, x[i]);
  const double sum = exp_shifted(x, n, max_value);
  const float inv = static_cast<float>(1.0 / sum);
  for (int64_t j = 0; j < n; ++j) x[j] *= inv;
  return static_cast<float>(std::log(sum)) + max_value;
}

void add(float* y, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

}  // namespace xq::cpu

namespace xq::cpu {

void fp16_to_fp32_row(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
#endif
  for (; i < n; ++i) dst[i] = fp16_to_fp32(src[i]);
}

void fp32_to_fp16_row(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
#endif
  for (; i < n; ++i) dst[i] = fp32_to_fp16(src[i]);
}

}  // namespace xq::cpu

namespace xq::cpu {

float dot_fp16(const float* x, const uint16_t* y, int64_t n) {
  int64_t i = 0;
  float sum = 0;
#if defined(__F16C__) && defined(__FMA__)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    __m256 y0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(y + i)));
    __m256 y1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(y + i + 8)));
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), y0, acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), y1, acc1);
  }
  for (; i + 8 <= n; i += 8) {
    __m256 y0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(y + i)));
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), y0, acc0);
  }
  __m256 acc = _mm256_add_ps(acc0, acc1);
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  half = _mm_add_ps(half, _mm_movehl_ps(half, half));
  half = _mm_add_ss(half, _mm_movehdup_ps(half));
  sum = _mm_cvtss_f32(half);
#endif
  for (; i < n; ++i) sum += x[i] * fp16_to_fp32(y[i]);
  return sum;
}

void axpy_fp16(float a, const uint16_t* x, float* y, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__) && defined(__FMA__)
  const __m256 scale = _mm256_set1_ps(a);
  for (; i + 8 <= n; i += 8) {
    __m256 x0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i)));
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(scale, x0, _mm256_loadu_ps(y + i)));
  }
#endif
  for (; i < n; ++i) y[i] += a * fp16_to_fp32(x[i]);
}

}  // namespace xq::cpu
