// Token ids to text one id at a time, for streaming. Each push() returns only
// whole UTF-8 characters (a character split over byte tokens waits for its
// last byte), and the SentencePiece leading space is dropped as
// Tokenizer::decode() drops it, so the concatenated pieces plus finish()
// equal decode() of all the ids.
#pragma once

#include <cstdint>
#include <string>

#include "runtime/tokenizer.h"

namespace xq {

class TextStream {
 public:
  explicit TextStream(const Tokenizer& tokenizer);

  // The text `id` completes (possibly ""). Throws xq::Error for an id outside
  // the vocabulary.
  std::string push(int32_t id);
  // Bytes still held back (an unfinished UTF-8 sequence at the end), as
  // decode() would give them; the stream is then empty.
  std::string finish();

 private:
  const Tokenizer& tokenizer_;
  bool drop_leading_space_;
  std::string pending_;  // the start of a UTF-8 sequence whose last bytes have not come
};

// Length of the longest prefix of `bytes` that does not end inside a UTF-8
// sequence still missing bytes. Invalid bytes count as whole characters (they
// can never be completed, so holding them back would hide them forever).
size_t utf8_complete_prefix(const std::string& bytes);

}  // namespace xq
