// Every attention cache mode in one table (kCacheModes): what each mode
// stores per token and along which axis, how K and V come back, how it can be
// sharded. make_cache builds a cache from a row, `xq modes` and the --cache
// help list the rows, the tensor-parallel engine asks a row whether to split
// by KV head or by sequence, and the tests and benches iterate the rows.
// Adding a mode of an existing kind is adding a row.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "runtime/model.h"
#include "runtime/row_store.h"
#include "runtime/sequence_shard.h"

namespace xq {

// What one cache stream holds per token (xquant-spec §1-§5).
enum class StreamContent {
  kRotatedKeys,   // K after RoPE (kv_dim): the fp16 cache rotates on arrival
  kKeys,          // K before RoPE (kv_dim): per-channel groups need unrotated channels
  kValues,        // V (kv_dim)
  kX,             // the layer input X after RMSNorm (dim)
  kKeyLatent,     // X·Uk (kv_dim), Uk from the SVD of Wk (runtime/latent_basis.h)
  kValueLatent,   // X·Uv (kv_dim), Uv from the SVD of Wv
  kXDelta,        // X_i - Xhat_{i-1} (dim): the delta from the previous layer's reconstruction
  kXDeltaLatent,  // (X_i - Xhat_{i-1})·U (2 kv_dim), U from the SVD of [Wk | Wv]
};

// One stored stream: its content and the axis of its quantization groups
// (runtime/row_store.h): per token, groups of up to 128 channels of a row;
// per channel, groups of 128 tokens along each channel, the newest tokens
// waiting in an fp16 window until their group is full. fp16 streams are
// stored as they come, one token at a time (kPerToken).
struct CacheStream {
  StreamContent content;
  QuantAxis axis;
};

// How attention gets K and V back from the streams.
enum class KvSource {
  kReadBack,            // the streams are K and V themselves
  kRebuiltFromX,        // K = X·Wk, V = X·Wv
  kRebuiltFromLatents,  // K = (X·Uk)·Σk·Bkᵀ, V = (X·Uv)·Σv·Bvᵀ
  kCrossLayerDeltas,    // Xhat_i = Xhat_{i-1} + delta_i (one accumulator row per token), then X
};

struct CacheLayout {
  KvSource kv_source;
  int32_t stream_count;
  CacheStream streams[2];

  // Tokens per ownership unit under sequence sharding: a stream quantized per
  // channel takes its scales from 128-token groups, so shards own whole groups
  // and each group's scales come from the same tokens as unsharded.
  constexpr int32_t shard_unit() const {
    for (int32_t s = 0; s < stream_count; ++s)
      if (streams[s].axis == QuantAxis::kPerChannel) return RowStore::kGroup;
    return 1;
  }
};

struct CacheModeSpec {
  std::string_view name;    // as --cache takes it
  std::string_view family;  // the name without its bits: fp16, kivi, xquant, xquant-cl
  int bits;                 // 16: fp16, not quantized. Quantized modes keep layers 0-2 at >= 4.
  CacheLayout layout;       // on models where X is no wider than K+V (dim <= 2 kv_dim)
  CacheLayout gqa_layout;   // where K+V is narrower than X (2 kv_dim < dim: grouped-query)
  // Each KV head's stream is separate and needs nothing from the others, so
  // tensor-parallel ranks can each hold whole KV heads.
  bool can_shard_by_head;
  // One fp32 Xhat row (dim values) per token besides the streams (XQuant-CL).
  bool cross_layer_accumulator;

