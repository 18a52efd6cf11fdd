// Single-thread throughput of the decode dot products, in GB/s of weight bytes
// streamed, next to what one core can copy or read from memory.
//
//   bench_dot [--seconds S] [--cold-mb MB]
//
// "hot" runs repeat one matrix, which then sits in L2/L3 (1536x576 Q4_1 is
// 0.55 MB; 49152x576 Q8_0 is 30 MB, about the L3 size, so it is mostly not
// hot): that measures the kernel. "cold" runs cycle through copies totalling
// --cold-mb (default 512), far beyond the caches, as decode does across a
// model's layers: that measures memory streaming. Rates are medians over
// chunks of at most 1024 rows, robust to other processes on the machine.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/quant.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

using xq::TensorType;
using Clock = std::chrono::steady_clock;

volatile float g_sink;  // keeps results observable so no pass is optimized away

struct Options {
  double seconds = 1.0;  // per measurement
  size_t cold_bytes = size_t{512} << 20;
};

struct Rate {
  double median;  // GB/s
  double best;
};

// Calls chunk(i) for i = 0, 1, ... (mod chunk_count) for `seconds`, timing each
// call, and reports the median and best rates, where one call moves
// `chunk_bytes`. Timing chunks one by one (tens of microseconds each) and
// taking the median keeps the number honest on a shared machine, where whole
// passes would include time slices given to other processes.
Rate measure(double seconds, size_t chunk_count, double chunk_bytes,
             const std::function<void(size_t)>& chunk) {
  for (size_t i = 0; i < std::min<size_t>(chunk_count, 4); ++i) chunk(i);  // warm-up
  std::vector<double> nanoseconds;
  const auto start = Clock::now();
  size_t i = 0;
  while (std::chrono::duration<double>(Clock::now() - start).count() < seconds ||
         nanoseconds.size() < 5) {
    const auto before = Clock::now();
    chunk(i);
    const auto after = Clock::now();
    nanoseconds.push_back(std::chrono::duration<double, std::nano>(after - before).count());
    i = (i + 1) % chunk_count;
  }
  std::sort(nanoseconds.begin(), nanoseconds.end());
  return {chunk_bytes / nanoseconds[nanoseconds.size() / 2], chunk_bytes / nanoseconds[0]};
}

// A matrix quantized from Gaussian weights, as a model file would hold it.
std::vector<uint8_t> make_matrix(TensorType type, int64_t rows, int64_t cols, std::mt19937& rng) {
  const xq::TensorTypeTraits& traits = xq::tensor_type_traits(type);
  const size_t row_bytes = static_cast<size_t>(cols / traits.block_elems * traits.block_bytes);
  std::vector<uint8_t> matrix(row_bytes * static_cast<size_t>(rows));
  std::normal_distribution<float> normal(0, 0.05f);
  std::vector<float> row(static_cast<size_t>(cols));
  for (int64_t r = 0; r < rows; ++r) {
    for (auto& v : row) v = normal(rng);
    xq::cpu::quantize_row(type, row.data(), matrix.data() + row_bytes * static_cast<size_t>(r),
                          cols);
  }
  return matrix;
}

void bench_matrix(const Options& options, TensorType type, int64_t rows, int64_t cols) {
  std::mt19937 rng(42);
  const std::vector<uint8_t> matrix = make_matrix(type, rows, cols, rng);
  const size_t row_bytes = matrix.size() / static_cast<size_t>(rows);
  std::vector<float> x(static_cast<size_t>(cols));
  std::normal_distribution<float> normal(0, 1);
  for (auto& v : x) v = normal(rng);
  xq::cpu::QuantizedActivations prepared;
  xq::cpu::quantize_activations(type, x.data(), cols, prepared);
  std::vector<float> out(static_cast<size_t>(rows));

  // Rows are timed in chunks of at most 1024 (see measure); `hot` cycles
  // through one matrix, which then stays in L2/L3 if it fits.
  int64_t chunk_rows = rows;
  while (chunk_rows > 1024 && chunk_rows % 2 == 0) chunk_rows /= 2;
  const size_t chunks_per_copy = static_cast<size_t>(rows / chunk_rows);
  const size_t chunk_stride = row_bytes * static_cast<size_t>(chunk_rows);
  const auto chunk_bytes = static_cast<double>(chunk_stride);
  const Rate hot = measure(options.seconds, chunks_per_copy, chunk_bytes, [&](size_t i) {
    xq::cpu::dot_rows(type, matrix.data() + i * chunk_stride, row_bytes, chunk_rows, prepared, cols,
                      out.data());
    g_sink = out[0];
  });
  const Rate hot_single = measure(options.seconds, chunks_per_copy, chunk_bytes, [&](size_t i) {
    const uint8_t* start = matrix.data() + i * chunk_stride;
    for (int64_t r = 0; r < chunk_rows; ++r) {
      out[r] = xq::cpu::dot_row(type, start + row_bytes * r, prepared, cols);
    }
    g_sink = out[0];
  });

  // Cold: copies totalling cold_bytes, swept in order, so every byte comes
  // from DRAM as it does across a model's layers.
  const size_t copies = std::max<size_t>(2, options.cold_bytes / matrix.size());
  std::vector<uint8_t> cold(matrix.size() * copies);
  for (size_t c = 0; c < copies; ++c) {
    std::memcpy(cold.data() + c * matrix.size(), matrix.data(), matrix.size());
  }
  const Rate cold_rate =
      measure(options.seconds, copies * chunks_per_copy, chunk_bytes, [&](size_t i) {
        xq::cpu::dot_rows(type, cold.data() + i * chunk_stride, row_bytes, chunk_rows, prepared,
                          cols, out.data());
        g_sink = out[0];
      });

  std::printf(
      "%-5s %5lldx%-5lld %6.2f MB | hot: dot_rows %6.2f (best %6.2f), dot_row loop %6.2f "
      "| cold (%.0f MB): dot_rows %6.2f (best %6.2f) GB/s\n",
      xq::tensor_type_name(type), static_cast<long long>(rows), static_cast<long long>(cols),
      static_cast<double>(matrix.size()) / 1e6, hot.median, hot.best, hot_single.median,
      static_cast<double>(cold.size()) / 1e6, cold_rate.median, cold_rate.best);
}

