#include "runtime/engine.h"

#include <algorithm>

#include "kernels/cpu/matmul.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/error.h"

namespace xq {

void check_forward_input(const ModelConfig& c, int32_t max_tokens, const int32_t* tokens, int32_t n,
                         int32_t pos0) {
  if (pos0 < 0 || pos0 + n > max_tokens)
    throw Error("forward: positions [" + std::to_string(pos0) + ", " + std::to_string(pos0 + n) +
                ") exceed the context of " + std::to_string(max_tokens) + " tokens");
  for (int32_t i = 0; i < n; ++i) {
    if (tokens[i] < 0 || tokens[i] >= c.vocab_size)
      throw Error("forward: token id " + std::to_string(tokens[i]) +
                  " is outside the vocabulary of " + std::to_string(c.vocab_size));
  }
}

SampledToken Engine::forward_sample(int32_t seq, const int32_t* tokens, int32_t n, int32_t pos0,
                                    Sampler& sampler) {
  if (n <= 0) throw Error("forward_sample: no tokens");
  const int32_t vocab = model().config().vocab_size;
  last_row_.resize(static_cast<size_t>(vocab));
  forward(seq, tokens, n, pos0, last_row_.data(), n - 1);
  SampledToken chosen;
  chosen.token = sampler.sample(last_row_.data(), vocab);
  chosen.margin = top2_margin(last_row_.data(), vocab);
  return chosen;
}

void Engine::forward_batch(const std::vector<Segment>& segments, float* logits) {
  const size_t vocab = static_cast<size_t>(model().config().vocab_size);
  for (const Segment& s : segments) {
    forward(s.seq, s.tokens, s.n, s.pos0, s.wants_logits ? logits : nullptr, s.n - 1);
    if (s.wants_logits) logits += vocab;
  }
}

PoolInfo TransformerEngine::pool() const {
  const AttentionCache& cache = attention_->cache();
  PoolInfo info;
  info.block_tokens = AttentionCache::kBlockTokens;
  info.total_blocks = cache.total_blocks();
  info.block_bytes = cache.block_bytes();
  info.budget_bytes = static_cast<size_t>(info.total_blocks) * info.block_bytes;
  return info;
}

TransformerEngine::TransformerEngine(const Model& model, const EngineOptions& options)
    : TransformerEngine(model, options, single_process_) {}

TransformerEngine::TransformerEngine(const Model& model, const EngineOptions& options,
                                     Communicator& tp_group, Range layers)
    : model_(model), comm_(tp_group) {
  const ModelConfig& c = model.config();
  layer_range_ = layers.count == 0 ? Range{0, c.n_layers} : layers;
  if (layer_range_.begin < 0 || layer_range_.count < 1 || layer_range_.end() > c.n_layers)
    throw Error("engine: layers [" + std::to_string(layer_range_.begin) + ", " +
                std::to_string(layer_range_.end()) + ") are not a non-empty part of the model's " +
                std::to_string(c.n_layers));
  shard_ = plan_shard(model, comm_.size(), comm_.rank());
  max_tokens_ = options.max_tokens > 0 ? options.max_tokens : c.max_seq_len;
  cpu::set_thread_count(options.threads);
  rope_cos_sin_.resize(static_cast<size_t>(max_tokens_) * c.rope_dim);
  cpu::rope_table(rope_cos_sin_.data(), max_tokens_, c.rope_dim, c.rope_theta);
  for (int64_t l = layer_range_.begin; l < layer_range_.end(); ++l)
    layers_.push_back(shard_layer(model.layers()[static_cast<size_t>(l)], c, shard_));
  attention_ = make_attention_step(model, options, max_tokens_, rope_cos_sin_.data(), comm_, shard_,
                                   layer_range_, layers_);
}

size_t TransformerEngine::weight_bytes() const {
  const ModelConfig& c = model_.config();
  size_t total = 0;
  if (layer_range_.begin == 0) total += model_.token_embedding().row_bytes;
  if (layer_range_.end() == c.n_layers)
    total += slice_bytes(model_.output()) + static_cast<size_t>(c.dim) * sizeof(float);
  for (size_t i = 0; i < layers_.size(); ++i) {
    const LayerShard& l = layers_[i];
    total += attention_->qkv_weight_bytes(static_cast<int32_t>(i));
    total += slice_bytes(l.wo) + slice_bytes(l.w_gate) + slice_bytes(l.w_up) +
             slice_bytes(l.w_down) + 2 * static_cast<size_t>(c.dim) * sizeof(float);
  }
  return total;
}

void TransformerEngine::ensure_scratch(int32_t n) {
  const ModelConfig& c = model_.config();
  const size_t rows = static_cast<size_t>(n);
  hidden_.resize(rows * c.dim);
  normed_.resize(rows * c.dim);
  attn_.resize(rows * static_cast<size_t>(shard_.heads.count) * c.head_dim);
  proj_.resize(rows * c.dim);
  gate_.resize(rows * static_cast<size_t>(shard_.ffn.count));
  up_.resize(rows * static_cast<size_t>(shard_.ffn.count));
  positions_.resize(rows);
}

void TransformerEngine::check_input(const int32_t* tokens, int32_t n, int32_t pos0) const {
  check_forward_input(model_.config(), max_tokens_, tokens, n, pos0);
}

void TransformerEngine::embed(const int32_t* tokens, int32_t n, float* hidden) const {
  const ModelConfig& c = model_.config();
  for (int32_t i = 0; i < n; ++i)
    cpu::matrix_row_to_float(model_.token_embedding(), tokens[i],
                             hidden + static_cast<size_t>(i) * c.dim);
}

void TransformerEngine::forward(int32_t seq, const int32_t* tokens, int32_t n, int32_t pos0,
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

void TransformerEngine::head(const float* hidden, int32_t n, float* logits) {
  const ModelConfig& c = model_.config();
  if (n <= 0) return;
  const size_t rows = static_cast<size_t>(n) * c.dim;
  if (normed_.size() < rows) normed_.resize(rows);  // hidden may point into hidden_
  cpu::rmsnorm(hidden, model_.output_norm(), normed_.data(), n, c.dim, c.rms_eps);
  cpu::matmul(model_.output(), normed_.data(), n, logits);
}

void TransformerEngine::run_layers(int32_t seq, float* hidden, int32_t n, int32_t pos0) {
  Segment segment;
  segment.seq = seq;
  segment.pos0 = pos0;
  segment.n = n;
  run_layers(std::vector<Segment>{segment}, hidden);
}

void TransformerEngine::check_batch(const std::vector<Segment>& segments) const {
  std::vector<int32_t> seen;
  for (const Segment& s : segments) {
    if (s.seq < 0 || s.seq >= sequence_slots())
      throw Error("forward_batch: sequence " + std::to_string(s.seq) + " is not a slot in [0, " +
                  std::to_string(sequence_slots()) + ")");
    if (std::find(seen.begin(), seen.end(), s.seq) != seen.end())
      throw Error("forward_batch: sequence " + std::to_string(s.seq) + " appears twice in a step");
    seen.push_back(s.seq);
    if (s.n <= 0) throw Error("forward_batch: a segment has no tokens");
    if (s.pos0 > length(s.seq))
      throw Error("forward_batch: sequence " + std::to_string(s.seq) + " holds " +
                  std::to_string(length(s.seq)) + " tokens; a segment cannot start at " +
                  std::to_string(s.pos0));
    if (s.tokens == nullptr) throw Error("forward_batch: a segment has no token ids");
    check_input(s.tokens, s.n, s.pos0);
  }
  // Blocks the step takes, checked before anything is written, so a step the
  // pool cannot hold leaves every cache as it was.
  int64_t needed = 0;
  for (const Segment& s : segments)
    needed += std::max(0, blocks_for_step(std::min(s.pos0, length(s.seq)), s.pos0 + s.n) -
                              blocks_for_tokens(std::min(s.pos0, length(s.seq))));
  const int32_t free = attention_->cache().free_blocks();
  if (needed > free)
    throw PoolExhausted("cache pool: the step needs " + std::to_string(needed) + " more blocks; " +
                        std::to_string(free) + " are free");
}

void TransformerEngine::forward_batch(const std::vector<Segment>& segments, float* logits) {
  const ModelConfig& c = model_.config();
  if (segments.empty()) return;
  if (layer_range_.begin != 0 || layer_range_.end() != c.n_layers)
    throw Error("forward_batch: this engine holds some layers only; a pipeline runs it");
  check_batch(segments);
  int32_t rows = 0;
  for (const Segment& s : segments) rows += s.n;
  ensure_scratch(rows);
  int32_t row = 0;
  for (const Segment& s : segments) {
    embed(s.tokens, s.n, hidden_.data() + static_cast<size_t>(row) * c.dim);
    row += s.n;
  }
  run_layers(segments, hidden_.data());
  // Only the rows whose logits someone reads go through the output head.
  std::vector<int32_t> wanted;
  row = 0;
  for (const Segment& s : segments) {
    row += s.n;
    if (s.wants_logits) wanted.push_back(row - 1);
  }
  if (wanted.empty() || logits == nullptr) return;
  head_rows_.resize(wanted.size() * c.dim);
  for (size_t i = 0; i < wanted.size(); ++i)
    std::copy_n(hidden_.data() + static_cast<size_t>(wanted[i]) * c.dim, c.dim,
                head_rows_.data() + i * c.dim);
  head(head_rows_.data(), static_cast<int32_t>(wanted.size()), logits);
}

// The one layer loop. Each rank adds its partial Wo and down outputs across
// the group (the identity for a group of one), so every rank's hidden state
// stays the full, replicated residual stream. Every row of the batch goes
// through each matmul together; only attention looks at which sequence a row
// belongs to.
void TransformerEngine::run_layers(const std::vector<Segment>& segments, float* hidden) {
  const ModelConfig& c = model_.config();
  int32_t n = 0;
  for (const Segment& s : segments) n += s.n;
  if (n <= 0) return;
  ensure_scratch(n);
  int32_t row = 0;
  for (const Segment& s : segments)
    for (int32_t i = 0; i < s.n; ++i) positions_[row++] = s.pos0 + i;
  // A segment that starts inside what its sequence holds rewrites from there.
  for (const Segment& s : segments)
    if (s.pos0 < length(s.seq)) truncate(s.seq, s.pos0);
  const size_t residual = static_cast<size_t>(n) * c.dim;

  for (int32_t layer = 0; layer < static_cast<int32_t>(layers_.size()); ++layer) {
    const LayerShard& w = layers_[static_cast<size_t>(layer)];
    // Attention block: this rank's heads through its columns of Wo.
    cpu::rmsnorm(hidden, w.attn_norm, normed_.data(), n, c.dim, c.rms_eps);
    attention_->run(segments, layer, normed_.data(), n, positions_.data(), attn_.data());
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

}  // namespace xq
