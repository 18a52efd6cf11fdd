// Generation through any engine: prefill the prompt, then decode one token at
// a time until EOS, the token budget or the engine's capacity. Every rank of a
// parallel engine runs it with the same options and gets the same tokens.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "runtime/engine.h"
#include "runtime/sampler.h"

namespace xq {

struct GenerationOptions {
  int64_t max_new_tokens = 128;
  SamplerOptions sampler;
  int32_t seq = 0;  // the engine's sequence slot to use
  // Teacher forcing: after step i feed forced_tokens[i] instead of the sampled
  // token, for at most as many steps as there are ids (so the last id is not
  // fed; EOS does not end it). Each step still reports what was sampled and
  // its margin, so two engines can be compared on the same inputs. Throws
  // xq::Error for an id outside the vocabulary.
  std::vector<int32_t> forced_tokens;
  // Asked after each generated token has reached on_token; true ends the
  // generation there (a caller that found a stop string in the text).
  std::function<bool()> should_stop;
};

struct GenerationResult {
  std::vector<SampledToken> tokens;  // generated, in order; EOS not included
  int32_t prompt_tokens = 0;
  double prefill_seconds = 0;  // up to the first token
  double decode_seconds = 0;   // the rest
};

// Cache capacity for a prompt and up to max_new_tokens, within the model's context.
int32_t generation_capacity(const Model& model, size_t prompt_tokens, int64_t max_new_tokens);

// Runs the prompt from position 0 of options.seq; on_token (when given) sees
// each generated token as soon as it is chosen, so a tool can stream it.
// Throws xq::Error for an empty prompt or one the engine cannot hold.
GenerationResult generate(Engine& engine, const std::vector<int32_t>& prompt,
                          const GenerationOptions& options,
                          const std::function<void(const SampledToken&)>& on_token = {});

}  // namespace xq
