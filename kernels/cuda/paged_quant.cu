// The quantized caches on the device (kernels/cuda/paged_attention.h): the
// encode of a step's rows into per-token and per-channel streams, the fp16
// window of per-channel streams, the truncation of a quantized group back
// into that window, the latent modes' fp16 outlier channels, XQuant-CL's
// accumulator rows, and the materialize path of attention (stored rows
// dequantized into dense fp32 scratch, projected, rotated, attended).
//
// Bytes as the CPU writes them (runtime/row_store.cpp): per token, each row's
// groups of up to 128 channels packed one after the other (each group from a
// byte boundary), then 128 x row_groups (scale, zero) fp16 pairs; per channel,
// a block's 128 x width codes token-major in one LSB-first stream, then width
// pairs. Value i of a stream occupies bits [i B, i B + B), stream bit k being
// bit k % 8 of byte k / 8 (kernels/cpu/group_quant.h). Grids and codes come
// from kernels/group_quant.h, the same functions the CPU calls, so codes agree
// bit for bit wherever the inputs do (the grid's coverage and the midpoint
// comparisons are exact in fp32).
//
// Every decision that changes from step to step (which rows complete a group,
// which go to the window, how many rows a sequence holds) is read from device
// arrays that begin_step writes, so the launches of run_layer can be captured
// in a CUDA graph; only quant_group_to_window (truncation, host-driven) takes
// block ids as arguments.
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

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

constexpr int32_t kGroup = 128;  // tokens per block and per-channel group; channels per row group
constexpr int kThreads = 256;    // elementwise kernels
constexpr int kGroupThreads = 256;
constexpr int kRowGroupThreads = kGroup;  // one thread per channel of a row group
constexpr int kAttentionThreads = 128;    // one thread per token of a tile
constexpr int kAttentionWarps = kAttentionThreads / kWarpSize;
// An fp16 NaN: the parameters of a group the CPU would refuse (a value that is
// NaN, infinite or beyond the fp16 range), so attention over it shows NaN.
constexpr uint16_t kHalfNan = 0x7e00;

__host__ __device__ inline int64_t packed_bytes(int bits, int64_t count) {
  return (static_cast<int64_t>(bits) * count + 7) / 8;
}

__device__ inline float half_bits_to_float(uint16_t bits) {
  return __half2float(__ushort_as_half(bits));
}
__device__ inline uint16_t float_to_half_bits(float value) {
  return __half_as_ushort(__float2half_rn(value));
}
// fp32 -> fp16 (nearest, ties to even) -> fp32, as cpu::fp32_to_fp16_row then back.
__device__ inline float through_half(float value) {
  return __half2float(__float2half_rn(value));
}
__device__ inline bool storable(float value) {
  return fabsf(value) <= kFp16Max;  // false for NaN too
}

// The code at stream index `index`: it spans at most two bytes, and the second
// is read only when the code reaches into it (never past the stream).
__device__ inline int read_code(const uint8_t* packed, int64_t index, int bits) {
  const int64_t bit = index * bits;
  const int shift = static_cast<int>(bit & 7);
  unsigned window = packed[bit >> 3];
  if (shift + bits > 8) window |= static_cast<unsigned>(packed[(bit >> 3) + 1]) << 8;
  return static_cast<int>((window >> shift) & ((1u << bits) - 1));
}

// Byte `j` of a stream of `count` codes: the bits of every code that reaches
// into it (at most 8 / bits + 1 codes), code_of(i) giving code i. Bits past
// the last code stay zero, as cpu::pack_codes leaves them.
template <typename CodeOf>
__device__ inline uint8_t assemble_byte(int64_t j, int bits, int64_t count, CodeOf&& code_of) {
  const int64_t first_bit = j * 8;
  const int64_t first = first_bit / bits;
  int64_t last = (first_bit + 7) / bits;
  if (last > count - 1) last = count - 1;
  unsigned byte = 0;
  for (int64_t i = first; i <= last; ++i) {
    const unsigned code = static_cast<unsigned>(code_of(i));
    const int64_t shift = i * bits - first_bit;
    byte |= shift >= 0 ? code << shift : code >> -shift;
  }
  return static_cast<uint8_t>(byte & 0xffu);
}

__device__ inline uint8_t* block_at(const PagedArena& pool, int32_t seq, int32_t slot) {
  const int64_t block = pool.tables[static_cast<int64_t>(seq) * pool.table_stride + slot / kGroup];
  return pool.arena + static_cast<size_t>(block) * pool.block_bytes;
}

