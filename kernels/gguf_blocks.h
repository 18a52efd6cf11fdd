// GGUF's quantized block layouts (ggml's), byte for byte as in the files.
// Both backends read these: the CPU kernels (kernels/cpu/quant.h) and the
// CUDA kernels (kernels/cuda), so neither backend includes the other for them.
#pragma once

#include <cstdint>

namespace xq {

// Block layouts, byte for byte as in GGUF files. All fields are little-endian;
// fp16 fields are kept as raw bits. Quant order within a block is noted where
// it is not simply element i at index i.
struct BlockQ4_0 {
  uint16_t d;
  uint8_t qs[16];  // element i in the low nibble of qs[i], element i+16 in the high one
};
struct BlockQ4_1 {
  uint16_t d;
  uint16_t m;
  uint8_t qs[16];
};
struct BlockQ5_0 {
  uint16_t d;
  uint8_t qh[4];  // bit i (of the little-endian word) is bit 4 of element i
  uint8_t qs[16];
};
struct BlockQ5_1 {
  uint16_t d;
  uint16_t m;
  uint8_t qh[4];
  uint8_t qs[16];
};
struct BlockQ8_0 {
  uint16_t d;
  int8_t qs[32];
};
struct BlockQ8_1 {
  uint16_t d;
  uint16_t s;  // d * sum(qs); not needed to decode
  int8_t qs[32];
};
// K-quants: 256-element super-blocks with packed per-sub-block scales.
struct BlockQ2_K {
  uint8_t scales[16];  // low nibble: scale, high nibble: min, per 16 elements
  uint8_t qs[64];
  uint16_t d;
  uint16_t dmin;
};
struct BlockQ3_K {
  uint8_t hmask[32];
  uint8_t qs[64];
  uint8_t scales[12];  // 16 six-bit scales, biased by 32
  uint16_t d;
};
struct BlockQ4_K {
  uint16_t d;
  uint16_t dmin;
  uint8_t scales[12];  // 8 six-bit scales and 8 six-bit mins
  uint8_t qs[128];
};
struct BlockQ5_K {
  uint16_t d;
  uint16_t dmin;
  uint8_t scales[12];
  uint8_t qh[32];
  uint8_t qs[128];
};
struct BlockQ6_K {
  uint8_t ql[128];
  uint8_t qh[64];
  int8_t scales[16];
  uint16_t d;
};
struct BlockQ8_K {
  float d;
  int8_t qs[256];
  int16_t bsums[16];
};

}  // namespace xq
