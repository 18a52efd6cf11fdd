// The request-level metrics (metrics.h, declare_request_metrics) of one
// Generate call, taken from what the server writes to the client: the
// coordinator and a replica measure the same things the same way.
//
// ObservedWriter wraps the call's stream: each message written reaches the
// observation (a delta's tokens time the first token and the gaps between
// tokens; the terminal message says how it ended). finish() records the
// outcome once, from the terminal message or else the handler's status:
//   finished EOS/stop string/length   xq:request_success_total{finished_reason}
//   finished cancelled, CANCELLED      xq:request_aborted_total{reason="cancelled"}
//   DEADLINE_EXCEEDED                  xq:request_aborted_total{reason="deadline"}
//   an error message                   xq:request_aborted_total{reason="replica_failure"
//                                      (retryable) or "error"}
//   another status before any token    xq:request_rejected_total{reason=<status, lowercase>}
// Intervals come from the steady clock of the process that serves the call.
#pragma once

#include <grpcpp/grpcpp.h>
#include <grpcpp/support/sync_stream.h>

#include <chrono>
#include <cstdint>
#include <string>

#include "launch/serve/metrics.h"
#include "xquant/v1/xquant.pb.h"

namespace xq::serve {

namespace v1 = ::xquant::v1;

class RequestObservation {
 public:
  using Clock = std::chrono::steady_clock;

  // `registry` must have the request families declared; null records nothing.
  RequestObservation(MetricsRegistry* registry, Clock::time_point arrived);
  ~RequestObservation();  // records as finish() would with OK, if it was not called
  RequestObservation(const RequestObservation&) = delete;
  RequestObservation& operator=(const RequestObservation&) = delete;

  // The labels the outcome is recorded under (model, replica, cache_mode);
  // the coordinator sets them when it routes the request.
  void set_labels(MetricLabels labels) { labels_ = std::move(labels); }

  // A message the client was sent, at `now`.
  void on_written(const v1::GenerateResponse& message, Clock::time_point now);
  // Records the outcome (once; later calls do nothing).
  void finish(const grpc::Status& status);

 private:
  MetricLabels with(const char* name, const std::string& value) const;

  MetricsRegistry* registry_;
  Clock::time_point arrived_;
  MetricLabels labels_;
  Clock::time_point last_token_{};
  int64_t tokens_ = 0;
  bool has_terminal_ = false;
  v1::GenerateResponse terminal_;
  bool recorded_ = false;
};

// Sets the per-replica gauges (declare_replica_metrics) and the preemption
// count from a replica's load.
void record_load(MetricsRegistry& registry, const MetricLabels& labels, const v1::Load& load);

// A Generate stream whose successful writes reach an observation.
class ObservedWriter final : public grpc::ServerWriterInterface<v1::GenerateResponse> {
 public:
  ObservedWriter(grpc::ServerWriterInterface<v1::GenerateResponse>* writer,
                 RequestObservation& observation)
      : writer_(writer), observation_(observation) {}

  void SendInitialMetadata() override { writer_->SendInitialMetadata(); }
  bool Write(const v1::GenerateResponse& message, grpc::WriteOptions options) override;

 private:
  grpc::ServerWriterInterface<v1::GenerateResponse>* writer_;
  RequestObservation& observation_;
};

}  // namespace xq::serve
