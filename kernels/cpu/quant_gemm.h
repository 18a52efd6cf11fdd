// Int8 matrix product y = x W^T for weights in the 32-element block formats
// (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1), used for every row count n so that a
// row of y never depends on n or on the other rows of x (batch invariance).
//
// Each row of x is rounded on its own to int8 blocks of 32 exactly as
// quantize_activations does (scale max|x| / 127), and laid out in the order
// the kernel reads it (Q8Rows). Every output element then follows one fixed
// sequence of operations: eight fp32 lanes, each summing, block after block,
// d_w * d_x * (an exact integer sum of 8 products), then one fixed reduction
// of the eight lanes; for the nibble types, plus the weight offset term, a
// chain of m_w * t_x over the blocks in order, summed on its own (it needs
// only x's per-block term t_x, not the quants). Tiles of weight rows and x
// rows only decide which elements are computed together, never the order.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "kernels/tensor_type.h"

namespace xq::cpu {

// Whether q8_gemm handles weights of this type.
bool has_q8_gemm(TensorType weight_type);

// Rows of activations rounded to int8 and laid out for q8_gemm with weights of
// one type. The buffer only grows, so one object reused for every call costs
// no allocation once it has seen the largest shape.
//
// Layout of one row (stride() bytes, 64-byte aligned), by unit:
//   nibble types, one unit per pair of blocks a, b (96 bytes): quants 0-15
//     of a then of b; quants 16-31 of a then of b; 8 floats {d_a x4, d_b x4}.
//     An odd last block pairs with zeros.
//   Q8_0 / Q8_1, one unit per block (64 bytes): 32 quants; 8 floats {d x8}.
// Nibble types also keep the offset terms t = c * d * sum(quants) (c as in
// quant.h) of rows 8g .. 8g + 7 side by side: offset_terms(g)[8 b + i] is
// block b's term of row 8g + i (zero past the last row).
class Q8Rows {
 public:
  // Sizes the buffer for n rows of `cols` values (a multiple of 32).
  void reset(TensorType weight_type, int64_t n, int64_t cols);
  // Rounds rows [begin, end) of x (n rows of cols floats) into the layout.
  // Disjoint ranges may be filled from different threads.
  void quantize(const float* x, int64_t begin, int64_t end);

  TensorType weight_type() const { return weight_type_; }
  int64_t rows() const { return n_; }
  int64_t cols() const { return cols_; }
  size_t stride() const { return stride_; }
  const uint8_t* row(int64_t i) const { return buffer_.get() + static_cast<size_t>(i) * stride_; }
  const float* offset_terms(int64_t group) const {
    return terms_.get() + static_cast<size_t>(group) * terms_stride_;
  }

 private:
  struct FreeAligned {
    void operator()(uint8_t* p) const;
  };

  TensorType weight_type_ = TensorType::kQ4_0;
  int64_t n_ = 0;
  int64_t cols_ = 0;
  size_t stride_ = 0;
  size_t capacity_ = 0;
  std::unique_ptr<uint8_t[], FreeAligned> buffer_;
  size_t terms_stride_ = 0;  // floats per group of 8 rows
  size_t terms_capacity_ = 0;
  std::unique_ptr<float[]> terms_;
};

// y[i * w.rows + r] = (row i of x) . (row r of w) for the weight rows
// r in [row_begin, row_end) and every row of x, which must have been prepared
// for w's type and width. Callers split the weight rows across threads.
void q8_gemm(const WeightMatrix& w, const Q8Rows& x, int64_t row_begin, int64_t row_end, float* y);

// The scalar form, which builds without AVX2 use: the same float operations in
// the same order, so the same bits. Always compiled, so the tests compare the
// two on every machine.
namespace portable {
void q8_gemm(const WeightMatrix& w, const Q8Rows& x, int64_t row_begin, int64_t row_end, float* y);
}  // namespace portable

// Where the build has VNNI (AVX512-VNNI with VL, or AVX-VNNI), q8_gemm forms
// the integer lane sums with dpbusd; these are exact, so the bits equal the
// plain AVX2 kernel's. That kernel, even in such builds, for the tests:
namespace without_vnni {
void q8_gemm(const WeightMatrix& w, const Q8Rows& x, int64_t row_begin, int64_t row_end, float* y);
}  // namespace without_vnni
bool q8_gemm_uses_vnni();

}  // namespace xq::cpu
