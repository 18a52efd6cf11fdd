#include "runtime/perplexity.h"

#include <chrono>
#include <cmath>

#include "kernels/error.h"

namespace xq {

PerplexityResult evaluate_perplexity(
    Engine& engine, const std::vector<int32_t>& tokens, const PerplexityOptions& options,
    const std::function<void(int32_t, int32_t, double)>& progress) {
  ScoredModel scored;
  scored.forward = [&engine](const int32_t* chunk, int32_t n, float* logits, int32_t first) {
    engine.cache().truncate(0, 0);
    engine.forward(0, chunk, n, 0, logits, first);
  };
  scored.vocab_size = engine.model().config().vocab_size;
  scored.bos_id = engine.model().tokenizer().bos_id();
  scored.max_tokens = engine.max_tokens();
  return evaluate_perplexity(scored, tokens, options, progress);
}

PerplexityResult evaluate_perplexity(
    const ScoredModel& model, const std::vector<int32_t>& tokens, const PerplexityOptions& options,
    const std::function<void(int32_t, int32_t, double)>& progress) {
  const int32_t ctx = options.ctx;
  const int32_t vocab = model.vocab_size;
  if (ctx < 2) throw Error("perplexity: --ctx must be at least 2");
  if (ctx > model.max_tokens)
    throw Error("perplexity: --ctx " + std::to_string(ctx) + " exceeds the engine's context of " +
                std::to_string(model.max_tokens));
  int32_t chunks = static_cast<int32_t>(tokens.size() / ctx);
  if (options.max_chunks > 0) chunks = std::min(chunks, options.max_chunks);
  if (chunks == 0)
    throw Error("perplexity: the text has " + std::to_string(tokens.size()) +
                " tokens, fewer than one chunk of " + std::to_string(ctx));
  // Positions whose prediction of the next token is scored.
  const int32_t first_scored = options.score_all ? 0 : ctx / 2;
  const int32_t scored_per_chunk = ctx - 1 - first_scored;
  // Nothing scored would make the perplexity exp(0/0) = NaN.
  if (scored_per_chunk < 1)
    throw Error("perplexity: --ctx " + std::to_string(ctx) +
                " leaves no token to score (use at least 3, or --score all)");

  std::vector<float> logits(static_cast<size_t>(ctx - first_scored) * vocab);
  std::vector<int32_t> chunk(ctx);
  double nll_sum = 0, nll_sq_sum = 0;
  int64_t count = 0;
  const auto start = std::chrono::steady_clock::now();
  for (int32_t c = 0; c < chunks; ++c) {
    std::copy(tokens.begin() + static_cast<int64_t>(c) * ctx,
              tokens.begin() + static_cast<int64_t>(c + 1) * ctx, chunk.begin());
    if (options.bos_first) chunk[0] = model.bos_id;
    model.forward(chunk.data(), ctx, logits.data(), first_scored);
    for (int32_t j = 0; j < scored_per_chunk; ++j) {
      const float* row = logits.data() + static_cast<size_t>(j) * vocab;
      const int32_t target = chunk[first_scored + j + 1];
      float max_logit = row[0];
      for (int32_t v = 1; v < vocab; ++v) max_logit = std::max(max_logit, row[v]);
      double sum = 0;
      for (int32_t v = 0; v < vocab; ++v) sum += std::exp(static_cast<double>(row[v] - max_logit));
      const double nll = std::log(sum) + max_logit - row[target];
      nll_sum += nll;
      nll_sq_sum += nll * nll;
      ++count;
    }
    if (progress) progress(c + 1, chunks, std::exp(nll_sum / count));
  }
  PerplexityResult result;
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const double mean = nll_sum / count;
  const double variance = nll_sq_sum / count - mean * mean;
  result.perplexity = std::exp(mean);
  result.standard_error =
      count > 1 && variance > 0 ? result.perplexity * std::sqrt(variance / (count - 1)) : 0;
  result.tokens_scored = count;
  result.tokens_evaluated = static_cast<int64_t>(chunks) * ctx;
  result.chunks = chunks;
  return result;
}

}  // namespace xq
