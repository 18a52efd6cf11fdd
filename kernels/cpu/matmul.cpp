#include "kernels/cpu/matmul.h"

#include <cblas.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "kernels/cpu/quant.h"
#include "kernels/cpu/thread_pool.h"

namespace xq::cpu {
namespace {

// Below this many rows of x, reading W once per row of x costs less than
// dequantizing it for a GEMM.
constexpr int64_t kMaxRowsForDotPath = 8;

std::atomic<MatmulPath> path_in_use{MatmulPath::kAuto};

// x (n rows of cols) rounded as the int8 path rounds it (quantize_activations:
// per block of 32, q = nearbyint(x * 127 / max|x|), value q * max|x| / 127),
// back in fp32. A last block shorter than 32 (fp32 models with such widths)
// gets its own scale.
void round_as_q8(const float* x, int64_t n, int64_t cols, float* out) {
  constexpr int64_t kBlock = 32;
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t begin = 0; begin < cols; begin += kBlock) {
      const float* in = x + t * cols + begin;
      float* rounded = out + t * cols + begin;
      const int64_t size = std::min(kBlock, cols - begin);
      float max_abs = 0;
      for (int64_t i = 0; i < size; ++i) max_abs = std::max(max_abs, std::fabs(in[i]));
      const float inverse = max_abs > 0 ? 127.0f / max_abs : 0.0f;
      const float scale = max_abs / 127.0f;
      for (int64_t i = 0; i < size; ++i) rounded[i] = scale * std::nearbyint(in[i] * inverse);
    }
  }
}

}  // namespace

void set_matmul_path(MatmulPath path) {
  path_in_use.store(path, std::memory_order_relaxed);
}

MatmulPath matmul_path() {
  return path_in_use.load(std::memory_order_relaxed);
}

void matrix_row_to_float(const WeightMatrix& w, int64_t r, float* dst) {
  dequantize_row(w.type, w.row(r), dst, w.cols);
}

void matmul(const WeightMatrix& w, const float* x, int64_t n, float* y) {
  const MatmulPath path = matmul_path();
  if (n <= kMaxRowsForDotPath && path == MatmulPath::kAuto) {
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
  static thread_local std::vector<float> rounded_by_caller;
  if (path == MatmulPath::kFloatRoundedAsQ8) {
    rounded_by_caller.resize(static_cast<size_t>(n * w.cols));
    round_as_q8(x, n, w.cols, rounded_by_caller.data());
    x = rounded_by_caller.data();
  }
  if (n <= kMaxRowsForDotPath) {
    // fp32 x with few rows (kFloat, kFloatRoundedAsQ8): each weight row
    // dequantized into a buffer that stays in L1 and dotted in fp32, rather
    // than the whole of W dequantized for one GEMM.
    parallel_for(
        w.rows,
        [&](int64_t begin, int64_t end) {
          std::vector<float> buffer(w.type == TensorType::kF32 ? 0 : static_cast<size_t>(w.cols));
          for (int64_t r = begin; r < end; ++r) {
            const float* row = reinterpret_cast<const float*>(w.row(r));
            if (w.type != TensorType::kF32) {
              dequantize_row(w.type, w.row(r), buffer.data(), w.cols);
              row = buffer.data();
            }
            for (int64_t t = 0; t < n; ++t)
              y[t * w.rows + r] = cblas_sdot(static_cast<int>(w.cols), row, 1, x + t * w.cols, 1);
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
