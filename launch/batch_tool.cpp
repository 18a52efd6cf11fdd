#include "launch/batch_tool.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <istream>
#include <limits>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <ostream>
#include <set>
#include <string>
#include <vector>

#include "kernels/error.h"
#include "launch/arguments.h"
#include "launch/engine_factory.h"
#include "runtime/model.h"

namespace xq {
namespace {

using json = nlohmann::json;

// One request line, from parsing to its result.
struct Line {
  int64_t number = 0;  // in the file, from 1
  json id;             // echoed; null when absent
  Request request;
  int64_t arrival_step = 0;
  std::string error;  // set: the line failed
  bool done = false;
  RequestId request_id = 0;
  std::string text;
  std::vector<int32_t> tokens;
  json logprobs = json::array();
  FinishReason reason = FinishReason::kLength;
  std::string detail;
  Usage usage;
  Timings timings;
};

int64_t integer_field(const json& v, const char* name, int64_t min, int64_t max) {
  if (!v.is_number_integer())
    throw Error(std::string("'") + name + "' must be an integer, got " + v.dump());
  const int64_t value = v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT64_MAX)
                            ? std::numeric_limits<int64_t>::max()
                            : v.get<int64_t>();
  if (value < min || value > max)
    throw Error(std::string("'") + name + "' must be from " + std::to_string(min) + " to " +
                std::to_string(max) + ", got " + v.dump());
  return value;
}

float number_field(const json& v, const char* name) {
  if (!v.is_number()) throw Error(std::string("'") + name + "' must be a number, got " + v.dump());
  return v.get<float>();
}

// Fills line.request from a JSON object; throws xq::Error naming the field.
void parse_request(const json& object, const Tokenizer& tokenizer, Line& line) {
  if (!object.is_object()) throw Error("a request must be a JSON object");
  static const std::set<std::string> kFields = {
      "prompt", "prompt_token_ids", "max_tokens", "temperature",  "top_k",    "top_p", "seed",
      "stop",   "ignore_eos",       "logprobs",   "arrival_step", "priority", "id"};
  for (const auto& [key, value] : object.items())
    if (!kFields.count(key)) throw Error("unknown field '" + key + "'");
  if (object.contains("id")) line.id = object["id"];
  Request& r = line.request;
  r.max_tokens = 128;
  const bool text = object.contains("prompt"), ids = object.contains("prompt_token_ids");
  if (text == ids) throw Error("give one of 'prompt' and 'prompt_token_ids'");
  if (text) {
    if (!object["prompt"].is_string()) throw Error("'prompt' must be a string");
    r.prompt = tokenizer.encode(object["prompt"].get<std::string>(), tokenizer.add_bos());
  } else {
    if (!object["prompt_token_ids"].is_array())
      throw Error("'prompt_token_ids' must be an array of token ids");
    for (const json& id : object["prompt_token_ids"])
      r.prompt.push_back(static_cast<int32_t>(
          integer_field(id, "prompt_token_ids", 0, std::numeric_limits<int32_t>::max())));
  }
  for (const auto& [key, v] : object.items()) {
    if (key == "max_tokens") {
      r.max_tokens = static_cast<int32_t>(
          integer_field(v, "max_tokens", std::numeric_limits<int32_t>::min(), INT32_MAX));
    } else if (key == "temperature") {
      r.temperature = number_field(v, "temperature");
    } else if (key == "top_k") {
      r.top_k = static_cast<int32_t>(integer_field(v, "top_k", INT32_MIN, INT32_MAX));
    } else if (key == "top_p") {
      r.top_p = number_field(v, "top_p");
    } else if (key == "seed") {
      if (!v.is_number_integer() ||
          (v.is_number_integer() && !v.is_number_unsigned() && v.get<int64_t>() < 0))
        throw Error("'seed' must be an integer >= 0, got " + v.dump());
      r.seed = v.get<uint64_t>();
    } else if (key == "stop") {
      if (v.is_string()) {
        r.stop = {v.get<std::string>()};
      } else if (v.is_array() &&
                 std::all_of(v.begin(), v.end(), [](const json& s) { return s.is_string(); })) {
        for (const json& s : v) r.stop.push_back(s.get<std::string>());
      } else {
        throw Error("'stop' must be a string or an array of strings");
      }
    } else if (key == "ignore_eos") {
      if (!v.is_boolean()) throw Error("'ignore_eos' must be true or false");
      r.ignore_eos = v.get<bool>();
    } else if (key == "logprobs") {
      if (v.is_boolean())
        r.logprobs = v.get<bool>() ? 0 : -1;
      else
        r.logprobs = static_cast<int32_t>(integer_field(v, "logprobs", 0, kMaxTopLogprobs));
    } else if (key == "arrival_step") {
      line.arrival_step = integer_field(v, "arrival_step", 0, std::numeric_limits<int32_t>::max());
    } else if (key == "priority") {
      r.priority = static_cast<int32_t>(integer_field(v, "priority", INT32_MIN, INT32_MAX));
    }
  }
  const std::string problem = request_field_problem(r);
  if (!problem.empty()) throw Error(problem);
}

json result_json(const Line& line) {
  json out = json::object();
  out["line"] = line.number;
  out["id"] = line.id;
  if (!line.error.empty()) {
    out["error"] = "line " + std::to_string(line.number) + ": " + line.error;
    return out;
  }
  out["text"] = line.text;
  out["token_ids"] = line.tokens;
  out["finish_reason"] = finish_reason_name(line.reason);
  if (!line.detail.empty()) out["finish_detail"] = line.detail;
  out["usage"] = {{"prompt_tokens", line.usage.prompt_tokens},
                  {"completion_tokens", line.usage.completion_tokens}};
  out["timings"] = {{"queue_s", line.timings.queue_seconds},
                    {"prefill_s", line.timings.prefill_seconds},
                    {"decode_s", line.timings.decode_seconds}};
  if (line.request.logprobs >= 0) out["logprobs"] = line.logprobs;
  return out;
}

json logprob_json(const Logprobs& lp) {
  json top = json::array();
  for (const TokenLogprob& t : lp.top) top.push_back({{"token", t.token}, {"logprob", t.logprob}});
  return {{"token", lp.chosen.token}, {"logprob", lp.chosen.logprob}, {"top", top}};
}

void print_progress(int32_t done, int32_t total, int64_t tokens, double seconds, bool last) {
  if (!isatty(STDERR_FILENO) && !last) return;
  const int width = 30;
  const int filled = total > 0 ? static_cast<int>(int64_t{width} * done / total) : width;
  std::fprintf(stderr, "\r[%s%s] %d/%d requests, %lld tokens, %.1f tokens/s",
               std::string(static_cast<size_t>(filled), '#').c_str(),
               std::string(static_cast<size_t>(width - filled), ' ').c_str(), done, total,
               static_cast<long long>(tokens), seconds > 0 ? tokens / seconds : 0.0);
  if (last) std::fprintf(stderr, "\n");
  std::fflush(stderr);
}

}  // namespace

