// The cache pool (runtime/block_pool.h, docs/design.md "The cache pool"), for
// every row of the table of modes: the blocks a cache holds against
// blocks_for_tokens() and bytes_in_use() after every step, sharded or not;
// PoolExhausted leaving the cache as it was; several sequences appended in a
// random interleaving giving attention bitwise equal to each sequence alone
// in a fresh cache (no result may depend on which blocks a sequence got);
// truncation anywhere, then appending again, against a fresh run.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/attention.h"
#include "kernels/cpu/group_quant.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/error.h"
#include "runtime/block_pool.h"
#include "runtime/cache.h"
#include "runtime/cache_mode.h"
#include "runtime/model.h"
#include "tests/cache_mode_params.h"
#include "tests/test_util.h"

namespace xq {
namespace {

constexpr int32_t kMaxTokens = 520;

TEST(BlockPool, TakesGivesAndResizesTablesAllOrNothing) {
  BlockPool pool(128, 5);
  EXPECT_EQ(pool.total_blocks(), 5);
  EXPECT_EQ(pool.free_blocks(), 5);
  BlockTable a, b;
  resize_table(pool, a, 2, 1);
  EXPECT_EQ(a.held(), 3);
  EXPECT_EQ(pool.free_blocks(), 2);
  // Three more do not fit: nothing changes.
  EXPECT_THROW(resize_table(pool, b, 3, 0), PoolExhausted);
  EXPECT_EQ(b.held(), 0);
  EXPECT_EQ(pool.free_blocks(), 2);
  // Blocks a table gives back count for its own growth in the same call.
  resize_table(pool, a, 4, 0);
  EXPECT_EQ(a.held(), 4);
  EXPECT_EQ(pool.free_blocks(), 1);
  std::vector<int32_t> ids = a.groups;
  std::sort(ids.begin(), ids.end());
  EXPECT_EQ(std::unique(ids.begin(), ids.end()), ids.end()) << "a block handed out twice";
  for (int32_t id : a.groups) EXPECT_EQ(pool.block(id) - pool.block(0), id * 128);
  resize_table(pool, a, 0, 0);
  EXPECT_EQ(pool.free_blocks(), 5);
  EXPECT_THROW(BlockPool(100, 1), Error);  // not a multiple of a cache line
  EXPECT_EQ(blocks_in_budget(0, 64, 7), 7);
  EXPECT_EQ(blocks_in_budget(640, 64, 7), 10);
  EXPECT_EQ(blocks_in_budget(700, 64, 7), 10);
  EXPECT_THROW(blocks_in_budget(63, 64, 7), Error);
}

// A pool rebuilt around tables filled elsewhere (a device cache importing a
// CPU cache's blocks) hands out exactly the blocks no table holds.
TEST(BlockPool, PoolAroundTablesFreesExactlyTheUnheldBlocks) {
  BlockPool source(128, 9);
  std::vector<BlockTable> tables(3);
  resize_table(source, tables[0], 2, 1);
  resize_table(source, tables[2], 3, 0);
  BlockPool rebuilt = pool_around(128, 9, tables);
  EXPECT_EQ(rebuilt.free_blocks(), source.free_blocks());
  EXPECT_EQ(rebuilt.arena(), nullptr);
  std::vector<int32_t> taken;
  while (rebuilt.free_blocks() > 0) taken.push_back(rebuilt.take());
  for (const BlockTable& table : tables)
    for (const std::vector<int32_t>* ids : {&table.groups, &table.window})
      for (int32_t id : *ids)
        EXPECT_EQ(std::count(taken.begin(), taken.end(), id), 0) << "held block " << id << " freed";
  std::vector<int32_t> expected;
  while (source.free_blocks() > 0) expected.push_back(source.take());
  std::sort(taken.begin(), taken.end());
  std::sort(expected.begin(), expected.end());
  EXPECT_EQ(taken, expected);
  tables[1].groups = {tables[0].groups[0]};  // one block in two tables
  EXPECT_THROW(pool_around(128, 9, tables), Error);
  tables[1].groups = {9};  // out of range
  EXPECT_THROW(pool_around(128, 9, tables), Error);
}

// Each token's rows come from its own seed (content, layer, position), so
// any split of a sequence into steps feeds the same rows.
struct Rows {
  std::vector<float> x, k, v, q;
};

Rows token_rows(const ModelConfig& c, uint32_t content, int32_t layer, int32_t pos0, int32_t n) {
  Rows r;
  const int64_t qw = static_cast<int64_t>(c.n_heads) * c.head_dim;
  r.x.resize(static_cast<size_t>(n) * c.dim);
  r.k.resize(static_cast<size_t>(n) * c.kv_dim());
  r.v.resize(r.k.size());
  r.q.resize(static_cast<size_t>(n) * qw);
  for (int32_t i = 0; i < n; ++i) {
    std::mt19937 rng(content * 1000003u + static_cast<uint32_t>(layer) * 7919u +
                     static_cast<uint32_t>(pos0 + i));
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (int64_t j = 0; j < c.dim; ++j) r.x[i * c.dim + j] = normal(rng);
    for (int64_t j = 0; j < c.kv_dim(); ++j) r.k[i * c.kv_dim() + j] = normal(rng);
    for (int64_t j = 0; j < c.kv_dim(); ++j) r.v[i * c.kv_dim() + j] = normal(rng);
    for (int64_t j = 0; j < qw; ++j) r.q[i * qw + j] = normal(rng);
  }
  return r;
}

// One step of a sequence, every layer appended then attended (as the engine
// does), into every cache of `caches` (one, or the shards of a sequence);
// returns the attention outputs of each layer (the shards' partial states).
std::vector<std::vector<float>> run_step(const ModelConfig& c,
                                         const std::vector<AttentionCache*>& caches, int32_t seq,
                                         uint32_t content, int32_t pos0, int32_t n) {
  std::vector<std::vector<float>> outputs;
  const size_t qw = static_cast<size_t>(c.n_heads) * c.head_dim;
  for (int32_t layer = 0; layer < c.n_layers; ++layer) {
    const Rows r = token_rows(c, content, layer, pos0, n);
    for (AttentionCache* cache : caches)
      cache->append(seq, layer, pos0, n, r.x.data(), r.k.data(), r.v.data());
    if (caches.size() == 1) {
      outputs.emplace_back(n * qw);
      caches[0]->attend(seq, layer, pos0, n, r.q.data(), outputs.back().data());
      continue;
    }
    for (AttentionCache* cache : caches) {
      cpu::PartialAttention state;
      cache->attend_partial(seq, layer, pos0, n, r.q.data(), state);
      outputs.emplace_back(state.acc.begin(), state.acc.end());
      outputs.back().insert(outputs.back().end(), state.sum.begin(), state.sum.end());
      outputs.back().insert(outputs.back().end(), state.max.begin(), state.max.end());
    }
  }
  return outputs;
}

bool bitwise_equal(const std::vector<std::vector<float>>& a,
                   const std::vector<std::vector<float>>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i].size() != b[i].size() ||
        std::memcmp(a[i].data(), b[i].data(), a[i].size() * sizeof(float)) != 0)
      return false;
  return true;
}

