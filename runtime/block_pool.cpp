#include "runtime/block_pool.h"

#include <algorithm>
#include <limits>
#include <string>

namespace xq {

BlockPool::BlockPool(size_t block_bytes, int32_t blocks, bool allocate)
    : block_bytes_(block_bytes), total_(blocks) {
  if (block_bytes == 0 || block_bytes % kAlignment != 0 || blocks < 0)
    throw Error("cache pool: blocks must be a positive multiple of " + std::to_string(kAlignment) +
                " bytes");
  const size_t bytes = block_bytes * static_cast<size_t>(blocks);
  arena_.reset(bytes && allocate
                   ? static_cast<uint8_t*>(::operator new[](bytes, std::align_val_t{kAlignment}))
                   : nullptr);
  free_.resize(static_cast<size_t>(blocks));
  // Block 0 on top of the stack: a fresh pool hands out blocks in order.
  for (int32_t i = 0; i < blocks; ++i) free_[static_cast<size_t>(i)] = blocks - 1 - i;
}

int32_t BlockPool::take() {
  if (free_.empty()) throw Error("cache pool: a block was taken without checking free_blocks()");
  const int32_t id = free_.back();
  free_.pop_back();
  return id;
}

void BlockPool::give(int32_t block) {
  free_.push_back(block);
}

void resize_table(BlockPool& pool, BlockTable& table, int32_t groups, int32_t window) {
  const int32_t missing = std::max(0, groups - static_cast<int32_t>(table.groups.size())) +
                          std::max(0, window - static_cast<int32_t>(table.window.size()));
  const int32_t released = std::max(0, static_cast<int32_t>(table.groups.size()) - groups) +
                           std::max(0, static_cast<int32_t>(table.window.size()) - window);
  if (missing > pool.free_blocks() + released)
    throw PoolExhausted("cache pool exhausted: " + std::to_string(missing) + " more block" +
                        (missing == 1 ? "" : "s") + " of " + std::to_string(pool.block_bytes()) +
                        " bytes needed, " + std::to_string(pool.free_blocks()) + " of " +
                        std::to_string(pool.total_blocks()) +
                        " free (raise the cache memory or release a sequence)");
  while (static_cast<int32_t>(table.groups.size()) > groups) {
    pool.give(table.groups.back());
    table.groups.pop_back();
  }
  while (static_cast<int32_t>(table.window.size()) > window) {
    pool.give(table.window.back());
    table.window.pop_back();
  }
  while (static_cast<int32_t>(table.groups.size()) < groups) table.groups.push_back(pool.take());
  while (static_cast<int32_t>(table.window.size()) < window) table.window.push_back(pool.take());
}

BlockPool pool_around(size_t block_bytes, int32_t blocks, const std::vector<BlockTable>& tables) {
  std::vector<bool> held(static_cast<size_t>(blocks), false);
  for (const BlockTable& table : tables)
    for (const std::vector<int32_t>* ids : {&table.groups, &table.window})
      for (int32_t id : *ids) {
        if (id < 0 || id >= blocks || held[static_cast<size_t>(id)])
          throw Error("cache pool: block " + std::to_string(id) + " is out of range or held twice");
        held[static_cast<size_t>(id)] = true;
      }
  BlockPool pool(block_bytes, blocks, /*allocate=*/false);
  std::vector<int32_t> all;
  while (pool.free_blocks() > 0) all.push_back(pool.take());
  for (int32_t id : all)
    if (!held[static_cast<size_t>(id)]) pool.give(id);
  return pool;
}

int32_t blocks_in_budget(size_t pool_bytes, size_t block_bytes, int32_t default_blocks) {
  if (pool_bytes == 0) return default_blocks;
  const size_t blocks = pool_bytes / block_bytes;
  if (blocks == 0)
    throw Error("cache pool: a budget of " + std::to_string(pool_bytes) +
                " bytes holds no block of " + std::to_string(block_bytes) +
                " bytes (128 token positions of every layer this cache holds)");
  return static_cast<int32_t>(
      std::min<size_t>(blocks, static_cast<size_t>(std::numeric_limits<int32_t>::max())));
}

}  // namespace xq
