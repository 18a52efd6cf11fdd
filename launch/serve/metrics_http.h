// A small HTTP server for a replica's Prometheus metrics: GET /metrics (the
// text exposition format), GET /health (200 while the process lives) and
// GET /ready (200 while the replica takes requests, else 503). Plain HTTP,
// no key: bind it to loopback or a scrape-only network.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <thread>

namespace httplib {
class Server;
}

namespace xq::serve {

class MetricsHttpServer {
 public:
  MetricsHttpServer(std::string listen, std::function<std::string()> metrics_text,
                    std::function<bool()> ready);
  ~MetricsHttpServer();
  MetricsHttpServer(const MetricsHttpServer&) = delete;
  MetricsHttpServer& operator=(const MetricsHttpServer&) = delete;

  // Binds host:port (port 0: any free one) and serves on a thread of its
  // own. Throws xq::Error when the address is malformed or cannot be bound.
  void start();
  int port() const { return port_; }
  void stop();

 private:
  std::string listen_;
  std::function<std::string()> metrics_text_;
  std::function<bool()> ready_;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
  int port_ = 0;
};

}  // namespace xq::serve
