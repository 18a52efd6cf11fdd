// The rows of the table of cache modes (runtime/cache_mode.h) as test
// parameters, so a suite instantiated over them covers every mode, a new row
// included.
#pragma once

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "runtime/cache_mode.h"

namespace xq::testing {

inline std::vector<std::string> table_mode_names() {
  std::vector<std::string> names;
  for (const CacheModeSpec& mode : cache_modes()) names.emplace_back(mode.name);
  return names;
}

// "xquant-cl-4" -> "xquant_cl_4": gtest names allow no dashes.
inline std::string mode_test_name(const ::testing::TestParamInfo<std::string>& info) {
  std::string name = info.param;
  for (char& c : name)
    if (c == '-') c = '_';
  return name;
}

}  // namespace xq::testing
