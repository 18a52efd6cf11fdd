// Helpers the paged cache kernels (kernels/cuda/paged_*.cu) share: argument
// checks, grid sizes, the stream handle, token ownership under sequence
// sharding (as xq::SequenceShard) and warp reductions.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/attention_state.h"
#include "kernels/cuda/paged_attention.h"

namespace xq::cuda::paged {

constexpr int kWarpSize = 32;

inline void require(bool condition, const std::string& message) {
  if (!condition) throw std::invalid_argument("xq::cuda::paged: " + message);
}

inline cudaStream_t stream_of(Stream& stream) {
  return static_cast<cudaStream_t>(stream.handle());
}

// Blocks of `threads_per_block` covering `items` items one per thread.
inline unsigned int blocks_for(int64_t items, int threads_per_block) {
  const int64_t blocks = (items + threads_per_block - 1) / threads_per_block;
  require(blocks <= INT_MAX, "launch of " + std::to_string(items) + " items exceeds the grid");
  return static_cast<unsigned int>(blocks);
}

// SequenceShard::owns and ::owned_before on the device.
__device__ inline bool owns(const ShardSpec& shard, int32_t position) {
  return (position / shard.unit) % shard.shards == shard.index;
}
__device__ inline int32_t owned_before(const ShardSpec& shard, int32_t end) {
  const int32_t cycle = shard.unit * shard.shards;
  const int32_t rest = min(max(end % cycle - shard.index * shard.unit, 0), shard.unit);
  return end / cycle * shard.unit + rest;
}

// SequenceShard::position on the device: the global position of local slot `local`.
__device__ inline int32_t position_of(const ShardSpec& shard, int32_t local) {
  return local / shard.unit * shard.unit * shard.shards + shard.index * shard.unit +
         local % shard.unit;
}

// Reductions over a full warp (every lane takes part).
__device__ inline float warp_max(float value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    value = attention_state::larger(value, __shfl_xor_sync(0xffffffffu, value, offset));
  return value;
}
__device__ inline float warp_sum(float value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

}  // namespace xq::cuda::paged
