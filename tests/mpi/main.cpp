// GoogleTest under mpirun: every rank runs every test (the tests are
// collective). Rank 0 prints GoogleTest's usual output; the other ranks print
// only their failures, prefixed with their rank, so a failure on any rank is
// seen and makes the job fail.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <string>

#include "tests/mpi/mpi_test_env.h"

namespace xq::testing {

namespace {
std::unique_ptr<parallel::MpiCommunicator> g_world;
int g_tp = 0, g_pp = 1;

class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& result) override {
    if (!result.failed()) return;
    std::printf("[rank %d] %s:%d: Failure\n%s\n", rank_,
                result.file_name() ? result.file_name() : "?", result.line_number(),
                result.message());
    std::fflush(stdout);
  }
  void OnTestEnd(const ::testing::TestInfo& info) override {
    if (!info.result()->Failed()) return;
    std::printf("[rank %d] [  FAILED  ] %s.%s\n", rank_, info.test_suite_name(), info.name());
    std::fflush(stdout);
  }

 private:
  int rank_;
};
// After each test every rank checks in through the world communicator. A test
// that failed on some ranks and returned early leaves the ranks out of step;
// then this check times out (or the world already failed) and the job ends
// with a message, instead of later tests waiting on each other.
class CheckInAfterEachTest : public ::testing::EmptyTestEventListener {
 public:
  void OnTestEnd(const ::testing::TestInfo& info) override {
    float failed = info.result()->Failed() ? 1.0f : 0.0f;
    try {
      g_world->all_reduce_sum(&failed, 1);
    } catch (const std::exception& e) {
      parallel::abort_job(std::string("after test ") + info.test_suite_name() + "." + info.name() +
                          " the ranks are out of step: " + e.what());
    }
  }
};
}  // namespace

parallel::MpiCommunicator& world() {
  return *g_world;
}
int grid_tp() {
  return g_tp;
}
int grid_pp() {
  return g_pp;
}

}  // namespace xq::testing

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  const int rank = xq::testing::world_rank(), size = xq::testing::world_size();
  xq::testing::g_tp = size;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--grid") == 0 && i + 1 < argc) {
      if (std::sscanf(argv[i + 1], "%dx%d", &xq::testing::g_tp, &xq::testing::g_pp) != 2 ||
          xq::testing::g_tp * xq::testing::g_pp != size) {
        if (rank == 0)
          std::fprintf(stderr, "--grid %s: want TPxPP with TP * PP = %d ranks\n", argv[i + 1],
                       size);
        MPI_Finalize();
        return 2;
      }
      ++i;
    }
  }
  auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
  if (rank != 0) {
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new xq::testing::RankFailurePrinter(rank));
  }
  listeners.Append(new xq::testing::CheckInAfterEachTest);
  int result = 0;
  try {
    xq::testing::g_world = std::make_unique<xq::parallel::MpiCommunicator>(MPI_COMM_WORLD, "world");
    result = RUN_ALL_TESTS();
  } catch (const std::exception& e) {
    xq::parallel::abort_job(e.what());
  }
  xq::testing::g_world.reset();
  // Every rank returns the same verdict; rank 0 says which ranks failed.
  int failed_ranks = 0;
  const int failed = result != 0 ? 1 : 0;
  MPI_Allreduce(&failed, &failed_ranks, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (rank == 0 && failed_ranks > 0)
    std::printf("%d of %d ranks had failures (see [rank N] lines above)\n", failed_ranks, size);
  MPI_Finalize();
  return failed_ranks > 0 ? 1 : 0;
}
