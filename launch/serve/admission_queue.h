// The coordinator's bounded queue of requests that found no eligible
// replica. Admission order: requests put back after a failed attempt first
// (they were admitted once already), then higher "x-priority", then first
// come first served. Priorities only reorder admission; they never preempt
// a running request.
//
// Bounded by requests and by tokens (prompt bound + max_tokens), so a full
// queue answers RESOURCE_EXHAUSTED with a "retry-after" estimated from the
// recent completion rate. Not thread-safe (the coordinator holds its lock);
// time is passed in.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <optional>
#include <set>
#include <string>

namespace xq::serve {

struct QueueLimits {
  int32_t max_requests = 256;
  int64_t max_tokens = 1 << 20;
};

class AdmissionQueue {
 public:
  struct Entry {
    uint64_t id = 0;
    int64_t priority = 0;
    int64_t tokens = 0;
    bool requeued = false;
    uint64_t order = 0;  // arrival order (FIFO within a priority)
  };

  explicit AdmissionQueue(QueueLimits limits) : limits_(limits) {}

  // Why a request would not fit, or empty when it would.
  std::string full_reason(int64_t tokens) const;
  // Queues a new request; false (and nothing queued) when full_reason is
  // not empty.
  bool push(uint64_t id, int64_t priority, int64_t tokens);
  // Back at the head after a failed attempt, whatever the limits: the
  // request was accepted already and must not be refused now.
  void push_front(uint64_t id, int64_t priority, int64_t tokens);
  // False when `id` is not queued.
  bool remove(uint64_t id);

  // Admission order.
  struct Before {
    bool operator()(const Entry& a, const Entry& b) const {
      if (a.requeued != b.requeued) return a.requeued;
      if (a.priority != b.priority) return a.priority > b.priority;
      return a.order < b.order;
    }
  };
  using Entries = std::set<Entry, Before>;
  Entries::const_iterator begin() const { return entries_.begin(); }
  Entries::const_iterator end() const { return entries_.end(); }

  int32_t size() const { return static_cast<int32_t>(entries_.size()); }
  int64_t tokens() const { return tokens_; }
  const QueueLimits& limits() const { return limits_; }

 private:
  QueueLimits limits_;
  Entries entries_;
  int64_t tokens_ = 0;
  uint64_t next_order_ = 0;
};

// Recent completions, for the retry-after estimate: the rate over the last
// `window` completions.
class CompletionRate {
 public:
  using Clock = std::chrono::steady_clock;
  explicit CompletionRate(size_t window = 64) : window_(window) {}
  void record(Clock::time_point when);
  // Completions per second; nullopt with fewer than two completions or
  // none within `horizon` of `now` (the rate would be stale).
  std::optional<double> per_second(Clock::time_point now,
                                   std::chrono::seconds horizon = std::chrono::seconds(60)) const;

 private:
  size_t window_;
  std::deque<Clock::time_point> times_;
};

// Whole seconds until a request arriving now would likely find room: the
// requests ahead of it over the completion rate, at least 1. Without a rate,
// one second per queued request per replica (`replicas` at least 1), capped
// at a minute.
int64_t retry_after_seconds(int64_t requests_ahead, std::optional<double> completions_per_second,
                            int32_t replicas);

}  // namespace xq::serve
