// The fused XQuant decode kernel (kernels/cuda/paged_attention.h,
// xquant_latent_attention): attention over the latent layout of the xquant
// modes on GQA models, straight from the packed latents in the pool's blocks.
// Nothing the size of K or V is ever materialized: per 64-token tile the K
// latent of the CTA's KV heads is dequantized into shared memory (eight codes
// per load), K is rebuilt from it with tensor cores, rotated and scored, and
// the attention weights mix the dequantized V-latent rows (kv wide, decoded
// once for all the CTA's heads) with tensor cores; the mix is projected to V
// once per query head at the end. Design, shared-memory budget and the bytes,
// FLOPs and instructions per token: kernels/cuda/xquant_decode.md.
//
// It computes what QuantizedCache::attend_blocks computes on the CPU
// (runtime/cache_quantized.cpp), with two deliberate differences, both fp16
// operands with fp32 accumulation where the CPU multiplies in fp32: the
// rebuild K = latent · Bᵀ (the dequantized latent rounded to fp16, B stored
// in fp16), and the V-latent mix (the dequantized V latent rounded to fp16;
// the attention weights as two fp16 halves, ~2^-22 relative together).
// Everything else (dequantization, RoPE, scores, online softmax, the
// projection through rebuild_v) is fp32 like the CPU's.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <string>
#include <type_traits>

#include "kernels/attention_state.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/paged_attention.h"
#include "kernels/cuda/paged_common.cuh"
#include "kernels/group_quant.h"

