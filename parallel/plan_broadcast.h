// A replica's steps under mpirun: the scheduler runs on world rank 0 and
// every step's plan (runtime/step_plan.h: slots to release, segments to run)
// goes to every rank before the step, so all ranks run the same collective
// forward_batch. Rank 0 uses PlanBroadcaster as the scheduler's executor; the
// other ranks run follow_plans() until rank 0 says the job is done.
#pragma once

#include "parallel/grid.h"
#include "runtime/engine.h"
#include "runtime/step_plan.h"

namespace xq::parallel {

class PlanBroadcaster final : public StepExecutor {
 public:
  // Only on world rank 0.
  PlanBroadcaster(Grid& grid, Engine& engine) : grid_(grid), engine_(engine) {}
  // Sends the plan to every rank, then runs it here as they do. An engine
  // error (xq::Error, the same on every rank) comes back to the scheduler,
  // which fails that step's requests; the followers carry on alike.
  void execute(const StepPlan& plan, float* logits) override;
  Engine& engine() override { return engine_; }
  // Tells every follower to return from follow_plans().
  void finish();

 private:
  Grid& grid_;
  Engine& engine_;
};

// The loop of every rank but world rank 0: receive a plan, run it, until
// rank 0 finishes. Throws LostRank when rank 0 (or any rank) is lost.
void follow_plans(Grid& grid, Engine& engine);

}  // namespace xq::parallel
