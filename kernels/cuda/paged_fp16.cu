// The fp16 KV cache on the device (kernels/cuda/paged_attention.h): the
// encode of a step's K and V into the pool's blocks, split-K decode attention
// over those blocks (flash-decoding) and the merges of online-softmax states
// (between splits, and between sequence shards after an all_gather).
//
// The byte layout is the CPU cache's (runtime/cache_fp16.cpp): per block and
// layer, keys (kv_heads, 128, head_dim) fp16 after RoPE, then values of the
// same shape. RoPE on arrival reproduces the CPU's rotation operation by
// operation, so the stored keys carry the same fp16 bits: cpu::rope's AVX2
// path (interleaved pairs, four at a time) is fmaddsub, a·cos fused with the
// rounded b·sin and b·cos fused with the rounded a·sin; its scalar path
// (remaining pairs, NeoX) is rope_rotate, which g++ contracts (C++ allows it
// even with -std=c++20) into a·cos fused with the rounded b·sin and a·sin
// fused with the rounded b·cos. The scalar form depends on the host compiler;
// the tests' models take the vector path.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <stdexcept>
#include <string>

#include "kernels/attention_state.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/paged_attention.h"
#include "kernels/cuda/paged_common.cuh"

namespace xq::cuda::paged {
namespace {

constexpr int kEncodeThreads = 256;
// Decode CTAs: four warps, one thread per token of a pool block when scoring.
constexpr int kDecodeThreads = 128;
constexpr int kTile = 128;  // tokens per pool block (AttentionCache::kBlockTokens)
constexpr int kMergeThreads = 128;

// Shapes the fp16 kernels accept (thrown as std::invalid_argument, like dense_ops.h).
void check_shape(const Fp16KvShape& shape) {
  require(shape.kv_heads > 0 && shape.heads > 0 && shape.heads % shape.kv_heads == 0,
          "fp16 cache: query heads must be a positive multiple of the KV heads");
  require(shape.head_dim > 0 && shape.head_dim % 2 == 0 && shape.head_dim <= kMaxHeadDim,
          "fp16 cache: head_dim must be even and at most " + std::to_string(kMaxHeadDim));
  require(shape.heads / shape.kv_heads <= kMaxGroup,
          "fp16 cache: at most " + std::to_string(kMaxGroup) + " query heads per KV head");
  require(shape.rope_dim >= 0 && shape.rope_dim % 2 == 0 && shape.rope_dim <= shape.head_dim,
          "fp16 cache: rope_dim must be even and at most head_dim");
}

// One thread per (row, KV head, channel): rotates the key channel at the
// row's position (reading its pair partner), rounds key and value to fp16
// and stores both at the row's slot of its block. Consecutive threads write
// consecutive channels of one head's row: coalesced 2-byte stores.
__global__ void fp16_encode_kernel(PagedArena pool, Fp16KvShape shape, size_t layer_offset,
                                   const StepRow* rows, int32_t n_rows, const float* k,
                                   const float* v, const float* cos_sin, ShardSpec shard) {
  const int64_t hd = shape.head_dim, kv_dim = shape.kv_heads * hd;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n_rows * kv_dim) return;
  const int64_t row = i / kv_dim, e = i % kv_dim;
  const int64_t g = e / hd, c = e % hd;
  const StepRow r = rows[row];
  if (!owns(shard, r.pos)) return;  // another shard's token
  const int32_t slot = owned_before(shard, r.pos);
  const int64_t block = pool.tables[static_cast<int64_t>(r.seq) * pool.table_stride + slot / kTile];
  __half* keys = reinterpret_cast<__half*>(pool.arena + block * pool.block_bytes + layer_offset);
  __half* values = keys + shape.kv_heads * kTile * hd;
  const int64_t at = (g * kTile + slot % kTile) * hd + c;

