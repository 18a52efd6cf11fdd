// The queries of a cache's decode block walk, shared by every cache mode.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels/cpu/attention.h"
#include "runtime/model.h"
#include "runtime/sequence_shard.h"

namespace xq {

// n queries q (n, n_heads, head_dim) at positions [pos0, pos0 + n), each
// seeing the stored tokens of `shard` up to its own position (causal).
// `visible_end` receives those n limits and must outlive the result.
inline cpu::DecodeQueries decode_queries(const float* q, int32_t n, int32_t pos0,
                                         const ModelConfig& config, const SequenceShard& shard,
                                         std::vector<int32_t>& visible_end) {
  visible_end.resize(static_cast<size_t>(n));
  for (int32_t i = 0; i < n; ++i) visible_end[i] = shard.owned_before(pos0 + i + 1);
  cpu::DecodeQueries queries;
  queries.q = q;
  queries.n = n;
  queries.heads = config.n_heads;
  queries.kv_heads = config.n_kv_heads;
  queries.head_dim = config.head_dim;
  queries.scale = 1.0f / std::sqrt(static_cast<float>(config.head_dim));
  queries.visible_end = visible_end.data();
  return queries;
}

}  // namespace xq
