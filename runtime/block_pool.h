// The cache pool: one arena per cache (one rank's layers and shard), cut once
// into fixed-size blocks, and the per-sequence tables of the blocks a sequence
// holds (docs/design.md, "The cache pool"). A block covers 128 token
// positions of a sequence (AttentionCache::kBlockTokens): the length of a
// per-channel quantization group, so a full block is exactly one group of
// every per-channel stream. Which block a sequence gets is the pool's choice;
// the caches read and write only through the table, so no result depends on
// it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <vector>

#include "kernels/error.h"

namespace xq {

// Thrown when the pool has no free block for what a call needs; the call
// leaves the cache as it was.
class PoolExhausted : public Error {
 public:
  using Error::Error;
};

class BlockPool {
 public:
  // Blocks start on cache lines: the decode kernels stream rows out of them.
  static constexpr size_t kAlignment = 64;

  BlockPool() = default;
  // Allocates blocks x block_bytes once (block_bytes a multiple of kAlignment).
  // Without `allocate` the pool keeps only the free list: the blocks live
  // elsewhere (a device arena of the same layout) and block() must not be used.
  BlockPool(size_t block_bytes, int32_t blocks, bool allocate = true);

  size_t block_bytes() const { return block_bytes_; }
  int32_t total_blocks() const { return total_; }
  int32_t free_blocks() const { return static_cast<int32_t>(free_.size()); }
  // A free block's id; the caller checked free_blocks() first (a missing
  // block here is a logic error, not exhaustion).
  int32_t take();
  void give(int32_t block);
  const uint8_t* arena() const { return arena_.get(); }
  uint8_t* block(int32_t id) { return arena_.get() + static_cast<size_t>(id) * block_bytes_; }
  const uint8_t* block(int32_t id) const {
    return arena_.get() + static_cast<size_t>(id) * block_bytes_;
  }

 private:
  struct Free {
    void operator()(uint8_t* p) const { ::operator delete[](p, std::align_val_t{kAlignment}); }
  };
  size_t block_bytes_ = 0;
  int32_t total_ = 0;
  std::unique_ptr<uint8_t[], Free> arena_;  // left uninitialized: a block is written before read
  std::vector<int32_t> free_;               // a stack: the last block given back is taken first
};

// The blocks one sequence holds: groups[g] stores its local tokens
// [128 g, 128 g + 128) in the cache's block layout; window[j] is the j-th
// page of the fp16 window (the newest tokens of per-channel streams, waiting
// for their group), for modes that have one.
struct BlockTable {
  std::vector<int32_t> groups;
  std::vector<int32_t> window;
  int32_t held() const { return static_cast<int32_t>(groups.size() + window.size()); }
};

// Gives back the blocks of `table` beyond `groups` group blocks and `window`
// window pages, then takes the ones missing. Throws PoolExhausted, with the
// table and the pool unchanged, when the pool cannot cover the difference.
void resize_table(BlockPool& pool, BlockTable& table, int32_t groups, int32_t window);

// A pool of `blocks` blocks (no arena: the blocks live elsewhere) whose free
// blocks are exactly those none of `tables` holds: the bookkeeping of a cache
// whose blocks were filled by another one (a device cache importing a CPU
// cache's arena). Throws xq::Error for a block id out of range or held twice.
BlockPool pool_around(size_t block_bytes, int32_t blocks, const std::vector<BlockTable>& tables);

// The number of blocks of `block_bytes` a budget of `pool_bytes` holds, or
// `default_blocks` for a budget of 0. Throws xq::Error for a budget too small
// for one block.
int32_t blocks_in_budget(size_t pool_bytes, size_t block_bytes, int32_t default_blocks);

inline size_t round_up(size_t bytes, size_t alignment) {
  return (bytes + alignment - 1) / alignment * alignment;
}

}  // namespace xq
