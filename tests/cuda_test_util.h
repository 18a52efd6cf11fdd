// What every CUDA test file shares: skip a test, with CUDA's reason, where no
// device can be used.
#pragma once

#include <gtest/gtest.h>

#include <string>

#include "kernels/cuda/device.h"

#define SKIP_WITHOUT_CUDA_DEVICE()                   \
  do {                                               \
    std::string why_not;                             \
    if (!xq::cuda::device_available(&why_not)) {     \
      GTEST_SKIP() << "no CUDA device: " << why_not; \
    }                                                \
  } while (0)
