// Transformer ops on fp32 rows, CPU backend. Shapes are written (rows, cols),
// row-major. Threading is inside each op.
#pragma once

#include <cstdint>

#include "kernels/elementwise.h"

namespace xq::cpu {

// out[r] = x[r] / rms(x[r]) * gamma, for `rows` rows of `dim` values.
void rmsnorm(const float* x, const float* gamma, float* out, int64_t rows, int64_t dim, float eps);

// Applies RoPE in place to `rows` rows of `heads` heads of `head_dim` values;
// row r is at position positions[r]. Only the first rope_dim channels rotate.
// cos_sin: table from rope_table(), (max_position, rope_dim/2, 2).
void rope(float* x, const int32_t* positions, int64_t rows, int64_t heads, int64_t head_dim,
          int64_t rope_dim, RopeLayout layout, const float* cos_sin);
void rope_table(float* cos_sin, int64_t max_position, int64_t rope_dim, float theta);

// In place: x[i] = silu(gate[i]) * x[i] (SwiGLU, x holds the up projection).
void swiglu(const float* gate, float* x, int64_t n);

// In place softmax over n values; returns log(sum exp(x - max)) + max (the log-sum-exp).
float softmax(float* x, int64_t n);
// In place x[i] = exp(x[i] - shift); returns the sum (a block of an online softmax).
float exp_shifted(float* x, int64_t n, float shift);

// y += x
void add(float* y, const float* x, int64_t n);

}  // namespace xq::cpu

namespace xq::cpu {

// Bulk fp16 <-> fp32 (round to nearest even), F16C where the CPU has it.
void fp16_to_fp32_row(const uint16_t* src, float* dst, int64_t n);
void fp32_to_fp16_row(const float* src, uint16_t* dst, int64_t n);

}  // namespace xq::cpu

namespace xq::cpu {

// sum_i x[i] * y[i] with y in fp16 (attention scores over an fp16 key row).
float dot_fp16(const float* x, const uint16_t* y, int64_t n);
// y[i] += a * x[i] with x in fp16 (the attention-weighted sum of fp16 values).
void axpy_fp16(float a, const uint16_t* x, float* y, int64_t n);

}  // namespace xq::cpu
