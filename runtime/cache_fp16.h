// The reference KV cache: K (rotated by RoPE on arrival) and V stored in fp16
// in the blocks of the cache pool (runtime/block_pool.h), per KV head
// contiguous over a block's 128 positions so a decode step reads each head as
// one stream per block. Sequence-sharded (CacheOptions::sequence_shards = S) it keeps its
// shard's tokens, dealt one at a time (runtime/sequence_shard.h; tensor
// parallelism where the KV heads do not split evenly over the TP group), and
// answers attend_partial().
#pragma once

#include <vector>

#include "runtime/block_pool.h"
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
  size_t payload_bytes() const override;
  size_t block_bytes() const override { return pool_.block_bytes(); }
  int32_t total_blocks() const override { return pool_.total_blocks(); }
  int32_t free_blocks() const override { return pool_.free_blocks(); }
  int32_t sequences() const override { return sequences_; }
  int32_t blocks_for_tokens(int32_t tokens) const override {
    return (shard_.owned_before(tokens) + kBlockTokens - 1) / kBlockTokens;
  }
  CacheBlockLayout block_layout() const override;
  CacheBlocksView blocks(int32_t seq) const override;

 private:
  // Keys, then values, of layer `layer` in a block: (kv_heads, 128, head_dim)
  // each, so a head's rows of the block are one stream.
  uint16_t* keys(int32_t block, int32_t layer);
  const uint16_t* keys(int32_t block, int32_t layer) const;
  const uint16_t* values(int32_t block, int32_t layer) const;
  void check(int32_t seq, int32_t pos0, int32_t n) const;
  void check_appended(int32_t seq, int32_t layer, int32_t end) const;
  // The block walk of decode over this shard's tokens (global positions).
  void attend_blocks(int32_t seq, int32_t layer, int32_t pos0, int32_t n, const float* q,
                     cpu::PartialAttention& state);
  // Gives back the blocks past what the layers' longest holds.
  void fit_table(int32_t seq);

  ModelConfig config_;
  int32_t max_tokens_;   // per sequence, all shards together
  SequenceShard shard_;  // the tokens this cache holds
  int32_t sequences_;
  size_t head_elems_;  // 128 * head_dim: one head's rows in a block
  const float* rope_cos_sin_;
  BlockPool pool_;
  std::vector<BlockTable> tables_;
  std::vector<float> rotated_;  // scratch: the keys of one append after RoPE
  std::vector<int32_t> positions_;
  // Global positions held, per sequence and layer (layers fill one by one).
  std::vector<int32_t> layer_lengths_;
  std::vector<int32_t> lengths_;  // global positions held (every shard knows)
};

}  // namespace xq
