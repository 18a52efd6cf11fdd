// The dense ops on device pointers (kernels/cuda/dense_ops.h) against their
// CPU twins on the same inputs. Built only with CUDA (XQ_HAVE_CUDA); the
// device tests skip, with CUDA's reason, where no GPU can be used, and one
// test checks that an op then fails with xq::Error instead of crashing.
//
// Tolerances, with u = 2^-24 (fp32 unit roundoff):
//   * int8 matvec (n <= kMatvecMaxRows = 64): both sides round x to the same int8 blocks and
//     form exact integer block sums; the rest is fp32 arithmetic over about
//     2 * blocks + 8 rounded steps (per-block scale products, fma chains, the
//     8-lane reduction, the offset chain). Any two such evaluations differ
//     by at most 2 * (2 * blocks + 8) * u * S, with S the sum of the
//     magnitudes of every term (|d_w d_x| sum|q_w q_x| + |m_w t_x| per block).
//     The kernel follows the CPU's order, so a second test expects the bits.
//   * F32 / F16 matvec: the CPU's single fma chain over cols against the
//     warp's strided chains and shuffle tree: 2 * (cols + 8) * u * sum|x w|.
//   * fp16 GEMM (n > 64 or forced): x and the dequantized weights each lose
//     up to 2^-11 relative when rounded to fp16, so a product is within
//     (2^-10 + 2^-22) |x w|; values below fp16's normal range lose up to
//     2^-25 absolute (times the other factor: cols * 2^-25 * (max|w| +
//     max|x|) in all); the fp32 accumulation adds cols * 2^-23 * sum|x w|
//     (twice the textbook bound, for tensor-core accumulation). The reference
//     is an fp64 product of fp32 x and the CPU's dequantized weights.
#if defined(XQ_HAVE_CUDA)

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/cpu/matmul.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/quant.h"
#include "kernels/cuda/dense_ops.h"
#include "kernels/error.h"
#include "runtime/sampler.h"
#include "tests/cuda_test_util.h"

