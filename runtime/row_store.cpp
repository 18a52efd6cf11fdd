#include "runtime/row_store.h"

#include <algorithm>

#include "kernels/cpu/ops.h"
#include "kernels/error.h"

namespace xq {

RowStore::RowStore(int64_t width, int bits, QuantAxis axis, int32_t sequences)
    : width_(width), bits_(bits), axis_(axis) {
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
    group_code_bytes_ = row_code_bytes_ * kGroup;
    group_params_ = row_groups_.size() * kGroup;
  } else {
    group_code_bytes_ = cpu::packed_bytes(bits, int64_t{kGroup} * width);
    group_params_ = static_cast<size_t>(width);
  }
}

void RowStore::place(size_t group_offset, size_t window_offset, int32_t window_tokens) {
  group_offset_ = group_offset;
  window_offset_ = window_offset;
  window_tokens_ = window_tokens;
}

// Per token: the codes of local token `pos` (its group's block, row pos % kGroup).
// Per channel: the codes of the group holding `pos`.
const uint8_t* RowStore::codes(const BlockPool& pool, const BlockTable& table, int32_t pos) const {
  const uint8_t* block = pool.block(table.groups[pos / kGroup]) + group_offset_;
  return axis_ == QuantAxis::kPerToken ? block + static_cast<size_t>(pos % kGroup) * row_code_bytes_
                                       : block;
}

const cpu::GroupParams* RowStore::params(const BlockPool& pool, const BlockTable& table,
                                         int32_t pos) const {
  const auto* first = reinterpret_cast<const cpu::GroupParams*>(
      pool.block(table.groups[pos / kGroup]) + group_offset_ + group_code_bytes_);
  return axis_ == QuantAxis::kPerToken
             ? first + static_cast<size_t>(pos % kGroup) * row_groups_.size()
             : first;
}

uint8_t* RowStore::codes(BlockPool& pool, const BlockTable& table, int32_t pos) const {
  return const_cast<uint8_t*>(codes(static_cast<const BlockPool&>(pool), table, pos));
}

cpu::GroupParams* RowStore::params(BlockPool& pool, const BlockTable& table, int32_t pos) const {
  return const_cast<cpu::GroupParams*>(params(static_cast<const BlockPool&>(pool), table, pos));
}

const uint16_t* RowStore::window_row(const BlockPool& pool, const BlockTable& table,
                                     int32_t offset) const {
  return reinterpret_cast<const uint16_t*>(pool.block(table.window[offset / window_tokens_]) +
                                           window_offset_) +
         static_cast<size_t>(offset % window_tokens_) * width_;
}

uint16_t* RowStore::window_row(BlockPool& pool, const BlockTable& table, int32_t offset) const {
  return const_cast<uint16_t*>(window_row(static_cast<const BlockPool&>(pool), table, offset));
}

void RowStore::copy_from_window(const BlockPool& pool, const BlockTable& table, int32_t first,
                                int32_t count, uint16_t* out) const {
  for (int32_t at = first; at < first + count;) {
    const int32_t rows = std::min(window_tokens_ - at % window_tokens_, first + count - at);
    std::copy_n(window_row(pool, table, at), static_cast<size_t>(rows) * width_,
                out + static_cast<size_t>(at - first) * width_);
    at += rows;
  }
}

void RowStore::copy_to_window(BlockPool& pool, const BlockTable& table, int32_t first,
                              int32_t count, const uint16_t* rows_in) const {
  for (int32_t at = first; at < first + count;) {
    const int32_t rows = std::min(window_tokens_ - at % window_tokens_, first + count - at);
    std::copy_n(rows_in + static_cast<size_t>(at - first) * width_,
                static_cast<size_t>(rows) * width_, window_row(pool, table, at));
    at += rows;
  }
}

void RowStore::quantize_token_row(BlockPool& pool, const BlockTable& table, int32_t seq,
                                  int32_t pos, const float* row) {
  uint8_t* out = codes(pool, table, pos);
  cpu::GroupParams* out_params = params(pool, table, pos);
  for (int64_t size : row_groups_) {
    cpu::quantize_groups(row, size, size, bits_, out, out_params);
    row += size;
    out += cpu::packed_bytes(bits_, size);
    held_bytes_[seq] += cpu::packed_bytes(bits_, size) + sizeof(cpu::GroupParams);
    ++out_params;
  }
}

