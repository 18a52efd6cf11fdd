// Quantized per-token row storage for the quantized cache modes: one row of
// `width` values per token of each sequence, kept at `bits` bits in one of two
// layouts (xquant-spec §1, §2, §5):
//   per token:   each row split into groups of up to 128 consecutive channels,
//                quantized as soon as it arrives;
//   per channel: groups of 128 tokens along each channel; the newest tokens
//                (fewer than a group) wait in fp16 until their group is full.
// Scales and zero points are fp16.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/cpu/group_quant.h"

namespace xq {

enum class QuantAxis { kPerToken, kPerChannel };

class RowStore {
 public:
  RowStore(int64_t width, int bits, QuantAxis axis, int32_t max_tokens, int32_t sequences);

  // Stores rows (n, width) for positions [pos0, pos0 + n) of `seq`. Positions
  // must continue the sequence (pos0 == its current length) or restart it.
  void append(int32_t seq, int32_t pos0, int32_t n, const float* rows);
  // Reads tokens [begin, end) back as fp32 rows into out (end - begin, width).
  // Safe to call from several threads at once (it only reads).
  void read(int32_t seq, int32_t begin, int32_t end, float* out) const;
  void truncate(int32_t seq, int32_t from);
  int32_t length(int32_t seq) const { return lengths_[seq]; }
  int32_t sequences() const { return static_cast<int32_t>(lengths_.size()); }

  // Bytes per token from the formula: codes + scales/zeros (amortized), not
  // counting the fp16 window of a partial group.
  double bytes_per_token() const;
  // Bytes `tokens` tokens take by the formula (window included).
  size_t bytes_for_tokens(int32_t tokens) const;
  // Bytes the stored tokens of `seq` occupy now, counted as they were written:
  // quantized codes with their parameters, plus the fp16 window.
  size_t bytes_in_use(int32_t seq) const { return held_bytes_[seq]; }
  // The group sizes along the row (per token) or the token group (per channel).
  std::string describe() const;

  static constexpr int32_t kGroup = 128;

 private:
  void quantize_token_row(int32_t seq, int32_t pos, const float* row);
  void flush_channel_group(int32_t seq, int32_t group);

  int64_t width_;
  int bits_;
  QuantAxis axis_;
  int32_t max_tokens_;
  // Per-token layout: groups along the row; the last may be shorter.
  std::vector<int64_t> row_groups_;  // sizes
  size_t row_code_bytes_ = 0;        // packed bytes of one row
  // Per-channel layout: each full block of kGroup tokens is one strided group.
  size_t block_code_bytes_ = 0;
  size_t seq_code_bytes_ = 0, seq_params_ = 0, seq_window_ = 0;
  std::vector<uint8_t> codes_;
  std::vector<cpu::GroupParams> params_;
  std::vector<uint16_t>
      window_;  // fp16 rows not yet quantized (per channel), or all rows at 16 bits
  std::vector<int32_t> lengths_;
  std::vector<size_t> held_bytes_;  // per sequence, counted at each write
};

}  // namespace xq
