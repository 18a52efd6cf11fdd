// The device basics of device.h: streams, memory, cuBLAS handles, graphs,
// timers and the device's peak figures.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <string>
#include <utility>

#include "kernels/cuda/check.h"
#include "kernels/cuda/device.h"

namespace xq::cuda {
namespace {

cudaStream_t stream_of(Stream& stream) {
  return static_cast<cudaStream_t>(stream.handle());
}

// Dense fp16 tensor-core multiply-adds per SM per clock, by architecture
// (NVIDIA's whitepapers: V100 and T4 512 per SM (Volta/Turing), A100 1024,
// A10/L4-class 512 (sm_86/89 consumer parts), H100/H200 2048). One
// multiply-add is 2 FLOPs.
double fp16_fma_per_sm_per_clock(int major, int minor) {
  if (major >= 9) return 2048;
  if (major == 8 && minor == 0) return 1024;
  if (major == 8) return 512;
  return 512;
}

// FP32 FMA units per SM (CUDA cores): 64 on sm_80, 128 on sm_86/89/90.
double fp32_fma_per_sm_per_clock(int major, int minor) {
  if (major == 8 && minor == 0) return 64;
  if (major >= 8) return 128;
  return 64;
}

}  // namespace

int device_count() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    static_cast<void>(cudaGetLastError());
    return 0;
  }
  return count;
}

DeviceInfo device_info(int device) {
  cudaDeviceProp properties{};
  CUDA_CHECK(cudaGetDeviceProperties(&properties, device));
  DeviceInfo info;
  info.index = device;
  info.name = properties.name;
  info.compute_major = properties.major;
  info.compute_minor = properties.minor;
  info.multiprocessors = properties.multiProcessorCount;
  info.memory_bytes = properties.totalGlobalMem;
  int memory_clock_khz = 0, bus_width_bits = 0, sm_clock_khz = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&memory_clock_khz, cudaDevAttrMemoryClockRate, device));
  CUDA_CHECK(cudaDeviceGetAttribute(&bus_width_bits, cudaDevAttrGlobalMemoryBusWidth, device));
  CUDA_CHECK(cudaDeviceGetAttribute(&sm_clock_khz, cudaDevAttrClockRate, device));
  // Double data rate: two transfers per memory clock.
  info.peak_memory_gbps = 2.0 * memory_clock_khz * 1e3 * (bus_width_bits / 8.0) / 1e9;
  const double sm_hz = sm_clock_khz * 1e3 * properties.multiProcessorCount;
  info.peak_fp16_tflops =
      2.0 * fp16_fma_per_sm_per_clock(properties.major, properties.minor) * sm_hz / 1e12;
  info.peak_fp32_tflops =
      2.0 * fp32_fma_per_sm_per_clock(properties.major, properties.minor) * sm_hz / 1e12;
  return info;
}

void set_device(int device) {
  CUDA_CHECK(cudaSetDevice(device));
}

void memory_info(size_t* free_bytes, size_t* total_bytes) {
  CUDA_CHECK(cudaMemGetInfo(free_bytes, total_bytes));
}

Stream::Stream() {
  cudaStream_t stream = nullptr;
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  handle_ = stream;
}

Stream::~Stream() {
  if (handle_ != nullptr) static_cast<void>(cudaStreamDestroy(static_cast<cudaStream_t>(handle_)));
}

void Stream::synchronize() {
  CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(handle_)));
}

DeviceMemory::DeviceMemory(size_t bytes) : bytes_(bytes) {
  if (bytes_ > 0) CUDA_CHECK(cudaMalloc(&data_, bytes_));
}

DeviceMemory::~DeviceMemory() {
  if (data_ != nullptr) static_cast<void>(cudaFree(data_));
}

DeviceMemory::DeviceMemory(DeviceMemory&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}

DeviceMemory& DeviceMemory::operator=(DeviceMemory&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) static_cast<void>(cudaFree(data_));
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

PinnedMemory::PinnedMemory(size_t bytes) : bytes_(bytes) {
  if (bytes_ > 0) CUDA_CHECK(cudaMallocHost(&data_, bytes_));
}

