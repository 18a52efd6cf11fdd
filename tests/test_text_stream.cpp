// Incremental detokenization: on both tokenizer families and real text
// (TinyStories, and WikiText with its non-ASCII lines), the pieces TextStream
// emits, plus finish(), equal Tokenizer::decode() of all ids byte for byte,
// and no piece ends inside a UTF-8 character.
#include <gtest/gtest.h>

#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "runtime/gguf.h"
#include "runtime/model.h"
#include "runtime/text_stream.h"
#include "tests/test_util.h"

namespace xq {
namespace {

std::string read(const std::string& path, size_t offset, size_t bytes) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str().substr(offset, bytes);
}

bool whole_utf8(const std::string& piece) {
  return utf8_complete_prefix(piece) == piece.size();
}

void expect_stream_equals_decode(const Tokenizer& tokenizer, const std::string& text,
                                 bool add_bos) {
  const std::vector<int32_t> ids = tokenizer.encode(text, add_bos);
  TextStream stream(tokenizer);
  std::string joined;
  for (int32_t id : ids) {
    const std::string piece = stream.push(id);
    ASSERT_TRUE(whole_utf8(piece)) << "piece ends inside a character";
    joined += piece;
  }
  joined += stream.finish();
  EXPECT_EQ(joined, tokenizer.decode(ids));
}

TEST(TextStream, Utf8CompletePrefix) {
  EXPECT_EQ(utf8_complete_prefix("ab"), 2u);
  EXPECT_EQ(utf8_complete_prefix("a\xC3"), 1u);                 // é missing its second byte
  EXPECT_EQ(utf8_complete_prefix("a\xC3\xA9"), 3u);             // é
  EXPECT_EQ(utf8_complete_prefix("\xE2\x80"), 0u);              // … missing one byte
  EXPECT_EQ(utf8_complete_prefix("\xF0\x9F\x98"), 0u);          // emoji missing one byte
  EXPECT_EQ(utf8_complete_prefix("\xF0\x9F\x98\x80"), 4u);      // emoji
  EXPECT_EQ(utf8_complete_prefix("\x80\x80\x80\x80\x80"), 5u);  // stray continuations
}

TEST(TextStream, Stories260kTokenizerOnTinyStoriesAndNonAscii) {
  auto model = Model::load(testing::shared_path("models/stories260K.bin"));
  const Tokenizer& tok = model->tokenizer();
  expect_stream_equals_decode(
      tok, read(testing::shared_path("data/tinystories-valid.txt"), 0, 4000), true);
  // Byte fallback: every non-ASCII character is split over byte tokens.
  expect_stream_equals_decode(tok,
                              "Lily said: \xE2\x80\x9C"
                              "Caf\xC3\xA9 na\xC3\xAFve \xF0\x9F\x98\x80\xE2\x80\x9D",
                              true);
  expect_stream_equals_decode(tok, " leading space kept once", false);
}

TEST(TextStream, ByteLevelBpeAndSentencePieceGgufOnWikiText) {
  const std::string wiki = read(testing::shared_path("data/wikitext-2-test.txt"), 0, 20000);
  ASSERT_NE(wiki.find('\xE2'), std::string::npos) << "the sample should hold non-ASCII text";
  for (const char* name :
       {"tokenizer-vectors/ggml-vocab-gpt-2.gguf", "tokenizer-vectors/ggml-vocab-llama-spm.gguf"}) {
    auto file = GgufFile::open(testing::shared_path(name));
    const Tokenizer tok(vocabulary_from_gguf(*file));
    expect_stream_equals_decode(tok, wiki, true);
    expect_stream_equals_decode(tok, "na\xC3\xAFve \xE6\x97\xA5\xE6\x9C\xAC \xF0\x9F\x98\x80",
                                false);
  }
  const std::string smollm = testing::models_path("SmolLM2-135M-Instruct.Q4_1.gguf");
  if (testing::file_exists(smollm)) {
    auto model = Model::load(smollm);
    expect_stream_equals_decode(model->tokenizer(), wiki, model->tokenizer().add_bos());
  }
}

}  // namespace
}  // namespace xq
