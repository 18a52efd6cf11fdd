#include "launch/serve/coordinator.h"

#include <grpcpp/health_check_service_interface.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <thread>

#include "kernels/error.h"
#include "launch/serve/admission_queue.h"
#include "launch/serve/circuit_breaker.h"
#include "launch/serve/client.h"
#include "launch/serve/generate_request.h"
#include "launch/serve/metrics.h"
#include "launch/serve/request_metrics.h"
#include "launch/serve/standard_services.h"
#include "launch/serve/write_watch.h"

namespace xq::serve {
namespace {

using Clock = std::chrono::steady_clock;

constexpr const char* kReadyService = "xquant.v1.Generation";
// Missed heartbeats (registered replicas) or failed polls in a row after
// which a replica is down.
constexpr int kMissedBeforeDown = 3;

double seconds_between(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration<double>(to - from).count();
}

std::string metadata_value(const grpc::ServerContext& context, const char* key) {
  const auto& metadata = context.client_metadata();
  const auto found = metadata.find(key);
  if (found == metadata.end()) return {};
  return std::string(found->second.data(), found->second.size());
}

// A replica call's failure that says nothing about the request itself: the
// replica is gone, reset the connection or broke. The request may succeed
// elsewhere.
bool is_replica_failure(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::UNAVAILABLE:
    case grpc::StatusCode::UNKNOWN:
    case grpc::StatusCode::INTERNAL:
    case grpc::StatusCode::ABORTED:
    case grpc::StatusCode::DATA_LOSS:
      return true;
    default:
      return false;
  }
}

// One call to a replica in progress, registered with its replica so that
// marking the replica down can cancel the calls that have not streamed.
struct Attempt {
  grpc::ClientContext* context = nullptr;
  bool relayed = false;  // a delta reached the client: no reroute after this
  bool reroute = false;  // cancelled because its replica went down
};

struct Replica {
  Replica(std::string replica_id, std::string replica_address, bool is_static,
          const Security& security, int failures_to_open, std::chrono::milliseconds cooldown)
      : id(std::move(replica_id)),
        address(std::move(replica_address)),
        static_replica(is_static),
        channel(make_channel(address, security)),
        generation(v1::Generation::NewStub(channel)),
        control(v1::Control::NewStub(channel)),
        breaker(failures_to_open, cooldown) {}

  std::string id;
  const std::string address;
  const bool static_replica;
  const std::shared_ptr<grpc::Channel> channel;
  const std::unique_ptr<v1::Generation::Stub> generation;
  const std::unique_ptr<v1::Control::Stub> control;

  // The rest under the coordinator's lock.
  CircuitBreaker breaker;
  bool has_info = false;
  v1::ServerInfo info;
  bool needs_info = true;
  bool has_load = false;
  v1::Load load;
  bool registered = false;
  Clock::time_point last_heartbeat{};
  int failed_polls = 0;
  bool streak_has_call_failure = false;  // see on_load
  bool down = false;
  bool removed = false;  // replaced in the table; no more polls or traffic
  bool poll_in_flight = false;
  int32_t in_flight = 0;
  uint64_t dispatched = 0;  // requests routed here so far (a sequence number)
  // Requests routed here that its last load may not show: (sequence, tokens).
  std::deque<std::pair<uint64_t, int64_t>> unreported;
  std::set<Attempt*> attempts;

  double bytes_per_token() const {
    double tightest = 0;
    if (has_info)
      for (double b : info.bytes_per_token()) tightest = std::max(tightest, b);
    return tightest;
  }
  // Requests that may wait in the replica's own queue: enough to keep its
  // batch full between polls, few enough that the coordinator's queue (with
  // its priorities and balancing) holds the rest.
  int32_t queue_limit() const {
    const int32_t max_sequences = has_info ? info.max_sequences() : 0;
    return std::max(2, max_sequences / 2);
  }
  bool saturated() const {
    const int64_t waiting =
        (has_load ? load.queued_requests() : 0) + static_cast<int64_t>(unreported.size());
    return waiting >= queue_limit();
  }
  int64_t unreported_tokens() const {
    int64_t tokens = 0;
    for (const auto& [sequence, count] : unreported) tokens += count;
    return tokens;
  }
};

// A Generate request between admission and the end of its last attempt.
struct Waiter {
  uint64_t id = 0;
  int64_t priority = 0;
  int64_t tokens = 0;
  RoutingPolicy policy = RoutingPolicy::kLeastLoad;
  std::string routing_key;
  std::set<std::string> excluded;  // replicas that failed it
  Clock::time_point arrived{};

  enum class State { kQueued, kAssigned, kNoReplica } state = State::kQueued;
  std::condition_variable changed;
  std::shared_ptr<Replica> replica;  // when assigned
  uint64_t sequence = 0;             // its entry in replica->unreported
  bool trial = false;                // holds the replica's half-open trial
  Clock::time_point dispatched{};
  RequestObservation* observation = nullptr;
};

// The labels a replica's series carry.
MetricLabels replica_labels(const Replica& replica) {
  return {{"model", replica.has_info ? replica.info.model().name() : ""},
          {"replica", replica.id},
          {"cache_mode", replica.has_info ? replica.info.cache_mode() : ""}};
}

}  // namespace

