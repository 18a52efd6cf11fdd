// Token choice on the device (dense_ops.h sample): greedy rows take the
// argmax, sampled rows follow xq::Sampler's arithmetic on the same uniform
// draw, and every row reports its top-1 minus top-2 margin.
//
// Steps, all on the stream:
//   1. argmax_margin_kernel, one thread block per row: argmax (ties to the
//      lowest id) and margin by block reduction; writes the argmax as the
//      row's token, and for sampled rows copies the logits (with -0 made +0,
//      so equal logits compare equal as sort keys) and their ids into the
//      sort input, with the row's segment [row * vocab, +vocab); a greedy row
//      gets an empty segment, so the sort below costs it nothing.
//   2. cub::DeviceSegmentedRadixSort sorts each sampled row by logit,
//      descending; radix sort is stable, so equal logits keep ascending ids,
//      the order Sampler's comparison gives.
//   3. sample_sorted_kernel, one thread block per sampled row, over the first
//      `keep` sorted candidates (top_k, or all): p_i = expf((l_i - l_0) / T),
//      total = sum p (double); the nucleus is 1 + the number of candidates
//      whose running sum of p_i / total stays below top_p; r = uniform *
//      (sum of p over the nucleus); the token is the first candidate whose
//      running sum of p reaches r (the number of candidates below r). Running
//      sums are block-wide scans in double. Sampler forms the same sums in
//      sequence, so a token can differ only where r or top_p lies within a
//      few units of rounding of a running sum (expf here is within 2 ulp of
//      the host's).
#include <cuda_runtime.h>

#include <cfloat>
#include <climits>
#include <cstdint>
#include <cub/cub.cuh>
#include <string>

#include "kernels/cuda/check.h"
#include "kernels/cuda/dense_common.cuh"
#include "kernels/cuda/dense_ops.h"

namespace xq::cuda {
namespace {

using detail::align_up;
using detail::require;
using detail::stream_of;

constexpr int kArgmaxThreads = 1024;
constexpr int kSampleThreads = 256;
constexpr int kItemsPerThread = 8;
constexpr int kTile = kSampleThreads * kItemsPerThread;

// Offsets of the sort buffers inside the sampling workspace.
struct SampleLayout {
  size_t keys_in, keys_out, ids_in, ids_out, begins, ends, temp, total;
};

SampleLayout sample_layout(int64_t rows, int64_t vocab, size_t temp_bytes) {
  const size_t items = align_up(static_cast<size_t>(rows * vocab) * 4);
  const size_t offsets = align_up(static_cast<size_t>(rows) * 4);
  SampleLayout layout{};
  layout.keys_in = 0;
  layout.keys_out = layout.keys_in + items;
  layout.ids_in = layout.keys_out + items;
  layout.ids_out = layout.ids_in + items;
  layout.begins = layout.ids_out + items;
  layout.ends = layout.begins + offsets;
  layout.temp = layout.ends + offsets;
  layout.total = layout.temp + align_up(temp_bytes);
  return layout;
}

size_t sort_temp_bytes(int64_t rows, int64_t vocab) {
  size_t bytes = 0;
  CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairsDescending(
      nullptr, bytes, static_cast<const float*>(nullptr), static_cast<float*>(nullptr),
      static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr),
      static_cast<int>(rows * vocab), static_cast<int>(rows), static_cast<const int*>(nullptr),
      static_cast<const int*>(nullptr), 0, 32));
  return bytes;
}

// Best (value, id) so far: larger value, then lower id.
struct Best {
  float value;
  int id;
};
__device__ __forceinline__ Best better(Best a, Best b) {
  return (b.value > a.value || (b.value == a.value && b.id < a.id)) ? b : a;
}

