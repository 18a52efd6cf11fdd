// The coordinator in-process against fake replicas: small gRPC servers
// implementing Generation and Control that stream N deltas with a delay,
// can fail before or after the first delta, and count calls and cancels.
// A fake streams one delta per max_tokens. Every server binds port 0.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "grpc/health/v1/health.grpc.pb.h"
#include "launch/serve/coordinator.h"
#include "xquant/v1/xquant.grpc.pb.h"

namespace xq::serve {
namespace {

using namespace std::chrono_literals;

enum class Failure {
  kNone,
  kStatusBeforeDelta,     // UNAVAILABLE status, nothing streamed
  kRetryableErrorFirst,   // an `error` message (retryable) as the first message
  kStatusAfterDelta,      // one delta, then UNAVAILABLE
  kBareStatusAfterDelta,  // one delta, then UNAVAILABLE without a message
  kInvalidArgument,       // the request's own fault
};

class FakeReplica final : public v1::Generation::Service, public v1::Control::Service {
 public:
  explicit FakeReplica(std::string id) : id_(std::move(id)) {
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    builder.RegisterService(static_cast<v1::Generation::Service*>(this));
    builder.RegisterService(static_cast<v1::Control::Service*>(this));
    server_ = builder.BuildAndStart();
  }
  ~FakeReplica() override { stop(); }
  void stop() {
    if (server_) server_->Shutdown(std::chrono::system_clock::now() + 1s);
  }

  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  const std::string& id() const { return id_; }

  std::atomic<int> delay_ms{2};
  std::atomic<Failure> failure{Failure::kNone};
  std::atomic<int> max_sequences{4};
  std::atomic<bool> ready{true};
  std::atomic<bool> polls_fail{false};  // GetLoad answers UNAVAILABLE

  std::atomic<int> generate_calls{0}, completed{0}, cancelled{0}, unary_calls{0}, polls{0};
  std::atomic<int> active{0};

  grpc::Status Generate(grpc::ServerContext* context, const v1::GenerateRequest* request,
                        grpc::ServerWriter<v1::GenerateResponse>* writer) override {
    ++generate_calls;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      arrivals_.push_back(request->request_id());
    }
    ActiveCount count(active);
    switch (failure.load()) {
      case Failure::kStatusBeforeDelta:
        return {grpc::StatusCode::UNAVAILABLE, "fake: broken before streaming"};
      case Failure::kInvalidArgument:
        return {grpc::StatusCode::INVALID_ARGUMENT, "fake: prompt too long"};
      case Failure::kRetryableErrorFirst: {
        v1::GenerateResponse response;
        response.set_request_id(request->request_id());
        response.mutable_error()->set_code(grpc::StatusCode::UNAVAILABLE);
        response.mutable_error()->set_message("fake: engine lost");
        response.mutable_error()->set_retryable(true);
        writer->Write(response);
        return grpc::Status::OK;
      }
      default:
        break;
    }
    const int deltas = request->sampling().max_tokens();
    for (int i = 0; i < deltas; ++i) {
      const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(delay_ms);
      while (std::chrono::steady_clock::now() < until) {
        if (context->IsCancelled()) {
          ++cancelled;
          return grpc::Status::CANCELLED;
        }
        std::this_thread::sleep_for(1ms);
      }
      v1::GenerateResponse response;
      response.set_request_id(request->request_id());
      response.mutable_delta()->add_token_ids(100 + i);
      response.mutable_delta()->set_text("t" + std::to_string(i));
      if (!writer->Write(response)) {
        ++cancelled;
        return grpc::Status::CANCELLED;
      }
      if (failure == Failure::kStatusAfterDelta)
        return {grpc::StatusCode::UNAVAILABLE, "fake: died mid-stream"};
      if (failure == Failure::kBareStatusAfterDelta) return {grpc::StatusCode::UNAVAILABLE, ""};
    }
    v1::GenerateResponse response;
    response.set_request_id(request->request_id());
    v1::Finished* finished = response.mutable_finished();
    finished->set_reason(v1::FINISH_REASON_LENGTH);
    finished->set_detail("max_tokens");
    finished->set_replica_id(id_);
    finished->mutable_usage()->set_completion_tokens(deltas);
    finished->mutable_timings()->set_queue_seconds(kReplicaQueueSeconds);
    writer->Write(response);
    ++completed;
    return grpc::Status::OK;
  }

