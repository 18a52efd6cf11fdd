// The device caches (runtime/device_cache.h, kernels/cuda/paged_attention.h)
// against the CPU caches of the same mode and options: the decode kernels
// over a CPU cache's uploaded blocks, the encode kernels' bytes against the
// CPU arena, and whole steps (truncation, pool exhaustion). Built with CUDA
// only; each test that needs a GPU skips, with CUDA's reason, without one.
#if defined(XQ_HAVE_CUDA)

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/cpu/attention.h"
#include "kernels/cpu/ops.h"
#include "kernels/cuda/device.h"
#include "kernels/cuda/paged_attention.h"
#include "kernels/error.h"
#include "runtime/cache.h"
#include "runtime/cache_fp16.h"
#include "runtime/cache_mode.h"
#include "runtime/device_cache.h"
#include "runtime/model.h"
#include "runtime/sequence_shard.h"
#include "test_util.h"
#include "tests/cuda_test_util.h"

namespace xq {
namespace {

namespace paged = cuda::paged;

const char* kSmolLm2 = "SmolLM2-135M-Instruct.Q4_1.gguf";

std::unique_ptr<Model> load_model(const std::string& which) {
  if (which == "stories260K") return Model::load(testing::shared_path("models/stories260K.bin"));
  const std::string path = testing::models_path(kSmolLm2);
  return testing::file_exists(path) ? Model::load(path) : nullptr;
}

std::vector<float> normal_values(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> values(n);
  for (float& value : values) value = normal(rng);
  return values;
}

// Worst |actual - expected| over the largest |expected| (as tests/test_cuda.cpp).
::testing::AssertionResult close_normalized(const std::vector<float>& actual,
                                            const std::vector<float>& expected, double tolerance) {
  if (actual.size() != expected.size())
    return ::testing::AssertionFailure() << "size " << actual.size() << " != " << expected.size();
  double scale = 1e-30, worst = 0;
  size_t at = 0;
  for (float value : expected) scale = std::max(scale, static_cast<double>(std::fabs(value)));
  for (size_t i = 0; i < actual.size(); ++i) {
    const double error = std::fabs(static_cast<double>(actual[i]) - expected[i]);
    if (!(error <= worst)) {
      worst = error;
      at = i;
    }
  }
  std::ostringstream message;
  message << "worst element " << at << ": cuda " << actual[at] << ", cpu " << expected[at]
          << ", normalized error " << worst / scale << " (tolerance " << tolerance << ")";
  if (!(worst / scale <= tolerance)) return ::testing::AssertionFailure() << message.str();
  return ::testing::AssertionSuccess() << message.str();
}

template <typename T>
cuda::DeviceMemory upload(const std::vector<T>& host, cuda::Stream& stream) {
  cuda::DeviceMemory memory(std::max<size_t>(1, host.size() * sizeof(T)));
  if (!host.empty())
    cuda::copy_to_device(memory.data(), host.data(), host.size() * sizeof(T), stream);
  return memory;
}

std::vector<float> download(const cuda::DeviceMemory& memory, size_t count, cuda::Stream& stream) {
  std::vector<float> host(count);
  cuda::copy_to_host(host.data(), memory.data(), count * sizeof(float), stream);
  stream.synchronize();
  return host;
}

// The inputs of one sequence: rows of x, k (before RoPE) and v, every layer.
struct SequenceRows {
  int32_t length = 0;
  std::vector<std::vector<float>> x, k, v;  // per layer, (length, width)
};

SequenceRows random_rows(const ModelConfig& c, int32_t length, uint32_t seed) {
  SequenceRows rows;
  rows.length = length;
  for (int32_t layer = 0; layer < c.n_layers; ++layer) {
    const uint32_t s = seed * 1000 + static_cast<uint32_t>(layer) * 3;
    rows.x.push_back(normal_values(static_cast<size_t>(length) * c.dim, s));
    rows.k.push_back(normal_values(static_cast<size_t>(length) * c.kv_dim(), s + 1));
    rows.v.push_back(normal_values(static_cast<size_t>(length) * c.kv_dim(), s + 2));
  }
  return rows;
}

// A CPU cache's options for a test: `sequences` slots of max_tokens each.
struct TestCacheSetup {
  std::vector<float> rope;
  CacheOptions options;
  TestCacheSetup(const ModelConfig& c, const std::string& mode, int32_t max_tokens,
                 int32_t sequences) {
    rope.resize(static_cast<size_t>(max_tokens) * c.rope_dim);
    cpu::rope_table(rope.data(), max_tokens, c.rope_dim, c.rope_theta);
    options.mode = mode;
    options.max_tokens = max_tokens;
    options.sequences = sequences;
    options.rope_cos_sin = rope.data();
  }
};

// Tolerance of device attention against the CPU's over the same fp16 keys and
// values: both widen the same fp16 values to fp32 and differ only in the order
// of fp32 sums (dot products over head_dim, exp sums and weighted V sums over
// up to ~600 tokens, merges of 128-token blocks vs the CPU's 64-token blocks).
// Each is a relative error of about sqrt(terms) x 6e-8 <= 2e-6 of a convex
// combination of V rows, scaled by the largest output: 1e-5 is 5x that.
constexpr double kFp16AttentionTolerance = 1e-5;

// (a) The decode kernel alone: a CPU fp16 cache filled with sequences of
// lengths spanning a partial first block and several blocks, its arena and
// tables uploaded as they are, the kernel's attention for random queries at
// the last positions against the CPU cache's attend, for a split plan, a
// single split and the unnormalized-state target.
void expect_fp16_decode_matches_cpu(const Model& model) {
  const ModelConfig& c = model.config();
  const int32_t max_tokens = 640;
  const std::vector<int32_t> lengths = {1, 77, 200, 517};
  const std::vector<int32_t> queries = {1, 1, 3, 2};  // the last rows of each sequence
  TestCacheSetup setup(c, "fp16", max_tokens, static_cast<int32_t>(lengths.size()));
  std::unique_ptr<AttentionCache> cpu = make_cache(model, setup.options);
  for (size_t s = 0; s < lengths.size(); ++s) {
    const SequenceRows rows = random_rows(c, lengths[s], 17 + static_cast<uint32_t>(s));
    for (int32_t layer = 0; layer < c.n_layers; ++layer)
      cpu->append(static_cast<int32_t>(s), layer, 0, lengths[s], rows.x[layer].data(),
                  rows.k[layer].data(), rows.v[layer].data());
  }
  cuda::Stream stream;
  const CacheBlockLayout layout = cpu->block_layout();
  const int32_t stride = cpu->blocks_for_tokens(max_tokens);
  std::vector<int32_t> tables(lengths.size() * static_cast<size_t>(stride), 0);
  std::vector<paged::StepRow> step_rows;
  for (size_t s = 0; s < lengths.size(); ++s) {
    const BlockTable& table = *cpu->blocks(static_cast<int32_t>(s)).table;
    std::copy(table.groups.begin(), table.groups.end(), tables.begin() + s * stride);
    for (int32_t i = 0; i < queries[s]; ++i)
      step_rows.push_back({static_cast<int32_t>(s), lengths[s] - queries[s] + i});
  }
  const std::vector<uint8_t> arena(cpu->blocks(0).arena,
                                   cpu->blocks(0).arena + layout.block_bytes * layout.total_blocks);
  cuda::DeviceMemory arena_device = upload(arena, stream), tables_device = upload(tables, stream),
                     rows_device = upload(step_rows, stream);
  paged::PagedArena pool;
  pool.arena = arena_device.as<uint8_t>();
  pool.block_bytes = layout.block_bytes;
  pool.tables = tables_device.as<const int32_t>();
  pool.table_stride = stride;
  paged::Fp16KvShape shape;
  shape.kv_heads = c.n_kv_heads;
  shape.head_dim = c.head_dim;
  shape.heads = c.n_heads;
  shape.layer_bytes = layout.fp16_layer_bytes;
  shape.rope_dim = c.rope_dim;
  shape.rope_layout = c.rope_layout;

  const int32_t n_rows = static_cast<int32_t>(step_rows.size());
  const size_t q_width = static_cast<size_t>(c.n_heads) * c.head_dim;
  const paged::SplitPlan split = paged::plan_splits(max_tokens);
  ASSERT_GT(split.splits, 1);
  paged::SplitPlan whole;
  whole.tokens_per_split = split.splits * split.tokens_per_split;
  cuda::DeviceMemory scratch(paged::split_scratch_floats(n_rows, c.n_heads, c.head_dim, split) *
                             sizeof(float));
  cuda::DeviceMemory out(n_rows * q_width * sizeof(float));
  cuda::DeviceMemory state(static_cast<size_t>(n_rows) * c.n_heads * (c.head_dim + 2) *
                           sizeof(float));
  for (int32_t layer = 0; layer < c.n_layers; ++layer) {
    const std::vector<float> q = normal_values(n_rows * q_width, 500 + layer);
    std::vector<float> expected(n_rows * q_width);
    size_t row = 0;
    for (size_t s = 0; s < lengths.size(); ++s) {
      cpu->attend(static_cast<int32_t>(s), layer, lengths[s] - queries[s], queries[s],
                  q.data() + row * q_width, expected.data() + row * q_width);
      row += queries[s];
    }
    cuda::DeviceMemory q_device = upload(q, stream);
    for (const paged::SplitPlan& plan : {split, whole}) {
      paged::AttentionTarget target;
      target.out = out.as<float>();
      paged::fp16_attention(pool, shape, layer, rows_device.as<const paged::StepRow>(), n_rows,
                            q_device.as<const float>(), paged::ShardSpec{}, plan,
                            scratch.as<float>(), target, stream);
      EXPECT_TRUE(close_normalized(download(out, expected.size(), stream), expected,
                                   kFp16AttentionTolerance))
          << "layer " << layer << ", " << plan.splits << " splits";
    }
    // The state target, normalized here: the same attention.
    const size_t state_rows = static_cast<size_t>(n_rows) * c.n_heads;
    paged::AttentionTarget target;
    target.state_max = state.as<float>();
    target.state_sum = target.state_max + state_rows;
    target.state_acc = target.state_sum + state_rows;
    paged::fp16_attention(pool, shape, layer, rows_device.as<const paged::StepRow>(), n_rows,
                          q_device.as<const float>(), paged::ShardSpec{}, split,
                          scratch.as<float>(), target, stream);
    const std::vector<float> states = download(state, state_rows * (c.head_dim + 2), stream);
    std::vector<float> normalized(expected.size());
    for (size_t r = 0; r < state_rows; ++r)
      for (int32_t d = 0; d < c.head_dim; ++d)
        normalized[r * c.head_dim + d] =
            states[2 * state_rows + r * c.head_dim + d] / states[state_rows + r];
    EXPECT_TRUE(close_normalized(normalized, expected, kFp16AttentionTolerance))
        << "layer " << layer << ", states";
  }
}

// Sequence sharding: two CPU shard caches filled with the same rows, each
// shard's blocks attended on the device as unnormalized states, the records
// laid side by side as an all_gather leaves them and merged on the device,
// against the unsharded CPU cache's attention.
void expect_fp16_shard_merge_matches_cpu(const Model& model) {
  const ModelConfig& c = model.config();
  const int32_t max_tokens = 384, length = 301, n_queries = 2, shards = 2;
  TestCacheSetup setup(c, "fp16", max_tokens, 1);
  std::unique_ptr<AttentionCache> whole = make_cache(model, setup.options);
  std::vector<std::unique_ptr<AttentionCache>> parts;
  for (int32_t i = 0; i < shards; ++i) {
    CacheOptions options = setup.options;
    options.sequence_shards = shards;
    options.sequence_shard = i;
    parts.push_back(make_cache(model, options));
  }
  const SequenceRows rows = random_rows(c, length, 5);
  const int32_t layer = c.n_layers - 1;
  for (int32_t l = 0; l < c.n_layers; ++l) {
    whole->append(0, l, 0, length, rows.x[l].data(), rows.k[l].data(), rows.v[l].data());
    for (auto& part : parts)
      part->append(0, l, 0, length, rows.x[l].data(), rows.k[l].data(), rows.v[l].data());
  }
  const size_t q_width = static_cast<size_t>(c.n_heads) * c.head_dim;
  const std::vector<float> q = normal_values(n_queries * q_width, 9);
  std::vector<float> expected(n_queries * q_width);
  whole->attend(0, layer, length - n_queries, n_queries, q.data(), expected.data());

  cuda::Stream stream;
  const size_t state_rows = static_cast<size_t>(n_queries) * c.n_heads;
  const size_t record = state_rows * (2 + c.head_dim);
  cuda::DeviceMemory gathered(record * shards * sizeof(float));
  cuda::DeviceMemory q_device = upload(q, stream);
  std::vector<paged::StepRow> step_rows;
  for (int32_t i = 0; i < n_queries; ++i) step_rows.push_back({0, length - n_queries + i});
  cuda::DeviceMemory rows_device = upload(step_rows, stream);
  std::vector<cuda::DeviceMemory> keep;  // each shard's arena and table, alive until the merge
  for (int32_t i = 0; i < shards; ++i) {
    const AttentionCache& part = *parts[i];
    const CacheBlockLayout layout = part.block_layout();
    const int32_t stride = part.blocks_for_tokens(max_tokens);
    std::vector<int32_t> table(stride, 0);
    const BlockTable& groups = *part.blocks(0).table;
    std::copy(groups.groups.begin(), groups.groups.end(), table.begin());
    const std::vector<uint8_t> arena(
        part.blocks(0).arena, part.blocks(0).arena + layout.block_bytes * layout.total_blocks);
    keep.push_back(upload(arena, stream));
    paged::PagedArena pool;
    pool.arena = keep.back().as<uint8_t>();
    pool.block_bytes = layout.block_bytes;
    keep.push_back(upload(table, stream));
    pool.tables = keep.back().as<const int32_t>();
    pool.table_stride = stride;
    paged::Fp16KvShape shape;
    shape.kv_heads = c.n_kv_heads;
    shape.head_dim = c.head_dim;
    shape.heads = c.n_heads;
    shape.layer_bytes = layout.fp16_layer_bytes;
    shape.rope_dim = c.rope_dim;
    paged::ShardSpec shard;
    shard.shards = shards;
    shard.index = i;
    shard.unit = 1;  // fp16 deals single tokens (runtime/cache_mode.h)
    paged::AttentionTarget target;
    target.state_max = gathered.as<float>() + i * record;
    target.state_sum = target.state_max + state_rows;
    target.state_acc = target.state_sum + state_rows;
    const paged::SplitPlan plan = paged::plan_splits((max_tokens + shards - 1) / shards);
    cuda::DeviceMemory scratch(paged::split_scratch_floats(n_queries, c.n_heads, c.head_dim, plan) *
                               sizeof(float));
    paged::fp16_attention(pool, shape, layer, rows_device.as<const paged::StepRow>(), n_queries,
                          q_device.as<const float>(), shard, plan, scratch.as<float>(), target,
                          stream);
    stream.synchronize();  // scratch goes at the end of this iteration
  }
  cuda::DeviceMemory out(expected.size() * sizeof(float));
  paged::merge_partial_states(gathered.as<const float>(), shards, static_cast<int64_t>(state_rows),
                              c.head_dim, out.as<float>(), stream);
  EXPECT_TRUE(
      close_normalized(download(out, expected.size(), stream), expected, kFp16AttentionTolerance));
}

// (b) + (c): the same rows appended through the device cache in steps (a
// prefill of two sequences, decode steps, a truncation inside a block) and
// through the CPU cache; after every step each layer's attention agrees, and
// at the end the stored fp16 keys and values are the CPU's bits: V rounded
// the same way, K rotated by the same operations (kernels/cuda/paged_fp16.cu)
// and rounded the same way.
void expect_fp16_steps_match_cpu(const Model& model) {
  const ModelConfig& c = model.config();
  const int32_t max_tokens = 512, sequences = 3;
  TestCacheSetup setup(c, "fp16", max_tokens, sequences);
  std::unique_ptr<AttentionCache> cpu = make_cache(model, setup.options);
  cuda::Stream stream;
  cuda::Blas blas(stream);
  std::unique_ptr<DeviceCache> device = make_device_cache(model, setup.options, stream, blas);
  EXPECT_EQ(device->block_bytes(), cpu->block_bytes());
  EXPECT_EQ(device->total_blocks(), cpu->total_blocks());
  EXPECT_EQ(device->describe(), cpu->describe());

  std::vector<SequenceRows> rows;
  for (int32_t s = 0; s < sequences; ++s) rows.push_back(random_rows(c, max_tokens, 40 + s));
  const size_t q_width = static_cast<size_t>(c.n_heads) * c.head_dim;
  const std::vector<std::vector<StepRows>> steps = {
      {{0, 0, 130}, {1, 0, 5}},    // prefill: a block and a bit, a few tokens
      {{0, 130, 1}, {1, 5, 1}},    // decode
      {{0, 131, 1}, {2, 0, 300}},  // decode beside a prefill of three blocks
      {{0, 100, 2}, {1, 6, 1}},    // truncation of sequence 0 inside its first block
      {{2, 300, 1}, {0, 102, 1}},  // decode after it
  };
  uint32_t seed = 900;
  for (const std::vector<StepRows>& step : steps) {
    int32_t n_rows = 0;
    for (const StepRows& s : step) n_rows += s.n;
    for (const StepRows& s : step)
      if (s.pos0 < cpu->length(s.seq)) cpu->truncate(s.seq, s.pos0);
    device->begin_step(step);
    for (int32_t layer = 0; layer < c.n_layers; ++layer) {
      std::vector<float> x, k, v;
      for (const StepRows& s : step) {
        const SequenceRows& r = rows[s.seq];
        x.insert(x.end(), r.x[layer].begin() + s.pos0 * c.dim,
                 r.x[layer].begin() + (s.pos0 + s.n) * c.dim);
        k.insert(k.end(), r.k[layer].begin() + s.pos0 * c.kv_dim(),
                 r.k[layer].begin() + (s.pos0 + s.n) * c.kv_dim());
        v.insert(v.end(), r.v[layer].begin() + s.pos0 * c.kv_dim(),
                 r.v[layer].begin() + (s.pos0 + s.n) * c.kv_dim());
      }
      const std::vector<float> q = normal_values(n_rows * q_width, seed++);
      std::vector<float> expected(n_rows * q_width);
      size_t row = 0;
      for (const StepRows& s : step) {
        cpu->append(s.seq, layer, s.pos0, s.n, x.data() + row * c.dim, k.data() + row * c.kv_dim(),
                    v.data() + row * c.kv_dim());
        cpu->attend(s.seq, layer, s.pos0, s.n, q.data() + row * q_width,
                    expected.data() + row * q_width);
        row += s.n;
      }
      cuda::DeviceMemory x_d = upload(x, stream), k_d = upload(k, stream), v_d = upload(v, stream),
                         q_d = upload(q, stream), out(expected.size() * sizeof(float));
      device->run_layer(layer, x_d.as<const float>(), k_d.as<const float>(), v_d.as<const float>(),
                        q_d.as<const float>(), out.as<float>());
      EXPECT_TRUE(close_normalized(download(out, expected.size(), stream), expected,
                                   kFp16AttentionTolerance))
          << "layer " << layer;
    }
    device->end_step();
    for (int32_t s = 0; s < sequences; ++s) {
      EXPECT_EQ(device->length(s), cpu->length(s)) << "sequence " << s;
      EXPECT_EQ(device->table(s).held(), cpu->blocks(s).table->held()) << "sequence " << s;
    }
    EXPECT_EQ(device->free_blocks(), cpu->free_blocks());
  }

  std::vector<uint8_t> arena;
  device->download_arena(arena);
  const CacheBlockLayout layout = cpu->block_layout();
  const uint8_t* cpu_arena = cpu->blocks(0).arena;
  const size_t head_elems = static_cast<size_t>(AttentionCache::kBlockTokens) * c.head_dim;
  int64_t compared = 0, differing = 0;
  for (int32_t s = 0; s < sequences; ++s) {
    const BlockTable& mine = device->table(s);
    const BlockTable& theirs = *cpu->blocks(s).table;
    for (int32_t t = 0; t < cpu->length(s); ++t) {
      const size_t block = t / AttentionCache::kBlockTokens;
      for (int32_t layer = 0; layer < c.n_layers; ++layer)
        for (int32_t half = 0; half < 2; ++half)  // keys, then values
          for (int32_t g = 0; g < c.n_kv_heads; ++g) {
            const size_t at = layer * layout.fp16_layer_bytes +
                              ((half * c.n_kv_heads + g) * head_elems +
                               static_cast<size_t>(t % AttentionCache::kBlockTokens) * c.head_dim) *
                                  sizeof(uint16_t);
            const uint8_t* a = arena.data() + mine.groups[block] * layout.block_bytes + at;
            const uint8_t* b = cpu_arena + theirs.groups[block] * layout.block_bytes + at;
            compared += c.head_dim;
            for (int32_t d = 0; d < c.head_dim; ++d) {
              uint16_t x, y;
              std::memcpy(&x, a + 2 * d, 2);
              std::memcpy(&y, b + 2 * d, 2);
              differing += x != y;
            }
          }
    }
  }
  EXPECT_GT(compared, 0);
  EXPECT_EQ(differing, 0) << "of " << compared << " fp16 values";
}

// Pool exhaustion: a step that needs more blocks than the pool has throws
// PoolExhausted and changes nothing (lengths, free blocks); a step that fits
// then runs.
void expect_fp16_pool_exhaustion_changes_nothing(const Model& model) {
  const ModelConfig& c = model.config();
  TestCacheSetup setup(c, "fp16", 512, 2);
  std::unique_ptr<AttentionCache> layout_probe = make_cache(model, setup.options);
  setup.options.pool_bytes = 3 * layout_probe->block_bytes();
  cuda::Stream stream;
  cuda::Blas blas(stream);
  std::unique_ptr<DeviceCache> device = make_device_cache(model, setup.options, stream, blas);
  ASSERT_EQ(device->total_blocks(), 3);
  const size_t q_width = static_cast<size_t>(c.n_heads) * c.head_dim;
  auto run = [&](const std::vector<StepRows>& step) {
    int32_t n_rows = 0;
    for (const StepRows& s : step) n_rows += s.n;
    device->begin_step(step);
    cuda::DeviceMemory x = upload(normal_values(n_rows * c.dim, 1), stream),
                       k = upload(normal_values(n_rows * c.kv_dim(), 2), stream),
                       v = upload(normal_values(n_rows * c.kv_dim(), 3), stream),
                       q = upload(normal_values(n_rows * q_width, 4), stream),
                       out(n_rows * q_width * sizeof(float));
    for (int32_t layer = 0; layer < c.n_layers; ++layer)
      device->run_layer(layer, x.as<const float>(), k.as<const float>(), v.as<const float>(),
                        q.as<const float>(), out.as<float>());
    stream.synchronize();
    device->end_step();
  };
  run({{0, 0, 200}});  // two blocks
  EXPECT_EQ(device->free_blocks(), 1);
  EXPECT_THROW(run({{0, 200, 100}, {1, 0, 10}}), PoolExhausted);  // needs three
  EXPECT_EQ(device->free_blocks(), 1);
  EXPECT_EQ(device->length(0), 200);
  EXPECT_EQ(device->length(1), 0);
  // Truncating sequence 0 to 100 inside the step frees its second block.
  run({{0, 100, 10}, {1, 0, 130}});
  EXPECT_EQ(device->length(0), 110);
  EXPECT_EQ(device->length(1), 130);
  EXPECT_EQ(device->free_blocks(), 0);
}

class CudaCacheTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    SKIP_WITHOUT_CUDA_DEVICE();
    model_ = load_model(GetParam());
    if (!model_) GTEST_SKIP() << GetParam() << " not found (models/" << kSmolLm2 << ")";
  }
  std::unique_ptr<Model> model_;
};

