// Cancels a server call whose stream write has been pending too long: a
// client that stops reading fills gRPC's flow-control window, after which
// a synchronous Write() blocks with no deadline of its own. Cancelling the
// call makes that Write() return false, so the handler ends the request and
// frees what it holds (the replica aborts the sequence; the coordinator
// cancels its call to the replica, which does the same).
//
//   WriteWatch watch(std::chrono::seconds(30));
//   {
//     WriteWatch::Guard guard = watch.writing(context);
//     if (!writer->Write(message)) ...   // false once cancelled
//   }
#pragma once

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <mutex>
#include <thread>

namespace xq::serve {

class WriteWatch {
 public:
  using Clock = std::chrono::steady_clock;

  // limit <= 0 disables the watch (guards do nothing).
  explicit WriteWatch(std::chrono::milliseconds limit);
  ~WriteWatch();
  WriteWatch(const WriteWatch&) = delete;
  WriteWatch& operator=(const WriteWatch&) = delete;

  // Registered while it lives; the call is cancelled when it lives longer
  // than the limit.
  class Guard {
   public:
    Guard(Guard&& other) noexcept : watch_(other.watch_), key_(other.key_) {
      other.watch_ = nullptr;
    }
    Guard(const Guard&) = delete;
    Guard& operator=(const Guard&) = delete;
    Guard& operator=(Guard&&) = delete;
    ~Guard();

   private:
    friend class WriteWatch;
    Guard(WriteWatch* watch, uint64_t key) : watch_(watch), key_(key) {}
    WriteWatch* watch_;
    uint64_t key_;
  };
  Guard writing(grpc::ServerContext* context);

  // Calls cancelled so far.
  int64_t cancelled() const;

 private:
  struct Pending {
    grpc::ServerContext* context;
    Clock::time_point since;
    bool cancelled;
  };
  void run();

  const std::chrono::milliseconds limit_;
  mutable std::mutex mutex_;
  std::condition_variable stop_changed_;
  bool stop_ = false;
  uint64_t next_key_ = 1;
  int64_t cancelled_ = 0;
  std::map<uint64_t, Pending> pending_;
  std::thread thread_;  // last: starts once the members above exist
};

}  // namespace xq::serve
