#include "launch/client_tool.h"

#include <fcntl.h>
#include <google/protobuf/util/json_util.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "kernels/error.h"
#include "launch/arguments.h"
#include "launch/chat_prompt.h"
#include "launch/security_options.h"
#include "launch/serve/client.h"

namespace xq {
namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;
namespace v1 = ::xquant::v1;

constexpr int kExitOk = 0, kExitFailed = 1, kExitUsage = 2;

// The write end of the pipe that carries signals to InterruptWatch's thread.
int interrupt_pipe_write = -1;

extern "C" void forward_interrupt(int signal) {
  const int saved_errno = errno;
  const unsigned char byte = static_cast<unsigned char>(signal);
  [[maybe_unused]] const ssize_t written = write(interrupt_pipe_write, &byte, 1);
  errno = saved_errno;
}

// SIGINT and SIGTERM become a cancel of the calls in progress. The handler
// only writes the signal's number to a pipe (any thread may take the
// signal: libraries start threads of their own before main); one thread
// reads it and cancels. A second signal while the first cancel is still
// unwinding ends the process.
class InterruptWatch {
 public:
  InterruptWatch() {
    if (pipe2(pipe_, O_CLOEXEC) != 0) throw Error("client: cannot create a pipe");
    // The handler must never block, whatever is queued.
    fcntl(pipe_[1], F_SETFL, fcntl(pipe_[1], F_GETFL) | O_NONBLOCK);
    interrupt_pipe_write = pipe_[1];
    struct sigaction action {};
    action.sa_handler = forward_interrupt;
    sigemptyset(&action.sa_mask);
    action.sa_flags = SA_RESTART;
    sigaction(SIGINT, &action, &previous_int_);
    sigaction(SIGTERM, &action, &previous_term_);
  }
  ~InterruptWatch() {
    stop();
    sigaction(SIGINT, &previous_int_, nullptr);
    sigaction(SIGTERM, &previous_term_, nullptr);
    interrupt_pipe_write = -1;
    close(pipe_[0]);
    close(pipe_[1]);
  }
  InterruptWatch(const InterruptWatch&) = delete;
  InterruptWatch& operator=(const InterruptWatch&) = delete;

  void watch(serve::Client& client) {
    thread_ = std::thread([this, &client] {
      unsigned char signal = 0;
      while (true) {
        const ssize_t got = read(pipe_[0], &signal, 1);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0 || signal == kStop) return;
        if (interrupted_.exchange(signal) != 0) std::_Exit(128 + signal);
        client.cancel_all();
      }
    });
  }
  // Ends the watching thread; after it the client may go.
  void stop() {
    if (!thread_.joinable()) return;
    const unsigned char byte = kStop;
    while (write(pipe_[1], &byte, 1) < 0 && errno == EINTR) {
    }
    thread_.join();
  }
  int interrupted() const { return interrupted_; }

 private:
  static constexpr unsigned char kStop = 0;  // no signal has number 0
  int pipe_[2] = {-1, -1};
  struct sigaction previous_int_ {};
  struct sigaction previous_term_ {};
  std::atomic<int> interrupted_{0};
  std::thread thread_;
};

// Bad command-line input: exit status 2.
struct UsageError : Error {
  using Error::Error;
};

std::string dump(const json& value) {
  return value.dump(-1, ' ', false, json::error_handler_t::replace);
}

json message_json(const google::protobuf::Message& message) {
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  options.always_print_primitive_fields = true;
  std::string text;
  if (!google::protobuf::util::MessageToJsonString(message, &text, options).ok())
    return json::object();
  return json::parse(text, nullptr, false);
}

std::string reason_name(v1::FinishReason reason) {
  switch (reason) {
    case v1::FINISH_REASON_LENGTH:
      return "length";
    case v1::FINISH_REASON_EOS:
      return "eos";
    case v1::FINISH_REASON_STOP_STRING:
      return "stop_string";
    case v1::FINISH_REASON_CANCELLED:
      return "cancelled";
    default:
      return "unspecified";
  }
}

