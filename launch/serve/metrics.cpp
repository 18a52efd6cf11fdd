#include "launch/serve/metrics.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "kernels/error.h"

namespace xq::serve {
namespace {

const char* type_name(MetricsRegistry::Type type) {
  switch (type) {
    case MetricsRegistry::Type::kCounter:
      return "counter";
    case MetricsRegistry::Type::kGauge:
      return "gauge";
    case MetricsRegistry::Type::kHistogram:
      return "histogram";
  }
  return "untyped";
}

// The exposition format's float: Go's ParseFloat reads any of these, and
// integers (the common case) print without an exponent.
std::string format_value(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  char text[32];
  std::snprintf(text, sizeof(text), "%.17g", v);
  // Prefer the shortest text that reads back to the same value.
  for (int precision = 1; precision < 17; ++precision) {
    char shorter[32];
    std::snprintf(shorter, sizeof(shorter), "%.*g", precision, v);
    if (std::strtod(shorter, nullptr) == v) return shorter;
  }
  return text;
}

// Label values escape backslash, double quote and newline; help text
// backslash and newline.
std::string escape(const std::string& text, bool quote) {
  std::string out;
  out.reserve(text.size());
  for (char c : text) {
    if (c == '\\')
      out += "\\\\";
    else if (c == '\n')
      out += "\\n";
    else if (quote && c == '"')
      out += "\\\"";
    else
      out += c;
  }
  return out;
}

void append_labels(std::string& out, const MetricLabels& labels, const char* extra_name = nullptr,
                   const std::string& extra_value = "") {
  if (labels.empty() && extra_name == nullptr) return;
  out += '{';
  bool first = true;
  for (const auto& [name, value] : labels) {
    if (!first) out += ',';
    first = false;
    out += name + "=\"" + escape(value, true) + "\"";
  }
  if (extra_name != nullptr) {
    if (!first) out += ',';
    out += std::string(extra_name) + "=\"" + escape(extra_value, true) + "\"";
  }
  out += '}';
}

}  // namespace

void MetricsRegistry::declare(const std::string& name, const std::string& help, Type type,
                              std::vector<double> bounds) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (index_.count(name) != 0) throw Error("metrics: " + name + " declared twice");
  for (size_t i = 1; i < bounds.size(); ++i)
    if (!(bounds[i] > bounds[i - 1]))
      throw Error("metrics: " + name + ": bucket bounds must increase");
  index_[name] = families_.size();
  Family family;
  family.name = name;
  family.help = help;
  family.type = type;
  family.bounds = std::move(bounds);
  families_.push_back(std::move(family));
}

void MetricsRegistry::declare_counter(const std::string& name, const std::string& help) {
  declare(name, help, Type::kCounter, {});
}

void MetricsRegistry::declare_gauge(const std::string& name, const std::string& help) {
  declare(name, help, Type::kGauge, {});
}

void MetricsRegistry::declare_histogram(const std::string& name, const std::string& help,
                                        std::vector<double> bounds) {
  declare(name, help, Type::kHistogram, std::move(bounds));
}

MetricsRegistry::Family& MetricsRegistry::family_locked(const std::string& name, Type type) {
  const auto it = index_.find(name);
  if (it == index_.end()) throw Error("metrics: " + name + " was not declared");
  Family& family = families_[it->second];
  if (family.type != type)
    throw Error("metrics: " + name + " is a " + type_name(family.type) + ", not a " +
                type_name(type));
  return family;
}

void MetricsRegistry::add(const std::string& name, const MetricLabels& labels, double amount) {
  if (!(amount >= 0)) throw Error("metrics: counter " + name + " cannot decrease");
  std::lock_guard<std::mutex> lock(mutex_);
  family_locked(name, Type::kCounter).series[labels].value += amount;
}

void MetricsRegistry::set(const std::string& name, const MetricLabels& labels, double value) {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto it = index_.find(name);
  const bool counter = it != index_.end() && families_[it->second].type == Type::kCounter;
  family_locked(name, counter ? Type::kCounter : Type::kGauge).series[labels].value = value;
}

void MetricsRegistry::observe(const std::string& name, const MetricLabels& labels, double value) {
  std::lock_guard<std::mutex> lock(mutex_);
  Family& family = family_locked(name, Type::kHistogram);
  Series& series = family.series[labels];
  if (series.buckets.empty()) series.buckets.assign(family.bounds.size(), 0);
  // The first bucket whose bound is >= value (Prometheus' `le`); beyond the
  // last, only +Inf (the count) holds it.
  const size_t bucket =
      std::lower_bound(family.bounds.begin(), family.bounds.end(), value) - family.bounds.begin();
  if (bucket < series.buckets.size()) ++series.buckets[bucket];
  ++series.count;
  series.value += value;
}

void MetricsRegistry::clear(const std::string& name) {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto it = index_.find(name);
  if (it == index_.end()) throw Error("metrics: " + name + " was not declared");
  families_[it->second].series.clear();
}

double MetricsRegistry::value(const std::string& name, const MetricLabels& labels) const {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto it = index_.find(name);
  if (it == index_.end()) throw Error("metrics: " + name + " was not declared");
  const Family& family = families_[it->second];
  const auto series = family.series.find(labels);
  if (series == family.series.end()) return 0;
  return family.type == Type::kHistogram ? static_cast<double>(series->second.count)
                                         : series->second.value;
}