BatchSummary run_batch_jsonl(StepExecutor& executor, const SchedulerOptions& options,
                             std::istream& in, std::ostream& out, bool progress) {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  const Tokenizer& tokenizer = executor.engine().model().tokenizer();
  std::vector<Line> lines;
  std::string text;
  for (int64_t number = 1; std::getline(in, text); ++number) {
    if (text.find_first_not_of(" \t\r") == std::string::npos) continue;
    Line line;
    line.number = number;
    try {
      parse_request(json::parse(text), tokenizer, line);
    } catch (const json::exception& e) {
      line.error = std::string("invalid JSON: ") + e.what();
    } catch (const std::exception& e) {
      line.error = e.what();
    }
    line.done = !line.error.empty();
    lines.push_back(std::move(line));
  }

  Scheduler scheduler(executor, options);
  // Submission order: by arrival step, then file order.
  std::vector<size_t> order;
  for (size_t i = 0; i < lines.size(); ++i)
    if (!lines[i].done) order.push_back(i);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return lines[a].arrival_step < lines[b].arrival_step;
  });
  std::map<RequestId, size_t> by_request;
  BatchSummary summary;
  const auto total = static_cast<int32_t>(lines.size());
  int32_t done = 0;
  for (const Line& l : lines) done += l.done ? 1 : 0;
  size_t next_submit = 0, next_write = 0;
  auto write_ready = [&] {
    for (; next_write < lines.size() && lines[next_write].done; ++next_write) {
      const Line& l = lines[next_write];
      out << result_json(l).dump(-1, ' ', false, json::error_handler_t::replace) << '\n';
      ++summary.requests;
      summary.failed += l.error.empty() ? 0 : 1;
    }
    out.flush();
  };
  write_ready();
  auto last_progress = Clock::now();
  for (int64_t step = 0; next_submit < order.size() || !scheduler.idle(); ++step) {
    // Idle until the next arrival: skip the empty steps.
    if (scheduler.idle() && next_submit < order.size())
      step = std::max(step, lines[order[next_submit]].arrival_step);
    for (; next_submit < order.size() && lines[order[next_submit]].arrival_step <= step;
         ++next_submit) {
      Line& l = lines[order[next_submit]];
      l.request_id = scheduler.submit(l.request);
      by_request[l.request_id] = order[next_submit];
    }
    scheduler.step();
    for (RequestEvent& e : scheduler.take_events()) {
      Line& l = lines[by_request.at(e.id)];
      l.text += e.text;
      if (e.kind == RequestEvent::Kind::kToken) {
        l.tokens.push_back(e.token);
        if (e.logprobs) l.logprobs.push_back(logprob_json(*e.logprobs));
        ++summary.completion_tokens;
        continue;
      }
      if (e.reason == FinishReason::kFailed) {
        l.error = e.message;
      } else {
        l.reason = e.reason;
        l.detail = e.message;
        l.usage = e.usage;
        l.timings = e.timings;
      }
      l.done = true;
      ++done;
      by_request.erase(e.id);
    }
    write_ready();
    if (progress && Clock::now() - last_progress > std::chrono::milliseconds(250)) {
      last_progress = Clock::now();
      print_progress(done, total, summary.completion_tokens,
                     std::chrono::duration<double>(last_progress - start).count(), false);
    }
  }
  write_ready();
  summary.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  if (progress) print_progress(done, total, summary.completion_tokens, summary.seconds, true);
  return summary;
}

