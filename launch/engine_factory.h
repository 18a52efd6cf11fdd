// Which engine a tool runs on (--backend cpu|cuda, --device N): the CPU's
// TransformerEngine or the device-resident CudaEngine (runtime/cuda_engine.h,
// in builds with the CUDA backend, where XQ_HAVE_CUDA is defined). Every tool
// constructs its engine here, so a build or machine without CUDA fails the
// same way everywhere: one clear xq::Error, never a crash.
#pragma once

#include <memory>
#include <string>

#include "runtime/communicator.h"
#include "runtime/engine.h"
#include "runtime/model.h"
#include "runtime/shard.h"

namespace xq {

enum class Backend { kCpu, kCuda };

struct BackendChoice {
  Backend backend = Backend::kCpu;
  int device = 0;  // CUDA device index (cuda only)
};

// "cpu" or "cuda"; throws xq::Error naming --backend for anything else.
Backend parse_backend(const std::string& name);
const char* backend_name(Backend backend);
// True when this build has the CUDA engine.
bool cuda_backend_built();
// Throws xq::Error when `choice` cannot run here: "--backend cuda: this build
// has no CUDA backend", "--backend cuda: no CUDA device: <reason>", or a
// device index the machine does not have. Cheap: the tools call it before
// loading the model.
void check_backend(const BackendChoice& choice);

// The engine for one process (every layer, every head).
std::unique_ptr<Engine> make_engine(const Model& model, const EngineOptions& options,
                                    const BackendChoice& choice);
// One rank of `tp_group` holding `layers` (all when count is 0). For cuda the
// group's buffers must be device memory (an NCCL communicator, or a group of
// one).
std::unique_ptr<Engine> make_engine(const Model& model, const EngineOptions& options,
                                    const BackendChoice& choice, Communicator& tp_group,
                                    Range layers);

// For the tools' summaries: "backend cpu, 2 threads" or "backend cuda, CUDA
// device 0 (name, sm_90), weights ... resident, graphs ...".
std::string backend_summary(const Engine& engine, int threads);
// The cache mode's name and bytes per token of an engine made here.
std::string engine_cache_mode(const Engine& engine);
double engine_cache_bytes_per_token(const Engine& engine);

}  // namespace xq
