// Picks the next token from logits: greedy at temperature 0, otherwise
// softmax(logits / T) restricted to the top-k tokens and the top-p mass.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

namespace xq {

// A token chosen from a row of logits, with that row's top-1 minus top-2
// margin: how close the step was to a tie (what tools print with --margins).
struct SampledToken {
  int32_t token = 0;
  float margin = 0.0f;
};

struct SamplerOptions {
  float temperature = 0.0f;  // 0 = greedy
  int32_t top_k = 0;         // 0 = no limit
  float top_p = 1.0f;        // 1 = no limit
  uint64_t seed = 0;
};

// One row's sampling parameters with the generator's draw for it: what a
// sampler elsewhere (the CUDA backend's cuda::SamplingRow, field for field)
// needs to pick the token Sampler::sample would pick.
struct SamplingDraw {
  float temperature = 0.0f;
  int32_t top_k = 0;
  float top_p = 1.0f;
  double uniform = 0.0;  // in [0, 1); unused (0) for greedy rows
};

class Sampler {
 public:
  explicit Sampler(const SamplerOptions& options);
  // Greedy: the argmax. Sampled: sample_with_uniform(draw_uniform()).
  int32_t sample(const float* logits, int32_t vocab_size);

  const SamplerOptions& options() const { return options_; }
  // The next value in [0, 1) of the generator: std::generate_canonical<double,
  // 53>, which is what std::uniform_real_distribution<double>(0, total) scales
  // by total; sample() draws exactly one per sampled (non-greedy) call.
  double draw_uniform();
  // The token for a given draw: softmax(logits / T) over the top_k largest
  // (ties to the lowest id), the smallest prefix whose mass reaches top_p,
  // r = uniform * (the prefix's mass), the first candidate at which the
  // running mass reaches r. Needs temperature > 0.
  int32_t sample_with_uniform(const float* logits, int32_t vocab_size, double uniform);
  // This step's parameters for sampling on another device, consuming the
  // generator as sample() would: one draw for a sampled row, none for greedy.
  SamplingDraw next_draw();

 private:
  SamplerOptions options_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> candidates_;
};

// A token's natural-log probability under softmax of the raw logits (no
// temperature, no top-k/top-p: what the model says, as OpenAI-style APIs report).
struct TokenLogprob {
  int32_t token = 0;
  float logprob = 0.0f;
};

struct Logprobs {
  TokenLogprob chosen;
  std::vector<TokenLogprob> top;  // the top_n most likely, most likely first, ties to lowest id
};

// log_softmax of logits (n) for `chosen` and the top_n most likely tokens
// (top_n is clamped to n). Computed in double, so a logprob near 0 is not lost.
Logprobs logprobs(const float* logits, int32_t n, int32_t chosen, int32_t top_n);

// Index of the largest logit; ties go to the lowest id.
int32_t argmax(const float* logits, int32_t n);

// Largest minus second-largest logit: how close a greedy step was to a tie
// (what `--margins` prints and the parallel tests accept near-tie tokens by).
float top2_margin(const float* logits, int32_t n);

}  // namespace xq
