// The quantized cache modes, one class and one code path; the table in
// runtime/cache_mode.h says what each mode stores (xquant-spec §1-§5):
//   kivi-B    K before RoPE per channel, V per token (the KIVI* baseline);
//   xquant-B  X per token, K and V rebuilt with the layer's Wk, Wv;
//             on GQA models, where K+V is narrower than X, the SVD latents
//             X·Uk (per channel) and X·Uv (per token) instead, rebuilt with
//             the fused Σ·Bᵀ matrices (runtime/latent_basis.h).
//   xquant-cl-B  closed-loop cross-layer deltas (§3): layers 0-2 at 4 bits,
//             layer 2 the base, then Q(X_i - Xhat_{i-1}) per token; on GQA
//             models in the latent of [Wk | Wv]. One accumulator per token.
// Every quantized mode keeps layers 0-2 at 4 bits at least, as the paper's
// Table 4 does.
// Everything a mode keeps per token (codes, scales, zero points, the fp16
// window, accumulator rows, outlier channels) lives in the blocks of the
// cache's pool (runtime/block_pool.h, docs/design.md "The cache pool").
// A mode is a list of stored streams (what is quantized and how) plus, for K
// and V, which stream they come from and the matrix that rebuilds them.
// Decode never rebuilds V: the attention-weighted sum is taken over the stored
// rows and projected once per head.
// Sequence sharding (CacheOptions::sequence_shards = S, shard r): the tokens
// are dealt by runtime/sequence_shard.h in units of the layout's shard_unit()
// (one token, or one 128-token group where a stream is quantized per channel,
// so that each group's scales come from the same tokens as in one unsharded
// cache). Each shard stores and reads only its own tokens (at their global
// positions for RoPE and the causal mask), so the shards' bytes add up to one
// unsharded cache's and their merged attend_partial() results equal its
// attend() up to rounding.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "kernels/cpu/aligned_vector.h"
#include "runtime/cache.h"
#include "runtime/cache_mode.h"
#include "runtime/latent_basis.h"
#include "runtime/row_store.h"
#include "runtime/sequence_shard.h"

namespace xq {

class QuantizedCache : public AttentionCache {
 public:
  // `spec` must be a quantized row of the table (runtime/cache_mode.h).
  QuantizedCache(const Model& model, const CacheOptions& options, const CacheModeSpec& spec);

  std::string mode() const override { return mode_; }
  // What the mode keeps and why (printed by the tools).
  std::string describe() const override { return description_; }
  void append(int32_t seq, int32_t layer, int32_t pos0, int32_t n, const float* x, const float* k,
              const float* v) override;
  void attend(int32_t seq, int32_t layer, int32_t pos0, int32_t n, const float* q,
              float* out) override;
  void attend_partial(int32_t seq, int32_t layer, int32_t pos0, int32_t n, const float* q,
                      cpu::PartialAttention& state) override;
  void truncate(int32_t seq, int32_t from) override;
  int32_t length(int32_t seq) const override;
  double bytes_per_token() const override;
  double fp16_bytes_per_token() const override {
    return 2.0 * sizeof(uint16_t) * config_.kv_dim() * static_cast<double>(layers_.size());
  }
  size_t bytes_for_tokens(int32_t tokens) const override;
  size_t payload_bytes() const override;
  size_t block_bytes() const override { return pool_.block_bytes(); }
  int32_t total_blocks() const override { return pool_.total_blocks(); }
  int32_t free_blocks() const override { return pool_.free_blocks(); }
  int32_t sequences() const override { return static_cast<int32_t>(lengths_.size()); }
  int32_t blocks_for_tokens(int32_t tokens) const override {
    return local_blocks(shard_.owned_before(tokens));
  }
  int32_t blocks_for_step(int32_t from, int32_t to) const override;
  // Tokens of the fp16 window one window page holds (0: the mode has no
  // per-channel stream, so no window).
  int32_t window_tokens() const { return window_tokens_; }
  CacheBlockLayout block_layout() const override;
  CacheBlocksView blocks(int32_t seq) const override;

 private:
  struct Layer {
    std::vector<RowStore> stores;  // the layout's streams, in its order
    // Encoders X -> X·Uk, X·Uv (SVD latents); XQuant-CL on GQA: encode_k is
    // the latent of [Wk | Wv] (runtime/latent_basis.h).
    Projection encode_k, encode_v;
    Projection decode_x;  // XQuant-CL on GQA: latent -> X (U as rows of d)
    // Stored rows -> K before RoPE, V (empty: the rows are K or V).
    Projection rebuild_k, rebuild_v;
    // Latents from the engine's K and V instead of X (V S⁻¹, input-major;
    // per-head blocks for K when rebuild_k_per_head). Empty: encode from X.
    cpu::AlignedVector<float> latent_from_k, latent_from_v;
    bool rebuild_k_per_head = false;  // rebuild_k is (kv, head_dim): one block per KV head
    // rebuild_k input-major (per diagonal block if per head).
    cpu::AlignedVector<float> rebuild_k_t;
  };

