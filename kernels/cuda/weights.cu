// Weights on the device: which GGUF types the kernels read, the compact
// upload of a (possibly column-sliced) host matrix, and the embedding lookup,
// which dequantizes rows of the token table exactly as cpu::dequantize_row.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "kernels/cuda/check.h"
#include "kernels/cuda/dense_common.cuh"
#include "kernels/cuda/dense_ops.h"

namespace xq::cuda {
namespace {

using detail::require;

constexpr int kEmbedThreads = 256;

// Bytes of `cols` values of `type` (cols a whole number of blocks).
size_t compact_row_bytes(TensorType type, int64_t cols) {
  const TensorTypeTraits& traits = tensor_type_traits(type);
  require(cols % traits.block_elems == 0,
          std::to_string(cols) + " columns are not whole " + traits.name + " blocks");
  return static_cast<size_t>(cols / traits.block_elems * traits.block_bytes);
}

// One block of threads per token: the threads stride over the row's values,
// so neighbouring threads write neighbouring floats. A token id outside the
// table yields a row of NaN, which no later op can mistake for data.
__global__ void embed_kernel(const uint8_t* table, size_t row_bytes, int64_t table_rows,
                             int type_id, const int32_t* tokens, int64_t cols, float* out) {
  const int32_t token = tokens[blockIdx.x];
  float* dst = out + static_cast<int64_t>(blockIdx.x) * cols;
  if (token < 0 || token >= table_rows) {
    for (int64_t k = threadIdx.x; k < cols; k += blockDim.x) dst[k] = __int_as_float(0x7fc00000);
    return;
  }
  const uint8_t* row = table + static_cast<size_t>(token) * row_bytes;
  for (int64_t k = threadIdx.x; k < cols; k += blockDim.x) {
    dst[k] = detail::row_element(row, type_id, k);
  }
}

}  // namespace

bool device_supports(TensorType type) {
  switch (type) {
    case TensorType::kF32:
    case TensorType::kF16:
    case TensorType::kQ4_0:
    case TensorType::kQ4_1:
    case TensorType::kQ8_0:
      return true;
    default:
      return false;
  }
}

size_t device_weight_bytes(const WeightMatrix& w) {
  require(device_supports(w.type),
          std::string("the device does not read ") + tensor_type_name(w.type) + " weights");
  return compact_row_bytes(w.type, w.cols) * static_cast<size_t>(w.rows);
}

DeviceWeight upload_weight(const WeightMatrix& w, void* device_dst, Stream& stream) {
  require(w.rows >= 0 && w.cols >= 0, "upload_weight: negative shape");
  const size_t bytes = device_weight_bytes(w);
  const size_t row_bytes = compact_row_bytes(w.type, w.cols);
  require(w.row_bytes >= row_bytes, "upload_weight: row stride shorter than a row");
  require(detail::aligned_to(device_dst, 4), "upload_weight: destination not 4-byte aligned");
  if (bytes > 0) {
    if (w.row_bytes == row_bytes) {
      copy_to_device(device_dst, w.data, bytes, stream);
    } else {
      // A column slice: rows row_bytes long, w.row_bytes apart on the host.
      CUDA_CHECK(cudaMemcpy2DAsync(device_dst, row_bytes, w.data, w.row_bytes, row_bytes,
                                   static_cast<size_t>(w.rows), cudaMemcpyHostToDevice,
                                   detail::stream_of(stream)));
    }
  }
  DeviceWeight result;
  result.type = w.type;
  result.data = static_cast<const uint8_t*>(device_dst);
  result.rows = w.rows;
  result.cols = w.cols;
  result.row_bytes = row_bytes;
  return result;
}

void embed(const DeviceWeight& table, const int32_t* tokens, int64_t n, float* out,
           Stream& stream) {
  require(n >= 0 && n <= INT_MAX, "embed: bad token count");
  require(device_supports(table.type),
          std::string("embed: the device does not read ") + tensor_type_name(table.type));
  require(detail::aligned_to(table.data, 4), "embed: table not 4-byte aligned");
  if (n == 0 || table.cols == 0) return;
  embed_kernel<<<static_cast<unsigned int>(n), kEmbedThreads, 0, detail::stream_of(stream)>>>(
      table.data, table.row_bytes, table.rows, static_cast<int>(table.type), tokens, table.cols,
      out);
  CUDA_CHECK_LAUNCH();
}

}  // namespace xq::cuda
