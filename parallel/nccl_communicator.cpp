#include "parallel/nccl_communicator.h"

#include <thread>

#include "parallel/fault_text.h"

namespace xq::parallel {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_of(std::chrono::milliseconds duration) {
  return std::chrono::duration<double>(duration).count();
}

}  // namespace

void check_nccl(ncclResult_t status, const std::string& operation) {
  if (status != ncclSuccess && status != ncclInProgress)
    throw xq::Error(operation + " failed: " + ncclGetErrorString(status));
}

void check_cuda(cudaError_t status, const std::string& operation) {
  if (status != cudaSuccess) throw xq::Error(operation + " failed: " + cudaGetErrorString(status));
}

NcclCommunicator::NcclCommunicator(MpiCommunicator& group, int device)
    : group_(group), device_(device) {
  const std::string context = " for group \"" + group_.name() + "\"";
  int devices = 0;
  check_cuda(cudaGetDeviceCount(&devices), "cudaGetDeviceCount" + context);
  if (devices == 0) throw xq::Error("no CUDA device" + context);
  if (device < 0 || device >= devices)
    throw xq::Error("CUDA device " + std::to_string(device) + " does not exist (" +
                    std::to_string(devices) + " present)" + context);
  try {
    check_cuda(cudaSetDevice(device), "cudaSetDevice" + context);
    // The id is made on one rank and shared over MPI, whose waits time out.
    ncclUniqueId id{};
    if (group_.rank() == 0) check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId" + context);
    group_.broadcast(&id, sizeof id, 0);
    check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking),
               "cudaStreamCreateWithFlags" + context);
    check_cuda(cudaEventCreateWithFlags(&work_done_, cudaEventDisableTiming),
               "cudaEventCreateWithFlags" + context);
    check_cuda(cudaMalloc(reinterpret_cast<void**>(&barrier_word_), sizeof(float)),
               "cudaMalloc" + context);
    check_cuda(cudaMemset(barrier_word_, 0, sizeof(float)), "cudaMemset" + context);
    // Non-blocking: initialization and every call return at once, so that a
    // missing peer shows up as a timeout here instead of a hang inside NCCL.
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    config.commName = group_.name().c_str();
    complete(ncclCommInitRankConfig(&comm_, group_.size(), id, group_.rank(), &config),
             "ncclCommInitRankConfig");
  } catch (...) {
    if (comm_ != nullptr) ncclCommAbort(comm_);
    if (barrier_word_ != nullptr) cudaFree(barrier_word_);
    if (work_done_ != nullptr) cudaEventDestroy(work_done_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
    throw;
  }
}

NcclCommunicator::~NcclCommunicator() {
  if (comm_ != nullptr) {
    // Finalize flushes outstanding work; if a peer is gone it never finishes,
    // so it gets the group's timeout and then the communicator is aborted.
    ncclResult_t state = ncclCommFinalize(comm_);
    const Clock::time_point deadline = Clock::now() + group_.timeout();
    while (state == ncclInProgress && Clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::microseconds(100));
      if (ncclCommGetAsyncError(comm_, &state) != ncclSuccess) break;
    }
    if (state == ncclSuccess)
      ncclCommDestroy(comm_);
    else
      ncclCommAbort(comm_);
  }
  if (barrier_word_ != nullptr) cudaFree(barrier_word_);
  if (work_done_ != nullptr) cudaEventDestroy(work_done_);
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

std::string NcclCommunicator::prefix(const char* op) const {
  return fault_text::operation(fault_text::member(rank(), world_rank(rank())), op, name());
}

void NcclCommunicator::check_usable(const char* op) const {
  if (broken_)
    throw xq::Error(prefix(op) + ": the group already failed (a rank was lost); end the job");
}

void NcclCommunicator::order_after_work(const char* op) {
  if (work_stream_ != nullptr) {
    check_cuda(cudaEventRecord(work_done_, work_stream_), prefix(op) + ": cudaEventRecord");
    check_cuda(cudaStreamWaitEvent(stream_, work_done_, 0), prefix(op) + ": cudaStreamWaitEvent");
    return;
  }
  // Nothing on this device waits for a peer but this rank's own NCCL work,
  // which has finished or been aborted, so this returns.
  check_cuda(cudaDeviceSynchronize(), prefix(op) + ": cudaDeviceSynchronize");
}

