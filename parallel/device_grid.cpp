#include "parallel/device_grid.h"

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <vector>

#include "kernels/error.h"

#ifdef XQ_HAVE_DEVICE_PIPELINE
#include "kernels/cuda/device.h"
#include "parallel/nccl_communicator.h"
#include "runtime/cuda_engine.h"
#endif

namespace xq::parallel {

int local_rank_from_environment() {
  // Open MPI, MPICH / Intel MPI, Slurm's srun: the first one set wins.
  for (const char* name : {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"}) {
    const char* text = std::getenv(name);
    if (text == nullptr || *text == '\0') continue;
    char* end = nullptr;
    errno = 0;
    const long value = std::strtol(text, &end, 10);
    if (errno != 0 || *end != '\0' || value < 0 || value > 1 << 20)
      throw Error(std::string(name) + " should be a process's rank on its node, not \"" + text +
                  "\"");
    return static_cast<int>(value);
  }
  return -1;
}

int local_rank(MPI_Comm world) {
  const int from_launcher = local_rank_from_environment();
  if (from_launcher >= 0) return from_launcher;
  MPI_Comm node = MPI_COMM_NULL;
  check_mpi(MPI_Comm_split_type(world, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node),
            "MPI_Comm_split_type (ranks of this node)");
  int rank = 0;
  const int status = MPI_Comm_rank(node, &rank);
  MPI_Comm_free(&node);
  check_mpi(status, "MPI_Comm_rank (ranks of this node)");
  return rank;
}

int device_for_local_rank(int local_rank, int device_count) {
  if (device_count < 1)
    throw Error("no CUDA device on this node for local rank " + std::to_string(local_rank));
  if (local_rank < 0) throw Error("local rank " + std::to_string(local_rank) + " is negative");
  return local_rank % device_count;
}

#ifdef XQ_HAVE_DEVICE_PIPELINE

namespace {

// A pipeline stage on one GPU: a CudaEngine over an NCCL TP group, its
// activations in device memory, sent between stages over an NCCL pipeline
// column. Everything here is ordered by the engine's stream: the stage's own
// copies go on it, and both NCCL communicators wait on it (set_work_stream)
// before a collective or a send reads what the engine wrote, instead of
// synchronizing the whole device. Every call returns with its work done.
//
// Graphs: a stage never captures. Its engine runs run_layers (never
// captured) and, with tp > 1, refuses capture around its collectives.
class CudaStage final : public PipelineStage {
 public:
  CudaStage(const Model& model, const EngineOptions& options, Grid& grid, Range layers, int device)
      : model_(model) {
    cuda::set_device(device);
    // Every rank makes the TP group's communicator first, then the column's:
    // the same order everywhere, so the collective start-ups meet.
    tp_ = std::make_unique<NcclCommunicator>(grid.tp_group(), device);
    if (grid.pp() > 1) pipeline_ = std::make_unique<NcclCommunicator>(grid.pipeline(), device);
    engine_ = std::make_unique<CudaEngine>(model, options, *tp_, layers, device);
    void* work = engine_->stream().handle();
    tp_->set_work_stream(work);
    if (pipeline_ != nullptr) pipeline_->set_work_stream(work);
  }
  ~CudaStage() override {
    // The communicators hold the engine's stream: detach it first, then the
    // engine goes before the communicator it holds.
    tp_->set_work_stream(nullptr);
    if (pipeline_ != nullptr) pipeline_->set_work_stream(nullptr);
    engine_.reset();
  }

  Engine& engine() override { return *engine_; }
  const Engine& engine() const override { return *engine_; }
  Range layers() const override { return engine_->layers(); }
  // The bytes of weights, norms and tables resident on this rank's device
  // (CudaEngine::weight_bytes).
  size_t weight_bytes() const override { return engine_->weight_bytes(); }
  Communicator& activation_channel() override {
    if (pipeline_ != nullptr) return *pipeline_;
    return single_;  // one stage: nothing is sent
  }

  void check_input(const int32_t* tokens, int32_t n, int32_t pos0) const override {
    check_forward_input(model_.config(), engine_->max_tokens(), tokens, n, pos0);
  }
  void check_batch(const std::vector<Segment>& segments) const override {
    engine_->check_batch(segments);
  }

  float* buffer(int slot, size_t floats) override {
    cuda::DeviceMemory& b = buffers_[static_cast<size_t>(slot)];
    if (b.bytes() < floats * sizeof(float)) {
      engine_->stream().synchronize();  // the old buffer may still be read
      b = cuda::DeviceMemory();
      b = cuda::DeviceMemory(floats * sizeof(float));
    }
    return b.as<float>();
  }
  void embed(const std::vector<Segment>& segments, float* hidden) override {
    engine_->embed(segments, hidden);
  }
  void run_layers(int32_t seq, const int32_t* tokens, float* hidden, int32_t n,
                  int32_t pos0) override {
    engine_->run_layers({Segment{seq, pos0, tokens, n, false}}, hidden);
  }
  void run_layers(const std::vector<Segment>& segments, float* hidden) override {
    engine_->run_layers(segments, hidden);
  }
  void copy(const float* src, size_t floats, float* dst) override {
    cuda::Stream& stream = engine_->stream();
    cuda::copy_on_device(dst, src, floats * sizeof(float), stream);
    stream.synchronize();
  }
  void head(const float* hidden, int32_t rows, float* host_logits) override {
    if (rows <= 0) return;
    const size_t count = static_cast<size_t>(rows) * model_.config().vocab_size;
    float* logits = buffer(2, count);
    engine_->head(hidden, rows, logits);
    cuda::Stream& stream = engine_->stream();
    cuda::copy_to_host(host_logits, logits, count * sizeof(float), stream);
    stream.synchronize();
  }
  // Sampled on the device (CudaEngine::head_sample): only the token id and
  // its margin cross to the host.
  SampledToken head_sample(const float* hidden_row, Sampler& sampler) override {
    return engine_->head_sample(hidden_row, sampler);
  }

 private:
  const Model& model_;
  SingleProcessCommunicator single_;
  std::unique_ptr<NcclCommunicator> tp_, pipeline_;
  cuda::DeviceMemory buffers_[3];
  std::unique_ptr<CudaEngine> engine_;  // last: destroyed first
};

}  // namespace

bool device_pipeline_built() {
  return true;
}

StageFactory cuda_stage_factory(int device) {
  return [device](const Model& model, const EngineOptions& options, Grid& grid, Range layers) {
    const int chosen =
        device >= 0 ? device : device_for_local_rank(local_rank(), cuda::device_count());
    return std::unique_ptr<PipelineStage>(
        std::make_unique<CudaStage>(model, options, grid, layers, chosen));
  };
}

#else

bool device_pipeline_built() {
  return false;
}

StageFactory cuda_stage_factory(int) {
  throw Error(
      "--backend cuda: this build has no CUDA pipeline stages (configure with -DXQ_CUDA=ON where "
      "the CUDA toolkit and NCCL are installed)");
}

#endif

std::unique_ptr<PipelineEngine> make_pipeline_engine(const Model& model,
                                                     const EngineOptions& options, Grid& grid,
                                                     const PipelineOptions& pipeline,
                                                     const std::string& backend, int device) {
  if (backend == "cpu") return std::make_unique<PipelineEngine>(model, options, grid, pipeline);
  if (backend == "cuda")
    return std::make_unique<PipelineEngine>(model, options, grid, pipeline,
                                            cuda_stage_factory(device));
  throw Error("--backend wants 'cpu' or 'cuda', not '" + backend + "'");
}

}  // namespace xq::parallel
