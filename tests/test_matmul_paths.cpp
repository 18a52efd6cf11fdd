// cpu::matmul's paths against each other under derived bounds (see matmul.h):
// the int8-activation decode path differs from fp32 activations by at most
// its rounding error carried through the weights, and from x rounded the same
// way in fp32 arithmetic (kFloatRoundedAsQ8) by fp32 rounding alone. Whichever
// instruction set the dot products were compiled for (scalar, AVX2), these
// bounds hold, which is what the parallel tests' noise floors rest on.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "kernels/cpu/matmul.h"
#include "kernels/cpu/quant.h"

namespace xq {
namespace {

constexpr float kUnitRoundoff = 0x1p-24f;

struct PathScope {
  explicit PathScope(cpu::MatmulPath path) { cpu::set_matmul_path(path); }
  ~PathScope() { cpu::set_matmul_path(cpu::MatmulPath::kAuto); }
};

std::vector<float> multiply(const WeightMatrix& w, const std::vector<float>& x, int64_t n,
                            cpu::MatmulPath path) {
  PathScope scope(path);
  std::vector<float> y(static_cast<size_t>(n * w.rows));
  cpu::matmul(w, x.data(), n, y.data());
  return y;
}

TEST(MatmulPaths, Int8DecodeWithinItsRoundingBoundOfFp32) {
  const int64_t rows = 48, cols = 256;  // 8 blocks of 32
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> values(static_cast<size_t>(rows * cols));
  for (float& v : values) v = normal(rng);
  for (TensorType type : {TensorType::kQ4_0, TensorType::kQ4_1, TensorType::kQ8_0}) {
    const TensorTypeTraits& t = tensor_type_traits(type);
    const size_t row_bytes = static_cast<size_t>(cols / t.block_elems * t.block_bytes);
    std::vector<uint8_t> data(row_bytes * rows);
    std::vector<float> w(values.size());  // the weights as the fp32 paths see them
    for (int64_t r = 0; r < rows; ++r) {
      cpu::quantize_row(type, values.data() + r * cols, data.data() + r * row_bytes, cols);
      cpu::dequantize_row(type, data.data() + r * row_bytes, w.data() + r * cols, cols);
    }
    const WeightMatrix matrix{type, data.data(), rows, cols, row_bytes};
    for (int64_t n : {1, 5, 20}) {  // the int8 path takes every n: a short tile, a full one
      std::vector<float> x(static_cast<size_t>(n * cols));
      for (float& v : x) v = normal(rng);
      x[7] = 25.0f;  // an outlier: its block's scale is large
      const std::vector<float> int8 = multiply(matrix, x, n, cpu::MatmulPath::kAuto);
      const std::vector<float> fp32 = multiply(matrix, x, n, cpu::MatmulPath::kFloat);
      const std::vector<float> rounded = multiply(matrix, x, n, cpu::MatmulPath::kFloatRoundedAsQ8);
      float largest = 0;
      for (int64_t i = 0; i < n; ++i) {
        const float* xi = x.data() + i * cols;
        for (int64_t r = 0; r < rows; ++r) {
          const float* wr = w.data() + r * cols;
          // Rounding: each block of 32 has scale s = max|x| / 127 and every
          // element moves by at most s / 2, so y moves by at most
          // sum over blocks of s / 2 * sum |w| in the block.
          double rounding = 0, magnitude = 0;
          for (int64_t b = 0; b < cols; b += 32) {
            float max_abs = 0, weight_sum = 0;
            for (int64_t j = b; j < b + 32; ++j) {
              max_abs = std::max(max_abs, std::fabs(xi[j]));
              weight_sum += std::fabs(wr[j]);
              magnitude += std::fabs(wr[j]) * (std::fabs(xi[j]) + max_abs / 254);
            }
            rounding += max_abs / 127 / 2 * weight_sum;
          }
          // fp32 arithmetic: a sum of cols products is within (cols + 2) u
          // sum |w x| of the exact one, on either side of a comparison.
          const double arithmetic = 2 * (cols + 2) * kUnitRoundoff * magnitude;
          const size_t at = static_cast<size_t>(i * rows + r);
          largest = std::max(largest, std::fabs(int8[at] - fp32[at]));
          EXPECT_LE(std::fabs(int8[at] - fp32[at]), rounding + arithmetic)
              << tensor_type_name(type) << " row " << r << " of x " << i;
          EXPECT_LE(std::fabs(int8[at] - rounded[at]), arithmetic)
              << tensor_type_name(type) << " row " << r << " of x " << i
              << ": the same rounding in fp32 arithmetic";
        }
      }
      EXPECT_GT(largest, 0.0f) << tensor_type_name(type) << ": the int8 path rounded nothing";
    }
  }
}

// kFloat and kFloatRoundedAsQ8 also serve fp32 weights (which never take the
// int8 path) and widths that are not a multiple of 32 (a last, short block).
TEST(MatmulPaths, Fp32WeightsAndShortLastBlock) {
  const int64_t rows = 10, cols = 44;
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> w(static_cast<size_t>(rows * cols)), x(static_cast<size_t>(cols));
  for (float& v : w) v = normal(rng);
  for (float& v : x) v = normal(rng);
  const WeightMatrix matrix{TensorType::kF32, reinterpret_cast<const uint8_t*>(w.data()), rows,
                            cols, cols * sizeof(float)};
  const std::vector<float> fp32 = multiply(matrix, x, 1, cpu::MatmulPath::kAuto);
  const std::vector<float> sdot = multiply(matrix, x, 1, cpu::MatmulPath::kFloat);
  const std::vector<float> rounded = multiply(matrix, x, 1, cpu::MatmulPath::kFloatRoundedAsQ8);
  for (int64_t r = 0; r < rows; ++r) {
    double rounding = 0, magnitude = 0;
    for (int64_t b = 0; b < cols; b += 32) {
      float max_abs = 0, weight_sum = 0;
      for (int64_t j = b; j < std::min(cols, b + 32); ++j) {
        max_abs = std::max(max_abs, std::fabs(x[j]));
        weight_sum += std::fabs(w[r * cols + j]);
        magnitude += std::fabs(w[r * cols + j] * x[j]);
      }
      rounding += max_abs / 127 / 2 * weight_sum;
    }
    const double arithmetic = 2 * (cols + 2) * kUnitRoundoff * (magnitude + rounding);
    EXPECT_LE(std::fabs(fp32[r] - sdot[r]), arithmetic) << "row " << r;
    EXPECT_LE(std::fabs(rounded[r] - sdot[r]), rounding + arithmetic) << "row " << r;
  }
}

}  // namespace
}  // namespace xq
