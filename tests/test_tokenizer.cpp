// Tokenizer: llama.cpp's tokenizer test vectors (SentencePiece and GPT-2 BPE)
// id for id, llama2.c's tokenizer.bin against an independent reimplementation
// of llama2.c's encode(), decode round trips, and refusal of corrupt input.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <sstream>

#include "kernels/error.h"
#include "runtime/gguf.h"
#include "runtime/tokenizer.h"
#include "tests/gguf_writer.h"
#include "tests/test_util.h"

namespace xq {
namespace {

using testing::GgufWriter;
using testing::shared_path;

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in) << "cannot open " << path;
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << "cannot write " << path;
}

std::string ids_to_string(const std::vector<int32_t>& ids) {
  std::string s;
  for (int32_t id : ids) s += (s.empty() ? "" : " ") + std::to_string(id);
  return "[" + s + "]";
}

// Input text made readable in a failure message.
std::string quoted(const std::string& text) {
  std::string s = "\"";
  for (unsigned char c : text) {
    if (c == '\n') {
      s += "\\n";
    } else if (c == '\t') {
      s += "\\t";
    } else if (c < 0x20 || c == 0x7F) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\x%02X", c);
      s += buf;
    } else {
      s += static_cast<char>(c);
    }
  }
  return s + "\"";
}

struct VectorCase {
  std::string input;
  std::vector<int32_t> expected;
};

// The format llama.cpp's test-tokenizer-0 reads: the .inp file is the inputs,
// each followed by "\n__ggml_vocab_test__\n" (so an input never includes the
// newline before the separator, and the file ends with a separator); the .out
// file has one line of space-separated ids per input.
std::vector<VectorCase> load_vectors(const std::string& vocab_path) {
  const std::string inputs = read_file(vocab_path + ".inp");
  const std::string separator = "\n__ggml_vocab_test__\n";
  std::vector<VectorCase> cases;
  for (size_t pos = 0; pos < inputs.size();) {
    const size_t next = inputs.find(separator, pos);
    if (next == std::string::npos) {
      cases.push_back({inputs.substr(pos), {}});
      break;
    }
    cases.push_back({inputs.substr(pos, next - pos), {}});
    pos = next + separator.size();
  }
  std::istringstream outputs(read_file(vocab_path + ".out"));
  std::string line;
  size_t i = 0;
  for (; std::getline(outputs, line); ++i) {
    if (i >= cases.size()) {
      ADD_FAILURE() << vocab_path << ".out has more lines than the .inp has inputs";
      break;
    }
    std::istringstream ids(line);
    for (int32_t id; ids >> id;) cases[i].expected.push_back(id);
  }
  EXPECT_EQ(i, cases.size()) << vocab_path << ": .inp and .out disagree on the number of cases";
  return cases;
}

// Runs every case as test-tokenizer-0 does (add_special=false,
// parse_special=true) and checks the decode round trip.
void check_vectors(const std::string& name, int expected_cases) {
  const std::string path = shared_path("tokenizer-vectors/" + name);
  ASSERT_TRUE(testing::file_exists(path)) << path;
  auto file = GgufFile::open(path);
  const Tokenizer tokenizer(vocabulary_from_gguf(*file));
  const std::vector<VectorCase> cases = load_vectors(path);
  ASSERT_EQ(static_cast<int>(cases.size()), expected_cases);

  int matched = 0, round_trips = 0;
  for (const VectorCase& c : cases) {
    const std::vector<int32_t> actual = tokenizer.encode(c.input, false, true);
    if (actual == c.expected) {
      ++matched;
    } else {
      ADD_FAILURE() << name << ": input " << quoted(c.input) << "\n  expected "
                    << ids_to_string(c.expected) << "\n  actual   " << ids_to_string(actual);
    }
    // Every vector input round-trips: SentencePiece drops the one space its
    // encoder prefixed, byte-level BPE is lossless, and no input contains a
    // control token's text.
    const std::string decoded = tokenizer.decode(actual);
    if (decoded == c.input) {
      ++round_trips;
    } else {
      ADD_FAILURE() << name << ": decode(encode(" << quoted(c.input) << ")) = " << quoted(decoded);
    }
  }
  std::printf("[ vectors  ] %s: %d/%zu match llama.cpp, %d/%zu round-trip\n", name.c_str(), matched,
              cases.size(), round_trips, cases.size());
}

