// The replica server in one process: a ReplicaServer around the real
// stories260K engine on a LocalExecutor (no MPI), driven through real gRPC
// calls on a loopback port. Streams are compared token for token with the
// plain Scheduler run offline on an engine of their own (greedy: exact, no
// tolerance); cancellation is checked through GetLoad's cache bytes, which
// the server gathers from the engine after every step.
#include <arpa/inet.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "grpc/health/v1/health.grpc.pb.h"
#include "kernels/error.h"
#include "launch/serve/generate_request.h"
#include "launch/serve/replica_registration.h"
#include "launch/serve/replica_server.h"
#include "runtime/engine.h"
#include "runtime/model.h"
#include "runtime/scheduler.h"
#include "runtime/step_plan.h"
#include "tests/test_util.h"
#include "xquant/v1/xquant.grpc.pb.h"

namespace xq {
namespace {

namespace v1 = ::xquant::v1;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

constexpr int32_t kContext = 256;
constexpr int32_t kSequences = 8;

std::string model_path() {
  return testing::shared_path("models/stories260K.bin");
}

const Model& stories() {
  static std::unique_ptr<Model> model = Model::load(model_path());
  return *model;
}

EngineOptions engine_options(int32_t sequences, size_t cache_bytes = 0,
                             int32_t context = kContext) {
  EngineOptions o;
  o.threads = 1;
  o.max_tokens = context;
  o.sequences = sequences;
  o.cache_bytes = cache_bytes;
  o.cache_mode = "fp16";
  return o;
}

// Runs plans on a local executor; can be told to hang in its next step.
class SlowableExecutor final : public StepExecutor {
 public:
  explicit SlowableExecutor(Engine& engine) : local_(engine) {}
  void execute(const StepPlan& plan, float* logits) override {
    const auto delay = std::max(next_delay_.exchange(0ms), every_delay_.load());
    if (delay > 0ms) std::this_thread::sleep_for(delay);
    if (lose_rank_.load()) throw LostRank("a peer did not answer", 1, "all_reduce_sum", 1);
    local_.execute(plan, logits);
  }
  Engine& engine() override { return local_.engine(); }
  std::atomic<std::chrono::milliseconds> next_delay_{0ms};
  std::atomic<std::chrono::milliseconds> every_delay_{0ms};
  std::atomic<bool> lose_rank_{false};  // requests long enough to watch

 private:
  LocalExecutor local_;
};

// A server on its own engine, its scheduler thread, and stubs to it.
class Replica {
 public:
  explicit Replica(serve::ReplicaOptions options, size_t cache_bytes = 0, bool start_serving = true,
                   int32_t context = kContext)
      : engine_(stories(), engine_options(options.scheduler.max_sequences +
                                              (options.canary_interval.count() > 0 ? 1 : 0),
                                          cache_bytes, context)),
        executor_(engine_) {
    options.listen = "127.0.0.1:0";
    options.on_hung = [this](const std::string& reason) {
      std::lock_guard<std::mutex> lock(mutex_);
      hung_ = reason;
    };
    api_key_ = options.security.api_key;
    server_ = std::make_unique<serve::ReplicaServer>(executor_, options);
    server_->start();
    channel_ = grpc::CreateChannel("127.0.0.1:" + std::to_string(server_->port()),
                                   grpc::InsecureChannelCredentials());
    generation_ = v1::Generation::NewStub(channel_);
    control_ = v1::Control::NewStub(channel_);
    health_ = grpc::health::v1::Health::NewStub(channel_);
    if (start_serving) serve();
  }
  ~Replica() {
    if (thread_.joinable()) {
      server_->begin_drain();
      thread_.join();
    }
    server_->shutdown();
  }

  void serve() {
    thread_ = std::thread([this] { status_ = server_->run(); });
    const auto until = Clock::now() + 30s;
    while (Clock::now() < until && !server_->load().ready()) std::this_thread::sleep_for(5ms);
    ASSERT_TRUE(server_->load().ready());
  }
  int drain() {
    server_->begin_drain();
    thread_.join();
    return status_;
  }

