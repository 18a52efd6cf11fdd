#include "runtime/perplexity.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "kernels/error.h"

namespace xq {

namespace {

// Forward passes over [0, n) of sequence 0 in ceil(n / batch) pieces of
// near-equal size, the larger first; rows at or after `first` go to logits.
void forward_in_pieces(Engine& engine, const int32_t* tokens, int32_t n, float* logits,
                       int32_t first, int32_t batch) {
  const int32_t pieces = batch > 0 ? (n + batch - 1) / batch : 1;
  const int32_t vocab = engine.model().config().vocab_size;
  for (int32_t i = 0, begin = 0; i < pieces; ++i) {
    const int32_t size = n / pieces + (i < n % pieces ? 1 : 0);
    const int32_t from = std::max(first, begin);
    float* out = from < begin + size ? logits + static_cast<size_t>(from - first) * vocab : nullptr;
    engine.forward(0, tokens + begin, size, begin, out, from - begin);
    begin += size;
  }
}

}  // namespace

PerplexityResult evaluate_perplexity(
    Engine& engine, const std::vector<int32_t>& tokens, const PerplexityOptions& options,
    const std::function<void(int32_t, int32_t, double)>& progress) {
  const int32_t ctx = options.ctx;
  const int32_t vocab = engine.model().config().vocab_size;
  const int32_t bos_id = engine.model().tokenizer().bos_id();
  if (options.batch < 0) throw Error("perplexity: the batch size must not be negative");
  if (ctx < 2) throw Error("perplexity: --ctx must be at least 2");
  if (ctx > engine.max_tokens())
    throw Error("perplexity: --ctx " + std::to_string(ctx) + " exceeds the engine's context of " +
                std::to_string(engine.max_tokens()));
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
    if (options.bos_first) chunk[0] = bos_id;
    engine.truncate(0, 0);
    forward_in_pieces(engine, chunk.data(), ctx, logits.data(), first_scored, options.batch);
    if (options.observer) options.observer->begin_chunk(c, chunk.data(), ctx);
    for (int32_t j = 0; j < scored_per_chunk; ++j) {
      const float* row = logits.data() + static_cast<size_t>(j) * vocab;
      const int32_t target = chunk[first_scored + j + 1];
      float max_logit = row[0];
      for (int32_t v = 1; v < vocab; ++v) max_logit = std::max(max_logit, row[v]);
      double sum = 0;
      for (int32_t v = 0; v < vocab; ++v) sum += std::exp(static_cast<double>(row[v] - max_logit));
      const double log_normalizer = std::log(sum) + max_logit;
      const double nll = log_normalizer - row[target];
      if (options.observer) options.observer->row(row, log_normalizer, target);
      nll_sum += nll;
      nll_sq_sum += nll * nll;
      ++count;
    }
    if (options.observer) options.observer->end_chunk();
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