namespace {

using xq::TensorType;
namespace cuda = xq::cuda;

constexpr double kUnit = 0x1p-24;

std::vector<float> random_values(int64_t n, float scale, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> values(static_cast<size_t>(n));
  for (float& v : values) v = normal(rng);
  return values;
}

template <typename T>
cuda::DeviceMemory upload(const std::vector<T>& host, cuda::Stream& stream) {
  cuda::DeviceMemory memory(std::max<size_t>(host.size() * sizeof(T), 1));
  if (!host.empty())
    cuda::copy_to_device(memory.data(), host.data(), host.size() * sizeof(T), stream);
  return memory;
}

template <typename T>
std::vector<T> download(const cuda::DeviceMemory& memory, size_t count, cuda::Stream& stream) {
  std::vector<T> host(count);
  if (count > 0) cuda::copy_to_host(host.data(), memory.data(), count * sizeof(T), stream);
  stream.synchronize();
  return host;
}

// A host weight matrix of `type` made from random values (quantize_row per row).
struct HostWeight {
  std::vector<uint8_t> bytes;
  xq::WeightMatrix matrix;
};

HostWeight make_weight(TensorType type, int64_t rows, int64_t cols, uint32_t seed) {
  const std::vector<float> values = random_values(rows * cols, 0.5f, seed);
  const xq::TensorTypeTraits& traits = xq::tensor_type_traits(type);
  const size_t row_bytes = static_cast<size_t>(cols / traits.block_elems * traits.block_bytes);
  HostWeight weight;
  weight.bytes.resize(row_bytes * static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    xq::cpu::quantize_row(type, values.data() + r * cols, weight.bytes.data() + r * row_bytes,
                          cols);
  }
  weight.matrix = xq::WeightMatrix{type, weight.bytes.data(), rows, cols, row_bytes};
  return weight;
}

std::vector<float> dequantized(const xq::WeightMatrix& w) {
  std::vector<float> out(static_cast<size_t>(w.rows * w.cols));
  for (int64_t r = 0; r < w.rows; ++r) xq::cpu::matrix_row_to_float(w, r, out.data() + r * w.cols);
  return out;
}

// Sum over the int8 path's terms of their magnitudes for x row `x` and weight
// row `w_row` (see the top of the file): |d_w d_x| sum|q_w q_x| + |m_w t_x|.
double int8_term_magnitude(TensorType type, const uint8_t* w_row, const float* x, int64_t cols) {
  xq::cpu::QuantizedActivations prepared;
  xq::cpu::quantize_activations(type, x, cols, prepared);
  const int8_t* quants = prepared.quants();
  const float* terms = prepared.block_terms();
  const int64_t block_bytes = xq::tensor_type_traits(type).block_bytes;
  double sum = 0;
  for (int64_t b = 0; b < cols / 32; ++b) {
    const uint8_t* block = w_row + b * block_bytes;
    uint16_t d_bits = 0;
    std::memcpy(&d_bits, block, 2);
    const double d = xq::cpu::fp16_to_fp32(d_bits);
    double m = 0;
    int q[32];
    if (type == TensorType::kQ8_0) {
      for (int i = 0; i < 32; ++i) q[i] = static_cast<int8_t>(block[2 + i]);
    } else {
      const int quants_at = type == TensorType::kQ4_1 ? 4 : 2;
      for (int i = 0; i < 16; ++i) {
        q[i] = block[quants_at + i] & 0x0f;
        q[i + 16] = block[quants_at + i] >> 4;
      }
      uint16_t m_bits = d_bits;
      if (type == TensorType::kQ4_1) std::memcpy(&m_bits, block + 2, 2);
      m = xq::cpu::fp16_to_fp32(m_bits);
    }
    double products = 0;
    for (int i = 0; i < 32; ++i) products += std::abs(q[i] * quants[32 * b + i]);
    sum += std::fabs(d * terms[2 * b]) * products + std::fabs(m * terms[2 * b + 1]);
  }
  return sum;
}

bool int8_type(TensorType type) {
  return type == TensorType::kQ4_0 || type == TensorType::kQ4_1 || type == TensorType::kQ8_0;
}

// The largest |actual - expected| / bound over the elements, with the worst one.
struct Worst {
  double ratio = 0;
  std::string where;
  int64_t bit_identical = 0;
};
void note(Worst& worst, int64_t i, int64_t r, float actual, float expected, double bound) {
  if (actual == expected) ++worst.bit_identical;
  const double error = std::fabs(static_cast<double>(actual) - expected);
  const double ratio = error / std::max(bound, 1e-30);
  if (!(ratio <= worst.ratio)) {  // NaN counts as the worst
    worst.ratio = ratio;
    std::ostringstream where;
    where << "y[" << i << "][" << r << "]: cuda " << actual << ", reference " << expected
          << ", bound " << bound;
    worst.where = where.str();
  }
}

enum class Path { kAuto, kMatvec, kGemm };

// Runs y = x W^T on the device along `path` and checks it against the CPU:
// cpu::matmul (int8 rounding of x where the path is the int8 matvec) or an
// fp64 product with the fp16 bound (the GEMM path).
void expect_matmul_matches(TensorType type, int64_t n, Path path, int64_t cols = 32 * 19) {
  SCOPED_TRACE(std::string(xq::tensor_type_name(type)) + ", n = " + std::to_string(n) +
               ", cols = " + std::to_string(cols) +
               (path == Path::kAuto     ? " (auto)"
                : path == Path::kMatvec ? " (matvec)"
                                        : " (gemm)"));
  const int64_t rows = 67;  // not a multiple of the 16 rows per thread block
  // cols: by default an odd block count, so the last nibble pair is half empty.
  const HostWeight weight = make_weight(type, rows, cols, 11 + static_cast<uint32_t>(type));
  const std::vector<float> x = random_values(n * cols, 1.0f, 100 + static_cast<uint32_t>(n));

  cuda::Stream stream;
  cuda::Blas blas(stream);
  cuda::DeviceMemory weight_memory(cuda::device_weight_bytes(weight.matrix));
  const cuda::DeviceWeight w = cuda::upload_weight(weight.matrix, weight_memory.data(), stream);
  const cuda::DeviceMemory x_device = upload(x, stream);
  cuda::DeviceMemory y_device(static_cast<size_t>(n * rows) * sizeof(float));
  const size_t workspace_bytes =
      std::max({cuda::matmul_workspace_bytes(w, n), cuda::matvec_workspace_bytes(w, n),
                cuda::gemm_workspace_bytes(w, n), size_t{1}});
  cuda::DeviceMemory workspace(workspace_bytes);
  const auto* x_in = x_device.as<float>();
  auto* y_out = y_device.as<float>();
  switch (path) {
    case Path::kAuto:
      cuda::matmul(w, x_in, n, y_out, workspace.data(), workspace_bytes, blas, stream);
      break;
    case Path::kMatvec:
      cuda::matvec_quantized(w, x_in, n, y_out, workspace.data(), workspace_bytes, stream);
      break;
    case Path::kGemm:
      cuda::gemm_fp16(w, x_in, n, y_out, workspace.data(), workspace_bytes, blas, stream);
      break;
  }
  const std::vector<float> y = download<float>(y_device, static_cast<size_t>(n * rows), stream);

  const bool gemm = path == Path::kGemm || (path == Path::kAuto && n > cuda::kMatvecMaxRows);
  Worst worst;
  if (gemm) {
    const std::vector<float> w_float = dequantized(weight.matrix);
    float w_max = 0, x_max = 0;
    for (float v : w_float) w_max = std::max(w_max, std::fabs(v));
    for (float v : x) x_max = std::max(x_max, std::fabs(v));
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t r = 0; r < rows; ++r) {
        double exact = 0, magnitude = 0;
        for (int64_t k = 0; k < cols; ++k) {
          const double product = static_cast<double>(x[i * cols + k]) * w_float[r * cols + k];
          exact += product;
          magnitude += std::fabs(product);
        }
        const double bound =
            (0x1p-10 + 0x1p-22 + cols * 0x1p-23) * magnitude + cols * 0x1p-25 * (w_max + x_max);
        note(worst, i, r, y[i * rows + r], static_cast<float>(exact), bound);
      }
    }
  } else {
    std::vector<float> expected(static_cast<size_t>(n * rows));
    xq::cpu::matmul(weight.matrix, x.data(), n, expected.data());
    const std::vector<float> w_float = dequantized(weight.matrix);
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t r = 0; r < rows; ++r) {
        double bound;
        if (int8_type(type)) {
          bound = 2.0 * (2.0 * (cols / 32) + 8) * kUnit *
                  int8_term_magnitude(type, weight.matrix.row(r), x.data() + i * cols, cols);
        } else {
          double magnitude = 0;
          for (int64_t k = 0; k < cols; ++k) {
            magnitude += std::fabs(static_cast<double>(x[i * cols + k]) * w_float[r * cols + k]);
          }
          bound = 2.0 * (cols + 8) * kUnit * magnitude;
        }
        note(worst, i, r, y[i * rows + r], expected[i * rows + r], bound);
      }
    }
  }
  EXPECT_LE(worst.ratio, 1.0) << worst.where << "; bit-identical " << worst.bit_identical << " of "
                              << n * rows;
}