// Window row `offset` (offset within the partial group) of a per-channel stream.
__device__ inline uint16_t* window_row(const PagedArena& pool, const PagedWindow& window,
                                       const PagedStream& stream, int32_t seq, int32_t offset) {
  const int64_t page =
      window
          .window[static_cast<int64_t>(seq) * window.window_stride + offset / window.window_tokens];
  return reinterpret_cast<uint16_t*>(pool.arena + static_cast<size_t>(page) * pool.block_bytes +
                                     stream.window_offset) +
         static_cast<int64_t>(offset % window.window_tokens) * stream.width;
}

// Block-wide reductions of a CTA of kAttentionWarps (or kRowGroupThreads /
// 32) warps through `scratch` (one float per warp). Every thread gets the
// result; the trailing barrier lets the caller reuse scratch at once.
__device__ inline float block_max(float value, float* scratch, int warps) {
  value = warp_max(value);
  if (threadIdx.x % kWarpSize == 0) scratch[threadIdx.x / kWarpSize] = value;
  __syncthreads();
  float result = scratch[0];
  for (int w = 1; w < warps; ++w) result = attention_state::larger(result, scratch[w]);
  __syncthreads();
  return result;
}
__device__ inline float block_min(float value, float* scratch, int warps) {
  return -block_max(-value, scratch, warps);
}
__device__ inline float block_sum(float value, float* scratch, int warps) {
  value = warp_sum(value);
  if (threadIdx.x % kWarpSize == 0) scratch[threadIdx.x / kWarpSize] = value;
  __syncthreads();
  float result = 0.0f;
  for (int w = 0; w < warps; ++w) result += scratch[w];
  __syncthreads();
  return result;
}

// ---------------------------------------------------------------------------
// Encode

// Tiling: a CTA per (step row, group along the row), a thread per channel of
// the group (up to 128). The CTA finds the group's min and max (warp
// shuffles, then one float per warp in shared memory), every thread derives
// the same grid and its own code into shared memory, and threads then build
// the group's packed bytes one byte each and thread 0 writes the parameters.
__global__ void __launch_bounds__(kRowGroupThreads)
    encode_per_token_kernel(PagedArena pool, PagedStream stream, const StepRow* rows,
                            const float* in, int64_t in_stride, ShardSpec shard) {
  __shared__ uint8_t codes[kGroup];
  __shared__ float scratch[kRowGroupThreads / kWarpSize];
  const int32_t row = blockIdx.x, group = blockIdx.y, tid = threadIdx.x;
  const StepRow r = rows[row];
  if (!owns(shard, r.pos)) return;  // the whole CTA leaves together
  const int32_t slot = owned_before(shard, r.pos);
  const int64_t c0 = static_cast<int64_t>(group) * kGroup;
  const int32_t size = static_cast<int32_t>(min(static_cast<int64_t>(kGroup), stream.width - c0));
  const bool active = tid < size;
  const float value = active ? in[static_cast<int64_t>(row) * in_stride + c0 + tid] : 0.0f;
  const bool bad = __syncthreads_or(active && !storable(value));
  const float lo = block_min(active ? value : INFINITY, scratch, kRowGroupThreads / kWarpSize);
  const float hi = block_max(active ? value : -INFINITY, scratch, kRowGroupThreads / kWarpSize);
  GroupGrid grid{0.0f, 0.0f};
  const bool ok = !bad && choose_group_grid(lo, hi, stream.bits, &grid);
  if (active) codes[tid] = ok ? static_cast<uint8_t>(group_encode(value, grid, stream.bits)) : 0;
  __syncthreads();

  uint8_t* base = block_at(pool, r.seq, slot) + stream.group_offset;
  const int32_t in_block = slot % kGroup;
  uint8_t* out = base + static_cast<size_t>(in_block) * stream.row_code_bytes +
                 static_cast<size_t>(group) * packed_bytes(stream.bits, kGroup);
  const int64_t bytes = packed_bytes(stream.bits, size);
  for (int64_t j = tid; j < bytes; j += blockDim.x)
    out[j] = assemble_byte(j, stream.bits, size, [&](int64_t i) { return codes[i]; });
  if (tid == 0) {
    uint16_t* params = reinterpret_cast<uint16_t*>(base + stream.group_code_bytes) +
                       2 * (static_cast<int64_t>(in_block) * stream.row_groups + group);
    params[0] = ok ? float_to_half_bits(grid.scale) : kHalfNan;
    params[1] = ok ? float_to_half_bits(grid.zero) : kHalfNan;
  }
}

