// Batched decode: tokens/s against batch size and context for each cache
// mode, and how many sequences each mode holds under one cache budget.
//
// Speed: every mode's engine is alive at once and filled with `max batch`
// sequences of each context; then, round after round, every (batch, mode)
// pair runs one decode step of `batch` sequences (one row each) and truncates
// them back, so each point is the median of `--rounds` steps taken in turns
// (this VM's speed drifts by up to 30%: every mode sees the same drift).
// Next to each figure: the bytes a step reads (weights once + every
// sequence's cache) and its multiply-adds (matmuls + attention scores and
// mixes; the rebuild of K in xquant modes comes on top and is what their
// speed pays for).
//
// Capacity: under --capacity-memory (default 64MiB) each mode's pool holds
// floor(total_blocks / blocks for one sequence of context + rounds tokens)
// sequences; that many are filled and decoded together.
//
//   build/bench/bench_batch [--model M] [--threads 2] [--rounds 7]
//       [--modes fp16,kivi-4,xquant-4,xquant-cl-3] [--batches 1,2,4,8,16,32]
//       [--contexts 256,1024] [--capacity-modes ...] [--capacity-memory 64MiB]
//       [--capacity-context 1024] [--json FILE] [--markdown FILE]
// bench/plot_batch.py turns the JSON into a PNG.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "kernels/error.h"
#include "runtime/engine.h"
#include "runtime/model.h"

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

std::vector<int32_t> context_tokens(int32_t length, int32_t salt, int32_t vocab) {
  std::vector<int32_t> tokens(static_cast<size_t>(length));
  for (int32_t i = 0; i < length; ++i)
    tokens[i] = static_cast<int32_t>((static_cast<int64_t>(i) * 7919 + salt * 104729 + 13) % vocab);
  return tokens;
}

// Prefills sequences [0, count) to `context` tokens, a few sequences per
// forward_batch so the step's activations stay small.
void fill(xq::Engine& engine, int32_t count, int32_t context) {
  const int32_t vocab = engine.model().config().vocab_size;
  std::vector<std::vector<int32_t>> prompts;
  for (int32_t s = 0; s < count; ++s) prompts.push_back(context_tokens(context, s, vocab));
  constexpr int32_t kRowsPerStep = 2048;
  for (int32_t first = 0; first < count;) {
    std::vector<xq::Segment> segments;
    int32_t rows = 0;
    for (; first < count && (segments.empty() || rows + context <= kRowsPerStep); ++first) {
      xq::Segment seg;
      seg.seq = first;
      seg.pos0 = engine.length(first);
      seg.tokens = prompts[static_cast<size_t>(first)].data() + seg.pos0;
      seg.n = context - seg.pos0;
      if (seg.n <= 0) continue;
      segments.push_back(seg);
      rows += seg.n;
    }
    engine.forward_batch(segments, nullptr);
  }
}

// One decode step of sequences [0, batch), each at position `context`, then
// back to `context` tokens. Returns its seconds.
double decode_step(xq::Engine& engine, int32_t batch, int32_t context, std::vector<float>& logits) {
  const int32_t vocab = engine.model().config().vocab_size;
  std::vector<int32_t> next(static_cast<size_t>(batch));
  std::vector<xq::Segment> segments;
  for (int32_t s = 0; s < batch; ++s) {
    next[s] = (s * 31 + 7) % vocab;
    segments.push_back({s, context, &next[s], 1, true});
  }
  logits.resize(static_cast<size_t>(batch) * vocab);
  const auto start = Clock::now();
  engine.forward_batch(segments, logits.data());
  const double seconds = seconds_since(start);
  for (int32_t s = 0; s < batch; ++s) engine.truncate(s, context);
  return seconds;
}

// Multiply-adds of one decode row: every matmul (the output head included)
// plus attention's scores and value mix over `context` tokens.
double macs_per_row(const xq::Model& model, int32_t context) {
  const auto& c = model.config();
  const double per_layer = static_cast<double>(c.dim) * (c.q_dim() + 2.0 * c.kv_dim()) +
                           static_cast<double>(c.q_dim()) * c.dim +
                           3.0 * static_cast<double>(c.dim) * c.ffn_dim +
                           2.0 * c.n_heads * static_cast<double>(context) * c.head_dim;
  return per_layer * c.n_layers + static_cast<double>(c.vocab_size) * c.dim;
}

struct Point {
  std::string mode;
  int32_t batch = 0, context = 0;
  double tokens_per_s = 0, step_ms = 0, bytes_per_step = 0, macs_per_step = 0;
};

struct Capacity {
  std::string mode;
  size_t block_bytes = 0;
  int32_t blocks = 0, blocks_per_sequence = 0, sequences = 0;
  double tokens_per_s = 0;
};

}  // namespace