  void authorize(grpc::ClientContext& context) const {
    if (!api_key_.empty()) context.AddMetadata("authorization", "Bearer " + api_key_);
  }
  v1::Load load() {
    grpc::ClientContext context;
    authorize(context);
    v1::Load load;
    EXPECT_TRUE(control_->GetLoad(&context, v1::GetLoadRequest(), &load).ok());
    return load;
  }
  int64_t cache_bytes_used() {
    const v1::Load l = load();
    EXPECT_EQ(l.ranks_size(), 1);
    return l.ranks_size() > 0 ? l.ranks(0).cache_bytes_used() : -1;
  }
  grpc::health::v1::HealthCheckResponse::ServingStatus health(const std::string& service) {
    grpc::ClientContext context;
    grpc::health::v1::HealthCheckRequest request;
    request.set_service(service);
    grpc::health::v1::HealthCheckResponse response;
    const grpc::Status status = health_->Check(&context, request, &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return response.status();
  }
  std::string hung() {
    std::lock_guard<std::mutex> lock(mutex_);
    return hung_;
  }

  TransformerEngine& engine() { return engine_; }
  SlowableExecutor& executor() { return executor_; }
  v1::Generation::Stub& generation() { return *generation_; }
  v1::Control::Stub& control() { return *control_; }
  serve::ReplicaServer& server() { return *server_; }
  std::shared_ptr<grpc::Channel> channel() { return channel_; }

 private:
  TransformerEngine engine_;
  SlowableExecutor executor_;
  std::string api_key_;
  std::unique_ptr<serve::ReplicaServer> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Generation::Stub> generation_;
  std::unique_ptr<v1::Control::Stub> control_;
  std::unique_ptr<grpc::health::v1::Health::Stub> health_;
  std::thread thread_;
  int status_ = -1;
  std::mutex mutex_;
  std::string hung_;
};

serve::ReplicaOptions base_options() {
  serve::ReplicaOptions o;
  o.scheduler.max_sequences = kSequences;
  o.scheduler.max_batch_tokens = 256;
  o.canary_interval = 0ms;
  o.stall_timeout = 30s;
  o.step_timeout = 30s;
  o.idle_gather_interval = 100ms;
  return o;
}

// One stream read to its end.
struct StreamResult {
  grpc::Status status;
  std::vector<int32_t> tokens;
  std::string text;
  int messages = 0, finished = 0, errors = 0;
  v1::Finished finish;
  v1::Error error;
  std::string request_id;
};

StreamResult read_all(grpc::ClientReader<v1::GenerateResponse>& reader) {
  StreamResult r;
  v1::GenerateResponse message;
  while (reader.Read(&message)) {
    ++r.messages;
    r.request_id = message.request_id();
    if (message.has_delta()) {
      for (int32_t id : message.delta().token_ids()) r.tokens.push_back(id);
      r.text += message.delta().text();
    } else if (message.has_finished()) {
      ++r.finished;
      r.finish = message.finished();
      r.text += message.finished().text();
    } else if (message.has_error()) {
      ++r.errors;
      r.error = message.error();
    }
  }
  r.status = reader.Finish();
  return r;
}

StreamResult generate(Replica& replica, const v1::GenerateRequest& request) {
  grpc::ClientContext context;
  replica.authorize(context);
  context.set_deadline(std::chrono::system_clock::now() + 60s);
  auto reader = replica.generation().Generate(&context, request);
  return read_all(*reader);
}

v1::GenerateRequest text_request(const std::string& text, int32_t max_tokens) {
  v1::GenerateRequest r;
  r.set_text(text);
  r.mutable_sampling()->set_max_tokens(max_tokens);
  return r;
}

// Polls until `done` or the time is up.
template <typename F>
bool eventually(F done, std::chrono::milliseconds limit = 20s) {
  const auto until = Clock::now() + limit;
  while (Clock::now() < until) {
    if (done()) return true;
    std::this_thread::sleep_for(5ms);
  }
  return done();
}

class ReplicaServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!testing::file_exists(model_path())) GTEST_SKIP() << "no " << model_path();
  }
};

