// A generation request as a batch scheduler takes it, and the events it
// answers with. Plain data: a server or the `xq batch` tool fills a Request,
// Scheduler::submit() checks it, and every request ends with exactly one
// finished event.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "runtime/sampler.h"

namespace xq {

using RequestId = uint64_t;

struct Request {
  std::vector<int32_t> prompt;  // token ids, BOS included where the model wants one
  int32_t max_tokens = 16;      // tokens to generate at most (> 0)
  float temperature = 0.0f;     // 0: greedy (argmax, ties to the lowest id)
  int32_t top_k = 0;            // 0: no limit
  float top_p = 1.0f;           // in (0, 1]
  // The request's own sampler is seeded with this, so a seeded request gives
  // the same tokens whatever else runs beside it; without one the scheduler
  // draws a seed.
  std::optional<uint64_t> seed;
  // Generation ends where the decoded text first contains one of these; the
  // text returned stops before it.
  std::vector<std::string> stop;
  bool ignore_eos = false;  // EOS is then an ordinary token
  // -1: no logprobs; 0: the chosen token's; N > 0: also the N most likely.
  int32_t logprobs = -1;
  // Higher is admitted first; equal priorities in submission order. Only the
  // order of admission changes, never a running request.
  int32_t priority = 0;
};

// Logprobs are limited so that an event stays small.
inline constexpr int32_t kMaxTopLogprobs = 20;

// What is wrong with the request's own fields ("" when nothing is): the
// checks that need no engine. Scheduler::submit() adds the engine's limits.
std::string request_field_problem(const Request& request);

enum class FinishReason { kLength, kEos, kStop, kCancelled, kFailed };

// "length", "eos", "stop", "cancelled", "failed".
const char* finish_reason_name(FinishReason reason);

struct Usage {
  int32_t prompt_tokens = 0;
  int32_t completion_tokens = 0;  // tokens emitted (a stopping token counts, EOS does not)
};

struct Timings {
  double queue_seconds = 0;    // submit to first admission
  double prefill_seconds = 0;  // first admission to first token (preemptions included)
  double decode_seconds = 0;   // first token to the end
};

struct RequestEvent {
  enum class Kind { kToken, kFinished };
  Kind kind = Kind::kToken;
  RequestId id = 0;
  // Both kinds: text that became final with this event. The texts of all of
  // a request's events, in order, are its whole output text.
  std::string text;

  // kToken: the generated token and, when asked for, its logprobs.
  int32_t token = -1;
  std::optional<Logprobs> logprobs;

  // kFinished.
  FinishReason reason = FinishReason::kLength;
  // kFailed: why; kLength: "pool" when the cache pool could not hold the
  // sequence even alone, "context" when it reached the engine's context,
  // "" for max_tokens.
  std::string message;
  Usage usage;
  Timings timings;
};

}  // namespace xq