const TensorType kWeightTypes[] = {TensorType::kQ4_0, TensorType::kQ4_1, TensorType::kQ8_0,
                                   TensorType::kF32, TensorType::kF16};

TEST(CudaDenseOps, MatmulMatchesCpuOnEveryTypeAndRowCount) {
  SKIP_WITHOUT_CUDA_DEVICE();
  for (TensorType type : kWeightTypes) {
    for (int64_t n : {1, 3, 8, 9, 16, 17, 64, 65, 96}) expect_matmul_matches(type, n, Path::kAuto);
  }
  // Float weights of a width that is no multiple of 32 (stories260K-like).
  for (int64_t n : {1, 9, 17}) expect_matmul_matches(TensorType::kF32, n, Path::kAuto, 172);
}

TEST(CudaDenseOps, ForcedPathsMatchCpu) {
  SKIP_WITHOUT_CUDA_DEVICE();
  for (TensorType type : kWeightTypes) {
    expect_matmul_matches(type, 3, Path::kGemm);     // the GEMM below its row threshold
    expect_matmul_matches(type, 70, Path::kMatvec);  // the matvec above it, in 9 chunks
  }
}

// The int8 kernel runs cpu::q8_gemm's operations in its order, so the bits
// are the CPU's: the device and the CPU backends then pick the same greedy
// tokens from the same quantized model.
TEST(CudaDenseOps, Int8MatvecIsBitIdenticalToCpu) {
  SKIP_WITHOUT_CUDA_DEVICE();
  for (TensorType type : {TensorType::kQ4_0, TensorType::kQ4_1, TensorType::kQ8_0}) {
    // 9 and 13: a full chunk of 8 rows of x, then a partial one.
    for (int64_t n : {1, 5, 9, 13, 16}) {
      SCOPED_TRACE(std::string(xq::tensor_type_name(type)) + ", n = " + std::to_string(n));
      const int64_t rows = 33, cols = 32 * 7;
      const HostWeight weight = make_weight(type, rows, cols, 7);
      const std::vector<float> x = random_values(n * cols, 2.0f, 8);
      cuda::Stream stream;
      cuda::DeviceMemory weight_memory(cuda::device_weight_bytes(weight.matrix));
      const cuda::DeviceWeight w = cuda::upload_weight(weight.matrix, weight_memory.data(), stream);
      const cuda::DeviceMemory x_device = upload(x, stream);
      cuda::DeviceMemory y_device(static_cast<size_t>(n * rows) * sizeof(float));
      const size_t workspace_bytes = cuda::matvec_workspace_bytes(w, n);
      cuda::DeviceMemory workspace(workspace_bytes);
      cuda::matvec_quantized(w, x_device.as<float>(), n, y_device.as<float>(), workspace.data(),
                             workspace_bytes, stream);
      const std::vector<float> y = download<float>(y_device, static_cast<size_t>(n * rows), stream);
      std::vector<float> expected(y.size());
      xq::cpu::matmul(weight.matrix, x.data(), n, expected.data());
      for (size_t i = 0; i < y.size(); ++i) ASSERT_EQ(y[i], expected[i]) << "element " << i;
    }
  }
}

