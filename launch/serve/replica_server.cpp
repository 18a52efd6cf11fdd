#include "launch/serve/replica_server.h"

#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <filesystem>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>

#include "kernels/error.h"
#include "launch/serve/generate_request.h"
#include "launch/serve/metrics.h"
#include "launch/serve/replica_registration.h"
#include "launch/serve/request_metrics.h"
#include "launch/serve/standard_services.h"
#include "launch/serve/write_watch.h"
#include "runtime/communicator.h"
#include "xquant/v1/xquant.grpc.pb.h"

namespace xq::serve {
namespace {

using Clock = std::chrono::steady_clock;
constexpr const char* kGenerationService = "xquant.v1.Generation";
// How often a waiting handler looks at its call's cancellation.
constexpr std::chrono::milliseconds kHandlerPoll{50};
// How long a failing replica waits for handlers to send their error
// messages before it ends.
constexpr std::chrono::milliseconds kFlushErrors{2000};

double seconds_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// One Generate call as the scheduler thread and its handler share it.
struct Call {
  std::string request_id;
  Request request;
  std::mutex mutex;
  std::condition_variable changed;
  // Under mutex:
  bool submitted = false;  // the scheduler thread has called submit()
  std::string rejected;    // non-empty: submit() failed it at once
  std::deque<RequestEvent> events;
  std::optional<v1::Error> error;  // a failure of the replica, not of the request
  bool finished = false;           // its finished event is in `events` (or error is set)

  void deliver(std::vector<RequestEvent>& batch) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      if (error) return;  // the replica failed it first: that is its end
      for (RequestEvent& e : batch) {
        if (e.kind == RequestEvent::Kind::kFinished) finished = true;
        events.push_back(std::move(e));
      }
    }
    changed.notify_all();
  }
  void fail(grpc::StatusCode code, const std::string& message, bool retryable) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      if (finished) return;
      v1::Error e;
      e.set_code(static_cast<int32_t>(code));
      e.set_message(message);
      e.set_retryable(retryable);
      error = std::move(e);
      finished = true;
    }
    changed.notify_all();
  }
};

// Marks the steps (and gathers) for the watchdog and notes a lost rank, so
// that the scheduler's "engine error" for that step is not mistaken for one.
class WatchedExecutor final : public StepExecutor {
 public:
  WatchedExecutor(StepExecutor& inner, std::atomic<int64_t>& busy_since)
      : inner_(inner), busy_since_(busy_since) {}
  void execute(const StepPlan& plan, float* logits) override {
    Busy busy(busy_since_);
    try {
      inner_.execute(plan, logits);
    } catch (const LostRank& e) {
      lost_ = e.what();
      throw;
    }
  }
  Engine& engine() override { return inner_.engine(); }
  const std::string& lost() const { return lost_; }
  void set_lost(const std::string& why) { lost_ = why; }

  // Holds busy_since at now while it lives.
  struct Busy {
    explicit Busy(std::atomic<int64_t>& since) : since_(since) {
      since_.store(Clock::now().time_since_epoch().count());
    }
    ~Busy() { since_.store(0); }
    std::atomic<int64_t>& since_;
  };

 private:
  StepExecutor& inner_;
  std::atomic<int64_t>& busy_since_;
  std::string lost_;
};

}  // namespace

class ReplicaServer::Impl final : public v1::Generation::Service, public v1::Control::Service {
 public:
  Impl(StepExecutor& executor, ReplicaOptions options, CacheGatherer gather);
  ~Impl() override;

  void start();
  int run();
  void begin_drain();
  void shutdown();

  grpc::Status Generate(grpc::ServerContext* context, const v1::GenerateRequest* request,
                        grpc::ServerWriter<v1::GenerateResponse>* writer) override;
  grpc::Status Tokenize(grpc::ServerContext* context, const v1::TokenizeRequest* request,
                        v1::TokenizeResponse* response) override;
  grpc::Status GetModelInfo(grpc::ServerContext* context, const v1::GetModelInfoRequest* request,
                            v1::ModelInfo* response) override;
  grpc::Status GetLoad(grpc::ServerContext* context, const v1::GetLoadRequest* request,
                       v1::Load* response) override;
  grpc::Status GetServerInfo(grpc::ServerContext* context, const v1::GetServerInfoRequest* request,
                             v1::ServerInfo* response) override;
  grpc::Status Abort(grpc::ServerContext* context, const v1::AbortRequest* request,
                     v1::AbortResponse* response) override;

