#include "launch/serve/openai_front.h"

#include <dirent.h>
#include <httplib.h>
#include <netdb.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <csignal>
#include <cstdint>
#include <cstdlib>
#include <ctime>
#include <deque>
#include <limits>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <stdexcept>
#include <thread>
#include <utility>
#include <vector>

#include "kernels/error.h"
#include "launch/serve/client.h"
#include "launch/serve/generate_request.h"
#include "launch/serve/security.h"
#include "runtime/chat_template.h"

namespace xq::serve {
namespace {

using json = nlohmann::json;

// How often a waiting request looks at its client's connection.
constexpr std::chrono::milliseconds kConnectionCheck{100};
// Unary calls the front makes on a request's behalf (model info, tokenize).
constexpr std::chrono::milliseconds kUnaryTimeout{30000};
constexpr char kEventStream[] = "text/event-stream";
// With its charset, which also keeps httplib from compressing JSON bodies:
// its brotli and gzip encoders answer any client that offers them, and
// some clients' decoders (an httpx with an older brotli module) fail on it.
constexpr char kJson[] = "application/json; charset=utf-8";

// ------------------------------------------------------------ errors

struct HttpError {
  int status = 500;
  std::string message;
  std::string type = "server_error";
  std::string param;  // empty: null
  std::string code;   // empty: null
  int retry_after_seconds = -1;
  bool from_coordinator = false;  // a status the coordinator gave (it counted it)
};

// The xq:request_rejected_total reason of a refusal the front makes itself,
// named as the coordinator names its gRPC statuses.
std::string rejection_reason(int http_status) {
  switch (http_status) {
    case 400:
      return "invalid_argument";
    case 401:
      return "unauthenticated";
    case 404:
      return "not_found";
    case 413:
      return "request_too_large";
    default:
      return "http_" + std::to_string(http_status);
  }
}

HttpError make_error(int status, std::string message, std::string type = "server_error",
                     std::string param = "", std::string code = "") {
  HttpError error;
  error.status = status;
  error.message = std::move(message);
  error.type = std::move(type);
  error.param = std::move(param);
  error.code = std::move(code);
  return error;
}

// A request the front answers with an error, thrown from the parsing code.
class RequestError : public std::runtime_error {
 public:
  explicit RequestError(HttpError error)
      : std::runtime_error(error.message), error_(std::move(error)) {}
  const HttpError& error() const { return error_; }