// The value (through fp16) of in-group offset `offset`, channel c, of the
// group a completing row closes: from the window below `first_new`, else from
// the step's input row that holds it.
struct GroupSource {
  PagedArena pool;
  PagedWindow window;
  PagedStream stream;
  int32_t seq;
  int32_t first_new;  // offsets from here on are the step's rows
  const float* in;
  int64_t first_row;  // the step row of offset 0 (negative where the window holds it)
  int64_t in_stride;
  __device__ float value(int32_t offset, int64_t c) const {
    if (offset >= first_new) return through_half(in[(first_row + offset) * in_stride + c]);
    return half_bits_to_float(window_row(pool, window, stream, seq, offset)[c]);
  }
};

// Tiling: a CTA per step row; only a row whose slot is the 128th of its group
// goes on (one CTA per group completed in the step), the others leave at
// once. Pass 1, a thread per channel (strided by the CTA size): min and max
// over the group's 128 tokens, the grid into shared memory (scale, zero per
// channel: 8 x width bytes, dynamic) and the parameters into the block.
// Pass 2, a thread per byte of the block's packed codes (token-major): the
// codes reaching into the byte, computed from the group's values and their
// channel's grid.
__global__ void __launch_bounds__(kGroupThreads)
    complete_groups_kernel(PagedArena pool, PagedWindow window, StepBegins begins,
                           PagedStream stream, const StepRow* rows, const float* in,
                           int64_t in_stride, ShardSpec shard) {
  extern __shared__ float grids[];  // scale[width], zero[width]
  const int32_t row = blockIdx.x;
  const StepRow r = rows[row];
  if (!owns(shard, r.pos)) return;
  const int32_t slot = owned_before(shard, r.pos);
  if (slot % kGroup != kGroup - 1) return;
  // A group's 128 slots are 128 consecutive positions (one shard unit), and a
  // segment's rows are consecutive positions: offset o is step row
  // row - 127 + o where it belongs to the step.
  const int32_t first_position = r.pos - (kGroup - 1);
  GroupSource source;
  source.pool = pool;
  source.window = window;
  source.stream = stream;
  source.seq = r.seq;
  source.first_new = max(0, begins.step_begin[r.seq] - first_position);
  source.in = in;
  source.first_row = static_cast<int64_t>(row) - (kGroup - 1);
  source.in_stride = in_stride;
  const int64_t width = stream.width;
  float* scales = grids;
  float* zeros = grids + width;
  uint8_t* base = block_at(pool, r.seq, slot) + stream.group_offset;
  uint16_t* params = reinterpret_cast<uint16_t*>(base + stream.group_code_bytes);

  for (int64_t c = threadIdx.x; c < width; c += blockDim.x) {
    float lo = INFINITY, hi = -INFINITY;
    bool bad = false;
    for (int32_t o = 0; o < kGroup; ++o) {
      const float value = source.value(o, c);
      bad = bad || !storable(value);
      lo = fminf(lo, value);
      hi = fmaxf(hi, value);
    }
    GroupGrid grid{0.0f, 0.0f};
    const bool ok = !bad && choose_group_grid(lo, hi, stream.bits, &grid);
    // A refused group: NaN parameters, codes 0 (group_encode of a NaN scale).
    scales[c] = ok ? grid.scale : NAN;
    zeros[c] = ok ? grid.zero : NAN;
    params[2 * c] = ok ? float_to_half_bits(grid.scale) : kHalfNan;
    params[2 * c + 1] = ok ? float_to_half_bits(grid.zero) : kHalfNan;
  }
  __syncthreads();
  const int64_t count = static_cast<int64_t>(kGroup) * width;
  const int64_t bytes = static_cast<int64_t>(stream.group_code_bytes);
  for (int64_t j = threadIdx.x; j < bytes; j += blockDim.x) {
    base[j] = assemble_byte(j, stream.bits, count, [&](int64_t i) {
      const int32_t o = static_cast<int32_t>(i / width);
      const int64_t c = i % width;
      const GroupGrid grid{scales[c], zeros[c]};
      return group_encode(source.value(o, c), grid, stream.bits);
    });
  }
}