// quantize_activations runs once per matrix-vector product; its cost next to
// the product's.
void bench_activations(const Options& options, TensorType type, int64_t n) {
  std::vector<float> x(static_cast<size_t>(n));
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0, 1);
  for (auto& v : x) v = normal(rng);
  xq::cpu::QuantizedActivations prepared;
  const Rate rate = measure(options.seconds / 4, 1, 1.0, [&](size_t) {
    xq::cpu::quantize_activations(type, x.data(), n, prepared);
    g_sink = prepared.block_terms()[0];
  });
  std::printf("quantize_activations(%s, n=%lld): %.0f ns (median)\n", xq::tensor_type_name(type),
              static_cast<long long>(n), 1.0 / rate.median);
}

float read_sum(const float* a, size_t n) {
#if defined(__AVX2__)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  for (size_t i = 0; i + 32 <= n; i += 32) {
    acc0 = _mm256_add_ps(acc0, _mm256_load_ps(a + i));
    acc1 = _mm256_add_ps(acc1, _mm256_load_ps(a + i + 8));
    acc2 = _mm256_add_ps(acc2, _mm256_load_ps(a + i + 16));
    acc3 = _mm256_add_ps(acc3, _mm256_load_ps(a + i + 24));
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, _mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
  float sum = 0;
  for (float v : lanes) sum += v;
  return sum;
#else
  float sum = 0;
  for (size_t i = 0; i < n; ++i) sum += a[i];
  return sum;
#endif
}

void bench_memory(const Options& options) {
  const size_t n = options.cold_bytes / sizeof(float);
  auto* a = static_cast<float*>(std::aligned_alloc(64, n * sizeof(float)));
  auto* c = static_cast<float*>(std::aligned_alloc(64, n * sizeof(float)));
  for (size_t i = 0; i < n; ++i) a[i] = c[i] = static_cast<float>(i % 7);
  // 1 MB chunks of arrays far larger than the caches.
  const size_t chunk = (size_t{1} << 20) / sizeof(float);
  const size_t chunks = n / chunk;
  const auto chunk_bytes = static_cast<double>(chunk * sizeof(float));
  // STREAM's Copy kernel (c[i] = a[i]), counted as STREAM does: read + write.
  const Rate copy = measure(options.seconds, chunks, 2 * chunk_bytes, [&](size_t i) {
    float* __restrict dst = c + i * chunk;
    const float* __restrict src = a + i * chunk;
    for (size_t j = 0; j < chunk; ++j) dst[j] = src[j];
    g_sink = dst[chunk / 2];
  });
  // Read-only streaming, which is what a dot product does with its weights.
  const Rate read = measure(options.seconds, chunks, chunk_bytes,
                            [&](size_t i) { g_sink = read_sum(a + i * chunk, chunk); });
  std::printf(
      "memory (%.0f MB arrays): STREAM copy %6.2f GB/s (best %6.2f; read+write), "
      "read-only sum %6.2f GB/s (best %6.2f)\n",
      static_cast<double>(n * sizeof(float)) / 1e6, copy.median, copy.best, read.median, read.best);
  std::free(a);
  std::free(c);
}

}  // namespace

int main(int argc, char** argv) {
  std::printf("command:");
  for (int i = 0; i < argc; ++i) std::printf(" %s", argv[i]);
  std::printf("\n");
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--seconds" && i + 1 < argc) {
      options.seconds = std::atof(argv[++i]);
    } else if (arg == "--cold-mb" && i + 1 < argc) {
      options.cold_bytes = static_cast<size_t>(std::atof(argv[++i]) * (1 << 20));
    } else {
      std::fprintf(stderr, "usage: %s [--seconds S] [--cold-mb MB]\n", argv[0]);
      return 2;
    }
  }
#if defined(__AVX2__)
  std::printf("build: AVX2 kernels, single thread\n");
#else
  std::printf("build: scalar kernels (no AVX2), single thread\n");
#endif
  bench_memory(options);
  bench_matrix(options, TensorType::kQ4_1, 1536, 576);
  bench_matrix(options, TensorType::kQ4_1, 576, 1536);
  bench_matrix(options, TensorType::kQ8_0, 49152, 576);
  bench_matrix(options, TensorType::kQ4_0, 1536, 576);
  bench_matrix(options, TensorType::kF32, 1536, 576);
  bench_activations(options, TensorType::kQ4_1, 576);
  bench_activations(options, TensorType::kQ4_1, 1536);
  return 0;
}
