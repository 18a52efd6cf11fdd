// Prefill's matrix product (dense_ops.h gemm_fp16): the weight is dequantized
// into an fp16 copy in the workspace (the whole matrix: SmolLM2's largest,
// the 49152 x 576 output head, is 57 MB), x is rounded to fp16, and cuBLAS
// multiplies them on tensor cores with fp32 accumulation and fp32 output.
// Rounding both inputs to fp16 costs at most 2^-11 relative per factor; the
// tests bound the result against an fp64 product of the unrounded inputs.
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "kernels/cuda/check.h"
#include "kernels/cuda/dense_common.cuh"
#include "kernels/cuda/dense_ops.h"

namespace xq::cuda {
namespace {

using detail::align_up;
using detail::grid_for;
using detail::require;
using detail::stream_of;

constexpr int kThreads = 256;

// One thread per weight element, (row, column) flattened with the column
// fastest, so the fp16 writes are coalesced; the block reads repeat across
// the 32 threads of a block's values and hit L1.
__global__ void weight_to_half_kernel(const uint8_t* weights, size_t row_bytes, int type_id,
                                      int64_t cols, int64_t total, __half* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int64_t row = i / cols, k = i % cols;
  out[i] = __float2half_rn(
      detail::row_element(weights + static_cast<size_t>(row) * row_bytes, type_id, k));
}

// One thread per element of x.
__global__ void float_to_half_kernel(const float* x, int64_t total, __half* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < total) out[i] = __float2half_rn(x[i]);
}

}  // namespace

size_t gemm_workspace_bytes(const DeviceWeight& w, int64_t n) {
  if (n <= 0) return 0;
  return align_up(static_cast<size_t>(n * w.cols) * sizeof(__half)) +
         align_up(static_cast<size_t>(w.rows * w.cols) * sizeof(__half));
}

void gemm_fp16(const DeviceWeight& w, const float* x, int64_t n, float* y, void* workspace,
               size_t workspace_bytes, Blas& blas, Stream& stream) {
  require(device_supports(w.type),
          std::string("gemm_fp16: the device does not read ") + tensor_type_name(w.type));
  require(n >= 0 && w.rows >= 0 && w.cols >= 0, "gemm_fp16: negative shape");
  require(n <= INT_MAX && w.rows <= INT_MAX && w.cols <= INT_MAX,
          "gemm_fp16: dimensions exceed cuBLAS's int range");
  require(detail::aligned_to(w.data, 4), "gemm_fp16: weights not 4-byte aligned");
  if (n == 0 || w.rows == 0) return;
  const cudaStream_t cuda_stream = stream_of(stream);
  if (w.cols == 0) {
    CUDA_CHECK(cudaMemsetAsync(y, 0, static_cast<size_t>(n * w.rows) * sizeof(float), cuda_stream));
    return;
  }
  const size_t needed = gemm_workspace_bytes(w, n);
  require(workspace_bytes >= needed, "gemm_fp16: workspace of " + std::to_string(workspace_bytes) +
                                         " bytes, needs " + std::to_string(needed));
  require(detail::aligned_to(workspace, detail::kWorkspaceAlignment),
          "gemm_fp16: workspace not 256-byte aligned");
  auto* x_half = static_cast<__half*>(workspace);
  auto* w_half = reinterpret_cast<__half*>(static_cast<uint8_t*>(workspace) +
                                           align_up(static_cast<size_t>(n * w.cols) * 2));

  const int64_t x_elements = n * w.cols;
  float_to_half_kernel<<<grid_for(x_elements, kThreads), kThreads, 0, cuda_stream>>>(x, x_elements,
                                                                                     x_half);
  CUDA_CHECK_LAUNCH();
  const int64_t w_elements = w.rows * w.cols;
  weight_to_half_kernel<<<grid_for(w_elements, kThreads), kThreads, 0, cuda_stream>>>(
      w.data, w.row_bytes, static_cast<int>(w.type), w.cols, w_elements, w_half);
  CUDA_CHECK_LAUNCH();

  // cuBLAS is column-major. Read column-major, the row-major buffers are
  // transposed: y (n, rows) is y^T (rows x n, ld rows), the weight (rows,
  // cols) is W^T (cols x rows, ld cols), x (n, cols) is x^T (cols x n, ld
  // cols). y = x W^T transposes to y^T = W x^T, so A = the weight buffer
  // with op T (giving W, m = rows, k = cols) and B = the x buffer with op N
  // (x^T, k = cols, n).
  const auto handle = static_cast<cublasHandle_t>(blas.handle());
  CUBLAS_CHECK(cublasSetStream(handle, cuda_stream));
  CUBLAS_CHECK(cublasSetWorkspace(handle, blas.workspace(), blas.workspace_bytes()));
  const float alpha = 1.0f, beta = 0.0f;
  const int m_rows = static_cast<int>(w.rows), n_cols = static_cast<int>(n);
  const int k_inner = static_cast<int>(w.cols);
  CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, m_rows, n_cols, k_inner, &alpha,
                            w_half, CUDA_R_16F, k_inner, x_half, CUDA_R_16F, k_inner, &beta, y,
                            CUDA_R_32F, m_rows, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

}  // namespace xq::cuda