  const float* k_head = k + row * kv_dim + g * hd;
  float key = k_head[c];
  if (c < shape.rope_dim) {
    const int64_t pairs = shape.rope_dim / 2;
    const float* table = cos_sin + static_cast<int64_t>(r.pos) * pairs * 2;
    if (shape.rope_layout == RopeLayout::kInterleaved) {
      const int64_t pair = c / 2;
      const float a = k_head[2 * pair], b = k_head[2 * pair + 1];
      const float cos_angle = table[2 * pair], sin_angle = table[2 * pair + 1];
      // cpu::rope's vector path covers the pairs below pairs / 4 * 4.
      const bool vector_path = pair < pairs / 4 * 4;
      if (c % 2 == 0) {
        key = __fmaf_rn(a, cos_angle, -__fmul_rn(b, sin_angle));
      } else {
        key = vector_path ? __fmaf_rn(b, cos_angle, __fmul_rn(a, sin_angle))
                          : __fmaf_rn(a, sin_angle, __fmul_rn(b, cos_angle));
      }
    } else {
      const int64_t pair = c < pairs ? c : c - pairs;
      const float a = k_head[pair], b = k_head[pair + pairs];
      const float cos_angle = table[2 * pair], sin_angle = table[2 * pair + 1];
      key = c < pairs ? __fmaf_rn(a, cos_angle, -__fmul_rn(b, sin_angle))
                      : __fmaf_rn(a, sin_angle, __fmul_rn(b, cos_angle));
    }
  }
  keys[at] = __float2half_rn(key);
  values[at] = __float2half_rn(v[row * kv_dim + e]);
}

struct DecodeArgs {
  PagedArena pool;
  Fp16KvShape shape;
  size_t layer_offset;
  const StepRow* rows;
  const float* q;
  ShardSpec shard;
  SplitPlan plan;
  float scale;
  float* split_states;  // (rows * heads, splits, 2 + head_dim) when plan.splits > 1
  AttentionTarget target;
};

// Dynamic shared memory of the decode kernel, in 4-byte words.
size_t decode_shared_words(int32_t group, int32_t head_dim) {
  const size_t floats = 2 * static_cast<size_t>(group) * head_dim  // queries, accumulators
                        + static_cast<size_t>(group) * kTile       // scores of one block
                        + 3 * static_cast<size_t>(group);          // max, sum, rescale
  const size_t tile_words = static_cast<size_t>(kTile) * (head_dim / 2 + 1);
  return floats + tile_words;
}

// Tiling: a CTA per (query row, KV head, split). It walks the split's pool
// blocks (128 tokens each) in order; per block
//   1. the block's keys of this KV head are copied to shared memory as half2
//      words, rows padded by one word so that threads reading different rows
//      hit different banks;
//   2. thread t scores token t against each of the `group` query heads that
//      share this KV head (q in shared memory, fp32 dot over head_dim);
//   3. warp w folds the scores of query heads w, w + 4, ... into that head's
//      online softmax (max and sum by warp shuffles: attention_state's
//      absorb_block, scores become exp(s - new max) in place);
//   4. thread (h, c) rescales its accumulator and adds Σ_t p_t v_t[c], reading
//      V rows straight from global memory (consecutive c: coalesced).
// The state (max, sum, acc) goes to the split's scratch record, or, with a
// single split, straight to the target.
__global__ void __launch_bounds__(kDecodeThreads) fp16_decode_kernel(DecodeArgs a) {
  extern __shared__ float shared[];
  const int32_t hd = a.shape.head_dim, heads = a.shape.heads;
  const int32_t group = heads / a.shape.kv_heads;
  float* q_s = shared;                 // (group, hd)
  float* acc_s = q_s + group * hd;     // (group, hd)
  float* scores = acc_s + group * hd;  // (group, 128)
  float* max_s = scores + group * kTile;
  float* sum_s = max_s + group;
  float* rescale_s = sum_s + group;
  const int32_t words_per_row = hd / 2, tile_stride = words_per_row + 1;
  uint32_t* k_tile = reinterpret_cast<uint32_t*>(rescale_s + group);  // (128, tile_stride)

  const int32_t row = blockIdx.x, split = blockIdx.y, g = blockIdx.z;
  const int32_t tid = threadIdx.x, threads = blockDim.x;
  const StepRow r = a.rows[row];
  const int32_t visible = owned_before(a.shard, r.pos + 1);
  const int32_t begin = split * a.plan.tokens_per_split;
  const bool direct = a.plan.splits == 1;
  // Splits past the row's context exit (the merge does not read them); a
  // single split always writes, the empty state where it sees nothing.
  if (begin >= visible && !direct) return;
  const int32_t end = min(visible, begin + a.plan.tokens_per_split);

  for (int32_t i = tid; i < group * hd; i += threads) {
    const int32_t h = i / hd, c = i % hd;
    q_s[i] = a.q[(static_cast<int64_t>(row) * heads + g * group + h) * hd + c];
    acc_s[i] = 0.0f;
  }
  if (tid < group) {
    max_s[tid] = -INFINITY;
    sum_s[tid] = 0.0f;
  }
  const int32_t* table = a.pool.tables + static_cast<int64_t>(r.seq) * a.pool.table_stride;
  const size_t head_bytes = static_cast<size_t>(kTile) * hd * sizeof(__half);
  const int32_t warp = tid / kWarpSize, lane = tid % kWarpSize, warps = threads / kWarpSize;

  for (int32_t t0 = begin; t0 < end; t0 += kTile) {
    const int32_t count = min(kTile, end - t0);
    const uint8_t* layer_base =
        a.pool.arena + static_cast<size_t>(table[t0 / kTile]) * a.pool.block_bytes + a.layer_offset;
    const uint32_t* keys = reinterpret_cast<const uint32_t*>(layer_base + g * head_bytes);
    const __half* values =
        reinterpret_cast<const __half*>(layer_base + (a.shape.kv_heads + g) * head_bytes);
    __syncthreads();  // the previous block's tile and probabilities are consumed
    // t0 is a multiple of 128 (splits are whole blocks), so the block's
    // tokens start at its row 0.
    for (int32_t i = tid; i < count * words_per_row; i += threads) {
      k_tile[(i / words_per_row) * tile_stride + i % words_per_row] = keys[i];
    }
    __syncthreads();
    for (int32_t i = tid; i < group * kTile; i += threads) {
      const int32_t h = i / kTile, t = i % kTile;
      float score = -INFINITY;
      if (t < count) {
        const float* qh = q_s + h * hd;
        const uint32_t* key_row = k_tile + t * tile_stride;
        float dot = 0.0f;
        for (int32_t w = 0; w < words_per_row; ++w) {
          const float2 pair = __half22float2(*reinterpret_cast<const __half2*>(key_row + w));
          dot += qh[2 * w] * pair.x + qh[2 * w + 1] * pair.y;
        }
        score = dot * a.scale;
      }
      scores[i] = score;
    }
    __syncthreads();
    for (int32_t h = warp; h < group; h += warps) {
      float* head_scores = scores + h * kTile;
      float block_max = -INFINITY;
      for (int32_t t = lane; t < count; t += kWarpSize)
        block_max = attention_state::larger(block_max, head_scores[t]);
      block_max = warp_max(block_max);
      const float old_max = max_s[h];
      const float new_max = attention_state::larger(old_max, block_max);
      const float rescale = old_max == -INFINITY ? 0.0f : expf(old_max - new_max);
      float block_sum = 0.0f;
      for (int32_t t = lane; t < count; t += kWarpSize) {
        const float p = expf(head_scores[t] - new_max);
        head_scores[t] = p;
        block_sum += p;
      }
      block_sum = warp_sum(block_sum);
      __syncwarp();  // every lane has read max_s[h] before lane 0 replaces it
      if (lane == 0) {
        sum_s[h] = sum_s[h] * rescale + block_sum;
        max_s[h] = new_max;
        rescale_s[h] = rescale;
      }
    }
    __syncthreads();
    for (int32_t i = tid; i < group * hd; i += threads) {
      const int32_t h = i / hd, c = i % hd;
      const float* p = scores + h * kTile;
      float acc = acc_s[i] * rescale_s[h];
      for (int32_t t = 0; t < count; ++t)
        acc += p[t] * __half2float(values[static_cast<int64_t>(t) * hd + c]);
      acc_s[i] = acc;
    }
  }
  __syncthreads();

  for (int32_t i = tid; i < group * hd; i += threads) {
    const int32_t h = i / hd, c = i % hd;
    const int64_t state_row = static_cast<int64_t>(row) * heads + g * group + h;
    if (!direct) {
      a.split_states[(state_row * a.plan.splits + split) * (hd + 2) + 2 + c] = acc_s[i];
    } else if (a.target.out != nullptr) {
      attention_state::normalize_row(sum_s[h], acc_s + i, 1, a.target.out + state_row * hd + c);
    } else {
      a.target.state_acc[state_row * hd + c] = acc_s[i];
    }
  }
  if (tid < group) {
    const int64_t state_row = static_cast<int64_t>(row) * heads + g * group + tid;
    if (!direct) {
      float* record = a.split_states + (state_row * a.plan.splits + split) * (hd + 2);
      record[0] = max_s[tid];
      record[1] = sum_s[tid];
    } else if (a.target.out == nullptr) {
      a.target.state_max[state_row] = max_s[tid];
      a.target.state_sum[state_row] = sum_s[tid];
    }
  }
}

// A CTA per (query row, head); thread c merges channel c of the row's used
// splits in split order (attention_state::merge_row on one channel; every
// thread recomputes the same max and sum) and writes the target.
__global__ void merge_splits_kernel(const StepRow* rows, ShardSpec shard, SplitPlan plan,
                                    int32_t heads, int32_t hd, const float* split_states,
                                    AttentionTarget target) {
  const int64_t state_row = blockIdx.x;
  const int32_t visible = owned_before(shard, rows[state_row / heads].pos + 1);
  const int32_t used =
      min(plan.splits, (visible + plan.tokens_per_split - 1) / plan.tokens_per_split);
  for (int32_t c = threadIdx.x; c < hd; c += blockDim.x) {
    float max = -INFINITY, sum = 0.0f, acc = 0.0f;
    for (int32_t s = 0; s < used; ++s) {
      const float* record = split_states + (state_row * plan.splits + s) * (hd + 2);
      attention_state::merge_row(max, sum, &acc, record[0], record[1], record + 2 + c, 1);
    }
    if (target.out != nullptr) {
      attention_state::normalize_row(sum, &acc, 1, target.out + state_row * hd + c);
    } else {
      target.state_acc[state_row * hd + c] = acc;
      if (c == 0) {
        target.state_max[state_row] = max;
        target.state_sum[state_row] = sum;
      }
    }
  }
}

// A CTA per row; thread c merges channel c over the ranks' records in rank
// order, then normalizes.
__global__ void merge_partial_states_kernel(const float* gathered, int32_t ranks, int64_t rows,
                                            int64_t width, float* out) {
  const int64_t row = blockIdx.x;
  const int64_t record = rows * (2 + width);
  for (int64_t c = threadIdx.x; c < width; c += blockDim.x) {
    float max = -INFINITY, sum = 0.0f, acc = 0.0f;
    for (int32_t rank = 0; rank < ranks; ++rank) {
      const float* from = gathered + rank * record;
      attention_state::merge_row(max, sum, &acc, from[row], from[rows + row],
                                 from + 2 * rows + row * width + c, 1);
    }
    attention_state::normalize_row(sum, &acc, 1, out + row * width + c);
  }
}

void check_target(const AttentionTarget& target) {
  const bool states = target.state_max && target.state_sum && target.state_acc;
  const bool any_state = target.state_max || target.state_sum || target.state_acc;
  require((target.out != nullptr) != any_state && (target.out != nullptr || states),
          "attention target must be either out or all three state buffers");
}

}  // namespace

