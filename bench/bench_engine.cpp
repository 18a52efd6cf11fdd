// Engine speed: prefill and decode tokens/s for each model at 1 and 2 threads,
// decode measured against this machine's memory bandwidth (a STREAM-style copy
// run here), and prefill GEMMs against OpenBLAS sgemm alone on the same shapes.
//
//   build/bench/bench_engine [--models a.gguf,b.bin] [--prefill 256] [--decode 64]
//
// For an fp32 model of SmolLM2's shapes (none is shipped), write one first:
//   python3 bench/gguf_to_f32.py models/SmolLM2-135M-Instruct.Q4_1.gguf
//       models/SmolLM2-135M-Instruct.F32.gguf
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/error.h"
#include "runtime/engine.h"
#include "runtime/model.h"

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// STREAM "copy": bytes read + bytes written per second, best of several runs,
// on a buffer far larger than the last-level cache.
double copy_bandwidth(int threads) {
  const size_t n = size_t{64} << 20;  // 64 Mi floats = 256 MiB per array
  std::vector<float> a(n, 1.0f), b(n, 0.0f);
  xq::cpu::set_thread_count(threads);
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    auto start = Clock::now();
    xq::cpu::parallel_for(
        static_cast<int64_t>(n),
        [&](int64_t begin, int64_t end) {
          std::memcpy(b.data() + begin, a.data() + begin, (end - begin) * sizeof(float));
        },
        1 << 20);
    double s = seconds_since(start);
    best = std::max(best, 2.0 * n * sizeof(float) / s);
  }
  if (b[n / 2] != 1.0f) std::printf("copy check failed\n");
  return best;
}

struct Speeds {
  double prefill_tps, decode_tps, decode_bytes_per_token;
};

Speeds measure(const xq::Model& model, int threads, int prefill_tokens, int decode_tokens) {
  const auto& c = model.config();
  xq::EngineOptions options;
  options.threads = threads;
  options.max_tokens = prefill_tokens + decode_tokens + 1;
  xq::TransformerEngine engine(model, options);
  std::vector<int32_t> tokens(prefill_tokens);
  for (int i = 0; i < prefill_tokens; ++i) tokens[i] = (i * 7919 + 13) % c.vocab_size;
  std::vector<float> logits(c.vocab_size);
  engine.forward(0, tokens.data(), prefill_tokens, 0, logits.data(),
                 prefill_tokens - 1);  // warm-up
  double best_prefill = 1e30;
  for (int rep = 0; rep < 2; ++rep) {
    engine.cache().truncate(0, 0);
    auto start = Clock::now();
    engine.forward(0, tokens.data(), prefill_tokens, 0, logits.data(), prefill_tokens - 1);
    best_prefill = std::min(best_prefill, seconds_since(start));
  }
  auto start = Clock::now();
  int32_t token = 1;
  for (int i = 0; i < decode_tokens; ++i) {
    engine.forward(0, &token, 1, prefill_tokens + i, logits.data(), 0);
    token = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  }
  double decode_s = seconds_since(start);
  // Each decode step reads every weight once and the cache of the tokens so far.
  double mean_context = prefill_tokens + decode_tokens / 2.0;
  double bytes =
      static_cast<double>(model.weight_bytes()) + engine.cache().bytes_per_token() * mean_context;
  return {prefill_tokens / best_prefill, decode_tokens / decode_s, bytes};
}

// Engine matmul against OpenBLAS sgemm alone on fp32 copies of the same
// weights, over one layer's shapes: time ratio, and GFLOP/s of each (2 n rows
// cols per matrix; for quantized weights "GFLOP/s-equivalent" of the int8 work).
struct GemmSpeed {
  double ratio, ours_gflops, sgemm_gflops;
};

