// A replica's steps under mpirun: the scheduler runs on world rank 0 and
// every step's plan (runtime/step_plan.h: slots to release, segments to run)
// goes to every rank before the step, so all ranks run the same collective
// forward_batch. Rank 0 uses PlanBroadcaster as the scheduler's executor; the
// other ranks run follow_plans() until rank 0 says the job is done.
// Between steps rank 0 may also gather every rank's cache numbers
// (gather_cache), which a server reports per rank and which keeps the
// followers' waits short of their timeout while no request runs.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "parallel/grid.h"
#include "runtime/engine.h"
#include "runtime/step_plan.h"

namespace xq::parallel {

// One rank's cache as it reports it itself.
struct RankCache {
  int64_t used_bytes = 0;      // Engine::cache_bytes_in_use()
  int64_t total_bytes = 0;     // its own pool (not the tightest rank's)
  double bytes_per_token = 0;  // its cache mode's, for its layers and heads
};
// What a rank reports when follow_plans is given nothing better: bytes in
// use, and the pool as engine.pool() sees it (bytes per token unknown: 0).
RankCache engine_rank_cache(const Engine& engine);

class PlanBroadcaster final : public StepExecutor {
 public:
  // Only on world rank 0.
  PlanBroadcaster(Grid& grid, Engine& engine) : grid_(grid), engine_(engine) {}
  // Sends the plan to every rank, then runs it here as they do. An engine
  // error (xq::Error, the same on every rank) comes back to the scheduler,
  // which fails that step's requests; the followers carry on alike.
  void execute(const StepPlan& plan, float* logits) override;
  Engine& engine() override { return engine_; }
  // Every rank's RankCache, in world-rank order; `mine` is rank 0's.
  // Collective with the followers (they answer from follow_plans); throws
  // LostRank when a rank does not answer within the communicators' timeout.
  std::vector<RankCache> gather_cache(const RankCache& mine);
  // Tells every follower to return from follow_plans().
  void finish();

 private:
  Grid& grid_;
  Engine& engine_;
};

// The loop of every rank but world rank 0: receive a plan, run it, until
// rank 0 finishes. Throws LostRank when rank 0 (or any rank) is lost.
// `local` gives this rank's answer to gather_cache (engine_rank_cache when
// empty).
void follow_plans(Grid& grid, Engine& engine, const std::function<RankCache()>& local = {});

}  // namespace xq::parallel