std::vector<int32_t> parse_ids(const std::string& text) {
  std::vector<int32_t> ids;
  size_t start = 0;
  while (start <= text.size()) {
    const size_t comma = std::min(text.find(',', start), text.size());
    const std::string item = text.substr(start, comma - start);
    char* end = nullptr;
    errno = 0;
    const long long id = std::strtoll(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0' || errno != 0 || id < 0 ||
        id > std::numeric_limits<int32_t>::max())
      throw UsageError("client: --prompt-ids wants token ids like 1,2,3, got '" + item + "'");
    ids.push_back(static_cast<int32_t>(id));
    start = comma + 1;
  }
  return ids;
}

std::vector<std::string> parse_stop(const std::string& text) {
  if (text.empty() || text[0] != '[') return {text};
  const json list = json::parse(text, nullptr, false);
  std::vector<std::string> stop;
  if (list.is_array())
    for (const json& item : list)
      if (item.is_string()) stop.push_back(item.get<std::string>());
  if (!list.is_array() || stop.size() != list.size())
    throw UsageError(
        "client: --stop wants a string or a JSON list of strings like '[\"\\n\", \"END\"]'");
  return stop;
}

int64_t int_option(const Arguments& args, const std::string& name, int64_t min, int64_t max) {
  try {
    return args.get_int(name, min, max);
  } catch (const Error& e) {
    throw UsageError(e.what());
  }
}

double float_option(const Arguments& args, const std::string& name, double min) {
  double value;
  try {
    value = args.get_float(name);
  } catch (const Error& e) {
    throw UsageError(e.what());
  }
  if (value < min)
    throw UsageError("client: --" + name + " must be at least " + std::to_string(min));
  return value;
}

v1::GenerateRequest generate_request(const Arguments& args) {
  v1::GenerateRequest request;
  if (args.has("prompt") == args.has("prompt-ids"))
    throw UsageError("client: give exactly one of --prompt and --prompt-ids (see --help)");
  if (args.has("chat") && !args.has("prompt"))
    throw UsageError("client: --chat formats --prompt (not --prompt-ids)");
  if (!args.has("chat") && (args.has("system") || args.has("chat-template")))
    throw UsageError("client: --system and --chat-template go with --chat");
  if (args.has("chat-template")) {
    try {
      ChatTemplate::from_name(args.get("chat-template"));
    } catch (const Error& e) {
      throw UsageError(std::string("client: ") + e.what());
    }
  }
  if (args.has("prompt")) {
    request.set_text(args.get("prompt"));
  } else {
    for (int32_t id : parse_ids(args.get("prompt-ids"))) request.mutable_token_ids()->add_ids(id);
  }
  if (args.has("request-id")) request.set_request_id(args.get("request-id"));
  v1::SamplingParams& sampling = *request.mutable_sampling();
  sampling.set_max_tokens(static_cast<int32_t>(int_option(args, "max-tokens", 1, INT32_MAX)));
  sampling.set_temperature(static_cast<float>(float_option(args, "temperature", 0)));
  sampling.set_top_k(static_cast<int32_t>(int_option(args, "top-k", 0, INT32_MAX)));
  if (args.has("top-p")) sampling.set_top_p(static_cast<float>(float_option(args, "top-p", 0)));
  if (args.has("seed"))
    sampling.set_seed(
        static_cast<uint64_t>(int_option(args, "seed", 0, std::numeric_limits<int64_t>::max())));
  if (args.has("stop"))
    for (const std::string& stop : parse_stop(args.get("stop"))) sampling.add_stop(stop);
  sampling.set_ignore_eos(args.has("ignore-eos"));
  if (args.has("logprobs"))
    request.mutable_output()->set_logprobs(
        static_cast<int32_t>(int_option(args, "logprobs", 0, INT32_MAX)));
  return request;
}

json delta_json(const v1::Delta& delta) {
  json out = {
      {"token_ids", std::vector<int32_t>(delta.token_ids().begin(), delta.token_ids().end())},
      {"text", delta.text()}};
  if (delta.logprobs_size() > 0) {
    json logprobs = json::array();
    for (const v1::TokenLogprob& token : delta.logprobs()) {
      json top = json::array();
      for (const v1::TopLogprob& t : token.top())
        top.push_back({{"token_id", t.token_id()}, {"logprob", t.logprob()}});
      logprobs.push_back(
          {{"token_id", token.token_id()}, {"logprob", token.logprob()}, {"top", top}});
    }
    out["logprobs"] = logprobs;
  }
  return out;
}

