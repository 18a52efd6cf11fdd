#include "runtime/attention_step.h"

#include <algorithm>
#include <functional>
#include <string>

#include "kernels/cpu/attention.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/error.h"
#include "runtime/cache_fp16.h"
#include "runtime/cache_mode.h"
#include "runtime/engine.h"
#include "runtime/partial_attention_merge.h"

namespace xq {
namespace {

// The cache settings every step shares: the engine's options for its layers.
CacheOptions cache_options(const EngineOptions& options, int32_t max_tokens,
                           const float* rope_cos_sin, Range layer_range) {
  CacheOptions c;
  c.mode = options.cache_mode;
  c.max_tokens = max_tokens;
  c.sequences = options.sequences;
  c.pool_bytes = options.cache_bytes;
  c.rope_cos_sin = rope_cos_sin;
  c.keep_outlier_channel = options.keep_outlier_channel;
  c.k_latent_per_head = options.k_latent_per_head;
  c.first_layer = static_cast<int32_t>(layer_range.begin);
  c.layers = static_cast<int32_t>(layer_range.count);
  c.cross_layer_restarts = options.cross_layer_restarts;
  return c;
}

// Runs attend(i) for every segment: the short ones (decode rows) together in
// one loop across threads, each on one thread with the cache's own block
// walk inline (a parallel_for inside another runs inline), so a step of many
// sequences costs one fork and join per layer instead of one per sequence;
// the long ones (prefill chunks) one after another, each parallel inside.
// Results do not depend on the split: the block walk folds in a fixed order.
void for_each_segment(const std::vector<Segment>& segments,
                      const std::function<void(size_t)>& attend) {
  constexpr int32_t kShortSegment = 8;
  std::vector<size_t> short_ones;
  for (size_t i = 0; i < segments.size(); ++i) {
    if (segments[i].n <= kShortSegment)
      short_ones.push_back(i);
    else
      attend(i);
  }
  if (short_ones.size() == 1) {
    attend(short_ones.front());
  } else if (!short_ones.empty()) {
    cpu::parallel_for(static_cast<int64_t>(short_ones.size()), [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) attend(short_ones[static_cast<size_t>(k)]);
    });
  }
}

// By head: this rank's query heads and the KV heads they read.
class HeadShardedAttention final : public AttentionStep {
 public:
  HeadShardedAttention(const Model& model, const CacheOptions& options, int tp,
                       const TpShard& shard, const std::vector<LayerShard>& layers)
      : config_(model.config()),
        tp_(tp),
        shard_(shard),
        layers_(layers),
        rope_cos_sin_(options.rope_cos_sin) {
    if (tp == 1) {
      cache_ = make_cache(model, options);  // every head: any mode
    } else {
      // A cache of this rank's KV heads, read by its query heads (which are
      // exactly those KV heads' groups: the group divides the KV heads). Only
      // fp16 keeps K and V per head, so only it is split this way.
      if (options.mode != "fp16")
        throw Error("cache mode '" + options.mode + "' cannot be split by KV head");
      ModelConfig local = config_;
      local.n_layers = options.layers;
      local.n_heads = static_cast<int32_t>(shard.heads.count);
      local.n_kv_heads = static_cast<int32_t>(shard.kv_heads.count);
      cache_ = std::make_unique<Fp16KvCache>(local, options);
    }
  }