 private:
  HttpError error_;
};

RequestError bad_request(const std::string& param, const std::string& message) {
  return RequestError(make_error(400, message, "invalid_request_error", param, "invalid_value"));
}

std::string lowercase(std::string text) {
  for (char& c : text)
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  return text;
}

// A gRPC status (before a stream started, or an Error message after) as
// the HTTP status and error OpenAI clients expect.
HttpError from_grpc(int code, const std::string& message, int retry_after_seconds = -1) {
  HttpError error;
  error.from_coordinator = true;
  error.message = message;
  error.code = lowercase(status_code_name(code));
  switch (static_cast<grpc::StatusCode>(code)) {
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::OUT_OF_RANGE:
    case grpc::StatusCode::UNIMPLEMENTED:
      error.status = 400;
      error.type = "invalid_request_error";
      break;
    case grpc::StatusCode::UNAUTHENTICATED:
      error.status = 401;
      error.type = "invalid_request_error";
      error.code = "invalid_api_key";
      error.message = "a missing or wrong API key: send the header 'Authorization: Bearer KEY'";
      break;
    case grpc::StatusCode::PERMISSION_DENIED:
      error.status = 403;
      error.type = "invalid_request_error";
      break;
    case grpc::StatusCode::NOT_FOUND:
      error.status = 404;
      error.type = "invalid_request_error";
      break;
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      error.status = 429;
      error.type = "rate_limit_error";
      error.retry_after_seconds = retry_after_seconds;
      break;
    case grpc::StatusCode::UNAVAILABLE:
      error.status = 503;
      break;
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      error.status = 504;
      break;
    default:
      error.status = 500;
      break;
  }
  return error;
}

HttpError from_status(const grpc::Status& status, int retry_after_seconds = -1) {
  return from_grpc(status.error_code(), status.error_message(), retry_after_seconds);
}

json error_body(const HttpError& error) {
  json body = {
      {"message", error.message}, {"type", error.type}, {"param", nullptr}, {"code", nullptr}};
  if (!error.param.empty()) body["param"] = error.param;
  if (!error.code.empty()) body["code"] = error.code;
  return {{"error", std::move(body)}};
}

// Model text can end in the middle of a UTF-8 character only at a request's
// end; such bytes become U+FFFD rather than an exception.
std::string dump(const json& value) {
  return value.dump(-1, ' ', false, json::error_handler_t::replace);
}

void send_error(httplib::Response& response, const HttpError& error) {
  response.status = error.status;
  if (error.retry_after_seconds >= 0)
    response.set_header("Retry-After", std::to_string(error.retry_after_seconds));
  response.set_content(dump(error_body(error)), kJson);
}

// ------------------------------------------------------------ request fields

// The field, or null when it is absent or JSON null (OpenAI clients send
// null for "not given").
const json* field(const json& body, const char* key) {
  const auto found = body.find(key);
  if (found == body.end() || found->is_null()) return nullptr;
  return &*found;
}

int64_t integer_field(const json& value, const char* key, int64_t low, int64_t high) {
  if (!value.is_number_integer())
    throw bad_request(key, std::string("'") + key + "' must be an integer");
  if (value.is_number_unsigned() && value.get<uint64_t>() > static_cast<uint64_t>(high))
    throw bad_request(key, std::string("'") + key + "' is too large");
  const int64_t number = value.get<int64_t>();
  if (number < low || number > high)
    throw bad_request(key, std::string("'") + key + "' must be between " + std::to_string(low) +
                               " and " + std::to_string(high));
  return number;
}

double number_field(const json& value, const char* key) {
  if (!value.is_number()) throw bad_request(key, std::string("'") + key + "' must be a number");
  return value.get<double>();
}

bool bool_field(const json& value, const char* key) {
  if (!value.is_boolean()) throw bad_request(key, std::string("'") + key + "' must be a boolean");
  return value.get<bool>();
}

constexpr int64_t kInt32Min = std::numeric_limits<int32_t>::min();
constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

bool all_integers(const json& array) {
  for (const json& item : array)
    if (!item.is_number_integer()) return false;
  return true;
}

void set_token_prompt(const json& ids, v1::GenerateRequest* request) {
  v1::TokenIds* tokens = request->mutable_token_ids();
  for (const json& id : ids)
    tokens->add_ids(static_cast<int32_t>(integer_field(id, "prompt", kInt32Min, kInt32Max)));
}

// A string, a list of token ids, or a list holding exactly one of those.
void set_prompt(const json* prompt, v1::GenerateRequest* request) {
  if (prompt == nullptr) throw bad_request("prompt", "'prompt' is required");
  if (prompt->is_string()) {
    request->set_text(prompt->get<std::string>());
    return;
  }
  if (!prompt->is_array())
    throw bad_request("prompt", "'prompt' must be a string or a list of token ids");
  if (prompt->empty()) throw bad_request("prompt", "'prompt' must not be empty");
  if (all_integers(*prompt)) {
    set_token_prompt(*prompt, request);
    return;
  }
  if (prompt->size() == 1) {
    const json& only = (*prompt)[0];
    if (only.is_string()) {
      request->set_text(only.get<std::string>());
      return;
    }
    if (only.is_array() && !only.empty() && all_integers(only)) {
      set_token_prompt(only, request);
      return;
    }
  }
  throw bad_request("prompt",
                    "a list of prompts is not supported: send one prompt (a string or a list of "
                    "token ids) per request");
}

void add_stop_strings(const json* stop, v1::SamplingParams* sampling) {
  if (stop == nullptr) return;
  if (stop->is_string()) {
    sampling->add_stop(stop->get<std::string>());
    return;
  }
  if (!stop->is_array()) throw bad_request("stop", "'stop' must be a string or a list of strings");
  for (const json& item : *stop) {
    if (!item.is_string())
      throw bad_request("stop", "'stop' must be a string or a list of strings");
    sampling->add_stop(item.get<std::string>());
  }
}

// The sampling fields both endpoints share. The values themselves (ranges,
// unsupported options) are the coordinator's to check.
void parse_sampling(const json& body, v1::SamplingParams* sampling) {
  // OpenAI's default temperature is 1 (sampling), not greedy.
  sampling->set_temperature(1.0f);
  if (const json* value = field(body, "temperature"))
    sampling->set_temperature(static_cast<float>(number_field(*value, "temperature")));
  if (const json* value = field(body, "top_p"))
    sampling->set_top_p(static_cast<float>(number_field(*value, "top_p")));
  if (const json* value = field(body, "seed"))
    sampling->set_seed(static_cast<uint64_t>(
        integer_field(*value, "seed", 0, std::numeric_limits<int64_t>::max())));
  add_stop_strings(field(body, "stop"), sampling);
  if (const json* value = field(body, "n")) {
    if (integer_field(*value, "n", kInt32Min, kInt32Max) != 1)
      throw bad_request("n", "only n = 1 is supported");
  }
  if (const json* value = field(body, "presence_penalty"))
    sampling->set_presence_penalty(static_cast<float>(number_field(*value, "presence_penalty")));
  if (const json* value = field(body, "frequency_penalty"))
    sampling->set_frequency_penalty(static_cast<float>(number_field(*value, "frequency_penalty")));
  if (const json* value = field(body, "logit_bias"); value != nullptr && !value->empty())
    throw bad_request("logit_bias", "'logit_bias' is not supported");
  // Extensions vLLM takes too.
  if (const json* value = field(body, "top_k"))
    sampling->set_top_k(static_cast<int32_t>(integer_field(*value, "top_k", -1, kInt32Max)));
  if (sampling->top_k() < 0) sampling->set_top_k(0);  // vLLM's -1: no limit
  if (const json* value = field(body, "ignore_eos"))
    sampling->set_ignore_eos(bool_field(*value, "ignore_eos"));
}

bool parse_stream(const json& body) {
  const json* stream = field(body, "stream");
  const bool on = stream != nullptr && bool_field(*stream, "stream");
  if (const json* options = field(body, "stream_options")) {
    if (!options->is_object())
      throw bad_request("stream_options", "'stream_options' must be an object");
    // Usage is always sent as the stream's last chunk; the flag is only
    // checked for its type.
    if (const json* usage = field(*options, "include_usage"))
      bool_field(*usage, "stream_options.include_usage");
  }
  return on;
}

std::vector<ChatMessage> parse_messages(const json* messages) {
  if (messages == nullptr || !messages->is_array() || messages->empty())
    throw bad_request("messages", "'messages' must be a non-empty list");
  std::vector<ChatMessage> out;
  for (const json& message : *messages) {
    if (!message.is_object()) throw bad_request("messages", "each message must be an object");
    const json* role = field(message, "role");
    if (role == nullptr || !role->is_string())
      throw bad_request("messages", "each message needs a string 'role'");
    ChatMessage chat{role->get<std::string>(), ""};
    const json* content = field(message, "content");
    if (content == nullptr) {
      // An assistant turn without text (e.g. one that called a tool).
    } else if (content->is_string()) {
      chat.content = content->get<std::string>();
    } else if (content->is_array()) {
      for (const json& part : *content) {
        const json* type = part.is_object() ? field(part, "type") : nullptr;
        const json* text = part.is_object() ? field(part, "text") : nullptr;
        if (type == nullptr || *type != "text" || text == nullptr || !text->is_string())
          throw bad_request("messages",
                            "only text content parts ({\"type\": \"text\", "
                            "\"text\": ...}) are supported");
        chat.content += text->get<std::string>();
      }
    } else {
      throw bad_request("messages", "a message's 'content' must be a string or a list of parts");
    }
    out.push_back(std::move(chat));
  }
  return out;
}

json parse_body(const httplib::Request& request) {
  json body = json::parse(request.body, nullptr, false);
  if (body.is_discarded())
    throw RequestError(make_error(400, "the request body is not valid JSON",
                                  "invalid_request_error", "", "invalid_json"));
  if (!body.is_object())
    throw RequestError(make_error(400, "the request body must be a JSON object",
                                  "invalid_request_error", "", "invalid_json"));
  return body;
}

// The Bearer token of the Authorization header; "" when there is none or
// it could not be sent as gRPC metadata (the coordinator then sees no key).
std::string bearer_token(const httplib::Request& request) {
  const std::string value = request.get_header_value("Authorization");
  constexpr char kPrefix[] = "bearer ";
  const size_t prefix = sizeof(kPrefix) - 1;
  if (value.size() <= prefix || lowercase(value.substr(0, prefix)) != kPrefix) return {};
  std::string token = value.substr(prefix);
  while (!token.empty() && token.front() == ' ') token.erase(token.begin());
  while (!token.empty() && token.back() == ' ') token.pop_back();
  for (char c : token)
    if (c < 0x21 || c > 0x7e) return {};
  return token;
}

// The coordinator's routing headers, passed on as the gRPC metadata of the
// same names (the coordinator checks their values).
CallOptions call_options(const httplib::Request& request) {
  CallOptions options;
  for (const char* name : {"x-routing-key", "x-priority", "x-routing-policy"})
    if (request.has_header(name))
      options.metadata.emplace_back(name, request.get_header_value(name));
  return options;
}

// ------------------------------------------------------------ the client's connection

int port_of(const sockaddr_storage& address) {
  if (address.ss_family == AF_INET)
    return ntohs(reinterpret_cast<const sockaddr_in&>(address).sin_port);
  if (address.ss_family == AF_INET6)
    return ntohs(reinterpret_cast<const sockaddr_in6&>(address).sin6_port);
  return -1;
}

std::string numeric_host(const sockaddr_storage& address, socklen_t length) {
  char host[NI_MAXHOST];
  if (getnameinfo(reinterpret_cast<const sockaddr*>(&address), length, host, sizeof(host), nullptr,
                  0, NI_NUMERICHOST) != 0)
    return {};
  return host;
}

// The socket of the connection a request came on, or -1. cpp-httplib 0.11.4
// gives a handler the TLS session (whose socket is its descriptor) but not
// a plain connection's socket; that one is the open socket whose two ends
// are the request's addresses. The socket stays open while its request is
// handled, so the descriptor found is the connection's until the response
// is written.
int connection_socket(const httplib::Request& request) {
  if (request.ssl != nullptr) return SSL_get_fd(request.ssl);
  DIR* directory = opendir("/proc/self/fd");
  if (directory == nullptr) return -1;
  int found = -1;
  while (const dirent* entry = readdir(directory)) {
    char* end = nullptr;
    const long fd = std::strtol(entry->d_name, &end, 10);
    if (end == entry->d_name || *end != '\0' || fd == dirfd(directory)) continue;
    struct stat info;
    if (fstat(static_cast<int>(fd), &info) != 0 || !S_ISSOCK(info.st_mode)) continue;
    sockaddr_storage peer{};
    socklen_t peer_length = sizeof(peer);
    if (getpeername(static_cast<int>(fd), reinterpret_cast<sockaddr*>(&peer), &peer_length) != 0 ||
        port_of(peer) != request.remote_port ||
        numeric_host(peer, peer_length) != request.remote_addr)
      continue;
    sockaddr_storage local{};
    socklen_t local_length = sizeof(local);
    if (getsockname(static_cast<int>(fd), reinterpret_cast<sockaddr*>(&local), &local_length) !=
            0 ||
        port_of(local) != request.local_port)
      continue;
    found = static_cast<int>(fd);
    break;
  }
  closedir(directory);
  return found;
}

// Whether the client closed its side of the connection (or it broke),
// without reading from it. A client that only half-closes after sending
// its request counts as gone too.
class Connection {
 public:
  explicit Connection(const httplib::Request& request) : socket_(connection_socket(request)) {}
  bool closed_by_peer() const {
    if (socket_ < 0) return false;
    pollfd check{socket_, POLLRDHUP, 0};
    return poll(&check, 1, 0) > 0 && (check.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL));
  }

