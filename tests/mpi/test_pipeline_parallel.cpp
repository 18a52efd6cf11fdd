// Pipeline parallelism (TP inside each stage) under mpirun, started with
// --grid TPxPP: every rank runs the pipelined forward pass and, in the same
// process, the single-rank xq::TransformerEngine, both fed the same tokens, and each
// step's logits are held to the bounds of logit_bounds.h (derived from noise
// floors the reference measures in the same run), whatever the micro-batch
// size; argmaxes must agree where the reference's margin exceeds twice the
// bound, and every rank must return the same logits bits as rank 0.
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "kernels/error.h"
#include "parallel/grid.h"
#include "parallel/pipeline_engine.h"
#include "runtime/engine.h"
#include "runtime/sampler.h"
#include "tests/mpi/logit_bounds.h"
#include "tests/mpi/mpi_test_env.h"
#include "tests/test_util.h"

namespace xq::parallel {
namespace {

using cpu::MatmulPath;
using testing::forced_rows;
using testing::LogitComparison;
using testing::same_as_rank0;

// This rank's cache must hold its stage's layers and its TP share of KV heads
// only: the single-rank bytes scaled by both fractions.
void expect_stage_cache_bytes(const Model& model, TransformerEngine& reference,
                              const PipelineEngine& pp) {
  const ModelConfig& c = model.config();
  const size_t per_layer_head =
      reference.cache().bytes_in_use() / static_cast<size_t>(c.n_layers * c.n_kv_heads);
  const size_t want = per_layer_head * static_cast<size_t>(pp.layers().count) *
                      static_cast<size_t>(pp.stage_engine().shard().kv_heads.count);
  EXPECT_EQ(pp.cache_bytes_in_use(), want)
      << "layers [" << pp.layers().begin << ", " << pp.layers().end() << ")";
  long long mine = static_cast<long long>(pp.cache_bytes_in_use());
  std::vector<long long> all(static_cast<size_t>(testing::world_size()));
  MPI_Gather(&mine, 1, MPI_LONG_LONG, all.data(), 1, MPI_LONG_LONG, 0, MPI_COMM_WORLD);
  if (testing::world_rank() != 0) return;
  std::printf("kv cache bytes: single rank %zu; per rank:", reference.cache().bytes_in_use());
  for (long long b : all) std::printf(" %lld", b);
  std::printf("\n");
  std::fflush(stdout);
}

EngineOptions stories_options() {
  EngineOptions options;
  options.threads = 1;
  options.max_tokens = 160;
  options.sequences = 3;
  return options;
}

// stories260K (fp32 weights, fp16 cache), three prompts of 64 teacher-forced
// steps within the fp32 bound.
TEST(PipelineParallel, Stories260KTeacherForcedWithinBounds) {
  const std::string path = testing::shared_path("models/stories260K.bin");
  if (!testing::file_exists(path)) GTEST_SKIP() << path << " is absent";
  auto model = Model::load(path);
  const int32_t vocab = model->config().vocab_size;
  const EngineOptions options = stories_options();
  TransformerEngine reference(*model, options), greedy(*model, options), floors(*model, options);
  Grid grid(testing::grid_tp(), testing::grid_pp());
  PipelineEngine pp(*model, options, grid);
  const std::vector<std::string> prompts = {
      "Once upon a time",
      "Lily and Ben went to the park. They saw a big dog and a small cat playing with a red ball "
      "near the pond.",
      "The little bird"};
  for (int32_t p = 0; p < static_cast<int32_t>(prompts.size()); ++p) {
    const std::vector<int32_t> prompt = model->tokenizer().encode(prompts[p], true);
    const int32_t n0 = static_cast<int32_t>(prompt.size());
    const std::vector<int32_t> all = testing::greedy_tokens(greedy, p, prompt, 64);
    floors.truncate(0, 0);
    floors.truncate(1, 0);
    const float bound = testing::fp32_bound(testing::int8_noise_floor(floors, 0, all, n0));
    const std::vector<float> ref = forced_rows(reference, p, all, n0, vocab, MatmulPath::kAuto);
    const std::vector<float> ours = forced_rows(pp, p, all, n0, vocab, MatmulPath::kAuto);
    LogitComparison c("stories260K tp=" + std::to_string(grid.tp()) +
                      " pp=" + std::to_string(grid.pp()) + " prompt " + std::to_string(p));
    c.add_rows(ref, ours, vocab, bound);
    EXPECT_TRUE(c.ok());
    const std::vector<float> last(ours.end() - vocab, ours.end());
    EXPECT_TRUE(same_as_rank0(last)) << "prompt " << p << ": logits differ from rank 0's";
    testing::print_rank0(c.summary() + " (fp32 bound " + std::to_string(bound) + ")");
  }
  EXPECT_EQ(pp.length(0), reference.cache().length(0));
  expect_stage_cache_bytes(*model, reference, pp);
}

// A 41-token prompt in micro-batches of 1, 7 (six of 7 and one of 6) and 64
// (one), balanced and with an uneven split: every row's logits near the
// reference's and near each other's, the same argmaxes, then a few greedy
// steps equal.
TEST(PipelineParallel, Stories260KMicroBatchSizeDoesNotChangeResult) {
  const std::string path = testing::shared_path("models/stories260K.bin");
  if (!testing::file_exists(path)) GTEST_SKIP() << path << " is absent";
  auto model = Model::load(path);
  const int32_t vocab = model->config().vocab_size;
  const int64_t n_layers = model->config().n_layers;
  const EngineOptions options = stories_options();
  Grid grid(testing::grid_tp(), testing::grid_pp());
  std::vector<int32_t> prompt = model->tokenizer().encode(
      "Lily and Ben went to the park. They saw a big dog and a small cat playing with a red ball "
      "near the pond. The dog ran to the cat and the cat ran up a tree. Lily laughed.",
      true);
  ASSERT_GE(prompt.size(), 41u);
  prompt.resize(41);
  const int32_t n = 41;
  TransformerEngine reference(*model, options);
  std::vector<float> ref(static_cast<size_t>(n) * vocab);
  reference.forward(0, prompt.data(), n, 0, ref.data(), 0);
  // The fp32 bound from the reference's int8 noise floor over the prompt and
  // 8 greedy steps (logit_bounds.h).
  float bound = 0;
  {
    TransformerEngine greedy(*model, options), floors(*model, options);
    const std::vector<int32_t> all = testing::greedy_tokens(greedy, 0, prompt, 8);
    bound = testing::fp32_bound(testing::int8_noise_floor(floors, 0, all, n));
  }

  std::vector<int64_t> uneven;  // the last stage gets one layer, stage 0 the rest
  if (grid.pp() > 1 && n_layers >= grid.pp()) {
    uneven.assign(static_cast<size_t>(grid.pp()), 1);
    uneven[0] = n_layers - (grid.pp() - 1);
  }
  std::vector<float> m64;
  for (const auto& [m, counts] : std::vector<std::pair<int32_t, std::vector<int64_t>>>{
           {64, {}}, {7, {}}, {1, {}}, {7, uneven}}) {
    PipelineOptions po;
    po.micro_batch = m;
    po.stage_layer_counts = counts;
    PipelineEngine pp(*model, options, grid, po);
    std::vector<float> rows(ref.size());
    pp.forward(0, prompt.data(), n, 0, rows.data(), 0);
    const std::string what = "M = " + std::to_string(m) + (counts.empty() ? "" : " uneven");
    LogitComparison vs_reference(what + " prefill vs the single rank");
    vs_reference.add_rows(ref, rows, vocab, bound);
    EXPECT_TRUE(vs_reference.ok());
    const float worst = vs_reference.worst();
    float vs64 = 0;
    if (m64.empty()) {
      m64 = rows;
    } else {
      LogitComparison c(what + " prefill vs M = 64");
      c.add_rows(m64, rows, vocab, bound);
      EXPECT_TRUE(c.ok());
      vs64 = c.worst();
    }
    EXPECT_TRUE(same_as_rank0(rows)) << what;
    // Decode goes on from the micro-batched cache.
    TransformerEngine ref_decode(*model, options);
    ref_decode.forward(0, prompt.data(), n, 0, nullptr, n);
    std::vector<float> a(vocab), b(vocab);
    int32_t token = argmax(&ref[static_cast<size_t>(n - 1) * vocab], vocab);
    LogitComparison decode(what + " decode after the micro-batched prefill");
    for (int32_t pos = n; pos < n + 8; ++pos) {
      ref_decode.forward(0, &token, 1, pos, a.data(), 0);
      pp.forward(0, &token, 1, pos, b.data(), 0);
      decode.add(pos - n, a.data(), b.data(), vocab, bound);
      token = argmax(a.data(), vocab);
    }
    EXPECT_TRUE(decode.ok());
    if (testing::world_rank() == 0)
      std::printf(
          "stories260K tp=%d pp=%d %s (layers of stage 0: %lld): 41-token prefill vs "
          "single rank %.3g, vs M = 64 %.3g (fp32 bound %.3g)\n",
          grid.tp(), grid.pp(), what.c_str(),
          static_cast<long long>(stage_layers(n_layers, grid.pp(), counts).front().count), worst,
          vs64, bound);
  }
}

// SmolLM2 (Q4_1) at tp = 1 only (time): expect_int8_decode_within_bounds
// (logit_bounds.h) with micro-batches of 13 tokens, so that its 25-token
// prefill runs as two micro-batches of more than 8 rows (fewer take the
// int8-activation decode path, see pipeline_engine.h).
TEST(PipelineParallel, SmolLM2TeacherForcedWithinBounds) {
  const std::string path = testing::models_path("SmolLM2-135M-Instruct.Q4_1.gguf");
  if (!testing::file_exists(path)) GTEST_SKIP() << path << " is absent";
  if (testing::grid_tp() != 1) GTEST_SKIP() << "run at tp = 1 only";
  auto model = Model::load(path);
  EngineOptions options;
  options.threads = 1;
  options.max_tokens = 64;
  options.sequences = 4;
  TransformerEngine reference(*model, options);
  Grid grid(testing::grid_tp(), testing::grid_pp());
  PipelineOptions po;
  po.micro_batch = 13;
  PipelineEngine pp(*model, options, grid, po);
  const std::vector<int32_t> prompt =
      model->tokenizer().encode("The capital of France is a city where", true);
  ASSERT_GT(prompt.size() + 16, 2u * 9);
  testing::expect_int8_decode_within_bounds(
      reference, pp, prompt, 16,
      "SmolLM2 tp=" + std::to_string(grid.tp()) + " pp=" + std::to_string(grid.pp()));
}

TEST(PipelineParallel, RefusesUnknownCacheModesAndBadOptions) {
  const std::string path = testing::shared_path("models/stories260K.bin");
  if (!testing::file_exists(path)) GTEST_SKIP() << path << " is absent";
  auto model = Model::load(path);
  EngineOptions options;
  options.max_tokens = 16;
  options.cache_mode = "kivi-5";  // no such width
  Grid grid(testing::grid_tp(), testing::grid_pp());
  try {
    PipelineEngine pp(*model, options, grid);
    ADD_FAILURE() << "no error for --cache kivi-5";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("kivi takes 4, 3, 2 bits"), std::string::npos) << e.what();
  }
  options.cache_mode = "fp16";
  PipelineOptions po;
  po.micro_batch = 0;
  EXPECT_THROW(PipelineEngine(*model, options, grid, po), Error);
  po.micro_batch = 8;
  po.stage_layer_counts.assign(static_cast<size_t>(grid.pp()), 0);  // empty stages
  EXPECT_THROW(PipelineEngine(*model, options, grid, po), Error);
}

// Batched steps through the pipeline: three sequences, one joining late with
// a two-chunk prefill while the others decode, as the scheduler mixes them.
// The pipeline cuts each step into micro-batches of whole segments; the
// single rank runs the same steps in one batch. At tp 1 the kernels treat
// every row alone, so the logits must be the same bits; at tp > 1 the TP sums
// differ in order and the fp32 bound applies (logit_bounds.h). Every rank
// must return rank 0's bits.
TEST(PipelineParallel, Stories260KBatchedStepsMatchTheSingleRank) {
  const std::string path = testing::shared_path("models/stories260K.bin");
  if (!testing::file_exists(path)) GTEST_SKIP() << path << " is absent";
  auto model = Model::load(path);
  const int32_t vocab = model->config().vocab_size;
  EngineOptions options = stories_options();
  options.max_tokens = 320;
  TransformerEngine reference(*model, options);
  Grid grid(testing::grid_tp(), testing::grid_pp());
  PipelineOptions pipeline;
  pipeline.micro_batch = 16;
  PipelineEngine pp(*model, options, grid, pipeline);
  std::vector<std::vector<int32_t>> prompts(3);
  const int32_t lengths[3] = {150, 40, 230};
  for (int32_t s = 0; s < 3; ++s)
    for (int32_t i = 0; i < lengths[s]; ++i)
      prompts[s].push_back(1 + (i * 37 + s * 101) % (vocab - 1));
  std::vector<int32_t> position(3, 0), last(3, 1);
  std::vector<float> ref(3 * static_cast<size_t>(vocab)), ours(ref.size());
  float worst = 0;
  const float bound = grid.tp() == 1 ? 0.0f : 0.0854f;  // E / 4 with mpi.tp2's E for stories260K
  for (int step = 0; step < 8; ++step) {
    std::vector<Segment> segments;
    for (int32_t s = 0; s < 3; ++s) {
      if (s == 2 && step < 2) continue;
      Segment seg{s, position[s], nullptr, 1, true};
      const int32_t len = lengths[s];
      if (position[s] < len) {
        const int32_t end = (s == 2 && position[s] == 0) ? 128 : len;
        seg.tokens = prompts[s].data() + position[s];
        seg.n = end - position[s];
        seg.wants_logits = end == len;
      } else {
        seg.tokens = &last[s];
      }
      segments.push_back(seg);
    }
    reference.forward_batch(segments, ref.data());
    pp.forward_batch(segments, ours.data());
    size_t row = 0;
    for (const Segment& seg : segments) {
      position[seg.seq] += seg.n;
      if (!seg.wants_logits) continue;
      const float* a = ref.data() + row * vocab;
      const float* b = ours.data() + row * vocab;
      for (int32_t v = 0; v < vocab; ++v) worst = std::max(worst, std::abs(a[v] - b[v]));
      last[seg.seq] = argmax(a, vocab);
      ++row;
    }
    const std::vector<float> mine(ours.begin(), ours.begin() + static_cast<ptrdiff_t>(row) * vocab);
    EXPECT_TRUE(same_as_rank0(mine)) << "step " << step << ": logits differ from rank 0's";
  }
  EXPECT_LE(worst, bound) << "tp " << grid.tp() << " pp " << grid.pp();
  testing::print_rank0("batched steps: largest logit difference vs the single rank " +
                       std::to_string(worst) + " (bound " + std::to_string(bound) + ")");
  for (int32_t s = 0; s < 3; ++s) pp.release(s);
  EXPECT_EQ(pp.cache_bytes_in_use(), 0u);
}

}  // namespace
}  // namespace xq::parallel