TEST(TokenizerVectors, LlamaSentencePiece) {
  check_vectors("ggml-vocab-llama-spm.gguf", 46);
}

TEST(TokenizerVectors, Gpt2ByteLevelBpe) {
  check_vectors("ggml-vocab-gpt-2.gguf", 46);
}

TEST(TokenizerVectors, VocabularyFromGguf) {
  auto spm = GgufFile::open(shared_path("tokenizer-vectors/ggml-vocab-llama-spm.gguf"));
  const Vocabulary v = vocabulary_from_gguf(*spm);
  EXPECT_EQ(v.kind, TokenizerKind::kSentencePiece);
  EXPECT_EQ(v.tokens.size(), 32000u);
  EXPECT_EQ(v.scores.size(), 32000u);
  EXPECT_EQ(v.bos_id, 1);
  EXPECT_EQ(v.eos_id, 2);
  EXPECT_EQ(v.unk_id, 0);
  EXPECT_TRUE(v.add_bos);
  EXPECT_TRUE(v.add_space_prefix);  // llama's default: the key is absent
  const Tokenizer tokenizer(v);
  EXPECT_EQ(tokenizer.token_to_piece(1), "");     // <s> is a control token
  EXPECT_EQ(tokenizer.token_to_piece(13), "\n");  // <0x0A>
  EXPECT_EQ(tokenizer.token_to_piece(15043), " Hello");
  EXPECT_EQ(tokenizer.encode("Hello", true), (std::vector<int32_t>{1, 15043}));
  EXPECT_EQ(tokenizer.decode({1, 15043, 3186}), "Hello world");
  // Control-token texts are matched only when asked to.
  EXPECT_EQ(tokenizer.encode("<s>Hello", false, true), (std::vector<int32_t>{1, 15043}));
  EXPECT_NE(tokenizer.encode("<s>Hello", false, false)[0], 1);
  EXPECT_THROW(tokenizer.token_to_piece(32000), Error);
  EXPECT_THROW(tokenizer.token_to_piece(-1), Error);

  auto gpt2 = GgufFile::open(shared_path("tokenizer-vectors/ggml-vocab-gpt-2.gguf"));
  const Vocabulary g = vocabulary_from_gguf(*gpt2);
  EXPECT_EQ(g.kind, TokenizerKind::kByteLevelBpe);
  EXPECT_EQ(g.pre, "gpt-2");
  EXPECT_EQ(g.merges.size(), 50000u);
  EXPECT_EQ(g.bos_id, 50256);
  EXPECT_FALSE(g.add_bos);
  EXPECT_FALSE(g.add_space_prefix);
  const Tokenizer gpt2_tokenizer(g);
  EXPECT_EQ(gpt2_tokenizer.token_to_piece(220), " ");   // "Ġ"
  EXPECT_EQ(gpt2_tokenizer.token_to_piece(198), "\n");  // "Ċ"
  EXPECT_EQ(gpt2_tokenizer.token_to_piece(50256), "");  // <|endoftext|> is control
  EXPECT_EQ(gpt2_tokenizer.encode("a<|endoftext|>b", false, true),
            (std::vector<int32_t>{64, 50256, 65}));
}