 private:
  int socket_;
};

// ------------------------------------------------------------ one Generate call

// A Generate call on its own thread, so that the HTTP side can wait for its
// messages while it watches the client's connection. The messages queue up
// here; a stream's deltas are bounded by its max_tokens.
class GenerateCall {
 public:
  GenerateCall(std::shared_ptr<grpc::Channel> channel, const std::string& api_key,
               v1::GenerateRequest request, CallOptions options)
      : client_(std::move(channel), api_key) {
    thread_ = std::thread([this, request = std::move(request), options = std::move(options)] {
      GenerateResult result =
          client_.generate_stream(request, options, [this](const v1::GenerateResponse& message) {
            std::lock_guard<std::mutex> lock(mutex_);
            if (cancelled_) return false;
            messages_.push_back(message);
            changed_.notify_all();
            return true;
          });
      std::lock_guard<std::mutex> lock(mutex_);
      result_ = std::move(result);
      ended_ = true;
      changed_.notify_all();
    });
  }

  // Cancels a call still running and waits for its thread.
  ~GenerateCall() {
    std::unique_lock<std::mutex> lock(mutex_);
    if (!ended_) cancelled_ = true;
    // cancel_all reaches the calls started so far; one that starts just
    // after would run until its first message, so cancel again until done.
    while (!ended_) {
      lock.unlock();
      client_.cancel_all();
      lock.lock();
      changed_.wait_for(lock, std::chrono::milliseconds(20), [this] { return ended_; });
    }
    lock.unlock();
    thread_.join();
  }
  GenerateCall(const GenerateCall&) = delete;
  GenerateCall& operator=(const GenerateCall&) = delete;

