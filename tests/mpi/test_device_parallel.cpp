// Tensor and pipeline parallelism on GPUs (`mpirun -np 2`, one GPU per rank):
// the grids tp 2 x pp 1 and tp 1 x pp 2 of CUDA stages (parallel/device_grid.h:
// CudaEngine over NCCL, activations as device buffers) against the
// single-rank CPU engine on the same teacher-forced tokens. Skips, on every
// rank together, unless there are two ranks and each has a GPU of its own.
//
// Bounds (logit_bounds.h's reasoning, with the device as one more draw):
// the single-rank CudaEngine on this rank's GPU is compared with the CPU
// first; its difference G_t at step t is the device's own rounding there
// (fp16 tiles in prefill products, another summation order). A parallel
// device run differs from the single device run by summation order only
// (TP splits each product's columns; PP runs the same kernels on the same
// rows), which moves logits by at most the fp32 bound, and on int8-decode
// weights (Q4_1) re-rounds the activations: kRedraws E more. So step t is
// held to G_t + fp32_bound(E) (+ kRedraws E for quantized weights), E the
// CPU reference's int8 noise floor measured here.
#include <gtest/gtest.h>
#include <mpi.h>

#include <string>
#include <vector>

#include "kernels/cuda/device.h"
#include "parallel/device_grid.h"
#include "parallel/grid.h"
#include "parallel/pipeline_engine.h"
#include "runtime/cuda_engine.h"
#include "runtime/engine.h"
#include "tests/mpi/logit_bounds.h"
#include "tests/mpi/mpi_test_env.h"
#include "tests/test_util.h"

namespace xq::parallel {
namespace {

using cpu::MatmulPath;
using testing::forced_rows;
using testing::LogitComparison;

// Empty when every rank has a GPU of its own and there are exactly two
// ranks; else why not (the same text on every rank).
std::string why_not_two_gpus() {
  std::string reason;
  int devices = 0;
  if (!cuda::device_available(&reason))
    reason = "no CUDA device (" + reason + ")";
  else
    devices = cuda::device_count();
  const int mine = local_rank();
  // This rank has a GPU of its own when its local rank is below the count.
  int ok = reason.empty() && mine < devices ? 1 : 0, everywhere = 0;
  MPI_Allreduce(&ok, &everywhere, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  if (xq::testing::world_size() != 2) return "needs exactly 2 ranks (mpirun -np 2)";
  if (!everywhere)
    return "needs two GPUs, one per rank; rank " + std::to_string(xq::testing::world_rank()) +
           " sees " + std::to_string(devices) + (reason.empty() ? "" : ": " + reason);
  return "";
}

struct Case {
  std::string model_path;
  bool int8_decode;  // quantized weights: decode rounds activations to int8
  std::string prompt;
};

void expect_device_grids_match_cpu(const Case& test) {
  if (!testing::file_exists(test.model_path)) GTEST_SKIP() << test.model_path << " is absent";
  auto model = Model::load(test.model_path);
  const int32_t vocab = model->config().vocab_size;
  EngineOptions options;
  options.max_tokens = 128;
  options.sequences = 2;
  // The tokens both sides are fed: the CPU's greedy continuation.
  const std::vector<int32_t> prompt = model->tokenizer().encode(test.prompt, true);
  const int32_t n0 = static_cast<int32_t>(prompt.size());
  TransformerEngine greedy(*model, options), floors(*model, options), reference(*model, options);
  const std::vector<int32_t> all = testing::greedy_tokens(greedy, 0, prompt, 16);
  const float noise = testing::int8_noise_floor(floors, 0, all, n0);
  const std::vector<float> cpu = forced_rows(reference, 0, all, n0, vocab, MatmulPath::kAuto);

  const int device = device_for_local_rank(local_rank(), cuda::device_count());
  std::vector<float> own_diff;  // G_t per step
  {
    CudaEngine single(*model, options, device);
    const std::vector<float> rows = forced_rows(single, 0, all, n0, vocab, MatmulPath::kAuto);
    own_diff = testing::row_diffs(rows, cpu, vocab);
  }
  for (const auto& [tp, pp] : std::vector<std::pair<int, int>>{{2, 1}, {1, 2}}) {
    Grid grid(tp, pp);
    PipelineEngine engine(*model, options, grid, PipelineOptions{}, cuda_stage_factory(device));
    const std::vector<float> rows = forced_rows(engine, 0, all, n0, vocab, MatmulPath::kAuto);
    LogitComparison c(test.model_path + " on GPUs, tp=" + std::to_string(tp) +
                      " pp=" + std::to_string(pp));
    for (size_t t = 0; t < own_diff.size(); ++t) {
      const float bound = own_diff[t] + testing::fp32_bound(noise) +
                          (test.int8_decode && t > 0 ? testing::kRedraws * noise : 0.0f);
      c.add(static_cast<int>(t), &cpu[t * vocab], &rows[t * vocab], vocab, bound);
    }
    EXPECT_TRUE(c.ok());
    EXPECT_TRUE(testing::same_as_rank0(rows)) << "tp " << tp << " pp " << pp;
    testing::print_rank0(c.summary() + " (device's own largest difference " +
                         std::to_string(testing::max_of(own_diff)) + ", E " +
                         std::to_string(noise) + ")");
    // The sampled path: the last stage's greedy pick is the argmax of the
    // logits forward() returns, on every rank.
    std::vector<float> last(static_cast<size_t>(vocab));
    engine.truncate(1, 0);
    engine.forward(1, prompt.data(), n0, 0, last.data(), n0 - 1);
    engine.truncate(1, 0);
    Sampler sampler(SamplerOptions{});
    const SampledToken chosen = engine.forward_sample(1, prompt.data(), n0, 0, sampler);
    EXPECT_EQ(chosen.token, argmax(last.data(), vocab)) << "tp " << tp << " pp " << pp;
  }
}

TEST(DeviceParallel, Stories260KTp2AndPp2MatchTheCpu) {
  const std::string why = why_not_two_gpus();
  if (!why.empty()) GTEST_SKIP() << why;
  expect_device_grids_match_cpu(
      {testing::shared_path("models/stories260K.bin"), false, "Once upon a time, a little bird"});
}

TEST(DeviceParallel, SmolLM2Tp2AndPp2MatchTheCpu) {
  const std::string why = why_not_two_gpus();
  if (!why.empty()) GTEST_SKIP() << why;
  expect_device_grids_match_cpu(
      {std::string(XQ_SOURCE_DIR) + "/models/SmolLM2-135M-Instruct.Q4_1.gguf", true,
       "The capital of France is"});
}

}  // namespace
}  // namespace xq::parallel
