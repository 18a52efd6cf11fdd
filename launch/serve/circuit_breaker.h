// A per-replica circuit breaker: after `failures_to_open` consecutive
// failures (calls or load polls) the replica gets no traffic for
// `cooldown`; then one trial (a request or a poll) decides: success closes
// the breaker, failure opens it for another cooldown.
//
// Not thread-safe (the coordinator holds its lock); time is passed in, so
// tests drive it with a synthetic clock.
#pragma once

#include <chrono>
#include <cstdint>

namespace xq::serve {

class CircuitBreaker {
 public:
  using Clock = std::chrono::steady_clock;
  enum class State { kClosed, kOpen, kHalfOpen };

  CircuitBreaker(int failures_to_open, std::chrono::milliseconds cooldown)
      : failures_to_open_(failures_to_open < 1 ? 1 : failures_to_open), cooldown_(cooldown) {}

  // Open turns half-open once the cooldown has passed.
  State state(Clock::time_point now);
  // Closed: true. Half-open: true for the one trial (taken until its
  // verdict or release_trial). Open: false.
  bool try_acquire(Clock::time_point now);
  // Half-open with its trial free: what routing calls eligible.
  bool available(Clock::time_point now);
  void on_success();
  void on_failure(Clock::time_point now);
  // A trial that ended without a verdict (its client went away).
  void release_trial() { trial_taken_ = false; }
  // A replica that registered again after a restart starts closed.
  void reset();

  int consecutive_failures() const { return failures_; }

 private:
  const int failures_to_open_;
  const std::chrono::milliseconds cooldown_;
  State state_ = State::kClosed;
  int failures_ = 0;
  bool trial_taken_ = false;
  Clock::time_point opened_at_{};
};

const char* breaker_state_name(CircuitBreaker::State state);

}  // namespace xq::serve
