// The forward pass of a Llama-architecture model, and the interface every way
// of running it shares.
//
// `Engine` is what generation, perplexity, the pipeline and a batch scheduler
// take: tokens in, logits (or a sampled token) out, a cache per sequence.
// `TransformerEngine` is the one layer loop behind it. It runs over a
// Communicator: a group of one for a single process (every collective is the
// identity), or one tensor-parallel group, where each rank holds its share of
// every layer (runtime/shard.h) and the group sums the partial outputs once
// after Wo and once after down. It may hold a contiguous range of layers only
// (one pipeline stage, parallel/pipeline_engine.h): embed / run_layers / head
// are the pieces forward() chains. Attention is the pluggable step
// (runtime/attention_step.h): this rank's heads over its own cache, or every
// head over this rank's tokens merged across the group.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "runtime/attention_step.h"
#include "runtime/cache.h"
#include "runtime/communicator.h"
#include "runtime/model.h"
#include "runtime/sampler.h"
#include "runtime/shard.h"

namespace xq {

struct EngineOptions {
  int threads = 1;
  int32_t max_tokens = 0;  // cache capacity per sequence; 0 = the model's context length
  int32_t sequences = 1;   // sequence slots (bookkeeping only)
  // The cache pool's budget on each rank (--cache-memory); 0: room for
  // `sequences` sequences of max_tokens tokens.
  size_t cache_bytes = 0;
  std::string cache_mode = "fp16";
  bool keep_outlier_channel = false;  // xquant on GQA: channel 0 of X·Uk in fp16
  bool k_latent_per_head = true;      // xquant on GQA: see CacheOptions
  // xquant-cl: layers where a new chain starts (see CacheOptions); a
  // pipeline's stages start one at their first layers by themselves.
  std::vector<int32_t> cross_layer_restarts;
};

// Throws xq::Error for positions [pos0, pos0 + n) beyond max_tokens or a token
// id outside the vocabulary: what every engine's forward() checks first.
void check_forward_input(const ModelConfig& config, int32_t max_tokens, const int32_t* tokens,
                         int32_t n, int32_t pos0);

// One sequence's part of a batched step: its next n tokens at positions
// [pos0, pos0 + n) (a prefill chunk, or one decode token).
struct Segment {
  int32_t seq = 0;
  int32_t pos0 = 0;
  const int32_t* tokens = nullptr;
  int32_t n = 0;
  bool wants_logits = false;  // the logits of its last row
};

// What a scheduler needs to know of the cache pool, for the tightest rank of
// a parallel engine (each rank's pool holds the same budget; ranks differ in
// bytes per block, and under sequence sharding in the tokens they keep).
struct PoolInfo {
  int32_t block_tokens = 0;  // token positions per block
  int32_t total_blocks = 0;  // on the tightest rank
  size_t block_bytes = 0;    // bytes of one block on that rank
  size_t budget_bytes = 0;   // the budget each rank was given
};

class Engine {
 public:
  virtual ~Engine() = default;

  // Runs n tokens of sequence `seq` at positions [pos0, pos0 + n) and writes the
  // logits of rows [first_logit_row, n) to `logits` ((n - first_logit_row), vocab;
  // nothing when logits is null). Throws xq::Error for a token id out of range
  // or positions beyond capacity. A parallel engine's forward is collective:
  // every rank calls it with the same arguments and gets the same logits.
  virtual void forward(int32_t seq, const int32_t* tokens, int32_t n, int32_t pos0, float* logits,
                       int32_t first_logit_row) = 0;
  // forward() of n tokens, then the next token sampled from the last row's
  // logits, with its top-1 minus top-2 margin. Every rank of a parallel engine
  // samples with the same state, so `sampler` must be seeded alike on all.
  virtual SampledToken forward_sample(int32_t seq, const int32_t* tokens, int32_t n, int32_t pos0,
                                      Sampler& sampler);
  // Drops the tokens of `seq` from position `from` on.
  virtual void truncate(int32_t seq, int32_t from) = 0;
  virtual int32_t length(int32_t seq) const = 0;
  virtual int32_t max_tokens() const = 0;
  virtual const Model& model() const = 0;
  // This rank's cache: the mode's description (and how it is sharded), the
  // bytes it holds now as written, and its size by the mode's formula as a
  // fraction of an fp16 K and V cache of the same layers.
  virtual std::string cache_description() const = 0;
  virtual size_t cache_bytes_in_use() const = 0;
  virtual double cache_fraction_of_fp16() const = 0;