int main(int argc, char** argv) {
  std::string model_path = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
  std::string modes_arg = "fp16,kivi-4,xquant-4,xquant-cl-3";
  std::string capacity_modes_arg =
      "fp16,kivi-4,kivi-2,xquant-4,xquant-3,xquant-2,xquant-cl-4,xquant-cl-3,xquant-cl-2";
  std::string batches_arg = "1,2,4,8,16,32", contexts_arg = "256,1024";
  std::string json_path, markdown_path;
  int threads = 2, rounds = 7;
  int32_t capacity_context = 1024;
  double capacity_mib = 64;
  std::string command = "build/bench/bench_batch";
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", arg.c_str());
        std::exit(2);
      }
      command += " " + arg + " " + argv[i + 1];
      return argv[++i];
    };
    if (arg == "--model")
      model_path = value();
    else if (arg == "--modes")
      modes_arg = value();
    else if (arg == "--capacity-modes")
      capacity_modes_arg = value();
    else if (arg == "--batches")
      batches_arg = value();
    else if (arg == "--contexts")
      contexts_arg = value();
    else if (arg == "--threads")
      threads = std::atoi(value().c_str());
    else if (arg == "--rounds")
      rounds = std::atoi(value().c_str());
    else if (arg == "--capacity-context")
      capacity_context = std::atoi(value().c_str());
    else if (arg == "--capacity-memory")
      capacity_mib = std::atof(value().c_str());
    else if (arg == "--json")
      json_path = value();
    else if (arg == "--markdown")
      markdown_path = value();
    else {
      std::fprintf(stderr, "unknown option %s (see the comment at the top of bench_batch.cpp)\n",
                   arg.c_str());
      return 2;
    }
  }
  try {
    auto model = xq::Model::load(model_path);
    const auto& c = model->config();
    std::vector<int32_t> batches, contexts;
    for (const auto& b : xq::bench::split_commas(batches_arg)) batches.push_back(std::stoi(b));
    for (const auto& x : xq::bench::split_commas(contexts_arg)) contexts.push_back(std::stoi(x));
    const std::vector<std::string> modes = xq::bench::split_commas(modes_arg);
    const int32_t max_batch = *std::max_element(batches.begin(), batches.end());
    std::printf("%s\nmodel %s, %d threads, %d rounds\n", command.c_str(), model_path.c_str(),
                threads, rounds);

    std::vector<Point> points;
    std::vector<float> logits;
    for (int32_t context : contexts) {
      std::vector<std::unique_ptr<xq::TransformerEngine>> engines;
      for (const std::string& mode : modes) {
        xq::EngineOptions options;
        options.threads = threads;
        options.cache_mode = mode;
        options.sequences = max_batch;
        options.max_tokens = context + 8;
        engines.push_back(std::make_unique<xq::TransformerEngine>(*model, options));
        const auto start = Clock::now();
        fill(*engines.back(), max_batch, context);
        std::fprintf(stderr, "filled %s: %d x %d tokens in %.1f s\n", mode.c_str(), max_batch,
                     context, seconds_since(start));
      }
      // seconds[batch][mode]
      std::vector<std::vector<std::vector<double>>> seconds(
          batches.size(), std::vector<std::vector<double>>(modes.size()));
      for (int r = 0; r < rounds; ++r)
        for (size_t b = 0; b < batches.size(); ++b)
          for (size_t m = 0; m < modes.size(); ++m)
            seconds[b][m].push_back(decode_step(*engines[m], batches[b], context, logits));
      for (size_t b = 0; b < batches.size(); ++b)
        for (size_t m = 0; m < modes.size(); ++m) {
          Point p;
          p.mode = modes[m];
          p.batch = batches[b];
          p.context = context;
          const double step = median(seconds[b][m]);
          p.step_ms = step * 1e3;
          p.tokens_per_s = batches[b] / step;
          p.bytes_per_step =
              static_cast<double>(engines[m]->weight_bytes()) +
              static_cast<double>(batches[b]) * engines[m]->cache().bytes_for_tokens(context);
          p.macs_per_step = batches[b] * macs_per_row(*model, context);
          points.push_back(p);
        }
    }

    std::vector<Capacity> capacity;
    const size_t budget = static_cast<size_t>(capacity_mib * 1024 * 1024);
    for (const std::string& mode : xq::bench::split_commas(capacity_modes_arg)) {
      xq::EngineOptions options;
      options.threads = threads;
      options.cache_mode = mode;
      options.sequences = 256;
      options.max_tokens = capacity_context + 8;
      options.cache_bytes = budget;
      xq::TransformerEngine engine(*model, options);
      Capacity cap;
      cap.mode = mode;
      const xq::PoolInfo pool = engine.pool();
      cap.block_bytes = pool.block_bytes;
      cap.blocks = pool.total_blocks;
      cap.blocks_per_sequence = engine.blocks_for_tokens(capacity_context + 1);
      cap.sequences = std::min(256, cap.blocks / std::max(1, cap.blocks_per_sequence));
      if (cap.sequences > 0) {
        const auto start = Clock::now();
        fill(engine, cap.sequences, capacity_context);
        std::fprintf(stderr, "capacity %s: %d sequences filled in %.1f s\n", mode.c_str(),
                     cap.sequences, seconds_since(start));
        std::vector<double> steps;
        for (int r = 0; r < rounds; ++r)
          steps.push_back(decode_step(engine, cap.sequences, capacity_context, logits));
        cap.tokens_per_s = cap.sequences / median(steps);
      }
      capacity.push_back(cap);
    }

    // Markdown: one table per context, modes as columns.
    std::string md = "Command: `" + command + "`\n\n";
    for (int32_t context : contexts) {
      md += "Decode tokens/s at context " + std::to_string(context) +
            " (median step; GB read and G multiply-adds per step in brackets)\n\n| batch |";
      for (const auto& m : modes) md += " " + m + " |";
      md += "\n|---|";
      for (size_t m = 0; m < modes.size(); ++m) md += "---|";
      md += "\n";
      for (int32_t b : batches) {
        md += "| " + std::to_string(b) + " |";
        for (const auto& m : modes)
          for (const Point& p : points)
            if (p.mode == m && p.batch == b && p.context == context) {
              char cell[96];
              std::snprintf(cell, sizeof cell, " %.1f (%.3f GB, %.2f G) |", p.tokens_per_s,
                            p.bytes_per_step / 1e9, p.macs_per_step / 1e9);
              md += cell;
            }
        md += "\n";
      }
      for (const auto& m : modes) {
        double one = 0, sixteen = 0;
        for (const Point& p : points)
          if (p.mode == m && p.context == context) {
            if (p.batch == 1) one = p.tokens_per_s;
            if (p.batch == 16) sixteen = p.tokens_per_s;
          }
        if (one > 0 && sixteen > 0) {
          char line[128];
          std::snprintf(line, sizeof line, "\n%s: batch 16 / batch 1 = %.2fx", m.c_str(),
                        sixteen / one);
          md += line;
        }
      }
      md += "\n\n";
    }
    char head[160];
    std::snprintf(head, sizeof head,
                  "Capacity under %.0f MiB of cache, sequences of %d tokens (+ decode room)\n\n",
                  capacity_mib, capacity_context);
    md += head;
    md +=
        "| mode | block bytes | blocks | blocks per sequence | sequences | vs fp16 | decode "
        "tokens/s with all running |\n|---|---|---|---|---|---|---|\n";
    int32_t fp16_sequences = 0;
    for (const Capacity& cap : capacity)
      if (cap.mode == "fp16") fp16_sequences = cap.sequences;
    for (const Capacity& cap : capacity) {
      char row[256];
      std::snprintf(row, sizeof row, "| %s | %zu | %d | %d | %d | %.2fx | %.1f |\n",
                    cap.mode.c_str(), cap.block_bytes, cap.blocks, cap.blocks_per_sequence,
                    cap.sequences,
                    fp16_sequences > 0 ? static_cast<double>(cap.sequences) / fp16_sequences : 0.0,
                    cap.tokens_per_s);
      md += row;
    }
    std::printf("\n%s", md.c_str());
    if (!markdown_path.empty()) {
      FILE* f = std::fopen(markdown_path.c_str(), "w");
      if (f) std::fputs(md.c_str(), f), std::fclose(f);
    }
    if (!json_path.empty()) {
      FILE* f = std::fopen(json_path.c_str(), "w");
      if (!f) throw xq::Error("cannot write " + json_path);
      std::fprintf(f, "{\n  \"command\": \"%s\",\n  \"model\": \"%s\",\n  \"threads\": %d,\n",
                   command.c_str(), model_path.c_str(), threads);
      std::fprintf(f, "  \"decode\": [\n");
      for (size_t i = 0; i < points.size(); ++i) {
        const Point& p = points[i];
        std::fprintf(f,
                     "    {\"mode\": \"%s\", \"batch\": %d, \"context\": %d, \"tokens_per_s\": "
                     "%.3f, \"step_ms\": %.3f, \"bytes_per_step\": %.0f, \"macs_per_step\": "
                     "%.0f}%s\n",
                     p.mode.c_str(), p.batch, p.context, p.tokens_per_s, p.step_ms,
                     p.bytes_per_step, p.macs_per_step, i + 1 < points.size() ? "," : "");
      }
      std::fprintf(f, "  ],\n  \"capacity_mib\": %.1f,\n  \"capacity_context\": %d,\n",
                   capacity_mib, capacity_context);
      std::fprintf(f, "  \"capacity\": [\n");
      for (size_t i = 0; i < capacity.size(); ++i) {
        const Capacity& cap = capacity[i];
        std::fprintf(f,
                     "    {\"mode\": \"%s\", \"block_bytes\": %zu, \"blocks\": %d, "
                     "\"blocks_per_sequence\": %d, \"sequences\": %d, \"tokens_per_s\": %.3f}%s\n",
                     cap.mode.c_str(), cap.block_bytes, cap.blocks, cap.blocks_per_sequence,
                     cap.sequences, cap.tokens_per_s, i + 1 < capacity.size() ? "," : "");
      }
      std::fprintf(f, "  ]\n}\n");
      std::fclose(f);
    }
    (void)c;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_batch: %s\n", e.what());
    return 1;
  }
  return 0;
}