// A thread per (step row, channel): a row whose group stays partial after
// the step (slot at or past floor(stored / 128) * 128) goes to its window row
// in fp16. Consecutive threads write consecutive channels of one row.
__global__ void write_window_kernel(PagedArena pool, PagedWindow window, PagedLengths lengths,
                                    PagedStream stream, const StepRow* rows, int32_t n_rows,
                                    const float* in, int64_t in_stride, ShardSpec shard) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n_rows * stream.width) return;
  const int64_t row = i / stream.width, c = i % stream.width;
  const StepRow r = rows[row];
  if (!owns(shard, r.pos)) return;
  const int32_t slot = owned_before(shard, r.pos);
  if (slot < lengths.stored[r.seq] / kGroup * kGroup) return;  // its group was quantized
  window_row(pool, window, stream, r.seq, slot % kGroup)[c] =
      float_to_half_bits(in[row * in_stride + c]);
}

// A thread per (kept row, channel): dequantize, round to fp16, store in the window.
__global__ void group_to_window_kernel(PagedArena pool, PagedStream stream, int32_t group_block,
                                       const int32_t* window_pages, int32_t window_tokens,
                                       int32_t head) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= head * stream.width) return;
  const int32_t t = static_cast<int32_t>(i / stream.width);
  const int64_t c = i % stream.width;
  const uint8_t* base =
      pool.arena + static_cast<size_t>(group_block) * pool.block_bytes + stream.group_offset;
  const uint16_t* params = reinterpret_cast<const uint16_t*>(base + stream.group_code_bytes);
  const GroupGrid grid{half_bits_to_float(params[2 * c]), half_bits_to_float(params[2 * c + 1])};
  const float value = group_decode(read_code(base, i, stream.bits), grid);
  uint16_t* row =
      reinterpret_cast<uint16_t*>(
          pool.arena + static_cast<size_t>(window_pages[t / window_tokens]) * pool.block_bytes +
          stream.window_offset) +
      static_cast<int64_t>(t % window_tokens) * stream.width;
  row[c] = float_to_half_bits(value);
}

// A thread per (step row, outlier): keep the value in fp16, zero it in the latent.
__global__ void keep_outliers_kernel(PagedArena pool, size_t outlier_offset, int32_t per_token,
                                     int64_t channel_step, const StepRow* rows, int32_t n_rows,
                                     float* latent, int64_t width, ShardSpec shard) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<int64_t>(n_rows) * per_token) return;
  const int64_t row = i / per_token;
  const int32_t k = static_cast<int32_t>(i % per_token);
  const StepRow r = rows[row];
  if (!owns(shard, r.pos)) return;
  const int32_t slot = owned_before(shard, r.pos);
  uint16_t* kept = reinterpret_cast<uint16_t*>(block_at(pool, r.seq, slot) + outlier_offset) +
                   static_cast<int64_t>(slot % kGroup) * per_token;
  float& value = latent[row * width + k * channel_step];
  kept[k] = float_to_half_bits(value);
  value = 0.0f;
}

// A thread per (step row, channel) of X.
__global__ void cross_layer_delta_kernel(PagedArena pool, size_t accumulator_offset, int64_t dim,
                                         const StepRow* rows, int32_t n_rows, const float* x,
                                         bool subtract, float* delta, ShardSpec shard) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n_rows * dim) return;
  const int64_t row = i / dim, c = i % dim;
  const StepRow r = rows[row];
  float value = x[i];
  if (subtract && owns(shard, r.pos)) {
    const int32_t slot = owned_before(shard, r.pos);
    const float* previous =
        reinterpret_cast<const float*>(block_at(pool, r.seq, slot) + accumulator_offset) +
        static_cast<int64_t>(slot % kGroup) * dim;
    value -= previous[c];
  }
  delta[i] = value;
}

// ---------------------------------------------------------------------------
// Materialize path