struct Coordinator::Impl {
  explicit Impl(CoordinatorOptions o)
      : options(std::move(o)),
        queue(QueueLimits{options.max_queued_requests, options.max_queued_tokens}),
        watch(options.stall_timeout) {
    declare_request_metrics(metrics);
    declare_replica_metrics(metrics);
    metrics.declare_gauge("xq:coordinator_queued_requests",
                          "Requests in the coordinator's queue, waiting for a replica.");
    metrics.declare_gauge("xq:coordinator_queued_tokens",
                          "Tokens (prompt bound + max_tokens) of the coordinator's queue.");
  }

  class GenerationService final : public v1::Generation::Service {
   public:
    explicit GenerationService(Impl* impl) : impl_(impl) {}
    grpc::Status Generate(grpc::ServerContext* context, const v1::GenerateRequest* request,
                          grpc::ServerWriter<v1::GenerateResponse>* writer) override {
      return impl_->generate(context, *request, writer);
    }
    grpc::Status Tokenize(grpc::ServerContext* context, const v1::TokenizeRequest* request,
                          v1::TokenizeResponse* response) override {
      return impl_->unary(context, [&](v1::Generation::Stub& stub, grpc::ClientContext* c) {
        return stub.Tokenize(c, *request, response);
      });
    }
    grpc::Status GetModelInfo(grpc::ServerContext* context, const v1::GetModelInfoRequest* request,
                              v1::ModelInfo* response) override {
      return impl_->unary(context, [&](v1::Generation::Stub& stub, grpc::ClientContext* c) {
        return stub.GetModelInfo(c, *request, response);
      });
    }

   private:
    Impl* impl_;
  };

  class RegistryService final : public v1::Registry::Service {
   public:
    explicit RegistryService(Impl* impl) : impl_(impl) {}
    grpc::Status Register(grpc::ServerContext* context, const v1::RegisterRequest* request,
                          v1::RegisterResponse* response) override {
      return impl_->register_replica(context, *request, response);
    }
    grpc::Status ListReplicas(grpc::ServerContext* context, const v1::ListReplicasRequest*,
                              v1::ListReplicasResponse* response) override {
      if (grpc::Status key = check_api_key(*context, impl_->options.security.api_key); !key.ok())
        return key;
      *response = impl_->list_replicas();
      return grpc::Status::OK;
    }

   private:
    Impl* impl_;
  };

  // ------------------------------------------------------------ Generate

  grpc::Status generate(grpc::ServerContext* context, const v1::GenerateRequest& in,
                        grpc::ServerWriter<v1::GenerateResponse>* stream) {
    RequestObservation observation(&metrics, Clock::now());
    observation.set_labels(unrouted_labels());
    ObservedWriter writer(stream, observation);
    grpc::Status status = generate(context, in, &writer, observation);
    observation.finish(status);
    return status;
  }

  // Series for a request no replica has taken: the model's name, no replica.
  MetricLabels unrouted_labels() const {
    std::lock_guard<std::mutex> lock(mutex);
    std::string model;
    for (const auto& [id, replica] : replicas)
      if (replica->has_info) model = replica->info.model().name();
    return {{"model", model}, {"replica", ""}, {"cache_mode", ""}};
  }

