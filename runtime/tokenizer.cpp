#include "runtime/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <optional>
#include <queue>

#include "kernels/error.h"
#include "runtime/gguf.h"

namespace xq {
namespace {

// SentencePiece writes spaces as U+2581 LOWER ONE EIGHTH BLOCK.
constexpr std::string_view kSpaceMarker = "\xE2\x96\x81";
constexpr uint32_t kInvalidCodepoint = 0xFFFFFFFF;
constexpr uint32_t kReplacementCharacter = 0xFFFD;

// ---------------------------------------------------------------------------
// UTF-8

// Length of the UTF-8 character starting at `pos`, and its code point. A byte
// that does not start a well-formed sequence (stray continuation byte, overlong
// form, surrogate, truncated sequence, > U+10FFFF) is a one-byte character with
// code point kInvalidCodepoint, so any byte string splits into characters.
size_t decode_utf8(std::string_view s, size_t pos, uint32_t* codepoint) {
  const auto byte = [&](size_t i) { return static_cast<uint8_t>(s[i]); };
  const auto continuation = [&](size_t i, uint8_t low, uint8_t high) {
    return i < s.size() && byte(i) >= low && byte(i) <= high;
  };
  const uint8_t lead = byte(pos);
  *codepoint = kInvalidCodepoint;
  if (lead < 0x80) {
    *codepoint = lead;
    return 1;
  }
  if (lead >= 0xC2 && lead <= 0xDF) {
    if (!continuation(pos + 1, 0x80, 0xBF)) return 1;
    *codepoint = ((lead & 0x1Fu) << 6) | (byte(pos + 1) & 0x3Fu);
    return 2;
  }
  if (lead >= 0xE0 && lead <= 0xEF) {
    // The second byte's range excludes overlong forms (E0) and surrogates (ED).
    const uint8_t low = lead == 0xE0 ? 0xA0 : 0x80;
    const uint8_t high = lead == 0xED ? 0x9F : 0xBF;
    if (!continuation(pos + 1, low, high) || !continuation(pos + 2, 0x80, 0xBF)) return 1;
    *codepoint = ((lead & 0x0Fu) << 12) | ((byte(pos + 1) & 0x3Fu) << 6) | (byte(pos + 2) & 0x3Fu);
    return 3;
  }
  if (lead >= 0xF0 && lead <= 0xF4) {
    // Excludes overlong forms (F0) and code points past U+10FFFF (F4).
    const uint8_t low = lead == 0xF0 ? 0x90 : 0x80;
    const uint8_t high = lead == 0xF4 ? 0x8F : 0xBF;
    if (!continuation(pos + 1, low, high) || !continuation(pos + 2, 0x80, 0xBF) ||
        !continuation(pos + 3, 0x80, 0xBF)) {
      return 1;
    }
    *codepoint = ((lead & 0x07u) << 18) | ((byte(pos + 1) & 0x3Fu) << 12) |
                 ((byte(pos + 2) & 0x3Fu) << 6) | (byte(pos + 3) & 0x3Fu);
    return 4;
  }
  return 1;
}

size_t utf8_char_length(std::string_view s, size_t pos) {
  uint32_t unused;
  return decode_utf8(s, pos, &unused);
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// ---------------------------------------------------------------------------
// GPT-2 byte alphabet: every byte is represented by a printable character so
// that BPE tokens never contain whitespace or control characters. Printable
// Latin-1 bytes stand for themselves; the other 68 bytes map, in order, to
// U+0100 and up (so a space is "Ġ" U+0120 and a newline "Ċ" U+010A).
struct ByteAlphabet {
  std::array<std::string, 256> char_of_byte;
  std::array<int16_t, 512> byte_of_codepoint;  // -1: not an alphabet character
};

const ByteAlphabet& byte_alphabet() {
  static const ByteAlphabet alphabet = [] {
    ByteAlphabet a;
    a.byte_of_codepoint.fill(-1);
    uint32_t next_substitute = 256;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      const uint32_t cp = printable ? b : next_substitute++;
      append_utf8(a.char_of_byte[b], cp);
      a.byte_of_codepoint[cp] = static_cast<int16_t>(b);
    }
    return a;
  }();
  return alphabet;
}

// ---------------------------------------------------------------------------
// Pre-tokenizer patterns, as llama.cpp (llama-vocab.cpp) defines them per
// tokenizer.ggml.pre. Each pattern splits every piece the previous one left:
// matches and the gaps between them both become pieces, so no byte is lost.

constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S))";
constexpr const char* kLlama3Pattern =
    R"((?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr const char* kQwen2Pattern =
    R"((?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr const char* kBloomPattern = " ?[^(\\s|.,!?\u2026\u3002\uFF0C\u3001\u0964\u06D4\u060C)]+";

