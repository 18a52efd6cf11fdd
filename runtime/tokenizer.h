// Text <-> token ids for the two tokenizer families llama.cpp calls SPM and
// BPE: SentencePiece-style score merging (LLaMA, llama2.c) and GPT-2 style
// byte-level BPE with a regex pre-tokenizer. The encoders reproduce
// llama.cpp's results id for id (its tokenizer test vectors are the judge);
// where this file departs from it, the .cpp says so next to the code.
//
// encode() accepts arbitrary bytes: invalid UTF-8 is tokenized byte by byte
// (byte tokens for SentencePiece, the byte alphabet for BPE), so it never
// throws and decode(encode(text)) returns the original bytes.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace xq {

class GgufFile;

enum class TokenizerKind { kSentencePiece, kByteLevelBpe };

// GGUF tokenizer.ggml.token_type values.
namespace token_type {
inline constexpr int32_t kUndefined = 0;
inline constexpr int32_t kNormal = 1;
inline constexpr int32_t kUnknown = 2;
inline constexpr int32_t kControl = 3;
inline constexpr int32_t kUserDefined = 4;
inline constexpr int32_t kUnused = 5;
inline constexpr int32_t kByte = 6;
}  // namespace token_type

struct Vocabulary {
  TokenizerKind kind = TokenizerKind::kSentencePiece;
  std::string pre;  // GGUF tokenizer.ggml.pre ("gpt-2", "smollm", "default", ...)
  std::vector<std::string> tokens;
  std::vector<float> scores;         // SentencePiece merge priority; empty means all 0
  std::vector<int32_t> token_types;  // token_type::*; empty means all normal
  std::vector<std::string> merges;   // byte-level BPE merges "a b", rank = index
  int32_t bos_id = -1, eos_id = -1, unk_id = -1;
  bool add_bos = false, add_space_prefix = false;
};

// Reads the tokenizer.ggml.* keys. Throws xq::Error naming the file when a key
// is missing, has the wrong type, arrays disagree in length, an id is out of
// range, or the model / pre-tokenizer is one this runtime does not implement.
Vocabulary vocabulary_from_gguf(const GgufFile& file);

// Reads a llama2.c tokenizer.bin holding at least `vocab_size` tokens. Tokens
// are normalized to SentencePiece form (spaces become U+2581) so the same
// encoder reproduces llama2.c's encode(): ids 0, 1, 2 are <unk>, <s>, </s>,
// <0xXX> tokens are byte fallback, and a dummy space prefixes non-empty text.
Vocabulary vocabulary_from_llama2c(const std::string& tokenizer_path, int32_t vocab_size);

class Tokenizer {
 public:
  // Validates the vocabulary (throws xq::Error on any inconsistency) and
  // builds the lookup tables.
  explicit Tokenizer(Vocabulary vocab);
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  // Text to ids. add_bos prepends BOS (when the vocabulary has one).
  // parse_special: the texts of control and unknown tokens in the input map to
  // their ids. User-defined tokens are always matched as whole tokens, as in
  // llama.cpp and Hugging Face tokenizers. Never throws on any input bytes.
  std::vector<int32_t> encode(std::string_view text, bool add_bos,
                              bool parse_special = false) const;

  // The bytes a token decodes to: byte tokens <0xAB> give that byte, U+2581
  // gives a space (SentencePiece), the GPT-2 byte alphabet is reversed (BPE),
  // user-defined tokens give their text, control/unknown/unused tokens give "".
  // Throws xq::Error for an id outside the vocabulary.
  const std::string& token_to_piece(int32_t id) const;

  // Concatenated pieces. For SentencePiece with add_space_prefix, the single
  // leading space the encoder added is dropped from the first non-empty piece
  // (so a leading BOS does not keep it). No other clean-up is applied. To
  // stream generated text, print token_to_piece() of each new id instead:
  // decoding one id at a time would drop every word's leading space.
  std::string decode(const std::vector<int32_t>& ids) const;

  int32_t vocab_size() const { return static_cast<int32_t>(vocab_.tokens.size()); }
  int32_t bos_id() const { return vocab_.bos_id; }
  int32_t eos_id() const { return vocab_.eos_id; }
  int32_t unk_id() const { return vocab_.unk_id; }
  bool add_bos() const { return vocab_.add_bos; }
  const Vocabulary& vocabulary() const { return vocab_; }

  // Token id for an exact token text, or -1.
  int32_t find_token(std::string_view text) const;

 private:
  struct StringHash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
  };
  struct PairHash {
    using is_transparent = void;
    size_t operator()(std::pair<std::string_view, std::string_view> p) const;
    size_t operator()(const std::pair<std::string, std::string>& p) const {
      return (*this)(std::pair<std::string_view, std::string_view>(p.first, p.second));
    }
  };
  struct PairEqual {
    using is_transparent = void;
    template <typename A, typename B>
    bool operator()(const A& a, const B& b) const {
      return std::string_view(a.first) == std::string_view(b.first) &&
             std::string_view(a.second) == std::string_view(b.second);
    }
  };
  class PreTokenizer;  // compiled PCRE2 patterns (defined in the .cpp)

  void encode_sentencepiece(std::string_view text, std::vector<int32_t>& out) const;
  void encode_byte_level(std::string_view text, std::vector<int32_t>& out) const;
  void merge_byte_level_word(std::string_view word, std::vector<int32_t>& out) const;
  int32_t merge_rank(std::string_view left, std::string_view right) const;

  Vocabulary vocab_;
  std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>> token_ids_;
  std::unordered_map<std::pair<std::string, std::string>, int32_t, PairHash, PairEqual>
      merge_ranks_;
  std::vector<int32_t> special_ids_;  // matched before splitting; longest text first
  std::vector<std::string> pieces_;   // token_to_piece, precomputed
  // SentencePiece: token for a byte that no merged piece covers (-1: none).
  // Byte-level BPE: token for the byte's GPT-2 alphabet character.
  std::array<int32_t, 256> byte_tokens_{};
  bool ignore_merges_ = false;  // BPE: a word that is a whole token skips merging
  std::unique_ptr<PreTokenizer> pre_tokenizer_;
};

}  // namespace xq