void NcclCommunicator::fail(const char* op, const std::string& happened) {
  broken_ = true;
  std::string note = " (NCCL";
  if (comm_ != nullptr) {
    const char* last = ncclGetLastError(comm_);
    if (last != nullptr && *last != '\0') note += std::string(": ") + last;
    ncclCommAbort(comm_);  // unblocks kernels waiting on the missing peer
    comm_ = nullptr;
  }
  note += ")";
  // Whom this rank waited for: the group's MPI communicator waits on named
  // peers, with the same deadline, and agrees with the grid on the culprit.
  std::string culprit;
  int lost = -1, lost_world = -1;
  try {
    group_.barrier();
  } catch (const LostRank& e) {
    lost = e.lost_rank();
    lost_world = e.lost_world_rank();
    if (lost >= 0)
      culprit = fault_text::member(lost, group_.world_rank(lost));
    else if (lost_world >= 0)
      culprit = fault_text::outside_member(lost_world);
  } catch (const xq::Error& e) {
    note += "; the lost rank is unknown: " + std::string(e.what());
  }
  throw LostRank(fault_text::identified(prefix(op), happened, culprit, note), lost, op, lost_world);
}

void NcclCommunicator::complete(ncclResult_t status, const char* op) {
  if (status != ncclSuccess && status != ncclInProgress)
    fail(op, std::string("failed: ") + ncclGetErrorString(status));
  const Clock::time_point deadline = Clock::now() + group_.timeout();
  for (;;) {
    ncclResult_t state = ncclSuccess;
    const ncclResult_t query = ncclCommGetAsyncError(comm_, &state);
    if (query != ncclSuccess)
      fail(op, std::string("failed: ncclCommGetAsyncError: ") + ncclGetErrorString(query));
    if (state == ncclSuccess) {
      const cudaError_t stream_state = cudaStreamQuery(stream_);
      if (stream_state == cudaSuccess) return;
      if (stream_state != cudaErrorNotReady)
        fail(op, std::string("failed on the device: ") + cudaGetErrorString(stream_state));
    } else if (state != ncclInProgress) {
      fail(op, std::string("failed: ") + ncclGetErrorString(state));
    }
    if (Clock::now() >= deadline)
      fail(op, "timed out after " + fault_text::seconds(seconds_of(group_.timeout())));
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

void NcclCommunicator::all_reduce_sum(float* data, size_t count) {
  check_usable("all_reduce_sum");
  if (count == 0) return;
  order_after_work("all_reduce_sum");
  complete(ncclAllReduce(data, data, count, ncclFloat, ncclSum, comm_, stream_), "all_reduce_sum");
  bytes_sent_ += ring_all_reduce_bytes_sent(count, size(), rank());
}

void NcclCommunicator::all_gather(const float* in, size_t count, float* out) {
  check_usable("all_gather");
  if (count == 0) return;
  order_after_work("all_gather");
  complete(ncclAllGather(in, out, count, ncclFloat, comm_, stream_), "all_gather");
  bytes_sent_ += static_cast<uint64_t>(size() - 1) * count * sizeof(float);
}

void NcclCommunicator::reduce_scatter_sum(const float* in, size_t count_per_rank, float* out) {
  check_usable("reduce_scatter_sum");
  if (count_per_rank == 0) return;
  order_after_work("reduce_scatter_sum");
  complete(ncclReduceScatter(in, out, count_per_rank, ncclFloat, ncclSum, comm_, stream_),
           "reduce_scatter_sum");
  bytes_sent_ += static_cast<uint64_t>(size() - 1) * count_per_rank * sizeof(float);
}

void NcclCommunicator::broadcast(void* data, size_t bytes, int root) {
  check_usable("broadcast");
  if (root < 0 || root >= size())
    throw xq::Error(prefix("broadcast") + ": no rank " + std::to_string(root));
  if (bytes == 0) return;
  order_after_work("broadcast");
  complete(ncclBroadcast(data, data, bytes, ncclUint8, root, comm_, stream_), "broadcast");
  // A ring from the root: everyone but the member before the root passes it on.
  if (rank() != (root + size() - 1) % size()) bytes_sent_ += bytes;
}

void NcclCommunicator::send(const void* data, size_t bytes, int peer) {
  check_usable("send");
  if (peer < 0 || peer >= size() || peer == rank())
    throw xq::Error(prefix("send") + ": bad peer " + std::to_string(peer));
  order_after_work("send");
  complete(ncclSend(data, bytes, ncclUint8, peer, comm_, stream_), "send");
  bytes_sent_ += bytes;
}

void NcclCommunicator::recv(void* data, size_t bytes, int peer) {
  check_usable("recv");
  if (peer < 0 || peer >= size() || peer == rank())
    throw xq::Error(prefix("recv") + ": bad peer " + std::to_string(peer));
  order_after_work("recv");
  complete(ncclRecv(data, bytes, ncclUint8, peer, comm_, stream_), "recv");
}

void NcclCommunicator::barrier() {
  check_usable("barrier");
  complete(ncclAllReduce(barrier_word_, barrier_word_, 1, ncclFloat, ncclSum, comm_, stream_),
           "barrier");
}

}  // namespace xq::parallel