TEST_P(CudaCacheTest, Fp16DecodeKernelMatchesCpuAttend) {
  expect_fp16_decode_matches_cpu(*model_);
}

TEST_P(CudaCacheTest, Fp16ShardStatesMergeToCpuAttend) {
  expect_fp16_shard_merge_matches_cpu(*model_);
}

TEST_P(CudaCacheTest, Fp16StepsMatchCpuCacheBitsAndAttention) {
  expect_fp16_steps_match_cpu(*model_);
}

TEST_P(CudaCacheTest, Fp16PoolExhaustionChangesNothing) {
  expect_fp16_pool_exhaustion_changes_nothing(*model_);
}

INSTANTIATE_TEST_SUITE_P(Models, CudaCacheTest, ::testing::Values("stories260K", "SmolLM2"));

// ---------------------------------------------------------------------------
// The quantized modes (runtime/device_cache_quantized.cpp) against
// QuantizedCache.

// Tolerances of device attention against the CPU's, by how K and V come back:
//   kivi (the fused kernel, kernels/cuda/paged_kivi.cu): the dequantized K
//     and V are the CPU's values exactly (same codes, exact decode,
//     kernels/group_quant.h) and RoPE repeats cpu::rope's operations; what
//     differs is the order of fp32 sums, as for fp16: kFp16AttentionTolerance.
//   xquant on X, xquant-cl: K and V are rebuilt by cuBLAS sgemm in fp32 math
//     (no TF32: its 10-bit mantissa would put the keys ~1e-3 off, beyond
//     this bound) over dim (<= 576) inputs in another order than the CPU's
//     GEMMs: a relative error of about
//     sqrt(576) x 6e-8 = 1.5e-6 of |x||w| per value, up to ~10x that after
//     cancellation; softmax passes it on unamplified for scores of order 1.
//     1e-4 leaves a margin of about 5x. XQuant-CL on latents decodes Xhat with
//     one more fp32 projection, whose last-bit differences can move a code
//     of a later delta across a midpoint (rate ~2^-20 per value), covered
//     by the same bound since each moved value is one of hundreds mixed.
//   xquant latents: the fused kernel holds rebuild_k in fp16 (relative
//     rounding 2^-11 per weight, XQuantLatentLayer), so keys carry ~5e-4
//     relative error; scores of order 1-3 move by ~1e-3 and the output by
//     about as much: 5e-3.
double attention_tolerance(const std::string& mode, const ModelConfig& c) {
  const CacheModeSpec& spec = find_cache_mode(mode);
  const KvSource source = layout_for(spec, c).kv_source;
  if (source == KvSource::kReadBack) return kFp16AttentionTolerance;
  if (source == KvSource::kRebuiltFromLatents) return 5e-3;
  return 1e-4;
}