void RowStore::append(BlockPool& pool, const BlockTable& table, int32_t seq, int32_t pos0,
                      int32_t n, const float* rows) {
  if (pos0 == 0) truncate(pool, table, seq, 0);
  if (pos0 != lengths_[seq])
    throw Error("cache: position " + std::to_string(pos0) + " does not continue a sequence of " +
                std::to_string(lengths_[seq]) + " tokens");
  if (axis_ == QuantAxis::kPerToken) {
    for (int32_t i = 0; i < n; ++i)
      quantize_token_row(pool, table, seq, pos0 + i, rows + static_cast<size_t>(i) * width_);
    lengths_[seq] = pos0 + n;
    return;
  }
  // Per channel, a group at a time: a group this call completes is assembled
  // in fp16 here (the window's head, then the new rows) and quantized into
  // its block, exactly as if each row had waited in the window; the rows of a
  // group left partial go to the window pages.
  thread_local std::vector<uint16_t> staged;
  thread_local std::vector<float> group_rows;
  for (int32_t i = 0; i < n;) {
    const int32_t pos = pos0 + i, first = pos % kGroup;
    const int32_t count = std::min(kGroup - first, n - i);
    const float* in = rows + static_cast<size_t>(i) * width_;
    if (first + count < kGroup) {
      staged.resize(static_cast<size_t>(count) * width_);
      cpu::fp32_to_fp16_row(in, staged.data(), static_cast<int64_t>(staged.size()));
      copy_to_window(pool, table, first, count, staged.data());
      held_bytes_[seq] += static_cast<size_t>(count) * width_ * sizeof(uint16_t);
    } else {
      staged.resize(static_cast<size_t>(kGroup) * width_);
      copy_from_window(pool, table, 0, first, staged.data());
      cpu::fp32_to_fp16_row(in, staged.data() + static_cast<size_t>(first) * width_,
                            static_cast<int64_t>(count) * width_);
      group_rows.resize(staged.size());
      cpu::fp16_to_fp32_row(staged.data(), group_rows.data(),
                            static_cast<int64_t>(group_rows.size()));
      cpu::quantize_strided(group_rows.data(), kGroup, width_, width_, bits_,
                            codes(pool, table, pos), params(pool, table, pos));
      // The group leaves the fp16 window for codes and per-channel parameters.
      held_bytes_[seq] -= static_cast<size_t>(first) * width_ * sizeof(uint16_t);
      held_bytes_[seq] += group_bytes();
    }
    i += count;
  }
  lengths_[seq] = pos0 + n;
}

void RowStore::read(const BlockPool& pool, const BlockTable& table, int32_t seq, int32_t begin,
                    int32_t end, float* out) const {
  if (begin < 0 || begin > end || end > lengths_[seq])
    throw Error("cache: reading past the stored tokens");
  if (axis_ == QuantAxis::kPerToken) {
    // Every token's codes start on a byte boundary (groups are packed apart),
    // and the tokens of one block are contiguous.
    const bool uniform = width_ % row_groups_[0] == 0 && (row_groups_[0] * bits_) % 8 == 0;
    for (int32_t t = begin; t < end;) {
      const int32_t rows = std::min(kGroup - t % kGroup, end - t);
      const uint8_t* c = codes(pool, table, t);
      const cpu::GroupParams* p = params(pool, table, t);
      float* dst = out + static_cast<size_t>(t - begin) * width_;
      if (uniform) {
        // Equal groups that end on byte boundaries: one call decodes them all.
        cpu::dequantize_groups(c, p, static_cast<int64_t>(rows) * width_, row_groups_[0], bits_,
                               dst);
      } else {
        for (int32_t r = 0; r < rows; ++r)
          for (int64_t size : row_groups_) {
            cpu::dequantize_groups(c, p, size, size, bits_, dst);
            dst += size;
            c += cpu::packed_bytes(bits_, size);
            ++p;
          }
      }
      t += rows;
    }
    return;
  }
  const int32_t flushed = lengths_[seq] / kGroup;  // groups already quantized
  for (int32_t t = begin; t < end;) {
    const int32_t group = t / kGroup, first = t % kGroup;
    float* dst = out + static_cast<size_t>(t - begin) * width_;
    if (group < flushed) {
      const int32_t rows = std::min(kGroup - first, end - t);
      cpu::dequantize_strided_rows(codes(pool, table, t), params(pool, table, t), width_, bits_,
                                   first, rows, dst, width_);
      t += rows;
    } else {  // the window, page by page
      const int32_t rows = std::min(window_tokens_ - first % window_tokens_, end - t);
      cpu::fp16_to_fp32_row(window_row(pool, table, first), dst,
                            static_cast<int64_t>(rows) * width_);
      t += rows;
    }
  }
}

void RowStore::truncate(BlockPool& pool, const BlockTable& table, int32_t seq, int32_t from) {
  from = std::clamp(from, 0, lengths_[seq]);
  if (axis_ == QuantAxis::kPerChannel && from % kGroup != 0 &&
      from / kGroup < lengths_[seq] / kGroup) {
    // The kept head of a quantized group goes back to the window (as decoded),
    // so later tokens can complete the group again.
    const int32_t head = from % kGroup;
    std::vector<float> rows(static_cast<size_t>(head) * width_);
    cpu::dequantize_strided_rows(codes(pool, table, from), params(pool, table, from), width_, bits_,
                                 0, head, rows.data(), width_);
    std::vector<uint16_t> half(rows.size());
    cpu::fp32_to_fp16_row(rows.data(), half.data(), static_cast<int64_t>(rows.size()));
    copy_to_window(pool, table, 0, head, half.data());
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
  return n / kGroup * group_bytes() + (n % kGroup) * width_ * sizeof(uint16_t);
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
