// Error checks for CUDA runtime and cuBLAS calls. Every call and every kernel
// launch is checked where it happens, so an error names the line that caused
// it instead of surfacing at some later, unrelated call.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <string>

#include "kernels/error.h"

namespace xq::cuda::detail {

[[noreturn]] inline void throw_cuda_error(cudaError_t status, const char* call, const char* file,
                                          int line) {
  throw Error(std::string(file) + ":" + std::to_string(line) + ": " + call +
              " failed: " + cudaGetErrorName(status) + ": " + cudaGetErrorString(status));
}

[[noreturn]] inline void throw_cublas_error(cublasStatus_t status, const char* call,
                                            const char* file, int line) {
  throw Error(std::string(file) + ":" + std::to_string(line) + ": " + call +
              " failed: " + cublasGetStatusName(status) + ": " + cublasGetStatusString(status));
}

}  // namespace xq::cuda::detail

// Throws xq::Error with file:line and CUDA's message if `call` does not return cudaSuccess.
#define CUDA_CHECK(call)                                                                  \
  do {                                                                                    \
    const cudaError_t cuda_check_status = (call);                                         \
    if (cuda_check_status != cudaSuccess) {                                               \
      ::xq::cuda::detail::throw_cuda_error(cuda_check_status, #call, __FILE__, __LINE__); \
    }                                                                                     \
  } while (0)

// Kernel launches return nothing; a bad configuration shows up in cudaGetLastError.
#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())

#define CUBLAS_CHECK(call)                                                                    \
  do {                                                                                        \
    const cublasStatus_t cublas_check_status = (call);                                        \
    if (cublas_check_status != CUBLAS_STATUS_SUCCESS) {                                       \
      ::xq::cuda::detail::throw_cublas_error(cublas_check_status, #call, __FILE__, __LINE__); \
    }                                                                                         \
  } while (0)