// Whether the stored bytes depend on an fp32 projection (latents, CL
// latents), whose last-bit rounding differs from the CPU's: then a code or a
// parameter may differ where a projected value lies within that rounding of
// a code's midpoint or of an fp16 parameter's rounding boundary (a rate of
// about 2^-13 per parameter and far less per code); elsewhere the inputs of
// the quantizer are the CPU's bits and every byte must match.
bool projected_streams(const std::string& mode, const ModelConfig& c) {
  const CacheLayout& layout = layout_for(find_cache_mode(mode), c);
  return layout.kv_source == KvSource::kRebuiltFromLatents ||
         layout.streams[0].content == StreamContent::kXDeltaLatent;
}
constexpr double kProjectedByteFraction = 1e-3;

// Rows of each step's segments, every layer, from per-sequence rows.
struct StepInputs {
  std::vector<float> x, k, v;
};
StepInputs gather_step(const ModelConfig& c, const std::vector<SequenceRows>& rows,
                       const std::vector<StepRows>& step, int32_t layer) {
  StepInputs in;
  for (const StepRows& s : step) {
    const SequenceRows& r = rows[s.seq];
    in.x.insert(in.x.end(), r.x[layer].begin() + s.pos0 * c.dim,
                r.x[layer].begin() + (s.pos0 + s.n) * c.dim);
    in.k.insert(in.k.end(), r.k[layer].begin() + s.pos0 * c.kv_dim(),
                r.k[layer].begin() + (s.pos0 + s.n) * c.kv_dim());
    in.v.insert(in.v.end(), r.v[layer].begin() + s.pos0 * c.kv_dim(),
                r.v[layer].begin() + (s.pos0 + s.n) * c.kv_dim());
  }
  return in;
}

// One step through the CPU cache (truncation, then per layer append and
// attend of every segment) and the device cache, attention compared per
// layer (failures recorded, the step finished either way). `shape_key`, where
// given, receives the device cache's step_shape_key() of the step.
void run_step_on_both(const Model& model, const std::string& mode, AttentionCache& cpu,
                      DeviceCache& device, const std::vector<SequenceRows>& rows,
                      const std::vector<StepRows>& step, uint32_t& seed, cuda::Stream& stream,
                      int64_t* shape_key = nullptr) {
  const ModelConfig& c = model.config();
  const size_t q_width = static_cast<size_t>(c.n_heads) * c.head_dim;
  int32_t n_rows = 0;
  for (const StepRows& s : step) n_rows += s.n;
  for (const StepRows& s : step)
    if (s.pos0 < cpu.length(s.seq)) cpu.truncate(s.seq, s.pos0);
  device.begin_step(step);
  if (shape_key != nullptr) *shape_key = device.step_shape_key();
  for (int32_t layer = 0; layer < c.n_layers; ++layer) {
    const StepInputs in = gather_step(c, rows, step, layer);
    const std::vector<float> q = normal_values(n_rows * q_width, seed++);
    std::vector<float> expected(n_rows * q_width);
    size_t row = 0;
    for (const StepRows& s : step) {
      cpu.append(s.seq, layer, s.pos0, s.n, in.x.data() + row * c.dim,
                 in.k.data() + row * c.kv_dim(), in.v.data() + row * c.kv_dim());
      cpu.attend(s.seq, layer, s.pos0, s.n, q.data() + row * q_width,
                 expected.data() + row * q_width);
      row += s.n;
    }
    cuda::DeviceMemory x_d = upload(in.x, stream), k_d = upload(in.k, stream),
                       v_d = upload(in.v, stream), q_d = upload(q, stream),
                       out(std::max<size_t>(1, expected.size()) * sizeof(float));
    device.run_layer(layer, x_d.as<const float>(), k_d.as<const float>(), v_d.as<const float>(),
                     q_d.as<const float>(), out.as<float>());
    EXPECT_TRUE(close_normalized(download(out, expected.size(), stream), expected,
                                 attention_tolerance(mode, c)))
        << mode << ", layer " << layer;
  }
  device.end_step();
}