class PoolFixture : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    model_ = Model::load(testing::shared_path("models/stories260K.bin"));
    const ModelConfig& c = model_->config();
    rope_.resize(static_cast<size_t>(kMaxTokens) * c.rope_dim);
    cpu::rope_table(rope_.data(), kMaxTokens, c.rope_dim, c.rope_theta);
    cpu::set_thread_count(2);
  }
  CacheOptions options(int32_t sequences = 1, size_t pool_bytes = 0) const {
    CacheOptions o;
    o.mode = GetParam();
    o.max_tokens = kMaxTokens;
    o.sequences = sequences;
    o.pool_bytes = pool_bytes;
    o.rope_cos_sin = rope_.data();
    return o;
  }
  const ModelConfig& config() const { return model_->config(); }

  std::unique_ptr<Model> model_;
  std::vector<float> rope_;
};

class CachePool : public PoolFixture {};

// The pool's books after every step: every held block counted by
// blocks_for_tokens(), bytes_in_use() = held x block_bytes() within the
// budget, free + held = total; during a step never more than
// blocks_for_step(); all back after release. Unsharded and over 2 and 3
// shards (each shard's count from the global length).
TEST_P(CachePool, BlocksHeldFollowTheTokenCount) {
  const ModelConfig& c = config();
  for (int32_t shards : {1, 2, 3}) {
    std::vector<std::unique_ptr<AttentionCache>> parts;
    for (int32_t s = 0; s < shards; ++s) {
      CacheOptions o = options(2);
      o.sequence_shards = shards;
      o.sequence_shard = s;
      parts.push_back(make_cache(*model_, o));
    }
    std::vector<AttentionCache*> caches;
    for (auto& part : parts) caches.push_back(part.get());
    auto check = [&](const std::string& where, const int32_t lengths[2]) {
      for (AttentionCache* cache : caches) {
        const int32_t held = cache->total_blocks() - cache->free_blocks();
        EXPECT_EQ(held, cache->blocks_for_tokens(lengths[0]) + cache->blocks_for_tokens(lengths[1]))
            << GetParam() << ", " << shards << " shards, " << where;
        EXPECT_EQ(cache->bytes_in_use(), static_cast<size_t>(held) * cache->block_bytes());
        // The default pool: every slot at full length.
        EXPECT_GE(cache->total_blocks(),
                  cache->sequences() * cache->blocks_for_step(kMaxTokens - 1, kMaxTokens));
      }
    };
    int32_t lengths[2] = {0, 0};
    // Steps across group edges, from mid-window, by whole groups, and single tokens.
    const int32_t steps[] = {1, 126, 1, 1, 100, 200, 3, 125, 1};
    for (int32_t step : steps) {
      for (int32_t seq : {0, 1}) {
        const int32_t n = seq == 0 ? step : std::max(1, step / 2);
        if (lengths[seq] + n > kMaxTokens) continue;
        // The peak inside the step, layer by layer, against blocks_for_step.
        for (int32_t layer = 0; layer < c.n_layers; ++layer) {
          const Rows r = token_rows(c, seq, layer, lengths[seq], n);
          for (AttentionCache* cache : caches) {
            cache->append(seq, layer, lengths[seq], n, r.x.data(), r.k.data(), r.v.data());
            const int32_t other = lengths[1 - seq];
            EXPECT_LE(cache->total_blocks() - cache->free_blocks(),
                      cache->blocks_for_step(lengths[seq], lengths[seq] + n) +
                          cache->blocks_for_tokens(other))
                << GetParam() << ": layer " << layer << " of a step to " << lengths[seq] + n;
          }
        }
        lengths[seq] += n;
        check("after a step to " + std::to_string(lengths[seq]), lengths);
      }
    }
    for (int32_t to : {300, 257, 200, 128, 5}) {
      lengths[0] = std::min(lengths[0], to);
      for (AttentionCache* cache : caches) cache->truncate(0, to);
      check("after truncating to " + std::to_string(to), lengths);
    }
    for (AttentionCache* cache : caches) {
      cache->release(0);
      cache->release(1);
      EXPECT_EQ(cache->free_blocks(), cache->total_blocks()) << GetParam();
      EXPECT_EQ(cache->bytes_in_use(), 0u);
      EXPECT_EQ(cache->payload_bytes(), 0u);
    }
  }
}

