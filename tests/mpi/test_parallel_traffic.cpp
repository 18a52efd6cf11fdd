// Bytes communicated per decode step: on every rank of a (tp, pp)
// grid, the bytes its TP group and its pipeline column send in one decode step
// equal the formula of parallel/decode_traffic.h exactly, and are the same at
// 256 and at 4096 tokens of context, in every cache mode: the fp16 cache is
// sharded by KV head (by sequence where tp does not divide the KV heads, as on
// the GQA model here), the quantized ones (kivi, xquant, xquant-cl) by
// sequence with a merge of partial attention whose size does not depend on
// the context.
// The caches do grow with the context (checked too), so the equality is not
// vacuous. Two synthetic 4-layer Llama models with a 4608-token context, written
// here as GGUF: a GQA one (1 KV head of 4, 2 * kv_dim < dim) whose xquant modes
// take the SVD-latent path with its per-channel stream in 128-token shard units,
// and an MHA one whose xquant modes store X itself.
// Grids: the run's --grid (default tp = all ranks), and (1, 2) too on 2 ranks.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "parallel/decode_traffic.h"
#include "parallel/grid.h"
#include "parallel/pipeline_engine.h"
#include "runtime/model.h"
#include "tests/gguf_writer.h"
#include "tests/mpi/mpi_test_env.h"

namespace xq::parallel {
namespace {

using testing::GgufWriter;

struct TinyShape {
  uint32_t dim, layers, heads, kv_heads, ffn, context;
};

// A Llama GGUF of the given shape, F32 weights in a fixed smooth pattern, over
// tests/tiny_llama_gguf.h's eight-token SentencePiece vocabulary.
std::vector<uint8_t> tiny_llama(const TinyShape& s) {
  const std::string space = "\xE2\x96\x81";
  const std::vector<std::string> tokens = {"<unk>", "<s>", "</s>",      space,
                                           "a",     "b",   space + "a", space + "b"};
  GgufWriter w;
  w.add_string("general.architecture", "llama");
  w.add_string("general.name", "tiny traffic test llama");
  w.add_uint32("llama.embedding_length", s.dim);
  w.add_uint32("llama.block_count", s.layers);
  w.add_uint32("llama.attention.head_count", s.heads);
  w.add_uint32("llama.attention.head_count_kv", s.kv_heads);
  w.add_uint32("llama.feed_forward_length", s.ffn);
  w.add_uint32("llama.context_length", s.context);
  w.add_float32("llama.rope.freq_base", 10000.0f);
  w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5f);
  w.add_string("tokenizer.ggml.model", "llama");
  w.add_string_array("tokenizer.ggml.tokens", tokens);
  std::vector<float> scores(tokens.size(), -10.0f);
  std::vector<int32_t> types(tokens.size(), 1);
  for (size_t i = 0; i < tokens.size(); ++i)
    if (tokens[i].size() > 1 && tokens[i][0] != '<') scores[i] = -1.0f;
  types[0] = 2;
  types[1] = types[2] = 3;
  w.add_float32_array("tokenizer.ggml.scores", scores);
  w.add_int32_array("tokenizer.ggml.token_type", types);
  w.add_uint32("tokenizer.ggml.bos_token_id", 1);
  w.add_uint32("tokenizer.ggml.eos_token_id", 2);
  w.add_uint32("tokenizer.ggml.unknown_token_id", 0);

