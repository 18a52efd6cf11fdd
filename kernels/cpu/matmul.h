// y = x W^T for a weight matrix in any supported type, CPU backend. Rows of W
// are read at its row_bytes stride, which may exceed the bytes of cols values
// (a column slice of a larger matrix: data at the first column's block).
//
// One product for every number of rows n, so that row i of y is the same bits
// whatever n is and whatever the other rows of x hold (a sequence's output
// does not depend on the batch it ran in, nor on prefill versus decode):
//   32-element block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1): each row of x
//     rounded to int8 blocks, integer dot products against the quantized
//     weights, several rows of x per weight read (quant_gemm.h);
//   the rest (F32, F16, BF16, K-quants): an fp32 GEMM with one fixed
//     summation order per element (float_gemm.h).
// Threads split the rows of W, never the sum over k.
#pragma once

#include <cstdint>

#include "kernels/tensor_type.h"

namespace xq::cpu {

// x: (n, w.cols) fp32; y: (n, w.rows) fp32.
void matmul(const WeightMatrix& w, const float* x, int64_t n, float* y);

// Copies row `r` of w into dst as fp32 (w.cols values): embedding lookup.
void matrix_row_to_float(const WeightMatrix& w, int64_t r, float* dst);

// Which product matmul() takes. kAuto is the rule above; the others exist to
// take decode's numerics apart (the parallel tests, bench/bench_decode_noise):
//   kFloat: the fp32 GEMM (weights dequantized) for every type, so no
//     activation is ever rounded to int8;
//   kFloatRoundedAsQ8: the same after rounding x exactly as the int8 path
//     rounds it (blocks of 32, scale max|x| / 127, half to even), whatever the
//     weight type: the rounding without the integer arithmetic, and for
//     weights that never take the int8 path (F32, F16) a model of it.
// Process-wide; change it only while no matmul runs.
enum class MatmulPath { kAuto, kFloat, kFloatRoundedAsQ8 };
void set_matmul_path(MatmulPath path);
MatmulPath matmul_path();

}  // namespace xq::cpu