PinnedMemory::~PinnedMemory() {
  if (data_ != nullptr) static_cast<void>(cudaFreeHost(data_));
}

PinnedMemory::PinnedMemory(PinnedMemory&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}

PinnedMemory& PinnedMemory::operator=(PinnedMemory&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) static_cast<void>(cudaFreeHost(data_));
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

void copy_to_device(void* device_dst, const void* host_src, size_t bytes, Stream& stream) {
  if (bytes == 0) return;
  CUDA_CHECK(
      cudaMemcpyAsync(device_dst, host_src, bytes, cudaMemcpyHostToDevice, stream_of(stream)));
}

void copy_to_host(void* host_dst, const void* device_src, size_t bytes, Stream& stream) {
  if (bytes == 0) return;
  CUDA_CHECK(
      cudaMemcpyAsync(host_dst, device_src, bytes, cudaMemcpyDeviceToHost, stream_of(stream)));
}

void copy_on_device(void* device_dst, const void* device_src, size_t bytes, Stream& stream) {
  if (bytes == 0) return;
  CUDA_CHECK(
      cudaMemcpyAsync(device_dst, device_src, bytes, cudaMemcpyDeviceToDevice, stream_of(stream)));
}

void fill_zero(void* device_dst, size_t bytes, Stream& stream) {
  if (bytes == 0) return;
  CUDA_CHECK(cudaMemsetAsync(device_dst, 0, bytes, stream_of(stream)));
}

// The workspace is allocated first (a member), so a failure leaves no handle behind.
Blas::Blas(Stream& stream) : workspace_(kWorkspaceBytes) {
  cublasHandle_t handle = nullptr;
  CUBLAS_CHECK(cublasCreate(&handle));
  handle_ = handle;
  CUBLAS_CHECK(cublasSetStream(handle, stream_of(stream)));
  CUBLAS_CHECK(cublasSetWorkspace(handle, workspace_.data(), workspace_.bytes()));
  // Tensor cores for fp16 inputs; fp32 products keep full fp32 math.
  CUBLAS_CHECK(cublasSetMathMode(handle, CUBLAS_DEFAULT_MATH));
}

Blas::~Blas() {
  if (handle_ != nullptr) static_cast<void>(cublasDestroy(static_cast<cublasHandle_t>(handle_)));
}

Graph::~Graph() {
  reset();
}

void Graph::reset() {
  if (exec_ != nullptr)
    static_cast<void>(cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(exec_)));
  if (graph_ != nullptr) static_cast<void>(cudaGraphDestroy(static_cast<cudaGraph_t>(graph_)));
  exec_ = nullptr;
  graph_ = nullptr;
}

void Graph::begin_capture(Stream& stream) {
  CUDA_CHECK(cudaStreamBeginCapture(stream_of(stream), cudaStreamCaptureModeThreadLocal));
}

void Graph::end_capture(Stream& stream) {
  cudaGraph_t graph = nullptr;
  CUDA_CHECK(cudaStreamEndCapture(stream_of(stream), &graph));
  reset();
  graph_ = graph;
  cudaGraphExec_t exec = nullptr;
  CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  exec_ = exec;
}

void Graph::launch(Stream& stream) {
  CUDA_CHECK(cudaGraphLaunch(static_cast<cudaGraphExec_t>(exec_), stream_of(stream)));
}

EventTimer::EventTimer() {
  cudaEvent_t start = nullptr, stop = nullptr;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  start_ = start;
  stop_ = stop;
}

EventTimer::~EventTimer() {
  if (start_ != nullptr) static_cast<void>(cudaEventDestroy(static_cast<cudaEvent_t>(start_)));
  if (stop_ != nullptr) static_cast<void>(cudaEventDestroy(static_cast<cudaEvent_t>(stop_)));
}

void EventTimer::start(Stream& stream) {
  CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(start_), stream_of(stream)));
}

void EventTimer::stop(Stream& stream) {
  CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(stop_), stream_of(stream)));
}

double EventTimer::milliseconds() {
  CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(stop_)));
  float ms = 0;
  CUDA_CHECK(
      cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(start_), static_cast<cudaEvent_t>(stop_)));
  return ms;
}

}  // namespace xq::cuda