  grpc::Status generate(grpc::ServerContext* context, const v1::GenerateRequest& in,
                        grpc::ServerWriterInterface<v1::GenerateResponse>* writer,
                        RequestObservation& observation) {
    if (grpc::Status key = check_api_key(*context, options.security.api_key); !key.ok()) return key;
    Waiter waiter;
    waiter.policy = options.routing;
    if (std::string name = metadata_value(*context, "x-routing-policy"); !name.empty()) {
      const std::optional<RoutingPolicy> policy = parse_routing_policy(name);
      if (!policy)
        return {grpc::StatusCode::INVALID_ARGUMENT, "x-routing-policy: unknown policy '" + name +
                                                        "' (one of " + routing_policy_names() +
                                                        ")"};
      waiter.policy = *policy;
    }
    if (std::string priority = metadata_value(*context, "x-priority"); !priority.empty()) {
      char* end = nullptr;
      errno = 0;
      const long long value = std::strtoll(priority.c_str(), &end, 10);
      if (*end != '\0' || errno != 0)
        return {grpc::StatusCode::INVALID_ARGUMENT,
                "x-priority must be an integer, got '" + priority + "'"};
      waiter.priority = value;
    }
    waiter.routing_key = metadata_value(*context, "x-routing-key");
    if (grpc::Status fields = check_generate_fields(in); !fields.ok()) return fields;

    v1::GenerateRequest request = in;
    // One id for every attempt, so a replica's Abort and the client's logs
    // agree whichever replica ran it.
    if (request.request_id().empty()) request.set_request_id(new_request_id());
    waiter.tokens = prompt_token_bound(request) + request.sampling().max_tokens();
    waiter.arrived = Clock::now();
    waiter.observation = &observation;

    {
      std::lock_guard<std::mutex> lock(mutex);
      if (stopping) return {grpc::StatusCode::UNAVAILABLE, "the coordinator is shutting down"};
      if (!any_replica_up_locked()) return {grpc::StatusCode::UNAVAILABLE, "no replica is ready"};
      waiter.id = next_waiter_id++;
      // A request that finds a replica at once never counts against the
      // queue's limits.
      if (queue.size() > 0 || !route_locked(waiter, Clock::now())) {
        if (std::string full = queue.full_reason(waiter.tokens); !full.empty()) {
          const int64_t seconds = retry_after_seconds(
              queue.size(), completions.per_second(Clock::now()), replicas_up_locked());
          context->AddTrailingMetadata("retry-after", std::to_string(seconds));
          return {grpc::StatusCode::RESOURCE_EXHAUSTED,
                  full + "; retry after " + std::to_string(seconds) + " s"};
        }
        queue.push(waiter.id, waiter.priority, waiter.tokens);
        waiters[waiter.id] = &waiter;
        dispatch_locked();
      }
    }

    for (int attempt = 1;; ++attempt) {
      if (grpc::Status waited = wait_for_replica(context, waiter); !waited.ok()) return waited;
      if (waiter.state == Waiter::State::kNoReplica)
        return end_with_error(context, writer, request.request_id(), grpc::StatusCode::UNAVAILABLE,
                              "no replica is up to run the request", true);
      grpc::Status status;
      const std::string replica_id = waiter.replica->id;
      if (!forward(context, writer, request, waiter, &status)) return status;
      if (attempt >= options.max_attempts)
        return end_with_error(context, writer, request.request_id(), grpc::StatusCode::UNAVAILABLE,
                              "the request failed on " + std::to_string(attempt) +
                                  " replicas before it started (last: " + replica_id + ")",
                              true);
      std::lock_guard<std::mutex> lock(mutex);
      waiter.excluded.insert(replica_id);
      waiter.state = Waiter::State::kQueued;
      if (stopping) {
        waiter.state = Waiter::State::kNoReplica;
        continue;
      }
      queue.push_front(waiter.id, waiter.priority, waiter.tokens);
      waiters[waiter.id] = &waiter;
      dispatch_locked();
    }
  }

  grpc::Status end_with_error(grpc::ServerContext* context,
                              grpc::ServerWriterInterface<v1::GenerateResponse>* writer,
                              const std::string& request_id, grpc::StatusCode code,
                              const std::string& message, bool retryable) {
    v1::GenerateResponse response;
    response.set_request_id(request_id);
    response.mutable_error()->set_code(code);
    response.mutable_error()->set_message(message);
    response.mutable_error()->set_retryable(retryable);
    WriteWatch::Guard guard = watch.writing(context);
    writer->Write(response);
    return grpc::Status::OK;
  }

  // Until the request is assigned a replica (OK), the queue gives up on it
  // (OK, state kNoReplica) or its client cancels or its deadline passes.
  grpc::Status wait_for_replica(grpc::ServerContext* context, Waiter& waiter) {
    const auto deadline = context->deadline();
    std::unique_lock<std::mutex> lock(mutex);
    while (waiter.state == Waiter::State::kQueued) {
      grpc::Status gave_up = grpc::Status::OK;
      if (context->IsCancelled())
        gave_up = {grpc::StatusCode::CANCELLED, "cancelled while queued"};
      else if (std::chrono::system_clock::now() >= deadline)
        gave_up = {grpc::StatusCode::DEADLINE_EXCEEDED, "the deadline passed while queued"};
      else if (stopping)
        gave_up = {grpc::StatusCode::UNAVAILABLE, "the coordinator is shutting down"};
      if (!gave_up.ok()) {
        queue.remove(waiter.id);
        waiters.erase(waiter.id);
        return gave_up;
      }
      // Cancellation has no wake-up of its own in the synchronous API.
      waiter.changed.wait_for(lock, std::chrono::milliseconds(20));
    }
    return grpc::Status::OK;
  }

