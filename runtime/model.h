// A loaded Llama-architecture model: its shape, its weights (used in place from
// the memory-mapped file) and its tokenizer. Read from GGUF or from a llama2.c
// checkpoint; both readers validate every dimension against the file.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/elementwise.h"
#include "kernels/tensor_type.h"
#include "runtime/gguf.h"
#include "runtime/mapped_file.h"
#include "runtime/tokenizer.h"

namespace xq {

struct ModelConfig {
  std::string architecture = "llama";
  int32_t dim = 0;  // residual width d
  int32_t n_layers = 0;
  int32_t n_heads = 0;
  int32_t n_kv_heads = 0;  // < n_heads: grouped-query attention
  int32_t head_dim = 0;
  int32_t ffn_dim = 0;
  int32_t vocab_size = 0;
  int32_t max_seq_len = 0;  // trained context length
  int32_t rope_dim = 0;     // channels of each head that RoPE rotates
  float rope_theta = 10000.0f;
  RopeLayout rope_layout = RopeLayout::kInterleaved;
  float rms_eps = 1e-5f;
  bool tied_output = false;  // output projection shares the token embedding

  int32_t q_dim() const { return n_heads * head_dim; }
  int32_t kv_dim() const { return n_kv_heads * head_dim; }
};

struct LayerWeights {
  const float* attn_norm = nullptr;   // (dim)
  WeightMatrix wq, wk, wv, wo;        // (q_dim, dim), (kv_dim, dim), (kv_dim, dim), (dim, q_dim)
  const float* ffn_norm = nullptr;    // (dim)
  WeightMatrix w_gate, w_up, w_down;  // (ffn, dim), (ffn, dim), (dim, ffn)
};

class Model {
 public:
  // Opens a GGUF file or a llama2.c checkpoint (told apart by the magic).
  // For llama2.c, `tokenizer_path` names tokenizer.bin; empty means
  // "tokenizer.bin" or "tok<vocab>.bin" beside the model.
  static std::unique_ptr<Model> load(const std::string& path,
                                     const std::string& tokenizer_path = "");

  const ModelConfig& config() const { return config_; }
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  const std::vector<LayerWeights>& layers() const { return layers_; }
  const WeightMatrix& token_embedding() const { return token_embedding_; }
  const float* output_norm() const { return output_norm_; }
  const WeightMatrix& output() const { return output_; }
  const std::string& path() const { return path_; }
  const std::string& format() const { return format_; }
  // The GGUF's tokenizer.chat_template (a Jinja text), "" where there is none.
  const std::string& chat_template() const { return chat_template_; }
  // Bytes of weights one decode step reads (all layers, the output head, one embedding row).
  size_t weight_bytes() const;

 private:
  void load_gguf(const std::string& path);
  void load_llama2c(const std::string& path, const std::string& tokenizer_path);
  // "" when every dimension is in range, else what is wrong (for an error message).
  std::string config_problem() const;

  std::string path_;
  std::string format_;
  std::string chat_template_;
  ModelConfig config_;
  std::unique_ptr<GgufFile> gguf_;
  MappedFile llama2c_map_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::vector<LayerWeights> layers_;
  WeightMatrix token_embedding_;
  const float* output_norm_ = nullptr;
  WeightMatrix output_;
};

}  // namespace xq