// (a) Decode over an imported CPU arena: a CPU cache filled with sequences
// whose lengths end in a partial first group, right after a full group, in
// a window spanning pages and past two groups, its blocks imported; then one
// decode step per sequence through both caches (the device encodes the new
// row into the imported blocks and attends over them).
void expect_quant_decode_over_import_matches_cpu(const Model& model, const std::string& mode) {
  const ModelConfig& c = model.config();
  const int32_t max_tokens = 384;
  const std::vector<int32_t> lengths = {1, 128, 200, 300};
  const int32_t sequences = static_cast<int32_t>(lengths.size());
  TestCacheSetup setup(c, mode, max_tokens, sequences);
  std::unique_ptr<AttentionCache> cpu = make_cache(model, setup.options);
  std::vector<SequenceRows> rows;
  for (int32_t s = 0; s < sequences; ++s) rows.push_back(random_rows(c, lengths[s] + 1, 70 + s));
  for (int32_t layer = 0; layer < c.n_layers; ++layer) {
    // Layer by layer, every sequence: XQuant-CL's appends read the
    // accumulator rows the previous layer's attention wrote.
    for (int32_t s = 0; s < sequences; ++s) {
      cpu->append(s, layer, 0, lengths[s], rows[s].x[layer].data(), rows[s].k[layer].data(),
                  rows[s].v[layer].data());
      std::vector<float> q(static_cast<size_t>(lengths[s]) * c.n_heads * c.head_dim, 0.5f);
      std::vector<float> out(q.size());
      cpu->attend(s, layer, 0, lengths[s], q.data(), out.data());
    }
  }
  cuda::Stream stream;
  cuda::Blas blas(stream);
  std::unique_ptr<DeviceCache> device = make_device_cache(model, setup.options, stream, blas);
  ASSERT_EQ(device->block_bytes(), cpu->block_bytes());
  ASSERT_EQ(device->total_blocks(), cpu->total_blocks());
  EXPECT_EQ(device->describe(), cpu->describe());
  device->import_blocks(*cpu);
  std::vector<StepRows> step;
  for (int32_t s = 0; s < sequences; ++s) step.push_back({s, lengths[s], 1});
  uint32_t seed = 300;
  run_step_on_both(model, mode, *cpu, *device, rows, step, seed, stream);
  EXPECT_EQ(device->free_blocks(), cpu->free_blocks());
}

// Counts the bytes where the device's stored tokens differ from the CPU's:
// per token each row's codes and parameters, per channel each full group's
// codes and parameters and each window row, the outlier channels; XQuant-CL's
// accumulator rows separately as floats.
struct StoredComparison {
  int64_t bytes = 0, differing = 0;
  std::vector<float> device_accumulator, cpu_accumulator;
};
StoredComparison compare_stored(const AttentionCache& cpu, const DeviceCache& device,
                                const std::vector<uint8_t>& arena) {
  const CacheBlockLayout layout = cpu.block_layout();
  const uint8_t* theirs_arena = cpu.blocks(0).arena;
  StoredComparison result;
  auto compare = [&](const BlockTable& mine, const BlockTable& theirs, bool window, int32_t index,
                     size_t offset, size_t bytes) {
    const int32_t a_block = window ? mine.window[index] : mine.groups[index];
    const int32_t b_block = window ? theirs.window[index] : theirs.groups[index];
    const uint8_t* a = arena.data() + static_cast<size_t>(a_block) * layout.block_bytes + offset;
    const uint8_t* b = theirs_arena + static_cast<size_t>(b_block) * layout.block_bytes + offset;
    result.bytes += static_cast<int64_t>(bytes);
    for (size_t i = 0; i < bytes; ++i) result.differing += a[i] != b[i];
  };
  const int32_t tile = AttentionCache::kBlockTokens;
  for (int32_t s = 0; s < cpu.sequences(); ++s) {
    const BlockTable& mine = device.table(s);
    const BlockTable& theirs = *cpu.blocks(s).table;
    const int32_t length = cpu.length(s);  // unsharded: local = global
    for (const LayerLayout& layer : layout.layers) {
      for (const StreamLayout& stream : layer.streams) {
        if (stream.axis == QuantAxis::kPerToken) {
          for (int32_t t = 0; t < length; ++t) {
            const size_t in_block = static_cast<size_t>(t % tile);
            compare(mine, theirs, false, t / tile,
                    stream.group_offset + in_block * stream.row_code_bytes, stream.row_code_bytes);
            compare(mine, theirs, false, t / tile,
                    stream.group_offset + stream.group_code_bytes +
                        in_block * static_cast<size_t>(stream.row_groups) * 4,
                    static_cast<size_t>(stream.row_groups) * 4);
          }
        } else {
          for (int32_t g = 0; g < length / tile; ++g)
            compare(mine, theirs, false, g, stream.group_offset,
                    stream.group_code_bytes + static_cast<size_t>(stream.width) * 4);
          const size_t row_bytes = static_cast<size_t>(stream.width) * 2;
          for (int32_t o = 0; o < length % tile; ++o)
            compare(
                mine, theirs, true, o / layout.window_tokens,
                stream.window_offset + static_cast<size_t>(o % layout.window_tokens) * row_bytes,
                row_bytes);
        }
      }
      if (layout.keep_outlier)
        for (int32_t t = 0; t < length; ++t)
          compare(mine, theirs, false, t / tile,
                  layer.outlier_offset +
                      static_cast<size_t>(t % tile) * layout.outliers_per_token * sizeof(uint16_t),
                  layout.outliers_per_token * sizeof(uint16_t));
    }
    if (layout.cross_layer_accumulator) {
      const int64_t dim = layout.layers[0].rebuild_k.cols;  // Wk's inputs: dim
      for (int32_t t = 0; t < length; ++t) {
        const size_t at = layout.accumulator_offset + static_cast<size_t>(t % tile) * dim * 4;
        const float* a = reinterpret_cast<const float*>(
            arena.data() + static_cast<size_t>(mine.groups[t / tile]) * layout.block_bytes + at);
        const float* b = reinterpret_cast<const float*>(
            theirs_arena + static_cast<size_t>(theirs.groups[t / tile]) * layout.block_bytes + at);
        result.device_accumulator.insert(result.device_accumulator.end(), a, a + dim);
        result.cpu_accumulator.insert(result.cpu_accumulator.end(), b, b + dim);
      }
    }
  }
  return result;
}

// (b) + (c): steps through both caches that complete per-channel groups from
// the window and the step's rows, leave windows spanning pages, truncate
// inside a quantized group (its head decoded back into the window) and
// complete it again; attention per layer after every step, the tables'
// sizes and the pool, and at the end every stored byte.
void expect_quant_steps_match_cpu(const Model& model, const std::string& mode,
                                  bool keep_outlier_channel) {
  const ModelConfig& c = model.config();
  const int32_t max_tokens = 512, sequences = 3;
  TestCacheSetup setup(c, mode, max_tokens, sequences);
  setup.options.keep_outlier_channel = keep_outlier_channel;
  std::unique_ptr<AttentionCache> cpu = make_cache(model, setup.options);
  cuda::Stream stream;
  cuda::Blas blas(stream);
  std::unique_ptr<DeviceCache> device = make_device_cache(model, setup.options, stream, blas);
  EXPECT_EQ(device->block_bytes(), cpu->block_bytes());
  EXPECT_EQ(device->total_blocks(), cpu->total_blocks());
  EXPECT_EQ(device->describe(), cpu->describe());
  std::vector<SequenceRows> rows;
  for (int32_t s = 0; s < sequences; ++s) rows.push_back(random_rows(c, max_tokens, 40 + s));
  const std::vector<std::vector<StepRows>> steps = {
      {{0, 0, 130}, {1, 0, 5}},     // a group completed inside a prefill; windows begin
      {{0, 130, 1}, {1, 5, 1}},     // decode
      {{0, 131, 1}, {2, 0, 300}},   // decode beside a prefill of two groups and a window
      {{2, 200, 2}, {0, 132, 1}},   // truncation inside seq 2's quantized second group
      {{2, 202, 60}, {0, 133, 1}},  // completes it again from the decoded head, goes on
      {{0, 100, 2}, {1, 6, 122}},   // truncation in seq 0's first group; seq 1's group fills
      {{0, 102, 27}, {2, 262, 1}},  // seq 0's group completes from window and rows
  };
  uint32_t seed = 900;
  for (size_t i = 0; i < steps.size(); ++i) {
    SCOPED_TRACE("step " + std::to_string(i));
    run_step_on_both(model, mode, *cpu, *device, rows, steps[i], seed, stream);
    for (int32_t s = 0; s < sequences; ++s) {
      EXPECT_EQ(device->length(s), cpu->length(s)) << "sequence " << s;
      EXPECT_EQ(device->table(s).groups.size(), cpu->blocks(s).table->groups.size()) << s;
      EXPECT_EQ(device->table(s).window.size(), cpu->blocks(s).table->window.size()) << s;
    }
    EXPECT_EQ(device->free_blocks(), cpu->free_blocks());
  }
  std::vector<uint8_t> arena;
  device->download_arena(arena);
  const StoredComparison stored = compare_stored(*cpu, *device, arena);
  EXPECT_GT(stored.bytes, 0);
  if (projected_streams(mode, c)) {
    EXPECT_LE(static_cast<double>(stored.differing), kProjectedByteFraction * stored.bytes)
        << stored.differing << " of " << stored.bytes << " bytes";
    // Xhat rows decoded through one fp32 projection each: 1e-4 as attention.
    if (!stored.cpu_accumulator.empty()) {
      EXPECT_TRUE(close_normalized(stored.device_accumulator, stored.cpu_accumulator, 1e-4));
    }
  } else {
    EXPECT_EQ(stored.differing, 0) << "of " << stored.bytes << " bytes";
    // Xhat = dequantized delta + previous Xhat: the same fp32 additions.
    EXPECT_EQ(stored.device_accumulator, stored.cpu_accumulator);
  }
}

