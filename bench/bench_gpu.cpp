// The resident CUDA engine on one GPU, against the device's peaks:
//  1. decode tokens/s of CudaEngine for each cache mode, context and batch:
//     every sequence's cache holds the context as zeros
//     (CudaEngine::fill_with_zeros: the same bytes read and rebuilt as real
//     ones, without a prefill), then N greedy decode steps are timed
//     (two warm-up steps first: a row count's first step runs kernel by
//     kernel and its second is captured as a CUDA graph; the timed steps
//     replay it). Fewer steps at long contexts. A point is the median
//     step; tokens/s = batch / that.
//  2. cuda::matmul on each weight shape of a layer and the output head, at
//     1 and 16 rows: achieved GB/s (weight bytes + activations in and out)
//     and TFLOP/s (2 rows cols n) against cuda::device_info's peaks.
//  3. DeviceCache::run_layer of one decode row per sequence (batch 16) per
//     mode and context, its cache filled with synthetic rows (random layer
//     inputs, no model forward): GB/s from the mode's bytes per token x
//     context x batch (one layer's share), TFLOP/s from the attention and
//     rebuild formulas (decode_flops below).
// Prints markdown tables; --json FILE writes every number. A mode or weight
// type the device does not support is reported as such, not a crash.
//
//   build/bench/bench_gpu [--model M] [--modes fp16,kivi-4,xquant-4,xquant-cl-3]
//       [--contexts 1024,4096,16384,32768] [--batches 1,16] [--steps 32]
//       [--device 0] [--json FILE] [--skip-engine] [--skip-kernels]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "kernels/cpu/ops.h"
#include "kernels/cuda/dense_ops.h"
#include "kernels/cuda/device.h"
#include "kernels/error.h"
#include "runtime/cuda_engine.h"
#include "runtime/device_cache.h"
#include "runtime/engine.h"
#include "runtime/model.h"