  // Runs one attempt. False: the request has ended (`*status` is what the
  // handler returns). True: it failed before streaming and goes elsewhere.
  bool forward(grpc::ServerContext* context,
               grpc::ServerWriterInterface<v1::GenerateResponse>* writer,
               const v1::GenerateRequest& request, Waiter& waiter, grpc::Status* status) {
    const std::shared_ptr<Replica> replica = waiter.replica;
    std::unique_ptr<grpc::ClientContext> call = grpc::ClientContext::FromServerContext(*context);
    add_api_key(*call, options.security.api_key);
    // A channel still backing off from a restarted replica would fail the
    // call at once; waiting is bounded by the client's deadline and by the
    // replica being marked down, which cancels calls that have not streamed.
    call->set_wait_for_ready(true);
    Attempt attempt;
    attempt.context = call.get();
    {
      std::lock_guard<std::mutex> lock(mutex);
      replica->attempts.insert(&attempt);
      // Marked down (or replaced) between routing and here: the cancel that
      // came with it missed this call, which could wait for a connection
      // to the lost replica until the client's deadline.
      if (replica->down || replica->removed) {
        attempt.reroute = true;
        call->TryCancel();
      }
    }
    const double coordinator_queue = seconds_between(waiter.arrived, waiter.dispatched);
    {
      std::lock_guard<std::mutex> lock(mutex);
      waiter.observation->set_labels(replica_labels(*replica));
    }

    enum class Verdict { kNone, kSuccess, kFailure } verdict = Verdict::kNone;
    bool terminal = false, client_gone = false, failed_before_delta = false;
    std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader =
        replica->generation->Generate(call.get(), request);
    v1::GenerateResponse message;
    bool left_early = false;  // stopped reading before the replica ended the stream
    while (reader->Read(&message)) {
      left_early = true;
      const bool retryable_error = message.has_error() && message.error().retryable();
      if (verdict == Verdict::kNone)
        verdict = retryable_error ? Verdict::kFailure : Verdict::kSuccess;
      {
        std::lock_guard<std::mutex> lock(mutex);
        if (attempt.reroute) break;
        if (retryable_error && !attempt.relayed) {
          failed_before_delta = true;
          break;
        }
        if (message.has_delta()) attempt.relayed = true;
      }
      if (message.has_finished()) {
        v1::Timings* timings = message.mutable_finished()->mutable_timings();
        timings->set_queue_seconds(timings->queue_seconds() + coordinator_queue);
        if (message.finished().replica_id().empty())
          message.mutable_finished()->set_replica_id(replica->id);
      }
      if (message.has_error() && message.error().message().find(replica->id) == std::string::npos)
        message.mutable_error()->set_message(message.error().message() + " (replica " +
                                             replica->id + ")");
      terminal = message.has_finished() || message.has_error();
      bool written;
      {
        WriteWatch::Guard guard = watch.writing(context);
        written = writer->Write(message);
      }
      if (!written) {
        client_gone = true;
        break;
      }
      if (terminal) break;
      left_early = false;
    }
    // Ends the replica's side of a call left early (the replica aborts it).
    // Not after the stream ended: a cancel before Finish would replace the
    // replica's status with CANCELLED.
    if (left_early && !terminal) call->TryCancel();
    const grpc::Status replica_status = reader->Finish();
    const bool relayed = attempt.relayed;
    const bool rerouted_by_down = attempt.reroute;
    client_gone = client_gone || context->IsCancelled();

    // What the call says about the replica, and what happens to the request.
    bool again = false;
    *status = grpc::Status::OK;
    // Set when the stream broke after a delta: the client still needs its
    // one terminal message, whatever (even nothing) the status says.
    std::optional<std::string> mid_stream_failure;
    if (terminal) {
      // The stream ended as the protocol says.
    } else if (client_gone) {
      *status = {grpc::StatusCode::CANCELLED, "the client cancelled the request"};
    } else if (rerouted_by_down) {
      verdict = Verdict::kFailure;
      again = true;
    } else if (failed_before_delta) {
      again = true;
    } else if (replica_status.ok() || is_replica_failure(replica_status.error_code()) ||
               replica_status.error_code() == grpc::StatusCode::CANCELLED) {
      // Ended without a terminal message: it broke (a CANCELLED the client
      // did not ask for came from the replica's side).
      verdict = Verdict::kFailure;
      if (!relayed)
        again = true;
      else
        mid_stream_failure = replica_status.ok() ? "its stream ended without a terminal message"
                                                 : replica_status.error_message();
    } else if (!relayed && replica_status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED &&
               call->GetServerTrailingMetadata().count("retry-after") != 0) {
      // The replica's own queue is full: no fault, but another may have room.
      again = true;
    } else if (!relayed) {
      // The request's own fault (a bad field, too long, unsupported, its
      // deadline): the client gets the replica's status unchanged, and the
      // replica did its job.
      *status = replica_status;
      if (verdict == Verdict::kNone) verdict = Verdict::kSuccess;
    } else {
      mid_stream_failure = replica_status.error_message();
    }
    if (mid_stream_failure) {
      const bool retryable = verdict == Verdict::kFailure;
      end_with_error(
          context, writer, request.request_id(),
          retryable ? grpc::StatusCode::UNAVAILABLE : replica_status.error_code(),
          "replica " + replica->id + " failed after streaming began: " +
              (mid_stream_failure->empty() ? status_code_name(replica_status.error_code())
                                           : *mid_stream_failure),
          retryable);
    }

    if (verdict == Verdict::kFailure)
      std::fprintf(stderr, "coordinator: request %s failed on replica %s (%s: %s)%s\n",
                   request.request_id().c_str(), replica->id.c_str(),
                   status_code_name(replica_status.error_code()),
                   replica_status.error_message().c_str(), again ? "; routing it elsewhere" : "");
    std::lock_guard<std::mutex> lock(mutex);
    replica->attempts.erase(&attempt);
    const Clock::time_point now = Clock::now();
    if (verdict == Verdict::kSuccess) {
      replica->breaker.on_success();
      replica->streak_has_call_failure = false;
    } else if (verdict == Verdict::kFailure) {
      replica->breaker.on_failure(now);
      replica->streak_has_call_failure = true;
    } else if (waiter.trial)
      replica->breaker.release_trial();
    waiter.trial = false;
    release_locked(waiter);
    if (terminal && message.has_finished()) completions.record(now);
    dispatch_locked();
    return again;
  }

