#include "parallel/pipeline_engine.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "kernels/error.h"

namespace xq::parallel {

PipelineEngine::PipelineEngine(const Model& model, const EngineOptions& options, Grid& grid,
                               const PipelineOptions& pipeline)
    : model_(model), grid_(grid), micro_batch_(pipeline.micro_batch) {
  if (micro_batch_ < 1)
    throw Error("pipeline parallel: micro-batch of " + std::to_string(micro_batch_) +
                " tokens; want at least 1");
  const std::vector<Range> ranges =
      stage_layers(model.config().n_layers, grid.pp(), pipeline.stage_layer_counts);
  stage_ = std::make_unique<TransformerEngine>(model, options, grid.tp_group(),
                                               ranges[static_cast<size_t>(grid.stage())]);
}

void PipelineEngine::forward(int32_t seq, const int32_t* tokens, int32_t n, int32_t pos0,
                             float* logits, int32_t first_logit_row) {
  run(seq, tokens, n, pos0, logits, first_logit_row, /*broadcast_logits=*/true);
}

SampledToken PipelineEngine::forward_sample(int32_t seq, const int32_t* tokens, int32_t n,
                                            int32_t pos0, Sampler& sampler) {
  SampledToken chosen;
  if (n <= 0) throw Error("forward_sample: no tokens");
  const int32_t vocab = model_.config().vocab_size;
  const int last = grid_.pp() - 1;
  last_logits_.resize(static_cast<size_t>(vocab));
  run(seq, tokens, n, pos0, last_logits_.data(), n - 1, /*broadcast_logits=*/false);
  if (grid_.stage() == last) {
    chosen.token = sampler.sample(last_logits_.data(), vocab);
    chosen.margin = top2_margin(last_logits_.data(), vocab);
  }
  if (last > 0) grid_.pipeline().broadcast(&chosen, sizeof chosen, last);
  return chosen;
}

void PipelineEngine::run(int32_t seq, const int32_t* tokens, int32_t n, int32_t pos0, float* logits,
                         int32_t first_logit_row, bool broadcast_logits) {
  const ModelConfig& c = model_.config();
  if (n <= 0) return;
  // Every rank checks the same arguments, so all throw or none does, before
  // any message moves.
  stage_->check_input(tokens, n, pos0);
  const int stage = grid_.stage(), last = grid_.pp() - 1;
  Communicator& pipe = grid_.pipeline();
  const int32_t first = std::clamp(first_logit_row, 0, n);
  const int32_t scored = logits == nullptr ? 0 : n - first;
  const int32_t vocab = c.vocab_size;
  // ceil(n / micro_batch) micro-batches of near-equal size (41 tokens at 20:
  // 14, 14, 13, not 20, 20, 1), so none is needlessly small.
  // One stage has nothing to overlap: one batch.
  const int32_t pieces = grid_.pp() == 1 ? 1 : (n + micro_batch_ - 1) / micro_batch_;
  const std::vector<Range> batches = even_split(n, pieces);
  hidden_.resize(static_cast<size_t>(batches.front().count) * c.dim);

  for (const Range& batch : batches) {
    const int32_t b = static_cast<int32_t>(batch.begin), m = static_cast<int32_t>(batch.count);
    const size_t bytes = static_cast<size_t>(m) * c.dim * sizeof(float);
    if (stage == 0)
      stage_->embed(tokens + b, m, hidden_.data());
    else
      pipe.recv(hidden_.data(), bytes, stage - 1);
    stage_->run_layers(seq, hidden_.data(), m, pos0 + b);
    if (stage < last) {
      pipe.send(hidden_.data(), bytes, stage + 1);
    } else if (scored > 0 && b + m > first) {
      // The rows of this micro-batch at or after first_logit_row.
      const int32_t from = std::max(first, b);
      stage_->head(hidden_.data() + static_cast<size_t>(from - b) * c.dim, b + m - from,
                   logits + static_cast<size_t>(from - first) * vocab);
    }
  }
  // Each pipeline column holds one last-stage rank, and every TP rank of the
  // last stage has the same logits (replicated head).
  if (broadcast_logits && scored > 0 && last > 0)
    pipe.broadcast(logits, static_cast<size_t>(scored) * vocab * sizeof(float), last);
}

}  // namespace xq::parallel