namespace xq::cuda::paged {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kThreads = 256;  // eight warps
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kPoolTokens = 128;  // tokens per pool block and per quantization group
constexpr int kSubTile = 64;      // tokens rebuilt, rotated and scored at once
constexpr int kRun = 8;           // codes unpacked per load: 8 codes of b bits are b whole bytes
constexpr int kMma = 16;          // WMMA tile edge (16x16x16, fp16 in, fp32 out)
constexpr int kHalfPad = 8;       // fp16 row padding: WMMA wants ldm % 8, and it spreads banks
constexpr int kFloatPad = 4;      // fp32 row padding: WMMA wants ldm % 4; float4 rows stay aligned
constexpr int kMergeThreads = 128;
constexpr size_t kDefaultSharedBytes = 48 * 1024;
constexpr size_t kSharedAlign = 128;

// Where each array of the decode kernel lives in its dynamic shared memory.
// Host and device compute it from the same shape, so they agree on the size.
struct SharedLayout {
  int32_t k_width = 0;        // K-latent channels one head's keys are rebuilt from
  int32_t stage_width = 0;    // latent channels staged at once (the CTA's K channels)
  int32_t query_heads = 0;    // query heads of the CTA
  int32_t b_stride = 0;       // halves per row of the rebuild matrices
  int32_t stage_stride = 0;   // halves per row of the staged latent tile
  int32_t key_stride = 0;     // floats per row of the rebuilt keys
  int32_t acc_rows = 0;       // the CTA's query heads rounded up to whole WMMA tiles
  int32_t acc_stride = 0;     // floats per row of the V-latent accumulators
  int32_t weight_stride = 0;  // halves per row of the fp16 attention weights
  size_t rebuild = 0, stage = 0, keys = 0, queries = 0, acc = 0, weights = 0, probs = 0, stats = 0,
         positions = 0;
  size_t bytes = 0;
};

__host__ __device__ inline size_t align_shared(size_t bytes) {
  return (bytes + kSharedAlign - 1) / kSharedAlign * kSharedAlign;
}

// The layout of a CTA covering `cta_kv_heads` KV heads (kv_heads in all).
__host__ __device__ inline SharedLayout shared_layout(const AttentionShape& shape, bool per_head_k,
                                                      int32_t cta_kv_heads) {
  const int32_t hd = shape.head_dim, kv = shape.kv_heads * hd;
  SharedLayout s;
  s.k_width = per_head_k ? hd : kv;
  s.stage_width = per_head_k ? cta_kv_heads * hd : kv;
  s.query_heads = cta_kv_heads * (shape.heads / shape.kv_heads);
  s.b_stride = s.k_width + kHalfPad;
  s.stage_stride = s.stage_width + kHalfPad;
  s.key_stride = hd + kFloatPad;
  s.acc_rows = (s.query_heads + kMma - 1) / kMma * kMma;
  s.acc_stride = kv + kFloatPad;
  s.weight_stride = kSubTile + kHalfPad;
  size_t at = 0;
  s.rebuild = at;  // (cta_kv_heads x head_dim, k_width) fp16: the B_g, resident
  at = align_shared(at + static_cast<size_t>(cta_kv_heads) * hd * s.b_stride * 2);
  s.stage = at;  // (kSubTile, stage_width) fp16: the tile's K latent, then V-latent chunks
  at = align_shared(at + static_cast<size_t>(kSubTile) * s.stage_stride * 2);
  s.keys = at;  // (kSubTile, head_dim) fp32: one head's rebuilt keys, then rotated
  at = align_shared(at + static_cast<size_t>(kSubTile) * s.key_stride * 4);
  s.queries = at;  // (query_heads, head_dim) fp32
  at = align_shared(at + static_cast<size_t>(s.query_heads) * hd * 4);
  s.acc = at;  // (acc_rows, kv) fp32: the V-latent accumulators (padding rows stay 0)
  at = align_shared(at + static_cast<size_t>(s.acc_rows) * s.acc_stride * 4);
  s.weights = at;  // 2 x (acc_rows, kSubTile) fp16: the weights' high and low halves
  at = align_shared(at + static_cast<size_t>(2) * s.acc_rows * s.weight_stride * 2);
  s.probs = at;  // (query_heads, kSubTile) fp32: scores
  at = align_shared(at + static_cast<size_t>(s.query_heads) * kSubTile * 4);
  s.stats = at;  // max, sum, rescale: (query_heads) fp32 each
  at = align_shared(at + static_cast<size_t>(3) * s.query_heads * 4);
  s.positions = at;  // (kSubTile) int32: the tile's global positions
  at = align_shared(at + static_cast<size_t>(kSubTile) * 4);
  s.bytes = at;
  return s;
}

// The eight codes [8 i, 8 i + 8) of an LSB-first stream of `Bits`-bit codes
// (kernels/cpu/group_quant.h): exactly Bits whole bytes starting at byte
// i * Bits, code j in bits [j * Bits, j * Bits + Bits) of the result. One load
// where Bits is 1, 2 or 4 (the address is a multiple of Bits, the stream
// 4-byte aligned), two for 8, byte loads for 3, 5, 6 and 7.
template <int Bits>
__device__ inline uint64_t load_run(const uint8_t* bytes) {
  if constexpr (Bits == 1) {
    return __ldg(bytes);
  } else if constexpr (Bits == 2) {
    return __ldg(reinterpret_cast<const unsigned short*>(bytes));
  } else if constexpr (Bits == 4) {
    return __ldg(reinterpret_cast<const unsigned int*>(bytes));
  } else if constexpr (Bits == 8) {
    const unsigned int* words = reinterpret_cast<const unsigned int*>(bytes);
    return __ldg(words) | static_cast<uint64_t>(__ldg(words + 1)) << 32;
  } else {
    uint64_t run = 0;
#pragma unroll
    for (int i = 0; i < Bits; ++i) run |= static_cast<uint64_t>(__ldg(bytes + i)) << (8 * i);
    return run;
  }
}

// Code j of a run as a float, without an int-to-float conversion: 2^23 + code
// has the code in its low mantissa bits, and the subtraction is exact.
template <int Bits>
__device__ inline float run_code(uint64_t run, int j) {
  const uint32_t code = static_cast<uint32_t>(run >> (j * Bits)) & ((1u << Bits) - 1u);
  return __uint_as_float(0x4b000000u | code) - 8388608.0f;
}

// Calls body(std::integral_constant<int, bits>) for bits 1..8, so that the
// code shifts of the unpacking are constants.
template <typename Body>
__device__ inline void with_bits(int bits, Body&& body) {
  switch (bits) {
    case 1:
      body(std::integral_constant<int, 1>{});
      break;
    case 2:
      body(std::integral_constant<int, 2>{});
      break;
    case 3:
      body(std::integral_constant<int, 3>{});
      break;
    case 4:
      body(std::integral_constant<int, 4>{});
      break;
    case 5:
      body(std::integral_constant<int, 5>{});
      break;
    case 6:
      body(std::integral_constant<int, 6>{});
      break;
    case 7:
      body(std::integral_constant<int, 7>{});
      break;
    default:
      body(std::integral_constant<int, 8>{});
      break;
  }
}

// Eight fp32 values rounded to fp16 (nearest) and stored as one 16-byte word.
__device__ inline void store_run_fp16(__half* to, const float* values) {
  __half2 pairs[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) pairs[i] = __floats2half2_rn(values[2 * i], values[2 * i + 1]);
  *reinterpret_cast<uint4*>(to) = *reinterpret_cast<const uint4*>(pairs);
}

// A GroupParams (fp16 scale, fp16 zero; little-endian) as the grid it stores.
__device__ inline GroupGrid read_grid(const uint32_t* params) {
  const uint32_t word = __ldg(params);
  GroupGrid grid;
  grid.scale = __half2float(__ushort_as_half(static_cast<unsigned short>(word & 0xffffu)));
  grid.zero = __half2float(__ushort_as_half(static_cast<unsigned short>(word >> 16)));
  return grid;
}

struct LatentArgs {
  PagedArena pool;
  PagedWindow window;
  PagedLengths lengths;
  XQuantLatentLayer layer;
  AttentionShape shape;
  const StepRow* rows;
  const float* q;
  const float* cos_sin;
  ShardSpec shard;
  SplitPlan plan;
  float scale;
  float* split_states;  // (rows * heads, splits, 2 + kv) when plan.splits > 1
  AttentionTarget target;
  int32_t cta_kv_heads;  // KV heads per CTA (a divisor of kv_heads)
};

// Stages `width` channels (a multiple of 8) of the K latent from `channel0` on,
// for the tile's tokens [first, first + count) of a block, into `to` (kSubTile
// rows of `stride` halves; rows from count on are zeros): thread per run of 8
// channels, which loads the run's `bits` code bytes at once, keeps the run's 8
// channel parameters in registers for all its tokens, and stores 8 fp16
// values in one 16-byte word. Consecutive threads take consecutive runs of a
// token (contiguous bytes). Quantized groups decode code · scale + zero
// (group_decode, exact in fp32) and round to fp16; window rows are fp16
// already; a kept outlier replaces the stored zero.
__device__ inline void stage_key_latent(const LatentArgs& a, __half* to, int32_t stride,
                                        int32_t width, int32_t channel0, int32_t count,
                                        int32_t first, bool quantized, const uint8_t* k_codes,
                                        const uint32_t* k_params, const uint16_t* outliers,
                                        const int32_t* pages) {
  const int32_t kv = a.layer.k_latent.width, hd = a.shape.head_dim;
  const int32_t runs = width / kRun;
  // Tokens staged side by side: runs * token_step threads, each on one run.
  const int32_t token_step = max(1, kThreads / runs);
  for (int32_t item = threadIdx.x; item < token_step * runs; item += kThreads) {
    const int32_t run = item % runs, channel = channel0 + run * kRun;
    const bool outlier =
        a.layer.keep_outlier && channel % hd == 0 && channel / hd < a.layer.outliers_per_token;
    float scale[kRun], zero[kRun];
    if (quantized) {
#pragma unroll
      for (int32_t j = 0; j < kRun; ++j) {
        const GroupGrid grid = read_grid(k_params + channel + j);
        scale[j] = grid.scale;
        zero[j] = grid.zero;
      }
    }
    for (int32_t t = item / runs; t < kSubTile; t += token_step) {
      float values[kRun];
      if (t >= count) {
#pragma unroll
        for (int32_t j = 0; j < kRun; ++j) values[j] = 0.0f;
      } else if (quantized) {
        const uint8_t* bytes = k_codes + (static_cast<int64_t>(first + t) * kv + channel) / kRun *
                                             a.layer.k_latent.bits;
        with_bits(a.layer.k_latent.bits, [&](auto bits) {
          const uint64_t codes = load_run<decltype(bits)::value>(bytes);
#pragma unroll
          for (int32_t j = 0; j < kRun; ++j)
            values[j] = fmaf(run_code<decltype(bits)::value>(codes, j), scale[j], zero[j]);
        });
      } else {
        const int32_t o = first + t;
        const uint16_t* window_row =
            reinterpret_cast<const uint16_t*>(
                a.pool.arena +
                static_cast<size_t>(pages[o / a.window.window_tokens]) * a.pool.block_bytes +
                a.layer.k_latent.window_offset) +
            static_cast<int64_t>(o % a.window.window_tokens) * kv + channel;
#pragma unroll
        for (int32_t j = 0; j < kRun; ++j)
          values[j] = __half2float(__ushort_as_half(window_row[j]));
      }
      // The quantized stream (or the window) holds 0 at a kept outlier channel.
      if (outlier && t < count)
        values[0] = __half2float(
            __ushort_as_half(outliers[(first + t) * a.layer.outliers_per_token + channel / hd]));
      store_run_fp16(to + t * stride + run * kRun, values);
    }
  }
}

// Stages `width` channels (a multiple of 8) of the per-token V latent from
// `channel0` on, for the tile's tokens, into `to` (kSubTile rows of `stride`
// halves; rows from count on are zeros), with stage_key_latent's thread
// mapping: a run of 8 channels never straddles a 128-channel group (groups are
// multiples of 8 wide), so its `bits` code bytes sit at byte (t · kv +
// channel) / 8 · bits of the block's rows and share one GroupParams.
__device__ inline void stage_value_latent(const LatentArgs& a, __half* to, int32_t stride,
                                          int32_t width, int32_t channel0, int32_t count,
                                          int32_t first, const uint8_t* v_codes,
                                          const uint32_t* v_params) {
  const PagedStream& vs = a.layer.v_latent;
  const int32_t runs = width / kRun;
  const int32_t token_step = max(1, kThreads / runs);
  for (int32_t item = threadIdx.x; item < token_step * runs; item += kThreads) {
    const int32_t run = item % runs, channel = channel0 + run * kRun;
    for (int32_t t = item / runs; t < kSubTile; t += token_step) {
      float values[kRun];
      if (t >= count) {
#pragma unroll
        for (int32_t j = 0; j < kRun; ++j) values[j] = 0.0f;
      } else {
        const int32_t o = first + t;
        const uint8_t* bytes =
            v_codes + (static_cast<int64_t>(o) * vs.width + channel) / kRun * vs.bits;
        const GroupGrid grid =
            read_grid(v_params + static_cast<int64_t>(o) * vs.row_groups + channel / kPoolTokens);
        with_bits(vs.bits, [&](auto bits) {
          const uint64_t codes = load_run<decltype(bits)::value>(bytes);
#pragma unroll
          for (int32_t j = 0; j < kRun; ++j)
            values[j] = fmaf(run_code<decltype(bits)::value>(codes, j), grid.scale, grid.zero);
        });
      }
      store_run_fp16(to + t * stride + run * kRun, values);
    }
  }
}

// Tiling: a CTA (8 warps) per (query row, split, run of cta_kv_heads KV heads;
// all of them where shared memory allows, SmolLM2's three). It keeps the B_g
// of its KV heads (rows of rebuild_k, fp16) in shared memory for its whole
// life and walks the split's tokens in 64-token tiles (two per pool block).
// Per tile:
//   1. the K-latent channels its heads are rebuilt from (theirs per head, all
//      kv for the joint latent) are staged once as fp16 (stage_key_latent:
//      thread per run of 8 channels);
//   then per KV head g:
//   2. warp w computes 16x16 tiles w, w + 8, ... of K_g (64 x head_dim) with
//      WMMA 16x16x16 (fp16 in, fp32 accumulate) over the head's latent
//      columns;
//   3. thread per (token, pair) rotates the keys at their global positions;
//   4. thread per (query head of g, token) scores q·k (float4 rows: no bank
//      conflicts);
//   then warp per query head folds the tile into its online softmax and writes
//   the weights as fp16 high and low halves, and
//   5. per chunk of stage_width V-latent channels (the whole row for SmolLM2):
//      thread per value rescales the accumulators, the chunk is staged as fp16
//      over the K latent (stage_value_latent), and warp w adds tiles w, w + 8,
//      ... of weights (query heads x 64) x V latent (64 x chunk) with WMMA, the
//      accumulator tile carried in shared memory. Each V-latent row is thus
//      decoded once for all the heads of the CTA.
// At the end the kv-wide states go to the split's scratch records, or, with a
// single split, are projected through rebuild_v (warp per output channel) into
// the target.
__global__ void __launch_bounds__(kThreads) xquant_decode_kernel(LatentArgs a) {
  extern __shared__ __align__(128) unsigned char shared[];
  const int32_t hd = a.shape.head_dim, heads = a.shape.heads, kv_heads = a.shape.kv_heads;
  const int32_t group = heads / kv_heads, kv = kv_heads * hd;
  const bool per_head = a.layer.per_head_k;
  const SharedLayout s = shared_layout(a.shape, per_head, a.cta_kv_heads);
  const int32_t query_heads = s.query_heads;
  __half* b_s = reinterpret_cast<__half*>(shared + s.rebuild);
  __half* stage_s = reinterpret_cast<__half*>(shared + s.stage);
  float* key_s = reinterpret_cast<float*>(shared + s.keys);
  float* q_s = reinterpret_cast<float*>(shared + s.queries);
  float* acc_s = reinterpret_cast<float*>(shared + s.acc);
  __half* weight_hi_s = reinterpret_cast<__half*>(shared + s.weights);
  __half* weight_lo_s = weight_hi_s + s.acc_rows * s.weight_stride;
  float* prob_s = reinterpret_cast<float*>(shared + s.probs);
  float* max_s = reinterpret_cast<float*>(shared + s.stats);
  float* sum_s = max_s + query_heads;
  float* rescale_s = sum_s + query_heads;
  int32_t* position_s = reinterpret_cast<int32_t*>(shared + s.positions);

  const int32_t row = blockIdx.x, split = blockIdx.y, g0 = blockIdx.z * a.cta_kv_heads;
  const int32_t tid = threadIdx.x, warp = tid / kWarpSize, lane = tid % kWarpSize;
  const StepRow r = a.rows[row];
  const int32_t visible = owned_before(a.shard, r.pos + 1);
  const int32_t begin = split * a.plan.tokens_per_split;
  const bool direct = a.plan.splits == 1;
  // Splits past the row's context exit (the merge does not read them); a
  // single split always writes, the empty state where it sees nothing.
  if (begin >= visible && !direct) return;
  const int32_t end = min(visible, begin + a.plan.tokens_per_split);

  const __half* b_global = reinterpret_cast<const __half*>(a.layer.rebuild_k_fp16) +
                           static_cast<int64_t>(g0) * hd * s.k_width;
  for (int32_t i = tid; i < a.cta_kv_heads * hd * s.k_width; i += kThreads)
    b_s[(i / s.k_width) * s.b_stride + i % s.k_width] = b_global[i];
  for (int32_t i = tid; i < query_heads * hd; i += kThreads)
    q_s[i] =
        a.q[static_cast<int64_t>(row) * heads * hd + static_cast<int64_t>(g0) * group * hd + i];
  for (int32_t i = tid; i < s.acc_rows * s.acc_stride; i += kThreads) acc_s[i] = 0.0f;
  // Weight rows past the CTA's heads stay zero, and so do their accumulators.
  for (int32_t i = tid; i < 2 * s.acc_rows * s.weight_stride; i += kThreads)
    weight_hi_s[i] = __float2half_rn(0.0f);
  if (tid < query_heads) {
    max_s[tid] = -INFINITY;
    sum_s[tid] = 0.0f;
  }

  const PagedStream& ks = a.layer.k_latent;
  const PagedStream& vs = a.layer.v_latent;
  const int32_t* table = a.pool.tables + static_cast<int64_t>(r.seq) * a.pool.table_stride;
  const int32_t* pages = a.window.window + static_cast<int64_t>(r.seq) * a.window.window_stride;
  // Groups below `flushed` hold codes; the slots from flushed * 128 on are in the window.
  const int32_t flushed = a.lengths.stored[r.seq] / kPoolTokens;
  const int32_t pairs = a.shape.rope_dim / 2;
  const int32_t key_tiles = hd / kMma;

  for (int32_t t0 = begin; t0 < end; t0 += kSubTile) {
    const int32_t count = min(kSubTile, end - t0);
    const int32_t block_index = t0 / kPoolTokens, first = t0 % kPoolTokens;
    const uint8_t* block =
        a.pool.arena + static_cast<size_t>(table[block_index]) * a.pool.block_bytes;
    const bool quantized = block_index < flushed;
    const uint8_t* k_codes = block + ks.group_offset;
    const uint32_t* k_params =
        reinterpret_cast<const uint32_t*>(block + ks.group_offset + ks.group_code_bytes);
    const uint16_t* outliers = reinterpret_cast<const uint16_t*>(block + a.layer.outlier_offset);
    const uint8_t* v_codes = block + vs.group_offset;
    const uint32_t* v_params =
        reinterpret_cast<const uint32_t*>(block + vs.group_offset + vs.group_code_bytes);

    // 1: the K latent of the CTA's channels. The previous tile's mix is done
    // with the staged tile and the weights.
    __syncthreads();
    stage_key_latent(a, stage_s, s.stage_stride, s.stage_width, per_head ? g0 * hd : 0, count,
                     first, quantized, k_codes, k_params, outliers, pages);
    if (tid < count) position_s[tid] = position_of(a.shard, t0 + tid);
    __syncthreads();
    for (int32_t gl = 0; gl < a.cta_kv_heads; ++gl) {
      // 2: K_g (count x hd) = latent · B_gᵀ.
      const __half* latent = stage_s + (per_head ? gl * hd : 0);
      const __half* b_head = b_s + static_cast<int64_t>(gl) * hd * s.b_stride;
      for (int32_t tile = warp; tile < (kSubTile / kMma) * key_tiles; tile += kWarps) {
        const int32_t tm = tile / key_tiles, tn = tile % key_tiles;
        if (tm * kMma >= count) continue;  // rows past the tile's tokens are never read
        wmma::fragment<wmma::accumulator, kMma, kMma, kMma, float> acc;
        wmma::fill_fragment(acc, 0.0f);
        for (int32_t k = 0; k < s.k_width; k += kMma) {
          wmma::fragment<wmma::matrix_a, kMma, kMma, kMma, __half, wmma::row_major> lhs;
          wmma::fragment<wmma::matrix_b, kMma, kMma, kMma, __half, wmma::col_major> rhs;
          wmma::load_matrix_sync(lhs, latent + tm * kMma * s.stage_stride + k, s.stage_stride);
          // B_g row j (output channel) is column j of the (k_width x hd) operand.
          wmma::load_matrix_sync(rhs, b_head + tn * kMma * s.b_stride + k, s.b_stride);
          wmma::mma_sync(acc, lhs, rhs, acc);
        }
        wmma::store_matrix_sync(key_s + tm * kMma * s.key_stride + tn * kMma, acc, s.key_stride,
                                wmma::mem_row_major);
      }
      __syncthreads();

      // 3: RoPE at each token's global position (cpu::rope's pairs and
      // table): thread per pair, for tokens pair_step apart.
      const int32_t pair_step = max(1, kThreads / max(pairs, 1));
      for (int32_t item = tid; item < pair_step * pairs; item += kThreads) {
        const int32_t p = item % pairs;
        const bool interleaved = a.shape.rope_layout == RopeLayout::kInterleaved;
        const int32_t ia = interleaved ? 2 * p : p, ib = interleaved ? 2 * p + 1 : p + pairs;
        for (int32_t t = item / pairs; t < count; t += pair_step) {
          const float* angle = a.cos_sin + (static_cast<int64_t>(position_s[t]) * pairs + p) * 2;
          const float cos_angle = angle[0], sin_angle = angle[1];
          float* key = key_s + t * s.key_stride;
          const float ka = key[ia], kb = key[ib];
          key[ia] = fmaf(ka, cos_angle, -kb * sin_angle);
          key[ib] = fmaf(kb, cos_angle, ka * sin_angle);
        }
      }
      __syncthreads();

      // 4: the scores of g's query heads.
      for (int32_t i = tid; i < group * kSubTile; i += kThreads) {
        const int32_t h = gl * group + i / kSubTile, t = i % kSubTile;
        float score = -INFINITY;
        if (t < count) {
          const float4* qh = reinterpret_cast<const float4*>(q_s + h * hd);
          const float4* key = reinterpret_cast<const float4*>(key_s + t * s.key_stride);
          float dot = 0.0f;
          for (int32_t w = 0; w < hd / 4; ++w) {
            const float4 x = qh[w], y = key[w];
            dot += x.x * y.x + x.y * y.y + x.z * y.z + x.w * y.w;
          }
          score = dot * a.scale;
        }
        prob_s[h * kSubTile + t] = score;
      }
      // The next head's keys replace these.
      __syncthreads();
    }

    // The online softmax of each query head (warp per head); the weights go
    // to the mix as fp16 high and low halves.
    for (int32_t h = warp; h < query_heads; h += kWarps) {
      const float* head_scores = prob_s + h * kSubTile;
      float block_max = -INFINITY;
      for (int32_t t = lane; t < count; t += kWarpSize)
        block_max = attention_state::larger(block_max, head_scores[t]);
      block_max = warp_max(block_max);
      const float old_max = max_s[h];
      const float new_max = attention_state::larger(old_max, block_max);
      const float rescale = old_max == -INFINITY ? 0.0f : expf(old_max - new_max);
      float block_sum = 0.0f;
      for (int32_t t = lane; t < kSubTile; t += kWarpSize) {
        const float p = t < count ? expf(head_scores[t] - new_max) : 0.0f;
        // p = high + low to ~2^-22 relative: the mix multiplies both halves
        // (fp16 operands, exact products) and sums them in fp32.
        const __half high = __float2half_rn(p);
        weight_hi_s[h * s.weight_stride + t] = high;
        weight_lo_s[h * s.weight_stride + t] = __float2half_rn(p - __half2float(high));
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

    // 5: the V-latent mix on tensor cores, a chunk of stage_width channels at a time.
    const int32_t value_tiles = s.stage_width / kMma;
    for (int32_t c0 = 0; c0 < kv; c0 += s.stage_width) {
      if (c0 > 0) __syncthreads();  // the previous chunk's MMAs are done with the stage
      for (int32_t h = 0; h < query_heads; ++h) {
        const float rescale = rescale_s[h];
        for (int32_t c = c0 + tid; c < c0 + s.stage_width; c += kThreads)
          acc_s[h * s.acc_stride + c] *= rescale;
      }
      stage_value_latent(a, stage_s, s.stage_stride, s.stage_width, c0, count, first, v_codes,
                         v_params);
      __syncthreads();
      // Warp w adds tiles w, w + 8, ... of (weights (acc_rows x 64)) x (V
      // latent (64 x chunk)), high and low halves, to the accumulator tile
      // loaded from and stored back to shared memory. Token steps past count
      // are skipped (their weights and values are zero).
      for (int32_t tile = warp; tile < (s.acc_rows / kMma) * value_tiles; tile += kWarps) {
        const int32_t tm = tile / value_tiles, tn = tile % value_tiles;
        float* acc_tile = acc_s + tm * kMma * s.acc_stride + c0 + tn * kMma;
        wmma::fragment<wmma::accumulator, kMma, kMma, kMma, float> acc;
        wmma::load_matrix_sync(acc, acc_tile, s.acc_stride, wmma::mem_row_major);
        for (int32_t k = 0; k < count; k += kMma) {
          wmma::fragment<wmma::matrix_a, kMma, kMma, kMma, __half, wmma::row_major> high, low;
          wmma::fragment<wmma::matrix_b, kMma, kMma, kMma, __half, wmma::row_major> values;
          wmma::load_matrix_sync(high, weight_hi_s + tm * kMma * s.weight_stride + k,
                                 s.weight_stride);
          wmma::load_matrix_sync(low, weight_lo_s + tm * kMma * s.weight_stride + k,
                                 s.weight_stride);
          wmma::load_matrix_sync(values, stage_s + k * s.stage_stride + tn * kMma, s.stage_stride);
          wmma::mma_sync(acc, high, values, acc);
          wmma::mma_sync(acc, low, values, acc);
        }
        wmma::store_matrix_sync(acc_tile, acc, s.acc_stride, wmma::mem_row_major);
      }
    }
  }
  __syncthreads();

  const int64_t first_state = static_cast<int64_t>(row) * heads + static_cast<int64_t>(g0) * group;
  if (!direct) {
    for (int32_t i = tid; i < query_heads * kv; i += kThreads) {
      const int32_t h = i / kv, c = i % kv;
      a.split_states[((first_state + h) * a.plan.splits + split) * (kv + 2) + 2 + c] =
          acc_s[h * s.acc_stride + c];
    }
    if (tid < query_heads) {
      float* record = a.split_states + ((first_state + tid) * a.plan.splits + split) * (kv + 2);
      record[0] = max_s[tid];
      record[1] = sum_s[tid];
    }
    return;
  }
  // One split: project each head's kv-wide accumulator through its KV head's
  // hd rows of rebuild_v (warp per output channel, lanes along the row).
  for (int32_t item = warp; item < query_heads * hd; item += kWarps) {
    const int32_t h = item / hd, j = item % hd, g = g0 + h / group;
    const float* matrix_row = a.layer.rebuild_v + (static_cast<int64_t>(g) * hd + j) * kv;
    float dot = 0.0f;
    for (int32_t c = lane; c < kv; c += kWarpSize)
      dot += acc_s[h * s.acc_stride + c] * matrix_row[c];
    dot = warp_sum(dot);
    if (lane == 0) {
      const int64_t at = (first_state + h) * hd + j;
      if (a.target.out != nullptr) {
        attention_state::normalize_row(sum_s[h], &dot, 1, a.target.out + at);
      } else {
        a.target.state_acc[at] = dot;
      }
    }
  }
  if (tid < query_heads && a.target.out == nullptr) {
    a.target.state_max[first_state + tid] = max_s[tid];
    a.target.state_sum[first_state + tid] = sum_s[tid];
  }
}

// A CTA per (query row, head): thread c merges latent channel c of the row's
// used splits in split order (attention_state::merge_row; every thread also
// merges the max and sum alone, the same arithmetic), the merged kv-wide row
// sits in shared memory, and warp w projects output channels w, w + 4, ...
// through the KV head's rows of rebuild_v into the target.
__global__ void __launch_bounds__(kMergeThreads)
    xquant_merge_kernel(const StepRow* rows, ShardSpec shard, SplitPlan plan, AttentionShape shape,
                        const float* rebuild_v, const float* split_states, AttentionTarget target) {
  extern __shared__ float merged[];  // (kv)
  const int32_t hd = shape.head_dim, heads = shape.heads;
  const int32_t group = heads / shape.kv_heads, kv = shape.kv_heads * hd;
  const int64_t state_row = blockIdx.x;
  const int32_t g = static_cast<int32_t>(state_row % heads) / group;
  const int32_t visible = owned_before(shard, rows[state_row / heads].pos + 1);
  const int32_t used =
      min(plan.splits, (visible + plan.tokens_per_split - 1) / plan.tokens_per_split);
  const float* records = split_states + state_row * plan.splits * (kv + 2);
  float max = -INFINITY, sum = 0.0f;
  for (int32_t s = 0; s < used; ++s) {
    const float* record = records + static_cast<int64_t>(s) * (kv + 2);
    attention_state::merge_row(max, sum, nullptr, record[0], record[1], nullptr, 0);
  }
  for (int32_t c = threadIdx.x; c < kv; c += blockDim.x) {
    float channel_max = -INFINITY, channel_sum = 0.0f, acc = 0.0f;
    for (int32_t s = 0; s < used; ++s) {
      const float* record = records + static_cast<int64_t>(s) * (kv + 2);
      attention_state::merge_row(channel_max, channel_sum, &acc, record[0], record[1],
                                 record + 2 + c, 1);
    }
    merged[c] = acc;
  }
  __syncthreads();
  const int32_t warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int32_t warps = blockDim.x / kWarpSize;
  for (int32_t j = warp; j < hd; j += warps) {
    const float* matrix_row = rebuild_v + (static_cast<int64_t>(g) * hd + j) * kv;
    float dot = 0.0f;
    for (int32_t c = lane; c < kv; c += kWarpSize) dot += merged[c] * matrix_row[c];
    dot = warp_sum(dot);
    if (lane == 0) {
      if (target.out != nullptr) {
        attention_state::normalize_row(sum, &dot, 1, target.out + state_row * hd + j);
      } else {
        target.state_acc[state_row * hd + j] = dot;
      }
    }
  }
  if (threadIdx.x == 0 && target.out == nullptr) {
    target.state_max[state_row] = max;
    target.state_sum[state_row] = sum;
  }
}

size_t packed_bytes(int bits, int64_t count) {
  return static_cast<size_t>((bits * count + 7) / 8);
}

// The most dynamic shared memory a block of the current device may opt in to.
size_t shared_available() {
  int device = 0, available = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CUDA_CHECK(cudaDeviceGetAttribute(&available, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return static_cast<size_t>(available);
}

// KV heads per CTA: the most (a divisor of kv_heads) whose layout fits in
// `available` bytes, so a V-latent row is decoded as few times as possible;
// 0 where not even one fits.
int32_t choose_cta_kv_heads(const AttentionShape& shape, bool per_head_k, size_t available) {
  for (int32_t n = shape.kv_heads; n >= 1; --n)
    if (shape.kv_heads % n == 0 && shared_layout(shape, per_head_k, n).bytes <= available) return n;
  return 0;
}

// Opts the decode kernel in to `bytes` of dynamic shared memory on the current
// device where that exceeds the default 48 KiB. The attribute is set once per
// device and size (remembered here), so a launch inside a CUDA graph capture
// that follows an uncaptured one of the same shape makes no runtime call
// besides the device queries.
void opt_in_shared(size_t bytes) {
  if (bytes <= kDefaultSharedBytes) return;
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  constexpr int kDevices = 64;
  static std::atomic<size_t> granted[kDevices];
  require(device < kDevices, "xquant latent: device index beyond 63");
  if (granted[device].load() >= bytes) return;
  CUDA_CHECK(cudaFuncSetAttribute(xquant_decode_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(bytes)));
  size_t known = granted[device].load();
  while (known < bytes && !granted[device].compare_exchange_weak(known, bytes)) {
  }
}

}  // namespace

void xquant_latent_check(const PagedWindow& window, const XQuantLatentLayer& layer,
                         const AttentionShape& shape, int32_t n_rows, const ShardSpec& shard,
                         const SplitPlan& plan, const float* scratch,
                         const AttentionTarget& target) {
  require(shape.kv_heads > 0 && shape.heads > 0 && shape.heads % shape.kv_heads == 0,
          "xquant latent: query heads must be a positive multiple of the KV heads");
  require(shape.heads / shape.kv_heads <= kMaxGroup,
          "xquant latent: at most " + std::to_string(kMaxGroup) + " query heads per KV head");
  require(shape.head_dim > 0 && shape.head_dim % kMma == 0 && shape.head_dim <= kMaxHeadDim,
          "xquant latent: head_dim must be a multiple of 16 (tensor-core tiles) and at most " +
              std::to_string(kMaxHeadDim));
  require(shape.rope_dim >= 0 && shape.rope_dim % 2 == 0 && shape.rope_dim <= shape.head_dim,
          "xquant latent: rope_dim must be even and at most head_dim");
  const int64_t kv = static_cast<int64_t>(shape.kv_heads) * shape.head_dim;
  const PagedStream& k = layer.k_latent;
  const PagedStream& v = layer.v_latent;
  require(k.width == kv && v.width == kv,
          "xquant latent: the K and V latents must be kv_heads * head_dim = " + std::to_string(kv) +
              " wide (got " + std::to_string(k.width) + " and " + std::to_string(v.width) + ")");
  require(k.per_channel && !v.per_channel,
          "xquant latent: the K latent is quantized per channel and the V latent per token");
  require(k.bits >= 1 && k.bits <= 8 && v.bits >= 1 && v.bits <= 8,
          "xquant latent: bits must be 1..8");
  require(k.group_code_bytes == packed_bytes(k.bits, kv * 128),
          "xquant latent: K latent group_code_bytes does not match 128 x kv codes");
  int64_t row_bytes = 0, row_groups = 0;
  for (int64_t at = 0; at < kv; at += 128, ++row_groups)
    row_bytes += static_cast<int64_t>(packed_bytes(v.bits, std::min<int64_t>(128, kv - at)));
  require(v.row_groups == row_groups && static_cast<int64_t>(v.row_code_bytes) == row_bytes &&
              v.group_code_bytes == v.row_code_bytes * 128,
          "xquant latent: V latent row layout does not match groups of 128 channels");
  require(k.group_offset % 4 == 0 && v.group_offset % 4 == 0 && k.window_offset % 2 == 0 &&
              layer.outlier_offset % 2 == 0,
          "xquant latent: misaligned stream offsets");
  require(window.window_tokens > 0, "xquant latent: the per-channel K latent needs window pages");
  require(layer.rebuild_k_fp16 != nullptr && layer.rebuild_v != nullptr,
          "xquant latent: missing rebuild matrices");
  require(
      !layer.keep_outlier || layer.outliers_per_token == (layer.per_head_k ? shape.kv_heads : 1),
      "xquant latent: outliers_per_token must be kv_heads (per-head K latent) or 1 (joint)");
  require(shard.shards >= 1 && shard.unit >= 1 && shard.index >= 0 && shard.index < shard.shards,
          "xquant latent: bad sequence shard");
  require(n_rows >= 0, "xquant latent: negative rows");
  require(plan.splits >= 1 && plan.splits <= 65535 && plan.tokens_per_split > 0 &&
              plan.tokens_per_split % kPoolTokens == 0,
          "xquant latent: splits must be whole pool blocks");
  require(plan.splits == 1 || scratch != nullptr, "xquant latent: split-K needs scratch");
  const bool states = target.state_max && target.state_sum && target.state_acc;
  const bool any_state = target.state_max || target.state_sum || target.state_acc;
  require((target.out != nullptr) != any_state && (target.out != nullptr || states),
          "xquant latent: attention target must be either out or all three state buffers");
  require(static_cast<int64_t>(n_rows) * shape.heads <= INT_MAX, "xquant latent: too many rows");
  // The split merge holds one merged kv-wide row in (default) shared memory.
  require(kv * static_cast<int64_t>(sizeof(float)) <= static_cast<int64_t>(kDefaultSharedBytes),
          "xquant latent: kv beyond " + std::to_string(kDefaultSharedBytes / sizeof(float)));
}

size_t xquant_latent_scratch_floats(int64_t rows, const AttentionShape& shape,
                                    const SplitPlan& plan) {
  const int64_t kv = static_cast<int64_t>(shape.kv_heads) * shape.head_dim;
  return static_cast<size_t>(rows) * shape.heads * plan.splits * (kv + 2);
}

void xquant_latent_attention(const PagedArena& pool, const PagedWindow& window,
                             const PagedLengths& lengths, const XQuantLatentLayer& layer,
                             const AttentionShape& shape, const StepRow* rows, int32_t n_rows,
                             const float* q, const float* cos_sin, const ShardSpec& shard,
                             const SplitPlan& plan, float* scratch, const AttentionTarget& target,
                             Stream& stream) {
  xquant_latent_check(window, layer, shape, n_rows, shard, plan, scratch, target);
  if (n_rows == 0) return;
  // Runs of 2, 4 or 8 code bytes are read as 16- and 32-bit words.
  require(pool.block_bytes % 4 == 0, "xquant latent: block_bytes must be a multiple of 4");
  const size_t available = shared_available();
  const int32_t cta_kv_heads = choose_cta_kv_heads(shape, layer.per_head_k, available);
  require(cta_kv_heads > 0,
          "xquant latent: the kernel needs " +
              std::to_string(shared_layout(shape, layer.per_head_k, 1).bytes) +
              " bytes of shared memory (B_g and the kv-wide accumulators stay resident), the "
              "device offers " +
              std::to_string(available));
  const size_t shared_bytes = shared_layout(shape, layer.per_head_k, cta_kv_heads).bytes;
  opt_in_shared(shared_bytes);
  LatentArgs args{pool,
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
                  target,
                  cta_kv_heads};
  const dim3 grid(static_cast<unsigned>(n_rows), static_cast<unsigned>(plan.splits),
                  static_cast<unsigned>(shape.kv_heads / cta_kv_heads));
  xquant_decode_kernel<<<grid, kThreads, shared_bytes, stream_of(stream)>>>(args);
  CUDA_CHECK_LAUNCH();
  if (plan.splits > 1) {
    const size_t kv = static_cast<size_t>(shape.kv_heads) * shape.head_dim;
    const int64_t state_rows = static_cast<int64_t>(n_rows) * shape.heads;
    xquant_merge_kernel<<<static_cast<unsigned>(state_rows), kMergeThreads, kv * sizeof(float),
                          stream_of(stream)>>>(rows, shard, plan, shape, layer.rebuild_v, scratch,
                                               target);
    CUDA_CHECK_LAUNCH();
  }
}

}  // namespace xq::cuda::paged
