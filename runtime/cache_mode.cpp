#include "runtime/cache_mode.h"

#include "kernels/error.h"

namespace xq {
namespace {

// The table's own consistency, checked when it compiles.
constexpr bool names_are_unique() {
  for (size_t a = 0; a < std::size(kCacheModes); ++a)
    for (size_t b = a + 1; b < std::size(kCacheModes); ++b)
      if (kCacheModes[a].name == kCacheModes[b].name) return false;
  return true;
}
static_assert(names_are_unique(), "two cache modes share a name");

// A quantized mode is named family-bits; fp16 is its own family.
constexpr bool name_states_bits(const CacheModeSpec& mode) {
  if (!mode.quantized()) return mode.name == mode.family;
  if (mode.name.substr(0, mode.family.size()) != mode.family) return false;
  std::string_view rest = mode.name.substr(mode.family.size());
  if (rest.size() < 2 || rest[0] != '-') return false;
  int bits = 0;
  for (char c : rest.substr(1)) {
    if (c < '0' || c > '9') return false;
    bits = bits * 10 + (c - '0');
  }
  return bits == mode.bits;
}
constexpr bool every_name_states_its_bits() {
  for (const CacheModeSpec& mode : kCacheModes)
    if (!name_states_bits(mode)) return false;
  return true;
}
static_assert(every_name_states_its_bits(), "a cache mode's name and bits disagree");

// The caches read both: the chain of deltas needs its accumulator, and only
// the CL layouts keep one.
constexpr bool accumulator_goes_with_deltas() {
  for (const CacheModeSpec& mode : kCacheModes)
    for (const CacheLayout& layout : {mode.layout, mode.gqa_layout})
      if (mode.cross_layer_accumulator != (layout.kv_source == KvSource::kCrossLayerDeltas))
        return false;
  return true;
}
static_assert(accumulator_goes_with_deltas(), "a cache mode's accumulator and layout disagree");

// make_cache builds unquantized rows as the fp16 cache, which stores rotated
// K and V; the quantized cache keeps K before RoPE.
constexpr bool fp16_rows_store_rotated_keys() {
  for (const CacheModeSpec& mode : kCacheModes)
    for (const CacheLayout& layout : {mode.layout, mode.gqa_layout})
      if ((layout.streams[0].content == StreamContent::kRotatedKeys) == mode.quantized())
        return false;
  return true;
}
static_assert(fp16_rows_store_rotated_keys(), "an fp16 row's layout is not the fp16 cache's");

std::string_view describe(StreamContent content) {
  switch (content) {
    case StreamContent::kRotatedKeys:
      return "K after RoPE";
    case StreamContent::kKeys:
      return "K before RoPE";
    case StreamContent::kValues:
      return "V";
    case StreamContent::kX:
      return "X";
    case StreamContent::kKeyLatent:
      return "X·Uk";
    case StreamContent::kValueLatent:
      return "X·Uv";
    case StreamContent::kXDelta:
      return "X - Xhat(previous layer)";
    case StreamContent::kXDeltaLatent:
      return "(X - Xhat(previous layer))·U of [Wk | Wv]";
  }
  return "?";
}

std::string_view describe(KvSource source) {
  switch (source) {
    case KvSource::kReadBack:
      return "read back";
    case KvSource::kRebuiltFromX:
      return "rebuilt from X";
    case KvSource::kRebuiltFromLatents:
      return "rebuilt from the SVD latents";
    case KvSource::kCrossLayerDeltas:
      return "rebuilt from X = the sum of the deltas";
  }
  return "?";
}

std::string describe(const CacheLayout& layout, int bits) {
  std::string out;
  for (int32_t s = 0; s < layout.stream_count; ++s) {
    const CacheStream& stream = layout.streams[s];
    if (!out.empty()) out += ", ";
    out += std::string(describe(stream.content)) + " ";
    if (bits >= 16)
      out += "fp16";
    else if (stream.axis == QuantAxis::kPerToken)
      out += "per token";
    else
      out += "per channel (128-token groups, fp16 window)";
  }
  return out + "; K, V " + std::string(describe(layout.kv_source)) + "; shard unit " +
         std::to_string(layout.shard_unit());
}

std::string properties(const CacheModeSpec& mode) {
  return std::string(mode.cross_layer_accumulator ? "; one fp32 accumulator row per token" : "") +
         (mode.can_shard_by_head ? "; tensor parallel by KV head where they split evenly"
                                 : "; tensor parallel by sequence");
}

}  // namespace

const CacheModeSpec& find_cache_mode(std::string_view name) {
  for (const CacheModeSpec& mode : kCacheModes)
    if (mode.name == name) return mode;
  // A known family at a width it does not come in: say which it does.
  const std::string_view family = name.substr(0, name.rfind('-'));
  std::string widths;
  for (const CacheModeSpec& mode : kCacheModes)
    if (mode.quantized() && mode.family == family)
      widths += (widths.empty() ? "" : ", ") + std::to_string(mode.bits);
  if (!widths.empty())
    throw Error("cache mode '" + std::string(name) + "': " + std::string(family) + " takes " +
                widths + " bits");
  throw Error("unknown cache mode '" + std::string(name) + "' (available: " + cache_mode_names() +
              ")");
}

std::string cache_mode_names(std::string_view separator) {
  std::string out;
  for (const CacheModeSpec& mode : kCacheModes) {
    if (!out.empty()) out += separator;
    out += mode.name;
  }
  return out;
}

const CacheLayout& layout_for(const CacheModeSpec& mode, const ModelConfig& model) {
  // GQA: K+V (2 kv_dim values) narrower than X (dim).
  return 2 * model.kv_dim() < model.dim ? mode.gqa_layout : mode.layout;
}

int64_t stream_width(StreamContent content, const ModelConfig& model) {
  switch (content) {
    case StreamContent::kX:
    case StreamContent::kXDelta:
      return model.dim;
    case StreamContent::kXDeltaLatent:
      return 2 * static_cast<int64_t>(model.kv_dim());
    case StreamContent::kRotatedKeys:
    case StreamContent::kKeys:
    case StreamContent::kValues:
    case StreamContent::kKeyLatent:
    case StreamContent::kValueLatent:
      return model.kv_dim();
  }
  return 0;
}

bool shards_by_head(const CacheModeSpec& mode, const ModelConfig& model, int tp) {
  return mode.can_shard_by_head && tp > 0 && model.n_kv_heads % tp == 0;
}

SequenceShard sequence_shard(const CacheModeSpec& mode, const ModelConfig& model, int32_t shards,
                             int32_t index) {
  return SequenceShard(shards, index, layout_for(mode, model).shard_unit());
}

std::string describe(const CacheModeSpec& mode) {
  std::string out = std::string(mode.name) + ": " + describe(mode.layout, mode.bits);
  if (mode.gqa_layout.kv_source != mode.layout.kv_source ||
      mode.gqa_layout.streams[0].content != mode.layout.streams[0].content)
    out += "; on GQA models " + describe(mode.gqa_layout, mode.bits);
  return out + properties(mode);
}

std::string describe(const CacheModeSpec& mode, const ModelConfig& model) {
  return std::string(mode.name) + ": " + describe(layout_for(mode, model), mode.bits) +
         properties(mode);
}

}  // namespace xq
