// Sequence-sharded and layer-range caches (what the parallel engines build on)
// against one whole cache fed the same rows, for every row of the table of
// modes: S shards' partial attention, merged in shard order, must equal the
// unsharded attend() to float rounding, and the shards' bytes must add up to
// the whole cache's, each within one shard unit of total / S, with each token
// held where the ownership rule puts it. A pipeline stage's cache (a layer
// range) must equal the whole cache's layers; for XQuant-CL, the whole cache
// told to restart its chain where the stage starts. Also the ownership type
// itself against counting, and the head-or-sequence choice of tensor
// parallelism.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/attention.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/error.h"
#include "runtime/cache.h"
#include "runtime/cache_mode.h"
#include "runtime/model.h"
#include "runtime/sequence_shard.h"
#include "tests/cache_mode_params.h"
#include "tests/test_util.h"

namespace xq {
namespace {

constexpr int32_t kTokens = 300;  // past two 128-token groups: quantized groups and a window

struct Rows {
  std::vector<float> x, k, v, q;
};

// Layer `layer`'s random inputs: the same for every cache that asks.
Rows random_rows(const ModelConfig& c, int32_t layer, int32_t queries) {
  std::mt19937 rng(1000 + layer);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Rows r;
  r.x.resize(static_cast<size_t>(kTokens) * c.dim);
  r.k.resize(static_cast<size_t>(kTokens) * c.kv_dim());
  r.v.resize(r.k.size());
  r.q.resize(static_cast<size_t>(queries) * c.n_heads * c.head_dim);
  for (auto* values : {&r.x, &r.k, &r.v, &r.q})
    for (float& f : *values) f = normal(rng);
  return r;
}

CacheOptions options_for(const std::string& mode, const std::vector<float>& rope) {
  CacheOptions options;
  options.mode = mode;
  options.max_tokens = kTokens;
  options.rope_cos_sin = rope.data();
  return options;
}

std::vector<float> rope_table(const ModelConfig& c) {
  std::vector<float> rope(static_cast<size_t>(kTokens) * c.rope_dim);
  cpu::rope_table(rope.data(), kTokens, c.rope_dim, c.rope_theta);
  return rope;
}

float relative_difference(const std::vector<float>& got, const std::vector<float>& want) {
  float worst = 0, scale = 1.0f;
  for (size_t i = 0; i < got.size(); ++i) {
    worst = std::max(worst, std::abs(got[i] - want[i]));
    scale = std::max(scale, std::abs(want[i]));
  }
  return worst / scale;
}

// The ownership unit the sharding rule asks for, from the layout's streams: a
// stream quantized per channel takes its scales from 128-token groups, which
// a shard must hold whole; otherwise single tokens.
int32_t ownership_unit(const CacheModeSpec& mode, const ModelConfig& c) {
  const CacheLayout& layout = layout_for(mode, c);
  for (int32_t s = 0; s < layout.stream_count; ++s)
    if (layout.streams[s].axis == QuantAxis::kPerChannel) return 128;
  return 1;
}

// Appends the tokens in two batches (a prefill, then the last 20), and asks
// for the last `queries` queries' attention, layer by layer.
void expect_shards_merge_to_whole(const Model& model, const std::string& mode, int32_t shards) {
  const ModelConfig& c = model.config();
  const std::vector<float> rope = rope_table(c);
  const int32_t first_batch = kTokens - 20;
  std::unique_ptr<AttentionCache> whole = make_cache(model, options_for(mode, rope));
  std::vector<std::unique_ptr<AttentionCache>> parts;
  for (int32_t s = 0; s < shards; ++s) {
    CacheOptions options = options_for(mode, rope);
    options.sequence_shards = shards;
    options.sequence_shard = s;
    parts.push_back(make_cache(model, options));
  }
  const int64_t q_width = static_cast<int64_t>(c.n_heads) * c.head_dim;
  for (int32_t queries :
       {kTokens, 16, 1}) {  // prefill path (all, last 16) and decode path of `whole`
    for (int32_t layer = 0; layer < c.n_layers; ++layer) {
      Rows rows = random_rows(c, layer, queries);
      for (AttentionCache* cache : {whole.get()}) {
        cache->append(0, layer, 0, first_batch, rows.x.data(), rows.k.data(), rows.v.data());
        cache->append(0, layer, first_batch, kTokens - first_batch,
                      rows.x.data() + static_cast<size_t>(first_batch) * c.dim,
                      rows.k.data() + static_cast<size_t>(first_batch) * c.kv_dim(),
                      rows.v.data() + static_cast<size_t>(first_batch) * c.kv_dim());
      }
      for (auto& part : parts) {
        part->append(0, layer, 0, first_batch, rows.x.data(), rows.k.data(), rows.v.data());
        part->append(0, layer, first_batch, kTokens - first_batch,
                     rows.x.data() + static_cast<size_t>(first_batch) * c.dim,
                     rows.k.data() + static_cast<size_t>(first_batch) * c.kv_dim(),
                     rows.v.data() + static_cast<size_t>(first_batch) * c.kv_dim());
      }
      const int32_t pos0 = kTokens - queries;
      std::vector<float> want(static_cast<size_t>(queries) * q_width);
      whole->attend(0, layer, pos0, queries, rows.q.data(), want.data());
      cpu::PartialAttention merged, part_state;
      merged.reset(static_cast<int64_t>(queries) * c.n_heads, c.head_dim);
      for (auto& part : parts) {
        part->attend_partial(0, layer, pos0, queries, rows.q.data(), part_state);
        ASSERT_EQ(part_state.rows, merged.rows);
        ASSERT_EQ(part_state.width, merged.width);
        cpu::merge_partial_attention(merged, part_state);
      }
      std::vector<float> got(want.size());
      for (int64_t row = 0; row < merged.rows; ++row)
        for (int64_t j = 0; j < c.head_dim; ++j)
          got[row * c.head_dim + j] = merged.acc[row * c.head_dim + j] / merged.sum[row];
      ASSERT_LT(relative_difference(got, want), 1e-4f)
          << mode << ", " << shards << " shards, layer " << layer << ", " << queries << " queries";
    }
  }
  EXPECT_EQ(parts[0]->length(0), kTokens);
  EXPECT_EQ(parts.back()->length(0), kTokens);

  // Bytes: the shards hold the whole cache's tokens between them, evenly.
  size_t sum = 0;
  for (auto& part : parts) sum += part->payload_bytes();
  EXPECT_EQ(sum, whole->payload_bytes()) << mode;
  size_t formula = 0;
  for (auto& part : parts) formula += part->bytes_for_tokens(kTokens);
  EXPECT_EQ(formula, whole->bytes_for_tokens(kTokens)) << mode;
  // One shard unit: a token, or a 128-token group where a stream is per channel.
  const int32_t unit_tokens = ownership_unit(find_cache_mode(mode), c);
  const double unit = unit_tokens * whole->bytes_per_token() * 1.1;
  for (auto& part : parts)
    EXPECT_LE(std::abs(static_cast<double>(part->payload_bytes()) -
                       static_cast<double>(whole->payload_bytes()) / shards),
              unit)
        << mode << ": a shard's bytes are not total / " << shards;

  // Truncation keeps the shards consistent with the whole cache.
  whole->truncate(0, 200);
  for (auto& part : parts) part->truncate(0, 200);
  sum = 0;
  for (auto& part : parts) {
    EXPECT_EQ(part->length(0), 200);
    sum += part->payload_bytes();
  }
  EXPECT_EQ(sum, whole->payload_bytes()) << mode << " after truncate";
}

class ShardedCache : public ::testing::TestWithParam<std::string> {};

TEST_P(ShardedCache, ShardsMergeToTheWholeCacheOnStories260K) {
  auto model = Model::load(testing::shared_path("models/stories260K.bin"));
  cpu::set_thread_count(2);
  for (int32_t shards : {2, 3}) expect_shards_merge_to_whole(*model, GetParam(), shards);
}

// The GQA streams (per-channel latent X·Uk, the CL latent of [Wk | Wv]).
TEST_P(ShardedCache, ShardsMergeToTheWholeCacheOnSmolLM2) {
  const std::string path = testing::models_path("SmolLM2-135M-Instruct.Q4_1.gguf");
  if (!testing::file_exists(path)) GTEST_SKIP() << "SmolLM2 not fetched: " << path;
  auto model = Model::load(path);
  cpu::set_thread_count(2);
  expect_shards_merge_to_whole(*model, GetParam(), 2);
}

// Which tokens each shard holds: bytes_for_tokens(t) counts the tokens of
// [0, t) the shard owns, so token t changes the count of exactly one shard
// (up, or down where it completes a per-channel group and the fp16 window is
// quantized), the one (t / unit) % S names, computed here without the
// ownership type.
TEST_P(ShardedCache, EachTokenIsHeldWhereTheUnitDealsIt) {
  auto stories = Model::load(testing::shared_path("models/stories260K.bin"));
  const std::string path = testing::models_path("SmolLM2-135M-Instruct.Q4_1.gguf");
  std::unique_ptr<Model> smollm2 = testing::file_exists(path) ? Model::load(path) : nullptr;
  const CacheModeSpec& mode = find_cache_mode(GetParam());
  for (const Model* model : {stories.get(), smollm2.get()}) {
    if (!model) continue;
    const ModelConfig& c = model->config();
    const std::vector<float> rope = rope_table(c);
    const int32_t shards = 3, unit = ownership_unit(mode, c);
    std::vector<std::unique_ptr<AttentionCache>> parts;
    for (int32_t s = 0; s < shards; ++s) {
      CacheOptions options = options_for(GetParam(), rope);
      options.sequence_shards = shards;
      options.sequence_shard = s;
      parts.push_back(make_cache(*model, options));
    }
    for (int32_t t = 0; t < kTokens; ++t)
      for (int32_t s = 0; s < shards; ++s) {
        const bool holds = parts[s]->bytes_for_tokens(t + 1) != parts[s]->bytes_for_tokens(t);
        ASSERT_EQ(holds, (t / unit) % shards == s)
            << GetParam() << " on " << c.dim << "-wide X: token " << t << ", shard " << s;
      }
  }
}

TEST(ShardedCacheErrors, NoSuchShardAndAttendNeedsPartial) {
  auto model = Model::load(testing::shared_path("models/stories260K.bin"));
  const std::vector<float> rope = rope_table(model->config());
  const ModelConfig& c = model->config();
  for (const char* mode : {"fp16", "xquant-4"}) {
    CacheOptions options = options_for(mode, rope);
    options.sequence_shards = 2;
    options.sequence_shard = 2;  // no such shard
    EXPECT_THROW(make_cache(*model, options), Error) << mode;
    options.sequence_shard = 1;
    auto cache = make_cache(*model, options);
    Rows rows = random_rows(c, 0, 1);
    cache->append(0, 0, 0, 4, rows.x.data(), rows.k.data(), rows.v.data());
    std::vector<float> out(static_cast<size_t>(c.n_heads) * c.head_dim);
    EXPECT_THROW(cache->attend(0, 0, 3, 1, rows.q.data(), out.data()), Error) << mode;
  }
}

// A stage's cache of layers [first, first + count) against the whole cache.
TEST_P(ShardedCache, LayerRangeEqualsTheWholeCachesLayers) {
  auto model = Model::load(testing::shared_path("models/stories260K.bin"));
  const ModelConfig& c = model->config();
  const std::vector<float> rope = rope_table(c);
  cpu::set_thread_count(2);
  const std::string mode = GetParam();
  const int32_t first = 3, count = c.n_layers - first;
  ASSERT_GT(count, 0);
  CacheOptions whole_options = options_for(mode, rope);
  whole_options.cross_layer_restarts = {first};  // what a stage boundary at `first` does to CL
  std::unique_ptr<AttentionCache> whole = make_cache(*model, whole_options);
  CacheOptions stage_options = options_for(mode, rope);
  stage_options.first_layer = first;
  stage_options.layers = count;
  std::unique_ptr<AttentionCache> stage = make_cache(*model, stage_options);
  const int64_t q_width = static_cast<int64_t>(c.n_heads) * c.head_dim;
  for (int32_t layer = 0; layer < c.n_layers; ++layer) {
    Rows rows = random_rows(c, layer, 16);
    whole->append(0, layer, 0, kTokens, rows.x.data(), rows.k.data(), rows.v.data());
    std::vector<float> want(static_cast<size_t>(16) * q_width), got(want.size());
    whole->attend(0, layer, kTokens - 16, 16, rows.q.data(), want.data());
    if (layer < first) continue;
    stage->append(0, layer - first, 0, kTokens, rows.x.data(), rows.k.data(), rows.v.data());
    stage->attend(0, layer - first, kTokens - 16, 16, rows.q.data(), got.data());
    ASSERT_LT(relative_difference(got, want), 1e-6f) << mode << ", layer " << layer;
  }
  EXPECT_EQ(stage->length(0), kTokens);
  if (mode.rfind("xquant-cl", 0) == 0) {
    EXPECT_NE(whole->describe().find("new chains (from X, at 4 bits) at layer 3"),
              std::string::npos)
        << whole->describe();
    // Without the restart layer 3 codes a delta from layer 2: different numbers.
    std::unique_ptr<AttentionCache> plain = make_cache(*model, options_for(mode, rope));
    EXPECT_EQ(plain->describe().find("new chains"), std::string::npos);
  }
}

// Every row of the table, by name.
INSTANTIATE_TEST_SUITE_P(Table, ShardedCache, ::testing::ValuesIn(testing::table_mode_names()),
                         testing::mode_test_name);

// SequenceShard against enumerating the positions: owner and owns by the
// round-robin rule, owned_before(end) as a count, position() as the inverse
// of that count, for several unit / shard combinations.
TEST(SequenceShard, OwnershipMatchesCountingThePositions) {
  for (int32_t unit : {1, 3, 128})
    for (int32_t shards : {1, 2, 3, 4})
      for (int32_t index = 0; index < shards; ++index) {
        const SequenceShard shard(shards, index, unit);
        int32_t owned = 0;
        for (int32_t t = 0; t < 1000; ++t) {
          ASSERT_EQ(shard.owned_before(t), owned)
              << unit << " " << shards << " " << index << " " << t;
          const int32_t owner = (t / unit) % shards;
          ASSERT_EQ(shard.owner(t), owner);
          ASSERT_EQ(shard.owns(t), owner == index);
          if (owner == index) {
            ASSERT_EQ(shard.position(owned), t) << unit << " " << shards << " " << index;
            ++owned;
          }
        }
      }
  const SequenceShard whole;
  EXPECT_FALSE(whole.sharded());
  EXPECT_EQ(whole.owned_before(77), 77);
  EXPECT_THROW(SequenceShard(2, 2, 1), Error);
  EXPECT_THROW(SequenceShard(2, -1, 1), Error);
  EXPECT_THROW(SequenceShard(0, 0, 1), Error);
  EXPECT_THROW(SequenceShard(2, 0, 0), Error);
}

// Tensor parallelism splits by KV head only where the mode's streams allow it
// (fp16) and the KV heads split evenly: SmolLM2's 3 over 3 ranks, not over 2.
TEST(ShardedCacheTable, ShardsByHeadOnlyWhereTheKvHeadsSplitEvenly) {
  ModelConfig c;
  c.dim = 576;
  c.n_heads = 9;
  c.n_kv_heads = 3;
  c.head_dim = 64;
  for (const CacheModeSpec& mode : cache_modes()) {
    const bool fp16 = mode.name == "fp16";
    EXPECT_EQ(shards_by_head(mode, c, 1), fp16) << mode.name;
    EXPECT_EQ(shards_by_head(mode, c, 3), fp16) << mode.name;
    EXPECT_FALSE(shards_by_head(mode, c, 2)) << mode.name;
    EXPECT_FALSE(shards_by_head(mode, c, 4)) << mode.name;
  }
}

}  // namespace
}  // namespace xq