  v1::ServerInfo server_info() const;
  v1::Load load() const;
  std::string metrics_text();
  std::string failure() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return failure_;
  }
  int port() const { return port_; }

 private:
  enum class Phase { kStarting, kServing, kDraining, kFailed };

  // Scheduler thread.
  void take_inbox(std::unique_lock<std::mutex>& lock);
  void route(std::vector<RequestEvent> events);
  void submit_canary();
  void gather_cache();
  void publish_stats();
  bool lost_rank();
  parallel::RankCache local_rank_cache() const;
  void warm_up();

  // Any thread.
  void set_ready(bool ready);
  // Ends the replica's service: every live request gets `code` (retryable),
  // Generation NOT_SERVING for good.
  void fail_replica(const std::string& reason, grpc::StatusCode code);
  void wait_for_handlers(std::chrono::milliseconds limit);
  grpc::Status admission_status() const;
  void watchdog();
  void request_cancel(const std::shared_ptr<Call>& call);
  grpc::Status generate(grpc::ServerContext* context, const v1::GenerateRequest* request,
                        grpc::ServerWriterInterface<v1::GenerateResponse>* writer);
  // Runs one scheduler step, timing it for the step metrics.
  void step_and_measure();
  bool write(grpc::ServerContext* context,
             grpc::ServerWriterInterface<v1::GenerateResponse>* writer,
             const v1::GenerateResponse& message);

  StepExecutor& inner_;
  ReplicaOptions options_;
  CacheGatherer gather_;
  std::atomic<int64_t> busy_since_{0};
  WatchedExecutor executor_;
  Engine& engine_;
  std::unique_ptr<Scheduler> scheduler_;  // the scheduler thread's only
  PromptLimits limits_;
  WriteWatch write_watch_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  std::string advertise_;
  std::unique_ptr<Registration> registration_;

  mutable std::mutex mutex_;
  std::condition_variable inbox_changed_;
  std::condition_variable handlers_changed_;
  Phase phase_ = Phase::kStarting;
  std::string failure_;
  std::vector<std::shared_ptr<Call>> submissions_;
  std::vector<std::shared_ptr<Call>> cancels_;
  // Calls from registration to their end, by request id.
  std::unordered_map<std::string, std::shared_ptr<Call>> by_name_;
  int active_handlers_ = 0;
  Clock::time_point drain_started_;
  // Published by the scheduler thread for GetLoad.
  SchedulerStats stats_;
  std::vector<parallel::RankCache> ranks_;
  std::vector<double> bytes_per_token_;
  Clock::time_point last_progress_ = Clock::now();

  // Scheduler thread only.
  std::unordered_map<RequestId, std::shared_ptr<Call>> by_id_;
  RequestId canary_id_ = 0;
  bool canary_live_ = false;
  Request canary_request_;
  std::atomic<int64_t> canary_since_{0};  // 0: no canary in flight
  std::string canary_failure_;

  // Watchdog.
  std::mutex watchdog_mutex_;
  std::condition_variable watchdog_stop_changed_;
  bool watchdog_stop_ = false;
  std::thread watchdog_thread_;

  MetricsRegistry metrics_;
  MetricLabels metric_labels() const {
    return {{"model", options_.model_name},
            {"replica", options_.replica_id},
            {"cache_mode", options_.cache_mode}};
  }
};

ReplicaServer::Impl::Impl(StepExecutor& executor, ReplicaOptions options, CacheGatherer gather)
    : inner_(executor),
      options_(std::move(options)),
      gather_(std::move(gather)),
      executor_(inner_, busy_since_),
      engine_(executor.engine()),
      write_watch_(options_.stall_timeout) {
  if (options_.canary_interval.count() > 0)
    options_.scheduler.reserved_slot_tokens = kCanarySlotTokens;
  if (options_.step_timeout.count() <= 0) throw Error("replica: --step-timeout must be > 0");
  scheduler_ = std::make_unique<Scheduler>(executor_, options_.scheduler);
  options_.scheduler = scheduler_->options();  // max_sequences resolved
  limits_.context = engine_.max_tokens();
  limits_.vocab = engine_.model().config().vocab_size;
  limits_.max_prompt_tokens = options_.max_prompt_tokens;
  // A greedy token after a short prompt: the whole engine runs, little cache.
  const Tokenizer& tokenizer = engine_.model().tokenizer();
  canary_request_.prompt = tokenizer.encode("Once", tokenizer.add_bos());
  if (canary_request_.prompt.empty()) canary_request_.prompt = {0};
  if (static_cast<int32_t>(canary_request_.prompt.size()) > kCanarySlotTokens - 1)
    canary_request_.prompt.resize(static_cast<size_t>(kCanarySlotTokens - 1));
  canary_request_.max_tokens = 1;
  canary_request_.temperature = 0;
  canary_request_.ignore_eos = true;
  declare_request_metrics(metrics_);
  declare_replica_metrics(metrics_);
  declare_step_metrics(metrics_);
  if (!options_.on_hung)
    options_.on_hung = [](const std::string& reason) {
      std::fprintf(stderr, "error: replica hung: %s; exiting so that it can be restarted\n",
                   reason.c_str());
      std::fflush(stderr);
      std::_Exit(1);
    };
}