// The materialize path over a cache of 2560 tokens whose steps attend over
// contexts in three buckets of dense rows (materialize_rows: 1024, 2048, and
// the capacity): attention matches the CPU's in each, across a crossing up,
// a truncation back down (the scratch rows past the bucket and past the
// sequence then hold an older, longer context's values, never read) and a
// prefill to the capacity's bucket. step_shape_key() is each step's bucket.
// Tolerances as attention_tolerance: contexts of up to 2103 tokens add about
// sqrt(2103) x 6e-8 = 3e-6 relative error to the softmax sums, inside its
// margin.
void expect_materialize_steps_follow_their_context(const Model& model, const std::string& mode) {
  const ModelConfig& c = model.config();
  const int32_t max_tokens = 2560, sequences = 2;
  TestCacheSetup setup(c, mode, max_tokens, sequences);
  std::unique_ptr<AttentionCache> cpu = make_cache(model, setup.options);
  cuda::Stream stream;
  cuda::Blas blas(stream);
  std::unique_ptr<DeviceCache> device = make_device_cache(model, setup.options, stream, blas);
  const std::vector<SequenceRows> rows = {random_rows(c, 1200, 60), random_rows(c, 2200, 61)};
  struct KeyedStep {
    std::vector<StepRows> step;
    int64_t key;  // the longest stored context rounded up as materialize_rows says
  };
  const std::vector<KeyedStep> steps = {
      {{{0, 0, 1000}, {1, 0, 300}}, 1024},   // prefills in the first bucket
      {{{0, 1000, 24}, {1, 300, 1}}, 1024},  // seq 0 ends exactly at the bucket's end
      {{{0, 1024, 1}}, 2048},                // one slot past it
      {{{0, 1025, 100}, {1, 301, 1}}, 2048},
      {{{0, 600, 1}}, 1024},  // truncation back into the first bucket
      {{{1, 302, 1}, {0, 601, 1}}, 1024},
      {{{1, 303, 1800}, {0, 602, 1}}, 2560},  // past 2048: the capacity
  };
  uint32_t seed = 1200;
  for (size_t i = 0; i < steps.size(); ++i) {
    SCOPED_TRACE(mode + ", step " + std::to_string(i));
    int64_t key = -1;
    run_step_on_both(model, mode, *cpu, *device, rows, steps[i].step, seed, stream, &key);
    EXPECT_EQ(key, steps[i].key);
    for (int32_t s = 0; s < sequences; ++s) EXPECT_EQ(device->length(s), cpu->length(s));
  }
}

// Pool exhaustion: a step needing more blocks than are free throws
// PoolExhausted and changes nothing; a step that fits (a truncation inside
// a quantized group, its head back to window pages) then runs.
void expect_quant_pool_exhaustion_changes_nothing(const Model& model, const std::string& mode) {
  const ModelConfig& c = model.config();
  TestCacheSetup setup(c, mode, 512, 2);
  std::unique_ptr<AttentionCache> probe = make_cache(model, setup.options);
  const int32_t total = probe->blocks_for_tokens(200) + 1;
  setup.options.pool_bytes = static_cast<size_t>(total) * probe->block_bytes();
  cuda::Stream stream;
  cuda::Blas blas(stream);
  std::unique_ptr<DeviceCache> device = make_device_cache(model, setup.options, stream, blas);
  ASSERT_EQ(device->total_blocks(), total);
  const size_t q_width = static_cast<size_t>(c.n_heads) * c.head_dim;
  auto run = [&](const std::vector<StepRows>& step) {
    int32_t n_rows = 0;
    for (const StepRows& s : step) n_rows += s.n;
    device->begin_step(step);
    cuda::DeviceMemory x = upload(normal_values(n_rows * c.dim, 1), stream),
                       k = upload(normal_values(n_rows * c.kv_dim(), 2), stream),
                       v = upload(normal_values(n_rows * c.kv_dim(), 3), stream),
                       q = upload(normal_values(n_rows * q_width, 4), stream),
                       out(n_rows * q_width * sizeof(float));
    for (int32_t layer = 0; layer < c.n_layers; ++layer)
      device->run_layer(layer, x.as<const float>(), k.as<const float>(), v.as<const float>(),
                        q.as<const float>(), out.as<float>());
    stream.synchronize();
    device->end_step();
  };
  run({{0, 0, 200}});
  EXPECT_EQ(device->free_blocks(), 1);
  // 100 more tokens of sequence 0 and a new sequence take at least two.
  EXPECT_THROW(run({{0, 200, 100}, {1, 0, 10}}), PoolExhausted);
  EXPECT_EQ(device->free_blocks(), 1);
  EXPECT_EQ(device->length(0), 200);
  EXPECT_EQ(device->length(1), 0);
  run({{0, 100, 10}});
  EXPECT_EQ(device->length(0), 110);
  EXPECT_EQ(device->free_blocks(), total - probe->blocks_for_tokens(110));
}

// Sequence sharding: two device shard caches run the same steps through
// run_layer_partial; their states, laid side by side as an all_gather leaves
// them and merged on the device, against the unsharded CPU cache's attention
// (the shards deal whole 128-token groups where a stream is per channel).
void expect_quant_shards_merge_to_cpu(const Model& model, const std::string& mode) {
  const ModelConfig& c = model.config();
  const int32_t max_tokens = 384, length = 301, shards = 2;
  TestCacheSetup setup(c, mode, max_tokens, 1);
  std::unique_ptr<AttentionCache> whole = make_cache(model, setup.options);
  cuda::Stream stream;
  cuda::Blas blas(stream);
  std::vector<std::unique_ptr<DeviceCache>> parts;
  for (int32_t i = 0; i < shards; ++i) {
    CacheOptions options = setup.options;
    options.sequence_shards = shards;
    options.sequence_shard = i;
    parts.push_back(make_device_cache(model, options, stream, blas));
  }
  const SequenceRows rows = random_rows(c, length, 5);
  const size_t q_width = static_cast<size_t>(c.n_heads) * c.head_dim;
  const std::vector<std::vector<StepRows>> steps = {{{0, 0, length - 2}}, {{0, length - 2, 2}}};
  uint32_t seed = 60;
  for (const std::vector<StepRows>& step : steps) {
    const int32_t n = step[0].n, pos0 = step[0].pos0;
    for (auto& part : parts) part->begin_step(step);
    for (int32_t layer = 0; layer < c.n_layers; ++layer) {
      const StepInputs in = gather_step(c, {rows}, step, layer);
      const std::vector<float> q = normal_values(n * q_width, seed++);
      std::vector<float> expected(n * q_width);
      whole->append(0, layer, pos0, n, in.x.data(), in.k.data(), in.v.data());
      whole->attend(0, layer, pos0, n, q.data(), expected.data());
      cuda::DeviceMemory x_d = upload(in.x, stream), k_d = upload(in.k, stream),
                         v_d = upload(in.v, stream), q_d = upload(q, stream);
      const size_t state_rows = static_cast<size_t>(n) * c.n_heads;
      const size_t record = state_rows * (2 + c.head_dim);
      cuda::DeviceMemory gathered(record * shards * sizeof(float));
      for (int32_t i = 0; i < shards; ++i) {
        float* state_max = gathered.as<float>() + i * record;
        parts[i]->run_layer_partial(layer, x_d.as<const float>(), k_d.as<const float>(),
                                    v_d.as<const float>(), q_d.as<const float>(), state_max,
                                    state_max + state_rows, state_max + 2 * state_rows);
      }
      cuda::DeviceMemory out(expected.size() * sizeof(float));
      paged::merge_partial_states(gathered.as<const float>(), shards,
                                  static_cast<int64_t>(state_rows), c.head_dim, out.as<float>(),
                                  stream);
      EXPECT_TRUE(close_normalized(download(out, expected.size(), stream), expected,
                                   attention_tolerance(mode, c)))
          << mode << ", layer " << layer << ", rows from " << pos0;
    }
    for (auto& part : parts) part->end_step();
  }
}

// ---------------------------------------------------------------------------
// The fused KIVI decode kernel (kernels/cuda/paged_kivi.cu) alone, over a CPU
// kivi cache's blocks uploaded as they are.

// A CPU quantized cache's arena, tables, window pages and stored lengths on
// the device, as the kernels see them (`local_capacity` local slots a
// sequence at most; `shard`: the shard whose tokens the cache holds).
struct UploadedQuantCache {
  cuda::DeviceMemory arena, tables, window, stored;
  paged::PagedArena pool;
  paged::PagedWindow window_view;
  paged::PagedLengths lengths;
};
UploadedQuantCache upload_quant_cache(const AttentionCache& cpu, int32_t local_capacity,
                                      const SequenceShard& shard, cuda::Stream& stream) {
  const CacheBlockLayout layout = cpu.block_layout();
  const int32_t tile = AttentionCache::kBlockTokens;
  const int32_t table_stride = std::max(1, (local_capacity + tile - 1) / tile);
  const int32_t window_stride =
      std::max(1, (tile - 1 + layout.window_tokens - 1) / std::max(1, layout.window_tokens));
  std::vector<int32_t> tables(static_cast<size_t>(cpu.sequences()) * table_stride, 0);
  std::vector<int32_t> window(static_cast<size_t>(cpu.sequences()) * window_stride, 0);
  std::vector<int32_t> stored(static_cast<size_t>(cpu.sequences()), 0);
  for (int32_t s = 0; s < cpu.sequences(); ++s) {
    const BlockTable& table = *cpu.blocks(s).table;
    EXPECT_LE(static_cast<int32_t>(table.groups.size()), table_stride);
    EXPECT_LE(static_cast<int32_t>(table.window.size()), window_stride);
    std::copy(table.groups.begin(), table.groups.end(),
              tables.begin() + static_cast<size_t>(s) * table_stride);
    std::copy(table.window.begin(), table.window.end(),
              window.begin() + static_cast<size_t>(s) * window_stride);
    stored[s] = shard.owned_before(cpu.length(s));
  }
  const std::vector<uint8_t> arena(cpu.blocks(0).arena,
                                   cpu.blocks(0).arena + layout.block_bytes * layout.total_blocks);
  UploadedQuantCache up;
  up.arena = upload(arena, stream);
  up.tables = upload(tables, stream);
  up.window = upload(window, stream);
  up.stored = upload(stored, stream);
  up.pool.arena = up.arena.as<uint8_t>();
  up.pool.block_bytes = layout.block_bytes;
  up.pool.tables = up.tables.as<const int32_t>();
  up.pool.table_stride = table_stride;
  up.window_view.window = up.window.as<const int32_t>();
  up.window_view.window_stride = window_stride;
  up.window_view.window_tokens = layout.window_tokens;
  up.lengths.stored = up.stored.as<const int32_t>();
  return up;
}

