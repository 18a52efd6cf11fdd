#include "runtime/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <string>

#include "kernels/error.h"

namespace xq {

int32_t argmax(const float* logits, int32_t n) {
  int32_t best = 0;
  for (int32_t i = 1; i < n; ++i) {
    if (logits[i] > logits[best]) best = i;
  }
  return best;
}

float top2_margin(const float* logits, int32_t n) {
  float first = -INFINITY, second = -INFINITY;
  for (int32_t i = 0; i < n; ++i) {
    if (logits[i] > first) {
      second = first;
      first = logits[i];
    } else if (logits[i] > second) {
      second = logits[i];
    }
  }
  return first - second;
}

Logprobs logprobs(const float* logits, int32_t n, int32_t chosen, int32_t top_n) {
  if (chosen < 0 || chosen >= n)
    throw Error("logprobs: token " + std::to_string(chosen) + " is outside the " +
                std::to_string(n) + " logits");
  const float max_logit = logits[argmax(logits, n)];
  double total = 0;
  for (int32_t i = 0; i < n; ++i) total += std::exp(static_cast<double>(logits[i]) - max_logit);
  const double log_total = std::log(total) + max_logit;
  auto logprob = [&](int32_t i) { return static_cast<float>(logits[i] - log_total); };
  Logprobs result;
  result.chosen = {chosen, logprob(chosen)};
  const int32_t keep = std::clamp(top_n, 0, n);
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (int32_t i = 0; i < n; ++i) ids[static_cast<size_t>(i)] = i;
  std::partial_sort(ids.begin(), ids.begin() + keep, ids.end(), [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  });
  for (int32_t k = 0; k < keep; ++k) result.top.push_back({ids[k], logprob(ids[k])});
  return result;
}

Sampler::Sampler(const SamplerOptions& options) : options_(options), rng_(options.seed) {
  if (!(options.temperature >= 0) || !std::isfinite(options.temperature))
    throw Error("sampler: temperature must be a finite number >= 0");
  if (options.top_k < 0) throw Error("sampler: top-k must be >= 0");
  if (!(options.top_p > 0 && options.top_p <= 1)) throw Error("sampler: top-p must be in (0, 1]");
}

double Sampler::draw_uniform() {
  return std::generate_canonical<double, std::numeric_limits<double>::digits>(rng_);
}

SamplingDraw Sampler::next_draw() {
  SamplingDraw draw;
  draw.temperature = options_.temperature;
  draw.top_k = options_.top_k;
  draw.top_p = options_.top_p;
  if (options_.temperature != 0.0f) draw.uniform = draw_uniform();
  return draw;
}

int32_t Sampler::sample(const float* logits, int32_t vocab_size) {
  if (options_.temperature == 0.0f) return argmax(logits, vocab_size);
  return sample_with_uniform(logits, vocab_size, draw_uniform());
}

int32_t Sampler::sample_with_uniform(const float* logits, int32_t vocab_size, double uniform) {
  if (options_.temperature == 0.0f) throw Error("sampler: a draw needs temperature > 0");
  candidates_.resize(vocab_size);
  for (int32_t i = 0; i < vocab_size; ++i) candidates_[i] = {logits[i], i};
  int32_t keep = vocab_size;
  if (options_.top_k > 0 && options_.top_k < vocab_size) keep = options_.top_k;
  std::partial_sort(candidates_.begin(), candidates_.begin() + keep, candidates_.end(),
                    [](const auto& a, const auto& b) {
                      return a.first > b.first || (a.first == b.first && a.second < b.second);
                    });
  candidates_.resize(keep);
  // Softmax at temperature T over the kept candidates (sorted, so [0] is the max).
  const float max_logit = candidates_[0].first;
  double total = 0;
  for (auto& c : candidates_) {
    c.first = static_cast<float>(std::exp((c.first - max_logit) / options_.temperature));
    total += c.first;
  }
  // Nucleus: the smallest prefix whose probability mass reaches top_p.
  double mass = 0;
  size_t nucleus = candidates_.size();
  for (size_t i = 0; i < candidates_.size(); ++i) {
    mass += candidates_[i].first / total;
    if (mass >= options_.top_p) {
      nucleus = i + 1;
      break;
    }
  }
  double nucleus_total = 0;
  for (size_t i = 0; i < nucleus; ++i) nucleus_total += candidates_[i].first;
  // As std::uniform_real_distribution<double>(0, nucleus_total) would draw it.
  double r = uniform * nucleus_total;
  for (size_t i = 0; i < nucleus; ++i) {
    r -= candidates_[i].first;
    if (r <= 0) return candidates_[i].second;
  }
  return candidates_[nucleus - 1].second;
}

}  // namespace xq
