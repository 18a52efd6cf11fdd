// CPU attention over cached keys and values: the cached tokens walked in
// blocks across threads (attend_in_blocks), each block absorbed into an
// online-softmax state (kernels/attention_state.h), the states merged in a
// fixed order, so nothing the size of the whole context is materialized and
// a query gets the same bits whatever else is in the call (prefill chunks and
// decode steps alike).
// Shared by every cache mode once its K and V (or the rows V is mixed from)
// are in fp32.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "kernels/cpu/aligned_vector.h"

namespace xq::cpu {

// Attention over a subset of the tokens as host buffers of online-softmax
// rows (kernels/attention_state.h: max, sum = Σ exp(s_t - max) in natural
// log, acc = Σ exp(s_t - max) · v_t). rows: (query, head) pairs, query-major
// (row = query * heads + head); width: values per row. The attention is
// acc / sum; states over disjoint tokens merge exactly (online softmax,
// flash-decoding; also how ranks holding different tokens combine).
struct PartialAttention {
  int64_t rows = 0, width = 0;
  std::vector<float> max, sum;              // (rows)
  AlignedVector<float> acc;                 // (rows, width)
  void reset(int64_t rows, int64_t width);  // to the empty set: max -inf, sum 0, acc 0
};

// Adds one block of scores to row r of `state`: block_scores (count values)
// become exp(s - new max) in place, state.acc[r] is rescaled to the new max,
// and the caller then adds block_scores · V_block to state.acc[r]. Returns the
// factor old acc was multiplied by (0 for a row that had seen nothing).
float absorb_scores(PartialAttention& state, int64_t row, float* block_scores, int64_t count);

// into += from, as if `into` had also seen `from`'s tokens. Shapes must match
// (std::invalid_argument otherwise).
void merge_partial_attention(PartialAttention& into, const PartialAttention& from);

// The attention of rows [first_row, first_row + count): out (count, width) =
// acc / sum, row by row. Every row must have seen a token.
void normalize_attention(const PartialAttention& state, int64_t first_row, int64_t count,
                         float* out);

// ln Σ_t exp(s_t) of row `row` (natural log; -inf where it saw nothing).
float log_sum_exp(const PartialAttention& state, int64_t row);

// The queries of one decode step, as the block walk reads them.
struct DecodeQueries {
  const float* q = nullptr;  // (n, heads, head_dim), contiguous
  int32_t n = 0;
  int32_t heads = 0, kv_heads = 0, head_dim = 0;
  float scale = 0;  // on q·k: 1/sqrt(head_dim)
  // Causal limit per query (n values): query i sees the stored tokens with
  // index < visible_end[i] (stored index, which differs from the position
  // where a cache holds only a shard of the sequence).
  const int32_t* visible_end = nullptr;
};

// One block of cached tokens in fp32, for some of the KV heads.
struct CachedBlock {
  int32_t first_token = 0;  // stored index of the block's first token
  int32_t tokens = 0;
  int32_t first_kv_head = 0, kv_heads = 0;  // the KV heads the block holds
  // Key of token t, KV head first_kv_head + j: keys + t * key_stride + j * head_dim.
  const float* keys = nullptr;
  int64_t key_stride = 0;
  // How the state's acc is fed (its width is PartialAttention::width):
  //   values_shared false: each query head mixes its KV head's head_dim slice
  //     of V, at values + t * value_stride + j * head_dim (width = head_dim);
  //   values_shared true: every query head mixes the same whole rows
  //     (values + t * value_stride, width values each), which the caller
  //     projects to V afterwards (rows of X or a latent; the mix is linear).
  const float* values = nullptr;
  int64_t value_stride = 0;
  bool values_shared = false;
};

// Absorbs `block` into the rows of `state` for every query and the query heads
// of the block's KV heads: scores (scale · q·k), online softmax, weighted sum
// of values. scores: scratch of (block kv_heads * group) rows of score_stride
// floats, score_stride >= block.tokens.
void absorb_block(PartialAttention& state, const DecodeQueries& queries, const CachedBlock& block,
                  float* scores, int64_t score_stride);

// The block walk: runs absorb_job(job, state) for jobs [0, jobs) across
// threads and merges their states into `result` (reset first). A job
// typically reads one block of the cache (widening or rebuilding it) and calls
// absorb_block. Jobs are blocks of groups (job = group * blocks_per_group +
// block; 0: one group of `jobs` blocks); each row's blocks are folded in a
// fixed order, so its result does not depend on the number of jobs, queries
// or threads.
void attend_in_blocks(int64_t jobs, int64_t rows, int64_t width, PartialAttention& result,
                      const std::function<void(int64_t job, PartialAttention& state)>& absorb_job,
                      int64_t blocks_per_group = 0);

}  // namespace xq::cpu
