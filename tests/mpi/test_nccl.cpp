// NcclCommunicator against values each rank computes itself, on device
// buffers. Runs only where a CUDA device exists on every rank; elsewhere it
// skips with the reason (no machine this project builds on has a GPU).
#include <gtest/gtest.h>

#ifdef XQ_HAVE_NCCL
#include <cuda_runtime_api.h>
#include <mpi.h>

#include <vector>

#include "parallel/nccl_communicator.h"
#include "tests/mpi/mpi_test_env.h"

namespace xq::parallel {
namespace {

float value(int rank, size_t i) {
  return static_cast<float>(0.5 * (rank + 1) + (i % 11));
}

TEST(NcclCommunicator, CollectivesOnDeviceBuffers) {
  int devices = 0;
  const cudaError_t status = cudaGetDeviceCount(&devices);
  int usable = status == cudaSuccess && devices > 0 ? 1 : 0, everywhere = 0;
  // Skip together: a rank that went ahead alone would wait for the others.
  MPI_Allreduce(&usable, &everywhere, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  if (!everywhere)
    GTEST_SKIP() << "no CUDA device on every rank (here: "
                 << (status == cudaSuccess ? std::to_string(devices) + " devices"
                                           : std::string(cudaGetErrorString(status)))
                 << "); NcclCommunicator not exercised";

  // One GPU per rank of this node.
  MPI_Comm node;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node);
  int local_rank = 0;
  MPI_Comm_rank(node, &local_rank);
  MPI_Comm_free(&node);
  NcclCommunicator comm(xq::testing::world(), local_rank % devices);
  const int p = comm.size(), r = comm.rank();
  const size_t n = 1001;

  std::vector<float> host(n * p);
  float* device = nullptr;
  check_cuda(cudaMalloc(reinterpret_cast<void**>(&device), n * p * sizeof(float)), "cudaMalloc");
  auto upload = [&](const std::vector<float>& h) {
    check_cuda(cudaMemcpy(device, h.data(), h.size() * sizeof(float), cudaMemcpyHostToDevice),
               "up");
  };
  auto download = [&](size_t count) {
    std::vector<float> h(count);
    check_cuda(cudaMemcpy(h.data(), device, count * sizeof(float), cudaMemcpyDeviceToHost), "down");
    return h;
  };

  for (size_t i = 0; i < n; ++i) host[i] = value(r, i);
  upload(std::vector<float>(host.begin(), host.begin() + n));
  comm.all_reduce_sum(device, n);
  std::vector<float> out = download(n);
  EXPECT_TRUE(xq::testing::all_of(n, [&](size_t i) {
    float expected = 0;
    for (int q = 0; q < p; ++q) expected += value(q, i);
    return out[i] == expected;
  }));

  std::vector<float> mine(n * p, 0.0f);
  for (size_t i = 0; i < n; ++i) mine[r * n + i] = value(r, i);
  upload(mine);
  comm.all_gather(device + r * n, n, device);
  out = download(n * p);
  EXPECT_TRUE(xq::testing::all_of(n * p, [&](size_t i) { return out[i] == value(i / n, i % n); }));

  std::vector<float> byte_data(64, r == 0 ? 7.0f : 0.0f);
  upload(byte_data);
  comm.broadcast(device, 64 * sizeof(float), 0);
  out = download(64);
  EXPECT_TRUE(xq::testing::all_of(out.size(), [&](size_t i) { return out[i] == 7.0f; }));
  comm.barrier();
  cudaFree(device);
}

}  // namespace
}  // namespace xq::parallel

#else

TEST(NcclCommunicator, CollectivesOnDeviceBuffers) {
  GTEST_SKIP() << "built without the CUDA backend and NCCL: NcclCommunicator not compiled";
}

#endif
