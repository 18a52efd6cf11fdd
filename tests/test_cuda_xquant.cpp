// The fused XQuant decode kernel (kernels/cuda/paged_xquant.cu) over a CPU
// xquant cache's own blocks, uploaded as they are: against the CPU cache's
// attend / attend_partial and against a scalar reference written here from
// the byte layout (runtime/cache_layout.h, kernels/cpu/group_quant.h).
//
// The reference reads the blocks independently of the kernel (codes unpacked
// with cpu::unpack_codes, windows and outliers by their documented offsets)
// and computes in double. With fp32 operands it must agree with the CPU cache
// to fp32 rounding, which checks the layout reading on every machine; with
// the kernel's fp16 operands (the K rebuild's and the dequantized V latent)
// it is what the kernel must reproduce to fp32 rounding. The device tests skip without a GPU; the
// host tests (the reference against the CPU cache, the argument checks) run in every CUDA build.
#if defined(XQ_HAVE_CUDA)

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/cpu/attention.h"
#include "kernels/cpu/group_quant.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/quant.h"
#include "kernels/cuda/device.h"
#include "kernels/cuda/paged_attention.h"
#include "kernels/group_quant.h"
#include "runtime/cache.h"
#include "runtime/cache_layout.h"
#include "runtime/model.h"
#include "runtime/sequence_shard.h"
#include "test_util.h"
#include "tests/cuda_test_util.h"