ReplicaServer::Impl::~Impl() {
  {
    std::lock_guard<std::mutex> lock(watchdog_mutex_);
    watchdog_stop_ = true;
  }
  watchdog_stop_changed_.notify_all();
  if (watchdog_thread_.joinable()) watchdog_thread_.join();
  if (registration_) registration_->stop();
  shutdown();
}

void ReplicaServer::Impl::start() {
  warn_unless_loopback(options_.listen, "replica");
  enable_standard_services(options_.reflection);
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options_.listen, server_credentials(options_.security), &port_);
  builder.SetMaxReceiveMessageSize(options_.max_request_bytes);
  builder.RegisterService(static_cast<v1::Generation::Service*>(this));
  builder.RegisterService(static_cast<v1::Control::Service*>(this));
  server_ = builder.BuildAndStart();
  if (!server_ || port_ == 0) throw Error("replica: cannot listen on " + options_.listen);
  server_->GetHealthCheckService()->SetServingStatus("", true);
  server_->GetHealthCheckService()->SetServingStatus(kGenerationService, false);
  advertise_ = options_.advertise;
  if (advertise_.empty()) {
    // The listen address, with the port it got when it asked for any.
    advertise_ = options_.listen;
    const size_t colon = advertise_.rfind(':');
    if (colon != std::string::npos)
      advertise_ = advertise_.substr(0, colon + 1) + std::to_string(port_);
  }
  if (options_.replica_id.empty()) options_.replica_id = advertise_;
  watchdog_thread_ = std::thread([this] { watchdog(); });
  std::fprintf(stderr, "replica: listening on %s (advertised as %s)%s\n", options_.listen.c_str(),
               advertise_.c_str(), options_.security.api_key.empty() ? "" : ", API key required");
}

void ReplicaServer::Impl::shutdown() {
  if (!server_) return;
  server_->GetHealthCheckService()->SetServingStatus(false);
  server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  server_->Wait();
  server_.reset();
}

void ReplicaServer::Impl::set_ready(bool ready) {
  if (server_) server_->GetHealthCheckService()->SetServingStatus(kGenerationService, ready);
}

void ReplicaServer::Impl::begin_drain() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (phase_ == Phase::kDraining || phase_ == Phase::kFailed) return;
    phase_ = Phase::kDraining;
    drain_started_ = Clock::now();
  }
  set_ready(false);
  inbox_changed_.notify_all();
}

grpc::Status ReplicaServer::Impl::admission_status() const {
  switch (phase_) {
    case Phase::kServing:
      return grpc::Status::OK;
    case Phase::kStarting:
      return {grpc::StatusCode::UNAVAILABLE, "the replica is warming up"};
    case Phase::kDraining:
      return {grpc::StatusCode::UNAVAILABLE, "the replica is shutting down"};
    case Phase::kFailed:
      break;
  }
  return {grpc::StatusCode::UNAVAILABLE, "the replica is unhealthy: " + failure_};
}

void ReplicaServer::Impl::fail_replica(const std::string& reason, grpc::StatusCode code) {
  std::vector<std::shared_ptr<Call>> live;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (phase_ == Phase::kFailed) return;
    phase_ = Phase::kFailed;
    failure_ = reason;
    for (auto& [name, call] : by_name_) live.push_back(call);
    by_name_.clear();
  }
  set_ready(false);
  for (const auto& call : live) call->fail(code, "replica failed: " + reason, true);
  inbox_changed_.notify_all();
}

void ReplicaServer::Impl::wait_for_handlers(std::chrono::milliseconds limit) {
  std::unique_lock<std::mutex> lock(mutex_);
  handlers_changed_.wait_for(lock, limit, [this] { return active_handlers_ == 0; });
}

