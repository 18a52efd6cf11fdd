// Tensor parallelism (pp = 1) under mpirun: every rank runs the sharded
// forward pass and, in the same process, the single-rank xq::TransformerEngine; greedy
// tokens must be equal and logits within a small tolerance (the partial sums
// of Wo and down are added across ranks, so only the summation order
// differs). Every rank must also end with the same bits as rank 0.
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "kernels/error.h"
#include "parallel/grid.h"
#include "runtime/engine.h"
#include "runtime/sampler.h"
#include "runtime/shard.h"
#include "tests/mpi/mpi_test_env.h"
#include "tests/test_util.h"

namespace xq::parallel {
namespace {

using testing::same_as_rank0;

struct Outcome {
  std::vector<int32_t> tp_tokens, reference_tokens;
  std::vector<float> last_logits;  // TP engine's, at the last position
  float worst = 0, last_worst = 0;
  std::string near_ties;                // the steps where the argmaxes differ
  std::vector<float> mismatch_margins;  // the reference's top-2 margin there
};

// Prefills the prompt into both engines, then `steps` greedy steps fed with the
// reference's token (so every step's logits are comparable), recording both
// argmaxes.
Outcome run_greedy(const Model& model, TransformerEngine& reference, TransformerEngine& tp,
                   int32_t seq, const std::vector<int32_t>& prompt, int steps) {
  const int32_t vocab = model.config().vocab_size;
  const int32_t n = static_cast<int32_t>(prompt.size());
  std::vector<float> ref(vocab), ours(vocab);
  reference.forward(seq, prompt.data(), n, 0, ref.data(), n - 1);
  tp.forward(seq, prompt.data(), n, 0, ours.data(), n - 1);
  Outcome o;
  for (int step = 0;; ++step) {
    float worst = 0;
    for (int32_t v = 0; v < vocab; ++v) worst = std::max(worst, std::abs(ours[v] - ref[v]));
    o.worst = std::max(o.worst, worst);
    o.last_worst = worst;
    const int32_t want = argmax(ref.data(), vocab), got = argmax(ours.data(), vocab);
    if (want != got) o.mismatch_margins.push_back(top2_margin(ref.data(), vocab));
    if (want != got)
      o.near_ties += " step " + std::to_string(step) + ": reference " + std::to_string(want) +
                     " (top-2 margin " + std::to_string(top2_margin(ref.data(), vocab)) + "), tp " +
                     std::to_string(got) + ";";
    if (step == steps) break;
    o.reference_tokens.push_back(want);
    o.tp_tokens.push_back(got);
    const int32_t pos = n + step;
    reference.forward(seq, &want, 1, pos, ref.data(), 0);
    tp.forward(seq, &want, 1, pos, ours.data(), 0);
  }
  o.last_logits = ours;
  return o;
}

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

TEST(TensorParallel, Stories260KGreedyTokensEqualSingleRank) {
  const std::string path = testing::shared_path("models/stories260K.bin");
  if (!testing::file_exists(path)) GTEST_SKIP() << path << " is absent";
  auto model = Model::load(path);
  EngineOptions options;
  options.threads = 1;
  options.max_tokens = 160;
  options.sequences = 3;
  TransformerEngine reference(*model, options);
  Grid grid(testing::world_size(), 1);
  TransformerEngine tp(*model, options, grid.tp_group());
  print_weight_bytes("stories260K", *model, tp);
  const std::vector<std::string> prompts = {
      "Once upon a time",
      "Lily and Ben went to the park. They saw a big dog and a small cat playing with a red ball "
      "near the pond.",  // more than 16 tokens: the prefill (sgemm) paths
      "The little bird"};
  for (int32_t p = 0; p < static_cast<int32_t>(prompts.size()); ++p) {
    const std::vector<int32_t> prompt = model->tokenizer().encode(prompts[p], true);
    const Outcome o = run_greedy(*model, reference, tp, p, prompt, 64);
    EXPECT_EQ(o.tp_tokens, o.reference_tokens) << "prompt " << p << ":" << o.near_ties;
    // fp32 weights and activations: summation order only, which now and then
    // moves a K or V value across an fp16 rounding boundary of the cache
    // (measured up to 6e-3 over 64 steps).
    EXPECT_LT(o.worst, 2e-2f) << "prompt " << p << ": largest logit difference over all steps";
    EXPECT_LT(o.last_worst, 2e-2f) << "prompt " << p << ": at the last position";
    EXPECT_TRUE(same_as_rank0(o.tp_tokens)) << "prompt " << p;
    EXPECT_TRUE(same_as_rank0(o.last_logits)) << "prompt " << p << ": logits differ from rank 0's";
    if (testing::world_rank() == 0)
      std::printf(
          "stories260K tp=%d prompt %d (%zu tokens): 64 greedy tokens, largest logit "
          "difference %.3g (last position %.3g)\n",
          testing::world_size(), p, prompt.size(), o.worst, o.last_worst);
  }
  EXPECT_EQ(tp.length(0), reference.cache().length(0));
}

// SmolLM2 (Q4_1). Decode multiplies with int8 activations per 32-block, which
// the block-aligned column split keeps, but a last-bit difference in the
// residual (summation order) moves some activations across an int8 rounding
// boundary, and 30 layers spread that: the single-rank engine's own decode
// logits differ from its fp32-activation prefill by ~0.4-0.9 (max over the
// vocabulary), and the TP engine's by as much. So the exact check is on the
// prefill path (fp32 activations: every row's argmax and logits within 2e-2),
// and decode is checked (a) no further from the fp32 prefill than the
// single-rank decode is, with some slack, and (b) greedy tokens equal except
// at near ties of the reference (top-1 minus top-2 < 0.1), which are printed.
TEST(TensorParallel, SmolLM2GreedyTokensEqualSingleRank) {
  const std::string path = testing::models_path("SmolLM2-135M-Instruct.Q4_1.gguf");
  if (!testing::file_exists(path)) GTEST_SKIP() << path << " is absent";
  auto model = Model::load(path);
  const int32_t vocab = model->config().vocab_size;
  EngineOptions options;
  options.threads = 1;
  options.max_tokens = 64;
  options.sequences = 2;
  TransformerEngine reference(*model, options);
  Grid grid(testing::world_size(), 1);
  TransformerEngine tp(*model, options, grid.tp_group());
  print_weight_bytes("SmolLM2-135M Q4_1", *model, tp);
  const std::vector<int32_t> prompt =
      model->tokenizer().encode("The capital of France is a city where", true);
  const int steps = 16;
  // Decode (sequence 0), fed with the reference's greedy tokens.
  const Outcome o = run_greedy(*model, reference, tp, 0, prompt, steps);
  std::vector<int32_t> all = prompt;
  all.insert(all.end(), o.reference_tokens.begin(), o.reference_tokens.end());
  const int32_t n = static_cast<int32_t>(all.size());

  // Prefill of all n tokens (sequence 1), every row scored.
  std::vector<float> ref_rows(static_cast<size_t>(n) * vocab), tp_rows(ref_rows.size());
  reference.forward(1, all.data(), n, 0, ref_rows.data(), 0);
  tp.forward(1, all.data(), n, 0, tp_rows.data(), 0);
  float prefill_worst = 0;
  std::string prefill_ties;
  for (int32_t i = 0; i < n; ++i) {
    const float* a = ref_rows.data() + static_cast<size_t>(i) * vocab;
    const float* b = tp_rows.data() + static_cast<size_t>(i) * vocab;
    for (int32_t v = 0; v < vocab; ++v)
      prefill_worst = std::max(prefill_worst, std::abs(a[v] - b[v]));
    if (argmax(a, vocab) != argmax(b, vocab))
      prefill_ties +=
          " row " + std::to_string(i) + " (margin " + std::to_string(top2_margin(a, vocab)) + ");";
  }
  EXPECT_LT(prefill_worst, 2e-2f) << "prefill: largest logit difference";
  EXPECT_TRUE(prefill_ties.empty()) << "prefill argmax differs at" << prefill_ties;

  // Decode against the fp32 prefill rows (the same tokens at the same positions).
  TransformerEngine ref_decode(*model, options);
  TransformerEngine tp_decode(*model, options, grid.tp_group());
  const int32_t n0 = static_cast<int32_t>(prompt.size());
  ref_decode.forward(0, all.data(), n0, 0, nullptr, n0);
  tp_decode.forward(0, all.data(), n0, 0, nullptr, n0);
  std::vector<float> a(vocab), b(vocab);
  float ref_noise = 0, tp_noise = 0;
  for (int32_t p = n0; p < n; ++p) {
    ref_decode.forward(0, &all[p], 1, p, a.data(), 0);
    tp_decode.forward(0, &all[p], 1, p, b.data(), 0);
    const float* truth = ref_rows.data() + static_cast<size_t>(p) * vocab;
    for (int32_t v = 0; v < vocab; ++v) {
      ref_noise = std::max(ref_noise, std::abs(a[v] - truth[v]));
      tp_noise = std::max(tp_noise, std::abs(b[v] - truth[v]));
    }
  }
  EXPECT_LT(tp_noise, 1.5f * ref_noise + 0.1f) << "decode is further from the fp32 prefill on "
                                               << testing::world_size() << " ranks than on one";

  // Greedy tokens: equal, or differing only at a near tie of the reference.
  const int ties = static_cast<int>(o.mismatch_margins.size());
  for (float margin : o.mismatch_margins)
    EXPECT_LT(margin, 0.1f) << "a greedy token differs where the reference is not near a tie:"
                            << o.near_ties;
  EXPECT_TRUE(same_as_rank0(o.tp_tokens));
  EXPECT_TRUE(same_as_rank0(o.last_logits)) << "logits differ from rank 0's";
  if (testing::world_rank() == 0) {
    std::printf(
        "SmolLM2 tp=%d (%zu prompt tokens): prefill of %d tokens: largest logit "
        "difference %.3g; %d greedy decode steps: %d tokens differ%s; largest logit "
        "difference %.3g; decode vs fp32 prefill: single rank %.3g, tp %.3g\n",
        testing::world_size(), prompt.size(), n, prefill_worst, steps, ties, o.near_ties.c_str(),
        o.worst, ref_noise, tp_noise);
    std::fflush(stdout);
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