// Arbitrary bytes, including invalid UTF-8, never crash the encoders and come
// back unchanged: byte-level BPE covers every byte, and SentencePiece falls
// back to <0xXX> tokens.
TEST(TokenizerVectors, ArbitraryBytesRoundTrip) {
  auto spm_file = GgufFile::open(shared_path("tokenizer-vectors/ggml-vocab-llama-spm.gguf"));
  auto gpt2_file = GgufFile::open(shared_path("tokenizer-vectors/ggml-vocab-gpt-2.gguf"));
  const Tokenizer spm(vocabulary_from_gguf(*spm_file));
  const Tokenizer gpt2(vocabulary_from_gguf(*gpt2_file));
  std::mt19937 rng(1234);
  const std::vector<std::string> fixed = {"\xFF",
                                          "\xC3",
                                          "\xC3(",
                                          "\xE2\x82",
                                          "\xED\xA0\x80",
                                          "\xF4\x90\x80\x80",
                                          "\xC0\xAF",
                                          "a\x80 b\xBF\xBF  \xE0\x80\x80 x",
                                          std::string("nul\0byte", 8),
                                          "\xE1\xA0\x8E spaces",
                                          std::string(3000, ' ') + "x",
                                          std::string(3000, '7'),
                                          std::string(3000, '!')};
  std::vector<std::string> inputs = fixed;
  for (int i = 0; i < 300; ++i) {
    std::string s(rng() % 64, '\0');
    for (char& c : s) c = static_cast<char>(rng() % 256);
    inputs.push_back(s);
  }
  for (const std::string& input : inputs) {
    const std::vector<int32_t> g = gpt2.encode(input, false);
    EXPECT_EQ(gpt2.decode(g), input) << quoted(input);
    const std::vector<int32_t> s = spm.encode(input, false);
    // U+2581 in the input decodes to a space, as in SentencePiece itself.
    if (input.find("\xE2\x96\x81") == std::string::npos) {
      EXPECT_EQ(spm.decode(s), input) << quoted(input);
    }
  }
}

// A long run of one character class must not hit PCRE2's JIT stack limit.
TEST(TokenizerVectors, LongRunsSplitCompletely) {
  auto gpt2_file = GgufFile::open(shared_path("tokenizer-vectors/ggml-vocab-gpt-2.gguf"));
  const Tokenizer gpt2(vocabulary_from_gguf(*gpt2_file));
  for (const std::string& run : {std::string(200000, ' ') + "a", std::string(200000, 'a'),
                                 std::string(200000, '\n'), std::string(100000, '9') + " x"}) {
    const std::vector<int32_t> ids = gpt2.encode(run, false);
    EXPECT_EQ(gpt2.decode(ids), run);
  }
}

// ---------------------------------------------------------------------------
// llama2.c tokenizer.bin

// Straight transcription of llama2.c's encode(): dummy " " token, per UTF-8
// character lookup with byte fallback at id byte+3, then repeatedly merge the
// adjacent pair whose concatenation has the best score (leftmost on ties).
class Llama2cReference {
 public:
  explicit Llama2cReference(const std::string& path, int vocab_size) {
    const std::string bytes = read_file(path);
    size_t pos = 4;  // max_token_length
    for (int i = 0; i < vocab_size; ++i) {
      float score;
      int32_t length;
      std::memcpy(&score, bytes.data() + pos, 4);
      std::memcpy(&length, bytes.data() + pos + 4, 4);
      pos += 8;
      tokens_.push_back(bytes.substr(pos, length));
      scores_.push_back(score);
      pos += length;
      ids_.emplace(tokens_.back(), i);
    }
  }

  std::vector<int32_t> encode(const std::string& text) const {
    std::vector<int32_t> ids;
    if (!text.empty()) ids.push_back(lookup(" "));
    for (size_t i = 0; i < text.size();) {
      size_t end = i + 1;
      while (end < text.size() && (static_cast<uint8_t>(text[end]) & 0xC0) == 0x80 && end - i < 4) {
        ++end;
      }
      const std::string character = text.substr(i, end - i);
      if (int32_t id = lookup(character); id >= 0) {
        ids.push_back(id);
      } else {
        for (unsigned char c : character) ids.push_back(c + 3);
      }
      i = end;
    }
    while (true) {
      float best_score = -1e10f;
      int best_index = -1, best_id = -1;
      for (size_t i = 0; i + 1 < ids.size(); ++i) {
        const int32_t id = lookup(tokens_[ids[i]] + tokens_[ids[i + 1]]);
        if (id >= 0 && scores_[id] > best_score) {
          best_score = scores_[id];
          best_index = static_cast<int>(i);
          best_id = id;
        }
      }
      if (best_index < 0) break;
      ids[best_index] = best_id;
      ids.erase(ids.begin() + best_index + 1);
    }
    return ids;
  }

 private:
  int32_t lookup(const std::string& text) const {
    const auto it = ids_.find(text);
    return it == ids_.end() ? -1 : it->second;
  }
  std::vector<std::string> tokens_;
  std::vector<float> scores_;
  std::map<std::string, int32_t> ids_;
};

