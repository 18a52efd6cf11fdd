// Decode's matrix products (n <= kMatvecMaxRows rows of x) and the matmul
// dispatch of dense_ops.h.
//
// Block types (Q4_0, Q4_1, Q8_0) follow cpu::q8_gemm (kernels/cpu/
// quant_gemm.cpp) operation for operation, so each output is meant to be the
// CPU's bits:
//   * each row of x is rounded to int8 blocks of 32 as
//     cpu::quantize_activations does: d = max|x| / 127, q = rint(x * (127 /
//     max|x|)) (half to even), t = d * (c * sum(q)) with c = -8 (Q4_0),
//     1 (Q4_1), 0 (Q8_0);
//   * an output element is 8 fp32 "lanes", each an fma chain over blocks of
//     acc = fma(isum, d_w * d_x, acc), where isum is an exact integer sum of
//     8 products (nibble types: elements 4p..4p+3 and 16+4p..16+4p+3 of the
//     even blocks for lanes p = 0..3, of the odd blocks for lanes 4 + p) or of
//     4 products (Q8_0: elements 4l..4l+3 of every block for lane l); the
//     lanes are reduced as ((0+1)+(2+3))+((4+5)+(6+7)); the nibble types add
//     the offset chain o = fma(m_w, t_x, o) over the blocks in order.
// The integer sums are __dp4a (4 int8 products per instruction, exact), so
// only the fp32 chains carry rounding, and they run in the CPU's order.
//
// F32 / F16 weights take fp32 dot products with a warp per weight row; their
// summation order differs from cpu::float_gemm's single chain (the tests
// state the bound).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "kernels/cuda/check.h"
#include "kernels/cuda/dense_common.cuh"
#include "kernels/cuda/dense_ops.h"

