// CUDA kernels for the transformer ops in backend.h, and their host-pointer
// launchers. The per-element formulas (RoPE rotation, SiLU) come from
// kernels/elementwise.h and the Q4_1 block layout from kernels/cpu/quant.h, so
// the CPU tests already cover the math these kernels run.
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/cuda/backend.h"
#include "kernels/cuda/check.h"
#include "kernels/elementwise.h"
#include "kernels/gguf_blocks.h"

namespace xq::cuda {
namespace {

static_assert(sizeof(BlockQ4_1) == 20, "Q4_1 blocks must match the GGUF byte layout");

constexpr int kWarpSize = 32;
// Enough threads to hide memory latency, few enough for several blocks per SM.
constexpr int kThreadsPerBlock = 256;
constexpr int64_t kQ4_1BlockElems = 32;
constexpr int64_t kQ4_1PackedBytes = kQ4_1BlockElems / 2;

void require(bool condition, const std::string& message) {
  if (!condition) throw std::invalid_argument("xq::cuda: " + message);
}

// Blocks needed to cover `items` work items one per thread (ceil-div). Grids
// are 1-D, so the count must fit gridDim.x.
unsigned int blocks_for(int64_t items, int threads_per_block) {
  const int64_t blocks = (items + threads_per_block - 1) / threads_per_block;
  require(blocks <= INT_MAX,
          "launch of " + std::to_string(items) + " items exceeds the grid limit");
  return static_cast<unsigned int>(blocks);
}

// Owns `count` elements of device memory.
template <typename T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(int64_t count) : count_(count) {
    if (count_ > 0) CUDA_CHECK(cudaMalloc(&data_, bytes()));
  }
  DeviceBuffer(const T* host, int64_t count) : DeviceBuffer(count) { upload(host); }
  // The free's status is dropped: a destructor must not throw, and any error
  // of the work that used the buffer was already reported by its checked copy back.
  ~DeviceBuffer() {
    if (data_ != nullptr) static_cast<void>(cudaFree(data_));
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  T* get() const { return data_; }
  size_t bytes() const { return static_cast<size_t>(count_) * sizeof(T); }

  void upload(const T* host) {
    if (count_ > 0) CUDA_CHECK(cudaMemcpy(data_, host, bytes(), cudaMemcpyHostToDevice));
  }
  // cudaMemcpy to the host waits for the kernels before it, so this is also
  // where an error inside a kernel surfaces.
  void download(T* host) const {
    if (count_ > 0) CUDA_CHECK(cudaMemcpy(host, data_, bytes(), cudaMemcpyDeviceToHost));
  }

 private:
  int64_t count_ = 0;
  T* data_ = nullptr;
};

// Owns a cuBLAS handle. One per call rather than one cached for the process:
// the launchers are for tests and tools, and a process-wide handle would have
// to be destroyed after main() returns, when the CUDA runtime may already be
// shutting down.
class CublasHandle {
 public:
  CublasHandle() { CUBLAS_CHECK(cublasCreate(&handle_)); }
  ~CublasHandle() { static_cast<void>(cublasDestroy(handle_)); }
  CublasHandle(const CublasHandle&) = delete;
  CublasHandle& operator=(const CublasHandle&) = delete;

  cublasHandle_t get() const { return handle_; }

 private:
  cublasHandle_t handle_ = nullptr;
};

// ---------------------------------------------------------------------------
// Device helpers

__device__ float warp_sum(float value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;
}

// Sum of `value` over the thread block, returned to every thread. blockDim.x
// must be a multiple of the warp size (the full-mask shuffles rely on it).
// Uses shared memory once, so call it at most once per kernel.
__device__ float block_sum(float value) {
  __shared__ float warp_sums[kThreadsPerBlock / kWarpSize];
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  value = warp_sum(value);
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  if (warp == 0) {
    const int warps = static_cast<int>(blockDim.x) / kWarpSize;
    value = warp_sum(lane < warps ? warp_sums[lane] : 0.0f);
    // Every lane of warp 0 has read its slot (the shuffles synchronize the warp),
    // so slot 0 can now carry the total.
    if (lane == 0) warp_sums[0] = value;
  }
  __syncthreads();
  return warp_sums[0];
}

__device__ float fp16_bits_to_float(uint16_t bits) {
  return __half2float(__ushort_as_half(bits));
}

__device__ int64_t global_thread_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

// ---------------------------------------------------------------------------
// Kernels

// One block per row: the block sums the row's squares, then scales it.
__global__ void rmsnorm_kernel(const float* x, const float* gamma, float* out, int64_t dim,
                               float eps) {
  const float* row = x + static_cast<int64_t>(blockIdx.x) * dim;
  float* dst = out + static_cast<int64_t>(blockIdx.x) * dim;
  float sum_sq = 0.0f;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) sum_sq += row[i] * row[i];
  const float scale = rsqrtf(block_sum(sum_sq) / static_cast<float>(dim) + eps);
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) dst[i] = row[i] * scale * gamma[i];
}