const std::string kTok512 = "models/tok512.bin";

TEST(TokenizerLlama2c, MatchesReferenceEncoder) {
  const std::string path = shared_path(kTok512);
  ASSERT_TRUE(testing::file_exists(path)) << path;
  const Tokenizer tokenizer(vocabulary_from_llama2c(path, 512));
  const Llama2cReference reference(path, 512);
  EXPECT_EQ(tokenizer.vocab_size(), 512);
  EXPECT_EQ(tokenizer.bos_id(), 1);
  EXPECT_EQ(tokenizer.eos_id(), 2);
  EXPECT_TRUE(tokenizer.add_bos());

  // Computed by hand-running llama2.c's algorithm over tok512.bin.
  EXPECT_EQ(tokenizer.encode("Once upon a time", false),
            (std::vector<int32_t>{403, 407, 261, 378}));
  EXPECT_EQ(tokenizer.encode("Once upon a time", true),
            (std::vector<int32_t>{1, 403, 407, 261, 378}));
  EXPECT_EQ(tokenizer.encode("h\xC3\xA9llo \xF0\x9F\x98\x80\n", false),
            (std::vector<int32_t>{270, 485, 306, 414, 410, 243, 162, 155, 131, 13}));

  std::vector<std::string> texts = {
      "Once upon a time",
      "Once upon a time, there was a little girl named Lily. She loved to play outside.",
      "Lily and Ben went to the park. They saw a big dog!",
      "",
      " ",
      "   three leading spaces and two trailing  ",
      "tab\tand\nnewline\n\n",
      "h\xC3\xA9llo \xF0\x9F\x98\x80 \xE6\x97\xA5\xE6\x9C\xAC",
      "\"Quotes\", (parens) & [brackets] -- 12345 67.89%",
  };
  std::mt19937 rng(42);
  const std::string alphabet = "abcdefghijklmnopqrstuvwxyz   .,!?'\nTOLB0123";
  for (int i = 0; i < 200; ++i) {
    std::string s(rng() % 40, ' ');
    for (char& c : s) c = alphabet[rng() % alphabet.size()];
    texts.push_back(s);
  }
  for (const std::string& text : texts) {
    const std::vector<int32_t> ids = tokenizer.encode(text, false);
    EXPECT_EQ(ids, reference.encode(text)) << quoted(text);
    EXPECT_EQ(tokenizer.decode(ids), text) << quoted(text);
    std::vector<int32_t> with_bos = tokenizer.encode(text, true);
    ASSERT_FALSE(with_bos.empty());
    EXPECT_EQ(with_bos[0], 1);
    EXPECT_EQ(tokenizer.decode(with_bos), text) << quoted(text);
  }
}

TEST(TokenizerLlama2c, PiecesAndTypes) {
  const Tokenizer tokenizer(vocabulary_from_llama2c(shared_path(kTok512), 512));
  const Vocabulary& v = tokenizer.vocabulary();
  EXPECT_EQ(v.kind, TokenizerKind::kSentencePiece);
  EXPECT_EQ(v.token_types[0], token_type::kUnknown);
  EXPECT_EQ(v.token_types[1], token_type::kControl);
  EXPECT_EQ(v.token_types[13], token_type::kByte);
  EXPECT_EQ(v.tokens[259], "\xE2\x96\x81t");  // " t" normalized to U+2581
  EXPECT_EQ(tokenizer.token_to_piece(1), "");
  EXPECT_EQ(tokenizer.token_to_piece(13), "\n");  // <0x0A>
  EXPECT_EQ(tokenizer.token_to_piece(259), " t");
  // The space the encoder prefixed is dropped even after BOS, mid-text spaces stay.
  EXPECT_EQ(tokenizer.decode({1, 403, 407}), "Once upon");
}

// ---------------------------------------------------------------------------
// Corrupt or inconsistent input

class TokenizerBadInput : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("xq_tokenizer_test_" + std::to_string(::getpid()));
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::string write_temp(const std::string& name, const std::string& bytes) {
    const std::string path = (dir_ / name).string();
    write_file(path, bytes);
    return path;
  }

  std::filesystem::path dir_;
};

