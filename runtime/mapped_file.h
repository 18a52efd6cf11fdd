// A read-only memory map of a whole file. Model weights are used in place from
// the map, so loading costs page faults, not copies.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace xq {

class MappedFile {
 public:
  MappedFile() = default;
  // Throws xq::Error naming the path when the file cannot be opened or mapped.
  explicit MappedFile(const std::string& path);
  ~MappedFile();
  MappedFile(MappedFile&& other) noexcept;
  MappedFile& operator=(MappedFile&& other) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace xq
