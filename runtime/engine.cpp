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

Engine::Engine(const Model& model, const EngineOptions& options) : model_(model) {
  const ModelConfig& c = model.config();
  max_tokens_ = options.max_tokens > 0 ? options.max_tokens : c.max_seq_len;
  cpu::set_thread_count(options.threads);
  rope_cos_sin_.resize(static_cast<size_t>(max_tokens_) * c.rope_dim);
  cpu::rope_table(rope_cos_sin_.data(), max_tokens_, c.rope_dim, c.rope_theta);
  CacheOptions cache_options;
  cache_options.mode = options.cache_mode;
  cache_options.max_tokens = max_tokens_;
  cache_options.sequences = options.sequences;
  cache_options.keep_outlier_channel = options.keep_outlier_channel;
  cache_options.k_latent_per_head = options.k_latent_per_head;
  cache_options.cross_layer_restarts = options.cross_layer_restarts;
  cache_options.rope_cos_sin = rope_cos_sin_.data();
  cache_ = make_cache(model, cache_options);
}

void Engine::ensure_scratch(int32_t n) {
  const ModelConfig& c = model_.config();
  const size_t rows = static_cast<size_t>(n);
  hidden_.resize(rows * c.dim);
  normed_.resize(rows * c.dim);
  q_.resize(rows * c.q_dim());
  k_.resize(rows * c.kv_dim());
  v_.resize(rows * c.kv_dim());
  attn_.resize(rows * c.q_dim());
  proj_.resize(rows * c.dim);
  gate_.resize(rows * c.ffn_dim);
  up_.resize(rows * c.ffn_dim);
  positions_.resize(rows);
}

void Engine::forward(int32_t seq, const int32_t* tokens, int32_t n, int32_t pos0, float* logits,
                     int32_t first_logit_row) {
  const ModelConfig& c = model_.config();
  if (n <= 0) return;
  check_forward_input(c, max_tokens_, tokens, n, pos0);
  ensure_scratch(n);
  for (int32_t i = 0; i < n; ++i) {
    cpu::matrix_row_to_float(model_.token_embedding(), tokens[i],
                             hidden_.data() + static_cast<size_t>(i) * c.dim);
    positions_[i] = pos0 + i;
  }

  for (int32_t layer = 0; layer < c.n_layers; ++layer) {
    const LayerWeights& w = model_.layers()[layer];
    // Attention block.
    cpu::rmsnorm(hidden_.data(), w.attn_norm, normed_.data(), n, c.dim, c.rms_eps);
    cpu::matmul(w.wq, normed_.data(), n, q_.data());
    cpu::matmul(w.wk, normed_.data(), n, k_.data());
    cpu::matmul(w.wv, normed_.data(), n, v_.data());
    cpu::rope(q_.data(), positions_.data(), n, c.n_heads, c.head_dim, c.rope_dim, c.rope_layout,
              rope_cos_sin_.data());
    cache_->append(seq, layer, pos0, n, normed_.data(), k_.data(), v_.data());
    cache_->attend(seq, layer, pos0, n, q_.data(), attn_.data());
    cpu::matmul(w.wo, attn_.data(), n, proj_.data());
    cpu::add(hidden_.data(), proj_.data(), static_cast<int64_t>(n) * c.dim);
    // Feed-forward block (SwiGLU).
    cpu::rmsnorm(hidden_.data(), w.ffn_norm, normed_.data(), n, c.dim, c.rms_eps);
    cpu::matmul(w.w_gate, normed_.data(), n, gate_.data());
    cpu::matmul(w.w_up, normed_.data(), n, up_.data());
    cpu::swiglu(gate_.data(), up_.data(), static_cast<int64_t>(n) * c.ffn_dim);
    cpu::matmul(w.w_down, up_.data(), n, proj_.data());
    cpu::add(hidden_.data(), proj_.data(), static_cast<int64_t>(n) * c.dim);
  }

  const int32_t first = std::clamp(first_logit_row, 0, n);
  const int32_t scored = n - first;
  if (scored == 0 || logits == nullptr) return;
  const float* last_hidden = hidden_.data() + static_cast<size_t>(first) * c.dim;
  cpu::rmsnorm(last_hidden, model_.output_norm(), normed_.data(), scored, c.dim, c.rms_eps);
  cpu::matmul(model_.output(), normed_.data(), scored, logits);
}

}  // namespace xq
