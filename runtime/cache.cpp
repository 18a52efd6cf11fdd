#include "runtime/cache.h"

#include <cstdlib>

#include "kernels/error.h"
#include "runtime/cache_fp16.h"
#include "runtime/cache_quantized.h"

namespace xq {
namespace {

// "name-B" with B one of `allowed`; returns B, or 0 when the name differs.
int parse_bits(const std::string& mode, const std::string& name,
               std::initializer_list<int> allowed) {
  const std::string prefix = name + "-";
  if (mode.rfind(prefix, 0) != 0) return 0;
  const std::string digits = mode.substr(prefix.size());
  for (int bits : allowed)
    if (digits == std::to_string(bits)) return bits;
  std::string list;
  for (int bits : allowed) list += (list.empty() ? "" : ", ") + std::to_string(bits);
  throw Error("cache mode '" + mode + "': " + name + " takes " + list + " bits");
}

}  // namespace

void AttentionCache::attend_partial(int32_t, int32_t, int32_t, int32_t, const float*,
                                    cpu::PartialAttention&) {
  throw Error("cache mode '" + mode() +
              "' has no partial attention (it is not sharded by sequence)");
}

std::unique_ptr<AttentionCache> make_cache(const Model& model, const CacheOptions& options) {
  const std::string& mode = options.mode;
  if (options.keep_outlier_channel) {
    const ModelConfig& c = model.config();
    const bool latent =
        mode.rfind("xquant-", 0) == 0 && mode.rfind("xquant-cl-", 0) != 0 && 2 * c.kv_dim() < c.dim;
    if (!latent)
      throw Error(
          "--keep-outlier-channel applies to xquant-B on GQA models (the latent X·Uk), not to '" +
          mode + "' on this model");
  }
  if (mode == "fp16") {
    ModelConfig covered = model.config();  // the layers this cache holds
    covered.n_layers = options.layers > 0 ? options.layers : covered.n_layers - options.first_layer;
    if (options.first_layer < 0 || covered.n_layers < 1 ||
        options.first_layer + covered.n_layers > model.config().n_layers)
      throw Error("cache: layers [" + std::to_string(options.first_layer) + ", " +
                  std::to_string(options.first_layer + covered.n_layers) +
                  ") are not part of the model");
    return std::make_unique<Fp16KvCache>(covered, options);
  }
  if (int bits = parse_bits(mode, "kivi", {4, 3, 2}))
    return std::make_unique<QuantizedCache>(model, options, QuantizedCache::Kind::kKivi, bits);
  if (int bits = parse_bits(mode, "xquant-cl", {4, 3, 2}))
    return std::make_unique<QuantizedCache>(model, options, QuantizedCache::Kind::kXquantCrossLayer,
                                            bits);
  if (int bits = parse_bits(mode, "xquant", {8, 4, 3, 2})) {
    // GQA: K+V (2 kv_dim values) narrower than X (dim): cache the latents instead.
    const ModelConfig& c = model.config();
    const auto kind = 2 * c.kv_dim() < c.dim ? QuantizedCache::Kind::kXquantLatent
                                             : QuantizedCache::Kind::kXquantX;
    return std::make_unique<QuantizedCache>(model, options, kind, bits);
  }
  throw Error("unknown cache mode '" + mode +
              "' (available: fp16, kivi-4/3/2, xquant-8/4/3/2, xquant-cl-4/3/2)");
}

}  // namespace xq
