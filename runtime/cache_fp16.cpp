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
constexpr int32_t kMinQueriesForGemm = 16;
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
  capacity_ = shard_.owned_before(max_tokens_);
  block_elems_ = static_cast<size_t>(config.n_kv_heads) * capacity_ * config.head_dim;
  storage_.resize(block_elems_ * 2 * config.n_layers * sequences_);
  lengths_.assign(sequences_, 0);
}

uint16_t* Fp16KvCache::keys(int32_t seq, int32_t layer) {
  return storage_.data() + (static_cast<size_t>(seq) * config_.n_layers + layer) * 2 * block_elems_;
}

uint16_t* Fp16KvCache::values(int32_t seq, int32_t layer) {
  return keys(seq, layer) + block_elems_;
}

void Fp16KvCache::check(int32_t seq, int32_t pos0, int32_t n) const {
  if (seq < 0 || seq >= sequences_)
    throw Error("cache: sequence " + std::to_string(seq) + " out of range");
  if (pos0 < 0 || n < 0 || pos0 + n > max_tokens_)
    throw Error("cache: positions [" + std::to_string(pos0) + ", " + std::to_string(pos0 + n) +
                ") exceed the cache capacity of " + std::to_string(max_tokens_) + " tokens");
}

void Fp16KvCache::append(int32_t seq, int32_t layer, int32_t pos0, int32_t n, const float*,
                         const float* k, const float* v) {
  check(seq, pos0, n);
  const int32_t hd = config_.head_dim, kv_dim = config_.kv_dim();
  uint16_t* key_block = keys(seq, layer);
  uint16_t* value_block = values(seq, layer);
  rotated_.assign(k, k + static_cast<size_t>(n) * kv_dim);
  positions_.resize(n);
  for (int32_t i = 0; i < n; ++i) positions_[i] = pos0 + i;
  cpu::rope(rotated_.data(), positions_.data(), n, config_.n_kv_heads, hd, config_.rope_dim,
            config_.rope_layout, rope_cos_sin_);
  for (int32_t i = 0; i < n; ++i) {
    if (!shard_.owns(pos0 + i)) continue;  // another shard's token
    const int32_t slot = shard_.owned_before(pos0 + i);
    for (int32_t g = 0; g < config_.n_kv_heads; ++g) {
      size_t at = (static_cast<size_t>(g) * capacity_ + slot) * hd;
      cpu::fp32_to_fp16_row(rotated_.data() + static_cast<size_t>(i) * kv_dim + g * hd,
                            key_block + at, hd);
      cpu::fp32_to_fp16_row(v + static_cast<size_t>(i) * kv_dim + g * hd, value_block + at, hd);
    }
  }
  if (layer == config_.n_layers - 1) lengths_[seq] = std::max(lengths_[seq], pos0 + n);
}

void Fp16KvCache::attend_partial(int32_t seq, int32_t layer, int32_t pos0, int32_t n,
                                 const float* q, cpu::PartialAttention& state) {
  check(seq, pos0, n);
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
  const uint16_t* key_block = keys(seq, layer);
  const uint16_t* value_block = values(seq, layer);
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
        const size_t at = (static_cast<size_t>(g) * capacity_ + t0) * hd;
        cpu::fp16_to_fp32_row(key_block + at, k_rows.data(), static_cast<int64_t>(rows) * hd);
        cpu::fp16_to_fp32_row(value_block + at, v_rows.data(), static_cast<int64_t>(rows) * hd);
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
  const int32_t hd = config_.head_dim, heads = config_.n_heads;
  const int32_t total = pos0 + n;
  const uint16_t* key_block = keys(seq, layer);
  const uint16_t* value_block = values(seq, layer);
  const int64_t q_stride = static_cast<int64_t>(heads) * hd;

  if (n < kMinQueriesForGemm) {  // decode
    thread_local cpu::PartialAttention result;
    attend_blocks(seq, layer, pos0, n, q, result);
    cpu::normalize_attention(result, 0, result.rows, out);  // rows (query, head): out's layout
    return;
  }

  // Prefill: widen every KV head's keys and values once, then per query head
  // (in parallel) scores = Q K^T (sgemm), causal mask + softmax, out = P V (sgemm).
  const size_t head_elems = static_cast<size_t>(total) * hd;
  std::vector<float> k_float(head_elems * config_.n_kv_heads),
      v_float(head_elems * config_.n_kv_heads);
  for (int32_t g = 0; g < config_.n_kv_heads; ++g) {
    const size_t head_at = static_cast<size_t>(g) * capacity_ * hd;
    cpu::fp16_to_fp32_row(key_block + head_at, k_float.data() + g * head_elems,
                          static_cast<int64_t>(head_elems));
    cpu::fp16_to_fp32_row(value_block + head_at, v_float.data() + g * head_elems,
                          static_cast<int64_t>(head_elems));
  }
  cpu::causal_attention(q, q_stride, n, pos0, total, heads, config_.n_kv_heads, hd, k_float.data(),
                        v_float.data(), static_cast<int64_t>(head_elems), hd, out);
}

void Fp16KvCache::truncate(int32_t seq, int32_t from) {
  check(seq, 0, 0);
  lengths_[seq] = std::min(lengths_[seq], std::max(0, from));
}

double Fp16KvCache::bytes_per_token() const {
  return 2.0 * sizeof(uint16_t) * config_.kv_dim() * config_.n_layers;
}

size_t Fp16KvCache::bytes_for_tokens(int32_t tokens) const {
  return static_cast<size_t>(shard_.owned_before(tokens)) * 2 * sizeof(uint16_t) *
         config_.kv_dim() * config_.n_layers;
}

size_t Fp16KvCache::bytes_in_use() const {
  size_t tokens = 0;
  for (int32_t len : lengths_) tokens += static_cast<size_t>(shard_.owned_before(len));
  return tokens * 2 * sizeof(uint16_t) * config_.kv_dim() * config_.n_layers;
}

}  // namespace xq
