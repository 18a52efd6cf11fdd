// The attention caches on a CUDA device. Each mode keeps exactly the bytes
// its CPU twin keeps, at the same offsets of blocks of the same size (the
// CPU cache's block layout, runtime/cache_layout.h), in one device arena cut
// into those blocks; the block tables and the sequences' lengths stay on the
// host, as the CPU pool's do, and are uploaded at the start of each step.
// So the device cache admits exactly the sequences the CPU cache would under
// the same --cache-memory, and a test can upload a CPU cache's blocks and
// ask the device for the same attention.
//
// A step is begin_step (host bookkeeping: truncation, blocks taken, tables
// and row descriptors uploaded), run_layer for every layer (device work
// only: encode the new rows into the blocks, then attention of the step's
// queries), end_step (blocks a shrinking fp16 window no longer needs go
// back). run_layer reads everything that changes from step to step (row
// positions, sequence lengths, block tables) from device memory that
// begin_step writes at fixed addresses, so a CUDA graph captured for one
// shape of step (rows per segment) replays for any positions and tables.
// Where a cache's kernel arguments also follow the step's context (the
// materialize path's dense rows, sized to the step's longest sequence in a
// few buckets), step_shape_key() names that part, and a caller keys its
// graphs by it too.
//
// Built with the CUDA backend only. Plain C++ header.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "runtime/cache.h"
#include "runtime/model.h"

namespace xq::cuda {
class Stream;
class Blas;
}  // namespace xq::cuda

namespace xq {

// One sequence's part of a step (as Segment, without the token ids).
struct StepRows {
  int32_t seq = 0;
  int32_t pos0 = 0;
  int32_t n = 0;
};

// The materialize path's dense rows for a step whose sequences hold at most
// `stored` local slots (once its rows are in), in a cache whose sequences
// hold at most `capacity`: stored rounded up to a power of two times
// kMaterializeUnit tokens, at most capacity; 0 where stored is 0. A step
// computes at most twice its context's rows (or kMaterializeUnit), and a
// cache meets few values (ceil(log2(capacity / kMaterializeUnit)) + 1 at
// most: 6 for 32K tokens), so few graphs are keyed by them.
constexpr int32_t kMaterializeUnit = 1024;
inline int32_t materialize_rows(int32_t stored, int32_t capacity) {
  if (stored <= 0 || capacity <= 0) return 0;
  int64_t rows = kMaterializeUnit;
  while (rows < stored) rows *= 2;
  return static_cast<int32_t>(std::min<int64_t>(rows, capacity));
}

class DeviceCache {
 public:
  virtual ~DeviceCache() = default;

  // As AttentionCache (runtime/cache.h), with the same values as the CPU
  // cache of the same mode and options.
  virtual std::string mode() const = 0;
  virtual std::string describe() const = 0;
  virtual double bytes_per_token() const = 0;
  virtual double fp16_bytes_per_token() const = 0;
  double fraction_of_fp16() const { return bytes_per_token() / fp16_bytes_per_token(); }
  virtual size_t block_bytes() const = 0;
  virtual int32_t total_blocks() const = 0;
  virtual int32_t free_blocks() const = 0;
  virtual int32_t sequences() const = 0;
  virtual int32_t blocks_for_tokens(int32_t tokens) const = 0;
  virtual int32_t blocks_for_step(int32_t from, int32_t to) const = 0;
  virtual int32_t length(int32_t seq) const = 0;
  size_t bytes_in_use() const {
    return static_cast<size_t>(total_blocks() - free_blocks()) * block_bytes();
  }
  // Drops the tokens of `seq` from `from` on (device work where a
  // per-channel group is cut: its head returns to the fp16 window).
  virtual void truncate(int32_t seq, int32_t from) = 0;