  void run(const std::vector<Segment>& segments, int32_t layer, const float* normed, int32_t n,
           const int32_t* positions, float* attn) override {
    const LayerShard& w = layers_[static_cast<size_t>(layer)];
    const size_t rows = static_cast<size_t>(n);
    q_.resize(rows * static_cast<size_t>(w.wq.rows));
    k_.resize(rows * static_cast<size_t>(w.wk.rows));
    v_.resize(rows * static_cast<size_t>(w.wv.rows));
    cpu::matmul(w.wq, normed, n, q_.data());
    cpu::matmul(w.wk, normed, n, k_.data());
    cpu::matmul(w.wv, normed, n, v_.data());
    cpu::rope(q_.data(), positions, n, static_cast<int32_t>(shard_.heads.count), config_.head_dim,
              config_.rope_dim, config_.rope_layout, rope_cos_sin_);
    first_rows_.clear();
    size_t row = 0;
    for (const Segment& s : segments) {
      cache_->append(s.seq, layer, s.pos0, s.n, normed + row * config_.dim,
                     k_.data() + row * w.wk.rows, v_.data() + row * w.wv.rows);
      first_rows_.push_back(row);
      row += static_cast<size_t>(s.n);
    }
    for_each_segment(segments, [&](size_t i) {
      const Segment& s = segments[i];
      cache_->attend(s.seq, layer, s.pos0, s.n, q_.data() + first_rows_[i] * w.wq.rows,
                     attn + first_rows_[i] * w.wq.rows);
    });
  }

  AttentionCache& cache() override { return *cache_; }
  const AttentionCache& cache() const override { return *cache_; }
  size_t qkv_weight_bytes(int32_t layer) const override {
    const LayerShard& w = layers_[static_cast<size_t>(layer)];
    return slice_bytes(w.wq) + slice_bytes(w.wk) + slice_bytes(w.wv);
  }
  bool sequence_sharded() const override { return false; }
  std::string describe() const override {
    if (tp_ == 1) return cache_->describe();
    return cache_->describe() + "; sharded by KV head (this rank: KV heads [" +
           std::to_string(shard_.kv_heads.begin) + ", " + std::to_string(shard_.kv_heads.end()) +
           "))";
  }

 private:
  const ModelConfig& config_;
  int tp_;
  TpShard shard_;
  const std::vector<LayerShard>& layers_;
  const float* rope_cos_sin_;
  std::unique_ptr<AttentionCache> cache_;
  std::vector<float> q_, k_, v_;
  std::vector<size_t> first_rows_;  // each segment's first row in the step
};

// By sequence: every head over this rank's tokens, merged across the group;
// this rank keeps its own heads' rows for its slice of Wo.
class SequenceShardedAttention final : public AttentionStep {
 public:
  SequenceShardedAttention(const Model& model, CacheOptions options, Communicator& tp_group,
                           const TpShard& shard)
      : model_(model), comm_(tp_group), shard_(shard), rope_cos_sin_(options.rope_cos_sin) {
    first_layer_ = options.first_layer;
    options.sequence_shards = tp_group.size();
    options.sequence_shard = tp_group.rank();
    cache_ = make_cache(model, options);
  }

