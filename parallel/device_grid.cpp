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
// column. The engine's pieces work on its own stream; copies here go on this
// stage's stream after the device has finished the engine's work (settle),
// and end synchronized, so neither stream overtakes the other.
class CudaStage final : public PipelineStage {
 public:
  CudaStage(const Model& model, const EngineOptions& options, Grid& grid, Range layers, int device)
      : model_(model) {
    cuda::set_device(device);
    // Every rank makes the TP group's communicator first, then the column's:
    // the same order everywhere, so the collective start-ups meet.
    tp_ = std::make_unique<NcclCommunicator>(grid.tp_group(), device);
    if (grid.pp() > 1) pipeline_ = std::make_unique<NcclCommunicator>(grid.pipeline(), device);
    stream_ = std::make_unique<cuda::Stream>();
    engine_ = std::make_unique<CudaEngine>(model, options, *tp_, layers, device);
  }
  ~CudaStage() override {
    engine_.reset();  // before the communicators it holds
  }

  Engine& engine() override { return *engine_; }
  const Engine& engine() const override { return *engine_; }
  Range layers() const override { return engine_->layers(); }
  // CudaEngine reports its uploaded bytes in device_summary(); a per-step
  // figure is not part of its interface yet.
  size_t weight_bytes() const override { return 0; }
  Communicator& activation_channel() override {
    if (pipeline_ != nullptr) return *pipeline_;
    return single_;  // one stage: nothing is sent
  }

  void check_input(const int32_t* tokens, int32_t n, int32_t pos0) const override {
    check_forward_input(model_.config(), engine_->max_tokens(), tokens, n, pos0);
  }

  // TransformerEngine::check_batch through the Engine interface: the free
  // blocks are the pool's less those in use.
  void check_batch(const std::vector<Segment>& segments) const override {
    const Engine& e = *engine_;
    std::vector<int32_t> seen;
    for (const Segment& s : segments) {
      if (s.seq < 0 || s.seq >= e.sequence_slots())
        throw Error("forward_batch: sequence " + std::to_string(s.seq) + " is not a slot in [0, " +
                    std::to_string(e.sequence_slots()) + ")");
      if (std::find(seen.begin(), seen.end(), s.seq) != seen.end())
        throw Error("forward_batch: sequence " + std::to_string(s.seq) +
                    " appears twice in a step");
      seen.push_back(s.seq);
      if (s.n <= 0) throw Error("forward_batch: a segment has no tokens");
      if (s.pos0 > e.length(s.seq))
        throw Error("forward_batch: sequence " + std::to_string(s.seq) + " holds " +
                    std::to_string(e.length(s.seq)) + " tokens; a segment cannot start at " +
                    std::to_string(s.pos0));
      if (s.tokens == nullptr) throw Error("forward_batch: a segment has no token ids");
      check_input(s.tokens, s.n, s.pos0);
    }
    int64_t needed = 0;
    for (const Segment& s : segments) {
      const int32_t kept = std::min(s.pos0, e.length(s.seq));
      needed += std::max(0, e.blocks_for_step(kept, s.pos0 + s.n) - e.blocks_for_tokens(kept));
    }
    const PoolInfo pool = e.pool();
    const int64_t used =
        pool.block_bytes > 0 ? static_cast<int64_t>(e.cache_bytes_in_use() / pool.block_bytes) : 0;
    const int64_t free = pool.total_blocks - used;
    if (needed > free)
      throw PoolExhausted("cache pool: the step needs " + std::to_string(needed) +
                          " more blocks; " + std::to_string(free) + " are free");
  }

  float* buffer(int slot, size_t floats) override {
    cuda::DeviceMemory& b = buffers_[static_cast<size_t>(slot)];
    if (b.bytes() < floats * sizeof(float)) {
      settle();  // the old buffer may still be read
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
    settle();
    cuda::copy_on_device(dst, src, floats * sizeof(float), *stream_);
    stream_->synchronize();
  }
  void head(const float* hidden, int32_t rows, float* host_logits) override {
    const size_t count = static_cast<size_t>(rows) * model_.config().vocab_size;
    float* logits = buffer(2, count);
    engine_->head(hidden, rows, logits);
    settle();
    cuda::copy_to_host(host_logits, logits, count * sizeof(float), *stream_);
    stream_->synchronize();
  }
  // The row's logits come to the host and the Sampler picks there: Sampler
  // does not hand out its options and draw, which cuda::sample needs.
  SampledToken head_sample(const float* hidden_row, Sampler& sampler) override {
    const int32_t vocab = model_.config().vocab_size;
    last_row_.resize(static_cast<size_t>(vocab));
    head(hidden_row, 1, last_row_.data());
    SampledToken chosen;
    chosen.token = sampler.sample(last_row_.data(), vocab);
    chosen.margin = top2_margin(last_row_.data(), vocab);
    return chosen;
  }

 private:
  // Waits for the engine's work (on its own stream) to finish.
  void settle() { check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize (pipeline stage)"); }

  const Model& model_;
  SingleProcessCommunicator single_;
  std::unique_ptr<NcclCommunicator> tp_, pipeline_;
  std::unique_ptr<cuda::Stream> stream_;
  cuda::DeviceMemory buffers_[3];
  std::vector<float> last_row_;
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
