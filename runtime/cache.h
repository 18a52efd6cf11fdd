// The attention cache interface. The forward pass hands each layer's inputs to
// the cache and asks it for "attention of these queries over your tokens";
// whether K and V are read back or rebuilt from a quantized X is the mode's
// business. Every mode states its exact bytes per token, so a scheduler can
// admit work against a byte budget, and holds several sequences (slots) so
// continuous batching and sequence sharding can sit on the same interface.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/cpu/attention.h"
#include "kernels/error.h"
#include "runtime/block_pool.h"
#include "runtime/cache_layout.h"
#include "runtime/model.h"

namespace xq {

struct CacheOptions {
  std::string mode = "fp16";  // a name in the table of modes (runtime/cache_mode.h)
  // Positions per sequence (the context; the RoPE table's length). Nothing is
  // reserved per sequence: storage comes from the pool block by block.
  int32_t max_tokens = 0;
  // Sequence slots (ids [0, sequences)): bookkeeping only (block tables).
  int32_t sequences = 1;
  // The block pool's budget in bytes for this cache (this rank's layers and
  // shard). 0: room for `sequences` sequences of max_tokens tokens each.
  size_t pool_bytes = 0;
  // RoPE cos/sin table for positions [0, max_tokens), from cpu::rope_table();
  // owned by the engine. Caches rotate keys themselves because some modes
  // (KIVI, XQuant) must keep or rebuild them before rotation.
  const float* rope_cos_sin = nullptr;
  // The paper's appendix B: the outliers of X·Uk sit in its first channel;
  // keep that channel in fp16 (xquant latent modes only).
  bool keep_outlier_channel = false;
  // xquant on GQA: K's latent from one SVD per KV head (X·Uk_g, rebuilt with a
  // head_dim x head_dim block each) or from one SVD of the whole Wk (the
  // paper's; rebuilt with one kv x kv matrix). Same bytes; per head costs
  // 1/group of the rebuild FLOPs in decode.
  bool k_latent_per_head = true;
  // A pipeline stage's cache covers `layers` layers from `first_layer` on
  // (0: all of them). Weights, pinned bits and XQuant-CL bases go by the
  // model's layer index.
  int32_t first_layer = 0;
  int32_t layers = 0;
  // XQuant-CL: model layers (beyond the base) where the chain of deltas starts
  // over from X itself, as a pipeline stage's first layer does so that stages
  // never need each other's accumulators. A single-process run names a
  // pipeline's stage boundaries here to reproduce its numbers.
  std::vector<int32_t> cross_layer_restarts;
  // Sequence sharding (docs/design.md, "Caches over a TP group"): this cache is member
  // `sequence_shard` of `sequence_shards` caches that split each sequence's
  // tokens between them (runtime/sequence_shard.h, in the mode's unit); it
  // keeps only its own tokens and answers attend_partial() over them.
  int32_t sequence_shards = 1;
  int32_t sequence_shard = 0;
  // No arena: the cache keeps its layout, its formulas and its free list
  // but no bytes, for a device cache that mirrors it (runtime/device_cache.h).
  // Such a cache must not be appended to or read.
  bool layout_only = false;
};

class AttentionCache {
 public:
  virtual ~AttentionCache() = default;

  virtual std::string mode() const = 0;
  // What the mode keeps and why, for the tools to print.
  virtual std::string describe() const { return mode(); }

  // Hands the cache the inputs of layer `layer` for n new tokens of sequence
  // `seq` at positions [pos0, pos0 + n):
  //   x (n, dim): the post-RMSNorm layer input (what XQuant modes keep);
  //   k, v (n, kv_dim): keys *before* RoPE and values (what KV modes keep).
  virtual void append(int32_t seq, int32_t layer, int32_t pos0, int32_t n, const float* x,
                      const float* k, const float* v) = 0;

  // Causal attention of n queries q (n, n_heads, head_dim) at positions
  // [pos0, pos0 + n) over tokens [0, pos0 + n) of `seq`, which must all have
  // been appended. Writes out (n, n_heads * head_dim), before the output projection.
  virtual void attend(int32_t seq, int32_t layer, int32_t pos0, int32_t n, const float* q,
                      float* out) = 0;

