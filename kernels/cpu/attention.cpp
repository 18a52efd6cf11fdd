#include "kernels/cpu/attention.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
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

}  // namespace xq::cpu
