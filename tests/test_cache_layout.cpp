// The block layout a CPU cache reports (runtime/cache_layout.h), which the
// device caches copy byte for byte: for every mode, the regions fit in a
// block and do not overlap, a layout_only twin answers every formula the same
// without an arena, and where a stream stores its input as is (fp16 K and V,
// KIVI's K and V, X on stories260K) the bytes at the reported offsets are
// exactly what the quantizer of kernels/cpu/group_quant.h makes of the rows
// appended, computed independently here.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "kernels/cpu/group_quant.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/quant.h"
#include "runtime/cache.h"
#include "runtime/cache_layout.h"
#include "runtime/cache_mode.h"
#include "runtime/model.h"
#include "tests/cache_mode_params.h"
#include "tests/test_util.h"

namespace xq {
namespace {

// Two whole 128-token groups and a partial one (the fp16 window in
// per-channel streams).
constexpr int32_t kTokens = 300;
constexpr int32_t kMaxTokens = 512;

std::vector<float> random_rows(int64_t rows, int64_t width, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> out(static_cast<size_t>(rows * width));
  for (float& v : out) v = normal(rng);
  return out;
}

class CacheLayoutTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    model_ = Model::load(testing::shared_path("models/stories260K.bin"));
    const ModelConfig& c = model_->config();
    rope_.resize(static_cast<size_t>(kMaxTokens) * c.rope_dim);
    cpu::rope_table(rope_.data(), kMaxTokens, c.rope_dim, c.rope_theta);
  }
  CacheOptions options(bool layout_only) const {
    CacheOptions o;
    o.mode = GetParam();
    o.max_tokens = kMaxTokens;
    o.sequences = 2;
    o.rope_cos_sin = rope_.data();
    o.layout_only = layout_only;
    return o;
  }
  std::unique_ptr<Model> model_;
  std::vector<float> rope_;
};

// [begin, end) byte ranges of one block must be disjoint and inside it.
void expect_disjoint(std::vector<std::pair<size_t, size_t>> ranges, size_t block_bytes,
                     const std::string& what) {
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 0; i < ranges.size(); ++i) {
    EXPECT_LE(ranges[i].second, block_bytes) << what << ": region " << i << " leaves the block";
    if (i > 0) {
      EXPECT_LE(ranges[i - 1].second, ranges[i].first)
          << what << ": regions " << i - 1 << ", " << i << " overlap";
    }
  }
}

