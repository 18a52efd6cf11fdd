// cpu::matmul is batch-invariant: row i of y is the same bits whatever the
// number of rows n, whatever the other rows of x hold, and however many threads
// split the work (matmul.h). Also checked here: each weight type against a
// plain double-precision reference under a derived bound, the vector kernels
// against their scalar forms bit for bit, and column slices (a row stride
// larger than the row) against packed copies.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/float_gemm.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/quant.h"
#include "kernels/cpu/quant_gemm.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/gguf_blocks.h"

namespace xq {
namespace {

constexpr double kUnitRoundoff = 0x1p-24;

const TensorType kTypes[] = {TensorType::kQ4_0, TensorType::kQ4_1, TensorType::kQ5_0,
                             TensorType::kQ5_1, TensorType::kQ8_0, TensorType::kQ8_1,
                             TensorType::kF32,  TensorType::kF16,  TensorType::kBF16};

struct ThreadScope {
  explicit ThreadScope(int threads) { cpu::set_thread_count(threads); }
  ~ThreadScope() { cpu::set_thread_count(1); }
};

// A random (rows, cols) matrix of `type`, rows row_bytes apart. Types with a
// quantizer get normal values quantized; Q5_0, Q5_1 and Q8_1 (no quantizer)
// get random blocks: random quants and fifth bits, fp16 scales of either sign.
struct Matrix {
  std::vector<uint8_t> data;
  WeightMatrix w;
};

Matrix random_matrix(TensorType type, int64_t rows, int64_t cols, std::mt19937& rng) {
  const TensorTypeTraits& t = tensor_type_traits(type);
  const size_t row_bytes = static_cast<size_t>(cols / t.block_elems * t.block_bytes);
  Matrix m;
  m.data.resize(row_bytes * rows + 64);  // slack: kernels never read it, sanitizers would say so
  std::normal_distribution<float> normal(0.0f, 1.0f);
  if (cpu::can_quantize(type)) {
    std::vector<float> values(static_cast<size_t>(cols));
    for (int64_t r = 0; r < rows; ++r) {
      for (float& v : values) v = normal(rng);
      cpu::quantize_row(type, values.data(), m.data.data() + r * row_bytes, cols);
    }
  } else {
    std::uniform_int_distribution<int> byte(0, 255);
    for (uint8_t& b : m.data) b = static_cast<uint8_t>(byte(rng));
    std::uniform_real_distribution<float> scale(-0.1f, 0.1f);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t b = 0; b < cols / t.block_elems; ++b) {
        uint8_t* block = m.data.data() + r * row_bytes + b * t.block_bytes;
        const uint16_t d = cpu::fp32_to_fp16(scale(rng)), mn = cpu::fp32_to_fp16(scale(rng));
        std::memcpy(block, &d, 2);
        if (type == TensorType::kQ5_1) std::memcpy(block + 2, &mn, 2);
      }
    }
  }
  m.w = WeightMatrix{type, m.data.data(), rows, cols, row_bytes};
  return m;
}

std::vector<float> random_x(int64_t n, int64_t cols, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(n * cols));
  for (float& v : x) v = normal(rng);
  if (!x.empty()) x[static_cast<size_t>(rng() % x.size())] = 30.0f;  // an outlier block
  return x;
}

std::vector<float> multiply(const WeightMatrix& w, const float* x, int64_t n) {
  std::vector<float> y(static_cast<size_t>(n * w.rows));
  cpu::matmul(w, x, n, y.data());
  return y;
}

bool same_bits(const float* a, const float* b, int64_t count) {
  return std::memcmp(a, b, static_cast<size_t>(count) * sizeof(float)) == 0;
}

