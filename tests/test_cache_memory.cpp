// Memory accounting of every cache mode: the bytes a cache counts as it writes
// (codes, scales, zero points, fp16 window) against the mode's formula, after
// 1, 127, 128, 129 and 4096 tokens; and the formula against numbers worked out
// by hand from the spec for stories260K.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "kernels/cpu/ops.h"
#include "kernels/error.h"
#include "runtime/cache.h"
#include "runtime/model.h"
#include "tests/test_util.h"

namespace xq {
namespace {

constexpr int32_t kCapacity = 4096;

void check_accounting(const Model& model, const std::string& mode) {
  const ModelConfig& c = model.config();
  std::vector<float> rope(static_cast<size_t>(kCapacity) * c.rope_dim);
  cpu::rope_table(rope.data(), kCapacity, c.rope_dim, c.rope_theta);
  CacheOptions options;
  options.mode = mode;
  options.max_tokens = kCapacity;
  options.rope_cos_sin = rope.data();
  auto cache = make_cache(model, options);
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  int32_t length = 0;
  for (int32_t target : {1, 127, 128, 129, 4096}) {
    const int32_t n = target - length;
    std::vector<float> x(static_cast<size_t>(n) * c.dim), k(static_cast<size_t>(n) * c.kv_dim()),
        v(k.size());
    for (float& value : x) value = normal(rng);
    for (float& value : k) value = normal(rng);
    for (float& value : v) value = normal(rng);
    for (int32_t layer = 0; layer < c.n_layers; ++layer)
      cache->append(0, layer, length, n, x.data(), k.data(), v.data());
    length = target;
    const double formula = static_cast<double>(cache->bytes_for_tokens(length));
    const double held = static_cast<double>(cache->bytes_in_use());
    EXPECT_NEAR(held, formula, 0.01 * formula) << mode << " after " << length << " tokens";
  }
  // With whole groups only (4096 = 32 x 128) the formula is bytes_per_token x n.
  EXPECT_NEAR(cache->bytes_for_tokens(kCapacity), cache->bytes_per_token() * kCapacity,
              0.01 * cache->bytes_per_token() * kCapacity)
      << mode;
}

const char* kModes[] = {"fp16",     "kivi-4",   "kivi-3",   "kivi-2",
                        "xquant-8", "xquant-4", "xquant-3", "xquant-2"};

TEST(CacheMemory, CountedBytesMatchTheFormulaOnStories260K) {
  auto model = Model::load(testing::shared_path("models/stories260K.bin"));
  for (const char* mode : kModes) check_accounting(*model, mode);
}

TEST(CacheMemory, CountedBytesMatchTheFormulaOnSmolLM2) {
  const std::string path = testing::models_path("SmolLM2-135M-Instruct.Q4_1.gguf");
  if (!testing::file_exists(path)) GTEST_SKIP() << path << " not fetched (run launch/setup.sh)";
  auto model = Model::load(path);
  for (const char* mode : kModes) check_accounting(*model, mode);
  // --keep-outlier-channel adds one fp16 value per token per layer and KV head
  // (each head's latent has its own first channel), or one per layer with
  // the joint latent, and is refused where there is no X·Uk latent.
  const ModelConfig& c = model->config();
  std::vector<float> rope(static_cast<size_t>(256) * c.rope_dim);
  cpu::rope_table(rope.data(), 256, c.rope_dim, c.rope_theta);
  CacheOptions options;
  options.mode = "xquant-2";
  options.max_tokens = 256;
  options.rope_cos_sin = rope.data();
  const double plain = make_cache(*model, options)->bytes_per_token();
  options.keep_outlier_channel = true;
  EXPECT_DOUBLE_EQ(make_cache(*model, options)->bytes_per_token(),
                   plain + 2.0 * c.n_layers * c.n_kv_heads);
  options.k_latent_per_head = false;
  EXPECT_DOUBLE_EQ(make_cache(*model, options)->bytes_per_token(), plain + 2.0 * c.n_layers);
  options.mode = "kivi-2";
  EXPECT_THROW(make_cache(*model, options), Error);
}

TEST(CacheMemory, FormulaMatchesHandCountOnStories260K) {
  // stories260K: 5 layers, d = 64, kv_dim = 32 (groups are the whole row: 64 or 32).
  auto model = Model::load(testing::shared_path("models/stories260K.bin"));
  std::vector<float> rope(64 * 8);
  cpu::rope_table(rope.data(), 64, 8, 10000.0f);
  auto per_token = [&](const std::string& mode) {
    CacheOptions options;
    options.mode = mode;
    options.max_tokens = 64;
    options.rope_cos_sin = rope.data();
    return make_cache(*model, options)->bytes_per_token();
  };
  EXPECT_DOUBLE_EQ(per_token("fp16"), 5 * 2 * 32 * 2);  // K and V, fp16
  EXPECT_DOUBLE_EQ(per_token("xquant-4"),
                   5 * (64 * 4 / 8 + 4));  // X codes + one fp16 scale/zero pair
  // Layers 0-2 stay at 4 bits (paper Table 4); 64 x 3 bits = 24 bytes.
  EXPECT_DOUBLE_EQ(per_token("xquant-3"), 3 * (32 + 4) + 2 * (24 + 4));
  // K per channel (a scale/zero pair per channel per 128 tokens), V per token.
  EXPECT_DOUBLE_EQ(per_token("kivi-2"),
                   3 * ((16 + 32 * 4 / 128.0) + (16 + 4)) + 2 * ((8 + 32 * 4 / 128.0) + (8 + 4)));
  // CL: X deltas like xquant, plus the fp32 accumulator row.
  EXPECT_DOUBLE_EQ(per_token("xquant-cl-2"), 3 * (32 + 4) + 2 * (16 + 4) + 64 * 4);
}

}  // namespace
}  // namespace xq