  void run(const std::vector<Segment>& segments, int32_t layer, const float* normed, int32_t n,
           const int32_t* positions, float* attn) override {
    const ModelConfig& c = model_.config();
    const LayerWeights& w = model_.layers()[static_cast<size_t>(first_layer_ + layer)];
    const size_t rows = static_cast<size_t>(n);
    q_.resize(rows * c.q_dim());
    k_.resize(rows * c.kv_dim());
    v_.resize(rows * c.kv_dim());
    cpu::matmul(w.wq, normed, n, q_.data());
    cpu::matmul(w.wk, normed, n, k_.data());
    cpu::matmul(w.wv, normed, n, v_.data());
    cpu::rope(q_.data(), positions, n, c.n_heads, c.head_dim, c.rope_dim, c.rope_layout,
              rope_cos_sin_);
    // Every segment's state goes into one (rows * n_heads, head_dim) state,
    // so the group merges the whole step with one all_gather.
    if (segments.size() == 1) {
      const Segment& s = segments.front();
      cache_->append(s.seq, layer, s.pos0, s.n, normed, k_.data(), v_.data());
      cache_->attend_partial(s.seq, layer, s.pos0, s.n, q_.data(), partial_);
    } else {
      partial_.reset(static_cast<int64_t>(n) * c.n_heads, c.head_dim);
      first_rows_.clear();
      size_t row = 0;
      for (const Segment& s : segments) {
        cache_->append(s.seq, layer, s.pos0, s.n, normed + row * c.dim,
                       k_.data() + row * c.kv_dim(), v_.data() + row * c.kv_dim());
        first_rows_.push_back(row);
        row += static_cast<size_t>(s.n);
      }
      if (segment_states_.size() < segments.size()) segment_states_.resize(segments.size());
      for_each_segment(segments, [&](size_t i) {
        const Segment& s = segments[i];
        cpu::PartialAttention& state = segment_states_[i];
        cache_->attend_partial(s.seq, layer, s.pos0, s.n, q_.data() + first_rows_[i] * c.q_dim(),
                               state);
        const size_t first = first_rows_[i] * c.n_heads,
                     count = static_cast<size_t>(s.n) * c.n_heads;
        std::copy_n(state.max.begin(), count, partial_.max.begin() + first);
        std::copy_n(state.sum.begin(), count, partial_.sum.begin() + first);
        std::copy_n(state.acc.begin(), count * c.head_dim,
                    partial_.acc.begin() + first * c.head_dim);
      });
    }
    merge_across(comm_, partial_);
    // This rank's heads of each query: rows i * n_heads + [heads.begin, heads.end()).
    const int64_t width = shard_.heads.count * c.head_dim;
    for (int32_t i = 0; i < n; ++i)
      cpu::normalize_attention(partial_, static_cast<int64_t>(i) * c.n_heads + shard_.heads.begin,
                               shard_.heads.count, attn + i * width);
  }

  AttentionCache& cache() override { return *cache_; }
  const AttentionCache& cache() const override { return *cache_; }
  size_t qkv_weight_bytes(int32_t layer) const override {
    // Every head's Q, K and V on every rank.
    const LayerWeights& w = model_.layers()[static_cast<size_t>(first_layer_ + layer)];
    return slice_bytes(w.wq) + slice_bytes(w.wk) + slice_bytes(w.wv);
  }
  bool sequence_sharded() const override { return true; }
  std::string describe() const override {
    return cache_->describe() + "; sharded by sequence over " + std::to_string(comm_.size()) +
           " TP rank(s)" + (cache_->mode() == "fp16" ? " (the KV heads do not split evenly)" : "");
  }

 private:
  const Model& model_;
  Communicator& comm_;
  TpShard shard_;
  const float* rope_cos_sin_;
  int32_t first_layer_ = 0;
  std::unique_ptr<AttentionCache> cache_;
  cpu::PartialAttention partial_;
  std::vector<cpu::PartialAttention> segment_states_;
  std::vector<size_t> first_rows_;
  std::vector<float> q_, k_, v_;
};

}  // namespace

std::unique_ptr<AttentionStep> make_attention_step(const Model& model, const EngineOptions& options,
                                                   int32_t max_tokens, const float* rope_cos_sin,
                                                   Communicator& tp_group, const TpShard& shard,
                                                   Range layer_range,
                                                   const std::vector<LayerShard>& layers) {
  const CacheOptions cache = cache_options(options, max_tokens, rope_cos_sin, layer_range);
  const int tp = tp_group.size();
  // The table says which modes may split by KV head (fp16) and where the
  // KV heads split evenly; elsewhere (the quantized modes, or SmolLM2's 3 KV
  // heads over 2 or 4 ranks, where a head would be held twice) the cache is
  // sharded by sequence. A group of one holds every head in any mode.
  const bool by_head =
      tp == 1 || shards_by_head(find_cache_mode(options.cache_mode), model.config(), tp);
  if (by_head) return std::make_unique<HeadShardedAttention>(model, cache, tp, shard, layers);
  return std::make_unique<SequenceShardedAttention>(model, cache, tp_group, shard);
}

}  // namespace xq