  // The request no longer occupies its replica.
  void release_locked(Waiter& waiter) {
    Replica& replica = *waiter.replica;
    --replica.in_flight;
    auto& unreported = replica.unreported;
    for (auto it = unreported.begin(); it != unreported.end(); ++it)
      if (it->first == waiter.sequence) {
        unreported.erase(it);
        break;
      }
    waiter.replica.reset();
  }

  // ------------------------------------------------------------ routing

  // Needs the replica's ServerInfo too: its shape feeds the policies, and a
  // static replica takes its id from it (so the id is settled before any
  // request holds the replica).
  bool eligible_locked(Replica& replica, Clock::time_point now) const {
    return !replica.removed && !replica.down && replica.has_info && replica.has_load &&
           replica.load.ready() && replica.breaker.available(now) && !replica.saturated();
  }

  RouteCandidate candidate_of(const Replica& replica) const {
    RouteCandidate c;
    c.id = replica.id;
    c.free_cache_bytes = replica.load.free_cache_bytes();
    c.queued_tokens = replica.load.queued_tokens();
    c.unreported_tokens = replica.unreported_tokens();
    c.bytes_per_token = replica.bytes_per_token();
    return c;
  }

  // Assigns `waiter` a replica when one is eligible for it.
  bool route_locked(Waiter& waiter, Clock::time_point now) {
    std::vector<RouteCandidate> candidates;
    std::vector<Replica*> chosen_from;
    // Replicas that failed this request are skipped while another is up.
    int32_t up_not_excluded = 0;
    for (auto& [id, replica] : replicas)
      if (!replica->removed && !replica->down && waiter.excluded.count(id) == 0) ++up_not_excluded;
    const bool honour_exclusions = up_not_excluded > 0;
    for (auto& [id, replica] : replicas) {
      if (!eligible_locked(*replica, now)) continue;
      if (honour_exclusions && waiter.excluded.count(id) != 0) continue;
      candidates.push_back(candidate_of(*replica));
      chosen_from.push_back(replica.get());
    }
    const int pick = router.pick(waiter.policy, candidates, waiter.routing_key);
    if (pick < 0) return false;
    Replica& replica = *chosen_from[pick];
    // A half-open replica's one trial goes to this request.
    const bool half_open = replica.breaker.state(now) == CircuitBreaker::State::kHalfOpen;
    replica.breaker.try_acquire(now);
    waiter.trial = half_open;
    waiter.replica = replicas.at(replica.id);
    waiter.sequence = ++replica.dispatched;
    replica.unreported.emplace_back(waiter.sequence, waiter.tokens);
    ++replica.in_flight;
    waiter.dispatched = now;
    waiter.state = Waiter::State::kAssigned;
    return true;
  }

  // Gives queued requests replicas, in admission order, while any is
  // eligible.
  void dispatch_locked() {
    const Clock::time_point now = Clock::now();
    std::vector<uint64_t> order;
    for (const AdmissionQueue::Entry& entry : queue) order.push_back(entry.id);
    for (uint64_t id : order) {
      bool any = false;
      for (auto& [replica_id, replica] : replicas) any = any || eligible_locked(*replica, now);
      if (!any) return;
      Waiter& waiter = *waiters.at(id);
      if (!route_locked(waiter, now)) continue;
      queue.remove(id);
      waiters.erase(id);
      waiter.changed.notify_all();
    }
  }

  int32_t replicas_up_locked() const {
    int32_t up = 0;
    for (const auto& [id, replica] : replicas) up += !replica->removed && !replica->down;
    return up;
  }
  bool any_replica_up_locked() const { return replicas_up_locked() > 0; }

  // ------------------------------------------------------------ Tokenize, GetModelInfo

  template <typename Call>
  grpc::Status unary(grpc::ServerContext* context, Call call) {
    if (grpc::Status key = check_api_key(*context, options.security.api_key); !key.ok()) return key;
    std::vector<std::shared_ptr<Replica>> ready;
    {
      std::lock_guard<std::mutex> lock(mutex);
      const Clock::time_point now = Clock::now();
      for (auto& [id, replica] : replicas)
        if (!replica->removed && !replica->down && replica->has_load && replica->load.ready() &&
            replica->breaker.available(now))
          ready.push_back(replica);
      std::sort(ready.begin(), ready.end(), [this](const auto& a, const auto& b) {
        return less_loaded(candidate_of(*a), candidate_of(*b));
      });
    }
    for (const std::shared_ptr<Replica>& replica : ready) {
      std::unique_ptr<grpc::ClientContext> forwarded =
          grpc::ClientContext::FromServerContext(*context);
      add_api_key(*forwarded, options.security.api_key);
      const grpc::Status status = call(*replica->generation, forwarded.get());
      if (!is_replica_failure(status.error_code()) || context->IsCancelled()) return status;
      std::lock_guard<std::mutex> lock(mutex);
      replica->breaker.on_failure(Clock::now());
      replica->streak_has_call_failure = true;
    }
    return {grpc::StatusCode::UNAVAILABLE, "no replica is ready"};
  }

