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
#include "runtime/logit_comparison.h"

namespace xq {

struct PerplexityOptions {
  int32_t ctx = 512;
  bool score_all = false;
  bool bos_first = true;
  int32_t max_chunks = 0;  // 0 = all
  // Runs each chunk as ceil(ctx / batch) near-equal forward passes (the larger
  // first), as a pipeline cuts a prefill into micro-batches; 0 = one pass.
  int32_t batch = 0;
  // Sees every scored position's logits (saving them, or comparing them with
  // saved ones: runtime/logit_comparison.h). Not owned; may be null.
  ScoredRowObserver* observer = nullptr;
};

struct PerplexityResult {
  double perplexity = 0;
  double standard_error = 0;
  int64_t tokens_scored = 0;
  int64_t tokens_evaluated = 0;
  int32_t chunks = 0;
  double seconds = 0;
};

// progress(chunk_done, chunks_total, running_ppl) after each chunk. Each
// chunk starts from an empty cache (sequence 0 truncated), so the engine must
// hold at least ctx tokens. Collective where the engine is: every rank of a
// parallel engine calls it with the same tokens and options.
PerplexityResult evaluate_perplexity(
    Engine& engine, const std::vector<int32_t>& tokens, const PerplexityOptions& options,
    const std::function<void(int32_t, int32_t, double)>& progress = {});

}  // namespace xq