struct PreTokenizerSpec {
  std::vector<std::string_view> names;
  std::vector<const char*> patterns;
  bool ignore_merges = false;  // a word that is already a token is not merged
  bool add_bos = false;        // default for tokenizer.ggml.add_bos_token
};

// An unknown name is an error (as in llama.cpp), not a silent fallback to the
// GPT-2 pattern: a wrong split gives plausible-looking but wrong ids, which is
// far harder to notice than a refusal to load. Families llama.cpp knows but
// this table lacks (deepseek*, tekken, chameleon, chatglm-bpe) are refused the
// same way. An empty name means "default", as in llama.cpp. "gpt2" is accepted
// as an alias of "gpt-2".
const std::vector<PreTokenizerSpec>& pre_tokenizer_specs() {
  static const std::vector<PreTokenizerSpec> specs = {
      {{"", "default"}, {R"([\p{P}\$\+<=>\^~\|]+)", kGpt2Pattern, R"(\p{N}+)", "[0-9][0-9][0-9]"}},
      {{"gpt-2", "gpt2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v1-en", "jina-v2-es",
        "jina-v2-de", "jina-v2-code", "roberta-bpe", "mpt", "olmo", "jais"},
       {kGpt2Pattern}},
      // Digits are split one by one before the GPT-2 pattern runs.
      {{"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"},
       {R"(\p{N})", kGpt2Pattern}},
      {{"falcon"}, {R"([\p{P}\$\+<=>\^~\|`]+)", kGpt2Pattern, "[0-9][0-9][0-9]"}},
      {{"llama3", "llama-v3", "llama-bpe", "falcon3"}, {kLlama3Pattern}, true, true},
      {{"dbrx", "smaug-bpe"}, {kLlama3Pattern}},
      {{"qwen2", "stablelm2", "megrez"}, {kQwen2Pattern}},
      {{"poro-chat", "bloom", "gpt3-finnish"}, {kBloomPattern}},
      {{"viking"}, {kBloomPattern, R"(\p{N})"}},
  };
  return specs;
}

const PreTokenizerSpec* find_pre_tokenizer(std::string_view name) {
  for (const PreTokenizerSpec& spec : pre_tokenizer_specs()) {
    if (std::find(spec.names.begin(), spec.names.end(), name) != spec.names.end()) return &spec;
  }
  return nullptr;
}

std::string known_pre_tokenizers() {
  std::string list;
  for (const PreTokenizerSpec& spec : pre_tokenizer_specs()) {
    for (std::string_view name : spec.names) {
      if (name.empty()) continue;
      if (!list.empty()) list += ", ";
      list += name;
    }
  }
  return list;
}

// ---------------------------------------------------------------------------
// Vocabulary checks shared by the loaders and the Tokenizer constructor.

bool is_byte_token_text(std::string_view text) {
  return text.size() == 6 && text.substr(0, 3) == "<0x" && text[5] == '>' &&
         std::isxdigit(static_cast<unsigned char>(text[3])) &&
         std::isxdigit(static_cast<unsigned char>(text[4]));
}

uint8_t byte_token_value(std::string_view text) {
  const auto hex = [](char c) -> uint8_t {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return c - 'A' + 10;
  };
  return static_cast<uint8_t>(hex(text[3]) << 4 | hex(text[4]));
}

std::string hex_byte(uint32_t b) {
  static const char kDigits[] = "0123456789ABCDEF";
  return {'0', 'x', kDigits[(b >> 4) & 15], kDigits[b & 15]};
}