// A thread per (slot, channel) of the dense rows the launch covers
// (DenseRows::capacity); slots past the sequence's stored rows leave. Consecutive threads read
// consecutive codes of one row (token-major per channel, along the row per token).
__global__ void materialize_kernel(PagedArena pool, PagedWindow window, PagedLengths lengths,
                                   PagedStream stream, DenseRows dense, float* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<int64_t>(dense.capacity) * stream.width) return;
  const int32_t t = static_cast<int32_t>(i / stream.width);
  const int64_t c = i % stream.width;
  const int32_t seq = dense.seq_row->seq;
  const int32_t stored = lengths.stored[seq];
  if (t >= stored) return;
  const int32_t in_block = t % kGroup;
  if (stream.per_channel) {
    if (t >= stored / kGroup * kGroup) {
      out[i] = half_bits_to_float(window_row(pool, window, stream, seq, in_block)[c]);
      return;
    }
    const uint8_t* base = block_at(pool, seq, t) + stream.group_offset;
    const uint16_t* params = reinterpret_cast<const uint16_t*>(base + stream.group_code_bytes);
    const GroupGrid grid{half_bits_to_float(params[2 * c]), half_bits_to_float(params[2 * c + 1])};
    out[i] = group_decode(read_code(base, in_block * stream.width + c, stream.bits), grid);
    return;
  }
  const int64_t group = c / kGroup;
  const uint8_t* base = block_at(pool, seq, t) + stream.group_offset;
  const uint8_t* codes = base + static_cast<size_t>(in_block) * stream.row_code_bytes +
                         group * packed_bytes(stream.bits, kGroup);
  const uint16_t* params = reinterpret_cast<const uint16_t*>(base + stream.group_code_bytes) +
                           2 * (static_cast<int64_t>(in_block) * stream.row_groups + group);
  const GroupGrid grid{half_bits_to_float(params[0]), half_bits_to_float(params[1])};
  out[i] = group_decode(read_code(codes, c % kGroup, stream.bits), grid);
}

// A thread per (slot, channel) of Xhat.
__global__ void cross_layer_accumulate_kernel(PagedArena pool, size_t accumulator_offset,
                                              int64_t dim, PagedLengths lengths, DenseRows dense,
                                              float* xhat, bool add, bool keep) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<int64_t>(dense.capacity) * dim) return;
  const int32_t t = static_cast<int32_t>(i / dim);
  const int32_t seq = dense.seq_row->seq;
  if (t >= lengths.stored[seq]) return;
  float* row = reinterpret_cast<float*>(block_at(pool, seq, t) + accumulator_offset) +
               static_cast<int64_t>(t % kGroup) * dim;
  float value = xhat[i];
  if (add) value += row[i % dim];
  xhat[i] = value;
  if (keep) row[i % dim] = value;
}

// A thread per (slot, KV head, pair): the pair rotated at the slot's global position.
__global__ void rope_dense_kernel(float* keys, PagedLengths lengths, DenseRows dense,
                                  AttentionShape shape, const float* cos_sin, ShardSpec shard) {
  const int32_t pairs = shape.rope_dim / 2;
  const int64_t per_slot = static_cast<int64_t>(shape.kv_heads) * pairs;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (per_slot == 0 || i >= dense.capacity * per_slot) return;
  const int32_t t = static_cast<int32_t>(i / per_slot);
  if (t >= lengths.stored[dense.seq_row->seq]) return;
  const int64_t g = (i % per_slot) / pairs, pair = i % pairs;
  float* head = keys + (static_cast<int64_t>(t) * shape.kv_heads + g) * shape.head_dim;
  const float* table = cos_sin + static_cast<int64_t>(position_of(shard, t)) * pairs * 2;
  const float cos_angle = table[2 * pair], sin_angle = table[2 * pair + 1];
  const bool interleaved = shape.rope_layout == RopeLayout::kInterleaved;
  float& a = interleaved ? head[2 * pair] : head[pair];
  float& b = interleaved ? head[2 * pair + 1] : head[pair + pairs];
  const float a0 = a, b0 = b;
  a = a0 * cos_angle - b0 * sin_angle;
  b = a0 * sin_angle + b0 * cos_angle;
}

