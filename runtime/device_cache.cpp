// make_device_cache: which modes the device holds, and the check that names
// what it does not.
#include "runtime/device_cache.h"

#include <string>

#include "kernels/cuda/paged_attention.h"
#include "kernels/error.h"
#include "runtime/cache_mode.h"
#include "runtime/device_cache_modes.h"

namespace xq {

std::string device_cache_unsupported(const Model& model, const CacheOptions& options) {
  const CacheModeSpec& mode = find_cache_mode(options.mode);  // throws for an unknown name
  if (mode.name != "fp16")
    return "cache mode '" + options.mode +
           "' is not available on the CUDA backend yet (the device holds: fp16)";
  const ModelConfig& c = model.config();
  if (c.head_dim % 2 != 0 || c.head_dim > cuda::paged::kMaxHeadDim)
    return "the CUDA fp16 cache takes an even head_dim of at most " +
           std::to_string(cuda::paged::kMaxHeadDim) + ", not " + std::to_string(c.head_dim);
  if (c.n_kv_heads <= 0 || c.n_heads % c.n_kv_heads != 0 ||
      c.n_heads / c.n_kv_heads > cuda::paged::kMaxGroup)
    return "the CUDA fp16 cache takes at most " + std::to_string(cuda::paged::kMaxGroup) +
           " query heads per KV head";
  if (options.rope_cos_sin == nullptr) return "the device cache needs the RoPE table";
  return "";
}

std::unique_ptr<DeviceCache> make_device_cache(const Model& model, const CacheOptions& options,
                                               cuda::Stream& stream, cuda::Blas&) {
  const std::string why_not = device_cache_unsupported(model, options);
  if (!why_not.empty()) throw Error(why_not);
  return make_fp16_device_cache(model, options, stream);
}

}  // namespace xq