// (a) Row i of a product of n rows equals the product of row i alone, for
// every n, in order and scattered among other random rows, at 1 and 2 threads.
TEST(MatmulBatch, RowsAreBitwiseIndependentOfBatch) {
  // 37 weight rows: neither tiles of 4 nor panels of 16 divide it; 224 values
  // are 7 blocks, so the nibble kernels also take their odd last block.
  const int64_t rows = 37;
  for (int64_t cols : {int64_t{224}, int64_t{576}}) {
    std::mt19937 rng(static_cast<unsigned>(cols));
    for (TensorType type : kTypes) {
      const Matrix m = random_matrix(type, rows, cols, rng);
      const int64_t max_n = 100;
      const std::vector<float> x = random_x(max_n, cols, rng);
      std::vector<float> alone(static_cast<size_t>(max_n * rows));
      {
        ThreadScope one(1);
        for (int64_t i = 0; i < max_n; ++i) {
          const std::vector<float> y = multiply(m.w, x.data() + i * cols, 1);
          std::copy(y.begin(), y.end(), alone.begin() + i * rows);
        }
      }
      for (int threads : {1, 2}) {
        ThreadScope scope(threads);
        for (int64_t n : {1, 2, 3, 5, 8, 9, 17, 64, 100}) {
          const std::vector<float> y = multiply(m.w, x.data(), n);
          for (int64_t i = 0; i < n; ++i) {
            ASSERT_TRUE(same_bits(y.data() + i * rows, alone.data() + i * rows, rows))
                << tensor_type_name(type) << " cols " << cols << " threads " << threads << " n "
                << n << ": row " << i << " differs from its product alone";
          }
          // The same rows shuffled among as many fresh random rows.
          std::vector<int64_t> order(static_cast<size_t>(2 * n));
          for (size_t k = 0; k < order.size(); ++k) order[k] = static_cast<int64_t>(k);
          std::shuffle(order.begin(), order.end(), rng);
          std::vector<float> mixed = random_x(2 * n, cols, rng);
          for (int64_t k = 0; k < 2 * n; ++k) {
            if (order[k] < n)
              std::copy_n(x.data() + order[k] * cols, cols, mixed.data() + k * cols);
          }
          const std::vector<float> z = multiply(m.w, mixed.data(), 2 * n);
          for (int64_t k = 0; k < 2 * n; ++k) {
            if (order[k] >= n) continue;
            ASSERT_TRUE(same_bits(z.data() + k * rows, alone.data() + order[k] * rows, rows))
                << tensor_type_name(type) << " cols " << cols << " threads " << threads << " n "
                << 2 * n << ": row " << order[k] << " placed at " << k << " differs";
          }
        }
      }
    }
  }
}

// (b) Against a plain reference in double precision.
//
// Quantized weights: the reference takes the same rounded activations
// (x^_k = d_x * q_k, from quantize_activations) and the dequantized weights
// w_k, and sums w_k * x^_k in double. The kernel represents each weight
// exactly as d_w * q_w + o (o = m for Q4_1/Q5_1, -8 d / -16 d for Q4_0/Q5_0,
// 0 for Q8) and differs from the reference only by fp32 rounding:
//  * the reference's w_k is d_w q_w + o rounded once: u |w_k x^_k| in all;
//  * per block the scale d_w * d_x and the offset term t = d_x * c * sum(q_x)
//    are rounded once each (2 u of the block's terms);
//  * each of the 8 lanes is a chain of 2 * ceil(blocks / 2) fma's, and the
//    lanes meet in 3 levels of additions: L = 2 * ceil(blocks / 2) + 3
//    roundings, each at most u times a partial sum, itself at most
//    M = sum_k (|d_w q_w| + |o|) |x^_k|.
// So |kernel - reference| <= (L + 2) u M + u sum|w_k x^_k| (to first order;
// the + 3 below instead of + 2 covers the second-order terms).
//
// F32 / F16 / BF16: the kernel is exactly the fp32 chain s = fma(x_k, w_k, s)
// over k in order (checked bit for bit with std::fma), and so within
// cols * u * sum|w_k x_k| of the double sum (the classic bound for a
// recursive sum of cols terms).
double block_offset(TensorType type, const uint8_t* block) {
  uint16_t bits;
  std::memcpy(&bits, block, 2);
  const double d = cpu::fp16_to_fp32(bits);
  switch (type) {
    case TensorType::kQ4_0:
      return -8 * d;
    case TensorType::kQ5_0:
      return -16 * d;
    case TensorType::kQ4_1:
    case TensorType::kQ5_1:
      std::memcpy(&bits, block + 2, 2);
      return cpu::fp16_to_fp32(bits);
    default:
      return 0;
  }
}

