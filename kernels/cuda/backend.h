// CUDA backend of the transformer ops. Plain C++: no CUDA types cross this
// header, so callers compile with the ordinary C++ compiler.
//
// These entry points take host pointers and do the whole round trip (copy in,
// launch, copy out, synchronize). That is the shape the tests need to compare
// against the CPU backend; a resident-weights forward pass will want device
// pointers and streams instead. Any CUDA or cuBLAS failure throws xq::Error
// naming the call site and the CUDA error; bad arguments throw
// std::invalid_argument, as the CPU backend does.
#pragma once

#include <cstdint>
#include <string>

#include "kernels/elementwise.h"

namespace xq::cuda {

// True when a CUDA device can be used. Otherwise false, with the reason (no
// driver, no device, ...) in *why_not when why_not is not null. Never throws.
bool device_available(std::string* why_not);

// out[r] = x[r] / rms(x[r]) * gamma, for `rows` rows of `dim` values
// (as xq::cpu::rmsnorm).
void rmsnorm(const float* x_host, const float* gamma_host, float* out_host, int64_t rows,
             int64_t dim, float eps);

// RoPE in place, with the same arguments and table layout as xq::cpu::rope.
// Only the rows of cos_sin up to the largest position are read.
void rope(float* x_host, const int32_t* positions_host, int64_t rows, int64_t heads,
          int64_t head_dim, int64_t rope_dim, RopeLayout layout, const float* cos_sin_host);

// Dequantizes n values (a multiple of 32) stored as GGUF Q4_1 blocks
// (xq::BlockQ4_1).
void dequantize_q4_1(const void* blocks_host, float* out_host, int64_t n);

// In place: x[i] = silu(gate[i]) * x[i] (as xq::cpu::swiglu).
void swiglu(const float* gate_host, float* x_host, int64_t n);

// y = x * w^T with cuBLAS: x is (n, cols), w is (rows, cols) (one output per
// row, the layout of WeightMatrix), y is (n, rows); all row-major fp32.
void sgemm_xwt(const float* x_host, const float* w_host, float* y_host, int64_t n, int64_t rows,
               int64_t cols);

}  // namespace xq::cuda
