// The client library (launch/serve/client.h) and `xq client` against an
// in-process fake server: Generation, Control and the standard health
// service, on a free loopback port. The fake's behaviour is chosen by the
// prompt text, and it records what reached it (metadata, cancellation).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "launch/serve/client.h"

extern char** environ;

namespace xq::serve {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using Serving = grpc::health::v1::HealthCheckResponse;

// What the fake saw, shared by its handlers and the test.
struct Observed {
  std::mutex mutex;
  std::condition_variable changed;
  std::multimap<std::string, std::string> metadata;  // of the last call
  int calls = 0;
  int generate_started = 0;
  bool saw_cancel = false;
  int deltas_consumed = 0;  // bumped by the test's handler ("lockstep")

  template <class Predicate>
  bool wait_for(Predicate predicate, std::chrono::milliseconds limit = 10s) {
    std::unique_lock<std::mutex> lock(mutex);
    return changed.wait_for(lock, limit, predicate);
  }
};

void record_call(Observed& observed, const grpc::ServerContext& context) {
  std::lock_guard<std::mutex> lock(observed.mutex);
  ++observed.calls;
  observed.metadata.clear();
  for (const auto& [key, value] : context.client_metadata())
    observed.metadata.emplace(std::string(key.data(), key.size()),
                              std::string(value.data(), value.size()));
  observed.changed.notify_all();
}

// Prompts: "stream N" (N deltas, token i with text "t<i> ", then finished),
// "lockstep N" (the same, each delta only after the client consumed the
// previous one), "hang" (one delta, then waits for the cancel), "error" (a
// delta and an error message), "refuse" (RESOURCE_EXHAUSTED with
// retry-after), "no-terminal" (a delta and the end of the stream).
class FakeGeneration final : public v1::Generation::Service {
 public:
  explicit FakeGeneration(Observed& observed) : observed_(observed) {}

  grpc::Status Generate(grpc::ServerContext* context, const v1::GenerateRequest* request,
                        grpc::ServerWriter<v1::GenerateResponse>* writer) override {
    record_call(observed_, *context);
    {
      std::lock_guard<std::mutex> lock(observed_.mutex);
      ++observed_.generate_started;
      observed_.changed.notify_all();
    }
    const std::string id = request->request_id().empty() ? "fake-1" : request->request_id();
    const std::string prompt = request->text();
    v1::GenerateResponse response;
    response.set_request_id(id);
    const auto write_delta = [&](int i) {
      v1::GenerateResponse delta = response;
      delta.mutable_delta()->add_token_ids(i);
      delta.mutable_delta()->set_text("t" + std::to_string(i) + " ");
      return writer->Write(delta);
    };
    if (prompt.rfind("stream", 0) == 0 || prompt.rfind("lockstep", 0) == 0) {
      const bool lockstep = prompt.rfind("lockstep", 0) == 0;
      const int count = std::stoi(prompt.substr(prompt.find(' ') + 1));
      for (int i = 0; i < count; ++i) {
        if (lockstep && !observed_.wait_for([&] { return observed_.deltas_consumed >= i; }, 5s))
          return {grpc::StatusCode::INTERNAL,
                  "the client did not see delta " + std::to_string(i - 1) + " before the next"};
        if (!write_delta(i)) return grpc::Status::CANCELLED;
      }
      v1::Finished& finished = *response.mutable_finished();
      finished.set_reason(v1::FINISH_REASON_LENGTH);
      finished.set_detail("max_tokens");
      finished.set_text("end");
      finished.mutable_usage()->set_prompt_tokens(3);
      finished.mutable_usage()->set_completion_tokens(count);
      finished.set_replica_id("fake");
      writer->Write(response);
      return grpc::Status::OK;
    }
    if (prompt == "hang") {
      write_delta(0);
      const Clock::time_point end = Clock::now() + 10s;
      while (!context->IsCancelled() && Clock::now() < end) std::this_thread::sleep_for(5ms);
      std::lock_guard<std::mutex> lock(observed_.mutex);
      observed_.saw_cancel = context->IsCancelled();
      observed_.changed.notify_all();
      return grpc::Status::CANCELLED;
    }
    if (prompt == "error") {
      write_delta(0);
      v1::Error& error = *response.mutable_error();
      error.set_code(static_cast<int>(grpc::StatusCode::UNAVAILABLE));
      error.set_message("the replica died");
      error.set_retryable(true);
      writer->Write(response);
      return grpc::Status::OK;
    }
    if (prompt == "refuse") {
      context->AddTrailingMetadata("retry-after", "3");
      return {grpc::StatusCode::RESOURCE_EXHAUSTED, "queue full"};
    }
    if (prompt == "no-terminal") {
      write_delta(0);
      return grpc::Status::OK;
    }
    return {grpc::StatusCode::INVALID_ARGUMENT, "the fake does not know prompt '" + prompt + "'"};
  }