paged::PagedStream paged_stream_of(const StreamLayout& s) {
  paged::PagedStream out;
  out.width = static_cast<int32_t>(s.width);
  out.bits = s.bits;
  out.per_channel = s.axis == QuantAxis::kPerChannel;
  out.group_offset = s.group_offset;
  out.window_offset = s.window_offset;
  out.row_code_bytes = s.row_code_bytes;
  out.row_groups = static_cast<int32_t>(s.row_groups);
  out.group_code_bytes = s.group_code_bytes;
  return out;
}

paged::KiviLayer kivi_layer_of(const CacheBlockLayout& layout, int32_t layer) {
  paged::KiviLayer kivi;
  kivi.keys = paged_stream_of(layout.layers[layer].streams[0]);
  kivi.values = paged_stream_of(layout.layers[layer].streams[1]);
  return kivi;
}

paged::AttentionShape attention_shape_of(const ModelConfig& c) {
  paged::AttentionShape shape;
  shape.heads = c.n_heads;
  shape.kv_heads = c.n_kv_heads;
  shape.head_dim = c.head_dim;
  shape.rope_dim = c.rope_dim;
  shape.rope_layout = c.rope_layout;
  return shape;
}

// The kernel over a CPU kivi cache filled with sequences whose lengths end
// in a partial first group, right at a group's end (the window empty),
// inside a window spanning pages, and past four groups; queries at the last
// positions of each against the CPU cache's attend, for a split plan, a
// single split and the unnormalized-state target. The decoded values are the
// CPU's bits and RoPE repeats cpu::rope's operations, so only fp32 sums are
// ordered differently: kFp16AttentionTolerance.
void expect_kivi_kernel_matches_cpu(const Model& model, const std::string& mode) {
  const ModelConfig& c = model.config();
  const int32_t max_tokens = 640;
  const std::vector<int32_t> lengths = {1, 77, 128, 200, 517};
  const std::vector<int32_t> queries = {1, 1, 2, 3, 2};  // the last rows of each sequence
  const int32_t sequences = static_cast<int32_t>(lengths.size());
  TestCacheSetup setup(c, mode, max_tokens, sequences);
  std::unique_ptr<AttentionCache> cpu = make_cache(model, setup.options);
  for (int32_t s = 0; s < sequences; ++s) {
    const SequenceRows rows = random_rows(c, lengths[s], 17 + static_cast<uint32_t>(s));
    for (int32_t layer = 0; layer < c.n_layers; ++layer)
      cpu->append(s, layer, 0, lengths[s], rows.x[layer].data(), rows.k[layer].data(),
                  rows.v[layer].data());
  }
  cuda::Stream stream;
  const CacheBlockLayout layout = cpu->block_layout();
  ASSERT_EQ(layout.kv_source, KvSource::kReadBack);
  const UploadedQuantCache up = upload_quant_cache(*cpu, max_tokens, SequenceShard(), stream);
  std::vector<paged::StepRow> step_rows;
  for (int32_t s = 0; s < sequences; ++s)
    for (int32_t i = 0; i < queries[s]; ++i) step_rows.push_back({s, lengths[s] - queries[s] + i});
  cuda::DeviceMemory rows_device = upload(step_rows, stream);
  cuda::DeviceMemory cos_sin = upload(setup.rope, stream);
  const paged::AttentionShape shape = attention_shape_of(c);
  ASSERT_EQ(paged::kivi_unsupported(shape), "");

  const int32_t n_rows = static_cast<int32_t>(step_rows.size());
  const size_t q_width = static_cast<size_t>(c.n_heads) * c.head_dim;
  const paged::SplitPlan split = paged::plan_splits(max_tokens);
  ASSERT_GT(split.splits, 1);
  paged::SplitPlan whole;
  whole.tokens_per_split = split.splits * split.tokens_per_split;
  cuda::DeviceMemory scratch(paged::split_scratch_floats(n_rows, c.n_heads, c.head_dim, split) *
                             sizeof(float));
  cuda::DeviceMemory out(n_rows * q_width * sizeof(float));
  const size_t state_rows = static_cast<size_t>(n_rows) * c.n_heads;
  cuda::DeviceMemory state(state_rows * (c.head_dim + 2) * sizeof(float));
  for (int32_t layer = 0; layer < c.n_layers; ++layer) {
    const std::vector<float> q = normal_values(n_rows * q_width, 500 + layer);
    std::vector<float> expected(n_rows * q_width);
    size_t row = 0;
    for (int32_t s = 0; s < sequences; ++s) {
      cpu->attend(s, layer, lengths[s] - queries[s], queries[s], q.data() + row * q_width,
                  expected.data() + row * q_width);
      row += queries[s];
    }
    cuda::DeviceMemory q_device = upload(q, stream);
    const paged::KiviLayer kivi = kivi_layer_of(layout, layer);
    for (const paged::SplitPlan& plan : {split, whole}) {
      paged::AttentionTarget target;
      target.out = out.as<float>();
      paged::kivi_attention(up.pool, up.window_view, up.lengths, kivi, shape,
                            rows_device.as<const paged::StepRow>(), n_rows,
                            q_device.as<const float>(), cos_sin.as<const float>(),
                            paged::ShardSpec{}, plan, scratch.as<float>(), target, stream);
      EXPECT_TRUE(close_normalized(download(out, expected.size(), stream), expected,
                                   kFp16AttentionTolerance))
          << mode << ", layer " << layer << ", " << plan.splits << " splits";
    }
    paged::AttentionTarget target;
    target.state_max = state.as<float>();
    target.state_sum = target.state_max + state_rows;
    target.state_acc = target.state_sum + state_rows;
    paged::kivi_attention(up.pool, up.window_view, up.lengths, kivi, shape,
                          rows_device.as<const paged::StepRow>(), n_rows,
                          q_device.as<const float>(), cos_sin.as<const float>(), paged::ShardSpec{},
                          split, scratch.as<float>(), target, stream);
    const std::vector<float> states = download(state, state_rows * (c.head_dim + 2), stream);
    std::vector<float> normalized(expected.size());
    for (size_t r = 0; r < state_rows; ++r)
      for (int32_t d = 0; d < c.head_dim; ++d)
        normalized[r * c.head_dim + d] =
            states[2 * state_rows + r * c.head_dim + d] / states[state_rows + r];
    EXPECT_TRUE(close_normalized(normalized, expected, kFp16AttentionTolerance))
        << mode << ", layer " << layer << ", states";
  }
}

