// The coordinator: the public Generation API in front of several replicas.
// It admits requests (API key, field checks, a bounded priority queue),
// routes each to a replica by a policy (router.h), relays the replica's
// stream and is otherwise out of the per-token loop.
//
// Replicas come from Registry.Register (repeated every heartbeat; missing
// for three heartbeats is down) or from a static list. A poller keeps each
// replica's load fresh (Control.GetLoad every poll interval, ServerInfo on
// (re)registration); failed calls and polls feed a circuit breaker. An
// answered poll ends a streak of failed polls but not one that holds a
// failed call (a replica can answer polls and still fail every request).
//
// A replica may take a request while it is up, its breaker closed (or
// half-open with its one trial free), ready, and not saturated: the requests
// waiting in its own queue (from its load) plus those routed there that its
// load does not show yet stay below max(2, max_sequences / 2), so a replica
// keeps a short queue of its own and the coordinator holds the rest, where
// priorities and balancing still apply.
//
// Failures: a replica call that fails before any delta was relayed
// (UNAVAILABLE, a reset connection, a retryable `error`, or its replica
// marked down) is a breaker failure; the request goes back to the head of
// the queue and another replica is tried (at most `max_attempts`, then an
// Error UNAVAILABLE retryable). After a delta it ends the client's stream
// with one Error UNAVAILABLE retryable naming the replica; nothing is
// replayed. Statuses that are the request's own fault pass through.
#pragma once

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "launch/serve/router.h"
#include "launch/serve/security.h"
#include "xquant/v1/xquant.grpc.pb.h"

namespace xq::serve {

namespace v1 = ::xquant::v1;

struct CoordinatorOptions {
  std::string listen = "127.0.0.1:50051";
  RoutingPolicy routing = RoutingPolicy::kLeastLoad;
  std::vector<std::string> static_replicas;  // host:port, polled like registered ones
  int32_t max_queued_requests = 256;
  int64_t max_queued_tokens = 1 << 20;
  std::chrono::milliseconds poll_interval{100};
  std::chrono::milliseconds heartbeat{1000};
  int breaker_failures = 3;
  std::chrono::milliseconds breaker_cooldown{5000};
  std::chrono::milliseconds stall_timeout{30000};  // <= 0: no write watch
  int max_attempts = 3;                            // replicas tried per request
  // Server side: api_key, tls_cert/tls_key. Calls to replicas: the same
  // api_key, tls_ca (+ tls_server_name) and, with tls_ca, cert/key as a
  // client certificate.
  Security security;
  bool reflection = false;
  int max_request_bytes = 4 << 20;
};

class Coordinator {
 public:
  explicit Coordinator(CoordinatorOptions options);
  ~Coordinator();
  Coordinator(const Coordinator&) = delete;
  Coordinator& operator=(const Coordinator&) = delete;

  // Listens and starts the poller. Throws xq::Error when the address
  // cannot be bound or a TLS file cannot be read.
  void start();
  // The port bound (useful with port 0).
  int port() const { return port_; }
  // Stops taking requests, ends those in flight (waiting at most
  // `grace`), stops the poller.
  void shutdown(std::chrono::milliseconds grace = std::chrono::milliseconds(2000));
  // Blocks until shutdown.
  void wait();

  // The Prometheus text of the coordinator's metrics (metrics.h): requests
  // as the coordinator relayed them, and each replica's load as last polled.
  std::string metrics_text() const;
  // Counts a generation request refused in front of the coordinator (the
  // HTTP front's own checks) in xq:request_rejected_total{reason}.
  void count_rejected(const std::string& reason);

  // What ListReplicas answers.
  v1::ListReplicasResponse list_replicas() const;

  // A channel to this coordinator's services inside the process (no socket,
  // no TLS; the API key is still checked), for a front in the same process.
  // Throws xq::Error before start().
  std::shared_ptr<grpc::Channel> in_process_channel();

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
  int port_ = 0;
};

}  // namespace xq::serve