// Throws xq::Error("<source>: <problem>") for the first inconsistency found.
void validate_vocabulary(const Vocabulary& v, const std::string& source) {
  const auto fail = [&](const std::string& problem) { throw Error(source + ": " + problem); };
  const size_t n = v.tokens.size();
  if (n == 0) fail("the vocabulary has no tokens");
  if (n >= static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
    fail("the vocabulary has " + std::to_string(n) + " tokens, more than token ids can address");
  }
  if (!v.scores.empty() && v.scores.size() != n) {
    fail(std::to_string(v.scores.size()) + " token scores for " + std::to_string(n) + " tokens");
  }
  if (!v.token_types.empty() && v.token_types.size() != n) {
    fail(std::to_string(v.token_types.size()) + " token types for " + std::to_string(n) +
         " tokens");
  }
  for (size_t i = 0; i < v.scores.size(); ++i) {
    if (std::isnan(v.scores[i])) fail("token " + std::to_string(i) + " has a NaN score");
  }
  for (size_t i = 0; i < v.token_types.size(); ++i) {
    const int32_t type = v.token_types[i];
    if (type < token_type::kUndefined || type > token_type::kByte) {
      fail("token " + std::to_string(i) + " has unknown type " + std::to_string(type));
    }
    if (v.kind == TokenizerKind::kSentencePiece && type == token_type::kByte &&
        !is_byte_token_text(v.tokens[i])) {
      fail("token " + std::to_string(i) + " is a byte token but its text is not <0xHH>");
    }
  }
  const auto check_id = [&](int32_t id, const char* what) {
    if (id != -1 && (id < 0 || static_cast<size_t>(id) >= n)) {
      fail(std::string(what) + " id " + std::to_string(id) + " is outside the vocabulary of " +
           std::to_string(n) + " tokens");
    }
  };
  check_id(v.bos_id, "BOS");
  check_id(v.eos_id, "EOS");
  check_id(v.unk_id, "unknown-token");
  if (v.kind == TokenizerKind::kByteLevelBpe) {
    if (!find_pre_tokenizer(v.pre)) {
      fail("unknown pre-tokenizer '" + v.pre + "' (known: " + known_pre_tokenizers() + ")");
    }
    for (size_t i = 0; i < v.merges.size(); ++i) {
      // As llama.cpp: the separator is the first space after the first byte.
      if (v.merges[i].find(' ', 1) == std::string::npos) {
        fail("merge " + std::to_string(i) + " ('" + v.merges[i] + "') is not two tokens " +
             "separated by a space");
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Priority-queue merging shared by both encoders: a doubly linked list of
// symbols (each a byte range of the text being merged) and a heap of candidate
// pairs. A candidate is stale once either symbol has grown or vanished, which
// the recorded combined length detects (symbols only ever grow).

struct Symbol {
  size_t start;   // byte offset in the merged text
  size_t length;  // 0 once merged into its left neighbour
  int64_t prev;
  int64_t next;
};

std::vector<Symbol> split_into_characters(std::string_view text) {
  std::vector<Symbol> symbols;
  symbols.reserve(text.size());
  for (size_t pos = 0; pos < text.size();) {
    const size_t length = utf8_char_length(text, pos);
    const int64_t index = static_cast<int64_t>(symbols.size());
    symbols.push_back({pos, length, index - 1, pos + length == text.size() ? -1 : index + 1});
    pos += length;
  }
  return symbols;
}

std::string_view symbol_text(std::string_view text, const Symbol& s) {
  return text.substr(s.start, s.length);
}

// Merges the pair (left, left.next) in place.
void merge_symbols(std::vector<Symbol>& symbols, int64_t left) {
  Symbol& l = symbols[left];
  Symbol& r = symbols[l.next];
  l.length += r.length;
  r.length = 0;
  l.next = r.next;
  if (r.next >= 0) symbols[r.next].prev = left;
}

std::string replace_spaces_with_marker(std::string_view text, bool prefix_space) {
  std::string out;
  out.reserve(text.size() + 16);
  if (prefix_space) out += kSpaceMarker;
  for (char c : text) {
    if (c == ' ') {
      out += kSpaceMarker;
    } else {
      out += c;
    }
  }
  return out;
}

std::string replace_marker_with_spaces(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (size_t pos = 0; pos < text.size();) {
    if (text.substr(pos, kSpaceMarker.size()) == kSpaceMarker) {
      out += ' ';
      pos += kSpaceMarker.size();
    } else {
      out += text[pos++];
    }
  }
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------
// PCRE2-backed pre-tokenizer.

class Tokenizer::PreTokenizer {
 public:
  explicit PreTokenizer(const PreTokenizerSpec& spec) {
    for (const char* pattern : spec.patterns) {
      int error_code = 0;
      PCRE2_SIZE error_offset = 0;
      pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern), PCRE2_ZERO_TERMINATED,
                                       PCRE2_UTF | PCRE2_UCP, &error_code, &error_offset, nullptr);
      if (!code) {
        PCRE2_UCHAR message[256];
        pcre2_get_error_message(error_code, message, sizeof(message));
        throw Error(std::string("pre-tokenizer pattern does not compile: ") +
                    reinterpret_cast<const char*>(message));
      }
      // JIT is only a speed-up; without it (or if it fails) the interpreter runs.
      pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
      patterns_.push_back(code);
    }
  }
  ~PreTokenizer() {
    for (pcre2_code* code : patterns_) pcre2_code_free(code);
  }
  PreTokenizer(const PreTokenizer&) = delete;
  PreTokenizer& operator=(const PreTokenizer&) = delete;

  // Splits `text` into words (views into `text`) that cover it exactly.
  std::vector<std::string_view> split(std::string_view text) const {
    // PCRE2 in UTF mode needs valid UTF-8, so it sees a copy where each invalid
    // byte is U+FFFD -- the character llama.cpp substitutes, so the split is
    // the same -- while the words keep the original bytes. U+180E is replaced
    // the same way because PCRE2 counts it as \s but llama.cpp's whitespace
    // table (Unicode White_Space) does not; U+FFFD is in the same classes
    // (not \s, \p{L}, \p{N}, \p{P}) that llama.cpp gives U+180E.
    std::string subject;
    subject.reserve(text.size());
    std::vector<size_t> original_offset;  // per subject byte: start of its original character
    original_offset.reserve(text.size() + 1);
    for (size_t pos = 0; pos < text.size();) {
      uint32_t cp;
      const size_t length = decode_utf8(text, pos, &cp);
      if (cp == kInvalidCodepoint || cp == 0x180E) {
        append_utf8(subject, kReplacementCharacter);
      } else {
        subject.append(text, pos, length);
      }
      original_offset.resize(subject.size(), pos);
      pos += length;
    }
    original_offset.push_back(text.size());

    std::vector<size_t> lengths;  // piece lengths in subject bytes
    if (!subject.empty()) lengths.push_back(subject.size());
    MatchData match_data(pcre2_match_data_create(1, nullptr));
    if (!match_data) throw std::bad_alloc();
    std::vector<size_t> next;
    for (const pcre2_code* pattern : patterns_) {
      next.clear();
      size_t base = 0;
      for (size_t length : lengths) {
        split_piece(pattern, match_data.get(), std::string_view(subject).substr(base, length),
                    next);
        base += length;
      }
      lengths.swap(next);
    }

    std::vector<std::string_view> words;
    words.reserve(lengths.size());
    size_t base = 0;
    for (size_t length : lengths) {
      const size_t begin = original_offset[base];
      const size_t end = original_offset[base + length];
      words.push_back(text.substr(begin, end - begin));
      base += length;
    }
    return words;
  }

 private:
  struct MatchDataDeleter {
    void operator()(pcre2_match_data* data) const { pcre2_match_data_free(data); }
  };
  using MatchData = std::unique_ptr<pcre2_match_data, MatchDataDeleter>;

  // Appends the lengths of the matches of `pattern` in `piece` and of the gaps
  // between them. The piece is the whole subject of the match, so lookaheads
  // stop at its end, as llama.cpp's splitter does.
  static void split_piece(const pcre2_code* pattern, pcre2_match_data* match_data,
                          std::string_view piece, std::vector<size_t>& out) {
    const auto subject = reinterpret_cast<PCRE2_SPTR>(piece.data());
    size_t covered = 0;
    while (covered < piece.size()) {
      // The subject was built as valid UTF-8 above, so PCRE2 need not re-check
      // it on every call (which would make splitting quadratic).
      const uint32_t options = PCRE2_NO_UTF_CHECK | PCRE2_NOTEMPTY;
      int rc = pcre2_match(pattern, subject, piece.size(), covered, options, match_data, nullptr);
      if (rc < 0 && rc != PCRE2_ERROR_NOMATCH) {
        // JIT stack or match limit on a pathological input: retry interpreted,
        // and failing that leave the rest as one word rather than fail.
        rc = pcre2_match(pattern, subject, piece.size(), covered, options | PCRE2_NO_JIT,
                         match_data, nullptr);
      }
      if (rc < 0) break;
      const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(match_data);
      const size_t match_begin = ovector[0];
      const size_t match_end = ovector[1];
      if (match_end <= match_begin || match_begin < covered) break;  // cannot happen; be safe
      if (match_begin > covered) out.push_back(match_begin - covered);
      out.push_back(match_end - match_begin);
      covered = match_end;
    }
    if (covered < piece.size()) out.push_back(piece.size() - covered);
  }

  std::vector<pcre2_code*> patterns_;
};

// ---------------------------------------------------------------------------
// Loaders.

Vocabulary vocabulary_from_gguf(const GgufFile& file) {
  const std::string& path = file.path();
  const auto fail = [&](const std::string& problem) { throw Error(path + ": " + problem); };

  Vocabulary v;
  const std::optional<std::string> model = file.get_string("tokenizer.ggml.model");
  if (!model) fail("missing tokenizer.ggml.model");
  // Defaults for absent keys are llama.cpp's.
  int32_t default_bos = -1, default_eos = -1, default_unk = -1;
  if (*model == "llama") {
    v.kind = TokenizerKind::kSentencePiece;
    default_bos = 1, default_eos = 2, default_unk = 0;
    v.add_bos = true;
    v.add_space_prefix = true;
  } else if (*model == "gpt2") {
    v.kind = TokenizerKind::kByteLevelBpe;
    default_bos = 11, default_eos = 11, default_unk = -1;
    v.add_bos = false;
    v.add_space_prefix = false;
  } else {
    fail("unsupported tokenizer.ggml.model '" + *model + "' (supported: llama, gpt2)");
  }
  v.pre = file.get_string("tokenizer.ggml.pre").value_or("");

  const std::vector<std::string>* tokens = file.get_string_array("tokenizer.ggml.tokens");
  if (!tokens) fail("missing tokenizer.ggml.tokens");
  v.tokens = *tokens;
  const size_t n = v.tokens.size();
  if (n == 0) fail("tokenizer.ggml.tokens is empty");
  if (n >= static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
    fail("tokenizer.ggml.tokens has too many entries");
  }

  if (const std::vector<double>* scores = file.get_float_array("tokenizer.ggml.scores")) {
    if (scores->size() != n) {
      fail("tokenizer.ggml.scores has " + std::to_string(scores->size()) + " entries for " +
           std::to_string(n) + " tokens");
    }
    v.scores.assign(scores->begin(), scores->end());
  }
  if (const std::vector<int64_t>* types = file.get_int_array("tokenizer.ggml.token_type")) {
    if (types->size() != n) {
      fail("tokenizer.ggml.token_type has " + std::to_string(types->size()) + " entries for " +
           std::to_string(n) + " tokens");
    }
    v.token_types.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      const int64_t type = (*types)[i];
      if (type < token_type::kUndefined || type > token_type::kByte) {
        fail("tokenizer.ggml.token_type[" + std::to_string(i) + "] = " + std::to_string(type) +
             " is not a token type (0..6)");
      }
      v.token_types.push_back(static_cast<int32_t>(type));
    }
  } else {
    v.token_types.assign(n, token_type::kNormal);
  }
  if (v.kind == TokenizerKind::kByteLevelBpe) {
    const std::vector<std::string>* merges = file.get_string_array("tokenizer.ggml.merges");
    if (!merges) fail("missing tokenizer.ggml.merges (required for a gpt2 tokenizer)");
    v.merges = *merges;
    const PreTokenizerSpec* spec = find_pre_tokenizer(v.pre);
    if (!spec) {
      fail("unknown tokenizer.ggml.pre '" + v.pre + "' (known: " + known_pre_tokenizers() + ")");
    }
    v.add_bos = spec->add_bos;
  }

  const auto read_id = [&](const char* key, int32_t default_id) -> int32_t {
    const std::optional<int64_t> id = file.get_int(key);
    if (!id) return default_id >= 0 && static_cast<size_t>(default_id) < n ? default_id : -1;
    if (*id < 0 || static_cast<uint64_t>(*id) >= n) {
      fail(std::string(key) + " = " + std::to_string(*id) + " is outside the vocabulary of " +
           std::to_string(n) + " tokens");
    }
    return static_cast<int32_t>(*id);
  };
  v.bos_id = read_id("tokenizer.ggml.bos_token_id", default_bos);
  v.eos_id = read_id("tokenizer.ggml.eos_token_id", default_eos);
  v.unk_id = read_id("tokenizer.ggml.unknown_token_id", default_unk);
  v.add_bos = file.get_bool("tokenizer.ggml.add_bos_token").value_or(v.add_bos);
  v.add_space_prefix =
      file.get_bool("tokenizer.ggml.add_space_prefix").value_or(v.add_space_prefix);

  // llama.cpp forces these end-of-generation texts to control type whatever
  // the file says; that decides whether parse_special may match them, so do
  // the same to tokenize identically.
  static const std::string_view kEndOfGenerationTexts[] = {
      "<|eot_id|>",    "<|im_end|>", "<|end|>", "<end_of_turn>",
      "<|endoftext|>", "<|eom_id|>", "<EOT>"};
  for (size_t i = 0; i < n; ++i) {
    for (std::string_view text : kEndOfGenerationTexts) {
      if (v.tokens[i] == text) v.token_types[i] = token_type::kControl;
    }
  }

  validate_vocabulary(v, path);
  return v;
}

Vocabulary vocabulary_from_llama2c(const std::string& tokenizer_path, int32_t vocab_size) {
  const auto fail = [&](const std::string& problem) {
    throw Error(tokenizer_path + ": " + problem);
  };
  if (vocab_size < 3) {
    fail("vocabulary size " + std::to_string(vocab_size) +
         " is too small (ids 0, 1, 2 are <unk>, <s>, </s>)");
  }
  std::ifstream in(tokenizer_path, std::ios::binary);
  if (!in) fail("cannot open tokenizer file");
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) fail("read error");

  size_t pos = 0;
  const auto read_pod = [&](auto* value, const char* what) {
    if (bytes.size() - pos < sizeof(*value)) {
      fail(std::string("truncated file: ") + what + " runs past the end at byte " +
           std::to_string(pos));
    }
    std::memcpy(value, bytes.data() + pos, sizeof(*value));
    pos += sizeof(*value);
  };

  int32_t max_token_length = 0;
  read_pod(&max_token_length, "the header");
  if (max_token_length <= 0) {
    fail("max token length " + std::to_string(max_token_length) + " is not positive");
  }

  Vocabulary v;
  v.kind = TokenizerKind::kSentencePiece;
  v.tokens.reserve(vocab_size);
  v.scores.reserve(vocab_size);
  v.token_types.reserve(vocab_size);
  for (int32_t i = 0; i < vocab_size; ++i) {
    const std::string what = "token " + std::to_string(i);
    float score = 0;
    int32_t length = 0;
    read_pod(&score, what.c_str());
    read_pod(&length, what.c_str());
    if (std::isnan(score)) fail(what + " has a NaN score");
    if (length < 0 || length > max_token_length) {
      fail(what + " has length " + std::to_string(length) + " (max token length is " +
           std::to_string(max_token_length) + ")");
    }
    if (bytes.size() - pos < static_cast<size_t>(length)) {
      fail("truncated file: " + what + " runs past the end at byte " + std::to_string(pos));
    }
    std::string text = bytes.substr(pos, length);
    pos += length;

    int32_t type = token_type::kNormal;
    if (i == 0) {
      type = token_type::kUnknown;
    } else if (i == 1 || i == 2) {
      type = token_type::kControl;
    } else if (is_byte_token_text(text)) {
      type = token_type::kByte;
    } else {
      // llama2.c keeps SentencePiece's spaces as ' '; restore U+2581 so the
      // SentencePiece encoder (which escapes spaces in the input) applies.
      text = replace_spaces_with_marker(text, false);
    }
    v.tokens.push_back(std::move(text));
    v.scores.push_back(score);
    v.token_types.push_back(type);
  }
  v.unk_id = 0;
  v.bos_id = 1;
  v.eos_id = 2;
  v.add_bos = true;
  // llama2.c's encode() prepends the " " token to non-empty text: exactly the
  // SentencePiece space prefix.
  v.add_space_prefix = true;
  validate_vocabulary(v, tokenizer_path);
  return v;
}

// ---------------------------------------------------------------------------
// Tokenizer.

size_t Tokenizer::PairHash::operator()(std::pair<std::string_view, std::string_view> p) const {
  const size_t a = std::hash<std::string_view>{}(p.first);
  const size_t b = std::hash<std::string_view>{}(p.second);
  return a ^ (b + 0x9E3779B97F4A7C15ull + (a << 6) + (a >> 2));
}

Tokenizer::Tokenizer(Vocabulary vocab) : vocab_(std::move(vocab)) {
  validate_vocabulary(vocab_, "tokenizer vocabulary");
  const size_t n = vocab_.tokens.size();
  if (vocab_.scores.empty()) vocab_.scores.assign(n, 0.0f);
  if (vocab_.token_types.empty()) vocab_.token_types.assign(n, token_type::kNormal);
  const bool sentencepiece = vocab_.kind == TokenizerKind::kSentencePiece;

  // A text that appears twice maps to the later id, as in llama.cpp.
  token_ids_.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    if (!vocab_.tokens[i].empty()) token_ids_[vocab_.tokens[i]] = static_cast<int32_t>(i);
  }

  // Control, user-defined and unknown tokens are cut out of the text before
  // it is split, longest first (llama.cpp's special-token cache). The sort is
  // stable so equal lengths keep id order.
  for (size_t i = 0; i < n; ++i) {
    const int32_t type = vocab_.token_types[i];
    if ((type == token_type::kControl || type == token_type::kUserDefined ||
         type == token_type::kUnknown) &&
        !vocab_.tokens[i].empty()) {
      special_ids_.push_back(static_cast<int32_t>(i));
    }
  }
  std::stable_sort(special_ids_.begin(), special_ids_.end(), [&](int32_t a, int32_t b) {
    return vocab_.tokens[a].size() > vocab_.tokens[b].size();
  });

  pieces_.resize(n);
  const ByteAlphabet& alphabet = byte_alphabet();
  for (size_t i = 0; i < n; ++i) {
    const std::string& text = vocab_.tokens[i];
    switch (vocab_.token_types[i]) {
      case token_type::kUserDefined:
        pieces_[i] = text;
        break;
      case token_type::kNormal:
        if (sentencepiece) {
          pieces_[i] = replace_marker_with_spaces(text);
        } else {
          // Undo the byte alphabet; a character outside it is kept as is.
          std::string bytes;
          for (size_t pos = 0; pos < text.size();) {
            uint32_t cp;
            const size_t length = decode_utf8(text, pos, &cp);
            if (cp < alphabet.byte_of_codepoint.size() && alphabet.byte_of_codepoint[cp] >= 0) {
              bytes += static_cast<char>(alphabet.byte_of_codepoint[cp]);
            } else {
              bytes.append(text, pos, length);
            }
            pos += length;
          }
          pieces_[i] = std::move(bytes);
        }
        break;
      case token_type::kByte:
        // Validation guarantees the <0xHH> form for SentencePiece; byte-level
        // BPE has no byte tokens of this kind and llama.cpp prints nothing.
        if (sentencepiece) pieces_[i] = std::string(1, static_cast<char>(byte_token_value(text)));
        break;
      default:  // control, unknown, unused, undefined: nothing to print
        break;
    }
  }

  if (sentencepiece) {
    // Byte fallback: the <0xHH> token, else a token that is the byte itself,
    // else <unk>. llama.cpp aborts when none exists; refuse such a vocabulary
    // up front instead, so encode() never has to fail.
    for (uint32_t b = 0; b < 256; ++b) {
      int32_t id = find_token("<" + hex_byte(b) + ">");
      if (id < 0) id = find_token(std::string(1, static_cast<char>(b)));
      if (id < 0) id = vocab_.unk_id;
      if (id < 0) {
        throw Error("tokenizer vocabulary: no token for byte " + hex_byte(b) +
                    " (no <0xHH> byte token and no unknown token)");
      }
      byte_tokens_[b] = id;
    }
  } else {
    for (uint32_t b = 0; b < 256; ++b) {
      int32_t id = find_token(alphabet.char_of_byte[b]);
      byte_tokens_[b] = id >= 0 ? id : vocab_.unk_id;  // -1: the byte is dropped, as in llama.cpp
    }
    merge_ranks_.reserve(vocab_.merges.size());
    for (size_t i = 0; i < vocab_.merges.size(); ++i) {
      const std::string& merge = vocab_.merges[i];
      const size_t space = merge.find(' ', 1);
      // emplace keeps the first (lowest) rank of a duplicated merge, as llama.cpp.
      merge_ranks_.emplace(std::make_pair(merge.substr(0, space), merge.substr(space + 1)),
                           static_cast<int32_t>(i));
    }
    const PreTokenizerSpec* spec = find_pre_tokenizer(vocab_.pre);
    ignore_merges_ = spec->ignore_merges;
    pre_tokenizer_ = std::make_unique<PreTokenizer>(*spec);
  }
}

Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