  int seed = 0;
  auto add = [&](const std::string& name, std::vector<uint64_t> shape, bool ones = false) {
    uint64_t elements = 1;
    for (uint64_t d : shape) elements *= d;
    std::vector<float> values(elements);
    ++seed;
    for (uint64_t i = 0; i < elements; ++i)
      values[i] = ones ? 1.0f : 0.1f * std::sin(0.7f * static_cast<float>(i) + 1.3f * seed);
    std::vector<uint8_t> bytes(elements * sizeof(float));
    std::memcpy(bytes.data(), values.data(), bytes.size());
    w.add_tensor(name, std::move(shape), 0, bytes);
  };
  const uint64_t head_dim = s.dim / s.heads, kv_dim = head_dim * s.kv_heads;
  add("token_embd.weight", {s.dim, tokens.size()});
  add("output_norm.weight", {s.dim}, true);
  add("output.weight", {s.dim, tokens.size()});
  for (uint32_t l = 0; l < s.layers; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    add(p + "attn_norm.weight", {s.dim}, true);
    add(p + "attn_q.weight", {s.dim, s.dim});
    add(p + "attn_k.weight", {s.dim, kv_dim});
    add(p + "attn_v.weight", {s.dim, kv_dim});
    add(p + "attn_output.weight", {s.dim, s.dim});
    add(p + "ffn_norm.weight", {s.dim}, true);
    add(p + "ffn_gate.weight", {s.dim, s.ffn});
    add(p + "ffn_up.weight", {s.dim, s.ffn});
    add(p + "ffn_down.weight", {s.ffn, s.dim});
  }
  return w.build();
}

// Written by each rank to its own file, loaded, unlinked (the mapping stays).
std::unique_ptr<Model> load_tiny(const TinyShape& s, const std::string& name) {
  const std::string path = (std::filesystem::temp_directory_path() /
                            ("xq_traffic_" + name + "_" + std::to_string(getpid()) + "_r" +
                             std::to_string(testing::world_rank()) + ".gguf"))
                               .string();
  const std::vector<uint8_t> bytes = tiny_llama(s);
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) throw Error("cannot write " + path);
  const bool ok = std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size();
  std::fclose(f);
  if (!ok) throw Error("cannot write " + path);
  auto model = Model::load(path);
  std::filesystem::remove(path);
  return model;
}

constexpr int kShort = 256, kLong = 4096, kSteps = 3;
const char* const kModes[] = {"fp16", "kivi-4", "xquant-4", "xquant-cl-4"};

// What one rank counted over kSteps decode steps at one context length.
struct Measured {
  std::vector<uint64_t> tp, pipe;  // per step
  size_t cache_bytes = 0;
  int64_t layers = 0;
  bool sharded = false;
};

Measured decode(const Model& model, Grid& grid, const std::string& mode, int context) {
  const ModelConfig& c = model.config();
  EngineOptions options;
  options.threads = 1;
  options.cache_mode = mode;
  options.max_tokens = context + kSteps;
  PipelineEngine engine(model, options, grid);
  std::vector<int32_t> tokens(static_cast<size_t>(context));
  for (int i = 0; i < context; ++i) tokens[static_cast<size_t>(i)] = (i * 7919 + 13) % c.vocab_size;
  std::vector<float> logits(static_cast<size_t>(c.vocab_size));
  for (int filled = 0; filled < context;) {
    const int n = std::min(512, context - filled);
    engine.forward(0, tokens.data() + filled, n, filled, logits.data(), n - 1);
    filled += n;
  }
  Measured m;
  m.layers = engine.layers().count;
  m.sharded = engine.stage_engine().sequence_sharded();
  Sampler greedy(SamplerOptions{});
  for (int s = 0; s < kSteps; ++s) {
    const int32_t token = (s * 5 + 3) % c.vocab_size;
    const uint64_t tp0 = grid.tp_group().bytes_sent(), pipe0 = grid.pipeline().bytes_sent();
    // Even steps as generation runs them (the last stage sends back the
    // token), odd steps returning logits to every rank (as perplexity does).
    if (s % 2 == 0)
      engine.forward_sample(0, &token, 1, context + s, greedy);
    else
      engine.forward(0, &token, 1, context + s, logits.data(), 0);
    m.tp.push_back(grid.tp_group().bytes_sent() - tp0);
    m.pipe.push_back(grid.pipeline().bytes_sent() - pipe0);
  }
  m.cache_bytes = engine.cache_bytes_in_use();
  return m;
}

std::vector<std::pair<int, int>> grids() {
  std::vector<std::pair<int, int>> out = {{testing::grid_tp(), testing::grid_pp()}};
  if (testing::world_size() == 2) out.emplace_back(1, 2);
  return out;
}

