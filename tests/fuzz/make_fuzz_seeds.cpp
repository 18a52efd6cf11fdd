// Writes the fuzzers' seed inputs: small GGUF images that reach every part of
// the reader and both tokenizer loaders, and texts that reach every branch of
// the encoders. Generated rather than committed so they follow the writer.
//   make_fuzz_seeds <gguf seed dir> <tokenizer seed dir>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "tests/gguf_writer.h"
#include "tests/tiny_llama_gguf.h"

namespace {

using xq::testing::GgufWriter;

const std::string kSpaceMarker = "\xE2\x96\x81";  // SentencePiece's U+2581

void write_file(const std::filesystem::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) {
    std::fprintf(stderr, "make_fuzz_seeds: cannot write %s\n", path.c_str());
    std::exit(1);
  }
}

void write_image(const std::filesystem::path& path, const std::vector<uint8_t>& image) {
  write_file(path, std::string(image.begin(), image.end()));
}

std::string utf8(uint32_t codepoint) {
  std::string out;
  if (codepoint < 0x80) {
    out += static_cast<char>(codepoint);
  } else if (codepoint < 0x800) {
    out += static_cast<char>(0xC0 | (codepoint >> 6));
    out += static_cast<char>(0x80 | (codepoint & 0x3F));
  } else {
    out += static_cast<char>(0xE0 | (codepoint >> 12));
    out += static_cast<char>(0x80 | ((codepoint >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (codepoint & 0x3F));
  }
  return out;
}

// Every metadata value type, scalar and array, and every tensor type with a
// correctly sized block of data.
std::vector<uint8_t> every_type_image() {
  GgufWriter w;
  w.add_scalar("u8", GgufWriter::kUint8, uint8_t{200});
  w.add_scalar("i8", GgufWriter::kInt8, int8_t{-100});
  w.add_scalar("u16", GgufWriter::kUint16, uint16_t{60000});
  w.add_scalar("i16", GgufWriter::kInt16, int16_t{-30000});
  w.add_uint32("u32", 4000000000u);
  w.add_int32("i32", -2000000000);
  w.add_float32("f32", 0.5f);
  w.add_bool("bool", true);
  w.add_string("string", "text");
  w.add_scalar("u64", GgufWriter::kUint64, uint64_t{1} << 40);
  w.add_scalar("i64", GgufWriter::kInt64, int64_t{-1} << 40);
  w.add_scalar("f64", GgufWriter::kFloat64, 0.25);
  w.add_uint32("general.alignment", 32);
  w.add_array("u8_array", GgufWriter::kUint8, std::vector<uint8_t>{1, 2, 255});
  w.add_array("i16_array", GgufWriter::kInt16, std::vector<int16_t>{-1, 2});
  w.add_array("bool_array", GgufWriter::kBool, std::vector<uint8_t>{0, 1});
  w.add_array("u64_array", GgufWriter::kUint64, std::vector<uint64_t>{7});
  w.add_array("f64_array", GgufWriter::kFloat64, std::vector<double>{1.5, -2.5});
  w.add_float32_array("f32_array", {0.0f, -1.0f});
  w.add_string_array("string_array", {"", "one", "two"});
  struct Layout {
    uint32_t type;
    uint64_t block_elems, block_bytes;
  };
  const Layout layouts[] = {{0, 1, 4},      {1, 1, 2},      {30, 1, 2},     {2, 32, 18},
                            {3, 32, 20},    {6, 32, 22},    {7, 32, 24},    {8, 32, 34},
                            {9, 32, 36},    {10, 256, 84},  {11, 256, 110}, {12, 256, 144},
                            {13, 256, 176}, {14, 256, 210}, {15, 256, 292}};
  for (const Layout& l : layouts) {
    w.add_tensor("t" + std::to_string(l.type), {l.block_elems, 2}, l.type,
                 std::vector<uint8_t>(2 * l.block_bytes, static_cast<uint8_t>(l.type)));
  }
  return w.build();
}

// A SentencePiece vocabulary with byte fallback tokens and a few merges.
std::vector<uint8_t> sentencepiece_vocab_image() {
  std::vector<std::string> tokens = {"<unk>", "<s>", "</s>"};
  std::vector<int32_t> types = {2, 3, 3};
  for (int b = 0; b < 256; ++b) {
    char text[8];
    std::snprintf(text, sizeof(text), "<0x%02X>", b);
    tokens.push_back(text);
    types.push_back(6);  // byte
  }
  for (const std::string& piece :
       {kSpaceMarker, kSpaceMarker + "t", std::string("he"), kSpaceMarker + "the", std::string("a"),
        std::string("b"), std::string("ab"), kSpaceMarker + "ab"}) {
    tokens.push_back(piece);
    types.push_back(1);
  }
  tokens.push_back("<user>");
  types.push_back(4);  // user-defined
  std::vector<float> scores(tokens.size());
  for (size_t i = 0; i < scores.size(); ++i) scores[i] = -static_cast<float>(i);
  GgufWriter w;
  w.add_string("tokenizer.ggml.model", "llama");
  w.add_string_array("tokenizer.ggml.tokens", tokens);
  w.add_float32_array("tokenizer.ggml.scores", scores);
  w.add_int32_array("tokenizer.ggml.token_type", types);
  w.add_uint32("tokenizer.ggml.bos_token_id", 1);
  w.add_uint32("tokenizer.ggml.eos_token_id", 2);
  w.add_bool("tokenizer.ggml.add_bos_token", true);
  w.add_bool("tokenizer.ggml.add_space_prefix", true);
  return w.build();
}

// A byte-level BPE vocabulary: the 256 characters of the GPT-2 byte alphabet
// (printable Latin-1 bytes stand for themselves, the rest take U+0100 on, in
// byte order), a few merges, and an end-of-text control token.
std::vector<uint8_t> byte_level_vocab_image(const std::string& pre) {
  std::vector<std::string> tokens;
  uint32_t next_substitute = 256;
  for (uint32_t b = 0; b < 256; ++b) {
    const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
    tokens.push_back(utf8(printable ? b : next_substitute++));
  }
  const std::string space = utf8(0x120);  // the alphabet's character for ' '
  const std::vector<std::string> merges = {space + " t", "h e", space + "t he", "i n", "1 2"};
  for (const std::string& merge : merges) {
    const size_t split = merge.find(' ', 1);
    tokens.push_back(merge.substr(0, split) + merge.substr(split + 1));
  }
  tokens.push_back("<|endoftext|>");
  std::vector<int32_t> types(tokens.size(), 1);
  types.back() = 3;  // control
  GgufWriter w;
  w.add_string("tokenizer.ggml.model", "gpt2");
  w.add_string("tokenizer.ggml.pre", pre);
  w.add_string_array("tokenizer.ggml.tokens", tokens);
  w.add_int32_array("tokenizer.ggml.token_type", types);
  w.add_string_array("tokenizer.ggml.merges", merges);
  w.add_uint32("tokenizer.ggml.bos_token_id", static_cast<uint32_t>(tokens.size() - 1));
  w.add_uint32("tokenizer.ggml.eos_token_id", static_cast<uint32_t>(tokens.size() - 1));
  return w.build();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: make_fuzz_seeds <gguf seed dir> <tokenizer seed dir>\n");
    return 2;
  }
  const std::filesystem::path gguf_dir = argv[1], text_dir = argv[2];
  std::filesystem::create_directories(gguf_dir);
  std::filesystem::create_directories(text_dir);

  write_image(gguf_dir / "empty_v2.gguf", GgufWriter(2).build());
  write_image(gguf_dir / "empty_v3.gguf", GgufWriter(3).build());
  write_image(gguf_dir / "every_type.gguf", every_type_image());
  write_image(gguf_dir / "sentencepiece_vocab.gguf", sentencepiece_vocab_image());
  write_image(gguf_dir / "byte_level_vocab_smollm.gguf", byte_level_vocab_image("smollm"));
  write_image(gguf_dir / "byte_level_vocab_llama3.gguf", byte_level_vocab_image("llama3"));
  write_image(gguf_dir / "tiny_llama.gguf", xq::testing::TinyLlamaGguf().build());

  const std::vector<std::string> texts = {
      "Hello world! It's 2024, and we're testing tokenizers.\n",
      "  leading spaces\ttabs\r\nCRLF\n\n\nnewlines   ",
      "12345678901234567890 3.14159 1,000,000",
      "\xD0\x9F\xD1\x80\xD0\xB8\xD0\xB2\xD0\xB5\xD1\x82 \xE4\xBD\xA0\xE5\xA5\xBD \xF0\x9F\xA6\x99 "
      "\xD9\x85\xD8\xB1\xD8\xAD\xD8\xA8\xD8\xA7",
      "<s>Hello</s> <unk> <|endoftext|> <|im_start|>user<|im_end|>",
      kSpaceMarker + "marker" + kSpaceMarker + " " + kSpaceMarker,
      "\xFF\xFE a\x80"
      "b \xC3( \xE2\x82 \xED\xA0\x80 \xF4\x90\x80\x80 \xC0\xAF",
      "\xE1\xA0\x8E U+180E",
      "don't I'll we've THEY'RE 'S",
      "int main() { return x->y[0] <= 42; }  // comment",
      std::string("nul\0byte", 8),
  };
  for (size_t i = 0; i < texts.size(); ++i)
    write_file(text_dir / ("text_" + std::to_string(i)), texts[i]);
  return 0;
}
