#include "parallel/pipeline_engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <string>

#include "kernels/error.h"

namespace xq::parallel {

namespace {

// The host stage: a TransformerEngine over the grid's TP group, activations
// over the grid's MPI pipeline column.
class CpuStage final : public PipelineStage {
 public:
  CpuStage(const Model& model, const EngineOptions& options, Grid& grid, Range layers)
      : grid_(grid), engine_(model, options, grid.tp_group(), layers) {}

  Engine& engine() override { return engine_; }
  const Engine& engine() const override { return engine_; }
  const TransformerEngine& transformer() const { return engine_; }
  Range layers() const override { return engine_.layers(); }
  size_t weight_bytes() const override { return engine_.weight_bytes(); }
  Communicator& activation_channel() override { return grid_.pipeline(); }
  void check_input(const int32_t* tokens, int32_t n, int32_t pos0) const override {
    engine_.check_input(tokens, n, pos0);
  }
  void check_batch(const std::vector<Segment>& segments) const override {
    engine_.check_batch(segments);
  }
  float* buffer(int slot, size_t floats) override {
    std::vector<float>& b = buffers_[static_cast<size_t>(slot)];
    if (b.size() < floats) b.resize(floats);
    return b.data();
  }
  void embed(const std::vector<Segment>& segments, float* hidden) override {
    const size_t dim = static_cast<size_t>(engine_.model().config().dim);
    size_t row = 0;
    for (const Segment& s : segments) {
      engine_.embed(s.tokens, s.n, hidden + row * dim);
      row += static_cast<size_t>(s.n);
    }
  }
  void run_layers(int32_t seq, const int32_t*, float* hidden, int32_t n, int32_t pos0) override {
    engine_.run_layers(seq, hidden, n, pos0);
  }
  void run_layers(const std::vector<Segment>& segments, float* hidden) override {
    engine_.run_layers(segments, hidden);
  }
  void copy(const float* src, size_t floats, float* dst) override { std::copy_n(src, floats, dst); }
  void head(const float* hidden, int32_t rows, float* host_logits) override {
    engine_.head(hidden, rows, host_logits);
  }
  SampledToken head_sample(const float* hidden_row, Sampler& sampler) override {
    const int32_t vocab = engine_.model().config().vocab_size;
    std::vector<float>& logits = buffers_[2];
    logits.resize(static_cast<size_t>(vocab));
    engine_.head(hidden_row, 1, logits.data());
    SampledToken chosen;
    chosen.token = sampler.sample(logits.data(), vocab);
    chosen.margin = top2_margin(logits.data(), vocab);
    return chosen;
  }

