#include "kernels/tensor_type.h"

namespace xq {

const TensorTypeTraits* tensor_type_traits(uint32_t type_id) {
  // Sizes follow the block structs of the GGUF specification.
  static const TensorTypeTraits kF32{"F32", 1, 4};
  static const TensorTypeTraits kF16{"F16", 1, 2};
  static const TensorTypeTraits kBF16{"BF16", 1, 2};
  static const TensorTypeTraits kQ4_0{"Q4_0", 32, 2 + 16};
  static const TensorTypeTraits kQ4_1{"Q4_1", 32, 2 + 2 + 16};
  static const TensorTypeTraits kQ5_0{"Q5_0", 32, 2 + 4 + 16};
  static const TensorTypeTraits kQ5_1{"Q5_1", 32, 2 + 2 + 4 + 16};
  static const TensorTypeTraits kQ8_0{"Q8_0", 32, 2 + 32};
  static const TensorTypeTraits kQ8_1{"Q8_1", 32, 2 + 2 + 32};
  static const TensorTypeTraits kQ2_K{"Q2_K", 256, 16 + 64 + 2 + 2};
  static const TensorTypeTraits kQ3_K{"Q3_K", 256, 32 + 64 + 12 + 2};
  static const TensorTypeTraits kQ4_K{"Q4_K", 256, 2 + 2 + 12 + 128};
  static const TensorTypeTraits kQ5_K{"Q5_K", 256, 2 + 2 + 12 + 32 + 128};
  static const TensorTypeTraits kQ6_K{"Q6_K", 256, 128 + 64 + 16 + 2};
  static const TensorTypeTraits kQ8_K{"Q8_K", 256, 4 + 256 + 32};
  switch (static_cast<TensorType>(type_id)) {
    case TensorType::kF32:
      return &kF32;
    case TensorType::kF16:
      return &kF16;
    case TensorType::kBF16:
      return &kBF16;
    case TensorType::kQ4_0:
      return &kQ4_0;
    case TensorType::kQ4_1:
      return &kQ4_1;
    case TensorType::kQ5_0:
      return &kQ5_0;
    case TensorType::kQ5_1:
      return &kQ5_1;
    case TensorType::kQ8_0:
      return &kQ8_0;
    case TensorType::kQ8_1:
      return &kQ8_1;
    case TensorType::kQ2_K:
      return &kQ2_K;
    case TensorType::kQ3_K:
      return &kQ3_K;
    case TensorType::kQ4_K:
      return &kQ4_K;
    case TensorType::kQ5_K:
      return &kQ5_K;
    case TensorType::kQ6_K:
      return &kQ6_K;
    case TensorType::kQ8_K:
      return &kQ8_K;
  }
  return nullptr;
}

const char* tensor_type_name(TensorType type) {
  const TensorTypeTraits* traits = tensor_type_traits(static_cast<uint32_t>(type));
  return traits ? traits->name : "unknown";
}

}  // namespace xq