namespace xq {
namespace {

namespace paged = cuda::paged;

constexpr int32_t kGroupTokens = 128;  // AttentionCache::kBlockTokens

std::unique_ptr<Model> load_smollm2() {
  const std::string path = testing::models_path("SmolLM2-135M-Instruct.Q4_1.gguf");
  return testing::file_exists(path) ? Model::load(path) : nullptr;
}

std::vector<float> normal_values(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> values(n);
  for (float& value : values) value = normal(rng);
  return values;
}

// Worst |actual - expected| over the largest |expected| (as tests/test_cuda.cpp).
::testing::AssertionResult close_normalized(const std::vector<float>& actual,
                                            const std::vector<float>& expected, double tolerance) {
  if (actual.size() != expected.size())
    return ::testing::AssertionFailure() << "size " << actual.size() << " != " << expected.size();
  double scale = 1e-30, worst = 0;
  size_t at = 0;
  for (float value : expected) scale = std::max(scale, static_cast<double>(std::fabs(value)));
  for (size_t i = 0; i < actual.size(); ++i) {
    const double error = std::fabs(static_cast<double>(actual[i]) - expected[i]);
    if (!(error <= worst)) {
      worst = error;
      at = i;
    }
  }
  std::ostringstream message;
  message << "worst element " << at << ": got " << actual[at] << ", expected " << expected[at]
          << ", normalized error " << worst / scale << " (tolerance " << tolerance << ")";
  if (!(worst / scale <= tolerance)) return ::testing::AssertionFailure() << message.str();
  return ::testing::AssertionSuccess() << message.str();
}

float round_to_fp16(float value) {
  return cpu::fp16_to_fp32(cpu::fp32_to_fp16(value));
}

// ---------------------------------------------------------------------------
// Tolerances.
//
// Reference (fp32 operands, double arithmetic) against the CPU cache: the same
// dequantized values and matrices, the CPU summing in fp32 (GEMMs over up to
// kv = 192 terms, exp sums over up to ~520 tokens, a 192-term projection):
// relative errors of about sqrt(terms) x 6e-8 < 2e-6 each, a few of them
// chained, against the largest output (measured on SmolLM2: at most 4.4e-7 of
// the output, 1.5e-7 in log-sum-exp): 5e-6 is a few times the estimate.
constexpr double kSameOperandsTolerance = 5e-6;
// The kernel against the reference with the same fp16 operands: the products
// of fp16 values are exact in fp32, so only fp32 accumulation order differs
// (tensor-core accumulation included), as for the fp16 cache kernel (1e-5);
// 1e-4 leaves room for the tensor cores' accumulation, which on some parts
// aligns addends with truncation instead of rounding. The attention weights
// enter the kernel's V mix as two fp16 halves (~2^-22 relative together), not
// rounded; rounding them to one fp16 value moves the output by ~1.2e-4 of its
// largest value, which this tolerance catches.
constexpr double kKernelTolerance = 1e-4;
// fp16 operands against the CPU's fp32 ones. The rebuild: the dequantized latent
// and B each carry a relative rounding of at most 2^-11 (nearest), a product
// at most ~2^-10, so a rebuilt key channel (a sum of head_dim or kv products)
// moves by at most 2^-10 · Σ|latent·B|; with random-sign terms that is about
// 2^-10 / sqrt(terms) · sqrt(terms) · rms ~ 2^-10 of the key's own scale. A
// score (q·k / sqrt(head_dim), |s| up to ~4 here) moves by ~4 · 2^-10 ~ 4e-3
// relative to its spread, and the output, a convex combination of rows, by
// that times the spread of the mixed values. The V latent rounded to fp16
// moves each mixed value by at most 2^-11 relative, averaged over the tokens
// (and it leaves the log-sum-exp alone). Measured on SmolLM2 by
// HostReferenceMatchesCpuCache below: at most 4.3e-4 of the largest output and
// 1.7e-4 in log-sum-exp over every mode and option; 2e-3 is half the
// score-level estimate above and about 5x the measurement.
constexpr double kFp16RebuildTolerance = 2e-3;

// ---------------------------------------------------------------------------
// What the kernel is given, on the host: one layer of a CPU xquant cache.

struct LatentLayerHost {
  StreamLayout k, v;
  std::vector<float> rebuild_k;  // (kv, k_width): per head (kv, head_dim), joint (kv, kv)
  std::vector<float> rebuild_v;  // (kv, kv)
  bool per_head = true;
  bool keep_outlier = false;
  int32_t outliers_per_token = 0;
  size_t outlier_offset = 0;
};

LatentLayerHost latent_layer(const CacheBlockLayout& layout, int32_t layer) {
  const LayerLayout& l = layout.layers.at(layer);
  LatentLayerHost out;
  out.k = l.streams.at(0);
  out.v = l.streams.at(1);
  out.rebuild_k.assign(l.rebuild_k.values,
                       l.rebuild_k.values + l.rebuild_k.rows * l.rebuild_k.cols);
  out.rebuild_v.assign(l.rebuild_v.values,
                       l.rebuild_v.values + l.rebuild_v.rows * l.rebuild_v.cols);
  out.per_head = l.rebuild_k_per_head;
  out.keep_outlier = layout.keep_outlier;
  out.outliers_per_token = layout.outliers_per_token;
  out.outlier_offset = l.outlier_offset;
  return out;
}

// One sequence's blocks in the CPU arena.
struct SequenceBlocks {
  const uint8_t* arena = nullptr;
  size_t block_bytes = 0;
  const BlockTable* table = nullptr;
  int32_t window_tokens = 0;
  int32_t stored = 0;  // local slots held
};

// The codes of a block's K latent, unpacked once per block (token-major).
using UnpackedBlocks = std::map<const uint8_t*, std::vector<uint8_t>>;

// The dequantized K-latent row (kv) of local slot t, as the layout stores it.
std::vector<float> key_latent_row(const SequenceBlocks& s, const LatentLayerHost& l, int64_t kv,
                                  int32_t head_dim, int32_t t, UnpackedBlocks& unpacked) {
  std::vector<float> row(kv);
  const uint8_t* block =
      s.arena + static_cast<size_t>(s.table->groups.at(t / kGroupTokens)) * s.block_bytes;
  const int32_t o = t % kGroupTokens;
  if (t / kGroupTokens < s.stored / kGroupTokens) {
    std::vector<uint8_t>& codes = unpacked[block];
    if (codes.empty()) {
      codes.resize(static_cast<size_t>(kGroupTokens) * kv);
      cpu::unpack_codes(block + l.k.group_offset, static_cast<int64_t>(codes.size()), l.k.bits,
                        codes.data());
    }
    const auto* params =
        reinterpret_cast<const cpu::GroupParams*>(block + l.k.group_offset + l.k.group_code_bytes);
    for (int64_t c = 0; c < kv; ++c) {
      const GroupGrid grid{cpu::fp16_to_fp32(params[c].scale_fp16),
                           cpu::fp16_to_fp32(params[c].zero_fp16)};
      row[c] = group_decode(codes[o * kv + c], grid);
    }
  } else {
    const int32_t page = s.table->window.at(o / s.window_tokens);
    const auto* window =
        reinterpret_cast<const uint16_t*>(s.arena + static_cast<size_t>(page) * s.block_bytes +
                                          l.k.window_offset) +
        static_cast<size_t>(o % s.window_tokens) * kv;
    for (int64_t c = 0; c < kv; ++c) row[c] = cpu::fp16_to_fp32(window[c]);
  }
  if (l.keep_outlier) {
    const auto* kept = reinterpret_cast<const uint16_t*>(block + l.outlier_offset) +
                       static_cast<size_t>(o) * l.outliers_per_token;
    for (int32_t k = 0; k < l.outliers_per_token; ++k)
      row[static_cast<size_t>(k) * head_dim] = cpu::fp16_to_fp32(kept[k]);
  }
  return row;
}

// The dequantized V-latent row (kv) of local slot t: groups of 128 channels.
std::vector<float> value_latent_row(const SequenceBlocks& s, const LatentLayerHost& l, int64_t kv,
                                    int32_t t) {
  std::vector<float> row(kv);
  const uint8_t* block =
      s.arena + static_cast<size_t>(s.table->groups.at(t / kGroupTokens)) * s.block_bytes;
  const int32_t o = t % kGroupTokens;
  const uint8_t* codes = block + l.v.group_offset + static_cast<size_t>(o) * l.v.row_code_bytes;
  const auto* params =
      reinterpret_cast<const cpu::GroupParams*>(block + l.v.group_offset + l.v.group_code_bytes) +
      static_cast<size_t>(o) * l.v.row_groups;
  std::vector<uint8_t> unpacked(kGroupTokens);
  for (int64_t at = 0, j = 0; at < kv; at += kGroupTokens, ++j) {
    const int64_t size = std::min<int64_t>(kGroupTokens, kv - at);
    cpu::unpack_codes(codes, size, l.v.bits, unpacked.data());
    const GroupGrid grid{cpu::fp16_to_fp32(params[j].scale_fp16),
                         cpu::fp16_to_fp32(params[j].zero_fp16)};
    for (int64_t c = 0; c < size; ++c) row[at + c] = group_decode(unpacked[c], grid);
    codes += cpu::packed_bytes(l.v.bits, size);
  }
  return row;
}

// The unnormalized attention state of one query row (heads of head_dim) in
// double: keys rebuilt from the latent (operands rounded to fp16 where
// fp16_operands), rotated at their global positions, scores, softmax, the
// V-latent mix (the dequantized V latent rounded to fp16 where fp16_operands)
// and its projection through rebuild_v.
struct ReferenceState {
  std::vector<double> max, sum, acc;  // (heads), (heads), (heads, head_dim)
};

ReferenceState reference_attention(const SequenceBlocks& s, const LatentLayerHost& l,
                                   const ModelConfig& c, const SequenceShard& shard,
                                   const std::vector<float>& cos_sin, int32_t pos, const float* q,
                                   bool fp16_operands) {
  const int32_t hd = c.head_dim, heads = c.n_heads, group = c.n_heads / c.n_kv_heads;
  const int64_t kv = c.kv_dim(), k_width = l.per_head ? hd : kv;
  const int32_t visible = shard.owned_before(pos + 1), pairs = c.rope_dim / 2;
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  auto operand = [&](float x) { return fp16_operands ? round_to_fp16(x) : x; };
  std::vector<std::vector<double>> scores(heads, std::vector<double>(visible));
  std::vector<std::vector<float>> values(visible);
  UnpackedBlocks unpacked;
  for (int32_t t = 0; t < visible; ++t) {
    const std::vector<float> latent = key_latent_row(s, l, kv, hd, t, unpacked);
    values[t] = value_latent_row(s, l, kv, t);
    for (float& value : values[t]) value = operand(value);
    const float* table = cos_sin.data() + static_cast<size_t>(shard.position(t)) * pairs * 2;
    for (int32_t g = 0; g < c.n_kv_heads; ++g) {
      std::vector<double> key(hd);
      const int64_t base = l.per_head ? static_cast<int64_t>(g) * hd : 0;
      for (int32_t j = 0; j < hd; ++j)
        for (int64_t ch = 0; ch < k_width; ++ch)
          key[j] += static_cast<double>(operand(latent[base + ch])) *
                    operand(l.rebuild_k[(static_cast<int64_t>(g) * hd + j) * k_width + ch]);
      for (int32_t p = 0; p < pairs; ++p) {
        const bool interleaved = c.rope_layout == RopeLayout::kInterleaved;
        const int32_t ia = interleaved ? 2 * p : p, ib = interleaved ? 2 * p + 1 : p + pairs;
        const double a = key[ia], b = key[ib], cs = table[2 * p], sn = table[2 * p + 1];
        key[ia] = a * cs - b * sn;
        key[ib] = a * sn + b * cs;
      }
      for (int32_t h = g * group; h < (g + 1) * group; ++h) {
        double dot = 0;
        for (int32_t j = 0; j < hd; ++j) dot += static_cast<double>(q[h * hd + j]) * key[j];
        scores[h][t] = dot * scale;
      }
    }
  }
  ReferenceState state;
  state.max.assign(heads, -INFINITY);
  state.sum.assign(heads, 0.0);
  state.acc.assign(static_cast<size_t>(heads) * hd, 0.0);
  for (int32_t h = 0; h < heads; ++h) {
    if (visible == 0) continue;
    const int32_t g = h / group;
    state.max[h] = *std::max_element(scores[h].begin(), scores[h].end());
    std::vector<double> mixed(kv, 0.0);
    for (int32_t t = 0; t < visible; ++t) {
      const double p = std::exp(scores[h][t] - state.max[h]);
      state.sum[h] += p;
      for (int64_t ch = 0; ch < kv; ++ch) mixed[ch] += p * values[t][ch];
    }
    for (int32_t j = 0; j < hd; ++j) {
      double out = 0;
      for (int64_t ch = 0; ch < kv; ++ch)
        out += l.rebuild_v[(static_cast<int64_t>(g) * hd + j) * kv + ch] * mixed[ch];
      state.acc[static_cast<size_t>(h) * hd + j] = out;
    }
  }
  return state;
}

// ---------------------------------------------------------------------------
// A CPU xquant cache over SmolLM2 filled with random K/V rows (the latents are
// encoded from them, as in decode), for the sequences below.

struct CacheCase {
  std::string mode;
  bool keep_outlier = false;
  bool per_head = true;
  int32_t shards = 1, shard = 0;
  std::string name() const {
    return mode + (keep_outlier ? " +outlier" : "") + (per_head ? " per-head K" : " joint K") +
           (shards > 1 ? " shard " + std::to_string(shard) + "/" + std::to_string(shards) : "");
  }
};

// Lengths: a partial first group (window only), exactly one group, a group
// and a partial one, four groups and a partial one. Queries: the last rows of
// each (several rows of one sequence see different prefixes, one of them
// inside a quantized group).
const std::vector<int32_t> kLengths = {77, 128, 200, 517};
const std::vector<int32_t> kQueries = {1, 2, 3, 2};
constexpr int32_t kMaxTokens = 640;

struct FilledCache {
  ModelConfig config;  // of the covered layers
  std::vector<float> rope;
  std::unique_ptr<AttentionCache> cache;
  SequenceShard shard;
};

FilledCache fill_cache(const Model& model, const CacheCase& which) {
  FilledCache f;
  f.config = model.config();
  f.rope.resize(static_cast<size_t>(kMaxTokens) * f.config.rope_dim);
  cpu::rope_table(f.rope.data(), kMaxTokens, f.config.rope_dim, f.config.rope_theta);
  CacheOptions options;
  options.mode = which.mode;
  options.max_tokens = kMaxTokens;
  options.sequences = static_cast<int32_t>(kLengths.size());
  options.rope_cos_sin = f.rope.data();
  options.keep_outlier_channel = which.keep_outlier;
  options.k_latent_per_head = which.per_head;
  // Model layers 2 (pinned at 4 bits) and 3 (the mode's bits).
  options.first_layer = 2;
  options.layers = 2;
  options.sequence_shards = which.shards;
  options.sequence_shard = which.shard;
  f.cache = make_cache(model, options);
  f.config.n_layers = options.layers;
  // The per-channel latent deals groups of 128 tokens (runtime/cache_mode.h).
  f.shard = SequenceShard(which.shards, which.shard, which.shards > 1 ? kGroupTokens : 1);
  const ModelConfig& c = f.config;
  for (size_t s = 0; s < kLengths.size(); ++s) {
    for (int32_t layer = 0; layer < c.n_layers; ++layer) {
      const uint32_t seed = static_cast<uint32_t>(100 * s + 7 * layer);
      const size_t n = kLengths[s];
      const std::vector<float> x = normal_values(n * c.dim, seed);
      const std::vector<float> k = normal_values(n * c.kv_dim(), seed + 1);
      const std::vector<float> v = normal_values(n * c.kv_dim(), seed + 2);
      f.cache->append(static_cast<int32_t>(s), layer, 0, kLengths[s], x.data(), k.data(), v.data());
    }
  }
  return f;
}

SequenceBlocks sequence_blocks(const FilledCache& f, int32_t seq) {
  const CacheBlockLayout layout = f.cache->block_layout();
  SequenceBlocks s;
  s.arena = f.cache->blocks(seq).arena;
  s.block_bytes = layout.block_bytes;
  s.table = f.cache->blocks(seq).table;
  s.window_tokens = layout.window_tokens;
  s.stored = f.shard.owned_before(f.cache->length(seq));
  return s;
}

// The step: (seq, pos) per query row, in sequence order.
std::vector<paged::StepRow> step_rows() {
  std::vector<paged::StepRow> rows;
  for (size_t s = 0; s < kLengths.size(); ++s)
    for (int32_t i = 0; i < kQueries[s]; ++i)
      rows.push_back({static_cast<int32_t>(s), kLengths[s] - kQueries[s] + i});
  return rows;
}

// The CPU cache's attention of q (rows, heads, head_dim) for the step.
std::vector<float> cpu_attention(FilledCache& f, int32_t layer, const std::vector<float>& q) {
  const size_t q_width = static_cast<size_t>(f.config.n_heads) * f.config.head_dim;
  std::vector<float> out(q.size());
  size_t row = 0;
  for (size_t s = 0; s < kLengths.size(); ++s) {
    f.cache->attend(static_cast<int32_t>(s), layer, kLengths[s] - kQueries[s], kQueries[s],
                    q.data() + row * q_width, out.data() + row * q_width);
    row += kQueries[s];
  }
  return out;
}

// The CPU cache's states for the step: max, sum (rows * heads), acc (rows * heads, head_dim).
struct States {
  std::vector<float> max, sum, acc;
};

States cpu_states(FilledCache& f, int32_t layer, const std::vector<float>& q) {
  const size_t q_width = static_cast<size_t>(f.config.n_heads) * f.config.head_dim;
  States states;
  size_t row = 0;
  for (size_t s = 0; s < kLengths.size(); ++s) {
    cpu::PartialAttention state;
    f.cache->attend_partial(static_cast<int32_t>(s), layer, kLengths[s] - kQueries[s], kQueries[s],
                            q.data() + row * q_width, state);
    states.max.insert(states.max.end(), state.max.begin(), state.max.end());
    states.sum.insert(states.sum.end(), state.sum.begin(), state.sum.end());
    states.acc.insert(states.acc.end(), state.acc.begin(), state.acc.end());
    row += kQueries[s];
  }
  return states;
}

States reference_states(const FilledCache& f, const LatentLayerHost& l, const std::vector<float>& q,
                        bool fp16_operands) {
  const size_t q_width = static_cast<size_t>(f.config.n_heads) * f.config.head_dim;
  States states;
  const std::vector<paged::StepRow> rows = step_rows();
  for (size_t r = 0; r < rows.size(); ++r) {
    const ReferenceState state =
        reference_attention(sequence_blocks(f, rows[r].seq), l, f.config, f.shard, f.rope,
                            rows[r].pos, q.data() + r * q_width, fp16_operands);
    for (double m : state.max) states.max.push_back(static_cast<float>(m));
    for (double s : state.sum) states.sum.push_back(static_cast<float>(s));
    for (double a : state.acc) states.acc.push_back(static_cast<float>(a));
  }
  return states;
}

// acc / sum per row (head_dim each); rows that saw nothing stay 0.
std::vector<float> normalized(const States& states, int32_t head_dim) {
  std::vector<float> out(states.acc.size(), 0.0f);
  for (size_t r = 0; r < states.sum.size(); ++r)
    if (states.sum[r] > 0)
      for (int32_t d = 0; d < head_dim; ++d)
        out[r * head_dim + d] = states.acc[r * head_dim + d] / states.sum[r];
  return out;
}

// Rows that saw no token agree exactly (the empty state); the others' log-sum-exp
// (max + ln sum) within `tolerance` (absolute: a relative error of the sum).
::testing::AssertionResult same_log_sum_exp(const States& actual, const States& expected,
                                            double tolerance) {
  if (actual.sum.size() != expected.sum.size()) return ::testing::AssertionFailure() << "rows";
  for (size_t r = 0; r < expected.sum.size(); ++r) {
    if (expected.sum[r] == 0.0f) {
      if (actual.sum[r] != 0.0f || actual.max[r] != -INFINITY)
        return ::testing::AssertionFailure() << "row " << r << " saw no token but has sum "
                                             << actual.sum[r] << ", max " << actual.max[r];
      continue;
    }
    const double a = actual.max[r] + std::log(static_cast<double>(actual.sum[r]));
    const double e = expected.max[r] + std::log(static_cast<double>(expected.sum[r]));
    if (!(std::fabs(a - e) <= tolerance))
      return ::testing::AssertionFailure() << "row " << r << ": log-sum-exp " << a << " vs " << e
                                           << " (tolerance " << tolerance << ")";
  }
  return ::testing::AssertionSuccess();
}

const std::vector<CacheCase> kCases = {
    {"xquant-4", false, true},      {"xquant-3", false, true},  {"xquant-2", false, true},
    {"xquant-4", true, true},       {"xquant-4", false, false}, {"xquant-2", true, false},
    {"xquant-3", true, true, 2, 1},  // shard 1 of 2: positions 128..255, 384..511 locally
};

// ---------------------------------------------------------------------------
// Host tests.

// The reference reads the blocks as the CPU cache does: with fp32 operands it
// is the CPU's attention to fp32 rounding, for every mode, outlier option,
// latent kind and a shard. With fp16 operands (the kernel's: the rebuild's and
// the V latent) it stays within kFp16RebuildTolerance of it.
TEST(CudaXQuantLatent, HostReferenceMatchesCpuCache) {
  std::unique_ptr<Model> model = load_smollm2();
  if (!model) GTEST_SKIP() << "SmolLM2-135M-Instruct.Q4_1.gguf not in models/";
  for (const CacheCase& which : kCases) {
    FilledCache f = fill_cache(*model, which);
    const ModelConfig& c = f.config;
    const int32_t n_rows = static_cast<int32_t>(step_rows().size());
    for (int32_t layer = 0; layer < c.n_layers; ++layer) {
      const LatentLayerHost l = latent_layer(f.cache->block_layout(), layer);
      const std::vector<float> q =
          normal_values(static_cast<size_t>(n_rows) * c.n_heads * c.head_dim, 300 + layer);
      const States expected = cpu_states(f, layer, q);
      const States exact = reference_states(f, l, q, false);
      const States rounded = reference_states(f, l, q, true);
      EXPECT_TRUE(close_normalized(normalized(exact, c.head_dim), normalized(expected, c.head_dim),
                                   kSameOperandsTolerance))
          << which.name() << ", layer " << layer;
      EXPECT_TRUE(same_log_sum_exp(exact, expected, kSameOperandsTolerance))
          << which.name() << ", layer " << layer;
      EXPECT_TRUE(close_normalized(normalized(rounded, c.head_dim),
                                   normalized(expected, c.head_dim), kFp16RebuildTolerance))
          << which.name() << ", layer " << layer;
      EXPECT_TRUE(same_log_sum_exp(rounded, expected, kFp16RebuildTolerance))
          << which.name() << ", layer " << layer;
      if (which.shards == 1) {  // attend is attend_partial normalized
        EXPECT_TRUE(close_normalized(normalized(exact, c.head_dim), cpu_attention(f, layer, q),
                                     kSameOperandsTolerance))
            << which.name() << ", layer " << layer;
      }
    }
  }
}

// A well-formed set of arguments for SmolLM2's shape (nothing is dereferenced:
// the checks run before anything touches the device).
struct CheckedCall {
  paged::PagedWindow window;
  paged::XQuantLatentLayer layer;
  paged::AttentionShape shape;
  paged::ShardSpec shard;
  paged::SplitPlan plan;
  float* scratch = nullptr;
  paged::AttentionTarget target;
  float dummy = 0.0f;
  uint16_t dummy_half = 0;
  CheckedCall() {
    shape.heads = 9;
    shape.kv_heads = 3;
    shape.head_dim = 64;
    shape.rope_dim = 64;
    const int32_t kv = 192;
    layer.k_latent.width = kv;
    layer.k_latent.bits = 4;
    layer.k_latent.per_channel = true;
    layer.k_latent.group_code_bytes = cpu::packed_bytes(4, int64_t{128} * kv);
    layer.v_latent.width = kv;
    layer.v_latent.bits = 4;
    layer.v_latent.row_groups = 2;
    layer.v_latent.row_code_bytes = cpu::packed_bytes(4, 128) + cpu::packed_bytes(4, 64);
    layer.v_latent.group_code_bytes = layer.v_latent.row_code_bytes * 128;
    layer.rebuild_k_fp16 = &dummy_half;
    layer.rebuild_v = &dummy;
    window.window_tokens = 40;
    target.out = &dummy;
  }
  void check() const {
    paged::xquant_latent_check(window, layer, shape, 1, shard, plan, scratch, target);
  }
};

TEST(CudaXQuantLatent, ArgumentChecksThrow) {
  EXPECT_NO_THROW(CheckedCall().check());
  auto expect_rejected = [](const char* what, auto&& change) {
    CheckedCall call;
    change(call);
    EXPECT_THROW(call.check(), std::invalid_argument) << what;
  };
  expect_rejected("K latent width", [](CheckedCall& a) { a.layer.k_latent.width = 191; });
  expect_rejected("V latent width", [](CheckedCall& a) { a.layer.v_latent.width = 576; });
  expect_rejected("K per token", [](CheckedCall& a) { a.layer.k_latent.per_channel = false; });
  expect_rejected("V per channel", [](CheckedCall& a) { a.layer.v_latent.per_channel = true; });
  expect_rejected("bits 9", [](CheckedCall& a) { a.layer.v_latent.bits = 9; });
  expect_rejected("K code bytes", [](CheckedCall& a) { a.layer.k_latent.bits = 2; });
  expect_rejected("V row groups", [](CheckedCall& a) { a.layer.v_latent.row_groups = 1; });
  expect_rejected("group over kMaxGroup",
                  [](CheckedCall& a) { a.shape.heads = 3 * (paged::kMaxGroup + 1); });
  expect_rejected("heads not a multiple", [](CheckedCall& a) { a.shape.heads = 10; });
  expect_rejected("head_dim not a multiple of 16", [](CheckedCall& a) {
    a.shape.head_dim = 40;
    a.shape.rope_dim = 40;
  });
  expect_rejected("head_dim over kMaxHeadDim",
                  [](CheckedCall& a) { a.shape.head_dim = 2 * paged::kMaxHeadDim; });
  expect_rejected("odd rope_dim", [](CheckedCall& a) { a.shape.rope_dim = 63; });
  expect_rejected("no window", [](CheckedCall& a) { a.window.window_tokens = 0; });
  expect_rejected("no rebuild_k", [](CheckedCall& a) { a.layer.rebuild_k_fp16 = nullptr; });
  expect_rejected("outliers per token", [](CheckedCall& a) {
    a.layer.keep_outlier = true;
    a.layer.outliers_per_token = 1;  // per-head K keeps one per KV head
  });
  expect_rejected("split of 100 tokens", [](CheckedCall& a) { a.plan.tokens_per_split = 100; });
  expect_rejected("splits without scratch", [](CheckedCall& a) { a.plan.splits = 4; });
  expect_rejected("two targets", [](CheckedCall& a) { a.target.state_max = &a.dummy; });
  expect_rejected("partial state target", [](CheckedCall& a) {
    a.target.out = nullptr;
    a.target.state_max = &a.dummy;
  });
  expect_rejected("shard index", [](CheckedCall& a) { a.shard.index = 1; });
}

// ---------------------------------------------------------------------------
// Device tests.

template <typename T>
cuda::DeviceMemory upload(const std::vector<T>& host, cuda::Stream& stream) {
  cuda::DeviceMemory memory(std::max<size_t>(1, host.size() * sizeof(T)));
  if (!host.empty())
    cuda::copy_to_device(memory.data(), host.data(), host.size() * sizeof(T), stream);
  return memory;
}

std::vector<float> download(const float* device, size_t count, cuda::Stream& stream) {
  std::vector<float> host(count);
  cuda::copy_to_host(host.data(), device, count * sizeof(float), stream);
  stream.synchronize();
  return host;
}

// The CPU cache's arena, tables, window tables and stored lengths on the device.
struct UploadedCache {
  cuda::DeviceMemory arena, tables, windows, stored;
  paged::PagedArena pool;
  paged::PagedWindow window;
  paged::PagedLengths lengths;
};

UploadedCache upload_cache(const FilledCache& f, cuda::Stream& stream) {
  const CacheBlockLayout layout = f.cache->block_layout();
  const int32_t sequences = static_cast<int32_t>(kLengths.size());
  int32_t group_stride = 1, window_stride = 1;
  for (int32_t s = 0; s < sequences; ++s) {
    group_stride = std::max<int32_t>(group_stride, f.cache->blocks(s).table->groups.size());
    window_stride = std::max<int32_t>(window_stride, f.cache->blocks(s).table->window.size());
  }
  std::vector<int32_t> tables(static_cast<size_t>(sequences) * group_stride, 0);
  std::vector<int32_t> windows(static_cast<size_t>(sequences) * window_stride, 0);
  std::vector<int32_t> stored(sequences);
  for (int32_t s = 0; s < sequences; ++s) {
    const BlockTable& table = *f.cache->blocks(s).table;
    std::copy(table.groups.begin(), table.groups.end(), tables.begin() + s * group_stride);
    std::copy(table.window.begin(), table.window.end(), windows.begin() + s * window_stride);
    stored[s] = f.shard.owned_before(f.cache->length(s));
  }
  const uint8_t* arena = f.cache->blocks(0).arena;
  UploadedCache u;
  u.arena =
      upload(std::vector<uint8_t>(arena, arena + layout.block_bytes * layout.total_blocks), stream);
  u.tables = upload(tables, stream);
  u.windows = upload(windows, stream);
  u.stored = upload(stored, stream);
  u.pool.arena = u.arena.as<uint8_t>();
  u.pool.block_bytes = layout.block_bytes;
  u.pool.tables = u.tables.as<const int32_t>();
  u.pool.table_stride = group_stride;
  u.window.window = u.windows.as<const int32_t>();
  u.window.window_stride = window_stride;
  u.window.window_tokens = layout.window_tokens;
  u.lengths.stored = u.stored.as<const int32_t>();
  return u;
}

paged::PagedStream paged_stream(const StreamLayout& s) {
  paged::PagedStream out;
  out.width = static_cast<int32_t>(s.width);
  out.bits = s.bits;
  out.per_channel = s.axis == QuantAxis::kPerChannel;
  out.group_offset = s.group_offset;
  out.window_offset = s.window_offset;
  out.row_code_bytes = s.row_code_bytes;
  out.row_groups = static_cast<int32_t>(s.row_groups);
  out.group_code_bytes = s.group_code_bytes;
  return out;
}

// One layer's XQuantLatentLayer with its matrices on the device (rebuild_k in fp16).
struct UploadedLayer {
  cuda::DeviceMemory rebuild_k, rebuild_v;
  paged::XQuantLatentLayer layer;
};

UploadedLayer upload_layer(const LatentLayerHost& l, cuda::Stream& stream) {
  std::vector<uint16_t> rebuild_k(l.rebuild_k.size());
  for (size_t i = 0; i < rebuild_k.size(); ++i) rebuild_k[i] = cpu::fp32_to_fp16(l.rebuild_k[i]);
  UploadedLayer u;
  u.rebuild_k = upload(rebuild_k, stream);
  u.rebuild_v = upload(l.rebuild_v, stream);
  u.layer.k_latent = paged_stream(l.k);
  u.layer.v_latent = paged_stream(l.v);
  u.layer.rebuild_k_fp16 = u.rebuild_k.as<const uint16_t>();
  u.layer.rebuild_v = u.rebuild_v.as<const float>();
  u.layer.per_head_k = l.per_head;
  u.layer.keep_outlier = l.keep_outlier;
  u.layer.outliers_per_token = l.outliers_per_token;
  u.layer.outlier_offset = l.outlier_offset;
  return u;
}

// The kernel over every case's uploaded cache, both layers: normalized output
// with one split and with a split plan (against the reference with the
// kernel's fp16 operands, and against the CPU cache), and states with the
// split plan (against the CPU's attend_partial, in the sharded case the only
// target a shard has).
TEST(CudaXQuantLatent, DecodeMatchesReferenceAndCpuCache) {
  SKIP_WITHOUT_CUDA_DEVICE();
  std::unique_ptr<Model> model = load_smollm2();
  if (!model) GTEST_SKIP() << "SmolLM2-135M-Instruct.Q4_1.gguf not in models/";
  cuda::Stream stream;
  const std::vector<paged::StepRow> rows = step_rows();
  const int32_t n_rows = static_cast<int32_t>(rows.size());
  cuda::DeviceMemory rows_device = upload(rows, stream);
  for (const CacheCase& which : kCases) {
    FilledCache f = fill_cache(*model, which);
    const ModelConfig& c = f.config;
    UploadedCache cache = upload_cache(f, stream);
    cuda::DeviceMemory rope = upload(f.rope, stream);
    paged::AttentionShape shape;
    shape.heads = c.n_heads;
    shape.kv_heads = c.n_kv_heads;
    shape.head_dim = c.head_dim;
    shape.rope_dim = c.rope_dim;
    shape.rope_layout = c.rope_layout;
    paged::ShardSpec shard;
    shard.shards = f.shard.shards();
    shard.index = f.shard.index();
    shard.unit = f.shard.unit();
    const paged::SplitPlan split = paged::plan_splits(f.shard.owned_before(kMaxTokens));
    paged::SplitPlan whole;
    whole.tokens_per_split = split.splits * split.tokens_per_split;
    ASSERT_GT(split.splits, 1) << which.name();
    const size_t q_size = static_cast<size_t>(n_rows) * c.n_heads * c.head_dim;
    const size_t state_rows = static_cast<size_t>(n_rows) * c.n_heads;
    cuda::DeviceMemory scratch(paged::xquant_latent_scratch_floats(n_rows, shape, split) *
                               sizeof(float));
    cuda::DeviceMemory out(q_size * sizeof(float));
    cuda::DeviceMemory state(state_rows * (2 + c.head_dim) * sizeof(float));
    for (int32_t layer = 0; layer < c.n_layers; ++layer) {
      const std::string where = which.name() + ", layer " + std::to_string(layer);
      const LatentLayerHost host_layer = latent_layer(f.cache->block_layout(), layer);
      UploadedLayer device_layer = upload_layer(host_layer, stream);
      const std::vector<float> q = normal_values(q_size, 300 + layer);
      cuda::DeviceMemory q_device = upload(q, stream);
      const States expected = cpu_states(f, layer, q);
      const States reference = reference_states(f, host_layer, q, true);
      if (which.shards == 1) {
        for (const paged::SplitPlan& plan : {whole, split}) {
          paged::AttentionTarget target;
          target.out = out.as<float>();
          paged::xquant_latent_attention(
              cache.pool, cache.window, cache.lengths, device_layer.layer, shape,
              rows_device.as<const paged::StepRow>(), n_rows, q_device.as<const float>(),
              rope.as<const float>(), shard, plan, scratch.as<float>(), target, stream);
          const std::vector<float> got = download(out.as<float>(), q_size, stream);
          EXPECT_TRUE(close_normalized(got, normalized(reference, c.head_dim), kKernelTolerance))
              << where << ", " << plan.splits << " splits, against the reference";
          EXPECT_TRUE(
              close_normalized(got, normalized(expected, c.head_dim), kFp16RebuildTolerance))
              << where << ", " << plan.splits << " splits, against the CPU cache";
        }
      }
      for (const paged::SplitPlan& plan : {whole, split}) {
        paged::AttentionTarget target;
        target.state_max = state.as<float>();
        target.state_sum = target.state_max + state_rows;
        target.state_acc = target.state_sum + state_rows;
        paged::xquant_latent_attention(cache.pool, cache.window, cache.lengths, device_layer.layer,
                                       shape, rows_device.as<const paged::StepRow>(), n_rows,
                                       q_device.as<const float>(), rope.as<const float>(), shard,
                                       plan, scratch.as<float>(), target, stream);
        const std::vector<float> all =
            download(state.as<float>(), state_rows * (2 + c.head_dim), stream);
        States got;
        got.max.assign(all.begin(), all.begin() + state_rows);
        got.sum.assign(all.begin() + state_rows, all.begin() + 2 * state_rows);
        got.acc.assign(all.begin() + 2 * state_rows, all.end());
        EXPECT_TRUE(close_normalized(normalized(got, c.head_dim), normalized(reference, c.head_dim),
                                     kKernelTolerance))
            << where << ", " << plan.splits << " splits, states against the reference";
        EXPECT_TRUE(same_log_sum_exp(got, reference, kKernelTolerance))
            << where << ", " << plan.splits << " splits, states against the reference";
        EXPECT_TRUE(close_normalized(normalized(got, c.head_dim), normalized(expected, c.head_dim),
                                     kFp16RebuildTolerance))
            << where << ", " << plan.splits << " splits, states against attend_partial";
        EXPECT_TRUE(same_log_sum_exp(got, expected, kFp16RebuildTolerance))
            << where << ", " << plan.splits << " splits, states against attend_partial";
      }
    }
  }
}

}  // namespace
}  // namespace xq

#endif  // XQ_HAVE_CUDA
