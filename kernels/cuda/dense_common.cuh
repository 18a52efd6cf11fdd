// Helpers shared by the .cu files of the dense ops (dense_ops.h): argument
// checks, launch sizes, warp reductions and the GGUF block readers on the
// device. Internal to kernels/cuda.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/cuda/check.h"
#include "kernels/cuda/device.h"

namespace xq::cuda::detail {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Scratch regions inside a workspace start at this alignment (cudaMalloc's).
constexpr size_t kWorkspaceAlignment = 256;

inline void require(bool condition, const std::string& message) {
  if (!condition) throw std::invalid_argument("xq::cuda: " + message);
}

inline cudaStream_t stream_of(Stream& stream) {
  return static_cast<cudaStream_t>(stream.handle());
}

inline size_t align_up(size_t bytes, size_t alignment = kWorkspaceAlignment) {
  return (bytes + alignment - 1) / alignment * alignment;
}

inline bool aligned_to(const void* pointer, size_t alignment) {
  return reinterpret_cast<uintptr_t>(pointer) % alignment == 0;
}

// Blocks of `threads_per_block` covering `items` (ceil-div), within gridDim.x.
inline unsigned int grid_for(int64_t items, int threads_per_block) {
  const int64_t blocks = (items + threads_per_block - 1) / threads_per_block;
  require(blocks <= INT_MAX, "launch of " + std::to_string(items) + " items exceeds the grid");
  return static_cast<unsigned int>(blocks);
}

// ---------------------------------------------------------------------------
// Device helpers

__device__ __forceinline__ float half_bits_to_float(uint16_t bits) {
  return __half2float(__ushort_as_half(bits));
}

// Two bytes at an address that is at least 2-byte aligned (every field of the
// GGUF blocks read here is, given a 2-byte aligned row start).
__device__ __forceinline__ uint16_t load_u16(const uint8_t* p) {
  return *reinterpret_cast<const uint16_t*>(p);
}

// Four bytes, little-endian, from a 2-byte aligned address: Q4_0 and Q8_0
// blocks (18 and 34 bytes) put their quants only 2-byte aligned.
__device__ __forceinline__ uint32_t load_u32_from_u16(const uint8_t* p) {
  const auto* halves = reinterpret_cast<const uint16_t*>(p);
  return static_cast<uint32_t>(halves[0]) | (static_cast<uint32_t>(halves[1]) << 16);
}

__device__ __forceinline__ float warp_sum(float value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(kFullMask, value, offset);
  }
  return value;
}

// Sum over the thread block, returned to every thread. blockDim.x must be a
// multiple of 32 and at most 1024. Two __syncthreads; safe to call again.
template <typename T>
__device__ T block_sum(T value) {
  __shared__ T warp_sums[32];
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(kFullMask, value, offset);
  }
  __syncthreads();  // a previous call's readers are done with warp_sums
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  const int warps = static_cast<int>(blockDim.x) / kWarpSize;
  T total = 0;
  for (int w = 0; w < warps; ++w) total += warp_sums[w];
  return total;
}

// Value of element `k` of a row stored as GGUF blocks (or F32/F16), in fp32,
// computed as the CPU's dequantize_row does: (q - 8) * d for Q4_0, q * d + m
// for Q4_1 (one product, then one sum: no fused multiply-add), q * d for Q8_0.
__device__ __forceinline__ float row_element(const uint8_t* row, int type_id, int64_t k) {
  switch (type_id) {
    case 0:  // F32
      return reinterpret_cast<const float*>(row)[k];
    case 1:  // F16
      return half_bits_to_float(reinterpret_cast<const uint16_t*>(row)[k]);
    case 2: {  // Q4_0: 18-byte blocks, d then 16 bytes of nibbles
      const uint8_t* block = row + (k / 32) * 18;
      const int i = static_cast<int>(k % 32);
      const int q = i < 16 ? (block[2 + i] & 0x0f) : (block[2 + i - 16] >> 4);
      return __fmul_rn(static_cast<float>(q - 8), half_bits_to_float(load_u16(block)));
    }
    case 3: {  // Q4_1: 20-byte blocks, d, m, then nibbles
      const uint8_t* block = row + (k / 32) * 20;
      const int i = static_cast<int>(k % 32);
      const int q = i < 16 ? (block[4 + i] & 0x0f) : (block[4 + i - 16] >> 4);
      return __fadd_rn(__fmul_rn(static_cast<float>(q), half_bits_to_float(load_u16(block))),
                       half_bits_to_float(load_u16(block + 2)));
    }
    case 8: {  // Q8_0: 34-byte blocks, d then 32 signed bytes
      const uint8_t* block = row + (k / 32) * 34;
      const int i = static_cast<int>(k % 32);
      return __fmul_rn(static_cast<float>(static_cast<int8_t>(block[2 + i])),
                       half_bits_to_float(load_u16(block)));
    }
    default:
      return __int_as_float(0x7fc00000);  // unreachable: the host checks the type
  }
}

}  // namespace xq::cuda::detail
