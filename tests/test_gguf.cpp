// GGUF reader: parses hand-built images and the real model files, and turns
// every kind of corruption into an xq::Error that names the problem.
#include <gtest/gtest.h>

#include <cstring>

#include "kernels/error.h"
#include "runtime/gguf.h"
#include "tests/gguf_writer.h"
#include "tests/test_util.h"

namespace xq {
namespace {

using testing::GgufWriter;

std::vector<uint8_t> float_bytes(const std::vector<float>& v) {
  std::vector<uint8_t> b(v.size() * 4);
  std::memcpy(b.data(), v.data(), b.size());
  return b;
}

GgufWriter small_model() {
  GgufWriter w;
  w.add_string("general.architecture", "llama");
  w.add_uint32("llama.block_count", 2);
  w.add_float32("llama.rope.freq_base", 10000.0f);
  w.add_string_array("tokenizer.ggml.tokens", {"a", "b", "c"});
  w.add_tensor("w", {4, 2}, 0, float_bytes({1, 2, 3, 4, 5, 6, 7, 8}));
  w.add_tensor("v", {32}, 8, std::vector<uint8_t>(34, 1));  // one Q8_0 block
  return w;
}

std::string error_of(const std::vector<uint8_t>& image) {
  try {
    GgufFile::parse(image.data(), image.size(), "test.gguf");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Gguf, ParsesHandBuiltImage) {
  for (uint32_t version : {2u, 3u}) {
    GgufWriter w = small_model();
    auto image = GgufWriter(version).build();  // empty file of that version parses too
    EXPECT_EQ(error_of(image), "");
    image = w.build();
    auto file = GgufFile::parse(image.data(), image.size(), "test.gguf");
    EXPECT_EQ(file->get_string("general.architecture"), "llama");
    EXPECT_EQ(file->get_int("llama.block_count"), 2);
    EXPECT_FLOAT_EQ(*file->get_float("llama.rope.freq_base"), 10000.0f);
    ASSERT_NE(file->get_string_array("tokenizer.ggml.tokens"), nullptr);
    EXPECT_EQ(file->get_string_array("tokenizer.ggml.tokens")->at(2), "c");
    const GgufTensor* t = file->find_tensor("w");
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(t->shape, (std::vector<int64_t>{4, 2}));
    EXPECT_EQ(t->bytes, 32u);
    float values[8];
    std::memcpy(values, t->data, 32);
    EXPECT_EQ(values[5], 6.0f);
    const GgufTensor* v = file->find_tensor("v");
    ASSERT_NE(v, nullptr);
    EXPECT_EQ(v->type, TensorType::kQ8_0);
    EXPECT_EQ(v->bytes, 34u);
    EXPECT_EQ(file->find_tensor("missing"), nullptr);
    EXPECT_FALSE(file->get_int("missing").has_value());
    EXPECT_THROW(file->get_int("general.architecture"), Error);
  }
}

TEST(Gguf, RejectsWrongMagicAndVersion) {
  auto image = small_model().build();
  image[0] = 'X';
  EXPECT_NE(error_of(image).find("wrong magic"), std::string::npos);
  image = small_model().build();
  image[4] = 1;  // version 1 used 32-bit counts and is not read
  EXPECT_NE(error_of(image).find("unsupported GGUF version 1"), std::string::npos);
}

TEST(Gguf, EveryTruncationIsAnError) {
  auto image = small_model().build();
  for (size_t cut = 0; cut < image.size(); ++cut) {
    std::vector<uint8_t> prefix(image.begin(), image.begin() + cut);
    EXPECT_NE(error_of(prefix), "") << "cut at " << cut;
  }
}

TEST(Gguf, RejectsUnknownTypeAndAbsurdShapes) {
  GgufWriter unknown;
  unknown.add_tensor("t", {32}, 99, std::vector<uint8_t>(128));
  EXPECT_NE(error_of(unknown.build()).find("unknown or unsupported type id 99"), std::string::npos);

  GgufWriter huge;
  huge.add_tensor("t", {uint64_t{1} << 41, 1}, 0, std::vector<uint8_t>(4));
  EXPECT_NE(error_of(huge.build()).find("absurd dimension"), std::string::npos);

  GgufWriter past_end;
  past_end.add_tensor("t", {1024}, 0, std::vector<uint8_t>(16));
  EXPECT_NE(error_of(past_end.build()).find("runs past the end"), std::string::npos);

  GgufWriter partial_block;
  partial_block.add_tensor("t", {33}, 8, std::vector<uint8_t>(68));
  EXPECT_NE(error_of(partial_block.build()).find("whole number"), std::string::npos);
}

TEST(Gguf, OpenNamesTheFileOnError) {
  try {
    GgufFile::open("/nonexistent/model.gguf");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent/model.gguf"), std::string::npos);
  }
}

TEST(Gguf, ReadsTheTokenizerVocabularies) {
  for (const char* name : {"ggml-vocab-llama-spm.gguf", "ggml-vocab-gpt-2.gguf"}) {
    auto file = GgufFile::open(testing::shared_path(std::string("tokenizer-vectors/") + name));
    EXPECT_TRUE(file->version() == 2 || file->version() == 3);
    const auto* tokens = file->get_string_array("tokenizer.ggml.tokens");
    ASSERT_NE(tokens, nullptr) << name;
    EXPECT_GT(tokens->size(), 30000u) << name;
  }
}

}  // namespace
}  // namespace xq
