// A client of the xquant serving API (a coordinator or a replica): the
// Generation stream, the Control and Registry calls, and the standard health
// check. RPC failures come back as grpc::Status, never as exceptions; the
// constructor throws xq::Error only for a TLS file it cannot read.
//
//   xq::serve::Client client("127.0.0.1:50051", {.api_key = "secret"});
//   if (!client.wait_ready(xq::serve::kGenerationService, std::chrono::seconds(30)).ok())
//     return 1;
//   xquant::v1::GenerateRequest request;
//   request.set_text("Once upon a time");
//   request.mutable_sampling()->set_max_tokens(32);
//   xq::serve::CallOptions options;
//   options.timeout = std::chrono::seconds(60);
//   xq::serve::GenerateResult result =
//       client.generate(request, options, [](const xquant::v1::Delta& delta) {
//         std::fwrite(delta.text().data(), 1, delta.text().size(), stdout);
//         return true;  // false cancels the call
//       });
//   if (!result.status.ok()) ...            // refused, cancelled, timed out, unreachable
//   else if (result.error) ...              // failed after acceptance (result.error->retryable)
//   else ...                                // result.finished->reason(), result.text
//
// One Client may be used from several threads at once; cancel_all() is the
// way to stop calls from another thread (e.g. on SIGINT).
#pragma once

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "grpc/health/v1/health.grpc.pb.h"
#include "launch/serve/security.h"
#include "xquant/v1/xquant.grpc.pb.h"

namespace xq::serve {

namespace v1 = ::xquant::v1;

// The health service name that is SERVING while a server accepts requests.
inline constexpr char kGenerationService[] = "xquant.v1.Generation";

// Per-call options; every field is optional.
struct CallOptions {
  // "x-routing-key": requests with the same key go to the same replica.
  std::string routing_key;
  // "x-priority": higher is admitted first.
  std::optional<int32_t> priority;
  // "x-routing-policy": overrides the coordinator's policy for this call.
  std::string routing_policy;
  // The call's deadline, from when it starts; zero or less: none.
  std::chrono::milliseconds timeout{0};
  // Further metadata. Keys must be lowercase [a-z0-9._-] and not start with
  // "grpc-"; values printable ASCII (a bad one fails the call with
  // INVALID_ARGUMENT before anything is sent).
  std::vector<std::pair<std::string, std::string>> metadata;
};

struct GenerateResult {
  // OK when the stream ended as the protocol says: with exactly one finished
  // or error message. Otherwise the RPC's status (refused, CANCELLED,
  // DEADLINE_EXCEEDED, UNAVAILABLE...), or INTERNAL for a stream that broke
  // the protocol (no terminal message, or messages after it).
  grpc::Status status;
  std::string request_id;          // as the server echoed it
  std::vector<int32_t> token_ids;  // every delta's tokens, in order
  std::string text;                // every delta's text and the finished text
  std::optional<v1::Finished> finished;
  std::optional<v1::Error> error;  // a failure after acceptance
  // The handler returned false (the status is then CANCELLED).
  bool cancelled_by_handler = false;
  // The server's "retry-after" trailing metadata (RESOURCE_EXHAUSTED), in
  // seconds; negative when absent.
  int32_t retry_after_seconds = -1;
  // Seconds from the call's start to the first delta with a token (TTFT as
  // the client sees it; negative when none came) and to the stream's end.
  double first_token_seconds = -1;
  double total_seconds = 0;

  // A finished stream (OK status and a finished message).
  bool ok() const { return status.ok() && finished.has_value(); }
};

class Client {
 public:
  // Called for each delta; returning false cancels the call.
  using DeltaHandler = std::function<bool(const v1::Delta&)>;
  // Called for each stream message (deltas and the terminal message);
  // returning false cancels the call.
  using ResponseHandler = std::function<bool(const v1::GenerateResponse&)>;

  // `max_message_bytes` bounds what is sent and received (0: gRPC's
  // defaults). The channel connects lazily, on the first call.
  explicit Client(const std::string& address, const Security& security = {},
                  int max_message_bytes = 0);
  // On an existing channel (e.g. Coordinator::in_process_channel()); every
  // call sends `api_key` as its Bearer token when it is not empty.
  Client(std::shared_ptr<grpc::Channel> channel, std::string api_key);
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  GenerateResult generate(const v1::GenerateRequest& request, const CallOptions& options = {},
                          const DeltaHandler& on_delta = {});
  // The same, seeing every message as it arrives (the finished or error
  // message included).
  GenerateResult generate_stream(const v1::GenerateRequest& request, const CallOptions& options,
                                 const ResponseHandler& on_response);

  grpc::Status tokenize(const v1::TokenizeRequest& request, v1::TokenizeResponse* response,
                        const CallOptions& options = {});
  grpc::Status model_info(v1::ModelInfo* info, const CallOptions& options = {});
  // Control (a replica's): UNIMPLEMENTED from a coordinator.
  grpc::Status server_info(v1::ServerInfo* info, const CallOptions& options = {});
  grpc::Status load(v1::Load* load, const CallOptions& options = {});
  grpc::Status abort(const std::string& request_id, bool* found, const CallOptions& options = {});
  // Registry (the coordinator's): UNIMPLEMENTED from a replica.
  grpc::Status list_replicas(v1::ListReplicasResponse* replicas, const CallOptions& options = {});

  using ServingStatus = grpc::health::v1::HealthCheckResponse::ServingStatus;
  // One grpc.health.v1 Check of `service` ("" is the server as a whole).
  // OK with *status set when the server answered; NOT_FOUND for a service it
  // does not know.
  grpc::Status health_check(const std::string& service, ServingStatus* status,
                            std::chrono::milliseconds timeout = std::chrono::seconds(5));
  // Checks until `service` is SERVING (OK) or `timeout` passes
  // (DEADLINE_EXCEEDED, with what the last check saw). A server that is not
  // up yet counts as not ready. CANCELLED after cancel_all().
  grpc::Status wait_ready(const std::string& service, std::chrono::milliseconds timeout);

  // Cancels every call in progress (generate included) and ends any
  // wait_ready. Safe from any thread; calls started afterwards run normally.
  void cancel_all();

  const std::shared_ptr<grpc::Channel>& channel() const { return channel_; }

 private:
  class Call;  // a ClientContext registered for cancel_all while it lives
  // Deadline, API key and metadata on `context`; INVALID_ARGUMENT for bad
  // metadata.
  grpc::Status prepare(grpc::ClientContext& context, const CallOptions& options) const;

  std::shared_ptr<grpc::Channel> channel_;
  std::string api_key_;
  std::unique_ptr<v1::Generation::Stub> generation_;
  std::unique_ptr<v1::Control::Stub> control_;
  std::unique_ptr<v1::Registry::Stub> registry_;
  std::unique_ptr<grpc::health::v1::Health::Stub> health_;

  std::mutex mutex_;
  std::condition_variable cancelled_;
  std::set<grpc::ClientContext*> calls_;
  uint64_t cancel_epoch_ = 0;  // bumped by cancel_all
};

// The name of a status code ("DEADLINE_EXCEEDED"), for messages.
const char* status_code_name(grpc::StatusCode code);
const char* status_code_name(int code);

}  // namespace xq::serve