// Tiling: a CTA per (query row, query head), a thread per token of a
// 128-token tile: thread t scores token t (fp32 dot over head_dim, keys read
// from global memory), the CTA reduces the tile's max and sum (warp shuffles,
// then shared memory) into the online-softmax state of attention_state, and
// thread c < head_dim adds Σ_t p_t v_t[c] to its channel's accumulator.
__global__ void __launch_bounds__(kAttentionThreads)
    dense_attention_kernel(const float* keys, const float* values, const StepRow* rows,
                           const float* q, AttentionShape shape, ShardSpec shard, float scale,
                           AttentionTarget target) {
  __shared__ float q_s[kMaxHeadDim];
  __shared__ float p_s[kAttentionThreads];
  __shared__ float scratch[kAttentionWarps];
  const int32_t row = blockIdx.x, h = blockIdx.y, tid = threadIdx.x;
  const int32_t hd = shape.head_dim, heads = shape.heads;
  const int64_t kv = static_cast<int64_t>(shape.kv_heads) * hd;
  const int32_t g = h / (heads / shape.kv_heads);
  const int32_t visible = owned_before(shard, rows[row].pos + 1);
  const int64_t state_row = static_cast<int64_t>(row) * heads + h;
  for (int32_t c = tid; c < hd; c += blockDim.x) q_s[c] = q[state_row * hd + c];
  __syncthreads();
  float max = -INFINITY, sum = 0.0f, acc = 0.0f;  // acc: channel tid (< hd)
  for (int32_t t0 = 0; t0 < visible; t0 += kAttentionThreads) {
    const int32_t count = min(kAttentionThreads, visible - t0);
    float score = -INFINITY;
    if (tid < count) {
      const float* key = keys + static_cast<int64_t>(t0 + tid) * kv + g * hd;
      float dot = 0.0f;
      for (int32_t c = 0; c < hd; ++c) dot += q_s[c] * key[c];
      score = dot * scale;
    }
    const float tile_max = block_max(score, scratch, kAttentionWarps);
    const float new_max = attention_state::larger(max, tile_max);
    const float rescale = max == -INFINITY ? 0.0f : expf(max - new_max);
    const float p = tid < count ? expf(score - new_max) : 0.0f;
    p_s[tid] = p;
    sum = sum * rescale + block_sum(p, scratch, kAttentionWarps);  // its barriers publish p_s
    max = new_max;
    if (tid < hd) {
      const float* value = values + static_cast<int64_t>(t0) * kv + g * hd + tid;
      float tile = 0.0f;
      for (int32_t t = 0; t < count; ++t) tile += p_s[t] * value[t * kv];
      acc = acc * rescale + tile;
    }
    __syncthreads();  // p_s is read before the next tile writes it
  }
  if (tid < hd) {
    if (target.out != nullptr) {
      attention_state::normalize_row(sum, &acc, 1, target.out + state_row * hd + tid);
    } else {
      target.state_acc[state_row * hd + tid] = acc;
    }
  }
  if (tid == 0 && target.out == nullptr) {
    target.state_max[state_row] = max;
    target.state_sum[state_row] = sum;
  }
}

void check_stream(const PagedStream& stream) {
  require(stream.width > 0 && stream.bits >= 1 && stream.bits <= 8,
          "quantized stream: width must be positive and bits 1..8");
}

}  // namespace

void quant_encode_per_token(const PagedArena& pool, const PagedStream& stream, const StepRow* rows,
                            int32_t n_rows, const float* in, int64_t in_stride,
                            const ShardSpec& shard, Stream& cuda_stream) {
  check_stream(stream);
  require(!stream.per_channel, "quant_encode_per_token: a per-channel stream");
  require(n_rows >= 0 && stream.row_groups >= 1 && stream.row_groups <= 65535,
          "quant_encode_per_token: bad rows or row groups");
  if (n_rows == 0) return;
  const dim3 grid(static_cast<unsigned>(n_rows), static_cast<unsigned>(stream.row_groups));
  encode_per_token_kernel<<<grid, kRowGroupThreads, 0, stream_of(cuda_stream)>>>(
      pool, stream, rows, in, in_stride, shard);
  CUDA_CHECK_LAUNCH();
}

void quant_encode_per_channel(const PagedArena& pool, const PagedWindow& window,
                              const PagedLengths& lengths, const StepBegins& begins,
                              const PagedStream& stream, const StepRow* rows, int32_t n_rows,
                              const float* in, int64_t in_stride, const ShardSpec& shard,
                              Stream& cuda_stream) {
  check_stream(stream);
  require(stream.per_channel, "quant_encode_per_channel: a per-token stream");
  require(window.window_tokens > 0, "quant_encode_per_channel: no window pages");
  require(shard.shards == 1 || shard.unit == kGroup,
          "quant_encode_per_channel: shards must deal whole 128-token groups");
  require(n_rows >= 0, "quant_encode_per_channel: negative rows");
  if (n_rows == 0) return;
  const size_t shared_bytes = 2 * static_cast<size_t>(stream.width) * sizeof(float);
  require(shared_bytes <= 48 * 1024, "quant_encode_per_channel: width over 6144 channels");
  // Groups first: they read the window rows the partial rows then overwrite.
  complete_groups_kernel<<<static_cast<unsigned>(n_rows), kGroupThreads, shared_bytes,
                           stream_of(cuda_stream)>>>(pool, window, begins, stream, rows, in,
                                                     in_stride, shard);
  CUDA_CHECK_LAUNCH();
  const int64_t items = static_cast<int64_t>(n_rows) * stream.width;
  write_window_kernel<<<blocks_for(items, kThreads), kThreads, 0, stream_of(cuda_stream)>>>(
      pool, window, lengths, stream, rows, n_rows, in, in_stride, shard);
  CUDA_CHECK_LAUNCH();
}

