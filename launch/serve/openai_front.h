// An OpenAI-compatible HTTP front for the coordinator: /v1/completions,
// /v1/chat/completions (both streamed as server-sent events or not),
// /v1/models, /health, /ready and /metrics, on cpp-httplib.
//
// The front is a client of the coordinator's own gRPC services through a
// channel inside the process (Coordinator::in_process_channel()), so the
// API key check, field validation, admission, routing and cancellation are
// the coordinator's, and an HTTP request behaves as the same gRPC request
// would. The HTTP request's "Authorization: Bearer KEY" is forwarded as the
// call's key; the coordinator refuses a wrong one before any model work.
//
// Statuses: a gRPC status before the stream starts becomes the HTTP status
// of an OpenAI error body ({"error": {message, type, param, code}}):
// INVALID_ARGUMENT, UNIMPLEMENTED and bad JSON 400, UNAUTHENTICATED 401,
// RESOURCE_EXHAUSTED 429 with Retry-After, UNAVAILABLE 503,
// DEADLINE_EXCEEDED 504, others 500; a body over max_request_bytes 413. A
// failure after a stream began is one `data: {"error": ...}` event that ends
// the stream.
//
// A client that goes away aborts its request: a failed write of a stream,
// and, while a request waits (queued, in prefill, or a non-streamed request
// decoding), the connection's socket seen closed by its peer, cancel the
// gRPC call, which the coordinator turns into an abort on the replica.
#pragma once

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <functional>
#include <memory>
#include <string>

namespace xq::serve {

struct OpenAiFrontOptions {
  // host:port; port 0 picks a free port (see OpenAiFront::port()).
  std::string listen = "127.0.0.1:8000";
  // PEM files; both set: HTTPS.
  std::string tls_cert, tls_key;
  // A larger request body is refused with 413.
  int max_request_bytes = 4 << 20;
  // HTTP worker threads: each open connection (an idle keep-alive one too)
  // holds one, so this bounds the concurrent streams; further connections
  // wait for a free thread.
  int threads = 256;
  // How long a write to a client may block before the request is aborted
  // (a client that stopped reading).
  std::chrono::milliseconds write_timeout{30000};
  // The text GET /metrics answers (Prometheus exposition format); empty
  // function: 404.
  std::function<std::string()> metrics;
  // Called with a reason for each generation request the front refuses
  // itself, before the coordinator sees it (bad JSON, an unsupported field,
  // an unknown model, a body over the limit), so the coordinator's
  // xq:request_rejected_total counts those too.
  std::function<void(const std::string& reason)> on_rejected;
};

class OpenAiFront {
 public:
  // `coordinator`: a channel to the coordinator's Generation service (and
  // its health service, which /ready asks).
  OpenAiFront(std::shared_ptr<grpc::Channel> coordinator, OpenAiFrontOptions options);
  ~OpenAiFront();
  OpenAiFront(const OpenAiFront&) = delete;
  OpenAiFront& operator=(const OpenAiFront&) = delete;

  // Binds and starts serving on a thread of its own. Throws xq::Error when
  // the address cannot be bound or a TLS file cannot be used.
  void start();
  int port() const;
  // Stops listening and waits for the requests in progress (their gRPC
  // calls end with the coordinator's shutdown, or are cancelled here).
  void stop();

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace xq::serve
