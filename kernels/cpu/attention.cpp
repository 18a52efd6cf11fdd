#include "kernels/cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "kernels/attention_state.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/small_gemm.h"
#include "kernels/cpu/thread_pool.h"

namespace xq::cpu {

void PartialAttention::reset(int64_t row_count, int64_t row_width) {
  rows = row_count;
  width = row_width;
  max.assign(rows, -INFINITY);
  sum.assign(rows, 0.0f);
  acc.assign(static_cast<size_t>(rows) * width, 0.0f);
}

float absorb_scores(PartialAttention& state, int64_t row, float* block_scores, int64_t count) {
  return attention_state::absorb_block(state.max[row], state.sum[row],
                                       state.acc.data() + row * state.width, state.width,
                                       block_scores, count, exp_shifted);
}

void merge_partial_attention(PartialAttention& into, const PartialAttention& from) {
  if (into.rows != from.rows || into.width != from.width)
    throw std::invalid_argument("merge_partial_attention: shapes differ");
  for (int64_t r = 0; r < into.rows; ++r)
    attention_state::merge_row(into.max[r], into.sum[r], into.acc.data() + r * into.width,
                               from.max[r], from.sum[r], from.acc.data() + r * from.width,
                               into.width);
}

void normalize_attention(const PartialAttention& state, int64_t first_row, int64_t count,
                         float* out) {
  for (int64_t r = 0; r < count; ++r) {
    const int64_t row = first_row + r;
    attention_state::normalize_row(state.sum[row], state.acc.data() + row * state.width,
                                   state.width, out + r * state.width);
  }
}

float log_sum_exp(const PartialAttention& state, int64_t row) {
  return attention_state::log_sum_exp(state.max[row], state.sum[row]);
}

void absorb_block(PartialAttention& state, const DecodeQueries& queries, const CachedBlock& block,
                  float* scores, int64_t score_stride) {
  const int32_t heads = queries.heads, hd = queries.head_dim;
  const int32_t group = heads / queries.kv_heads;
  const int64_t q_stride = static_cast<int64_t>(heads) * hd, width = state.width;
  for (int32_t i = 0; i < queries.n; ++i) {
    // Causal: the stored tokens up to the query's position.
    const int32_t visible = std::min(block.tokens, queries.visible_end[i] - block.first_token);
    if (visible <= 0) continue;
    // The block's query heads are adjacent rows of q, of scores and of the state.
    const int64_t first_row = static_cast<int64_t>(i) * heads + block.first_kv_head * group;
    for (int32_t j = 0; j < block.kv_heads; ++j) {
      const int64_t g = block.first_kv_head + j;
      const int64_t group_row = static_cast<int64_t>(i) * heads + g * group;
      float* group_scores = scores + static_cast<int64_t>(j) * group * score_stride;
      scores_against_rows(group, hd, queries.q + i * q_stride + g * group * hd, hd, visible,
                          block.keys + static_cast<int64_t>(j) * hd, block.key_stride,
                          queries.scale, group_scores, score_stride);
      for (int32_t r = 0; r < group; ++r)
        absorb_scores(state, group_row + r, group_scores + r * score_stride, visible);
      if (!block.values_shared)  // the group mixes its own KV head's slice of V
        gemm_small(group, width, visible, group_scores, score_stride,
                   block.values + static_cast<int64_t>(j) * hd, block.value_stride,
                   state.acc.data() + group_row * width, width, true);
    }
    // Every head mixes the same rows: one GEMM for all the block's heads.
    if (block.values_shared)
      gemm_small(static_cast<int64_t>(block.kv_heads) * group, width, visible, scores, score_stride,
                 block.values, block.value_stride, state.acc.data() + first_row * width, width,
                 true);
  }
}

void attend_in_blocks(int64_t jobs, int64_t rows, int64_t width, PartialAttention& result,
                      const std::function<void(int64_t job, PartialAttention& state)>& absorb_job,
                      int64_t blocks_per_group) {
  if (blocks_per_group <= 0) blocks_per_group = std::max<int64_t>(jobs, 1);
  // Runs of kBlocksPerRun consecutive blocks of one group are absorbed in
  // order into a state of their own; the runs' states are then folded into
  // the result in run order. Which runs a row's blocks fall in depends only
  // on the blocks' indices, never on how many jobs or queries the call has or
  // on the threads, so a query gets the same bits in a decode step as in any
  // prefill chunk or batch (a run past its causal limit is empty, and merging
  // an empty state changes nothing).
  constexpr int64_t kBlocksPerRun = 4;
  const int64_t groups = (jobs + blocks_per_group - 1) / blocks_per_group;
  const int64_t runs_per_group = (blocks_per_group + kBlocksPerRun - 1) / kBlocksPerRun;
  const int64_t runs = groups * runs_per_group;
  // Grow-only: this runs once per layer per step.
  thread_local std::vector<PartialAttention> run_states;
  if (static_cast<int64_t>(run_states.size()) < runs) run_states.resize(static_cast<size_t>(runs));
  std::vector<PartialAttention>& states = run_states;
  parallel_for(runs, [&](int64_t first_run, int64_t last_run) {
    for (int64_t run = first_run; run < last_run; ++run) {
      PartialAttention& state = states[static_cast<size_t>(run)];
      state.reset(rows, width);
      const int64_t group = run / runs_per_group;
      const int64_t first_block = (run % runs_per_group) * kBlocksPerRun;
      const int64_t last_block = std::min(first_block + kBlocksPerRun, blocks_per_group);
      for (int64_t b = first_block; b < last_block; ++b) {
        const int64_t job = group * blocks_per_group + b;
        if (job < jobs) absorb_job(job, state);
      }
    }
  });
  result.reset(rows, width);
  parallel_for(rows, [&](int64_t first_row, int64_t last_row) {
    for (int64_t run = 0; run < runs; ++run) {
      const PartialAttention& from = states[static_cast<size_t>(run)];
      for (int64_t r = first_row; r < last_row; ++r)
        attention_state::merge_row(result.max[r], result.sum[r], result.acc.data() + r * width,
                                   from.max[r], from.sum[r], from.acc.data() + r * width, width);
    }
  });
}

}  // namespace xq::cpu
