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
// Blocks SIGTERM and SIGINT in the calling thread and every thread it starts
// later (MPI's included), so that only the replica's signal thread sees them:
// call before MPI_Init.
void block_shutdown_signals();
// The replica on this rank, with MPI initialized. `grid_formed` is called once
// the grid's communicators exist (the worker's start-up watchdog).
int run_worker_serve(const Arguments& args, int tp, int pp,
                     const std::function<void()>& grid_formed);

}  // namespace xq
