// The KL-divergence yardstick (runtime/logit_comparison.h): the per-row
// divergence against a plain double-precision formula, what top-k saving does
// to it, a run compared with itself (exactly 0), the paired NLL difference
// against the two perplexities it pairs, and the file checks.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <vector>

#include "kernels/error.h"
#include "runtime/engine.h"
#include "runtime/logit_comparison.h"
#include "runtime/perplexity.h"
#include "test_util.h"

namespace xq {
namespace {

double log_normalizer_of(const std::vector<float>& logits) {
  double max = logits[0], sum = 0;
  for (float l : logits) max = std::max(max, static_cast<double>(l));
  for (float l : logits) sum += std::exp(l - max);
  return std::log(sum) + max;
}

// KL(P || Q) in double from the logits themselves: the reference formula.
double plain_kl(const std::vector<float>& p_logits, const std::vector<float>& q_logits) {
  const double lp = log_normalizer_of(p_logits), lq = log_normalizer_of(q_logits);
  double kl = 0;
  for (size_t v = 0; v < p_logits.size(); ++v) {
    const double log_p = p_logits[v] - lp, log_q = q_logits[v] - lq;
    kl += std::exp(log_p) * (log_p - log_q);
  }
  return kl;
}

// A peaked random distribution (logits with a few large values, as a
// language model's) and a perturbed copy of it.
std::pair<std::vector<float>, std::vector<float>> logit_pair(int32_t vocab, float noise,
                                                             uint32_t seed) {
  std::mt19937 random(seed);
  std::normal_distribution<float> normal(0, 1);
  std::vector<float> p(vocab), q(vocab);
  for (int32_t v = 0; v < vocab; ++v) {
    p[v] = 2 * normal(random) + (v % 97 == 0 ? 8.0f : 0.0f);
    q[v] = p[v] + noise * normal(random);
  }
  return {p, q};
}

// The saved form of p: its top k ids and log-probabilities and the log of
// the rest's mass, written by the writer and read back through the file.
struct SavedRow {
  std::vector<int32_t> ids;
  std::vector<float> log_probs;
  float log_rest = 0;
};

SavedRow save_top_k(const std::vector<float>& p, int32_t k) {
  const double lp = log_normalizer_of(p);
  std::vector<int32_t> order(p.size());
  for (size_t v = 0; v < p.size(); ++v) order[v] = static_cast<int32_t>(v);
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return p[a] > p[b]; });
  SavedRow row;
  double rest = 0;
  for (size_t i = 0; i < order.size(); ++i) {
    if (static_cast<int32_t>(i) < k) {
      row.ids.push_back(order[i]);
      row.log_probs.push_back(stored_log_probability(p[order[i]], lp));
    } else {
      rest += std::exp(p[order[i]] - lp);
    }
  }
  row.log_rest = static_cast<float>(std::log(rest));
  return row;
}

TEST(KlDivergenceRow, WholeDistributionEqualsThePlainFormula) {
  const int32_t vocab = 4096;
  std::vector<uint8_t> scratch(vocab, 0);
  for (uint32_t seed = 1; seed <= 5; ++seed) {
    auto [p, q] = logit_pair(vocab, 0.5f, seed);
    const double lp = log_normalizer_of(p), lq = log_normalizer_of(q);
    std::vector<float> p_log_probs(vocab);
    for (int32_t v = 0; v < vocab; ++v) p_log_probs[v] = stored_log_probability(p[v], lp);
    const double got =
        kl_divergence_row(nullptr, p_log_probs.data(), 0, 0, q.data(), lq, vocab, scratch);
    const double want = plain_kl(p, q);
    // Both log-probabilities are rounded to float32 as stored: a relative
    // error of 2^-24 on values of magnitude up to ~30, i.e. ~2e-6 absolute on
    // each term's difference, weighted by probabilities summing to 1.
    EXPECT_NEAR(got, want, 4e-6) << "seed " << seed;
    EXPECT_GT(want, 1e-3);  // the perturbation is not lost in rounding
  }
}

TEST(KlDivergenceRow, TopKNeverExceedsTheWholeAndGrowsTowardIt) {
  const int32_t vocab = 4096;
  std::vector<uint8_t> scratch(vocab, 0);
  auto [p, q] = logit_pair(vocab, 0.5f, 7);
  const double lq = log_normalizer_of(q);
  const double whole = plain_kl(p, q);
  double previous = 0;
  for (int32_t k : {1, 4, 16, 64, 256, 1024, 4095}) {
    const SavedRow row = save_top_k(p, k);
    const double got = kl_divergence_row(row.ids.data(), row.log_probs.data(), row.log_rest, k,
                                         q.data(), lq, vocab, scratch);
    // Grouping outcomes can only lose divergence (data processing); the
    // partitions are nested as k grows, so the figure never falls. 4e-6:
    // the float32 rounding above.
    EXPECT_LE(got, whole + 4e-6) << "k " << k;
    EXPECT_GE(got, previous - 4e-6) << "k " << k;
    previous = got;
    for (uint8_t s : scratch) ASSERT_EQ(s, 0) << "scratch left dirty";
  }
  EXPECT_NEAR(previous, whole, 4e-6);  // k = vocab - 1: only one token in "the rest"
}

