#include "parallel/plan_broadcast.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "kernels/error.h"

namespace xq::parallel {
namespace {

// Instead of a plan's length: -1 ends the followers' loop, -2 asks every
// rank for its RankCache.
constexpr int64_t kFinished = -1;
constexpr int64_t kGatherCache = -2;

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

static_assert(std::is_trivially_copyable_v<RankCache>, "RankCache travels as bytes");

// Every rank's RankCache to world rank 0: each TP group to its member 0,
// then each stage's member 0 down pipeline column 0 to stage 0. Point-to-point
// over the grid's own communicators, so a lost rank throws LostRank within
// their timeout as a step would. Returns the whole grid on world rank 0 (in
// world-rank order) and nothing elsewhere.
std::vector<RankCache> gather_to_rank0(Grid& grid, const RankCache& mine) {
  const int tp = grid.tp(), pp = grid.pp();
  std::vector<RankCache> stage(static_cast<size_t>(tp));
  if (grid.tp_rank() != 0) {
    grid.tp_group().send(&mine, sizeof mine, 0);
    return {};
  }
  stage[0] = mine;
  for (int r = 1; r < tp; ++r)
    grid.tp_group().recv(&stage[static_cast<size_t>(r)], sizeof(RankCache), r);
  if (grid.stage() != 0) {
    grid.pipeline().send(stage.data(), stage.size() * sizeof(RankCache), 0);
    return {};
  }
  std::vector<RankCache> all(static_cast<size_t>(tp) * static_cast<size_t>(pp));
  std::copy(stage.begin(), stage.end(), all.begin());
  for (int s = 1; s < pp; ++s)
    grid.pipeline().recv(all.data() + static_cast<size_t>(s) * static_cast<size_t>(tp),
                         static_cast<size_t>(tp) * sizeof(RankCache), s);
  return all;
}

}  // namespace

RankCache engine_rank_cache(const Engine& engine) {
  const PoolInfo pool = engine.pool();
  RankCache cache;
  cache.used_bytes = static_cast<int64_t>(engine.cache_bytes_in_use());
  cache.total_bytes = static_cast<int64_t>(pool.block_bytes) * pool.total_blocks;
  return cache;
}

std::vector<RankCache> PlanBroadcaster::gather_cache(const RankCache& mine) {
  int64_t code = kGatherCache;
  broadcast_from_rank0(grid_, &code, sizeof code);
  return gather_to_rank0(grid_, mine);
}

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

void follow_plans(Grid& grid, Engine& engine, const std::function<RankCache()>& local) {
  std::vector<int32_t> flat;
  std::vector<float> logits;
  const size_t vocab = static_cast<size_t>(engine.model().config().vocab_size);
  for (;;) {
    int64_t size = 0;
    broadcast_from_rank0(grid, &size, sizeof size);
    if (size == kFinished) return;
    if (size == kGatherCache) {
      gather_to_rank0(grid, local ? local() : engine_rank_cache(engine));
      continue;
    }
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
