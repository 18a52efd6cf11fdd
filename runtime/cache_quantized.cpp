#include "runtime/cache_quantized.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>

#include "kernels/cpu/attention.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/quant.h"
#include "kernels/cpu/small_gemm.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/error.h"
#include "runtime/decode_queries.h"

namespace xq {
namespace {

// Below this many queries, attention walks the context block by block without
// rebuilding V (decode); above it, K and V are rebuilt once for all queries.
// Tokens per decode block: a block's dequantized rows and rebuilt keys
// (64 x 576 + 64 x 192 floats for SmolLM2's X) stay in L2.
constexpr int32_t kDecodeBlock = 64;
// The paper pins the first three layers at 4 bits for every quantized method;
// XQuant-CL takes the third as its base.
constexpr int32_t kPinnedLayers = 3;
constexpr int kPinnedBits = 4;
constexpr int32_t kCrossLayerBase = 2;

std::string join_numbers(const std::vector<int32_t>& numbers) {
  std::string out;
  for (int32_t v : numbers) out += (out.empty() ? "" : ", ") + std::to_string(v);
  return out;
}

}  // namespace

// out (rows, kv) = in (rows, kv) times a block-diagonal matrix of kv / block
// blocks of block x block, stored input-major (block == kv: one dense matrix).
void QuantizedCache::multiply_blocks(const float* in, int32_t rows,
                                     const cpu::AlignedVector<float>& blocks_t, int64_t block,
                                     float* out) const {
  const int64_t kv = config_.kv_dim();
  cpu::parallel_for(
      rows,
      [&](int64_t begin, int64_t end) {
        for (int64_t b0 = 0; b0 < kv; b0 += block)
          cpu::gemm_small(end - begin, block, block, in + begin * kv + b0, kv,
                          blocks_t.data() + b0 * block, block, out + begin * kv + b0, kv, false);
      },
      8);
}

// Puts the fp16 outlier channels of tokens [t0, t0 + rows) back into their
// dequantized latent rows (kv wide), where the quantized stream holds zero.
void QuantizedCache::restore_outliers(int32_t seq, int32_t layer_index, int32_t t0, int32_t rows,
                                      float* latent_rows) {
  const int64_t kv = config_.kv_dim();
  for (int32_t t = 0; t < rows; ++t) {
    const uint16_t* kept = outliers(seq, layer_index, t0 + t);
    for (int32_t k = 0; k < outliers_per_token_; ++k)
      latent_rows[t * kv + outlier_channel(k)] = cpu::fp16_to_fp32(kept[k]);
  }
}

// keys (rows, kv) = K source rows (rows, k_width) through the layer's rebuild
// matrix: dense, or block-diagonal with one hd x hd block per KV head when
// each head has its own latent. Single-threaded (called per block).
void QuantizedCache::rebuild_keys(const Layer& layer, const float* source, int32_t rows,
                                  int64_t k_width, float* keys) const {
  const int64_t kv = config_.kv_dim();
  if (!layer.rebuild_k_per_head) {
    cpu::gemm_small(rows, kv, k_width, source, k_width, layer.rebuild_k_t.data(), kv, keys, kv,
                    false);
    return;
  }
  const int64_t hd = config_.head_dim;
  for (int64_t g = 0; g < config_.n_kv_heads; ++g)
    cpu::gemm_small(rows, hd, hd, source + g * hd, k_width,
                    layer.rebuild_k_t.data() + static_cast<size_t>(g) * hd * hd, hd, keys + g * hd,
                    kv, false);
}

// Xhat rows (rows, dim) from CL latent rows (rows, 2 kv). Prefill and the
// block walk share it, and each row's arithmetic is the same however the
// tokens are batched or sharded: a rounding difference in Xhat can flip a
// code of the next layer's delta and so travel down the chain.
void QuantizedCache::decode_cross_layer_latent(const Layer& layer, const float* latent,
                                               int32_t rows, float* x_rows) const {
  // encode_k (2kv rows of d) is the decoder's input-major matrix; gemm_small
  // computes every row alike whatever the number of rows.
  const int64_t d = config_.dim, width = layer.decode_x.cols;
  cpu::gemm_small(rows, d, width, latent, width, layer.encode_k.values.data(), d, x_rows, d, false);
}

// CL latent rows (rows, 2 kv) of X deltas (rows, dim); row by row alike, as
// decode_cross_layer_latent (decode_x is the encoder's input-major matrix).
void QuantizedCache::encode_cross_layer_latent(const Layer& layer, const float* deltas,
                                               int32_t rows, float* latent) const {
  const int64_t d = config_.dim, width = layer.decode_x.cols;
  cpu::parallel_for(
      rows,
      [&](int64_t begin, int64_t end) {
        cpu::gemm_small(end - begin, width, d, deltas + begin * d, d, layer.decode_x.values.data(),
                        width, latent + begin * width, width, false);
      },
      16);
}

namespace {

// The model's configuration with n_layers = the layers this cache covers.
ModelConfig covered_layers(const ModelConfig& model, const CacheOptions& options) {
  ModelConfig c = model;
  const int32_t count = options.layers > 0 ? options.layers : model.n_layers - options.first_layer;
  if (options.first_layer < 0 || count < 1 || options.first_layer + count > model.n_layers)
    throw Error("cache: layers [" + std::to_string(options.first_layer) + ", " +
                std::to_string(options.first_layer + count) + ") are not part of the model's " +
                std::to_string(model.n_layers));
  c.n_layers = count;
  return c;
}

}  // namespace

QuantizedCache::QuantizedCache(const Model& model, const CacheOptions& options,
                               const CacheModeSpec& spec)
    : config_(covered_layers(model.config(), options)),
      mode_(spec.name),
      layout_(layout_for(spec, model.config())),
      max_tokens_(options.max_tokens),
      rope_cos_sin_(options.rope_cos_sin),
      first_layer_(options.first_layer),
      shard_(
          sequence_shard(spec, model.config(), options.sequence_shards, options.sequence_shard)) {
  if (!spec.quantized()) throw Error("cache: '" + mode_ + "' is not a quantized mode");
  if (max_tokens_ <= 0 || options.sequences <= 0) throw Error("cache: capacity must be positive");
  if (!rope_cos_sin_) throw Error("cache: no RoPE table");
  const int64_t d = config_.dim, kv = config_.kv_dim();
  const KvSource source = layout_.kv_source;
  const bool cross_layer = source == KvSource::kCrossLayerDeltas;
  const int32_t capacity = shard_.owned_before(max_tokens_);  // this shard's positions
  layers_.resize(config_.n_layers);
  positions_.resize(capacity);
  for (int32_t j = 0; j < capacity; ++j) positions_[j] = shard_.position(j);
  lengths_.assign(static_cast<size_t>(options.sequences), 0);
  // XQuant-CL chains: a layer codes a delta unless it is at or below the base,
  // the first of this cache (a pipeline stage) or a named restart.
  std::vector<int32_t> restarts;
  cross_layer_delta_.assign(config_.n_layers, false);
  cross_layer_keeps_.assign(config_.n_layers, false);
  for (int32_t i = 0; i < config_.n_layers; ++i) {
    const int32_t global = first_layer_ + i;
    const bool restart = global > kCrossLayerBase &&
                         (i == 0 || std::count(options.cross_layer_restarts.begin(),
                                               options.cross_layer_restarts.end(), global) > 0);
    if (cross_layer && restart) restarts.push_back(global);
    cross_layer_delta_[i] = global > kCrossLayerBase && !restart;
    cross_layer_keeps_[i] = global >= kCrossLayerBase;
  }
  k_latent_per_head_ = options.k_latent_per_head;
  keep_outlier_ = options.keep_outlier_channel && source == KvSource::kRebuiltFromLatents;
  // Appendix B's outlier channel is the first of each latent: one per KV head
  // when every head has its own.
  outliers_per_token_ = k_latent_per_head_ ? config_.n_kv_heads : 1;
  cross_layer_accumulator_ = spec.cross_layer_accumulator;
  const bool cl_latent = cross_layer && layout_.streams[0].content == StreamContent::kXDeltaLatent;
  for (int32_t i = 0; i < config_.n_layers; ++i) {
    Layer& layer = layers_[i];
    const int32_t global = first_layer_ + i;
    // A chain's start carries every later delta: as precise as the base.
    const bool pinned = global < kPinnedLayers || (cross_layer && !cross_layer_delta_[i]);
    const int bits = pinned ? std::max(spec.bits, kPinnedBits) : spec.bits;
    for (int32_t s = 0; s < layout_.stream_count; ++s)
      layer.stores.emplace_back(stream_width(layout_.streams[s].content, config_), bits,
                                layout_.streams[s].axis, options.sequences);
    const LayerWeights& w = model.layers()[global];
    switch (source) {
      case KvSource::kReadBack:
        break;
      case KvSource::kRebuiltFromX:
        layer.rebuild_k = {widen(w.wk), kv, d};
        layer.rebuild_v = {widen(w.wv), kv, d};
        break;
      case KvSource::kCrossLayerDeltas:
        if (cl_latent) {
          CrossLayerLatentBasis basis = cross_layer_latent_basis(w, config_);
          layer.encode_k = std::move(basis.encode);
          layer.decode_x = std::move(basis.decode);
        }
        layer.rebuild_k = {widen(w.wk), kv, d};
        layer.rebuild_v = {widen(w.wv), kv, d};
        break;
      case KvSource::kRebuiltFromLatents: {
        KeyValueLatentBasis basis = key_value_latent_basis(w, config_, k_latent_per_head_);
        layer.encode_k = std::move(basis.encode_k);
        layer.encode_v = std::move(basis.encode_v);
        layer.rebuild_k = std::move(basis.rebuild_k);
        layer.rebuild_v = std::move(basis.rebuild_v);
        layer.rebuild_k_per_head = basis.rebuild_k_per_head;
        layer.latent_from_k = std::move(basis.latent_from_k);
        layer.latent_from_v = std::move(basis.latent_from_v);
        break;
      }
    }
  }
  // Decode reads the K rebuild matrix input-major (one row per stored channel).
  for (Layer& layer : layers_) {
    const Projection& r = layer.rebuild_k;
    if (!r.rows) continue;
    const int64_t block_rows = layer.rebuild_k_per_head ? config_.head_dim : r.rows;
    layer.rebuild_k_t.resize(r.values.size());
    for (int64_t b0 = 0; b0 < r.rows; b0 += block_rows)  // each diagonal block on its own
      for (int64_t j = 0; j < block_rows; ++j)
        for (int64_t c = 0; c < r.cols; ++c)
          layer.rebuild_k_t[b0 * r.cols + c * block_rows + j] = r.values[(b0 + j) * r.cols + c];
  }
  lay_out_blocks(options);
  const RowStore& first = layers_[0].stores[0];
  switch (source) {
    case KvSource::kReadBack:
      description_ =
          mode_ + ": K before RoPE " + first.describe() + "; V " + layers_[0].stores[1].describe();
      break;
    case KvSource::kRebuiltFromX:
      description_ = mode_ + ": caching X (" + std::to_string(d) + " values/token) " +
                     first.describe() + "; K+V would be " + std::to_string(2 * kv) +
                     " values, so X is not larger";
      break;
    case KvSource::kCrossLayerDeltas:
      description_ =
          mode_ +
          ": closed-loop cross-layer deltas of X, layers 0-2 at 4 bits with layer 2 as base; " +
          (restarts.empty() ? std::string()
                            : "new chains (from X, at 4 bits) at layer" +
                                  std::string(restarts.size() > 1 ? "s" : "") + " " +
                                  join_numbers(restarts) + "; ") +
          (cl_latent ? "deltas in the latent of [Wk | Wv] (" + std::to_string(2 * kv) +
                           " values/token, GQA) "
                     : "deltas of X (" + std::to_string(d) + " values/token) ") +
          layers_.back().stores[0].describe() + "; one fp32 accumulator per token";
      break;
    case KvSource::kRebuiltFromLatents:
      description_ =
          mode_ + ": caching SVD latents X·Uk, X·Uv (" + std::to_string(2 * kv) +
          " values/token) instead of X (" + std::to_string(d) +
          "): GQA makes K+V narrower than X; " +
          (k_latent_per_head_
               ? "X·Uk from one SVD per KV head (" + std::to_string(config_.n_kv_heads) + " x " +
                     std::to_string(config_.head_dim) + ")"
               : "X·Uk from one SVD of Wk") +
          " " + first.describe() + "; X·Uv " + layers_[0].stores[1].describe() +
          (keep_outlier_ ? k_latent_per_head_ ? "; channel 0 of each head's X·Uk kept in fp16 "
                                                "(appendix B)"
                                              : "; channel 0 of X·Uk kept in fp16 (appendix B)"
                         : "");
      break;
  }
}

// A block of the pool holds 128 local tokens of every layer: per layer, each
// stream's group (codes, then fp16 scale and zero point pairs), then the
// layer's outlier channels; then the CL accumulator rows. Regions start on
// cache lines. A window page holds window_tokens_ fp16 rows of every
// per-channel stream, stream after stream: as many as fit in one block.
void QuantizedCache::lay_out_blocks(const CacheOptions& options) {
  const size_t line = BlockPool::kAlignment;
  size_t offset = 0, window_row_bytes = 0;
  std::vector<size_t> group_offsets;  // per store, layer by layer
  outlier_offsets_.assign(config_.n_layers, 0);
  for (int32_t i = 0; i < config_.n_layers; ++i) {
    for (const RowStore& store : layers_[i].stores) {
      group_offsets.push_back(offset);
      offset = round_up(offset + store.group_bytes(), line);
      window_row_bytes += store.window_row_bytes();
    }
    if (keep_outlier_) {
      outlier_offsets_[i] = offset;
      offset = round_up(
          offset + static_cast<size_t>(kBlockTokens) * outliers_per_token_ * sizeof(uint16_t),
          line);
    }
  }
  if (cross_layer_accumulator_) {
    accumulator_offset_ = offset;
    offset += static_cast<size_t>(kBlockTokens) * config_.dim * sizeof(float);
  }
  const size_t block_bytes = round_up(offset, line);
  if (window_row_bytes)
    window_tokens_ = static_cast<int32_t>(
        std::min<size_t>(block_bytes / window_row_bytes, RowStore::kGroup - 1));
  size_t next = 0, window_at = 0;
  for (Layer& layer : layers_)
    for (RowStore& store : layer.stores) {
      store.place(group_offsets[next++], window_at, window_tokens_);
      window_at += static_cast<size_t>(window_tokens_) * store.window_row_bytes();
    }
  const int32_t sequences = options.sequences;
  const int32_t capacity = shard_.owned_before(max_tokens_);
  // Room for every sequence at full length with the largest window it can have.
  const int32_t per_sequence = (capacity + kBlockTokens - 1) / kBlockTokens +
                               window_pages(std::min(capacity, kBlockTokens - 1));
  pool_ = BlockPool(block_bytes,
                    blocks_in_budget(options.pool_bytes, block_bytes, sequences * per_sequence),
                    !options.layout_only);
  tables_.resize(sequences);
  layer_ends_.assign(static_cast<size_t>(sequences) * config_.n_layers, 0);
}

void QuantizedCache::append(int32_t seq, int32_t layer_index, int32_t pos0, int32_t n,
                            const float* x, const float* k, const float* v) {
  if (seq < 0 || seq >= sequences())
    throw Error("cache: sequence " + std::to_string(seq) + " out of range");
  if (pos0 < 0 || n < 0 || pos0 + n > max_tokens_)
    throw Error("cache: positions [" + std::to_string(pos0) + ", " + std::to_string(pos0 + n) +
                ") exceed the cache capacity of " + std::to_string(max_tokens_) + " tokens");
  int32_t* ends = layer_ends_.data() + static_cast<size_t>(seq) * config_.n_layers;
  if (pos0 != 0 && pos0 != ends[layer_index])
    throw Error("cache: position " + std::to_string(pos0) + " does not continue a sequence of " +
                std::to_string(ends[layer_index]) + " tokens");
  const int32_t local_end = shard_.owned_before(pos0 + n);
  if (pos0 == 0 && ends[layer_index] > 0) {
    // A new sequence in the slot (even where this shard gets none of its
    // first tokens): every layer starts over, its blocks back in the pool
    // first (resize_table counts them as free).
    BlockTable& table = tables_[seq];
    resize_table(pool_, table, (local_end + kBlockTokens - 1) / kBlockTokens,
                 window_pages(local_end % kBlockTokens));
    for (Layer& layer : layers_)
      for (RowStore& store : layer.stores) store.truncate(pool_, table, seq, 0);
    std::fill(ends, ends + config_.n_layers, 0);
    lengths_[seq] = 0;
    clear_accumulator(seq, 0);
  } else {
    reserve(seq, local_end);  // throws before anything is written
  }
  if (!shard_.sharded()) {
    append_own(seq, layer_index, pos0, n, x, k, v);
  } else {
    // This shard's rows of the batch, in order: they continue its own tokens.
    const int32_t own_pos0 = shard_.owned_before(pos0);
    const int64_t d = config_.dim, kv = config_.kv_dim();
    own_x_.resize(static_cast<size_t>(n) * d);
    own_k_.resize(static_cast<size_t>(n) * kv);
    own_v_.resize(static_cast<size_t>(n) * kv);
    int32_t own = 0;
    for (int32_t i = 0; i < n; ++i) {
      if (!shard_.owns(pos0 + i)) continue;
      if (x) std::copy_n(x + i * d, d, own_x_.data() + own * d);
      if (k) std::copy_n(k + i * kv, kv, own_k_.data() + own * kv);
      if (v) std::copy_n(v + i * kv, kv, own_v_.data() + own * kv);
      ++own;
    }
    if (own > 0)
      append_own(seq, layer_index, own_pos0, own, x ? own_x_.data() : nullptr,
                 k ? own_k_.data() : nullptr, v ? own_v_.data() : nullptr);
  }
  ends[layer_index] = pos0 + n;
  if (layer_index == config_.n_layers - 1) lengths_[seq] = pos0 + n;
  settle(seq);
}

void QuantizedCache::reserve(int32_t seq, int32_t local_end) {
  BlockTable& table = tables_[seq];
  const int32_t groups = (local_end + kBlockTokens - 1) / kBlockTokens;
  const int32_t window = window_pages(local_end % kBlockTokens);
  // Only grows: the layers still behind read the blocks and pages held now.
  if (groups > static_cast<int32_t>(table.groups.size()) ||
      window > static_cast<int32_t>(table.window.size())) {
    const int32_t had = static_cast<int32_t>(table.groups.size());
    resize_table(pool_, table, std::max<int32_t>(groups, table.groups.size()),
                 std::max<int32_t>(window, table.window.size()));
    clear_accumulator(seq, had);
  }
}

// A sequence's accumulator rows start at zero, as a fresh cache's did: a
// layer's append reads the rows of its new tokens, which the base layer's
// attend writes first in a forward pass but a caller may skip; zero rows
// keep the result from depending on what the block held before.
void QuantizedCache::clear_accumulator(int32_t seq, int32_t first_group) {
  if (!cross_layer_accumulator_) return;
  const BlockTable& table = tables_[seq];
  for (size_t g = static_cast<size_t>(first_group); g < table.groups.size(); ++g)
    std::fill_n(reinterpret_cast<float*>(pool_.block(table.groups[g]) + accumulator_offset_),
                static_cast<size_t>(kBlockTokens) * config_.dim, 0.0f);
}

void QuantizedCache::settle(int32_t seq) {
  const int32_t tokens = layers_[0].stores[0].length(seq);
  for (const Layer& layer : layers_)
    for (const RowStore& store : layer.stores)
      if (store.length(seq) != tokens) return;  // a layer is still behind
  resize_table(pool_, tables_[seq], (tokens + kBlockTokens - 1) / kBlockTokens,
               window_pages(tokens % kBlockTokens));  // only gives back
}

int32_t QuantizedCache::blocks_for_step(int32_t from, int32_t to) const {
  int32_t most = std::max(blocks_for_tokens(from), blocks_for_tokens(to));
  const int32_t local_from = shard_.owned_before(from), local_to = shard_.owned_before(to);
  if (local_to > local_from)  // the old window's pages stay until the last layer passes
    most = std::max(most, (local_to + kBlockTokens - 1) / kBlockTokens +
                              std::max(window_pages(local_from % kBlockTokens),
                                       window_pages(local_to % kBlockTokens)));
  return most;
}

void QuantizedCache::append_own(int32_t seq, int32_t layer_index, int32_t pos0, int32_t n,
                                const float* x, const float* k, const float* v) {
  Layer& layer = layers_[layer_index];
  switch (layout_.kv_source) {
    case KvSource::kReadBack:
      layer.stores[0].append(pool_, tables_[seq], seq, pos0, n, k);
      layer.stores[1].append(pool_, tables_[seq], seq, pos0, n, v);
      break;
    case KvSource::kRebuiltFromX:
      layer.stores[0].append(pool_, tables_[seq], seq, pos0, n, x);
      break;
    case KvSource::kCrossLayerDeltas: {
      // The encoder codes X_i minus what the decoder will have reconstructed
      // for layer i-1: the accumulator rows attend() left for these tokens.
      const int64_t d = config_.dim;
      delta_.assign(x, x + static_cast<size_t>(n) * d);
      if (cross_layer_delta_[layer_index]) {
        for (int32_t i = 0; i < n; ++i) {
          const float* previous = accumulator_row(seq, pos0 + i);
          float* delta = delta_.data() + static_cast<size_t>(i) * d;
          for (int64_t j = 0; j < d; ++j) delta[j] -= previous[j];
        }
      }
      if (layer.encode_k.rows) {
        encoded_.resize(static_cast<size_t>(n) * layer.encode_k.rows);
        encode_cross_layer_latent(layer, delta_.data(), n, encoded_.data());
        layer.stores[0].append(pool_, tables_[seq], seq, pos0, n, encoded_.data());
      } else {
        layer.stores[0].append(pool_, tables_[seq], seq, pos0, n, delta_.data());
      }
      break;
    }
    case KvSource::kRebuiltFromLatents: {
      // Latents of the unquantized K and V (or X), then quantized.
      const int64_t kv_width = config_.kv_dim();
      encoded_.resize(static_cast<size_t>(n) * kv_width);
      if (!layer.latent_from_k.empty())
        multiply_blocks(k, n, layer.latent_from_k, k_latent_per_head_ ? config_.head_dim : kv_width,
                        encoded_.data());
      else
        cpu::matmul(layer.encode_k.view(), x, n, encoded_.data());
      if (keep_outlier_) {
        // Channel 0 goes to fp16 and is zeroed in the quantized stream, so its
        // outliers no longer stretch that channel's groups.
        const int64_t kv = config_.kv_dim();
        for (int32_t i = 0; i < n; ++i) {
          uint16_t* kept = outliers(seq, layer_index, pos0 + i);
          for (int32_t k = 0; k < outliers_per_token_; ++k) {
            float& value = encoded_[static_cast<size_t>(i) * kv + outlier_channel(k)];
            kept[k] = cpu::fp32_to_fp16(value);
            value = 0.0f;
          }
        }
      }
      layer.stores[0].append(pool_, tables_[seq], seq, pos0, n, encoded_.data());
      if (!layer.latent_from_v.empty())
        multiply_blocks(v, n, layer.latent_from_v, kv_width, encoded_.data());
      else
        cpu::matmul(layer.encode_v.view(), x, n, encoded_.data());
      layer.stores[1].append(pool_, tables_[seq], seq, pos0, n, encoded_.data());
      break;
    }
  }
}

void QuantizedCache::attend(int32_t seq, int32_t layer_index, int32_t pos0, int32_t n,
                            const float* q, float* out) {
  const Layer& layer = layers_[layer_index];
  if (shard_.sharded())
    throw Error("cache: a sequence-sharded cache attends through attend_partial()");
  if (pos0 + n > layer.stores[0].length(seq))
    throw Error("cache: attend over tokens that were not appended");
  // Every query count takes the block walk, so a query gets the same bits in
  // a prefill chunk of any size as in a decode step.
  thread_local cpu::PartialAttention state;
  attend_blocks(seq, layer_index, pos0, n, q, state);
  cpu::normalize_attention(state, 0, state.rows, out);  // rows (query, head): out's layout
}

// Decode: the context is walked in blocks of kDecodeBlock tokens, split across
// threads. Each block is dequantized, its K rebuilt (one small GEMM) and
// rotated, and scored while it is still in cache; nothing the size of the
// whole context is materialized. V is never rebuilt: each head keeps the
// softmax-weighted sum of the stored rows (X or X·Uv; online softmax across
// blocks) and projects it once at the end:
// sum_t a_t (s_t M) = (sum_t a_t s_t) M.
void QuantizedCache::attend_partial(int32_t seq, int32_t layer_index, int32_t pos0, int32_t n,
                                    const float* q, cpu::PartialAttention& state) {
  if (shard_.owned_before(pos0 + n) > layers_[layer_index].stores[0].length(seq))
    throw Error("cache: attend over tokens that were not appended");
  attend_blocks(seq, layer_index, pos0, n, q, state);
}

void QuantizedCache::attend_blocks(int32_t seq, int32_t layer_index, int32_t pos0, int32_t n,
                                   const float* q, cpu::PartialAttention& state) {
  Layer& layer = layers_[layer_index];
  const int32_t total = shard_.owned_before(pos0 + n), hd = config_.head_dim;
  const int32_t heads = config_.n_heads, kv_heads = config_.n_kv_heads, kv = config_.kv_dim();
  const int32_t group = heads / kv_heads;
  const RowStore& k_store = layer.stores[0];
  const bool separate_v = layer.stores.size() > 1;
  const int64_t k_width = key_source_width();
  const bool project_v = layer.rebuild_v.rows != 0;
  // Per head, the weighted sum runs over whole stored rows when they are
  // projected afterwards, or over the head's own hd values of V (kivi).
  const int64_t mix_width = project_v ? k_width : hd;
  const int64_t d = config_.dim;

  std::vector<int32_t> visible_end;
  const cpu::DecodeQueries queries = decode_queries(q, n, pos0, config_, shard_, visible_end);

  cpu::PartialAttention result;
  const int64_t blocks = (total + kDecodeBlock - 1) / kDecodeBlock;
  cpu::attend_in_blocks(
      blocks, static_cast<int64_t>(n) * heads, mix_width, result,
      [&](int64_t b, cpu::PartialAttention& mine) {
        // Each thread's block buffers live across calls: this runs once per layer
        // per decode step, and the sizes only change with the model.
        thread_local cpu::AlignedVector<float> source, latent, v_rows_buffer, keys_buffer, scores;
        source.resize(static_cast<size_t>(kDecodeBlock) * k_width);
        scores.resize(static_cast<size_t>(heads) * kDecodeBlock);
        if (layer.decode_x.rows)
          latent.resize(static_cast<size_t>(kDecodeBlock) * layer.decode_x.cols);
        if (separate_v) v_rows_buffer.resize(static_cast<size_t>(kDecodeBlock) * k_width);
        if (layer.rebuild_k.rows) keys_buffer.resize(static_cast<size_t>(kDecodeBlock) * kv);
        const int32_t t0 = static_cast<int32_t>(b * kDecodeBlock);
        const int32_t rows = std::min<int32_t>(kDecodeBlock, total - t0);
        // Stored rows -> K source (X, Xhat or latent).
        if (layer.decode_x.rows) {
          k_store.read(pool_, tables_[seq], seq, t0, t0 + rows, latent.data());
          decode_cross_layer_latent(layer, latent.data(), rows, source.data());
        } else {
          k_store.read(pool_, tables_[seq], seq, t0, t0 + rows, source.data());
        }
        if (cross_layer_accumulator_) {  // XQuant-CL: Xhat_i = Xhat_{i-1} + delta_i, kept for layer
                                         // i+1
          // A decode block lies inside one pool block (64 divides 128).
          float* acc_rows = accumulator_row(seq, t0);
          if (cross_layer_delta_[layer_index])
            for (size_t i = 0; i < static_cast<size_t>(rows) * d; ++i) source[i] += acc_rows[i];
          if (cross_layer_keeps_[layer_index])
            std::copy(source.begin(), source.begin() + static_cast<size_t>(rows) * d, acc_rows);
        }
        if (keep_outlier_) {
          restore_outliers(seq, layer_index, t0, rows, source.data());
        }
        float* keys = source.data();
        if (layer.rebuild_k.rows) {
          keys = keys_buffer.data();
          rebuild_keys(layer, source.data(), rows, k_width, keys);
        }
        cpu::rope(keys, positions_.data() + t0, rows, kv_heads, hd, config_.rope_dim,
                  config_.rope_layout, rope_cos_sin_);
        cpu::CachedBlock block;
        block.first_token = t0;
        block.tokens = rows;
        block.first_kv_head = 0;
        block.kv_heads = kv_heads;
        block.keys = keys;
        block.key_stride = kv;
        block.values = separate_v ? v_rows_buffer.data() : source.data();
        if (separate_v)
          layer.stores[1].read(pool_, tables_[seq], seq, t0, t0 + rows, v_rows_buffer.data());
        // Every head mixes the same stored rows (X or X·Uv), projected to V at the
        // end; kivi's heads each mix their own slice of V.
        block.values_shared = project_v;
        block.value_stride = project_v ? k_width : kv;
        cpu::absorb_block(mine, queries, block, scores.data(), kDecodeBlock);
      });

  if (!project_v) {  // kivi: the sums are already over V
    state = std::move(result);
    return;
  }
  // Each head's hd rows of the V rebuild matrix, applied once to its
  // (unnormalized) weighted sum of stored rows: linear, so shards may merge after.
  state.reset(result.rows, hd);
  state.max = result.max;
  state.sum = result.sum;
  for (int64_t row = 0; row < result.rows; ++row) {
    if (result.sum[row] == 0.0f) continue;  // saw no token
    const int32_t g = static_cast<int32_t>(row % heads) / group;
    cblas_sgemv(CblasRowMajor, CblasNoTrans, hd, static_cast<int>(mix_width), 1.0f,
                layer.rebuild_v.values.data() + static_cast<size_t>(g) * hd * mix_width,
                static_cast<int>(mix_width), result.acc.data() + row * mix_width, 1, 0.0f,
                state.acc.data() + row * hd, 1);
  }
}

void QuantizedCache::truncate(int32_t seq, int32_t from) {
  if (seq < 0 || seq >= sequences())
    throw Error("cache: sequence " + std::to_string(seq) + " out of range");
  from = std::max(from, 0);
  const int32_t own_from = shard_.owned_before(from);
  // The blocks afterwards: groups up to the longest layer kept; the window
  // of `own_from` tokens where a layer's kept head of a quantized group goes
  // back to it (per channel), and the pages a layer still behind reads.
  int32_t longest = 0, shortest = own_from;
  for (const Layer& layer : layers_)
    for (const RowStore& store : layer.stores) {
      longest = std::max(longest, std::min(store.length(seq), own_from));
      shortest = std::min(shortest, store.length(seq));
    }
  BlockTable& table = tables_[seq];
  const int32_t window = window_pages(own_from % kBlockTokens);
  resize_table(pool_, table, (longest + kBlockTokens - 1) / kBlockTokens,
               shortest == longest ? window : std::max<int32_t>(window, table.window.size()));
  for (Layer& layer : layers_)
    for (RowStore& store : layer.stores) store.truncate(pool_, table, seq, own_from);
  int32_t* ends = layer_ends_.data() + static_cast<size_t>(seq) * config_.n_layers;
  for (int32_t layer = 0; layer < config_.n_layers; ++layer)
    ends[layer] = std::min(ends[layer], from);
  lengths_[seq] = std::min(from, lengths_[seq]);
  settle(seq);
}

int32_t QuantizedCache::length(int32_t seq) const {
  return lengths_[seq];
}

// XQuant-CL also holds one fp32 accumulator row (dim values) per token.
double QuantizedCache::bytes_per_token() const {
  double total = cross_layer_accumulator_ ? config_.dim * sizeof(float) : 0.0;
  if (keep_outlier_) total += config_.n_layers * outliers_per_token_ * sizeof(uint16_t);
  for (const Layer& layer : layers_)
    for (const RowStore& store : layer.stores) total += store.bytes_per_token();
  return total;
}

size_t QuantizedCache::bytes_for_tokens(int32_t all_tokens) const {
  const int32_t tokens = shard_.owned_before(all_tokens);  // a shard holds its own share
  size_t total =
      cross_layer_accumulator_ ? static_cast<size_t>(tokens) * config_.dim * sizeof(float) : 0;
  if (keep_outlier_)
    total +=
        static_cast<size_t>(tokens) * config_.n_layers * outliers_per_token_ * sizeof(uint16_t);
  for (const Layer& layer : layers_)
    for (const RowStore& store : layer.stores) total += store.bytes_for_tokens(tokens);
  return total;
}

size_t QuantizedCache::payload_bytes() const {
  size_t total = 0;
  if (cross_layer_accumulator_)  // accumulator rows of the stored tokens
    for (int32_t s = 0; s < layers_[0].stores[0].sequences(); ++s)
      total += static_cast<size_t>(layers_[0].stores[0].length(s)) * config_.dim * sizeof(float);
  if (keep_outlier_)  // one fp16 value per stored token per layer
    for (int32_t s = 0; s < sequences(); ++s)
      total += static_cast<size_t>(layers_[0].stores[0].length(s)) * config_.n_layers *
               outliers_per_token_ * sizeof(uint16_t);
  for (const Layer& layer : layers_)
    for (const RowStore& store : layer.stores)
      for (int32_t s = 0; s < store.sequences(); ++s) total += store.payload_bytes(s);
  return total;
}

namespace {

HostMatrix host_matrix(const Projection& p) {
  return {p.values.empty() ? nullptr : p.values.data(), p.rows, p.cols};
}

}  // namespace

CacheBlockLayout QuantizedCache::block_layout() const {
  CacheBlockLayout layout;
  layout.mode = mode_;
  layout.kv_source = layout_.kv_source;
  layout.block_bytes = pool_.block_bytes();
  layout.total_blocks = pool_.total_blocks();
  layout.window_tokens = window_tokens_;
  layout.keep_outlier = keep_outlier_;
  layout.outliers_per_token = keep_outlier_ ? outliers_per_token_ : 0;
  layout.cross_layer_accumulator = cross_layer_accumulator_;
  layout.accumulator_offset = accumulator_offset_;
  layout.first_layer = first_layer_;
  for (size_t i = 0; i < layers_.size(); ++i) {
    const Layer& layer = layers_[i];
    LayerLayout out;
    for (size_t s = 0; s < layer.stores.size(); ++s) {
      const RowStore& store = layer.stores[s];
      StreamLayout stream;
      stream.content = layout_.streams[s].content;
      stream.width = store.width();
      stream.bits = store.bits();
      stream.axis = store.axis();
      stream.group_offset = store.group_offset();
      stream.window_offset = store.window_offset();
      stream.row_code_bytes = store.row_code_bytes();
      stream.row_groups = store.row_groups();
      stream.group_code_bytes = store.group_code_bytes();
      out.streams.push_back(stream);
    }
    out.outlier_offset = keep_outlier_ ? outlier_offsets_[i] : 0;
    out.encode_k = host_matrix(layer.encode_k);
    out.encode_v = host_matrix(layer.encode_v);
    out.decode_x = host_matrix(layer.decode_x);
    out.rebuild_k = host_matrix(layer.rebuild_k);
    out.rebuild_v = host_matrix(layer.rebuild_v);
    const int64_t kv = config_.kv_dim();
    // Input-major: kv rows of head_dim (one block per KV head) or of kv.
    auto input_major = [kv](const cpu::AlignedVector<float>& m) {
      return m.empty() ? HostMatrix{}
                       : HostMatrix{m.data(), kv, static_cast<int64_t>(m.size()) / kv};
    };
    out.latent_from_k = input_major(layer.latent_from_k);
    out.latent_from_v = input_major(layer.latent_from_v);
    out.rebuild_k_per_head = layer.rebuild_k_per_head;
    out.cross_layer_delta = cross_layer_delta_[i];
    out.cross_layer_keeps = cross_layer_keeps_[i];
    layout.layers.push_back(std::move(out));
  }
  return layout;
}

CacheBlocksView QuantizedCache::blocks(int32_t seq) const {
  return {pool_.arena(), &tables_.at(static_cast<size_t>(seq))};
}

}  // namespace xq
