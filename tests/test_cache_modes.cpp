// The quantized cache modes through the engine on stories260K: splitting the
// same tokens differently between prefill and decode must not change the
// logits (both paths store the same codes; decode only reorders the V math),
// and every mode's logits stay near the fp16 cache's.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

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
                               const std::vector<int32_t>& tokens, int32_t decode_steps) {
  EngineOptions options;
  options.threads = 2;
  options.max_tokens = 512;
  options.cache_mode = mode;
  Engine engine(model, options);
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
  Engine engine(model, options);
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
