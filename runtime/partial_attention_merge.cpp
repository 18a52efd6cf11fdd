#include "runtime/partial_attention_merge.h"

#include <algorithm>
#include <vector>

namespace xq {

void merge_across(Communicator& group, cpu::PartialAttention& state) {
  const int members = group.size();
  if (members == 1) return;
  const size_t rows = static_cast<size_t>(state.rows), width = static_cast<size_t>(state.width);
  if (state.max.size() != rows || state.sum.size() != rows || state.acc.size() != rows * width)
    throw xq::Error("merge_across: partial attention buffers do not match its shape");

  // One record per member: max (rows), sum (rows), acc (rows * width).
  const size_t record = rows * (2 + width);
  std::vector<float> mine(record), all(record * static_cast<size_t>(members));
  std::copy(state.max.begin(), state.max.end(), mine.begin());
  std::copy(state.sum.begin(), state.sum.end(), mine.begin() + rows);
  std::copy(state.acc.begin(), state.acc.end(), mine.begin() + 2 * rows);
  group.all_gather(mine.data(), record, all.data());

  // Every member merges the same records in the same order: same bits.
  cpu::PartialAttention merged, other;
  merged.reset(state.rows, state.width);
  other.reset(state.rows, state.width);
  for (int m = 0; m < members; ++m) {
    const float* from = all.data() + static_cast<size_t>(m) * record;
    std::copy(from, from + rows, other.max.begin());
    std::copy(from + rows, from + 2 * rows, other.sum.begin());
    std::copy(from + 2 * rows, from + record, other.acc.begin());
    cpu::merge_partial_attention(merged, other);
  }
  state = std::move(merged);
}

}  // namespace xq
