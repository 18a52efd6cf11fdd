// libFuzzer target: arbitrary bytes through the real vocabularies. encode()
// promises never to fail on any bytes and to be lossless where the vocabulary
// covers every byte, so each input is checked for
//   decode(encode(x)) == x    (where defined; see expect_round_trip)
//   encode(x, add_bos) == [BOS] + encode(x)
//   encode(x, parse_special) == encode(x) when no special token was matched
// and any violation aborts with the input printed.
//
// The vocabularies are llama.cpp's test vocabularies (ggml-vocab-*.gguf), read
// once from $XQ_FUZZ_VOCAB_DIR, else from the directory compiled in as
// XQ_FUZZ_DEFAULT_VOCAB_DIR.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "kernels/error.h"
#include "runtime/gguf.h"
#include "runtime/tokenizer.h"

namespace {

struct NamedTokenizer {
  std::string name;
  std::unique_ptr<xq::Tokenizer> tokenizer;
};

std::vector<NamedTokenizer>& tokenizers() {
  static std::vector<NamedTokenizer> all;
  return all;
}

xq::Vocabulary load_vocabulary(const std::string& path) {
  try {
    const auto file = xq::GgufFile::open(path);
    return xq::vocabulary_from_gguf(*file);
  } catch (const xq::Error& e) {
    std::fprintf(stderr, "fuzz_tokenizer: cannot load the vocabulary: %s\n", e.what());
    std::exit(2);
  }
}

std::string escaped(std::string_view bytes) {
  std::string out;
  for (unsigned char c : bytes) {
    if (c >= 0x20 && c < 0x7F && c != '\\') {
      out += static_cast<char>(c);
    } else {
      char hex[8];
      std::snprintf(hex, sizeof(hex), "\\x%02X", c);
      out += hex;
    }
  }
  return out;
}

std::string ids_text(const std::vector<int32_t>& ids) {
  std::string out;
  for (int32_t id : ids) out += (out.empty() ? "" : " ") + std::to_string(id);
  return out;
}

[[noreturn]] void fail(const NamedTokenizer& t, std::string_view input, const std::string& what) {
  std::fprintf(stderr, "fuzz_tokenizer [%s]: %s\n  input \"%s\"\n", t.name.c_str(), what.c_str(),
               escaped(input).c_str());
  std::abort();
}

// Whether decode(encode(x)) must give x back. Both vocabularies have a token
// for every byte, so only two things lose information, both SentencePiece's
// own conventions: U+2581 in the input decodes as a space, and the text after
// a matched special token gets its own space prefix, which decode keeps.
bool expect_round_trip(const xq::Tokenizer& tokenizer, std::string_view input,
                       const std::vector<int32_t>& ids) {
  const xq::Vocabulary& vocab = tokenizer.vocabulary();
  if (vocab.kind != xq::TokenizerKind::kSentencePiece) return true;
  if (input.find("\xE2\x96\x81") != std::string_view::npos) return false;
  for (int32_t id : ids) {
    const int32_t type = vocab.token_types[id];
    if (type != xq::token_type::kNormal && type != xq::token_type::kByte) return false;
  }
  return true;
}

bool has_special(const xq::Tokenizer& tokenizer, const std::vector<int32_t>& ids) {
  for (int32_t id : ids) {
    const int32_t type = tokenizer.vocabulary().token_types[id];
    if (type == xq::token_type::kControl || type == xq::token_type::kUnknown) return true;
  }
  return false;
}

void check(const NamedTokenizer& t, std::string_view input) {
  const xq::Tokenizer& tokenizer = *t.tokenizer;
  const std::vector<int32_t> ids = tokenizer.encode(input, false);
  for (int32_t id : ids) {
    if (id < 0 || id >= tokenizer.vocab_size())
      fail(t, input, "id " + std::to_string(id) + " out of range");
  }
  const std::string decoded = tokenizer.decode(ids);
  if (expect_round_trip(tokenizer, input, ids) && decoded != input) {
    fail(t, input,
         "decode(encode(x)) != x\n  ids   " + ids_text(ids) + "\n  decoded \"" + escaped(decoded) +
             "\"");
  }

  std::vector<int32_t> expected_with_bos = ids;
  if (tokenizer.bos_id() >= 0)
    expected_with_bos.insert(expected_with_bos.begin(), tokenizer.bos_id());
  const std::vector<int32_t> with_bos = tokenizer.encode(input, true);
  if (with_bos != expected_with_bos) {
    fail(t, input,
         "encode with BOS is not BOS + encode\n  ids      " + ids_text(ids) + "\n  with BOS " +
             ids_text(with_bos));
  }

  const std::vector<int32_t> special = tokenizer.encode(input, false, true);
  if (has_special(tokenizer, special)) {
    tokenizer.decode(special);  // must not throw: every id is in the vocabulary
  } else if (special != ids) {
    fail(t, input,
         "parse_special changed the ids without matching a special token\n  plain   " +
             ids_text(ids) + "\n  special " + ids_text(special));
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  const char* env = std::getenv("XQ_FUZZ_VOCAB_DIR");
  const std::string dir = env ? env : XQ_FUZZ_DEFAULT_VOCAB_DIR;
  xq::Vocabulary spm = load_vocabulary(dir + "/ggml-vocab-llama-spm.gguf");
  xq::Vocabulary gpt2 = load_vocabulary(dir + "/ggml-vocab-gpt-2.gguf");
  // The same byte-level vocabulary under other pre-tokenizers: SmolLM2's
  // (digits split one by one) and Llama 3's (whole-word tokens skip merging).
  xq::Vocabulary smollm = gpt2;
  smollm.pre = "smollm";
  xq::Vocabulary llama3 = gpt2;
  llama3.pre = "llama3";
  std::vector<NamedTokenizer>& all = tokenizers();
  all.push_back({"llama-spm", std::make_unique<xq::Tokenizer>(std::move(spm))});
  all.push_back({"gpt-2", std::make_unique<xq::Tokenizer>(std::move(gpt2))});
  all.push_back(
      {"gpt-2 vocab, smollm pre-tokenizer", std::make_unique<xq::Tokenizer>(std::move(smollm))});
  all.push_back(
      {"gpt-2 vocab, llama3 pre-tokenizer", std::make_unique<xq::Tokenizer>(std::move(llama3))});
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  for (const NamedTokenizer& t : tokenizers()) check(t, input);
  return 0;
}
