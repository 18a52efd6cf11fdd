// fp32 matrix product y = x W^T for weights of any type (F32 and F16 read
// directly, the others dequantized row by row), used for every row count n so
// that a row of y never depends on n or on the other rows of x.
//
// Every output element is one fp32 chain over k in order:
// s = fma(x[k], w[k], s) from s = 0, k = 0, 1, ..., cols - 1. That is what a
// scalar loop of std::fma computes, bit for bit, whatever tile the element
// lands in and however the weight rows are split across threads.
#pragma once

#include <cstdint>

#include "kernels/tensor_type.h"

namespace xq::cpu {

// y[i * w.rows + r] = (row i of x) . (row r of w) for the weight rows
// r in [row_begin, row_end) and the n rows of x (n x w.cols, packed). Callers
// split the weight rows across threads; scratch space is per thread.
void float_gemm(const WeightMatrix& w, const float* x, int64_t n, int64_t row_begin,
                int64_t row_end, float* y);

// The scalar form, which builds without AVX2 use: the same bits as the vector
// kernel. Always compiled, so the tests compare the two on every machine.
namespace portable {
void float_gemm(const WeightMatrix& w, const float* x, int64_t n, int64_t row_begin,
                int64_t row_end, float* y);
}  // namespace portable

}  // namespace xq::cpu
