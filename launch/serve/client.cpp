#include "launch/serve/client.h"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <thread>

namespace xq::serve {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

bool valid_metadata_key(const std::string& key) {
  if (key.empty() || key.rfind("grpc-", 0) == 0) return false;
  return std::all_of(key.begin(), key.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '_' || c == '.';
  });
}

bool valid_metadata_value(const std::string& value) {
  return std::all_of(value.begin(), value.end(), [](char c) { return c >= 0x20 && c < 0x7f; });
}

}  // namespace

// Registers a context for cancel_all while it lives. A call that starts
// after cancel_all is not affected; one registered before is.
class Client::Call {
 public:
  explicit Call(Client& client) : client_(client) {
    std::lock_guard<std::mutex> lock(client_.mutex_);
    client_.calls_.insert(&context);
  }
  ~Call() {
    std::lock_guard<std::mutex> lock(client_.mutex_);
    client_.calls_.erase(&context);
  }
  Call(const Call&) = delete;
  Call& operator=(const Call&) = delete;

  grpc::ClientContext context;

 private:
  Client& client_;
};

Client::Client(const std::string& address, const Security& security, int max_message_bytes)
    : api_key_(security.api_key) {
  channel_ = make_channel(address, security, max_message_bytes);
  generation_ = v1::Generation::NewStub(channel_);
  control_ = v1::Control::NewStub(channel_);
  registry_ = v1::Registry::NewStub(channel_);
  health_ = grpc::health::v1::Health::NewStub(channel_);
}

Client::Client(std::shared_ptr<grpc::Channel> channel, std::string api_key)
    : channel_(std::move(channel)), api_key_(std::move(api_key)) {
  generation_ = v1::Generation::NewStub(channel_);
  control_ = v1::Control::NewStub(channel_);
  registry_ = v1::Registry::NewStub(channel_);
  health_ = grpc::health::v1::Health::NewStub(channel_);
}

Client::~Client() = default;

grpc::Status Client::prepare(grpc::ClientContext& context, const CallOptions& options) const {
  std::vector<std::pair<std::string, std::string>> metadata;
  if (!api_key_.empty()) metadata.emplace_back("authorization", "Bearer " + api_key_);
  if (!options.routing_key.empty()) metadata.emplace_back("x-routing-key", options.routing_key);
  if (options.priority) metadata.emplace_back("x-priority", std::to_string(*options.priority));
  if (!options.routing_policy.empty())
    metadata.emplace_back("x-routing-policy", options.routing_policy);
  metadata.insert(metadata.end(), options.metadata.begin(), options.metadata.end());
  // gRPC rejects (or asserts on) malformed metadata deep inside the call;
  // naming the bad entry here is clearer.
  for (const auto& [key, value] : metadata) {
    if (!valid_metadata_key(key))
      return {grpc::StatusCode::INVALID_ARGUMENT,
              "metadata key '" + key + "' must be lowercase [a-z0-9._-] and not start with grpc-"};
    if (!valid_metadata_value(value))
      return {grpc::StatusCode::INVALID_ARGUMENT,
              "metadata '" + key + "' must have a printable ASCII value"};
  }
  for (const auto& [key, value] : metadata) context.AddMetadata(key, value);
  // gRPC takes deadlines on the system clock only.
  if (options.timeout.count() > 0)
    context.set_deadline(std::chrono::system_clock::now() + options.timeout);
  return grpc::Status::OK;
}

GenerateResult Client::generate(const v1::GenerateRequest& request, const CallOptions& options,
                                const DeltaHandler& on_delta) {
  return generate_stream(request, options, [&](const v1::GenerateResponse& response) {
    if (!on_delta || response.event_case() != v1::GenerateResponse::kDelta) return true;
    return on_delta(response.delta());
  });
}

