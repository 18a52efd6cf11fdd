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
#include <string>

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

// The merge of a split decode's records (kernels/cuda/paged_fp16.cu): scratch
// holds per (row, head, split) a max, a sum and head_dim acc values
// (split_scratch_floats); each (row, head) merges its used splits (those that
// start inside owned_before(pos + 1)) in split order with
// attention_state::merge_row and writes `target`. The decode kernels whose
// records have this layout (fp16, kivi) share it.
void merge_split_states(const StepRow* rows, int32_t n_rows, const ShardSpec& shard,
                        const SplitPlan& plan, int32_t heads, int32_t head_dim,
                        const float* scratch, const AttentionTarget& target, Stream& stream);

// ---------------------------------------------------------------------------
// Quantized streams (runtime/row_store.h, runtime/cache_layout.h).

// One stream of one layer in the blocks: StreamLayout's fields.
//   per token: token slot t of a group block has its packed codes at
//     group_offset + (t % 128) * row_code_bytes (row_groups groups of up to
//     128 channels along the row, each packed_bytes(bits, size) bytes) and its
//     GroupParams (fp16 scale, zero) at group_offset + group_code_bytes +
//     (t % 128) * row_groups * 4;
//   per channel: a full group block holds 128 x width codes packed
//     token-major at group_offset, then width GroupParams; the tokens of the
//     partial group (local slots from floor(stored / 128) * 128 on) sit in fp16
//     in window pages: offset o = t % 128 is row o % window_tokens of page
//     o / window_tokens, at window_offset.
struct PagedStream {
  int32_t width = 0;
  int32_t bits = 4;
  bool per_channel = false;
  size_t group_offset = 0;
  size_t window_offset = 0;
  size_t row_code_bytes = 0;
  int32_t row_groups = 0;
  size_t group_code_bytes = 0;
};

// The window pages of each sequence: window_stride page ids per sequence
// (window[seq * window_stride + j] = page j), window_tokens fp16 rows a page.
struct PagedWindow {
  const int32_t* window = nullptr;
  int32_t window_stride = 0;
  int32_t window_tokens = 0;
};

// Local slots each sequence holds in this layer once the step's new rows are
// written (device array, one per sequence slot, written by begin_step): the
// kernels tell quantized groups (slots below floor(stored / 128) * 128) from
// window rows (the rest) by it.
struct PagedLengths {
  const int32_t* stored = nullptr;
};

// The XQuant decode of one layer on GQA models (the latent layout of
// runtime/cache_mode.h): K from the per-channel X·Uk latent (kv = kv_heads *
// head_dim wide) through rebuild_k, V's attention-weighted sum taken over the
// per-token X·Uv latent rows and projected once per query head through its KV
// head's rows of rebuild_v.
//   rebuild_k: per_head_k: kv_heads blocks of head_dim x head_dim, block g
//     (rows g*hd .. g*hd+hd-1 of a (kv, head_dim) row-major matrix): K[:, g*hd
//     + j] = sum_c latent[:, g*hd + c] * rebuild_k[(g*hd + j) * hd + c];
//     else dense (kv, kv): K[:, j] = sum_c latent[:, c] * rebuild_k[j * kv + c].
//     Stored in fp16 on the device (tensor-core operands).
//   rebuild_v: (kv, kv) fp32 row-major: V[:, j] = sum_c vlatent[:, c] *
//     rebuild_v[j * kv + c].
//   Outliers (keep_outlier): outliers_per_token fp16 values per token at
//     outlier_offset + (t % 128) * outliers_per_token * 2 of its group block,
//     channel k * head_dim of the K latent (per head) or channel 0 (joint);
//     they replace the dequantized value there (the quantized stream holds 0).
struct XQuantLatentLayer {
  PagedStream k_latent;  // per channel, width kv
  PagedStream v_latent;  // per token, width kv
  const uint16_t* rebuild_k_fp16 = nullptr;
  const float* rebuild_v = nullptr;
  bool per_head_k = true;
  bool keep_outlier = false;
  int32_t outliers_per_token = 0;
  size_t outlier_offset = 0;
};

struct AttentionShape {
  int32_t heads = 0, kv_heads = 0, head_dim = 0;
  int32_t rope_dim = 0;
  RopeLayout rope_layout = RopeLayout::kInterleaved;
};

// Split scratch of xquant_latent_attention: per (row, head, split) a max, a
// sum and kv (the latent width) acc values.
size_t xquant_latent_scratch_floats(int64_t rows, const AttentionShape& shape,
                                    const SplitPlan& plan);

