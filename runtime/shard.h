// How one tensor-parallel rank's share of a Llama layer is cut (Megatron
// style): query heads split as evenly as possible over the TP group; a rank
// keeps exactly the KV heads its query heads use (head h reads KV head
// h / (n_heads / n_kv_heads)), so KV heads are split when there are at least
// as many as ranks and replicated where a KV head's group of query heads spans
// ranks; FFN rows split as evenly as possible in whole blocks of w_down's type.
// Wq, Wk, Wv, gate and up are cut by output rows, Wo and down by input columns;
// every slice is a view into the model's weights, never a copy.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "kernels/tensor_type.h"
#include "runtime/model.h"

namespace xq {

struct Range {
  int64_t begin = 0, count = 0;
  int64_t end() const { return begin + count; }
  bool operator==(const Range&) const = default;
};

// n items over `parts` as evenly as possible: the first n % parts parts get one
// more (9 heads over 4 ranks: 3, 2, 2, 2). Parts may be empty when n < parts.
std::vector<Range> even_split(int64_t n, int parts);

struct TpShard {
  Range heads;     // global query heads [begin, end)
  Range kv_heads;  // global KV heads those query heads read
  Range ffn;       // FFN channels: rows of gate/up, columns of down
};

// Rank `rank` of `tp`. Throws xq::Error when a rank would get no query head or
// no FFN block, or a slice would not fall on block boundaries.
TpShard plan_shard(const Model& model, int tp, int rank);

// Rows [begin, begin + count) of w: the data pointer moves by whole rows.
WeightMatrix row_slice(const WeightMatrix& w, int64_t begin, int64_t count);

// Columns [begin, begin + count) of w: the data pointer moves to the block
// holding column `begin`, cols = count, row_bytes unchanged (rows keep their
// full stride). Throws xq::Error unless begin and count are multiples of the
// type's block size (32 for Q4_0..Q8_1, 256 for k-quants, 1 for float types).
WeightMatrix column_slice(const WeightMatrix& w, int64_t begin, int64_t count);

// Bytes a matmul with w reads: rows x the bytes of cols elements (for a column
// slice, less than w.bytes(), which counts the full row stride).
size_t slice_bytes(const WeightMatrix& w);

// The per-rank views of one layer.
struct LayerShard {
  const float* attn_norm = nullptr;
  WeightMatrix wq, wk, wv, wo;
  const float* ffn_norm = nullptr;
  WeightMatrix w_gate, w_up, w_down;
};

LayerShard shard_layer(const LayerWeights& w, const ModelConfig& config, const TpShard& shard);

}  // namespace xq
