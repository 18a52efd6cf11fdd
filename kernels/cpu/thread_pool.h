// A fixed pool of worker threads for data-parallel loops. The decode step runs
// dozens of short loops per layer, so workers stay alive and spin briefly
// before sleeping instead of being created per call.
#pragma once

#include <cstdint>
#include <functional>

namespace xq::cpu {

// Number of threads parallel_for uses (the caller included). Default: 1.
void set_thread_count(int threads);
int thread_count();

// Calls body(begin, end) on disjoint ranges covering [0, n), in parallel.
// Ranges are contiguous and balanced; `grain` is the smallest range worth a thread.
// Called from inside another parallel_for's body it runs body(0, n) inline.
void parallel_for(int64_t n, const std::function<void(int64_t begin, int64_t end)>& body,
                  int64_t grain = 1);

}  // namespace xq::cpu