void ReplicaServer::Impl::watchdog() {
  const int64_t limit = std::chrono::duration_cast<Clock::duration>(options_.step_timeout).count();
  std::unique_lock<std::mutex> lock(watchdog_mutex_);
  for (;;) {
    if (watchdog_stop_changed_.wait_for(lock, std::chrono::milliseconds(100),
                                        [this] { return watchdog_stop_; }))
      return;
    const int64_t now = Clock::now().time_since_epoch().count();
    const int64_t busy = busy_since_.load(), canary = canary_since_.load();
    std::string reason;
    const double timeout_s = std::chrono::duration<double>(options_.step_timeout).count();
    char text[160];
    if (busy != 0 && now - busy > limit) {
      std::snprintf(text, sizeof text, "a step has run for more than %.1f s (--step-timeout)",
                    timeout_s);
      reason = text;
    } else if (canary != 0 && now - canary > limit) {
      std::snprintf(text, sizeof text,
                    "the canary request did not finish within %.1f s (--step-timeout)", timeout_s);
      reason = text;
    }
    if (reason.empty()) continue;
    lock.unlock();
    fail_replica(reason, grpc::StatusCode::UNAVAILABLE);
    wait_for_handlers(kFlushErrors);
    options_.on_hung(reason);
    return;
  }
}

// ------------------------------------------------------------ scheduler thread

void ReplicaServer::Impl::route(std::vector<RequestEvent> events) {
  // Batches per call, so that a handler wakes once for what one step made.
  std::map<RequestId, std::vector<RequestEvent>> per_call;
  for (RequestEvent& e : events) {
    if (canary_live_ && e.id == canary_id_) {
      if (e.kind == RequestEvent::Kind::kFinished) {
        canary_live_ = false;
        canary_since_.store(0);
        if (e.reason == FinishReason::kFailed || e.usage.completion_tokens != 1)
          canary_failure_ =
              "the canary request failed: " +
              (e.message.empty() ? std::string(finish_reason_name(e.reason)) : e.message);
        std::lock_guard<std::mutex> lock(mutex_);
        last_progress_ = Clock::now();
      }
      continue;
    }
    per_call[e.id].push_back(std::move(e));
  }
  for (auto& [id, batch] : per_call) {
    auto it = by_id_.find(id);
    if (it == by_id_.end()) continue;
    const std::shared_ptr<Call> call = it->second;
    const bool ends = batch.back().kind == RequestEvent::Kind::kFinished;
    call->deliver(batch);
    if (ends) {
      by_id_.erase(it);
      std::lock_guard<std::mutex> lock(mutex_);
      auto named = by_name_.find(call->request_id);
      if (named != by_name_.end() && named->second == call) by_name_.erase(named);
    }
  }
}

void ReplicaServer::Impl::take_inbox(std::unique_lock<std::mutex>& lock) {
  std::vector<std::shared_ptr<Call>> submissions, cancels;
  submissions.swap(submissions_);
  cancels.swap(cancels_);
  lock.unlock();
  for (const auto& call : submissions) {
    const RequestId id = scheduler_->submit(call->request);
    std::vector<RequestEvent> events = scheduler_->take_events();
    std::string rejected;
    for (auto it = events.begin(); it != events.end(); ++it)
      if (it->id == id) {  // only a failure comes at once
        rejected = it->message.empty() ? "the request was refused" : it->message;
        events.erase(it);
        break;
      }
    if (rejected.empty()) by_id_.emplace(id, call);
    route(std::move(events));
    {
      std::lock_guard<std::mutex> call_lock(call->mutex);
      call->submitted = true;
      call->rejected = rejected;
    }
    call->changed.notify_all();
    if (!rejected.empty()) {
      std::lock_guard<std::mutex> names(mutex_);
      auto named = by_name_.find(call->request_id);
      if (named != by_name_.end() && named->second == call) by_name_.erase(named);
    }
  }
  for (const auto& call : cancels)
    for (auto& [id, live] : by_id_)
      if (live == call) {
        scheduler_->cancel(id);
        break;
      }
  route(scheduler_->take_events());
  lock.lock();
}

void ReplicaServer::Impl::submit_canary() {
  canary_id_ = scheduler_->submit_reserved(canary_request_);
  canary_live_ = true;
  canary_since_.store(Clock::now().time_since_epoch().count());
  route(scheduler_->take_events());  // a refusal ends it at once
}

parallel::RankCache ReplicaServer::Impl::local_rank_cache() const {
  parallel::RankCache cache = parallel::engine_rank_cache(engine_);
  if (const auto* transformer = dynamic_cast<const TransformerEngine*>(&engine_))
    cache.bytes_per_token = transformer->cache().bytes_per_token();
  return cache;
}

bool ReplicaServer::Impl::lost_rank() {
  return !executor_.lost().empty();
}

