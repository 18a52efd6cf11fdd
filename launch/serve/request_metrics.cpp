#include "launch/serve/request_metrics.h"

#include <algorithm>
#include <cctype>

#include "launch/serve/client.h"

namespace xq::serve {
namespace {

double seconds(std::chrono::steady_clock::duration d) {
  return std::chrono::duration<double>(d).count();
}

// vLLM's finished_reason values: "stop" (EOS or a stop string), "length".
const char* finished_reason_label(v1::FinishReason reason) {
  switch (reason) {
    case v1::FINISH_REASON_EOS:
    case v1::FINISH_REASON_STOP_STRING:
      return "stop";
    case v1::FINISH_REASON_LENGTH:
      return "length";
    default:
      return "unspecified";
  }
}

std::string lowercase(std::string text) {
  std::transform(text.begin(), text.end(), text.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return text;
}

}  // namespace

RequestObservation::RequestObservation(MetricsRegistry* registry, Clock::time_point arrived)
    : registry_(registry), arrived_(arrived) {}

RequestObservation::~RequestObservation() {
  finish(grpc::Status::OK);
}

MetricLabels RequestObservation::with(const char* name, const std::string& value) const {
  MetricLabels labels = labels_;
  labels.emplace_back(name, value);
  return labels;
}

void RequestObservation::on_written(const v1::GenerateResponse& message, Clock::time_point now) {
  if (registry_ == nullptr) return;
  if (message.has_delta() && message.delta().token_ids_size() > 0) {
    const int64_t count = message.delta().token_ids_size();
    if (tokens_ == 0) {
      registry_->observe("xq:time_to_first_token_seconds", labels_, seconds(now - arrived_));
      // The tokens after the first in the same message came with it.
      for (int64_t i = 1; i < count; ++i)
        registry_->observe("xq:inter_token_latency_seconds", labels_, 0.0);
    } else {
      const double gap = seconds(now - last_token_) / static_cast<double>(count);
      for (int64_t i = 0; i < count; ++i)
        registry_->observe("xq:inter_token_latency_seconds", labels_, gap);
    }
    tokens_ += count;
    last_token_ = now;
    registry_->add("xq:generation_tokens_total", labels_, static_cast<double>(count));
  }
  if (message.has_finished() || message.has_error()) {
    has_terminal_ = true;
    terminal_ = message;
  }
}

void RequestObservation::finish(const grpc::Status& status) {
  if (registry_ == nullptr || recorded_) return;
  recorded_ = true;
  if (has_terminal_ && terminal_.has_finished()) {
    const v1::Finished& finished = terminal_.finished();
    if (finished.reason() == v1::FINISH_REASON_CANCELLED) {
      registry_->add("xq:request_aborted_total", with("reason", "cancelled"));
      return;
    }
    registry_->add("xq:request_success_total",
                   with("finished_reason", finished_reason_label(finished.reason())));
    registry_->add("xq:prompt_tokens_total", labels_, finished.usage().prompt_tokens());
    registry_->observe("xq:e2e_request_latency_seconds", labels_, seconds(Clock::now() - arrived_));
    registry_->observe("xq:request_queue_time_seconds", labels_,
                       finished.timings().queue_seconds());
    registry_->observe("xq:request_prefill_time_seconds", labels_,
                       finished.timings().prefill_seconds());
    registry_->observe("xq:request_decode_time_seconds", labels_,
                       finished.timings().decode_seconds());
    return;
  }
  if (has_terminal_) {
    registry_->add("xq:request_aborted_total",
                   with("reason", terminal_.error().retryable() ? "replica_failure" : "error"));
    return;
  }
  switch (status.error_code()) {
    case grpc::StatusCode::CANCELLED:
      registry_->add("xq:request_aborted_total", with("reason", "cancelled"));
      return;
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      registry_->add("xq:request_aborted_total", with("reason", "deadline"));
      return;
    default:
      break;
  }
  if (tokens_ > 0 || status.ok())
    registry_->add("xq:request_aborted_total", with("reason", "error"));
  else
    registry_->add("xq:request_rejected_total",
                   with("reason", lowercase(status_code_name(status.error_code()))));
}

void record_load(MetricsRegistry& registry, const MetricLabels& labels, const v1::Load& load) {
  registry.set("xq:num_requests_running", labels, load.running_requests());
  registry.set("xq:num_requests_waiting", labels, load.queued_requests());
  registry.set("xq:cache_usage_perc", labels,
               load.total_blocks() > 0
                   ? 1.0 - static_cast<double>(load.free_blocks()) / load.total_blocks()
                   : 0.0);
  double used = 0, total = 0;
  for (const v1::RankLoad& rank : load.ranks()) {
    used += static_cast<double>(rank.cache_bytes_used());
    total += static_cast<double>(rank.cache_bytes_total());
  }
  registry.set("xq:cache_bytes_used", labels, used);
  registry.set("xq:cache_bytes_total", labels, total);
  registry.set("xq:num_preemptions_total", labels, static_cast<double>(load.preemptions()));
}

bool ObservedWriter::Write(const v1::GenerateResponse& message, grpc::WriteOptions options) {
  if (!writer_->Write(message, options)) return false;
  observation_.on_written(message, RequestObservation::Clock::now());
  return true;
}

}  // namespace xq::serve