  // The block walk behind decode and attend_partial: positions are global,
  // the walk covers this cache's own tokens.
  void attend_blocks(int32_t seq, int32_t layer, int32_t pos0, int32_t n, const float* q,
                     cpu::PartialAttention& state);
  // Width of the stored rows K is rebuilt from: X (or Xhat) where the mode
  // caches X or its deltas, else K itself or its latent.
  int64_t key_source_width() const {
    return layout_.kv_source == KvSource::kRebuiltFromX ||
                   layout_.kv_source == KvSource::kCrossLayerDeltas
               ? config_.dim
               : config_.kv_dim();
  }
  void append_own(int32_t seq, int32_t layer, int32_t pos0, int32_t n, const float* x,
                  const float* k, const float* v);
  void rebuild_keys(const Layer& layer, const float* source, int32_t rows, int64_t k_width,
                    float* keys) const;
  void decode_cross_layer_latent(const Layer& layer, const float* latent, int32_t rows,
                                 float* x_rows) const;
  void encode_cross_layer_latent(const Layer& layer, const float* deltas, int32_t rows,
                                 float* latent) const;
  // Blocks of `tokens` local tokens at rest: one per group begun, plus the
  // window pages of the partial group.
  int32_t local_blocks(int32_t tokens) const {
    return (tokens + kBlockTokens - 1) / kBlockTokens + window_pages(tokens % kBlockTokens);
  }
  int32_t window_pages(int32_t window_rows) const {
    return window_tokens_ ? (window_rows + window_tokens_ - 1) / window_tokens_ : 0;
  }
  // Lays the streams, outliers and accumulator out in a block and sizes the pool.
  void lay_out_blocks(const CacheOptions& options);
  // Takes the blocks one layer's append up to `local_end` own tokens needs;
  // throws PoolExhausted before anything changes.
  void reserve(int32_t seq, int32_t local_end);
  // Once every layer holds the same tokens, gives back the window pages the
  // layers still behind kept until now.
  void settle(int32_t seq);
  // Zeroes the accumulator rows of the sequence's group blocks from `first_group` on.
  void clear_accumulator(int32_t seq, int32_t first_group);
  // The CL accumulator row (Xhat of the last layer read, dim floats) of local
  // token t; the rows of one block follow each other.
  float* accumulator_row(int32_t seq, int32_t t) {
    return reinterpret_cast<float*>(pool_.block(tables_[seq].groups[t / kBlockTokens]) +
                                    accumulator_offset_) +
           static_cast<size_t>(t % kBlockTokens) * config_.dim;
  }

  const ModelConfig config_;
  std::string mode_, description_;
  CacheLayout layout_;  // the mode's streams and rebuild on this model
  int32_t max_tokens_;  // per sequence, all shards together
  const float* rope_cos_sin_;
  std::vector<Layer> layers_;
  std::vector<int32_t> positions_;  // global position of each stored token: 0, 1, 2, ... unsharded
  int32_t first_layer_ = 0;         // model index of this cache's layer 0
  SequenceShard shard_;             // the tokens this cache holds
  std::vector<int32_t> lengths_;    // per sequence, global (every shard knows it)
  // Per model layer of this cache: XQuant-CL codes a delta from the previous
  // layer's reconstruction (else X itself), and keeps its reconstruction in
  // the accumulator for the next layer.
  std::vector<bool> cross_layer_delta_, cross_layer_keeps_;
  cpu::AlignedVector<float> own_x_, own_k_, own_v_;  // this shard's rows of an append
  // Scratch for one attend call.
  cpu::AlignedVector<float> k_source_, v_source_, keys_, values_, encoded_, delta_;
  bool cross_layer_accumulator_ = false;  // XQuant-CL: one fp32 Xhat row per token
  // --keep-outlier-channel: channel 0 of X·Uk per (layer, token), fp16.
  bool keep_outlier_ = false;
  // The outliers_per_token_ fp16 values of local token t at layer `layer`.
  uint16_t* outliers(int32_t seq, int32_t layer, int32_t t) {
    return reinterpret_cast<uint16_t*>(pool_.block(tables_[seq].groups[t / kBlockTokens]) +
                                       outlier_offsets_[layer]) +
           static_cast<size_t>(t % kBlockTokens) * outliers_per_token_;
  }
  // The pool and where things sit in its blocks (docs/design.md, "The cache pool").
  BlockPool pool_;
  std::vector<BlockTable> tables_;  // per sequence
  int32_t window_tokens_ = 0;
  size_t accumulator_offset_ = 0;
  std::vector<size_t> outlier_offsets_;  // per layer
  // Global positions appended, per sequence and layer (layers fill one by one).
  std::vector<int32_t> layer_ends_;
  // The latent channel of the k-th outlier: channel 0 of each head's latent.
  int64_t outlier_channel(int32_t k) const { return static_cast<int64_t>(k) * config_.head_dim; }
  void multiply_blocks(const float* in, int32_t rows, const cpu::AlignedVector<float>& blocks_t,
                       int64_t block, float* out) const;
  void restore_outliers(int32_t seq, int32_t layer, int32_t t0, int32_t rows, float* latent_rows);
  bool k_latent_per_head_ = true;
  int32_t outliers_per_token_ = 1;
  int32_t sequences_ = 1;
};

}  // namespace xq
