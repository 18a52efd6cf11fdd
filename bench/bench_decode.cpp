// Decode speed against context length for every cache mode, in one run:
// each mode prefills up to 256, 1024, 2048 and 4096 tokens of context and is
// timed over a few greedy decode steps at each, so the quantized modes' cost of
// rebuilding K from the cached X (or latents) shows next to fp16's. Each
// point is the median of the timed steps.
//
//   build/bench/bench_decode [--model M] [--threads 2] [--steps 8]
//                            [--contexts 256,1024,2048,4096] [--modes fp16,xquant-4,...]
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

// One engine per mode, all alive at once, so the modes can take turns.
struct ModeRun {
  std::string mode;
  std::unique_ptr<xq::TransformerEngine> engine;
  int32_t filled = 0;
  std::vector<float> logits;
  std::vector<double> speeds;  // per context
};

// Decode tokens/s of every mode at each context length. Each engine prefills
// the context in chunks (as a server would); then the modes take turns, a few
// greedy steps each per round, so that a slow spell of this shared VM (runs
// differ by up to 30%) falls on every mode alike; a point is the median step.
// The steps are removed again before the next, longer context is prefilled.
void measure(const xq::Model& model, std::vector<ModeRun>& runs, const std::vector<int>& contexts,
             int steps) {
  const auto& c = model.config();
  std::vector<int32_t> tokens(contexts.back());
  for (size_t i = 0; i < tokens.size(); ++i)
    tokens[i] = static_cast<int32_t>((i * 7919 + 13) % c.vocab_size);
  constexpr int32_t kPrefillChunk = 512;
  constexpr int kRounds = 4;
  for (int context : contexts) {
    std::vector<std::vector<double>> step_seconds(runs.size());
    for (ModeRun& run : runs) {
      while (run.filled < context) {
        int32_t n = std::min(kPrefillChunk, context - run.filled);
        run.engine->forward(0, tokens.data() + run.filled, n, run.filled, run.logits.data(), n - 1);
        run.filled += n;
      }
      int32_t token = 1;
      run.engine->forward(0, &token, 1, run.filled, run.logits.data(), 0);  // warm-up step
    }
    for (int round = 0; round < kRounds; ++round) {
      for (size_t m = 0; m < runs.size(); ++m) {
        ModeRun& run = runs[m];
        for (int i = 0; i < (steps + kRounds - 1) / kRounds; ++i) {
          const int32_t pos = run.filled + 1 + static_cast<int32_t>(step_seconds[m].size());
          int32_t token = static_cast<int32_t>(
              std::max_element(run.logits.begin(), run.logits.end()) - run.logits.begin());
          auto start = Clock::now();
          run.engine->forward(0, &token, 1, pos, run.logits.data(), 0);
          step_seconds[m].push_back(seconds_since(start));
        }
      }
    }
    for (size_t m = 0; m < runs.size(); ++m) {
      std::vector<double>& times = step_seconds[m];
      std::nth_element(times.begin(), times.begin() + times.size() / 2, times.end());
      runs[m].speeds.push_back(1.0 / times[times.size() / 2]);
      runs[m].engine->cache().truncate(0, runs[m].filled);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  const char* models_env = std::getenv("XQ_MODELS_DIR");
  std::string model_path =
      std::string(models_env ? models_env : "models") + "/SmolLM2-135M-Instruct.Q4_1.gguf";
  std::string modes =
      "fp16,kivi-4,kivi-3,kivi-2,xquant-8,xquant-4,xquant-3,xquant-2,xquant-cl-4,xquant-cl-3,"
      "xquant-cl-2";
  std::string context_list = "256,1024,2048,4096";
  int threads = 2, steps = 8;
  std::string command = argv[0];
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    command += " " + arg;
    if (i + 1 >= argc) {
      std::fprintf(stderr, "missing value for %s\n", arg.c_str());
      return 2;
    }
    std::string value = argv[++i];
    command += " " + value;
    if (arg == "--model")
      model_path = value;
    else if (arg == "--modes")
      modes = value;
    else if (arg == "--contexts")
      context_list = value;
    else if (arg == "--threads")
      threads = std::atoi(value.c_str());
    else if (arg == "--steps")
      steps = std::atoi(value.c_str());
    else {
      std::fprintf(stderr,
                   "usage: %s [--model M] [--threads N] [--steps N] [--contexts a,b] [--modes "
                   "a,b]\n",
                   argv[0]);
      return 2;
    }
  }
  std::vector<int> contexts;
  for (const std::string& s : xq::bench::split_commas(context_list))
    contexts.push_back(std::atoi(s.c_str()));
  std::sort(contexts.begin(), contexts.end());
  if (contexts.empty() || contexts.front() <= 0 || steps <= 0 || threads <= 0) {
    std::fprintf(stderr, "contexts, steps and threads must be positive\n");
    return 2;
  }
  try {
    auto model = xq::Model::load(model_path);
    std::printf(
        "command: %s\nmodel: %s, %d threads, median of %d timed decode steps per point, modes "
        "taking turns\n\n",
        command.c_str(), model_path.c_str(), threads, steps);
    std::printf("| mode |");
    for (int ctx : contexts) std::printf(" tok/s @%d |", ctx);
    for (int ctx : contexts) std::printf(" vs fp16 @%d |", ctx);
    std::printf("\n|---|");
    for (size_t i = 0; i < 2 * contexts.size(); ++i) std::printf("---|");
    std::printf("\n");
    std::vector<ModeRun> runs;
    const int rounded_steps = (steps + 3) / 4 * 4;
    for (const std::string& mode : xq::bench::split_commas(modes)) {
      xq::EngineOptions options;
      options.threads = threads;
      options.cache_mode = mode;
      options.max_tokens = contexts.back() + rounded_steps + 1;  // + the warm-up step
      ModeRun run;
      run.mode = mode;
      run.engine = std::make_unique<xq::TransformerEngine>(*model, options);
      run.logits.resize(model->config().vocab_size);
      runs.push_back(std::move(run));
    }
    measure(*model, runs, contexts, steps);
    const std::vector<double>* fp16 = nullptr;
    for (const ModeRun& run : runs)
      if (run.mode == "fp16") fp16 = &run.speeds;
    for (const ModeRun& run : runs) {
      std::printf("| %s |", run.mode.c_str());
      for (double s : run.speeds) std::printf(" %.1f |", s);
      for (size_t i = 0; i < run.speeds.size(); ++i) {
        if (!fp16)
          std::printf(" - |");
        else
          std::printf(" %.2fx |", run.speeds[i] / (*fp16)[i]);
      }
      std::printf("\n");
    }
  } catch (const xq::Error& e) {
    std::fprintf(stderr, "bench_decode: %s\n", e.what());
    return 1;
  }
  return 0;
}