void ReplicaServer::Impl::gather_cache() {
  std::vector<parallel::RankCache> ranks;
  try {
    WatchedExecutor::Busy busy(busy_since_);
    ranks = gather_ ? gather_() : std::vector<parallel::RankCache>{local_rank_cache()};
  } catch (const LostRank& e) {
    executor_.set_lost(e.what());
    return;
  }
  std::lock_guard<std::mutex> lock(mutex_);
  ranks_ = std::move(ranks);
  if (bytes_per_token_.empty())
    for (const parallel::RankCache& r : ranks_) bytes_per_token_.push_back(r.bytes_per_token);
}

void ReplicaServer::Impl::publish_stats() {
  const SchedulerStats stats = scheduler_->stats();
  std::lock_guard<std::mutex> lock(mutex_);
  if (stats.steps != stats_.steps) last_progress_ = Clock::now();
  stats_ = stats;
}

void ReplicaServer::Impl::step_and_measure() {
  const int64_t before = scheduler_->stats().steps;
  const Clock::time_point start = Clock::now();
  scheduler_->step();
  const double seconds = seconds_between(start, Clock::now());
  if (scheduler_->stats().steps == before) return;
  // A one-token segment is a decode; longer ones are prompt chunks (a
  // one-token prompt remainder counts as a decode too).
  bool decode = false, prefill = false;
  for (const Segment& segment : scheduler_->last_plan().segments)
    (segment.n == 1 ? decode : prefill) = true;
  const char* phase = decode && prefill ? "mixed" : prefill ? "prefill" : "decode";
  MetricLabels labels = metric_labels();
  metrics_.observe("xq:iteration_tokens", labels, scheduler_->last_plan().token_count());
  labels.emplace_back("phase", phase);
  metrics_.observe("xq:step_duration_seconds", labels, seconds);
}

std::string ReplicaServer::Impl::metrics_text() {
  const v1::Load now = load();
  const MetricLabels labels = metric_labels();
  metrics_.set("xq:replica_up", labels, now.ready() ? 1 : 0);
  record_load(metrics_, labels, now);
  return metrics_.render();
}

void ReplicaServer::Impl::warm_up() {
  gather_cache();
  if (options_.canary_interval.count() == 0) return;
  submit_canary();
  while (canary_live_ && !lost_rank()) {
    scheduler_->step();
    route(scheduler_->take_events());
  }
  while (!scheduler_->idle() && !lost_rank()) scheduler_->step();  // give its slot back
  if (!canary_failure_.empty()) throw Error("replica: warm-up: " + canary_failure_);
}

int ReplicaServer::Impl::run() {
  warm_up();
  if (!lost_rank()) gather_cache();
  if (!lost_rank()) {
    publish_stats();
    bool serving = false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (phase_ == Phase::kStarting) phase_ = Phase::kServing;
      serving = phase_ == Phase::kServing;
      // Under the lock, so that a drain or failure beginning now (which
      // sets NOT_SERVING once it has changed the phase) comes after it.
      set_ready(serving);
    }
    // Not after a drain or a failure during warm-up: it never serves, so it
    // does not announce itself.
    if (serving && !options_.coordinator.empty()) {
      registration_ = std::make_unique<Registration>(options_.coordinator, options_.security,
                                                     advertise_, [this] { return server_info(); });
      registration_->start();
    }
    if (serving) std::fprintf(stderr, "replica %s: ready\n", options_.replica_id.c_str());
  }
  Clock::time_point next_gather = Clock::now() + options_.idle_gather_interval;
  Clock::time_point next_canary = Clock::now() + options_.canary_interval;
  int status = 0;
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    take_inbox(lock);
    if (phase_ == Phase::kFailed) {
      status = lost_rank() ? 1 : 2;
      break;
    }
    if (lost_rank()) {
      lock.unlock();
      fail_replica("a rank was lost: " + executor_.lost(), grpc::StatusCode::UNAVAILABLE);
      lock.lock();
      continue;
    }
    if (phase_ == Phase::kDraining) {
      const bool timed_out = Clock::now() - drain_started_ > options_.drain_timeout;
      if (by_id_.empty() && submissions_.empty()) break;
      if (timed_out) {
        std::vector<std::shared_ptr<Call>> live;
        for (auto& [name, call] : by_name_) live.push_back(call);
        lock.unlock();
        for (const auto& call : live)
          call->fail(grpc::StatusCode::UNAVAILABLE,
                     "the replica shut down before the request finished", true);
        lock.lock();
        break;
      }
    }
    const Phase phase = phase_;
    lock.unlock();
    const auto now = Clock::now();
    if (phase == Phase::kServing && options_.canary_interval.count() > 0 && !canary_live_ &&
        now >= next_canary) {
      submit_canary();
      next_canary = now + options_.canary_interval;
    }
    if (!canary_failure_.empty()) {
      const std::string reason = canary_failure_;
      fail_replica(reason, grpc::StatusCode::UNAVAILABLE);
      wait_for_handlers(kFlushErrors);
      options_.on_hung(reason);
      lock.lock();
      continue;
    }
    bool stepped = false;
    if (!scheduler_->idle()) {
      const int64_t before = scheduler_->stats().steps;
      step_and_measure();
      stepped = scheduler_->stats().steps != before;
      // A lost rank failed the step's requests as an engine error; they get
      // the replica's retryable error instead, before any event is routed.
      if (lost_rank())
        fail_replica("a rank was lost: " + executor_.lost(), grpc::StatusCode::UNAVAILABLE);
      else
        route(scheduler_->take_events());
    }
    if (!lost_rank() && (stepped || Clock::now() >= next_gather)) {
      gather_cache();
      next_gather = Clock::now() + options_.idle_gather_interval;
    }
    publish_stats();
    lock.lock();
    if (stepped || lost_rank()) continue;
    // Nothing ran: sleep until a request, a cancel, the next gather or canary.
    Clock::time_point wake = next_gather;
    if (options_.canary_interval.count() > 0 && !canary_live_) wake = std::min(wake, next_canary);
    if (phase_ == Phase::kDraining) wake = std::min(wake, drain_started_ + options_.drain_timeout);
    inbox_changed_.wait_until(lock, wake, [this] {
      return !submissions_.empty() || !cancels_.empty() || phase_ == Phase::kFailed;
    });
  }
  lock.unlock();
  if (registration_) registration_->stop();
  if (status != 0) wait_for_handlers(kFlushErrors);
  return status;
}

