// Pipeline parallelism (pp >= 1) over tensor parallelism inside each stage:
// stage s of the grid holds a contiguous range of layers (balanced by default,
// or counts[s] layers each) as an engine over its TP group (a TransformerEngine
// on the host, or a CudaEngine on the rank's GPU: parallel/pipeline_stage.h),
// so its weights and cache cover those layers only (XQuant-CL starts a new chain at
// each stage's first layer, so no stage needs another's accumulator). Stage 0 embeds the
// tokens; each stage runs its layers and sends the hidden activations (rows x
// dim floats) to the next stage over the stage's activation channel (the
// grid's pipeline column for host stages, NCCL between device buffers for
// CUDA stages); the last stage applies the final norm and the output head,
// and broadcasts the logits back along the pipeline (the grid's MPI column,
// host memory) so every rank returns them (forward), or samples the next
// token itself, where its logits are, and sends back only that
// (forward_sample, generation).
//
// A prefill is cut into ceil(n / micro_batch) micro-batches of near-equal
// size (at most micro_batch tokens; one batch when pp = 1), each sent
// on as soon as it is produced, so stage s + 1 works on micro-batch i while
// stage s works on i + 1. Micro-batches reach each stage in order, and each
// attends over the cache its predecessors filled, so the result does not
// depend on micro_batch, up to summation order and the GEMM path a batch size
// picks: with quantized weights, batches of at most 8 rows take the decode
// path (int8 activations, see kernels/cpu/matmul.cpp), which moves logits by
// up to ~1 on SmolLM2 Q4_1, so keep micro_batch well above 8 there. Modes
// with a per-channel stream (kivi, xquant latents on GQA) are the exception:
// a token waits in fp16 until its 128-token group is full, so queries of an
// early micro-batch see the fp16 window where one whole prefill would have
// seen the group quantized; `xq perplexity --batch M` reproduces the split.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "parallel/grid.h"
#include "parallel/pipeline_stage.h"
#include "runtime/engine.h"
#include "runtime/model.h"
#include "runtime/sampler.h"

namespace xq::parallel {

struct PipelineOptions {
  int32_t micro_batch = 64;                 // tokens per micro-batch of a prefill
  std::vector<int64_t> stage_layer_counts;  // empty: balanced (stage_layers)
};

class PipelineEngine final : public Engine {
 public:
  // Collective over the grid (the ranks agree on the pool); throws xq::Error for an unknown cache
  // mode, when micro_batch < 1, when the counts do not split the layers or the model does not split
  // over tp.
  PipelineEngine(const Model& model, const EngineOptions& options, Grid& grid,
                 const PipelineOptions& pipeline = {});
  // The same with this rank's stage built by `make_stage` (make_cpu_stage
  // above; parallel/device_grid.h for CUDA stages).
  PipelineEngine(const Model& model, const EngineOptions& options, Grid& grid,
                 const PipelineOptions& pipeline, const StageFactory& make_stage);

  // Engine: collective over the whole grid (every rank calls it with the same
  // arguments) and every rank gets the logits.
  void forward(int32_t seq, const int32_t* tokens, int32_t n, int32_t pos0, float* logits,
               int32_t first_logit_row) override;
  // forward() of n tokens, then the next token sampled from the last row's
  // logits on the last stage, which sends only the token (and its margin)
  // back along the column: 8 bytes per step instead of a row of logits. Every
  // last-stage rank holds the same logits and samples with the same state, so
  // `sampler` must be seeded alike on every rank; other stages never use it.
  SampledToken forward_sample(int32_t seq, const int32_t* tokens, int32_t n, int32_t pos0,
                              Sampler& sampler) override;
  void truncate(int32_t seq, int32_t from) override { engine().truncate(seq, from); }
  int32_t length(int32_t seq) const override { return engine().length(seq); }
  int32_t max_tokens() const override { return engine().max_tokens(); }
  const Model& model() const override { return model_; }
  std::string cache_description() const override { return engine().cache_description(); }
  size_t cache_bytes_in_use() const override { return engine().cache_bytes_in_use(); }
  double cache_fraction_of_fp16() const override { return engine().cache_fraction_of_fp16(); }
  int32_t sequence_slots() const override { return engine().sequence_slots(); }
  // The pool of the rank with the fewest blocks (learnt at construction).
  // Blocks per sequence are counted as TP rank 0 holds them: under sequence
  // sharding it keeps the most tokens of every sequence.
  PoolInfo pool() const override { return pool_; }
  int32_t blocks_for_tokens(int32_t tokens) const override {
    return engine().blocks_for_tokens(tokens);
  }
  int32_t blocks_for_step(int32_t from, int32_t to) const override {
    return engine().blocks_for_step(from, to);
  }
  // Segments go down the pipeline as micro-batches of whole segments (at
  // least pp of them where there are as many segments, so every stage has
  // work while the others do), each stage sending a micro-batch on as soon
  // as it is done. Collective over the whole grid; every rank gets the logits.
  void forward_batch(const std::vector<Segment>& segments, float* logits) override;

  // This rank's stage: its layers, weights and cache. stage_engine() is the
  // host stage's TransformerEngine (xq::Error for a CUDA stage).
  const TransformerEngine& stage_engine() const;
  const PipelineStage& stage() const { return *stage_; }
  Range layers() const { return stage_->layers(); }
  size_t weight_bytes() const { return stage_->weight_bytes(); }
  int32_t micro_batch() const { return micro_batch_; }
  // Seconds this rank spent inside forward_batch, and of those in its own
  // layers and head: 1 - busy / total is the bubble this stage saw (waiting
  // on its neighbours and the agreement on each step).
  double batch_seconds() const { return batch_seconds_; }
  double busy_seconds() const { return busy_seconds_; }

 private:
  const Model& model_;
  Grid& grid_;
  int32_t micro_batch_;
  std::unique_ptr<PipelineStage> stage_;
  Engine& engine() { return stage_->engine(); }
  const Engine& engine() const { return stage_->engine(); }
  // Runs the stages; the last one writes logits of rows [first, n), which go
  // to every rank when `broadcast_logits`, or, given `sampler`, samples the
  // last row into *chosen (last stage only).
  void run(int32_t seq, const int32_t* tokens, int32_t n, int32_t pos0, float* logits,
           int32_t first_logit_row, bool broadcast_logits, Sampler* sampler = nullptr,
           SampledToken* chosen = nullptr);

  PoolInfo pool_;
  double batch_seconds_ = 0, busy_seconds_ = 0;
};

}  // namespace xq::parallel
