#include "runtime/gguf.h"

#include <cstring>
#include <limits>

#include "kernels/error.h"

namespace xq {
namespace {

constexpr uint32_t kGgufMagic = 0x46554747;  // "GGUF" read as little-endian uint32
constexpr uint64_t kDefaultAlignment = 32;
// Bounds that no real model approaches; they turn absurd counts in a corrupt
// header into an error before any allocation is attempted.
constexpr uint64_t kMaxTensors = 1u << 20;
constexpr uint64_t kMaxMetadata = 1u << 20;
constexpr uint32_t kMaxDims = 4;
constexpr uint64_t kMaxArrayNesting = 1;

// Sequential reader over the mapped bytes; every read is bounds-checked.
class Cursor {
 public:
  Cursor(const uint8_t* data, size_t size, const std::string& label)
      : data_(data), size_(size), label_(label) {}

  [[noreturn]] void fail(const std::string& problem) const {
    throw Error(label_ + ": " + problem + " (at byte " + std::to_string(pos_) + ")");
  }

  template <typename T>
  T read() {
    if (size_ - pos_ < sizeof(T)) fail("truncated file: expected more header bytes");
    T value;
    std::memcpy(&value, data_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return value;
  }

  std::string read_string() {
    uint64_t length = read<uint64_t>();
    if (length > size_ - pos_)
      fail("string length " + std::to_string(length) + " runs past the end of the file");
    std::string s(reinterpret_cast<const char*>(data_ + pos_), length);
    pos_ += length;
    return s;
  }

  size_t position() const { return pos_; }
  size_t remaining() const { return size_ - pos_; }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
  const std::string& label_;
};

size_t scalar_size(GgufValueType type) {
  switch (type) {
    case GgufValueType::kUint8:
    case GgufValueType::kInt8:
    case GgufValueType::kBool:
      return 1;
    case GgufValueType::kUint16:
    case GgufValueType::kInt16:
      return 2;
    case GgufValueType::kUint32:
    case GgufValueType::kInt32:
    case GgufValueType::kFloat32:
      return 4;
    case GgufValueType::kUint64:
    case GgufValueType::kInt64:
    case GgufValueType::kFloat64:
      return 8;
    default:
      return 0;
  }
}

bool is_integer(GgufValueType type) {
  return type == GgufValueType::kUint8 || type == GgufValueType::kInt8 ||
         type == GgufValueType::kUint16 || type == GgufValueType::kInt16 ||
         type == GgufValueType::kUint32 || type == GgufValueType::kInt32 ||
         type == GgufValueType::kUint64 || type == GgufValueType::kInt64 ||
         type == GgufValueType::kBool;
}

bool is_float(GgufValueType type) {
  return type == GgufValueType::kFloat32 || type == GgufValueType::kFloat64;
}

// Reads one scalar of `type`, widened to int64 (integers, bools) or double (floats).
void read_scalar(Cursor& cursor, GgufValueType type, int64_t& as_int, double& as_float) {
  switch (type) {
    case GgufValueType::kUint8:
      as_int = cursor.read<uint8_t>();
      break;
    case GgufValueType::kInt8:
      as_int = cursor.read<int8_t>();
      break;
    case GgufValueType::kUint16:
      as_int = cursor.read<uint16_t>();
      break;
    case GgufValueType::kInt16:
      as_int = cursor.read<int16_t>();
      break;
    case GgufValueType::kUint32:
      as_int = cursor.read<uint32_t>();
      break;
    case GgufValueType::kInt32:
      as_int = cursor.read<int32_t>();
      break;
    case GgufValueType::kUint64: {
      uint64_t v = cursor.read<uint64_t>();
      if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        cursor.fail("uint64 metadata value too large");
      as_int = static_cast<int64_t>(v);
      break;
    }
    case GgufValueType::kInt64:
      as_int = cursor.read<int64_t>();
      break;
    case GgufValueType::kBool: {
      uint8_t v = cursor.read<uint8_t>();
      if (v > 1) cursor.fail("bool metadata value is " + std::to_string(v));
      as_int = v;
      break;
    }
    case GgufValueType::kFloat32:
      as_float = cursor.read<float>();
      break;
    case GgufValueType::kFloat64:
      as_float = cursor.read<double>();
      break;
    default:
      cursor.fail("unknown metadata value type " + std::to_string(static_cast<uint32_t>(type)));
  }
  if (is_integer(type)) as_float = static_cast<double>(as_int);
}

GgufValue read_value(Cursor& cursor, GgufValueType type, uint64_t depth) {
  GgufValue value;
  value.type = type;
  if (type == GgufValueType::kString) {
    value.string_value = cursor.read_string();
  } else if (type == GgufValueType::kArray) {
    if (depth >= kMaxArrayNesting) cursor.fail("nested metadata arrays are not supported");
    value.array_type = static_cast<GgufValueType>(cursor.read<uint32_t>());
    value.array_count = cursor.read<uint64_t>();
    // Every element takes at least one byte (strings at least eight), which
    // bounds the count by the bytes left before anything is allocated.
    size_t min_elem =
        value.array_type == GgufValueType::kString ? 8 : scalar_size(value.array_type);
    if (min_elem == 0)
      cursor.fail("unsupported metadata array element type " +
                  std::to_string(static_cast<uint32_t>(value.array_type)));
    if (value.array_count > cursor.remaining() / min_elem)
      cursor.fail("metadata array of " + std::to_string(value.array_count) +
                  " elements runs past the end of the file");
    if (value.array_type == GgufValueType::kString) {
      value.string_array.reserve(value.array_count);
      for (uint64_t i = 0; i < value.array_count; ++i)
        value.string_array.push_back(cursor.read_string());
    } else if (is_float(value.array_type)) {
      value.float_array.resize(value.array_count);
      for (uint64_t i = 0; i < value.array_count; ++i) {
        int64_t unused = 0;
        read_scalar(cursor, value.array_type, unused, value.float_array[i]);
      }
    } else {
      value.int_array.resize(value.array_count);
      for (uint64_t i = 0; i < value.array_count; ++i) {
        double unused = 0;
        read_scalar(cursor, value.array_type, value.int_array[i], unused);
      }
    }
  } else {
    read_scalar(cursor, type, value.int_value, value.float_value);
    value.uint_value = static_cast<uint64_t>(value.int_value);
  }
  return value;
}

}  // namespace

int64_t GgufTensor::elements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::unique_ptr<GgufFile> GgufFile::open(const std::string& path) {
  std::unique_ptr<GgufFile> file(new GgufFile());
  file->label_ = path;
  file->map_ = MappedFile(path);
  file->parse_image(file->map_.data(), file->map_.size());
  return file;
}

std::unique_ptr<GgufFile> GgufFile::parse(const uint8_t* data, size_t size,
                                          const std::string& label) {
  std::unique_ptr<GgufFile> file(new GgufFile());
  file->label_ = label;
  file->parse_image(data, size);
  return file;
}

void GgufFile::parse_image(const uint8_t* data, size_t size) {
  Cursor cursor(data, size, label_);
  if (size < 4) cursor.fail("file too short to be GGUF (" + std::to_string(size) + " bytes)");
  uint32_t magic = cursor.read<uint32_t>();
  if (magic != kGgufMagic) cursor.fail("wrong magic: not a GGUF file");
  version_ = cursor.read<uint32_t>();
  if (version_ != 2 && version_ != 3)
    cursor.fail("unsupported GGUF version " + std::to_string(version_) + " (2 and 3 are read)");
  uint64_t tensor_count = cursor.read<uint64_t>();
  uint64_t metadata_count = cursor.read<uint64_t>();
  if (tensor_count > kMaxTensors)
    cursor.fail("absurd tensor count " + std::to_string(tensor_count));
  if (metadata_count > kMaxMetadata)
    cursor.fail("absurd metadata count " + std::to_string(metadata_count));

  for (uint64_t i = 0; i < metadata_count; ++i) {
    std::string key = cursor.read_string();
    auto type = static_cast<GgufValueType>(cursor.read<uint32_t>());
    GgufValue value = read_value(cursor, type, 0);
    if (metadata_index_.count(key)) cursor.fail("duplicate metadata key '" + key + "'");
    metadata_index_.emplace(key, metadata_.size());
    metadata_.emplace_back(std::move(key), std::move(value));
  }

  uint64_t alignment = kDefaultAlignment;
  if (auto a = get_int("general.alignment")) {
    if (*a <= 0 || (*a & (*a - 1)) != 0)
      cursor.fail("general.alignment " + std::to_string(*a) + " is not a power of two");
    alignment = static_cast<uint64_t>(*a);
  }

  tensors_.reserve(tensor_count);
  for (uint64_t i = 0; i < tensor_count; ++i) {
    GgufTensor tensor;
    tensor.name = cursor.read_string();
    uint32_t dims = cursor.read<uint32_t>();
    if (dims == 0 || dims > kMaxDims)
      cursor.fail("tensor '" + tensor.name + "' has " + std::to_string(dims) + " dimensions");
    // Elements must stay far below 2^62 so that byte counts cannot overflow.
    uint64_t elements = 1;
    for (uint32_t d = 0; d < dims; ++d) {
      uint64_t extent = cursor.read<uint64_t>();
      if (extent == 0 || extent > (uint64_t{1} << 40) || elements > (uint64_t{1} << 48) / extent)
        cursor.fail("tensor '" + tensor.name + "' has absurd dimension " + std::to_string(extent));
      elements *= extent;
      tensor.shape.push_back(static_cast<int64_t>(extent));
    }
    uint32_t type_id = cursor.read<uint32_t>();
    const TensorTypeTraits* traits = tensor_type_traits(type_id);
    if (!traits)
      cursor.fail("tensor '" + tensor.name + "' has unknown or unsupported type id " +
                  std::to_string(type_id));
    tensor.type = static_cast<TensorType>(type_id);
    if (tensor.shape[0] % traits->block_elems != 0)
      cursor.fail("tensor '" + tensor.name + "' row of " + std::to_string(tensor.shape[0]) +
                  " values is not a whole number of " + traits->name + " blocks");
    tensor.bytes = elements / traits->block_elems * traits->block_bytes;
    tensor.offset = cursor.read<uint64_t>();
    if (tensor.offset % alignment != 0)
      cursor.fail("tensor '" + tensor.name + "' offset is not aligned to " +
                  std::to_string(alignment));
    if (tensor_index_.count(tensor.name))
      cursor.fail("duplicate tensor name '" + tensor.name + "'");
    tensor_index_.emplace(tensor.name, tensors_.size());
    tensors_.push_back(std::move(tensor));
  }

  uint64_t data_start = (cursor.position() + alignment - 1) / alignment * alignment;
  if (tensor_count > 0 && data_start > size)
    cursor.fail("tensor data section starts past the end of the file");
  for (GgufTensor& tensor : tensors_) {
    uint64_t available = size - data_start;
    if (tensor.offset > available || tensor.bytes > available - tensor.offset)
      throw Error(label_ + ": tensor '" + tensor.name + "' data (" + std::to_string(tensor.bytes) +
                  " bytes at offset " + std::to_string(tensor.offset) +
                  ") runs past the end of the file");
    tensor.data = data + data_start + tensor.offset;
  }
}

const GgufValue* GgufFile::find(std::string_view key) const {
  auto it = metadata_index_.find(std::string(key));
  return it == metadata_index_.end() ? nullptr : &metadata_[it->second].second;
}

const GgufTensor* GgufFile::find_tensor(std::string_view name) const {
  auto it = tensor_index_.find(std::string(name));
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

namespace {
[[noreturn]] void wrong_type(const std::string& label, std::string_view key, const char* wanted) {
  throw Error(label + ": metadata key '" + std::string(key) + "' is not " + wanted);
}
}  // namespace

std::optional<int64_t> GgufFile::get_int(std::string_view key) const {
  const GgufValue* v = find(key);
  if (!v) return std::nullopt;
  if (!is_integer(v->type)) wrong_type(label_, key, "an integer");
  return v->int_value;
}

std::optional<double> GgufFile::get_float(std::string_view key) const {
  const GgufValue* v = find(key);
  if (!v) return std::nullopt;
  if (!is_float(v->type) && !is_integer(v->type)) wrong_type(label_, key, "a number");
  return v->float_value;
}

std::optional<bool> GgufFile::get_bool(std::string_view key) const {
  const GgufValue* v = find(key);
  if (!v) return std::nullopt;
  if (!is_integer(v->type)) wrong_type(label_, key, "a bool");
  return v->int_value != 0;
}

std::optional<std::string> GgufFile::get_string(std::string_view key) const {
  const GgufValue* v = find(key);
  if (!v) return std::nullopt;
  if (v->type != GgufValueType::kString) wrong_type(label_, key, "a string");
  return v->string_value;
}

const std::vector<std::string>* GgufFile::get_string_array(std::string_view key) const {
  const GgufValue* v = find(key);
  if (!v) return nullptr;
  if (v->type != GgufValueType::kArray || v->array_type != GgufValueType::kString)
    wrong_type(label_, key, "an array of strings");
  return &v->string_array;
}

const std::vector<int64_t>* GgufFile::get_int_array(std::string_view key) const {
  const GgufValue* v = find(key);
  if (!v) return nullptr;
  if (v->type != GgufValueType::kArray || !is_integer(v->array_type))
    wrong_type(label_, key, "an array of integers");
  return &v->int_array;
}

const std::vector<double>* GgufFile::get_float_array(std::string_view key) const {
  const GgufValue* v = find(key);
  if (!v) return nullptr;
  if (v->type != GgufValueType::kArray || !is_float(v->array_type))
    wrong_type(label_, key, "an array of floats");
  return &v->float_array;
}

}  // namespace xq