// ------------------------------------------------------------ handlers

bool ReplicaServer::Impl::write(grpc::ServerContext* context,
                                grpc::ServerWriterInterface<v1::GenerateResponse>* writer,
                                const v1::GenerateResponse& message) {
  WriteWatch::Guard guard = write_watch_.writing(context);
  return writer->Write(message);
}

void ReplicaServer::Impl::request_cancel(const std::shared_ptr<Call>& call) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    cancels_.push_back(call);
  }
  inbox_changed_.notify_all();
}

grpc::Status ReplicaServer::Impl::Generate(grpc::ServerContext* context,
                                           const v1::GenerateRequest* request,
                                           grpc::ServerWriter<v1::GenerateResponse>* stream) {
  RequestObservation observation(&metrics_, Clock::now());
  observation.set_labels(metric_labels());
  ObservedWriter writer(stream, observation);
  const grpc::Status status = generate(context, request, &writer);
  observation.finish(status);
  return status;
}

grpc::Status ReplicaServer::Impl::generate(
    grpc::ServerContext* context, const v1::GenerateRequest* request,
    grpc::ServerWriterInterface<v1::GenerateResponse>* writer) {
  grpc::Status status = check_api_key(*context, options_.security.api_key);
  if (!status.ok()) return status;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    status = admission_status();
  }
  if (!status.ok()) return status;
  auto call = std::make_shared<Call>();
  status = to_request(*request, engine_.model().tokenizer(), limits_, &call->request);
  if (!status.ok()) return status;
  const auto& metadata = context->client_metadata();
  if (auto it = metadata.find("x-priority"); it != metadata.end()) {
    const std::string text(it->second.data(), it->second.size());
    char* end = nullptr;
    errno = 0;
    const long value = std::strtol(text.c_str(), &end, 10);
    if (text.empty() || *end != '\0' || errno != 0 || value < std::numeric_limits<int32_t>::min() ||
        value > std::numeric_limits<int32_t>::max())
      return {grpc::StatusCode::INVALID_ARGUMENT,
              "x-priority must be an integer, got '" + text + "'"};
    call->request.priority = static_cast<int32_t>(value);
  }
  call->request_id = request->request_id().empty() ? new_request_id() : request->request_id();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    status = admission_status();
    if (!status.ok()) return status;
    if (!by_name_.emplace(call->request_id, call).second)
      return {grpc::StatusCode::ALREADY_EXISTS,
              "request_id '" + call->request_id + "' is already running here"};
    submissions_.push_back(call);
    ++active_handlers_;
  }
  inbox_changed_.notify_all();
  struct HandlerCount {
    Impl& impl;
    ~HandlerCount() {
      {
        std::lock_guard<std::mutex> lock(impl.mutex_);
        --impl.active_handlers_;
      }
      impl.handlers_changed_.notify_all();
    }
  } count{*this};

  // Until the scheduler has taken it: a refusal is a status, not a stream.
  {
    std::unique_lock<std::mutex> lock(call->mutex);
    while (!call->submitted && !call->error) {
      call->changed.wait_for(lock, kHandlerPoll);
      if (context->IsCancelled() && !call->submitted) {
        lock.unlock();
        request_cancel(call);
        return {grpc::StatusCode::CANCELLED, "cancelled"};
      }
    }
    if (!call->rejected.empty()) return {grpc::StatusCode::INVALID_ARGUMENT, call->rejected};
    if (call->error && call->events.empty() && !call->submitted)
      return {static_cast<grpc::StatusCode>(call->error->code()), call->error->message()};
  }

  for (;;) {
    std::deque<RequestEvent> events;
    std::optional<v1::Error> error;
    {
      std::unique_lock<std::mutex> lock(call->mutex);
      call->changed.wait_for(lock, kHandlerPoll,
                             [&] { return !call->events.empty() || call->error; });
      events.swap(call->events);
      error = call->error;
    }
    if (context->IsCancelled()) {
      request_cancel(call);
      return {grpc::StatusCode::CANCELLED, "cancelled"};
    }
    // Tokens coalesced into one delta; the terminal message after them.
    v1::GenerateResponse delta, terminal;
    delta.set_request_id(call->request_id);
    terminal.set_request_id(call->request_id);
    bool has_delta = false, ends = false;
    for (const RequestEvent& e : events) {
      if (e.kind == RequestEvent::Kind::kToken) {
        append_token(e, delta.mutable_delta());
        has_delta = true;
        continue;
      }
      ends = true;
      if (e.reason == FinishReason::kFailed) {
        v1::Error* out = terminal.mutable_error();
        out->set_code(static_cast<int32_t>(grpc::StatusCode::INTERNAL));
        out->set_message(e.message);
        out->set_retryable(false);
      } else {
        fill_finished(e, terminal.mutable_finished());
        terminal.mutable_finished()->set_replica_id(options_.replica_id);
      }
    }
    if (!ends && error) {
      *terminal.mutable_error() = *error;
      ends = true;
    }
    if (has_delta && !write(context, writer, delta)) {
      request_cancel(call);
      return {grpc::StatusCode::CANCELLED, "the client stopped reading"};
    }
    if (ends) {
      if (!write(context, writer, terminal)) {
        request_cancel(call);  // nothing left to cancel; harmless
        return {grpc::StatusCode::CANCELLED, "the client stopped reading"};
      }
      return grpc::Status::OK;
    }
  }
}