// Sequence sharding: two CPU shard caches (128-token groups dealt in turn)
// filled with the same rows; per shard, the kernel's states (one split and
// several) against that shard's attend_partial: the normalized rows
// (kFp16AttentionTolerance) and the log-sum-exp max + ln sum (absolute 1e-4:
// scores of order 1-10 computed in fp32 over head_dim terms in another
// order, ~1e-6 each, and ln of a sum over up to 300 terms), and a row that
// sees none of a shard's tokens gets the empty state on both.
void expect_kivi_shard_states_match_cpu(const Model& model, const std::string& mode) {
  const ModelConfig& c = model.config();
  const int32_t max_tokens = 640, length = 517, n_queries = 3, shards = 2;
  TestCacheSetup setup(c, mode, max_tokens, 2);
  const SequenceRows rows = random_rows(c, length, 5);
  const int32_t short_length = 100;  // sequence 1: only shard 0 holds its tokens
  const SequenceRows short_rows = random_rows(c, short_length, 6);
  const size_t q_width = static_cast<size_t>(c.n_heads) * c.head_dim;
  const paged::AttentionShape shape = attention_shape_of(c);
  cuda::Stream stream;
  cuda::DeviceMemory cos_sin = upload(setup.rope, stream);
  std::vector<paged::StepRow> step_rows;
  for (int32_t i = 0; i < n_queries; ++i) step_rows.push_back({0, length - n_queries + i});
  step_rows.push_back({1, short_length - 1});
  const int32_t n_rows = static_cast<int32_t>(step_rows.size());
  cuda::DeviceMemory rows_device = upload(step_rows, stream);
  const size_t state_rows = static_cast<size_t>(n_rows) * c.n_heads;
  cuda::DeviceMemory state(state_rows * (c.head_dim + 2) * sizeof(float));
  for (int32_t i = 0; i < shards; ++i) {
    CacheOptions options = setup.options;
    options.sequence_shards = shards;
    options.sequence_shard = i;
    std::unique_ptr<AttentionCache> part = make_cache(model, options);
    const SequenceShard shard(shards, i, AttentionCache::kBlockTokens);
    for (int32_t l = 0; l < c.n_layers; ++l) {
      part->append(0, l, 0, length, rows.x[l].data(), rows.k[l].data(), rows.v[l].data());
      part->append(1, l, 0, short_length, short_rows.x[l].data(), short_rows.k[l].data(),
                   short_rows.v[l].data());
    }
    const int32_t local_capacity = shard.owned_before(max_tokens);
    const UploadedQuantCache up = upload_quant_cache(*part, local_capacity, shard, stream);
    const CacheBlockLayout layout = part->block_layout();
    paged::ShardSpec spec;
    spec.shards = shards;
    spec.index = i;
    spec.unit = AttentionCache::kBlockTokens;
    const paged::SplitPlan split = paged::plan_splits(local_capacity);
    ASSERT_GT(split.splits, 1);
    paged::SplitPlan whole;
    whole.tokens_per_split = split.splits * split.tokens_per_split;
    cuda::DeviceMemory scratch(paged::split_scratch_floats(n_rows, c.n_heads, c.head_dim, split) *
                               sizeof(float));
    for (int32_t layer = 0; layer < c.n_layers; ++layer) {
      const std::vector<float> q = normal_values(n_rows * q_width, 70 + layer);
      cpu::PartialAttention expected, short_expected;
      part->attend_partial(0, layer, length - n_queries, n_queries, q.data(), expected);
      part->attend_partial(1, layer, short_length - 1, 1, q.data() + n_queries * q_width,
                           short_expected);
      std::vector<float> want_max(expected.max), want_sum(expected.sum);
      want_max.insert(want_max.end(), short_expected.max.begin(), short_expected.max.end());
      want_sum.insert(want_sum.end(), short_expected.sum.begin(), short_expected.sum.end());
      std::vector<float> want_acc(expected.acc.begin(), expected.acc.end());
      want_acc.insert(want_acc.end(), short_expected.acc.begin(), short_expected.acc.end());
      ASSERT_EQ(want_max.size(), state_rows);
      cuda::DeviceMemory q_device = upload(q, stream);
      for (const paged::SplitPlan& plan : {split, whole}) {
        SCOPED_TRACE(mode + ", shard " + std::to_string(i) + ", layer " + std::to_string(layer) +
                     ", " + std::to_string(plan.splits) + " splits");
        paged::AttentionTarget target;
        target.state_max = state.as<float>();
        target.state_sum = target.state_max + state_rows;
        target.state_acc = target.state_sum + state_rows;
        paged::kivi_attention(up.pool, up.window_view, up.lengths, kivi_layer_of(layout, layer),
                              shape, rows_device.as<const paged::StepRow>(), n_rows,
                              q_device.as<const float>(), cos_sin.as<const float>(), spec, plan,
                              scratch.as<float>(), target, stream);
        const std::vector<float> got = download(state, state_rows * (c.head_dim + 2), stream);
        std::vector<float> got_rows, want_rows;
        for (size_t r = 0; r < state_rows; ++r) {
          const float got_max = got[r], got_sum = got[state_rows + r];
          if (want_sum[r] == 0.0f) {  // the empty state: this shard holds none of the row's tokens
            EXPECT_EQ(got_max, -INFINITY) << "row " << r;
            EXPECT_EQ(got_sum, 0.0f) << "row " << r;
            for (int32_t d = 0; d < c.head_dim; ++d)
              EXPECT_EQ(got[2 * state_rows + r * c.head_dim + d], 0.0f) << "row " << r;
            continue;
          }
          EXPECT_NEAR(got_max + std::log(got_sum), want_max[r] + std::log(want_sum[r]), 1e-4)
              << "row " << r;
          for (int32_t d = 0; d < c.head_dim; ++d) {
            got_rows.push_back(got[2 * state_rows + r * c.head_dim + d] / got_sum);
            want_rows.push_back(want_acc[r * c.head_dim + d] / want_sum[r]);
          }
        }
        EXPECT_FALSE(want_rows.empty());
        EXPECT_TRUE(close_normalized(got_rows, want_rows, kFp16AttentionTolerance));
      }
    }
  }
}

struct QuantCase {
  const char* model;
  const char* mode;
};

class CudaQuantCacheTest : public ::testing::TestWithParam<QuantCase> {
 protected:
  void SetUp() override {
    SKIP_WITHOUT_CUDA_DEVICE();
    model_ = load_model(GetParam().model);
    if (!model_) GTEST_SKIP() << GetParam().model << " not found (models/" << kSmolLm2 << ")";
  }
  std::string mode() const { return GetParam().mode; }
  std::unique_ptr<Model> model_;
};

TEST_P(CudaQuantCacheTest, DecodeOverImportedArenaMatchesCpu) {
  expect_quant_decode_over_import_matches_cpu(*model_, mode());
}

TEST_P(CudaQuantCacheTest, StepsMatchCpuBytesAndAttention) {
  expect_quant_steps_match_cpu(*model_, mode(), false);
}

TEST_P(CudaQuantCacheTest, StepsWithOutlierChannelMatchCpu) {
  const CacheLayout& layout = layout_for(find_cache_mode(mode()), model_->config());
  if (layout.kv_source != KvSource::kRebuiltFromLatents)
    GTEST_SKIP() << "the outlier channel is kept by the latent layout only";
  expect_quant_steps_match_cpu(*model_, mode(), true);
}

// The materialize modes on an MHA model (kivi attends through its fused
// kernel there).
TEST(CudaCache, MaterializeStepsFollowTheirContext) {
  SKIP_WITHOUT_CUDA_DEVICE();
  auto model = load_model("stories260K");
  for (const char* mode : {"xquant-4", "xquant-cl-3"})
    expect_materialize_steps_follow_their_context(*model, mode);
}

TEST_P(CudaQuantCacheTest, PoolExhaustionChangesNothing) {
  expect_quant_pool_exhaustion_changes_nothing(*model_, mode());
}

TEST_P(CudaQuantCacheTest, ShardStatesMergeToCpuAttend) {
  expect_quant_shards_merge_to_cpu(*model_, mode());
}

class CudaKiviKernelTest : public ::testing::TestWithParam<QuantCase> {
 protected:
  void SetUp() override {
    SKIP_WITHOUT_CUDA_DEVICE();
    model_ = load_model(GetParam().model);
    if (!model_) GTEST_SKIP() << GetParam().model << " not found (models/" << kSmolLm2 << ")";
  }
  std::string mode() const { return GetParam().mode; }
  std::unique_ptr<Model> model_;
};

TEST_P(CudaKiviKernelTest, KernelOverCpuBlocksMatchesAttend) {
  expect_kivi_kernel_matches_cpu(*model_, mode());
}

TEST_P(CudaKiviKernelTest, ShardStatesMatchAttendPartial) {
  expect_kivi_shard_states_match_cpu(*model_, mode());
}

// stories260K: head_dim 8 (one run of 8 codes per head, the whole row one
// V group of 32 channels); SmolLM2: head_dim 64, kv 192 (V rows of a full
// 128-channel group and a 64-channel one; K runs of 4-, 3- and 2-bit codes
// at byte offsets that are and are not aligned to a load's width).
INSTANTIATE_TEST_SUITE_P(
    Modes, CudaKiviKernelTest,
    ::testing::Values(QuantCase{"stories260K", "kivi-4"}, QuantCase{"stories260K", "kivi-3"},
                      QuantCase{"stories260K", "kivi-2"}, QuantCase{"SmolLM2", "kivi-4"},
                      QuantCase{"SmolLM2", "kivi-3"}, QuantCase{"SmolLM2", "kivi-2"}),
    [](const ::testing::TestParamInfo<QuantCase>& info) {
      std::string name = std::string(info.param.model) + "_" + info.param.mode;
      std::replace(name.begin(), name.end(), '-', '_');
      return name;
    });

// Runs everywhere: the fused KIVI kernel's argument checks accept a CPU kivi
// cache's layout and name what is wrong with a broken one.
TEST(CudaCache, KiviKernelChecksItsArguments) {
  auto model = load_model("stories260K");
  const ModelConfig& c = model->config();
  TestCacheSetup setup(c, "kivi-3", 256, 1);
  std::unique_ptr<AttentionCache> cpu = make_cache(*model, setup.options);
  const CacheBlockLayout layout = cpu->block_layout();
  const paged::KiviLayer good = kivi_layer_of(layout, 0);
  const paged::AttentionShape shape = attention_shape_of(c);
  paged::PagedWindow window;
  window.window_tokens = layout.window_tokens;
  paged::AttentionTarget out;
  float dummy = 0.0f;
  out.out = &dummy;
  const paged::SplitPlan plan = paged::plan_splits(256);
  EXPECT_EQ(paged::kivi_unsupported(shape), "");
  EXPECT_NO_THROW(
      paged::kivi_attention_check(window, good, shape, 4, paged::ShardSpec{}, plan, &dummy, out));
  auto rejects = [&](const paged::KiviLayer& layer, const paged::AttentionShape& s,
                     const paged::ShardSpec& shard, const paged::SplitPlan& p, const float* scratch,
                     const paged::AttentionTarget& target, const std::string& words) {
    try {
      paged::kivi_attention_check(window, layer, s, 4, shard, p, scratch, target);
      ADD_FAILURE() << "accepted; expected: " << words;
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(words), std::string::npos) << e.what();
    }
  };
  paged::KiviLayer swapped = good;
  std::swap(swapped.keys, swapped.values);
  rejects(swapped, shape, {}, plan, &dummy, out, "per channel");
  paged::KiviLayer narrow = good;
  narrow.values.width -= 8;
  rejects(narrow, shape, {}, plan, &dummy, out, "wide");
  paged::KiviLayer wrong_bytes = good;
  wrong_bytes.keys.group_code_bytes += 1;
  rejects(wrong_bytes, shape, {}, plan, &dummy, out, "group_code_bytes");
  paged::AttentionShape odd = shape;
  odd.head_dim = 12;
  EXPECT_NE(paged::kivi_unsupported(odd), "");
  rejects(good, odd, {}, plan, &dummy, out, "multiple of 8");
  paged::ShardSpec token_shards;
  token_shards.shards = 2;
  rejects(good, shape, token_shards, plan, &dummy, out, "128-token groups");
  paged::SplitPlan ragged = plan;
  ragged.tokens_per_split = 100;
  rejects(good, shape, {}, ragged, &dummy, out, "whole pool blocks");
  rejects(good, shape, {}, plan, nullptr, out, "scratch");
  paged::AttentionTarget both = out;
  both.state_max = &dummy;
  rejects(good, shape, {}, plan, &dummy, both, "either out");
}

