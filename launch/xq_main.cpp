// xq: the command-line entry point. One binary, one subcommand per job:
//   xq perplexity   perplexity of a text file (llama.cpp's protocol)
//   xq generate     stream a completion of a prompt
// Every subcommand answers --help. Errors print one line and exit non-zero.
#include <mpi.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "kernels/error.h"
#include "launch/arguments.h"
#include "launch/batch_tool.h"
#include "launch/chat_prompt.h"
#include "launch/client_tool.h"
#include "launch/coordinator_tool.h"
#include "launch/engine_factory.h"
#include "launch/serve_tool.h"
#include "parallel/device_grid.h"
#include "parallel/grid.h"
#include "parallel/mpi_communicator.h"
#include "parallel/pipeline_engine.h"
#include "parallel/plan_broadcast.h"
#include "runtime/cache_mode.h"
#include "runtime/engine.h"
#include "runtime/generation.h"
#include "runtime/model.h"
#include "runtime/perplexity.h"
#include "runtime/sampler.h"
#include "runtime/stop_strings.h"

namespace xq {
namespace {

std::string read_text_file(const std::string& path) {
  // An ifstream opens a directory without complaint and then reads nothing,
  // which would be reported as an empty file.
  std::error_code ignored;
  if (std::filesystem::is_directory(path, ignored))
    throw Error(path + ": cannot read text file: it is a directory");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot read text file: " + std::strerror(errno));
  std::stringstream buffer;
  buffer << in.rdbuf();
  if (in.bad()) throw Error(path + ": read error");
  std::string text = buffer.str();
  if (text.empty()) throw Error(path + ": text file is empty");
  return text;
}

// Options perplexity and worker share: the text and how it is scored.
void add_perplexity_options(Arguments& args) {
  args.option("file", "", "text file to score");
  args.option("ctx", "512", "tokens per chunk");
  args.option("chunks", "0", "score at most this many chunks (0 = all)");
  args.option("score", "half", "'half' (second half of each chunk) or 'all'");
  args.option("bos", "on",
              "'on': BOS starts every chunk; 'auto': only where the model file asks for BOS");
  args.option("batch", "0",
              "run each chunk as ceil(ctx / N) near-equal forward passes, as a pipeline's "
              "micro-batches do (0 = one pass)");
}

// The scoring options, checked before the text is read and the model loaded,
// so that a typo fails at once.
PerplexityOptions perplexity_options(const Arguments& args, const std::string& command) {
  if (!args.has("file")) throw Error(command + ": --file is required (see --help)");
  if (args.get("score") != "half" && args.get("score") != "all")
    throw Error(command + ": --score must be 'half' or 'all'");
  if (args.get("bos") != "on" && args.get("bos") != "auto")
    throw Error(command + ": --bos must be 'on' or 'auto'");
  PerplexityOptions options;
  options.ctx = static_cast<int32_t>(args.get_int("ctx", 2));
  options.max_chunks = static_cast<int32_t>(args.get_int("chunks", 0));
  options.score_all = args.get("score") == "all";
  options.batch = static_cast<int32_t>(args.get_int("batch", 0));
  // Scoring the second half of a 2-token chunk scores nothing (NaN perplexity).
  if (!options.score_all && options.ctx < 3)
    throw Error(command + ": --ctx " + std::to_string(options.ctx) +
                " leaves no token to score (use at least 3, or --score all)");
  return options;
}

// The text's tokens for scoring; settles options.bos_first for this model.
std::vector<int32_t> perplexity_tokens(const Arguments& args, const std::string& text,
                                       const Model& model, PerplexityOptions& options,
                                       const std::string& command, double* tokenize_seconds) {
  options.bos_first = args.get("bos") == "on" || model.tokenizer().add_bos();
  if (options.ctx > model.config().max_seq_len)
    throw Error(command + ": --ctx must be between 2 and the model's context of " +
                std::to_string(model.config().max_seq_len));
  const auto start = std::chrono::steady_clock::now();
  std::vector<int32_t> tokens = model.tokenizer().encode(text, options.bos_first);
  *tokenize_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (tokens.size() < static_cast<size_t>(options.ctx))
    throw Error(args.get("file") + ": the text has " + std::to_string(tokens.size()) +
                " tokens, fewer than one chunk of --ctx " + std::to_string(options.ctx));
  return tokens;
}

// A progress bar on stderr when it is a terminal.
void print_progress(int32_t done, int32_t total, double running) {
  if (!isatty(STDERR_FILENO)) return;
  const int width = 30;
  int filled = static_cast<int>(static_cast<int64_t>(width) * done / total);
  std::fprintf(stderr, "\r[%s%s] %d/%d chunks, ppl %.4f", std::string(filled, '#').c_str(),
               std::string(width - filled, ' ').c_str(), done, total, running);
  if (done == total) std::fprintf(stderr, "\n");
  std::fflush(stderr);
}

void print_perplexity(const PerplexityResult& result, const PerplexityOptions& options) {
  std::printf(
      "perplexity %.4f +/- %.4f  (%lld tokens scored in %d chunks of %d, %.1f tokens/s "
      "evaluated)\n",
      result.perplexity, result.standard_error, static_cast<long long>(result.tokens_scored),
      result.chunks, options.ctx, result.tokens_evaluated / result.seconds);
}

void print_kl_divergence(const KlDivergenceResult& r, const SavedLogitsHeader& reference) {
  const std::string saved =
      reference.top_k > 0 ? "top " + std::to_string(reference.top_k) + " + rest" : "every logit";
  std::printf(
      "kl divergence %.6f +/- %.6f  (median %.6f, p99 %.6f, max %.4f; %lld tokens, reference "
      "saved as %s)\n",
      r.mean, r.mean_standard_error, r.median, r.p99, r.max, static_cast<long long>(r.rows),
      saved.c_str());
  std::printf("top-1 agreement %.4f%% +/- %.4f%%\n", 100 * r.top1_agreement,
              100 * r.top1_standard_error);
  // exp(mean difference) - 1 is the perplexity ratio the paired chunks imply.
  std::printf(
      "nll difference %+.6f +/- %.6f per token (paired over %d chunks): perplexity %+.3f%% +/- "
      "%.3f%% against the reference's %.4f\n",
      r.nll_difference, r.nll_difference_standard_error, r.chunks,
      100 * (std::exp(r.nll_difference) - 1),
      100 * std::exp(r.nll_difference) * r.nll_difference_standard_error, r.reference_perplexity);
}

int run_perplexity(int argc, char** argv) {
  Arguments args("perplexity",
                 "Perplexity of a text file: chunks of --ctx tokens, each starting with BOS, the "
                 "second half of "
                 "each chunk scored (llama.cpp's protocol).");
  add_model_options(args);
  add_perplexity_options(args);
  args.option("save-logits", "",
              "save every scored position's next-token distribution here (a reference for "
              "--kl-divergence; run it on fp16)");
  args.option("save-top-k", "32",
              "with --save-logits: keep the k most likely tokens' log-probabilities and the "
              "rest's total mass (0 = the whole vocabulary, vocab x 4 bytes a position)");
  args.option("kl-divergence", "",
              "compare with logits saved by --save-logits on the same text, --ctx and --score: "
              "KL divergence, top-1 agreement, paired NLL difference");
  if (!args.parse(argc, argv)) return 0;
  PerplexityOptions options = perplexity_options(args, "perplexity");
  if (args.has("save-logits") && args.has("kl-divergence"))
    throw Error("perplexity: --save-logits and --kl-divergence go in separate runs");
  const int threads = static_cast<int>(args.get_int("threads", 1, kMaxThreads));
  const BackendChoice backend = backend_choice(args);
  const std::string text = read_text_file(args.get("file"));
  auto model = Model::load(args.get("model"), args.get("tokenizer"));
  double tokenize_seconds = 0;
  std::vector<int32_t> tokens =
      perplexity_tokens(args, text, *model, options, "perplexity", &tokenize_seconds);
  const std::unique_ptr<Engine> engine =
      make_engine(*model, engine_options(args, threads, options.ctx), backend);
  std::fprintf(stderr, "%s: %zu tokens (tokenized in %.2f s), ctx %d, cache %s, %s\n",
               args.get("file").c_str(), tokens.size(), tokenize_seconds, options.ctx,
               engine->cache_description().c_str(), backend_summary(*engine, threads).c_str());
  const int32_t vocab = model->config().vocab_size;
  const int32_t rows_per_chunk = options.ctx - 1 - (options.score_all ? 0 : options.ctx / 2);
  std::unique_ptr<SavedLogitsWriter> writer;
  std::unique_ptr<KlDivergenceComparer> comparer;
  if (args.has("save-logits")) {
    writer = std::make_unique<SavedLogitsWriter>(
        args.get("save-logits"), vocab, rows_per_chunk,
        static_cast<int32_t>(args.get_int("save-top-k", 0, vocab)));
    options.observer = writer.get();
  } else if (args.has("kl-divergence")) {
    comparer =
        std::make_unique<KlDivergenceComparer>(args.get("kl-divergence"), vocab, rows_per_chunk);
    options.observer = comparer.get();
  }
  PerplexityResult result = evaluate_perplexity(*engine, tokens, options, print_progress);
  print_perplexity(result, options);
  if (writer) {
    writer->close();
    std::printf("saved logits: %s (%d chunks, %s)\n", args.get("save-logits").c_str(),
                result.chunks,
                args.get_int("save-top-k", 0, vocab) > 0
                    ? ("top " + args.get("save-top-k") + " + rest").c_str()
                    : "every logit");
  }
  if (comparer) print_kl_divergence(comparer->result(), comparer->header());
  // Memory of the mode as the paper reports it: a fraction of the fp16 KV cache.
  std::printf("cache %s: %.1f bytes/token, %.3f of the fp16 KV cache\n",
              engine_cache_mode(*engine).c_str(), engine_cache_bytes_per_token(*engine),
              engine->cache_fraction_of_fp16());
  // The device's graph counters, once the run has filled them.
  if (backend.backend == Backend::kCuda)
    std::fprintf(stderr, "%s\n", backend_summary(*engine, threads).c_str());
  return 0;
}

// Options generate and worker share: the prompt and how to sample.
void add_generation_options(Arguments& args) {
  args.option("prompt", "", "prompt text (required)");
  args.option("max-tokens", "128", "tokens to generate at most");
  args.option("temperature", "0", "sampling temperature; 0 = greedy");
  args.option("top-k", "0", "sample from the k most likely tokens (0 = all)");
  args.option("top-p", "1", "sample from the smallest set with this probability mass");
  args.option("seed", "0", "random seed");
  args.flag("ids", "print token ids instead of text");
  args.flag("margins", "with --ids: also print each step's top-1 minus top-2 logit");
  args.option("force-ids", "",
              "teacher forcing: one step per id (comma-separated; --max-tokens is ignored), step "
              "0 after the prompt, step i after id i - 1 fed instead of the sampled token; each "
              "step still prints what it sampled (with --ids --margins at temperature 0: its "
              "argmax and margin), so two runs can be compared on the same inputs");
}

// --force-ids as token ids (empty without it); a bad list fails before the
// model is loaded, out-of-vocabulary ids when the engine is fed them.
std::vector<int32_t> forced_ids(const Arguments& args) {
  std::vector<int32_t> ids;
  std::stringstream list(args.get("force-ids"));
  for (std::string item; std::getline(list, item, ',');) {
    char* end = nullptr;
    errno = 0;
    const long long id = std::strtoll(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0' || errno != 0 || id < 0 ||
        id > std::numeric_limits<int32_t>::max())
      throw Error("--force-ids wants token ids separated by commas, got '" + args.get("force-ids") +
                  "'");
    ids.push_back(static_cast<int32_t>(id));
  }
  return ids;
}

// Generation steps: one per forced id, else --max-tokens.
int64_t generation_steps(const Arguments& args) {
  return args.has("force-ids") ? static_cast<int64_t>(forced_ids(args).size())
                               : args.get_int("max-tokens", 0);
}

// Everything generation needs from the options, checked before the model is
// loaded so that a bad option costs nothing and reads as the only error.
SamplerOptions generation_sampler(const Arguments& args, const char* command) {
  if (!args.has("prompt"))
    throw Error(std::string(command) + ": --prompt is required (see --help)");
  generation_steps(args);
  SamplerOptions options;
  options.temperature = static_cast<float>(args.get_float("temperature"));
  options.top_k = static_cast<int32_t>(args.get_int("top-k", 0));
  options.top_p = static_cast<float>(args.get_float("top-p"));
  options.seed = static_cast<uint64_t>(args.get_int("seed", std::numeric_limits<int64_t>::min(),
                                                    std::numeric_limits<int64_t>::max()));
  Sampler check(options);  // rejects bad combinations now
  return options;
}

// The prompt's tokens, BOS where the model wants it. parse_special: the texts
// of control tokens (a chat template's <|im_start|>) become those tokens.
std::vector<int32_t> encode_prompt(const std::string& text, bool parse_special, const Model& model,
                                   const char* command) {
  const Tokenizer& tokenizer = model.tokenizer();
  std::vector<int32_t> prompt = tokenizer.encode(text, tokenizer.add_bos(), parse_special);
  if (prompt.empty()) throw Error(std::string(command) + ": the prompt has no tokens");
  if (static_cast<int64_t>(prompt.size()) >= model.config().max_seq_len)
    throw Error(std::string(command) + ": the prompt has " + std::to_string(prompt.size()) +
                " tokens; the model's context is " + std::to_string(model.config().max_seq_len));
  return prompt;
}

// Generates through any engine; only the ranks with `print` write: the
// prompt text and then the generated text (or ids) on stdout as it comes, the
// statistics on stderr on a line of their own. Generation ends where the text
// first contains one of `stop` (which is not printed); every rank follows the
// text, so all of them stop at the same token.
void generate_and_print(Engine& engine, const Arguments& args,
                        const SamplerOptions& sampler_options, const std::string& prompt_text,
                        const std::vector<int32_t>& prompt, const std::vector<std::string>& stop,
                        bool print) {
  const Tokenizer& tokenizer = engine.model().tokenizer();
  GenerationOptions options;
  options.max_new_tokens = generation_steps(args);
  options.forced_tokens = forced_ids(args);
  options.sampler = sampler_options;
  const bool print_ids = args.has("ids"), print_margins = args.has("margins");
  if (print && !print_ids) std::fputs(prompt_text.c_str(), stdout);
  StopStringFilter stop_filter(stop);
  if (!stop.empty()) options.should_stop = [&stop_filter] { return stop_filter.stopped(); };
  auto on_token = [&](const SampledToken& t) {
    std::string text = tokenizer.token_to_piece(t.token);
    if (!stop.empty()) text = stop_filter.push(text);
    if (!print) return;
    if (print_ids && print_margins) {
      // How close the step was to a tie: explains where two caches diverge.
      std::printf("%d %.4f\n", t.token, t.margin);
    } else if (print_ids) {
      std::printf("%d\n", t.token);
    } else {
      std::fputs(text.c_str(), stdout);
    }
    std::fflush(stdout);
  };
  const GenerationResult result = generate(engine, prompt, options, on_token);
  if (!print) return;
  if (!print_ids) std::printf("%s\n", stop_filter.finish().c_str());
  std::fflush(stdout);  // the text ends before the statistics start
  const double generated = static_cast<double>(result.tokens.size());
  std::fprintf(stderr,
               "prompt %d tokens in %.3f s (%.1f tokens/s); generated %.0f tokens in %.3f s (%.1f "
               "tokens/s)\n",
               result.prompt_tokens, result.prefill_seconds,
               result.prompt_tokens / result.prefill_seconds, generated, result.decode_seconds,
               generated > 0 ? generated / result.decode_seconds : 0.0);
}

int run_generate(int argc, char** argv) {
  Arguments args("generate",
                 "Complete a prompt, streaming tokens to stdout; stops at EOS or --max-tokens.");
  add_model_options(args);
  add_generation_options(args);
  args.flag("chat",
            "chat: --prompt is the user's message, formatted with the model's chat template "
            "(or --chat-template); generation ends with the assistant's turn");
  args.option("system", "", "with --chat: a system message before the user's");
  args.option("chat-template", "",
              "with --chat: the template family (chatml, llama3, llama2, zephyr, gemma) instead "
              "of the model's");
  args.flag("parse-special",
            "the texts of control tokens in --prompt (such as <|im_start|>) become those tokens, "
            "as --chat does");
  if (!args.parse(argc, argv)) return 0;
  const SamplerOptions sampler = generation_sampler(args, "generate");
  if (!args.has("chat") && (args.has("system") || args.has("chat-template")))
    throw Error("generate: --system and --chat-template go with --chat");
  if (args.has("chat-template")) ChatTemplate::from_name(args.get("chat-template"));
  const int threads = static_cast<int>(args.get_int("threads", 1, kMaxThreads));
  const BackendChoice backend = backend_choice(args);
  auto model = Model::load(args.get("model"), args.get("tokenizer"));
  ChatPrompt chat{args.get("prompt"), {}};
  if (args.has("chat"))
    chat = chat_prompt(
        chat_template_for(model->chat_template(), args.get("chat-template"), "generate --chat"),
        args.get("system"), args.get("prompt"));
  std::vector<int32_t> prompt =
      encode_prompt(chat.text, args.has("chat") || args.has("parse-special"), *model, "generate");
  const std::unique_ptr<Engine> engine = make_engine(
      *model,
      engine_options(args, threads,
                     generation_capacity(*model, prompt.size(), generation_steps(args))),
      backend);
  std::fprintf(stderr, "%s\ncache %s\n", backend_summary(*engine, threads).c_str(),
               engine->cache_description().c_str());
  generate_and_print(*engine, args, sampler, chat.text, prompt, chat.stop, /*print=*/true);
  // The device's graph counters, once the run has filled them.
  if (backend.backend == Backend::kCuda)
    std::fprintf(stderr, "%s\n", backend_summary(*engine, threads).c_str());
  return 0;
}

// Ends the process with a message unless finished() is called within `limit`.
class StartupWatchdog {
 public:
  explicit StartupWatchdog(std::chrono::milliseconds limit)
      : thread_([this, limit] {
          std::unique_lock<std::mutex> lock(mutex_);
          if (done_changed_.wait_for(lock, limit, [this] { return done_; })) return;
          std::fprintf(stderr,
                       "error: worker start-up (MPI_Init and the grid's communicators) did not "
                       "finish within %.0f s: a rank died or never started\n",
                       std::chrono::duration<double>(limit).count());
          std::fflush(stderr);
          std::_Exit(1);
        }) {}
  ~StartupWatchdog() { finished(); }
  StartupWatchdog(const StartupWatchdog&) = delete;
  StartupWatchdog& operator=(const StartupWatchdog&) = delete;
  void finished() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      done_ = true;
    }
    done_changed_.notify_all();
    if (thread_.joinable()) thread_.join();
  }

