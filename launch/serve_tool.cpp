#include "launch/serve_tool.h"

#include <fcntl.h>
#include <mpi.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <climits>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <thread>

#include "kernels/error.h"
#include "launch/arguments.h"
#include "launch/batch_tool.h"
#include "launch/engine_factory.h"
#include "launch/security_options.h"
#include "launch/serve/metrics_http.h"
#include "launch/serve/replica_server.h"
#include "launch/serve/security.h"
#include "parallel/device_grid.h"
#include "parallel/grid.h"
#include "parallel/mpi_communicator.h"
#include "parallel/pipeline_engine.h"
#include "parallel/plan_broadcast.h"
#include "runtime/model.h"

namespace xq {
namespace {

std::chrono::milliseconds seconds_option(const Arguments& args, const char* name, bool positive) {
  const double seconds = args.get_float(name);
  if (seconds < 0 || (positive && seconds == 0) || seconds > 1e6)
    throw Error(std::string("worker: --") + name + " wants seconds " +
                (positive ? "> 0" : ">= 0 (0: off)") + ", got '" + args.get(name) + "'");
  return std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000 + 0.5));
}

serve::ReplicaOptions replica_options(const Arguments& args, int tp, int pp) {
  if (args.has("input") || args.has("output") || args.has("prompt") || args.has("file"))
    throw Error(
        "worker: --serve takes its requests over gRPC; --input, --output, --prompt and --file do "
        "not apply");
  serve::ReplicaOptions o;
  o.listen = args.get("listen");
  o.advertise = args.get("advertise");
  o.replica_id = args.get("replica-id");
  o.coordinator = args.get("coordinator");
  o.security = security_options(args, SecurityRole::kServer, "worker");
  o.reflection = args.has("reflection");
  o.max_request_bytes = max_request_bytes(args, "worker");
  o.max_prompt_tokens = static_cast<int32_t>(args.get_int("max-prompt-tokens", 0));
  o.step_timeout = seconds_option(args, "step-timeout", true);
  o.canary_interval = seconds_option(args, "canary-interval", false);
  o.stall_timeout = seconds_option(args, "stall-timeout", false);
  o.scheduler = scheduling_options(args).scheduler;
  o.tp = tp;
  o.pp = pp;
  o.backend = args.get("backend");
  return o;
}

// What this rank reports to rank 0's GetLoad: its own stage's pool (the
// engine's pool() is the tightest rank's) and cache mode.
parallel::RankCache own_cache(const parallel::PipelineEngine& engine) {
  const Engine& stage = engine.stage().engine();
  const PoolInfo pool = stage.pool();
  parallel::RankCache cache;
  cache.used_bytes = static_cast<int64_t>(stage.cache_bytes_in_use());
  cache.total_bytes = static_cast<int64_t>(pool.block_bytes) * pool.total_blocks;
  cache.bytes_per_token = engine_cache_bytes_per_token(stage);
  return cache;
}

// SIGTERM / SIGINT reach rank 0 through a pipe (the handler only writes a
// byte: any thread may take the signal, including threads that libraries
// started before main), read by a thread that calls begin_drain; a second
// signal ends the process at once.
int shutdown_pipe[2] = {-1, -1};

extern "C" void on_shutdown_signal(int signal) {
  const char byte = static_cast<char>(signal);
  const ssize_t ignored = write(shutdown_pipe[1], &byte, 1);
  (void)ignored;
}

void catch_shutdown_signals() {
  if (pipe2(shutdown_pipe, O_CLOEXEC) != 0) throw Error("worker: cannot create a pipe for signals");
  struct sigaction action {};
  action.sa_handler = on_shutdown_signal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;
  sigaction(SIGTERM, &action, nullptr);
  sigaction(SIGINT, &action, nullptr);
}

class SignalThread {
 public:
  explicit SignalThread(serve::ReplicaServer& server)
      : thread_([&server] {
          for (int count = 0;; ++count) {
            char byte = 0;
            const ssize_t n = read(shutdown_pipe[0], &byte, 1);
            if (n < 0 && errno == EINTR) {
              --count;
              continue;
            }
            if (n != 1 || byte == 0) return;  // 0: the server is done
            if (count == 0) {
              std::fprintf(stderr, "replica: %s: draining (a second signal exits at once)\n",
                           strsignal(byte));
              server.begin_drain();
            } else {
              std::fprintf(stderr, "replica: %s again: exiting without draining\n",
                           strsignal(byte));
              std::fflush(stderr);
              std::_Exit(1);
            }
          }
        }) {}
  ~SignalThread() {
    const char done = 0;
    const ssize_t ignored = write(shutdown_pipe[1], &done, 1);
    (void)ignored;
    thread_.join();
  }

 private:
  std::thread thread_;
};

}  // namespace