// One block per row; each thread scans a strided share of the row, keeping
// its best (value, id) and its two largest values, then the block merges them
// in shared memory (a tree over the 1024 threads).
__global__ void __launch_bounds__(kArgmaxThreads)
    argmax_margin_kernel(const float* logits, int64_t vocab, const SamplingRow* params,
                         int32_t* tokens, float* margins, float* keys, int32_t* ids, int* begins,
                         int* ends) {
  const int64_t row = blockIdx.x;
  const float* values = logits + row * vocab;
  const bool sampled = params[row].temperature != 0.0f;
  Best best{-INFINITY, INT_MAX};
  float first = -INFINITY, second = -INFINITY;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float v = values[i];
    best = better(best, Best{v, static_cast<int>(i)});
    if (v > first) {
      second = first;
      first = v;
    } else if (v > second) {
      second = v;
    }
    if (sampled) {
      keys[row * vocab + i] = v + 0.0f;  // -0 + 0 = +0
      ids[row * vocab + i] = static_cast<int32_t>(i);
    }
  }
  __shared__ Best bests[kArgmaxThreads];
  __shared__ float firsts[kArgmaxThreads], seconds[kArgmaxThreads];
  const int t = static_cast<int>(threadIdx.x);
  bests[t] = best;
  firsts[t] = first;
  seconds[t] = second;
  __syncthreads();
  for (int stride = static_cast<int>(blockDim.x) / 2; stride > 0; stride /= 2) {
    if (t < stride) {
      bests[t] = better(bests[t], bests[t + stride]);
      // The two largest of {f1, s1, f2, s2} with f >= s on each side.
      const float f1 = firsts[t], s1 = seconds[t];
      const float f2 = firsts[t + stride], s2 = seconds[t + stride];
      firsts[t] = fmaxf(f1, f2);
      seconds[t] = fmaxf(fminf(f1, f2), fmaxf(s1, s2));
    }
    __syncthreads();
  }
  if (t == 0) {
    // xq::argmax compares every logit with the best so far, starting from id
    // 0: a NaN there is never beaten, so the row's token is 0; NaN elsewhere
    // never wins. A row of NaN keeps INT_MAX here and also gets 0.
    tokens[row] = bests[0].id == INT_MAX || isnan(values[0]) ? 0 : bests[0].id;
    if (margins != nullptr) margins[row] = firsts[0] - seconds[0];
    begins[row] = static_cast<int>(row * vocab);
    ends[row] = static_cast<int>(row * vocab + (sampled ? vocab : 0));
  }
}

// Running block-wide prefix across tiles: warp 0 calls it with each tile's
// total and gets the sum of the tiles before.
struct RunningPrefix {
  double carried;
  __device__ double operator()(double tile_total) {
    const double before = carried;
    carried += tile_total;
    return before;
  }
};

using BlockScanDouble = cub::BlockScan<double, kSampleThreads>;
using BlockReduceDouble = cub::BlockReduce<double, kSampleThreads>;
using BlockReduceInt = cub::BlockReduce<int, kSampleThreads>;

// p of sorted candidate i: Sampler's float expf((l_i - l_max) / T).
__device__ __forceinline__ double candidate_weight(const float* sorted, int64_t i, int64_t keep,
                                                   float max_logit, float temperature) {
  if (i >= keep) return 0.0;
  return static_cast<double>(expf(__fdiv_rn(__fsub_rn(sorted[i], max_logit), temperature)));
}

// One block per row, threads holding kItemsPerThread consecutive candidates
// of each 2048-candidate tile (blocked arrangement: warp loads are
// contiguous). Greedy rows return at once (the branch is uniform per block).
__global__ void __launch_bounds__(kSampleThreads)
    sample_sorted_kernel(const float* sorted_keys, const int32_t* sorted_ids, int64_t vocab,
                         const SamplingRow* params, int32_t* tokens) {
  const int64_t row = blockIdx.x;
  const SamplingRow p = params[row];
  if (p.temperature == 0.0f) return;
  const float* sorted = sorted_keys + row * vocab;
  const int64_t keep = (p.top_k > 0 && p.top_k < vocab) ? p.top_k : vocab;
  const float max_logit = sorted[0];

  __shared__ union {
    BlockScanDouble::TempStorage scan;
    BlockReduceDouble::TempStorage reduce_double;
    BlockReduceInt::TempStorage reduce_int;
  } storage;
  __shared__ double shared_double;
  __shared__ int shared_int;

  auto block_total = [&](double own) {
    const double total = BlockReduceDouble(storage.reduce_double).Sum(own);
    if (threadIdx.x == 0) shared_double = total;
    __syncthreads();
    const double result = shared_double;
    __syncthreads();
    return result;
  };
  auto block_count = [&](int own) {
    const int total = BlockReduceInt(storage.reduce_int).Sum(own);
    if (threadIdx.x == 0) shared_int = total;
    __syncthreads();
    const int result = shared_int;
    __syncthreads();
    return result;
  };
  // Number of candidates i < limit whose running sum of weight(i) * scale
  // stays below `threshold`.
  auto count_below = [&](int64_t limit, double scale, double threshold) {
    RunningPrefix prefix{0.0};
    int below = 0;
    for (int64_t tile = 0; tile < limit; tile += kTile) {
      double items[kItemsPerThread];
      const int64_t first = tile + static_cast<int64_t>(threadIdx.x) * kItemsPerThread;
#pragma unroll
      for (int k = 0; k < kItemsPerThread; ++k) {
        const int64_t i = first + k;
        items[k] =
            i < limit ? candidate_weight(sorted, i, keep, max_logit, p.temperature) / scale : 0.0;
      }
      BlockScanDouble(storage.scan).InclusiveSum(items, items, prefix);
      __syncthreads();  // the scan storage is reused by the next tile
#pragma unroll
      for (int k = 0; k < kItemsPerThread; ++k) {
        if (first + k < limit && items[k] < threshold) ++below;
      }
    }
    return block_count(below);
  };

  double own = 0;
  for (int64_t i = threadIdx.x; i < keep; i += blockDim.x) {
    own += candidate_weight(sorted, i, keep, max_logit, p.temperature);
  }
  const double total = block_total(own);
  // Sampler: mass += p_i / total until mass >= top_p.
  const int64_t nucleus =
      min(keep, static_cast<int64_t>(count_below(keep, total, static_cast<double>(p.top_p))) + 1);
  own = 0;
  for (int64_t i = threadIdx.x; i < nucleus; i += blockDim.x) {
    own += candidate_weight(sorted, i, keep, max_logit, p.temperature);
  }
  const double nucleus_total = block_total(own);
  const double r = p.uniform * nucleus_total;
  const int64_t chosen = min(nucleus - 1, static_cast<int64_t>(count_below(nucleus, 1.0, r)));
  if (threadIdx.x == 0) tokens[row] = sorted_ids[row * vocab + chosen];
}

}  // namespace