  // Runs every segment as one batch: all rows go through each layer together
  // (a matmul reads the weights once for all of them) and attention runs per
  // segment over its own sequence. Writes the last row's logits of each
  // segment with wants_logits, in segment order, to logits (count, vocab).
  // A row's result does not depend on the other segments. Segments name
  // distinct sequences. Collective like forward(); a parallel engine returns
  // the logits on every rank. Throws PoolExhausted when a block is missing
  // (nothing of the step is then kept) and xq::Error for bad input.
  virtual void forward_batch(const std::vector<Segment>& segments, float* logits);
  // Sequence slots: ids [0, sequence_slots()).
  virtual int32_t sequence_slots() const = 0;
  virtual PoolInfo pool() const = 0;
  // Blocks a sequence of `tokens` tokens holds on the tightest rank.
  virtual int32_t blocks_for_tokens(int32_t tokens) const = 0;
  // The most blocks it holds while one step takes it from `from` to `to`
  // tokens (runtime/cache.h: a shrinking fp16 window keeps its pages until
  // the step's last layer).
  virtual int32_t blocks_for_step(int32_t from, int32_t to) const {
    return std::max(blocks_for_tokens(from), blocks_for_tokens(to));
  }
  // Gives the blocks of `seq` back (truncate to 0).
  void release(int32_t seq) { truncate(seq, 0); }

 private:
  std::vector<float> last_row_;  // forward_sample's logits
};

class TransformerEngine final : public Engine {
 public:
  // One process: every layer, every head, a group of one.
  TransformerEngine(const Model& model, const EngineOptions& options);
  // One rank of `tp_group` (its size is tp, its rank the TP rank), holding
  // layers [layers.begin, layers.end()) (all of them when layers.count is 0).
  // Collective-free; throws xq::Error for an unknown cache mode, layers not
  // in the model, or a model that does not split over tp.
  TransformerEngine(const Model& model, const EngineOptions& options, Communicator& tp_group,
                    Range layers = {});

  // Engine: collective over the TP group. forward() needs every layer.
  void forward(int32_t seq, const int32_t* tokens, int32_t n, int32_t pos0, float* logits,
               int32_t first_logit_row) override;
  void truncate(int32_t seq, int32_t from) override { attention_->cache().truncate(seq, from); }
  int32_t length(int32_t seq) const override { return attention_->cache().length(seq); }
  int32_t max_tokens() const override { return max_tokens_; }
  const Model& model() const override { return model_; }
  std::string cache_description() const override { return attention_->describe(); }
  size_t cache_bytes_in_use() const override { return attention_->cache().bytes_in_use(); }
  double cache_fraction_of_fp16() const override { return attention_->cache().fraction_of_fp16(); }
  int32_t sequence_slots() const override { return attention_->cache().sequences(); }
  PoolInfo pool() const override;
  int32_t blocks_for_tokens(int32_t tokens) const override {
    return attention_->cache().blocks_for_tokens(tokens);
  }
  int32_t blocks_for_step(int32_t from, int32_t to) const override {
    return attention_->cache().blocks_for_step(from, to);
  }

  // The pieces of forward(), for a pipeline stage.
  // Throws xq::Error for positions beyond capacity or token ids out of range.
  void check_input(const int32_t* tokens, int32_t n, int32_t pos0) const;
  // hidden (n, dim) = the embeddings of tokens (no communication).
  void embed(const int32_t* tokens, int32_t n, float* hidden) const;
  // Runs this engine's layers in place on hidden (n, dim) at positions
  // [pos0, pos0 + n); collective over the TP group.
  void run_layers(int32_t seq, float* hidden, int32_t n, int32_t pos0);
  // The same for a batch of segments: hidden (rows, dim) holds their rows in
  // segment order. A segment starting before its sequence's length rewrites
  // from there.
  void run_layers(const std::vector<Segment>& segments, float* hidden);
  // Throws xq::Error for a segment forward_batch cannot run (a slot out of
  // range, a sequence twice, a gap after its length, bad tokens) and
  // PoolExhausted when this rank's pool lacks the blocks; writes nothing.
  void check_batch(const std::vector<Segment>& segments) const;
  void forward_batch(const std::vector<Segment>& segments, float* logits) override;
  // logits (n, vocab) = output head of the final norm of hidden (n, dim).
  void head(const float* hidden, int32_t n, float* logits);

  AttentionCache& cache() { return attention_->cache(); }
  const AttentionCache& cache() const { return attention_->cache(); }
  Range layers() const { return layer_range_; }
  const TpShard& shard() const { return shard_; }
  bool sequence_sharded() const { return attention_->sequence_sharded(); }
  // Bytes of weights one decode step reads on this rank: its slices of its
  // layers and their norms, plus one embedding row when it holds layer 0 and
  // the final norm and (replicated) output head when it holds the last layer.
  size_t weight_bytes() const;

 private:
  void ensure_scratch(int32_t n);

  const Model& model_;
  SingleProcessCommunicator single_process_;  // the group when none is given
  Communicator& comm_;
  TpShard shard_;
  Range layer_range_;
  int32_t max_tokens_;
  std::vector<LayerShard> layers_;
  std::vector<float> rope_cos_sin_;
  std::unique_ptr<AttentionStep> attention_;
  // Activations of the current batch, (n, width) each.
  std::vector<float> hidden_, normed_, attn_, proj_, gate_, up_;
  std::vector<int32_t> positions_;
  std::vector<float> head_rows_;  // the rows forward_batch scores
};

}  // namespace xq