TEST(MatmulBatch, MatchesDoubleReference) {
  const int64_t rows = 21, n = 7;
  for (int64_t cols : {int64_t{96}, int64_t{544}}) {
    std::mt19937 rng(static_cast<unsigned>(cols) + 1);
    for (TensorType type : kTypes) {
      const TensorTypeTraits& t = tensor_type_traits(type);
      const Matrix m = random_matrix(type, rows, cols, rng);
      const std::vector<float> x = random_x(n, cols, rng);
      const std::vector<float> y = multiply(m.w, x.data(), n);
      std::vector<float> w(static_cast<size_t>(cols));
      cpu::QuantizedActivations prepared;
      const bool int8 = cpu::activation_encoding(type) == cpu::ActivationEncoding::kQ8;
      for (int64_t i = 0; i < n; ++i) {
        const float* xi = x.data() + i * cols;
        if (int8) cpu::quantize_activations(type, xi, cols, prepared);
        for (int64_t r = 0; r < rows; ++r) {
          cpu::dequantize_row(type, m.w.row(r), w.data(), cols);
          double reference = 0, magnitude = 0, chain_magnitude = 0;
          float chain = 0;
          for (int64_t k = 0; k < cols; ++k) {
            const double xk = int8 ? static_cast<double>(prepared.block_terms()[2 * (k / 32)]) *
                                         prepared.quants()[k]
                                   : xi[k];
            reference += w[k] * xk;
            magnitude += std::fabs(w[k] * xk);
            chain = std::fma(xi[k], w[k], chain);
            if (int8) {
              const double o = block_offset(type, m.w.row(r) + k / 32 * t.block_bytes);
              chain_magnitude += (std::fabs(w[k] - o) + std::fabs(o)) * std::fabs(xk);
            }
          }
          const float got = y[static_cast<size_t>(i * rows + r)];
          double bound;
          if (int8) {
            const double lanes_chain = 2 * std::ceil(static_cast<double>(cols / 32) / 2) + 3;
            bound = (lanes_chain + 3) * kUnitRoundoff * chain_magnitude + kUnitRoundoff * magnitude;
          } else {
            EXPECT_EQ(got, chain) << tensor_type_name(type) << ": not the fp32 fma chain";
            bound = static_cast<double>(cols) * kUnitRoundoff * magnitude;
          }
          EXPECT_LE(std::fabs(got - reference), bound)
              << tensor_type_name(type) << " cols " << cols << " row " << r << " of x " << i;
        }
      }
    }
  }
}

// The vector kernels and their scalar forms: the same bits (so a build without
// AVX2 is just as batch-invariant, and the order written in the kernels' file
// comments is the one they follow). Where the build has VNNI, the int8 kernel
// with it and without it give the same bits too.
// Every row count takes it: the fp32 kernel streams the weights through
// registers up to 8 rows of x and packs panels beyond; the int8 kernel's tile
// shapes change with the rows left.
TEST(MatmulBatch, VectorKernelsEqualScalarForms) {
  const int64_t rows = 37;
  std::mt19937 rng(3);
  for (int64_t cols : {int64_t{224}, int64_t{288}}) {
    for (TensorType type : kTypes) {
      for (int64_t n : {1, 2, 3, 4, 5, 8, 9, 17, 19}) {
        const Matrix m = random_matrix(type, rows, cols, rng);
        const std::vector<float> x = random_x(n, cols, rng);
        std::vector<float> vector(static_cast<size_t>(n * rows)), scalar(vector.size());
        if (cpu::has_q8_gemm(type)) {
          cpu::Q8Rows prepared;
          prepared.reset(type, n, cols);
          prepared.quantize(x.data(), 0, n);
          cpu::q8_gemm(m.w, prepared, 0, rows, vector.data());
          cpu::portable::q8_gemm(m.w, prepared, 0, rows, scalar.data());
          std::vector<float> plain(vector.size());
          cpu::without_vnni::q8_gemm(m.w, prepared, 0, rows, plain.data());
          ASSERT_TRUE(same_bits(vector.data(), plain.data(), n * rows))
              << tensor_type_name(type) << ": VNNI (" << cpu::q8_gemm_uses_vnni()
              << ") and plain AVX2 differ";
        } else {
          cpu::float_gemm(m.w, x.data(), n, 0, rows, vector.data());
          cpu::portable::float_gemm(m.w, x.data(), n, 0, rows, scalar.data());
        }
        for (size_t k = 0; k < vector.size(); ++k) {
          ASSERT_TRUE(same_bits(&vector[k], &scalar[k], 1))
              << tensor_type_name(type) << " cols " << cols << " n " << n << " at " << k << ": "
              << vector[k] << " vs " << scalar[k];
        }
      }
    }
  }
}