json finished_json(const v1::Finished& finished) {
  return {{"reason", reason_name(finished.reason())},
          {"detail", finished.detail()},
          {"text", finished.text()},
          {"usage",
           {{"prompt_tokens", finished.usage().prompt_tokens()},
            {"completion_tokens", finished.usage().completion_tokens()}}},
          {"timings",
           {{"queue_seconds", finished.timings().queue_seconds()},
            {"prefill_seconds", finished.timings().prefill_seconds()},
            {"decode_seconds", finished.timings().decode_seconds()}}},
          {"replica_id", finished.replica_id()}};
}

json error_json(const v1::Error& error) {
  return {{"code", error.code()},
          {"code_name", serve::status_code_name(error.code())},
          {"message", error.message()},
          {"retryable", error.retryable()}};
}

void print_line(const json& value) {
  std::printf("%s\n", dump(value).c_str());
  std::fflush(stdout);
}

// A non-OK status on stderr, with its code's name; the exit status.
int report_status(const grpc::Status& status, const char* what, int interrupted) {
  if (interrupted != 0 && status.error_code() == grpc::StatusCode::CANCELLED) {
    std::fprintf(stderr, "error: %s: interrupted (%s), the call was cancelled\n", what,
                 strsignal(interrupted));
    return kExitFailed;
  }
  std::fprintf(stderr, "error: %s: %s: %s\n", what, serve::status_code_name(status.error_code()),
               status.error_message().c_str());
  return kExitFailed;
}

int run_generate(serve::Client& client, const Arguments& args, const v1::GenerateRequest& request,
                 const serve::CallOptions& options, const InterruptWatch& interrupts) {
  const bool as_json = args.has("json");
  const Clock::time_point start = Clock::now();
  double first_token = -1;
  double end = 0;
  bool text_ends_line = true;
  const auto seconds = [&] { return std::chrono::duration<double>(Clock::now() - start).count(); };
  const auto write_text = [&](const std::string& text) {
    if (text.empty()) return;
    std::fwrite(text.data(), 1, text.size(), stdout);
    std::fflush(stdout);
    text_ends_line = text.back() == '\n';
  };

  serve::GenerateResult result =
      client.generate_stream(request, options, [&](const v1::GenerateResponse& response) {
        json line = {{"request_id", response.request_id()}};
        switch (response.event_case()) {
          case v1::GenerateResponse::kDelta:
            if (first_token < 0 && response.delta().token_ids_size() > 0) first_token = seconds();
            if (!as_json) write_text(response.delta().text());
            line["delta"] = delta_json(response.delta());
            break;
          case v1::GenerateResponse::kFinished:
            end = seconds();
            if (!as_json) write_text(response.finished().text());
            line["finished"] = finished_json(response.finished());
            line["client"] = {{"ttft_seconds", first_token}, {"total_seconds", end}};
            break;
          case v1::GenerateResponse::kError:
            end = seconds();
            line["error"] = error_json(response.error());
            break;
          default:
            return true;
        }
        if (as_json) print_line(line);
        return true;
      });
  // stdout keeps the exact text; when it did not end a line, the summary on
  // stderr starts a new one (both often share a terminal or a log).
  const char* summary_break = "";
  if (!as_json && !text_ends_line) {
    if (isatty(STDOUT_FILENO))
      write_text("\n");
    else
      summary_break = "\n";
  }

  if (!result.status.ok()) {
    const int code = report_status(result.status, "generate", interrupts.interrupted());
    if (result.retry_after_seconds >= 0)
      std::fprintf(stderr, "the server asks to retry after %d s\n", result.retry_after_seconds);
    return code;
  }
  if (result.error) {
    std::fprintf(stderr, "error: generate: %s: %s%s (request %s)\n",
                 serve::status_code_name(result.error->code()), result.error->message().c_str(),
                 result.error->retryable() ? " (retryable)" : "", result.request_id.c_str());
    return kExitFailed;
  }
  const v1::Finished& finished = *result.finished;
  const std::string reason = reason_name(finished.reason()) +
                             (finished.detail().empty() ? "" : " (" + finished.detail() + ")");
  std::fprintf(stderr,
               "%sfinished: %s; %d prompt + %d completion tokens; ttft %.3f s, total %.3f s; "
               "server: queue %.3f s, prefill %.3f s, decode %.3f s; replica %s; request %s\n",
               summary_break, reason.c_str(), finished.usage().prompt_tokens(),
               finished.usage().completion_tokens(), first_token, end,
               finished.timings().queue_seconds(), finished.timings().prefill_seconds(),
               finished.timings().decode_seconds(),
               finished.replica_id().empty() ? "-" : finished.replica_id().c_str(),
               result.request_id.c_str());
  return kExitOk;
}

