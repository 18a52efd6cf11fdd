// Tensor and pipeline parallelism, per (tp, pp) grid and cache mode: each
// rank's weight and cache bytes, the bytes it sends per decode step (counted
// by its communicators, Communicator::bytes_sent, and checked against the
// formula in parallel/decode_traffic.h), and decode tokens/s. Run under
// mpirun with tp * pp ranks:
//
//   mpirun -np 2 build/bench/bench_parallel --model M --tp 2 --pp 1
//       [--modes fp16,kivi-4,xquant-4,xquant-cl-4] [--contexts 256,1024]
//       [--steps 16] [--threads 1] [--micro-batch 64] [--out FILE.md [--append]]
//
// For each mode and context a fresh engine prefills `context` tokens (fixed
// pseudo-random ids, in chunks of 512), takes one warm-up decode step, then
// `steps` timed greedy decode steps. Traffic is per step and, for the TP group
// (which talks at every layer), per layer of this rank's stage; the pipeline
// part (activations to the next stage, logits broadcast back) is per step.
// Every single step must match the formula exactly; the program exits 1 if
// one does not. Tokens/s: the median over steps of the slowest rank's step
// (steps start together after an MPI barrier, which is not counted).
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "bench/bench_util.h"
#include "kernels/error.h"
#include "parallel/decode_traffic.h"
#include "parallel/grid.h"
#include "parallel/mpi_communicator.h"
#include "parallel/pipeline_engine.h"
#include "runtime/model.h"

namespace {

using Clock = std::chrono::steady_clock;
using xq::parallel::Grid;
using xq::parallel::PipelineEngine;
using xq::parallel::StepTraffic;

// One rank's numbers for one (mode, context); gathered to rank 0 as bytes.
struct RankResult {
  int32_t world_rank, stage, tp_rank, layer_begin, layer_count;
  int32_t all_steps_match;  // every step's counted bytes == the formula (both parts)
  uint64_t weight_bytes, cache_bytes;
  uint64_t tp_bytes, pipe_bytes;  // counted over all timed steps
  uint64_t tp_formula_per_layer, pipe_formula_per_step;
};

std::string per_unit(uint64_t total, uint64_t units) {
  char text[64];
  if (units > 0 && total % units == 0)
    std::snprintf(text, sizeof text, "%llu", static_cast<unsigned long long>(total / units));
  else
    std::snprintf(text, sizeof text, "%.2f", units ? static_cast<double>(total) / units : 0.0);
  return text;
}

struct Options {
  std::string model, modes = "fp16,kivi-4,xquant-4,xquant-cl-4", contexts = "256,1024", out;
  int tp = 0, pp = 1, steps = 16, threads = 1, micro_batch = 64;
  bool append = false;
};

// Runs one (mode, context) on every rank; rank 0 gets all ranks' results.
// `step_seconds`: the slowest rank's time of each timed step (on every rank).
RankResult run_one(const xq::Model& model, Grid& grid, const Options& o, const std::string& mode,
                   int context, std::vector<double>& step_seconds) {
  const xq::ModelConfig& c = model.config();
  xq::EngineOptions options;
  options.threads = o.threads;
  options.cache_mode = mode;
  options.max_tokens = context + o.steps + 1;  // + the warm-up step
  xq::parallel::PipelineOptions pipeline;
  pipeline.micro_batch = o.micro_batch;
  PipelineEngine engine(model, options, grid, pipeline);

  std::vector<float> logits(static_cast<size_t>(c.vocab_size));
  std::vector<int32_t> tokens(static_cast<size_t>(context));
  for (int i = 0; i < context; ++i)
    tokens[static_cast<size_t>(i)] = static_cast<int32_t>((i * 7919LL + 13) % c.vocab_size);
  constexpr int kPrefillChunk = 512;
  for (int filled = 0; filled < context;) {
    const int n = std::min(kPrefillChunk, context - filled);
    engine.forward(0, tokens.data() + filled, n, filled, logits.data(), n - 1);
    filled += n;
  }
  auto next_token = [&]() {
    return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  };
  int32_t pos = context;
  int32_t token = next_token();
  // Decode steps as generation runs them: the last stage samples (greedy)
  // and sends back only the token.
  xq::Sampler greedy(xq::SamplerOptions{});
  token = engine.forward_sample(0, &token, 1, pos++, greedy).token;  // warm-up

  const bool sharded = engine.stage_engine().sequence_sharded();
  const StepTraffic formula = xq::parallel::decode_step_traffic(
      c, sharded, grid.tp(), grid.tp_rank(), grid.pp(), grid.stage(), 1, sizeof(xq::SampledToken));
  const xq::Range layers = engine.layers();
  const uint64_t tp_step_formula = formula.tp_per_layer * static_cast<uint64_t>(layers.count);

  RankResult r{};
  r.world_rank = grid.world_rank();
  r.stage = grid.stage();
  r.tp_rank = grid.tp_rank();
  r.layer_begin = static_cast<int32_t>(layers.begin);
  r.layer_count = static_cast<int32_t>(layers.count);
  r.all_steps_match = 1;
  r.tp_formula_per_layer = formula.tp_per_layer;
  r.pipe_formula_per_step = formula.pipeline_per_step;
  std::vector<double> mine;
  for (int s = 0; s < o.steps; ++s) {
    MPI_Barrier(MPI_COMM_WORLD);  // outside our communicators: not counted
    const uint64_t tp0 = grid.tp_group().bytes_sent(), pipe0 = grid.pipeline().bytes_sent();
    const auto start = Clock::now();
    token = engine.forward_sample(0, &token, 1, pos++, greedy).token;
    mine.push_back(std::chrono::duration<double>(Clock::now() - start).count());
    const uint64_t tp = grid.tp_group().bytes_sent() - tp0;
    const uint64_t pipe = grid.pipeline().bytes_sent() - pipe0;
    r.tp_bytes += tp;
    r.pipe_bytes += pipe;
    if (tp != tp_step_formula || pipe != formula.pipeline_per_step) r.all_steps_match = 0;
  }
  step_seconds.assign(mine.size(), 0.0);
  MPI_Allreduce(mine.data(), step_seconds.data(), static_cast<int>(mine.size()), MPI_DOUBLE,
                MPI_MAX, MPI_COMM_WORLD);
  r.weight_bytes = engine.weight_bytes();
  r.cache_bytes = engine.cache_bytes_in_use();
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int world_rank = 0, world_size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world_size);

