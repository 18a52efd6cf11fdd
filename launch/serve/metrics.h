// Prometheus metrics: counters, gauges and histograms in families with
// labels, rendered in the text exposition format (version 0.0.4) that
// Prometheus scrapes and `promtool check metrics` reads.
//
// Names follow vLLM's serving metrics with an `xq:` prefix in place of
// `vllm:` (xq:time_to_first_token_seconds, xq:num_requests_running, ...), so
// dashboards written for one need only the prefix changed. Every family is
// declared once with its help text; updating a family that was not declared,
// or with the wrong type, throws xq::Error (a programming error).
//
// Thread-safe: one mutex guards the registry. The update rate is a few per
// token, far below what a mutex costs.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace xq::serve {

// Label names and values in a fixed order (the family's series are keyed by
// the whole list).
using MetricLabels = std::vector<std::pair<std::string, std::string>>;

class MetricsRegistry {
 public:
  enum class Type { kCounter, kGauge, kHistogram };

  void declare_counter(const std::string& name, const std::string& help);
  void declare_gauge(const std::string& name, const std::string& help);
  // `bounds`: the buckets' upper bounds, increasing; +Inf is added.
  void declare_histogram(const std::string& name, const std::string& help,
                         std::vector<double> bounds);

  // Counters only grow: a negative `amount` throws.
  void add(const std::string& name, const MetricLabels& labels, double amount = 1);
  // A gauge's value, or a counter kept by another process (a replica's
  // cumulative count mirrored by the coordinator).
  void set(const std::string& name, const MetricLabels& labels, double value);
  void observe(const std::string& name, const MetricLabels& labels, double value);
  // Drops a family's series (gauges describing things that may disappear
  // are cleared and set again before each render).
  void clear(const std::string& name);

  // A series' value (a histogram's count); 0 when it has none. For tests.
  double value(const std::string& name, const MetricLabels& labels) const;

  // Every family in declaration order, series sorted by labels.
  std::string render() const;

 private:
  struct Series {
    double value = 0;               // counter, gauge; histogram: the sum
    uint64_t count = 0;             // histogram
    std::vector<uint64_t> buckets;  // histogram, per bound (not cumulative)
  };
  struct Family {
    std::string name, help;
    Type type = Type::kCounter;
    std::vector<double> bounds;
    std::map<MetricLabels, Series> series;
  };
  Family& family_locked(const std::string& name, Type type);
  void declare(const std::string& name, const std::string& help, Type type,
               std::vector<double> bounds);

  mutable std::mutex mutex_;
  std::vector<Family> families_;
  std::map<std::string, size_t> index_;
};

// Bucket bounds shared by the coordinator's and the replicas' families
// (vLLM's, so histograms compare across engines).
namespace buckets {
std::vector<double> time_to_first_token();
std::vector<double> inter_token_latency();
std::vector<double> request_latency();  // e2e, queue, prefill, decode
std::vector<double> step_tokens();
std::vector<double> step_duration();
}  // namespace buckets

// The request-level families both the coordinator and a replica serve:
// xq:prompt_tokens_total, xq:generation_tokens_total,
// xq:request_success_total{finished_reason}, xq:request_rejected_total{reason},
// xq:request_aborted_total{reason}, and the latency histograms
// xq:time_to_first_token_seconds, xq:inter_token_latency_seconds,
// xq:e2e_request_latency_seconds, xq:request_queue_time_seconds,
// xq:request_prefill_time_seconds, xq:request_decode_time_seconds.
void declare_request_metrics(MetricsRegistry& registry);
// The per-replica gauges: xq:num_requests_running, xq:num_requests_waiting,
// xq:cache_usage_perc, xq:cache_bytes_used, xq:cache_bytes_total,
// xq:replica_up, and the counter xq:num_preemptions_total.
void declare_replica_metrics(MetricsRegistry& registry);
// A replica's step families: xq:iteration_tokens (tokens per step, a histogram) and
// xq:step_duration_seconds{phase}.
void declare_step_metrics(MetricsRegistry& registry);

// The content type of render()'s text.
inline constexpr char kMetricsContentType[] = "text/plain; version=0.0.4; charset=utf-8";

}  // namespace xq::serve
