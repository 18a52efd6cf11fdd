// The transformer's dense ops on device memory: every pointer here is device
// memory of the current device, every call only enqueues on `stream` (no
// host synchronization), and arguments are checked on the host first
// (std::invalid_argument, as the CPU backend). Each op has its CPU twin in
// kernels/cpu and computes the same formula; where the results may differ
// (summation order, fp16 tiles in prefill GEMMs) the tests state the bound.
// Plain C++ header: no CUDA types.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/cuda/device.h"
#include "kernels/elementwise.h"
#include "kernels/tensor_type.h"

namespace xq::cuda {

// A weight matrix resident on the device: the GGUF blocks as in the file
// (rows of row_bytes; a column slice is uploaded compact, so row_bytes is
// exactly cols values of `type`).
struct DeviceWeight {
  TensorType type = TensorType::kF32;
  const uint8_t* data = nullptr;  // device
  int64_t rows = 0, cols = 0;
  size_t row_bytes = 0;
  size_t bytes() const { return row_bytes * static_cast<size_t>(rows); }
};

// True for the weight types the device reads: F32, F16, Q4_0, Q4_1, Q8_0.
bool device_supports(TensorType type);
// Bytes upload_weight writes for w (its rows x the bytes of cols values).
size_t device_weight_bytes(const WeightMatrix& w);
// Copies w (host, possibly a column slice with a longer row stride) to
// `device_dst` (device_weight_bytes(w) bytes) compactly. Throws
// std::invalid_argument for a type the device does not read.
DeviceWeight upload_weight(const WeightMatrix& w, void* device_dst, Stream& stream);

// Scratch a product needs: int8 activation blocks for n rows (decode path)
// and an fp16 copy of x and of the weights (prefill path). The engine sizes
// one workspace for its largest product and batch.
size_t matmul_workspace_bytes(const DeviceWeight& w, int64_t max_rows);

// Rows at or below this go through the quantized matrix-vector kernels (int8
// dot products per 32-value block, as the CPU path); above it, weights are
// dequantized to fp16 and multiplied with cuBLAS on tensor cores. 64 keeps
// decode batches of up to 64 sequences on the int8 path, where a row's
// result does not depend on the batch and matches the CPU's bits; the
// matvec re-reads the weights once per 8 rows (mostly from L2), which costs
// less than dequantizing the whole weight to fp16 for every step.
constexpr int64_t kMatvecMaxRows = 64;

// y (n, w.rows) = x (n, w.cols) times w^T, all fp32 row-major.
//   n <= kMatvecMaxRows, 32-value block types (Q4_0, Q4_1, Q8_0): each row
//     of x is rounded to int8 blocks exactly as cpu::quantize_activations does
//     (d = max|x| / 127, round half to even), and each weight block meets up
//     to 8 rows of x with __dp4a integer dot products (matvec.cu);
//   F32 / F16 weights at small n: fp32 dot products;
//   larger n: weights dequantized into an fp16 tile, x converted to fp16,
//     cublasGemmEx with fp32 accumulation (gemm.cu).
void matmul(const DeviceWeight& w, const float* x, int64_t n, float* y, void* workspace,
            size_t workspace_bytes, Blas& blas, Stream& stream);
// The same product forced onto one path, for the tests and the benchmark.
void matvec_quantized(const DeviceWeight& w, const float* x, int64_t n, float* y, void* workspace,
                      size_t workspace_bytes, Stream& stream);
void gemm_fp16(const DeviceWeight& w, const float* x, int64_t n, float* y, void* workspace,
               size_t workspace_bytes, Blas& blas, Stream& stream);
// Workspace each forced path needs for n rows of x (matmul_workspace_bytes
// covers whichever path matmul takes up to max_rows). matvec_quantized also
// takes F32 / F16 weights (fp32 dot products, no workspace) and any n, in
// chunks of 8 rows of x. Workspaces must be 256-byte aligned (as cudaMalloc
// returns) and weights 4-byte aligned.
size_t matvec_workspace_bytes(const DeviceWeight& w, int64_t n);
size_t gemm_workspace_bytes(const DeviceWeight& w, int64_t n);

// out (n, table.cols) = rows tokens[i] of the table, dequantized to fp32.
// The values are cpu::dequantize_row's bits. A token id outside the table
// (device memory, so not checked on the host) yields a row of NaN.
void embed(const DeviceWeight& table, const int32_t* tokens, int64_t n, float* out, Stream& stream);
// out[r] = x[r] / rms(x[r]) * gamma (as cpu::rmsnorm), rows x dim.
void rmsnorm(const float* x, const float* gamma, float* out, int64_t rows, int64_t dim, float eps,
             Stream& stream);
// RoPE in place on rows (n, heads, head_dim) at positions[i], from the table
// cpu::rope_table() builds (cos, sin per pair, per position), uploaded.
void rope(float* x, const int32_t* positions, int64_t rows, int64_t heads, int64_t head_dim,
          int64_t rope_dim, RopeLayout layout, const float* cos_sin, Stream& stream);
// x[i] = silu(gate[i]) * x[i].
void swiglu(const float* gate, float* x, int64_t n, Stream& stream);
// x[i] += y[i].
void add(float* x, const float* y, int64_t n, Stream& stream);
// out[i] = in[rows[i]] for rows of `width` floats.
void gather_rows(const float* in, const int32_t* rows, int64_t count, int64_t width, float* out,
                 Stream& stream);

// Sampling on the device, one row of logits per sequence. Greedy rows
// (temperature 0) take the argmax, ties to the lowest id, as xq::argmax.
// Sampled rows follow xq::Sampler: softmax(logits / T) over the top_k
// largest (0: all), then the smallest prefix of those, largest first, whose
// mass reaches top_p; the token is the first whose cumulative probability
// exceeds uniform * (mass kept). `uniform` comes from the host's generator,
// one draw per sampled row, so the device and Sampler pick the same token
// from the same draw wherever no two candidates' cumulative sums straddle it
// differently in the last bit.
struct SamplingRow {
  float temperature = 0.0f;
  int32_t top_k = 0;
  float top_p = 1.0f;
  double uniform = 0.0;  // in [0, 1): Sampler's draw (runtime/sampler.h)
};
// tokens (rows) = the choice per row; margins (rows, may be null) = the
// row's top-1 minus top-2 logit. `params` is device memory (rows entries).
// `workspace` holds sample_workspace_bytes(rows, vocab).
size_t sample_workspace_bytes(int64_t rows, int64_t vocab);
void sample(const float* logits, int64_t rows, int64_t vocab, const SamplingRow* params,
            int32_t* tokens, float* margins, void* workspace, size_t workspace_bytes,
            Stream& stream);

}  // namespace xq::cuda