 private:
  std::mutex mutex_;
  std::condition_variable done_changed_;
  bool done_ = false;
  std::thread thread_;  // last: starts once the members above exist
};

// What each rank holds and sent, printed by rank 0 in rank order.
void report_ranks(parallel::Grid& grid, const parallel::PipelineEngine& engine, int32_t tokens) {
  constexpr int kFields = 7;
  const double mine[kFields] = {
      static_cast<double>(grid.stage()),
      static_cast<double>(grid.tp_rank()),
      static_cast<double>(engine.layers().begin),
      static_cast<double>(engine.layers().end()),
      static_cast<double>(engine.weight_bytes()),
      static_cast<double>(engine.cache_bytes_in_use()),
      static_cast<double>(grid.tp_group().bytes_sent() + grid.pipeline().bytes_sent())};
  const int ranks = grid.tp() * grid.pp();
  std::vector<double> all(static_cast<size_t>(kFields) * ranks);
  parallel::check_mpi(
      MPI_Gather(mine, kFields, MPI_DOUBLE, all.data(), kFields, MPI_DOUBLE, 0, MPI_COMM_WORLD),
      "MPI_Gather");
  if (grid.world_rank() != 0) return;
  std::fprintf(stderr, "cache %s\n", engine.cache_description().c_str());
  for (int r = 0; r < ranks; ++r) {
    const double* v = all.data() + static_cast<size_t>(r) * kFields;
    std::fprintf(stderr,
                 "rank %d (stage %d, tp rank %d, layers [%d, %d)): weights %.2f MB, cache %.0f "
                 "bytes for %d tokens, sent %.0f bytes\n",
                 r, static_cast<int>(v[0]), static_cast<int>(v[1]), static_cast<int>(v[2]),
                 static_cast<int>(v[3]), v[4] / 1e6, v[5], tokens, v[6]);
  }
}