GenerateResult Client::generate_stream(const v1::GenerateRequest& request,
                                       const CallOptions& options,
                                       const ResponseHandler& on_response) {
  GenerateResult result;
  const Clock::time_point start = Clock::now();
  Call call(*this);
  result.status = prepare(call.context, options);
  if (!result.status.ok()) return result;

  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader =
      generation_->Generate(&call.context, request);
  v1::GenerateResponse response;
  bool terminal = false;
  std::string protocol_error;
  while (reader->Read(&response)) {
    // Once cancelled, the rest is drained unseen until Read fails.
    if (result.cancelled_by_handler) continue;
    if (terminal) {
      if (protocol_error.empty()) protocol_error = "the stream went on after its terminal message";
      continue;
    }
    if (result.request_id.empty()) result.request_id = response.request_id();
    switch (response.event_case()) {
      case v1::GenerateResponse::kDelta: {
        const v1::Delta& delta = response.delta();
        if (result.first_token_seconds < 0 && delta.token_ids_size() > 0)
          result.first_token_seconds = seconds_since(start);
        result.token_ids.insert(result.token_ids.end(), delta.token_ids().begin(),
                                delta.token_ids().end());
        result.text += delta.text();
        break;
      }
      case v1::GenerateResponse::kFinished:
        terminal = true;
        result.finished = response.finished();
        result.text += response.finished().text();
        break;
      case v1::GenerateResponse::kError:
        terminal = true;
        result.error = response.error();
        break;
      default:
        // An event this client does not know (a newer server): skipped.
        break;
    }
    if (on_response && !on_response(response)) {
      result.cancelled_by_handler = true;
      call.context.TryCancel();
    }
  }
  result.status = reader->Finish();
  result.total_seconds = seconds_since(start);
  const auto& trailing = call.context.GetServerTrailingMetadata();
  if (const auto found = trailing.find("retry-after"); found != trailing.end()) {
    const std::string text(found->second.data(), found->second.size());
    char* end = nullptr;
    const long seconds = std::strtol(text.c_str(), &end, 10);
    if (!text.empty() && *end == '\0' && seconds >= 0 && seconds <= INT32_MAX)
      result.retry_after_seconds = static_cast<int32_t>(seconds);
  }
  if (result.status.ok() && !protocol_error.empty())
    result.status = {grpc::StatusCode::INTERNAL, protocol_error};
  else if (result.status.ok() && !terminal)
    result.status = {grpc::StatusCode::INTERNAL,
                     "the stream ended without a finished or error message"};
  return result;
}

grpc::Status Client::tokenize(const v1::TokenizeRequest& request, v1::TokenizeResponse* response,
                              const CallOptions& options) {
  Call call(*this);
  if (grpc::Status status = prepare(call.context, options); !status.ok()) return status;
  return generation_->Tokenize(&call.context, request, response);
}

grpc::Status Client::model_info(v1::ModelInfo* info, const CallOptions& options) {
  Call call(*this);
  if (grpc::Status status = prepare(call.context, options); !status.ok()) return status;
  return generation_->GetModelInfo(&call.context, v1::GetModelInfoRequest(), info);
}

grpc::Status Client::server_info(v1::ServerInfo* info, const CallOptions& options) {
  Call call(*this);
  if (grpc::Status status = prepare(call.context, options); !status.ok()) return status;
  return control_->GetServerInfo(&call.context, v1::GetServerInfoRequest(), info);
}

grpc::Status Client::load(v1::Load* load, const CallOptions& options) {
  Call call(*this);
  if (grpc::Status status = prepare(call.context, options); !status.ok()) return status;
  return control_->GetLoad(&call.context, v1::GetLoadRequest(), load);
}

grpc::Status Client::abort(const std::string& request_id, bool* found, const CallOptions& options) {
  Call call(*this);
  if (grpc::Status status = prepare(call.context, options); !status.ok()) return status;
  v1::AbortRequest request;
  request.set_request_id(request_id);
  v1::AbortResponse response;
  grpc::Status status = control_->Abort(&call.context, request, &response);
  if (found) *found = status.ok() && response.found();
  return status;
}

grpc::Status Client::list_replicas(v1::ListReplicasResponse* replicas, const CallOptions& options) {
  Call call(*this);
  if (grpc::Status status = prepare(call.context, options); !status.ok()) return status;
  return registry_->ListReplicas(&call.context, v1::ListReplicasRequest(), replicas);
}

