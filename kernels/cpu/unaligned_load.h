// Little-endian fields of GGUF blocks read from any address: the blocks are
// packed without padding, so an fp16 scale or a 32-bit mask may sit at an odd
// offset, where a plain load would be undefined behaviour.
#pragma once

#include <cstdint>
#include <cstring>

namespace xq::cpu {

inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

}  // namespace xq::cpu
