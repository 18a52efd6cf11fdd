#include "runtime/row_store.h"

#include <algorithm>

#include "kernels/cpu/ops.h"
#include "kernels/error.h"

namespace xq {

RowStore::RowStore(int64_t width, int bits, QuantAxis axis, int32_t max_tokens, int32_t sequences)
    : width_(width), bits_(bits), axis_(axis), max_tokens_(max_tokens) {
  if (bits < 1 || bits > 8)
    throw Error("row store: bits must be 1..8, got " + std::to_string(bits));
  lengths_.assign(sequences, 0);
  held_bytes_.assign(sequences, 0);
  if (axis == QuantAxis::kPerToken) {
    // Groups of 128 channels; a row that is not a multiple of 128 ends with a
    // shorter group (a row narrower than 128 is one group).
    for (int64_t at = 0; at < width; at += kGroup)
      row_groups_.push_back(std::min<int64_t>(kGroup, width - at));
    for (int64_t size : row_groups_) row_code_bytes_ += cpu::packed_bytes(bits, size);
    seq_code_bytes_ = row_code_bytes_ * max_tokens;
    seq_params_ = row_groups_.size() * max_tokens;
  } else {
    block_code_bytes_ = cpu::packed_bytes(bits, int64_t{kGroup} * width);
    const size_t blocks = (max_tokens + kGroup - 1) / kGroup;
    seq_code_bytes_ = block_code_bytes_ * blocks;
    seq_params_ = static_cast<size_t>(width) * blocks;
    seq_window_ = static_cast<size_t>(kGroup) * width;
  }
  codes_.resize(seq_code_bytes_ * sequences);
  params_.resize(seq_params_ * sequences);
  window_.resize(seq_window_ * sequences);
}

void RowStore::quantize_token_row(int32_t seq, int32_t pos, const float* row) {
  uint8_t* codes =
      codes_.data() + seq * seq_code_bytes_ + static_cast<size_t>(pos) * row_code_bytes_;
  cpu::GroupParams* params =
      params_.data() + seq * seq_params_ + static_cast<size_t>(pos) * row_groups_.size();
  for (int64_t size : row_groups_) {
    cpu::quantize_groups(row, size, size, bits_, codes, params);
    row += size;
    codes += cpu::packed_bytes(bits_, size);
    held_bytes_[seq] += cpu::packed_bytes(bits_, size) + sizeof(cpu::GroupParams);
    ++params;
  }
}

void RowStore::flush_channel_group(int32_t seq, int32_t group) {
  std::vector<float> block(static_cast<size_t>(kGroup) * width_);
  cpu::fp16_to_fp32_row(window_.data() + seq * seq_window_, block.data(),
                        static_cast<int64_t>(block.size()));
  cpu::quantize_strided(
      block.data(), kGroup, width_, width_, bits_,
      codes_.data() + seq * seq_code_bytes_ + static_cast<size_t>(group) * block_code_bytes_,
      params_.data() + seq * seq_params_ + static_cast<size_t>(group) * width_);
  // The block leaves the fp16 window for codes and per-channel parameters.
  held_bytes_[seq] -= static_cast<size_t>(kGroup) * width_ * sizeof(uint16_t);
  held_bytes_[seq] += block_code_bytes_ + width_ * sizeof(cpu::GroupParams);
}

void RowStore::append(int32_t seq, int32_t pos0, int32_t n, const float* rows) {
  if (pos0 == 0) truncate(seq, 0);
  if (pos0 != lengths_[seq])
    throw Error("cache: position " + std::to_string(pos0) + " does not continue a sequence of " +
                std::to_string(lengths_[seq]) + " tokens");
  if (pos0 + n > max_tokens_)
    throw Error("cache: capacity of " + std::to_string(max_tokens_) + " tokens exceeded");
  for (int32_t i = 0; i < n; ++i) {
    const int32_t pos = pos0 + i;
    const float* row = rows + static_cast<size_t>(i) * width_;
    if (axis_ == QuantAxis::kPerToken) {
      quantize_token_row(seq, pos, row);
    } else {
      cpu::fp32_to_fp16_row(
          row, window_.data() + seq * seq_window_ + static_cast<size_t>(pos % kGroup) * width_,
          width_);
      held_bytes_[seq] += width_ * sizeof(uint16_t);
      if (pos % kGroup == kGroup - 1) flush_channel_group(seq, pos / kGroup);
    }
  }
  lengths_[seq] = pos0 + n;
}

void RowStore::read(int32_t seq, int32_t begin, int32_t end, float* out) const {
  if (begin < 0 || begin > end || end > lengths_[seq])
    throw Error("cache: reading past the stored tokens");
  if (axis_ == QuantAxis::kPerToken) {
    // Every token's codes start on a byte boundary (groups are packed apart).
    const uint8_t* codes =
        codes_.data() + seq * seq_code_bytes_ + static_cast<size_t>(begin) * row_code_bytes_;
    const cpu::GroupParams* params =
        params_.data() + seq * seq_params_ + static_cast<size_t>(begin) * row_groups_.size();
    if (width_ % row_groups_[0] == 0 && (row_groups_[0] * bits_) % 8 == 0) {
      // Equal groups that end on byte boundaries: the tokens' codes and
      // parameters are contiguous, so one call decodes them all.
      cpu::dequantize_groups(codes, params, static_cast<int64_t>(end - begin) * width_,
                             row_groups_[0], bits_, out);
      return;
    }
    for (int32_t t = begin; t < end; ++t) {
      float* row = out + static_cast<size_t>(t - begin) * width_;
      for (int64_t size : row_groups_) {
        cpu::dequantize_groups(codes, params, size, size, bits_, row);
        row += size;
        codes += cpu::packed_bytes(bits_, size);
        ++params;
      }
    }
    return;
  }
  const int32_t flushed = lengths_[seq] / kGroup;  // blocks already quantized
  for (int32_t t = begin; t < end;) {
    const int32_t block = t / kGroup, first = t % kGroup;
    const int32_t rows = std::min(kGroup - first, end - t);
    float* dst = out + static_cast<size_t>(t - begin) * width_;
    if (block < flushed) {
      cpu::dequantize_strided_rows(
          codes_.data() + seq * seq_code_bytes_ + static_cast<size_t>(block) * block_code_bytes_,
          params_.data() + seq * seq_params_ + static_cast<size_t>(block) * width_, width_, bits_,
          first, rows, dst, width_);
    } else {
      cpu::fp16_to_fp32_row(
          window_.data() + seq * seq_window_ + static_cast<size_t>(first) * width_, dst,
          static_cast<int64_t>(rows) * width_);
    }
    t += rows;
  }
}

void RowStore::truncate(int32_t seq, int32_t from) {
  from = std::clamp(from, 0, lengths_[seq]);
  if (axis_ == QuantAxis::kPerChannel && from % kGroup != 0 &&
      from / kGroup < lengths_[seq] / kGroup) {
    // The kept head of a quantized block goes back to the window (as decoded),
    // so later tokens can complete the block again.
    std::vector<float> rows(static_cast<size_t>(from % kGroup) * width_);
    const int32_t block = from / kGroup;
    cpu::dequantize_strided_rows(
        codes_.data() + seq * seq_code_bytes_ + static_cast<size_t>(block) * block_code_bytes_,
        params_.data() + seq * seq_params_ + static_cast<size_t>(block) * width_, width_, bits_, 0,
        from % kGroup, rows.data(), width_);
    cpu::fp32_to_fp16_row(rows.data(), window_.data() + seq * seq_window_,
                          static_cast<int64_t>(rows.size()));
  }
  lengths_[seq] = from;
  // Kept tokens are re-counted in their current form.
  held_bytes_[seq] = bytes_for_tokens(from);
}

double RowStore::bytes_per_token() const {
  const double param_bytes = sizeof(cpu::GroupParams);
  if (axis_ == QuantAxis::kPerToken) return row_code_bytes_ + row_groups_.size() * param_bytes;
  return bits_ * width_ / 8.0 + width_ * param_bytes / kGroup;
}

size_t RowStore::bytes_for_tokens(int32_t tokens) const {
  const size_t n = static_cast<size_t>(tokens);
  if (axis_ == QuantAxis::kPerToken)
    return n * (row_code_bytes_ + row_groups_.size() * sizeof(cpu::GroupParams));
  const size_t blocks = n / kGroup;
  return blocks * (block_code_bytes_ + width_ * sizeof(cpu::GroupParams)) +
         (n % kGroup) * width_ * sizeof(uint16_t);
}

std::string RowStore::describe() const {
  if (axis_ == QuantAxis::kPerToken) {
    std::string groups = std::to_string(row_groups_[0]);
    if (row_groups_.size() > 1 && row_groups_.back() != row_groups_[0])
      groups += " (last " + std::to_string(row_groups_.back()) + ")";
    return std::to_string(bits_) + "-bit per token, groups of " + groups + " channels" +
           (width_ < kGroup ? " (the row is narrower than 128)" : "");
  }
  return std::to_string(bits_) + "-bit per channel, groups of " + std::to_string(kGroup) +
         " tokens, newest < 128 tokens in fp16";
}

}  // namespace xq