SplitPlan plan_splits(int32_t max_local_tokens) {
  const int32_t blocks = std::max(1, (max_local_tokens + kTile - 1) / kTile);
  const int32_t wanted = std::min(blocks, kMaxSplits);
  const int32_t blocks_per_split = (blocks + wanted - 1) / wanted;
  SplitPlan plan;
  plan.splits = (blocks + blocks_per_split - 1) / blocks_per_split;
  plan.tokens_per_split = blocks_per_split * kTile;
  return plan;
}

size_t split_scratch_floats(int64_t rows, int32_t heads, int32_t head_dim, const SplitPlan& plan) {
  return static_cast<size_t>(rows) * heads * plan.splits * (head_dim + 2);
}

void fp16_encode(const PagedArena& pool, const Fp16KvShape& shape, int32_t layer,
                 const StepRow* rows, int32_t n_rows, const float* k, const float* v,
                 const float* cos_sin, const ShardSpec& shard, Stream& stream) {
  check_shape(shape);
  require(n_rows >= 0 && layer >= 0, "fp16_encode: negative rows or layer");
  if (n_rows == 0) return;
  const int64_t items = static_cast<int64_t>(n_rows) * shape.kv_heads * shape.head_dim;
  fp16_encode_kernel<<<blocks_for(items, kEncodeThreads), kEncodeThreads, 0, stream_of(stream)>>>(
      pool, shape, layer * shape.layer_bytes, rows, n_rows, k, v, cos_sin, shard);
  CUDA_CHECK_LAUNCH();
}