void quant_group_to_window(const PagedArena& pool, const PagedStream& stream, int32_t group_block,
                           const int32_t* window_pages, int32_t window_tokens, int32_t head,
                           Stream& cuda_stream) {
  check_stream(stream);
  require(stream.per_channel && window_tokens > 0 && head >= 0 && head < kGroup,
          "quant_group_to_window: a per-channel stream and a head inside the group");
  if (head == 0) return;
  const int64_t items = static_cast<int64_t>(head) * stream.width;
  group_to_window_kernel<<<blocks_for(items, kThreads), kThreads, 0, stream_of(cuda_stream)>>>(
      pool, stream, group_block, window_pages, window_tokens, head);
  CUDA_CHECK_LAUNCH();
}

void keep_outlier_channels(const PagedArena& pool, size_t outlier_offset, int32_t per_token,
                           int64_t channel_step, const StepRow* rows, int32_t n_rows, float* latent,
                           int64_t width, const ShardSpec& shard, Stream& cuda_stream) {
  require(per_token >= 1 && (per_token - 1) * channel_step < width,
          "keep_outlier_channels: outlier channels beyond the latent");
  if (n_rows <= 0) return;
  const int64_t items = static_cast<int64_t>(n_rows) * per_token;
  keep_outliers_kernel<<<blocks_for(items, kThreads), kThreads, 0, stream_of(cuda_stream)>>>(
      pool, outlier_offset, per_token, channel_step, rows, n_rows, latent, width, shard);
  CUDA_CHECK_LAUNCH();
}

void cross_layer_delta(const PagedArena& pool, size_t accumulator_offset, int64_t dim,
                       const StepRow* rows, int32_t n_rows, const float* x, bool subtract,
                       float* delta, const ShardSpec& shard, Stream& cuda_stream) {
  if (n_rows <= 0) return;
  const int64_t items = static_cast<int64_t>(n_rows) * dim;
  cross_layer_delta_kernel<<<blocks_for(items, kThreads), kThreads, 0, stream_of(cuda_stream)>>>(
      pool, accumulator_offset, dim, rows, n_rows, x, subtract, delta, shard);
  CUDA_CHECK_LAUNCH();
}

void quant_materialize(const PagedArena& pool, const PagedWindow& window,
                       const PagedLengths& lengths, const PagedStream& stream,
                       const DenseRows& dense, float* out, Stream& cuda_stream) {
  check_stream(stream);
  if (dense.capacity <= 0) return;
  const int64_t items = static_cast<int64_t>(dense.capacity) * stream.width;
  materialize_kernel<<<blocks_for(items, kThreads), kThreads, 0, stream_of(cuda_stream)>>>(
      pool, window, lengths, stream, dense, out);
  CUDA_CHECK_LAUNCH();
}

void cross_layer_accumulate(const PagedArena& pool, size_t accumulator_offset, int64_t dim,
                            const PagedLengths& lengths, const DenseRows& dense, float* xhat,
                            bool add, bool keep, Stream& cuda_stream) {
  if (dense.capacity <= 0 || (!add && !keep)) return;
  const int64_t items = static_cast<int64_t>(dense.capacity) * dim;
  cross_layer_accumulate_kernel<<<blocks_for(items, kThreads), kThreads, 0,
                                  stream_of(cuda_stream)>>>(pool, accumulator_offset, dim, lengths,
                                                            dense, xhat, add, keep);
  CUDA_CHECK_LAUNCH();
}