  // ------------------------------------------------------------ Registry

  grpc::Status register_replica(grpc::ServerContext* context, const v1::RegisterRequest& request,
                                v1::RegisterResponse* response) {
    if (grpc::Status key = check_api_key(*context, options.security.api_key); !key.ok()) return key;
    const std::string& address = request.address();
    if (address.empty() || address.find(':') == std::string::npos)
      return {grpc::StatusCode::INVALID_ARGUMENT,
              "address: give the host:port the coordinator dials, got '" + address + "'"};
    const std::string id =
        request.info().replica_id().empty() ? address : request.info().replica_id();
    {
      std::lock_guard<std::mutex> lock(mutex);
      if (stopping) return {grpc::StatusCode::UNAVAILABLE, "the coordinator is shutting down"};
      // Another id at this address is an earlier process there, gone.
      std::vector<std::string> stale;
      for (auto& [other_id, replica] : replicas)
        if (other_id != id && replica->address == address) stale.push_back(other_id);
      for (const std::string& other_id : stale) remove_replica_locked(other_id);

      auto found = replicas.find(id);
      if (found != replicas.end() && found->second->address != address) {
        remove_replica_locked(id);
        found = replicas.end();
      }
      std::shared_ptr<Replica> replica;
      if (found == replicas.end()) {
        replica = add_replica_locked(id, address, false);
      } else {
        replica = found->second;
        if (replica->down) {
          // Back after missed heartbeats or failed polls, perhaps restarted.
          replica->down = false;
          replica->failed_polls = 0;
          replica->breaker.reset();
          replica->needs_info = true;
          // Its last load is the old process's: no traffic until a poll
          // of the new one answers.
          replica->has_load = false;
        }
      }
      replica->registered = true;
      replica->last_heartbeat = Clock::now();
      if (request.has_info() && !replica->has_info) {
        replica->info = request.info();
        replica->has_info = true;
      }
    }
    response->set_heartbeat_ms(static_cast<int32_t>(options.heartbeat.count()));
    update_health();
    return grpc::Status::OK;
  }

  std::shared_ptr<Replica> add_replica_locked(const std::string& id, const std::string& address,
                                              bool is_static) {
    auto replica = std::make_shared<Replica>(id, address, is_static, options.security,
                                             options.breaker_failures, options.breaker_cooldown);
    replicas[id] = replica;
    router.add_member(id);
    return replica;
  }

  void remove_replica_locked(const std::string& id) {
    auto found = replicas.find(id);
    if (found == replicas.end()) return;
    // Nothing polls or marks down a replica out of the table: its calls
    // still waiting for a connection move now.
    mark_down_locked(*found->second);
    found->second->removed = true;
    replicas.erase(found);
    router.remove_member(id);
  }

  v1::ListReplicasResponse list_replicas() {
    v1::ListReplicasResponse response;
    std::lock_guard<std::mutex> lock(mutex);
    const Clock::time_point now = Clock::now();
    for (auto& [id, replica] : replicas) {
      v1::ReplicaState* state = response.add_replicas();
      state->set_replica_id(id);
      state->set_address(replica->address);
      state->set_state(replica->down ? "down" : breaker_state_name(replica->breaker.state(now)));
      if (replica->has_load) *state->mutable_load() = replica->load;
      state->set_in_flight(replica->in_flight);
    }
    response.set_queued_requests(queue.size());
    response.set_queued_tokens(queue.tokens());
    return response;
  }

  // ------------------------------------------------------------ polling

  std::chrono::milliseconds poll_deadline() const {
    return std::clamp(2 * options.poll_interval, std::chrono::milliseconds(250),
                      std::chrono::milliseconds(2000));
  }

  void poll_loop() {
    std::unique_lock<std::mutex> lock(mutex);
    while (!stopping) {
      std::vector<PollStart> polls = tick_locked();
      lock.unlock();
      // Outside the lock: a callback may run on this thread.
      for (PollStart& poll : polls) start_poll(poll);
      update_health();
      lock.lock();
      stop_changed.wait_for(lock, options.poll_interval, [this] { return stopping; });
    }
    // Polls still in flight hold `this`.
    polls_done.wait(lock, [this] { return polls_in_flight == 0; });
  }

  struct PollStart {
    std::shared_ptr<Replica> replica;
    bool info = false;
    uint64_t dispatched_before = 0;
  };

  // Marks replicas down, fails the queue when none is up, routes what it
  // can; returns the polls to start.
  std::vector<PollStart> tick_locked() {
    std::vector<PollStart> polls;
    const Clock::time_point now = Clock::now();
    for (auto& [id, replica] : replicas) {
      const bool missed_heartbeats =
          replica->registered &&
          now - replica->last_heartbeat > kMissedBeforeDown * options.heartbeat;
      const bool down = missed_heartbeats || replica->failed_polls >= kMissedBeforeDown;
      if (down && !replica->down) mark_down_locked(*replica);
      replica->down = down;
      if (!replica->poll_in_flight && replica->breaker.try_acquire(now)) {
        replica->poll_in_flight = true;
        polls_in_flight += replica->needs_info ? 2 : 1;
        polls.push_back({replica, replica->needs_info, replica->dispatched});
      }
    }
    if (!any_replica_up_locked()) {
      for (auto& [id, waiter] : waiters) {
        queue.remove(id);
        waiter->state = Waiter::State::kNoReplica;
        waiter->changed.notify_all();
      }
      waiters.clear();
    }
    dispatch_locked();
    return polls;
  }

