#include "runtime/cache.h"

#include "kernels/error.h"
#include "runtime/cache_fp16.h"
#include "runtime/cache_mode.h"
#include "runtime/cache_quantized.h"

namespace xq {

void AttentionCache::attend_partial(int32_t, int32_t, int32_t, int32_t, const float*,
                                    cpu::PartialAttention&) {
  throw Error("cache mode '" + mode() +
              "' has no partial attention (it is not sharded by sequence)");
}

std::unique_ptr<AttentionCache> make_cache(const Model& model, const CacheOptions& options) {
  const CacheModeSpec& mode = find_cache_mode(options.mode);
  const ModelConfig& c = model.config();
  if (options.keep_outlier_channel &&
      layout_for(mode, c).kv_source != KvSource::kRebuiltFromLatents)
    throw Error(
        "--keep-outlier-channel applies to xquant-B on GQA models (the latent X·Uk), not to '" +
        options.mode + "' on this model");
  if (mode.quantized()) return std::make_unique<QuantizedCache>(model, options, mode);
  ModelConfig covered = c;  // the layers this cache holds
  covered.n_layers = options.layers > 0 ? options.layers : covered.n_layers - options.first_layer;
  if (options.first_layer < 0 || covered.n_layers < 1 ||
      options.first_layer + covered.n_layers > c.n_layers)
    throw Error("cache: layers [" + std::to_string(options.first_layer) + ", " +
                std::to_string(options.first_layer + covered.n_layers) +
                ") are not part of the model");
  return std::make_unique<Fp16KvCache>(covered, options);
}

}  // namespace xq