void project_rows(const float* in, int64_t in_stride, int32_t rows, const RowProjection& projection,
                  float* out, int64_t out_stride, Blas& blas, Stream& cuda_stream) {
  const RowProjection& p = projection;
  require(p.blocks >= 1 && p.in_width > 0 && p.out_width > 0, "project_rows: empty projection");
  require(p.in_step == 1 || p.out_step == 1,
          "project_rows: the matrix must be contiguous along its inputs or its outputs");
  require(in_stride >= static_cast<int64_t>(p.blocks) * p.in_width &&
              out_stride >= static_cast<int64_t>(p.blocks) * p.out_width,
          "project_rows: row strides narrower than the blocks");
  require(in_stride <= INT_MAX && out_stride <= INT_MAX && p.in_step <= INT_MAX &&
              p.out_step <= INT_MAX,
          "project_rows: strides exceed cuBLAS's int range");
  if (rows <= 0) return;
  // cuBLAS is column-major: the row-major (rows, stride) buffers read as
  // (stride x rows) matrices, so out^T (out_width x rows) = W^T (out_width x
  // in_width) · in^T (in_width x rows), W^T[j, c] = matrix[c * in_step + j *
  // out_step]. Output-major storage (in_step 1) is W^T's transpose stored
  // column-major with ld out_step (op T); input-major (out_step 1) is W^T
  // itself with ld in_step (op N). Diagonal blocks are a strided batch.
  const bool inputs_contiguous = p.in_step == 1;
  const cublasOperation_t op_w = inputs_contiguous ? CUBLAS_OP_T : CUBLAS_OP_N;
  const int ld_w = static_cast<int>(inputs_contiguous ? p.out_step : p.in_step);
  const auto handle = static_cast<cublasHandle_t>(blas.handle());
  CUBLAS_CHECK(cublasSetStream(handle, stream_of(cuda_stream)));
  CUBLAS_CHECK(cublasSetWorkspace(handle, blas.workspace(), blas.workspace_bytes()));
  const float alpha = 1.0f, beta = 0.0f;
  if (p.blocks == 1) {
    CUBLAS_CHECK(cublasSgemm(handle, op_w, CUBLAS_OP_N, p.out_width, rows, p.in_width, &alpha,
                             p.matrix, ld_w, in, static_cast<int>(in_stride), &beta, out,
                             static_cast<int>(out_stride)));
    return;
  }
  CUBLAS_CHECK(cublasSgemmStridedBatched(handle, op_w, CUBLAS_OP_N, p.out_width, rows, p.in_width,
                                         &alpha, p.matrix, ld_w, p.block_stride, in,
                                         static_cast<int>(in_stride), p.in_width, &beta, out,
                                         static_cast<int>(out_stride), p.out_width, p.blocks));
}

void rope_dense_keys(float* keys, const PagedLengths& lengths, const DenseRows& dense,
                     const AttentionShape& shape, const float* cos_sin, const ShardSpec& shard,
                     Stream& cuda_stream) {
  require(shape.rope_dim >= 0 && shape.rope_dim % 2 == 0 && shape.rope_dim <= shape.head_dim,
          "rope_dense_keys: rope_dim must be even and at most head_dim");
  const int64_t items =
      static_cast<int64_t>(dense.capacity) * shape.kv_heads * (shape.rope_dim / 2);
  if (items == 0) return;
  rope_dense_kernel<<<blocks_for(items, kThreads), kThreads, 0, stream_of(cuda_stream)>>>(
      keys, lengths, dense, shape, cos_sin, shard);
  CUDA_CHECK_LAUNCH();
}

void dense_attention(const float* keys, const float* values, const StepRow* rows, int32_t n_rows,
                     const float* q, const AttentionShape& shape, const ShardSpec& shard,
                     const AttentionTarget& target, Stream& cuda_stream) {
  require(shape.kv_heads > 0 && shape.heads > 0 && shape.heads % shape.kv_heads == 0,
          "dense_attention: query heads must be a positive multiple of the KV heads");
  require(shape.head_dim > 0 && shape.head_dim <= kMaxHeadDim,
          "dense_attention: head_dim must be at most " + std::to_string(kMaxHeadDim));
  require((target.out != nullptr) != (target.state_max != nullptr && target.state_sum != nullptr &&
                                      target.state_acc != nullptr),
          "dense_attention: target must be either out or all three state buffers");
  require(shape.heads <= 65535, "dense_attention: too many heads");
  if (n_rows <= 0) return;
  const dim3 grid(static_cast<unsigned>(n_rows), static_cast<unsigned>(shape.heads));
  dense_attention_kernel<<<grid, kAttentionThreads, 0, stream_of(cuda_stream)>>>(
      keys, values, rows, q, shape, shard, 1.0f / std::sqrt(static_cast<float>(shape.head_dim)),
      target);
  CUDA_CHECK_LAUNCH();
}

}  // namespace xq::cuda::paged