TEST_F(ReplicaServerTest, ConcurrentStreamsEqualTheOfflineSchedulerTokenForToken) {
  const std::vector<std::string> prompts = {
      "Once upon a time", "The little dog",  "Lily and Tom went", "One day a bird",
      "The sun was",      "There was a big", "Tim liked to",      "A girl named Sue"};
  // The reference: the plain scheduler, offline, on an engine of its own.
  TransformerEngine reference_engine(stories(), engine_options(kSequences));
  LocalExecutor reference_executor(reference_engine);
  Scheduler reference(reference_executor, base_options().scheduler);
  std::map<RequestId, size_t> index;
  std::vector<std::vector<int32_t>> expected(prompts.size());
  std::vector<std::string> expected_text(prompts.size());
  std::vector<FinishReason> expected_reason(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    Request r;
    r.prompt = stories().tokenizer().encode(prompts[i], stories().tokenizer().add_bos());
    r.max_tokens = 40 + static_cast<int32_t>(i) * 3;
    index[reference.submit(r)] = i;
  }
  while (!reference.idle()) {
    reference.step();
    for (const RequestEvent& e : reference.take_events()) {
      const size_t i = index.at(e.id);
      expected_text[i] += e.text;
      if (e.kind == RequestEvent::Kind::kToken)
        expected[i].push_back(e.token);
      else
        expected_reason[i] = e.reason;
    }
  }

  serve::ReplicaOptions options = base_options();
  options.canary_interval = 50ms;  // canaries run beside the streams
  Replica replica(options);
  std::vector<StreamResult> results(prompts.size());
  std::vector<std::thread> clients;
  for (size_t i = 0; i < prompts.size(); ++i)
    clients.emplace_back([&, i] {
      results[i] = generate(replica, text_request(prompts[i], 40 + static_cast<int32_t>(i) * 3));
    });
  for (std::thread& t : clients) t.join();
  for (size_t i = 0; i < prompts.size(); ++i) {
    SCOPED_TRACE(prompts[i]);
    const StreamResult& r = results[i];
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    EXPECT_EQ(r.finished, 1);
    EXPECT_EQ(r.errors, 0);
    EXPECT_FALSE(expected[i].empty());
    EXPECT_EQ(r.tokens, expected[i]);
    EXPECT_EQ(r.text, expected_text[i]);
    EXPECT_EQ(r.finish.reason(), serve::to_proto(expected_reason[i]));
    EXPECT_EQ(r.finish.usage().completion_tokens(), static_cast<int32_t>(expected[i].size()));
    EXPECT_EQ(r.finish.replica_id(), replica.server().server_info().replica_id());
    EXPECT_EQ(r.request_id.rfind("xq-", 0), 0u) << r.request_id;
  }
  // Every request ended, every block back.
  EXPECT_TRUE(eventually([&] { return replica.cache_bytes_used() == 0; }));
  const v1::Load load = replica.load();
  EXPECT_EQ(load.running_requests(), 0);
  EXPECT_EQ(load.queued_requests(), 0);
  EXPECT_TRUE(load.ready());
  EXPECT_EQ(load.free_cache_bytes(), load.ranks(0).cache_bytes_total());
  EXPECT_EQ(replica.drain(), 0);
}

