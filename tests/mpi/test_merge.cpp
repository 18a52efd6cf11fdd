// merge_across: each rank of a TP group attends over a different slice of the
// tokens (one rank over none); after the merge every rank must hold the
// attention over all tokens, compared with one softmax in double precision
// written here, and identical bits on every rank. Runs in each TP group of the
// grid this job was started with (--grid).
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "parallel/grid.h"
#include "runtime/partial_attention_merge.h"
#include "tests/mpi/mpi_test_env.h"

namespace xq::parallel {
namespace {

struct Problem {
  int rows = 0, width = 0, tokens = 0;
  std::vector<double> scores;  // rows x tokens
  std::vector<double> values;  // rows x tokens x width
  double score(int r, int t) const { return scores[static_cast<size_t>(r) * tokens + t]; }
  double value(int r, int t, int c) const {
    return values[(static_cast<size_t>(r) * tokens + t) * width + c];
  }
};

// The same on every rank (fixed seed). Row 1's scores sit near +80 and row 2's
// near -80, where exp without the running max would overflow or vanish.
Problem make_problem(int rows, int width, int tokens) {
  Problem p{rows, width, tokens, {}, {}};
  std::mt19937 rng(2024);
  std::normal_distribution<double> normal(0.0, 3.0);
  std::uniform_real_distribution<double> uniform(-1.0, 1.0);
  p.scores.resize(static_cast<size_t>(rows) * tokens);
  p.values.resize(static_cast<size_t>(rows) * tokens * width);
  for (int r = 0; r < rows; ++r)
    for (int t = 0; t < tokens; ++t)
      p.scores[static_cast<size_t>(r) * tokens + t] = normal(rng) + (r == 1   ? 80.0
                                                                     : r == 2 ? -80.0
                                                                              : 0.0);
  for (double& v : p.values) v = uniform(rng);
  return p;
}

// This rank's online-softmax state over tokens [begin, end), in double.
cpu::PartialAttention partial_over(const Problem& p, int begin, int end) {
  cpu::PartialAttention state;
  state.reset(p.rows, p.width);
  for (int r = 0; r < p.rows; ++r) {
    if (begin == end) continue;
    double max = -INFINITY;
    for (int t = begin; t < end; ++t) max = std::max(max, p.score(r, t));
    double sum = 0;
    std::vector<double> acc(p.width, 0.0);
    for (int t = begin; t < end; ++t) {
      const double w = std::exp(p.score(r, t) - max);
      sum += w;
      for (int c = 0; c < p.width; ++c) acc[c] += w * p.value(r, t, c);
    }
    state.max[r] = static_cast<float>(max);
    state.sum[r] = static_cast<float>(sum);
    for (int c = 0; c < p.width; ++c)
      state.acc[static_cast<size_t>(r) * p.width + c] = static_cast<float>(acc[c]);
  }
  return state;
}

// softmax(scores) · values over all tokens, in double.
std::vector<double> full_attention(const Problem& p) {
  std::vector<double> out(static_cast<size_t>(p.rows) * p.width, 0.0);
  for (int r = 0; r < p.rows; ++r) {
    double max = -INFINITY;
    for (int t = 0; t < p.tokens; ++t) max = std::max(max, p.score(r, t));
    double total = 0;
    for (int t = 0; t < p.tokens; ++t) total += std::exp(p.score(r, t) - max);
    for (int t = 0; t < p.tokens; ++t) {
      const double w = std::exp(p.score(r, t) - max) / total;
      for (int c = 0; c < p.width; ++c)
        out[static_cast<size_t>(r) * p.width + c] += w * p.value(r, t, c);
    }
  }
  return out;
}

TEST(MergeAcross, EqualsOneSoftmaxOverAllTokens) {
  Grid grid(xq::testing::grid_tp(), xq::testing::grid_pp());
  Communicator& group = grid.tp_group();
  const int members = group.size(), me = group.rank();
  const Problem problem = make_problem(6, 16, 37);

  // Token slices: the last member holds none (when there are two or more);
  // the others split the 37 tokens unevenly, member m in proportion to m + 1.
  const int holders = members > 1 ? members - 1 : 1;
  auto boundary = [&](int m) {
    const int k = std::min(m, holders);
    return problem.tokens * (k * (k + 1) / 2) / (holders * (holders + 1) / 2);
  };
  cpu::PartialAttention state = partial_over(problem, boundary(me), boundary(me + 1));

  const uint64_t before = group.bytes_sent();
  merge_across(group, state);
  EXPECT_EQ(group.bytes_sent() - before, static_cast<uint64_t>(members - 1) * problem.rows *
                                             (problem.width + 2) * sizeof(float));

  const std::vector<double> expected = full_attention(problem);
  EXPECT_TRUE(xq::testing::all_of(expected.size(), [&](size_t i) {
    return std::fabs(state.acc[i] / state.sum[i / problem.width] - expected[i]) <= 1e-5;
  }));

  // Identical bits on every member of the group (through MPI directly).
  MpiCommunicator& mpi_group = grid.tp_group();
  std::vector<float> mine(state.acc.begin(), state.acc.end());
  mine.insert(mine.end(), state.sum.begin(), state.sum.end());
  mine.insert(mine.end(), state.max.begin(), state.max.end());
  std::vector<float> all(mine.size() * members);
  MPI_Allgather(mine.data(), static_cast<int>(mine.size()), MPI_FLOAT, all.data(),
                static_cast<int>(mine.size()), MPI_FLOAT, mpi_group.comm());
  for (int m = 0; m < members; ++m)
    EXPECT_EQ(std::memcmp(all.data() + m * mine.size(), mine.data(), mine.size() * sizeof(float)),
              0)
        << "member " << m << " differs";
}

// A row no member has any token for stays empty (max -inf, sum 0), and a
// member's empty row does not disturb the others'.
TEST(MergeAcross, EmptyRowsStayEmpty) {
  Grid grid(xq::testing::grid_tp(), xq::testing::grid_pp());
  Communicator& group = grid.tp_group();
  cpu::PartialAttention state;
  state.reset(2, 3);
  // Row 0: only member 0 saw tokens (one token, score 1.5, value (1, 2, 3)).
  if (group.rank() == 0) {
    state.max[0] = 1.5f;
    state.sum[0] = 1.0f;
    state.acc[0] = 1.0f;
    state.acc[1] = 2.0f;
    state.acc[2] = 3.0f;
  }
  merge_across(group, state);
  EXPECT_EQ(state.max[0], 1.5f);
  EXPECT_EQ(state.sum[0], 1.0f);
  EXPECT_EQ(state.acc[0], 1.0f);
  EXPECT_EQ(state.acc[2], 3.0f);
  EXPECT_EQ(state.max[1], -INFINITY);
  EXPECT_EQ(state.sum[1], 0.0f);
  EXPECT_EQ(state.acc[3], 0.0f);
}

}  // namespace
}  // namespace xq::parallel