// `xq worker --input --output`: the batch of `xq batch` on a tp x pp grid.
// World rank 0 reads the requests, schedules and writes the results; every
// step's plan goes to all ranks (parallel/plan_broadcast.h).
int run_worker_batch(const Arguments& args, int tp, int pp, StartupWatchdog& watchdog) {
  if (args.has("prompt") || args.has("file"))
    throw Error("worker: --input runs a batch of requests; --prompt and --file do not apply");
  const BatchOptions batch = batch_options(args, "worker");
  backend_choice(args);  // an unusable --backend fails here, before the grid forms
  parallel::Grid grid(tp, pp);
  watchdog.finished();
  const bool leader = grid.world_rank() == 0;
  std::ifstream in;
  std::ofstream out;
  if (leader) {
    in.open(batch.input, std::ios::binary);
    if (!in) throw Error(batch.input + ": cannot open the input file");
    out.open(batch.output, std::ios::binary | std::ios::trunc);
    if (!out) throw Error(batch.output + ": cannot create the output file");
  }
  auto model = Model::load(args.get("model"), args.get("tokenizer"));
  parallel::PipelineOptions pipeline;
  pipeline.micro_batch = static_cast<int32_t>(args.get_int("micro-batch", 1, 1 << 20));
  const int threads = static_cast<int>(args.get_int("threads", 1, kMaxThreads));
  EngineOptions options = engine_options(args, threads, 0);
  options.sequences = batch.scheduler.max_sequences;
  options.cache_bytes = batch.cache_bytes;
  const auto engine_on_backend =
      parallel::make_pipeline_engine(*model, options, grid, pipeline, args.get("backend"));
  parallel::PipelineEngine& engine = *engine_on_backend;
  // Each rank's time in steps and in its own work, printed by rank 0: the
  // pipeline's bubble as measured.
  auto report_bubble = [&] {
    const double mine[3] = {static_cast<double>(grid.stage()), engine.batch_seconds(),
                            engine.busy_seconds()};
    std::vector<double> all(static_cast<size_t>(3 * tp * pp));
    parallel::check_mpi(
        MPI_Gather(mine, 3, MPI_DOUBLE, all.data(), 3, MPI_DOUBLE, 0, MPI_COMM_WORLD),
        "MPI_Gather");
    if (!leader) return;
    for (int r = 0; r < tp * pp; ++r) {
      const double* v = all.data() + static_cast<size_t>(3) * r;
      std::fprintf(stderr, "rank %d (stage %d): %.2f s in steps, %.2f s computing, bubble %.1f%%\n",
                   r, static_cast<int>(v[0]), v[1], v[2], v[1] > 0 ? 100 * (1 - v[2] / v[1]) : 0.0);
    }
  };
  if (!leader) {
    parallel::follow_plans(grid, engine);
    report_bubble();
    return 0;
  }
  std::fprintf(stderr,
               "worker: tp %d x pp %d, cache %s, pool %d blocks of %d tokens (tightest rank)\n", tp,
               pp, engine.cache_description().c_str(), engine.pool().total_blocks,
               engine.pool().block_tokens);
  parallel::PlanBroadcaster executor(grid, engine);
  const BatchSummary summary = run_batch_jsonl(executor, batch.scheduler, in, out, true);
  executor.finish();
  report_bubble();
  if (!out) throw Error(batch.output + ": write error");
  std::fprintf(stderr, "%d requests (%d failed), %lld tokens generated in %.2f s (%.1f tokens/s)\n",
               summary.requests, summary.failed, static_cast<long long>(summary.completion_tokens),
               summary.seconds,
               summary.seconds > 0 ? summary.completion_tokens / summary.seconds : 0.0);
  return 0;
}