std::string error_message(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST_F(TokenizerBadInput, TruncatedLlama2cFile) {
  const std::string original = read_file(shared_path(kTok512));
  ASSERT_GT(original.size(), 100u);
  for (size_t size : {size_t{0}, size_t{2}, size_t{4}, size_t{9}, size_t{100}, original.size() / 2,
                      original.size() - 1}) {
    const std::string path = write_temp("truncated.bin", original.substr(0, size));
    const std::string message = error_message([&] { vocabulary_from_llama2c(path, 512); });
    EXPECT_NE(message, "") << "size " << size;
    EXPECT_NE(message.find(path), std::string::npos) << message;
    EXPECT_NE(message.find("truncated"), std::string::npos) << message;
  }
  // The intact copy loads, and asking for more tokens than it holds fails.
  const std::string path = write_temp("whole.bin", original);
  EXPECT_NO_THROW(vocabulary_from_llama2c(path, 512));
  EXPECT_THROW(vocabulary_from_llama2c(path, 513), Error);
  EXPECT_THROW(vocabulary_from_llama2c(path, 0), Error);
  EXPECT_THROW(vocabulary_from_llama2c((dir_ / "missing.bin").string(), 512), Error);
}

TEST_F(TokenizerBadInput, CorruptLlama2cFields) {
  const std::string original = read_file(shared_path(kTok512));
  const auto patched = [&](size_t offset, int32_t value) {
    std::string bytes = original;
    std::memcpy(bytes.data() + offset, &value, 4);
    return bytes;
  };
  // max_token_length not positive
  EXPECT_THROW(vocabulary_from_llama2c(write_temp("a.bin", patched(0, 0)), 512), Error);
  // first token's length negative, then longer than max_token_length
  EXPECT_THROW(vocabulary_from_llama2c(write_temp("b.bin", patched(8, -1)), 512), Error);
  EXPECT_THROW(vocabulary_from_llama2c(write_temp("c.bin", patched(8, 1 << 30)), 512), Error);
  // NaN score
  EXPECT_THROW(vocabulary_from_llama2c(write_temp("d.bin", patched(4, 0x7FC00000)), 512), Error);
}

std::string gguf_error(const GgufWriter& writer) {
  const std::vector<uint8_t> image = writer.build();
  return error_message([&] {
    auto file = GgufFile::parse(image.data(), image.size(), "vocab.gguf");
    vocabulary_from_gguf(*file);
  });
}

GgufWriter tiny_bpe(const std::string& pre) {
  GgufWriter w;
  w.add_string("tokenizer.ggml.model", "gpt2");
  if (!pre.empty()) w.add_string("tokenizer.ggml.pre", pre);
  w.add_string_array("tokenizer.ggml.tokens", {"a", "b", "ab"});
  return w;
}

TEST(TokenizerGguf, RejectsBadMetadata) {
  {
    GgufWriter w = tiny_bpe("gpt-2");
    w.add_string_array("tokenizer.ggml.merges", {"a b"});
    EXPECT_EQ(gguf_error(w), "");
  }
  {
    GgufWriter w = tiny_bpe("no-such-pre");
    w.add_string_array("tokenizer.ggml.merges", {"a b"});
    const std::string message = gguf_error(w);
    EXPECT_NE(message.find("vocab.gguf"), std::string::npos) << message;
    EXPECT_NE(message.find("no-such-pre"), std::string::npos) << message;
  }
  EXPECT_NE(gguf_error(tiny_bpe("gpt-2")).find("merges"), std::string::npos);
  {
    GgufWriter w = tiny_bpe("gpt-2");
    w.add_string_array("tokenizer.ggml.merges", {"ab"});  // no separator
    EXPECT_NE(gguf_error(w), "");
  }
  {
    GgufWriter w = tiny_bpe("gpt-2");
    w.add_string_array("tokenizer.ggml.merges", {"a b"});
    w.add_uint32("tokenizer.ggml.bos_token_id", 3);
    EXPECT_NE(gguf_error(w).find("bos_token_id"), std::string::npos);
  }
  {
    GgufWriter w;
    w.add_string("tokenizer.ggml.model", "bert");
    w.add_string_array("tokenizer.ggml.tokens", {"a"});
    EXPECT_NE(gguf_error(w).find("bert"), std::string::npos);
  }
  {
    GgufWriter w;
    w.add_string("tokenizer.ggml.model", "llama");
    EXPECT_NE(gguf_error(w).find("tokenizer.ggml.tokens"), std::string::npos);
  }
  {
    GgufWriter w;
    w.add_string_array("tokenizer.ggml.tokens", {"a"});
    EXPECT_NE(gguf_error(w).find("tokenizer.ggml.model"), std::string::npos);
  }
}

TEST(TokenizerGguf, RejectsInconsistentVocabulary) {
  Vocabulary good;
  good.kind = TokenizerKind::kSentencePiece;
  good.tokens = {"<unk>", "a", "b", "ab"};
  good.scores = {0, 0, 0, 1};
  good.token_types = {2, 1, 1, 1};
  good.unk_id = 0;
  EXPECT_NO_THROW(Tokenizer{good});
  {
    const Tokenizer t(good);
    EXPECT_EQ(t.encode("ab", false), (std::vector<int32_t>{3}));
    EXPECT_EQ(t.encode("abc", false), (std::vector<int32_t>{3, 0}));  // no byte tokens: <unk>
  }
  Vocabulary v = good;
  v.scores.pop_back();
  EXPECT_THROW(Tokenizer{v}, Error);
  v = good;
  v.token_types = {2, 1, 1, 9};
  EXPECT_THROW(Tokenizer{v}, Error);
  v = good;
  v.token_types = {2, 6, 1, 1};  // "a" is not <0xHH>
  EXPECT_THROW(Tokenizer{v}, Error);
  v = good;
  v.bos_id = 4;
  EXPECT_THROW(Tokenizer{v}, Error);
  v = good;
  v.unk_id = -1;  // no byte tokens and no <unk>: some bytes cannot be encoded
  EXPECT_THROW(Tokenizer{v}, Error);
  v = good;
  v.tokens.clear();
  v.scores.clear();
  v.token_types.clear();
  EXPECT_THROW(Tokenizer{v}, Error);
  v = good;
  v.scores[2] = std::nanf("");
  EXPECT_THROW(Tokenizer{v}, Error);
}

// ---------------------------------------------------------------------------
// Pre-tokenizer selection on a tiny hand-built byte-level vocabulary.

Vocabulary byte_level_vocabulary(const std::string& pre) {
  // The GPT-2 byte alphabet for the bytes used below, plus merged tokens.
  Vocabulary v;
  v.kind = TokenizerKind::kByteLevelBpe;
  v.pre = pre;
  v.tokens = {"1",
              "2",
              "3",
              "a",
              "b",
              "\xC4\xA0" /* Ġ */,
              "12",
              "123",
              "ab",
              "\xC4\xA0"
              "a"};
  v.merges = {"1 2", "12 3", "a b", "\xC4\xA0 a"};
  return v;
}

TEST(TokenizerPreTokenizer, DigitSplittingDependsOnPre) {
  // gpt-2 keeps a run of digits in one word, so the digits merge. In " ab"
  // the lower-ranked "a b" merges first, leaving "Ġ" + "ab".
  const Tokenizer gpt2(byte_level_vocabulary("gpt-2"));
  EXPECT_EQ(gpt2.encode("123 ab", false), (std::vector<int32_t>{7, 5, 8}));
  // smollm splits every digit into its own word first.
  const Tokenizer smollm(byte_level_vocabulary("smollm"));
  EXPECT_EQ(smollm.encode("123 ab", false), (std::vector<int32_t>{0, 1, 2, 5, 8}));
  // The default splits runs of digits into groups of three; "123" stays whole.
  const Tokenizer fallback(byte_level_vocabulary("default"));
  EXPECT_EQ(fallback.encode("123", false), (std::vector<int32_t>{7}));
  EXPECT_EQ(smollm.decode(smollm.encode("123 ab", false)), "123 ab");
  EXPECT_THROW(Tokenizer(byte_level_vocabulary("nonsense")), Error);
}

}  // namespace
}  // namespace xq
