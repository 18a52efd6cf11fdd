#include "launch/serve/replica_registration.h"

#include <cstdio>
#include <optional>

#include "xquant/v1/xquant.grpc.pb.h"

namespace xq::serve {

namespace v1 = ::xquant::v1;

Registration::Registration(std::string coordinator, Security security, std::string address,
                           std::function<v1::ServerInfo()> info)
    : coordinator_(std::move(coordinator)),
      security_(std::move(security)),
      address_(std::move(address)),
      info_(std::move(info)) {}

Registration::~Registration() {
  stop();
}

void Registration::start() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (thread_.joinable() || stop_) return;
  thread_ = std::thread([this] { run(); });
}

void Registration::stop() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
    // A coordinator that accepts but never answers must not hold up a
    // drain for a whole heartbeat (the followers' waits have deadlines).
    if (in_flight_ != nullptr) in_flight_->TryCancel();
  }
  stop_changed_.notify_all();
  if (thread_.joinable()) thread_.join();
}

int64_t Registration::registered() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return registered_;
}

void Registration::run() {
  using Clock = std::chrono::steady_clock;
  constexpr std::chrono::milliseconds kDefaultHeartbeat{1000};
  constexpr std::chrono::seconds kLogEvery{10};
  const auto channel = make_channel(coordinator_, security_);
  const auto stub = v1::Registry::NewStub(channel);
  std::chrono::milliseconds interval = kDefaultHeartbeat;
  // Whether a failure was ever logged: `now - time_point::min()` overflows.
  std::optional<Clock::time_point> last_log;
  int64_t failures_unlogged = 0;
  for (;;) {
    v1::RegisterRequest request;
    request.set_address(address_);
    *request.mutable_info() = info_();
    grpc::ClientContext context;
    add_api_key(context, security_.api_key);
    // No call may outlast the interval by much: the coordinator marks a
    // replica down after three missed ones.
    context.set_deadline(std::chrono::system_clock::now() +
                         std::max(interval, std::chrono::milliseconds(1000)));
    v1::RegisterResponse response;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (stop_) return;
      in_flight_ = &context;
    }
    const grpc::Status status = stub->Register(&context, request, &response);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      in_flight_ = nullptr;
    }
    if (status.ok()) {
      interval = response.heartbeat_ms() > 0 ? std::chrono::milliseconds(response.heartbeat_ms())
                                             : kDefaultHeartbeat;
      std::lock_guard<std::mutex> lock(mutex_);
      if (registered_ == 0 || failures_unlogged > 0)
        std::fprintf(stderr, "replica: registered with %s as %s (heartbeat %lld ms)\n",
                     coordinator_.c_str(), address_.c_str(),
                     static_cast<long long>(interval.count()));
      ++registered_;
      failures_unlogged = 0;
    } else {
      ++failures_unlogged;
      if (!last_log || Clock::now() - *last_log >= kLogEvery) {
        last_log = Clock::now();
        std::fprintf(stderr,
                     "replica: cannot register with %s: %s (code %d); %lld failed call(s), "
                     "retrying every %lld ms\n",
                     coordinator_.c_str(), status.error_message().c_str(),
                     static_cast<int>(status.error_code()),
                     static_cast<long long>(failures_unlogged),
                     static_cast<long long>(interval.count()));
      }
    }
    std::unique_lock<std::mutex> lock(mutex_);
    if (stop_changed_.wait_for(lock, interval, [this] { return stop_; })) return;
  }
}

}  // namespace xq::serve