  void cancel() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (ended_) return;
      cancelled_ = true;
    }
    client_.cancel_all();
  }
  bool cancelled() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return cancelled_;
  }

  enum class Next { kMessage, kEnded, kWaiting };
  // The next message, the end of the call, or kWaiting after `timeout`.
  Next next(v1::GenerateResponse* message, std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> lock(mutex_);
    changed_.wait_for(lock, timeout, [this] { return !messages_.empty() || ended_; });
    if (!messages_.empty()) {
      *message = std::move(messages_.front());
      messages_.pop_front();
      return Next::kMessage;
    }
    return ended_ ? Next::kEnded : Next::kWaiting;
  }
  // Like next, leaving the message queued.
  Next peek(v1::GenerateResponse* message, std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> lock(mutex_);
    changed_.wait_for(lock, timeout, [this] { return !messages_.empty() || ended_; });
    if (!messages_.empty()) {
      *message = messages_.front();
      return Next::kMessage;
    }
    return ended_ ? Next::kEnded : Next::kWaiting;
  }
  // After kEnded.
  const GenerateResult& result() const { return result_; }

 private:
  Client client_;
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<v1::GenerateResponse> messages_;
  bool cancelled_ = false;
  bool ended_ = false;
  GenerateResult result_;
  std::thread thread_;
};

// What a response looks like: the endpoint's shape and the ids it carries.
struct Shape {
  bool chat = false;
  std::string id;
  std::string model;
  int64_t created = 0;
  // Logprobs asked for (the chat form is {"content": [...]}).
  bool logprobs = false;
};

const char* finish_reason_name(v1::FinishReason reason) {
  return reason == v1::FINISH_REASON_LENGTH ? "length" : "stop";
}

std::string token_name(int32_t token_id) {
  // The API has no id-to-text call; vLLM names tokens the same way when
  // asked to return them as ids.
  return "token_id:" + std::to_string(token_id);
}

// Logprobs of one delta in the endpoint's form, appended to `into`
// (completions: the parallel lists; chat: the content list).
void append_logprobs(const Shape& shape, const v1::Delta& delta, json& into) {
  if (shape.chat) {
    if (!into.contains("content")) into["content"] = json::array();
    for (const v1::TokenLogprob& token : delta.logprobs()) {
      json top = json::array();
      for (const v1::TopLogprob& candidate : token.top())
        top.push_back({{"token", token_name(candidate.token_id())},
                       {"logprob", candidate.logprob()},
                       {"bytes", nullptr}});
      into["content"].push_back({{"token", token_name(token.token_id())},
                                 {"logprob", token.logprob()},
                                 {"bytes", nullptr},
                                 {"top_logprobs", std::move(top)}});
    }
    return;
  }
  for (const char* key : {"tokens", "token_logprobs", "top_logprobs"})
    if (!into.contains(key)) into[key] = json::array();
  for (const v1::TokenLogprob& token : delta.logprobs()) {
    into["tokens"].push_back(token_name(token.token_id()));
    into["token_logprobs"].push_back(token.logprob());
    json top = json::object();
    for (const v1::TopLogprob& candidate : token.top())
      top[token_name(candidate.token_id())] = candidate.logprob();
    into["top_logprobs"].push_back(std::move(top));
  }
}

json usage_of(const v1::Finished& finished) {
  const int64_t prompt = finished.usage().prompt_tokens();
  const int64_t completion = finished.usage().completion_tokens();
  return {{"prompt_tokens", prompt},
          {"completion_tokens", completion},
          {"total_tokens", prompt + completion}};
}

json chunk_of(const Shape& shape, json choice) {
  return {{"id", shape.id},
          {"object", shape.chat ? "chat.completion.chunk" : "text_completion"},
          {"created", shape.created},
          {"model", shape.model},
          {"choices", json::array({std::move(choice)})}};
}