grpc::Status Client::health_check(const std::string& service, ServingStatus* status,
                                  std::chrono::milliseconds timeout) {
  Call call(*this);
  CallOptions options;
  options.timeout = timeout;
  if (grpc::Status prepared = prepare(call.context, options); !prepared.ok()) return prepared;
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse response;
  grpc::Status result = health_->Check(&call.context, request, &response);
  if (status)
    *status = result.ok() ? response.status() : grpc::health::v1::HealthCheckResponse::UNKNOWN;
  return result;
}

grpc::Status Client::wait_ready(const std::string& service, std::chrono::milliseconds timeout) {
  const Clock::time_point end = Clock::now() + timeout;
  uint64_t epoch;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    epoch = cancel_epoch_;
  }
  std::string last = "no check finished";
  while (true) {
    const Clock::time_point now = Clock::now();
    if (now >= end) break;
    // Each check waits for the connection (a server still starting is not
    // an error here) but no longer than a second, so that a changed status
    // is seen soon after it changes.
    ServingStatus serving = grpc::health::v1::HealthCheckResponse::UNKNOWN;
    const auto check_timeout = std::min<std::chrono::milliseconds>(
        std::chrono::milliseconds(1000),
        std::chrono::duration_cast<std::chrono::milliseconds>(end - now) +
            std::chrono::milliseconds(1));
    grpc::Status status;
    {
      Call call(*this);
      CallOptions options;
      options.timeout = check_timeout;
      status = prepare(call.context, options);
      if (!status.ok()) return status;
      call.context.set_wait_for_ready(true);
      grpc::health::v1::HealthCheckRequest request;
      request.set_service(service);
      grpc::health::v1::HealthCheckResponse response;
      status = health_->Check(&call.context, request, &response);
      if (status.ok()) serving = response.status();
    }
    if (status.ok() && serving == grpc::health::v1::HealthCheckResponse::SERVING)
      return grpc::Status::OK;
    if (status.ok())
      last = grpc::health::v1::HealthCheckResponse::ServingStatus_Name(serving);
    else if (status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED)
      last = "no answer (is the server up?)";
    else
      last = std::string(status_code_name(status.error_code())) + ": " + status.error_message();

    std::unique_lock<std::mutex> lock(mutex_);
    if (cancel_epoch_ != epoch) return {grpc::StatusCode::CANCELLED, "cancelled"};
    // A quick answer (NOT_SERVING, NOT_FOUND, refused) is polled again
    // after a pause rather than at once.
    cancelled_.wait_until(lock, std::min(end, Clock::now() + std::chrono::milliseconds(100)),
                          [&] { return cancel_epoch_ != epoch; });
    if (cancel_epoch_ != epoch) return {grpc::StatusCode::CANCELLED, "cancelled"};
  }
  char waited[32];
  std::snprintf(waited, sizeof(waited), "%g", std::chrono::duration<double>(timeout).count());
  return {grpc::StatusCode::DEADLINE_EXCEEDED,
          "'" + service + "' not serving after " + waited + " s (last check: " + last + ")"};
}

void Client::cancel_all() {
  std::lock_guard<std::mutex> lock(mutex_);
  ++cancel_epoch_;
  for (grpc::ClientContext* context : calls_) context->TryCancel();
  cancelled_.notify_all();
}

const char* status_code_name(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK:
      return "OK";
    case grpc::StatusCode::CANCELLED:
      return "CANCELLED";
    case grpc::StatusCode::UNKNOWN:
      return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT:
      return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND:
      return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS:
      return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED:
      return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION:
      return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED:
      return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE:
      return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED:
      return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL:
      return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE:
      return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS:
      return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED:
      return "UNAUTHENTICATED";
    default:
      return "UNKNOWN_CODE";
  }
}

const char* status_code_name(int code) {
  if (code < 0 || code > static_cast<int>(grpc::StatusCode::UNAUTHENTICATED)) return "UNKNOWN_CODE";
  return status_code_name(static_cast<grpc::StatusCode>(code));
}

}  // namespace xq::serve