namespace xq::cuda {
namespace {

using detail::align_up;
using detail::grid_for;
using detail::kFullMask;
using detail::require;
using detail::stream_of;

constexpr int kBlockElems = 32;
// Rows of x that meet each weight block in one pass; more rows run in chunks.
constexpr int kMaxXRows = 8;
// The CPU's 8 fp32 lanes per output element become 8 threads.
constexpr int kLanesPerRow = 8;
constexpr int kMatvecThreads = 128;  // 16 weight rows per thread block
constexpr int kQuantizeThreads = 256;
constexpr int kFloatThreads = 256;  // 8 warps, one weight row each

// Block formats of the int8 path: bytes per block, where the quants start,
// whether the block stores m (Q4_1) or takes m_w = d_w (Q4_0), and c.
struct Q4_0Format {
  static constexpr bool kNibbles = true;
  static constexpr bool kHasMin = false;
  static constexpr int kBytes = 18;
  static constexpr int kQuants = 2;
};
struct Q4_1Format {
  static constexpr bool kNibbles = true;
  static constexpr bool kHasMin = true;
  static constexpr int kBytes = 20;
  static constexpr int kQuants = 4;
};
struct Q8_0Format {
  static constexpr bool kNibbles = false;
  static constexpr int kBytes = 34;
  static constexpr int kQuants = 2;
};

bool int8_type(TensorType type) {
  return type == TensorType::kQ4_0 || type == TensorType::kQ4_1 || type == TensorType::kQ8_0;
}

// The multiplier c of x's block sum in its offset term (see quant.h).
float activation_sum_factor(TensorType type) {
  if (type == TensorType::kQ4_1) return 1.0f;
  if (type == TensorType::kQ4_0) return -8.0f;
  return 0.0f;
}

// Where the int8 copy of x lives in the workspace: quants (n, cols) int8, then
// d (n, blocks) and t (n, blocks) fp32, each region 256-byte aligned.
struct Q8Layout {
  int8_t* quants;
  float* scales;
  float* terms;
};
size_t q8_region_bytes(int64_t n, int64_t cols, size_t* scales_at, size_t* terms_at) {
  const int64_t blocks = cols / kBlockElems;
  *scales_at = align_up(static_cast<size_t>(n * cols));
  *terms_at = *scales_at + align_up(static_cast<size_t>(n * blocks) * sizeof(float));
  return *terms_at + align_up(static_cast<size_t>(n * blocks) * sizeof(float));
}

// One warp per 32-value block of x: lane i holds value i; the block's max|x|
// and quant sum are warp reductions (max is exact in any order, the integer
// sum too). Thread block = 8 warps = 8 blocks of x.
__global__ void quantize_x_kernel(const float* x, int64_t total_blocks, float sum_factor,
                                  int8_t* quants, float* scales, float* terms) {
  const int64_t block = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (block >= total_blocks) return;  // whole warps leave together
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const float value = x[block * kBlockElems + lane];
  float max_abs = fabsf(value);
  for (int offset = 16; offset > 0; offset /= 2) {
    max_abs = fmaxf(max_abs, __shfl_xor_sync(kFullMask, max_abs, offset));
  }
  const float inverse = max_abs > 0 ? __fdiv_rn(127.0f, max_abs) : 0.0f;
  const int q = __float2int_rn(__fmul_rn(value, inverse));  // rint: half to even
  quants[block * kBlockElems + lane] = static_cast<int8_t>(q);
  int sum = q;
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(kFullMask, sum, offset);
  if (lane == 0) {
    const float d = __fdiv_rn(max_abs, 127.0f);
    scales[block] = d;
    terms[block] = __fmul_rn(d, __fmul_rn(sum_factor, static_cast<float>(sum)));
  }
}

// y[j][r] for kX rows j of x and the weight rows r of this thread block.
//
// Tiling: a thread block of 128 threads owns 16 consecutive weight rows; a
// group of 8 consecutive threads (a quarter warp) owns one row, thread l of
// the group being the CPU's fp32 lane l. The group walks its row's blocks in
// order; per step the nibble types read two blocks (lanes 0-3 the even one,
// 4-7 the odd one), Q8_0 one block (8 lanes x 4 quant bytes), each thread 4
// quant bytes plus the block's scales, so the group reads the row's bytes
// front to back and a warp streams 4 rows at once. Each weight block is
// loaded once and meets all kX rows of x (int8 copies in L1/L2). The offset
// chain of the nibble types runs on thread j of the group for x row j, with
// the pair's m_w shared by shuffles. At the end the 8 lanes are reduced with
// three xor shuffles inside the group, in the CPU's pairing.
template <class F, int kX>
__global__ void __launch_bounds__(kMatvecThreads)
    matvec_int8_kernel(const uint8_t* weights, size_t row_bytes, int64_t out_rows, int blocks,
                       const int8_t* x_quants, const float* x_scales, const float* x_terms,
                       int64_t cols, float* y) {
  const int lane = static_cast<int>(threadIdx.x) % kLanesPerRow;
  const int64_t wanted_row = static_cast<int64_t>(blockIdx.x) * (kMatvecThreads / kLanesPerRow) +
                             static_cast<int64_t>(threadIdx.x) / kLanesPerRow;
  // Rows past the end repeat the last row (their shuffles must still run)
  // and store nothing.
  const bool active = wanted_row < out_rows;
  const int64_t row = active ? wanted_row : out_rows - 1;
  const uint8_t* w_row = weights + static_cast<size_t>(row) * row_bytes;
  const int offset_row = lane < kX ? lane : kX - 1;  // x row of this thread's offset chain
  float acc[kX];
#pragma unroll
  for (int j = 0; j < kX; ++j) acc[j] = 0.0f;
  float offset = 0.0f;

  if constexpr (F::kNibbles) {
    const int half = lane / 4, part = lane % 4;
    const int units = (blocks + 1) / 2;
    const float* t = x_terms + static_cast<int64_t>(offset_row) * blocks;
#pragma unroll 4
    for (int u = 0; u < units; ++u) {
      const int b = 2 * u + half;
      const bool has_block = b < blocks;
      float d = 0.0f, m = 0.0f;
      uint32_t packed = 0;
      if (has_block) {
        const uint8_t* block = w_row + static_cast<size_t>(b) * F::kBytes;
        d = detail::half_bits_to_float(detail::load_u16(block));
        m = F::kHasMin ? detail::half_bits_to_float(detail::load_u16(block + 2)) : d;
        packed = detail::load_u32_from_u16(block + F::kQuants + 4 * part);
      }
      const float m_even = __shfl_sync(kFullMask, m, 0, kLanesPerRow);
      const float m_odd = __shfl_sync(kFullMask, m, 4, kLanesPerRow);
      if (has_block) {
        // Bytes 4p..4p+3 hold elements 4p..4p+3 (low nibbles) and
        // 16+4p..16+4p+3 (high nibbles); nibbles fit signed bytes as they are.
        const int low = static_cast<int>(packed & 0x0f0f0f0fu);
        const int high = static_cast<int>((packed >> 4) & 0x0f0f0f0fu);
#pragma unroll
        for (int j = 0; j < kX; ++j) {
          const int8_t* xq = x_quants + j * cols + static_cast<int64_t>(b) * kBlockElems;
          const int x_low = *reinterpret_cast<const int*>(xq + 4 * part);
          const int x_high = *reinterpret_cast<const int*>(xq + 16 + 4 * part);
          const int isum = __dp4a(high, x_high, __dp4a(low, x_low, 0));
          const float scale = __fmul_rn(d, x_scales[j * blocks + b]);
          acc[j] = __fmaf_rn(static_cast<float>(isum), scale, acc[j]);
        }
      }
      offset = __fmaf_rn(m_even, t[2 * u], offset);
      if (2 * u + 1 < blocks) offset = __fmaf_rn(m_odd, t[2 * u + 1], offset);
    }
  } else {
#pragma unroll 4
    for (int b = 0; b < blocks; ++b) {
      const uint8_t* block = w_row + static_cast<size_t>(b) * F::kBytes;
      const float d = detail::half_bits_to_float(detail::load_u16(block));
      const int packed = static_cast<int>(detail::load_u32_from_u16(block + F::kQuants + 4 * lane));
#pragma unroll
      for (int j = 0; j < kX; ++j) {
        const int8_t* xq = x_quants + j * cols + static_cast<int64_t>(b) * kBlockElems;
        const int isum = __dp4a(packed, *reinterpret_cast<const int*>(xq + 4 * lane), 0);
        const float scale = __fmul_rn(d, x_scales[j * blocks + b]);
        acc[j] = __fmaf_rn(static_cast<float>(isum), scale, acc[j]);
      }
    }
  }

  float mine = 0.0f;
#pragma unroll
  for (int j = 0; j < kX; ++j) {
    float v = acc[j];
    v = __fadd_rn(v, __shfl_xor_sync(kFullMask, v, 1, kLanesPerRow));  // a0+a1, a2+a3, ...
    v = __fadd_rn(v, __shfl_xor_sync(kFullMask, v, 2, kLanesPerRow));  // (a0+a1)+(a2+a3), ...
    v = __fadd_rn(v, __shfl_xor_sync(kFullMask, v, 4, kLanesPerRow));
    if (j == lane) mine = v;
  }
  if (active && lane < kX) {
    y[static_cast<int64_t>(lane) * out_rows + row] = F::kNibbles ? __fadd_rn(mine, offset) : mine;
  }
}

// y[j][r] for kX rows j of x, F32 or F16 weights. Tiling: one warp per
// weight row (8 rows per thread block of 256); lane i reads elements
// i, i + 32, ... of the row and of each x row (coalesced), keeps kX fp32
// partial sums and the warp reduces them with xor shuffles.
template <bool kHalf, int kX>
__global__ void __launch_bounds__(kFloatThreads)
    matvec_float_kernel(const uint8_t* weights, size_t row_bytes, int64_t out_rows, int64_t cols,
                        const float* x, float* y) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (row >= out_rows) return;  // whole warps leave together
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const uint8_t* w_row = weights + static_cast<size_t>(row) * row_bytes;
  float acc[kX];
#pragma unroll
  for (int j = 0; j < kX; ++j) acc[j] = 0.0f;
  for (int64_t k = lane; k < cols; k += 32) {
    const float w = kHalf ? detail::half_bits_to_float(reinterpret_cast<const uint16_t*>(w_row)[k])
                          : reinterpret_cast<const float*>(w_row)[k];
#pragma unroll
    for (int j = 0; j < kX; ++j) acc[j] = __fmaf_rn(w, x[j * cols + k], acc[j]);
  }
  float mine = 0.0f;
#pragma unroll
  for (int j = 0; j < kX; ++j) {
    const float sum = detail::warp_sum(acc[j]);
    if (j == lane) mine = sum;
  }
  if (lane < kX) y[static_cast<int64_t>(lane) * out_rows + row] = mine;
}

template <class F, int kX>
void launch_int8(const DeviceWeight& w, const Q8Layout& x, int64_t x_row, float* y,
                 cudaStream_t stream) {
  const int blocks = static_cast<int>(w.cols / kBlockElems);
  const unsigned int grid = grid_for(w.rows, kMatvecThreads / kLanesPerRow);
  matvec_int8_kernel<F, kX><<<grid, kMatvecThreads, 0, stream>>>(
      w.data, w.row_bytes, w.rows, blocks, x.quants + x_row * w.cols, x.scales + x_row * blocks,
      x.terms + x_row * blocks, w.cols, y + x_row * w.rows);
  CUDA_CHECK_LAUNCH();
}

template <class F>
void launch_int8_chunk(int rows, const DeviceWeight& w, const Q8Layout& x, int64_t x_row, float* y,
                       cudaStream_t stream) {
  switch (rows) {
    case 1:
      return launch_int8<F, 1>(w, x, x_row, y, stream);
    case 2:
      return launch_int8<F, 2>(w, x, x_row, y, stream);
    case 3:
      return launch_int8<F, 3>(w, x, x_row, y, stream);
    case 4:
      return launch_int8<F, 4>(w, x, x_row, y, stream);
    case 5:
      return launch_int8<F, 5>(w, x, x_row, y, stream);
    case 6:
      return launch_int8<F, 6>(w, x, x_row, y, stream);
    case 7:
      return launch_int8<F, 7>(w, x, x_row, y, stream);
    default:
      return launch_int8<F, 8>(w, x, x_row, y, stream);
  }
}

template <bool kHalf, int kX>
void launch_float(const DeviceWeight& w, const float* x, int64_t x_row, float* y,
                  cudaStream_t stream) {
  const unsigned int grid = grid_for(w.rows, kFloatThreads / 32);
  matvec_float_kernel<kHalf, kX><<<grid, kFloatThreads, 0, stream>>>(
      w.data, w.row_bytes, w.rows, w.cols, x + x_row * w.cols, y + x_row * w.rows);
  CUDA_CHECK_LAUNCH();
}

template <bool kHalf>
void launch_float_chunk(int rows, const DeviceWeight& w, const float* x, int64_t x_row, float* y,
                        cudaStream_t stream) {
  switch (rows) {
    case 1:
      return launch_float<kHalf, 1>(w, x, x_row, y, stream);
    case 2:
      return launch_float<kHalf, 2>(w, x, x_row, y, stream);
    case 3:
      return launch_float<kHalf, 3>(w, x, x_row, y, stream);
    case 4:
      return launch_float<kHalf, 4>(w, x, x_row, y, stream);
    case 5:
      return launch_float<kHalf, 5>(w, x, x_row, y, stream);
    case 6:
      return launch_float<kHalf, 6>(w, x, x_row, y, stream);
    case 7:
      return launch_float<kHalf, 7>(w, x, x_row, y, stream);
    default:
      return launch_float<kHalf, 8>(w, x, x_row, y, stream);
  }
}

void check_product(const DeviceWeight& w, const float* x, int64_t n, const float* y,
                   const char* what) {
  require(device_supports(w.type),
          std::string(what) + ": the device does not read " + tensor_type_name(w.type));
  require(n >= 0 && w.rows >= 0 && w.cols >= 0, std::string(what) + ": negative shape");
  require(w.rows <= INT_MAX && w.cols <= INT_MAX && n <= INT_MAX,
          std::string(what) + ": dimensions beyond int range");
  require(detail::aligned_to(w.data, 4), std::string(what) + ": weights not 4-byte aligned");
  require(n == 0 || w.rows == 0 || (x != nullptr && y != nullptr),
          std::string(what) + ": null x or y");
}

}  // namespace