json delta_choice(const Shape& shape, const std::string& text, json logprobs,
                  const char* finish_reason) {
  json choice = {{"index", 0},
                 {"logprobs", std::move(logprobs)},
                 {"finish_reason", finish_reason ? json(finish_reason) : json(nullptr)}};
  if (shape.chat) {
    choice["delta"] = json::object();
    if (!text.empty() || finish_reason == nullptr) choice["delta"]["content"] = text;
  } else {
    choice["text"] = text;
  }
  return choice;
}

// The error a call ended with, when it did not end with a finished message
// the client should see. `finished_cancelled`: a finished message with
// reason CANCELLED that the front did not ask for (an abort on the server).
HttpError call_error(const GenerateResult& result) {
  if (!result.status.ok()) return from_status(result.status, result.retry_after_seconds);
  if (result.error) return from_grpc(result.error->code(), result.error->message());
  return make_error(500, "the request was cancelled on the server", "server_error", "",
                    "cancelled");
}

bool call_succeeded(const GenerateResult& result) {
  return result.ok() && result.finished->reason() != v1::FINISH_REASON_CANCELLED;
}

}  // namespace

// ------------------------------------------------------------ the server

struct OpenAiFront::Impl {
  Impl(std::shared_ptr<grpc::Channel> c, OpenAiFrontOptions o)
      : channel(std::move(c)), options(std::move(o)), started_at(std::time(nullptr)) {}

  std::shared_ptr<grpc::Channel> channel;
  OpenAiFrontOptions options;
  const int64_t started_at;
  std::unique_ptr<httplib::Server> server;
  std::thread listener;
  int port = 0;
  std::atomic<bool> stopping{false};
  std::atomic<bool> listen_returned{false};

  std::mutex model_mutex;
  std::optional<v1::ModelInfo> model;  // the first answer of GetModelInfo

  // The served model, from the coordinator (which checks `api_key`);
  // `fresh` asks again rather than answering from the first answer.
  v1::ModelInfo model_info(const std::string& api_key, bool fresh) {
    if (!fresh) {
      std::lock_guard<std::mutex> lock(model_mutex);
      if (model) return *model;
    }
    Client client(channel, api_key);
    CallOptions call;
    call.timeout = kUnaryTimeout;
    v1::ModelInfo info;
    if (grpc::Status status = client.model_info(&info, call); !status.ok())
      throw RequestError(from_status(status));
    std::lock_guard<std::mutex> lock(model_mutex);
    model = info;
    return info;
  }

  static std::string model_id(const v1::ModelInfo& info) {
    return info.name().empty() ? std::string("xquant") : info.name();
  }

  // A request naming another model is refused as OpenAI does.
  static void check_model(const json& body, const v1::ModelInfo& info) {
    const json* model = field(body, "model");
    if (model == nullptr) return;
    if (!model->is_string()) throw bad_request("model", "'model' must be a string");
    if (model->get<std::string>() != model_id(info))
      throw RequestError(make_error(404,
                                    "the model '" + model->get<std::string>() +
                                        "' does not exist; this server serves '" + model_id(info) +
                                        "'",
                                    "invalid_request_error", "model", "model_not_found"));
  }

  // ---------------------------------------------------------- the endpoints

  void completions(const httplib::Request& http, httplib::Response& response, bool chat) {
    try {
      const json body = parse_body(http);
      const std::string api_key = bearer_token(http);
      const v1::ModelInfo info = model_info(api_key, false);
      check_model(body, info);

      v1::GenerateRequest request;
      request.set_request_id(new_request_id());
      Shape shape;
      shape.chat = chat;
      shape.id = (chat ? "chatcmpl-" : "cmpl-") + request.request_id();
      shape.model = model_id(info);
      shape.created = std::time(nullptr);
      parse_sampling(body, request.mutable_sampling());
      const bool stream = parse_stream(body);
      CallOptions options = call_options(http);
      if (chat)
        prepare_chat(body, info, api_key, options, &request, &shape);
      else
        prepare_completion(body, &request, &shape);

      auto call = std::make_shared<GenerateCall>(channel, api_key, request, options);
      auto connection = std::make_shared<Connection>(http);
      if (stream)
        start_stream(std::move(call), std::move(connection), shape, response);
      else
        complete(*call, *connection, shape, response);
    } catch (const RequestError& error) {
      if (!error.error().from_coordinator && options.on_rejected)
        options.on_rejected(rejection_reason(error.error().status));
      send_error(response, error.error());
    } catch (const std::exception& error) {
      send_error(response, make_error(500, error.what(), "server_error", "", "internal"));
    }
  }

  static void prepare_completion(const json& body, v1::GenerateRequest* request, Shape* shape) {
    set_prompt(field(body, "prompt"), request);
    request->mutable_sampling()->set_max_tokens(16);  // OpenAI's default
    if (const json* value = field(body, "max_tokens"))
      request->mutable_sampling()->set_max_tokens(
          static_cast<int32_t>(integer_field(*value, "max_tokens", kInt32Min, kInt32Max)));
    if (const json* value = field(body, "echo"); value != nullptr && bool_field(*value, "echo"))
      throw bad_request("echo", "'echo' is not supported");
    if (const json* value = field(body, "best_of");
        value != nullptr && integer_field(*value, "best_of", kInt32Min, kInt32Max) != 1)
      throw bad_request("best_of", "only best_of = 1 is supported");
    if (const json* value = field(body, "suffix");
        value != nullptr && !(value->is_string() && value->get<std::string>().empty()))
      throw bad_request("suffix", "'suffix' is not supported");
    if (const json* value = field(body, "logprobs")) {
      request->mutable_output()->set_logprobs(
          static_cast<int32_t>(integer_field(*value, "logprobs", kInt32Min, kInt32Max)));
      shape->logprobs = true;
    }
  }