int32_t Tokenizer::find_token(std::string_view text) const {
  const auto it = token_ids_.find(text);
  return it == token_ids_.end() ? -1 : it->second;
}

int32_t Tokenizer::merge_rank(std::string_view left, std::string_view right) const {
  const auto it = merge_ranks_.find(std::pair<std::string_view, std::string_view>(left, right));
  return it == merge_ranks_.end() ? -1 : it->second;
}

const std::string& Tokenizer::token_to_piece(int32_t id) const {
  if (id < 0 || id >= vocab_size()) {
    throw Error("token id " + std::to_string(id) + " is outside the vocabulary of " +
                std::to_string(vocab_size()) + " tokens");
  }
  return pieces_[id];
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string text;
  bool drop_leading_space = vocab_.kind == TokenizerKind::kSentencePiece && vocab_.add_space_prefix;
  for (int32_t id : ids) {
    const std::string& piece = token_to_piece(id);
    if (piece.empty()) continue;
    if (drop_leading_space) {
      drop_leading_space = false;
      if (piece[0] == ' ') {
        text.append(piece, 1);
        continue;
      }
    }
    text += piece;
  }
  return text;
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_bos,
                                       bool parse_special) const {
  std::vector<int32_t> ids;
  if (add_bos && vocab_.bos_id >= 0) ids.push_back(vocab_.bos_id);

  // Cut special-token texts out first: a fragment is either one token or a
  // stretch of plain text.
  struct Fragment {
    int32_t token;  // -1: plain text
    size_t offset, length;
  };
  std::vector<Fragment> fragments;
  if (!text.empty()) fragments.push_back({-1, 0, text.size()});
  std::vector<Fragment> next;
  for (int32_t id : special_ids_) {
    if (!parse_special && vocab_.token_types[id] != token_type::kUserDefined) continue;
    const std::string& needle = vocab_.tokens[id];
    next.clear();
    for (const Fragment& fragment : fragments) {
      if (fragment.token >= 0) {
        next.push_back(fragment);
        continue;
      }
      const size_t end = fragment.offset + fragment.length;
      const std::string_view window = text.substr(0, end);
      size_t pos = fragment.offset;
      for (size_t match; (match = window.find(needle, pos)) != std::string_view::npos;) {
        if (match > pos) next.push_back({-1, pos, match - pos});
        next.push_back({id, match, needle.size()});
        pos = match + needle.size();
      }
      if (pos < end) next.push_back({-1, pos, end - pos});
    }
    fragments.swap(next);
  }

  // SentencePiece prefixes a space to text at the start and after each special token.
  bool after_special = true;
  for (const Fragment& fragment : fragments) {
    if (fragment.token >= 0) {
      ids.push_back(fragment.token);
      after_special = true;
      continue;
    }
    const std::string_view piece = text.substr(fragment.offset, fragment.length);
    if (vocab_.kind == TokenizerKind::kSentencePiece) {
      encode_sentencepiece(
          replace_spaces_with_marker(piece, vocab_.add_space_prefix && after_special), ids);
    } else {
      encode_byte_level(piece, ids);
    }
    after_special = false;
  }
  return ids;
}