// The fused XQuant decode kernel (kernels/cuda/paged_xquant.cu, design and
// bytes/FLOPs per token in kernels/cuda/xquant_decode.md): attention of q
// (n_rows, heads, head_dim, after RoPE) over layer `layer`'s latents of each
// row's sequence, slots [0, owned_before(pos + 1)) (quantized groups, then
// window rows). Splits and targets as fp16_attention; `cos_sin` is the RoPE
// table (keys are rotated after the rebuild, at their global positions).
void xquant_latent_attention(const PagedArena& pool, const PagedWindow& window,
                             const PagedLengths& lengths, const XQuantLatentLayer& layer,
                             const AttentionShape& shape, const StepRow* rows, int32_t n_rows,
                             const float* q, const float* cos_sin, const ShardSpec& shard,
                             const SplitPlan& plan, float* scratch, const AttentionTarget& target,
                             Stream& stream);
// The argument checks of xquant_latent_attention alone (no device needed):
// throws std::invalid_argument naming the first problem. The shared-memory
// fit (B_g stays resident) is checked at launch, against the current device.
void xquant_latent_check(const PagedWindow& window, const XQuantLatentLayer& layer,
                         const AttentionShape& shape, int32_t n_rows, const ShardSpec& shard,
                         const SplitPlan& plan, const float* scratch,
                         const AttentionTarget& target);

// ---------------------------------------------------------------------------
// The quantized caches' own kernels (kernels/cuda/paged_quant.cu): the encode
// of a step's rows into their streams, the truncation of a per-channel group,
// and the materialize path of the modes the fused kernel does not cover
// (kivi, xquant on X, xquant-cl): a sequence's stored rows dequantized into
// dense fp32 scratch, K and V rebuilt there, attention over the dense rows.
// Byte layouts and bit packing as runtime/row_store.cpp and
// kernels/cpu/group_quant.h; grids and codes by kernels/group_quant.h.

// Where each sequence's step starts (device array, one per sequence slot,
// written by begin_step): the global position of its segment's first row.
// A group completed in the step takes its rows from position step_begin on
// from the step's input, and the rows before it from the window pages.
struct StepBegins {
  const int32_t* step_begin = nullptr;
};

// Per-token stream: quantizes row r of `in` (n_rows rows of stream.width
// values, row r at in + r * in_stride) into the group block of its row's
// slot, groups of up to 128 channels along the row. Rows another shard owns
// are skipped.
void quant_encode_per_token(const PagedArena& pool, const PagedStream& stream, const StepRow* rows,
                            int32_t n_rows, const float* in, int64_t in_stride,
                            const ShardSpec& shard, Stream& cuda_stream);

// Per-channel stream: every group a row of the step completes (its slot is
// the 128th of the group) is assembled through fp16 from the window and the
// step's rows and quantized per channel into its block; then the rows whose
// group stays partial (slots from floor(stored / 128) * 128 on) are written
// to the window pages in fp16 (nearest, ties to even). Sharded caches deal
// whole 128-token groups (ShardSpec::unit 128, or 1 shard).
void quant_encode_per_channel(const PagedArena& pool, const PagedWindow& window,
                              const PagedLengths& lengths, const StepBegins& begins,
                              const PagedStream& stream, const StepRow* rows, int32_t n_rows,
                              const float* in, int64_t in_stride, const ShardSpec& shard,
                              Stream& cuda_stream);

// Truncation inside a quantized per-channel group: rows [0, head) of the
// group in block `group_block` dequantized, rounded to fp16 and written to
// window rows [0, head) (pages window_pages[0..], device array). Not
// graph-safe (arguments name blocks): begin_step and truncate only.
void quant_group_to_window(const PagedArena& pool, const PagedStream& stream, int32_t group_block,
                           const int32_t* window_pages, int32_t window_tokens, int32_t head,
                           Stream& cuda_stream);

// The latent modes' outlier channels: for each owned row, the values of
// latent channels k * channel_step (k < per_token) of `latent` (n_rows, width)
// go to the fp16 outlier slots of its block at outlier_offset and become 0 in
// `latent`, as QuantizedCache::append_own does.
void keep_outlier_channels(const PagedArena& pool, size_t outlier_offset, int32_t per_token,
                           int64_t channel_step, const StepRow* rows, int32_t n_rows, float* latent,
                           int64_t width, const ShardSpec& shard, Stream& cuda_stream);

// XQuant-CL accumulator rows (dim fp32 each, at accumulator_offset of the
// group block of the slot). delta (n_rows, dim) = x - the accumulator row of
// each owned row's slot (subtract) or x itself.
void cross_layer_delta(const PagedArena& pool, size_t accumulator_offset, int64_t dim,
                       const StepRow* rows, int32_t n_rows, const float* x, bool subtract,
                       float* delta, const ShardSpec& shard, Stream& cuda_stream);

// One sequence's dense rows: the sequence of step row `seq_row`, its slots
// [0, lengths.stored[seq]) of the first `capacity` scratch rows (the rows a
// launch covers: at least stored, at most the scratch's; the caches pass the
// step's materialize_rows, runtime/device_cache.h), everything else of the
// scratch left as it was. A launch's grid follows capacity; the threads of
// rows at or past stored leave, so a larger capacity costs idle threads only.
struct DenseRows {
  const StepRow* seq_row = nullptr;
  int32_t capacity = 0;
};