// One rank of a tensor- and pipeline-parallel run: every rank loads the model
// (mapping it; each reads only its own slices), joins the tp x pp grid and
// runs the same generation loop (or, with --file, the same perplexity
// evaluation); rank 0 prints.
int run_worker(int argc, char** argv) {
  Arguments args("worker",
                 "One rank of a parallel run, started by mpirun: mpirun -np T*P xq worker --tp T "
                 "--pp P --prompt TEXT (generation), --file TEXT_FILE (perplexity) or --input "
                 "REQUESTS.jsonl --output RESULTS.jsonl (a batch of requests, as xq batch: rank 0 "
                 "schedules, every rank runs each step) or --serve (a replica: rank 0 serves "
                 "gRPC). Rank 0 prints the result.");
  add_model_options(args);
  add_generation_options(args);
  add_perplexity_options(args);
  args.option("tp", "1", "tensor-parallel ranks per pipeline stage");
  args.option("pp", "1", "pipeline stages");
  args.option("micro-batch", "64", "prefill tokens per pipeline micro-batch");
  add_batch_options(args);
  add_serve_options(args);
  if (!args.parse(argc, argv)) return 0;
  // A replica's ranks end through rank 0's drain, not by the signal.
  if (args.has("serve")) ignore_shutdown_signals();
  // No rank may outlive the process that started it (mpirun, or orted on
  // another host): Open MPI 4.1's mpirun ends an aborted job by sending its
  // ranks SIGTERM and returns without waiting for them, and a rank that
  // missed the signal would run on as an orphan. The kernel kills this rank
  // when its parent exits.
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  // MPI_Init and the creation of the grid's communicators have no deadline:
  // if a rank dies meanwhile, the others would wait forever. A watchdog ends
  // this rank with a message instead; after that every wait has a deadline.
  StartupWatchdog watchdog(2 * parallel::default_comm_timeout());
  parallel::check_mpi(MPI_Init(&argc, &argv), "MPI_Init");
  int rank = 0;
  parallel::check_mpi(MPI_Comm_rank(MPI_COMM_WORLD, &rank), "MPI_Comm_rank");
  try {
    const int tp = static_cast<int>(args.get_int("tp", 1, 4096));
    const int pp = static_cast<int>(args.get_int("pp", 1, 4096));
    backend_choice(args);  // an unusable --backend fails here, before the grid forms
    if (args.has("serve")) {
      const int status = run_worker_serve(args, tp, pp, [&watchdog] { watchdog.finished(); });
      MPI_Finalize();
      return status;
    }
    if (args.has("input") || args.has("output")) {
      const int status = run_worker_batch(args, tp, pp, watchdog);
      MPI_Finalize();
      return status;
    }
    const bool scoring = args.has("file");
    SamplerOptions sampler;
    PerplexityOptions scoring_options;
    std::string text;
    if (scoring) {
      if (args.has("prompt")) throw Error("worker: give --prompt or --file, not both");
      scoring_options = perplexity_options(args, "worker");
      if (args.get_int("batch", 0) != 0)
        throw Error(
            "worker: --batch is for xq perplexity; the worker cuts prefills by --micro-batch");
      text = read_text_file(args.get("file"));
    } else {
      sampler = generation_sampler(args, "worker");
    }
    parallel::Grid grid(tp, pp);  // first, so that a wrong job size fails at once
    watchdog.finished();
    auto model = Model::load(args.get("model"), args.get("tokenizer"));
    std::vector<int32_t> tokens;
    double tokenize_seconds = 0;
    if (scoring)
      tokens = perplexity_tokens(args, text, *model, scoring_options, "worker", &tokenize_seconds);
    else
      tokens = encode_prompt(args.get("prompt"), /*parse_special=*/false, *model, "worker");
    parallel::PipelineOptions pipeline;
    pipeline.micro_batch = static_cast<int32_t>(args.get_int("micro-batch", 1, 1 << 20));
    const int threads = static_cast<int>(args.get_int("threads", 1, kMaxThreads));
    const auto engine_on_backend = parallel::make_pipeline_engine(
        *model,
        engine_options(args, threads,
                       scoring
                           ? scoring_options.ctx
                           : generation_capacity(*model, tokens.size(), generation_steps(args))),
        grid, pipeline, args.get("backend"));
    parallel::PipelineEngine& engine = *engine_on_backend;
    if (rank == 0)
      std::fprintf(stderr,
                   "worker: tp %d x pp %d; rank 0 runs layers [%lld, %lld), %.1f MB of weights\n",
                   tp, pp, static_cast<long long>(engine.layers().begin),
                   static_cast<long long>(engine.layers().end()), engine.weight_bytes() / 1e6);
    if (scoring) {
      if (rank == 0)
        std::fprintf(stderr, "%s: %zu tokens (tokenized in %.2f s), ctx %d, %d threads per rank\n",
                     args.get("file").c_str(), tokens.size(), tokenize_seconds, scoring_options.ctx,
                     threads);
      PerplexityResult result = evaluate_perplexity(
          engine, tokens, scoring_options,
          rank == 0 ? print_progress : std::function<void(int32_t, int32_t, double)>());
      if (rank == 0) print_perplexity(result, scoring_options);
    } else {
      generate_and_print(engine, args, sampler, args.get("prompt"), tokens, {},
                         /*print=*/rank == 0);
    }
    report_ranks(grid, engine, engine.length(0));
  } catch (const LostRank& e) {
    parallel::abort_job(e.what());
  } catch (const Error& e) {
    // Bad input fails the same way on every rank: one line is enough. The job
    // ends with MPI_Abort so that mpirun's exit status says so (with
    // orte_abort_on_non_zero_status 0, which lets our own fault messages
    // speak, mpirun returns 0 for ranks that merely exit 1), and so that a
    // rank that failed alone never leaves the others waiting.
    if (rank == 0) std::fprintf(stderr, "error: %s\n", e.what());
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 1);
    return 1;
  }
  MPI_Finalize();
  return 0;
}

