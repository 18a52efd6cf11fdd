// `xq batch`: a JSONL file of requests through the batch scheduler, one
// result line per request line, in input order.
//
// Input, one JSON object a line (blank lines are skipped):
//   "prompt": text (tokenized with BOS where the model wants it) or
//   "prompt_token_ids": [ids]; optional "max_tokens" (default 128),
//   "temperature" (0), "top_k" (0), "top_p" (1), "seed", "stop" (a string or
//   strings), "ignore_eos" (false), "logprobs" (false, true or the number of
//   top tokens), "priority" (0), "arrival_step" (submit at that scheduler
//   step, to stagger), "id" (any JSON value, echoed). Any other field fails
//   the line.
// Output, per request line: {"line", "id", "text", "token_ids",
//   "finish_reason", "usage": {"prompt_tokens", "completion_tokens"},
//   "timings": {"queue_s", "prefill_s", "decode_s"}, "logprobs" when asked}
//   (plus "finish_detail" "pool" or "context" when a length end was not
//   max_tokens), or {"line", "id", "error"} for a line that failed: bad JSON,
//   a bad field, or a request the scheduler refused. Other lines go on.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <string>

#include "runtime/scheduler.h"

namespace xq {

struct BatchSummary {
  int32_t requests = 0;  // result lines written
  int32_t failed = 0;    // of which errors
  int64_t completion_tokens = 0;
  double seconds = 0;
};

// Runs every line of `in` through a scheduler on `executor` and writes the
// results to `out`. Progress (requests done / total, tokens/s) goes to
// stderr when `progress` is set.
BatchSummary run_batch_jsonl(StepExecutor& executor, const SchedulerOptions& options,
                             std::istream& in, std::ostream& out, bool progress);

// The options `xq batch` and `xq worker --input` share: files, scheduler and
// pool budget.
class Arguments;
void add_batch_options(Arguments& args);
struct BatchOptions {
  std::string input, output;
  SchedulerOptions scheduler;
  size_t cache_bytes = 0;  // 0: room for every sequence's whole context
};
// Throws xq::Error naming `tool` for a missing file or a bad value.
BatchOptions batch_options(const Arguments& args, const char* tool);
// The same without the files (left empty): the scheduler and the pool
// budget, for a server that takes its requests from the network.
BatchOptions scheduling_options(const Arguments& args);

// The `xq batch` command (argv after the command name).
int run_batch(int argc, char** argv);

}  // namespace xq
