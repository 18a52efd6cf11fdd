// cpu::matmul on a column slice of a larger matrix (data at the first column's
// block, cols = slice width, row_bytes of the full row), as tensor parallelism
// cuts Wo and down: the same bits as the slice copied into a packed matrix,
// for one row of x, a short tile of rows and several tiles.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

#include "kernels/cpu/matmul.h"
#include "kernels/cpu/quant.h"

namespace xq {
namespace {

TEST(MatmulSlice, ColumnSliceWithFullRowStrideEqualsPackedCopy) {
  const int64_t rows = 40, cols = 160, first = 64, width = 64;
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> values(static_cast<size_t>(rows * cols));
  for (float& v : values) v = normal(rng);
  for (TensorType type :
       {TensorType::kF32, TensorType::kF16, TensorType::kQ4_1, TensorType::kQ8_0}) {
    const TensorTypeTraits& t = tensor_type_traits(type);
    const size_t row_bytes = static_cast<size_t>(cols / t.block_elems * t.block_bytes);
    const size_t slice_row_bytes = static_cast<size_t>(width / t.block_elems * t.block_bytes);
    const size_t offset = static_cast<size_t>(first / t.block_elems * t.block_bytes);
    std::vector<uint8_t> full(row_bytes * rows), packed(slice_row_bytes * rows);
    for (int64_t r = 0; r < rows; ++r) {
      cpu::quantize_row(type, values.data() + r * cols, full.data() + r * row_bytes, cols);
      std::memcpy(packed.data() + r * slice_row_bytes, full.data() + r * row_bytes + offset,
                  slice_row_bytes);
    }
    WeightMatrix sliced{type, full.data() + offset, rows, width, row_bytes};
    WeightMatrix copy{type, packed.data(), rows, width, slice_row_bytes};
    for (int64_t n : {1, 3, 20}) {
      std::vector<float> x(static_cast<size_t>(n * width));
      for (float& v : x) v = normal(rng);
      std::vector<float> a(static_cast<size_t>(n * rows)), b(a.size());
      cpu::matmul(sliced, x.data(), n, a.data());
      cpu::matmul(copy, x.data(), n, b.data());
      for (size_t i = 0; i < a.size(); ++i)
        ASSERT_EQ(a[i], b[i]) << tensor_type_name(type) << " n=" << n << " at " << i;
    }
  }
}

}  // namespace
}  // namespace xq
