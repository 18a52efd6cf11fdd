#include "runtime/cache.h"

#include "runtime/cache_fp16.h"
#include "runtime/error.h"

namespace xq {

std::unique_ptr<AttentionCache> make_cache(const Model& model, const CacheOptions& options) {
  if (options.mode == "fp16") return std::make_unique<Fp16KvCache>(model.config(), options);
  throw Error("unknown cache mode '" + options.mode + "' (available: fp16)");
}

}  // namespace xq