namespace {

using Clock = std::chrono::steady_clock;

double median(std::vector<double> values) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

// Steps timed at a context: 32 at 1K, fewer as each step reads more, at least 4.
int steps_at(int context, int steps) {
  return std::max(4,
                  static_cast<int>(static_cast<int64_t>(steps) * 1024 / std::max(1024, context)));
}

std::string json_text(const std::string& s) {
  std::string out = "\"";
  for (char ch : s) {
    if (ch == '"' || ch == '\\') out += '\\';
    if (static_cast<unsigned char>(ch) < 0x20) {
      out += ' ';
      continue;
    }
    out += ch;
  }
  return out + "\"";
}

// FLOPs of one decode row's attention over `context` cached tokens in one
// layer, by the formulas the kernels are written to (docs/xquant-spec.md, 4;
// one multiply-add = 2 FLOPs):
//   every mode:   Q K^T and the weighted sum of V, 2 x context x head_dim per
//                 query head each;
//   xquant (GQA): K rebuilt from its latent, 2 x context x latent width x
//                 head_dim per KV head (latent width head_dim with one SVD
//                 per KV head, kv_dim with one of the whole Wk); V is never
//                 rebuilt (the weighted sum runs over the latent, which has
//                 head_dim channels per head: no extra cost);
//   xquant (MHA): K rebuilt from X, 2 x context x dim x head_dim per head;
//                 the weighted sum runs over X (dim channels, not head_dim);
//   xquant-cl:    X reconstructed from the accumulator (GQA: the 2 kv_dim
//                 latent times U^T, 2 x context x 2 kv_dim x dim), then as MHA.
double decode_flops(const xq::ModelConfig& c, const std::string& mode, int64_t context,
                    bool k_latent_per_head) {
  const double t = static_cast<double>(context);
  const double hd = c.head_dim, heads = c.n_heads, kv_heads = c.n_kv_heads;
  const double dim = c.dim, kv_dim = c.kv_dim();
  const bool gqa = c.n_kv_heads < c.n_heads;
  double flops = 2 * t * hd * heads * 2;  // Q K^T and weights x V
  if (mode.rfind("xquant-cl", 0) == 0) {
    if (gqa) flops += 2 * t * 2 * kv_dim * dim;
    flops += 2 * t * dim * hd * kv_heads + 2 * t * (dim - hd) * heads;
  } else if (mode.rfind("xquant", 0) == 0) {
    if (gqa)
      flops += 2 * t * (k_latent_per_head ? hd : kv_dim) * hd * kv_heads;
    else
      flops += 2 * t * dim * hd * kv_heads + 2 * t * (dim - hd) * heads;
  }
  return flops;
}

struct DecodePoint {
  std::string mode;
  int context = 0, batch = 0, steps = 0;
  double tokens_per_second = 0;
  std::string note;  // "unsupported: ..." where it did not run
};

struct KernelPoint {
  std::string kernel, shape;
  double seconds = 0, bytes = 0, flops = 0;
  std::string note;
};

// 1. Decode tokens/s of the resident engine.
std::vector<DecodePoint> measure_decode(const xq::Model& model,
                                        const std::vector<std::string>& modes,
                                        const std::vector<int>& contexts,
                                        const std::vector<int>& batches, int steps, int device) {
  const xq::ModelConfig& c = model.config();
  const int max_batch = *std::max_element(batches.begin(), batches.end());
  const int max_context = contexts.back();
  std::vector<DecodePoint> points;
  // Room past the longest context for the warm-up and timed decode steps.
  const int decode_room = steps + 64;
  std::vector<int32_t> tokens(static_cast<size_t>(max_context) + decode_room);
  for (size_t i = 0; i < tokens.size(); ++i)
    tokens[i] = static_cast<int32_t>((i * 7919 + 13) % c.vocab_size);
  for (const std::string& mode : modes) {
    xq::EngineOptions options;
    options.cache_mode = mode;
    options.sequences = max_batch;
    options.max_tokens = max_context + decode_room;
    options.cache_bytes = 0;  // room for every sequence at the longest context
    // The fp16 cache is the largest of these modes: it bounds the pool.
    const double fp16_bytes = static_cast<double>(options.sequences) * options.max_tokens * 2.0 *
                              c.kv_dim() * 2.0 * c.n_layers;
    size_t free_bytes = 0, total_bytes = 0;
    xq::cuda::memory_info(&free_bytes, &total_bytes);
    std::fprintf(stderr, "%s: pool for %d x %d tokens, at most %.1f GiB (free %.1f GiB)\n",
                 mode.c_str(), options.sequences, options.max_tokens, fp16_bytes / (1 << 30),
                 free_bytes / double(1 << 30));
    std::unique_ptr<xq::CudaEngine> engine;
    try {
      if (fp16_bytes > 0.9 * static_cast<double>(free_bytes))
        throw xq::Error("the pool would not fit in the device's free memory");
      engine = std::make_unique<xq::CudaEngine>(model, options, device);
    } catch (const std::exception& e) {
      for (int context : contexts)
        for (int batch : batches)
          points.push_back({mode, context, batch, 0, 0, std::string("unsupported: ") + e.what()});
      continue;
    }
    std::vector<float> logits(static_cast<size_t>(max_batch) * c.vocab_size);
    for (int context : contexts) {
      // The context as zeros in every sequence's cache: decode reads and
      // rebuilds the same bytes whatever they hold, and a real prefill of
      // 16 x 32K tokens through the materializing modes would take longer
      // than the whole check may.
      for (int s = 0; s < max_batch; ++s) engine->fill_with_zeros(s, context);
      for (int batch : batches) {
        const int timed = steps_at(context, steps);
        std::vector<double> seconds;
        // Steps 0 and 1 are warm-up: a row count's first step runs kernel by
        // kernel, its second is captured as a graph, later ones replay it.
        constexpr int kWarmup = 2;
        for (int step = 0; step < kWarmup + timed; ++step) {
          std::vector<xq::Segment> segments;
          for (int s = 0; s < batch; ++s)
            segments.push_back({s, context + step, tokens.data() + context + step, 1, true});
          const auto start = Clock::now();
          engine->forward_batch(segments, logits.data());
          if (step >= kWarmup)
            seconds.push_back(std::chrono::duration<double>(Clock::now() - start).count());
        }
        for (int s = 0; s < batch; ++s) engine->truncate(s, context);
        const double step_seconds = median(seconds);
        points.push_back(
            {mode, context, batch, timed, step_seconds > 0 ? batch / step_seconds : 0, ""});
        std::fprintf(stderr, "  %s ctx %d batch %d: %.1f tokens/s\n", mode.c_str(), context, batch,
                     points.back().tokens_per_second);
      }
    }
    std::fprintf(stderr, "  %s\n", engine->device_summary().c_str());
  }
  return points;
}

// 2. cuda::matmul on each weight shape of layer 0 and the head.
std::vector<KernelPoint> measure_matmul(const xq::Model& model, xq::cuda::Stream& stream,
                                        xq::cuda::Blas& blas) {
  std::vector<KernelPoint> points;
  const xq::LayerWeights& l = model.layers().front();
  const std::vector<std::pair<std::string, const xq::WeightMatrix*>> weights = {
      {"wq", &l.wq},         {"wk", &l.wk},     {"wv", &l.wv},         {"wo", &l.wo},
      {"w_gate", &l.w_gate}, {"w_up", &l.w_up}, {"w_down", &l.w_down}, {"output", &model.output()}};
  for (const auto& [name, w] : weights) {
    for (int64_t n : {int64_t{1}, int64_t{16}}) {
      KernelPoint p;
      p.kernel = "matmul " + name;
      p.shape = std::to_string(w->rows) + " x " + std::to_string(w->cols) + " " +
                xq::tensor_type_name(w->type) + ", n " + std::to_string(n);
      if (!xq::cuda::device_supports(w->type)) {
        p.note = "unsupported weight type";
        points.push_back(p);
        continue;
      }
      try {
        xq::cuda::DeviceMemory weight(xq::cuda::device_weight_bytes(*w));
        const xq::cuda::DeviceWeight dw = xq::cuda::upload_weight(*w, weight.data(), stream);
        const size_t workspace_bytes = xq::cuda::matmul_workspace_bytes(dw, n);
        xq::cuda::DeviceMemory workspace(std::max<size_t>(workspace_bytes, 1));
        xq::cuda::DeviceMemory x(static_cast<size_t>(n * w->cols) * sizeof(float));
        xq::cuda::DeviceMemory y(static_cast<size_t>(n * w->rows) * sizeof(float));
        std::vector<float> host_x(static_cast<size_t>(n * w->cols));
        std::mt19937 rng(7);
        std::normal_distribution<float> normal(0.0f, 1.0f);
        for (float& v : host_x) v = normal(rng);
        xq::cuda::copy_to_device(x.data(), host_x.data(), host_x.size() * sizeof(float), stream);
        constexpr int kRepeats = 50;
        xq::cuda::matmul(dw, x.as<float>(), n, y.as<float>(), workspace.data(), workspace_bytes,
                         blas, stream);  // warm-up
        xq::cuda::EventTimer timer;
        timer.start(stream);
        for (int r = 0; r < kRepeats; ++r)
          xq::cuda::matmul(dw, x.as<float>(), n, y.as<float>(), workspace.data(), workspace_bytes,
                           blas, stream);
        timer.stop(stream);
        p.seconds = timer.milliseconds() / 1e3 / kRepeats;
        p.bytes = static_cast<double>(dw.bytes()) + 4.0 * n * (w->cols + w->rows);
        p.flops = 2.0 * w->rows * w->cols * n;
      } catch (const std::exception& e) {
        p.note = std::string("failed: ") + e.what();
      }
      points.push_back(p);
    }
  }
  return points;
}

// 3. DeviceCache::run_layer of one decode row per sequence, per mode and context.
std::vector<KernelPoint> measure_run_layer(const xq::Model& model,
                                           const std::vector<std::string>& modes,
                                           const std::vector<int>& contexts, int batch,
                                           xq::cuda::Stream& stream, xq::cuda::Blas& blas) {
  const xq::ModelConfig& c = model.config();
  std::vector<KernelPoint> points;
  const int max_context = contexts.back();
  std::vector<float> rope(static_cast<size_t>(max_context + 1) * c.rope_dim);
  xq::cpu::rope_table(rope.data(), max_context + 1, c.rope_dim, c.rope_theta);
  // Synthetic layer inputs: chunks of `chunk` rows per sequence at a time.
  constexpr int kChunk = 1024;
  const size_t rows = static_cast<size_t>(kChunk) * batch;
  xq::cuda::DeviceMemory x(rows * c.dim * sizeof(float)), k(rows * c.kv_dim() * sizeof(float)),
      v(rows * c.kv_dim() * sizeof(float)), q(rows * c.q_dim() * sizeof(float)),
      out(rows * c.q_dim() * sizeof(float));
  {
    std::vector<float> host(rows * std::max(c.dim, c.q_dim()));
    std::mt19937 rng(11);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (float& value : host) value = normal(rng);
    xq::cuda::copy_to_device(x.data(), host.data(), rows * c.dim * sizeof(float), stream);
    xq::cuda::copy_to_device(k.data(), host.data(), rows * c.kv_dim() * sizeof(float), stream);
    xq::cuda::copy_to_device(v.data(), host.data(), rows * c.kv_dim() * sizeof(float), stream);
    xq::cuda::copy_to_device(q.data(), host.data(), rows * c.q_dim() * sizeof(float), stream);
    stream.synchronize();
  }
  for (const std::string& mode : modes) {
    // XQuant-CL's delta layers need the chain from the base: layer 3 is the
    // first delta after the paper's base (layer 2); the others time layer 0.
    const int32_t timed_layer = mode.rfind("xquant-cl", 0) == 0 ? std::min(3, c.n_layers - 1) : 0;
    xq::CacheOptions options;
    options.mode = mode;
    options.max_tokens = max_context + 1;
    options.sequences = batch;
    options.rope_cos_sin = rope.data();
    std::unique_ptr<xq::DeviceCache> cache;
    try {
      cache = xq::make_device_cache(model, options, stream, blas);
    } catch (const std::exception& e) {
      for (int context : contexts)
        points.push_back({"run_layer " + mode, "ctx " + std::to_string(context), 0, 0, 0,
                          std::string("unsupported: ") + e.what()});
      continue;
    }
    int filled = 0;
    for (int context : contexts) {
      KernelPoint p;
      p.kernel = "run_layer " + mode;
      p.shape = "ctx " + std::to_string(context) + ", batch " + std::to_string(batch) + ", layer " +
                std::to_string(timed_layer);
      try {
        while (filled < context) {
          const int n = std::min(kChunk, context - filled);
          std::vector<xq::StepRows> step;
          for (int s = 0; s < batch; ++s) step.push_back({s, filled, n});
          cache->begin_step(step);
          for (int32_t layer = 0; layer <= timed_layer; ++layer)
            cache->run_layer(layer, x.as<float>(), k.as<float>(), v.as<float>(), q.as<float>(),
                             out.as<float>());
          cache->end_step();
          filled += n;
        }
        std::vector<xq::StepRows> step;
        for (int s = 0; s < batch; ++s) step.push_back({s, context, 1});
        cache->begin_step(step);
        for (int32_t layer = 0; layer < timed_layer; ++layer)
          cache->run_layer(layer, x.as<float>(), k.as<float>(), v.as<float>(), q.as<float>(),
                           out.as<float>());
        // The same row rewritten and attended again: each repeat does the
        // step's whole work for this layer.
        const int repeats = std::max(5, 200 * 1024 / context);
        cache->run_layer(timed_layer, x.as<float>(), k.as<float>(), v.as<float>(), q.as<float>(),
                         out.as<float>());  // warm-up
        xq::cuda::EventTimer timer;
        timer.start(stream);
        for (int r = 0; r < repeats; ++r)
          cache->run_layer(timed_layer, x.as<float>(), k.as<float>(), v.as<float>(), q.as<float>(),
                           out.as<float>());
        timer.stop(stream);
        p.seconds = timer.milliseconds() / 1e3 / repeats;
        cache->end_step();
        cache->truncate(0, context);
        for (int s = 1; s < batch; ++s) cache->truncate(s, context);
        p.bytes = cache->bytes_per_token() / c.n_layers * context * batch;
        p.flops = decode_flops(c, mode, context, options.k_latent_per_head) * batch;
      } catch (const std::exception& e) {
        p.note = std::string("failed: ") + e.what();
      }
      points.push_back(p);
    }
  }
  return points;
}

}  // namespace

