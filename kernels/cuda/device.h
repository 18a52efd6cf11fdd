// The CUDA device as the rest of the runtime sees it: which GPU, its peak
// figures, a stream, device memory, a cuBLAS handle and a captured CUDA graph.
// Plain C++: no CUDA type crosses this header, so the engine, the tools and
// the tests compile with the ordinary C++ compiler. Every CUDA failure throws
// xq::Error naming the call and CUDA's reason; nothing here calls exit().
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace xq::cuda {

// True when a CUDA device can be used. Otherwise false, with the reason (no
// driver, no device, ...) in *why_not when why_not is not null. Never throws.
bool device_available(std::string* why_not);

// What a benchmark holds its measurements against. Peaks come from the
// device's attributes (memory clock x bus width; SM count x clock x the dense
// fp16 tensor-core rate per SM of its architecture) and are labelled as such.
struct DeviceInfo {
  int index = 0;
  std::string name;
  int compute_major = 0, compute_minor = 0;
  int multiprocessors = 0;
  size_t memory_bytes = 0;
  double peak_memory_gbps = 0;  // GB/s (1e9 bytes per second)
  double peak_fp16_tflops = 0;  // dense tensor-core fp16 with fp32 accumulation
  double peak_fp32_tflops = 0;  // CUDA cores, FMA = 2 FLOPs
};
int device_count();
DeviceInfo device_info(int device);
// Makes `device` current for this thread (one GPU per rank).
void set_device(int device);
// Free and total bytes of the current device.
void memory_info(size_t* free_bytes, size_t* total_bytes);

// One CUDA stream (non-blocking with respect to the legacy default stream).
// Everything one rank does goes on its stream, in order.
class Stream {
 public:
  Stream();
  ~Stream();
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  // The cudaStream_t, for .cu files and NCCL.
  void* handle() const { return handle_; }
  // Waits for everything enqueued; throws xq::Error for an error a kernel raised.
  void synchronize();

 private:
  void* handle_ = nullptr;
};

// Owned device memory, uninitialized.
class DeviceMemory {
 public:
  DeviceMemory() = default;
  explicit DeviceMemory(size_t bytes);
  ~DeviceMemory();
  DeviceMemory(DeviceMemory&& other) noexcept;
  DeviceMemory& operator=(DeviceMemory&& other) noexcept;
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;

  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

// Copies on `stream`. Host memory need not be pinned (a pageable copy is
// synchronous with respect to the host for device-to-host copies).
void copy_to_device(void* device_dst, const void* host_src, size_t bytes, Stream& stream);
void copy_to_host(void* host_dst, const void* device_src, size_t bytes, Stream& stream);
void copy_on_device(void* device_dst, const void* device_src, size_t bytes, Stream& stream);
void fill_zero(void* device_dst, size_t bytes, Stream& stream);

// Page-locked host memory: the buffers that cross every step (token ids in,
// sampled ids and logits out) so that their copies are truly asynchronous
// and may sit inside a captured graph.
class PinnedMemory {
 public:
  PinnedMemory() = default;
  explicit PinnedMemory(size_t bytes);
  ~PinnedMemory();
  PinnedMemory(PinnedMemory&& other) noexcept;
  PinnedMemory& operator=(PinnedMemory&& other) noexcept;
  PinnedMemory(const PinnedMemory&) = delete;
  PinnedMemory& operator=(const PinnedMemory&) = delete;
  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

// A cuBLAS handle bound to one stream, with tensor-core math allowed, and a
// fixed workspace of kWorkspaceBytes set on it: cuBLAS calls inside a CUDA
// graph capture must not allocate, so it never falls back to its own pool.
// cublasSetStream resets the workspace to the default pool, so every caller
// that sets the stream sets workspace() again right after it.
class Blas {
 public:
  static constexpr size_t kWorkspaceBytes = size_t{32} << 20;
  explicit Blas(Stream& stream);
  ~Blas();
  Blas(const Blas&) = delete;
  Blas& operator=(const Blas&) = delete;
  void* handle() const { return handle_; }  // the cublasHandle_t
  void* workspace() const { return workspace_.data(); }
  size_t workspace_bytes() const { return workspace_.bytes(); }

 private:
  DeviceMemory workspace_;
  void* handle_ = nullptr;
};

// A CUDA graph captured from a stream and launched again later: a decode step
// of fixed shape is hundreds of small kernels, and one graph launch replaces
// their launch overhead. Kernels captured read their arguments at capture
// time, so whatever changes between launches must live in device memory that
// the step reads (token ids, positions, block tables), never in arguments.
class Graph {
 public:
  Graph() = default;
  ~Graph();
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;
  // Starts capturing `stream` (thread-local mode); every launch on it until
  // end_capture() is recorded instead of run.
  void begin_capture(Stream& stream);
  // Ends the capture and instantiates the graph (replacing any held before).
  void end_capture(Stream& stream);
  bool ready() const { return exec_ != nullptr; }
  // Runs the captured work on `stream`.
  void launch(Stream& stream);
  void reset();

 private:
  void* graph_ = nullptr;  // cudaGraph_t
  void* exec_ = nullptr;   // cudaGraphExec_t
};

// Elapsed device time between two points on a stream, for the benchmarks.
class EventTimer {
 public:
  EventTimer();
  ~EventTimer();
  EventTimer(const EventTimer&) = delete;
  EventTimer& operator=(const EventTimer&) = delete;
  void start(Stream& stream);
  void stop(Stream& stream);
  // Milliseconds from start to stop; waits for stop.
  double milliseconds();

 private:
  void* start_ = nullptr;
  void* stop_ = nullptr;
};

}  // namespace xq::cuda
