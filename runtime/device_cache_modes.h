// The device caches of each mode, behind make_device_cache
// (runtime/device_cache.h). Private to runtime/device_cache*.cpp.
#pragma once

#include <memory>

#include "runtime/device_cache.h"

namespace xq {

// The fp16 KV cache (runtime/cache_fp16.h's layout) on the device.
std::unique_ptr<DeviceCache> make_fp16_device_cache(const Model& model, const CacheOptions& options,
                                                    cuda::Stream& stream);

}  // namespace xq
