// Fault probe for tests/mpi/check_fault.py: every rank runs all_reduce_sum in
// a loop; after a few rounds the rank given by --victim stops taking part:
//   stall  sleeps forever (a hung rank)
//   exit   leaves with _exit(3) (a crash without MPI_Finalize)
//   kill   raises SIGKILL
// The others must notice, name it and the operation, and end the job.
#include <mpi.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <thread>
#include <vector>

#include "parallel/mpi_communicator.h"

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  std::string mode = "stall";
  int victim = 2, fault_round = 20;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--mode") == 0) mode = argv[i + 1];
    if (std::strcmp(argv[i], "--victim") == 0) victim = std::atoi(argv[i + 1]);
    if (std::strcmp(argv[i], "--round") == 0) fault_round = std::atoi(argv[i + 1]);
  }
  try {
    xq::parallel::MpiCommunicator world(MPI_COMM_WORLD, "world");
    const int rank = world.rank(), size = world.size();
    std::vector<float> data(4096);
    const auto start = std::chrono::steady_clock::now();
    // Bounded: if nothing is detected the job ends by itself after 120 s (and
    // the driver, which allows 30 s, has already failed).
    for (int round = 0; std::chrono::steady_clock::now() - start < std::chrono::seconds(120);
         ++round) {
      if (rank == victim && round == fault_round) {
        std::fprintf(stderr, "[world rank %d] fault probe: %s in round %d\n", rank, mode.c_str(),
                     round);
        std::fflush(stderr);
        if (mode == "exit") _exit(3);
        if (mode == "kill") raise(SIGKILL);
        for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));
      }
      for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<float>(rank + i % 5);
      world.all_reduce_sum(data.data(), data.size());
      const float expected = static_cast<float>(size * (size - 1) / 2 + size * 2);  // i % 5 == 2
      if (data[2] != expected) xq::parallel::abort_job("wrong all_reduce_sum result");
    }
    std::fprintf(stderr, "[world rank %d] fault probe: no fault detected\n", rank);
  } catch (const std::exception& e) {
    xq::parallel::abort_job(e.what());
  }
  MPI_Finalize();
  return 0;
}
