// The TP x PP grid: where each world rank sits, which ranks each communicator
// really connects (checked by summing world ranks through it), the error for a
// wrong world size, and the even split used for heads and layers.
#include <gtest/gtest.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "parallel/grid.h"
#include "tests/mpi/mpi_test_env.h"

namespace xq::parallel {
namespace {

std::vector<Range> ranges(std::vector<std::pair<int64_t, int64_t>> list) {
  std::vector<Range> out;
  for (auto [begin, count] : list) out.push_back(Range{begin, count});
  return out;
}

TEST(EvenSplit, HeadsOverRanks) {
  EXPECT_EQ(even_split(9, 2), ranges({{0, 5}, {5, 4}}));
  EXPECT_EQ(even_split(9, 4), ranges({{0, 3}, {3, 2}, {5, 2}, {7, 2}}));
  EXPECT_EQ(even_split(3, 2), ranges({{0, 2}, {2, 1}}));
  EXPECT_EQ(even_split(3, 4), ranges({{0, 1}, {1, 1}, {2, 1}, {3, 0}}));
  EXPECT_EQ(even_split(0, 3), ranges({{0, 0}, {0, 0}, {0, 0}}));
  EXPECT_THROW(even_split(4, 0), xq::Error);
  EXPECT_THROW(even_split(-1, 2), xq::Error);
}

TEST(EvenSplit, ContiguousCompleteAndBalancedLargerFirst) {
  for (int64_t n = 0; n <= 40; ++n) {
    for (int parts = 1; parts <= 9; ++parts) {
      const std::vector<Range> split = even_split(n, parts);
      ASSERT_EQ(split.size(), static_cast<size_t>(parts));
      int64_t next = 0;
      for (size_t i = 0; i < split.size(); ++i) {
        EXPECT_EQ(split[i].begin, next);
        next = split[i].end();
        if (i > 0) {
          EXPECT_LE(split[i].count, split[i - 1].count);
        }
        EXPECT_LE(split[0].count - split[i].count, 1);
      }
      EXPECT_EQ(next, n);
    }
  }
}

TEST(StageLayers, BalancedOrExplicit) {
  EXPECT_EQ(stage_layers(30, 4), ranges({{0, 8}, {8, 8}, {16, 7}, {23, 7}}));
  EXPECT_EQ(stage_layers(30, 1), ranges({{0, 30}}));
  EXPECT_EQ(stage_layers(30, 2, {10, 20}), ranges({{0, 10}, {10, 20}}));
  EXPECT_THROW(stage_layers(30, 2, {10, 19}), xq::Error);      // does not add up
  EXPECT_THROW(stage_layers(30, 2, {0, 30}), xq::Error);       // an empty stage
  EXPECT_THROW(stage_layers(30, 2, {10, 10, 10}), xq::Error);  // three counts, two stages
  EXPECT_THROW(stage_layers(3, 4), xq::Error);                 // fewer layers than stages
}

TEST(GridShape, TensorParallelRanksAreContiguous) {
  const GridShape g{2, 2};
  const int expected[4][2] = {{0, 0}, {0, 1}, {1, 0}, {1, 1}};  // (stage, tp_rank)
  for (int w = 0; w < 4; ++w) {
    EXPECT_EQ(g.stage_of(w), expected[w][0]);
    EXPECT_EQ(g.tp_rank_of(w), expected[w][1]);
  }
  for (auto [tp, pp] : std::vector<std::pair<int, int>>{{2, 1}, {1, 2}, {2, 2}, {4, 1}, {1, 4}}) {
    const GridShape shape{tp, pp};
    for (int w = 0; w < shape.world_size(); ++w)
      EXPECT_EQ(shape.world_rank(shape.stage_of(w), shape.tp_rank_of(w)), w);
  }
}

// Every factorization of the job's size into tp x pp: (2,1), (1,2) under
// -np 2; (4,1), (2,2), (1,4) under -np 4.
TEST(Grid, CommunicatorsConnectTheRightRanks) {
  const int size = xq::testing::world_size(), w = xq::testing::world_rank();
  for (int tp = 1; tp <= size; ++tp) {
    if (size % tp != 0) continue;
    const int pp = size / tp;
    SCOPED_TRACE("tp " + std::to_string(tp) + " pp " + std::to_string(pp));
    Grid grid(tp, pp);
    EXPECT_EQ(grid.tp(), tp);
    EXPECT_EQ(grid.pp(), pp);
    EXPECT_EQ(grid.world_rank(), w);
    EXPECT_EQ(grid.stage(), w / tp);
    EXPECT_EQ(grid.tp_rank(), w % tp);

    MpiCommunicator& group = grid.tp_group();
    EXPECT_EQ(group.size(), tp);
    EXPECT_EQ(group.rank(), grid.tp_rank());
    EXPECT_EQ(group.name(), "tp" + std::to_string(grid.stage()));
    for (int i = 0; i < tp; ++i) EXPECT_EQ(group.world_rank(i), grid.stage() * tp + i);

    MpiCommunicator& column = grid.pipeline();
    EXPECT_EQ(column.size(), pp);
    EXPECT_EQ(column.rank(), grid.stage());
    EXPECT_EQ(column.name(), "pp" + std::to_string(grid.tp_rank()));
    for (int s = 0; s < pp; ++s) EXPECT_EQ(column.world_rank(s), s * tp + grid.tp_rank());

    // Sum world ranks through each communicator: only the right members count.
    float sum = static_cast<float>(w);
    group.all_reduce_sum(&sum, 1);
    float expected = 0;
    for (int i = 0; i < tp; ++i) expected += static_cast<float>(grid.stage() * tp + i);
    EXPECT_EQ(sum, expected);
    sum = static_cast<float>(w);
    column.all_reduce_sum(&sum, 1);
    expected = 0;
    for (int s = 0; s < pp; ++s) expected += static_cast<float>(s * tp + grid.tp_rank());
    EXPECT_EQ(sum, expected);

    EXPECT_EQ(grid.tp_part(9), even_split(9, tp)[grid.tp_rank()]);
  }
}

TEST(Grid, WrongWorldSizeIsAClearError) {
  const int size = xq::testing::world_size();
  try {
    Grid grid(size + 1, 1);
    ADD_FAILURE() << "a grid of the wrong size was made";
  } catch (const xq::Error& e) {
    const std::string expected = "grid of tp " + std::to_string(size + 1) + " x pp 1 needs " +
                                 std::to_string(size + 1) + " ranks, but the job has " +
                                 std::to_string(size);
    EXPECT_NE(std::string(e.what()).find(expected), std::string::npos) << e.what();
  }
  EXPECT_THROW(Grid(0, size), xq::Error);
}

}  // namespace
}  // namespace xq::parallel