int run_action(serve::Client& client, const Arguments& args, const serve::CallOptions& options,
               const InterruptWatch& interrupts) {
  if (args.has("wait-ready")) {
    const double wait = float_option(args, "wait-ready", 0);
    grpc::Status status = client.wait_ready(
        serve::kGenerationService,
        std::chrono::milliseconds(static_cast<int64_t>(std::min(wait, 1e9) * 1000)));
    if (!status.ok()) return report_status(status, "wait-ready", interrupts.interrupted());
    std::fprintf(stderr, "ready: %s is serving\n", args.get("address").c_str());
    return kExitOk;
  }
  if (args.has("tokenize")) {
    if (!args.has("prompt")) throw UsageError("client: --tokenize needs --prompt");
    v1::TokenizeRequest request;
    request.set_text(args.get("prompt"));
    v1::TokenizeResponse response;
    grpc::Status status = client.tokenize(request, &response, options);
    if (!status.ok()) return report_status(status, "tokenize", interrupts.interrupted());
    json pieces = json::array();
    for (const std::string& piece : response.pieces()) pieces.push_back(piece);
    print_line({{"token_ids",
                 std::vector<int32_t>(response.token_ids().begin(), response.token_ids().end())},
                {"pieces", pieces}});
    return kExitOk;
  }
  if (args.has("info")) {
    v1::ModelInfo model;
    grpc::Status status = client.model_info(&model, options);
    if (!status.ok()) return report_status(status, "info", interrupts.interrupted());
    json out = {{"model", message_json(model)}};
    // A replica also describes itself; a coordinator has no Control service.
    v1::ServerInfo server;
    status = client.server_info(&server, options);
    if (status.ok())
      out["server"] = message_json(server);
    else if (status.error_code() != grpc::StatusCode::UNIMPLEMENTED)
      return report_status(status, "info (GetServerInfo)", interrupts.interrupted());
    print_line(out);
    return kExitOk;
  }
  if (args.has("load")) {
    // A replica answers GetLoad; a coordinator, ListReplicas.
    v1::Load load;
    grpc::Status status = client.load(&load, options);
    if (status.ok()) {
      print_line({{"load", message_json(load)}});
      return kExitOk;
    }
    if (status.error_code() != grpc::StatusCode::UNIMPLEMENTED)
      return report_status(status, "load", interrupts.interrupted());
    v1::ListReplicasResponse replicas;
    status = client.list_replicas(&replicas, options);
    if (!status.ok()) return report_status(status, "load (ListReplicas)", interrupts.interrupted());
    print_line({{"replicas", message_json(replicas)}});
    return kExitOk;
  }
  if (args.has("abort")) {
    bool found = false;
    grpc::Status status = client.abort(args.get("abort"), &found, options);
    if (!status.ok()) return report_status(status, "abort", interrupts.interrupted());
    print_line({{"request_id", args.get("abort")}, {"found", found}});
    return kExitOk;
  }
  return kExitUsage;
}