std::string MetricsRegistry::render() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::string out;
  for (const Family& family : families_) {
    out += "# HELP " + family.name + " " + escape(family.help, false) + "\n";
    out += "# TYPE " + family.name + " " + type_name(family.type) + "\n";
    for (const auto& [labels, series] : family.series) {
      if (family.type != Type::kHistogram) {
        out += family.name;
        append_labels(out, labels);
        out += " " + format_value(series.value) + "\n";
        continue;
      }
      uint64_t cumulative = 0;
      for (size_t i = 0; i < family.bounds.size(); ++i) {
        cumulative += series.buckets[i];
        out += family.name + "_bucket";
        append_labels(out, labels, "le", format_value(family.bounds[i]));
        out += " " + std::to_string(cumulative) + "\n";
      }
      out += family.name + "_bucket";
      append_labels(out, labels, "le", "+Inf");
      out += " " + std::to_string(series.count) + "\n";
      out += family.name + "_sum";
      append_labels(out, labels);
      out += " " + format_value(series.value) + "\n";
      out += family.name + "_count";
      append_labels(out, labels);
      out += " " + std::to_string(series.count) + "\n";
    }
  }
  return out;
}

namespace buckets {
std::vector<double> time_to_first_token() {
  return {0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1,  0.25, 0.5, 0.75,
          1.0,   2.5,   5.0,  7.5,  10.0, 20.0, 40.0, 80.0, 160,  640, 2560};
}
std::vector<double> inter_token_latency() {
  return {0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2,  0.3,  0.4, 0.5,
          0.75, 1.0,   2.5,  5.0,   7.5, 10.0, 20.0, 40.0, 80.0};
}
std::vector<double> request_latency() {
  return {0.3,  0.5,  0.8,  1.0,  1.5,  2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
          30.0, 40.0, 50.0, 60.0, 120., 240, 480, 960, 1920, 7680};
}
std::vector<double> step_tokens() {
  return {1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384};
}
std::vector<double> step_duration() {
  return {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0};
}
}  // namespace buckets

void declare_request_metrics(MetricsRegistry& registry) {
  registry.declare_counter("xq:prompt_tokens_total", "Prompt tokens of finished requests.");
  registry.declare_counter("xq:generation_tokens_total",
                           "Tokens generated and streamed to clients.");
  registry.declare_counter("xq:request_success_total",
                           "Requests finished, by finish reason (stop: EOS or a stop string; "
                           "length: max_tokens, the context or the cache pool).");
  registry.declare_counter("xq:request_rejected_total",
                           "Requests refused before generation, by reason (the gRPC status).");
  registry.declare_counter("xq:request_aborted_total",
                           "Requests ended early after acceptance, by reason (cancelled, "
                           "deadline, replica_failure, error).");
  registry.declare_histogram("xq:time_to_first_token_seconds",
                             "Seconds from arrival to the first generated token.",
                             buckets::time_to_first_token());
  registry.declare_histogram("xq:inter_token_latency_seconds",
                             "Seconds between successive generated tokens (a message carrying "
                             "n tokens counts n gaps of a nth of its wait).",
                             buckets::inter_token_latency());
  registry.declare_histogram("xq:e2e_request_latency_seconds",
                             "Seconds from arrival to the end of finished requests.",
                             buckets::request_latency());
  registry.declare_histogram("xq:request_queue_time_seconds",
                             "Seconds finished requests waited before admission.",
                             buckets::request_latency());
  registry.declare_histogram("xq:request_prefill_time_seconds",
                             "Seconds from admission to the first token of finished requests.",
                             buckets::request_latency());
  registry.declare_histogram("xq:request_decode_time_seconds",
                             "Seconds from the first token to the end of finished requests.",
                             buckets::request_latency());
}

void declare_replica_metrics(MetricsRegistry& registry) {
  registry.declare_gauge("xq:num_requests_running", "Requests holding a sequence slot.");
  registry.declare_gauge("xq:num_requests_waiting", "Requests waiting for admission.");
  registry.declare_gauge("xq:cache_usage_perc",
                         "Fraction of the cache pool's blocks in use (1 = full).");
  registry.declare_gauge("xq:cache_bytes_used", "Cache bytes in use, summed over ranks.");
  registry.declare_gauge("xq:cache_bytes_total", "Cache bytes of the pool, summed over ranks.");
  registry.declare_gauge("xq:replica_up", "1 while the replica is up and ready, else 0.");
  registry.declare_counter("xq:num_preemptions_total",
                           "Sequences preempted (their cache released, rebuilt later).");
}

void declare_step_metrics(MetricsRegistry& registry) {
  registry.declare_histogram("xq:iteration_tokens", "Tokens one scheduler step ran.",
                             buckets::step_tokens());
  registry.declare_histogram("xq:step_duration_seconds",
                             "Seconds one scheduler step took, by phase (prefill: only prompt "
                             "chunks, decode: only decode tokens, mixed: both).",
                             buckets::step_duration());
}

}  // namespace xq::serve