TEST_F(ReplicaServerTest, CancelMidStreamReturnsTheCacheAtTheNextStep) {
  Replica replica(base_options());
  const int64_t baseline = replica.cache_bytes_used();
  EXPECT_EQ(baseline, 0);
  grpc::ClientContext context;
  auto reader = replica.generation().Generate(&context, text_request("Once upon a time", 200));
  v1::GenerateResponse message;
  int tokens = 0;
  while (tokens < 5 && reader->Read(&message))
    if (message.has_delta()) tokens += message.delta().token_ids_size();
  ASSERT_GE(tokens, 5);
  v1::Load during = replica.load();
  EXPECT_EQ(during.running_requests(), 1);
  EXPECT_GT(during.running_tokens(), 0);
  EXPECT_GT(during.ranks(0).cache_bytes_used(), baseline);
  context.TryCancel();
  // The first load without the request already has its cache back: the
  // release runs in the step right after the cancel, and the cache is
  // measured after every step.
  v1::Load after;
  ASSERT_TRUE(eventually([&] {
    after = replica.load();
    return after.running_requests() == 0;
  }));
  EXPECT_EQ(after.ranks(0).cache_bytes_used(), baseline);
  while (reader->Read(&message)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
}

TEST_F(ReplicaServerTest, AbortEndsAQueuedRequestAndARunningOne) {
  serve::ReplicaOptions options = base_options();
  options.scheduler.max_sequences = 1;
  Replica replica(options);
  grpc::ClientContext running_context;
  v1::GenerateRequest running = text_request("Once upon a time", 200);
  running.set_request_id("running-a");
  running.mutable_sampling()->set_ignore_eos(true);
  auto running_reader = replica.generation().Generate(&running_context, running);
  v1::GenerateResponse message;
  ASSERT_TRUE(running_reader->Read(&message));  // it runs
  StreamResult queued_result;
  std::thread queued([&] {
    v1::GenerateRequest queued_request = text_request("The little dog", 20);
    queued_request.set_request_id("queued-b");
    queued_result = generate(replica, queued_request);
  });
  ASSERT_TRUE(eventually([&] { return replica.load().queued_requests() == 1; }));
  auto abort = [&](const std::string& id) {
    grpc::ClientContext context;
    v1::AbortRequest request;
    request.set_request_id(id);
    v1::AbortResponse response;
    EXPECT_TRUE(replica.control().Abort(&context, request, &response).ok());
    return response.found();
  };
  EXPECT_FALSE(abort("no-such-request"));
  EXPECT_TRUE(abort("queued-b"));
  queued.join();
  ASSERT_TRUE(queued_result.status.ok()) << queued_result.status.error_message();
  EXPECT_EQ(queued_result.finished, 1);
  EXPECT_EQ(queued_result.finish.reason(), v1::FINISH_REASON_CANCELLED);
  EXPECT_TRUE(queued_result.tokens.empty());
  EXPECT_EQ(queued_result.request_id, "queued-b");
  // The running one is still running; a second request with its id is refused.
  EXPECT_EQ(replica.load().running_requests(), 1);
  v1::GenerateRequest duplicate = text_request("Hello", 5);
  duplicate.set_request_id("running-a");
  EXPECT_EQ(generate(replica, duplicate).status.error_code(), grpc::StatusCode::ALREADY_EXISTS);
  EXPECT_TRUE(abort("running-a"));
  StreamResult rest = read_all(*running_reader);
  ASSERT_TRUE(rest.status.ok());
  EXPECT_EQ(rest.finish.reason(), v1::FINISH_REASON_CANCELLED);
  EXPECT_LT(rest.finish.usage().completion_tokens(), 200);
  EXPECT_TRUE(eventually([&] { return replica.cache_bytes_used() == 0; }));
}

TEST_F(ReplicaServerTest, BadRequestsGetTheirStatusBeforeAnyMessage) {
  serve::ReplicaOptions options = base_options();
  options.security.api_key = "secret";
  options.max_prompt_tokens = 100;
  Replica replica(options);
  auto expect_status = [&](const v1::GenerateRequest& request, grpc::StatusCode code,
                           const std::string& what) {
    SCOPED_TRACE(what);
    const StreamResult r = generate(replica, request);
    EXPECT_EQ(r.status.error_code(), code) << r.status.error_message();
    EXPECT_EQ(r.messages, 0);
  };
  v1::GenerateRequest no_prompt;
  no_prompt.mutable_sampling()->set_max_tokens(4);
  expect_status(no_prompt, grpc::StatusCode::INVALID_ARGUMENT, "no prompt");
  v1::GenerateRequest empty_ids = no_prompt;
  empty_ids.mutable_token_ids();
  expect_status(empty_ids, grpc::StatusCode::INVALID_ARGUMENT, "empty token ids");
  v1::GenerateRequest long_prompt = no_prompt;
  for (int i = 0; i < 101; ++i) long_prompt.mutable_token_ids()->add_ids(100);
  expect_status(long_prompt, grpc::StatusCode::INVALID_ARGUMENT, "prompt over --max-prompt-tokens");
  v1::GenerateRequest out_of_vocab = text_request("Hi", 4);
  out_of_vocab.mutable_token_ids()->add_ids(512);
  expect_status(out_of_vocab, grpc::StatusCode::INVALID_ARGUMENT, "id outside the vocabulary");
  for (int32_t max_tokens : {0, -1, kContext})
    expect_status(text_request("Hi", max_tokens), grpc::StatusCode::INVALID_ARGUMENT,
                  "max_tokens " + std::to_string(max_tokens));
  v1::GenerateRequest cold = text_request("Hi", 4);
  cold.mutable_sampling()->set_temperature(-0.5f);
  expect_status(cold, grpc::StatusCode::INVALID_ARGUMENT, "temperature < 0");
  for (float top_p : {0.0f, 1.5f}) {
    v1::GenerateRequest r = text_request("Hi", 4);
    r.mutable_sampling()->set_top_p(top_p);
    expect_status(r, grpc::StatusCode::INVALID_ARGUMENT, "top_p " + std::to_string(top_p));
  }
  v1::GenerateRequest two = text_request("Hi", 4);
  two.mutable_sampling()->set_n(2);
  expect_status(two, grpc::StatusCode::UNIMPLEMENTED, "n = 2");
  v1::GenerateRequest penalty = text_request("Hi", 4);
  penalty.mutable_sampling()->set_presence_penalty(0.5f);
  expect_status(penalty, grpc::StatusCode::UNIMPLEMENTED, "presence penalty");

  // The key, on every service.
  for (const char* header : {"", "Bearer wrong", "secret"}) {
    SCOPED_TRACE(header);
    grpc::ClientContext context;
    if (*header) context.AddMetadata("authorization", header);
    auto reader = replica.generation().Generate(&context, text_request("Hi", 4));
    v1::GenerateResponse message;
    EXPECT_FALSE(reader->Read(&message));
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::UNAUTHENTICATED);
    grpc::ClientContext load_context;
    if (*header) load_context.AddMetadata("authorization", header);
    v1::Load load;
    EXPECT_EQ(replica.control().GetLoad(&load_context, v1::GetLoadRequest(), &load).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
    grpc::ClientContext abort_context;
    if (*header) abort_context.AddMetadata("authorization", header);
    v1::AbortResponse aborted;
    EXPECT_EQ(replica.control().Abort(&abort_context, v1::AbortRequest(), &aborted).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
    grpc::ClientContext info_context;
    if (*header) info_context.AddMetadata("authorization", header);
    v1::ModelInfo info;
    EXPECT_EQ(replica.generation()
                  .GetModelInfo(&info_context, v1::GetModelInfoRequest(), &info)
                  .error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
  }
  // With the key the same request runs.
  const StreamResult fine = generate(replica, text_request("Hi", 4));
  EXPECT_TRUE(fine.status.ok()) << fine.status.error_message();
  EXPECT_EQ(fine.finished, 1);
}

// A prompt the pool cannot hold passes the context check and is refused by
// the scheduler at submit: still a status, not a stream.
TEST_F(ReplicaServerTest, ARequestTheSchedulerRefusesIsInvalidArgument) {
  TransformerEngine probe(stories(), engine_options(1));
  const size_t one_block = probe.pool().block_bytes;
  serve::ReplicaOptions options = base_options();
  options.scheduler.max_sequences = 1;
  options.scheduler.max_batch_tokens = 128;
  Replica replica(options, one_block);  // 128 tokens of cache
  ASSERT_EQ(replica.engine().pool().total_blocks, 1);
  v1::GenerateRequest r;
  for (int i = 0; i < 200; ++i) r.mutable_token_ids()->add_ids(100);
  r.mutable_sampling()->set_max_tokens(4);
  const StreamResult refused = generate(replica, r);
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(refused.status.error_message().find("pool"), std::string::npos)
      << refused.status.error_message();
  EXPECT_EQ(refused.messages, 0);
}

TEST_F(ReplicaServerTest, HealthFollowsWarmUpServingAndDrain) {
  serve::ReplicaOptions options = base_options();
  options.canary_interval = 100ms;
  Replica replica(options, 0, /*start_serving=*/false);
  using Status = grpc::health::v1::HealthCheckResponse;
  EXPECT_EQ(replica.health(""), Status::SERVING);
  EXPECT_EQ(replica.health("xquant.v1.Generation"), Status::NOT_SERVING);
  EXPECT_EQ(generate(replica, text_request("Hi", 4)).status.error_code(),
            grpc::StatusCode::UNAVAILABLE);
  replica.serve();
  EXPECT_EQ(replica.health("xquant.v1.Generation"), Status::SERVING);
  // Canaries run on the reserved slot while idle: steps go on, no request shows.
  const int64_t steps = replica.load().steps();
  EXPECT_TRUE(eventually([&] { return replica.load().steps() >= steps + 2; }, 5s));
  EXPECT_EQ(replica.load().running_requests(), 0);
  EXPECT_LT(replica.load().seconds_since_progress(), 1.0);
  const v1::ServerInfo info = replica.server().server_info();
  EXPECT_EQ(info.tp(), 1);
  EXPECT_EQ(info.max_sequences(), kSequences);
  EXPECT_EQ(info.model().context_length(), kContext);
  EXPECT_EQ(info.model().vocab_size(), 512);
  EXPECT_EQ(info.block_tokens(), 128);
  ASSERT_EQ(info.bytes_per_token_size(), 1);
  EXPECT_EQ(info.bytes_per_token(0), replica.engine().cache().bytes_per_token());
  EXPECT_GT(info.bytes_per_token(0), 0);
  // The reserved slot's blocks are not public capacity.
  EXPECT_EQ(info.capacity_tokens(),
            static_cast<int64_t>(replica.load().total_blocks()) * info.block_tokens());
  EXPECT_LT(replica.load().total_blocks(), replica.engine().pool().total_blocks);

  // Drain: not ready, new requests refused, a running one finishes.
  StreamResult running;
  replica.executor().every_delay_ = 10ms;
  std::thread client([&] { running = generate(replica, text_request("Once upon a time", 60)); });
  EXPECT_TRUE(eventually([&] { return replica.load().running_requests() == 1; }));
  replica.server().begin_drain();
  EXPECT_EQ(replica.health("xquant.v1.Generation"), Status::NOT_SERVING);
  EXPECT_EQ(replica.health(""), Status::SERVING);
  EXPECT_EQ(generate(replica, text_request("Hi", 4)).status.error_code(),
            grpc::StatusCode::UNAVAILABLE);
  client.join();
  EXPECT_TRUE(running.status.ok());
  EXPECT_EQ(running.finished, 1);
  EXPECT_EQ(replica.drain(), 0);
}

// A raw HTTP/2 client that announces a flow-control window of 0 and never
// opens it: the server can send no message of the stream, so its writes
// stall once gRPC's own buffer is full -- what a client that stopped reading
// does, without depending on how much a real client buffers.
class ZeroWindowClient {
 public:
  ZeroWindowClient(int port, const v1::GenerateRequest& request) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = htons(static_cast<uint16_t>(port));
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::connect(fd_, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0)
      throw Error("cannot connect");
    std::string out = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    // SETTINGS: INITIAL_WINDOW_SIZE (4) = 0; then an ACK of the server's.
    frame(out, 4, 0, 0, std::string("\x00\x04\x00\x00\x00\x00", 6));
    frame(out, 4, 1, 0, "");
    std::string headers;
    auto literal = [&headers](const std::string& name, const std::string& value) {
      headers += '\0';  // literal without indexing, new name, no Huffman
      headers += static_cast<char>(name.size());
      headers += name;
      headers += static_cast<char>(value.size());
      headers += value;
    };
    literal(":method", "POST");
    literal(":scheme", "http");
    literal(":path", "/xquant.v1.Generation/Generate");
    literal(":authority", "127.0.0.1");
    literal("content-type", "application/grpc");
    literal("te", "trailers");
    frame(out, 1, 0x4, 1, headers);  // END_HEADERS
    const std::string body = request.SerializeAsString();
    std::string message(5, '\0');
    for (int i = 0; i < 4; ++i) message[1 + i] = static_cast<char>(body.size() >> (24 - 8 * i));
    frame(out, 0, 0x1, 1, message + body);  // END_STREAM
    if (::send(fd_, out.data(), out.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(out.size()))
      throw Error("cannot send");
  }
  ~ZeroWindowClient() { ::close(fd_); }

 private:
  static void frame(std::string& out, uint8_t type, uint8_t flags, uint32_t stream,
                    const std::string& payload) {
    const uint32_t n = static_cast<uint32_t>(payload.size());
    out += static_cast<char>(n >> 16);
    out += static_cast<char>(n >> 8);
    out += static_cast<char>(n);
    out += static_cast<char>(type);
    out += static_cast<char>(flags);
    for (int i = 0; i < 4; ++i) out += static_cast<char>(stream >> (24 - 8 * i));
    out += payload;
  }
  int fd_ = -1;
};

// A client that reads nothing: the write watch cancels the call once a
// write has waited --stall-timeout, and the request is aborted (its cache
// back) long before it could have finished.
TEST_F(ReplicaServerTest, AStalledConsumerIsCancelledAndItsCacheFreed) {
  serve::ReplicaOptions options = base_options();
  options.stall_timeout = 300ms;
  const int32_t whole_context = stories().config().max_seq_len;
  Replica replica(options, 0, true, whole_context);
  // Slow enough that the whole stream would take about 2.5 s.
  replica.executor().every_delay_ = 5ms;
  v1::GenerateRequest request = text_request("Once", whole_context - 2);
  request.mutable_sampling()->set_ignore_eos(true);
  request.mutable_output()->set_logprobs(20);  // about 200 bytes a token
  const int64_t steps_before = replica.load().steps();
  ZeroWindowClient client(replica.server().port(), request);
  ASSERT_TRUE(eventually([&] { return replica.load().running_requests() == 1; }));
  v1::Load after;
  ASSERT_TRUE(eventually([&] {
    after = replica.load();
    return after.running_requests() == 0;
  }));
  EXPECT_EQ(after.ranks(0).cache_bytes_used(), 0);
  // Ended by the cancel, not by running to max_tokens (one step per token).
  EXPECT_LT(after.steps() - steps_before, whole_context - 2 - 50);
}

// A step that runs past --step-timeout: every live request gets a retryable
// UNAVAILABLE error, health goes NOT_SERVING, on_hung is told why.
TEST_F(ReplicaServerTest, AHungStepFailsLiveRequestsUnavailableRetryable) {
  serve::ReplicaOptions options = base_options();
  options.step_timeout = 300ms;
  Replica replica(options);
  grpc::ClientContext context;
  v1::GenerateRequest request = text_request("Once upon a time", 200);
  request.mutable_sampling()->set_ignore_eos(true);
  auto reader = replica.generation().Generate(&context, request);
  v1::GenerateResponse message;
  ASSERT_TRUE(reader->Read(&message));
  replica.executor().next_delay_ = 1500ms;
  StreamResult rest = read_all(*reader);
  ASSERT_TRUE(rest.status.ok()) << rest.status.error_message();
  EXPECT_EQ(rest.errors, 1);
  EXPECT_EQ(rest.finished, 0);
  EXPECT_EQ(rest.error.code(), static_cast<int32_t>(grpc::StatusCode::UNAVAILABLE));
  EXPECT_TRUE(rest.error.retryable());
  EXPECT_TRUE(eventually([&] { return !replica.hung().empty(); }));
  EXPECT_NE(replica.hung().find("step-timeout"), std::string::npos) << replica.hung();
  EXPECT_EQ(replica.health("xquant.v1.Generation"),
            grpc::health::v1::HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(generate(replica, text_request("Hi", 4)).status.error_code(),
            grpc::StatusCode::UNAVAILABLE);
  EXPECT_NE(replica.drain(), 0);
}

// A step that loses a rank: the step's requests (and every other live one)
// end with a retryable UNAVAILABLE, not the engine error the scheduler made
// of it, and run() returns non-zero.
TEST_F(ReplicaServerTest, ALostRankFailsLiveRequestsUnavailableRetryable) {
  Replica replica(base_options());
  grpc::ClientContext context;
  v1::GenerateRequest request = text_request("Once upon a time", 200);
  request.mutable_sampling()->set_ignore_eos(true);
  auto reader = replica.generation().Generate(&context, request);
  v1::GenerateResponse message;
  ASSERT_TRUE(reader->Read(&message));
  replica.executor().lose_rank_ = true;
  StreamResult rest = read_all(*reader);
  ASSERT_TRUE(rest.status.ok()) << rest.status.error_message();
  EXPECT_EQ(rest.errors, 1);
  EXPECT_EQ(rest.error.code(), static_cast<int32_t>(grpc::StatusCode::UNAVAILABLE));
  EXPECT_TRUE(rest.error.retryable());
  EXPECT_NE(rest.error.message().find("a peer did not answer"), std::string::npos);
  EXPECT_EQ(replica.drain(), 1);
  EXPECT_NE(replica.server().failure().find("rank"), std::string::npos);
  EXPECT_EQ(replica.health("xquant.v1.Generation"),
            grpc::health::v1::HealthCheckResponse::NOT_SERVING);
}

// A coordinator's Registry that records what replicas send.
class RecordingRegistry final : public v1::Registry::Service {
 public:
  grpc::Status Register(grpc::ServerContext* context, const v1::RegisterRequest* request,
                        v1::RegisterResponse* response) override {
    std::lock_guard<std::mutex> lock(mutex);
    const auto& metadata = context->client_metadata();
    auto key = metadata.find("authorization");
    keys.push_back(key == metadata.end() ? ""
                                         : std::string(key->second.data(), key->second.size()));
    requests.push_back(*request);
    response->set_heartbeat_ms(50);
    return grpc::Status::OK;
  }
  std::mutex mutex;
  std::vector<v1::RegisterRequest> requests;
  std::vector<std::string> keys;
};

TEST_F(ReplicaServerTest, RegistersWithTheCoordinatorEveryHeartbeat) {
  RecordingRegistry registry;
  grpc::ServerBuilder builder;
  int coordinator_port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &coordinator_port);
  builder.RegisterService(&registry);
  std::unique_ptr<grpc::Server> coordinator = builder.BuildAndStart();
  ASSERT_NE(coordinator_port, 0);
  serve::ReplicaOptions options = base_options();
  options.coordinator = "127.0.0.1:" + std::to_string(coordinator_port);
  options.security.api_key = "k";
  Replica replica(options);
  auto count = [&] {
    std::lock_guard<std::mutex> lock(registry.mutex);
    return registry.requests.size();
  };
  // The first at once, then every 50 ms as the coordinator asked.
  EXPECT_TRUE(eventually([&] { return count() >= 4; }, 5s));
  {
    std::lock_guard<std::mutex> lock(registry.mutex);
    const std::string address = "127.0.0.1:" + std::to_string(replica.server().port());
    EXPECT_EQ(registry.requests[0].address(), address);
    EXPECT_EQ(registry.requests[0].info().replica_id(), address);
    EXPECT_EQ(registry.requests[0].info().max_sequences(), kSequences);
    EXPECT_EQ(registry.keys[0], "Bearer k");
  }
  EXPECT_EQ(replica.drain(), 0);
  const size_t after_drain = count();
  std::this_thread::sleep_for(200ms);
  EXPECT_EQ(count(), after_drain);  // no heartbeat once drained
  coordinator->Shutdown();
}

// A coordinator that cannot be reached is reported on stderr at the first
// failed call (and then at most every 10 s), so an operator sees why the
// replica never shows up in ListReplicas.
TEST(Registration, AnUnreachableCoordinatorIsLogged) {
  // A port bound but not listening: every connection is refused.
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address), 0);
  socklen_t length = sizeof address;
  ASSERT_EQ(getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length), 0);
  const std::string coordinator = "127.0.0.1:" + std::to_string(ntohs(address.sin_port));
  ::testing::internal::CaptureStderr();
  {
    serve::Registration registration(coordinator, serve::Security{}, "127.0.0.1:1",
                                     [] { return v1::ServerInfo(); });
    registration.start();
    std::this_thread::sleep_for(1500ms);
    EXPECT_EQ(registration.registered(), 0);
  }
  const std::string log = ::testing::internal::GetCapturedStderr();
  close(fd);
  EXPECT_NE(log.find("cannot register with " + coordinator), std::string::npos) << log;
}