  grpc::Status Tokenize(grpc::ServerContext* context, const v1::TokenizeRequest* request,
                        v1::TokenizeResponse* response) override {
    record_call(observed_, *context);
    // One token per byte: id = the byte.
    for (unsigned char c : request->text()) {
      response->add_token_ids(c);
      response->add_pieces(std::string(1, static_cast<char>(c)));
    }
    return grpc::Status::OK;
  }

  grpc::Status GetModelInfo(grpc::ServerContext* context, const v1::GetModelInfoRequest*,
                            v1::ModelInfo* info) override {
    record_call(observed_, *context);
    info->set_name("fake-model");
    info->set_vocab_size(512);
    return grpc::Status::OK;
  }

 private:
  Observed& observed_;
};

class FakeControl final : public v1::Control::Service {
 public:
  explicit FakeControl(Observed& observed) : observed_(observed) {}
  grpc::Status GetLoad(grpc::ServerContext* context, const v1::GetLoadRequest*,
                       v1::Load* load) override {
    record_call(observed_, *context);
    load->set_running_requests(2);
    load->set_free_blocks(7);
    load->set_ready(true);
    return grpc::Status::OK;
  }
  grpc::Status GetServerInfo(grpc::ServerContext* context, const v1::GetServerInfoRequest*,
                             v1::ServerInfo* info) override {
    record_call(observed_, *context);
    info->set_replica_id("fake");
    info->set_tp(2);
    return grpc::Status::OK;
  }
  grpc::Status Abort(grpc::ServerContext* context, const v1::AbortRequest* request,
                     v1::AbortResponse* response) override {
    record_call(observed_, *context);
    response->set_found(request->request_id() == "known");
    return grpc::Status::OK;
  }

 private:
  Observed& observed_;
};

// A port free now (bound to 0 and read back, then released), for a server
// that has to start after its client.
int free_port() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address));
  socklen_t length = sizeof(address);
  getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length);
  close(fd);
  return ntohs(address.sin_port);
}

class FakeServer {
 public:
  // port 0: any free port.
  explicit FakeServer(int port = 0) : generation_(observed), control_(observed) {
    grpc::EnableDefaultHealthCheckService(true);
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:" + std::to_string(port), grpc::InsecureServerCredentials(),
                             &port_);
    builder.RegisterService(&generation_);
    builder.RegisterService(&control_);
    server_ = builder.BuildAndStart();
    if (!server_) return;  // the port is taken: started() says so
    server_->GetHealthCheckService()->SetServingStatus("", true);
    set_ready(false);
  }
  ~FakeServer() {
    if (server_) server_->Shutdown(std::chrono::system_clock::now() + 2s);
  }

  void set_ready(bool ready) {
    if (server_) server_->GetHealthCheckService()->SetServingStatus(kGenerationService, ready);
  }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  bool started() const { return server_ != nullptr && port_ > 0; }

  Observed observed;

 private:
  FakeGeneration generation_;
  FakeControl control_;
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
};

v1::GenerateRequest prompt(const std::string& text) {
  v1::GenerateRequest request;
  request.set_text(text);
  request.mutable_sampling()->set_max_tokens(16);
  return request;
}

std::string metadata_value(Observed& observed, const std::string& key) {
  std::lock_guard<std::mutex> lock(observed.mutex);
  const auto found = observed.metadata.find(key);
  return found == observed.metadata.end() ? "<absent>" : found->second;
}