// A perplexity run observed by `observer` on stories260K with cache `mode`.
PerplexityResult scored_run(const Model& model, const std::vector<int32_t>& tokens,
                            const std::string& mode, ScoredRowObserver* observer, int32_t chunks) {
  EngineOptions engine_options;
  engine_options.cache_mode = mode;
  engine_options.max_tokens = 128;
  TransformerEngine engine(model, engine_options);
  PerplexityOptions options;
  options.ctx = 128;
  options.max_chunks = chunks;
  options.observer = observer;
  return evaluate_perplexity(engine, tokens, options);
}

class SavedLogits : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string model_path = testing::shared_path("models/stories260K.bin");
    if (!testing::file_exists(model_path)) GTEST_SKIP() << "no " << model_path;
    model_ = Model::load(model_path);
    std::ifstream in(testing::shared_path("data/tinystories-valid.txt"));
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    text.resize(20000);
    tokens_ = model_->tokenizer().encode(text, true);
    path_ = (std::filesystem::temp_directory_path() /
             ("xq-logits-" + std::to_string(::getpid()) + ".bin"))
                .string();
  }
  void TearDown() override { std::filesystem::remove(path_); }

  int32_t vocab() const { return model_->config().vocab_size; }
  static constexpr int32_t kRowsPerChunk = 128 - 1 - 64;

  std::unique_ptr<Model> model_;
  std::vector<int32_t> tokens_;
  std::string path_;
};

TEST_F(SavedLogits, ARunAgainstItselfDiffersByExactlyNothing) {
  for (int32_t top_k : {0, 16}) {
    {
      SavedLogitsWriter writer(path_, vocab(), kRowsPerChunk, top_k);
      scored_run(*model_, tokens_, "fp16", &writer, 6);
      writer.close();
    }
    KlDivergenceComparer comparer(path_, vocab(), kRowsPerChunk);
    const PerplexityResult run = scored_run(*model_, tokens_, "fp16", &comparer, 6);
    const KlDivergenceResult r = comparer.result();
    EXPECT_EQ(r.rows, run.tokens_scored);
    EXPECT_EQ(r.chunks, 6);
    EXPECT_EQ(r.mean, 0.0) << "top_k " << top_k;
    EXPECT_EQ(r.max, 0.0);
    EXPECT_EQ(r.top1_agreement, 1.0);
    EXPECT_EQ(r.nll_difference, 0.0);
    // The reference's perplexity from the saved NLLs is the run's own
    // (float32-rounded NLLs: relative 1e-6).
    EXPECT_NEAR(r.reference_perplexity, run.perplexity, 1e-6 * run.perplexity);
  }
}

TEST_F(SavedLogits, AQuantizedCacheDivergesAndThePairedDifferenceMatchesThePerplexities) {
  PerplexityResult reference;
  {
    SavedLogitsWriter writer(path_, vocab(), kRowsPerChunk, 32);
    reference = scored_run(*model_, tokens_, "fp16", &writer, 8);
    writer.close();
  }
  KlDivergenceComparer comparer(path_, vocab(), kRowsPerChunk);
  const PerplexityResult run = scored_run(*model_, tokens_, "kivi-2", &comparer, 8);
  const KlDivergenceResult r = comparer.result();
  // kivi-2 on stories260K costs ~20% perplexity: far from zero divergence.
  EXPECT_GT(r.mean, 0.01);
  EXPECT_GT(r.mean_standard_error, 0.0);
  EXPECT_LT(r.top1_agreement, 1.0);
  EXPECT_LE(r.median, r.p99);
  EXPECT_LE(r.p99, r.max);
  // Equal rows per chunk: the mean of the chunks' differences is the
  // difference of the mean NLLs, log(ppl_run / ppl_ref). 1e-5: NLLs summed
  // as float32-rounded values on both sides of the pair.
  EXPECT_NEAR(r.nll_difference, std::log(run.perplexity / reference.perplexity), 1e-5);
  EXPECT_GT(r.nll_difference_standard_error, 0.0);
}

TEST_F(SavedLogits, MismatchedOrDamagedReferencesAreRefusedClearly) {
  {
    SavedLogitsWriter writer(path_, vocab(), kRowsPerChunk, 8);
    scored_run(*model_, tokens_, "fp16", &writer, 2);
    writer.close();
  }
  // Another ctx scores another number of rows per chunk.
  EXPECT_THROW(KlDivergenceComparer(path_, vocab(), kRowsPerChunk + 1), Error);
  EXPECT_THROW(KlDivergenceComparer(path_, vocab() + 1, kRowsPerChunk), Error);
  {
    // More chunks than were saved.
    KlDivergenceComparer comparer(path_, vocab(), kRowsPerChunk);
    EXPECT_THROW(scored_run(*model_, tokens_, "fp16", &comparer, 3), Error);
  }
  {
    // Other text: the chunk's tokens do not hash the same.
    std::vector<int32_t> shifted(tokens_.begin() + 1, tokens_.end());
    KlDivergenceComparer comparer(path_, vocab(), kRowsPerChunk);
    EXPECT_THROW(scored_run(*model_, shifted, "fp16", &comparer, 1), Error);
  }
  // A truncated file.
  std::filesystem::resize_file(path_, std::filesystem::file_size(path_) - 3);
  EXPECT_THROW(KlDivergenceComparer(path_, vocab(), kRowsPerChunk), Error);
  EXPECT_THROW(SavedLogitsWriter(path_, vocab(), kRowsPerChunk, vocab() + 1), Error);
}

}  // namespace
}  // namespace xq