  grpc::Status Tokenize(grpc::ServerContext*, const v1::TokenizeRequest* request,
                        v1::TokenizeResponse* response) override {
    ++unary_calls;
    for (char c : request->text()) response->add_token_ids(static_cast<unsigned char>(c));
    return grpc::Status::OK;
  }
  grpc::Status GetModelInfo(grpc::ServerContext*, const v1::GetModelInfoRequest*,
                            v1::ModelInfo* response) override {
    ++unary_calls;
    response->set_name("fake-model-" + id_);
    return grpc::Status::OK;
  }
  grpc::Status GetLoad(grpc::ServerContext*, const v1::GetLoadRequest*,
                       v1::Load* response) override {
    ++polls;
    if (polls_fail) return {grpc::StatusCode::UNAVAILABLE, "fake: not answering"};
    // Every call counts as waiting, so max_sequences bounds what it takes.
    response->set_queued_requests(active);
    response->set_free_cache_bytes(1'000'000'000);
    response->set_ready(ready);
    return grpc::Status::OK;
  }
  grpc::Status GetServerInfo(grpc::ServerContext*, const v1::GetServerInfoRequest*,
                             v1::ServerInfo* response) override {
    response->set_replica_id(id_);
    response->set_max_sequences(max_sequences);
    response->add_bytes_per_token(1000);
    return grpc::Status::OK;
  }
  grpc::Status Abort(grpc::ServerContext*, const v1::AbortRequest*,
                     v1::AbortResponse* response) override {
    response->set_found(false);
    return grpc::Status::OK;
  }

  static constexpr double kReplicaQueueSeconds = 0.25;

  // Request ids in the order their calls arrived.
  std::vector<std::string> arrivals() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return arrivals_;
  }

 private:
  struct ActiveCount {
    explicit ActiveCount(std::atomic<int>& n) : n_(n) { ++n_; }
    ~ActiveCount() { --n_; }
    std::atomic<int>& n_;
  };
  std::string id_;
  mutable std::mutex mutex_;
  std::vector<std::string> arrivals_;
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
};

// What a client saw of one Generate call.
struct Stream {
  grpc::Status status;
  std::vector<v1::GenerateResponse> messages;
  std::multimap<std::string, std::string> trailing;

  int deltas() const {
    int n = 0;
    for (const auto& m : messages) n += m.has_delta();
    return n;
  }
  int terminals() const {
    int n = 0;
    for (const auto& m : messages) n += m.has_finished() || m.has_error();
    return n;
  }
  const v1::GenerateResponse& last() const { return messages.back(); }
};

v1::GenerateRequest simple_request(int max_tokens = 5) {
  v1::GenerateRequest request;
  request.mutable_token_ids()->add_ids(1);
  request.mutable_token_ids()->add_ids(2);
  request.mutable_sampling()->set_max_tokens(max_tokens);
  return request;
}

using Metadata = std::vector<std::pair<std::string, std::string>>;

Stream generate(const std::shared_ptr<grpc::Channel>& channel, const v1::GenerateRequest& request,
                const Metadata& metadata = {},
                const std::function<void(grpc::ClientContext&, int)>& on_message = {}) {
  auto stub = v1::Generation::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + 20s);
  for (const auto& [key, value] : metadata) context.AddMetadata(key, value);
  Stream stream;
  auto reader = stub->Generate(&context, request);
  v1::GenerateResponse message;
  while (reader->Read(&message)) {
    stream.messages.push_back(message);
    if (on_message) on_message(context, static_cast<int>(stream.messages.size()));
  }
  stream.status = reader->Finish();
  for (const auto& [key, value] : context.GetServerTrailingMetadata())
    stream.trailing.emplace(std::string(key.data(), key.size()),
                            std::string(value.data(), value.size()));
  return stream;
}

// Polls `condition` until it holds or `limit` passes.
bool eventually(const std::function<bool()>& condition, std::chrono::milliseconds limit = 5s) {
  const auto until = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < until) {
    if (condition()) return true;
    std::this_thread::sleep_for(5ms);
  }
  return condition();
}

class CoordinatorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    a_ = std::make_unique<FakeReplica>("fake-a");
    b_ = std::make_unique<FakeReplica>("fake-b");
    options_.listen = "127.0.0.1:0";
    options_.poll_interval = 20ms;
    options_.static_replicas = {a_->address(), b_->address()};
  }
  void TearDown() override {
    if (coordinator_) coordinator_->shutdown(1000ms);
  }

  // Starts the coordinator and waits until both fakes are known by id and
  // ready.
  void start(size_t ready_replicas = 2) {
    coordinator_ = std::make_unique<Coordinator>(options_);
    coordinator_->start();
    channel_ = grpc::CreateChannel("127.0.0.1:" + std::to_string(coordinator_->port()),
                                   grpc::InsecureChannelCredentials());
    ASSERT_TRUE(eventually([&] {
      size_t ready = 0;
      const v1::ListReplicasResponse list = coordinator_->list_replicas();
      for (const auto& r : list.replicas())
        ready += r.state() == "up" && r.load().ready() && r.replica_id().rfind("fake-", 0) == 0;
      return ready == ready_replicas;
    })) << coordinator_->list_replicas().DebugString();
  }

  v1::ReplicaState state_of(const std::string& id) const {
    const v1::ListReplicasResponse list = coordinator_->list_replicas();
    for (const auto& r : list.replicas())
      if (r.replica_id() == id) return r;
    return {};
  }

  std::unique_ptr<FakeReplica> a_, b_;
  CoordinatorOptions options_;
  std::unique_ptr<Coordinator> coordinator_;
  std::shared_ptr<grpc::Channel> channel_;
};

TEST_F(CoordinatorTest, RelaysEveryMessageAndAddsItsQueueTime) {
  start();
  v1::GenerateRequest request = simple_request();
  request.set_request_id("my-request");
  const Stream s = generate(channel_, request);
  ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  EXPECT_EQ(s.deltas(), 5);
  ASSERT_EQ(s.terminals(), 1);
  ASSERT_TRUE(s.last().has_finished());
  for (const auto& m : s.messages) EXPECT_EQ(m.request_id(), "my-request");
  for (int i = 0; i < 5; ++i) EXPECT_EQ(s.messages[i].delta().token_ids(0), 100 + i);
  EXPECT_GE(s.last().finished().timings().queue_seconds(), FakeReplica::kReplicaQueueSeconds);
  EXPECT_LT(s.last().finished().timings().queue_seconds(), FakeReplica::kReplicaQueueSeconds + 5);
  // An empty id is filled in, the same on every message.
  const Stream unnamed = generate(channel_, simple_request());
  ASSERT_TRUE(unnamed.status.ok());
  EXPECT_EQ(unnamed.messages.front().request_id().rfind("xq-", 0), 0u);
  EXPECT_EQ(unnamed.last().request_id(), unnamed.messages.front().request_id());
}

TEST_F(CoordinatorTest, SpreadsConcurrentRequestsOverTheReplicas) {
  a_->delay_ms = b_->delay_ms = 10;
  start();
  constexpr int kRequests = 8;
  std::vector<Stream> streams(kRequests);
  std::vector<std::thread> clients;
  for (int i = 0; i < kRequests; ++i)
    clients.emplace_back([&, i] { streams[i] = generate(channel_, simple_request(10)); });
  for (std::thread& t : clients) t.join();
  std::map<std::string, int> by_replica;
  for (const Stream& s : streams) {
    ASSERT_TRUE(s.status.ok()) << s.status.error_message();
    ASSERT_EQ(s.terminals(), 1);
    ASSERT_TRUE(s.last().has_finished());
    ++by_replica[s.last().finished().replica_id()];
  }
  EXPECT_EQ(a_->generate_calls + b_->generate_calls, kRequests);
  // Each fake takes at most max(2, 4/2) = 2 at a time, so neither can run
  // all eight; least-load splits them.
  EXPECT_GE(by_replica["fake-a"], 2);
  EXPECT_GE(by_replica["fake-b"], 2);
}

TEST_F(CoordinatorTest, RoundRobinAlternates) {
  options_.routing = RoutingPolicy::kRoundRobin;
  start();
  std::vector<std::string> order;
  for (int i = 0; i < 4; ++i) {
    const Stream s = generate(channel_, simple_request());
    ASSERT_TRUE(s.status.ok());
    order.push_back(s.last().finished().replica_id());
  }
  EXPECT_NE(order[0], order[1]);
  EXPECT_EQ(order[0], order[2]);
  EXPECT_EQ(order[1], order[3]);
}

