#include "runtime/generation.h"

#include <algorithm>
#include <chrono>
#include <string>

#include "kernels/error.h"

namespace xq {

int32_t generation_capacity(const Model& model, size_t prompt_tokens, int64_t max_new_tokens) {
  const int64_t needed = static_cast<int64_t>(prompt_tokens) + std::max<int64_t>(max_new_tokens, 0);
  return static_cast<int32_t>(std::min<int64_t>(needed, model.config().max_seq_len));
}

GenerationResult generate(Engine& engine, const std::vector<int32_t>& prompt,
                          const GenerationOptions& options,
                          const std::function<void(const SampledToken&)>& on_token) {
  if (prompt.empty()) throw Error("generate: the prompt has no tokens");
  const int32_t n_prompt = static_cast<int32_t>(prompt.size());
  if (n_prompt > engine.max_tokens())
    throw Error("generate: the prompt has " + std::to_string(n_prompt) +
                " tokens; the engine holds " + std::to_string(engine.max_tokens()));
  const int32_t eos = engine.model().tokenizer().eos_id();
  for (int32_t id : options.forced_tokens)
    if (id < 0 || id >= engine.model().config().vocab_size)
      throw Error("generate: forced token id " + std::to_string(id) +
                  " is outside the vocabulary of " +
                  std::to_string(engine.model().config().vocab_size));
  Sampler sampler(options.sampler);
  GenerationResult result;
  result.prompt_tokens = n_prompt;

  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  SampledToken step = engine.forward_sample(options.seq, prompt.data(), n_prompt, 0, sampler);
  const auto prefill_done = Clock::now();
  int32_t position = n_prompt;
  const bool forced = !options.forced_tokens.empty();
  const int64_t steps = forced
                            ? std::min<int64_t>(options.max_new_tokens,
                                                static_cast<int64_t>(options.forced_tokens.size()))
                            : options.max_new_tokens;
  while (static_cast<int64_t>(result.tokens.size()) < steps && position < engine.max_tokens() &&
         (forced || step.token != eos)) {
    result.tokens.push_back(step);
    if (on_token) on_token(step);
    if (static_cast<int64_t>(result.tokens.size()) == steps) break;
    if (options.should_stop && options.should_stop()) break;
    const int32_t next = forced ? options.forced_tokens[result.tokens.size() - 1] : step.token;
    step = engine.forward_sample(options.seq, &next, 1, position, sampler);
    ++position;
  }
  const auto end = Clock::now();
  result.prefill_seconds = std::chrono::duration<double>(prefill_done - start).count();
  result.decode_seconds = std::chrono::duration<double>(end - prefill_done).count();
  return result;
}

}  // namespace xq