 private:
  Grid& grid_;
  TransformerEngine engine_;
  std::vector<float> buffers_[3];
};

}  // namespace

std::unique_ptr<PipelineStage> make_cpu_stage(const Model& model, const EngineOptions& options,
                                              Grid& grid, Range layers) {
  return std::make_unique<CpuStage>(model, options, grid, layers);
}

PipelineEngine::PipelineEngine(const Model& model, const EngineOptions& options, Grid& grid,
                               const PipelineOptions& pipeline)
    : PipelineEngine(model, options, grid, pipeline, make_cpu_stage) {}

PipelineEngine::PipelineEngine(const Model& model, const EngineOptions& options, Grid& grid,
                               const PipelineOptions& pipeline, const StageFactory& make_stage)
    : model_(model), grid_(grid), micro_batch_(pipeline.micro_batch) {
  if (micro_batch_ < 1)
    throw Error("pipeline parallel: micro-batch of " + std::to_string(micro_batch_) +
                " tokens; want at least 1");
  const std::vector<Range> ranges =
      stage_layers(model.config().n_layers, grid.pp(), pipeline.stage_layer_counts);
  stage_ = make_stage(model, options, grid, ranges[static_cast<size_t>(grid.stage())]);
  // The tightest rank's pool: a min over the TP group, then over the column.
  pool_ = engine().pool();
  float blocks = static_cast<float>(pool_.total_blocks);
  std::vector<float> all(static_cast<size_t>(std::max(grid.tp(), grid.pp())));
  grid.tp_group().all_gather(&blocks, 1, all.data());
  blocks = *std::min_element(all.begin(), all.begin() + grid.tp());
  grid.pipeline().all_gather(&blocks, 1, all.data());
  const int tightest_stage =
      static_cast<int>(std::min_element(all.begin(), all.begin() + grid.pp()) - all.begin());
  float bytes = static_cast<float>(pool_.block_bytes);
  grid.pipeline().broadcast(&bytes, sizeof bytes, tightest_stage);
  pool_.total_blocks = static_cast<int32_t>(all[static_cast<size_t>(tightest_stage)]);
  pool_.block_bytes = static_cast<size_t>(bytes);
}

const TransformerEngine& PipelineEngine::stage_engine() const {
  const auto* cpu = dynamic_cast<const CpuStage*>(stage_.get());
  if (cpu == nullptr) throw Error("pipeline: this rank's stage runs on a device, not the host");
  return cpu->transformer();
}

// Each rank checks the step against its own pool; the ranks then agree, so
// all throw or none does, before any activation moves.
void PipelineEngine::forward_batch(const std::vector<Segment>& segments, float* logits) {
  const ModelConfig& c = model_.config();
  if (segments.empty()) return;
  using Clock = std::chrono::steady_clock;
  const auto step_start = Clock::now();
  auto seconds_since = [](Clock::time_point t) {
    return std::chrono::duration<double>(Clock::now() - t).count();
  };
  std::string problem;
  bool pool_problem = false;
  try {
    stage_->check_batch(segments);
  } catch (const PoolExhausted& e) {
    problem = e.what();
    pool_problem = true;
  } catch (const Error& e) {
    problem = e.what();
  }
  float failed[2] = {problem.empty() ? 0.0f : 1.0f, pool_problem ? 1.0f : 0.0f};
  grid_.tp_group().all_reduce_sum(failed, 2);
  grid_.pipeline().all_reduce_sum(failed, 2);
  if (failed[0] > 0) {
    if (problem.empty()) problem = "forward_batch: another rank refused the step";
    if (failed[1] > 0) throw PoolExhausted(problem);
    throw Error(problem);
  }

  const int stage = grid_.stage(), last = grid_.pp() - 1;
  Communicator& pipe = stage_->activation_channel();
  const int32_t vocab = c.vocab_size;
  int32_t rows = 0, scored = 0;
  for (const Segment& s : segments) rows += s.n, scored += s.wants_logits ? 1 : 0;
  // Micro-batches of whole segments, near-equal in rows: at least pp of them
  // (so a decode step of many sequences keeps every stage busy) and at most
  // micro_batch rows each where segments allow. A segment is never split:
  // its chunk boundaries decide what its queries see of the cache.
  const int32_t pieces = std::min<int32_t>(
      static_cast<int32_t>(segments.size()),
      grid_.pp() == 1 ? 1
                      : std::max<int32_t>(grid_.pp(), (rows + micro_batch_ - 1) / micro_batch_));
  std::vector<std::vector<Segment>> batches(static_cast<size_t>(pieces));
  {
    int32_t taken = 0;
    size_t piece = 0;
    for (const Segment& s : segments) {
      // Move on once this piece holds its share of the rows.
      if (!batches[piece].empty() && piece + 1 < batches.size() &&
          taken >= static_cast<int64_t>(rows) * static_cast<int64_t>(piece + 1) / pieces)
        ++piece;
      batches[piece].push_back(s);
      taken += s.n;
    }
  }
  float* scored_out = logits;
  for (const std::vector<Segment>& batch : batches) {
    if (batch.empty()) continue;
    int32_t m = 0;
    for (const Segment& s : batch) m += s.n;
    float* hidden = stage_->buffer(0, static_cast<size_t>(m) * c.dim);
    const size_t bytes = static_cast<size_t>(m) * c.dim * sizeof(float);
    if (stage == 0)
      stage_->embed(batch, hidden);
    else
      pipe.recv(hidden, bytes, stage - 1);
    const auto busy_start = Clock::now();
    stage_->run_layers(batch, hidden);
    busy_seconds_ += seconds_since(busy_start);
    if (stage < last) {
      pipe.send(hidden, bytes, stage + 1);
    } else if (logits != nullptr) {
      int32_t row = 0, wanted = 0;
      float* head_rows = stage_->buffer(1, batch.size() * c.dim);
      for (const Segment& s : batch) {
        row += s.n;
        if (s.wants_logits)
          stage_->copy(hidden + static_cast<size_t>(row - 1) * c.dim, c.dim,
                       head_rows + static_cast<size_t>(wanted++) * c.dim);
      }
      const auto head_start = Clock::now();
      stage_->head(head_rows, wanted, scored_out);
      busy_seconds_ += seconds_since(head_start);
      scored_out += static_cast<size_t>(wanted) * vocab;
    }
  }
  if (logits != nullptr && scored > 0 && last > 0)
    grid_.pipeline().broadcast(logits, static_cast<size_t>(scored) * vocab * sizeof(float), last);
  batch_seconds_ += seconds_since(step_start);
}

void PipelineEngine::forward(int32_t seq, const int32_t* tokens, int32_t n, int32_t pos0,
                             float* logits, int32_t first_logit_row) {
  run(seq, tokens, n, pos0, logits, first_logit_row, /*broadcast_logits=*/true);
}

SampledToken PipelineEngine::forward_sample(int32_t seq, const int32_t* tokens, int32_t n,
                                            int32_t pos0, Sampler& sampler) {
  SampledToken chosen;
  if (n <= 0) throw Error("forward_sample: no tokens");
  const int last = grid_.pp() - 1;
  run(seq, tokens, n, pos0, nullptr, n - 1, /*broadcast_logits=*/false, &sampler, &chosen);
  if (last > 0) grid_.pipeline().broadcast(&chosen, sizeof chosen, last);
  return chosen;
}

void PipelineEngine::run(int32_t seq, const int32_t* tokens, int32_t n, int32_t pos0, float* logits,
                         int32_t first_logit_row, bool broadcast_logits, Sampler* sampler,
                         SampledToken* chosen) {
  const ModelConfig& c = model_.config();
  if (n <= 0) return;
  // Every rank checks the same arguments, so all throw or none does, before
  // any message moves.
  stage_->check_input(tokens, n, pos0);
  const int stage = grid_.stage(), last = grid_.pp() - 1;
  Communicator& pipe = stage_->activation_channel();
  const int32_t first = std::clamp(first_logit_row, 0, n);
  const int32_t scored = logits == nullptr ? 0 : n - first;
  const int32_t vocab = c.vocab_size;
  // ceil(n / micro_batch) micro-batches of near-equal size (41 tokens at 20:
  // 14, 14, 13, not 20, 20, 1), so none is needlessly small.
  // One stage has nothing to overlap: one batch.
  const int32_t pieces = grid_.pp() == 1 ? 1 : (n + micro_batch_ - 1) / micro_batch_;
  const std::vector<Range> batches = even_split(n, pieces);
  float* hidden = stage_->buffer(0, static_cast<size_t>(batches.front().count) * c.dim);

  for (const Range& batch : batches) {
    const int32_t b = static_cast<int32_t>(batch.begin), m = static_cast<int32_t>(batch.count);
    const size_t bytes = static_cast<size_t>(m) * c.dim * sizeof(float);
    if (stage == 0)
      stage_->embed({Segment{seq, pos0 + b, tokens + b, m, false}}, hidden);
    else
      pipe.recv(hidden, bytes, stage - 1);
    stage_->run_layers(seq, tokens + b, hidden, m, pos0 + b);
    if (stage < last) {
      pipe.send(hidden, bytes, stage + 1);
    } else if (sampler != nullptr && b + m == n) {
      // The last row: sampled where the logits are.
      *chosen = stage_->head_sample(hidden + static_cast<size_t>(n - 1 - b) * c.dim, *sampler);
    } else if (scored > 0 && b + m > first) {
      // The rows of this micro-batch at or after first_logit_row.
      const int32_t from = std::max(first, b);
      stage_->head(hidden + static_cast<size_t>(from - b) * c.dim, b + m - from,
                   logits + static_cast<size_t>(from - first) * vocab);
    }
  }
  // Each pipeline column holds one last-stage rank, and every TP rank of the
  // last stage has the same logits (replicated head).
  if (broadcast_logits && scored > 0 && last > 0)
    grid_.pipeline().broadcast(logits, static_cast<size_t>(scored) * vocab * sizeof(float), last);
}

}  // namespace xq::parallel
