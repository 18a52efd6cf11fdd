// The forward pass resident on a CUDA device (--backend cuda): the same
// layer loop as TransformerEngine (runtime/engine.h), with the weights
// uploaded once, activations, caches (runtime/device_cache.h) and logits kept
// on the device, and all work on one stream per rank. Only token ids go in,
// and only logits a caller asks for (or sampled ids) come out.
//
// Decode steps whose shape repeats (the same number of rows, and the same
// DeviceCache::step_shape_key: the context bucket of a materializing cache)
// are captured once as a CUDA graph and replayed: a small model's step is
// hundreds of short kernels whose launch cost would otherwise dominate.
//
// Tensor parallelism runs over a Communicator whose buffers are device
// memory (parallel/nccl_communicator.h); a group of one needs none. Built
// with the CUDA backend only. Plain C++ header.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/cuda/dense_ops.h"
#include "runtime/communicator.h"
#include "runtime/engine.h"
#include "runtime/model.h"
#include "runtime/shard.h"

namespace xq {

class CudaEngine final : public Engine {
 public:
  // One process on device `device` (-1: the current device): every layer,
  // every head.
  CudaEngine(const Model& model, const EngineOptions& options, int device = -1);
  // One rank of `tp_group` (device buffers: an NCCL communicator, or a group
  // of one), holding layers [layers.begin, layers.end()) (all when count is 0).
  CudaEngine(const Model& model, const EngineOptions& options, Communicator& tp_group, Range layers,
             int device);
  ~CudaEngine() override;

  // Engine (runtime/engine.h).
  void forward(int32_t seq, const int32_t* tokens, int32_t n, int32_t pos0, float* logits,
               int32_t first_logit_row) override;
  // Samples on the device (argmax, or top-k / top-p from the sampler's draw):
  // one token id and its margin cross to the host, not the logits.
  SampledToken forward_sample(int32_t seq, const int32_t* tokens, int32_t n, int32_t pos0,
                              Sampler& sampler) override;
  void forward_batch(const std::vector<Segment>& segments, float* logits) override;
  // forward() of n tokens, then the last row sampled on the device as `row`
  // says (its `uniform` is the caller's draw): only the token id and the
  // row's top-1 minus top-2 margin cross to the host.
  SampledToken forward_sample_on_device(int32_t seq, const int32_t* tokens, int32_t n, int32_t pos0,
                                        const cuda::SamplingRow& row);
  void truncate(int32_t seq, int32_t from) override;
  int32_t length(int32_t seq) const override;
  int32_t max_tokens() const override { return max_tokens_; }
  const Model& model() const override { return model_; }
  std::string cache_description() const override;
  size_t cache_bytes_in_use() const override;
  double cache_fraction_of_fp16() const override;
  int32_t sequence_slots() const override;
  PoolInfo pool() const override;
  int32_t blocks_for_tokens(int32_t tokens) const override;
  int32_t blocks_for_step(int32_t from, int32_t to) const override;

  // TransformerEngine::check_batch: throws xq::Error (PoolExhausted where the
  // pool lacks the step's blocks) with its messages, before anything is
  // written; every segment needs its token ids.
  void check_batch(const std::vector<Segment>& segments) const;

  // The pieces of forward_batch for a pipeline stage; hidden is device
  // memory (rows, dim). Each returns once its work has finished on the
  // device, so a communicator on another stream may send the result.
  // run_layers needs no token ids (a later stage has none).
  void embed(const std::vector<Segment>& segments, float* hidden);
  void run_layers(const std::vector<Segment>& segments, float* hidden);
  // logits (rows, vocab) on the device of the final norm and head of hidden rows.
  void head(const float* hidden, int32_t rows, float* logits);
  // The final norm and head of one row of hidden (device memory), sampled on
  // the device as `row` says: only the token id and the row's top-1 minus
  // top-2 margin cross to the host.
  SampledToken head_sample(const float* hidden_row, const cuda::SamplingRow& row);
  // The same with `sampler`'s next draw (Sampler::next_draw: one for a
  // sampled row, none for a greedy one), taken once the head is enqueued, as
  // a host stage samples after its head: the token Sampler::sample would pick
  // from these logits.
  SampledToken head_sample(const float* hidden_row, Sampler& sampler);
  // The stream all of this engine's device work is enqueued on, in order:
  // buffers it hands out or reads are ready once work enqueued after its
  // calls on this stream runs (NcclCommunicator::set_work_stream orders a
  // collective after it the same way).
  cuda::Stream& stream();
  Range layers() const { return layer_range_; }
  // The device's name and index, the bytes of weights uploaded and the
  // graphs captured so far (for the tools' summaries).
  std::string device_summary() const;
  // Steps run from a captured graph, and captures made.
  int64_t graph_replays() const;
  int64_t graph_captures() const;
  // The cache mode's name and its bytes per token by its formula (as
  // AttentionCache::mode() and bytes_per_token(), for the tools).
  std::string cache_mode() const;
  double cache_bytes_per_token() const;
  // Bytes of weights, norms and tables uploaded to the device.
  size_t weight_bytes() const;
  // Turns graph capture off (every step launched kernel by kernel), for tests
  // that compare the two. A capture the device refuses turns graphs off too
  // (that step runs kernel by kernel); device_summary() then says why.
  void set_graphs_enabled(bool enabled);
  // For benchmarks: `seq` holds `tokens` tokens of zeros in its cache
  // (DeviceCache::fill_with_zeros), so decode can be timed at a long context
  // without its prefill.
  void fill_with_zeros(int32_t seq, int32_t tokens);
  bool graphs_enabled() const;

 private:
  struct Impl;
  // forward() of n tokens with the last row's logits kept on the device.
  void run_last_row(int32_t seq, const int32_t* tokens, int32_t n, int32_t pos0);
  const Model& model_;
  Range layer_range_;
  int32_t max_tokens_ = 0;
  std::unique_ptr<Impl> impl_;
};

}  // namespace xq
