// Tensor parallelism (pp = 1) of the forward pass: each rank of the grid's TP
// group runs its share of every layer (see parallel/shard.h) and the group sums
// the partial outputs once after Wo and once after down (all_reduce_sum).
// Caches: fp16 is sharded by head where tp divides the KV heads (each rank's
// cache holds only its own KV heads), else by sequence as follows. The
// quantized modes (kivi, xquant, xquant-cl) are sharded by
// sequence (architecture.md, "Sharding"): each rank computes Q, K and V for
// all heads (replicated, no communication), keeps only its own tokens' codes,
// attends over them for all heads, and the group merges the partial results
// (merge_across: one all_gather of n * heads * (head_dim + 2) floats per
// layer, whatever the context length); each rank then projects its own heads
// through its rows of Wo as before. Embedding, norms and the output head are
// replicated, so every rank ends with the full logits.
// An engine may also hold a contiguous range of layers only (one pipeline
// stage, see parallel/pipeline_engine.h): its weights and cache cover those
// layers, and embed / run_layers / head are the pieces forward() chains.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/cpu/attention.h"
#include "parallel/communicator.h"
#include "parallel/grid.h"
#include "parallel/shard.h"
#include "runtime/cache_fp16.h"
#include "runtime/engine.h"
#include "runtime/model.h"

namespace xq::parallel {

class TensorParallelEngine {
 public:
  // Collective-free; throws xq::Error unless grid.pp() == 1, for an unknown
  // cache mode, or when the model does not split over tp.
  TensorParallelEngine(const Model& model, const EngineOptions& options, Grid& grid);
  // The same over any communicator (its size is tp, its rank the TP rank).
  TensorParallelEngine(const Model& model, const EngineOptions& options, Communicator& tp_group);
  // Layers [layers.begin, layers.end()) only: a pipeline stage's share.
  TensorParallelEngine(const Model& model, const EngineOptions& options, Communicator& tp_group,
                       Range layers);

  // The xq::Engine contract; collective over the TP group (every member calls
  // it with the same arguments) and every member gets the full logits.
  void forward(int32_t seq, const int32_t* tokens, int32_t n, int32_t pos0, float* logits,
               int32_t first_logit_row);
  void truncate(int32_t seq, int32_t from);

  // Throws xq::Error for positions beyond capacity or token ids out of range.
  void check_input(const int32_t* tokens, int32_t n, int32_t pos0) const;
  // hidden (n, dim) = the embeddings of tokens (no communication).
  void embed(const int32_t* tokens, int32_t n, float* hidden) const;
  // Runs this engine's layers in place on hidden (n, dim) at positions
  // [pos0, pos0 + n); collective over the TP group.
  void run_layers(int32_t seq, float* hidden, int32_t n, int32_t pos0);
  // logits (n, vocab) = output head of the final norm of hidden (n, dim).
  void head(const float* hidden, int32_t n, float* logits);
  Range layers() const { return layer_range_; }
  int32_t length(int32_t seq) const;

  const TpShard& shard() const { return shard_; }
  // Bytes of weights one decode step reads on this rank: its slices of its
  // layers and their norms, plus one embedding row when it holds layer 0 and
  // the final norm and (replicated) output head when it holds the last layer.
  size_t weight_bytes() const;
  // Bytes this rank's cache holds now (fp16 K and V of its heads, or the
  // codes of its tokens), counted as written.
  size_t cache_bytes_in_use() const;
  // What the cache keeps (the mode's description).
  std::string cache_description() const;
  bool sequence_sharded() const { return sharded_cache_ != nullptr; }
  const Model& model() const { return model_; }
  int32_t max_tokens() const { return max_tokens_; }

 private:
  // One local KV head and the contiguous local query heads that read it.
  struct KvGroup {
    int32_t kv_local = 0;               // index among this rank's KV heads
    int32_t head_first = 0, heads = 0;  // local query heads
    std::unique_ptr<Fp16KvCache> cache;
  };

  void ensure_scratch(int32_t n);
  // The attention block's heads into attn_ (n, this rank's heads * head_dim).
  void attend_by_head(int32_t seq, int32_t layer, int32_t n, int32_t pos0);
  void attend_sharded(int32_t seq, int32_t layer, int32_t n, int32_t pos0);

  const Model& model_;
  Communicator& comm_;
  TpShard shard_;
  Range layer_range_;
  int32_t max_tokens_;
  std::vector<LayerShard> layers_;
  std::vector<KvGroup> groups_;                    // fp16: one cache per local KV head
  std::unique_ptr<AttentionCache> sharded_cache_;  // quantized modes: this rank's tokens
  cpu::PartialAttention partial_;
  std::vector<float> rope_cos_sin_;
  std::vector<float> hidden_, normed_, q_, k_, v_, attn_, proj_, gate_, up_;
  std::vector<float> group_q_, group_k_, group_v_, group_out_;
  std::vector<float> q_all_, k_all_, v_all_;  // every head's (sequence-sharded modes)
  std::vector<int32_t> positions_;
};

}  // namespace xq::parallel
