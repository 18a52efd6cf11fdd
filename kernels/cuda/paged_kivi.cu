// The fused KIVI decode kernel (kernels/cuda/paged_attention.h,
// kivi_attention): attention over kivi-B's blocks straight from the packed
// codes, split-K like the fp16 cache's (flash-decoding), with no dense K or V.
//
// kivi-B keeps K before RoPE per channel (a full 128-token group: 128 x kv
// codes token-major, then one (scale, zero) per channel; the partial group's
// tokens in fp16 window pages) and V per token (each row's groups of 128
// channels, one (scale, zero) per row group). Per 64-token tile of one KV
// head the kernel decodes K into shared memory, rotates it at each token's
// global position, scores and folds the scores into an online softmax, then
// decodes the tile's V rows into the same shared buffer and mixes them.
//
// It computes what QuantizedCache::attend computes for kivi on the CPU
// (runtime/cache_quantized.cpp): the decoded values are the CPU's exactly
// (the same codes and fp16 parameters, and group_decode is exact,
// kernels/group_quant.h), RoPE repeats cpu::rope's operations (as
// fp16_encode does, kernels/cuda/paged_fp16.cu), and everything after is fp32;
// only the order of fp32 sums differs (dot products, the exp sums, the V mix,
// 64-token tiles and 32 splits against the CPU's 64-token blocks in runs of 4).
//
// Codes come 8 at a time: 8 codes starting at a code index that is a multiple
// of 8 fill exactly `bits` whole bytes (8 x bits bits from a byte boundary),
// so one load (or `bits` byte loads where the address is not aligned to a
// power-of-two width) yields a run of 8 values. head_dim % 8 == 0 makes every
// run of a head's channels start at such an index: per channel at
// o * kv + g * head_dim + 8 j, per token at (c % 128) = 8 j' within a row group
// that starts on a byte.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <string>

#include "kernels/attention_state.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/paged_attention.h"
#include "kernels/cuda/paged_common.cuh"
#include "kernels/group_quant.h"