// One thread per rotated pair: (row, head, pair) flattened with pair fastest,
// so neighbouring threads touch neighbouring channels of one head.
__global__ void rope_kernel(float* x, const int32_t* positions, int64_t heads, int64_t head_dim,
                            int64_t pairs, RopeLayout layout, const float* cos_sin,
                            int64_t total_pairs) {
  const int64_t index = global_thread_index();
  if (index >= total_pairs) return;
  const int64_t pair = index % pairs;
  const int64_t head_index = index / pairs;  // row * heads + head
  const int64_t row = head_index / heads;
  const float* cos_sin_entry = cos_sin + (static_cast<int64_t>(positions[row]) * pairs + pair) * 2;
  float* head = x + head_index * head_dim;
  if (layout == RopeLayout::kInterleaved) {
    rope_rotate(head[2 * pair], head[2 * pair + 1], cos_sin_entry[0], cos_sin_entry[1]);
  } else {
    rope_rotate(head[pair], head[pair + pairs], cos_sin_entry[0], cos_sin_entry[1]);
  }
}

// One thread per packed byte: byte j of a block holds element j (low nibble)
// and element j + 16 (high nibble); value = q * d + m.
__global__ void dequantize_q4_1_kernel(const BlockQ4_1* blocks, float* out, int64_t total_bytes) {
  const int64_t index = global_thread_index();
  if (index >= total_bytes) return;
  const int64_t block_index = index / kQ4_1PackedBytes;
  const int64_t byte_index = index % kQ4_1PackedBytes;
  const BlockQ4_1& block = blocks[block_index];
  const float scale = fp16_bits_to_float(block.d);
  const float offset = fp16_bits_to_float(block.m);
  const uint8_t packed = block.qs[byte_index];
  float* dst = out + block_index * kQ4_1BlockElems;
  dst[byte_index] = static_cast<float>(packed & 0x0f) * scale + offset;
  dst[byte_index + kQ4_1PackedBytes] = static_cast<float>(packed >> 4) * scale + offset;
}

__global__ void swiglu_kernel(const float* gate, float* x, int64_t n) {
  const int64_t index = global_thread_index();
  if (index < n) x[index] *= silu(gate[index]);
}

}  // namespace

// ---------------------------------------------------------------------------
// Host launchers

