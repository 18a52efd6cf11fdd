// Single-thread throughput of the XQuant cache dequantizers, in values per
// second, for every bit width: per token (groups of 128 consecutive values)
// and per channel (a block of 128 tokens x 256 channels, token-major codes),
// vector and scalar paths, plus the quantizer for reference.
//
//   bench_group_quant [--seconds S]
//
// The use is a small fp32 tile rebuilt inside attention, so the working set is
// kept cache-resident (a tile of 32 x 1024 values, 128 KB of output): this
// measures the kernel, not memory. Rates are medians over repeated calls.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

#include "kernels/cpu/group_quant.h"

namespace {

using Clock = std::chrono::steady_clock;

volatile float g_sink;  // keeps results observable so no call is optimized away

// Median rate, in values per second, of calls that each handle `values`.
double measure(double seconds, double values, const std::function<void()>& call) {
  for (int i = 0; i < 3; ++i) call();  // warm-up
  std::vector<double> nanoseconds;
  const auto start = Clock::now();
  while (std::chrono::duration<double>(Clock::now() - start).count() < seconds ||
         nanoseconds.size() < 5) {
    const auto before = Clock::now();
    call();
    nanoseconds.push_back(std::chrono::duration<double, std::nano>(Clock::now() - before).count());
  }
  std::nth_element(nanoseconds.begin(), nanoseconds.begin() + nanoseconds.size() / 2,
                   nanoseconds.end());
  return values / (nanoseconds[nanoseconds.size() / 2] * 1e-9);
}

}  // namespace

int main(int argc, char** argv) {
  double seconds = 0.5;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--seconds") == 0 && i + 1 < argc) {
      seconds = std::atof(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: %s [--seconds S]\n", argv[0]);
      return 2;
    }
  }
  std::mt19937 rng(1);
  std::normal_distribution<float> dist(0, 1);

  const int64_t tokens = 32, channels = 1024, group = 128;
  const int64_t count = tokens * channels;
  std::vector<float> x(static_cast<size_t>(count));
  for (auto& v : x) v = dist(rng);
  const int64_t block_rows = 128, block_cols = 256;
  std::vector<float> block(static_cast<size_t>(block_rows * block_cols));
  for (auto& v : block) v = dist(rng);
  std::vector<float> out(std::max(x.size(), block.size()));

  std::printf("values/s, one thread (G = 1e9)\n");
  std::printf("%4s %14s %14s %14s %14s %14s\n", "bits", "per-token", "scalar", "per-channel",
              "scalar", "quantize");
  for (int bits = 1; bits <= 8; ++bits) {
    std::vector<uint8_t> packed(xq::cpu::packed_bytes(bits, count));
    std::vector<xq::cpu::GroupParams> params(static_cast<size_t>(count / group));
    xq::cpu::quantize_groups(x.data(), count, group, bits, packed.data(), params.data());
    std::vector<uint8_t> block_packed(xq::cpu::packed_bytes(bits, block_rows * block_cols));
    std::vector<xq::cpu::GroupParams> block_params(static_cast<size_t>(block_cols));
    xq::cpu::quantize_strided(block.data(), block_rows, block_cols, block_cols, bits,
                              block_packed.data(), block_params.data());

    const double per_token = measure(seconds, static_cast<double>(count), [&] {
      xq::cpu::dequantize_groups(packed.data(), params.data(), count, group, bits, out.data());
      g_sink = out[7];
    });
    const double per_token_scalar = measure(seconds, static_cast<double>(count), [&] {
      xq::cpu::portable::dequantize_groups(packed.data(), params.data(), count, group, bits,
                                           out.data());
      g_sink = out[7];
    });
    const double block_values = static_cast<double>(block_rows * block_cols);
    const double per_channel = measure(seconds, block_values, [&] {
      xq::cpu::dequantize_strided(block_packed.data(), block_params.data(), block_rows, block_cols,
                                  bits, out.data(), block_cols);
      g_sink = out[7];
    });
    const double per_channel_scalar = measure(seconds, block_values, [&] {
      xq::cpu::portable::dequantize_strided_rows(block_packed.data(), block_params.data(),
                                                 block_cols, bits, 0, block_rows, out.data(),
                                                 block_cols);
      g_sink = out[7];
    });
    const double quantize = measure(seconds, static_cast<double>(count), [&] {
      xq::cpu::quantize_groups(x.data(), count, group, bits, packed.data(), params.data());
      g_sink = static_cast<float>(packed[3]);
    });
    std::printf("%4d %13.2fG %13.2fG %13.2fG %13.2fG %13.2fG\n", bits, per_token * 1e-9,
                per_token_scalar * 1e-9, per_channel * 1e-9, per_channel_scalar * 1e-9,
                quantize * 1e-9);
  }
  return 0;
}
