// A minimal GGUF image builder for tests and fuzz seeds: writes exactly the
// bytes the format specifies, so the reader can be checked against files
// built by hand, including deliberately broken ones.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace xq::testing {

class GgufWriter {
 public:
  // GGUF metadata value type ids.
  static constexpr uint32_t kUint8 = 0, kInt8 = 1, kUint16 = 2, kInt16 = 3, kUint32 = 4, kInt32 = 5,
                            kFloat32 = 6, kBool = 7, kString = 8, kArray = 9, kUint64 = 10,
                            kInt64 = 11, kFloat64 = 12;

  explicit GgufWriter(uint32_t version = 3) : version_(version) {}

  void add_uint32(const std::string& key, uint32_t v) { add_scalar(key, kUint32, v); }
  void add_float32(const std::string& key, float v) { add_scalar(key, kFloat32, v); }
  void add_int32(const std::string& key, int32_t v) { add_scalar(key, kInt32, v); }
  void add_bool(const std::string& key, bool v) { add_scalar(key, kBool, uint8_t{v}); }
  // Any scalar under an explicit GGUF type id, so tests can write every type
  // (and, on purpose, a value whose size does not match its type).
  template <typename T>
  void add_scalar(const std::string& key, uint32_t type, T v) {
    kv_key(key, type);
    pod(kv_, v);
    ++kv_count_;
  }
  void add_string(const std::string& key, const std::string& v) {
    kv_key(key, kString);
    str(kv_, v);
    ++kv_count_;
  }
  void add_string_array(const std::string& key, const std::vector<std::string>& v) {
    kv_key(key, kArray);
    pod(kv_, kString);
    pod(kv_, uint64_t{v.size()});
    for (const auto& s : v) str(kv_, s);
    ++kv_count_;
  }
  void add_float32_array(const std::string& key, const std::vector<float>& v) {
    add_array(key, kFloat32, v);
  }
  void add_int32_array(const std::string& key, const std::vector<int32_t>& v) {
    add_array(key, kInt32, v);
  }
  // An array of scalars under an explicit element type id.
  template <typename T>
  void add_array(const std::string& key, uint32_t element_type, const std::vector<T>& v) {
    kv_key(key, kArray);
    pod(kv_, element_type);
    pod(kv_, uint64_t{v.size()});
    for (const T& x : v) pod(kv_, x);
    ++kv_count_;
  }
  // Adds a tensor whose data is `bytes`; offsets are assigned with 32-byte alignment.
  void add_tensor(const std::string& name, std::vector<uint64_t> shape, uint32_t type,
                  const std::vector<uint8_t>& bytes) {
    str(info_, name);
    pod(info_, uint32_t(shape.size()));
    for (uint64_t d : shape) pod(info_, d);
    pod(info_, type);
    while (data_.size() % 32) data_.push_back(0);
    pod(info_, uint64_t{data_.size()});
    data_.insert(data_.end(), bytes.begin(), bytes.end());
    ++tensor_count_;
  }

  std::vector<uint8_t> build() const {
    std::vector<uint8_t> out;
    pod(out, uint32_t{0x46554747});
    pod(out, version_);
    pod(out, tensor_count_);
    pod(out, kv_count_);
    out.insert(out.end(), kv_.begin(), kv_.end());
    out.insert(out.end(), info_.begin(), info_.end());
    while (out.size() % 32) out.push_back(0);
    out.insert(out.end(), data_.begin(), data_.end());
    return out;
  }

 private:
  template <typename T>
  static void pod(std::vector<uint8_t>& out, T v) {
    uint8_t b[sizeof(T)];
    std::memcpy(b, &v, sizeof(T));
    out.insert(out.end(), b, b + sizeof(T));
  }
  static void str(std::vector<uint8_t>& out, const std::string& s) {
    pod(out, uint64_t{s.size()});
    out.insert(out.end(), s.begin(), s.end());
  }
  void kv_key(const std::string& key, uint32_t type) {
    str(kv_, key);
    pod(kv_, type);
  }

  uint32_t version_;
  uint64_t tensor_count_ = 0, kv_count_ = 0;
  std::vector<uint8_t> kv_, info_, data_;
};

}  // namespace xq::testing
