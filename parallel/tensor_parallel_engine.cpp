#include "parallel/tensor_parallel_engine.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "kernels/cpu/matmul.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/thread_pool.h"
#include "parallel/partial_attention_merge.h"
#include "kernels/error.h"

namespace xq::parallel {
namespace {

Communicator& pp1_tp_group(Grid& grid) {
  if (grid.pp() != 1)
    throw Error("tensor parallel engine: the grid has " + std::to_string(grid.pp()) +
                " pipeline stages; this engine runs pp = 1 only");
  return grid.tp_group();
}

// Copies columns [col, col + width) of each of n rows of stride `stride`.
void gather(const float* src, int64_t stride, int64_t col, int64_t width, int32_t n, float* dst) {
  for (int32_t i = 0; i < n; ++i)
    std::memcpy(dst + i * width, src + i * stride + col,
                static_cast<size_t>(width) * sizeof(float));
}

void scatter(const float* src, int64_t width, int32_t n, float* dst, int64_t stride, int64_t col) {
  for (int32_t i = 0; i < n; ++i)
    std::memcpy(dst + i * stride + col, src + i * width,
                static_cast<size_t>(width) * sizeof(float));
}

}  // namespace

TensorParallelEngine::TensorParallelEngine(const Model& model, const EngineOptions& options,
                                           Grid& grid)
    : TensorParallelEngine(model, options, pp1_tp_group(grid)) {}

TensorParallelEngine::TensorParallelEngine(const Model& model, const EngineOptions& options,
                                           Communicator& tp_group)
    : TensorParallelEngine(model, options, tp_group, Range{0, model.config().n_layers}) {}

TensorParallelEngine::TensorParallelEngine(const Model& model, const EngineOptions& options,
                                           Communicator& tp_group, Range layers)
    : model_(model), comm_(tp_group), layer_range_(layers) {
  const ModelConfig& c = model.config();
  if (layers.begin < 0 || layers.count < 1 || layers.end() > c.n_layers)
    throw Error("tensor parallel engine: layers [" + std::to_string(layers.begin) + ", " +
                std::to_string(layers.end()) + ") are not a non-empty part of the model's " +
                std::to_string(c.n_layers));
  shard_ = plan_shard(model, comm_.size(), comm_.rank());
  max_tokens_ = options.max_tokens > 0 ? options.max_tokens : c.max_seq_len;
  cpu::set_thread_count(options.threads);
  rope_cos_sin_.resize(static_cast<size_t>(max_tokens_) * c.rope_dim);
  cpu::rope_table(rope_cos_sin_.data(), max_tokens_, c.rope_dim, c.rope_theta);
  for (int64_t l = layers.begin; l < layers.end(); ++l)
    layers_.push_back(shard_layer(model.layers()[static_cast<size_t>(l)], c, shard_));

  CacheOptions cache_options;
  cache_options.mode = options.cache_mode;
  cache_options.max_tokens = max_tokens_;
  cache_options.sequences = options.sequences;
  cache_options.rope_cos_sin = rope_cos_sin_.data();
  // fp16 splits by KV head where the KV heads split evenly; elsewhere (e.g.
  // SmolLM2's 3 KV heads over 2 or 4 ranks, where a head would be held twice)
  // it is sharded by sequence like the quantized modes.
  const bool by_head = options.cache_mode == "fp16" && c.n_kv_heads % comm_.size() == 0;
  if (!by_head) {
    cache_options.keep_outlier_channel = options.keep_outlier_channel;
    cache_options.k_latent_per_head = options.k_latent_per_head;
    cache_options.first_layer = static_cast<int32_t>(layers.begin);
    cache_options.layers = static_cast<int32_t>(layers.count);
    cache_options.cross_layer_restarts = options.cross_layer_restarts;
    cache_options.sequence_shards = comm_.size();
    cache_options.sequence_shard = comm_.rank();
    sharded_cache_ = make_cache(model, cache_options);
    return;
  }
  const int64_t group = c.n_heads / c.n_kv_heads;
  for (int64_t g = shard_.kv_heads.begin; g < shard_.kv_heads.end(); ++g) {
    const int64_t first = std::max(shard_.heads.begin, g * group);
    const int64_t last = std::min(shard_.heads.end(), (g + 1) * group);
    KvGroup kv;
    kv.kv_local = static_cast<int32_t>(g - shard_.kv_heads.begin);
    kv.head_first = static_cast<int32_t>(first - shard_.heads.begin);
    kv.heads = static_cast<int32_t>(last - first);
    // A cache of one KV head read by kv.heads query heads.
    ModelConfig local = c;
    local.n_layers = static_cast<int32_t>(layers.count);  // this engine's layers only
    local.n_heads = kv.heads;
    local.n_kv_heads = 1;
    kv.cache = std::make_unique<Fp16KvCache>(local, cache_options);
    groups_.push_back(std::move(kv));
  }
}

size_t TensorParallelEngine::weight_bytes() const {
  const ModelConfig& c = model_.config();
  size_t total = 0;
  if (layer_range_.begin == 0) total += model_.token_embedding().row_bytes;
  if (layer_range_.end() == c.n_layers)
    total += slice_bytes(model_.output()) + static_cast<size_t>(c.dim) * sizeof(float);
  for (size_t i = 0; i < layers_.size(); ++i) {
    const LayerShard& l = layers_[i];
    const LayerWeights& whole = model_.layers()[layer_range_.begin + i];
    // Sequence-sharded caches need every head's Q, K and V on every rank.
    total += sharded_cache_ ? slice_bytes(whole.wq) + slice_bytes(whole.wk) + slice_bytes(whole.wv)
                            : slice_bytes(l.wq) + slice_bytes(l.wk) + slice_bytes(l.wv);
    total += slice_bytes(l.wo) + slice_bytes(l.w_gate) + slice_bytes(l.w_up) +
             slice_bytes(l.w_down) + 2 * static_cast<size_t>(c.dim) * sizeof(float);
  }
  return total;
}

size_t TensorParallelEngine::cache_bytes_in_use() const {
  if (sharded_cache_) return sharded_cache_->bytes_in_use();
  size_t total = 0;
  for (const KvGroup& g : groups_) total += g.cache->bytes_in_use();
  return total;
}

std::string TensorParallelEngine::cache_description() const {
  if (sharded_cache_)
    return sharded_cache_->describe() + "; sharded by sequence over " +
           std::to_string(comm_.size()) + " TP rank(s)" +
           (sharded_cache_->mode() == "fp16" ? " (the KV heads do not split evenly)" : "");
  return "fp16 K and V, sharded by KV head (this rank: KV heads [" +
         std::to_string(shard_.kv_heads.begin) + ", " + std::to_string(shard_.kv_heads.end()) +
         "))";
}

void TensorParallelEngine::truncate(int32_t seq, int32_t from) {
  if (sharded_cache_) sharded_cache_->truncate(seq, from);
  for (KvGroup& g : groups_) g.cache->truncate(seq, from);
}

int32_t TensorParallelEngine::length(int32_t seq) const {
  return sharded_cache_ ? sharded_cache_->length(seq) : groups_.front().cache->length(seq);
}

void TensorParallelEngine::ensure_scratch(int32_t n) {
  const ModelConfig& c = model_.config();
  const size_t rows = static_cast<size_t>(n);
  const size_t q_width = static_cast<size_t>(shard_.heads.count) * c.head_dim;
  const size_t kv_width = static_cast<size_t>(shard_.kv_heads.count) * c.head_dim;
  hidden_.resize(rows * c.dim);
  normed_.resize(rows * c.dim);
  q_.resize(rows * q_width);
  k_.resize(rows * kv_width);
  v_.resize(rows * kv_width);
  attn_.resize(rows * q_width);
  proj_.resize(rows * c.dim);
  gate_.resize(rows * static_cast<size_t>(shard_.ffn.count));
  up_.resize(rows * static_cast<size_t>(shard_.ffn.count));
  group_q_.resize(rows * q_width);
  group_out_.resize(rows * q_width);
  group_k_.resize(rows * c.head_dim);
  group_v_.resize(rows * c.head_dim);
  positions_.resize(rows);
  if (sharded_cache_) {
    q_all_.resize(rows * c.q_dim());
    k_all_.resize(rows * c.kv_dim());
    v_all_.resize(rows * c.kv_dim());
  }
}

void TensorParallelEngine::check_input(const int32_t* tokens, int32_t n, int32_t pos0) const {
  check_forward_input(model_.config(), max_tokens_, tokens, n, pos0);
}

void TensorParallelEngine::embed(const int32_t* tokens, int32_t n, float* hidden) const {
  const ModelConfig& c = model_.config();
  for (int32_t i = 0; i < n; ++i)
    cpu::matrix_row_to_float(model_.token_embedding(), tokens[i],
                             hidden + static_cast<size_t>(i) * c.dim);
}

void TensorParallelEngine::forward(int32_t seq, const int32_t* tokens, int32_t n, int32_t pos0,
                                   float* logits, int32_t first_logit_row) {
  const ModelConfig& c = model_.config();
  if (n <= 0) return;
  if (layer_range_.begin != 0 || layer_range_.end() != c.n_layers)
    throw Error("forward: this engine holds layers [" + std::to_string(layer_range_.begin) + ", " +
                std::to_string(layer_range_.end()) + ") only; a pipeline stage runs run_layers");
  check_input(tokens, n, pos0);
  ensure_scratch(n);
  embed(tokens, n, hidden_.data());
  run_layers(seq, hidden_.data(), n, pos0);
  const int32_t first = std::clamp(first_logit_row, 0, n);
  const int32_t scored = n - first;
  if (scored == 0 || logits == nullptr) return;
  head(hidden_.data() + static_cast<size_t>(first) * c.dim, scored, logits);
}

void TensorParallelEngine::head(const float* hidden, int32_t n, float* logits) {
  const ModelConfig& c = model_.config();
  if (n <= 0) return;
  const size_t rows = static_cast<size_t>(n) * c.dim;
  if (normed_.size() < rows) normed_.resize(rows);  // hidden may point into hidden_
  cpu::rmsnorm(hidden, model_.output_norm(), normed_.data(), n, c.dim, c.rms_eps);
  cpu::matmul(model_.output(), normed_.data(), n, logits);
}

// fp16, sharded by head: this rank's Q, K, V heads and its KV caches.
void TensorParallelEngine::attend_by_head(int32_t seq, int32_t layer, int32_t n, int32_t pos0) {
  const ModelConfig& c = model_.config();
  const LayerShard& w = layers_[static_cast<size_t>(layer)];
  const int64_t hd = c.head_dim;
  const int64_t q_width = shard_.heads.count * hd, kv_width = shard_.kv_heads.count * hd;
  cpu::matmul(w.wq, normed_.data(), n, q_.data());
  cpu::matmul(w.wk, normed_.data(), n, k_.data());
  cpu::matmul(w.wv, normed_.data(), n, v_.data());
  cpu::rope(q_.data(), positions_.data(), n, static_cast<int32_t>(shard_.heads.count), c.head_dim,
            c.rope_dim, c.rope_layout, rope_cos_sin_.data());
  for (KvGroup& g : groups_) {
    const int64_t width = g.heads * hd;
    gather(k_.data(), kv_width, g.kv_local * hd, hd, n, group_k_.data());
    gather(v_.data(), kv_width, g.kv_local * hd, hd, n, group_v_.data());
    gather(q_.data(), q_width, g.head_first * hd, width, n, group_q_.data());
    g.cache->append(seq, layer, pos0, n, normed_.data(), group_k_.data(), group_v_.data());
    g.cache->attend(seq, layer, pos0, n, group_q_.data(), group_out_.data());
    scatter(group_out_.data(), width, n, attn_.data(), q_width, g.head_first * hd);
  }
}

// Quantized modes, sharded by sequence: every head's Q, K, V (the same rows as
// one rank computes), attention over this rank's tokens, merged across the
// group; this rank keeps its own heads' rows for its slice of Wo.
void TensorParallelEngine::attend_sharded(int32_t seq, int32_t layer, int32_t n, int32_t pos0) {
  const ModelConfig& c = model_.config();
  const LayerWeights& w = model_.layers()[static_cast<size_t>(layer_range_.begin + layer)];
  const int64_t hd = c.head_dim, q_width = shard_.heads.count * hd;
  cpu::matmul(w.wq, normed_.data(), n, q_all_.data());
  cpu::matmul(w.wk, normed_.data(), n, k_all_.data());
  cpu::matmul(w.wv, normed_.data(), n, v_all_.data());
  cpu::rope(q_all_.data(), positions_.data(), n, c.n_heads, c.head_dim, c.rope_dim, c.rope_layout,
            rope_cos_sin_.data());
  sharded_cache_->append(seq, layer, pos0, n, normed_.data(), k_all_.data(), v_all_.data());
  sharded_cache_->attend_partial(seq, layer, pos0, n, q_all_.data(), partial_);
  merge_across(comm_, partial_);
  for (int32_t i = 0; i < n; ++i)
    for (int64_t h = 0; h < shard_.heads.count; ++h) {
      const int64_t row = static_cast<int64_t>(i) * c.n_heads + shard_.heads.begin + h;
      const float inv = 1.0f / partial_.sum[row];
      const float* merged = partial_.acc.data() + row * hd;
      float* dst = attn_.data() + i * q_width + h * hd;
      for (int64_t j = 0; j < hd; ++j) dst[j] = merged[j] * inv;
    }
}

void TensorParallelEngine::run_layers(int32_t seq, float* hidden, int32_t n, int32_t pos0) {
  const ModelConfig& c = model_.config();
  if (n <= 0) return;
  ensure_scratch(n);
  for (int32_t i = 0; i < n; ++i) positions_[i] = pos0 + i;
  const size_t residual = static_cast<size_t>(n) * c.dim;

  for (int32_t layer = 0; layer < static_cast<int32_t>(layers_.size()); ++layer) {
    const LayerShard& w = layers_[static_cast<size_t>(layer)];
    // Attention block: this rank's heads through its rows of Wo.
    cpu::rmsnorm(hidden, w.attn_norm, normed_.data(), n, c.dim, c.rms_eps);
    if (sharded_cache_) {
      attend_sharded(seq, layer, n, pos0);
    } else {
      attend_by_head(seq, layer, n, pos0);
    }
    cpu::matmul(w.wo, attn_.data(), n, proj_.data());
    comm_.all_reduce_sum(proj_.data(), residual);
    cpu::add(hidden, proj_.data(), static_cast<int64_t>(residual));
    // Feed-forward block (SwiGLU): this rank's FFN channels.
    cpu::rmsnorm(hidden, w.ffn_norm, normed_.data(), n, c.dim, c.rms_eps);
    cpu::matmul(w.w_gate, normed_.data(), n, gate_.data());
    cpu::matmul(w.w_up, normed_.data(), n, up_.data());
    cpu::swiglu(gate_.data(), up_.data(), static_cast<int64_t>(n) * shard_.ffn.count);
    cpu::matmul(w.w_down, up_.data(), n, proj_.data());
    comm_.all_reduce_sum(proj_.data(), residual);
    cpu::add(hidden, proj_.data(), static_cast<int64_t>(residual));
  }
}

}  // namespace xq::parallel