grpc::Status ReplicaServer::Impl::Tokenize(grpc::ServerContext* context,
                                           const v1::TokenizeRequest* request,
                                           v1::TokenizeResponse* response) {
  grpc::Status status = check_api_key(*context, options_.security.api_key);
  if (!status.ok()) return status;
  const Tokenizer& tokenizer = engine_.model().tokenizer();
  const bool bos =
      request->has_add_special_tokens() ? request->add_special_tokens() : tokenizer.add_bos();
  try {
    for (int32_t id : tokenizer.encode(request->text(), bos, request->parse_special())) {
      response->add_token_ids(id);
      response->add_pieces(tokenizer.token_to_piece(id));
    }
  } catch (const std::exception& e) {
    return {grpc::StatusCode::INVALID_ARGUMENT, std::string("text: ") + e.what()};
  }
  return grpc::Status::OK;
}

grpc::Status ReplicaServer::Impl::GetModelInfo(grpc::ServerContext* context,
                                               const v1::GetModelInfoRequest*,
                                               v1::ModelInfo* response) {
  grpc::Status status = check_api_key(*context, options_.security.api_key);
  if (!status.ok()) return status;
  *response = server_info().model();
  return grpc::Status::OK;
}

grpc::Status ReplicaServer::Impl::GetLoad(grpc::ServerContext* context, const v1::GetLoadRequest*,
                                          v1::Load* response) {
  grpc::Status status = check_api_key(*context, options_.security.api_key);
  if (!status.ok()) return status;
  *response = load();
  return grpc::Status::OK;
}

grpc::Status ReplicaServer::Impl::GetServerInfo(grpc::ServerContext* context,
                                                const v1::GetServerInfoRequest*,
                                                v1::ServerInfo* response) {
  grpc::Status status = check_api_key(*context, options_.security.api_key);
  if (!status.ok()) return status;
  *response = server_info();
  return grpc::Status::OK;
}

