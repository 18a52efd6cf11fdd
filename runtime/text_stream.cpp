#include "runtime/text_stream.h"

namespace xq {

size_t utf8_complete_prefix(const std::string& bytes) {
  const size_t size = bytes.size();
  // A sequence is at most 4 bytes: only its lead byte among the last 4 can
  // start an unfinished one.
  for (size_t back = 1; back <= 4 && back <= size; ++back) {
    const auto c = static_cast<unsigned char>(bytes[size - back]);
    if ((c & 0xC0) == 0x80) continue;  // continuation byte: keep looking for the lead
    size_t length = 1;
    if ((c & 0xE0) == 0xC0)
      length = 2;
    else if ((c & 0xF0) == 0xE0)
      length = 3;
    else if ((c & 0xF8) == 0xF0)
      length = 4;
    return back < length ? size - back : size;
  }
  return size;
}

TextStream::TextStream(const Tokenizer& tokenizer)
    : tokenizer_(tokenizer),
      drop_leading_space_(tokenizer.vocabulary().kind == TokenizerKind::kSentencePiece &&
                          tokenizer.vocabulary().add_space_prefix) {}

std::string TextStream::push(int32_t id) {
  const std::string& piece = tokenizer_.token_to_piece(id);
  if (piece.empty()) return {};
  // decode() drops the encoder's space from the first non-empty piece only.
  if (drop_leading_space_) {
    drop_leading_space_ = false;
    pending_.append(piece, piece[0] == ' ' ? 1 : 0, std::string::npos);
  } else {
    pending_ += piece;
  }
  const size_t ready = utf8_complete_prefix(pending_);
  std::string out = pending_.substr(0, ready);
  pending_.erase(0, ready);
  return out;
}

std::string TextStream::finish() {
  std::string out;
  out.swap(pending_);
  return out;
}

}  // namespace xq
