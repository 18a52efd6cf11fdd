// MpiCommunicator against values each rank computes on its own: rank r's data
// is value(r, i), chosen so float sums of a few ranks are exact; random data
// against double-precision sums; traffic against the algorithms' formulas;
// timeouts that name the lost rank.
#include <gtest/gtest.h>
#include <mpi.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "parallel/mpi_communicator.h"
#include "tests/mpi/mpi_test_env.h"

namespace xq::parallel {
namespace {

using xq::testing::all_of;
using xq::testing::mpi_sum;
using xq::testing::world;

// Quarters plus small integers: every partial sum over up to 64 ranks is a
// float exactly, in any order.
float value(int rank, size_t i) {
  return static_cast<float>(0.25 * (rank + 1) + static_cast<double>((i * 7 + 3) % 13));
}

double sum_over_ranks(int size, size_t i) {
  double total = 0;
  for (int r = 0; r < size; ++r) total += value(r, i);
  return total;
}

// The counts every collective is tried with: empty, fewer than the ranks, not
// a multiple of them, and one large enough for MPI's rendezvous protocol.
std::vector<size_t> counts_to_try(int size) {
  return {0,
          1,
          static_cast<size_t>(size) - 1,
          static_cast<size_t>(size),
          static_cast<size_t>(size) + 1,
          7,
          1000,
          1001,
          65537};
}

TEST(MpiCommunicator, KnowsItsRanks) {
  MpiCommunicator& comm = world();
  EXPECT_EQ(comm.rank(), xq::testing::world_rank());
  EXPECT_EQ(comm.size(), xq::testing::world_size());
  for (int r = 0; r < comm.size(); ++r) EXPECT_EQ(comm.world_rank(r), r);
  EXPECT_THROW(comm.world_rank(comm.size()), xq::Error);
  EXPECT_EQ(comm.name(), "world");
}

TEST(MpiCommunicator, AllReduceSumIsExactOnExactData) {
  MpiCommunicator& comm = world();
  const int p = comm.size(), r = comm.rank();
  for (size_t n : counts_to_try(p)) {
    std::vector<float> data(n);
    for (size_t i = 0; i < n; ++i) data[i] = value(r, i);
    const uint64_t before = comm.bytes_sent();
    comm.all_reduce_sum(data.data(), n);
    const uint64_t sent = comm.bytes_sent() - before;
    EXPECT_TRUE(
        all_of(n, [&](size_t i) { return data[i] == static_cast<float>(sum_over_ranks(p, i)); }))
        << "count " << n;
    // Ring reduce-scatter + all-gather over chunks of n / p (the first n % p
    // one larger): each rank sends every chunk but one in each phase, the
    // chunks after its own position.
    auto chunk = [&](int c) { return n / p + (static_cast<size_t>(c) < n % p ? 1 : 0); };
    const uint64_t expected =
        p == 1 || n == 0 ? 0 : (2 * n - chunk((r + 1) % p) - chunk((r + 2) % p)) * sizeof(float);
    EXPECT_EQ(sent, expected) << "count " << n;
    EXPECT_EQ(sent, ring_all_reduce_bytes_sent(n, p, r));
    // Summed over ranks: exactly 2 (p - 1) n floats, however uneven the chunks.
    EXPECT_EQ(mpi_sum(static_cast<long long>(sent)),
              static_cast<long long>(2 * (p - 1) * n * sizeof(float)))
        << "count " << n;
  }
}

TEST(MpiCommunicator, AllReduceSumOfRandomDataMatchesDoubleAndIsIdenticalEverywhere) {
  MpiCommunicator& comm = world();
  const int p = comm.size(), r = comm.rank();
  const size_t n = 4099;
  // Every rank can generate every rank's data: seed by rank.
  auto data_of = [&](int rank) {
    std::mt19937 rng(1234 + rank);
    std::normal_distribution<float> normal(0.0f, 10.0f);
    std::vector<float> data(n);
    for (float& x : data) x = normal(rng);
    return data;
  };
  std::vector<float> data = data_of(r);
  comm.all_reduce_sum(data.data(), n);
  std::vector<double> reference(n, 0.0);
  for (int q = 0; q < p; ++q) {
    const std::vector<float> other = data_of(q);
    for (size_t i = 0; i < n; ++i) reference[i] += other[i];
  }
  EXPECT_TRUE(
      all_of(n, [&](size_t i) { return std::fabs(data[i] - reference[i]) <= 1e-5 * p * 40; }));
  // Bit-identical on every rank (checked through MPI's own all-gather).
  std::vector<float> everyone(n * static_cast<size_t>(p));
  MPI_Allgather(data.data(), static_cast<int>(n), MPI_FLOAT, everyone.data(), static_cast<int>(n),
                MPI_FLOAT, MPI_COMM_WORLD);
  for (int q = 0; q < p; ++q)
    EXPECT_EQ(std::memcmp(everyone.data() + q * n, data.data(), n * sizeof(float)), 0)
        << "rank " << q << " ended with different bits";
}

TEST(MpiCommunicator, AllGatherPutsEachRankInItsPlace) {
  MpiCommunicator& comm = world();
  const int p = comm.size(), r = comm.rank();
  for (size_t n : counts_to_try(p)) {
    for (bool in_place : {false, true}) {
      std::vector<float> in(n), out(n * p, -1.0f);
      for (size_t i = 0; i < n; ++i) in[i] = value(r, i);
      const float* source = in.data();
      if (in_place) {
        std::copy(in.begin(), in.end(), out.begin() + r * n);
        source = out.data() + r * n;
      }
      const uint64_t before = comm.bytes_sent();
      comm.all_gather(source, n, out.data());
      EXPECT_TRUE(all_of(n * p, [&](size_t i) { return out[i] == value(i / n, i % n); }))
          << "count " << n << (in_place ? " in place" : "");
      EXPECT_EQ(comm.bytes_sent() - before, static_cast<uint64_t>(p - 1) * n * sizeof(float));
    }
  }
}

TEST(MpiCommunicator, ReduceScatterSumGivesEachRankItsBlockOfTheSum) {
  MpiCommunicator& comm = world();
  const int p = comm.size(), r = comm.rank();
  for (size_t n : counts_to_try(p)) {
    std::vector<float> in(n * p), out(n, -1.0f);
    for (size_t i = 0; i < n * p; ++i) in[i] = value(r, i);
    const uint64_t before = comm.bytes_sent();
    comm.reduce_scatter_sum(in.data(), n, out.data());
    EXPECT_TRUE(all_of(
        n, [&](size_t i) { return out[i] == static_cast<float>(sum_over_ranks(p, r * n + i)); }))
        << "count " << n;
    EXPECT_EQ(comm.bytes_sent() - before, static_cast<uint64_t>(p - 1) * n * sizeof(float));
  }
}

TEST(MpiCommunicator, BroadcastFromEveryRoot) {
  MpiCommunicator& comm = world();
  const int p = comm.size(), r = comm.rank();
  for (int root = 0; root < p; ++root) {
    for (size_t bytes : {size_t{0}, size_t{1}, size_t{13}, size_t{100003}}) {
      std::vector<unsigned char> data(bytes);
      for (size_t i = 0; i < bytes; ++i)
        data[i] = r == root ? static_cast<unsigned char>((i * 31 + root) & 0xff) : 0xee;
      const uint64_t before = comm.bytes_sent();
      comm.broadcast(data.data(), bytes, root);
      EXPECT_TRUE(all_of(
          bytes,
          [&](size_t i) { return data[i] == static_cast<unsigned char>((i * 31 + root) & 0xff); }))
          << "root " << root << " bytes " << bytes;
      // A tree reaches p - 1 ranks with one copy each.
      EXPECT_EQ(mpi_sum(static_cast<long long>(comm.bytes_sent() - before)),
                static_cast<long long>((p - 1) * bytes));
    }
  }
  std::vector<float> x(1);
  EXPECT_THROW(comm.broadcast(x.data(), sizeof(float), p), xq::Error);
}

TEST(MpiCommunicator, SendRecvAroundTheRingAndDownAPipeline) {
  MpiCommunicator& comm = world();
  const int p = comm.size(), r = comm.rank();
  if (p < 2) GTEST_SKIP() << "needs 2 ranks";
  const int right = (r + 1) % p, left = (r + p - 1) % p;
  for (size_t n : {size_t{0}, size_t{3}, size_t{300000}}) {
    std::vector<float> out(n), in(n, -1.0f);
    for (size_t i = 0; i < n; ++i) out[i] = value(r, i);
    const uint64_t before = comm.bytes_sent();
    // Even ranks send first, odd ranks receive first: no cycle of senders.
    if (r % 2 == 0) {
      comm.send(out.data(), n * sizeof(float), right);
      comm.recv(in.data(), n * sizeof(float), left);
    } else {
      comm.recv(in.data(), n * sizeof(float), left);
      comm.send(out.data(), n * sizeof(float), right);
    }
    EXPECT_EQ(comm.bytes_sent() - before, n * sizeof(float));
    EXPECT_TRUE(all_of(n, [&](size_t i) { return in[i] == value(left, i); })) << "count " << n;
  }
  // A pipeline: stage s adds s and passes on; the last stage has 0 + 1 + ...
  std::vector<float> activations(17, 0.0f);
  if (r > 0) comm.recv(activations.data(), activations.size() * sizeof(float), r - 1);
  for (float& a : activations) a += static_cast<float>(r);
  if (r + 1 < p) comm.send(activations.data(), activations.size() * sizeof(float), r + 1);
  if (r + 1 == p) {
    for (float a : activations) EXPECT_EQ(a, static_cast<float>(p * (p - 1) / 2));
  }
  float unused = 0;
  EXPECT_THROW(comm.send(&unused, sizeof unused, r), xq::Error);  // to itself
  EXPECT_THROW(comm.recv(&unused, sizeof unused, p), xq::Error);  // no such rank
}

TEST(MpiCommunicator, BarrierWaitsForTheLastRank) {
  MpiCommunicator& comm = world();
  const int p = comm.size(), r = comm.rank();
  comm.barrier();
  // The last rank arrives 150 ms late; nobody may leave before it arrived.
  using Clock = std::chrono::steady_clock;  // one clock for all processes of a machine
  long long arrived = 0;
  if (r == p - 1) {
    std::this_thread::sleep_for(std::chrono::milliseconds(150));
    arrived = std::chrono::duration_cast<std::chrono::microseconds>(Clock::now().time_since_epoch())
                  .count();
  }
  const uint64_t before = comm.bytes_sent();
  comm.barrier();
  EXPECT_EQ(comm.bytes_sent(), before);  // zero-byte messages only
  const long long left =
      std::chrono::duration_cast<std::chrono::microseconds>(Clock::now().time_since_epoch())
          .count();
  long long last_arrival = 0;
  MPI_Allreduce(&arrived, &last_arrival, 1, MPI_LONG_LONG, MPI_MAX, MPI_COMM_WORLD);
  EXPECT_GE(left, last_arrival);
}

TEST(MpiCommunicator, TimeoutComesFromEnvironment) {
  const char* saved = std::getenv("XQ_COMM_TIMEOUT_SECONDS");
  const std::string restore = saved ? saved : "";
  setenv("XQ_COMM_TIMEOUT_SECONDS", "2.5", 1);
  EXPECT_EQ(default_comm_timeout(), std::chrono::milliseconds(2500));
  for (const char* bad : {"0", "-1", "ten", "3s", "inf"}) {
    setenv("XQ_COMM_TIMEOUT_SECONDS", bad, 1);
    EXPECT_THROW(default_comm_timeout(), xq::Error) << bad;
  }
  unsetenv("XQ_COMM_TIMEOUT_SECONDS");
  EXPECT_EQ(default_comm_timeout(), std::chrono::seconds(10));
  if (saved) setenv("XQ_COMM_TIMEOUT_SECONDS", restore.c_str(), 1);
}

// A peer that never sends: the waiting rank gives up after the timeout and
// names it; the group is unusable afterwards.
TEST(MpiCommunicator, SilentPeerIsNamedAfterTheTimeout) {
  if (world().size() < 2) GTEST_SKIP() << "needs 2 ranks";
  MpiCommunicator comm(MPI_COMM_WORLD, "probe");
  comm.set_timeout(std::chrono::milliseconds(500));
  if (comm.rank() == 0) {
    float x = 0;
    const auto start = std::chrono::steady_clock::now();
    try {
      comm.recv(&x, sizeof x, 1);
      ADD_FAILURE() << "recv from a silent rank returned";
    } catch (const LostRank& e) {
      const double waited =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      EXPECT_EQ(e.lost_rank(), 1);
      EXPECT_EQ(e.operation(), "recv");
      const std::string message = e.what();
      EXPECT_NE(message.find("recv on group \"probe\" timed out after 0.5 s waiting for rank 1 "
                             "(world rank 1)"),
                std::string::npos)
          << message;
      EXPECT_NE(message.find("lost rank 1 (world rank 1)"), std::string::npos) << message;
      EXPECT_GE(waited, 0.5);
      EXPECT_LT(waited, 4.0);
    }
    float y = 1;
    EXPECT_THROW(comm.all_reduce_sum(&y, 1), xq::Error);  // broken from now on
  }
  world().barrier();
}

// Rank 0 waits for rank 1, which waits for rank 2, which never arrives: both
// waiting ranks must name rank 2, not their neighbour.
TEST(MpiCommunicator, LostRankIsFoundAtTheEndOfTheChain) {
  if (world().size() < 3) GTEST_SKIP() << "needs 3 ranks";
  MpiCommunicator comm(MPI_COMM_WORLD, "chain");
  comm.set_timeout(std::chrono::milliseconds(600));
  const int r = comm.rank();
  if (r <= 1) {
    float x = 0;
    try {
      comm.recv(&x, sizeof x, r + 1);
      ADD_FAILURE() << "recv returned";
    } catch (const LostRank& e) {
      EXPECT_EQ(e.lost_rank(), 2) << e.what();
      EXPECT_NE(std::string(e.what()).find("lost rank 2 (world rank 2)"), std::string::npos)
          << e.what();
      if (r == 0) {
        EXPECT_NE(std::string(e.what()).find(
                      "waiting for rank 1 (world rank 1), which was waiting for rank 2 (world rank "
                      "2) in recv"),
                  std::string::npos)
            << e.what();
      }
    }
  }
  world().barrier();
}

// Two ranks waiting on each other (different calls) are not "lost": the
// message says so instead of blaming either.
TEST(MpiCommunicator, RanksWaitingOnEachOtherAreReportedAsMismatch) {
  if (world().size() < 2) GTEST_SKIP() << "needs 2 ranks";
  MpiCommunicator comm(MPI_COMM_WORLD, "cycle");
  comm.set_timeout(std::chrono::milliseconds(500));
  const int r = comm.rank();
  if (r <= 1) {
    float x = 0;
    try {
      if (r == 0)
        comm.recv(&x, sizeof x, 1);
      else
        comm.broadcast(&x, sizeof x, 0);  // waits for rank 0, which waits in recv
      ADD_FAILURE() << "returned";
    } catch (const LostRank& e) {
      EXPECT_EQ(e.lost_rank(), -1) << e.what();
      EXPECT_NE(std::string(e.what()).find("no member is lost"), std::string::npos) << e.what();
    }
  }
  world().barrier();
}

TEST(MpiCommunicator, MismatchedCountsAreAnErrorNotGarbage) {
  if (world().size() < 2) GTEST_SKIP() << "needs 2 ranks";
  MpiCommunicator comm(MPI_COMM_WORLD, "counts");
  comm.set_timeout(std::chrono::milliseconds(2000));
  const int r = comm.rank();
  std::vector<float> data(8, 1.0f);
  if (r == 0) {
    EXPECT_THROW(comm.recv(data.data(), 8 * sizeof(float), 1), xq::Error);
  } else if (r == 1) {
    comm.send(data.data(), 4 * sizeof(float), 0);  // half of what rank 0 expects
  }
  world().barrier();
}

}  // namespace
}  // namespace xq::parallel
