// Quantized per-token row storage for the quantized cache modes: one row of
// `width` values per token of each sequence, kept at `bits` bits in one of two
// layouts (xquant-spec §1, §2, §5):
//   per token:   each row split into groups of up to 128 consecutive channels,
//                quantized as soon as it arrives;
//   per channel: groups of 128 tokens along each channel; the newest tokens
//                (fewer than a group) wait in fp16 until their group is full.
// Scales and zero points are fp16.
// The rows live in the blocks of the cache pool (runtime/block_pool.h): a
// store owns a region at the same offset of every group block of a sequence
// (the group's codes, then its parameters; per token, 128 rows of each in
// token order, so any run of tokens inside a block is contiguous), and, per
// channel, a region of every window page (window_tokens fp16 rows). The cache
// places its stores and keeps the sequences' block tables; a store only
// addresses through them.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/cpu/group_quant.h"
#include "runtime/block_pool.h"

namespace xq {

enum class QuantAxis { kPerToken, kPerChannel };

class RowStore {
 public:
  RowStore(int64_t width, int bits, QuantAxis axis, int32_t sequences);

  // Bytes of one full group of kGroup tokens in a block: codes, then fp16
  // scale and zero point pairs.
  size_t group_bytes() const {
    return group_code_bytes_ + group_params_ * sizeof(cpu::GroupParams);
  }
  // fp16 bytes of one token in the window (per channel; 0 per token).
  size_t window_row_bytes() const {
    return axis_ == QuantAxis::kPerChannel ? static_cast<size_t>(width_) * sizeof(uint16_t) : 0;
  }
  // The store's region: `group_offset` bytes into each group block,
  // `window_offset` bytes into each window page of `window_tokens` rows.
  void place(size_t group_offset, size_t window_offset, int32_t window_tokens);

  // Stores rows (n, width) for local positions [pos0, pos0 + n) of `seq`.
  // Positions must continue the sequence (pos0 == its current length) or
  // restart it. The table must already hold the blocks for pos0 + n tokens:
  // the groups up to there and, per channel, the window pages of the last
  // partial group; groups completed in this call never pass through pages.
  void append(BlockPool& pool, const BlockTable& table, int32_t seq, int32_t pos0, int32_t n,
              const float* rows);
  // Reads tokens [begin, end) back as fp32 rows into out (end - begin, width).
  // Safe to call from several threads at once (it only reads).
  void read(const BlockPool& pool, const BlockTable& table, int32_t seq, int32_t begin, int32_t end,
            float* out) const;
  // Keeps the first `from` tokens. Per channel, the kept head of a quantized
  // group goes back to the window as decoded, so the table must hold the
  // window pages of `from` tokens.
  void truncate(BlockPool& pool, const BlockTable& table, int32_t seq, int32_t from);
  int32_t length(int32_t seq) const { return lengths_[seq]; }
  // The layout (runtime/cache_layout.h reports it).
  int64_t width() const { return width_; }
  int bits() const { return bits_; }
  QuantAxis axis() const { return axis_; }
  size_t group_offset() const { return group_offset_; }
  size_t window_offset() const { return window_offset_; }
  size_t row_code_bytes() const { return row_code_bytes_; }
  int64_t row_groups() const { return static_cast<int64_t>(row_groups_.size()); }
  size_t group_code_bytes() const { return group_code_bytes_; }
  int32_t sequences() const { return static_cast<int32_t>(lengths_.size()); }

  // Bytes per token from the formula: codes + scales/zeros (amortized), not
  // counting the fp16 window of a partial group.
  double bytes_per_token() const;
  // Bytes `tokens` tokens take by the formula (window included).
  size_t bytes_for_tokens(int32_t tokens) const;
  // Bytes the stored tokens of `seq` occupy now, counted as they were written:
  // quantized codes with their parameters, plus the fp16 window (the payload,
  // not the blocks that hold it).
  size_t payload_bytes(int32_t seq) const { return held_bytes_[seq]; }
  // The group sizes along the row (per token) or the token group (per channel).
  std::string describe() const;

  static constexpr int32_t kGroup = 128;

 private:
  uint8_t* codes(BlockPool& pool, const BlockTable& table, int32_t pos) const;
  cpu::GroupParams* params(BlockPool& pool, const BlockTable& table, int32_t pos) const;
  const uint8_t* codes(const BlockPool& pool, const BlockTable& table, int32_t pos) const;
  const cpu::GroupParams* params(const BlockPool& pool, const BlockTable& table, int32_t pos) const;
  // The window row of in-group offset `offset` (per channel).
  uint16_t* window_row(BlockPool& pool, const BlockTable& table, int32_t offset) const;
  const uint16_t* window_row(const BlockPool& pool, const BlockTable& table, int32_t offset) const;
  // Window rows [first, first + count) of the partial group, copied across pages.
  void copy_from_window(const BlockPool& pool, const BlockTable& table, int32_t first,
                        int32_t count, uint16_t* out) const;
  void copy_to_window(BlockPool& pool, const BlockTable& table, int32_t first, int32_t count,
                      const uint16_t* rows) const;
  void quantize_token_row(BlockPool& pool, const BlockTable& table, int32_t seq, int32_t pos,
                          const float* row);

  int64_t width_;
  int bits_;
  QuantAxis axis_;
  // Per-token layout: groups along the row; the last may be shorter.
  std::vector<int64_t> row_groups_;  // sizes
  size_t row_code_bytes_ = 0;        // packed bytes of one row
  // Bytes of codes and count of parameters in one block of kGroup tokens.
  size_t group_code_bytes_ = 0, group_params_ = 0;
  size_t group_offset_ = 0, window_offset_ = 0;
  int32_t window_tokens_ = 0;
  std::vector<int32_t> lengths_;
  std::vector<size_t> held_bytes_;  // per sequence, counted at each write
};

}  // namespace xq