class RerouteTest : public CoordinatorTest, public ::testing::WithParamInterface<Failure> {};

TEST_P(RerouteTest, AFailureBeforeStreamingIsRetriedOnTheOtherReplica) {
  // Least-load breaks ties by id, so idle fakes send the first request to
  // fake-a, which fails it.
  a_->failure = GetParam();
  start();
  for (int i = 0; i < 3; ++i) {
    const Stream s = generate(channel_, simple_request());
    ASSERT_TRUE(s.status.ok()) << s.status.error_message();
    ASSERT_EQ(s.terminals(), 1);
    ASSERT_TRUE(s.last().has_finished()) << s.last().DebugString();
    EXPECT_EQ(s.last().finished().replica_id(), "fake-b");
    EXPECT_EQ(s.deltas(), 5);
  }
  EXPECT_GE(a_->generate_calls, 1);
  EXPECT_EQ(b_->completed, 3);
}

INSTANTIATE_TEST_SUITE_P(Failures, RerouteTest,
                         ::testing::Values(Failure::kStatusBeforeDelta,
                                           Failure::kRetryableErrorFirst));

TEST_F(CoordinatorTest, BreakerOpensOnAReplicaThatKeepsFailingThoughItAnswersPolls) {
  a_->failure = Failure::kStatusBeforeDelta;
  options_.breaker_failures = 2;
  options_.breaker_cooldown = 60s;
  start();
  for (int i = 0; i < 5; ++i) {
    const Stream s = generate(channel_, simple_request());
    ASSERT_TRUE(s.status.ok());
    ASSERT_TRUE(s.last().has_finished());
  }
  EXPECT_EQ(a_->generate_calls, 2);
  EXPECT_EQ(state_of("fake-a").state(), "open");
  EXPECT_EQ(state_of("fake-b").state(), "up");
}

TEST_F(CoordinatorTest, ARequestWaitingOnAReplicaMarkedDownIsRerouted) {
  // fake-a (first by id) takes the request and sits on it; then its polls
  // fail, so it is marked down and the request, not yet streamed, moves.
  a_->delay_ms = 20'000;
  options_.breaker_failures = 100;  // down by failed polls, not by the breaker
  start();
  std::thread unblock([&] {
    ASSERT_TRUE(eventually([&] { return a_->active == 1; }));
    a_->polls_fail = true;
  });
  const auto started = std::chrono::steady_clock::now();
  const Stream s = generate(channel_, simple_request());
  unblock.join();
  ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  ASSERT_EQ(s.terminals(), 1);
  ASSERT_TRUE(s.last().has_finished()) << s.last().DebugString();
  EXPECT_EQ(s.last().finished().replica_id(), "fake-b");
  EXPECT_LT(std::chrono::steady_clock::now() - started, 10s);
  EXPECT_TRUE(eventually([&] { return a_->cancelled == 1; }));
  EXPECT_EQ(state_of("fake-a").state(), "down");
}