bool device_available(std::string* why_not) {
  auto fail = [&](const std::string& reason) {
    if (why_not != nullptr) *why_not = reason;
    return false;
  };
  int device_count = 0;
  const cudaError_t status = cudaGetDeviceCount(&device_count);
  if (status != cudaSuccess) {
    static_cast<void>(cudaGetLastError());  // leave no error behind for later checks
    return fail(std::string("cudaGetDeviceCount: ") + cudaGetErrorName(status) + ": " +
                cudaGetErrorString(status));
  }
  if (device_count == 0) return fail("cudaGetDeviceCount found no CUDA devices");
  // A device older than every architecture compiled in cannot run the kernels;
  // asking for one kernel's attributes finds that out without launching it.
  cudaFuncAttributes attributes{};
  const cudaError_t image_status = cudaFuncGetAttributes(&attributes, swiglu_kernel);
  if (image_status != cudaSuccess) {
    static_cast<void>(cudaGetLastError());
    int device = 0, major = 0, minor = 0;
    static_cast<void>(cudaGetDevice(&device));
    static_cast<void>(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    static_cast<void>(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    return fail(
        "no kernel image for device " + std::to_string(device) + " (compute capability " +
        std::to_string(major) + "." + std::to_string(minor) +
        "); rebuild with it in CMAKE_CUDA_ARCHITECTURES: " + cudaGetErrorString(image_status));
  }
  return true;
}

void rmsnorm(const float* x_host, const float* gamma_host, float* out_host, int64_t rows,
             int64_t dim, float eps) {
  require(rows >= 0 && dim >= 0, "rmsnorm: negative shape");
  require(rows <= INT_MAX, "rmsnorm: more rows than grid blocks");
  if (rows == 0 || dim == 0) return;
  DeviceBuffer<float> x(x_host, rows * dim);
  DeviceBuffer<float> gamma(gamma_host, dim);
  DeviceBuffer<float> out(rows * dim);
  rmsnorm_kernel<<<static_cast<unsigned int>(rows), kThreadsPerBlock>>>(x.get(), gamma.get(),
                                                                        out.get(), dim, eps);
  CUDA_CHECK_LAUNCH();
  out.download(out_host);
}

void rope(float* x_host, const int32_t* positions_host, int64_t rows, int64_t heads,
          int64_t head_dim, int64_t rope_dim, RopeLayout layout, const float* cos_sin_host) {
  require(rows >= 0 && heads >= 0 && head_dim >= 0, "rope: negative shape");
  require(rope_dim >= 0 && rope_dim % 2 == 0 && rope_dim <= head_dim,
          "rope: rope_dim must be even and at most head_dim");
  const int64_t pairs = rope_dim / 2;
  const int64_t total_pairs = rows * heads * pairs;
  if (total_pairs == 0) return;
  // The table is indexed by position, so only rows up to the largest one are copied.
  const int32_t max_position = *std::max_element(positions_host, positions_host + rows);
  require(*std::min_element(positions_host, positions_host + rows) >= 0, "rope: negative position");
  const int64_t table_floats = (static_cast<int64_t>(max_position) + 1) * pairs * 2;

  DeviceBuffer<float> x(x_host, rows * heads * head_dim);
  DeviceBuffer<int32_t> positions(positions_host, rows);
  DeviceBuffer<float> cos_sin(cos_sin_host, table_floats);
  rope_kernel<<<blocks_for(total_pairs, kThreadsPerBlock), kThreadsPerBlock>>>(
      x.get(), positions.get(), heads, head_dim, pairs, layout, cos_sin.get(), total_pairs);
  CUDA_CHECK_LAUNCH();
  x.download(x_host);
}

void dequantize_q4_1(const void* blocks_host, float* out_host, int64_t n) {
  require(n >= 0 && n % kQ4_1BlockElems == 0, "dequantize_q4_1: n must be a multiple of 32");
  if (n == 0) return;
  const int64_t block_count = n / kQ4_1BlockElems;
  DeviceBuffer<BlockQ4_1> blocks(static_cast<const BlockQ4_1*>(blocks_host), block_count);
  DeviceBuffer<float> out(n);
  const int64_t total_bytes = block_count * kQ4_1PackedBytes;
  dequantize_q4_1_kernel<<<blocks_for(total_bytes, kThreadsPerBlock), kThreadsPerBlock>>>(
      blocks.get(), out.get(), total_bytes);
  CUDA_CHECK_LAUNCH();
  out.download(out_host);
}

void swiglu(const float* gate_host, float* x_host, int64_t n) {
  require(n >= 0, "swiglu: negative length");
  if (n == 0) return;
  DeviceBuffer<float> gate(gate_host, n);
  DeviceBuffer<float> x(x_host, n);
  swiglu_kernel<<<blocks_for(n, kThreadsPerBlock), kThreadsPerBlock>>>(gate.get(), x.get(), n);
  CUDA_CHECK_LAUNCH();
  x.download(x_host);
}

void sgemm_xwt(const float* x_host, const float* w_host, float* y_host, int64_t n, int64_t rows,
               int64_t cols) {
  require(n >= 0 && rows >= 0 && cols >= 0, "sgemm_xwt: negative shape");
  require(n <= INT_MAX && rows <= INT_MAX && cols <= INT_MAX,
          "sgemm_xwt: dimensions exceed cuBLAS's int range");
  if (n == 0 || rows == 0) return;
  DeviceBuffer<float> x(x_host, n * cols);
  DeviceBuffer<float> w(w_host, rows * cols);
  DeviceBuffer<float> y(n * rows);
  if (cols == 0) {
    CUDA_CHECK(cudaMemset(y.get(), 0, y.bytes()));
  } else {
    // cuBLAS is column-major. Read as column-major, row-major y (n, rows) is
    // y^T (rows, n), w is w^T (cols, rows) and x is x^T (cols, n); so
    // y^T = op(w^T) * x^T with op = transpose: an m = rows, n, k = cols product.
    const CublasHandle handle;
    const float alpha = 1.0f, beta = 0.0f;
    const int m_rows = static_cast<int>(rows), n_cols = static_cast<int>(n);
    const int k_inner = static_cast<int>(cols);
    CUBLAS_CHECK(cublasSgemm(handle.get(), CUBLAS_OP_T, CUBLAS_OP_N, m_rows, n_cols, k_inner,
                             &alpha, w.get(), k_inner, x.get(), k_inner, &beta, y.get(), m_rows));
  }
  y.download(y_host);
}

}  // namespace xq::cuda
