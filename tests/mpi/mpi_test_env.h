// What the MPI tests share: the world communicator (made once in main, after
// MPI_Init) and the TP x PP grid this run was started for (--grid TPxPP;
// default: all ranks in one TP group).
#pragma once

#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "parallel/mpi_communicator.h"

namespace xq::testing {

parallel::MpiCommunicator& world();
int grid_tp();
int grid_pp();

inline int world_rank() {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}
inline int world_size() {
  int size = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

// Σ over ranks of a local integer, through MPI itself (the reference the
// communicator under test is compared with).
inline long long mpi_sum(long long value, MPI_Comm comm = MPI_COMM_WORLD) {
  long long total = 0;
  MPI_Allreduce(&value, &total, 1, MPI_LONG_LONG, MPI_SUM, comm);
  return total;
}

// Checks ok(i) for every i in [0, n) and reports how many failed and the
// first. Unlike ASSERT in a loop it never returns early, so every rank goes on
// to make the same collective calls as the others even when a check fails.
template <typename Check>
::testing::AssertionResult all_of(size_t n, Check ok) {
  size_t wrong = 0, first = 0;
  for (size_t i = 0; i < n; ++i)
    if (!ok(i) && wrong++ == 0) first = i;
  if (wrong == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << wrong << " of " << n << " wrong, the first at " << first;
}

// Largest |a[i] - b[i]|.
inline float max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  float worst = 0;
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::abs(a[i] - b[i]));
  return worst;
}

// Rank 0's values everywhere (collective; same size on every rank).
template <typename T>
void broadcast_from_rank0(std::vector<T>& values) {
  MPI_Bcast(values.data(), static_cast<int>(values.size() * sizeof(T)), MPI_BYTE, 0,
            MPI_COMM_WORLD);
}

// True when these values have the same bits as rank 0's (collective).
template <typename T>
bool same_as_rank0(const std::vector<T>& values) {
  std::vector<T> root = values;
  MPI_Bcast(root.data(), static_cast<int>(root.size() * sizeof(T)), MPI_BYTE, 0, MPI_COMM_WORLD);
  return root == values;
}

}  // namespace xq::testing
