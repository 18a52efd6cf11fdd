// The per-row and per-element ops of dense_ops.h on device pointers:
// rmsnorm, RoPE, SwiGLU, residual add and row gathers. Each mirrors its CPU
// twin in kernels/cpu/ops.cpp operation by operation where that is cheap
// (rmsnorm sums squares in double as the CPU does; products are rounded one
// at a time, no fused multiply-add), so most results agree to the bit; the
// exceptions (expf in SiLU, the RoPE rotation) are bounded in the tests.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "kernels/cuda/check.h"
#include "kernels/cuda/dense_common.cuh"
#include "kernels/cuda/dense_ops.h"
#include "kernels/elementwise.h"

namespace xq::cuda {
namespace {

using detail::grid_for;
using detail::require;
using detail::stream_of;

constexpr int kThreads = 256;

__device__ __forceinline__ int64_t global_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

// One block per row: the threads stride over the row summing squares in
// double (as cpu::rmsnorm, so long rows keep their small values), one block
// reduction, then each thread scales its strided values.
__global__ void rmsnorm_rows_kernel(const float* x, const float* gamma, float* out, int64_t dim,
                                    float eps) {
  const float* row = x + static_cast<int64_t>(blockIdx.x) * dim;
  float* dst = out + static_cast<int64_t>(blockIdx.x) * dim;
  double sum_sq = 0;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    const double v = row[i];
    sum_sq += v * v;
  }
  sum_sq = detail::block_sum(sum_sq);
  // cpu::rmsnorm: 1 / sqrt(float(sum / dim) + eps), each step rounded on its own.
  const float mean = static_cast<float>(sum_sq / static_cast<double>(dim));
  const float scale = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(mean, eps)));
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    dst[i] = __fmul_rn(__fmul_rn(row[i], scale), gamma[i]);
  }
}

// One thread per rotated pair: (row, head, pair) flattened with the pair
// fastest, so neighbouring threads touch neighbouring channels of one head.
__global__ void rope_pairs_kernel(float* x, const int32_t* positions, int64_t heads,
                                  int64_t head_dim, int64_t pairs, RopeLayout layout,
                                  const float* cos_sin, int64_t total_pairs) {
  const int64_t index = global_index();
  if (index >= total_pairs) return;
  const int64_t pair = index % pairs;
  const int64_t head_index = index / pairs;  // row * heads + head
  const int64_t row = head_index / heads;
  const float* entry = cos_sin + (static_cast<int64_t>(positions[row]) * pairs + pair) * 2;
  float* head = x + head_index * head_dim;
  if (layout == RopeLayout::kInterleaved) {
    rope_rotate(head[2 * pair], head[2 * pair + 1], entry[0], entry[1]);
  } else {
    rope_rotate(head[pair], head[pair + pairs], entry[0], entry[1]);
  }
}

// One thread per element for the three below.
__global__ void swiglu_elements_kernel(const float* gate, float* x, int64_t n) {
  const int64_t i = global_index();
  if (i < n) x[i] = __fmul_rn(x[i], silu(gate[i]));
}

__global__ void add_elements_kernel(float* x, const float* y, int64_t n) {
  const int64_t i = global_index();
  if (i < n) x[i] = __fadd_rn(x[i], y[i]);
}

// (output row, column) flattened with the column fastest: coalesced copies.
__global__ void gather_rows_kernel(const float* in, const int32_t* rows, int64_t width, float* out,
                                   int64_t total) {
  const int64_t i = global_index();
  if (i >= total) return;
  const int64_t row = i / width, column = i % width;
  out[i] = in[static_cast<int64_t>(rows[row]) * width + column];
}

}  // namespace

void rmsnorm(const float* x, const float* gamma, float* out, int64_t rows, int64_t dim, float eps,
             Stream& stream) {
  require(rows >= 0 && dim >= 0, "rmsnorm: negative shape");
  require(rows <= INT_MAX, "rmsnorm: more rows than grid blocks");
  if (rows == 0 || dim == 0) return;
  rmsnorm_rows_kernel<<<static_cast<unsigned int>(rows), kThreads, 0, stream_of(stream)>>>(
      x, gamma, out, dim, eps);
  CUDA_CHECK_LAUNCH();
}

void rope(float* x, const int32_t* positions, int64_t rows, int64_t heads, int64_t head_dim,
          int64_t rope_dim, RopeLayout layout, const float* cos_sin, Stream& stream) {
  require(rows >= 0 && heads >= 0 && head_dim >= 0, "rope: negative shape");
  require(rope_dim >= 0 && rope_dim % 2 == 0 && rope_dim <= head_dim,
          "rope: rope_dim must be even and at most head_dim");
  const int64_t pairs = rope_dim / 2;
  const int64_t total_pairs = rows * heads * pairs;
  if (total_pairs == 0) return;
  rope_pairs_kernel<<<grid_for(total_pairs, kThreads), kThreads, 0, stream_of(stream)>>>(
      x, positions, heads, head_dim, pairs, layout, cos_sin, total_pairs);
  CUDA_CHECK_LAUNCH();
}

void swiglu(const float* gate, float* x, int64_t n, Stream& stream) {
  require(n >= 0, "swiglu: negative length");
  if (n == 0) return;
  swiglu_elements_kernel<<<grid_for(n, kThreads), kThreads, 0, stream_of(stream)>>>(gate, x, n);
  CUDA_CHECK_LAUNCH();
}

void add(float* x, const float* y, int64_t n, Stream& stream) {
  require(n >= 0, "add: negative length");
  if (n == 0) return;
  add_elements_kernel<<<grid_for(n, kThreads), kThreads, 0, stream_of(stream)>>>(x, y, n);
  CUDA_CHECK_LAUNCH();
}

void gather_rows(const float* in, const int32_t* rows, int64_t count, int64_t width, float* out,
                 Stream& stream) {
  require(count >= 0 && width >= 0, "gather_rows: negative shape");
  const int64_t total = count * width;
  if (total == 0) return;
  gather_rows_kernel<<<grid_for(total, kThreads), kThreads, 0, stream_of(stream)>>>(in, rows, width,
                                                                                    out, total);
  CUDA_CHECK_LAUNCH();
}

}  // namespace xq::cuda
