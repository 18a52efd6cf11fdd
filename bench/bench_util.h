// Small helpers the bench programs share.
#pragma once

#include <string>
#include <vector>

namespace xq::bench {

// "a,b,,c" -> {"a", "b", "c"}: the comma lists the benches take on the command line.
inline std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= s.size()) {
    size_t comma = s.find(',', start);
    if (comma == std::string::npos) comma = s.size();
    if (comma > start) out.push_back(s.substr(start, comma - start));
    start = comma + 1;
  }
  return out;
}

}  // namespace xq::bench