TEST(CudaDenseOps, EmbedMatchesCpuRowsExactly) {
  SKIP_WITHOUT_CUDA_DEVICE();
  // Dequantization is one product (and for Q4_1 one sum) per value, rounded
  // as on the CPU: the same bits. Q8_0 is SmolLM2's table, F32 stories260K's.
  for (TensorType type : {TensorType::kQ8_0, TensorType::kF32, TensorType::kQ4_0, TensorType::kQ4_1,
                          TensorType::kF16}) {
    SCOPED_TRACE(xq::tensor_type_name(type));
    const int64_t rows = 50, cols = 96;
    const HostWeight table = make_weight(type, rows, cols, 21);
    const std::vector<int32_t> tokens = {0, 49, 7, 7, 23};
    cuda::Stream stream;
    cuda::DeviceMemory table_memory(cuda::device_weight_bytes(table.matrix));
    const cuda::DeviceWeight w = cuda::upload_weight(table.matrix, table_memory.data(), stream);
    const cuda::DeviceMemory tokens_device = upload(tokens, stream);
    cuda::DeviceMemory out(tokens.size() * cols * sizeof(float));
    cuda::embed(w, tokens_device.as<int32_t>(), static_cast<int64_t>(tokens.size()),
                out.as<float>(), stream);
    const std::vector<float> got = download<float>(out, tokens.size() * cols, stream);
    std::vector<float> expected(static_cast<size_t>(cols));
    for (size_t t = 0; t < tokens.size(); ++t) {
      xq::cpu::matrix_row_to_float(table.matrix, tokens[t], expected.data());
      for (int64_t k = 0; k < cols; ++k) {
        ASSERT_EQ(got[t * cols + k], expected[k]) << "token " << tokens[t] << ", value " << k;
      }
    }
  }
}

TEST(CudaDenseOps, UploadOfAColumnSliceIsCompact) {
  SKIP_WITHOUT_CUDA_DEVICE();
  // Columns 64..127 of a (10, 160) Q8_0 matrix: rows 170 bytes apart on the host.
  const HostWeight full = make_weight(TensorType::kQ8_0, 10, 160, 31);
  xq::WeightMatrix slice = full.matrix;
  slice.data = full.matrix.data + 2 * 34;
  slice.cols = 64;
  EXPECT_EQ(cuda::device_weight_bytes(slice), size_t{10 * 2 * 34});
  cuda::Stream stream;
  cuda::DeviceMemory memory(cuda::device_weight_bytes(slice));
  const cuda::DeviceWeight w = cuda::upload_weight(slice, memory.data(), stream);
  EXPECT_EQ(w.row_bytes, size_t{68});
  const std::vector<uint8_t> got = download<uint8_t>(memory, w.bytes(), stream);
  for (int64_t r = 0; r < 10; ++r) {
    ASSERT_EQ(std::memcmp(got.data() + r * 68, slice.row(r), 68), 0) << "row " << r;
  }
}

TEST(CudaDenseOps, RmsnormMatchesCpu) {
  SKIP_WITHOUT_CUDA_DEVICE();
  // Both sum squares in double and round the same float steps after; only
  // the double sum's order differs, which can move the float mean by one
  // rounding in rare cases: 4 u relative per element.
  const int64_t rows = 9, dim = 576;
  const std::vector<float> x = random_values(rows * dim, 3.0f, 41);
  const std::vector<float> gamma = random_values(dim, 1.0f, 42);
  std::vector<float> expected(x.size());
  xq::cpu::rmsnorm(x.data(), gamma.data(), expected.data(), rows, dim, 1e-5f);
  cuda::Stream stream;
  const cuda::DeviceMemory x_device = upload(x, stream), gamma_device = upload(gamma, stream);
  cuda::DeviceMemory out(x.size() * sizeof(float));
  cuda::rmsnorm(x_device.as<float>(), gamma_device.as<float>(), out.as<float>(), rows, dim, 1e-5f,
                stream);
  const std::vector<float> got = download<float>(out, x.size(), stream);
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_LE(std::fabs(got[i] - expected[i]), 4 * kUnit * std::fabs(expected[i])) << i;
  }
}

