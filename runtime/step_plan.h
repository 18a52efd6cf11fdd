// One iteration of a batch scheduler as data: which sequence slots to give
// back, then which segments (prefill chunks and decode tokens) to run. A plan
// is plain integers so that the rank that schedules can broadcast it and every
// rank of a parallel engine executes the same step (StepExecutor).
#pragma once

#include <cstdint>
#include <vector>

#include "runtime/engine.h"

namespace xq {

struct StepPlan {
  // Slots whose blocks go back to the pool before the segments run (finished,
  // cancelled or preempted sequences). A slot may be released and then start
  // over from position 0 in the same plan.
  std::vector<int32_t> released;
  // Segment i's tokens point into `tokens`, at the sum of the n of segments
  // before it: add() keeps them so, and copies re-point them.
  std::vector<Segment> segments;
  std::vector<int32_t> tokens;

  StepPlan() = default;
  StepPlan(const StepPlan& other);
  StepPlan& operator=(const StepPlan& other);
  StepPlan(StepPlan&&) noexcept = default;
  StepPlan& operator=(StepPlan&&) noexcept = default;

  // Appends a segment whose n tokens are copied from `tokens`.
  void add(int32_t seq, int32_t pos0, const int32_t* tokens, int32_t n, bool wants_logits);
  bool empty() const { return released.empty() && segments.empty(); }
  // Rows of logits execute() writes: segments with wants_logits.
  int32_t logit_rows() const;
  int32_t token_count() const { return static_cast<int32_t>(tokens.size()); }

  // Flat form: [released count, released..., segment count,
  // (seq, pos0, n, wants_logits) per segment, tokens...].
  std::vector<int32_t> serialize() const;
  // Throws xq::Error when `flat` is not what serialize() writes (counts that
  // disagree with its length, negative sizes).
  static StepPlan deserialize(const int32_t* flat, size_t size);
  static StepPlan deserialize(const std::vector<int32_t>& flat) {
    return deserialize(flat.data(), flat.size());
  }

 private:
  void repoint();
};

// Where a scheduler's plans run. The scheduler talks to the engine only
// through this, so a parallel executor can first send the plan to every rank.
class StepExecutor {
 public:
  virtual ~StepExecutor() = default;
  // Releases plan.released, then runs plan.segments as one batch, writing
  // plan.logit_rows() rows of logits (vocab floats each). Throws what
  // Engine::forward_batch throws.
  virtual void execute(const StepPlan& plan, float* logits) = 0;
  // For what the scheduler reads without running anything: the pool, the
  // context, the tokenizer.
  virtual Engine& engine() = 0;
};

// Runs plans on an engine in this process.
class LocalExecutor final : public StepExecutor {
 public:
  explicit LocalExecutor(Engine& engine) : engine_(engine) {}
  void execute(const StepPlan& plan, float* logits) override;
  Engine& engine() override { return engine_; }

 private:
  Engine& engine_;
};

}  // namespace xq
