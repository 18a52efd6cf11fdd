// CUDA backend against the CPU backend. Built only with CUDA (XQ_HAVE_CUDA);
// each test skips, with CUDA's reason, on machines without a usable GPU.
#if defined(XQ_HAVE_CUDA)

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/cpu/ops.h"
#include "kernels/cpu/quant.h"
#include "kernels/cuda/backend.h"
#include "kernels/error.h"
#include "tests/cuda_test_util.h"

namespace {

std::vector<float> random_values(int64_t n, float scale, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> values(static_cast<size_t>(n));
  for (float& v : values) v = normal(rng);
  return values;
}

// Worst |actual - expected| relative to the largest |expected| (at least 1e-30,
// so an all-zero reference does not divide by zero). Normalizing by the whole
// tensor's scale rather than per element keeps values near zero, where
// relative error is meaningless, from failing the comparison.
testing::AssertionResult close_normalized(const std::vector<float>& actual,
                                          const std::vector<float>& expected, double tolerance) {
  if (actual.size() != expected.size()) {
    return testing::AssertionFailure()
           << "size " << actual.size() << " != expected " << expected.size();
  }
  double scale = 1e-30;
  for (float v : expected) scale = std::max(scale, static_cast<double>(std::fabs(v)));
  double worst_error = 0;
  size_t worst_index = 0;
  for (size_t i = 0; i < actual.size(); ++i) {
    const double error = std::fabs(static_cast<double>(actual[i]) - expected[i]);
    // A NaN error must count as the worst, which a plain > would skip.
    if (!(error <= worst_error)) {
      worst_error = error;
      worst_index = i;
    }
  }
  std::ostringstream worst;
  worst << "worst element " << worst_index << ": cuda " << actual[worst_index] << ", cpu "
        << expected[worst_index] << ", normalized error " << worst_error / scale << " (tolerance "
        << tolerance << ", scale " << scale << ")";
  if (!(worst_error / scale <= tolerance)) return testing::AssertionFailure() << worst.str();
  return testing::AssertionSuccess() << worst.str();
}

// Runs only where the other tests skip: without a device, a launcher must fail
// with xq::Error naming the failing call, not crash or return garbage.
TEST(CudaBackend, WithoutDeviceLaunchersThrowXqError) {
  std::string why_not;
  if (xq::cuda::device_available(&why_not)) {
    GTEST_SKIP() << "a CUDA device is present; this test is for machines without one";
  }
  EXPECT_FALSE(why_not.empty());
  const std::vector<float> gate(8, 1.0f);
  std::vector<float> x(8, 1.0f);
  try {
    xq::cuda::swiglu(gate.data(), x.data(), static_cast<int64_t>(x.size()));
    ADD_FAILURE() << "swiglu returned without a device";
  } catch (const xq::Error& error) {
    EXPECT_NE(std::string(error.what()).find("ops.cu:"), std::string::npos) << error.what();
  }
}

TEST(CudaBackend, RejectsPartialQ4_1Block) {
  // Checked before any CUDA call, so this runs with or without a device.
  const std::vector<uint8_t> blocks(20);
  std::vector<float> out(31);
  EXPECT_THROW(xq::cuda::dequantize_q4_1(blocks.data(), out.data(), 31), std::invalid_argument);
}

TEST(CudaBackend, RmsnormMatchesCpu) {
  SKIP_WITHOUT_CUDA_DEVICE();
  // 1000 is not a multiple of the block size, so the last partial sweep is covered.
  const int64_t rows = 7, dim = 1000;
  const float eps = 1e-5f;
  const std::vector<float> x = random_values(rows * dim, 3.0f, 1);
  const std::vector<float> gamma = random_values(dim, 1.0f, 2);
  std::vector<float> cpu_out(x.size()), cuda_out(x.size());
  xq::cpu::rmsnorm(x.data(), gamma.data(), cpu_out.data(), rows, dim, eps);
  xq::cuda::rmsnorm(x.data(), gamma.data(), cuda_out.data(), rows, dim, eps);
  EXPECT_TRUE(close_normalized(cuda_out, cpu_out, 1e-5));
}

void expect_rope_matches_cpu(xq::RopeLayout layout) {
  // rope_dim < head_dim: the unrotated tail must come back unchanged.
  const int64_t rows = 5, heads = 3, head_dim = 64, rope_dim = 48, max_position = 4096;
  std::vector<float> table(static_cast<size_t>(max_position * rope_dim));
  xq::cpu::rope_table(table.data(), max_position, rope_dim, 10000.0f);
  const std::vector<int32_t> positions = {0, 1, 17, 4095, 300};
  const std::vector<float> x = random_values(rows * heads * head_dim, 1.0f, 3);
  std::vector<float> cpu_x = x, cuda_x = x;
  xq::cpu::rope(cpu_x.data(), positions.data(), rows, heads, head_dim, rope_dim, layout,
                table.data());
  xq::cuda::rope(cuda_x.data(), positions.data(), rows, heads, head_dim, rope_dim, layout,
                 table.data());
  EXPECT_TRUE(close_normalized(cuda_x, cpu_x, 1e-6));
}

TEST(CudaBackend, RopeInterleavedMatchesCpu) {
  SKIP_WITHOUT_CUDA_DEVICE();
  expect_rope_matches_cpu(xq::RopeLayout::kInterleaved);
}

TEST(CudaBackend, RopeNeoxMatchesCpu) {
  SKIP_WITHOUT_CUDA_DEVICE();
  expect_rope_matches_cpu(xq::RopeLayout::kNeox);
}

TEST(CudaBackend, DequantizeQ4_1MatchesCpu) {
  SKIP_WITHOUT_CUDA_DEVICE();
  const int64_t n = 32 * 37;
  const std::vector<float> values = random_values(n, 2.0f, 4);
  std::vector<xq::BlockQ4_1> blocks(static_cast<size_t>(n / 32));
  xq::cpu::quantize_row(xq::TensorType::kQ4_1, values.data(), blocks.data(), n);
  std::vector<float> cpu_out(static_cast<size_t>(n)), cuda_out(static_cast<size_t>(n));
  xq::cpu::dequantize_row(xq::TensorType::kQ4_1, blocks.data(), cpu_out.data(), n);
  xq::cuda::dequantize_q4_1(blocks.data(), cuda_out.data(), n);
  // Same products and sums; the GPU may fuse q * d + m into one rounding.
  EXPECT_TRUE(close_normalized(cuda_out, cpu_out, 1e-6));
}

TEST(CudaBackend, SwigluMatchesCpu) {
  SKIP_WITHOUT_CUDA_DEVICE();
  const int64_t n = 10'001;
  const std::vector<float> gate = random_values(n, 4.0f, 5);
  const std::vector<float> up = random_values(n, 1.0f, 6);
  std::vector<float> cpu_x = up, cuda_x = up;
  xq::cpu::swiglu(gate.data(), cpu_x.data(), n);
  xq::cuda::swiglu(gate.data(), cuda_x.data(), n);
  EXPECT_TRUE(close_normalized(cuda_x, cpu_x, 1e-6));
}

TEST(CudaBackend, SgemmXwtMatchesLoop) {
  SKIP_WITHOUT_CUDA_DEVICE();
  // Odd sizes so no dimension is a tile multiple.
  const int64_t n = 5, rows = 67, cols = 129;
  const std::vector<float> x = random_values(n * cols, 1.0f, 7);
  const std::vector<float> w = random_values(rows * cols, 1.0f, 8);
  std::vector<float> expected(static_cast<size_t>(n * rows)), actual(expected.size());
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t r = 0; r < rows; ++r) {
      double sum = 0;
      for (int64_t c = 0; c < cols; ++c) {
        sum += static_cast<double>(x[i * cols + c]) * w[r * cols + c];
      }
      expected[i * rows + r] = static_cast<float>(sum);
    }
  }
  xq::cuda::sgemm_xwt(x.data(), w.data(), actual.data(), n, rows, cols);
  // fp32 accumulation over 129 terms against a double reference; TF32 (which
  // cuBLAS does not use unless asked) would need about 1e-3.
  EXPECT_TRUE(close_normalized(actual, expected, 1e-5));
}

}  // namespace

#endif  // defined(XQ_HAVE_CUDA)
