// Errors a user can act on: one line naming the file or request and the problem.
#pragma once

#include <stdexcept>
#include <string>

namespace xq {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

}  // namespace xq