  constexpr bool quantized() const { return bits < 16; }
};

namespace cache_layouts {
inline constexpr CacheLayout kFp16Kv{KvSource::kReadBack,
                                     2,
                                     {{StreamContent::kRotatedKeys, QuantAxis::kPerToken},
                                      {StreamContent::kValues, QuantAxis::kPerToken}}};
// KIVI: K per channel (its outlier channels get their own scales), V per token.
inline constexpr CacheLayout kKivi{KvSource::kReadBack,
                                   2,
                                   {{StreamContent::kKeys, QuantAxis::kPerChannel},
                                    {StreamContent::kValues, QuantAxis::kPerToken}}};
inline constexpr CacheLayout kX{
    KvSource::kRebuiltFromX, 1, {{StreamContent::kX, QuantAxis::kPerToken}}};
// X·Uk keeps K's channel structure (per channel, like KIVI's K); X·Uv per token.
inline constexpr CacheLayout kLatents{KvSource::kRebuiltFromLatents,
                                      2,
                                      {{StreamContent::kKeyLatent, QuantAxis::kPerChannel},
                                       {StreamContent::kValueLatent, QuantAxis::kPerToken}}};
inline constexpr CacheLayout kXDeltas{
    KvSource::kCrossLayerDeltas, 1, {{StreamContent::kXDelta, QuantAxis::kPerToken}}};
inline constexpr CacheLayout kXDeltaLatents{
    KvSource::kCrossLayerDeltas, 1, {{StreamContent::kXDeltaLatent, QuantAxis::kPerToken}}};
}  // namespace cache_layouts

// The table. Order: the baseline, then each family from most to fewest bits.
inline constexpr CacheModeSpec kCacheModes[] = {
    // name, family, bits, layout, gqa_layout, can_shard_by_head, cross_layer_accumulator
    {"fp16", "fp16", 16, cache_layouts::kFp16Kv, cache_layouts::kFp16Kv, true, false},
    {"kivi-4", "kivi", 4, cache_layouts::kKivi, cache_layouts::kKivi, false, false},
    {"kivi-3", "kivi", 3, cache_layouts::kKivi, cache_layouts::kKivi, false, false},
    {"kivi-2", "kivi", 2, cache_layouts::kKivi, cache_layouts::kKivi, false, false},
    {"xquant-8", "xquant", 8, cache_layouts::kX, cache_layouts::kLatents, false, false},
    {"xquant-4", "xquant", 4, cache_layouts::kX, cache_layouts::kLatents, false, false},
    {"xquant-3", "xquant", 3, cache_layouts::kX, cache_layouts::kLatents, false, false},
    {"xquant-2", "xquant", 2, cache_layouts::kX, cache_layouts::kLatents, false, false},
    {"xquant-cl-4", "xquant-cl", 4, cache_layouts::kXDeltas, cache_layouts::kXDeltaLatents, false,
     true},
    {"xquant-cl-3", "xquant-cl", 3, cache_layouts::kXDeltas, cache_layouts::kXDeltaLatents, false,
     true},
    {"xquant-cl-2", "xquant-cl", 2, cache_layouts::kXDeltas, cache_layouts::kXDeltaLatents, false,
     true},
};

inline std::span<const CacheModeSpec> cache_modes() {
  return kCacheModes;
}

// The row named `name`. Throws xq::Error naming the modes there are.
const CacheModeSpec& find_cache_mode(std::string_view name);

// The modes' names joined by `separator`, in table order.
std::string cache_mode_names(std::string_view separator = ", ");

// The row's layout on this model: `gqa_layout` where 2 kv_dim < dim.
const CacheLayout& layout_for(const CacheModeSpec& mode, const ModelConfig& model);

// Values per token of a stream of this content on this model.
int64_t stream_width(StreamContent content, const ModelConfig& model);

// Tensor parallelism over `tp` ranks: true where each rank holds whole KV heads
// (the mode allows it and the KV heads split evenly), false where every rank
// holds every head for its own share of each sequence's tokens
// (sequence_shard() below; partial results merged across the group).
bool shards_by_head(const CacheModeSpec& mode, const ModelConfig& model, int tp);

// Shard `index` of `shards` of a sequence in this mode on this model: the
// ownership unit is the layout's shard_unit().
SequenceShard sequence_shard(const CacheModeSpec& mode, const ModelConfig& model, int32_t shards,
                             int32_t index);

// One line on what the mode stores, how K and V come back and how it shards,
// for `xq modes`: on both kinds of model, or on `model`.
std::string describe(const CacheModeSpec& mode);
std::string describe(const CacheModeSpec& mode, const ModelConfig& model);

}  // namespace xq
