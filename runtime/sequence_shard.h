// Token ownership under sequence sharding: `shards` caches split each
// sequence's tokens between them, in units of `unit` consecutive tokens dealt
// round-robin, so token t belongs to shard (t / unit) % shards. Each shard
// stores its own tokens densely, in order: its local index j holds global
// position position(j). The unit comes from the cache mode
// (runtime/cache_mode.h: one token, or a 128-token group where a stream is
// quantized per channel, so a group's scales come from the same tokens as in
// one unsharded cache). Every cache and the parallel engines count tokens
// through this one type.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include "kernels/error.h"

namespace xq {

class SequenceShard {
 public:
  // The whole sequence: one shard owning every token.
  SequenceShard() = default;
  // Shard `index` of `shards`, dealing `unit` tokens at a time. Throws
  // xq::Error where the shard does not exist or the unit is not positive.
  SequenceShard(int32_t shards, int32_t index, int32_t unit)
      : shards_(shards), index_(index), unit_(unit) {
    if (shards < 1 || index < 0 || index >= shards)
      throw Error("cache: sequence shard " + std::to_string(index) + " of " +
                  std::to_string(shards) + " does not exist");
    if (unit < 1) throw Error("cache: a sequence shard's unit must be at least one token");
  }

  int32_t shards() const { return shards_; }
  int32_t index() const { return index_; }
  int32_t unit() const { return unit_; }
  bool sharded() const { return shards_ > 1; }

  // The shard holding the token at `position`.
  int32_t owner(int32_t position) const { return (position / unit_) % shards_; }
  bool owns(int32_t position) const { return owner(position) == index_; }
  // How many of the positions [0, end) this shard owns: the local index of
  // the first owned token at or after `end`.
  int32_t owned_before(int32_t end) const {
    const int32_t cycle = unit_ * shards_;
    return end / cycle * unit_ + std::clamp(end % cycle - index_ * unit_, 0, unit_);
  }
  // The global position of this shard's local token `local`.
  int32_t position(int32_t local) const {
    return local / unit_ * unit_ * shards_ + index_ * unit_ + local % unit_;
  }

 private:
  int32_t shards_ = 1, index_ = 0, unit_ = 1;
};

}  // namespace xq