int run_client_checked(int argc, char** argv) {
  Arguments args("client",
                 "Talk to an xquant server (coordinator or replica): stream a completion "
                 "(default), or --tokenize, --info, --load, --abort ID, --wait-ready S.\n"
                 "Exit status: 0 finished, 1 an error message or a failed call, 2 bad arguments.");
  args.option("address", "127.0.0.1:50051", "the server, host:port");
  args.option("prompt", "", "prompt text");
  args.option("prompt-ids", "", "prompt token ids, comma-separated (instead of --prompt)");
  args.option("max-tokens", "64", "tokens to generate at most");
  args.option("temperature", "0", "sampling temperature; 0 = greedy");
  args.option("top-k", "0", "sample from the k most likely tokens (0 = all)");
  args.option("top-p", "", "sample from the smallest set with this probability mass (default 1)");
  args.option("seed", "", "random seed (default: the server's)");
  args.option("stop", "", "stop string, or a JSON list of them");
  args.flag("chat",
            "chat: --prompt is the user's message, formatted with the server model's chat "
            "template (or --chat-template); generation ends with the assistant's turn");
  args.option("system", "", "with --chat: a system message before the user's");
  args.option("chat-template", "",
              "with --chat: the template family (chatml, llama3, llama2, zephyr, gemma) instead "
              "of the model's");
  args.option("logprobs", "", "log-probabilities: 0 the chosen token's, N also the top N (--json)");
  args.flag("ignore-eos", "generate past the end-of-sequence token");
  args.flag("json", "one JSON object a line per stream message");
  args.option("request-id", "", "the request's id (default: the server assigns one)");
  add_security_options(args, SecurityRole::kClient, "", "the server");
  args.option("max-message-bytes", "0", "largest message sent or received (0: gRPC's default)");
  args.option("routing-key", "", "session affinity key (x-routing-key)");
  args.option("priority", "", "integer priority, higher first (x-priority)");
  args.option("routing-policy", "", "routing policy for this request (x-routing-policy)");
  args.option("timeout", "0", "deadline in seconds (0: none)");
  args.flag("tokenize", "print the token ids of --prompt");
  args.flag("info", "print the model (and, from a replica, the server) description");
  args.flag("load", "print a replica's load or a coordinator's replicas");
  args.option("abort", "", "abort the request with this id");
  args.option("wait-ready", "", "wait up to S seconds until the server is serving");
  try {
    if (!args.parse(argc, argv)) return kExitOk;
  } catch (const Error& e) {
    throw UsageError(e.what());
  }
  const int actions = args.has("tokenize") + args.has("info") + args.has("load") +
                      args.has("abort") + args.has("wait-ready");
  if (actions > 1)
    throw UsageError(
        "client: give at most one of --tokenize, --info, --load, --abort and --wait-ready");

  const serve::Security security = security_options(args, SecurityRole::kClient, "client");
  serve::CallOptions options;
  options.routing_key = args.get("routing-key");
  options.routing_policy = args.get("routing-policy");
  if (args.has("priority"))
    options.priority = static_cast<int32_t>(int_option(args, "priority", INT32_MIN, INT32_MAX));
  options.timeout = std::chrono::milliseconds(
      static_cast<int64_t>(std::min(float_option(args, "timeout", 0), 1e9) * 1000));
  const int max_message_bytes =
      static_cast<int>(int_option(args, "max-message-bytes", 0, INT32_MAX));
  v1::GenerateRequest request;
  if (actions == 0) request = generate_request(args);

  InterruptWatch interrupts;
  serve::Client client(args.get("address"), security, max_message_bytes);
  interrupts.watch(client);
  // Declared after the client, so the watch stops before the client goes.
  struct StopWatching {
    InterruptWatch& watch;
    ~StopWatching() { watch.stop(); }
  } stop_watching{interrupts};
  if (actions > 0) return run_action(client, args, options, interrupts);
  if (args.has("chat")) {
    // The server's template, formatted here as `xq generate --chat` formats it.
    v1::ModelInfo model;
    grpc::Status status = client.model_info(&model, options);
    if (!status.ok()) return report_status(status, "chat (GetModelInfo)", interrupts.interrupted());
    const ChatPrompt chat = chat_prompt(
        chat_template_for(model.chat_template(), args.get("chat-template"), "client --chat"),
        args.get("system"), args.get("prompt"));
    request.set_text(chat.text);
    request.set_parse_special(true);
    for (const std::string& stop : chat.stop) request.mutable_sampling()->add_stop(stop);
  }
  return run_generate(client, args, request, options, interrupts);
}

}  // namespace

int run_client(int argc, char** argv) {
  try {
    return run_client_checked(argc, argv);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return kExitUsage;
  }
}

}  // namespace xq
