// `xq worker --serve`: a replica under mpirun. World rank 0 serves
// xquant.v1.Generation and Control (launch/serve/replica_server.h) and
// schedules; every step's plan goes to all ranks (parallel/plan_broadcast.h),
// the other ranks follow. SIGTERM or SIGINT drains (exit 0); a lost rank or a
// hung step ends the job with a non-zero status.
#pragma once

#include <functional>

namespace xq {

class Arguments;

// The replica's options, added to `xq worker`'s.
void add_serve_options(Arguments& args);
// Ignores SIGTERM and SIGINT: a signal to the whole job must not end a rank
// that rank 0 still needs; rank 0 then catches them to drain
// (run_worker_serve). Call before MPI_Init.
void ignore_shutdown_signals();
// The replica on this rank, with MPI initialized. `grid_formed` is called once
// the grid's communicators exist (the worker's start-up watchdog).
int run_worker_serve(const Arguments& args, int tp, int pp,
                     const std::function<void()>& grid_formed);

}  // namespace xq
