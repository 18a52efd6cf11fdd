#include "kernels/cpu/matmul.h"

#include <cblas.h>

#include <vector>

#include "kernels/cpu/quant.h"
#include "kernels/cpu/thread_pool.h"

namespace xq::cpu {
namespace {

// Below this many rows of x, reading W once per row of x costs less than
// dequantizing it for a GEMM.
constexpr int64_t kMaxRowsForDotPath = 8;

}  // namespace

void matrix_row_to_float(const WeightMatrix& w, int64_t r, float* dst) {
  dequantize_row(w.type, w.row(r), dst, w.cols);
}

void matmul(const WeightMatrix& w, const float* x, int64_t n, float* y) {
  if (n <= kMaxRowsForDotPath) {
    // Workers must see the caller's buffers, not their own thread_local copies.
    static thread_local std::vector<QuantizedActivations> prepared_by_caller;
    std::vector<QuantizedActivations>& prepared = prepared_by_caller;
    if (static_cast<int64_t>(prepared.size()) < n) prepared.resize(n);
    for (int64_t t = 0; t < n; ++t)
      quantize_activations(w.type, x + t * w.cols, w.cols, prepared[t]);
    parallel_for(
        w.rows,
        [&](int64_t begin, int64_t end) {
          for (int64_t t = 0; t < n; ++t) {
            dot_rows(w.type, w.row(begin), w.row_bytes, end - begin, prepared[t], w.cols,
                     y + t * w.rows + begin);
          }
        },
        16);
    return;
  }
  // OpenBLAS runs single-threaded (see thread_pool.cpp); each of our threads
  // dequantizes its own slice of W's rows and multiplies it, so one pool owns
  // the cores and no two sets of threads spin against each other.
  static thread_local std::vector<float> dequantized_by_caller;
  std::vector<float>& dequantized = dequantized_by_caller;
  if (w.type != TensorType::kF32) dequantized.resize(static_cast<size_t>(w.rows * w.cols));
  // fp32 weights are used in place with their row stride, which is larger than
  // cols for a column slice (tensor parallelism); dequantized ones are packed.
  const int ldw = w.type == TensorType::kF32 ? static_cast<int>(w.row_bytes / sizeof(float))
                                             : static_cast<int>(w.cols);
  parallel_for(
      w.rows,
      [&](int64_t begin, int64_t end) {
        const float* slice = reinterpret_cast<const float*>(w.row(begin));
        if (w.type != TensorType::kF32) {
          for (int64_t r = begin; r < end; ++r)
            dequantize_row(w.type, w.row(r), dequantized.data() + r * w.cols, w.cols);
          slice = dequantized.data() + begin * w.cols;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(n),
                    static_cast<int>(end - begin), static_cast<int>(w.cols), 1.0f, x,
                    static_cast<int>(w.cols), slice, ldw, 0.0f, y + begin,
                    static_cast<int>(w.rows));
      },
      64);
}

}  // namespace xq::cpu