grpc::Status ReplicaServer::Impl::Abort(grpc::ServerContext* context,
                                        const v1::AbortRequest* request,
                                        v1::AbortResponse* response) {
  grpc::Status status = check_api_key(*context, options_.security.api_key);
  if (!status.ok()) return status;
  std::shared_ptr<Call> call;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = by_name_.find(request->request_id());
    if (it != by_name_.end()) call = it->second;
  }
  response->set_found(call != nullptr);
  if (call) request_cancel(call);
  return grpc::Status::OK;
}

v1::ServerInfo ReplicaServer::Impl::server_info() const {
  v1::ServerInfo info;
  const ModelConfig& c = engine_.model().config();
  const Tokenizer& tokenizer = engine_.model().tokenizer();
  const PoolInfo pool = engine_.pool();
  info.set_replica_id(options_.replica_id);
  info.set_tp(options_.tp);
  info.set_pp(options_.pp);
  info.set_cache_mode(options_.cache_mode);
  int32_t public_blocks = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (double b : bytes_per_token_) info.add_bytes_per_token(b);
    public_blocks = stats_.total_blocks;
  }
  if (public_blocks == 0) public_blocks = pool.total_blocks;
  info.set_capacity_tokens(static_cast<int64_t>(public_blocks) * pool.block_tokens);
  info.set_block_tokens(pool.block_tokens);
  info.set_max_sequences(options_.scheduler.max_sequences);
  info.set_max_batch_tokens(options_.scheduler.max_batch_tokens);
  info.set_backend(options_.backend);
  v1::ModelInfo* model = info.mutable_model();
  model->set_name(options_.model_name.empty()
                      ? std::filesystem::path(engine_.model().path()).filename().string()
                      : options_.model_name);
  model->set_architecture(c.architecture);
  model->set_vocab_size(c.vocab_size);
  model->set_context_length(engine_.max_tokens());
  model->set_layers(c.n_layers);
  model->set_heads(c.n_heads);
  model->set_kv_heads(c.n_kv_heads);
  model->set_hidden_size(c.dim);
  model->set_bos_token_id(tokenizer.bos_id());
  model->set_eos_token_id(tokenizer.eos_id());
  model->set_cache_mode(options_.cache_mode);
  model->set_chat_template(engine_.model().chat_template());
  return info;
}

v1::Load ReplicaServer::Impl::load() const {
  v1::Load load;
  std::lock_guard<std::mutex> lock(mutex_);
  load.set_running_requests(stats_.running);
  load.set_queued_requests(stats_.waiting + static_cast<int32_t>(submissions_.size()));
  load.set_running_tokens(stats_.running_tokens);
  int64_t queued_tokens = stats_.waiting_tokens;
  for (const auto& call : submissions_)
    queued_tokens += static_cast<int64_t>(call->request.prompt.size());
  load.set_queued_tokens(queued_tokens);
  int64_t free_bytes = std::numeric_limits<int64_t>::max();
  for (size_t r = 0; r < ranks_.size(); ++r) {
    v1::RankLoad* rank = load.add_ranks();
    rank->set_rank(static_cast<int32_t>(r));
    rank->set_cache_bytes_used(ranks_[r].used_bytes);
    rank->set_cache_bytes_total(ranks_[r].total_bytes);
    free_bytes = std::min(free_bytes, ranks_[r].total_bytes - ranks_[r].used_bytes);
  }
  load.set_free_cache_bytes(ranks_.empty() ? 0 : free_bytes);
  load.set_total_blocks(stats_.total_blocks);
  load.set_free_blocks(stats_.total_blocks - (stats_.ledger_blocks));
  load.set_steps(stats_.steps);
  load.set_preemptions(stats_.preemptions);
  load.set_ready(phase_ == Phase::kServing);
  load.set_seconds_since_progress(seconds_between(last_progress_, Clock::now()));
  return load;
}

// ------------------------------------------------------------ ReplicaServer

ReplicaServer::ReplicaServer(StepExecutor& executor, ReplicaOptions options, CacheGatherer gather)
    : impl_(std::make_unique<Impl>(executor, std::move(options), std::move(gather))) {}
ReplicaServer::~ReplicaServer() = default;
void ReplicaServer::start() {
  impl_->start();
}
int ReplicaServer::port() const {
  return impl_->port();
}
int ReplicaServer::run() {
  return impl_->run();
}
void ReplicaServer::begin_drain() {
  impl_->begin_drain();
}
void ReplicaServer::shutdown() {
  impl_->shutdown();
}
std::string ReplicaServer::failure() const {
  return impl_->failure();
}
v1::ServerInfo ReplicaServer::server_info() const {
  return impl_->server_info();
}
v1::Load ReplicaServer::load() const {
  return impl_->load();
}
std::string ReplicaServer::metrics_text() const {
  return impl_->metrics_text();
}

}  // namespace xq::serve