// Dequantizes slots [0, stored) of the stream into out (capacity, width):
// groups by their codes, the window's fp16 rows as they are.
void quant_materialize(const PagedArena& pool, const PagedWindow& window,
                       const PagedLengths& lengths, const PagedStream& stream,
                       const DenseRows& dense, float* out, Stream& cuda_stream);

// XQuant-CL over dense Xhat rows (capacity, dim) of stored deltas: add the
// accumulator rows (Xhat_i = Xhat_{i-1} + delta_i), then keep the result in
// them for the next layer, each where asked.
void cross_layer_accumulate(const PagedArena& pool, size_t accumulator_offset, int64_t dim,
                            const PagedLengths& lengths, const DenseRows& dense, float* xhat,
                            bool add, bool keep, Stream& cuda_stream);

// out[r, b * out_width + j] = Σ_{c < in_width} in[r * in_stride + b * in_width + c] *
//   matrix[b * block_stride + c * in_step + j * out_step] for `blocks` diagonal
// blocks and rows [0, rows), in fp32 (cublasSgemm, strided-batched over the
// blocks, on `blas` bound to `cuda_stream` with its fixed workspace: no
// allocation, so it may sit in a captured graph). The matrix is contiguous
// along its inputs (in_step 1) or its outputs (out_step 1). Every row is
// computed whatever it holds: the materialize path passes the step's dense
// rows (DenseRows::capacity, a bucket of the step's longest context, part of
// the step's graph key), and the rows past a sequence's stored ones are
// never read.
struct RowProjection {
  const float* matrix = nullptr;
  int32_t blocks = 1;
  int32_t in_width = 0, out_width = 0;
  int64_t block_stride = 0, in_step = 0, out_step = 0;
};
void project_rows(const float* in, int64_t in_stride, int32_t rows, const RowProjection& projection,
                  float* out, int64_t out_stride, Blas& blas, Stream& cuda_stream);

// RoPE of dense keys (capacity, kv_heads * head_dim) in place: local slot t
// < stored at its global position (SequenceShard::position), as cpu::rope.
void rope_dense_keys(float* keys, const PagedLengths& lengths, const DenseRows& dense,
                     const AttentionShape& shape, const float* cos_sin, const ShardSpec& shard,
                     Stream& cuda_stream);

// Attention of step rows [0, n_rows) of one sequence (rows and q start at
// its first row) over dense keys and values (capacity, kv_heads * head_dim):
// row r sees slots [0, owned_before(pos_r + 1)), its work following that
// context (a CTA per row and head, looping over the visible slots), never
// the scratch's size. head_dim at most
// kMaxHeadDim. target as fp16_attention's, its rows starting at the
// sequence's first row too.
void dense_attention(const float* keys, const float* values, const StepRow* rows, int32_t n_rows,
                     const float* q, const AttentionShape& shape, const ShardSpec& shard,
                     const AttentionTarget& target, Stream& cuda_stream);

// ---------------------------------------------------------------------------
// The fused KIVI decode (kernels/cuda/paged_kivi.cu): attention straight from
// kivi-B's packed codes, no dense K or V.

// One layer of kivi-B: K before RoPE per channel (width kv = kv_heads *
// head_dim; the partial group's tokens in the fp16 window), V per token
// (groups of 128 channels along the row).
struct KiviLayer {
  PagedStream keys;
  PagedStream values;
};

// Why kivi_attention cannot take this shape ("" when it can): at most
// kMaxGroup query heads per KV head, head_dim a multiple of 8 and at most
// kMaxHeadDim, rope_dim even and at most head_dim.
std::string kivi_unsupported(const AttentionShape& shape);

// Attention of q (n_rows, heads, head_dim, after RoPE) over layer `layer`'s
// K and V of each row's sequence, slots [0, owned_before(pos + 1)): K decoded
// from its per-channel codes (quantized groups below floor(stored / 128) *
// 128) or read from the window (the rest), rotated at each slot's global
// position with the table `cos_sin` (cpu::rope_table's layout), V decoded
// per token. Splits, scratch (split_scratch_floats) and targets as
// fp16_attention. Equal to QuantizedCache::attend for kivi up to the order of
// fp32 sums.
void kivi_attention(const PagedArena& pool, const PagedWindow& window, const PagedLengths& lengths,
                    const KiviLayer& layer, const AttentionShape& shape, const StepRow* rows,
                    int32_t n_rows, const float* q, const float* cos_sin, const ShardSpec& shard,
                    const SplitPlan& plan, float* scratch, const AttentionTarget& target,
                    Stream& stream);
// The argument checks of kivi_attention alone (no device needed): throws
// std::invalid_argument naming the first problem.
void kivi_attention_check(const PagedWindow& window, const KiviLayer& layer,
                          const AttentionShape& shape, int32_t n_rows, const ShardSpec& shard,
                          const SplitPlan& plan, const float* scratch,
                          const AttentionTarget& target);

}  // namespace xq::cuda::paged
