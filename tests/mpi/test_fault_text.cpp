// The wording of a lost rank, on the CPU: the NCCL communicator's message
// (fault_text::identified, composed once the lost rank is found over MPI) is
// the MPI communicator's timeout message word for word, which scripts
// (check_fault.py, check_kill_worker.py) look for; and the choice of a
// rank's GPU from its place on the node.
#include <gtest/gtest.h>
#include <mpi.h>

#include <chrono>
#include <cstdlib>
#include <string>

#include "kernels/error.h"
#include "parallel/device_grid.h"
#include "parallel/fault_text.h"
#include "parallel/mpi_communicator.h"
#include "tests/mpi/mpi_test_env.h"

namespace xq::parallel {
namespace {

TEST(FaultText, PiecesSpellTheKnownWords) {
  EXPECT_EQ(fault_text::member(2, 5), "rank 2 (world rank 5)");
  EXPECT_EQ(fault_text::outside_member(7), "world rank 7 (another group)");
  EXPECT_EQ(fault_text::operation(fault_text::member(0, 4), "all_reduce_sum", "tp1"),
            "rank 0 (world rank 4): all_reduce_sum on group \"tp1\"");
  EXPECT_EQ(fault_text::seconds(10), "10 s");
  EXPECT_EQ(fault_text::seconds(0.5), "0.5 s");
}

// What an NCCL rank prints once MPI has named the culprit: the MPI timeout
// text, then the note.
TEST(FaultText, NcclMessageIsTheMpiTimeoutMessage) {
  const std::string operation =
      fault_text::operation(fault_text::member(0, 2), "all_reduce_sum", "tp1");
  const std::string mpi = fault_text::timed_out(operation, 10, fault_text::member(1, 3)) +
                          fault_text::lost(fault_text::member(1, 3));
  EXPECT_EQ(mpi,
            "rank 0 (world rank 2): all_reduce_sum on group \"tp1\" timed out after 10 s waiting "
            "for rank 1 (world rank 3); lost rank 1 (world rank 3)");
  EXPECT_EQ(fault_text::identified(operation, "timed out after 10 s", fault_text::member(1, 3),
                                   " (NCCL)"),
            mpi + " (NCCL)");
  // A culprit outside the group (found through the grid's fault channel).
  EXPECT_EQ(fault_text::identified(operation,
                                   "failed: remote process exited or there was a "
                                   "network error",
                                   fault_text::outside_member(0), ""),
            "rank 0 (world rank 2): all_reduce_sum on group \"tp1\" failed: remote process exited "
            "or there was a network error waiting for world rank 0 (another group); lost world "
            "rank 0 (another group)");
  // Every member answered: no culprit, the MPI communicator's mismatch words.
  EXPECT_EQ(fault_text::identified(operation, "timed out after 10 s", "", " (NCCL)"),
            operation + " timed out after 10 s" + fault_text::none_lost() + " (NCCL)");
}

// The real MPI message of a silent peer against the composition above: the
// two communicators cannot drift apart without this failing.
TEST(FaultText, MpiCommunicatorSpeaksTheSameWords) {
  if (xq::testing::world_size() < 2) GTEST_SKIP() << "needs 2 ranks";
  MpiCommunicator comm(MPI_COMM_WORLD, "probe");
  comm.set_timeout(std::chrono::milliseconds(500));
  if (comm.rank() == 0) {
    float x = 0;
    try {
      comm.recv(&x, sizeof x, 1);
      ADD_FAILURE() << "recv from a silent rank returned";
    } catch (const LostRank& e) {
      const std::string expected =
          fault_text::identified(fault_text::operation(fault_text::member(0, 0), "recv", "probe"),
                                 "timed out after 0.5 s", fault_text::member(1, 1), "");
      EXPECT_EQ(std::string(e.what()), expected);
    }
  }
  xq::testing::world().barrier();
}

TEST(DeviceGrid, RanksOfANodeSpreadOverItsGpus) {
  EXPECT_EQ(device_for_local_rank(0, 8), 0);
  EXPECT_EQ(device_for_local_rank(7, 8), 7);
  EXPECT_EQ(device_for_local_rank(9, 8), 1);  // more ranks than GPUs: shared
  EXPECT_EQ(device_for_local_rank(3, 1), 0);
  EXPECT_THROW(device_for_local_rank(0, 0), xq::Error);
  EXPECT_THROW(device_for_local_rank(-1, 2), xq::Error);
}

TEST(DeviceGrid, LocalRankComesFromTheLauncherOrTheNode) {
  // Whatever the launcher says, the variable wins over the node split.
  const char* saved = std::getenv("OMPI_COMM_WORLD_LOCAL_RANK");
  const std::string kept = saved != nullptr ? saved : "";
  setenv("OMPI_COMM_WORLD_LOCAL_RANK", "3", 1);
  EXPECT_EQ(local_rank_from_environment(), 3);
  EXPECT_EQ(local_rank(), 3);
  setenv("OMPI_COMM_WORLD_LOCAL_RANK", "two", 1);
  EXPECT_THROW(local_rank_from_environment(), xq::Error);
  // Without any variable: the rank among the processes of this node. All
  // ranks of these tests share one machine, so it is the world rank.
  unsetenv("OMPI_COMM_WORLD_LOCAL_RANK");
  const char* others[] = {"MPI_LOCALRANKID", "SLURM_LOCALID"};
  bool other_set = false;
  for (const char* name : others) other_set = other_set || std::getenv(name) != nullptr;
  if (!other_set) {
    EXPECT_EQ(local_rank_from_environment(), -1);
    EXPECT_EQ(local_rank(), xq::testing::world_rank());
  }
  if (saved != nullptr) setenv("OMPI_COMM_WORLD_LOCAL_RANK", kept.c_str(), 1);
}

}  // namespace
}  // namespace xq::parallel
