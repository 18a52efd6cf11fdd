// A replica's gRPC front: xquant.v1.Generation and xquant.v1.Control (and
// gRPC health, reflection on request) around one Scheduler.
//
// Threads. gRPC runs each call on a thread of its own (the synchronous API);
// run() is the scheduler thread, the only one that touches the Scheduler and
// the executor (under mpirun, the only one that talks to the other ranks).
// A Generate handler checks its request, hands it to the scheduler thread
// through a queue, then waits on its own channel for what the scheduler
// thread routes there (events, or a server-side error), with a timed wait so
// that it notices a cancelled call. Cancels (client, deadline, Abort, a
// stalled consumer) go through the same queue.
//
// Health: "" is SERVING while the process lives; "xquant.v1.Generation" is
// SERVING only between warm-up and drain, and never again once the replica
// is found hung or has lost a rank.
//
// Liveness: a watchdog thread fails every live request (UNAVAILABLE,
// retryable) and calls ReplicaOptions::on_hung when a step runs longer than
// the step timeout or the periodic canary (a one-token greedy request on the
// scheduler's reserved slot, so it never waits behind a full replica) does
// not finish within it.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "launch/serve/security.h"
#include "parallel/plan_broadcast.h"
#include "runtime/scheduler.h"
#include "runtime/step_plan.h"
#include "xquant/v1/xquant.pb.h"

namespace xq::serve {

struct ReplicaOptions {
  std::string listen = "127.0.0.1:50061";
  // What the coordinator dials; empty: the listen address (with the bound
  // port when listen asked for port 0).
  std::string advertise;
  std::string replica_id;   // empty: the advertised address
  std::string coordinator;  // empty: no registration
  Security security;
  bool reflection = false;
  int max_request_bytes = 4 << 20;
  int32_t max_prompt_tokens = 0;  // 0: the context's
  std::chrono::milliseconds step_timeout{30000};
  std::chrono::milliseconds canary_interval{5000};  // 0: no canary
  std::chrono::milliseconds stall_timeout{30000};   // 0: writes are not watched
  std::chrono::milliseconds drain_timeout{30000};
  // How often the per-rank cache numbers are refreshed while nothing runs
  // (they are after every step as well).
  std::chrono::milliseconds idle_gather_interval{500};
  SchedulerOptions scheduler;  // reserved_slot_tokens is set here when the canary is on
  // For GetServerInfo / GetModelInfo.
  int tp = 1, pp = 1;
  std::string backend = "cpu";
  std::string cache_mode;
  std::string model_name;
  // Called once from the watchdog thread when the replica is hung, after
  // every live request has been failed; the default prints the reason and
  // ends the process with status 1 (the supervisor restarts it).
  std::function<void(const std::string& reason)> on_hung;
};

// Tokens the reserved slot holds: the canary's prompt and its one token.
inline constexpr int32_t kCanarySlotTokens = 16;

// Every rank's cache numbers in world-rank order. Called on the scheduler
// thread only, between steps; may throw LostRank.
using CacheGatherer = std::function<std::vector<parallel::RankCache>()>;

class ReplicaServer {
 public:
  // `executor` (and its engine) must outlive the server. The engine needs
  // options.scheduler.max_sequences + 1 slots when the canary is on (the
  // reserved slot). `gather` empty: the executor's engine is the only rank.
  ReplicaServer(StepExecutor& executor, ReplicaOptions options, CacheGatherer gather = {});
  ~ReplicaServer();
  ReplicaServer(const ReplicaServer&) = delete;
  ReplicaServer& operator=(const ReplicaServer&) = delete;

  // Binds the listen address and starts answering (Generation NOT_SERVING
  // until run() has warmed up). Throws xq::Error when it cannot bind.
  void start();
  // The bound port (after start()).
  int port() const;
  // The scheduler loop on the calling thread: warm-up (one canary through
  // the engine, the per-rank pool measured), then serving, until a drain
  // completes (returns 0) or a rank is lost (every live request failed
  // UNAVAILABLE; returns 1, reason in failure()). Registers with the
  // coordinator while serving.
  int run();
  // Any thread (e.g. a signal thread): Generation goes NOT_SERVING, new
  // requests get UNAVAILABLE, running ones finish (up to drain_timeout,
  // then they are failed UNAVAILABLE retryable) and run() returns 0.
  void begin_drain();
  // Stops the gRPC server (run() must have returned).
  void shutdown();
  std::string failure() const;

  // For tests and the tool: what GetServerInfo and GetLoad answer.
  xquant::v1::ServerInfo server_info() const;
  xquant::v1::Load load() const;
  // The Prometheus text of the replica's metrics (metrics.h): its requests
  // as it streamed them, its steps, its load now.
  std::string metrics_text() const;

  class Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace xq::serve
