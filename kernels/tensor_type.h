// Tensor element types as numbered by the GGUF format (ggml's type ids), with
// their block layout. Quantized types store a row as whole blocks; one block
// holds `block_elems` values in `block_bytes` bytes.
#pragma once

#include <cstddef>
#include <cstdint>

namespace xq {

enum class TensorType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ8_1 = 9,
  kQ2_K = 10,
  kQ3_K = 11,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kQ8_K = 15,
  kBF16 = 30,
};

struct TensorTypeTraits {
  const char* name;
  int64_t block_elems;
  int64_t block_bytes;
};

// Layout of a GGUF type id, or nullptr for ids this runtime does not read.
const TensorTypeTraits* tensor_type_traits(uint32_t type_id);

inline const TensorTypeTraits& tensor_type_traits(TensorType type) {
  return *tensor_type_traits(static_cast<uint32_t>(type));
}

const char* tensor_type_name(TensorType type);

// A (rows, cols) matrix stored row by row in `type`: row r holds the cols input
// weights of output r, so y = W x is one dot product per row.
struct WeightMatrix {
  TensorType type = TensorType::kF32;
  const uint8_t* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  size_t row_bytes = 0;

  const uint8_t* row(int64_t r) const { return data + static_cast<size_t>(r) * row_bytes; }
  size_t bytes() const { return row_bytes * static_cast<size_t>(rows); }
};

}  // namespace xq
