// make_device_cache: which modes the device holds, and the check that names
// what it does not.
#include "runtime/device_cache.h"

#include <algorithm>
#include <set>
#include <string>

#include "kernels/cuda/paged_attention.h"
#include "kernels/error.h"
#include "runtime/cache_mode.h"
#include "runtime/device_cache_modes.h"

namespace xq {
namespace {

// Channels of a per-channel stream the group kernel holds grids for (8 bytes
// each in 48 KiB of shared memory).
constexpr int64_t kMaxPerChannelWidth = 6144;

std::string unsupported_for(const ModelConfig& c, const CacheOptions& options) {
  const CacheModeSpec& mode = find_cache_mode(options.mode);  // throws for an unknown name
  const std::string what = "the CUDA " + std::string(mode.name) + " cache";
  if (c.head_dim % 2 != 0 || c.head_dim > cuda::paged::kMaxHeadDim)
    return what + " takes an even head_dim of at most " + std::to_string(cuda::paged::kMaxHeadDim) +
           ", not " + std::to_string(c.head_dim);
  if (c.n_kv_heads <= 0 || c.n_heads % c.n_kv_heads != 0 ||
      c.n_heads / c.n_kv_heads > cuda::paged::kMaxGroup)
    return what + " takes at most " + std::to_string(cuda::paged::kMaxGroup) +
           " query heads per KV head";
  if (options.rope_cos_sin == nullptr) return "the device cache needs the RoPE table";
  if (mode.quantized()) {
    const CacheLayout& layout = layout_for(mode, c);
    for (int32_t s = 0; s < layout.stream_count; ++s)
      if (layout.streams[s].axis == QuantAxis::kPerChannel &&
          stream_width(layout.streams[s].content, c) > kMaxPerChannelWidth)
        return what + " quantizes per channel at most " + std::to_string(kMaxPerChannelWidth) +
               " channels";
  }
  return "";
}

}  // namespace

std::string device_cache_unsupported(const Model& model, const CacheOptions& options) {
  return unsupported_for(model.config(), options);
}

int64_t check_step(const DeviceCache& cache, const std::vector<StepRows>& segments,
                   int32_t max_tokens) {
  std::set<int32_t> seen;
  int64_t rows = 0, taken = 0, given = 0;
  for (const StepRows& s : segments) {
    if (s.seq < 0 || s.seq >= cache.sequences())
      throw Error("device cache: sequence " + std::to_string(s.seq) + " out of range");
    if (!seen.insert(s.seq).second)
      throw Error("device cache: sequence " + std::to_string(s.seq) + " twice in one step");
    if (s.n < 0 || s.pos0 < 0 || s.pos0 + s.n > max_tokens)
      throw Error("device cache: positions [" + std::to_string(s.pos0) + ", " +
                  std::to_string(s.pos0 + s.n) + ") exceed the cache capacity of " +
                  std::to_string(max_tokens) + " tokens");
    const int32_t held_length = cache.length(s.seq);
    if (s.pos0 > held_length)
      throw Error("device cache: position " + std::to_string(s.pos0) + " leaves a gap after the " +
                  std::to_string(held_length) + " tokens of sequence " + std::to_string(s.seq));
    const int32_t held = cache.table(s.seq).held();
    const int32_t kept = s.pos0 < held_length ? cache.blocks_for_tokens(s.pos0) : held;
    const int32_t peak = std::max(kept, cache.blocks_for_step(s.pos0, s.pos0 + s.n));
    given += std::max(0, held - kept);
    taken += std::max(0, peak - kept);
    rows += s.n;
  }
  if (taken > cache.free_blocks() + given)
    throw PoolExhausted("device cache: the step needs " + std::to_string(taken) +
                        " more blocks, the pool has " +
                        std::to_string(cache.free_blocks() + given));
  return rows;
}

std::unique_ptr<DeviceCache> make_device_cache(const Model& model, const CacheOptions& options,
                                               cuda::Stream& stream, cuda::Blas& blas) {
  const std::string why_not = device_cache_unsupported(model, options);
  if (!why_not.empty()) throw Error(why_not);
  if (find_cache_mode(options.mode).quantized())
    return make_quantized_device_cache(model, options, stream, blas);
  return make_fp16_device_cache(model, options, stream);
}

std::unique_ptr<DeviceCache> make_device_cache(const ModelConfig& local_config,
                                               const CacheOptions& options, cuda::Stream& stream,
                                               cuda::Blas&) {
  if (find_cache_mode(options.mode).quantized())
    throw Error("cache mode '" + options.mode +
                "' cannot be split by KV head: a device cache over one rank's heads holds fp16");
  const std::string why_not = unsupported_for(local_config, options);
  if (!why_not.empty()) throw Error(why_not);
  return make_fp16_device_cache(local_config, options, stream);
}

}  // namespace xq
