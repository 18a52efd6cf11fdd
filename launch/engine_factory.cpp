#include "launch/engine_factory.h"

#include "kernels/error.h"

#if defined(XQ_HAVE_CUDA)
#include "kernels/cuda/device.h"
#include "runtime/cuda_engine.h"
#endif

namespace xq {

Backend parse_backend(const std::string& name) {
  if (name == "cpu") return Backend::kCpu;
  if (name == "cuda") return Backend::kCuda;
  throw Error("--backend must be 'cpu' or 'cuda', got '" + name + "'");
}

const char* backend_name(Backend backend) {
  return backend == Backend::kCuda ? "cuda" : "cpu";
}

bool cuda_backend_built() {
#if defined(XQ_HAVE_CUDA)
  return true;
#else
  return false;
#endif
}

void check_backend(const BackendChoice& choice) {
  if (choice.backend == Backend::kCpu) return;
#if defined(XQ_HAVE_CUDA)
  std::string why_not;
  if (!cuda::device_available(&why_not)) throw Error("--backend cuda: no CUDA device: " + why_not);
  const int count = cuda::device_count();
  if (choice.device < 0 || choice.device >= count)
    throw Error("--backend cuda: --device " + std::to_string(choice.device) +
                " is not one of this machine's " + std::to_string(count) + " CUDA device(s)");
#else
  throw Error("--backend cuda: this build has no CUDA backend");
#endif
}

std::unique_ptr<Engine> make_engine(const Model& model, const EngineOptions& options,
                                    const BackendChoice& choice) {
  check_backend(choice);
#if defined(XQ_HAVE_CUDA)
  if (choice.backend == Backend::kCuda)
    return std::make_unique<CudaEngine>(model, options, choice.device);
#endif
  return std::make_unique<TransformerEngine>(model, options);
}

std::unique_ptr<Engine> make_engine(const Model& model, const EngineOptions& options,
                                    const BackendChoice& choice, Communicator& tp_group,
                                    Range layers) {
  check_backend(choice);
#if defined(XQ_HAVE_CUDA)
  if (choice.backend == Backend::kCuda)
    return std::make_unique<CudaEngine>(model, options, tp_group, layers, choice.device);
#endif
  return std::make_unique<TransformerEngine>(model, options, tp_group, layers);
}

std::string backend_summary(const Engine& engine, int threads) {
#if defined(XQ_HAVE_CUDA)
  if (const auto* cuda_engine = dynamic_cast<const CudaEngine*>(&engine))
    return std::string("backend cuda, ") + cuda_engine->device_summary();
#endif
  static_cast<void>(engine);
  return "backend cpu, " + std::to_string(threads) + " thread(s)";
}

std::string engine_cache_mode(const Engine& engine) {
#if defined(XQ_HAVE_CUDA)
  if (const auto* cuda_engine = dynamic_cast<const CudaEngine*>(&engine))
    return cuda_engine->cache_mode();
#endif
  if (const auto* cpu_engine = dynamic_cast<const TransformerEngine*>(&engine))
    return cpu_engine->cache().mode();
  throw Error("engine_cache_mode: an engine this factory did not make");
}

double engine_cache_bytes_per_token(const Engine& engine) {
#if defined(XQ_HAVE_CUDA)
  if (const auto* cuda_engine = dynamic_cast<const CudaEngine*>(&engine))
    return cuda_engine->cache_bytes_per_token();
#endif
  if (const auto* cpu_engine = dynamic_cast<const TransformerEngine*>(&engine))
    return cpu_engine->cache().bytes_per_token();
  throw Error("engine_cache_bytes_per_token: an engine this factory did not make");
}

}  // namespace xq