  // Takes the blocks the step needs (PoolExhausted, nothing changed, when
  // the pool lacks them), truncates a segment's sequence where the segment
  // starts inside it, and uploads the step's tables and row descriptors.
  // Segments name distinct sequences; rows are in segment order.
  virtual void begin_step(const std::vector<StepRows>& segments) = 0;
  // Layer `layer` (of this cache's layers) of the step begun: stores the new
  // rows and computes attention for every row. Device pointers, rows in
  // segment order: x (rows, dim) the normed layer input; k, v (rows, kv_dim of
  // the model) K before RoPE and V; q (rows, n_heads, head_dim) after RoPE;
  // out (rows, n_heads * head_dim) the attention before Wo. A row sees the
  // tokens of its sequence up to its own position.
  virtual void run_layer(int32_t layer, const float* x, const float* k, const float* v,
                         const float* q, float* out) = 0;
  // Under sequence sharding (CacheOptions::sequence_shards > 1): run_layer's
  // attention as unnormalized online-softmax states over this cache's own
  // tokens, rows * n_heads rows (query-major) of max, sum and head_dim acc,
  // for the group to merge (cpu::PartialAttention's layout, device memory).
  // Throws xq::Error where the cache is not sequence-sharded.
  virtual void run_layer_partial(int32_t layer, const float* x, const float* k, const float* v,
                                 const float* q, float* state_max, float* state_sum,
                                 float* state_acc) = 0;
  // Lengths advance to the step's ends; blocks beyond them go back.
  virtual void end_step() = 0;
  // Between begin_step and end_step: the part of the step's shape, beyond
  // its rows per segment, that run_layer's kernel arguments depend on. Two
  // steps of the same rows and key launch the same kernels with the same
  // arguments (a graph captured for one replays for the other). 0 where the
  // rows alone decide (fp16, the fused quantized modes); the materialize
  // path's dense rows for the step (materialize_rows) where it attends.
  virtual int64_t step_shape_key() const { return 0; }

  // For tests and tools, outside a step. Takes the blocks, tables and
  // lengths of `cpu`, a CPU cache of the same mode and options with an arena
  // (its block ids stay the same), replacing everything this cache held.
  virtual void import_blocks(const AttentionCache& cpu) = 0;
  // The device arena (total_blocks x block_bytes), copied to the host once
  // the stream's work is done; read it through table(seq).
  virtual void download_arena(std::vector<uint8_t>& arena) const = 0;
  virtual const BlockTable& table(int32_t seq) const = 0;
  // For benchmarks: `seq` holds `tokens` tokens whose stored bytes are all
  // zero (its blocks taken from the pool and cleared), without running the
  // model, so a decode step can be timed at a long context without its
  // prefill. Attention costs the same whatever the values. Replaces what the
  // sequence held; PoolExhausted where the pool lacks the blocks.
  virtual void fill_with_zeros(int32_t seq, int32_t tokens) = 0;
};

// Why the device cannot hold options.mode for `model` ("" where it can): the
// check make_device_cache makes before it touches the device. Throws
// xq::Error for a mode no backend knows.
std::string device_cache_unsupported(const Model& model, const CacheOptions& options);

// The device cache of options.mode for `model`, on the current device, its
// work on `stream` (the quantized caches run their fp32 projections on
// `blas`, which must outlive the cache). Every mode of the table is held: fp16
// (runtime/device_cache_fp16.cpp) and the quantized modes
// (runtime/device_cache_quantized.cpp, which says which attend through the
// fused kernels and which through dense scratch). Throws xq::Error for a mode
// or option the device does not support, naming it.
std::unique_ptr<DeviceCache> make_device_cache(const Model& model, const CacheOptions& options,
                                               cuda::Stream& stream, cuda::Blas& blas);

// The fp16 device cache over one tensor-parallel rank's KV heads, as the CPU's
// HeadShardedAttention builds Fp16KvCache(local_config, options):
// local_config is the model's with the rank's n_heads and n_kv_heads and
// n_layers = the layers the cache holds. Throws xq::Error for any other mode
// (only fp16 can be split by KV head) or a shape the device does not take.
std::unique_ptr<DeviceCache> make_device_cache(const ModelConfig& local_config,
                                               const CacheOptions& options, cuda::Stream& stream,
                                               cuda::Blas& blas);

}  // namespace xq
