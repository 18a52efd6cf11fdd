#include "launch/serve/generate_request.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>

namespace xq::serve {
namespace {

grpc::Status invalid(const std::string& message) {
  return {grpc::StatusCode::INVALID_ARGUMENT, message};
}

grpc::Status unimplemented(const std::string& option) {
  return {grpc::StatusCode::UNIMPLEMENTED, option + " is not supported by this server"};
}

}  // namespace

grpc::Status check_generate_fields(const v1::GenerateRequest& request) {
  const v1::SamplingParams& s = request.sampling();
  if (s.n() > 1) return unimplemented("sampling.n > 1 (several completions per request)");
  if (s.n() < 0) return invalid("sampling.n must be 0 or 1");
  if (s.presence_penalty() != 0.0f) return unimplemented("sampling.presence_penalty");
  if (s.frequency_penalty() != 0.0f) return unimplemented("sampling.frequency_penalty");
  if (s.repetition_penalty() != 0.0f && s.repetition_penalty() != 1.0f)
    return unimplemented("sampling.repetition_penalty");
  if (s.min_tokens() != 0) return unimplemented("sampling.min_tokens");
  if (s.stop_token_ids_size() > 0) return unimplemented("sampling.stop_token_ids");
  if (request.output().prompt_logprobs()) return unimplemented("output.prompt_logprobs");

  switch (request.prompt_case()) {
    case v1::GenerateRequest::kText:
      if (request.text().empty()) return invalid("prompt: the text is empty");
      break;
    case v1::GenerateRequest::kTokenIds:
      if (request.token_ids().ids_size() == 0) return invalid("prompt: no token ids");
      break;
    default:
      return invalid("prompt: give text or token_ids");
  }
  if (s.max_tokens() <= 0)
    return invalid("sampling.max_tokens must be at least 1, got " + std::to_string(s.max_tokens()));
  if (!std::isfinite(s.temperature()) || s.temperature() < 0.0f)
    return invalid("sampling.temperature must be a number >= 0");
  if (s.top_k() < 0) return invalid("sampling.top_k must be >= 0");
  if (s.has_top_p() && !(s.top_p() > 0.0f && s.top_p() <= 1.0f))
    return invalid("sampling.top_p must lie in (0, 1]");
  for (const std::string& stop : s.stop())
    if (stop.empty()) return invalid("sampling.stop: an empty stop string");
  if (request.output().has_logprobs() &&
      (request.output().logprobs() < 0 || request.output().logprobs() > kMaxTopLogprobs))
    return invalid("output.logprobs must lie in [0, " + std::to_string(kMaxTopLogprobs) + "]");
  return grpc::Status::OK;
}

grpc::Status to_request(const v1::GenerateRequest& request, const Tokenizer& tokenizer,
                        const PromptLimits& limits, Request* out) {
  if (grpc::Status fields = check_generate_fields(request); !fields.ok()) return fields;
  Request r;
  if (request.prompt_case() == v1::GenerateRequest::kText) {
    r.prompt = tokenizer.encode(request.text(), tokenizer.add_bos(), request.parse_special());
  } else {
    r.prompt.assign(request.token_ids().ids().begin(), request.token_ids().ids().end());
    for (int32_t id : r.prompt)
      if (id < 0 || id >= limits.vocab)
        return invalid("prompt: token id " + std::to_string(id) +
                       " is outside the vocabulary [0, " + std::to_string(limits.vocab) + ")");
  }
  const int64_t prompt = static_cast<int64_t>(r.prompt.size());
  if (prompt == 0) return invalid("prompt: the text gives no tokens");
  const int32_t prompt_limit = limits.max_prompt_tokens > 0
                                   ? std::min(limits.max_prompt_tokens, limits.context - 1)
                                   : limits.context - 1;
  if (prompt > prompt_limit)
    return invalid("prompt: " + std::to_string(prompt) + " tokens, more than the " +
                   std::to_string(prompt_limit) + " this server accepts (context " +
                   std::to_string(limits.context) + ")");
  const v1::SamplingParams& s = request.sampling();
  if (prompt + s.max_tokens() > limits.context)
    return invalid("sampling.max_tokens: " + std::to_string(s.max_tokens()) +
                   " after a prompt of " + std::to_string(prompt) +
                   " tokens is beyond the context of " + std::to_string(limits.context));
  r.max_tokens = s.max_tokens();
  r.temperature = s.temperature();
  r.top_k = s.top_k();
  r.top_p = s.has_top_p() ? s.top_p() : 1.0f;
  if (s.has_seed()) r.seed = s.seed();
  r.stop.assign(s.stop().begin(), s.stop().end());
  r.ignore_eos = s.ignore_eos();
  r.logprobs = request.output().has_logprobs() ? request.output().logprobs() : -1;
  if (std::string problem = request_field_problem(r); !problem.empty()) return invalid(problem);
  *out = std::move(r);
  return grpc::Status::OK;
}

int64_t prompt_token_bound(const v1::GenerateRequest& request) {
  if (request.prompt_case() == v1::GenerateRequest::kTokenIds)
    return request.token_ids().ids_size();
  return static_cast<int64_t>(request.text().size()) + 1;
}

v1::FinishReason to_proto(FinishReason reason) {
  switch (reason) {
    case FinishReason::kLength:
      return v1::FINISH_REASON_LENGTH;
    case FinishReason::kEos:
      return v1::FINISH_REASON_EOS;
    case FinishReason::kStop:
      return v1::FINISH_REASON_STOP_STRING;
    case FinishReason::kCancelled:
      return v1::FINISH_REASON_CANCELLED;
    case FinishReason::kFailed:
      break;
  }
  return v1::FINISH_REASON_UNSPECIFIED;
}

void append_token(const RequestEvent& event, v1::Delta* delta) {
  delta->add_token_ids(event.token);
  delta->mutable_text()->append(event.text);
  if (event.logprobs) {
    v1::TokenLogprob* lp = delta->add_logprobs();
    lp->set_token_id(event.logprobs->chosen.token);
    lp->set_logprob(event.logprobs->chosen.logprob);
    for (const TokenLogprob& top : event.logprobs->top) {
      v1::TopLogprob* t = lp->add_top();
      t->set_token_id(top.token);
      t->set_logprob(top.logprob);
    }
  }
}

void fill_finished(const RequestEvent& event, v1::Finished* finished) {
  finished->set_reason(to_proto(event.reason));
  if (event.reason == FinishReason::kLength)
    finished->set_detail(event.message.empty() ? "max_tokens" : event.message);
  finished->set_text(event.text);
  finished->mutable_usage()->set_prompt_tokens(event.usage.prompt_tokens);
  finished->mutable_usage()->set_completion_tokens(event.usage.completion_tokens);
  finished->mutable_timings()->set_queue_seconds(event.timings.queue_seconds);
  finished->mutable_timings()->set_prefill_seconds(event.timings.prefill_seconds);
  finished->mutable_timings()->set_decode_seconds(event.timings.decode_seconds);
}

std::string new_request_id() {
  static std::atomic<uint64_t> counter{0};
  static const uint64_t salt = [] {
    std::random_device device;
    return (static_cast<uint64_t>(device()) << 32) ^ device() ^
           static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  }();
  const uint64_t n = counter.fetch_add(1, std::memory_order_relaxed);
  char text[32];
  std::snprintf(text, sizeof text, "xq-%016llx%08llx", static_cast<unsigned long long>(salt),
                static_cast<unsigned long long>(n & 0xffffffffu));
  return text;
}

}  // namespace xq::serve