  // attend() as an unnormalized online-softmax state over the tokens this
  // cache holds (all of them, or its shard's): rows n * n_heads (query-major),
  // width head_dim, V already projected. Sharded caches merge these across
  // their group (parallel/partial_attention_merge.h); attend() is
  // attend_partial() divided by the sums. Throws xq::Error in modes that do
  // not support it.
  virtual void attend_partial(int32_t seq, int32_t layer, int32_t pos0, int32_t n, const float* q,
                              cpu::PartialAttention& state);

  // Drops the tokens of `seq` from position `from` on.
  virtual void truncate(int32_t seq, int32_t from) = 0;
  virtual int32_t length(int32_t seq) const = 0;

  // Bytes per cached token over all layers, from the mode's formula: codes,
  // scales and zero points, as the paper counts them (no fp16 window).
  virtual double bytes_per_token() const = 0;
  // Bytes per token of an fp16 K and V cache of the same heads and layers:
  // what the paper's memory fractions divide by.
  virtual double fp16_bytes_per_token() const = 0;
  // This mode's memory as a fraction of that fp16 cache (1 for fp16 itself).
  double fraction_of_fp16() const { return bytes_per_token() / fp16_bytes_per_token(); }
  // Bytes one sequence of `tokens` tokens takes by the formula, including the
  // fp16 window of tokens still waiting for their group.
  virtual size_t bytes_for_tokens(int32_t tokens) const = 0;
  // Bytes of the pool's blocks the sequences hold now: held blocks x
  // block_bytes(), what the budget pays for. At most total_blocks() x
  // block_bytes() <= the budget.
  size_t bytes_in_use() const {
    return static_cast<size_t>(total_blocks() - free_blocks()) * block_bytes();
  }
  // Bytes of the stored tokens as written (codes, parameters, fp16 window,
  // accumulator rows), counted at each write: what bytes_for_tokens() predicts.
  virtual size_t payload_bytes() const = 0;

  // The block pool (docs/design.md, "The cache pool"). Storage is cut into
  // blocks of kBlockTokens token positions; a sequence takes blocks as it
  // grows and gives them back on truncate()/release().
  static constexpr int32_t kBlockTokens = 128;
  // Bytes of one block of the pool: 128 token positions of every layer and
  // stream this cache holds; fp16 window pages have the same size.
  virtual size_t block_bytes() const = 0;
  virtual int32_t total_blocks() const = 0;
  virtual int32_t free_blocks() const = 0;
  virtual int32_t sequences() const = 0;
  // Blocks a sequence of `tokens` tokens holds in this cache (its shard's
  // part under sequence sharding) once every layer has them: a function of
  // the count alone, so a scheduler can keep its own ledger. One block per
  // 128-token group begun, plus, in modes with per-channel streams, the
  // window pages of the tokens past the last whole group.
  virtual int32_t blocks_for_tokens(int32_t tokens) const = 0;
  // The most blocks a sequence holds while one step (each layer appended
  // once) takes it from `from` to `to` tokens: blocks_for_tokens(to), except
  // where a per-channel window shrinks while new groups begin, and the layers
  // not yet past the step still keep the old window's pages.
  virtual int32_t blocks_for_step(int32_t from, int32_t to) const {
    return std::max(blocks_for_tokens(from), blocks_for_tokens(to));
  }
  // Gives every block of `seq` back to the pool (truncate(seq, 0)).
  void release(int32_t seq) { truncate(seq, 0); }

  // Where this cache keeps its bytes (runtime/cache_layout.h), for a device
  // twin and for tests; the matrices point into this cache.
  virtual CacheBlockLayout block_layout() const = 0;
  // The blocks of `seq` (arena null for a layout_only cache).
  virtual CacheBlocksView blocks(int32_t seq) const = 0;
};

// PoolExhausted (runtime/block_pool.h) is thrown by append() when the pool
// has no block for the new tokens, and by truncate() inside a quantized
// per-channel group whose decoded head needs window pages the pool lacks; the
// cache is left as it was before the call.

// Makes a cache of the named mode (a row of runtime/cache_mode.h) for `model`.
// Throws xq::Error on an unknown mode or options the mode does not take.
std::unique_ptr<AttentionCache> make_cache(const Model& model, const CacheOptions& options);

}  // namespace xq
