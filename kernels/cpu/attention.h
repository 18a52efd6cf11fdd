// Causal multi-head attention over fp32 keys and values, for many queries at
// once (prefill): per head, scores = Q Kᵀ (sgemm), causal mask + softmax,
// out = P V (sgemm); heads split across threads. Shared by every cache mode
// once its K and V are in fp32.
#pragma once

#include <cstdint>

namespace xq::cpu {

// q: (n, heads, head_dim), row stride q_stride; query i is at position pos0 + i
// and sees keys [0, pos0 + i]. Keys and values of KV head g (heads share them
// in groups of heads / kv_heads): row t at keys + g * head_offset + t * row_stride
// (values alike). out: like q. Scale 1/sqrt(head_dim).
void causal_attention(const float* q, int64_t q_stride, int32_t n, int32_t pos0, int32_t total,
                      int32_t heads, int32_t kv_heads, int32_t head_dim, const float* keys,
                      const float* values, int64_t head_offset, int64_t row_stride, float* out);

}  // namespace xq::cpu
