// Per-element math shared by the CPU and CUDA backends, so the CPU tests cover
// the formulas the GPU runs.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define XQ_HOST_DEVICE __host__ __device__
#else
#define XQ_HOST_DEVICE
#endif

namespace xq {

// Which pairs of a head's channels RoPE rotates together.
enum class RopeLayout {
  kInterleaved,  // (0,1), (2,3), ...: llama2.c and GGUF "llama" (weights pre-permuted)
  kNeox,         // (0, d/2), (1, d/2+1), ...: GPT-NeoX, Qwen, HF-layout Llama
};

// Rotation angle of channel pair `pair` (0 <= pair < rope_dim/2) at `position`.
XQ_HOST_DEVICE inline float rope_angle(int position, int pair, int rope_dim, float theta) {
  float inv_freq = powf(theta, -2.0f * static_cast<float>(pair) / static_cast<float>(rope_dim));
  return static_cast<float>(position) * inv_freq;
}

// Rotates the pair (a, b) by the angle whose cosine and sine are given.
XQ_HOST_DEVICE inline void rope_rotate(float& a, float& b, float cos_angle, float sin_angle) {
  float a0 = a, b0 = b;
  a = a0 * cos_angle - b0 * sin_angle;
  b = a0 * sin_angle + b0 * cos_angle;
}

XQ_HOST_DEVICE inline float silu(float x) {
  return x / (1.0f + expf(-x));
}

}  // namespace xq