TEST_P(CacheLayoutTest, RegionsFitAndLayoutOnlyTwinAgrees) {
  const ModelConfig& c = model_->config();
  auto cache = make_cache(*model_, options(false));
  auto twin = make_cache(*model_, options(true));
  const CacheBlockLayout layout = cache->block_layout();
  EXPECT_EQ(layout.block_bytes, cache->block_bytes());
  EXPECT_EQ(layout.total_blocks, cache->total_blocks());
  EXPECT_EQ(twin->block_bytes(), cache->block_bytes());
  EXPECT_EQ(twin->total_blocks(), cache->total_blocks());
  EXPECT_EQ(twin->describe(), cache->describe());
  EXPECT_EQ(twin->bytes_per_token(), cache->bytes_per_token());
  for (int32_t t : {0, 1, 127, 128, 129, 300, kMaxTokens}) {
    EXPECT_EQ(twin->blocks_for_tokens(t), cache->blocks_for_tokens(t)) << t;
    EXPECT_EQ(twin->blocks_for_step(t / 2, t), cache->blocks_for_step(t / 2, t)) << t;
  }
  EXPECT_EQ(twin->blocks(0).arena, nullptr) << "a layout_only cache must not hold an arena";
  EXPECT_NE(cache->blocks(0).arena, nullptr);
  ASSERT_EQ(layout.layers.size(), static_cast<size_t>(c.n_layers));

  const CacheModeSpec& spec = find_cache_mode(GetParam());
  std::vector<std::pair<size_t, size_t>> regions, window_regions;
  if (layout.fp16) {
    EXPECT_EQ(layout.fp16_layer_bytes, 2u * 128 * c.kv_dim() * sizeof(uint16_t));
    regions.push_back({0, layout.fp16_layer_bytes * c.n_layers});
  }
  for (int32_t l = 0; l < c.n_layers; ++l) {
    const LayerLayout& layer = layout.layers[static_cast<size_t>(l)];
    for (const StreamLayout& s : layer.streams) {
      // The paper's pinning: layers 0-2 at 4 bits at least (independent of the code).
      const int expected_bits = l < 3 ? std::max(spec.bits, 4) : spec.bits;
      if (spec.family != "xquant-cl") {
        EXPECT_EQ(s.bits, expected_bits) << "layer " << l;
      }
      EXPECT_EQ(s.width, stream_width(s.content, c));
      const size_t params = s.axis == QuantAxis::kPerToken ? static_cast<size_t>(s.row_groups) * 128
                                                           : static_cast<size_t>(s.width);
      EXPECT_EQ(s.group_code_bytes, s.axis == QuantAxis::kPerToken
                                        ? s.row_code_bytes * 128
                                        : cpu::packed_bytes(s.bits, 128 * s.width));
      regions.push_back({s.group_offset,
                         s.group_offset + s.group_code_bytes + params * sizeof(cpu::GroupParams)});
      if (s.axis == QuantAxis::kPerChannel) {
        ASSERT_GT(layout.window_tokens, 0);
        window_regions.push_back(
            {s.window_offset, s.window_offset + static_cast<size_t>(layout.window_tokens) *
                                                    s.width * sizeof(uint16_t)});
      }
    }
    if (layout.keep_outlier)
      regions.push_back(
          {layer.outlier_offset,
           layer.outlier_offset + 128u * layout.outliers_per_token * sizeof(uint16_t)});
  }
  if (layout.cross_layer_accumulator)
    regions.push_back(
        {layout.accumulator_offset, layout.accumulator_offset + 128u * c.dim * sizeof(float)});
  expect_disjoint(regions, layout.block_bytes, "group block");
  expect_disjoint(window_regions, layout.block_bytes, "window page");
}

