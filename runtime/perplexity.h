// Perplexity by llama.cpp's protocol: the token stream is cut into chunks of
// ctx tokens, each chunk starts with BOS (replacing its first token) and is
// evaluated from an empty cache, and the second half of each chunk is scored
// (or every position, with score_all). The standard error is that of the mean
// negative log-likelihood, carried to perplexity: ppl * sqrt(var(nll)/(N-1)).
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "runtime/engine.h"

namespace xq {

struct PerplexityOptions {
  int32_t ctx = 512;
  bool score_all = false;
  bool bos_first = true;
  int32_t max_chunks = 0;  // 0 = all
};

struct PerplexityResult {
  double perplexity = 0;
  double standard_error = 0;
  int64_t tokens_scored = 0;
  int64_t tokens_evaluated = 0;
  int32_t chunks = 0;
  double seconds = 0;
};

// Runs one chunk of n tokens from an empty cache and writes the logits of rows
// [first_logit_row, n): how any engine (single-process or parallel) is scored.
using ChunkForward =
    std::function<void(const int32_t* tokens, int32_t n, float* logits, int32_t first_logit_row)>;

struct ScoredModel {
  ChunkForward forward;
  int32_t vocab_size = 0;
  int32_t bos_id = 0;
  int32_t max_tokens = 0;  // the engine's context
};

// progress(chunk_done, chunks_total, running_ppl) after each chunk.
PerplexityResult evaluate_perplexity(
    const ScoredModel& model, const std::vector<int32_t>& tokens, const PerplexityOptions& options,
    const std::function<void(int32_t, int32_t, double)>& progress = {});

PerplexityResult evaluate_perplexity(
    Engine& engine, const std::vector<int32_t>& tokens, const PerplexityOptions& options,
    const std::function<void(int32_t, int32_t, double)>& progress = {});

}  // namespace xq
