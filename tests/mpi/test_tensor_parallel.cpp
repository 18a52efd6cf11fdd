// Tensor parallelism (pp = 1) under mpirun: every rank runs the sharded
// forward pass and, in the same process, the single-rank xq::TransformerEngine, both fed
// the same tokens (the reference's greedy choices), and each step's logits are
// held to a bound derived in logit_bounds.h from noise floors measured on the
// reference in the same run; argmaxes must agree where the reference's margin
// exceeds twice the bound. Every rank must also end with the same bits as
// rank 0. No step needs equal tokens where rounding alone can flip them: a
// free-running comparison would turn one rounding difference into a different
// sequence, which depends on the instruction set the compiler and OpenBLAS
// pick (mpi.worker_tp1_pp2 keeps a free-running check where the results are
// equal by construction).
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "kernels/cpu/matmul.h"
#include "kernels/error.h"
#include "parallel/grid.h"
#include "runtime/engine.h"
#include "runtime/sampler.h"
#include "runtime/shard.h"
#include "tests/mpi/logit_bounds.h"
#include "tests/mpi/mpi_test_env.h"
#include "tests/test_util.h"

namespace xq::parallel {
namespace {

using cpu::MatmulPath;
using testing::forced_rows;
using testing::LogitComparison;
using testing::max_of;
using testing::row_diffs;
using testing::same_as_rank0;

void print_weight_bytes(const char* name, const Model& model, const TransformerEngine& tp) {
  long long mine = static_cast<long long>(tp.weight_bytes());
  std::vector<long long> all(static_cast<size_t>(testing::world_size()));
  MPI_Gather(&mine, 1, MPI_LONG_LONG, all.data(), 1, MPI_LONG_LONG, 0, MPI_COMM_WORLD);
  if (testing::world_rank() != 0) return;
  std::printf("%s tp=%d: single-rank weight bytes %zu; per rank:", name, testing::world_size(),
              model.weight_bytes());
  for (long long b : all) std::printf(" %lld", b);
  const TpShard& s = tp.shard();
  std::printf(" (rank 0: heads %lld+%lld, KV heads %lld+%lld, FFN %lld+%lld)\n",
              static_cast<long long>(s.heads.begin), static_cast<long long>(s.heads.count),
              static_cast<long long>(s.kv_heads.begin), static_cast<long long>(s.kv_heads.count),
              static_cast<long long>(s.ffn.begin), static_cast<long long>(s.ffn.count));
  std::fflush(stdout);
}

// stories260K (fp32 weights, so decode keeps fp32 activations), every cache
// mode (at tp 2), three prompts of 64 teacher-forced steps. fp16: the fp32 bound; a
// quantized cache: its own rounding noise at the step plus kRedraws times
// its largest (logit_bounds.h).
TEST(TensorParallel, Stories260KTeacherForcedWithinBounds) {
  const std::string path = testing::shared_path("models/stories260K.bin");
  if (!testing::file_exists(path)) GTEST_SKIP() << path << " is absent";
  auto model = Model::load(path);
  const int32_t vocab = model->config().vocab_size;
  EngineOptions options;
  options.threads = 1;
  options.max_tokens = 160;
  options.sequences = 3;
  Grid grid(testing::world_size(), 1);
  const std::vector<std::string> prompts = {
      "Once upon a time",
      "Lily and Ben went to the park. They saw a big dog and a small cat playing with a red ball "
      "near the pond.",  // more than 8 tokens: the prefill (sgemm) paths
      "The little bird"};
  const int steps = 64;
  // The tokens (the fp16 reference's greedy steps) and, per prompt, the fp32
  // bound from the reference's int8 noise floor E.
  std::vector<std::vector<int32_t>> tokens;
  std::vector<int32_t> prompt_sizes;
  std::vector<float> fp32_bounds;
  {
    TransformerEngine greedy(*model, options), floors(*model, options);
    for (int32_t p = 0; p < static_cast<int32_t>(prompts.size()); ++p) {
      const std::vector<int32_t> prompt = model->tokenizer().encode(prompts[p], true);
      tokens.push_back(testing::greedy_tokens(greedy, p, prompt, steps));
      prompt_sizes.push_back(static_cast<int32_t>(prompt.size()));
      floors.truncate(0, 0);
      floors.truncate(1, 0);
      fp32_bounds.push_back(testing::fp32_bound(
          testing::int8_noise_floor(floors, 0, tokens.back(), prompt_sizes.back())));
    }
  }
  std::vector<std::vector<float>> fp16_rows;  // the reference's, per prompt
  // Every mode at tp 2; one of each kind at other sizes: with 4 ranks on 2
  // busy cores every collective waits for a time slice, and every mode runs
  // through the worker at tp 4 anyway (mpi.worker_tp4_pp1).
  std::vector<std::string> modes = {"fp16", "kivi-4", "xquant-4", "xquant-cl-3"};
  if (grid.tp() == 2)
    modes = {"fp16",     "kivi-4",   "kivi-3",      "kivi-2",      "xquant-8",   "xquant-4",
             "xquant-3", "xquant-2", "xquant-cl-4", "xquant-cl-3", "xquant-cl-2"};
  for (const std::string& mode : modes) {
    options.cache_mode = mode;
    TransformerEngine reference(*model, options);
    TransformerEngine tp(*model, options, grid.tp_group());
    if (mode == "fp16") print_weight_bytes("stories260K", *model, tp);
    for (int32_t p = 0; p < static_cast<int32_t>(prompts.size()); ++p) {
      const std::vector<int32_t>& all = tokens[static_cast<size_t>(p)];
      const int32_t n0 = prompt_sizes[static_cast<size_t>(p)];
      const float fp32_bound = fp32_bounds[static_cast<size_t>(p)];
      const std::vector<float> ref = forced_rows(reference, p, all, n0, vocab, MatmulPath::kAuto);
      const std::vector<float> ours = forced_rows(tp, p, all, n0, vocab, MatmulPath::kAuto);
      if (mode == "fp16") fp16_rows.push_back(ref);
      // The reference's cache rounding noise per step (0 for fp16).
      const std::vector<float> own = row_diffs(ref, fp16_rows[static_cast<size_t>(p)], vocab);
      const float largest = max_of(own);
      LogitComparison c("stories260K tp=" + std::to_string(grid.tp()) + " " + mode + " prompt " +
                        std::to_string(p));
      for (size_t s = 0; s < own.size(); ++s)
        c.add(static_cast<int>(s), &ref[s * vocab], &ours[s * vocab], vocab,
              own[s] + testing::kRedraws * largest + fp32_bound);
      EXPECT_TRUE(c.ok());
      const std::vector<float> last(ours.end() - vocab, ours.end());
      EXPECT_TRUE(same_as_rank0(last))
          << mode << " prompt " << p << ": logits differ from rank 0's";
      char floors[120];
      std::snprintf(floors, sizeof floors, " (fp32 bound %.3g, cache noise floor %.3g)", fp32_bound,
                    largest);
      testing::print_rank0(c.summary() + floors);
    }
    EXPECT_EQ(tp.length(0), reference.cache().length(0)) << mode;
  }
}

// SmolLM2 (Q4_1 weights, Q8_0 output): decode multiplies with int8
// activations; see expect_int8_decode_within_bounds (logit_bounds.h).
TEST(TensorParallel, SmolLM2TeacherForcedWithinBounds) {
  const std::string path = testing::models_path("SmolLM2-135M-Instruct.Q4_1.gguf");
  if (!testing::file_exists(path)) GTEST_SKIP() << path << " is absent";
  auto model = Model::load(path);
  EngineOptions options;
  options.threads = 1;
  options.max_tokens = 64;
  options.sequences = 4;
  Grid grid(testing::world_size(), 1);
  for (const std::string text :
       {"The capital of France is a city where", "Once upon a time, in a small village,"}) {
    TransformerEngine reference(*model, options);
    TransformerEngine tp(*model, options, grid.tp_group());
    if (text[0] == 'T') print_weight_bytes("SmolLM2-135M Q4_1", *model, tp);
    testing::expect_int8_decode_within_bounds(
        reference, tp, model->tokenizer().encode(text, true), 16,
        "SmolLM2 tp=" + std::to_string(grid.tp()) + " '" + text + "'");
  }
}

TEST(TensorParallel, RefusesUnknownCacheModesAndUnalignedSlices) {
  const std::string path = testing::shared_path("models/stories260K.bin");
  if (!testing::file_exists(path)) GTEST_SKIP() << path << " is absent";
  auto model = Model::load(path);
  EngineOptions options;
  options.max_tokens = 16;
  options.cache_mode = "kivi-5";  // no such width
  Grid grid(testing::world_size(), 1);
  try {
    TransformerEngine tp(*model, options, grid.tp_group());
    ADD_FAILURE() << "no error for --cache kivi-5";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("kivi takes 4, 3, 2 bits"), std::string::npos) << e.what();
  }
  // A Q4_1 matrix cut inside a 32-column block.
  WeightMatrix q{TensorType::kQ4_1, nullptr, 4, 128, 4 * 20};  // 20-byte blocks of 32
  EXPECT_THROW(column_slice(q, 16, 64), Error);
  EXPECT_THROW(column_slice(q, 32, 48), Error);
  const WeightMatrix ok = column_slice(q, 64, 64);
  EXPECT_EQ(ok.cols, 64);
  EXPECT_EQ(ok.row_bytes, 4u * 20u);
  EXPECT_EQ(slice_bytes(ok), 4u * 2u * 20u);
}

TEST(TensorParallel, HeadsKvHeadsAndFfnAssignment) {
  const std::string path = testing::models_path("SmolLM2-135M-Instruct.Q4_1.gguf");
  if (!testing::file_exists(path)) GTEST_SKIP() << path << " is absent";
  auto model = Model::load(path);
  // 9 heads, 3 KV heads (groups of 3), FFN 1536 = 48 blocks of 32.
  auto r = [](int64_t b, int64_t c) { return Range{b, c}; };
  TpShard s = plan_shard(*model, 2, 0);
  EXPECT_EQ(s.heads, r(0, 5));
  EXPECT_EQ(s.kv_heads, r(0, 2));
  EXPECT_EQ(s.ffn, r(0, 768));
  s = plan_shard(*model, 2, 1);
  EXPECT_EQ(s.heads, r(5, 4));
  EXPECT_EQ(s.kv_heads, r(1, 2));  // head 5 reads KV head 1: replicated with rank 0
  s = plan_shard(*model, 4, 1);
  EXPECT_EQ(s.heads, r(3, 2));
  EXPECT_EQ(s.kv_heads, r(1, 1));
  EXPECT_EQ(s.ffn, r(384, 384));
  s = plan_shard(*model, 4, 2);
  EXPECT_EQ(s.heads, r(5, 2));
  EXPECT_EQ(s.kv_heads, r(1, 2));
  EXPECT_THROW(plan_shard(*model, 10, 0), Error);  // more ranks than heads
}

}  // namespace
}  // namespace xq::parallel
