// What one rank of a (tp, pp) grid should put on the wire in one forward step,
// derived from the code so a benchmark (bench/bench_parallel.cpp) and a test
// (tests/mpi/test_parallel_traffic.cpp) can compare it with the bytes the
// communicators count (Communicator::bytes_sent). Payload bytes only, a rank's
// own sends, as MpiCommunicator counts them.
#pragma once

#include <cstddef>
#include <cstdint>

#include "runtime/model.h"

namespace xq::parallel {

struct StepTraffic {
  // Over the rank's TP group (Grid::tp_group()), for EACH layer it holds.
  uint64_t tp_per_layer = 0;
  // Over the rank's pipeline column (Grid::pipeline()), once per step.
  uint64_t pipeline_per_step = 0;
};

// Bytes one rank sends in one PipelineEngine step of `n` tokens whose result
// the last stage broadcasts along the column in `result_bytes` bytes: rows of
// logits for forward() (scored * vocab * 4), the SampledToken for
// forward_sample() (a generation step: n = 1, 8 bytes), when the rank is TP
// rank `tp_rank` of `tp` and stage `stage` of `pp`.
// `sequence_sharded`: the cache is sharded by sequence (the quantized modes,
// and fp16 where tp does not divide the KV heads); else fp16 by KV head.
// TransformerEngine::sequence_sharded() says which.
//
// Only the sizes of the messages enter, never the context length: the cache
// (whatever its length) is never sent. That is the property the test checks.
inline StepTraffic decode_step_traffic(const ModelConfig& c, bool sequence_sharded, int tp,
                                       int tp_rank, int pp, int stage, int64_t n,
                                       uint64_t result_bytes) {
  constexpr uint64_t kFloat = sizeof(float);
  StepTraffic t;

  // --- TP group, per layer (TransformerEngine::run_layers) -----------------
  // Two all_reduce_sum of the (n, dim) partial outputs: after Wo and after
  // down. MpiCommunicator::all_reduce_sum is a ring over p = tp members: the
  // n*dim floats are cut into p chunks (chunk c: count/p, plus one for the
  // first count%p chunks); p-1 reduce-scatter steps send chunks r, r-1, ...,
  // r-p+2 (every chunk but r+1), then p-1 all-gather steps send chunks r+1, r,
  // ..., r+3-p (every chunk but r+2), indices mod p. So rank r sends
  //   2*count - chunk((r+1) % p) - chunk((r+2) % p)   floats per all-reduce.
  // (The same as communicator.h's ring_all_reduce_bytes_sent, written out.)
  if (tp > 1) {
    const uint64_t count = static_cast<uint64_t>(n) * static_cast<uint64_t>(c.dim);
    const uint64_t p = static_cast<uint64_t>(tp), r = static_cast<uint64_t>(tp_rank);
    auto chunk = [&](uint64_t i) { return count / p + (i < count % p ? 1 : 0); };
    const uint64_t per_all_reduce = 2 * count - chunk((r + 1) % p) - chunk((r + 2) % p);
    t.tp_per_layer += 2 * per_all_reduce * kFloat;

    // Sequence-sharded modes also merge the partial attention of every query
    // row and head (merge_across, parallel/partial_attention_merge.cpp): one
    // all_gather of a record of rows * (width + 2) floats, rows = n * n_heads
    // (every head, on every rank), width = head_dim (the kivi weighted sum of
    // V is per head; the xquant sums over stored rows are projected to
    // head_dim before the merge), plus the running max and sum of each row.
    // MpiCommunicator::all_gather is a ring: p - 1 steps, each sending one
    // whole record to the right neighbour.
    if (sequence_sharded) {
      const uint64_t record = static_cast<uint64_t>(n) * static_cast<uint64_t>(c.n_heads) *
                              (static_cast<uint64_t>(c.head_dim) + 2);
      t.tp_per_layer += (p - 1) * record * kFloat;
    }
  }

  // --- Pipeline column, per step (PipelineEngine::forward) ---------------------
  if (pp > 1) {
    // Every stage but the last sends its output activations, n rows of dim
    // floats in all (cut into micro-batches, but the rows add up to n).
    if (stage < pp - 1)
      t.pipeline_per_step += static_cast<uint64_t>(n) * static_cast<uint64_t>(c.dim) * kFloat;

    // The last stage's result (logits or the sampled token) is broadcast
    // from it along the column: MpiCommunicator::broadcast is a binomial tree
    // over ranks relative to the root (rel = (stage - root) mod pp). A member
    // receives from rel - lowbit(rel), then sends the whole message to
    // rel + m for each power of two m below lowbit(rel) (below pp for the
    // root) with rel + m < pp.
    if (result_bytes > 0) {
      const uint64_t bytes = result_bytes;
      const int root = pp - 1;
      const int rel = ((stage - root) % pp + pp) % pp;
      int limit = 1;  // the root sends for every power of two below pp
      if (rel == 0)
        while (limit < pp) limit <<= 1;
      else
        limit = rel & -rel;
      uint64_t children = 0;
      for (int m = limit >> 1; m > 0; m >>= 1)
        if (rel + m < pp) ++children;
      t.pipeline_per_step += children * bytes;
    }
  }
  return t;
}

}  // namespace xq::parallel