size_t matvec_workspace_bytes(const DeviceWeight& w, int64_t n) {
  if (!int8_type(w.type) || n <= 0) return 0;
  size_t scales_at = 0, terms_at = 0;
  return q8_region_bytes(n, w.cols, &scales_at, &terms_at);
}

size_t matmul_workspace_bytes(const DeviceWeight& w, int64_t max_rows) {
  const size_t matvec = matvec_workspace_bytes(w, std::min(max_rows, kMatvecMaxRows));
  const size_t gemm = max_rows > kMatvecMaxRows ? gemm_workspace_bytes(w, max_rows) : 0;
  return std::max(matvec, gemm);
}

void matvec_quantized(const DeviceWeight& w, const float* x, int64_t n, float* y, void* workspace,
                      size_t workspace_bytes, Stream& stream) {
  check_product(w, x, n, y, "matvec_quantized");
  if (n == 0 || w.rows == 0) return;
  const cudaStream_t cuda_stream = stream_of(stream);
  if (w.cols == 0) {
    CUDA_CHECK(cudaMemsetAsync(y, 0, static_cast<size_t>(n * w.rows) * sizeof(float), cuda_stream));
    return;
  }
  if (!int8_type(w.type)) {
    const bool half = w.type == TensorType::kF16;
    for (int64_t x_row = 0; x_row < n; x_row += kMaxXRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kMaxXRows, n - x_row));
      if (half) {
        launch_float_chunk<true>(rows, w, x, x_row, y, cuda_stream);
      } else {
        launch_float_chunk<false>(rows, w, x, x_row, y, cuda_stream);
      }
    }
    return;
  }
  require(w.cols % kBlockElems == 0, "matvec_quantized: columns are not whole blocks");
  size_t scales_at = 0, terms_at = 0;
  const size_t needed = q8_region_bytes(n, w.cols, &scales_at, &terms_at);
  require(workspace_bytes >= needed, "matvec_quantized: workspace of " +
                                         std::to_string(workspace_bytes) + " bytes, needs " +
                                         std::to_string(needed));
  require(detail::aligned_to(workspace, detail::kWorkspaceAlignment),
          "matvec_quantized: workspace not 256-byte aligned");
  auto* base = static_cast<uint8_t*>(workspace);
  const Q8Layout layout{reinterpret_cast<int8_t*>(base), reinterpret_cast<float*>(base + scales_at),
                        reinterpret_cast<float*>(base + terms_at)};
  const int64_t total_blocks = n * (w.cols / kBlockElems);
  quantize_x_kernel<<<grid_for(total_blocks * 32, kQuantizeThreads), kQuantizeThreads, 0,
                      cuda_stream>>>(x, total_blocks, activation_sum_factor(w.type), layout.quants,
                                     layout.scales, layout.terms);
  CUDA_CHECK_LAUNCH();
  for (int64_t x_row = 0; x_row < n; x_row += kMaxXRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kMaxXRows, n - x_row));
    switch (w.type) {
      case TensorType::kQ4_0:
        launch_int8_chunk<Q4_0Format>(rows, w, layout, x_row, y, cuda_stream);
        break;
      case TensorType::kQ4_1:
        launch_int8_chunk<Q4_1Format>(rows, w, layout, x_row, y, cuda_stream);
        break;
      default:
        launch_int8_chunk<Q8_0Format>(rows, w, layout, x_row, y, cuda_stream);
        break;
    }
  }
}

void matmul(const DeviceWeight& w, const float* x, int64_t n, float* y, void* workspace,
            size_t workspace_bytes, Blas& blas, Stream& stream) {
  if (n <= kMatvecMaxRows) {
    matvec_quantized(w, x, n, y, workspace, workspace_bytes, stream);
  } else {
    gemm_fp16(w, x, n, y, workspace, workspace_bytes, blas, stream);
  }
}

}  // namespace xq::cuda
