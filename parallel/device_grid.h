// A tp x pp grid on GPUs (`mpirun xq worker --backend cuda`): one GPU per
// rank, chosen from the rank's place on its node; NCCL communicators for the
// TP group and the pipeline column, bootstrapped over the grid's MPI groups
// (parallel/grid.h), whose deadlines and fault channel they share; and each
// rank's pipeline stage as a CudaEngine (runtime/cuda_engine.h) whose
// activations move between stages as device buffers over NCCL.
//
// What needs CUDA and NCCL is built only where both are (XQ_HAVE_NCCL with
// the CUDA engine); elsewhere make_pipeline_engine refuses --backend cuda
// with a message, and the rest of this header still works.
#pragma once

#include <mpi.h>

#include <memory>
#include <string>

#include "parallel/grid.h"
#include "parallel/pipeline_engine.h"
#include "parallel/pipeline_stage.h"

namespace xq::parallel {

// This process's rank among the ranks on its node, from the launcher's
// environment when it says so (OMPI_COMM_WORLD_LOCAL_RANK, MPI_LOCALRANKID,
// SLURM_LOCALID; -1 when none is set). Throws xq::Error for a value that is
// not a non-negative integer.
int local_rank_from_environment();
// The same, falling back on MPI_Comm_split_type(MPI_COMM_TYPE_SHARED) over
// `world` (collective over `world` then, on every rank alike when the
// launcher sets the variable for none of them).
int local_rank(MPI_Comm world = MPI_COMM_WORLD);
// The GPU of a rank: local_rank modulo the devices the node has, so ranks of
// one node spread over its GPUs (and share them when there are more ranks).
// Throws xq::Error when device_count < 1.
int device_for_local_rank(int local_rank, int device_count);

// True where this build has CUDA stages (CUDA engine and NCCL).
bool device_pipeline_built();

// The StageFactory of CUDA stages on `device` (-1: device_for_local_rank of
// this rank and the node's GPUs). Each stage builds NCCL communicators over
// the grid's TP group and (pp > 1) pipeline column, collectively. Throws
// xq::Error where device_pipeline_built() is false.
StageFactory cuda_stage_factory(int device = -1);

// The worker's engine: backend "cpu" (host stages, as PipelineEngine's own
// constructor) or "cuda" (cuda_stage_factory(device)). Collective over the
// grid. Throws xq::Error for another backend or cuda where it is not built.
std::unique_ptr<PipelineEngine> make_pipeline_engine(const Model& model,
                                                     const EngineOptions& options, Grid& grid,
                                                     const PipelineOptions& pipeline,
                                                     const std::string& backend, int device = -1);

}  // namespace xq::parallel
