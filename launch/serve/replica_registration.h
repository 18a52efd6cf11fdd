// A replica announcing itself to the coordinator: Registry/Register at
// start and then every heartbeat interval the coordinator answers with
// (1 s when it answers 0). A failed call is logged (at most every 10 s)
// and tried again at the next interval; it never stops the replica.
#pragma once

#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

#include "launch/serve/security.h"
#include "xquant/v1/xquant.pb.h"

namespace xq::serve {

class Registration {
 public:
  // `info` is called before every Register for the current ServerInfo.
  Registration(std::string coordinator, Security security, std::string address,
               std::function<xquant::v1::ServerInfo()> info);
  ~Registration();
  Registration(const Registration&) = delete;
  Registration& operator=(const Registration&) = delete;

  // Starts the heartbeat thread (idempotent); stop() ends it.
  void start();
  void stop();
  // Calls that succeeded so far.
  int64_t registered() const;

 private:
  void run();

  const std::string coordinator_;
  const Security security_;
  const std::string address_;
  const std::function<xquant::v1::ServerInfo()> info_;
  mutable std::mutex mutex_;
  std::condition_variable stop_changed_;
  bool stop_ = false;
  grpc::ClientContext* in_flight_ = nullptr;  // the Register call under way, for stop()
  int64_t registered_ = 0;
  std::thread thread_;
};

}  // namespace xq::serve
