// Causal multi-head attention over fp32 keys and values, for many queries at
// once (prefill): per head, scores = Q Kᵀ (sgemm), causal mask + softmax,
// out = P V (sgemm); heads split across threads. Shared by every cache mode
// once its K and V are in fp32.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/cpu/aligned_vector.h"

namespace xq::cpu {

// q: (n, heads, head_dim), row stride q_stride; query i is at position pos0 + i
// and sees keys [0, pos0 + i]. Keys and values of KV head g (heads share them
// in groups of heads / kv_heads): row t at keys + g * head_offset + t * row_stride
// (values alike). out: like q. Scale 1/sqrt(head_dim).
void causal_attention(const float* q, int64_t q_stride, int32_t n, int32_t pos0, int32_t total,
                      int32_t heads, int32_t kv_heads, int32_t head_dim, const float* keys,
                      const float* values, int64_t head_offset, int64_t row_stride, float* out);

// Attention over a subset of the tokens, kept so that subsets can be combined
// exactly later (online softmax, flash-decoding; also how ranks holding
// different tokens of a sequence merge their results). For each of `rows`
// (query, head) pairs: max = the largest score seen, sum = Σ exp(s_t - max),
// acc (width values) = Σ exp(s_t - max) · v_t. The full result is acc / sum.
struct PartialAttention {
  int64_t rows = 0, width = 0;
  std::vector<float> max, sum;
  AlignedVector<float> acc;
  void reset(int64_t rows, int64_t width);  // to the empty set: max -inf, sum 0, acc 0
};

// Adds one block of scores to row r of `state`: block_scores (count values)
// become exp(s - new max) in place, state.acc[r] is rescaled to the new max,
// and the caller then adds block_scores · V_block to state.acc[r]. Returns the
// factor old acc was multiplied by (0 for a row that had seen nothing).
float absorb_scores(PartialAttention& state, int64_t row, float* block_scores, int64_t count);

// into += from, as if `into` had also seen `from`'s tokens. Shapes must match.
void merge_partial_attention(PartialAttention& into, const PartialAttention& from);

}  // namespace xq::cpu