GemmSpeed prefill_gemm_speed(const xq::Model& model, int threads, int n) {
  xq::cpu::set_thread_count(threads);
  const auto& layer = model.layers()[0];
  std::vector<xq::WeightMatrix> shapes = {layer.wq,     layer.wk,   layer.wv,    layer.wo,
                                          layer.w_gate, layer.w_up, layer.w_down};
  double ours = 0, reference = 0, flops = 0;
  for (const auto& w : shapes) {
    flops += 2.0 * n * static_cast<double>(w.rows) * static_cast<double>(w.cols);
    std::vector<float> x(static_cast<size_t>(n) * w.cols, 0.5f), y(static_cast<size_t>(n) * w.rows);
    std::vector<float> wf(static_cast<size_t>(w.rows) * w.cols);
    for (int64_t r = 0; r < w.rows; ++r) xq::cpu::matrix_row_to_float(w, r, wf.data() + r * w.cols);
    xq::cpu::matmul(w, x.data(), n, y.data());
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, w.rows, w.cols, 1, x.data(), w.cols,
                wf.data(), w.cols, 0, y.data(), w.rows);
    double best_ours = 1e30, best_ref = 1e30;
    for (int rep = 0; rep < 7; ++rep) {  // best of several: single runs of small GEMMs are noisy
      auto s = Clock::now();
      xq::cpu::matmul(w, x.data(), n, y.data());
      best_ours = std::min(best_ours, seconds_since(s));
      // The reference is OpenBLAS on its own, with its own threads.
      openblas_set_num_threads(threads);
      s = Clock::now();
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, w.rows, w.cols, 1, x.data(), w.cols,
                  wf.data(), w.cols, 0, y.data(), w.rows);
      best_ref = std::min(best_ref, seconds_since(s));
      openblas_set_num_threads(1);
    }
    ours += best_ours;
    reference += best_ref;
  }
  return {reference / ours, flops / ours / 1e9, flops / reference / 1e9};
}

}  // namespace

int main(int argc, char** argv) {
  // Defaults follow the set-up: $XQ_SHARED_DIR (or ../shared) and $XQ_MODELS_DIR (or models).
  const char* shared_env = std::getenv("XQ_SHARED_DIR");
  const char* models_env = std::getenv("XQ_MODELS_DIR");
  std::string models = std::string(shared_env ? shared_env : "../shared") +
                       "/models/stories260K.bin," + (models_env ? models_env : "models") +
                       "/SmolLM2-135M-Instruct.Q4_1.gguf";
  int prefill = 256, decode = 64;
  std::string command = argv[0];
  for (int i = 1; i < argc; ++i) {
    command += std::string(" ") + argv[i];
    std::string arg = argv[i];
    if (i + 1 < argc && arg == "--models")
      models = argv[++i], command += std::string(" ") + argv[i];
    else if (i + 1 < argc && arg == "--prefill")
      prefill = std::atoi(argv[++i]), command += std::string(" ") + argv[i];
    else if (i + 1 < argc && arg == "--decode")
      decode = std::atoi(argv[++i]), command += std::string(" ") + argv[i];
    else {
      std::fprintf(stderr, "usage: %s [--models a,b] [--prefill N] [--decode N]\n", argv[0]);
      return 2;
    }
  }
  std::printf("command: %s\n", command.c_str());
  double bandwidth[3] = {0, copy_bandwidth(1), copy_bandwidth(2)};
  std::printf("STREAM-style copy bandwidth: %.2f GB/s (1 thread), %.2f GB/s (2 threads)\n\n",
              bandwidth[1] / 1e9, bandwidth[2] / 1e9);
  std::printf(
      "| model | threads | prefill tok/s | decode tok/s | decode bytes/token | decode GB/s | of "
      "copy bandwidth | prefill GEMM vs sgemm | GEMM GFLOP/s (ours / sgemm) |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|\n");
  for (const std::string& path : xq::bench::split_commas(models)) {
    try {
      auto model = xq::Model::load(path);
      for (int threads : {1, 2}) {
        Speeds s = measure(*model, threads, prefill, decode);
        GemmSpeed gemm = prefill_gemm_speed(*model, threads, prefill);
        double achieved = s.decode_bytes_per_token * s.decode_tps;
        std::printf("| %s | %d | %.1f | %.1f | %.2f MB | %.2f | %.0f%% | %.0f%% | %.1f / %.1f |\n",
                    path.c_str(), threads, s.prefill_tps, s.decode_tps,
                    s.decode_bytes_per_token / 1e6, achieved / 1e9,
                    100.0 * achieved / bandwidth[threads], 100.0 * gemm.ratio, gemm.ours_gflops,
                    gemm.sgemm_gflops);
        std::fflush(stdout);
      }
    } catch (const xq::Error& e) {
      std::printf("| %s | skipped: %s |\n", path.c_str(), e.what());
    }
  }
  return 0;
}
