// Single-threaded fp32 GEMM for the small, cache-resident blocks of decode
// attention (a 64-token block of latents times a 64x64 rebuild matrix, a few
// softmax rows times a block of cached rows). BLAS libraries pack both
// operands and scale C before every call, which costs more than the
// arithmetic at these sizes; this kernel reads its operands in place.
#pragma once

#include <cstdint>

namespace xq::cpu {

// C (m x n) = A (m x k) · B (k x n), or C += A · B when accumulate is set.
// Row-major with row strides lda, ldb, ldc. Called from inside parallel loops,
// so it never threads.
void gemm_small(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                int64_t ldb, float* c, int64_t ldc, bool accumulate);

// Attention scores of `rows` queries (row r at queries + r * ldq, length n)
// against `count` keys (key t at keys + t * ldk): out[r * ldo + t] =
// scale · (query_r · key_t). Eight keys are reduced together, so the
// horizontal sums cost one pass per eight keys rather than one per key.
void scores_against_rows(int64_t rows, int64_t n, const float* queries, int64_t ldq, int64_t count,
                         const float* keys, int64_t ldk, float scale, float* out, int64_t ldo);

}  // namespace xq::cpu
