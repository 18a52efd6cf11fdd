#include "runtime/shard.h"

#include <string>

#include "kernels/error.h"

namespace xq {
namespace {

std::string str(int64_t v) {
  return std::to_string(v);
}

}  // namespace

std::vector<Range> even_split(int64_t n, int parts) {
  if (parts < 1) throw Error("cannot split over " + std::to_string(parts) + " parts");
  if (n < 0) throw Error("cannot split " + std::to_string(n) + " items");
  std::vector<Range> ranges(static_cast<size_t>(parts));
  const int64_t base = n / parts, extra = n % parts;
  int64_t begin = 0;
  for (int i = 0; i < parts; ++i) {
    const int64_t count = base + (i < extra ? 1 : 0);
    ranges[static_cast<size_t>(i)] = Range{begin, count};
    begin += count;
  }
  return ranges;
}

TpShard plan_shard(const Model& model, int tp, int rank) {
  const ModelConfig& c = model.config();
  if (tp < 1 || rank < 0 || rank >= tp)
    throw Error("tensor parallel: rank " + str(rank) + " of " + str(tp) + " is out of range");
  if (c.n_heads < tp)
    throw Error("tensor parallel: " + str(c.n_heads) + " query heads cannot be split over " +
                str(tp) + " ranks (every rank needs a head)");
  if (c.n_kv_heads <= 0 || c.n_heads % c.n_kv_heads != 0)
    throw Error("tensor parallel: " + str(c.n_heads) + " query heads are not a multiple of " +
                str(c.n_kv_heads) + " KV heads");
  TpShard s;
  s.heads = even_split(c.n_heads, tp)[static_cast<size_t>(rank)];
  const int64_t group = c.n_heads / c.n_kv_heads;
  const int64_t kv_first = s.heads.begin / group, kv_last = (s.heads.end() - 1) / group;
  s.kv_heads = Range{kv_first, kv_last - kv_first + 1};
  // FFN channels in whole blocks of w_down's input dimension.
  int64_t unit = 1;
  for (const LayerWeights& l : model.layers()) {
    const int64_t b = tensor_type_traits(l.w_down.type).block_elems;
    if (b > unit) unit = b;
  }
  if (c.ffn_dim % unit != 0)
    throw Error("tensor parallel: FFN width " + str(c.ffn_dim) + " is not a whole number of " +
                str(unit) + "-element blocks");
  const int64_t blocks = c.ffn_dim / unit;
  if (blocks < tp)
    throw Error("tensor parallel: " + str(blocks) + " FFN blocks of " + str(unit) +
                " cannot be split over " + str(tp) + " ranks");
  const Range b = even_split(blocks, tp)[static_cast<size_t>(rank)];
  s.ffn = Range{b.begin * unit, b.count * unit};
  return s;
}

WeightMatrix row_slice(const WeightMatrix& w, int64_t begin, int64_t count) {
  if (begin < 0 || count < 0 || begin + count > w.rows)
    throw Error("row slice [" + str(begin) + ", " + str(begin + count) + ") of a matrix with " +
                str(w.rows) + " rows");
  WeightMatrix s = w;
  s.data = w.data + static_cast<size_t>(begin) * w.row_bytes;
  s.rows = count;
  return s;
}

WeightMatrix column_slice(const WeightMatrix& w, int64_t begin, int64_t count) {
  if (begin < 0 || count < 0 || begin + count > w.cols)
    throw Error("column slice [" + str(begin) + ", " + str(begin + count) + ") of a matrix with " +
                str(w.cols) + " columns");
  const TensorTypeTraits& t = tensor_type_traits(w.type);
  if (begin % t.block_elems != 0 || count % t.block_elems != 0)
    throw Error(std::string("tensor parallel: column slice [") + str(begin) + ", " +
                str(begin + count) + ") of a " + t.name + " matrix is not on its " +
                str(t.block_elems) + "-column block boundaries");
  WeightMatrix s = w;
  s.data = w.data + static_cast<size_t>(begin / t.block_elems * t.block_bytes);
  s.cols = count;
  return s;
}

size_t slice_bytes(const WeightMatrix& w) {
  const TensorTypeTraits& t = tensor_type_traits(w.type);
  const size_t per_row = static_cast<size_t>((w.cols + t.block_elems - 1) / t.block_elems) *
                         static_cast<size_t>(t.block_bytes);
  return per_row * static_cast<size_t>(w.rows);
}

LayerShard shard_layer(const LayerWeights& w, const ModelConfig& c, const TpShard& s) {
  LayerShard l;
  l.attn_norm = w.attn_norm;
  l.ffn_norm = w.ffn_norm;
  const int64_t hd = c.head_dim;
  l.wq = row_slice(w.wq, s.heads.begin * hd, s.heads.count * hd);
  l.wk = row_slice(w.wk, s.kv_heads.begin * hd, s.kv_heads.count * hd);
  l.wv = row_slice(w.wv, s.kv_heads.begin * hd, s.kv_heads.count * hd);
  l.wo = column_slice(w.wo, s.heads.begin * hd, s.heads.count * hd);
  l.w_gate = row_slice(w.w_gate, s.ffn.begin, s.ffn.count);
  l.w_up = row_slice(w.w_up, s.ffn.begin, s.ffn.count);
  l.w_down = column_slice(w.w_down, s.ffn.begin, s.ffn.count);
  return l;
}

}  // namespace xq
