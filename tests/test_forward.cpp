// The engine's forward pass against a plain scalar reference written here from
// the Llama equations, reading the llama2.c checkpoint with its own reader:
// greedy tokens must match exactly, logits closely; and the engine must give
// the same logits whether tokens arrive in one prefill or one at a time.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <vector>

#include "kernels/error.h"
#include "runtime/engine.h"
#include "runtime/model.h"
#include "runtime/sampler.h"
#include "tests/test_util.h"

namespace xq {
namespace {

// A llama2.c forward pass in the plainest form: one token at a time, fp32
// weights, full-precision K/V history, no threads, no BLAS.
class ReferenceLlama {
 public:
  explicit ReferenceLlama(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    int32_t header[7];
    in.read(reinterpret_cast<char*>(header), sizeof(header));
    dim = header[0], hidden = header[1], layers = header[2], heads = header[3],
    kv_heads = header[4];
    vocab = std::abs(header[5]), seq_len = header[6];
    head_size = dim / heads;
    kv_dim = kv_heads * head_size;
    auto read = [&](size_t n) {
      std::vector<float> v(n);
      in.read(reinterpret_cast<char*>(v.data()), n * sizeof(float));
      return v;
    };
    embedding = read(size_t(vocab) * dim);
    rms_att = read(size_t(layers) * dim);
    wq = read(size_t(layers) * dim * dim);
    wk = read(size_t(layers) * dim * kv_dim);
    wv = read(size_t(layers) * dim * kv_dim);
    wo = read(size_t(layers) * dim * dim);
    rms_ffn = read(size_t(layers) * dim);
    w1 = read(size_t(layers) * hidden * dim);
    w2 = read(size_t(layers) * dim * hidden);
    w3 = read(size_t(layers) * hidden * dim);
    rms_final = read(dim);
    EXPECT_TRUE(in.good());
    key_cache.assign(size_t(layers) * seq_len * kv_dim, 0);
    value_cache.assign(size_t(layers) * seq_len * kv_dim, 0);
  }

  std::vector<float> step(int token, int pos) {
    std::vector<float> x(embedding.begin() + size_t(token) * dim,
                         embedding.begin() + size_t(token + 1) * dim);
    std::vector<float> xb(dim), q(dim), att(seq_len), out(dim), h1(hidden), h3(hidden);
    for (int l = 0; l < layers; ++l) {
      rmsnorm(xb, x, &rms_att[size_t(l) * dim]);
      float* kc = &key_cache[(size_t(l) * seq_len + pos) * kv_dim];
      float* vc = &value_cache[(size_t(l) * seq_len + pos) * kv_dim];
      matvec(q.data(), xb.data(), &wq[size_t(l) * dim * dim], dim, dim);
      matvec(kc, xb.data(), &wk[size_t(l) * dim * kv_dim], dim, kv_dim);
      matvec(vc, xb.data(), &wv[size_t(l) * dim * kv_dim], dim, kv_dim);
      for (int i = 0; i < dim; i += 2) {  // RoPE on adjacent pairs
        int pair = (i % head_size) / 2;
        double angle = pos * std::pow(10000.0, -2.0 * pair / head_size);
        float c = float(std::cos(angle)), s = float(std::sin(angle));
        float q0 = q[i], q1 = q[i + 1];
        q[i] = q0 * c - q1 * s;
        q[i + 1] = q0 * s + q1 * c;
        if (i < kv_dim) {
          float k0 = kc[i], k1 = kc[i + 1];
          kc[i] = k0 * c - k1 * s;
          kc[i + 1] = k0 * s + k1 * c;
        }
      }
      for (int h = 0; h < heads; ++h) {
        int g = h / (heads / kv_heads);
        double max_score = -1e30;
        for (int t = 0; t <= pos; ++t) {
          const float* k = &key_cache[(size_t(l) * seq_len + t) * kv_dim + g * head_size];
          double score = 0;
          for (int c = 0; c < head_size; ++c) score += double(q[h * head_size + c]) * k[c];
          att[t] = float(score / std::sqrt(double(head_size)));
          max_score = std::max(max_score, double(att[t]));
        }
        double sum = 0;
        for (int t = 0; t <= pos; ++t) sum += std::exp(att[t] - max_score);
        for (int c = 0; c < head_size; ++c) {
          double acc = 0;
          for (int t = 0; t <= pos; ++t)
            acc += std::exp(att[t] - max_score) / sum *
                   value_cache[(size_t(l) * seq_len + t) * kv_dim + g * head_size + c];
          xb[h * head_size + c] = float(acc);
        }
      }
      matvec(out.data(), xb.data(), &wo[size_t(l) * dim * dim], dim, dim);
      for (int i = 0; i < dim; ++i) x[i] += out[i];
      rmsnorm(xb, x, &rms_ffn[size_t(l) * dim]);
      matvec(h1.data(), xb.data(), &w1[size_t(l) * dim * hidden], dim, hidden);
      matvec(h3.data(), xb.data(), &w3[size_t(l) * dim * hidden], dim, hidden);
      for (int i = 0; i < hidden; ++i) h1[i] = h1[i] / (1.0f + std::exp(-h1[i])) * h3[i];
      matvec(out.data(), h1.data(), &w2[size_t(l) * dim * hidden], hidden, dim);
      for (int i = 0; i < dim; ++i) x[i] += out[i];
    }
    rmsnorm(xb, x, rms_final.data());
    std::vector<float> logits(vocab);
    matvec(logits.data(), xb.data(), embedding.data(), dim, vocab);
    return logits;
  }

