#include "parallel/plan_broadcast.h"

#include <cstdint>
#include <vector>

#include "kernels/error.h"

namespace xq::parallel {
namespace {

// Length -1 ends the followers' loop.
constexpr int64_t kFinished = -1;

// World rank 0 to every rank: first over stage 0's TP group, then down every
// pipeline column (each column's stage-0 member now holds the message).
void broadcast_from_rank0(Grid& grid, void* data, size_t bytes) {
  if (grid.stage() == 0) grid.tp_group().broadcast(data, bytes, 0);
  grid.pipeline().broadcast(data, bytes, 0);
}

void run_plan(Engine& engine, const StepPlan& plan, float* logits) {
  for (int32_t seq : plan.released) engine.release(seq);
  if (!plan.segments.empty()) engine.forward_batch(plan.segments, logits);
}

}  // namespace

void PlanBroadcaster::execute(const StepPlan& plan, float* logits) {
  std::vector<int32_t> flat = plan.serialize();
  int64_t size = static_cast<int64_t>(flat.size());
  broadcast_from_rank0(grid_, &size, sizeof size);
  broadcast_from_rank0(grid_, flat.data(), flat.size() * sizeof(int32_t));
  run_plan(engine_, plan, logits);
}

void PlanBroadcaster::finish() {
  int64_t size = kFinished;
  broadcast_from_rank0(grid_, &size, sizeof size);
}

void follow_plans(Grid& grid, Engine& engine) {
  std::vector<int32_t> flat;
  std::vector<float> logits;
  const size_t vocab = static_cast<size_t>(engine.model().config().vocab_size);
  for (;;) {
    int64_t size = 0;
    broadcast_from_rank0(grid, &size, sizeof size);
    if (size == kFinished) return;
    if (size < 0 || size > (int64_t{1} << 30))
      throw Error("worker: a step plan of " + std::to_string(size) + " values from rank 0");
    flat.resize(static_cast<size_t>(size));
    broadcast_from_rank0(grid, flat.data(), flat.size() * sizeof(int32_t));
    const StepPlan plan = StepPlan::deserialize(flat);
    logits.resize(static_cast<size_t>(plan.logit_rows()) * vocab);
    try {
      run_plan(engine, plan, logits.data());
    } catch (const LostRank&) {
      throw;
    } catch (const Error&) {
      // Rank 0 met the same error and fails the step's requests; go on.
    }
  }
}

}  // namespace xq::parallel