int run_tokenize(int argc, char** argv) {
  Arguments args(
      "tokenize",
      "Print the token ids of a text (comma-separated), with BOS where the model asks for it.");
  args.option("model", default_model_path(), "model file: GGUF or llama2.c checkpoint");
  args.option("tokenizer", "", "llama2.c tokenizer.bin (default: found beside the model)");
  args.option("prompt", "", "text to tokenize");
  args.option("file", "", "file whose text to tokenize (instead of --prompt)");
  args.option("bos", "auto", "'auto' (as the model file says), 'on' or 'off'");
  if (!args.parse(argc, argv)) return 0;
  if (args.has("prompt") == args.has("file"))
    throw Error("tokenize: give one of --prompt and --file (see --help)");
  const std::string text = args.has("file") ? read_text_file(args.get("file")) : args.get("prompt");
  const std::string bos = args.get("bos");
  if (bos != "auto" && bos != "on" && bos != "off")
    throw Error("tokenize: --bos must be 'auto', 'on' or 'off'");
  auto model = Model::load(args.get("model"), args.get("tokenizer"));
  const bool add_bos = bos == "on" || (bos == "auto" && model->tokenizer().add_bos());
  std::vector<int32_t> ids = model->tokenizer().encode(text, add_bos);
  for (size_t i = 0; i < ids.size(); ++i) std::printf(i ? ",%d" : "%d", ids[i]);
  std::printf("\n");
  return 0;
}