  int dim, hidden, layers, heads, kv_heads, vocab, seq_len, head_size, kv_dim;

 private:
  void rmsnorm(std::vector<float>& out, const std::vector<float>& x, const float* weight) {
    double ss = 0;
    for (int i = 0; i < dim; ++i) ss += double(x[i]) * x[i];
    float scale = float(1.0 / std::sqrt(ss / dim + 1e-5));
    for (int i = 0; i < dim; ++i) out[i] = weight[i] * (scale * x[i]);
  }
  static void matvec(float* out, const float* x, const float* w, int n, int d) {
    for (int i = 0; i < d; ++i) {
      double acc = 0;
      for (int j = 0; j < n; ++j) acc += double(w[size_t(i) * n + j]) * x[j];
      out[i] = float(acc);
    }
  }
  std::vector<float> embedding, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final;
  std::vector<float> key_cache, value_cache;
};

std::string stories_path() {
  return testing::shared_path("models/stories260K.bin");
}

TEST(Forward, GreedyTokensMatchScalarReferenceOnStories260K) {
  auto model = Model::load(stories_path());
  ReferenceLlama reference(stories_path());
  std::vector<int32_t> prompt = model->tokenizer().encode("Once upon a time", true);
  ASSERT_GE(prompt.size(), 2u);
  EXPECT_EQ(prompt[0], 1);  // BOS

  EngineOptions options;
  options.threads = 2;
  options.max_tokens = 128;
  TransformerEngine engine(*model, options);
  const int vocab = model->config().vocab_size;
  std::vector<float> logits(vocab);
  const int32_t n = static_cast<int32_t>(prompt.size());
  engine.forward(0, prompt.data(), n, 0, logits.data(), n - 1);

  std::vector<float> ref_logits;
  for (int32_t i = 0; i < n; ++i) ref_logits = reference.step(prompt[i], i);

  std::vector<int32_t> engine_ids, reference_ids;
  float worst = 0;
  for (int step = 0; step < 32; ++step) {
    for (int v = 0; v < vocab; ++v) worst = std::max(worst, std::abs(logits[v] - ref_logits[v]));
    int32_t ours = argmax(logits.data(), vocab);
    int32_t theirs = argmax(ref_logits.data(), vocab);
    engine_ids.push_back(ours);
    reference_ids.push_back(theirs);
    int32_t pos = n + step;
    engine.forward(0, &ours, 1, pos, logits.data(), 0);
    ref_logits = reference.step(theirs, pos);
  }
  EXPECT_EQ(engine_ids, reference_ids);
  // The engine keeps K/V in fp16; the reference keeps fp32.
  EXPECT_LT(worst, 2e-2f) << "largest logit difference against the scalar reference";
  std::string text = model->tokenizer().decode(engine_ids);
  EXPECT_FALSE(text.empty());
}

TEST(Forward, PrefillEqualsTokenByTokenDecode) {
  auto model = Model::load(stories_path());
  const int vocab = model->config().vocab_size;
  std::vector<int32_t> tokens = model->tokenizer().encode(
      "Once upon a time, there was a little girl named Lily. She liked to play outside in the "
      "park.",
      true);
  const int32_t n = static_cast<int32_t>(tokens.size());
  ASSERT_GT(n, 20);  // more than the GEMM-attention threshold
  EngineOptions options;
  options.threads = 2;
  options.max_tokens = 256;
  TransformerEngine batched(*model, options), stepped(*model, options);
  std::vector<float> all(static_cast<size_t>(n) * vocab), one(vocab);
  batched.forward(0, tokens.data(), n, 0, all.data(), 0);
  float worst = 0;
  for (int32_t i = 0; i < n; ++i) {
    stepped.forward(0, &tokens[i], 1, i, one.data(), 0);
    for (int v = 0; v < vocab; ++v)
      worst = std::max(worst, std::abs(one[v] - all[size_t(i) * vocab + v]));
  }
  // Same math in another order (sgemm vs dot products): fp32 rounding only.
  EXPECT_LT(worst, 5e-3f);
  // Prefill of n - 1 then one decode step gives the last row of the full prefill.
  TransformerEngine split(*model, options);
  split.forward(0, tokens.data(), n - 1, 0, nullptr, n - 1);
  split.forward(0, &tokens[n - 1], 1, n - 1, one.data(), 0);
  for (int v = 0; v < vocab; ++v) EXPECT_NEAR(one[v], all[size_t(n - 1) * vocab + v], 5e-3f);
}

TEST(Forward, RejectsOutOfRangeTokensAndPositions) {
  auto model = Model::load(stories_path());
  EngineOptions options;
  options.max_tokens = 8;
  TransformerEngine engine(*model, options);
  int32_t bad = model->config().vocab_size;
  EXPECT_THROW(engine.forward(0, &bad, 1, 0, nullptr, 0), Error);
  int32_t good = 1;
  EXPECT_THROW(engine.forward(0, &good, 1, 8, nullptr, 0), Error);
}

}  // namespace
}  // namespace xq