void check_model(const TinyShape& shape, const std::string& name) {
  const auto model = load_tiny(shape, name);
  const ModelConfig& c = model->config();
  for (const auto& [tp, pp] : grids()) {
    Grid grid(tp, pp);
    for (const char* mode : kModes) {
      SCOPED_TRACE(name + " tp=" + std::to_string(tp) + " pp=" + std::to_string(pp) + " " + mode +
                   " world rank " + std::to_string(grid.world_rank()));
      const Measured short_run = decode(*model, grid, mode, kShort);
      const Measured long_run = decode(*model, grid, mode, kLong);
      // A group of one holds every head; fp16 is sharded by KV head where tp
      // divides the KV heads; everything else is sharded by sequence.
      EXPECT_EQ(short_run.sharded,
                tp > 1 && (std::string(mode) != "fp16" || c.n_kv_heads % tp != 0));
      const StepTraffic f = decode_step_traffic(c, short_run.sharded, tp, grid.tp_rank(), pp,
                                                grid.stage(), 1, sizeof(SampledToken));
      const StepTraffic with_logits =
          decode_step_traffic(c, short_run.sharded, tp, grid.tp_rank(), pp, grid.stage(), 1,
                              static_cast<uint64_t>(c.vocab_size) * sizeof(float));
      const uint64_t tp_step = f.tp_per_layer * static_cast<uint64_t>(short_run.layers);
      for (const Measured* run : {&short_run, &long_run}) {
        for (int s = 0; s < kSteps; ++s) {
          EXPECT_EQ(run->tp[s], tp_step) << "TP bytes of decode step " << s;
          EXPECT_EQ(run->pipe[s], (s % 2 == 0 ? f : with_logits).pipeline_per_step)
              << "pipeline bytes of decode step " << s;
        }
      }
      // Independent of the formula: the same bytes at both lengths.
      EXPECT_EQ(short_run.tp, long_run.tp);
      EXPECT_EQ(short_run.pipe, long_run.pipe);
      // ... while the cache this rank holds grew with the context: in whole
      // 128-token blocks, so a rank holding half of each sequence by 128-token
      // units goes from 3 blocks (131 of 259 tokens, one a window page) to 18.
      EXPECT_GT(long_run.cache_bytes, 5 * short_run.cache_bytes);
      // Something was sent where there is someone to send to.
      if (tp > 1) {
        EXPECT_GT(short_run.tp[0], 0u);
      }
      if (pp > 1) {
        EXPECT_GT(short_run.pipe[0], 0u);  // activations on, or the logits back
      }
      if (testing::world_rank() == 0)
        std::printf(
            "%s tp=%d pp=%d %-11s rank 0: %llu B/step over TP (%lld layers, formula "
            "%llu/layer), %llu B/step over the pipeline, at %d and %d tokens; cache "
            "%zu -> %zu B\n",
            name.c_str(), tp, pp, mode, static_cast<unsigned long long>(short_run.tp[0]),
            static_cast<long long>(short_run.layers),
            static_cast<unsigned long long>(f.tp_per_layer),
            static_cast<unsigned long long>(short_run.pipe[0]), kShort, kLong,
            short_run.cache_bytes, long_run.cache_bytes);
    }
  }
}

// 4 query heads over 1 KV head of 16: kv_dim 16, 2 * kv_dim < dim 64, so the
// xquant modes store SVD latents (X·Uk per channel, 128-token shard units).
TEST(ParallelTraffic, GqaLatentModelSameBytesAt256And4096Tokens) {
  check_model({64, 4, 4, 1, 128, kLong + 512}, "gqa");
}

// Multi-head attention: xquant stores X per token (1-token shard units).
TEST(ParallelTraffic, MhaModelSameBytesAt256And4096Tokens) {
  check_model({64, 4, 4, 4, 128, kLong + 512}, "mha");
}

}  // namespace
}  // namespace xq::parallel
