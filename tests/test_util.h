// Where tests find their data: the shared folder beside the project (or
// $XQ_SHARED_DIR) and the project's own models/ folder (or $XQ_MODELS_DIR).
#pragma once

#include <cstdlib>
#include <filesystem>
#include <string>

namespace xq::testing {

inline std::string shared_path(const std::string& relative) {
  const char* env = std::getenv("XQ_SHARED_DIR");
  std::string root = env ? env : std::string(XQ_DEFAULT_SHARED_DIR);
  return root + "/" + relative;
}

inline std::string models_path(const std::string& relative) {
  const char* env = std::getenv("XQ_MODELS_DIR");
  std::string root = env ? env : std::string(XQ_SOURCE_DIR) + "/models";
  return root + "/" + relative;
}

inline bool file_exists(const std::string& path) {
  return std::filesystem::exists(path);
}

}  // namespace xq::testing