void expect_rope_matches_cpu(xq::RopeLayout layout) {
  // rope_dim < head_dim: the channels past rope_dim must come back unchanged.
  const int64_t rows = 5, heads = 3, head_dim = 64, rope_dim = 48, max_position = 4096;
  std::vector<float> table(static_cast<size_t>(max_position * rope_dim));
  xq::cpu::rope_table(table.data(), max_position, rope_dim, 10000.0f);
  const std::vector<int32_t> positions = {0, 1, 17, 4095, 300};
  const std::vector<float> x = random_values(rows * heads * head_dim, 1.0f, 51);
  std::vector<float> expected = x;
  xq::cpu::rope(expected.data(), positions.data(), rows, heads, head_dim, rope_dim, layout,
                table.data());
  cuda::Stream stream;
  cuda::DeviceMemory x_device = upload(x, stream);
  const cuda::DeviceMemory positions_device = upload(positions, stream);
  const cuda::DeviceMemory table_device = upload(table, stream);
  cuda::rope(x_device.as<float>(), positions_device.as<int32_t>(), rows, heads, head_dim, rope_dim,
             layout, table_device.as<float>(), stream);
  const std::vector<float> got = download<float>(x_device, x.size(), stream);
  // a c - b s and a s + b c, each side with or without fused multiply-adds:
  // each within 2 u (|a| + |b|) of exact (|c|, |s| <= 1), so 4 u apart.
  const int64_t pairs = rope_dim / 2;
  for (int64_t head = 0; head < rows * heads; ++head) {
    const float* in = x.data() + head * head_dim;
    for (int64_t c = 0; c < head_dim; ++c) {
      const size_t i = static_cast<size_t>(head * head_dim + c);
      if (c >= rope_dim) {
        ASSERT_EQ(got[i], x[i]) << "unrotated channel " << c;
        continue;
      }
      const int64_t pair = layout == xq::RopeLayout::kInterleaved ? c / 2 : c % pairs;
      const float a = layout == xq::RopeLayout::kInterleaved ? in[2 * pair] : in[pair];
      const float b = layout == xq::RopeLayout::kInterleaved ? in[2 * pair + 1] : in[pair + pairs];
      ASSERT_LE(std::fabs(got[i] - expected[i]), 4 * kUnit * (std::fabs(a) + std::fabs(b)))
          << "head " << head << ", channel " << c;
    }
  }
}

TEST(CudaDenseOps, RopeInterleavedMatchesCpu) {
  SKIP_WITHOUT_CUDA_DEVICE();
  expect_rope_matches_cpu(xq::RopeLayout::kInterleaved);
}

TEST(CudaDenseOps, RopeNeoxMatchesCpu) {
  SKIP_WITHOUT_CUDA_DEVICE();
  expect_rope_matches_cpu(xq::RopeLayout::kNeox);
}

