// One rank's part of a pipeline (parallel/pipeline_engine.h): the engine of
// its stage's layers, and where its activations live. PipelineEngine moves
// activations between stages and schedules micro-batches; a stage says how
// to embed, run its layers, apply the head and copy rows, in its own memory:
//   CPU stage    a TransformerEngine over the grid's MPI groups, host
//                buffers (make_cpu_stage);
//   CUDA stage   a CudaEngine over NCCL groups, device buffers, the next
//                token sampled where the logits are (parallel/device_grid.h).
// "Stage memory" below is the stage's own: host memory for the CPU stage,
// device memory for the CUDA stage. Token ids and the logits a caller gets
// are always host memory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "parallel/grid.h"
#include "runtime/communicator.h"
#include "runtime/engine.h"
#include "runtime/model.h"
#include "runtime/sampler.h"

namespace xq::parallel {

class PipelineStage {
 public:
  virtual ~PipelineStage() = default;

  // The stage's engine: its cache, pool and sequence bookkeeping.
  virtual Engine& engine() = 0;
  virtual const Engine& engine() const = 0;
  virtual Range layers() const = 0;
  // Bytes of weights on this rank: what one decode step reads for the host
  // stage (TransformerEngine::weight_bytes), what is resident on the device
  // for the CUDA stage (CudaEngine::weight_bytes: the whole embedding and
  // RoPE tables included).
  virtual size_t weight_bytes() const = 0;
  // The communicator activations travel on between stages: its buffers are
  // stage memory (the grid's MPI column for the CPU stage, NCCL for CUDA).
  virtual Communicator& activation_channel() = 0;

  // Throw xq::Error (PoolExhausted for a pool too small) before anything is
  // written, as TransformerEngine's checks.
  virtual void check_input(const int32_t* tokens, int32_t n, int32_t pos0) const = 0;
  virtual void check_batch(const std::vector<Segment>& segments) const = 0;

  // A buffer of at least `floats` floats in stage memory, kept until the
  // next call with the same `slot` (0: activations, 1: rows for the head,
  // 2: logits).
  virtual float* buffer(int slot, size_t floats) = 0;
  // hidden (rows, dim) = the embeddings of the segments' tokens, in order.
  virtual void embed(const std::vector<Segment>& segments, float* hidden) = 0;
  // The stage's layers in place on hidden: one sequence's n rows at pos0
  // (a prefill micro-batch or a decode step), or a batch of segments.
  virtual void run_layers(int32_t seq, const int32_t* tokens, float* hidden, int32_t n,
                          int32_t pos0) = 0;
  virtual void run_layers(const std::vector<Segment>& segments, float* hidden) = 0;
  // dst[i] = src[i] for `floats` floats of stage memory.
  virtual void copy(const float* src, size_t floats, float* dst) = 0;
  // host_logits (rows, vocab) = the head of hidden (rows, dim).
  virtual void head(const float* hidden, int32_t rows, float* host_logits) = 0;
  // The next token from the head of one row of hidden, sampled by `sampler`,
  // with its top-1 minus top-2 margin.
  virtual SampledToken head_sample(const float* hidden_row, Sampler& sampler) = 0;
};

// Builds the stage of `grid`'s rank for `layers` (collective-free).
using StageFactory = std::function<std::unique_ptr<PipelineStage>(
    const Model& model, const EngineOptions& options, Grid& grid, Range layers)>;

// A TransformerEngine over the grid's TP group, host memory; activations over
// the grid's pipeline column.
std::unique_ptr<PipelineStage> make_cpu_stage(const Model& model, const EngineOptions& options,
                                              Grid& grid, Range layers);

}  // namespace xq::parallel
