// Where a cache keeps its bytes, spelled out for a second implementation of
// the same cache (the device caches, runtime/device_cache.h) and for tests
// that hand one implementation's blocks to the other. Everything here is read
// off the CPU cache, so the two cannot disagree about a layout.
//
// A block of the pool (block_bytes) holds 128 local token positions:
//   fp16 mode: per layer, keys (kv_heads, 128, head_dim) fp16 after RoPE,
//     then values (kv_heads, 128, head_dim) fp16 (fp16_layer_bytes each layer);
//   quantized modes: per layer, each stream's group region at group_offset
//     (runtime/row_store.h: per token, 128 rows of row_code_bytes packed
//     codes then 128 x row_groups GroupParams; per channel, the block's
//     128 x width codes packed token-major then width GroupParams), then the
//     layer's fp16 outlier channels (128 x outliers_per_token) where kept;
//     after all layers the XQuant-CL accumulator rows (128 x dim fp32).
// A window page (same size) holds window_tokens fp16 rows of every
// per-channel stream at its window_offset.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "runtime/block_pool.h"
#include "runtime/cache_mode.h"

namespace xq {

struct StreamLayout {
  StreamContent content = StreamContent::kX;
  int64_t width = 0;  // values per token
  int bits = 4;
  QuantAxis axis = QuantAxis::kPerToken;
  size_t group_offset = 0;   // bytes into a group block
  size_t window_offset = 0;  // bytes into a window page (per channel)
  // Per token: packed bytes of one token's row and its groups along the row
  // (128 channels each, the last possibly shorter).
  size_t row_code_bytes = 0;
  int64_t row_groups = 0;
  // Bytes of codes of a whole block (128 tokens), before the parameters.
  size_t group_code_bytes = 0;
};

// A matrix the rebuild uses, row-major (rows, cols), fp32.
struct HostMatrix {
  const float* values = nullptr;
  int64_t rows = 0, cols = 0;
};

struct LayerLayout {
  std::vector<StreamLayout> streams;  // the layout's streams, in its order
  size_t outlier_offset = 0;          // where the layer's fp16 outliers start (if kept)
  // The rebuild (runtime/cache_quantized.h, Layer): empty where unused.
  HostMatrix encode_k, encode_v, decode_x, rebuild_k, rebuild_v;
  // Latents from K and V (input-major, kv rows of head_dim per KV head or of
  // kv); empty: the latents are encoded from X with encode_k / encode_v.
  HostMatrix latent_from_k, latent_from_v;
  bool rebuild_k_per_head = false;  // rebuild_k is (kv, head_dim): a block per KV head
  // XQuant-CL: this layer codes a delta from the previous layer's Xhat, and
  // keeps its own Xhat in the accumulator for the next.
  bool cross_layer_delta = false, cross_layer_keeps = false;
};

struct CacheBlockLayout {
  std::string mode;
  KvSource kv_source = KvSource::kReadBack;
  bool fp16 = false;  // the fp16 KV mode (no streams)
  size_t block_bytes = 0;
  int32_t total_blocks = 0;
  int32_t window_tokens = 0;  // 0: no per-channel stream, no window
  size_t fp16_layer_bytes = 0;
  bool keep_outlier = false;
  int32_t outliers_per_token = 0;
  bool cross_layer_accumulator = false;
  size_t accumulator_offset = 0;
  int32_t first_layer = 0;  // model index of layer 0 of this cache
  std::vector<LayerLayout> layers;
};

// A sequence's blocks as a test reads them: the table and the arena.
struct CacheBlocksView {
  const uint8_t* arena = nullptr;  // block b at arena + b * block_bytes
  const BlockTable* table = nullptr;
};

}  // namespace xq