  void prepare_chat(const json& body, const v1::ModelInfo& info, const std::string& api_key,
                    const CallOptions& options, v1::GenerateRequest* request, Shape* shape) {
    const std::vector<ChatMessage> messages = parse_messages(field(body, "messages"));
    if (const json* tools = field(body, "tools"); tools != nullptr && !tools->empty())
      throw bad_request("tools", "'tools' are not supported");
    if (const json* format = field(body, "response_format")) {
      const json* type = format->is_object() ? field(*format, "type") : nullptr;
      if (type == nullptr || *type != "text")
        throw bad_request("response_format", "only the 'text' response format is supported");
    }
    if (info.chat_template().empty())
      throw RequestError(make_error(400,
                                    "the model '" + model_id(info) +
                                        "' carries no chat template; send a formatted prompt to "
                                        "/v1/completions",
                                    "invalid_request_error", "messages", "no_chat_template"));
    std::string prompt;
    try {
      const ChatTemplate chat_template = ChatTemplate::from_jinja(info.chat_template());
      prompt = chat_template.apply(messages);
      for (const std::string& stop : chat_template.stop_strings())
        request->mutable_sampling()->add_stop(stop);
    } catch (const Error& error) {
      throw RequestError(make_error(400, std::string("chat template: ") + error.what(),
                                    "invalid_request_error", "messages", "chat_template"));
    }

    int64_t max_tokens = -1;
    for (const char* key : {"max_completion_tokens", "max_tokens"})
      if (const json* value = field(body, key); value != nullptr && max_tokens < 0)
        max_tokens = integer_field(*value, key, kInt32Min, kInt32Max);
    if (max_tokens >= 0) {
      request->set_text(prompt);
      // The template's markers are control tokens, not text.
      request->set_parse_special(true);
    } else {
      // OpenAI's default for chat: whatever the context leaves after the
      // prompt, which takes the prompt's length (tokenized as Generate would).
      Client client(channel, api_key);
      CallOptions tokenize_options = options;
      tokenize_options.timeout = kUnaryTimeout;
      v1::TokenizeRequest tokenize;
      tokenize.set_text(prompt);
      tokenize.set_parse_special(true);
      v1::TokenizeResponse tokens;
      if (grpc::Status status = client.tokenize(tokenize, &tokens, tokenize_options); !status.ok())
        throw RequestError(from_status(status));
      request->mutable_token_ids()->mutable_ids()->CopyFrom(tokens.token_ids());
      max_tokens = std::max<int64_t>(info.context_length() - tokens.token_ids_size(), 0);
    }
    request->mutable_sampling()->set_max_tokens(static_cast<int32_t>(max_tokens));

    const json* logprobs = field(body, "logprobs");
    if (logprobs != nullptr && bool_field(*logprobs, "logprobs")) {
      int32_t top = 0;
      if (const json* value = field(body, "top_logprobs"))
        top = static_cast<int32_t>(integer_field(*value, "top_logprobs", kInt32Min, kInt32Max));
      request->mutable_output()->set_logprobs(top);
      shape->logprobs = true;
    }
  }

  // Waits for the call's next message (true) or its end, or until the front
  // cancels it because the client's connection closed (false). The
  // connection is looked at with every message too (one poll, no read):
  // a decoding request always has a message ready.
  bool next_message(GenerateCall& call, const Connection& connection,
                    v1::GenerateResponse* message) {
    while (!call.cancelled()) {
      const GenerateCall::Next next = call.next(message, kConnectionCheck);
      if (next == GenerateCall::Next::kEnded) return false;
      if (stopping || connection.closed_by_peer()) {
        call.cancel();
        return false;
      }
      if (next == GenerateCall::Next::kMessage) return true;
    }
    return false;
  }

  // A request answered with one JSON object once it has finished.
  void complete(GenerateCall& call, const Connection& connection, const Shape& shape,
                httplib::Response& response) {
    json logprobs = json::object();
    v1::GenerateResponse message;
    while (next_message(call, connection, &message))
      if (message.has_delta() && shape.logprobs) append_logprobs(shape, message.delta(), logprobs);
    if (call.cancelled()) {
      // The client is gone; nothing will read this.
      send_error(response, make_error(499, "the client closed the connection", "client_closed", "",
                                      "cancelled"));
      return;
    }
    const GenerateResult& result = call.result();
    if (!call_succeeded(result)) {
      send_error(response, call_error(result));
      return;
    }
    json choice = {{"index", 0},
                   {"logprobs", shape.logprobs ? logprobs : json(nullptr)},
                   {"finish_reason", finish_reason_name(result.finished->reason())}};
    if (shape.chat)
      choice["message"] = {{"role", "assistant"}, {"content", result.text}};
    else
      choice["text"] = result.text;
    const json body = {{"id", shape.id},
                       {"object", shape.chat ? "chat.completion" : "text_completion"},
                       {"created", shape.created},
                       {"model", shape.model},
                       {"choices", json::array({std::move(choice)})},
                       {"usage", usage_of(*result.finished)}};
    response.set_header("X-Request-Id", result.request_id);
    response.set_content(dump(body), kJson);
  }

