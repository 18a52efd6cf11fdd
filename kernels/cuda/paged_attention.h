// Kernels of the device attention caches (runtime/device_cache.h) over the
// block pool's arena: writing a step's new rows into their blocks, and
// attention of a step's queries over the blocks of their sequences. Every
// pointer is device memory of the current device and every call only enqueues
// on `stream`. Plain C++ header: no CUDA types.
//
// Everything that changes from step to step (which sequence a row belongs
// to, its position, the block tables) is read by the kernels from device
// memory (StepRow arrays, tables), never passed as an argument, so a CUDA
// graph captured for one shape of step (a number of rows) replays for any
// positions and tables. Arguments are shapes and fixed addresses only.
//
// Conventions: q (rows, heads, head_dim) after RoPE; out (rows, heads *
// head_dim) the attention before Wo; scores are q·k / sqrt(head_dim) and the
// online-softmax states use natural exp/log (kernels/attention_state.h).
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/cuda/device.h"
#include "kernels/elementwise.h"

namespace xq::cuda::paged {

// One query row of a step: its sequence (the row of `tables`) and its global
// position. Device array in segment order, written by begin_step.
struct StepRow {
  int32_t seq = 0;
  int32_t pos = 0;
};

// Token ownership under sequence sharding, as xq::SequenceShard: token at
// global position t lives on shard (t / unit) % shards, at local slot
// owned_before(t) of that shard. shards = 1: every token, slot = position.
struct ShardSpec {
  int32_t shards = 1, index = 0, unit = 1;
};

// The pool as the kernels see it: one arena of `block_bytes` blocks, and per
// sequence `table_stride` block ids (its group blocks in token order: local
// slots [128 i, 128 i + 128) live in block tables[seq * table_stride + i]).
struct PagedArena {
  uint8_t* arena = nullptr;
  size_t block_bytes = 0;
  const int32_t* tables = nullptr;
  int32_t table_stride = 0;
};

// The fp16 KV layout (runtime/cache_fp16.h): per block, per layer at
// layer * layer_bytes, keys (kv_heads, 128, head_dim) fp16 after RoPE, then
// values of the same shape.
struct Fp16KvShape {
  int32_t kv_heads = 0, head_dim = 0, heads = 0;  // heads: query heads (a multiple of kv_heads)
  size_t layer_bytes = 0;
  int32_t rope_dim = 0;
  RopeLayout rope_layout = RopeLayout::kInterleaved;
};

// How the decode kernels split a row's context (flash-decoding): split s
// covers local slots [s * tokens_per_split, (s + 1) * tokens_per_split), and
// `splits` covers the longest context the cache holds. tokens_per_split is a
// multiple of 128 (a split is whole pool blocks).
struct SplitPlan {
  int32_t splits = 1;
  int32_t tokens_per_split = 128;
};
// The plan for a cache whose sequences hold at most `max_local_tokens` slots:
// at most kMaxSplits splits of whole blocks.
constexpr int32_t kMaxSplits = 32;
SplitPlan plan_splits(int32_t max_local_tokens);
// Floats of split scratch for `rows` query rows: per (row, head, split) a max,
// a sum and head_dim acc values.
size_t split_scratch_floats(int64_t rows, int32_t heads, int32_t head_dim, const SplitPlan& plan);

// Where attention goes: exactly one of
//   out: the normalized attention (rows, heads * head_dim);
//   state_max, state_sum (rows * heads) and state_acc (rows * heads, head_dim):
//     the unnormalized online-softmax state over this cache's tokens (query
//     major, cpu::PartialAttention's layout), for a merge across ranks. A row
//     that sees none of this shard's tokens gets the empty state (max -inf,
//     sum 0, acc 0).
struct AttentionTarget {
  float* out = nullptr;
  float* state_max = nullptr;
  float* state_sum = nullptr;
  float* state_acc = nullptr;
};

// Limits of the fp16 decode kernel's shared memory: head_dim even and at most
// kMaxHeadDim, at most kMaxGroup query heads per KV head.
constexpr int32_t kMaxHeadDim = 128;
constexpr int32_t kMaxGroup = 8;

// Writes rows n_rows of k (rows, kv_heads * head_dim; before RoPE) and v
// (same) of layer `layer` into their blocks: K rotated at the row's position
// with the uploaded table cos_sin (cpu::rope_table's layout) and rounded to
// fp16 (nearest, ties to even), V rounded. Rows whose token another shard
// owns are skipped.
void fp16_encode(const PagedArena& pool, const Fp16KvShape& shape, int32_t layer,
                 const StepRow* rows, int32_t n_rows, const float* k, const float* v,
                 const float* cos_sin, const ShardSpec& shard, Stream& stream);

// Attention of q (n_rows, heads, head_dim) over the fp16 blocks of layer
// `layer`: row r sees the local slots [0, owned_before(pos_r + 1)) of its
// sequence. With plan.splits > 1, `scratch` holds
// split_scratch_floats(n_rows, ...) floats and a second kernel merges the
// splits into `target`; with one split the attention kernel writes `target`
// directly and scratch may be null.
void fp16_attention(const PagedArena& pool, const Fp16KvShape& shape, int32_t layer,
                    const StepRow* rows, int32_t n_rows, const float* q, const ShardSpec& shard,
                    const SplitPlan& plan, float* scratch, const AttentionTarget& target,
                    Stream& stream);

// The merge of sequence shards' states after an all_gather: `gathered` holds
// `ranks` records in rank order, each max (rows), sum (rows), acc (rows,
// width) (the record runtime/partial_attention_merge.cpp exchanges; the
// buffers of run_layer_partial laid out back to back). Merges them in rank
// order from the empty state with attention_state::merge_row and writes
// out (rows, width) = acc / sum.
void merge_partial_states(const float* gathered, int32_t ranks, int64_t rows, int64_t width,
                          float* out, Stream& stream);

}  // namespace xq::cuda::paged
