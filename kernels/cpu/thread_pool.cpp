#include "kernels/cpu/thread_pool.h"

#include <cblas.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace xq::cpu {
namespace {

// About 50 microseconds of pause instructions: longer than the gaps between
// the loops of one decode step, short enough not to starve a shared core.
constexpr int kSpinIterations = 2000;

// True on a pool worker, and on the caller while it runs its part: a
// parallel_for called from inside another one runs inline on that thread
// (the pool runs one loop at a time), so a loop over sequences may call code
// that is itself parallel.
thread_local bool inside_parallel_for = false;

inline void cpu_relax() {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#endif
}

class ThreadPool {
 public:
  ~ThreadPool() { resize(1); }

  void resize(int threads) {
    threads = std::max(1, threads);
    if (threads == static_cast<int>(workers_.size()) + 1) return;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
      ++generation_;
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
    workers_.clear();
    stop_ = false;
    // A worker must count generations from now, not from when it first runs:
    // a run started before the thread is scheduled would otherwise be missed.
    const uint64_t start = generation_.load();
    for (int i = 1; i < threads; ++i)
      workers_.emplace_back([this, i, start] { worker_loop(i, start); });
  }

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  void run(int64_t n, const std::function<void(int64_t, int64_t)>& body, int64_t grain) {
    int parts = static_cast<int>(
        std::min<int64_t>(size(), std::max<int64_t>(1, n / std::max<int64_t>(grain, 1))));
    if (parts <= 1) {
      body(0, n);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      body_ = &body;
      n_ = n;
      parts_ = parts;
      pending_.store(parts - 1);
      ++generation_;
    }
    wake_.notify_all();
    {
      struct Inside {
        Inside() { inside_parallel_for = true; }
        ~Inside() { inside_parallel_for = false; }
      } inside;
      body(0, n / parts);  // the caller takes part 0
    }
    // Workers usually finish within microseconds in decode: spin briefly, then
    // sleep on the counter so an oversubscribed core is handed back.
    for (int spin = 0; spin < kSpinIterations; ++spin) {
      if (pending_.load(std::memory_order_acquire) == 0) return;
      cpu_relax();
    }
    for (int left = pending_.load(std::memory_order_acquire); left != 0;
         left = pending_.load(std::memory_order_acquire))
      pending_.wait(left, std::memory_order_acquire);
  }

 private:
  void worker_loop(int index, uint64_t seen) {
    inside_parallel_for = true;
    while (true) {
      const std::function<void(int64_t, int64_t)>* body;
      int64_t n;
      int parts;
      // Spin a little first: in decode the next loop starts within microseconds.
      for (int spin = 0;
           spin < kSpinIterations && generation_.load(std::memory_order_acquire) == seen; ++spin)
        cpu_relax();
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_.load() != seen; });
        seen = generation_.load();
        if (stop_) return;
        body = body_;
        n = n_;
        parts = parts_;
      }
      if (index < parts) {
        (*body)(n * index / parts, n * (index + 1) / parts);
        if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) pending_.notify_one();
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  bool stop_ = false;
  const std::function<void(int64_t, int64_t)>* body_ = nullptr;
  int64_t n_ = 0;
  int parts_ = 0;
  std::atomic<int> pending_{0};
};

// OpenBLAS single-threaded from process start, not only once an engine sizes
// the pool: code that calls BLAS or LAPACK without an engine (a cache's SVD
// set-up, a tool) would otherwise get OpenBLAS's own threads, which spin-wait
// for cores our threads or other processes hold (on a loaded 2-core machine
// a SmolLM2 latent set-up went from 0.6 s to 140 s).
[[maybe_unused]] const bool openblas_single_threaded = [] {
  openblas_set_num_threads(1);
  return true;
}();

ThreadPool& pool() {
  static ThreadPool instance;
  return instance;
}

}  // namespace

void set_thread_count(int threads) {
  pool().resize(threads);
  // BLAS calls are made from inside our own parallel loops; a second set of
  // OpenBLAS threads would only contend with ours for the same cores.
  openblas_set_num_threads(1);
}

int thread_count() {
  return pool().size();
}

void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& body, int64_t grain) {
  if (n <= 0) return;
  if (inside_parallel_for) {
    body(0, n);
    return;
  }
  pool().run(n, body, grain);
}

}  // namespace xq::cpu