void Tokenizer::encode_sentencepiece(std::string_view text, std::vector<int32_t>& out) const {
  if (text.empty()) return;
  std::vector<Symbol> symbols = split_into_characters(text);

  // Highest score first; on equal scores the leftmost pair.
  struct Candidate {
    float score;
    int64_t left, right;
    size_t length;
  };
  const auto lower_priority = [](const Candidate& a, const Candidate& b) {
    return a.score < b.score || (a.score == b.score && a.left > b.left);
  };
  std::priority_queue<Candidate, std::vector<Candidate>, decltype(lower_priority)> queue(
      lower_priority);
  const auto consider = [&](int64_t left, int64_t right) {
    if (left < 0 || right < 0) return;
    const size_t length = symbols[left].length + symbols[right].length;
    const int32_t id = find_token(text.substr(symbols[left].start, length));
    if (id >= 0) queue.push({vocab_.scores[id], left, right, length});
  };

  for (size_t i = 1; i < symbols.size(); ++i) consider(i - 1, i);
  while (!queue.empty()) {
    const Candidate best = queue.top();
    queue.pop();
    const Symbol& left = symbols[best.left];
    const Symbol& right = symbols[best.right];
    if (left.length == 0 || right.length == 0 || left.length + right.length != best.length) {
      continue;
    }
    merge_symbols(symbols, best.left);
    consider(symbols[best.left].prev, best.left);
    consider(best.left, symbols[best.left].next);
  }

  // Every merged symbol is a token; a single character may not be, and then
  // falls back to its bytes.
  for (int64_t i = 0; i >= 0; i = symbols[i].next) {
    const std::string_view piece = symbol_text(text, symbols[i]);
    const int32_t id = find_token(piece);
    if (id >= 0) {
      out.push_back(id);
    } else {
      for (char c : piece) out.push_back(byte_tokens_[static_cast<uint8_t>(c)]);
    }
  }
}