TEST(CudaDenseOps, SwigluAddAndGatherMatchCpu) {
  SKIP_WITHOUT_CUDA_DEVICE();
  const int64_t n = 10'001;
  const std::vector<float> gate = random_values(n, 4.0f, 61);
  const std::vector<float> up = random_values(n, 1.0f, 62);
  std::vector<float> expected_swiglu = up, expected_add = up;
  xq::cpu::swiglu(gate.data(), expected_swiglu.data(), n);
  xq::cpu::add(expected_add.data(), gate.data(), n);
  cuda::Stream stream;
  const cuda::DeviceMemory gate_device = upload(gate, stream);
  cuda::DeviceMemory swiglu_device = upload(up, stream), add_device = upload(up, stream);
  cuda::swiglu(gate_device.as<float>(), swiglu_device.as<float>(), n, stream);
  cuda::add(add_device.as<float>(), gate_device.as<float>(), n, stream);
  const std::vector<float> got_swiglu =
      download<float>(swiglu_device, static_cast<size_t>(n), stream);
  const std::vector<float> got_add = download<float>(add_device, static_cast<size_t>(n), stream);
  for (int64_t i = 0; i < n; ++i) {
    // expf may differ from the host's by 3 ulp; then 1 + e, the division and
    // the product round once each: 16 u relative covers it.
    ASSERT_LE(std::fabs(got_swiglu[i] - expected_swiglu[i]),
              16 * kUnit * std::fabs(expected_swiglu[i]))
        << "swiglu " << i;
    ASSERT_EQ(got_add[i], expected_add[i]) << "add " << i;  // one rounding on both sides
  }
  // gather_rows: a plain copy, exact.
  const int64_t width = 37;
  const std::vector<float> table = random_values(20 * width, 1.0f, 63);
  const std::vector<int32_t> picks = {19, 0, 5, 5, 12};
  const cuda::DeviceMemory table_device = upload(table, stream),
                           picks_device = upload(picks, stream);
  cuda::DeviceMemory gathered(picks.size() * width * sizeof(float));
  cuda::gather_rows(table_device.as<float>(), picks_device.as<int32_t>(),
                    static_cast<int64_t>(picks.size()), width, gathered.as<float>(), stream);
  const std::vector<float> got = download<float>(gathered, picks.size() * width, stream);
  for (size_t p = 0; p < picks.size(); ++p) {
    for (int64_t k = 0; k < width; ++k) {
      ASSERT_EQ(got[p * width + k], table[picks[p] * width + k]) << "pick " << p << ", " << k;
    }
  }
}

// Runs cuda::sample on host rows; returns tokens and margins.
void sample_on_device(const std::vector<float>& logits, int64_t rows, int64_t vocab,
                      const std::vector<cuda::SamplingRow>& params, std::vector<int32_t>* tokens,
                      std::vector<float>* margins) {
  cuda::Stream stream;
  const cuda::DeviceMemory logits_device = upload(logits, stream);
  const cuda::DeviceMemory params_device = upload(params, stream);
  cuda::DeviceMemory tokens_device(static_cast<size_t>(rows) * sizeof(int32_t));
  cuda::DeviceMemory margins_device(static_cast<size_t>(rows) * sizeof(float));
  const size_t workspace_bytes = cuda::sample_workspace_bytes(rows, vocab);
  cuda::DeviceMemory workspace(workspace_bytes);
  cuda::sample(logits_device.as<float>(), rows, vocab, params_device.as<cuda::SamplingRow>(),
               tokens_device.as<int32_t>(), margins_device.as<float>(), workspace.data(),
               workspace_bytes, stream);
  *tokens = download<int32_t>(tokens_device, static_cast<size_t>(rows), stream);
  *margins = download<float>(margins_device, static_cast<size_t>(rows), stream);
}

TEST(CudaDenseOps, GreedySampleTakesLowestIdOnTiesAndReportsMargins) {
  SKIP_WITHOUT_CUDA_DEVICE();
  const int64_t rows = 4, vocab = 49152;
  std::vector<float> logits = random_values(rows * vocab, 2.0f, 71);
  // Row 0: the maximum three times; row 1: one clear maximum; row 2: all
  // equal; row 3: the maximum at the last id.
  logits[0 * vocab + 30000] = logits[0 * vocab + 101] = logits[0 * vocab + 40000] = 50.0f;
  logits[1 * vocab + 777] = 40.0f;
  std::fill(logits.begin() + 2 * vocab, logits.begin() + 3 * vocab, -1.5f);
  logits[3 * vocab + vocab - 1] = 60.0f;
  const std::vector<cuda::SamplingRow> params(rows);  // temperature 0: greedy
  std::vector<int32_t> tokens;
  std::vector<float> margins;
  sample_on_device(logits, rows, vocab, params, &tokens, &margins);
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = logits.data() + r * vocab;
    EXPECT_EQ(tokens[r], xq::argmax(row, static_cast<int32_t>(vocab))) << "row " << r;
    EXPECT_EQ(margins[r], xq::top2_margin(row, static_cast<int32_t>(vocab))) << "row " << r;
  }
  EXPECT_EQ(tokens[0], 101);
  EXPECT_EQ(margins[0], 0.0f);
  EXPECT_EQ(tokens[2], 0);
}

