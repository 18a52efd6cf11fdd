#include "launch/coordinator_tool.h"

#include <pthread.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <limits>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/error.h"
#include "launch/arguments.h"
#include "launch/security_options.h"
#include "launch/serve/coordinator.h"
#include "launch/serve/openai_front.h"

namespace xq {
namespace {

std::vector<std::string> split_addresses(const std::string& list) {
  std::vector<std::string> addresses;
  std::stringstream in(list);
  for (std::string address; std::getline(in, address, ',');)
    if (!address.empty()) addresses.push_back(address);
  return addresses;
}

}  // namespace

int run_coordinator(int argc, char** argv) {
  Arguments args("coordinator",
                 "Serve the xquant.v1 Generation API and route each request to a replica\n"
                 "(`xq worker --serve`). Replicas register themselves (Registry.Register) or are\n"
                 "listed with --replica. Stops on SIGINT/SIGTERM after draining.");
  args.option("listen", "127.0.0.1:50051", "address to serve on (host:port)");
  args.option("routing", "least-load", "least-load, power-of-two, round-robin or session");
  args.option("replica", "", "static replicas, host:port[,host:port...]");
  args.option("max-queued-requests", "256", "requests the coordinator's queue holds");
  args.option("max-queued-tokens", "1048576",
              "tokens (prompt bound + max_tokens) the coordinator's queue holds");
  args.option("poll-ms", "100", "how often each replica's load is polled");
  args.option("heartbeat-ms", "1000", "registration interval asked of replicas (3 missed: down)");
  args.option("breaker-failures", "3", "consecutive failures that open a replica's breaker");
  args.option("breaker-cooldown-ms", "5000", "how long an open breaker keeps traffic away");
  args.option("stall-timeout", "30", "seconds a stream write may block before the call ends");
  args.option("max-attempts", "3", "replicas tried for a request that fails before streaming");
  add_security_options(args, SecurityRole::kServer, "", "replicas");
  add_max_request_bytes_option(args, "");
  args.flag("reflection", "serve gRPC reflection");
  args.option("http-listen", "",
              "also serve the OpenAI-compatible HTTP API on host:port (/v1/completions, "
              "/v1/chat/completions, /v1/models, /health, /ready, /metrics); same API key, "
              "TLS files and request size limit");
  args.option("http-threads", "256", "HTTP worker threads: open HTTP connections served at once");
  if (!args.parse(argc, argv)) return 0;

  serve::CoordinatorOptions options;
  options.listen = args.get("listen");
  const std::optional<serve::RoutingPolicy> routing =
      serve::parse_routing_policy(args.get("routing"));
  if (!routing)
    throw Error("coordinator: --routing '" + args.get("routing") + "' is not a policy (one of " +
                serve::routing_policy_names() + ")");
  options.routing = *routing;
  options.static_replicas = split_addresses(args.get("replica"));
  options.max_queued_requests = static_cast<int32_t>(args.get_int("max-queued-requests", 0));
  options.max_queued_tokens =
      args.get_int("max-queued-tokens", 0, std::numeric_limits<int64_t>::max());
  options.poll_interval = std::chrono::milliseconds(args.get_int("poll-ms", 1, 60000));
  options.heartbeat = std::chrono::milliseconds(args.get_int("heartbeat-ms", 10, 3600000));
  options.breaker_failures = static_cast<int>(args.get_int("breaker-failures", 1, 1000));
  options.breaker_cooldown =
      std::chrono::milliseconds(args.get_int("breaker-cooldown-ms", 0, 3600000));
  const double stall = args.get_float("stall-timeout");
  if (stall < 0) throw Error("coordinator: --stall-timeout must be >= 0 (0: off)");
  options.stall_timeout = std::chrono::milliseconds(static_cast<int64_t>(stall * 1000));
  options.max_attempts = static_cast<int>(args.get_int("max-attempts", 1, 100));
  options.security = security_options(args, SecurityRole::kServer, "coordinator");
  options.max_request_bytes = max_request_bytes(args, "coordinator");
  options.reflection = args.has("reflection");

  const std::string http_listen = args.get("http-listen");
  const int http_threads = static_cast<int>(args.get_int("http-threads", 1, 100000));

  serve::warn_unless_loopback(options.listen, "the coordinator");
  if (!http_listen.empty()) serve::warn_unless_loopback(http_listen, "the OpenAI HTTP front");
  // Blocked before any thread starts, so every thread inherits the mask and
  // the signals wait for sigwait below.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  serve::Coordinator coordinator(options);
  coordinator.start();
  std::fprintf(stderr, "coordinator: listening on %s (port %d), routing %s, %zu static replicas\n",
               options.listen.c_str(), coordinator.port(),
               serve::routing_policy_name(options.routing), options.static_replicas.size());
  std::unique_ptr<serve::OpenAiFront> http;
  if (!http_listen.empty()) {
    serve::OpenAiFrontOptions http_options;
    http_options.listen = http_listen;
    http_options.tls_cert = options.security.tls_cert;
    http_options.tls_key = options.security.tls_key;
    http_options.max_request_bytes = options.max_request_bytes;
    http_options.threads = http_threads;
    if (options.stall_timeout.count() > 0) http_options.write_timeout = options.stall_timeout;
    http_options.metrics = [&coordinator] { return coordinator.metrics_text(); };
    http_options.on_rejected = [&coordinator](const std::string& reason) {
      coordinator.count_rejected(reason);
    };
    http = std::make_unique<serve::OpenAiFront>(coordinator.in_process_channel(), http_options);
    http->start();
    std::fprintf(stderr, "coordinator: OpenAI HTTP%s on %s (port %d)\n",
                 options.security.tls_cert.empty() ? "" : "S", http_listen.c_str(), http->port());
  }
  int received = 0;
  sigwait(&stop_signals, &received);
  std::fprintf(stderr, "coordinator: %s, draining\n", received == SIGTERM ? "SIGTERM" : "SIGINT");
  // The HTTP requests are calls of the coordinator's: its drain ends them,
  // then the HTTP server stops.
  coordinator.shutdown(std::chrono::seconds(10));
  if (http) http->stop();
  return 0;
}

}  // namespace xq