TEST_F(CoordinatorTest, EveryReplicaFailingEndsWithOneRetryableError) {
  a_->failure = b_->failure = Failure::kStatusBeforeDelta;
  options_.breaker_failures = 100;
  start();
  const Stream s = generate(channel_, simple_request());
  ASSERT_TRUE(s.status.ok());
  ASSERT_EQ(s.messages.size(), 1u);
  ASSERT_TRUE(s.last().has_error());
  EXPECT_EQ(s.last().error().code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_TRUE(s.last().error().retryable());
  EXPECT_EQ(a_->generate_calls + b_->generate_calls, options_.max_attempts);
}

TEST_F(CoordinatorTest, AReplicaDyingAfterStreamingEndsTheStreamWithOneRetryableError) {
  a_->failure = b_->failure = Failure::kStatusAfterDelta;
  start();
  const Stream s = generate(channel_, simple_request());
  ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  EXPECT_EQ(s.deltas(), 1);
  ASSERT_EQ(s.terminals(), 1);
  ASSERT_TRUE(s.last().has_error());
  EXPECT_EQ(s.last().error().code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_TRUE(s.last().error().retryable());
  EXPECT_NE(s.last().error().message().find("fake-a"), std::string::npos)
      << s.last().error().message();
  // Never replayed elsewhere.
  EXPECT_EQ(a_->generate_calls + b_->generate_calls, 1);
}

TEST_F(CoordinatorTest, AFailureStatusWithoutAMessageAfterStreamingStillEndsWithOneError) {
  a_->failure = b_->failure = Failure::kBareStatusAfterDelta;
  start();
  const Stream s = generate(channel_, simple_request());
  ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  EXPECT_EQ(s.deltas(), 1);
  ASSERT_EQ(s.terminals(), 1);
  ASSERT_TRUE(s.last().has_error());
  EXPECT_EQ(s.last().error().code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_TRUE(s.last().error().retryable());
  EXPECT_EQ(a_->generate_calls + b_->generate_calls, 1);
}

TEST_F(CoordinatorTest, TheRequestsOwnFaultPassesThroughUnchanged) {
  a_->failure = b_->failure = Failure::kInvalidArgument;
  start();
  const Stream s = generate(channel_, simple_request());
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(s.status.error_message(), "fake: prompt too long");
  EXPECT_TRUE(s.messages.empty());
  EXPECT_EQ(a_->generate_calls + b_->generate_calls, 1);
  EXPECT_EQ(state_of("fake-a").state(), "up");
}

TEST_F(CoordinatorTest, AFullQueueAnswersResourceExhaustedWithRetryAfter) {
  // Two fakes taking max(2, 2/2) = 2 each, a queue of one.
  a_->max_sequences = b_->max_sequences = 2;
  a_->delay_ms = b_->delay_ms = 20;
  options_.max_queued_requests = 1;
  start();
  std::vector<Stream> streams(5);
  std::vector<std::thread> clients;
  for (int i = 0; i < 4; ++i)
    clients.emplace_back([&, i] { streams[i] = generate(channel_, simple_request(40)); });
  ASSERT_TRUE(eventually([&] { return a_->active + b_->active == 4; }));
  EXPECT_EQ(a_->active, 2);
  clients.emplace_back([&] { streams[4] = generate(channel_, simple_request(40)); });
  ASSERT_TRUE(eventually([&] { return coordinator_->list_replicas().queued_requests() == 1; }));
  const Stream refused = generate(channel_, simple_request(40));
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(refused.status.error_message().find("--max-queued-requests"), std::string::npos);
  ASSERT_EQ(refused.trailing.count("retry-after"), 1u);
  EXPECT_GE(std::stoi(refused.trailing.find("retry-after")->second), 1);
  for (std::thread& t : clients) t.join();
  // The queued one ran once a slot freed.
  for (const Stream& s : streams) {
    ASSERT_TRUE(s.status.ok());
    EXPECT_TRUE(s.last().has_finished());
  }
  EXPECT_EQ(a_->generate_calls + b_->generate_calls, 5);
}

TEST_F(CoordinatorTest, HigherPriorityIsAdmittedFirst) {
  // One replica with two places: a short and a long request fill it; then
  // a low and a high priority request wait, the low one first. The short
  // one's end frees one place: the high one takes it.
  b_->ready = false;
  a_->max_sequences = 2;
  a_->delay_ms = 20;
  start(1);
  auto named = [](const std::string& id, int max_tokens) {
    v1::GenerateRequest request = simple_request(max_tokens);
    request.set_request_id(id);
    return request;
  };
  std::vector<std::thread> clients;
  clients.emplace_back([&] { generate(channel_, named("short", 10)); });
  clients.emplace_back([&] { generate(channel_, named("long", 100)); });
  ASSERT_TRUE(eventually([&] { return a_->active == 2; }));
  clients.emplace_back([&] { generate(channel_, named("low", 5), {{"x-priority", "0"}}); });
  ASSERT_TRUE(eventually([&] { return coordinator_->list_replicas().queued_requests() == 1; }));
  clients.emplace_back([&] { generate(channel_, named("high", 5), {{"x-priority", "5"}}); });
  ASSERT_TRUE(eventually([&] { return coordinator_->list_replicas().queued_requests() == 2; }));
  for (std::thread& t : clients) t.join();
  const std::vector<std::string> arrivals = a_->arrivals();
  ASSERT_EQ(arrivals.size(), 4u);
  EXPECT_EQ(arrivals[2], "high");
  EXPECT_EQ(arrivals[3], "low");
}

TEST_F(CoordinatorTest, QueuedRequestsLeaveAtTheirDeadline) {
  a_->max_sequences = b_->max_sequences = 2;
  a_->delay_ms = b_->delay_ms = 20;
  start();
  std::vector<std::thread> clients;
  for (int i = 0; i < 4; ++i) clients.emplace_back([&] { generate(channel_, simple_request(40)); });
  ASSERT_TRUE(eventually([&] { return a_->active + b_->active == 4; }));
  auto stub = v1::Generation::NewStub(channel_);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + 200ms);
  auto reader = stub->Generate(&context, simple_request());
  v1::GenerateResponse message;
  EXPECT_FALSE(reader->Read(&message));
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_TRUE(eventually([&] { return coordinator_->list_replicas().queued_requests() == 0; }));
  for (std::thread& t : clients) t.join();
  EXPECT_EQ(a_->generate_calls + b_->generate_calls, 4);
}

TEST_F(CoordinatorTest, BadMetadataAndFieldsAreInvalidArgumentBeforeAnyReplicaCall) {
  start();
  const Stream policy = generate(channel_, simple_request(), {{"x-routing-policy", "fastest"}});
  EXPECT_EQ(policy.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(policy.status.error_message().find("fastest"), std::string::npos);
  const Stream priority = generate(channel_, simple_request(), {{"x-priority", "high"}});
  EXPECT_EQ(priority.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  v1::GenerateRequest bad = simple_request();
  bad.mutable_sampling()->set_temperature(-1);
  const Stream temperature = generate(channel_, bad);
  EXPECT_EQ(temperature.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(temperature.status.error_message().find("temperature"), std::string::npos);
  const Stream no_tokens = generate(channel_, simple_request(0));
  EXPECT_EQ(no_tokens.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  v1::GenerateRequest unsupported = simple_request();
  unsupported.mutable_sampling()->set_n(3);
  EXPECT_EQ(generate(channel_, unsupported).status.error_code(), grpc::StatusCode::UNIMPLEMENTED);
  EXPECT_EQ(a_->generate_calls + b_->generate_calls, 0);
  // A valid override and priority go through.
  const Stream fine = generate(
      channel_, simple_request(),
      {{"x-routing-policy", "session"}, {"x-routing-key", "user-7"}, {"x-priority", "-3"}});
  EXPECT_TRUE(fine.status.ok()) << fine.status.error_message();
}

TEST_F(CoordinatorTest, SessionKeysStick) {
  options_.routing = RoutingPolicy::kSession;
  start();
  for (const char* key : {"alice", "bob", "carol"}) {
    std::string first;
    for (int i = 0; i < 3; ++i) {
      const Stream s = generate(channel_, simple_request(), {{"x-routing-key", key}});
      ASSERT_TRUE(s.status.ok());
      const std::string replica = s.last().finished().replica_id();
      if (i == 0) first = replica;
      EXPECT_EQ(replica, first) << key;
    }
  }
}

TEST_F(CoordinatorTest, AWrongKeyIsRejectedBeforeAnyReplicaCall) {
  options_.security.api_key = "sesame";
  start();
  const Stream none = generate(channel_, simple_request());
  EXPECT_EQ(none.status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  const Stream wrong = generate(channel_, simple_request(), {{"authorization", "Bearer sesamE"}});
  EXPECT_EQ(wrong.status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  // Checked before the fields: even a bad request gets UNAUTHENTICATED.
  const Stream bad = generate(channel_, simple_request(0), {{"authorization", "Bearer x"}});
  EXPECT_EQ(bad.status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  auto generation = v1::Generation::NewStub(channel_);
  {
    grpc::ClientContext context;
    v1::TokenizeResponse tokens;
    v1::TokenizeRequest tokenize;
    tokenize.set_text("hi");
    EXPECT_EQ(generation->Tokenize(&context, tokenize, &tokens).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
  }
  {
    grpc::ClientContext context;
    v1::ListReplicasResponse list;
    EXPECT_EQ(v1::Registry::NewStub(channel_)
                  ->ListReplicas(&context, v1::ListReplicasRequest(), &list)
                  .error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
  }
  EXPECT_EQ(a_->generate_calls + b_->generate_calls, 0);
  EXPECT_EQ(a_->unary_calls + b_->unary_calls, 0);
  const Stream right = generate(channel_, simple_request(), {{"authorization", "Bearer sesame"}});
  EXPECT_TRUE(right.status.ok()) << right.status.error_message();
}

TEST_F(CoordinatorTest, AClientCancelReachesTheReplicaAsACancelledCall) {
  a_->delay_ms = b_->delay_ms = 10;
  start();
  const Stream s =
      generate(channel_, simple_request(1000), {}, [](grpc::ClientContext& context, int received) {
        if (received == 2) context.TryCancel();
      });
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(eventually([&] { return a_->cancelled + b_->cancelled == 1; }));
  EXPECT_EQ(a_->completed + b_->completed, 0);
  EXPECT_TRUE(eventually(
      [&] { return state_of("fake-a").in_flight() == 0 && state_of("fake-b").in_flight() == 0; }));
}

TEST_F(CoordinatorTest, TokenizeAndModelInfoGoToAReadyReplica) {
  b_->ready = false;
  start(1);
  auto stub = v1::Generation::NewStub(channel_);
  grpc::ClientContext context;
  v1::TokenizeRequest request;
  request.set_text("abc");
  v1::TokenizeResponse response;
  ASSERT_TRUE(stub->Tokenize(&context, request, &response).ok());
  EXPECT_EQ(response.token_ids_size(), 3);
  grpc::ClientContext info_context;
  v1::ModelInfo info;
  ASSERT_TRUE(stub->GetModelInfo(&info_context, v1::GetModelInfoRequest(), &info).ok());
  EXPECT_EQ(info.name(), "fake-model-fake-a");
  EXPECT_EQ(b_->unary_calls, 0);
}

TEST(CoordinatorWithoutReplicas, IsUnavailableAndNotReady) {
  CoordinatorOptions options;
  options.listen = "127.0.0.1:0";
  Coordinator coordinator(options);
  coordinator.start();
  auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(coordinator.port()),
                                     grpc::InsecureChannelCredentials());
  const Stream s = generate(channel, simple_request());
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(s.status.error_message(), "no replica is ready");
  auto generation = v1::Generation::NewStub(channel);
  grpc::ClientContext context;
  v1::ModelInfo info;
  EXPECT_EQ(generation->GetModelInfo(&context, v1::GetModelInfoRequest(), &info).error_code(),
            grpc::StatusCode::UNAVAILABLE);
  auto health = grpc::health::v1::Health::NewStub(channel);
  for (const char* service : {"", "xquant.v1.Generation"}) {
    grpc::ClientContext health_context;
    grpc::health::v1::HealthCheckRequest request;
    request.set_service(service);
    grpc::health::v1::HealthCheckResponse response;
    ASSERT_TRUE(health->Check(&health_context, request, &response).ok());
    EXPECT_EQ(response.status(), *service == '\0'
                                     ? grpc::health::v1::HealthCheckResponse::SERVING
                                     : grpc::health::v1::HealthCheckResponse::NOT_SERVING)
        << service;
  }
}

TEST(CoordinatorRegistry, RegisteredReplicasServeGoDownAndComeBackAtANewAddress) {
  CoordinatorOptions options;
  options.listen = "127.0.0.1:0";
  options.poll_interval = 20ms;
  options.heartbeat = 100ms;
  Coordinator coordinator(options);
  coordinator.start();
  auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(coordinator.port()),
                                     grpc::InsecureChannelCredentials());
  auto registry = v1::Registry::NewStub(channel);
  auto register_replica = [&](const FakeReplica& replica) {
    grpc::ClientContext context;
    v1::RegisterRequest request;
    request.set_address(replica.address());
    request.mutable_info()->set_replica_id(replica.id());
    v1::RegisterResponse response;
    const grpc::Status status = registry->Register(&context, request, &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    EXPECT_EQ(response.heartbeat_ms(), 100);
  };
  auto state = [&](const std::string& id) {
    const v1::ListReplicasResponse list = coordinator.list_replicas();
    for (const auto& r : list.replicas())
      if (r.replica_id() == id) return r;
    return v1::ReplicaState();
  };
  auto health_serving = [&] {
    grpc::ClientContext context;
    grpc::health::v1::HealthCheckRequest request;
    request.set_service("xquant.v1.Generation");
    grpc::health::v1::HealthCheckResponse response;
    grpc::health::v1::Health::NewStub(channel)->Check(&context, request, &response);
    return response.status() == grpc::health::v1::HealthCheckResponse::SERVING;
  };

  auto first = std::make_unique<FakeReplica>("worker-1");
  // Heartbeats, as a replica sends them, until it "dies".
  std::atomic<bool> alive{true};
  std::thread heartbeat([&] {
    while (alive) {
      register_replica(*first);
      std::this_thread::sleep_for(30ms);
    }
  });
  ASSERT_TRUE(eventually([&] { return state("worker-1").load().ready(); }));
  EXPECT_TRUE(eventually(health_serving));
  const Stream s = generate(channel, simple_request());
  ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  EXPECT_EQ(s.last().finished().replica_id(), "worker-1");

  // No heartbeat for three intervals: down, and no longer ready.
  alive = false;
  heartbeat.join();
  first->stop();
  EXPECT_TRUE(eventually([&] { return state("worker-1").state() == "down"; }));
  EXPECT_TRUE(eventually([&] { return !health_serving(); }));
  const Stream refused = generate(channel, simple_request());
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::UNAVAILABLE);

  // The same id restarted elsewhere replaces the entry and takes traffic.
  FakeReplica restarted("worker-1");
  register_replica(restarted);
  ASSERT_EQ(coordinator.list_replicas().replicas_size(), 1);
  EXPECT_EQ(state("worker-1").address(), restarted.address());
  ASSERT_TRUE(eventually([&] { return state("worker-1").load().ready(); }));
  const Stream again = generate(channel, simple_request());
  ASSERT_TRUE(again.status.ok()) << again.status.error_message();
  EXPECT_EQ(restarted.completed, 1);
  coordinator.shutdown();
}

TEST(CoordinatorRegistry, ACallWaitingOnAReplicaReplacedAtANewAddressIsRerouted) {
  // worker-1 dies; before its failed polls mark it down, a request is routed
  // to it and waits for a connection that never comes. worker-1 then
  // registers again from a new address: the old entry is gone from the
  // table, so the waiting call must move to the new process rather than
  // wait for its deadline.
  CoordinatorOptions options;
  options.listen = "127.0.0.1:0";
  options.poll_interval = 20ms;
  options.heartbeat = 10s;
  options.breaker_failures = 100;
  Coordinator coordinator(options);
  coordinator.start();
  auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(coordinator.port()),
                                     grpc::InsecureChannelCredentials());
  auto register_replica = [&](const FakeReplica& replica) {
    grpc::ClientContext context;
    v1::RegisterRequest request;
    request.set_address(replica.address());
    request.mutable_info()->set_replica_id(replica.id());
    v1::RegisterResponse response;
    ASSERT_TRUE(v1::Registry::NewStub(channel)->Register(&context, request, &response).ok());
  };
  auto state = [&] {
    const v1::ListReplicasResponse list = coordinator.list_replicas();
    return list.replicas_size() == 1 ? list.replicas(0) : v1::ReplicaState();
  };
  auto first = std::make_unique<FakeReplica>("worker-1");
  register_replica(*first);
  ASSERT_TRUE(eventually([&] { return state().load().ready(); }));
  first->stop();

  Stream s;
  std::chrono::steady_clock::duration took{};
  std::thread client([&] {
    const auto started = std::chrono::steady_clock::now();
    s = generate(channel, simple_request());
    took = std::chrono::steady_clock::now() - started;
  });
  ASSERT_TRUE(eventually([&] { return state().in_flight() == 1; }));
  ASSERT_EQ(state().state(), "up") << "marked down too soon for this test";
  FakeReplica restarted("worker-1");
  register_replica(restarted);
  client.join();
  ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  ASSERT_EQ(s.terminals(), 1);
  ASSERT_TRUE(s.last().has_finished()) << s.last().DebugString();
  EXPECT_EQ(s.deltas(), 5);
  EXPECT_EQ(restarted.completed, 1);
  EXPECT_LT(took, 5s);
  EXPECT_TRUE(eventually([&] { return state().in_flight() == 0; }));
  coordinator.shutdown();
}

}  // namespace
}  // namespace xq::serve
