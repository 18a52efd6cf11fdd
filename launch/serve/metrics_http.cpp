#include "launch/serve/metrics_http.h"

#include <httplib.h>

#include <cstdlib>

#include "kernels/error.h"
#include "launch/serve/metrics.h"

namespace xq::serve {

MetricsHttpServer::MetricsHttpServer(std::string listen, std::function<std::string()> metrics_text,
                                     std::function<bool()> ready)
    : listen_(std::move(listen)),
      metrics_text_(std::move(metrics_text)),
      ready_(std::move(ready)) {}

MetricsHttpServer::~MetricsHttpServer() {
  stop();
}

void MetricsHttpServer::start() {
  const size_t colon = listen_.rfind(':');
  if (colon == std::string::npos || colon + 1 == listen_.size())
    throw Error("metrics: listen address '" + listen_ + "' is not host:port");
  std::string host = listen_.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']')
    host = host.substr(1, host.size() - 2);
  char* end = nullptr;
  const long port = std::strtol(listen_.c_str() + colon + 1, &end, 10);
  if (*end != '\0' || port < 0 || port > 65535)
    throw Error("metrics: listen address '" + listen_ + "' has no valid port");

  server_ = std::make_unique<httplib::Server>();
  server_->Get("/metrics", [this](const httplib::Request&, httplib::Response& response) {
    response.set_content(metrics_text_(), kMetricsContentType);
  });
  server_->Get("/health", [](const httplib::Request&, httplib::Response& response) {
    response.set_content("ok\n", "text/plain");
  });
  server_->Get("/ready", [this](const httplib::Request&, httplib::Response& response) {
    const bool ready = ready_ && ready_();
    response.status = ready ? 200 : 503;
    response.set_content(ready ? "ready\n" : "not ready\n", "text/plain");
  });
  port_ = port == 0 ? server_->bind_to_any_port(host.c_str())
                    : (server_->bind_to_port(host.c_str(), static_cast<int>(port))
                           ? static_cast<int>(port)
                           : -1);
  if (port_ <= 0) throw Error("metrics: cannot listen on " + listen_);
  thread_ = std::thread([this] { server_->listen_after_bind(); });
}

void MetricsHttpServer::stop() {
  if (!server_) return;
  server_->stop();
  if (thread_.joinable()) thread_.join();
  server_.reset();
}

}  // namespace xq::serve
