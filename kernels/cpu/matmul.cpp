#include "kernels/cpu/matmul.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "kernels/cpu/float_gemm.h"
#include "kernels/cpu/quant.h"
#include "kernels/cpu/quant_gemm.h"
#include "kernels/cpu/thread_pool.h"

namespace xq::cpu {
namespace {

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
  if (n <= 0 || w.rows <= 0) return;
  // Threads split the rows of W (columns of y), never k: which thread or tile
  // computes an element does not change its sum.
  constexpr int64_t kRowsPerThread = 16;
  const MatmulPath path = matmul_path();
  if (path == MatmulPath::kAuto && has_q8_gemm(w.type)) {
    // Workers must see the caller's buffer, not their own thread_local copy.
    static thread_local Q8Rows prepared_by_caller;
    Q8Rows& prepared = prepared_by_caller;
    prepared.reset(w.type, n, w.cols);
    parallel_for(
        n, [&](int64_t begin, int64_t end) { prepared.quantize(x, begin, end); }, 4);
    parallel_for(
        w.rows, [&](int64_t begin, int64_t end) { q8_gemm(w, prepared, begin, end, y); },
        kRowsPerThread);
    return;
  }
  static thread_local std::vector<float> rounded_by_caller;
  if (path == MatmulPath::kFloatRoundedAsQ8) {
    rounded_by_caller.resize(static_cast<size_t>(n * w.cols));
    round_as_q8(x, n, w.cols, rounded_by_caller.data());
    x = rounded_by_caller.data();
  }
  parallel_for(
      w.rows, [&](int64_t begin, int64_t end) { float_gemm(w, x, n, begin, end, y); },
      kRowsPerThread);
}

}  // namespace xq::cpu
