#include "launch/serve/circuit_breaker.h"

namespace xq::serve {

CircuitBreaker::State CircuitBreaker::state(Clock::time_point now) {
  if (state_ == State::kOpen && now - opened_at_ >= cooldown_) {
    state_ = State::kHalfOpen;
    trial_taken_ = false;
  }
  return state_;
}

bool CircuitBreaker::available(Clock::time_point now) {
  switch (state(now)) {
    case State::kClosed:
      return true;
    case State::kHalfOpen:
      return !trial_taken_;
    case State::kOpen:
      break;
  }
  return false;
}

bool CircuitBreaker::try_acquire(Clock::time_point now) {
  if (!available(now)) return false;
  if (state_ == State::kHalfOpen) trial_taken_ = true;
  return true;
}

void CircuitBreaker::on_success() {
  state_ = State::kClosed;
  failures_ = 0;
  trial_taken_ = false;
}

void CircuitBreaker::on_failure(Clock::time_point now) {
  ++failures_;
  // A failed trial reopens at once; a closed breaker opens at the threshold.
  if (state_ == State::kHalfOpen || failures_ >= failures_to_open_) {
    state_ = State::kOpen;
    opened_at_ = now;
    trial_taken_ = false;
  }
}

void CircuitBreaker::reset() {
  state_ = State::kClosed;
  failures_ = 0;
  trial_taken_ = false;
}

const char* breaker_state_name(CircuitBreaker::State state) {
  switch (state) {
    case CircuitBreaker::State::kClosed:
      return "up";
    case CircuitBreaker::State::kOpen:
      return "open";
    case CircuitBreaker::State::kHalfOpen:
      return "half-open";
  }
  return "?";
}

}  // namespace xq::serve