// stories260K (dim = 2 kv_dim): kivi, xquant on X, xquant-cl on deltas of X;
// SmolLM2 (GQA): the latent layouts and CL latent deltas, and kivi.
INSTANTIATE_TEST_SUITE_P(
    Modes, CudaQuantCacheTest,
    ::testing::Values(QuantCase{"stories260K", "kivi-4"}, QuantCase{"stories260K", "kivi-2"},
                      QuantCase{"stories260K", "xquant-4"}, QuantCase{"stories260K", "xquant-2"},
                      QuantCase{"stories260K", "xquant-cl-3"}, QuantCase{"SmolLM2", "xquant-4"},
                      QuantCase{"SmolLM2", "xquant-2"}, QuantCase{"SmolLM2", "kivi-3"},
                      QuantCase{"SmolLM2", "xquant-cl-2"}),
    [](const ::testing::TestParamInfo<QuantCase>& info) {
      std::string name = std::string(info.param.model) + "_" + info.param.mode;
      std::replace(name.begin(), name.end(), '-', '_');
      return name;
    });

// Runs everywhere: the materialize path's dense rows cover the step's
// context, at most doubled (or one 1024-token unit), never beyond the
// capacity, and take few values (the graphs keyed by them are few).
TEST(CudaCache, MaterializeRowsBucketTheContext) {
  EXPECT_EQ(materialize_rows(0, 4096), 0);
  EXPECT_EQ(materialize_rows(1, 4096), 1024);
  EXPECT_EQ(materialize_rows(1024, 4096), 1024);
  EXPECT_EQ(materialize_rows(1025, 4096), 2048);
  EXPECT_EQ(materialize_rows(2049, 4096), 4096);
  EXPECT_EQ(materialize_rows(100, 256), 256);     // a cache shorter than one unit
  EXPECT_EQ(materialize_rows(2049, 3000), 3000);  // the last bucket is the capacity
  EXPECT_EQ(materialize_rows(16384, 32768), 16384);
  EXPECT_EQ(materialize_rows(16385, 32768), 32768);
  for (const int32_t capacity : {256, 1024, 3000, 32768}) {
    std::vector<int32_t> values;
    int32_t previous = 0;
    for (int32_t stored = 1; stored <= capacity; ++stored) {
      const int32_t rows = materialize_rows(stored, capacity);
      ASSERT_GE(rows, stored) << capacity;
      ASSERT_LE(rows, capacity) << stored;
      ASSERT_TRUE(rows == 1024 || rows == capacity || rows < 2 * stored) << stored;
      ASSERT_GE(rows, previous) << stored;
      if (rows != previous) values.push_back(rows);
      previous = rows;
    }
    // 1024, 2048, ... up to the capacity: ceil(log2(capacity / 1024)) + 1.
    const size_t expected = capacity <= 1024 ? 1 : capacity == 3000 ? 3 : 6;
    EXPECT_EQ(values.size(), expected) << capacity;
  }
}

// Each device mode's step key on stories260K, decoding at 301 tokens in a
// cache of 2560: the first bucket (1024) where attention materializes (xquant
// on X and xquant-cl, kivi where its fused kernel refuses the shape), 0 where
// a fused kernel attends (fp16, kivi, latents) and the row count alone
// shapes the step.
TEST(CudaCache, StepShapeKeyIsTheMaterializeRows) {
  SKIP_WITHOUT_CUDA_DEVICE();
  auto model = load_model("stories260K");
  const ModelConfig& c = model->config();
  for (const CacheModeSpec& spec : cache_modes()) {
    const std::string mode(spec.name);
    TestCacheSetup setup(c, mode, 2560, 1);
    cuda::Stream stream;
    cuda::Blas blas(stream);
    std::unique_ptr<DeviceCache> device = make_device_cache(*model, setup.options, stream, blas);
    bool materializes = false;
    if (spec.family != "fp16") {
      const KvSource source = layout_for(spec, c).kv_source;
      materializes = source == KvSource::kRebuiltFromX || source == KvSource::kCrossLayerDeltas ||
                     (source == KvSource::kReadBack &&
                      !paged::kivi_unsupported(attention_shape_of(c)).empty());
    }
    device->fill_with_zeros(0, 300);
    device->begin_step({StepRows{0, 300, 1}});
    EXPECT_EQ(device->step_shape_key(), materializes ? 1024 : 0) << mode;
    device->end_step();
  }
}

// The fp16 cache over one tensor-parallel rank's heads: the layout of the
// CPU's Fp16KvCache over the same local config, and quantized modes refused.
TEST(CudaCache, LocalConfigFp16CacheHasTheCpuLayout) {
  SKIP_WITHOUT_CUDA_DEVICE();
  auto model = load_model("stories260K");
  ModelConfig local = model->config();
  local.n_heads /= 2;
  local.n_kv_heads /= 2;
  TestCacheSetup setup(local, "fp16", 256, 2);
  setup.options.layers = local.n_layers;
  cuda::Stream stream;
  cuda::Blas blas(stream);
  std::unique_ptr<DeviceCache> device = make_device_cache(local, setup.options, stream, blas);
  Fp16KvCache cpu(local, setup.options);
  EXPECT_EQ(device->block_bytes(), cpu.block_bytes());
  EXPECT_EQ(device->total_blocks(), cpu.total_blocks());
  setup.options.mode = "kivi-4";
  try {
    make_device_cache(local, setup.options, stream, blas);
    FAIL() << "a quantized cache split by KV head";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cannot be split by KV head"), std::string::npos)
        << e.what();
  }
}

// The benchmarks' fill: every mode holds the tokens asked for in exactly the
// blocks its CPU twin would, attention over them is zero (zero values), and
// a fill the pool cannot hold changes nothing.
TEST(CudaCache, FillWithZerosHoldsTheBlocksOfItsLength) {
  SKIP_WITHOUT_CUDA_DEVICE();
  auto model = load_model("stories260K");
  const ModelConfig& c = model->config();
  for (const CacheModeSpec& mode : cache_modes()) {
    TestCacheSetup setup(c, std::string(mode.name), 512, 2);
    cuda::Stream stream;
    cuda::Blas blas(stream);
    std::unique_ptr<DeviceCache> device = make_device_cache(*model, setup.options, stream, blas);
    const int32_t free_before = device->free_blocks();
    device->fill_with_zeros(1, 300);
    EXPECT_EQ(device->length(1), 300) << mode.name;
    EXPECT_EQ(free_before - device->free_blocks(), device->blocks_for_tokens(300)) << mode.name;
    // One decode row at position 300 over the zeros (its own row zero too).
    const int64_t q_width = static_cast<int64_t>(c.n_heads) * c.head_dim;
    cuda::DeviceMemory x(sizeof(float) * c.dim), k(sizeof(float) * c.kv_dim()),
        v(sizeof(float) * c.kv_dim()), q(sizeof(float) * q_width), out(sizeof(float) * q_width);
    for (cuda::DeviceMemory* m : {&x, &k, &v}) cuda::fill_zero(m->data(), m->bytes(), stream);
    std::vector<float> query(static_cast<size_t>(q_width), 0.5f);
    cuda::copy_to_device(q.data(), query.data(), q.bytes(), stream);
    device->begin_step({StepRows{1, 300, 1}});
    for (int32_t layer = 0; layer < c.n_layers; ++layer)
      device->run_layer(layer, x.as<float>(), k.as<float>(), v.as<float>(), q.as<float>(),
                        out.as<float>());
    device->end_step();
    std::vector<float> result(static_cast<size_t>(q_width), 1.0f);
    cuda::copy_to_host(result.data(), out.data(), out.bytes(), stream);
    stream.synchronize();
    for (float value : result) ASSERT_EQ(value, 0.0f) << mode.name;
    EXPECT_THROW(device->fill_with_zeros(0, 512 * 64), Error) << "beyond max_tokens";
    const int32_t free_now = device->free_blocks();
    if (device->blocks_for_tokens(512) > free_now) {
      EXPECT_THROW(device->fill_with_zeros(0, 512), PoolExhausted);
      EXPECT_EQ(device->free_blocks(), free_now);
    }
  }
}

// Runs everywhere: every mode of the table is held on the device for both
// kinds of model; an unknown mode is an error.
TEST(CudaCache, EveryModeIsSupported) {
  for (const char* which : {"stories260K", "SmolLM2"}) {
    auto model = load_model(which);
    if (!model) continue;
    TestCacheSetup setup(model->config(), "fp16", 64, 1);
    for (const CacheModeSpec& mode : cache_modes()) {
      setup.options.mode = std::string(mode.name);
      EXPECT_EQ(device_cache_unsupported(*model, setup.options), "") << which << " " << mode.name;
    }
    setup.options.rope_cos_sin = nullptr;
    setup.options.mode = "kivi-2";
    EXPECT_NE(device_cache_unsupported(*model, setup.options), "");
  }
  auto model = load_model("stories260K");
  TestCacheSetup setup(model->config(), "no-such-mode", 64, 1);
  EXPECT_THROW(device_cache_unsupported(*model, setup.options), Error);
}

// Runs only without a device: making a device cache fails with xq::Error
// (from the stream, the handle or the cache), never a crash.
TEST(CudaCache, WithoutDeviceMakeDeviceCacheThrowsXqError) {
  std::string why_not;
  if (cuda::device_available(&why_not))
    GTEST_SKIP() << "a CUDA device is present; this test is for machines without one";
  auto model = load_model("stories260K");
  TestCacheSetup setup(model->config(), "fp16", 64, 1);
  try {
    cuda::Stream stream;
    cuda::Blas blas(stream);
    std::unique_ptr<DeviceCache> cache = make_device_cache(*model, setup.options, stream, blas);
    FAIL() << "made a device cache without a device";
  } catch (const Error& e) {
    EXPECT_FALSE(std::string(e.what()).empty());
  }
}

}  // namespace
}  // namespace xq

#endif  // XQ_HAVE_CUDA