namespace xq::cuda::paged {
namespace {

constexpr int kThreads = 128;     // four warps
constexpr int kTile = 64;         // tokens decoded, scored and mixed at once
constexpr int kPoolTokens = 128;  // tokens per pool block and per-channel group
constexpr int kRun = 8;           // codes decoded per load
constexpr size_t kDefaultSharedBytes = 48 * 1024;

// Dynamic shared memory of the kernel, in floats: the tile buffer (kTile rows
// of head_dim + 1: one float of padding, so that threads reading different
// rows hit different banks), queries and accumulators (group, head_dim),
// probabilities (group, kTile), max, sum and rescale (group), and the K
// grids of the head's channels (scale, zero: head_dim each).
size_t shared_floats(int32_t group, int32_t head_dim) {
  return static_cast<size_t>(kTile) * (head_dim + 1) + 2 * static_cast<size_t>(group) * head_dim +
         static_cast<size_t>(group) * kTile + 3 * static_cast<size_t>(group) + 2 * head_dim;
}

// The `bits` bytes of an aligned run of 8 codes, little-endian: code j is
// bits [j * bits, j * bits + bits) of the result. One load where the address
// suits the width (1, 2, 4 or 8 bytes), byte loads otherwise.
__device__ inline uint64_t load_run(const uint8_t* at, int bits) {
  const uintptr_t address = reinterpret_cast<uintptr_t>(at);
  switch (bits) {
    case 1:
      return __ldg(at);
    case 2:
      if (address % 2 == 0) return __ldg(reinterpret_cast<const unsigned short*>(at));
      break;
    case 4:
      if (address % 4 == 0) return __ldg(reinterpret_cast<const unsigned int*>(at));
      break;
    case 8:
      if (address % 8 == 0) return __ldg(reinterpret_cast<const unsigned long long*>(at));
      break;
    default:
      break;
  }
  uint64_t word = 0;
  for (int i = 0; i < bits; ++i) word |= static_cast<uint64_t>(__ldg(at + i)) << (8 * i);
  return word;
}

__device__ inline float half_bits_to_float(uint16_t bits) {
  return __half2float(__ushort_as_half(bits));
}

// A GroupParams (fp16 scale, fp16 zero; little-endian) as the grid it stores.
__device__ inline GroupGrid read_grid(const uint32_t* params) {
  const uint32_t word = __ldg(params);
  GroupGrid grid;
  grid.scale = half_bits_to_float(static_cast<uint16_t>(word & 0xffffu));
  grid.zero = half_bits_to_float(static_cast<uint16_t>(word >> 16));
  return grid;
}

// cpu::rope of one pair (a, b) -> (a', b'), operation for operation: the AVX2
// path (interleaved pairs below pairs / 4 * 4) is fmaddsub, a·cos fused with
// the rounded b·sin and b·cos fused with the rounded a·sin; the scalar path
// (the other interleaved pairs, every NeoX pair) is rope_rotate as g++
// contracts it, a·cos fused with the rounded b·sin and a·sin fused with the
// rounded b·cos (kernels/cuda/paged_fp16.cu says why).
__device__ inline void rotate_pair(float& a, float& b, float cos_angle, float sin_angle,
                                   bool vector_path) {
  const float a0 = a, b0 = b;
  a = __fmaf_rn(a0, cos_angle, -__fmul_rn(b0, sin_angle));
  b = vector_path ? __fmaf_rn(b0, cos_angle, __fmul_rn(a0, sin_angle))
                  : __fmaf_rn(a0, sin_angle, __fmul_rn(b0, cos_angle));
}

struct KiviArgs {
  PagedArena pool;
  PagedWindow window;
  PagedLengths lengths;
  KiviLayer layer;
  AttentionShape shape;
  const StepRow* rows;
  const float* q;
  const float* cos_sin;
  ShardSpec shard;
  SplitPlan plan;
  float scale;
  float* split_states;  // (rows * heads, splits, 2 + head_dim) when plan.splits > 1
  AttentionTarget target;
};

// Tiling: a CTA (4 warps) per (query row, KV head g, split); it walks the
// split's local slots in 64-token tiles (two per pool block). Per tile:
//   0. at a quantized group's tile, threads c < head_dim load the (scale,
//      zero) of the head's channel c into shared memory;
//   1. thread per (token, run of 8 channels): K's 8 codes of the run from
//      one load (consecutive threads on consecutive runs of one token:
//      contiguous bytes), decoded with the channel grids, or 8 fp16 values
//      from the window row for the partial group; interleaved RoPE in
//      registers (a run holds whole pairs); stored to the tile buffer;
//   1b. NeoX RoPE (pairs c, c + rope_dim / 2 lie in different runs): thread
//      per (token, pair) over the buffer;
//   2. thread per (query head, token): the score q·k (fp32 over head_dim);
//   3. warp per query head folds the tile's scores into its online softmax
//      (max and sum by warp shuffles, scores become probabilities in place);
//      meanwhile the other threads, then all, decode the tile's V rows into
//      the buffer (thread per (token, run), 8 codes per load, the run's row
//      group grid);
//   4. thread per (query head, channel) rescales its accumulator and adds
//      Σ_t p_t v_t[c] from the buffer.
// The state goes to the split's scratch record (the fp16 path's layout,
// merged by merge_split_states), or, with a single split, to the target.
__global__ void __launch_bounds__(kThreads) kivi_decode_kernel(KiviArgs a) {
  extern __shared__ float shared[];
  const int32_t hd = a.shape.head_dim, heads = a.shape.heads, kv_heads = a.shape.kv_heads;
  const int32_t group = heads / kv_heads, kv = kv_heads * hd;
  const int32_t stride = hd + 1;
  float* tile_s = shared;                // (kTile, stride): K, then V
  float* q_s = tile_s + kTile * stride;  // (group, hd)
  float* acc_s = q_s + group * hd;       // (group, hd)
  float* p_s = acc_s + group * hd;       // (group, kTile)
  float* max_s = p_s + group * kTile;
  float* sum_s = max_s + group;
  float* rescale_s = sum_s + group;
  float* scale_s = rescale_s + group;  // (hd): K grids of channels g * hd + c
  float* zero_s = scale_s + hd;

  const int32_t row = blockIdx.x, split = blockIdx.y, g = blockIdx.z;
  const int32_t tid = threadIdx.x, warp = tid / kWarpSize, lane = tid % kWarpSize;
  const StepRow r = a.rows[row];
  const int32_t visible = owned_before(a.shard, r.pos + 1);
  const int32_t begin = split * a.plan.tokens_per_split;
  const bool direct = a.plan.splits == 1;
  // Splits past the row's context exit (the merge does not read them); a
  // single split always writes, the empty state where it sees nothing.
  if (begin >= visible && !direct) return;
  const int32_t end = min(visible, begin + a.plan.tokens_per_split);

  for (int32_t i = tid; i < group * hd; i += kThreads) {
    q_s[i] = a.q[(static_cast<int64_t>(row) * heads + g * group) * hd + i];
    acc_s[i] = 0.0f;
  }
  if (tid < group) {
    max_s[tid] = -INFINITY;
    sum_s[tid] = 0.0f;
  }

  const PagedStream& ks = a.layer.keys;
  const PagedStream& vs = a.layer.values;
  const int32_t* table = a.pool.tables + static_cast<int64_t>(r.seq) * a.pool.table_stride;
  const int32_t* pages = a.window.window + static_cast<int64_t>(r.seq) * a.window.window_stride;
  // Groups below `flushed` hold codes; the slots from flushed * 128 on are in the window.
  const int32_t flushed = a.lengths.stored[r.seq] / kPoolTokens;
  const int32_t runs = hd / kRun, pairs = a.shape.rope_dim / 2;
  const bool interleaved = a.shape.rope_layout == RopeLayout::kInterleaved;
  const int32_t vector_pairs = pairs / 4 * 4;  // cpu::rope's AVX2 pairs (interleaved)
  const uint32_t k_mask = (1u << ks.bits) - 1u, v_mask = (1u << vs.bits) - 1u;
  // The V run of channel g * hd + 8 j: its row group and its bytes within the row.
  const int32_t v_group_bytes = kPoolTokens / 8 * vs.bits;  // a full row group's codes

  for (int32_t t0 = begin; t0 < end; t0 += kTile) {
    const int32_t count = min(kTile, end - t0);
    const int32_t block_index = t0 / kPoolTokens, first = t0 % kPoolTokens;
    const uint8_t* block =
        a.pool.arena + static_cast<size_t>(table[block_index]) * a.pool.block_bytes;
    const bool quantized = block_index < flushed;

    // 0. The channel grids (last read by the previous tile's step 1, long done).
    if (quantized && tid < hd) {
      const GroupGrid grid = read_grid(
          reinterpret_cast<const uint32_t*>(block + ks.group_offset + ks.group_code_bytes) +
          g * hd + tid);
      scale_s[tid] = grid.scale;
      zero_s[tid] = grid.zero;
    }
    __syncthreads();  // grids in; the previous tile's V rows and probabilities consumed

    // 1. K of the tile, rotated where the layout's pairs lie inside a run.
    for (int32_t i = tid; i < count * runs; i += kThreads) {
      const int32_t t = i / runs, run = i % runs;
      const int32_t o = first + t, c0 = run * kRun;
      float value[kRun];
      if (quantized) {
        const int64_t index = static_cast<int64_t>(o) * kv + g * hd + c0;  // a multiple of 8
        const uint64_t word = load_run(block + ks.group_offset + index / kRun * ks.bits, ks.bits);
#pragma unroll
        for (int32_t j = 0; j < kRun; ++j) {
          const int code = static_cast<int>((word >> (j * ks.bits)) & k_mask);
          value[j] = group_decode(code, GroupGrid{scale_s[c0 + j], zero_s[c0 + j]});
        }
      } else {
        const int32_t page = pages[o / a.window.window_tokens];
        const uint16_t* window_row =
            reinterpret_cast<const uint16_t*>(
                a.pool.arena + static_cast<size_t>(page) * a.pool.block_bytes + ks.window_offset) +
            static_cast<int64_t>(o % a.window.window_tokens) * kv + g * hd + c0;
#pragma unroll
        for (int32_t j = 0; j < kRun; ++j) value[j] = half_bits_to_float(window_row[j]);
      }
      if (interleaved) {
        const float* angles =
            a.cos_sin + static_cast<int64_t>(position_of(a.shard, t0 + t)) * pairs * 2;
#pragma unroll
        for (int32_t j = 0; j < kRun / 2; ++j) {
          const int32_t pair = c0 / 2 + j;
          if (pair < pairs)
            rotate_pair(value[2 * j], value[2 * j + 1], angles[2 * pair], angles[2 * pair + 1],
                        pair < vector_pairs);
        }
      }
      float* key = tile_s + t * stride + c0;
#pragma unroll
      for (int32_t j = 0; j < kRun; ++j) key[j] = value[j];
    }
    __syncthreads();
    if (!interleaved && pairs > 0) {  // the same for every thread: the barrier is uniform
      // 1b. NeoX: channel p pairs with p + rope_dim / 2.
      for (int32_t i = tid; i < count * pairs; i += kThreads) {
        const int32_t t = i / pairs, pair = i % pairs;
        const float* angle =
            a.cos_sin + (static_cast<int64_t>(position_of(a.shard, t0 + t)) * pairs + pair) * 2;
        float* key = tile_s + t * stride;
        rotate_pair(key[pair], key[pair + pairs], angle[0], angle[1], false);
      }
      __syncthreads();
    }

    // 2. Scores.
    for (int32_t i = tid; i < group * kTile; i += kThreads) {
      const int32_t h = i / kTile, t = i % kTile;
      float score = -INFINITY;
      if (t < count) {
        const float* qh = q_s + h * hd;
        const float* key = tile_s + t * stride;
        float dot = 0.0f;
        for (int32_t c = 0; c < hd; ++c) dot += qh[c] * key[c];
        score = dot * a.scale;
      }
      p_s[i] = score;
    }
    __syncthreads();  // scores in; the keys are no longer read

    // 3. The online softmax of each query head (warp h, h + 4, ...)...
    for (int32_t h = warp; h < group; h += kThreads / kWarpSize) {
      float* head_scores = p_s + h * kTile;
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
    // ... and the tile's V rows into the buffer the keys left.
    const uint8_t* v_codes = block + vs.group_offset;
    const uint32_t* v_params =
        reinterpret_cast<const uint32_t*>(block + vs.group_offset + vs.group_code_bytes);
    for (int32_t i = tid; i < count * runs; i += kThreads) {
      const int32_t t = i / runs, run = i % runs;
      const int32_t o = first + t, c0 = run * kRun;
      const int32_t channel = g * hd + c0, row_group = channel / kPoolTokens;
      const uint64_t word =
          load_run(v_codes + static_cast<size_t>(o) * vs.row_code_bytes +
                       static_cast<size_t>(row_group) * v_group_bytes +
                       static_cast<size_t>(channel % kPoolTokens / kRun) * vs.bits,
                   vs.bits);
      const GroupGrid grid =
          read_grid(v_params + static_cast<int64_t>(o) * vs.row_groups + row_group);
      float* value = tile_s + t * stride + c0;
#pragma unroll
      for (int32_t j = 0; j < kRun; ++j)
        value[j] = group_decode(static_cast<int>((word >> (j * vs.bits)) & v_mask), grid);
    }
    __syncthreads();

    // 4. The V mix.
    for (int32_t i = tid; i < group * hd; i += kThreads) {
      const int32_t h = i / hd, c = i % hd;
      const float* p = p_s + h * kTile;
      float acc = acc_s[i] * rescale_s[h];
      for (int32_t t = 0; t < count; ++t) acc += p[t] * tile_s[t * stride + c];
      acc_s[i] = acc;
    }
  }
  __syncthreads();

  for (int32_t i = tid; i < group * hd; i += kThreads) {
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

int64_t packed_bytes(int bits, int64_t count) {
  return (bits * count + 7) / 8;
}

}  // namespace

std::string kivi_unsupported(const AttentionShape& shape) {
  if (shape.kv_heads <= 0 || shape.heads <= 0 || shape.heads % shape.kv_heads != 0)
    return "query heads must be a positive multiple of the KV heads";
  if (shape.heads / shape.kv_heads > kMaxGroup)
    return "at most " + std::to_string(kMaxGroup) + " query heads per KV head";
  if (shape.head_dim <= 0 || shape.head_dim % kRun != 0 || shape.head_dim > kMaxHeadDim)
    return "head_dim must be a multiple of 8 (runs of 8 codes) and at most " +
           std::to_string(kMaxHeadDim);
  if (shape.rope_dim < 0 || shape.rope_dim % 2 != 0 || shape.rope_dim > shape.head_dim)
    return "rope_dim must be even and at most head_dim";
  return "";
}

void kivi_attention_check(const PagedWindow& window, const KiviLayer& layer,
                          const AttentionShape& shape, int32_t n_rows, const ShardSpec& shard,
                          const SplitPlan& plan, const float* scratch,
                          const AttentionTarget& target) {
  const std::string shape_problem = kivi_unsupported(shape);
  require(shape_problem.empty(), "kivi: " + shape_problem);
  const int64_t kv = static_cast<int64_t>(shape.kv_heads) * shape.head_dim;
  const PagedStream& k = layer.keys;
  const PagedStream& v = layer.values;
  require(k.width == kv && v.width == kv,
          "kivi: K and V must be kv_heads * head_dim = " + std::to_string(kv) + " wide (got " +
              std::to_string(k.width) + " and " + std::to_string(v.width) + ")");
  require(k.per_channel && !v.per_channel, "kivi: K is quantized per channel and V per token");
  require(k.bits >= 1 && k.bits <= 8 && v.bits >= 1 && v.bits <= 8, "kivi: bits must be 1..8");
  require(static_cast<int64_t>(k.group_code_bytes) == packed_bytes(k.bits, kv * kPoolTokens),
          "kivi: K group_code_bytes does not match 128 x kv codes");
  int64_t row_bytes = 0, row_groups = 0;
  for (int64_t at = 0; at < kv; at += kPoolTokens, ++row_groups)
    row_bytes += packed_bytes(v.bits, std::min<int64_t>(kPoolTokens, kv - at));
  require(v.row_groups == row_groups && static_cast<int64_t>(v.row_code_bytes) == row_bytes &&
              v.group_code_bytes == v.row_code_bytes * kPoolTokens,
          "kivi: V row layout does not match groups of 128 channels");
  require((k.group_offset + k.group_code_bytes) % 4 == 0 &&
              (v.group_offset + v.group_code_bytes) % 4 == 0 && k.window_offset % 2 == 0,
          "kivi: misaligned stream offsets");
  require(window.window_tokens > 0, "kivi: the per-channel K needs window pages");
  require(shard.shards >= 1 && shard.unit >= 1 && shard.index >= 0 && shard.index < shard.shards,
          "kivi: bad sequence shard");
  require(shard.shards == 1 || shard.unit == kPoolTokens,
          "kivi: shards must deal whole 128-token groups");
  require(n_rows >= 0, "kivi: negative rows");
  require(plan.splits >= 1 && plan.splits <= 65535 && plan.tokens_per_split > 0 &&
              plan.tokens_per_split % kPoolTokens == 0,
          "kivi: splits must be whole pool blocks");
  require(plan.splits == 1 || scratch != nullptr, "kivi: split-K needs scratch");
  const bool states = target.state_max && target.state_sum && target.state_acc;
  const bool any_state = target.state_max || target.state_sum || target.state_acc;
  require((target.out != nullptr) != any_state && (target.out != nullptr || states),
          "kivi: attention target must be either out or all three state buffers");
  require(static_cast<int64_t>(n_rows) * shape.heads <= INT_MAX, "kivi: too many rows");
}

void kivi_attention(const PagedArena& pool, const PagedWindow& window, const PagedLengths& lengths,
                    const KiviLayer& layer, const AttentionShape& shape, const StepRow* rows,
                    int32_t n_rows, const float* q, const float* cos_sin, const ShardSpec& shard,
                    const SplitPlan& plan, float* scratch, const AttentionTarget& target,
                    Stream& stream) {
  kivi_attention_check(window, layer, shape, n_rows, shard, plan, scratch, target);
  if (n_rows == 0) return;
  const size_t shared_bytes =
      shared_floats(shape.heads / shape.kv_heads, shape.head_dim) * sizeof(float);
  // kMaxGroup x kMaxHeadDim: 44.4 KiB, under the default 48 KiB.
  require(shared_bytes <= kDefaultSharedBytes, "kivi: shared memory over 48 KiB");
  KiviArgs args{pool,
                window,
                lengths,
                layer,
                shape,
                rows,
                q,
                cos_sin,
                shard,
                plan,
                1.0f / std::sqrt(static_cast<float>(shape.head_dim)),
                scratch,
                target};
  const dim3 grid(static_cast<unsigned>(n_rows), static_cast<unsigned>(plan.splits),
                  static_cast<unsigned>(shape.kv_heads));
  kivi_decode_kernel<<<grid, kThreads, shared_bytes, stream_of(stream)>>>(args);
  CUDA_CHECK_LAUNCH();
  if (plan.splits > 1)
    merge_split_states(rows, n_rows, shard, plan, shape.heads, shape.head_dim, scratch, target,
                       stream);
}

}  // namespace xq::cuda::paged