// A replica told to drain while it warms up never serves: it does not
// announce itself to the coordinator (which would route requests to it) and
// run() returns 0 once warm.
TEST_F(ReplicaServerTest, ADrainDuringWarmUpNeverRegisters) {
  RecordingRegistry registry;
  grpc::ServerBuilder builder;
  int coordinator_port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &coordinator_port);
  builder.RegisterService(&registry);
  std::unique_ptr<grpc::Server> coordinator = builder.BuildAndStart();
  ASSERT_NE(coordinator_port, 0);
  serve::ReplicaOptions options = base_options();
  options.coordinator = "127.0.0.1:" + std::to_string(coordinator_port);
  options.canary_interval = 100ms;
  Replica replica(options, 0, /*start_serving=*/false);
  replica.server().begin_drain();
  EXPECT_EQ(replica.server().run(), 0);
  EXPECT_FALSE(replica.server().load().ready());
  {
    std::lock_guard<std::mutex> lock(registry.mutex);
    EXPECT_TRUE(registry.requests.empty());
  }
  coordinator->Shutdown();
}

TEST_F(ReplicaServerTest, TokenizeAndModelInfo) {
  Replica replica(base_options());
  grpc::ClientContext context;
  v1::TokenizeRequest request;
  request.set_text("Once upon a time");
  v1::TokenizeResponse response;
  ASSERT_TRUE(replica.generation().Tokenize(&context, request, &response).ok());
  const std::vector<int32_t> expected =
      stories().tokenizer().encode("Once upon a time", stories().tokenizer().add_bos());
  EXPECT_EQ(std::vector<int32_t>(response.token_ids().begin(), response.token_ids().end()),
            expected);
  ASSERT_EQ(response.pieces_size(), response.token_ids_size());
  grpc::ClientContext info_context;
  v1::ModelInfo info;
  ASSERT_TRUE(
      replica.generation().GetModelInfo(&info_context, v1::GetModelInfoRequest(), &info).ok());
  EXPECT_EQ(info.name(), "stories260K.bin");
  EXPECT_EQ(info.layers(), 5);
  EXPECT_EQ(info.heads(), 8);
  EXPECT_EQ(info.kv_heads(), 4);
  EXPECT_EQ(info.hidden_size(), 64);
  EXPECT_EQ(info.eos_token_id(), stories().tokenizer().eos_id());
}

}  // namespace
}  // namespace xq