void fp16_attention(const PagedArena& pool, const Fp16KvShape& shape, int32_t layer,
                    const StepRow* rows, int32_t n_rows, const float* q, const ShardSpec& shard,
                    const SplitPlan& plan, float* scratch, const AttentionTarget& target,
                    Stream& stream) {
  check_shape(shape);
  check_target(target);
  require(n_rows >= 0 && layer >= 0, "fp16_attention: negative rows or layer");
  require(plan.splits >= 1 && plan.splits <= 65535 && plan.tokens_per_split > 0 &&
              plan.tokens_per_split % kTile == 0,
          "fp16_attention: splits must be whole pool blocks");
  require(plan.splits == 1 || scratch != nullptr, "fp16_attention: split-K needs scratch");
  if (n_rows == 0) return;
  DecodeArgs args{pool,
                  shape,
                  layer * shape.layer_bytes,
                  rows,
                  q,
                  shard,
                  plan,
                  1.0f / std::sqrt(static_cast<float>(shape.head_dim)),
                  scratch,
                  target};
  const int32_t group = shape.heads / shape.kv_heads;
  const size_t shared_bytes = decode_shared_words(group, shape.head_dim) * sizeof(float);
  // kMaxGroup x kMaxHeadDim keeps this under the default 48 KiB.
  require(shared_bytes <= 48 * 1024, "fp16_attention: shared memory over 48 KiB");
  const dim3 grid(static_cast<unsigned>(n_rows), static_cast<unsigned>(plan.splits),
                  static_cast<unsigned>(shape.kv_heads));
  fp16_decode_kernel<<<grid, kDecodeThreads, shared_bytes, stream_of(stream)>>>(args);
  CUDA_CHECK_LAUNCH();
  if (plan.splits > 1)
    merge_split_states(rows, n_rows, shard, plan, shape.heads, shape.head_dim, scratch, target,
                       stream);
}