// xq::argmax never replaces a NaN at id 0 (nothing compares greater) and
// never picks a NaN elsewhere; the device must choose the same ids.
TEST(CudaDenseOps, GreedySampleTreatsNaNAsArgmaxDoes) {
  SKIP_WITHOUT_CUDA_DEVICE();
  const int64_t rows = 4, vocab = 3000;
  std::vector<float> logits = random_values(rows * vocab, 2.0f, 73);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // Row 0: NaN at id 0 and a clear maximum elsewhere; row 1: NaN at the
  // maximum's neighbours; row 2: every logit NaN; row 3: NaN at the last id.
  logits[0 * vocab + 0] = nan;
  logits[0 * vocab + 2500] = 40.0f;
  logits[1 * vocab + 1233] = 30.0f;
  logits[1 * vocab + 1232] = logits[1 * vocab + 1234] = nan;
  std::fill(logits.begin() + 2 * vocab, logits.begin() + 3 * vocab, nan);
  logits[3 * vocab + vocab - 1] = nan;
  const std::vector<cuda::SamplingRow> params(rows);  // temperature 0: greedy
  std::vector<int32_t> tokens;
  std::vector<float> margins;
  sample_on_device(logits, rows, vocab, params, &tokens, &margins);
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = logits.data() + r * vocab;
    EXPECT_EQ(tokens[r], xq::argmax(row, static_cast<int32_t>(vocab))) << "row " << r;
    const float expected_margin = xq::top2_margin(row, static_cast<int32_t>(vocab));
    if (std::isnan(expected_margin)) {
      EXPECT_TRUE(std::isnan(margins[r])) << "row " << r << ": " << margins[r];
    } else {
      EXPECT_EQ(margins[r], expected_margin) << "row " << r;
    }
  }
  EXPECT_EQ(tokens[0], 0);
  EXPECT_EQ(tokens[1], 1233);
  EXPECT_EQ(tokens[2], 0);
}

// The CPU's candidates of a row (sorted, ties to the lower id), their float
// weights and running sums, to judge a token that differs from Sampler's.
struct CpuNucleus {
  std::vector<int32_t> ids;
  std::vector<double> running_mass;  // sum of p_i / total, as Sampler forms it
  std::vector<double> running_weight;
  size_t nucleus = 0;
};
CpuNucleus cpu_nucleus(const float* logits, int32_t vocab, const cuda::SamplingRow& p) {
  std::vector<std::pair<float, int32_t>> candidates(static_cast<size_t>(vocab));
  for (int32_t i = 0; i < vocab; ++i) candidates[static_cast<size_t>(i)] = {logits[i], i};
  std::sort(candidates.begin(), candidates.end(), [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  });
  const size_t keep =
      p.top_k > 0 && p.top_k < vocab ? static_cast<size_t>(p.top_k) : candidates.size();
  candidates.resize(keep);
  CpuNucleus result;
  double total = 0;
  std::vector<double> weights;
  for (const auto& c : candidates) {
    weights.push_back(std::exp((c.first - candidates[0].first) / p.temperature));
    total += weights.back();
    result.ids.push_back(c.second);
  }
  double mass = 0, weight = 0;
  result.nucleus = keep;
  for (size_t i = 0; i < keep; ++i) {
    mass += weights[i] / total;
    weight += weights[i];
    result.running_mass.push_back(mass);
    result.running_weight.push_back(weight);
    if (mass >= p.top_p && result.nucleus == keep) result.nucleus = i + 1;
  }
  return result;
}