// K-quant weights (blocks of 256, dequantized a panel or group at a time):
// random blocks whose values are finite, batch invariance as in (a) and the
// vector kernel against the scalar one for every row count, and each element
// the fp32 fma chain over the dequantized row.
Matrix random_k_matrix(TensorType type, int64_t rows, int64_t cols, std::mt19937& rng) {
  const TensorTypeTraits& t = tensor_type_traits(type);
  const size_t row_bytes = static_cast<size_t>(cols / t.block_elems * t.block_bytes);
  Matrix m;
  m.data.resize(row_bytes * rows + 64);
  std::uniform_int_distribution<int> byte(0, 255);
  std::vector<float> values(static_cast<size_t>(t.block_elems));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < cols / t.block_elems; ++b) {
      uint8_t* block = m.data.data() + r * row_bytes + b * t.block_bytes;
      // Redraw a block until its values are finite and moderate (its fp16
      // scales are random bits).
      for (bool good = false; !good;) {
        for (int64_t i = 0; i < t.block_bytes; ++i) block[i] = static_cast<uint8_t>(byte(rng));
        cpu::dequantize_row(type, block, values.data(), t.block_elems);
        good = std::all_of(values.begin(), values.end(),
                           [](float v) { return std::isfinite(v) && std::fabs(v) < 1e3f; });
      }
    }
  }
  m.w = WeightMatrix{type, m.data.data(), rows, cols, row_bytes};
  return m;
}

TEST(MatmulBatch, KQuantWeights) {
  const int64_t rows = 37, cols = 512, max_n = 100;
  std::mt19937 rng(17);
  for (TensorType type : {TensorType::kQ4_K, TensorType::kQ6_K}) {
    const Matrix m = random_k_matrix(type, rows, cols, rng);
    const std::vector<float> x = random_x(max_n, cols, rng);
    std::vector<float> alone(static_cast<size_t>(max_n * rows));
    std::vector<float> w(static_cast<size_t>(cols));
    for (int64_t i = 0; i < max_n; ++i) {
      const std::vector<float> y = multiply(m.w, x.data() + i * cols, 1);
      std::copy(y.begin(), y.end(), alone.begin() + i * rows);
      if (i >= 3) continue;
      for (int64_t r = 0; r < rows; ++r) {
        cpu::dequantize_row(type, m.w.row(r), w.data(), cols);
        float chain = 0;
        for (int64_t k = 0; k < cols; ++k) chain = std::fma(x[i * cols + k], w[k], chain);
        ASSERT_TRUE(same_bits(&chain, &alone[i * rows + r], 1))
            << tensor_type_name(type) << " row " << r << ": not the fp32 fma chain";
      }
    }
    for (int threads : {1, 2}) {
      ThreadScope scope(threads);
      for (int64_t n : {1, 2, 3, 5, 8, 9, 17, 64, 100}) {
        const std::vector<float> y = multiply(m.w, x.data(), n);
        ASSERT_TRUE(same_bits(y.data(), alone.data(), n * rows))
            << tensor_type_name(type) << " threads " << threads << " n " << n;
        std::vector<float> scalar(y.size());
        cpu::portable::float_gemm(m.w, x.data(), n, 0, rows, scalar.data());
        ASSERT_TRUE(same_bits(y.data(), scalar.data(), n * rows))
            << tensor_type_name(type) << " n " << n << ": vector and scalar differ";
      }
    }
  }
}

// (c) A column slice (row stride of the full matrix, data at the slice's first
// block) gives the bits of the slice copied into a packed matrix, also with an
// odd number of blocks in the slice.
TEST(MatmulBatch, ColumnSlicesEqualPackedCopies) {
  const int64_t rows = 19, cols = 256;
  std::mt19937 rng(9);
  for (TensorType type : kTypes) {
    const Matrix m = random_matrix(type, rows, cols, rng);
    const TensorTypeTraits& t = tensor_type_traits(type);
    for (int64_t first : {int64_t{32}, int64_t{128}}) {
      const int64_t width = first == 32 ? 96 : 128;
      const size_t offset = static_cast<size_t>(first / t.block_elems * t.block_bytes);
      const size_t slice_bytes = static_cast<size_t>(width / t.block_elems * t.block_bytes);
      std::vector<uint8_t> packed(slice_bytes * rows);
      for (int64_t r = 0; r < rows; ++r)
        std::memcpy(packed.data() + r * slice_bytes, m.w.row(r) + offset, slice_bytes);
      const WeightMatrix sliced{type, m.w.data + offset, rows, width, m.w.row_bytes};
      const WeightMatrix copy{type, packed.data(), rows, width, slice_bytes};
      for (int threads : {1, 2}) {
        ThreadScope scope(threads);
        for (int64_t n : {1, 5, 20}) {
          const std::vector<float> x = random_x(n, width, rng);
          const std::vector<float> a = multiply(sliced, x.data(), n);
          const std::vector<float> b = multiply(copy, x.data(), n);
          ASSERT_TRUE(same_bits(a.data(), b.data(), n * rows))
              << tensor_type_name(type) << " slice at " << first << " width " << width << " n " << n
              << " threads " << threads;
        }
      }
    }
  }
}

}  // namespace
}  // namespace xq