// A budget: its blocks never exceed it, and a sequence that needs one more
// than is free gets PoolExhausted with the cache unchanged (blocks, lengths,
// bytes and attention over what it holds); once another sequence is
// released the same step succeeds and equals a run in a fresh cache.
TEST_P(CachePool, ExhaustionLeavesTheCacheAsItWas) {
  const ModelConfig& c = config();
  auto probe = make_cache(*model_, options());
  const size_t block = probe->block_bytes();
  const int32_t blocks = probe->blocks_for_tokens(200) + 3;
  const size_t budget = blocks * block + block / 2;
  auto cache = make_cache(*model_, options(2, budget));
  ASSERT_EQ(cache->total_blocks(), blocks);
  EXPECT_LE(static_cast<size_t>(cache->total_blocks()) * cache->block_bytes(), budget);
  // Sequence 1 takes two blocks, sequence 0 grows until the pool is out.
  run_step(c, {cache.get()}, 1, 99, 0, 200);
  const int32_t other = cache->blocks_for_tokens(200);
  int32_t length = 0;
  const int32_t step = 100;
  while (cache->blocks_for_step(length, length + step) + other <= cache->total_blocks())
    run_step(c, {cache.get()}, 0, 7, length, step), length += step;
  const int32_t free_before = cache->free_blocks();
  const size_t payload_before = cache->payload_bytes();
  const Rows last = token_rows(c, 7, 0, length - 1, 1);
  std::vector<float> before(static_cast<size_t>(c.n_heads) * c.head_dim), after(before.size());
  cache->attend(0, 0, length - 1, 1, last.q.data(), before.data());
  const Rows r = token_rows(c, 7, 0, length, step);
  EXPECT_THROW(cache->append(0, 0, length, step, r.x.data(), r.k.data(), r.v.data()), PoolExhausted)
      << GetParam() << " at " << length << " tokens";
  EXPECT_EQ(cache->free_blocks(), free_before);
  EXPECT_EQ(cache->payload_bytes(), payload_before);
  EXPECT_EQ(cache->length(0), length);
  cache->attend(0, 0, length - 1, 1, last.q.data(), after.data());
  EXPECT_EQ(std::memcmp(before.data(), after.data(), before.size() * sizeof(float)), 0);
  // A restart (position 0) that needs more than the pool holds fails alike.
  if (cache->blocks_for_tokens(kMaxTokens) > cache->total_blocks() - other) {
    const Rows big = token_rows(c, 8, 0, 0, kMaxTokens);
    EXPECT_THROW(cache->append(0, 0, 0, kMaxTokens, big.x.data(), big.k.data(), big.v.data()),
                 PoolExhausted);
    EXPECT_EQ(cache->free_blocks(), free_before);
    EXPECT_EQ(cache->length(0), length);
  }
  cache->release(1);
  const auto grown = run_step(c, {cache.get()}, 0, 7, length, step);
  auto fresh = make_cache(*model_, options());
  std::vector<std::vector<float>> alone;
  for (int32_t at = 0; at <= length; at += step) alone = run_step(c, {fresh.get()}, 0, 7, at, step);
  EXPECT_TRUE(bitwise_equal(grown, alone)) << GetParam();
  EXPECT_THROW(make_cache(*model_, options(1, block - 1)), Error);  // not one block
}