size_t sample_workspace_bytes(int64_t rows, int64_t vocab) {
  require(rows >= 0 && vocab >= 0, "sample_workspace_bytes: negative shape");
  require(rows * vocab <= INT_MAX, "sample_workspace_bytes: rows x vocab beyond int range");
  if (rows == 0 || vocab == 0) return 0;
  return sample_layout(rows, vocab, sort_temp_bytes(rows, vocab)).total;
}

void sample(const float* logits, int64_t rows, int64_t vocab, const SamplingRow* params,
            int32_t* tokens, float* margins, void* workspace, size_t workspace_bytes,
            Stream& stream) {
  require(rows >= 0 && vocab > 0, "sample: need rows >= 0 and a vocabulary");
  require(rows * vocab <= INT_MAX, "sample: rows x vocab beyond int range");
  require(rows <= INT_MAX, "sample: more rows than grid blocks");
  if (rows == 0) return;
  require(detail::aligned_to(workspace, detail::kWorkspaceAlignment),
          "sample: workspace not 256-byte aligned");
  const size_t temp_bytes = sort_temp_bytes(rows, vocab);
  const SampleLayout layout = sample_layout(rows, vocab, temp_bytes);
  require(workspace_bytes >= layout.total, "sample: workspace of " +
                                               std::to_string(workspace_bytes) + " bytes, needs " +
                                               std::to_string(layout.total));
  auto* base = static_cast<uint8_t*>(workspace);
  auto* keys_in = reinterpret_cast<float*>(base + layout.keys_in);
  auto* keys_out = reinterpret_cast<float*>(base + layout.keys_out);
  auto* ids_in = reinterpret_cast<int32_t*>(base + layout.ids_in);
  auto* ids_out = reinterpret_cast<int32_t*>(base + layout.ids_out);
  auto* begins = reinterpret_cast<int*>(base + layout.begins);
  auto* ends = reinterpret_cast<int*>(base + layout.ends);
  const cudaStream_t cuda_stream = stream_of(stream);
  const auto grid = static_cast<unsigned int>(rows);

  argmax_margin_kernel<<<grid, kArgmaxThreads, 0, cuda_stream>>>(
      logits, vocab, params, tokens, margins, keys_in, ids_in, begins, ends);
  CUDA_CHECK_LAUNCH();
  size_t temp_size = temp_bytes;
  CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairsDescending(
      base + layout.temp, temp_size, keys_in, keys_out, ids_in, ids_out,
      static_cast<int>(rows * vocab), static_cast<int>(rows), begins, ends, 0, 32, cuda_stream));
  sample_sorted_kernel<<<grid, kSampleThreads, 0, cuda_stream>>>(keys_out, ids_out, vocab, params,
                                                                 tokens);
  CUDA_CHECK_LAUNCH();
}

}  // namespace xq::cuda
