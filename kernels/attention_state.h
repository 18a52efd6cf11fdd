// The online-softmax attention state, one row at a time: the math every
// attention path shares (the caches' decode block walks, the merge of ranks'
// partial results, CUDA kernels), header-only so host and device compile the
// same formulas.
//
// A row is one (query, head) pair's attention over some subset of the tokens:
//   max  m = the largest score s_t seen (-inf: no token yet)
//   sum  l = Σ_t exp(s_t - m)
//   acc  a = Σ_t exp(s_t - m) · v_t          (width values)
// Scores are the scaled logits q·k / sqrt(head_dim) and every exponential and
// logarithm is the natural one (not base 2). The attention over the subset is
// a / l; its log-sum-exp is m + ln l. Two rows over disjoint subsets merge
// exactly into the row over their union, which is how decode splits the
// context into blocks and how ranks holding different tokens combine results.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/elementwise.h"

namespace xq::attention_state {

// The larger of a and b, as std::max (usable in device code).
XQ_HOST_DEVICE inline float larger(float a, float b) {
  return a < b ? b : a;
}

// To the empty set: max -inf, sum 0, acc (width) 0.
XQ_HOST_DEVICE inline void reset_row(float& max, float& sum, float* acc, int64_t width) {
  max = -INFINITY;
  sum = 0.0f;
  for (int64_t c = 0; c < width; ++c) acc[c] = 0.0f;
}

// Adds one block of `count` scores to a row. block_scores become exp(s - new
// max) in place, acc is rescaled to the new max, and the caller then adds
// block_scores · V_block to acc. exp_shifted(x, count, shift) is the backend's:
// it sets x[i] = exp(x[i] - shift) and returns their sum. Returns the factor
// the old acc was multiplied by (0 for a row that had seen nothing).
template <typename ExpShifted>
XQ_HOST_DEVICE inline float absorb_block(float& max, float& sum, float* acc, int64_t width,
                                         float* block_scores, int64_t count,
                                         ExpShifted&& exp_shifted) {
  float block_max = -INFINITY;
  for (int64_t t = 0; t < count; ++t) block_max = larger(block_max, block_scores[t]);
  const float old_max = max;
  const float new_max = larger(old_max, block_max);
  // Nothing seen yet (old_max = -inf): the old accumulator is zero and stays so.
  const float rescale = old_max == -INFINITY ? 0.0f : expf(old_max - new_max);
  if (rescale != 1.0f)
    for (int64_t c = 0; c < width; ++c) acc[c] *= rescale;
  sum = sum * rescale + exp_shifted(block_scores, count, new_max);
  max = new_max;
  return rescale;
}

// (max, sum, acc) becomes the row over both its tokens and from's, which must
// be disjoint from its own. A `from` that saw nothing changes nothing.
XQ_HOST_DEVICE inline void merge_row(float& max, float& sum, float* acc, float from_max,
                                     float from_sum, const float* from_acc, int64_t width) {
  if (from_max == -INFINITY) return;
  const float new_max = larger(max, from_max);
  const float a = max == -INFINITY ? 0.0f : expf(max - new_max);
  const float b = expf(from_max - new_max);
  for (int64_t c = 0; c < width; ++c) acc[c] = a * acc[c] + b * from_acc[c];
  sum = a * sum + b * from_sum;
  max = new_max;
}

// The attention output of a row: out (width) = acc / sum. A row that saw no
// token has sum 0 and gives inf or NaN: every query sees at least itself.
XQ_HOST_DEVICE inline void normalize_row(float sum, const float* acc, int64_t width, float* out) {
  const float inv = 1.0f / sum;
  for (int64_t c = 0; c < width; ++c) out[c] = acc[c] * inv;
}

// ln Σ_t exp(s_t) over the row's tokens (natural log): m + ln l; -inf for a
// row that saw nothing.
XQ_HOST_DEVICE inline float log_sum_exp(float max, float sum) {
  return max + logf(sum);
}

}  // namespace xq::attention_state
