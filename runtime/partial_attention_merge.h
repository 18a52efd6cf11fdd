// The flash-decoding merge across a TP group (docs/design.md): in
// XQuant modes each rank of the group holds different tokens of a sequence and
// computes attention over its own tokens as an online-softmax state (running
// max, sum of exp, weighted sum of values: kernels/attention_state.h). Merging
// those states gives exactly the attention over all tokens; normalize the
// merged rows with cpu::normalize_attention.
#pragma once

#include "kernels/cpu/attention.h"
#include "runtime/communicator.h"

namespace xq {

// Replaces `state` on every member with the merge of all members' states, taken
// in rank order, so every member ends with identical bits equal (to rounding)
// to one rank having seen all tokens. A member with no tokens passes an empty
// state (max -inf, sum 0). Shapes (rows, width) must match on all members; a
// mismatch makes the exchange fail with an error, not a wrong result.
// Traffic: one all_gather of rows * (width + 2) floats per member.
void merge_across(Communicator& group, cpu::PartialAttention& state);

}  // namespace xq
