// Quantized weight formats of GGUF (ggml's block layouts) on the CPU: scalar
// conversions, row (de)quantization, and the dot products of decode.
//
// A matrix-vector product in decode reads every weight once and does little
// arithmetic per byte, so it is bound by memory bandwidth. The dot products
// therefore never expand weights to fp32: the activation row x is quantized
// once per product to 8-bit blocks (QuantizedActivations), and each weight
// block meets its x block in integer arithmetic (AVX2 where compiled in).
// Weight types without such a path (F32, F16, BF16, K-quants) keep x in fp32.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "kernels/gguf_blocks.h"
#include "kernels/tensor_type.h"

namespace xq::cpu {

// IEEE half <-> single. fp32_to_fp16 rounds to nearest, ties to even; values
// beyond the half range become infinity, NaN stays NaN (quiet), and results
// below the normal range become denormals or zero.
float fp16_to_fp32(uint16_t h);
uint16_t fp32_to_fp16(float f);
// bfloat16 is the top half of a float; fp32_to_bf16 rounds to nearest even.
float bf16_to_fp32(uint16_t h);
uint16_t fp32_to_bf16(float f);

// Dequantizes n values (a multiple of the type's block_elems) of one row.
// Throws std::invalid_argument for a type it cannot read or a bad n.
void dequantize_row(TensorType type, const void* src, float* dst, int64_t n);

// Quantizes fp32 -> type. Supported: Q4_0, Q4_1, Q8_0 (n a multiple of 32),
// F16, BF16, F32. Every value is reproduced within half a quantization step
// of its block: scales are rounded to fp16 outward (away from the data), so
// the grid always covers the block's range.
bool can_quantize(TensorType type);
void quantize_row(TensorType type, const float* src, void* dst, int64_t n);

// How quantize_activations encoded x for a weight type.
enum class ActivationEncoding {
  kNone,  // not prepared yet
  kF32,   // x copied as fp32; the dot converts weights on the fly
  kQ8,    // x as int8 in 32-element blocks with one fp32 scale per block
};

// The encoding dot_row wants for weights of `weight_type`: kQ8 for Q4_0, Q4_1,
// Q5_0, Q5_1, Q8_0 and Q8_1, kF32 for the rest.
ActivationEncoding activation_encoding(TensorType weight_type);

// One row of activations prepared for dot products with rows of one weight
// type. Owns an aligned buffer that only grows, so reusing one object for every
// token costs no allocation.
//
// kQ8 layout, per 32-element block b: quants()[32b .. 32b+31] = round(x / d_b)
// with d_b = max|x| / 127, and block_terms()[2b .. 2b+1] = {d_b, c * d_b *
// sum(quants of b)}. A weight block is read as integers q (nibbles unsigned)
// with values d_w * q + c * m_w; its dot with x's block is then
// d_w * d_b * sum(q * quants) + m_w * block_terms()[2b + 1], so the integer
// loop never sees the offset. c is 1 for Q4_1/Q5_1 (m_w = m), -8 for Q4_0 and
// -16 for Q5_0 (m_w = d_w), 0 for Q8_0/Q8_1.
class QuantizedActivations {
 public:
  QuantizedActivations() = default;
  QuantizedActivations(QuantizedActivations&& other) noexcept;
  QuantizedActivations& operator=(QuantizedActivations&& other) noexcept;

  TensorType weight_type() const { return weight_type_; }
  ActivationEncoding encoding() const { return encoding_; }
  int64_t size() const { return n_; }

  // kF32: n values, 64-byte aligned.
  const float* values() const { return reinterpret_cast<const float*>(buffer_.get()); }
  // kQ8: n quants and 2 floats per block, both 64-byte aligned.
  const int8_t* quants() const { return reinterpret_cast<const int8_t*>(buffer_.get()); }
  const float* block_terms() const {
    return reinterpret_cast<const float*>(buffer_.get() + terms_offset_);
  }

  // For the quantizers: sets the header for n values of weight_type and grows
  // the buffer if needed (its contents are then to be written).
  void prepare(TensorType weight_type, int64_t n);
  float* mutable_values() { return reinterpret_cast<float*>(buffer_.get()); }
  int8_t* mutable_quants() { return reinterpret_cast<int8_t*>(buffer_.get()); }
  float* mutable_block_terms() { return reinterpret_cast<float*>(buffer_.get() + terms_offset_); }

 private:
  struct FreeAligned {
    void operator()(std::byte* p) const;
  };

  TensorType weight_type_ = TensorType::kF32;
  ActivationEncoding encoding_ = ActivationEncoding::kNone;
  int64_t n_ = 0;
  size_t terms_offset_ = 0;
  size_t capacity_ = 0;
  std::unique_ptr<std::byte[], FreeAligned> buffer_;
};

// Prepares x (n values) for dot products with rows of `weight_type`. n must be
// a multiple of the weight type's block_elems.
void quantize_activations(TensorType weight_type, const float* x, int64_t n,
                          QuantizedActivations& out);

// Dot product of one weight row (n values of `weight_type`) with x, which must
// have been prepared for that weight type and n (std::invalid_argument if not).
float dot_row(TensorType weight_type, const void* weight_row, const QuantizedActivations& x,
              int64_t n);

// out[r] = dot_row(row r) for `rows` rows that start `row_bytes` apart: the
// matrix-vector product over a range of rows (callers split a matrix into row
// ranges across threads). Rows are taken four at a time, so each x block is
// loaded once for four weight blocks and four sums share one reduction, and
// the weights are prefetched ahead of use, which several rows walked side by
// side need to stream at memory bandwidth. Results may differ from dot_row's
// in the last bits (summation order).
void dot_rows(TensorType weight_type, const void* weights, size_t row_bytes, int64_t rows,
              const QuantizedActivations& x, int64_t n, float* out);

// Scalar versions of the kernels above, which the default functions use when
// the build has no AVX2 (or F16C). Always compiled, so the tests check them on
// every machine against the vector code.
namespace portable {
float fp16_to_fp32(uint16_t h);
uint16_t fp32_to_fp16(float f);
float dot_row(TensorType weight_type, const void* weight_row, const QuantizedActivations& x,
              int64_t n);
void quantize_activations(TensorType weight_type, const float* x, int64_t n,
                          QuantizedActivations& out);
}  // namespace portable

}  // namespace xq::cpu