  // A streamed request: a refusal before the first message is an HTTP
  // error; after it the events go out as server-sent events.
  void start_stream(std::shared_ptr<GenerateCall> call, std::shared_ptr<Connection> connection,
                    const Shape& shape, httplib::Response& response) {
    v1::GenerateResponse first;
    GenerateCall::Next next = GenerateCall::Next::kWaiting;
    while (next == GenerateCall::Next::kWaiting) {
      if (call->cancelled()) break;
      next = call->peek(&first, kConnectionCheck);
      if (next == GenerateCall::Next::kWaiting && (stopping || connection->closed_by_peer()))
        call->cancel();
    }
    if (call->cancelled()) {
      send_error(response, make_error(499, "the client closed the connection", "client_closed", "",
                                      "cancelled"));
      return;
    }
    if (next == GenerateCall::Next::kEnded) {
      send_error(response, call_error(call->result()));
      return;
    }
    if (first.has_error()) {
      // Failed before anything was streamed: still an HTTP status.
      send_error(response, from_grpc(first.error().code(), first.error().message()));
      return;
    }
    response.set_header("Cache-Control", "no-cache");
    response.set_header("X-Request-Id", first.request_id());
    response.set_chunked_content_provider(
        kEventStream, [this, call, connection, shape](size_t, httplib::DataSink& sink) {
          return stream_events(*call, *connection, shape, sink);
        });
  }

  // Writes the stream; false when the client is gone (the call is then
  // cancelled and httplib closes the connection).
  bool stream_events(GenerateCall& call, const Connection& connection, const Shape& shape,
                     httplib::DataSink& sink) {
    const auto send = [&](const json& event) {
      const std::string data = "data: " + dump(event) + "\n\n";
      if (sink.write(data.data(), data.size())) return true;
      call.cancel();
      return false;
    };
    const auto send_error_event = [&](const HttpError& error) {
      if (!send(error_body(error))) return false;
      sink.done();
      return true;
    };
    if (shape.chat) {
      json role = delta_choice(shape, "", nullptr, nullptr);
      role["delta"]["role"] = "assistant";
      if (!send(chunk_of(shape, std::move(role)))) return false;
    }
    v1::GenerateResponse message;
    while (next_message(call, connection, &message)) {
      if (message.has_delta()) {
        const v1::Delta& delta = message.delta();
        if (delta.text().empty() && delta.logprobs_size() == 0) continue;
        json logprobs = nullptr;
        if (shape.logprobs) {
          logprobs = json::object();
          append_logprobs(shape, delta, logprobs);
        }
        if (!send(chunk_of(shape, delta_choice(shape, delta.text(), logprobs, nullptr))))
          return false;
      } else if (message.has_finished()) {
        const v1::Finished& finished = message.finished();
        if (finished.reason() == v1::FINISH_REASON_CANCELLED) {
          if (call.cancelled()) return false;
          return send_error_event(call_error(GenerateResult{}));
        }
        json last = chunk_of(shape, delta_choice(shape, finished.text(), nullptr,
                                                 finish_reason_name(finished.reason())));
        // Usage goes in a chunk of its own with no choices, as OpenAI sends
        // it with stream_options.include_usage; here it is always sent.
        json usage = chunk_of(shape, nullptr);
        usage["choices"] = json::array();
        usage["usage"] = usage_of(finished);
        const std::string done = "data: [DONE]\n\n";
        if (!send(last) || !send(usage) || !sink.write(done.data(), done.size())) {
          call.cancel();
          return false;
        }
        sink.done();
        return true;
      } else if (message.has_error()) {
        return send_error_event(from_grpc(message.error().code(), message.error().message()));
      }
    }
    if (call.cancelled()) return false;
    // The call ended without a terminal message (e.g. the coordinator shut
    // down mid-stream).
    return send_error_event(call_error(call.result()));
  }

  void models(const httplib::Request& http, httplib::Response& response) {
    try {
      const v1::ModelInfo info = model_info(bearer_token(http), true);
      const json model = {{"id", model_id(info)},
                          {"object", "model"},
                          {"created", started_at},
                          {"owned_by", "xquant"},
                          {"max_model_len", info.context_length()}};
      response.set_content(dump({{"object", "list"}, {"data", json::array({model})}}), kJson);
    } catch (const RequestError& error) {
      send_error(response, error.error());
    }
  }

  void ready(httplib::Response& response) {
    Client client(channel, "");
    Client::ServingStatus serving = grpc::health::v1::HealthCheckResponse::UNKNOWN;
    const grpc::Status status =
        client.health_check(kGenerationService, &serving, std::chrono::seconds(2));
    if (status.ok() && serving == grpc::health::v1::HealthCheckResponse::SERVING) {
      response.set_content(R"({"status": "ready"})", kJson);
      return;
    }
    response.status = 503;
    response.set_content(
        dump({{"status", "not ready"},
              {"detail", status.ok() ? "no replica is ready" : status.error_message()}}),
        kJson);
  }

