#include "launch/serve/admission_queue.h"

#include <algorithm>
#include <cmath>

namespace xq::serve {

std::string AdmissionQueue::full_reason(int64_t tokens) const {
  if (size() >= limits_.max_requests)
    return "the coordinator's queue is full (" + std::to_string(size()) +
           " requests waiting, --max-queued-requests " + std::to_string(limits_.max_requests) + ")";
  if (tokens_ + tokens > limits_.max_tokens)
    return "the coordinator's queue is full (" + std::to_string(tokens_) + " tokens waiting, " +
           std::to_string(tokens) + " more would pass --max-queued-tokens " +
           std::to_string(limits_.max_tokens) + ")";
  return {};
}

bool AdmissionQueue::push(uint64_t id, int64_t priority, int64_t tokens) {
  if (!full_reason(tokens).empty()) return false;
  entries_.insert(Entry{id, priority, tokens, false, next_order_++});
  tokens_ += tokens;
  return true;
}

void AdmissionQueue::push_front(uint64_t id, int64_t priority, int64_t tokens) {
  entries_.insert(Entry{id, priority, tokens, true, next_order_++});
  tokens_ += tokens;
}

bool AdmissionQueue::remove(uint64_t id) {
  for (auto it = entries_.begin(); it != entries_.end(); ++it) {
    if (it->id != id) continue;
    tokens_ -= it->tokens;
    entries_.erase(it);
    return true;
  }
  return false;
}

void CompletionRate::record(Clock::time_point when) {
  times_.push_back(when);
  while (times_.size() > window_) times_.pop_front();
}

std::optional<double> CompletionRate::per_second(Clock::time_point now,
                                                 std::chrono::seconds horizon) const {
  if (times_.size() < 2 || now - times_.back() > horizon) return std::nullopt;
  const double span = std::chrono::duration<double>(now - times_.front()).count();
  if (span <= 0) return std::nullopt;
  return static_cast<double>(times_.size()) / span;
}

int64_t retry_after_seconds(int64_t requests_ahead, std::optional<double> completions_per_second,
                            int32_t replicas) {
  const double ahead = static_cast<double>(std::max<int64_t>(requests_ahead, 0) + 1);
  double seconds;
  if (completions_per_second && *completions_per_second > 0)
    seconds = ahead / *completions_per_second;
  else
    seconds = std::min(60.0, ahead / std::max(1, replicas));
  return std::max<int64_t>(1, static_cast<int64_t>(std::ceil(seconds)));
}

}  // namespace xq::serve
