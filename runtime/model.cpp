#include "runtime/model.h"

#include <cstring>
#include <filesystem>

#include "kernels/error.h"

namespace xq {
namespace {

constexpr int32_t kMaxDim = 1 << 16;
constexpr int32_t kMaxLayers = 1024;
constexpr int32_t kMaxVocab = 1 << 22;
constexpr int32_t kMaxContext = 1 << 22;

std::string describe(const ModelConfig& c) {
  return "dim " + std::to_string(c.dim) + ", layers " + std::to_string(c.n_layers) + ", heads " +
         std::to_string(c.n_heads) + "/" + std::to_string(c.n_kv_heads) + ", head_dim " +
         std::to_string(c.head_dim) + ", ffn " + std::to_string(c.ffn_dim) + ", vocab " +
         std::to_string(c.vocab_size);
}

bool in_range(int64_t v, int64_t lo, int64_t hi) {
  return v >= lo && v <= hi;
}

// "8 x 4": a GGUF shape as the error messages print it, contiguous dimension first.
std::string shape_text(const std::vector<int64_t>& shape) {
  std::string text;
  for (int64_t d : shape) text += (text.empty() ? "" : " x ") + std::to_string(d);
  return text;
}

}  // namespace

std::string Model::config_problem() const {
  const ModelConfig& c = config_;
  std::string problem;
  if (!in_range(c.dim, 1, kMaxDim))
    problem = "embedding width";
  else if (!in_range(c.n_layers, 1, kMaxLayers))
    problem = "layer count";
  else if (!in_range(c.n_heads, 1, c.dim))
    problem = "head count";
  else if (!in_range(c.n_kv_heads, 1, c.n_heads) || c.n_heads % c.n_kv_heads != 0)
    problem = "KV head count";
  else if (!in_range(c.head_dim, 2, kMaxDim) || c.head_dim % 2 != 0)
    problem = "head size";
  else if (!in_range(c.rope_dim, 2, c.head_dim) || c.rope_dim % 2 != 0)
    problem = "RoPE dimension";
  else if (!in_range(c.ffn_dim, 1, 16 * kMaxDim))
    problem = "feed-forward width";
  else if (!in_range(c.vocab_size, 1, kMaxVocab))
    problem = "vocabulary size";
  else if (!in_range(c.max_seq_len, 1, kMaxContext))
    problem = "context length";
  else if (!(c.rope_theta > 0) || !(c.rms_eps > 0) || !(c.rms_eps < 1))
    problem = "RoPE theta or RMS epsilon";
  return problem.empty() ? "" : "absurd " + problem + " (" + describe(c) + ")";
}

std::unique_ptr<Model> Model::load(const std::string& path, const std::string& tokenizer_path) {
  std::unique_ptr<Model> model(new Model());
  model->path_ = path;
  MappedFile probe(path);
  if (probe.size() >= 4 && std::memcmp(probe.data(), "GGUF", 4) == 0) {
    model->load_gguf(path);
  } else {
    model->load_llama2c(path, tokenizer_path);
  }
  return model;
}

size_t Model::weight_bytes() const {
  // One embedding row, the output head, the final norm, and every layer.
  size_t total = token_embedding_.row_bytes + output_.bytes() + config_.dim * sizeof(float);
  for (const LayerWeights& l : layers_) {
    total += l.wq.bytes() + l.wk.bytes() + l.wv.bytes() + l.wo.bytes() + l.w_gate.bytes() +
             l.w_up.bytes() + l.w_down.bytes() + 2 * config_.dim * sizeof(float);
  }
  return total;
}

// ---------------------------------------------------------------- GGUF

void Model::load_gguf(const std::string& path) {
  format_ = "gguf";
  gguf_ = GgufFile::open(path);
  const GgufFile& f = *gguf_;
  chat_template_ = f.get_string("tokenizer.chat_template").value_or("");
  ModelConfig& c = config_;
  c.architecture = f.get_string("general.architecture").value_or("");
  if (c.architecture != "llama")
    throw Error(path + ": architecture '" + c.architecture + "' is not supported (llama is)");
  const std::string arch = c.architecture + ".";
  auto required_int = [&](const std::string& key) -> int32_t {
    auto v = f.get_int(arch + key);
    if (!v) throw Error(path + ": missing metadata key '" + arch + key + "'");
    if (*v < 0 || *v > (int64_t{1} << 30))
      throw Error(path + ": absurd value of '" + arch + key + "'");
    return static_cast<int32_t>(*v);
  };
  c.dim = required_int("embedding_length");
  c.n_layers = required_int("block_count");
  c.n_heads = required_int("attention.head_count");
  c.n_kv_heads = f.get_int(arch + "attention.head_count_kv")
                     ? required_int("attention.head_count_kv")
                     : c.n_heads;
  c.ffn_dim = required_int("feed_forward_length");
  c.max_seq_len = required_int("context_length");
  c.head_dim = c.n_heads > 0 ? c.dim / c.n_heads : 0;
  if (f.get_int(arch + "attention.key_length")) c.head_dim = required_int("attention.key_length");
  c.rope_dim =
      f.get_int(arch + "rope.dimension_count") ? required_int("rope.dimension_count") : c.head_dim;
  c.rope_theta = static_cast<float>(f.get_float(arch + "rope.freq_base").value_or(10000.0));
  c.rms_eps =
      static_cast<float>(f.get_float(arch + "attention.layer_norm_rms_epsilon").value_or(1e-5));
  // GGUF llama weights are stored permuted for the interleaved (GPT-J) pairing.
  c.rope_layout = RopeLayout::kInterleaved;

  tokenizer_ = std::make_unique<Tokenizer>(vocabulary_from_gguf(f));
  c.vocab_size = tokenizer_->vocab_size();
  if (const std::string problem = config_problem(); !problem.empty())
    throw Error(path + ": " + problem);

  auto matrix = [&](const std::string& name, int64_t rows, int64_t cols) {
    const GgufTensor* t = f.find_tensor(name);
    if (!t) throw Error(path + ": missing tensor '" + name + "'");
    if (t->shape.size() != 2 || t->shape[0] != cols || t->shape[1] != rows)
      throw Error(path + ": tensor '" + name + "' has shape " + shape_text(t->shape) +
                  ", expected " + std::to_string(cols) + " x " + std::to_string(rows));
    WeightMatrix m;
    m.type = t->type;
    m.data = t->data;
    m.rows = rows;
    m.cols = cols;
    m.row_bytes = static_cast<size_t>(t->bytes / rows);
    return m;
  };
  auto vector = [&](const std::string& name, int64_t n) {
    const GgufTensor* t = f.find_tensor(name);
    if (!t) throw Error(path + ": missing tensor '" + name + "'");
    if (t->type != TensorType::kF32 || t->elements() != n)
      throw Error(path + ": tensor '" + name + "' must be F32 with " + std::to_string(n) +
                  " values, not " + tensor_type_name(t->type) + " with " +
                  std::to_string(t->elements()));
    if (reinterpret_cast<uintptr_t>(t->data) % alignof(float) != 0)
      throw Error(path + ": tensor '" + name + "' is misaligned");
    return reinterpret_cast<const float*>(t->data);
  };

  token_embedding_ = matrix("token_embd.weight", c.vocab_size, c.dim);
  output_norm_ = vector("output_norm.weight", c.dim);
  c.tied_output = f.find_tensor("output.weight") == nullptr;
  output_ = c.tied_output ? token_embedding_ : matrix("output.weight", c.vocab_size, c.dim);
  layers_.resize(c.n_layers);
  for (int32_t i = 0; i < c.n_layers; ++i) {
    const std::string p = "blk." + std::to_string(i) + ".";
    LayerWeights& l = layers_[i];
    l.attn_norm = vector(p + "attn_norm.weight", c.dim);
    l.wq = matrix(p + "attn_q.weight", c.q_dim(), c.dim);
    l.wk = matrix(p + "attn_k.weight", c.kv_dim(), c.dim);
    l.wv = matrix(p + "attn_v.weight", c.kv_dim(), c.dim);
    l.wo = matrix(p + "attn_output.weight", c.dim, c.q_dim());
    l.ffn_norm = vector(p + "ffn_norm.weight", c.dim);
    l.w_gate = matrix(p + "ffn_gate.weight", c.ffn_dim, c.dim);
    l.w_up = matrix(p + "ffn_up.weight", c.ffn_dim, c.dim);
    l.w_down = matrix(p + "ffn_down.weight", c.dim, c.ffn_dim);
  }
}

// ---------------------------------------------------------------- llama2.c

void Model::load_llama2c(const std::string& path, const std::string& tokenizer_path) {
  format_ = "llama2.c";
  llama2c_map_ = MappedFile(path);
  const MappedFile& map = llama2c_map_;
  constexpr size_t kHeaderInts = 7;
  // A llama2.c checkpoint has no magic number: any file without the GGUF magic
  // ends up here, so a header that makes no sense says the file is neither.
  const std::string neither =
      path + ": neither a GGUF file (no 'GGUF' magic) nor a llama2.c checkpoint";
  if (map.size() < kHeaderInts * sizeof(int32_t))
    throw Error(neither + " (only " + std::to_string(map.size()) +
                " bytes, shorter than a llama2.c header)");
  int32_t header[kHeaderInts];
  std::memcpy(header, map.data(), sizeof(header));
  ModelConfig& c = config_;
  c.architecture = "llama";
  c.dim = header[0];
  c.ffn_dim = header[1];
  c.n_layers = header[2];
  c.n_heads = header[3];
  c.n_kv_heads = header[4];
  // A negative vocabulary size marks a separate (untied) output matrix.
  c.tied_output = header[5] > 0;
  c.vocab_size = header[5] > 0 ? header[5] : (header[5] == INT32_MIN ? 0 : -header[5]);
  c.max_seq_len = header[6];
  c.head_dim = c.n_heads > 0 ? c.dim / c.n_heads : 0;
  c.rope_dim = c.head_dim;
  c.rope_theta = 10000.0f;
  c.rms_eps = 1e-5f;
  c.rope_layout = RopeLayout::kInterleaved;
  if (const std::string problem = config_problem(); !problem.empty())
    throw Error(neither + " (as a llama2.c header: " + problem + ")");
  if (c.dim % c.n_heads != 0)
    throw Error(path + ": width " + std::to_string(c.dim) + " is not a multiple of the head count");

  // Count the floats the header promises before touching them.
  const int64_t d = c.dim, L = c.n_layers, kv = c.kv_dim(), f = c.ffn_dim, V = c.vocab_size;
  const int64_t rope_table =
      static_cast<int64_t>(c.max_seq_len) * c.head_dim;  // freq_cis real + imag, unused
  int64_t floats = V * d + L * d + L * d * d + 2 * L * d * kv + L * d * d + L * d + 3 * L * d * f +
                   d + rope_table;
  if (!c.tied_output) floats += V * d;
  const size_t expected =
      kHeaderInts * sizeof(int32_t) + static_cast<size_t>(floats) * sizeof(float);
  if (map.size() != expected)
    throw Error(path + ": size " + std::to_string(map.size()) +
                " bytes does not match the header (" + describe(c) + ", expected " +
                std::to_string(expected) + " bytes)");

  const float* cursor = reinterpret_cast<const float*>(map.data() + kHeaderInts * sizeof(int32_t));
  auto take = [&](int64_t n) {
    const float* p = cursor;
    cursor += n;
    return p;
  };
  auto matrix_at = [&](const float* base, int64_t rows, int64_t cols) {
    WeightMatrix m;
    m.type = TensorType::kF32;
    m.data = reinterpret_cast<const uint8_t*>(base);
    m.rows = rows;
    m.cols = cols;
    m.row_bytes = static_cast<size_t>(cols) * sizeof(float);
    return m;
  };
  token_embedding_ = matrix_at(take(V * d), V, d);
  layers_.resize(L);
  const float* attn_norm = take(L * d);
  const float* wq = take(L * d * d);
  const float* wk = take(L * d * kv);
  const float* wv = take(L * d * kv);
  const float* wo = take(L * d * d);
  const float* ffn_norm = take(L * d);
  const float* w1 = take(L * d * f);
  const float* w2 = take(L * d * f);
  const float* w3 = take(L * d * f);
  for (int64_t i = 0; i < L; ++i) {
    LayerWeights& l = layers_[i];
    l.attn_norm = attn_norm + i * d;
    l.wq = matrix_at(wq + i * d * d, d, d);
    l.wk = matrix_at(wk + i * d * kv, kv, d);
    l.wv = matrix_at(wv + i * d * kv, kv, d);
    l.wo = matrix_at(wo + i * d * d, d, d);
    l.ffn_norm = ffn_norm + i * d;
    l.w_gate = matrix_at(w1 + i * d * f, f, d);
    l.w_down = matrix_at(w2 + i * d * f, d, f);
    l.w_up = matrix_at(w3 + i * d * f, f, d);
  }
  output_norm_ = take(d);
  take(rope_table);
  output_ = c.tied_output ? token_embedding_ : matrix_at(take(V * d), V, d);

  std::string tok_path = tokenizer_path;
  if (tok_path.empty()) {
    namespace fs = std::filesystem;
    fs::path dir = fs::path(path).parent_path();
    for (const std::string& name :
         {std::string("tok") + std::to_string(V) + ".bin", std::string("tokenizer.bin")}) {
      if (fs::exists(dir / name)) {
        tok_path = (dir / name).string();
        break;
      }
    }
    if (tok_path.empty())
      throw Error(path + ": no tokenizer found beside the checkpoint (tok" + std::to_string(V) +
                  ".bin or tokenizer.bin); pass --tokenizer");
  }
  tokenizer_ = std::make_unique<Tokenizer>(vocabulary_from_llama2c(tok_path, c.vocab_size));
}

}  // namespace xq