TEST(Client, StreamsDeltasInOrderAsTheyArriveAndKeepsFinished) {
  FakeServer server;
  ASSERT_TRUE(server.started());
  Client client(server.address());
  std::vector<int32_t> seen_ids;
  std::string seen_text;
  // Lockstep: the fake writes delta i only after this handler saw delta
  // i-1, so a client that buffered the stream would fail the call.
  const GenerateResult result = client.generate(prompt("lockstep 6"), {}, [&](const v1::Delta& d) {
    seen_ids.insert(seen_ids.end(), d.token_ids().begin(), d.token_ids().end());
    seen_text += d.text();
    std::lock_guard<std::mutex> lock(server.observed.mutex);
    ++server.observed.deltas_consumed;
    server.observed.changed.notify_all();
    return true;
  });
  ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  EXPECT_TRUE(result.ok());
  EXPECT_EQ(seen_ids, (std::vector<int32_t>{0, 1, 2, 3, 4, 5}));
  EXPECT_EQ(result.token_ids, seen_ids);
  EXPECT_EQ(seen_text, "t0 t1 t2 t3 t4 t5 ");
  EXPECT_EQ(result.text, seen_text + "end");  // the finished text comes last
  ASSERT_TRUE(result.finished.has_value());
  EXPECT_EQ(result.finished->reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(result.finished->usage().completion_tokens(), 6);
  EXPECT_FALSE(result.error.has_value());
  EXPECT_EQ(result.request_id, "fake-1");
  EXPECT_GE(result.first_token_seconds, 0);
  EXPECT_LE(result.first_token_seconds, result.total_seconds);
}

TEST(Client, RoutingOptionsAndMetadataReachTheServer) {
  FakeServer server;
  Client client(server.address());
  CallOptions options;
  options.routing_key = "session-7";
  options.priority = -3;
  options.routing_policy = "round-robin";
  options.metadata = {{"x-trace", "abc"}};
  v1::GenerateRequest request = prompt("stream 1");
  request.set_request_id("mine");
  const GenerateResult result = client.generate(request, options);
  ASSERT_TRUE(result.ok()) << result.status.error_message();
  EXPECT_EQ(result.request_id, "mine");
  EXPECT_EQ(metadata_value(server.observed, "x-routing-key"), "session-7");
  EXPECT_EQ(metadata_value(server.observed, "x-priority"), "-3");
  EXPECT_EQ(metadata_value(server.observed, "x-routing-policy"), "round-robin");
  EXPECT_EQ(metadata_value(server.observed, "x-trace"), "abc");
  EXPECT_EQ(metadata_value(server.observed, "authorization"), "<absent>");
}

TEST(Client, ApiKeyReachesTheServerAsBearer) {
  FakeServer server;
  Security security;
  security.api_key = "K";
  Client client(server.address(), security);
  ASSERT_TRUE(client.generate(prompt("stream 1")).ok());
  EXPECT_EQ(metadata_value(server.observed, "authorization"), "Bearer K");
  v1::ModelInfo info;
  ASSERT_TRUE(client.model_info(&info).ok());
  EXPECT_EQ(metadata_value(server.observed, "authorization"), "Bearer K");
}

TEST(Client, BadMetadataFailsBeforeAnythingIsSent) {
  FakeServer server;
  Client client(server.address());
  CallOptions options;
  options.metadata = {{"Not Lowercase", "x"}};
  GenerateResult result = client.generate(prompt("stream 1"), options);
  EXPECT_EQ(result.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  options.metadata = {{"x-ok", "line\nbreak"}};
  result = client.generate(prompt("stream 1"), options);
  EXPECT_EQ(result.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  std::lock_guard<std::mutex> lock(server.observed.mutex);
  EXPECT_EQ(server.observed.calls, 0);
}

TEST(Client, CancelFromTheHandlerEndsTheCallAndTheServerSeesIt) {
  FakeServer server;
  Client client(server.address());
  int deltas = 0;
  const Clock::time_point start = Clock::now();
  const GenerateResult result = client.generate(prompt("hang"), {}, [&](const v1::Delta&) {
    ++deltas;
    return false;
  });
  EXPECT_LT(Clock::now() - start, 5s);  // the fake gives up waiting after 10 s
  EXPECT_EQ(deltas, 1);
  EXPECT_TRUE(result.cancelled_by_handler);
  EXPECT_EQ(result.status.error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_FALSE(result.ok());
  EXPECT_TRUE(server.observed.wait_for([&] { return server.observed.saw_cancel; }))
      << "the server never saw the cancellation";
}

TEST(Client, CancelAllFromAnotherThreadEndsAGenerate) {
  FakeServer server;
  Client client(server.address());
  std::thread canceller([&] {
    server.observed.wait_for([&] { return server.observed.generate_started > 0; });
    std::this_thread::sleep_for(50ms);
    client.cancel_all();
  });
  const GenerateResult result = client.generate(prompt("hang"));
  canceller.join();
  EXPECT_EQ(result.status.error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_FALSE(result.cancelled_by_handler);
  EXPECT_TRUE(server.observed.wait_for([&] { return server.observed.saw_cancel; }));
  // The client works on after a cancel_all.
  EXPECT_TRUE(client.generate(prompt("stream 2")).ok());
}

TEST(Client, TimeoutIsDeadlineExceeded) {
  FakeServer server;
  Client client(server.address());
  CallOptions options;
  options.timeout = 200ms;
  const Clock::time_point start = Clock::now();
  const GenerateResult result = client.generate(prompt("hang"), options);
  const auto elapsed = Clock::now() - start;
  EXPECT_EQ(result.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_GE(elapsed, 200ms);
  EXPECT_LT(elapsed, 5s);
  EXPECT_TRUE(server.observed.wait_for([&] { return server.observed.saw_cancel; }));
}

TEST(Client, ErrorMessageIsTheResultWithAnOkStatus) {
  FakeServer server;
  Client client(server.address());
  const GenerateResult result = client.generate(prompt("error"));
  EXPECT_TRUE(result.status.ok());
  EXPECT_FALSE(result.ok());
  ASSERT_TRUE(result.error.has_value());
  EXPECT_EQ(result.error->code(), static_cast<int>(grpc::StatusCode::UNAVAILABLE));
  EXPECT_TRUE(result.error->retryable());
  EXPECT_FALSE(result.finished.has_value());
  EXPECT_EQ(result.token_ids, std::vector<int32_t>{0});
}

TEST(Client, RefusalKeepsStatusAndRetryAfter) {
  FakeServer server;
  Client client(server.address());
  const GenerateResult result = client.generate(prompt("refuse"));
  EXPECT_EQ(result.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(result.retry_after_seconds, 3);
  EXPECT_TRUE(result.token_ids.empty());
}

TEST(Client, StreamWithoutATerminalMessageIsInternal) {
  FakeServer server;
  Client client(server.address());
  const GenerateResult result = client.generate(prompt("no-terminal"));
  EXPECT_EQ(result.status.error_code(), grpc::StatusCode::INTERNAL);
}

TEST(Client, UnaryCalls) {
  FakeServer server;
  Client client(server.address());
  v1::TokenizeRequest tokenize;
  tokenize.set_text("ab");
  v1::TokenizeResponse tokens;
  ASSERT_TRUE(client.tokenize(tokenize, &tokens).ok());
  EXPECT_EQ(std::vector<int32_t>(tokens.token_ids().begin(), tokens.token_ids().end()),
            (std::vector<int32_t>{'a', 'b'}));
  v1::ModelInfo model;
  ASSERT_TRUE(client.model_info(&model).ok());
  EXPECT_EQ(model.name(), "fake-model");
  v1::ServerInfo info;
  ASSERT_TRUE(client.server_info(&info).ok());
  EXPECT_EQ(info.tp(), 2);
  v1::Load load;
  ASSERT_TRUE(client.load(&load).ok());
  EXPECT_EQ(load.free_blocks(), 7);
  bool found = false;
  ASSERT_TRUE(client.abort("known", &found).ok());
  EXPECT_TRUE(found);
  ASSERT_TRUE(client.abort("unknown", &found).ok());
  EXPECT_FALSE(found);
  // The fake has no Registry, as a replica has none.
  v1::ListReplicasResponse replicas;
  EXPECT_EQ(client.list_replicas(&replicas).error_code(), grpc::StatusCode::UNIMPLEMENTED);
}

TEST(Client, HealthCheckAndWaitReady) {
  FakeServer server;
  Client client(server.address());
  Client::ServingStatus status = Serving::UNKNOWN;
  ASSERT_TRUE(client.health_check("", &status).ok());
  EXPECT_EQ(status, Serving::SERVING);
  ASSERT_TRUE(client.health_check(kGenerationService, &status).ok());
  EXPECT_EQ(status, Serving::NOT_SERVING);
  EXPECT_EQ(client.health_check("no.such.Service", &status).error_code(),
            grpc::StatusCode::NOT_FOUND);

  const grpc::Status not_yet = client.wait_ready(kGenerationService, 300ms);
  EXPECT_EQ(not_yet.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_NE(not_yet.error_message().find("NOT_SERVING"), std::string::npos)
      << not_yet.error_message();

  std::thread make_ready([&] {
    std::this_thread::sleep_for(300ms);
    server.set_ready(true);
  });
  const Clock::time_point start = Clock::now();
  const grpc::Status ready = client.wait_ready(kGenerationService, 10s);
  const auto waited = Clock::now() - start;
  make_ready.join();
  EXPECT_TRUE(ready.ok()) << ready.error_message();
  EXPECT_GE(waited, 250ms);  // it did wait for the change
  EXPECT_LT(waited, 3s);
}

TEST(Client, WaitReadyForAServerThatStartsLater) {
  const int port = free_port();
  Client client("127.0.0.1:" + std::to_string(port));
  std::unique_ptr<FakeServer> server;
  std::thread start_later([&] {
    std::this_thread::sleep_for(1500ms);  // past a few of gRPC's reconnect attempts
    server = std::make_unique<FakeServer>(port);
    server->set_ready(true);
  });
  const grpc::Status ready = client.wait_ready(kGenerationService, 20s);
  start_later.join();
  ASSERT_TRUE(server->started()) << "port " << port << " was taken meanwhile";
  EXPECT_TRUE(ready.ok()) << ready.error_message();
}

TEST(Client, WaitReadyEndsOnCancelAll) {
  Client client("127.0.0.1:" + std::to_string(free_port()));  // nothing listens
  std::thread canceller([&] {
    std::this_thread::sleep_for(200ms);
    client.cancel_all();
  });
  const Clock::time_point start = Clock::now();
  const grpc::Status status = client.wait_ready(kGenerationService, 20s);
  canceller.join();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_LT(Clock::now() - start, 5s);
}

// ---------------------------------------------------------------- xq client

struct CliRun {
  int exit_code = -1;
  int signal = 0;
  std::string out, err;
};

class ClientCli : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern =
        (std::filesystem::temp_directory_path() / "xq_client_test.XXXXXX").string();
    ASSERT_NE(mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
  }
  void TearDown() override {
    std::error_code ignored;
    std::filesystem::remove_all(dir_, ignored);
  }

  pid_t spawn(const std::vector<std::string>& args) {
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&actions, 1, (dir_ + "/out").c_str(),
                                     O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_addopen(&actions, 2, (dir_ + "/err").c_str(),
                                     O_WRONLY | O_CREAT | O_TRUNC, 0644);
    std::vector<std::string> strings = {XQ_BINARY, "client"};
    strings.insert(strings.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (std::string& s : strings) argv.push_back(s.data());
    argv.push_back(nullptr);
    pid_t pid = -1;
    const int error = posix_spawn(&pid, XQ_BINARY, &actions, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    return error == 0 ? pid : -1;
  }

  CliRun wait(pid_t pid) {
    CliRun run;
    int status = 0;
    waitpid(pid, &status, 0);
    if (WIFEXITED(status)) run.exit_code = WEXITSTATUS(status);
    if (WIFSIGNALED(status)) run.signal = WTERMSIG(status);
    run.out = read(dir_ + "/out");
    run.err = read(dir_ + "/err");
    return run;
  }

  CliRun run(const std::vector<std::string>& args) { return wait(spawn(args)); }

  static std::string read(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::stringstream text;
    text << in.rdbuf();
    return text.str();
  }

  std::string dir_;
};

TEST_F(ClientCli, StreamsTextAndSummary) {
  FakeServer server;
  const CliRun r = run({"--address", server.address(), "--prompt", "stream 3"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "t0 t1 t2 end");
  EXPECT_NE(r.err.find("finished: length (max_tokens)"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("3 prompt + 3 completion tokens"), std::string::npos) << r.err;
}

TEST_F(ClientCli, JsonIsOneObjectPerMessage) {
  FakeServer server;
  const CliRun r = run({"--address", server.address(), "--prompt", "stream 2", "--json",
                        "--request-id", "r1", "--api-key", "K", "--stop", "[\"a\", \"b\"]"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  std::vector<nlohmann::json> lines;
  std::istringstream in(r.out);
  for (std::string line; std::getline(in, line);) lines.push_back(nlohmann::json::parse(line));
  ASSERT_EQ(lines.size(), 3u) << r.out;
  for (const nlohmann::json& line : lines) EXPECT_EQ(line["request_id"], "r1");
  EXPECT_EQ(lines[0]["delta"]["token_ids"], nlohmann::json::array({0}));
  EXPECT_EQ(lines[1]["delta"]["text"], "t1 ");
  EXPECT_EQ(lines[2]["finished"]["reason"], "length");
  EXPECT_EQ(lines[2]["finished"]["usage"]["completion_tokens"], 2);
  EXPECT_EQ(metadata_value(server.observed, "authorization"), "Bearer K");
}

TEST_F(ClientCli, ErrorMessageAndRefusalExitOne) {
  FakeServer server;
  CliRun r = run({"--address", server.address(), "--prompt", "error"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("UNAVAILABLE: the replica died (retryable)"), std::string::npos) << r.err;
  r = run({"--address", server.address(), "--prompt", "refuse"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("RESOURCE_EXHAUSTED"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("retry after 3 s"), std::string::npos) << r.err;
}

TEST_F(ClientCli, BadArgumentsExitTwo) {
  for (const std::vector<std::string>& args :
       std::vector<std::vector<std::string>>{{"--prompt-ids", "1,x"},
                                             {"--prompt", "a", "--prompt-ids", "1"},
                                             {},
                                             {"--prompt", "a", "--stop", "[1]"},
                                             {"--prompt", "a", "--max-tokens", "0"},
                                             {"--no-such-option"},
                                             {"--info", "--load"}}) {
    const CliRun r = run(args);
    EXPECT_EQ(r.exit_code, 2) << r.err;
    EXPECT_EQ(r.err.rfind("error: ", 0), 0u) << r.err;
  }
}

TEST_F(ClientCli, WaitReadyAndActions) {
  FakeServer server;
  CliRun r = run({"--address", server.address(), "--wait-ready", "0.3"});
  EXPECT_EQ(r.exit_code, 1) << r.err;  // NOT_SERVING yet
  EXPECT_NE(r.err.find("DEADLINE_EXCEEDED"), std::string::npos) << r.err;
  server.set_ready(true);
  r = run({"--address", server.address(), "--wait-ready", "5"});
  EXPECT_EQ(r.exit_code, 0) << r.err;

  r = run({"--address", server.address(), "--load"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(r.out)["load"]["free_blocks"], 7);
  r = run({"--address", server.address(), "--info"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const nlohmann::json info = nlohmann::json::parse(r.out);
  EXPECT_EQ(info["model"]["name"], "fake-model");
  EXPECT_EQ(info["server"]["replica_id"], "fake");
  r = run({"--address", server.address(), "--abort", "known"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(r.out)["found"], true);
  r = run({"--address", server.address(), "--tokenize", "--prompt", "hi"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(r.out)["token_ids"], nlohmann::json::array({'h', 'i'}));
}

TEST_F(ClientCli, SigintCancelsTheCall) {
  FakeServer server;
  const pid_t pid = spawn({"--address", server.address(), "--prompt", "hang"});
  ASSERT_GT(pid, 0);
  ASSERT_TRUE(server.observed.wait_for([&] { return server.observed.generate_started > 0; }));
  std::this_thread::sleep_for(100ms);  // the delta reaches the client
  kill(pid, SIGINT);
  const CliRun r = wait(pid);
  EXPECT_EQ(r.signal, 0) << "killed by the signal instead of cancelling";
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find("interrupted"), std::string::npos) << r.err;
  EXPECT_EQ(r.out, "t0 ");
  EXPECT_TRUE(server.observed.wait_for([&] { return server.observed.saw_cancel; }));
}

}  // namespace
}  // namespace xq::serve
