// The reference KV cache: K (rotated by RoPE on arrival) and V stored in fp16,
// per KV head contiguous over positions so a decode step reads each head as one
// stream. Sequence-sharded (CacheOptions::sequence_shards = S) it keeps its
// shard's tokens, dealt one at a time (runtime/sequence_shard.h; tensor
// parallelism where the KV heads do not split evenly over the TP group), and
// answers attend_partial().
#pragma once

#include <vector>

#include "runtime/cache.h"
#include "runtime/sequence_shard.h"

namespace xq {

class Fp16KvCache : public AttentionCache {
 public:
  Fp16KvCache(const ModelConfig& config, const CacheOptions& options);

  std::string mode() const override { return "fp16"; }
  void append(int32_t seq, int32_t layer, int32_t pos0, int32_t n, const float* x, const float* k,
              const float* v) override;
  void attend(int32_t seq, int32_t layer, int32_t pos0, int32_t n, const float* q,
              float* out) override;
  void attend_partial(int32_t seq, int32_t layer, int32_t pos0, int32_t n, const float* q,
                      cpu::PartialAttention& state) override;
  void truncate(int32_t seq, int32_t from) override;
  int32_t length(int32_t seq) const override { return lengths_.at(seq); }
  double bytes_per_token() const override;
  double fp16_bytes_per_token() const override { return bytes_per_token(); }
  size_t bytes_for_tokens(int32_t tokens) const override;
  size_t bytes_in_use() const override;
  // Interim: the storage is still reserved per sequence.
  size_t block_bytes() const override { return bytes_for_tokens(kBlockTokens); }
  int32_t total_blocks() const override { return sequences() * blocks_for_tokens(max_tokens_); }
  int32_t free_blocks() const override {
    int32_t used = 0;
    for (int32_t s : lengths_) used += blocks_for_tokens(s);
    return total_blocks() - used;
  }
  int32_t sequences() const override { return static_cast<int32_t>(lengths_.size()); }
  int32_t blocks_for_tokens(int32_t tokens) const override {
    return (tokens + kBlockTokens - 1) / kBlockTokens;
  }

 private:
  // (kv_heads, max_tokens, head_dim) block of one sequence's layer.
  uint16_t* keys(int32_t seq, int32_t layer);
  uint16_t* values(int32_t seq, int32_t layer);
  void check(int32_t seq, int32_t pos0, int32_t n) const;
  // The block walk of decode over this shard's tokens (global positions).
  void attend_blocks(int32_t seq, int32_t layer, int32_t pos0, int32_t n, const float* q,
                     cpu::PartialAttention& state);

  ModelConfig config_;
  int32_t max_tokens_;   // per sequence, all shards together
  SequenceShard shard_;  // the tokens this cache holds
  int32_t capacity_;     // this shard's share of max_tokens_
  int32_t sequences_;
  size_t block_elems_;  // kv_heads * capacity * head_dim
  const float* rope_cos_sin_;
  std::vector<uint16_t> storage_;
  std::vector<float> rotated_;  // scratch: the keys of one append after RoPE
  std::vector<int32_t> positions_;
  std::vector<int32_t> lengths_;  // global positions held (every shard knows)
};

}  // namespace xq