// Four sequences stepped in a random order through one cache (a fifth slot
// takes and gives back blocks between their steps, so the sequences get
// scattered blocks, not runs), against each alone in a fresh cache: bitwise
// equal at every step and layer.
TEST_P(CachePool, InterleavedSequencesEqualEachAlone) {
  const ModelConfig& c = config();
  struct Plan {
    uint32_t content;
    std::vector<int32_t> steps;
  };
  const std::vector<Plan> plans = {{11, {40, 1, 1, 100, 1, 1, 1}},
                                   {12, {130, 1, 127, 1, 1}},
                                   {13, {1, 1, 1, 200, 20, 1}},
                                   {14, {300, 30, 1, 1}}};
  std::vector<std::vector<std::vector<std::vector<float>>>> alone(plans.size());
  for (size_t s = 0; s < plans.size(); ++s) {
    auto fresh = make_cache(*model_, options());
    int32_t at = 0;
    for (int32_t n : plans[s].steps) {
      alone[s].push_back(run_step(c, {fresh.get()}, 0, plans[s].content, at, n));
      at += n;
    }
  }
  auto shared = make_cache(*model_, options(5));
  std::vector<size_t> next(plans.size(), 0);
  std::vector<int32_t> at(plans.size(), 0);
  std::vector<size_t> order;
  for (size_t s = 0; s < plans.size(); ++s) order.insert(order.end(), plans[s].steps.size(), s);
  std::mt19937 rng(3);
  std::shuffle(order.begin(), order.end(), rng);
  int32_t noise = 0;
  for (size_t s : order) {
    // The noise slot takes or gives back blocks between the sequences' steps.
    if (noise > 256 || (rng() % 3 == 0 && noise > 0)) {
      shared->release(4);
      noise = 0;
    } else {
      run_step(c, {shared.get()}, 4, 77, noise, 64);
      noise += 64;
    }
    const int32_t n = plans[s].steps[next[s]];
    const auto got =
        run_step(c, {shared.get()}, static_cast<int32_t>(s), plans[s].content, at[s], n);
    EXPECT_TRUE(bitwise_equal(got, alone[s][next[s]]))
        << GetParam() << ": sequence " << s << ", step " << next[s] << " at " << at[s];
    at[s] += n;
    ++next[s];
  }
}

