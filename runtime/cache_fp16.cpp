#include "runtime/cache_fp16.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/aligned_vector.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/small_gemm.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/error.h"
#include "runtime/cache_mode.h"
#include "runtime/decode_queries.h"

namespace xq {
namespace {

// From this many queries on, attention runs as two sgemm calls per head
// (prefill); below it, as dot products over the cached rows (decode).
// Tokens per decode job (as in the quantized cache).
constexpr int32_t kDecodeBlock = 64;

}  // namespace

Fp16KvCache::Fp16KvCache(const ModelConfig& config, const CacheOptions& options)
    : config_(config),
      max_tokens_(options.max_tokens),
      shard_(options.sequence_shards, options.sequence_shard, cache_layouts::kFp16Kv.shard_unit()),
      sequences_(options.sequences),
      rope_cos_sin_(options.rope_cos_sin) {
  if (max_tokens_ <= 0 || sequences_ <= 0) throw Error("fp16 cache: capacity must be positive");
  if (!rope_cos_sin_) throw Error("fp16 cache: no RoPE table");
  head_elems_ = static_cast<size_t>(kBlockTokens) * config.head_dim;
  // A block: per layer, K then V, each (kv_heads, 128, head_dim) fp16.
  const size_t bytes =
      round_up(head_elems_ * config.n_kv_heads * 2 * config.n_layers * sizeof(uint16_t),
               BlockPool::kAlignment);
  pool_ = BlockPool(
      bytes,
      blocks_in_budget(options.pool_bytes, bytes, sequences_ * blocks_for_tokens(max_tokens_)),
      !options.layout_only);
  tables_.resize(sequences_);
  layer_lengths_.assign(static_cast<size_t>(sequences_) * config.n_layers, 0);
  lengths_.assign(sequences_, 0);
}

const uint16_t* Fp16KvCache::keys(int32_t block, int32_t layer) const {
  return reinterpret_cast<const uint16_t*>(pool_.block(block)) +
         static_cast<size_t>(layer) * 2 * config_.n_kv_heads * head_elems_;
}

uint16_t* Fp16KvCache::keys(int32_t block, int32_t layer) {
  return const_cast<uint16_t*>(static_cast<const Fp16KvCache*>(this)->keys(block, layer));
}

const uint16_t* Fp16KvCache::values(int32_t block, int32_t layer) const {
  return keys(block, layer) + config_.n_kv_heads * head_elems_;
}

void Fp16KvCache::check(int32_t seq, int32_t pos0, int32_t n) const {
  if (seq < 0 || seq >= sequences_)
    throw Error("cache: sequence " + std::to_string(seq) + " out of range");
  if (pos0 < 0 || n < 0 || pos0 + n > max_tokens_)
    throw Error("cache: positions [" + std::to_string(pos0) + ", " + std::to_string(pos0 + n) +
                ") exceed the cache capacity of " + std::to_string(max_tokens_) + " tokens");
}

void Fp16KvCache::fit_table(int32_t seq) {
  const int32_t* held = layer_lengths_.data() + static_cast<size_t>(seq) * config_.n_layers;
  const int32_t longest = *std::max_element(held, held + config_.n_layers);
  resize_table(pool_, tables_[seq], blocks_for_tokens(longest), 0);
}

void Fp16KvCache::append(int32_t seq, int32_t layer, int32_t pos0, int32_t n, const float*,
                         const float* k, const float* v) {
  check(seq, pos0, n);
  int32_t* held = layer_lengths_.data() + static_cast<size_t>(seq) * config_.n_layers;
  if (pos0 > held[layer])
    throw Error("cache: position " + std::to_string(pos0) + " leaves a gap after the " +
                std::to_string(held[layer]) + " tokens of sequence " + std::to_string(seq));
  BlockTable& table = tables_[seq];
  const int32_t groups = blocks_for_tokens(pos0 + n);
  if (pos0 == 0 && held[layer] > 0) {
    // A new sequence in the slot: its blocks go back first (the check in
    // resize_table counts them as free), every layer starts over.
    resize_table(pool_, table, groups, 0);
    std::fill(held, held + config_.n_layers, 0);
    lengths_[seq] = 0;
  } else if (groups > static_cast<int32_t>(table.groups.size())) {
    resize_table(pool_, table, groups, 0);  // throws before anything is written
  }
  const int32_t hd = config_.head_dim, kv_dim = config_.kv_dim();
  rotated_.assign(k, k + static_cast<size_t>(n) * kv_dim);
  positions_.resize(n);
  for (int32_t i = 0; i < n; ++i) positions_[i] = pos0 + i;
  cpu::rope(rotated_.data(), positions_.data(), n, config_.n_kv_heads, hd, config_.rope_dim,
            config_.rope_layout, rope_cos_sin_);
  for (int32_t i = 0; i < n; ++i) {
    if (!shard_.owns(pos0 + i)) continue;  // another shard's token
    const int32_t slot = shard_.owned_before(pos0 + i);
    uint16_t* key_block = keys(table.groups[slot / kBlockTokens], layer);
    uint16_t* value_block = key_block + config_.n_kv_heads * head_elems_;
    for (int32_t g = 0; g < config_.n_kv_heads; ++g) {
      const size_t at = g * head_elems_ + static_cast<size_t>(slot % kBlockTokens) * hd;
      cpu::fp32_to_fp16_row(rotated_.data() + static_cast<size_t>(i) * kv_dim + g * hd,
                            key_block + at, hd);
      cpu::fp32_to_fp16_row(v + static_cast<size_t>(i) * kv_dim + g * hd, value_block + at, hd);
    }
  }
  held[layer] = std::max(held[layer], pos0 + n);
  if (layer == config_.n_layers - 1) lengths_[seq] = std::max(lengths_[seq], pos0 + n);
}

void Fp16KvCache::check_appended(int32_t seq, int32_t layer, int32_t end) const {
  if (end > layer_lengths_[static_cast<size_t>(seq) * config_.n_layers + layer])
    throw Error("cache: attend over tokens that were not appended");
}

void Fp16KvCache::attend_partial(int32_t seq, int32_t layer, int32_t pos0, int32_t n,
                                 const float* q, cpu::PartialAttention& state) {
  check(seq, pos0, n);
  check_appended(seq, layer, pos0 + n);
  attend_blocks(seq, layer, pos0, n, q, state);
}

// Jobs of (KV head, block of kDecodeBlock stored tokens) across threads. Each
// job widens its block of keys and values to fp32 once for the group's query
// heads, scores eight keys per horizontal sum, and adds to an online softmax
// that is merged across jobs at the end.
void Fp16KvCache::attend_blocks(int32_t seq, int32_t layer, int32_t pos0, int32_t n, const float* q,
                                cpu::PartialAttention& result) {
  const int32_t hd = config_.head_dim, heads = config_.n_heads, group = heads / config_.n_kv_heads;
  const int32_t total = shard_.owned_before(pos0 + n);  // stored tokens the queries may see
  const BlockTable& table = tables_[seq];
  const int32_t kv_heads = config_.n_kv_heads;
  const int64_t blocks = (total + kDecodeBlock - 1) / kDecodeBlock;
  std::vector<int32_t> visible_end;
  const cpu::DecodeQueries queries = decode_queries(q, n, pos0, config_, shard_, visible_end);
  cpu::attend_in_blocks(
      kv_heads * blocks, static_cast<int64_t>(n) * heads, hd, result,
      [&](int64_t job, cpu::PartialAttention& mine) {
        // Each thread's buffers live across calls (once per layer per step).
        thread_local cpu::AlignedVector<float> k_rows, v_rows, scores;
        k_rows.resize(static_cast<size_t>(kDecodeBlock) * hd);
        v_rows.resize(k_rows.size());
        scores.resize(static_cast<size_t>(group) * kDecodeBlock);
        const int32_t g = static_cast<int32_t>(job / blocks);
        const int32_t t0 = static_cast<int32_t>(job % blocks) * kDecodeBlock;
        const int32_t rows = std::min(kDecodeBlock, total - t0);
        // A decode block lies inside one pool block (64 divides 128).
        const int32_t pool_block = table.groups[t0 / kBlockTokens];
        const size_t at = g * head_elems_ + static_cast<size_t>(t0 % kBlockTokens) * hd;
        cpu::fp16_to_fp32_row(keys(pool_block, layer) + at, k_rows.data(),
                              static_cast<int64_t>(rows) * hd);
        cpu::fp16_to_fp32_row(values(pool_block, layer) + at, v_rows.data(),
                              static_cast<int64_t>(rows) * hd);
        cpu::CachedBlock block;
        block.first_token = t0;
        block.tokens = rows;
        block.first_kv_head = g;
        block.kv_heads = 1;
        block.keys = k_rows.data();
        block.key_stride = hd;
        block.values = v_rows.data();
        block.value_stride = hd;
        block.values_shared = false;
        cpu::absorb_block(mine, queries, block, scores.data(), kDecodeBlock);
      },
      blocks);
}

void Fp16KvCache::attend(int32_t seq, int32_t layer, int32_t pos0, int32_t n, const float* q,
                         float* out) {
  check(seq, pos0, n);
  if (shard_.sharded())
    throw Error("cache: a sequence-sharded cache attends through attend_partial()");
  check_appended(seq, layer, pos0 + n);
  // Every query count takes the block walk, so a query gets the same bits in
  // a prefill chunk of any size as in a decode step.
  thread_local cpu::PartialAttention result;
  attend_blocks(seq, layer, pos0, n, q, result);
  cpu::normalize_attention(result, 0, result.rows, out);  // rows (query, head): out's layout
}

void Fp16KvCache::truncate(int32_t seq, int32_t from) {
  check(seq, 0, 0);
  from = std::max(0, from);
  lengths_[seq] = std::min(lengths_[seq], from);
  int32_t* held = layer_lengths_.data() + static_cast<size_t>(seq) * config_.n_layers;
  for (int32_t layer = 0; layer < config_.n_layers; ++layer)
    held[layer] = std::min(held[layer], from);
  fit_table(seq);  // only gives blocks back
}

double Fp16KvCache::bytes_per_token() const {
  return 2.0 * sizeof(uint16_t) * config_.kv_dim() * config_.n_layers;
}

size_t Fp16KvCache::bytes_for_tokens(int32_t tokens) const {
  return static_cast<size_t>(shard_.owned_before(tokens)) * 2 * sizeof(uint16_t) *
         config_.kv_dim() * config_.n_layers;
}

size_t Fp16KvCache::payload_bytes() const {
  size_t tokens = 0;
  for (int32_t len : lengths_) tokens += static_cast<size_t>(shard_.owned_before(len));
  return tokens * 2 * sizeof(uint16_t) * config_.kv_dim() * config_.n_layers;
}

CacheBlockLayout Fp16KvCache::block_layout() const {
  CacheBlockLayout layout;
  layout.mode = "fp16";
  layout.kv_source = KvSource::kReadBack;
  layout.fp16 = true;
  layout.block_bytes = pool_.block_bytes();
  layout.total_blocks = pool_.total_blocks();
  layout.fp16_layer_bytes = 2 * head_elems_ * config_.n_kv_heads * sizeof(uint16_t);
  layout.layers.resize(static_cast<size_t>(config_.n_layers));
  return layout;
}

CacheBlocksView Fp16KvCache::blocks(int32_t seq) const {
  return {pool_.arena(), &tables_.at(static_cast<size_t>(seq))};
}

}  // namespace xq
