// Why decode's logits differ from the fp32 prefill's for the same tokens, and
// by how much, on a model whose weights take the int8-activation dot path
// (SmolLM2 Q4_1): the same token sequence is run several ways, switching
// cpu::matmul's path (kernels/cpu/matmul.h), and each step's logits are
// compared (largest |difference| over the vocabulary):
//   prefill   one fp32 forward pass over all tokens (the reference);
//   decode    the prompt prefilled, then one token at a time (int8 x);
//   decode-f  the same with the fp32 GEMM for the single rows (no rounding);
//   prefill-r the prompt prefilled, the rest in one batch with x rounded as
//             the int8 path rounds it, in fp32 arithmetic;
//   decode-r  one token at a time with that rounding, in fp32 arithmetic.
// decode-f vs prefill: everything but the activation rounding (single-row
// attention, the cache, the GEMM with one row). prefill-r vs prefill: the
// rounding alone. decode vs decode-r: the same rounding, integer vs fp32
// arithmetic, i.e. how far a rounding-level difference carries.
//
//   build/bench/bench_decode_noise [--model M] [--prompt P] [--steps 16] [--threads 1]
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/cpu/matmul.h"
#include "kernels/error.h"
#include "runtime/engine.h"
#include "runtime/model.h"
#include "runtime/sampler.h"

namespace {

using xq::cpu::MatmulPath;

float max_abs_diff(const float* a, const float* b, int32_t n) {
  float worst = 0;
  for (int32_t i = 0; i < n; ++i) worst = std::max(worst, std::abs(a[i] - b[i]));
  return worst;
}

struct Run {
  const xq::Model& model;
  xq::EngineOptions options;
  std::vector<int32_t> tokens;  // prompt, then the decoded ones
  int32_t prompt = 0;

  // Logits after each token from position prompt - 1 on, (steps + 1) rows:
  // the prompt prefilled with the default path, then the rest as `rest`
  // (one token at a time, or one batch) with `path`.
  std::vector<float> rows(MatmulPath path, bool one_batch) const {
    const int32_t vocab = model.config().vocab_size;
    const int32_t n = static_cast<int32_t>(tokens.size());
    std::vector<float> out(static_cast<size_t>(n - prompt + 1) * vocab);
    xq::TransformerEngine engine(model, options);
    xq::cpu::set_matmul_path(MatmulPath::kAuto);
    engine.forward(0, tokens.data(), prompt, 0, out.data(), prompt - 1);
    xq::cpu::set_matmul_path(path);
    if (one_batch) {
      engine.forward(0, tokens.data() + prompt, n - prompt, prompt, out.data() + vocab, 0);
    } else {
      for (int32_t p = prompt; p < n; ++p)
        engine.forward(0, &tokens[p], 1, p,
                       out.data() + static_cast<size_t>(p - prompt + 1) * vocab, 0);
    }
    xq::cpu::set_matmul_path(MatmulPath::kAuto);
    return out;
  }
};

}  // namespace

int main(int argc, char** argv) {
  std::string model_path = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
  std::string prompt_text = "The capital of France is a city where";
  int steps = 16, threads = 1;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string arg = argv[i];
    if (arg == "--model") {
      model_path = argv[i + 1];
    } else if (arg == "--prompt") {
      prompt_text = argv[i + 1];
    } else if (arg == "--steps") {
      steps = std::atoi(argv[i + 1]);
    } else if (arg == "--threads") {
      threads = std::atoi(argv[i + 1]);
    } else {
      std::fprintf(stderr, "unknown option %s\n", argv[i]);
      return 2;
    }
  }
  try {
    auto model = xq::Model::load(model_path);
    const int32_t vocab = model->config().vocab_size;
    const xq::LayerWeights& l0 = model->layers()[0];
    std::printf("%s: embedding %s, output %s, layer 0 q/k/v/o %s/%s/%s/%s, gate/up/down %s/%s/%s\n",
                model_path.c_str(), xq::tensor_type_name(model->token_embedding().type),
                xq::tensor_type_name(model->output().type), xq::tensor_type_name(l0.wq.type),
                xq::tensor_type_name(l0.wk.type), xq::tensor_type_name(l0.wv.type),
                xq::tensor_type_name(l0.wo.type), xq::tensor_type_name(l0.w_gate.type),
                xq::tensor_type_name(l0.w_up.type), xq::tensor_type_name(l0.w_down.type));
    Run run{*model, {}, model->tokenizer().encode(prompt_text, true), 0};
    run.prompt = static_cast<int32_t>(run.tokens.size());
    run.options.threads = threads;
    run.options.max_tokens = run.prompt + steps + 1;
    {  // The tokens: greedy decode with the default path.
      xq::TransformerEngine engine(*model, run.options);
      std::vector<float> logits(vocab);
      engine.forward(0, run.tokens.data(), run.prompt, 0, logits.data(), run.prompt - 1);
      for (int s = 0; s < steps; ++s) {
        const int32_t next = xq::argmax(logits.data(), vocab);
        engine.forward(0, &next, 1, static_cast<int32_t>(run.tokens.size()), logits.data(), 0);
        run.tokens.push_back(next);
      }
    }
    // The reference: every row in one fp32 prefill.
    const int32_t n = static_cast<int32_t>(run.tokens.size());
    std::vector<float> prefill(static_cast<size_t>(steps + 1) * vocab);
    {
      xq::TransformerEngine engine(*model, run.options);
      engine.forward(0, run.tokens.data(), n, 0, prefill.data(), run.prompt - 1);
    }
    const std::vector<float> decode = run.rows(MatmulPath::kAuto, false);
    const std::vector<float> decode_f = run.rows(MatmulPath::kFloat, false);
    const std::vector<float> prefill_r = run.rows(MatmulPath::kFloatRoundedAsQ8, true);
    const std::vector<float> decode_r = run.rows(MatmulPath::kFloatRoundedAsQ8, false);
    std::printf(
        "prompt %d tokens, %d steps; largest |logit difference| per step (row 0: the prompt's "
        "last, same prefill in every run)\n",
        run.prompt, steps);
    std::printf("%4s %8s | %10s %10s %10s | %10s %10s %10s\n", "step", "margin", "dec-pre",
                "decf-pre", "prer-pre", "dec-decr", "dec-prer", "decr-prer");
    float worst[6] = {};
    for (int s = 0; s <= steps; ++s) {
      const size_t at = static_cast<size_t>(s) * vocab;
      const float d[6] = {max_abs_diff(&decode[at], &prefill[at], vocab),
                          max_abs_diff(&decode_f[at], &prefill[at], vocab),
                          max_abs_diff(&prefill_r[at], &prefill[at], vocab),
                          max_abs_diff(&decode[at], &decode_r[at], vocab),
                          max_abs_diff(&decode[at], &prefill_r[at], vocab),
                          max_abs_diff(&decode_r[at], &prefill_r[at], vocab)};
      for (int k = 0; k < 6; ++k) worst[k] = std::max(worst[k], d[k]);
      std::printf("%4d %8.4f | %10.3g %10.3g %10.3g | %10.3g %10.3g %10.3g\n", s,
                  xq::top2_margin(&prefill[at], vocab), d[0], d[1], d[2], d[3], d[4], d[5]);
    }
    std::printf("%4s %8s | %10.3g %10.3g %10.3g | %10.3g %10.3g %10.3g\n", "max", "", worst[0],
                worst[1], worst[2], worst[3], worst[4], worst[5]);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