void add_serve_options(Arguments& args) {
  args.flag("serve",
            "serve requests over gRPC (xquant.v1.Generation and Control) on world rank 0 until "
            "SIGTERM/SIGINT");
  args.option("listen", "127.0.0.1:50061", "--serve: address to listen on (host:port)");
  args.option("advertise", "",
              "--serve: address to register with the coordinator (default: --listen)");
  args.option("coordinator", "", "--serve: coordinator to register with (host:port)");
  args.option("replica-id", "", "--serve: this replica's name (default: the advertised address)");
  add_security_options(args, SecurityRole::kServer, "--serve: ", "the coordinator");
  args.flag("reflection", "--serve: enable gRPC server reflection");
  add_max_request_bytes_option(args, "--serve: ");
  args.option("max-prompt-tokens", "0", "--serve: longest prompt accepted (0: the context)");
  args.option("step-timeout", "30",
              "--serve: seconds a step (or the canary) may take before the replica is declared "
              "hung and exits");
  args.option("metrics-listen", "",
              "--serve: also serve Prometheus metrics over HTTP on host:port (/metrics, /health, "
              "/ready)");
  args.option("canary-interval", "5", "--serve: seconds between one-token health probes (0: off)");
  args.option("stall-timeout", "30",
              "--serve: seconds a stream write may wait on a client that stopped reading before "
              "the request is cancelled (0: no limit)");
}

void ignore_shutdown_signals() {
  std::signal(SIGTERM, SIG_IGN);
  std::signal(SIGINT, SIG_IGN);
}

int run_worker_serve(const Arguments& args, int tp, int pp,
                     const std::function<void()>& grid_formed) {
  serve::ReplicaOptions options = replica_options(args, tp, pp);
  int world_rank = 0;
  parallel::check_mpi(MPI_Comm_rank(MPI_COMM_WORLD, &world_rank), "MPI_Comm_rank");
  // Rank 0 drains on a signal from now on (a drain before it is ready
  // exits once warm); the other ranks leave it to rank 0.
  if (world_rank == 0) catch_shutdown_signals();
  const BatchOptions scheduling = scheduling_options(args);
  const BackendChoice backend = backend_choice(args);
  (void)backend;
  parallel::Grid grid(tp, pp);
  grid_formed();
  const bool leader = grid.world_rank() == 0;
  auto model = Model::load(args.get("model"), args.get("tokenizer"));
  parallel::PipelineOptions pipeline;
  pipeline.micro_batch = static_cast<int32_t>(args.get_int("micro-batch", 1, 1 << 20));
  const int threads = static_cast<int>(args.get_int("threads", 1, kMaxThreads));
  EngineOptions engine_options_ = engine_options(args, threads, 0);
  // The canary's reserved slot is one beyond the public ones.
  engine_options_.sequences =
      scheduling.scheduler.max_sequences + (options.canary_interval.count() > 0 ? 1 : 0);
  engine_options_.cache_bytes = scheduling.cache_bytes;
  const auto engine_on_backend =
      parallel::make_pipeline_engine(*model, engine_options_, grid, pipeline, args.get("backend"));
  parallel::PipelineEngine& engine = *engine_on_backend;
  auto local = [&engine] { return own_cache(engine); };
  if (!leader) {
    parallel::follow_plans(grid, engine, local);
    return 0;
  }
  options.cache_mode = engine_cache_mode(engine.stage().engine());
  options.model_name = std::filesystem::path(args.get("model")).filename().string();
  std::fprintf(stderr,
               "worker: tp %d x pp %d, cache %s, pool %d blocks of %d tokens (tightest rank), "
               "%d sequences%s\n",
               tp, pp, engine.cache_description().c_str(), engine.pool().total_blocks,
               engine.pool().block_tokens, scheduling.scheduler.max_sequences,
               options.canary_interval.count() > 0 ? " and the canary's reserved slot" : "");
  parallel::PlanBroadcaster executor(grid, engine);
  serve::ReplicaServer server(executor, options,
                              [&executor, &local] { return executor.gather_cache(local()); });
  server.start();
  std::unique_ptr<serve::MetricsHttpServer> metrics;
  if (const std::string listen = args.get("metrics-listen"); !listen.empty()) {
    serve::warn_unless_loopback(listen, "the replica's metrics");
    metrics = std::make_unique<serve::MetricsHttpServer>(
        listen, [&server] { return server.metrics_text(); },
        [&server] { return server.load().ready(); });
    metrics->start();
    std::fprintf(stderr, "replica: metrics on http://%s (port %d)\n", listen.c_str(),
                 metrics->port());
  }
  int status = 0;
  {
    SignalThread signals(server);
    status = server.run();
  }
  if (status != 0) parallel::abort_job("replica: " + server.failure());
  executor.finish();
  if (metrics) metrics->stop();
  server.shutdown();
  std::fprintf(stderr, "replica: drained\n");
  return 0;
}

}  // namespace xq