void add_batch_options(Arguments& args) {
  args.option("input", "", "JSONL file of requests (required)");
  args.option("output", "", "JSONL file for the results (required)");
  args.option("cache-memory", "",
              "cache pool budget per rank, e.g. 512MiB, 2GiB, 64MB or bytes (default: room for "
              "every sequence's whole context)");
  args.option("max-batch-tokens", "512", "tokens one step runs at most");
  args.option("max-sequences", "8", "sequences running at once");
  args.option("policy", "reserve",
              "'reserve' (admit only what the pool holds to the end) or 'optimistic' (admit on "
              "what prefill needs; preempt the newest when the pool runs out)");
  args.option("max-decode-only-steps", "8",
              "steps a waiting prefill may get nothing before it goes first");
}

BatchOptions batch_options(const Arguments& args, const char* tool) {
  if (!args.has("input") || !args.has("output"))
    throw Error(std::string(tool) + ": --input and --output are required (see --help)");
  BatchOptions b = scheduling_options(args);
  b.input = args.get("input");
  b.output = args.get("output");
  return b;
}

BatchOptions scheduling_options(const Arguments& args) {
  BatchOptions b;
  b.scheduler.max_batch_tokens = static_cast<int32_t>(args.get_int("max-batch-tokens", 1));
  b.scheduler.max_sequences = static_cast<int32_t>(args.get_int("max-sequences", 1, 4096));
  b.scheduler.max_decode_only_steps =
      static_cast<int32_t>(args.get_int("max-decode-only-steps", 0));
  b.scheduler.policy = parse_admission_policy(args.get("policy"));
  b.cache_bytes =
      args.has("cache-memory") ? parse_byte_size(args.get("cache-memory"), "--cache-memory") : 0;
  return b;
}

int run_batch(int argc, char** argv) {
  Arguments args("batch",
                 "Run a JSONL file of requests through the batch scheduler (continuous batching "
                 "with chunked prefill) and write one JSON result line per request line, in "
                 "input order. Fields: see launch/batch_tool.h.");
  add_model_options(args);
  add_batch_options(args);
  if (!args.parse(argc, argv)) return 0;
  const BatchOptions batch = batch_options(args, "batch");
  const SchedulerOptions& options = batch.scheduler;
  const size_t cache_bytes = batch.cache_bytes;
  const int threads = static_cast<int>(args.get_int("threads", 1, kMaxThreads));
  const BackendChoice backend = backend_choice(args);
  std::ifstream in(batch.input, std::ios::binary);
  if (!in) throw Error(batch.input + ": cannot open the input file");
  std::ofstream out(batch.output, std::ios::binary | std::ios::trunc);
  if (!out) throw Error(batch.output + ": cannot create the output file");

  auto model = Model::load(args.get("model"), args.get("tokenizer"));
  EngineOptions engine_opts = engine_options(args, threads, 0);
  engine_opts.sequences = options.max_sequences;
  engine_opts.cache_bytes = cache_bytes;
  const std::unique_ptr<Engine> engine = make_engine(*model, engine_opts, backend);
  std::fprintf(stderr, "%s\ncache %s, pool %d blocks of %d tokens, policy %s\n",
               backend_summary(*engine, threads).c_str(), engine->cache_description().c_str(),
               engine->pool().total_blocks, engine->pool().block_tokens,
               admission_policy_name(options.policy));
  LocalExecutor executor(*engine);
  const BatchSummary summary = run_batch_jsonl(executor, options, in, out, /*progress=*/true);
  if (!out) throw Error(args.get("output") + ": write error");
  std::fprintf(stderr, "%d requests (%d failed), %lld tokens generated in %.2f s (%.1f tokens/s)\n",
               summary.requests, summary.failed, static_cast<long long>(summary.completion_tokens),
               summary.seconds,
               summary.seconds > 0 ? summary.completion_tokens / summary.seconds : 0.0);
  // The device's graph counters, once the run has filled them.
  if (backend.backend == Backend::kCuda)
    std::fprintf(stderr, "%s\n", backend_summary(*engine, threads).c_str());
  return 0;
}

}  // namespace xq
