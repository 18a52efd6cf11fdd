// The device caches of each mode, behind make_device_cache
// (runtime/device_cache.h). Private to runtime/device_cache*.cpp.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "runtime/device_cache.h"

namespace xq {

// The fp16 KV cache (runtime/cache_fp16.h's layout) on the device.
std::unique_ptr<DeviceCache> make_fp16_device_cache(const Model& model, const CacheOptions& options,
                                                    cuda::Stream& stream);
// The same over one tensor-parallel rank's heads: `local_config` has the
// rank's n_heads and n_kv_heads and n_layers = the layers the cache holds
// (as the CPU's HeadShardedAttention builds its Fp16KvCache).
std::unique_ptr<DeviceCache> make_fp16_device_cache(const ModelConfig& local_config,
                                                    const CacheOptions& options,
                                                    cuda::Stream& stream);

// What every device cache's begin_step checks before anything changes: each
// segment names a slot once, stays within max_tokens and leaves no gap after
// what its sequence holds, and the pool covers the blocks the step takes net
// of what its truncations give back (PoolExhausted otherwise). Returns the
// step's rows.
int64_t check_step(const DeviceCache& cache, const std::vector<StepRows>& segments,
                   int32_t max_tokens);

// The quantized modes (runtime/cache_quantized.h's layouts) on the device
// (runtime/device_cache_quantized.cpp).
std::unique_ptr<DeviceCache> make_quantized_device_cache(const Model& model,
                                                         const CacheOptions& options,
                                                         cuda::Stream& stream, cuda::Blas& blas);

}  // namespace xq
