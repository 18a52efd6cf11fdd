// The 2-D process grid: world = pp pipeline stages x tp tensor-parallel ranks.
// TP ranks are contiguous (world rank = stage * tp + tp_rank) so that a TP
// group, which talks at every layer, sits on neighbouring ranks (one node,
// NVLink), while pipeline neighbours, which talk once per stage, may be far.
#pragma once

#include <mpi.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "parallel/mpi_communicator.h"
#include "runtime/shard.h"

namespace xq::parallel {

// Contiguous layer ranges for pp stages: balanced by even_split when `counts`
// is empty, else counts[s] layers for stage s (each at least 1, summing to
// n_layers). Throws xq::Error when a stage would get no layers.
std::vector<Range> stage_layers(int64_t n_layers, int pp, const std::vector<int64_t>& counts = {});

// Where each world rank sits; no MPI needed.
struct GridShape {
  int tp = 1, pp = 1;
  int world_size() const { return tp * pp; }
  int world_rank(int stage, int tp_rank) const { return stage * tp + tp_rank; }
  int stage_of(int world_rank) const { return world_rank / tp; }
  int tp_rank_of(int world_rank) const { return world_rank % tp; }
};

class Grid {
 public:
  // Collective over `world`. Throws xq::Error unless its size is tp * pp.
  Grid(int tp, int pp, MPI_Comm world = MPI_COMM_WORLD);
  ~Grid();
  Grid(const Grid&) = delete;
  Grid& operator=(const Grid&) = delete;

  int tp() const { return shape_.tp; }
  int pp() const { return shape_.pp; }
  int stage() const { return stage_; }
  int tp_rank() const { return tp_rank_; }
  int world_rank() const { return world_rank_; }
  const GridShape& shape() const { return shape_; }

  // The tp ranks of this stage, named "tp<stage>"; member i has tp_rank i.
  MpiCommunicator& tp_group() { return *tp_group_; }
  // The pp ranks with this tp_rank, named "pp<tp_rank>"; member s is stage s.
  MpiCommunicator& pipeline() { return *pipeline_; }

  // This rank's share of n items split over the TP group (heads, KV heads).
  Range tp_part(int64_t n) const { return even_split(n, shape_.tp)[static_cast<size_t>(tp_rank_)]; }

 private:
  GridShape shape_;
  int world_rank_ = 0, stage_ = 0, tp_rank_ = 0;
  // Fault notices of both communicators (see MpiCommunicator): a duplicate of
  // the grid's world, freed after them.
  MPI_Comm fault_channel_ = MPI_COMM_NULL;
  std::unique_ptr<MpiCommunicator> tp_group_, pipeline_;
};

}  // namespace xq::parallel