// Truncation anywhere, then new tokens, against a fresh cache fed what the
// truncated one keeps. Kept tokens of a group still in the fp16 window, and
// every token of a per-token or fp16 stream, are as they were written: a
// fresh run of the same rows. The kept head of a per-channel group already
// quantized goes back to the window as decoded (what the codes say): for
// KIVI's K (the stream is K itself) the fresh run is fed those decoded rows.
// Bitwise equal in both cases.
TEST_P(CachePool, TruncateThenAppendEqualsAFreshRun) {
  const ModelConfig& c = config();
  const CacheModeSpec& mode = find_cache_mode(GetParam());
  const CacheLayout& layout = layout_for(mode, c);
  const bool per_channel = layout.shard_unit() > 1;
  const bool kivi = layout.kv_source == KvSource::kReadBack && mode.quantized();
  for (int32_t cut : {300, 260, 256, 200, 129, 128, 50}) {
    auto cache = make_cache(*model_, options());
    run_step(c, {cache.get()}, 0, 5, 0, 290);
    run_step(c, {cache.get()}, 0, 5, 290, 10);
    cache->truncate(0, cut);
    EXPECT_EQ(cache->length(0), cut);
    EXPECT_EQ(cache->total_blocks() - cache->free_blocks(), cache->blocks_for_tokens(cut));
    const auto got = run_step(c, {cache.get()}, 0, 6, cut, 40);
    const bool decoded_head = per_channel && cut % 128 != 0 && cut / 128 < 300 / 128;
    if (decoded_head && !kivi) continue;  // a latent of K: no rows to feed a fresh cache
    auto fresh = make_cache(*model_, options());
    // The kept tokens, layer by layer, as the truncated cache holds them.
    for (int32_t layer = 0; layer < c.n_layers; ++layer) {
      Rows r = token_rows(c, 5, layer, 0, cut);
      if (decoded_head) {
        const int32_t bits = layer < 3 ? std::max(mode.bits, 4) : mode.bits;
        const int32_t first = cut / 128 * 128, kv = c.kv_dim();
        // The whole group as the window held it (fp16), quantized per
        // channel, and its head decoded.
        Rows group = token_rows(c, 5, layer, first, 128);
        std::vector<uint16_t> half(group.k.size());
        cpu::fp32_to_fp16_row(group.k.data(), half.data(), static_cast<int64_t>(half.size()));
        cpu::fp16_to_fp32_row(half.data(), group.k.data(), static_cast<int64_t>(half.size()));
        std::vector<uint8_t> codes(cpu::packed_bytes(bits, int64_t{128} * kv));
        std::vector<cpu::GroupParams> params(kv);
        cpu::quantize_strided(group.k.data(), 128, kv, kv, bits, codes.data(), params.data());
        cpu::dequantize_strided_rows(codes.data(), params.data(), kv, bits, 0, cut - first,
                                     r.k.data() + static_cast<size_t>(first) * kv, kv);
      }
      fresh->append(0, layer, 0, cut, r.x.data(), r.k.data(), r.v.data());
      // XQuant-CL: the accumulator rows of the kept tokens, as attention left them.
      std::vector<float> out(static_cast<size_t>(cut) * c.n_heads * c.head_dim);
      fresh->attend(0, layer, 0, cut, r.q.data(), out.data());
    }
    const auto want = run_step(c, {fresh.get()}, 0, 6, cut, 40);
    EXPECT_TRUE(bitwise_equal(got, want)) << GetParam() << ", cut at " << cut;
  }
}

// Truncating inside a quantized per-channel group puts its decoded head back
// in the fp16 window, which needs window pages: from a full pool that is
// PoolExhausted with the cache unchanged; a cut at a group edge needs none.
TEST(CachePoolTruncate, DecodedHeadNeedsWindowPages) {
  auto model = Model::load(testing::shared_path("models/stories260K.bin"));
  const ModelConfig& c = model->config();
  std::vector<float> rope(static_cast<size_t>(kMaxTokens) * c.rope_dim);
  cpu::rope_table(rope.data(), kMaxTokens, c.rope_dim, c.rope_theta);
  CacheOptions options;
  options.mode = "kivi-2";
  options.max_tokens = kMaxTokens;
  options.rope_cos_sin = rope.data();
  const size_t block = make_cache(*model, options)->block_bytes();
  options.pool_bytes = 2 * block;  // two groups, no room for a window
  auto cache = make_cache(*model, options);
  run_step(c, {cache.get()}, 0, 5, 0, 256);
  ASSERT_EQ(cache->free_blocks(), 0);
  const size_t payload = cache->payload_bytes();
  EXPECT_THROW(cache->truncate(0, 200), PoolExhausted);
  EXPECT_EQ(cache->length(0), 256);
  EXPECT_EQ(cache->payload_bytes(), payload);
  EXPECT_EQ(cache->free_blocks(), 0);
  cache->truncate(0, 128);  // a group edge: gives one block back
  EXPECT_EQ(cache->free_blocks(), 1);
  EXPECT_EQ(cache->length(0), 128);
  cache->truncate(0, 50);  // the freed block becomes the window page
  EXPECT_EQ(cache->free_blocks(), 0);
  EXPECT_EQ(cache->total_blocks() - cache->free_blocks(), cache->blocks_for_tokens(50));
}

INSTANTIATE_TEST_SUITE_P(Table, CachePool, ::testing::ValuesIn(testing::table_mode_names()),
                         testing::mode_test_name);

}  // namespace
}  // namespace xq
