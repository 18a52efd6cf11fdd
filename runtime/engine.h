// The single-process forward pass: batched prefill and single-token decode of
// a Llama-architecture model over an AttentionCache. fp32 activations; GEMMs
// through OpenBLAS, the rest on the CPU thread pool.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "runtime/cache.h"
#include "runtime/model.h"

namespace xq {

struct EngineOptions {
  int threads = 1;
  int32_t max_tokens = 0;  // cache capacity per sequence; 0 = the model's context length
  int32_t sequences = 1;
  std::string cache_mode = "fp16";
  bool keep_outlier_channel = false;  // xquant on GQA: channel 0 of X·Uk in fp16
  bool k_latent_per_head = true;      // xquant on GQA: see CacheOptions
  // xquant-cl: layers where a new chain starts (see CacheOptions); a
  // pipeline's stages start one at their first layers by themselves.
  std::vector<int32_t> cross_layer_restarts;
};

// Throws xq::Error for positions [pos0, pos0 + n) beyond max_tokens or a token
// id outside the vocabulary: what every engine's forward() checks first.
void check_forward_input(const ModelConfig& config, int32_t max_tokens, const int32_t* tokens,
                         int32_t n, int32_t pos0);

class Engine {
 public:
  Engine(const Model& model, const EngineOptions& options);

  // Runs n tokens of sequence `seq` at positions [pos0, pos0 + n) and writes the
  // logits of rows [first_logit_row, n) to `logits` ((n - first_logit_row), vocab).
  // Throws xq::Error for a token id out of range or positions beyond capacity.
  void forward(int32_t seq, const int32_t* tokens, int32_t n, int32_t pos0, float* logits,
               int32_t first_logit_row);

  AttentionCache& cache() { return *cache_; }
  const Model& model() const { return model_; }
  int32_t max_tokens() const { return max_tokens_; }

 private:
  void ensure_scratch(int32_t n);

  const Model& model_;
  int32_t max_tokens_;
  std::unique_ptr<AttentionCache> cache_;
  std::vector<float> rope_cos_sin_;
  // Activations of the current batch, (n, width) each.
  std::vector<float> hidden_, normed_, q_, k_, v_, attn_, proj_, gate_, up_;
  std::vector<int32_t> positions_;
};

}  // namespace xq
