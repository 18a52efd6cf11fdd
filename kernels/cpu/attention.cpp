#include "kernels/cpu/attention.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "kernels/cpu/ops.h"
#include "kernels/cpu/thread_pool.h"

namespace xq::cpu {

void causal_attention(const float* q, int64_t q_stride, int32_t n, int32_t pos0, int32_t total,
                      int32_t heads, int32_t kv_heads, int32_t head_dim, const float* keys,
                      const float* values, int64_t head_offset, int64_t row_stride, float* out) {
  const int32_t group = heads / kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  parallel_for(heads, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(static_cast<size_t>(n) * total);
    for (int64_t h = begin; h < end; ++h) {
      const int64_t g = h / group;
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, total, head_dim, scale,
                  q + h * head_dim, static_cast<int>(q_stride), keys + g * head_offset,
                  static_cast<int>(row_stride), 0.0f, scores.data(), total);
      for (int32_t i = 0; i < n; ++i) {
        float* row = scores.data() + static_cast<size_t>(i) * total;
        const int32_t visible = pos0 + i + 1;
        softmax(row, visible);
        std::fill(row + visible, row + total, 0.0f);
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, head_dim, total, 1.0f,
                  scores.data(), total, values + g * head_offset, static_cast<int>(row_stride),
                  0.0f, out + h * head_dim, static_cast<int>(q_stride));
    }
  });
}

void PartialAttention::reset(int64_t row_count, int64_t row_width) {
  rows = row_count;
  width = row_width;
  max.assign(rows, -INFINITY);
  sum.assign(rows, 0.0f);
  acc.assign(static_cast<size_t>(rows) * width, 0.0f);
}

float absorb_scores(PartialAttention& state, int64_t row, float* block_scores, int64_t count) {
  float block_max = -INFINITY;
  for (int64_t t = 0; t < count; ++t) block_max = std::max(block_max, block_scores[t]);
  const float old_max = state.max[row];
  const float new_max = std::max(old_max, block_max);
  // Nothing seen yet (old_max = -inf): the old accumulator is zero and stays so.
  const float rescale = old_max == -INFINITY ? 0.0f : std::exp(old_max - new_max);
  if (rescale != 1.0f) {
    float* acc = state.acc.data() + row * state.width;
    for (int64_t c = 0; c < state.width; ++c) acc[c] *= rescale;
  }
  state.sum[row] = state.sum[row] * rescale + exp_shifted(block_scores, count, new_max);
  state.max[row] = new_max;
  return rescale;
}

void merge_partial_attention(PartialAttention& into, const PartialAttention& from) {
  if (into.rows != from.rows || into.width != from.width)
    throw std::invalid_argument("merge_partial_attention: shapes differ");
  for (int64_t r = 0; r < into.rows; ++r) {
    if (from.max[r] == -INFINITY) continue;  // from saw no tokens for this row
    const float new_max = std::max(into.max[r], from.max[r]);
    const float a = into.max[r] == -INFINITY ? 0.0f : std::exp(into.max[r] - new_max);
    const float b = std::exp(from.max[r] - new_max);
    float* dst = into.acc.data() + r * into.width;
    const float* src = from.acc.data() + r * from.width;
    for (int64_t c = 0; c < into.width; ++c) dst[c] = a * dst[c] + b * src[c];
    into.sum[r] = a * into.sum[r] + b * from.sum[r];
    into.max[r] = new_max;
  }
}

}  // namespace xq::cpu
