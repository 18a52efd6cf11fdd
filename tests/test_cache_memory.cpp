// Memory accounting of every cache mode: the bytes a cache counts as it writes
// (payload_bytes: codes, scales, zero points, fp16 window) against the mode's
// formula, and the pool's blocks held against blocks_for_tokens(), after 1,
// 127, 128, 129 and 1024 tokens; the formula against numbers worked out by
// hand from the spec for stories260K; and what a 64 MiB pool holds on
// SmolLM2, block bytes against the formula.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <random>

#include "kernels/cpu/ops.h"
#include "kernels/error.h"
#include "runtime/cache.h"
#include "runtime/cache_mode.h"
#include "runtime/model.h"
#include "tests/cache_mode_params.h"
#include "tests/test_util.h"

namespace xq {
namespace {

// Eight whole 128-token groups: enough for every stream's groups and window
// states, small enough that every mode of SmolLM2's 30 layers stays cheap.
constexpr int32_t kCapacity = 1024;

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
  for (int32_t target : {1, 127, 128, 129, kCapacity}) {
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
    const double held = static_cast<double>(cache->payload_bytes());
    EXPECT_NEAR(held, formula, 0.01 * formula) << mode << " after " << length << " tokens";
    // The pool's side: the blocks held, exactly, and the payload inside them.
    const int32_t blocks = cache->total_blocks() - cache->free_blocks();
    EXPECT_EQ(blocks, cache->blocks_for_tokens(length)) << mode << " after " << length;
    EXPECT_EQ(cache->bytes_in_use(), static_cast<size_t>(blocks) * cache->block_bytes());
    EXPECT_LE(cache->payload_bytes(), cache->bytes_in_use()) << mode << " after " << length;
  }
  // With whole groups only (1024 = 8 x 128) the formula is bytes_per_token x n.
  EXPECT_NEAR(cache->bytes_for_tokens(kCapacity), cache->bytes_per_token() * kCapacity,
              0.01 * cache->bytes_per_token() * kCapacity)
      << mode;
}

TEST(CacheMemory, CountedBytesMatchTheFormulaOnStories260K) {
  auto model = Model::load(testing::shared_path("models/stories260K.bin"));
  for (const CacheModeSpec& mode : cache_modes()) check_accounting(*model, std::string(mode.name));
}

TEST(CacheMemory, CountedBytesMatchTheFormulaOnSmolLM2) {
  const std::string path = testing::models_path("SmolLM2-135M-Instruct.Q4_1.gguf");
  if (!testing::file_exists(path)) GTEST_SKIP() << path << " not fetched (run launch/setup.sh)";
  auto model = Model::load(path);
  for (const CacheModeSpec& mode : cache_modes()) check_accounting(*model, std::string(mode.name));
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

// A 64 MiB pool on SmolLM2, every mode: a block is 128 tokens by the formula
// plus the cache-line padding of its regions (at most 64 bytes per stream and
// layer: within 2% of the formula here), the budget holds
// floor(64 MiB / block) blocks and 1024-token sequences take 8 each (1024 is
// whole groups: no window pages). Printed as the table in docs/design.md.
TEST(CacheMemory, SixtyFourMebibytePoolOnSmolLM2) {
  const std::string path = testing::models_path("SmolLM2-135M-Instruct.Q4_1.gguf");
  if (!testing::file_exists(path)) GTEST_SKIP() << path << " not fetched (run launch/setup.sh)";
  auto model = Model::load(path);
  const ModelConfig& c = model->config();
  std::vector<float> rope(static_cast<size_t>(kCapacity) * c.rope_dim);
  cpu::rope_table(rope.data(), kCapacity, c.rope_dim, c.rope_theta);
  constexpr size_t kBudget = size_t{64} << 20;
  std::printf("%-12s %12s %10s %8s %14s %14s\n", "mode", "block bytes", "formula", "blocks",
              "1024-token seq", "window (1023)");
  for (const CacheModeSpec& mode : cache_modes()) {
    CacheOptions options;
    options.mode = std::string(mode.name);
    options.max_tokens = kCapacity;
    options.rope_cos_sin = rope.data();
    options.pool_bytes = kBudget;
    auto cache = make_cache(*model, options);
    const double formula = cache->bytes_per_token() * AttentionCache::kBlockTokens;
    EXPECT_GE(static_cast<double>(cache->block_bytes()), formula) << mode.name;
    EXPECT_LE(static_cast<double>(cache->block_bytes()), 1.02 * formula) << mode.name;
    EXPECT_EQ(static_cast<size_t>(cache->total_blocks()), kBudget / cache->block_bytes());
    EXPECT_EQ(cache->blocks_for_tokens(1024), 8) << mode.name;
    // Window pages: a mode with per-channel streams holds its newest tokens in
    // fp16 pages; 127 of them never take more than the 128-token block itself
    // takes at 16 / bits times the bytes.
    const int32_t window = cache->blocks_for_tokens(1023) - 8;
    EXPECT_LE(window, mode.quantized() ? 16 / mode.bits + 1 : 0) << mode.name;
    std::printf("%-12s %12zu %10.0f %8d %14d %14d\n", std::string(mode.name).c_str(),
                cache->block_bytes(), formula, cache->total_blocks(), cache->total_blocks() / 8,
                window);
  }
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

// What the table says a mode stores, priced by hand, against the cache's own
// formula, for every row on both kinds of layout: per stream, width values
// at the layer's bits plus one fp16 scale/zero pair per group (per token:
// groups of up to 128 channels of a row; per channel: one pair per channel
// per 128 tokens); fp16 streams 2 bytes a value; layers 0-2 at 4 bits at
// least; the CL accumulator one fp32 row of dim. Exact (EXPECT_DOUBLE_EQ):
// both sides add the same few binary fractions.
double bytes_per_token_from_table(const CacheModeSpec& mode, const ModelConfig& c) {
  const CacheLayout& layout = layout_for(mode, c);
  double total = mode.cross_layer_accumulator ? 4.0 * c.dim : 0.0;
  for (int32_t layer = 0; layer < c.n_layers; ++layer) {
    const int bits = layer < 3 ? std::max(mode.bits, 4) : mode.bits;
    for (int32_t s = 0; s < layout.stream_count; ++s) {
      const StreamContent content = layout.streams[s].content;
      const double width = content == StreamContent::kX || content == StreamContent::kXDelta ? c.dim
                           : content == StreamContent::kXDeltaLatent ? 2.0 * c.kv_dim()
                                                                     : c.kv_dim();
      if (!mode.quantized())
        total += 2.0 * width;
      else if (layout.streams[s].axis == QuantAxis::kPerToken)
        total += width * bits / 8.0 + 4.0 * std::ceil(width / 128.0);
      else
        total += width * bits / 8.0 + 4.0 * width / 128.0;
    }
  }
  return total;
}

class CacheMemoryTable : public ::testing::TestWithParam<std::string> {};

TEST_P(CacheMemoryTable, BytesPerTokenFollowTheTablesStreams) {
  const CacheModeSpec& mode = find_cache_mode(GetParam());
  std::vector<std::unique_ptr<Model>> models;
  models.push_back(Model::load(testing::shared_path("models/stories260K.bin")));
  const std::string path = testing::models_path("SmolLM2-135M-Instruct.Q4_1.gguf");
  if (testing::file_exists(path)) models.push_back(Model::load(path));
  for (const auto& model : models) {
    const ModelConfig& c = model->config();
    std::vector<float> rope(static_cast<size_t>(64) * c.rope_dim);
    cpu::rope_table(rope.data(), 64, c.rope_dim, c.rope_theta);
    CacheOptions options;
    options.mode = GetParam();
    options.max_tokens = 64;
    options.rope_cos_sin = rope.data();
    EXPECT_DOUBLE_EQ(make_cache(*model, options)->bytes_per_token(),
                     bytes_per_token_from_table(mode, c))
        << GetParam() << " on " << model->path();
  }
}

INSTANTIATE_TEST_SUITE_P(Table, CacheMemoryTable, ::testing::ValuesIn(testing::table_mode_names()),
                         testing::mode_test_name);

}  // namespace
}  // namespace xq
