// fp32 matrix product y = x W^T for weights of any type (F32 and F16 read
// directly, the others dequantized row by row), used for every row count n so
// that a row of y never depends on n or on the other rows of x.
//
// Every output element is summed the same way: eight fp32 lanes, lane l
// running s_l = fma(x[k], w[k], s_l) over k = l, l + 8, l + 16, ... in order
// (a last partial group of 8 padded with zeros), then the lanes reduced as
// ((0+1)+(2+3)) + ((4+5)+(6+7)); whatever tile the element lands in and
// however the weight rows are split across threads.
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
