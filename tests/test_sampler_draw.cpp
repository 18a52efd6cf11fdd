// Sampler's draw, split out for device sampling (draw_uniform, next_draw,
// sample_with_uniform), against a copy of the algorithm as it was written
// before the split: the same seeds must give the same tokens, bit for bit.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <utility>
#include <vector>

#include "kernels/error.h"
#include "runtime/sampler.h"

namespace {

// Sampler::sample as it stood with std::uniform_real_distribution inside.
class ReferenceSampler {
 public:
  explicit ReferenceSampler(const xq::SamplerOptions& options)
      : options_(options), rng_(options.seed) {}

  int32_t sample(const float* logits, int32_t vocab_size) {
    if (options_.temperature == 0.0f) return xq::argmax(logits, vocab_size);
    std::vector<std::pair<float, int32_t>> candidates(static_cast<size_t>(vocab_size));
    for (int32_t i = 0; i < vocab_size; ++i) candidates[static_cast<size_t>(i)] = {logits[i], i};
    int32_t keep = vocab_size;
    if (options_.top_k > 0 && options_.top_k < vocab_size) keep = options_.top_k;
    std::partial_sort(candidates.begin(), candidates.begin() + keep, candidates.end(),
                      [](const auto& a, const auto& b) {
                        return a.first > b.first || (a.first == b.first && a.second < b.second);
                      });
    candidates.resize(static_cast<size_t>(keep));
    const float max_logit = candidates[0].first;
    double total = 0;
    for (auto& c : candidates) {
      c.first = static_cast<float>(std::exp((c.first - max_logit) / options_.temperature));
      total += c.first;
    }
    double mass = 0;
    size_t nucleus = candidates.size();
    for (size_t i = 0; i < candidates.size(); ++i) {
      mass += candidates[i].first / total;
      if (mass >= options_.top_p) {
        nucleus = i + 1;
        break;
      }
    }
    double nucleus_total = 0;
    for (size_t i = 0; i < nucleus; ++i) nucleus_total += candidates[i].first;
    std::uniform_real_distribution<double> uniform(0.0, nucleus_total);
    double r = uniform(rng_);
    for (size_t i = 0; i < nucleus; ++i) {
      r -= candidates[i].first;
      if (r <= 0) return candidates[i].second;
    }
    return candidates[nucleus - 1].second;
  }

 private:
  xq::SamplerOptions options_;
  std::mt19937_64 rng_;
};

// Logits with a spread like a model's, and some exact ties.
std::vector<float> random_logits(int32_t vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<float> logits(static_cast<size_t>(vocab));
  for (float& v : logits) v = normal(rng);
  for (int32_t i = 0; i + 7 < vocab; i += 97) logits[static_cast<size_t>(i + 7)] = logits[i];
  return logits;
}

const xq::SamplerOptions kOptions[] = {
    {1.0f, 0, 1.0f, 1}, {0.7f, 40, 1.0f, 2}, {1.3f, 0, 0.9f, 3}, {0.5f, 50, 0.8f, 4},
    {2.0f, 1, 1.0f, 5}, {1.0f, 0, 1e-6f, 6}, {0.0f, 0, 1.0f, 7}, {0.9f, 5000, 0.95f, 8},
};

TEST(SamplerDraw, SampleGivesTheTokensOfTheAlgorithmBeforeTheSplit) {
  const int32_t vocab = 5000;
  int sampled_differently_from_argmax = 0;
  for (const xq::SamplerOptions& options : kOptions) {
    xq::Sampler sampler(options);
    ReferenceSampler reference(options);
    for (uint32_t step = 0; step < 200; ++step) {
      const std::vector<float> logits = random_logits(vocab, step * 31 + options.seed);
      const int32_t token = sampler.sample(logits.data(), vocab);
      ASSERT_EQ(token, reference.sample(logits.data(), vocab))
          << "seed " << options.seed << ", step " << step;
      if (token != xq::argmax(logits.data(), vocab)) ++sampled_differently_from_argmax;
    }
  }
  // The comparison means something only if the draws mattered.
  EXPECT_GT(sampled_differently_from_argmax, 200);
}

TEST(SamplerDraw, NextDrawThenSampleWithUniformEqualsSample) {
  const int32_t vocab = 3000;
  for (const xq::SamplerOptions& options : kOptions) {
    xq::Sampler whole(options), split(options);
    for (uint32_t step = 0; step < 100; ++step) {
      const std::vector<float> logits = random_logits(vocab, step + 1000 * options.seed);
      const xq::SamplingDraw draw = split.next_draw();
      EXPECT_EQ(draw.temperature, options.temperature);
      EXPECT_EQ(draw.top_k, options.top_k);
      EXPECT_EQ(draw.top_p, options.top_p);
      const int32_t token = options.temperature == 0.0f
                                ? xq::argmax(logits.data(), vocab)
                                : split.sample_with_uniform(logits.data(), vocab, draw.uniform);
      ASSERT_EQ(token, whole.sample(logits.data(), vocab))
          << "seed " << options.seed << ", step " << step;
    }
  }
}

TEST(SamplerDraw, DrawsAreTheDistributionsCanonicalValues) {
  // uniform_real_distribution(0, t) is generate_canonical * t: the same
  // engine state gives draw_uniform() * t.
  xq::Sampler sampler(xq::SamplerOptions{1.0f, 0, 1.0f, 99});
  std::mt19937_64 engine(99);
  for (int i = 0; i < 1000; ++i) {
    const double total = 0.25 + i;
    std::uniform_real_distribution<double> uniform(0.0, total);
    const double expected = uniform(engine);
    const double u = sampler.draw_uniform();
    ASSERT_GE(u, 0.0);
    ASSERT_LT(u, 1.0);
    ASSERT_EQ(u * total, expected) << "draw " << i;
  }
}

TEST(SamplerDraw, SampleWithUniformRejectsGreedyOptions) {
  xq::Sampler greedy(xq::SamplerOptions{});
  const std::vector<float> logits = {1.0f, 2.0f};
  EXPECT_THROW(greedy.sample_with_uniform(logits.data(), 2, 0.5), xq::Error);
}

}  // namespace
