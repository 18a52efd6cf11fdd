// The quantized cache modes through the engine on stories260K: splitting the
// same tokens differently between prefill and decode must not change the
// logits (both paths store the same codes; decode only reorders the V math),
// and every mode's logits stay near the fp16 cache's.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <random>

#include "kernels/cpu/ops.h"
#include "kernels/cpu/thread_pool.h"
#include "runtime/cache.h"
#include "runtime/engine.h"
#include "runtime/model.h"
#include "tests/test_util.h"

namespace xq {
namespace {

const char* kText =
    "Once upon a time, there was a little girl named Lily. She liked to play outside in the park "
    "with her "
    "friends. One day, she saw a big red ball under a tree. She ran to get it, but a dog got there "
    "first.";

std::vector<float> last_logits(const Model& model, const std::string& mode,
                               const std::vector<int32_t>& tokens, int32_t decode_steps,
                               bool k_latent_per_head = true) {
  EngineOptions options;
  options.k_latent_per_head = k_latent_per_head;
  options.threads = 2;
  options.max_tokens = 512;
  options.cache_mode = mode;
  TransformerEngine engine(model, options);
  const int32_t n = static_cast<int32_t>(tokens.size());
  const int32_t prefill = n - decode_steps;
  std::vector<float> logits(model.config().vocab_size);
  engine.forward(0, tokens.data(), prefill, 0, decode_steps == 0 ? logits.data() : nullptr,
                 prefill - 1);
  for (int32_t i = prefill; i < n; ++i) engine.forward(0, &tokens[i], 1, i, logits.data(), 0);
  return logits;
}

float max_difference(const std::vector<float>& a, const std::vector<float>& b) {
  float worst = 0;
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::abs(a[i] - b[i]));
  return worst;
}

class CacheModes : public ::testing::TestWithParam<std::string> {};

TEST_P(CacheModes, PrefillThenDecodeEqualsOnePrefill) {
  auto model = Model::load(testing::shared_path("models/stories260K.bin"));
  std::vector<int32_t> tokens = model->tokenizer().encode(kText, true);
  ASSERT_GT(tokens.size(), 40u);
  std::vector<float> whole = last_logits(*model, GetParam(), tokens, 0);
  for (int32_t steps : {1, 5}) {
    std::vector<float> split = last_logits(*model, GetParam(), tokens, steps);
    EXPECT_LT(max_difference(whole, split), 2e-3f)
        << GetParam() << ", " << steps << " decode steps";
  }
}

TEST_P(CacheModes, LogitsStayNearTheFp16Cache) {
  auto model = Model::load(testing::shared_path("models/stories260K.bin"));
  std::vector<int32_t> tokens = model->tokenizer().encode(kText, true);
  std::vector<float> reference = last_logits(*model, "fp16", tokens, 3);
  std::vector<float> quantized = last_logits(*model, GetParam(), tokens, 3);
  // Stated bounds (max |logit difference|), loose enough for each bit width,
  // tight enough that a broken rebuild (wrong head, RoPE or scale) fails.
  const std::string& mode = GetParam();
  const float bound = mode.back() == '8'   ? 0.15f
                      : mode.back() == '4' ? 2.0f
                      : mode.back() == '3' ? 3.0f
                                           : 8.0f;
  float worst = max_difference(reference, quantized);
  EXPECT_LT(worst, bound) << mode;
  // And the prediction is not noise: the fp16 favourite keeps a high rank.
  int32_t best = static_cast<int32_t>(std::max_element(reference.begin(), reference.end()) -
                                      reference.begin());
  int32_t rank = 0;
  for (float l : quantized) rank += l > quantized[best];
  EXPECT_LT(rank, mode.back() == '2' ? 20 : 3) << mode;
}

std::vector<int32_t> greedy(const Model& model, const std::string& mode,
                            const std::string& prompt) {
  EngineOptions options;
  options.threads = 1;
  options.max_tokens = 128;
  options.cache_mode = mode;
  TransformerEngine engine(model, options);
  std::vector<int32_t> tokens = model.tokenizer().encode(prompt, true);
  std::vector<float> logits(model.config().vocab_size);
  const int32_t n = static_cast<int32_t>(tokens.size());
  engine.forward(0, tokens.data(), n, 0, logits.data(), n - 1);
  std::vector<int32_t> out;
  for (int32_t step = 0; step < 32; ++step) {
    int32_t next =
        static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    out.push_back(next);
    engine.forward(0, &next, 1, n + step, logits.data(), 0);
  }
  return out;
}

// Issue 3's generation check on the small model: server-style prefill then
// token-by-token decode through the xquant-cl-4 cache reproduces fp16's
// greedy tokens. (On SmolLM2 it does not yet; see the README.)
TEST(CacheModesGeneration, XquantCl4GreedyMatchesFp16OnStories260K) {
  auto model = Model::load(testing::shared_path("models/stories260K.bin"));
  for (const char* prompt : {"Once upon a time", "The little dog", "Lily and Tom went"}) {
    EXPECT_EQ(greedy(*model, "xquant-cl-4", prompt), greedy(*model, "fp16", prompt)) << prompt;
  }
}

// Decode attention walks the context in blocks across threads and never
// rebuilds V; prefill attention rebuilds K and V for the whole context and
// runs standard attention. Over the same stored codes (several blocks, past a
// 128-token per-channel group so quantized blocks and the fp16 window are both
// read) the two must agree to float rounding, layer by layer, for a single
// query and for a causal burst of queries. Checked at the cache, so the
// engine's int8 activations in decode do not blur the comparison.
void expect_decode_attention_equals_prefill(const Model& model, const std::string& mode,
                                            bool k_latent_per_head = true,
                                            bool keep_outlier_channel = false) {
  const ModelConfig& c = model.config();
  const int32_t total = 300, prefill_queries = 16, burst = 5;
  std::vector<float> rope(static_cast<size_t>(total) * c.rope_dim);
  cpu::rope_table(rope.data(), total, c.rope_dim, c.rope_theta);
  CacheOptions options;
  options.mode = mode;
  options.max_tokens = total;
  options.rope_cos_sin = rope.data();
  options.k_latent_per_head = k_latent_per_head;
  options.keep_outlier_channel = keep_outlier_channel;
  std::unique_ptr<AttentionCache> cache = make_cache(model, options);
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t q_width = static_cast<int64_t>(c.n_heads) * c.head_dim;
  std::vector<float> x(static_cast<size_t>(total) * c.dim),
      k(static_cast<size_t>(total) * c.kv_dim()), v(k.size()),
      q(static_cast<size_t>(prefill_queries) * q_width);
  std::vector<std::vector<float>> expected(c.n_layers);
  cpu::set_thread_count(2);
  for (int32_t layer = 0; layer < c.n_layers; ++layer) {
    for (float& f : x) f = normal(rng);
    for (float& f : k) f = normal(rng);
    for (float& f : v) f = normal(rng);
    for (float& f : q) f = normal(rng);
    cache->append(0, layer, 0, total, x.data(), k.data(), v.data());
    expected[layer].resize(q.size());
    cache->attend(0, layer, total - prefill_queries, prefill_queries, q.data(),
                  expected[layer].data());
  }
  // The same queries again: the last `burst` in one decode call, then the last alone.
  for (int32_t n : {burst, 1}) {
    std::mt19937 replay(11);
    std::normal_distribution<float> again(0.0f, 1.0f);
    for (int32_t layer = 0; layer < c.n_layers; ++layer) {
      for (float& f : x) f = again(replay);
      for (float& f : k) f = again(replay);
      for (float& f : v) f = again(replay);
      for (float& f : q) f = again(replay);
      std::vector<float> out(static_cast<size_t>(n) * q_width);
      cache->attend(0, layer, total - n, n, q.data() + (prefill_queries - n) * q_width, out.data());
      const float* want = expected[layer].data() + (prefill_queries - n) * q_width;
      float worst = 0, scale = 0;
      for (size_t i = 0; i < out.size(); ++i) {
        worst = std::max(worst, std::abs(out[i] - want[i]));
        scale = std::max(scale, std::abs(want[i]));
      }
      ASSERT_LT(worst, 1e-4f * std::max(scale, 1.0f))
          << mode << ", layer " << layer << ", " << n << " decode queries";
    }
  }
}

TEST_P(CacheModes, DecodeAttentionEqualsPrefillAttention) {
  auto model = Model::load(testing::shared_path("models/stories260K.bin"));
  expect_decode_attention_equals_prefill(*model, GetParam());
}

TEST(CacheModesFp16, DecodeAttentionEqualsPrefillAttention) {
  auto model = Model::load(testing::shared_path("models/stories260K.bin"));
  expect_decode_attention_equals_prefill(*model, "fp16");
}

// The GQA paths (latents X·Uk / X·Uv, the CL latent of [Wk | Wv]) on SmolLM2.
TEST(CacheModesGqa, DecodeAttentionEqualsPrefillAttentionOnSmolLM2) {
  const std::string path = testing::models_path("SmolLM2-135M-Instruct.Q4_1.gguf");
  if (!testing::file_exists(path)) GTEST_SKIP() << "SmolLM2 not fetched: " << path;
  auto model = Model::load(path);
  for (const char* mode : {"fp16", "kivi-2", "xquant-4", "xquant-8", "xquant-cl-3"})
    expect_decode_attention_equals_prefill(*model, mode);
  expect_decode_attention_equals_prefill(*model, "xquant-3", /*k_latent_per_head=*/false);
  expect_decode_attention_equals_prefill(*model, "xquant-2", true, /*keep_outlier_channel=*/true);
  expect_decode_attention_equals_prefill(*model, "xquant-2", false, true);
}

// The latents are encoded from the engine's K and V (X·U = K·V·S⁻¹) and
// rebuilt with S·Vᵀ: at 8 bits the logits must stay close to fp16's, with both
// K latents (per head and joint), which a wrong block, transpose or scale breaks.
TEST(CacheModesGqa, EightBitLatentsStayNearFp16OnSmolLM2) {
  const std::string path = testing::models_path("SmolLM2-135M-Instruct.Q4_1.gguf");
  if (!testing::file_exists(path)) GTEST_SKIP() << "SmolLM2 not fetched: " << path;
  auto model = Model::load(path);
  std::vector<int32_t> tokens = model->tokenizer().encode(kText, true);
  std::vector<float> reference = last_logits(*model, "fp16", tokens, 3);
  for (bool per_head : {true, false}) {
    std::vector<float> latent = last_logits(*model, "xquant-8", tokens, 3, per_head);
    float worst = max_difference(reference, latent);
    std::printf("xquant-8 (%s K latent): max |logit - fp16| = %.4f\n",
                per_head ? "per-head" : "joint", worst);
    EXPECT_LT(worst, 2.0f) << (per_head ? "per-head" : "joint");
  }
}

INSTANTIATE_TEST_SUITE_P(Modes, CacheModes,
                         ::testing::Values("kivi-4", "kivi-3", "kivi-2", "xquant-8", "xquant-4",
                                           "xquant-3", "xquant-2", "xquant-cl-4", "xquant-cl-3",
                                           "xquant-cl-2"),
                         [](const auto& info) {
                           std::string name = info.param;
                           for (char& c : name)
                             if (c == '-') c = '_';
                           return name;
                         });

}  // namespace
}  // namespace xq
