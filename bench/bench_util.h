// Small helpers the bench programs share.
#pragma once

#include <string>
#include <vector>

#include "runtime/cache_mode.h"

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

// The table's modes (runtime/cache_mode.h) as a comma list; with
// `one_per_family`, each family once: fp16 and the 4-bit row of each other.
inline std::string cache_mode_list(bool one_per_family = false) {
  std::string out;
  for (const CacheModeSpec& mode : cache_modes()) {
    if (one_per_family && mode.quantized() && mode.bits != 4) continue;
    out += (out.empty() ? "" : ",") + std::string(mode.name);
  }
  return out;
}

}  // namespace xq::bench