int main(int argc, char** argv) {
  std::string model_path = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
  std::string modes_text = "fp16,kivi-4,xquant-4,xquant-cl-3";
  std::string contexts_text = "1024,4096,16384,32768", batches_text = "1,16", json_path;
  int steps = 32, device = 0;
  bool run_engine = true, run_kernels = true;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", arg.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (arg == "--model")
      model_path = value();
    else if (arg == "--modes")
      modes_text = value();
    else if (arg == "--contexts")
      contexts_text = value();
    else if (arg == "--batches")
      batches_text = value();
    else if (arg == "--steps")
      steps = std::atoi(value().c_str());
    else if (arg == "--device")
      device = std::atoi(value().c_str());
    else if (arg == "--json")
      json_path = value();
    else if (arg == "--skip-engine")
      run_engine = false;
    else if (arg == "--skip-kernels")
      run_kernels = false;
    else {
      std::fprintf(stderr, "unknown option %s (see the comment at the top of bench_gpu.cpp)\n",
                   arg.c_str());
      return 2;
    }
  }
  try {
    std::string why_not;
    if (!xq::cuda::device_available(&why_not)) {
      std::fprintf(stderr, "bench_gpu: no CUDA device: %s\n", why_not.c_str());
      return 77;
    }
    const std::vector<std::string> modes = xq::bench::split_commas(modes_text);
    std::vector<int> contexts, batches;
    for (const std::string& s : xq::bench::split_commas(contexts_text))
      contexts.push_back(std::stoi(s));
    for (const std::string& s : xq::bench::split_commas(batches_text))
      batches.push_back(std::stoi(s));
    std::sort(contexts.begin(), contexts.end());
    if (modes.empty() || contexts.empty() || batches.empty() || steps < 1)
      throw xq::Error("want at least one mode, context, batch and step");
    xq::cuda::set_device(device);
    const xq::cuda::DeviceInfo info = xq::cuda::device_info(device);
    auto model = xq::Model::load(model_path);
    std::printf("## bench_gpu: %s\n\n", model_path.c_str());
    std::printf(
        "Device %d: %s (sm_%d%d, %d SMs, %.0f GiB); peaks %.0f GB/s, %.0f fp16 TFLOP/s "
        "(from the device's attributes)\n\n",
        info.index, info.name.c_str(), info.compute_major, info.compute_minor, info.multiprocessors,
        info.memory_bytes / double(1 << 30), info.peak_memory_gbps, info.peak_fp16_tflops);

    std::vector<DecodePoint> decode;
    if (run_engine) decode = measure_decode(*model, modes, contexts, batches, steps, device);
    std::vector<KernelPoint> kernels;
    if (run_kernels) {
      xq::cuda::Stream stream;
      xq::cuda::Blas blas(stream);
      kernels = measure_matmul(*model, stream, blas);
      const std::vector<KernelPoint> layers = measure_run_layer(
          *model, modes, contexts, *std::max_element(batches.begin(), batches.end()), stream, blas);
      kernels.insert(kernels.end(), layers.begin(), layers.end());
    }

    if (!decode.empty()) {
      std::printf("### Decode tokens/s (median step; CUDA graphs on)\n\n| mode | context |");
      for (int b : batches) std::printf(" batch %d |", b);
      std::printf("\n|---|---:|");
      for (size_t b = 0; b < batches.size(); ++b) std::printf("---:|");
      std::printf("\n");
      for (const std::string& mode : modes)
        for (int context : contexts) {
          std::printf("| %s | %d |", mode.c_str(), context);
          for (int b : batches)
            for (const DecodePoint& p : decode)
              if (p.mode == mode && p.context == context && p.batch == b) {
                if (p.note.empty())
                  std::printf(" %.1f |", p.tokens_per_second);
                else
                  std::printf(" %s |", p.note.substr(0, 60).c_str());
              }
          std::printf("\n");
        }
      std::printf("\n");
    }
    if (!kernels.empty()) {
      std::printf(
          "### Kernels against the peaks\n\n| kernel | shape | us | GB/s | %% of %.0f | "
          "TFLOP/s | %% of %.0f |\n|---|---|---:|---:|---:|---:|---:|\n",
          info.peak_memory_gbps, info.peak_fp16_tflops);
      for (const KernelPoint& p : kernels) {
        if (!p.note.empty() || p.seconds <= 0) {
          std::printf("| %s | %s | %s | | | | |\n", p.kernel.c_str(), p.shape.c_str(),
                      p.note.substr(0, 80).c_str());
          continue;
        }
        const double gbps = p.bytes / p.seconds / 1e9, tflops = p.flops / p.seconds / 1e12;
        std::printf("| %s | %s | %.1f | %.0f | %.0f%% | %.2f | %.1f%% |\n", p.kernel.c_str(),
                    p.shape.c_str(), p.seconds * 1e6, gbps, 100 * gbps / info.peak_memory_gbps,
                    tflops, 100 * tflops / info.peak_fp16_tflops);
      }
      std::printf("\n");
    }
    std::printf("Command: bench_gpu --model %s --modes %s --contexts %s --batches %s --steps %d\n",
                model_path.c_str(), modes_text.c_str(), contexts_text.c_str(), batches_text.c_str(),
                steps);

    if (!json_path.empty()) {
      std::ostringstream json;
      json << "{\"device\": {\"name\": " << json_text(info.name) << ", \"compute_capability\": \""
           << info.compute_major << "." << info.compute_minor
           << "\", \"peak_memory_gbps\": " << info.peak_memory_gbps
           << ", \"peak_fp16_tflops\": " << info.peak_fp16_tflops
           << "}, \"model\": " << json_text(model_path) << ", \"decode\": [";
      for (size_t i = 0; i < decode.size(); ++i) {
        const DecodePoint& p = decode[i];
        json << (i ? ", " : "") << "{\"mode\": " << json_text(p.mode)
             << ", \"context\": " << p.context << ", \"batch\": " << p.batch
             << ", \"steps\": " << p.steps << ", \"tokens_per_second\": " << p.tokens_per_second
             << ", \"note\": " << json_text(p.note) << "}";
      }
      json << "], \"kernels\": [";
      for (size_t i = 0; i < kernels.size(); ++i) {
        const KernelPoint& p = kernels[i];
        const double gbps = p.seconds > 0 ? p.bytes / p.seconds / 1e9 : 0;
        const double tflops = p.seconds > 0 ? p.flops / p.seconds / 1e12 : 0;
        json << (i ? ", " : "") << "{\"kernel\": " << json_text(p.kernel)
             << ", \"shape\": " << json_text(p.shape) << ", \"seconds\": " << p.seconds
             << ", \"bytes\": " << p.bytes << ", \"flops\": " << p.flops << ", \"gbps\": " << gbps
             << ", \"tflops\": " << tflops << ", \"note\": " << json_text(p.note) << "}";
      }
      json << "]}\n";
      std::ofstream out(json_path);
      out << json.str();
      if (!out) throw xq::Error(json_path + ": cannot write");
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_gpu: %s\n", e.what());
    return 1;
  }
  return 0;
}