void merge_split_states(const StepRow* rows, int32_t n_rows, const ShardSpec& shard,
                        const SplitPlan& plan, int32_t heads, int32_t head_dim,
                        const float* scratch, const AttentionTarget& target, Stream& stream) {
  const int64_t state_rows = static_cast<int64_t>(n_rows) * heads;
  require(state_rows <= INT_MAX, "merge_split_states: too many rows");
  if (state_rows <= 0) return;
  merge_splits_kernel<<<static_cast<unsigned>(state_rows), kMergeThreads, 0, stream_of(stream)>>>(
      rows, shard, plan, heads, head_dim, scratch, target);
  CUDA_CHECK_LAUNCH();
}

void merge_partial_states(const float* gathered, int32_t ranks, int64_t rows, int64_t width,
                          float* out, Stream& stream) {
  require(ranks >= 1 && rows >= 0 && width > 0, "merge_partial_states: bad shape");
  require(rows <= INT_MAX, "merge_partial_states: too many rows");
  if (rows == 0) return;
  merge_partial_states_kernel<<<static_cast<unsigned>(rows), kMergeThreads, 0, stream_of(stream)>>>(
      gathered, ranks, rows, width, out);
  CUDA_CHECK_LAUNCH();
}

}  // namespace xq::cuda::paged
