// The attention half of a layer as the forward pass sees it: normed layer
// inputs in, this rank's heads' attention outputs out (before Wo), the cache
// kept on the way. Two ways to split it over a tensor-parallel group:
//   * by head: this rank computes Q, K, V of its own heads through its rows of
//     Wq/Wk/Wv and keeps a cache of its KV heads only. A group of one (a
//     single process) is the special case of every head and any cache mode.
//   * by sequence: every rank computes Q, K, V of all heads (replicated, no
//     communication), keeps only its own tokens in its cache, attends over
//     them for all heads, and the group merges the online-softmax states
//     (merge_across: one all_gather of n * heads * (head_dim + 2) floats per
//     layer, whatever the context length); each rank keeps its own heads.
// The cache mode decides: a mode that can split by head does so where the
// group divides the KV heads; every other case is split by sequence.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "runtime/cache.h"
#include "runtime/communicator.h"
#include "runtime/model.h"
#include "runtime/shard.h"

namespace xq {

struct EngineOptions;
struct Segment;

class AttentionStep {
 public:
  virtual ~AttentionStep() = default;
  // attn (rows, this rank's heads * head_dim) = causal attention of layer
  // `layer` (an index into the engine's layers) for the rows of every
  // segment, in segment order (segment s covers rows [row0_s, row0_s + n_s)
  // at positions[row] = pos0_s + row - row0_s), given their normed inputs
  // (rows, dim). Q, K and V come from one matmul over all rows; each segment
  // is appended to and attends over its own sequence. Collective over the TP
  // group where the step is split by sequence.
  virtual void run(const std::vector<Segment>& segments, int32_t layer, const float* normed,
                   int32_t rows, const int32_t* positions, float* attn) = 0;
  virtual AttentionCache& cache() = 0;
  virtual const AttentionCache& cache() const = 0;
  // Bytes of Wq, Wk and Wv this rank reads for layer `layer`.
  virtual size_t qkv_weight_bytes(int32_t layer) const = 0;
  virtual bool sequence_sharded() const = 0;
  // The cache mode's description and how the step splits it.
  virtual std::string describe() const = 0;
};

// The step for rank `tp_group.rank()` of `shard` over layers `layer_range`
// (whose per-rank views are `layers`), with the engine's RoPE table for
// positions [0, max_tokens). Throws xq::Error for an unknown cache mode.
std::unique_ptr<AttentionStep> make_attention_step(const Model& model, const EngineOptions& options,
                                                   int32_t max_tokens, const float* rope_cos_sin,
                                                   Communicator& tp_group, const TpShard& shard,
                                                   Range layer_range,
                                                   const std::vector<LayerShard>& layers);

}  // namespace xq