void Tokenizer::encode_byte_level(std::string_view text, std::vector<int32_t>& out) const {
  for (std::string_view word : pre_tokenizer_->split(text)) merge_byte_level_word(word, out);
}

void Tokenizer::merge_byte_level_word(std::string_view word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  const ByteAlphabet& alphabet = byte_alphabet();
  // The word in the byte alphabet; symbol i starts as the character for byte i.
  std::string encoded;
  encoded.reserve(word.size() * 2);
  std::vector<Symbol> symbols;
  symbols.reserve(word.size());
  for (size_t i = 0; i < word.size(); ++i) {
    const std::string& c = alphabet.char_of_byte[static_cast<uint8_t>(word[i])];
    const int64_t index = static_cast<int64_t>(i);
    symbols.push_back({encoded.size(), c.size(), index - 1, i + 1 == word.size() ? -1 : index + 1});
    encoded += c;
  }
  const std::string_view text = encoded;
  if (ignore_merges_) {
    const int32_t id = find_token(text);
    if (id >= 0) {
      out.push_back(id);
      return;
    }
  }

  // Lowest rank first; on equal ranks the leftmost pair.
  struct Candidate {
    int32_t rank;
    int64_t left, right;
    size_t length;
  };
  const auto lower_priority = [](const Candidate& a, const Candidate& b) {
    return a.rank > b.rank || (a.rank == b.rank && a.left > b.left);
  };
  std::priority_queue<Candidate, std::vector<Candidate>, decltype(lower_priority)> queue(
      lower_priority);
  const auto consider = [&](int64_t left, int64_t right) {
    if (left < 0 || right < 0) return;
    const int32_t rank =
        merge_rank(symbol_text(text, symbols[left]), symbol_text(text, symbols[right]));
    if (rank >= 0) {
      queue.push({rank, left, right, symbols[left].length + symbols[right].length});
    }
  };

  for (size_t i = 1; i < symbols.size(); ++i) consider(i - 1, i);
  while (!queue.empty()) {
    const Candidate best = queue.top();
    queue.pop();
    const Symbol& left = symbols[best.left];
    const Symbol& right = symbols[best.right];
    if (left.length == 0 || right.length == 0 || left.length + right.length != best.length) {
      continue;
    }
    merge_symbols(symbols, best.left);
    consider(symbols[best.left].prev, best.left);
    consider(best.left, symbols[best.left].next);
  }

  for (int64_t i = 0; i >= 0; i = symbols[i].next) {
    const int32_t id = find_token(symbol_text(text, symbols[i]));
    if (id >= 0) {
      out.push_back(id);
      continue;
    }
    // A merge whose result is not in the vocabulary (a malformed vocabulary):
    // fall back to the token of each byte the symbol covers. Symbol i covers
    // the bytes from i up to the next surviving symbol.
    const int64_t end = symbols[i].next >= 0 ? symbols[i].next : static_cast<int64_t>(word.size());
    for (int64_t b = i; b < end; ++b) {
      const int32_t byte_id = byte_tokens_[static_cast<uint8_t>(word[b])];
      if (byte_id >= 0) out.push_back(byte_id);
    }
  }
}

}  // namespace xq