  void routes() {
    httplib::Server& s = *server;
    s.Post("/v1/completions", [this](const httplib::Request& request, httplib::Response& response) {
      completions(request, response, false);
    });
    s.Post("/v1/chat/completions",
           [this](const httplib::Request& request, httplib::Response& response) {
             completions(request, response, true);
           });
    s.Get("/v1/models", [this](const httplib::Request& request, httplib::Response& response) {
      models(request, response);
    });
    s.Get("/health", [](const httplib::Request&, httplib::Response& response) {
      response.set_content(R"({"status": "ok"})", kJson);
    });
    s.Get("/ready",
          [this](const httplib::Request&, httplib::Response& response) { ready(response); });
    s.Get("/metrics", [this](const httplib::Request&, httplib::Response& response) {
      if (!options.metrics) {
        send_error(response, make_error(404, "no metrics are served", "invalid_request_error"));
        return;
      }
      response.set_content(options.metrics(), "text/plain; version=0.0.4; charset=utf-8");
    });
    // httplib's own refusals (no route, a body over the limit) in OpenAI's
    // error shape; a handler's own error body is left as it is.
    s.set_error_handler(httplib::Server::HandlerWithResponse([this](const httplib::Request& request,
                                                                    httplib::Response& response) {
      if (!response.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
      HttpError error = make_error(response.status, "", "invalid_request_error");
      if (request.method == "POST" && options.on_rejected)
        options.on_rejected(rejection_reason(response.status));
      if (response.status == 404)
        error.message = "no route for " + request.method + " " + request.path;
      else if (response.status == 413)
        error.message = "the request body is larger than " +
                        std::to_string(options.max_request_bytes) + " bytes (--max-request-bytes)";
      else
        error.message =
            "the request could not be handled (HTTP " + std::to_string(response.status) + ")";
      send_error(response, error);
      return httplib::Server::HandlerResponse::Handled;
    }));
    s.set_exception_handler(
        [](const httplib::Request&, httplib::Response& response, std::exception_ptr thrown) {
          std::string what = "internal error";
          try {
            if (thrown) std::rethrow_exception(thrown);
          } catch (const std::exception& error) {
            what = error.what();
          } catch (...) {
          }
          send_error(response, make_error(500, what, "server_error"));
        });
  }
};

OpenAiFront::OpenAiFront(std::shared_ptr<grpc::Channel> coordinator, OpenAiFrontOptions options)
    : impl_(std::make_unique<Impl>(std::move(coordinator), std::move(options))) {}

OpenAiFront::~OpenAiFront() {
  stop();
}

void OpenAiFront::start() {
  Impl& impl = *impl_;
  if (impl.server) throw Error("OpenAI front: already started");
  const OpenAiFrontOptions& options = impl.options;
  const size_t colon = options.listen.rfind(':');
  if (colon == std::string::npos || colon == 0)
    throw Error("--http-listen: give host:port, got '" + options.listen + "'");
  std::string host = options.listen.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']')
    host = host.substr(1, host.size() - 2);
  char* end = nullptr;
  const long port = std::strtol(options.listen.c_str() + colon + 1, &end, 10);
  if (end == options.listen.c_str() + colon + 1 || *end != '\0' || port < 0 || port > 65535)
    throw Error("--http-listen: '" + options.listen + "' has no valid port");
  if (options.threads < 1) throw Error("OpenAI front: threads must be at least 1");

  if (options.tls_cert.empty() != options.tls_key.empty())
    throw Error("TLS needs both --tls-cert and --tls-key");
  if (!options.tls_cert.empty()) {
    // Read first, so a missing file is named rather than reported as an
    // invalid server.
    read_text_file(options.tls_cert, "--tls-cert");
    read_text_file(options.tls_key, "--tls-key");
    auto server =
        std::make_unique<httplib::SSLServer>(options.tls_cert.c_str(), options.tls_key.c_str());
    if (!server->is_valid())
      throw Error("OpenAI front: --tls-cert/--tls-key are not a usable certificate and key");
    impl.server = std::move(server);
  } else {
    impl.server = std::make_unique<httplib::Server>();
  }
  httplib::Server& server = *impl.server;
  const int threads = options.threads;
  server.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  server.set_payload_max_length(static_cast<size_t>(options.max_request_bytes));
  const auto write_timeout = std::chrono::duration_cast<std::chrono::microseconds>(
      std::max(options.write_timeout, std::chrono::milliseconds(1)));
  server.set_write_timeout(write_timeout.count() / 1000000, write_timeout.count() % 1000000);
  impl.routes();

  // cpp-httplib writes to sockets without MSG_NOSIGNAL: a client that
  // disconnects would otherwise end the process with SIGPIPE. A failed
  // write is handled where it happens.
  std::signal(SIGPIPE, SIG_IGN);
  if (port == 0) {
    impl.port = server.bind_to_any_port(host);
  } else if (server.bind_to_port(host, static_cast<int>(port))) {
    impl.port = static_cast<int>(port);
  } else {
    impl.port = -1;
  }
  if (impl.port <= 0) {
    impl.server.reset();
    throw Error("OpenAI front: cannot listen on '" + options.listen + "'");
  }
  impl.listener = std::thread([&impl] {
    impl.server->listen_after_bind();
    impl.listen_returned = true;
  });
  // stop() does nothing to a server not yet running, so start() returns
  // only once it runs (or its listen loop has already ended).
  while (!server.is_running() && !impl.listen_returned)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
}

int OpenAiFront::port() const {
  return impl_->port;
}

void OpenAiFront::stop() {
  Impl& impl = *impl_;
  impl.stopping = true;
  if (!impl.server) return;
  impl.server->stop();
  if (impl.listener.joinable()) impl.listener.join();
  impl.server.reset();
}

}  // namespace xq::serve
