// std::vector storage aligned to a cache line. The decode kernels stream rows
// of 64-256 floats with 32-byte loads; from malloc's 16-byte alignment half of
// those loads straddle two cache lines, and which half depends on where each
// run's buffers happen to land (seen as a 25-32 tok/s spread between
// identical runs).
#pragma once

#include <cstddef>
#include <new>
#include <vector>

namespace xq::cpu {

template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  static constexpr std::align_val_t kAlignment{64};
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kAlignment)); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, kAlignment); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const {
    return true;
  }
};

template <typename T>
using AlignedVector = std::vector<T, CacheLineAllocator<T>>;

}  // namespace xq::cpu