  Options o;
  const char* models_env = std::getenv("XQ_MODELS_DIR");
  o.model = std::string(models_env ? models_env : "models") + "/SmolLM2-135M-Instruct.Q4_1.gguf";
  std::string command = argv[0];
  bool usage = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    command += " " + arg;
    if (arg == "--append") {
      o.append = true;
      continue;
    }
    if (i + 1 >= argc) {
      usage = true;
      break;
    }
    const std::string value = argv[++i];
    command += " " + value;
    if (arg == "--model")
      o.model = value;
    else if (arg == "--tp")
      o.tp = std::atoi(value.c_str());
    else if (arg == "--pp")
      o.pp = std::atoi(value.c_str());
    else if (arg == "--modes")
      o.modes = value;
    else if (arg == "--contexts")
      o.contexts = value;
    else if (arg == "--steps")
      o.steps = std::atoi(value.c_str());
    else if (arg == "--threads")
      o.threads = std::atoi(value.c_str());
    else if (arg == "--micro-batch")
      o.micro_batch = std::atoi(value.c_str());
    else if (arg == "--out")
      o.out = value;
    else
      usage = true;
  }
  if (o.tp == 0 && o.pp > 0) o.tp = world_size / o.pp;
  std::vector<int> contexts;
  for (const std::string& s : xq::bench::split_commas(o.contexts))
    contexts.push_back(std::atoi(s.c_str()));
  const std::vector<std::string> modes = xq::bench::split_commas(o.modes);
  bool bad = usage || o.tp < 1 || o.pp < 1 || o.tp * o.pp != world_size || o.steps < 1 ||
             o.threads < 1 || o.micro_batch < 1 || contexts.empty() || modes.empty();
  for (int ctx : contexts) bad = bad || ctx < 1;
  if (bad) {
    if (world_rank == 0)
      std::fprintf(stderr,
                   "usage: mpirun -np TP*PP %s [--model M] [--tp TP] [--pp PP] [--modes a,b] "
                   "[--contexts 256,1024] [--steps 16] [--threads 1] [--micro-batch 64] "
                   "[--out FILE.md [--append]]\n(this job has %d ranks)\n",
                   argv[0], world_size);
    MPI_Finalize();
    return 2;
  }

  int mismatches = 0;
  std::string report;
  auto emit = [&](const std::string& text) {
    if (world_rank != 0) return;
    std::fputs(text.c_str(), stdout);
    std::fflush(stdout);
    report += text;
  };
  try {
    auto model = xq::Model::load(o.model);
    const xq::ModelConfig& c = model->config();
    Grid grid(o.tp, o.pp);
    const unsigned cores = std::thread::hardware_concurrency();
    char line[1024];
    std::snprintf(line, sizeof line, "## tp=%d pp=%d\n\ncommand (%d ranks): `mpirun -np %d %s`\n\n",
                  o.tp, o.pp, world_size, world_size, command.c_str());
    emit(line);
    std::snprintf(line, sizeof line,
                  "model: %s (dim %d, %d layers, %d heads, %d KV heads, head_dim %d, vocab %d); "
                  "%d thread(s) per rank; %d timed decode steps after one warm-up step.\n",
                  o.model.c_str(), c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim,
                  c.vocab_size, o.threads, o.steps);
    emit(line);
    if (cores > 0 && static_cast<unsigned>(world_size * o.threads) > cores) {
      std::snprintf(line, sizeof line,
                    "**Oversubscribed**: %d ranks x %d thread(s) on %u cores; tok/s here is not a "
                    "speed claim.\n",
                    world_size, o.threads, cores);
      emit(line);
    }
    emit("\n");

    struct Summary {
      std::string mode;
      int context;
      double tok_s;
      uint64_t cache_total, tp_max_per_layer, pipe_max;
      bool match;
    };
    std::vector<Summary> summary;
    for (const std::string& mode : modes) {
      for (int context : contexts) {
        std::vector<double> step_seconds;
        const RankResult mine = run_one(*model, grid, o, mode, context, step_seconds);
        std::vector<RankResult> all(static_cast<size_t>(world_size));
        MPI_Gather(&mine, sizeof(RankResult), MPI_BYTE, all.data(), sizeof(RankResult), MPI_BYTE, 0,
                   MPI_COMM_WORLD);
        if (world_rank != 0) continue;
        std::vector<double> sorted = step_seconds;
        std::nth_element(sorted.begin(), sorted.begin() + sorted.size() / 2, sorted.end());
        const double median = sorted[sorted.size() / 2];
        Summary s{mode, context, 1.0 / median, 0, 0, 0, true};
        std::snprintf(
            line, sizeof line,
            "### tp=%d pp=%d, %s, context %d: decode %.1f tok/s (median step %.2f ms)\n\n", o.tp,
            o.pp, mode.c_str(), context, 1.0 / median, 1e3 * median);
        emit(line);
        emit(
            "| rank | stage | tp rank | layers | weights MB | cache bytes | TP bytes/step/layer "
            "counted | formula | pipeline bytes/step counted | formula | match |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n");
        for (const RankResult& r : all) {
          const uint64_t steps = static_cast<uint64_t>(o.steps);
          const bool match = r.all_steps_match != 0 &&
                             r.tp_bytes == steps * r.layer_count * r.tp_formula_per_layer &&
                             r.pipe_bytes == steps * r.pipe_formula_per_step;
          if (!match) ++mismatches;
          s.match = s.match && match;
          s.cache_total += r.cache_bytes;
          s.tp_max_per_layer = std::max<uint64_t>(
              s.tp_max_per_layer, r.tp_bytes / (steps * static_cast<uint64_t>(r.layer_count)));
          s.pipe_max = std::max<uint64_t>(s.pipe_max, r.pipe_bytes / steps);
          std::snprintf(
              line, sizeof line,
              "| %d | %d | %d | %d-%d | %.2f | %llu | %s | %llu | %s | %llu | %s |\n", r.world_rank,
              r.stage, r.tp_rank, r.layer_begin, r.layer_begin + r.layer_count - 1,
              r.weight_bytes / 1e6, static_cast<unsigned long long>(r.cache_bytes),
              per_unit(r.tp_bytes, steps * static_cast<uint64_t>(r.layer_count)).c_str(),
              static_cast<unsigned long long>(r.tp_formula_per_layer),
              per_unit(r.pipe_bytes, steps).c_str(),
              static_cast<unsigned long long>(r.pipe_formula_per_step), match ? "yes" : "**NO**");
          emit(line);
        }
        emit("\n");
        summary.push_back(s);
      }
    }
    std::snprintf(line, sizeof line,
                  "### tp=%d pp=%d summary\n\n| mode | context | decode tok/s | cache bytes (all "
                  "ranks) | max TP bytes/step/layer | max pipeline bytes/step | all match |\n"
                  "|---|---|---|---|---|---|---|\n",
                  o.tp, o.pp);
    emit(line);
    for (const Summary& s : summary) {
      std::snprintf(line, sizeof line, "| %s | %d | %.1f | %llu | %llu | %llu | %s |\n",
                    s.mode.c_str(), s.context, s.tok_s,
                    static_cast<unsigned long long>(s.cache_total),
                    static_cast<unsigned long long>(s.tp_max_per_layer),
                    static_cast<unsigned long long>(s.pipe_max), s.match ? "yes" : "**NO**");
      emit(line);
    }
    emit("\n");
  } catch (const std::exception& e) {
    xq::parallel::abort_job(std::string("bench_parallel: ") + e.what());
  }

  if (world_rank == 0 && !o.out.empty()) {
    FILE* f = std::fopen(o.out.c_str(), o.append ? "a" : "w");
    if (f == nullptr || std::fputs(report.c_str(), f) < 0) {
      std::fprintf(stderr, "bench_parallel: cannot write %s\n", o.out.c_str());
      mismatches = mismatches > 0 ? mismatches : -1;
    }
    if (f) std::fclose(f);
  }
  int verdict = mismatches;
  MPI_Bcast(&verdict, 1, MPI_INT, 0, MPI_COMM_WORLD);
  if (world_rank == 0 && verdict > 0)
    std::fprintf(stderr, "bench_parallel: %d rank result(s) where counted bytes != formula\n",
                 verdict);
  MPI_Finalize();
  return verdict != 0 ? 1 : 0;
}
