// The Prometheus registry against the text exposition format written out by
// hand, the request observation against the outcomes its header promises,
// and the whole set of families against Debian's promtool where it is
// installed.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>

#include "kernels/error.h"
#include "launch/serve/metrics.h"
#include "launch/serve/request_metrics.h"

namespace xq::serve {
namespace {

TEST(Metrics, CounterGaugeAndHistogramRenderAsTheExpositionFormat) {
  MetricsRegistry registry;
  registry.declare_counter("xq:things_total", "Things.\nCounted.");
  registry.declare_gauge("xq:level", "A level.");
  registry.declare_histogram("xq:wait_seconds", "Waits.", {0.5, 1, 2.5});
  registry.add("xq:things_total", {{"kind", "a\"b\\c\nd"}}, 2);
  registry.add("xq:things_total", {{"kind", "a\"b\\c\nd"}});
  registry.set("xq:level", {}, 0.25);
  // le is "less than or equal": 1 falls in the bucket bounded by 1.
  for (double v : {0.1, 1.0, 1.0, 2.0, 7.0})
    registry.observe("xq:wait_seconds", {{"replica", "r1"}}, v);
  const std::string expected =
      "# HELP xq:things_total Things.\\nCounted.\n"
      "# TYPE xq:things_total counter\n"
      "xq:things_total{kind=\"a\\\"b\\\\c\\nd\"} 3\n"
      "# HELP xq:level A level.\n"
      "# TYPE xq:level gauge\n"
      "xq:level 0.25\n"
      "# HELP xq:wait_seconds Waits.\n"
      "# TYPE xq:wait_seconds histogram\n"
      "xq:wait_seconds_bucket{replica=\"r1\",le=\"0.5\"} 1\n"
      "xq:wait_seconds_bucket{replica=\"r1\",le=\"1\"} 3\n"
      "xq:wait_seconds_bucket{replica=\"r1\",le=\"2.5\"} 4\n"
      "xq:wait_seconds_bucket{replica=\"r1\",le=\"+Inf\"} 5\n"
      "xq:wait_seconds_sum{replica=\"r1\"} 11.1\n"
      "xq:wait_seconds_count{replica=\"r1\"} 5\n";
  EXPECT_EQ(registry.render(), expected);
  EXPECT_EQ(registry.value("xq:wait_seconds", {{"replica", "r1"}}), 5);
  registry.clear("xq:wait_seconds");
  EXPECT_EQ(registry.value("xq:wait_seconds", {{"replica", "r1"}}), 0);
}

TEST(Metrics, MisuseIsAnError) {
  MetricsRegistry registry;
  registry.declare_counter("xq:c_total", "C.");
  EXPECT_THROW(registry.declare_gauge("xq:c_total", "again"), Error);
  EXPECT_THROW(registry.add("xq:c_total", {}, -1), Error);
  EXPECT_THROW(registry.observe("xq:c_total", {}, 1), Error);
  EXPECT_THROW(registry.add("xq:missing_total", {}), Error);
  EXPECT_THROW(registry.declare_histogram("xq:h", "H.", {1, 1}), Error);
}

v1::GenerateResponse delta(int tokens) {
  v1::GenerateResponse message;
  for (int i = 0; i < tokens; ++i) message.mutable_delta()->add_token_ids(i);
  return message;
}

TEST(RequestMetrics, AFinishedRequestCountsItsTokensLatenciesAndReason) {
  MetricsRegistry registry;
  declare_request_metrics(registry);
  const MetricLabels labels = {{"model", "m"}, {"replica", "r"}, {"cache_mode", "fp16"}};
  using Clock = RequestObservation::Clock;
  const Clock::time_point t0 = Clock::now();
  {
    RequestObservation observation(&registry, t0);
    observation.set_labels(labels);
    observation.on_written(delta(2), t0 + std::chrono::milliseconds(100));
    observation.on_written(delta(0), t0 + std::chrono::milliseconds(150));  // text only
    observation.on_written(delta(3), t0 + std::chrono::milliseconds(400));
    v1::GenerateResponse finished;
    finished.mutable_finished()->set_reason(v1::FINISH_REASON_EOS);
    finished.mutable_finished()->mutable_usage()->set_prompt_tokens(7);
    finished.mutable_finished()->mutable_usage()->set_completion_tokens(5);
    observation.on_written(finished, t0 + std::chrono::milliseconds(410));
    observation.finish(grpc::Status::OK);
    observation.finish(grpc::Status::OK);  // once only
  }
  EXPECT_EQ(registry.value("xq:generation_tokens_total", labels), 5);
  EXPECT_EQ(registry.value("xq:prompt_tokens_total", labels), 7);
  MetricLabels stop = labels;
  stop.emplace_back("finished_reason", "stop");
  EXPECT_EQ(registry.value("xq:request_success_total", stop), 1);
  EXPECT_EQ(registry.value("xq:time_to_first_token_seconds", labels), 1);
  // 5 tokens: 1 in the first message's second token, 3 in the last message.
  EXPECT_EQ(registry.value("xq:inter_token_latency_seconds", labels), 4);
  EXPECT_EQ(registry.value("xq:e2e_request_latency_seconds", labels), 1);
  // The 3 tokens 300 ms after the last: 100 ms each; the first message's second token: 0.
  const std::string text = registry.render();
  EXPECT_NE(text.find("xq:inter_token_latency_seconds_sum{model=\"m\",replica=\"r\",cache_mode="
                      "\"fp16\"} 0.3"),
            std::string::npos)
      << text;
}

TEST(RequestMetrics, RejectionsAndAbortsByReason) {
  MetricsRegistry registry;
  declare_request_metrics(registry);
  const auto now = RequestObservation::Clock::now();
  RequestObservation(&registry, now).finish({grpc::StatusCode::INVALID_ARGUMENT, "bad"});
  RequestObservation(&registry, now).finish({grpc::StatusCode::RESOURCE_EXHAUSTED, "full"});
  RequestObservation(&registry, now).finish({grpc::StatusCode::CANCELLED, "gone"});
  RequestObservation(&registry, now).finish({grpc::StatusCode::DEADLINE_EXCEEDED, "late"});
  {
    RequestObservation observation(&registry, now);
    observation.on_written(delta(1), now);
    v1::GenerateResponse error;
    error.mutable_error()->set_retryable(true);
    observation.on_written(error, now);
  }  // the destructor records
  EXPECT_EQ(registry.value("xq:request_rejected_total", {{"reason", "invalid_argument"}}), 1);
  EXPECT_EQ(registry.value("xq:request_rejected_total", {{"reason", "resource_exhausted"}}), 1);
  EXPECT_EQ(registry.value("xq:request_aborted_total", {{"reason", "cancelled"}}), 1);
  EXPECT_EQ(registry.value("xq:request_aborted_total", {{"reason", "deadline"}}), 1);
  EXPECT_EQ(registry.value("xq:request_aborted_total", {{"reason", "replica_failure"}}), 1);
  EXPECT_EQ(registry.value("xq:generation_tokens_total", {}), 1);
}

// Every family the servers declare, with a series each, through promtool.
// promtool's lint rejects ':' in names (reserved for recording rules) while
// vLLM's naming, which these follow, uses it: the check is that the text
// parses and that the colon is its only complaint; the same text with `xq_`
// for `xq:` must pass clean.
TEST(Metrics, PromtoolAcceptsEveryFamily) {
  if (std::system("promtool --version > /dev/null 2>&1") != 0)
    GTEST_SKIP() << "promtool (Debian's prometheus package) is not installed";
  MetricsRegistry registry;
  declare_request_metrics(registry);
  declare_replica_metrics(registry);
  declare_step_metrics(registry);
  const MetricLabels labels = {{"model", "m"}, {"replica", "r"}, {"cache_mode", "xquant-4"}};
  const auto now = RequestObservation::Clock::now();
  {
    RequestObservation observation(&registry, now);
    observation.set_labels(labels);
    observation.on_written(delta(2), now);
    v1::GenerateResponse finished;
    finished.mutable_finished()->set_reason(v1::FINISH_REASON_LENGTH);
    observation.on_written(finished, now);
  }
  RequestObservation(&registry, now).finish({grpc::StatusCode::UNAUTHENTICATED, "key"});
  registry.set("xq:num_requests_running", labels, 1);
  registry.set("xq:cache_usage_perc", labels, 0.5);
  registry.set("xq:num_preemptions_total", labels, 3);
  registry.observe("xq:iteration_tokens", labels, 64);
  MetricLabels phase = labels;
  phase.emplace_back("phase", "decode");
  registry.observe("xq:step_duration_seconds", phase, 0.01);

  const std::string text = registry.render();
  const std::string dir = ::testing::TempDir();
  const std::string with_colons = dir + "/xq_metrics_colons.prom";
  const std::string with_underscores = dir + "/xq_metrics_underscores.prom";
  std::ofstream(with_colons) << text;
  std::string renamed = text;
  for (size_t at = 0; (at = renamed.find("xq:", at)) != std::string::npos;) renamed[at + 2] = '_';
  std::ofstream(with_underscores) << renamed;
  const std::string report = dir + "/xq_promtool.txt";
  const int colons =
      std::system(("promtool check metrics < " + with_colons + " > " + report + " 2>&1").c_str());
  std::ifstream in(report);
  int problems = 0;
  for (std::string line; std::getline(in, line);) {
    if (line.empty()) continue;
    ++problems;
    EXPECT_NE(line.find("metric names should not contain ':'"), std::string::npos) << line;
  }
  EXPECT_GT(problems, 0) << "promtool no longer reports the colon; tighten this test";
  EXPECT_NE(WEXITSTATUS(colons), 1) << "promtool could not parse the text";
  const int clean = std::system(
      ("promtool check metrics < " + with_underscores + " > " + report + " 2>&1").c_str());
  std::ifstream clean_report(report);
  const std::string complaints((std::istreambuf_iterator<char>(clean_report)),
                               std::istreambuf_iterator<char>());
  EXPECT_EQ(clean, 0) << complaints;
}

}  // namespace
}  // namespace xq::serve
