// A complete, loadable llama GGUF a few kilobytes long: a one-layer model over
// an eight-token SentencePiece vocabulary. Tests and fuzz seeds edit its
// fields (a dimension, a tensor's shape or type, a missing tensor) before
// build() to produce exactly one kind of corruption at a time.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "tests/gguf_writer.h"

namespace xq::testing {

class TinyLlamaGguf {
 public:
  struct Tensor {
    std::string name;
    std::vector<uint64_t> shape;  // shape[0] is the contiguous dimension, as GGUF stores it
    uint32_t type = 0;            // GGUF tensor type id; 0 is F32
    std::vector<uint8_t> bytes;
  };

  static inline const std::string kSpace = "\xE2\x96\x81";  // SentencePiece's U+2581
  static constexpr uint32_t kDim = 8, kLayers = 1, kHeads = 2, kFfn = 16, kContext = 64;

  // Metadata values written by build(); tests may make them absurd.
  uint32_t embedding_length = kDim;
  uint32_t block_count = kLayers;
  uint32_t head_count = kHeads;
  uint32_t feed_forward_length = kFfn;
  uint32_t context_length = kContext;
  std::vector<std::string> tokens = {"<unk>", "<s>", "</s>",       kSpace,
                                     "a",     "b",   kSpace + "a", kSpace + "b"};
  std::vector<Tensor> tensors;

  TinyLlamaGguf() {
    const uint64_t vocab = tokens.size();
    add_f32("token_embd.weight", {kDim, vocab});
    add_f32("output_norm.weight", {kDim}, 1.0f);
    for (uint32_t layer = 0; layer < kLayers; ++layer) {
      const std::string p = "blk." + std::to_string(layer) + ".";
      add_f32(p + "attn_norm.weight", {kDim}, 1.0f);
      add_f32(p + "attn_q.weight", {kDim, kDim});
      add_f32(p + "attn_k.weight", {kDim, kDim});
      add_f32(p + "attn_v.weight", {kDim, kDim});
      add_f32(p + "attn_output.weight", {kDim, kDim});
      add_f32(p + "ffn_norm.weight", {kDim}, 1.0f);
      add_f32(p + "ffn_gate.weight", {kDim, kFfn});
      add_f32(p + "ffn_up.weight", {kDim, kFfn});
      add_f32(p + "ffn_down.weight", {kFfn, kDim});
    }
  }

  Tensor* find(const std::string& name) {
    for (Tensor& t : tensors) {
      if (t.name == name) return &t;
    }
    return nullptr;
  }

  void remove(const std::string& name) {
    tensors.erase(std::remove_if(tensors.begin(), tensors.end(),
                                 [&](const Tensor& t) { return t.name == name; }),
                  tensors.end());
  }

  // Replaces a tensor's shape and resizes its F32 data to match.
  void reshape(const std::string& name, std::vector<uint64_t> shape) {
    Tensor* t = find(name);
    uint64_t elements = 1;
    for (uint64_t d : shape) elements *= d;
    t->shape = std::move(shape);
    t->bytes.assign(elements * sizeof(float), 0);
  }

  std::vector<uint8_t> build() const {
    GgufWriter w;
    w.add_string("general.architecture", "llama");
    w.add_string("general.name", "tiny test llama");
    w.add_uint32("llama.embedding_length", embedding_length);
    w.add_uint32("llama.block_count", block_count);
    w.add_uint32("llama.attention.head_count", head_count);
    w.add_uint32("llama.attention.head_count_kv", head_count);
    w.add_uint32("llama.feed_forward_length", feed_forward_length);
    w.add_uint32("llama.context_length", context_length);
    w.add_float32("llama.rope.freq_base", 10000.0f);
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5f);
    w.add_string("tokenizer.ggml.model", "llama");
    w.add_string_array("tokenizer.ggml.tokens", tokens);
    // Merges are ranked by score: "▁a" and "▁b" beat their parts.
    std::vector<float> scores(tokens.size(), -10.0f);
    std::vector<int32_t> types(tokens.size(), 1);  // normal
    for (size_t i = 0; i < tokens.size(); ++i) {
      if (tokens[i].size() > 1 && tokens[i][0] != '<') scores[i] = -1.0f;
    }
    // Unknown (the byte fallback for every byte), then control: BOS and EOS.
    for (size_t i = 0; i < std::min<size_t>(tokens.size(), 3); ++i) types[i] = i == 0 ? 2 : 3;
    w.add_float32_array("tokenizer.ggml.scores", scores);
    w.add_int32_array("tokenizer.ggml.token_type", types);
    w.add_uint32("tokenizer.ggml.bos_token_id", 1);
    w.add_uint32("tokenizer.ggml.eos_token_id", 2);
    w.add_uint32("tokenizer.ggml.unknown_token_id", 0);
    for (const Tensor& t : tensors) w.add_tensor(t.name, t.shape, t.type, t.bytes);
    return w.build();
  }

 private:
  // Weights follow a fixed smooth pattern so every build is identical;
  // `constant` (when given) fills the tensor instead, as norms want ones.
  void add_f32(const std::string& name, std::vector<uint64_t> shape, float constant = NAN) {
    uint64_t elements = 1;
    for (uint64_t d : shape) elements *= d;
    std::vector<float> values(elements);
    for (uint64_t i = 0; i < elements; ++i) {
      values[i] = std::isnan(constant)
                      ? 0.1f * std::sin(0.7f * static_cast<float>(i + tensors.size()))
                      : constant;
    }
    Tensor t{name, std::move(shape), 0, std::vector<uint8_t>(elements * sizeof(float))};
    std::memcpy(t.bytes.data(), values.data(), t.bytes.size());
    tensors.push_back(std::move(t));
  }
};

}  // namespace xq::testing