// Appends kTokens rows to every layer of sequence 1 and reads them back from
// the arena at the reported offsets.
TEST_P(CacheLayoutTest, StoredBytesAreWhereTheLayoutSays) {
  const ModelConfig& c = model_->config();
  const CacheModeSpec& spec = find_cache_mode(GetParam());
  const CacheLayout& stored = layout_for(spec, c);
  if (stored.kv_source != KvSource::kReadBack && stored.kv_source != KvSource::kRebuiltFromX)
    GTEST_SKIP() << GetParam() << " stores computed rows (latents, deltas); the region checks "
                 << "above cover it";
  auto cache = make_cache(*model_, options(false));
  const int64_t d = c.dim, kv = c.kv_dim();
  std::vector<std::vector<float>> xs, ks, vs;
  for (int32_t l = 0; l < c.n_layers; ++l) {
    xs.push_back(random_rows(kTokens, d, 10 + l));
    ks.push_back(random_rows(kTokens, kv, 20 + l));
    vs.push_back(random_rows(kTokens, kv, 30 + l));
    cache->append(1, l, 0, kTokens, xs.back().data(), ks.back().data(), vs.back().data());
  }
  const CacheBlockLayout layout = cache->block_layout();
  const CacheBlocksView view = cache->blocks(1);
  auto block = [&](int32_t t) {
    return view.arena + static_cast<size_t>(view.table->groups[t / 128]) * layout.block_bytes;
  };
  auto page = [&](int32_t offset) {
    return view.arena + static_cast<size_t>(view.table->window[offset / layout.window_tokens]) *
                            layout.block_bytes;
  };
  for (int32_t l : {0, c.n_layers - 1}) {
    const LayerLayout& layer = layout.layers[static_cast<size_t>(l)];
    if (layout.fp16) {
      std::vector<float> rotated = ks[l];
      std::vector<int32_t> positions(kTokens);
      for (int32_t t = 0; t < kTokens; ++t) positions[t] = t;
      cpu::rope(rotated.data(), positions.data(), kTokens, c.n_kv_heads, c.head_dim, c.rope_dim,
                c.rope_layout, rope_.data());
      for (int32_t t = 0; t < kTokens; ++t)
        for (int32_t h = 0; h < c.n_kv_heads; ++h)
          for (int32_t j = 0; j < c.head_dim; ++j) {
            const size_t at = (static_cast<size_t>(h) * 128 + t % 128) * c.head_dim + j;
            const auto* keys =
                reinterpret_cast<const uint16_t*>(block(t) + l * layout.fp16_layer_bytes);
            const auto* values = keys + static_cast<size_t>(c.n_kv_heads) * 128 * c.head_dim;
            ASSERT_EQ(keys[at], cpu::fp32_to_fp16(rotated[t * kv + h * c.head_dim + j]))
                << "layer " << l << " token " << t << " head " << h;
            ASSERT_EQ(values[at], cpu::fp32_to_fp16(vs[l][t * kv + h * c.head_dim + j]));
          }
      continue;
    }
    for (size_t s = 0; s < layer.streams.size(); ++s) {
      const StreamLayout& stream = layer.streams[s];
      const std::vector<float>& rows = stream.content == StreamContent::kX      ? xs[l]
                                       : stream.content == StreamContent::kKeys ? ks[l]
                                                                                : vs[l];
      const int64_t w = stream.width;
      if (stream.axis == QuantAxis::kPerToken) {
        std::vector<uint8_t> codes(stream.row_code_bytes);
        std::vector<cpu::GroupParams> params(static_cast<size_t>(stream.row_groups));
        for (int32_t t = 0; t < kTokens; ++t) {
          // Groups of up to 128 channels along the row.
          size_t code_at = 0;
          for (int64_t g = 0; g < stream.row_groups; ++g) {
            const int64_t size = std::min<int64_t>(128, w - g * 128);
            cpu::quantize_groups(rows.data() + t * w + g * 128, size, size, stream.bits,
                                 codes.data() + code_at, &params[static_cast<size_t>(g)]);
            code_at += cpu::packed_bytes(stream.bits, size);
          }
          const uint8_t* at = block(t) + stream.group_offset;
          ASSERT_EQ(std::memcmp(at + (t % 128) * stream.row_code_bytes, codes.data(), codes.size()),
                    0)
              << "codes of layer " << l << " token " << t;
          ASSERT_EQ(std::memcmp(at + stream.group_code_bytes +
                                    (t % 128) * stream.row_groups * sizeof(cpu::GroupParams),
                                params.data(), params.size() * sizeof(cpu::GroupParams)),
                    0)
              << "parameters of layer " << l << " token " << t;
        }
        continue;
      }
      // Per channel: whole groups quantized from their fp16-rounded rows,
      // the rest in the window as fp16.
      for (int32_t g = 0; g < kTokens / 128; ++g) {
        std::vector<float> group(rows.begin() + g * 128 * w, rows.begin() + (g + 1) * 128 * w);
        for (float& v : group) v = cpu::fp16_to_fp32(cpu::fp32_to_fp16(v));
        std::vector<uint8_t> codes(stream.group_code_bytes);
        std::vector<cpu::GroupParams> params(static_cast<size_t>(w));
        cpu::quantize_strided(group.data(), 128, w, w, stream.bits, codes.data(), params.data());
        const uint8_t* at = block(g * 128) + stream.group_offset;
        ASSERT_EQ(std::memcmp(at, codes.data(), codes.size()), 0) << "group " << g;
        ASSERT_EQ(std::memcmp(at + stream.group_code_bytes, params.data(),
                              params.size() * sizeof(cpu::GroupParams)),
                  0)
            << "group " << g;
      }
      for (int32_t t = kTokens / 128 * 128; t < kTokens; ++t) {
        const int32_t offset = t % 128;
        const auto* row = reinterpret_cast<const uint16_t*>(page(offset) + stream.window_offset) +
                          static_cast<size_t>(offset % layout.window_tokens) * w;
        for (int64_t j = 0; j < w; ++j)
          ASSERT_EQ(row[j], cpu::fp32_to_fp16(rows[t * w + j])) << "window token " << t;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(EveryMode, CacheLayoutTest,
                         ::testing::ValuesIn(testing::table_mode_names()), testing::mode_test_name);

}  // namespace
}  // namespace xq
