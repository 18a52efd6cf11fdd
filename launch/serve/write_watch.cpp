#include "launch/serve/write_watch.h"

#include <algorithm>

namespace xq::serve {

WriteWatch::WriteWatch(std::chrono::milliseconds limit) : limit_(limit) {
  if (limit_.count() > 0) thread_ = std::thread([this] { run(); });
}

WriteWatch::~WriteWatch() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  stop_changed_.notify_all();
  if (thread_.joinable()) thread_.join();
}

WriteWatch::Guard WriteWatch::writing(grpc::ServerContext* context) {
  if (limit_.count() <= 0) return Guard(nullptr, 0);
  std::lock_guard<std::mutex> lock(mutex_);
  const uint64_t key = next_key_++;
  pending_.emplace(key, Pending{context, Clock::now(), false});
  return Guard(this, key);
}

WriteWatch::Guard::~Guard() {
  if (watch_ == nullptr) return;
  // Under the watch's lock, so TryCancel never runs on a context whose
  // handler has moved on.
  std::lock_guard<std::mutex> lock(watch_->mutex_);
  watch_->pending_.erase(key_);
}

int64_t WriteWatch::cancelled() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return cancelled_;
}

void WriteWatch::run() {
  // Checking four times per limit bounds the overshoot at a quarter of it.
  const auto period = std::max(std::chrono::milliseconds(1), limit_ / 4);
  std::unique_lock<std::mutex> lock(mutex_);
  while (!stop_changed_.wait_for(lock, period, [this] { return stop_; })) {
    const Clock::time_point now = Clock::now();
    for (auto& [key, pending] : pending_) {
      if (pending.cancelled || now - pending.since < limit_) continue;
      pending.context->TryCancel();
      pending.cancelled = true;
      ++cancelled_;
    }
  }
}

}  // namespace xq::serve