  // Calls that have not streamed are cancelled and go elsewhere; those
  // that have go on while the replica still answers.
  void mark_down_locked(Replica& replica) {
    for (Attempt* attempt : replica.attempts)
      if (!attempt->relayed) {
        attempt->reroute = true;
        attempt->context->TryCancel();
      }
  }

  struct LoadPoll {
    grpc::ClientContext context;
    v1::GetLoadRequest request;
    v1::Load load;
    uint64_t dispatched_before = 0;
  };
  struct InfoPoll {
    grpc::ClientContext context;
    v1::GetServerInfoRequest request;
    v1::ServerInfo info;
  };

  void start_poll(const PollStart& start) {
    const std::shared_ptr<Replica>& replica = start.replica;
    const auto deadline = std::chrono::system_clock::now() + poll_deadline();
    if (start.info) {
      auto poll = std::make_shared<InfoPoll>();
      poll->context.set_deadline(deadline);
      poll->context.set_wait_for_ready(true);
      add_api_key(poll->context, options.security.api_key);
      replica->control->async()->GetServerInfo(
          &poll->context, &poll->request, &poll->info,
          [this, poll, replica](grpc::Status status) { on_info(replica, *poll, status); });
    }
    auto poll = std::make_shared<LoadPoll>();
    poll->context.set_deadline(deadline);
    // Within the deadline, wait for a connection rather than fail on a
    // channel still backing off from a replica that has just restarted.
    poll->context.set_wait_for_ready(true);
    add_api_key(poll->context, options.security.api_key);
    poll->dispatched_before = start.dispatched_before;
    replica->control->async()->GetLoad(
        &poll->context, &poll->request, &poll->load,
        [this, poll, replica](grpc::Status status) { on_load(replica, *poll, status); });
  }

  void on_load(const std::shared_ptr<Replica>& replica, LoadPoll& poll,
               const grpc::Status& status) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      replica->poll_in_flight = false;
      if (status.ok()) {
        replica->load = poll.load;
        replica->has_load = true;
        replica->failed_polls = 0;
        // A poll answered says the replica is up, not that its calls work:
        // it ends a streak of poll failures, or a half-open trial, but not
        // a streak that holds a failed call.
        if (!replica->streak_has_call_failure ||
            replica->breaker.state(Clock::now()) == CircuitBreaker::State::kHalfOpen) {
          replica->breaker.on_success();
          replica->streak_has_call_failure = false;
        }
        if (replica->down && !(replica->registered && Clock::now() - replica->last_heartbeat >
                                                          kMissedBeforeDown * options.heartbeat))
          replica->down = false;
        auto& unreported = replica->unreported;
        while (!unreported.empty() && unreported.front().first <= poll.dispatched_before)
          unreported.pop_front();
      } else {
        ++replica->failed_polls;
        replica->breaker.on_failure(Clock::now());
        if (replica->failed_polls >= kMissedBeforeDown && !replica->down) {
          mark_down_locked(*replica);
          replica->down = true;
        }
      }
      if (!replica->removed) dispatch_locked();
    }
    update_health();
    // Last: once no poll is in flight the coordinator may be destroyed.
    std::lock_guard<std::mutex> lock(mutex);
    --polls_in_flight;
    polls_done.notify_all();
  }

  void on_info(const std::shared_ptr<Replica>& replica, InfoPoll& poll,
               const grpc::Status& status) {
    std::lock_guard<std::mutex> lock(mutex);
    if (status.ok() && !replica->removed) {
      replica->info = poll.info;
      replica->has_info = true;
      replica->needs_info = false;
      const std::string& reported = poll.info.replica_id();
      // A static replica is known by its address until it names itself.
      if (replica->static_replica && !reported.empty() && reported != replica->id) {
        const std::string old_id = replica->id;
        replicas.erase(old_id);
        router.remove_member(old_id);
        if (replicas.count(reported) != 0) {
          replica->removed = true;  // it registered itself under that id already
        } else {
          replica->id = reported;
          replicas[reported] = replica;
          router.add_member(reported);
        }
      }
    }
    --polls_in_flight;
    polls_done.notify_all();
  }

  // The registry's text with the gauges set from the replica table now.
  std::string metrics_text() {
    {
      std::lock_guard<std::mutex> lock(mutex);
      for (const char* name :
           {"xq:num_requests_running", "xq:num_requests_waiting", "xq:cache_usage_perc",
            "xq:cache_bytes_used", "xq:cache_bytes_total", "xq:replica_up"})
        metrics.clear(name);
      const Clock::time_point now = Clock::now();
      for (const auto& [id, replica] : replicas) {
        if (replica->removed) continue;
        const MetricLabels labels = replica_labels(*replica);
        const bool up = !replica->down && replica->has_load && replica->load.ready() &&
                        replica->breaker.state(now) != CircuitBreaker::State::kOpen;
        metrics.set("xq:replica_up", labels, up ? 1 : 0);
        if (!replica->has_load) continue;
        record_load(metrics, labels, replica->load);
      }
      metrics.set("xq:coordinator_queued_requests", {}, static_cast<double>(queue.size()));
      metrics.set("xq:coordinator_queued_tokens", {}, static_cast<double>(queue.tokens()));
    }
    return metrics.render();
  }

  void update_health() {
    std::lock_guard<std::mutex> health_lock(health_mutex);
    bool ready = false;
    {
      std::lock_guard<std::mutex> lock(mutex);
      const Clock::time_point now = Clock::now();
      for (auto& [id, replica] : replicas)
        ready = ready || (!replica->down && replica->has_load && replica->load.ready() &&
                          replica->breaker.state(now) != CircuitBreaker::State::kOpen);
      if (stopping) ready = false;
    }
    if (server != nullptr && ready != health_ready) {
      server->GetHealthCheckService()->SetServingStatus(kReadyService, ready);
      health_ready = ready;
    }
  }

  CoordinatorOptions options;
  mutable std::mutex mutex;
  std::condition_variable stop_changed;
  std::condition_variable polls_done;
  bool stopping = false;
  int polls_in_flight = 0;
  Router router;
  AdmissionQueue queue;
  CompletionRate completions;
  std::map<std::string, std::shared_ptr<Replica>> replicas;
  std::map<uint64_t, Waiter*> waiters;  // the queued ones
  uint64_t next_waiter_id = 1;

  std::mutex health_mutex;
  bool health_ready = false;

  WriteWatch watch;
  MetricsRegistry metrics;
  std::unique_ptr<GenerationService> generation_service;
  std::unique_ptr<RegistryService> registry_service;
  std::unique_ptr<grpc::Server> server;
  std::thread poller;
  bool stopped = false;
};