TEST(CudaDenseOps, SampledRowsPickSamplersTokenFromTheSameDraw) {
  SKIP_WITHOUT_CUDA_DEVICE();
  // SmolLM2's vocabulary; rows of different options (one greedy).
  const int32_t vocab = 49152;
  const std::vector<xq::SamplerOptions> options = {
      {1.0f, 0, 1.0f, 1}, {0.7f, 40, 1.0f, 2}, {1.3f, 0, 0.9f, 3},  {0.5f, 50, 0.8f, 4},
      {2.0f, 1, 1.0f, 5}, {0.0f, 0, 1.0f, 6},  {0.9f, 0, 0.95f, 7}, {1.1f, 300, 0.5f, 8}};
  const auto rows = static_cast<int64_t>(options.size());
  std::vector<xq::Sampler> samplers;
  for (const auto& o : options) samplers.emplace_back(o);
  // Relative difference of the running sums the two sides may reach: expf
  // within 3 ulp of the host's (2^-22 relative per weight) and double sums
  // in another order; 2^-20 leaves a factor of 4.
  const double epsilon = 0x1p-20;
  int compared = 0, equal = 0, explained = 0;
  for (uint32_t step = 0; step < 8; ++step) {
    std::vector<float> logits = random_values(rows * vocab, 3.0f, 80 + step);
    for (int64_t r = 0; r < rows; ++r) logits[r * vocab + 12345] = logits[r * vocab + 54];  // a tie
    std::vector<cuda::SamplingRow> params;
    for (auto& sampler : samplers) {
      const xq::SamplingDraw draw = sampler.next_draw();
      params.push_back({draw.temperature, draw.top_k, draw.top_p, draw.uniform});
    }
    std::vector<int32_t> tokens;
    std::vector<float> margins;
    sample_on_device(logits, rows, vocab, params, &tokens, &margins);
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = logits.data() + r * vocab;
      const cuda::SamplingRow& p = params[static_cast<size_t>(r)];
      const int32_t expected =
          p.temperature == 0.0f
              ? xq::argmax(row, vocab)
              : samplers[static_cast<size_t>(r)].sample_with_uniform(row, vocab, p.uniform);
      ++compared;
      if (tokens[r] == expected) {
        ++equal;
        continue;
      }
      ASSERT_NE(p.temperature, 0.0f) << "a greedy row differs, row " << r;
      // A different token is allowed only where the draw or top_p lies
      // within epsilon of a running sum at the first of the two candidates.
      const CpuNucleus nucleus = cpu_nucleus(row, vocab, p);
      const auto at = [&](int32_t token) {
        return static_cast<size_t>(std::find(nucleus.ids.begin(), nucleus.ids.end(), token) -
                                   nucleus.ids.begin());
      };
      const size_t first = std::min(at(tokens[r]), at(expected));
      ASSERT_LT(first, nucleus.ids.size()) << "row " << r << " chose outside the kept candidates";
      const double r_draw = p.uniform * nucleus.running_weight[nucleus.nucleus - 1];
      const bool near_draw =
          std::fabs(nucleus.running_weight[first] - r_draw) <= epsilon * r_draw + 1e-300;
      const size_t last = nucleus.nucleus - 1;
      const bool near_top_p =
          std::fabs(nucleus.running_mass[last] - p.top_p) <= epsilon ||
          (last > 0 && std::fabs(nucleus.running_mass[last - 1] - p.top_p) <= epsilon);
      EXPECT_TRUE(near_draw || near_top_p)
          << "row " << r << ", step " << step << ": cuda " << tokens[r] << ", Sampler " << expected;
      ++explained;
    }
  }
  // Boundaries within 2^-20 are rare: nearly every token must agree exactly.
  EXPECT_GE(equal, compared - 2) << explained << " differences within epsilon";
}

TEST(CudaDenseOps, HostChecksRunWithoutDevice) {
  // Argument checks come before any CUDA call.
  const std::vector<uint8_t> bytes(144);
  const xq::WeightMatrix k_quant{TensorType::kQ4_K, bytes.data(), 1, 256, 144};
  EXPECT_FALSE(cuda::device_supports(TensorType::kQ4_K));
  EXPECT_THROW(cuda::device_weight_bytes(k_quant), std::invalid_argument);
  // The workspace covers the int8 copy of kMatvecMaxRows rows and the fp16
  // copies for more.
  static_assert(cuda::kMatvecMaxRows == 64);
  cuda::DeviceWeight w;
  w.type = TensorType::kQ8_0;
  w.rows = 100;
  w.cols = 64;
  w.row_bytes = 68;
  EXPECT_GE(cuda::matmul_workspace_bytes(w, 128), cuda::gemm_workspace_bytes(w, 128));
  EXPECT_GE(cuda::matmul_workspace_bytes(w, 128), cuda::matvec_workspace_bytes(w, 64));
  EXPECT_GE(cuda::gemm_workspace_bytes(w, 128), size_t{(128 * 64 + 100 * 64) * 2});
  EXPECT_GE(cuda::matvec_workspace_bytes(w, 64), size_t{64 * 64 + 2 * 64 * 2 * 4});
  EXPECT_EQ(cuda::matmul_workspace_bytes(w, 64), cuda::matvec_workspace_bytes(w, 64));
}

TEST(CudaDenseOps, WithoutDeviceAnOpThrowsXqError) {
  std::string why_not;
  if (cuda::device_available(&why_not)) {
    GTEST_SKIP() << "a CUDA device is present; this test is for machines without one";
  }
  // Whichever call meets the missing device first (the stream, the memory or
  // the launch) must throw xq::Error.
  EXPECT_THROW(
      {
        cuda::Stream stream;
        cuda::DeviceMemory buffer(64 * sizeof(float));
        cuda::swiglu(buffer.as<float>(), buffer.as<float>(), 64, stream);
        stream.synchronize();
      },
      xq::Error);
}

}  // namespace

#endif  // defined(XQ_HAVE_CUDA)