// The table of cache modes (runtime/cache_mode.h), for people and scripts.
int run_modes(int argc, char** argv) {
  Arguments args("modes", "The attention cache modes --cache takes: what each stores and how.");
  args.option("model", "", "only the layout this model gets (X or SVD latents on GQA models)");
  args.flag("names", "only the names, one a line (for scripts)");
  if (!args.parse(argc, argv)) return 0;
  std::unique_ptr<Model> model;
  if (args.has("model") && !args.has("names")) model = Model::load(args.get("model"));
  for (const CacheModeSpec& mode : cache_modes()) {
    const std::string line = args.has("names") ? std::string(mode.name)
                             : model           ? describe(mode, model->config())
                                               : describe(mode);
    std::printf("%s\n", line.c_str());
  }
  return 0;
}

int usage(FILE* out) {
  std::fprintf(out,
               "usage: xq <command> [options]\n\n"
               "commands:\n"
               "  perplexity   perplexity of a text file (llama.cpp's protocol)\n"
               "  generate     complete a prompt, streamed to stdout\n"
               "  worker       one rank of a tensor/pipeline-parallel run (under mpirun)\n"
               "  tokenize     print the token ids of a text\n"
               "  chat-template  print a conversation as a chat template formats it\n"
               "  modes        list the attention cache modes\n"
               "  batch        run a JSONL file of requests through the batch scheduler\n"
               "  coordinator  serve the Generation API, routing requests to replicas\n"
               "  client       talk to a server: stream a completion, health, load, info\n\n"
               "'xq <command> --help' lists a command's options.\n");
  return out == stdout ? 0 : 2;
}

}  // namespace
}  // namespace xq

int main(int argc, char** argv) {
  if (argc < 2) return xq::usage(stderr);
  const std::string command = argv[1];
  std::map<std::string, std::function<int(int, char**)>> commands = {
      {"perplexity", xq::run_perplexity},
      {"generate", xq::run_generate},
      {"worker", xq::run_worker},
      {"tokenize", xq::run_tokenize},
      {"chat-template", xq::run_chat_template},
      {"modes", xq::run_modes},
      {"batch", xq::run_batch},
      {"coordinator", xq::run_coordinator},
      {"client", xq::run_client},
  };
  if (command == "--help" || command == "-h" || command == "help") return xq::usage(stdout);
  auto it = commands.find(command);
  if (it == commands.end()) {
    std::fprintf(stderr, "error: unknown command '%s' (see xq --help)\n", command.c_str());
    return 2;
  }
  try {
    return it->second(argc - 2, argv + 2);
  } catch (const xq::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "error: out of memory\n");
    return 1;
  } catch (const std::exception& e) {
    // Not an xq::Error, so a bug or a resource limit, but still one line and
    // an exit code rather than std::terminate's abort.
    std::fprintf(stderr, "error: %s: internal error: %s\n", command.c_str(), e.what());
    return 1;
  }
}