Coordinator::Coordinator(CoordinatorOptions options)
    : impl_(std::make_unique<Impl>(std::move(options))) {}

Coordinator::~Coordinator() {
  shutdown();
}

void Coordinator::start() {
  Impl& impl = *impl_;
  if (impl.server) throw Error("coordinator: already started");
  {
    std::lock_guard<std::mutex> lock(impl.mutex);
    for (const std::string& address : impl.options.static_replicas)
      if (impl.replicas.count(address) == 0) impl.add_replica_locked(address, address, true);
  }
  enable_standard_services(impl.options.reflection);
  grpc::ServerBuilder builder;
  builder.AddListeningPort(impl.options.listen, server_credentials(impl.options.security), &port_);
  builder.SetMaxReceiveMessageSize(impl.options.max_request_bytes);
  impl.generation_service = std::make_unique<Impl::GenerationService>(&impl);
  impl.registry_service = std::make_unique<Impl::RegistryService>(&impl);
  builder.RegisterService(impl.generation_service.get());
  builder.RegisterService(impl.registry_service.get());
  impl.server = builder.BuildAndStart();
  if (!impl.server || port_ == 0)
    throw Error("coordinator: cannot listen on '" + impl.options.listen + "'");
  impl.server->GetHealthCheckService()->SetServingStatus("", true);
  impl.server->GetHealthCheckService()->SetServingStatus(kReadyService, false);
  impl.poller = std::thread([&impl] { impl.poll_loop(); });
}

void Coordinator::shutdown(std::chrono::milliseconds grace) {
  Impl& impl = *impl_;
  {
    std::lock_guard<std::mutex> lock(impl.mutex);
    if (impl.stopped) return;
    impl.stopped = true;
    impl.stopping = true;
    for (auto& [id, waiter] : impl.waiters) waiter->changed.notify_all();
  }
  impl.stop_changed.notify_all();
  if (impl.server) {
    impl.server->GetHealthCheckService()->SetServingStatus("", false);
    impl.server->GetHealthCheckService()->SetServingStatus(kReadyService, false);
    impl.server->Shutdown(std::chrono::system_clock::now() + grace);
  }
  if (impl.poller.joinable()) impl.poller.join();
  if (impl.server) impl.server->Wait();
}

std::string Coordinator::metrics_text() const {
  return impl_->metrics_text();
}

void Coordinator::count_rejected(const std::string& reason) {
  MetricLabels labels = impl_->unrouted_labels();
  labels.emplace_back("reason", reason);
  impl_->metrics.add("xq:request_rejected_total", labels);
}

void Coordinator::wait() {
  if (impl_->server) impl_->server->Wait();
}

v1::ListReplicasResponse Coordinator::list_replicas() const {
  return impl_->list_replicas();
}

std::shared_ptr<grpc::Channel> Coordinator::in_process_channel() {
  if (!impl_->server) throw Error("coordinator: in_process_channel() before start()");
  return impl_->server->InProcessChannel(grpc::ChannelArguments());
}

}  // namespace xq::serve
