#include "parallel/grid.h"

#include <string>

namespace xq::parallel {

std::vector<Range> stage_layers(int64_t n_layers, int pp, const std::vector<int64_t>& counts) {
  if (pp < 1) throw xq::Error("pipeline needs at least one stage, not " + std::to_string(pp));
  if (counts.empty()) {
    if (n_layers < pp)
      throw xq::Error("cannot split " + std::to_string(n_layers) + " layers over " +
                      std::to_string(pp) + " pipeline stages: every stage needs a layer");
    return even_split(n_layers, pp);
  }
  if (counts.size() != static_cast<size_t>(pp))
    throw xq::Error("layer counts name " + std::to_string(counts.size()) +
                    " stages, but there are " + std::to_string(pp));
  std::vector<Range> ranges;
  int64_t begin = 0;
  for (size_t s = 0; s < counts.size(); ++s) {
    if (counts[s] < 1)
      throw xq::Error("pipeline stage " + std::to_string(s) + " is given " +
                      std::to_string(counts[s]) + " layers; every stage needs at least one");
    ranges.push_back(Range{begin, counts[s]});
    begin += counts[s];
  }
  if (begin != n_layers)
    throw xq::Error("layer counts add up to " + std::to_string(begin) + ", but the model has " +
                    std::to_string(n_layers) + " layers");
  return ranges;
}

Grid::Grid(int tp, int pp, MPI_Comm world) : shape_{tp, pp} {
  if (tp < 1 || pp < 1)
    throw xq::Error("grid needs tp >= 1 and pp >= 1, not tp " + std::to_string(tp) + ", pp " +
                    std::to_string(pp));
  int world_size = 0;
  check_mpi(MPI_Comm_rank(world, &world_rank_), "MPI_Comm_rank");
  check_mpi(MPI_Comm_size(world, &world_size), "MPI_Comm_size");
  // Every rank sees the same sizes, so every rank throws here together.
  if (world_size != shape_.world_size())
    throw xq::Error("grid of tp " + std::to_string(tp) + " x pp " + std::to_string(pp) + " needs " +
                    std::to_string(shape_.world_size()) + " ranks, but the job has " +
                    std::to_string(world_size) + " (mpirun -np " +
                    std::to_string(shape_.world_size()) + ")");
  stage_ = shape_.stage_of(world_rank_);
  tp_rank_ = shape_.tp_rank_of(world_rank_);

  // MPI_Comm_split orders members by key, so group rank = tp_rank (TP group)
  // and = stage (pipeline column). The communicators duplicate the split
  // results, which are then freed.
  check_mpi(MPI_Comm_dup(world, &fault_channel_), "MPI_Comm_dup (fault channel)");
  check_mpi(MPI_Comm_set_errhandler(fault_channel_, MPI_ERRORS_RETURN),
            "MPI_Comm_set_errhandler (fault channel)");
  MPI_Comm split = MPI_COMM_NULL;
  check_mpi(MPI_Comm_split(world, stage_, tp_rank_, &split), "MPI_Comm_split (TP groups)");
  tp_group_ =
      std::make_unique<MpiCommunicator>(split, "tp" + std::to_string(stage_), fault_channel_);
  MPI_Comm_free(&split);
  check_mpi(MPI_Comm_split(world, tp_rank_, stage_, &split), "MPI_Comm_split (pipeline columns)");
  pipeline_ =
      std::make_unique<MpiCommunicator>(split, "pp" + std::to_string(tp_rank_), fault_channel_);
  MPI_Comm_free(&split);
}

Grid::~Grid() {
  tp_group_.reset();
  pipeline_.reset();
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized && fault_channel_ != MPI_COMM_NULL) MPI_Comm_free(&fault_channel_);
}

}  // namespace xq::parallel
