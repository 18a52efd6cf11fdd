// GGUF (versions 2 and 3) reader. The file is memory-mapped; every length,
// count, type id, shape and offset is validated against the file size before
// use, so a corrupt file produces an xq::Error ("<path>: <problem>"), never a
// read past the map.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "kernels/tensor_type.h"
#include "runtime/mapped_file.h"

namespace xq {

enum class GgufValueType : uint32_t {
  kUint8 = 0,
  kInt8 = 1,
  kUint16 = 2,
  kInt16 = 3,
  kUint32 = 4,
  kInt32 = 5,
  kFloat32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kUint64 = 10,
  kInt64 = 11,
  kFloat64 = 12,
};

// One metadata value. Scalars are widened on read; arrays keep their element
// type and are decoded into the matching vector.
struct GgufValue {
  GgufValueType type = GgufValueType::kUint8;
  GgufValueType array_type = GgufValueType::kUint8;  // for kArray
  int64_t int_value = 0;                             // all integer types and bool
  uint64_t uint_value = 0;
  double float_value = 0;
  std::string string_value;
  std::vector<std::string> string_array;  // array of strings
  std::vector<int64_t> int_array;         // array of integers or bools
  std::vector<double> float_array;        // array of floats
  uint64_t array_count = 0;
};

struct GgufTensor {
  std::string name;
  std::vector<int64_t> shape;  // shape[0] is the contiguous (fastest) dimension
  TensorType type = TensorType::kF32;
  uint64_t offset = 0;  // relative to the data section
  uint64_t bytes = 0;
  const uint8_t* data = nullptr;

  int64_t elements() const;
};

class GgufFile {
 public:
  // Maps and parses the file. Throws xq::Error naming the path and the problem.
  static std::unique_ptr<GgufFile> open(const std::string& path);
  // Parses an in-memory image (used by the fuzzer); `label` names it in errors.
  static std::unique_ptr<GgufFile> parse(const uint8_t* data, size_t size,
                                         const std::string& label);

  const std::string& path() const { return label_; }
  uint32_t version() const { return version_; }
  const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return metadata_; }
  const std::vector<GgufTensor>& tensors() const { return tensors_; }

  const GgufValue* find(std::string_view key) const;
  const GgufTensor* find_tensor(std::string_view name) const;

  // Typed getters: nullopt when the key is absent; xq::Error when it holds the
  // wrong type.
  std::optional<int64_t> get_int(std::string_view key) const;
  std::optional<double> get_float(std::string_view key) const;
  std::optional<bool> get_bool(std::string_view key) const;
  std::optional<std::string> get_string(std::string_view key) const;
  const std::vector<std::string>* get_string_array(std::string_view key) const;
  const std::vector<int64_t>* get_int_array(std::string_view key) const;
  const std::vector<double>* get_float_array(std::string_view key) const;

 private:
  GgufFile() = default;
  void parse_image(const uint8_t* data, size_t size);

  std::string label_;
  MappedFile map_;
  uint32_t version_ = 0;
  std::vector<std::pair<std::string, GgufValue>> metadata_;
  std::unordered_map<std::string, size_t> metadata_index_;
  std::vector<GgufTensor> tensors_;
  std::unordered_map<std::string, size_t> tensor_index_;
};

}  // namespace xq
