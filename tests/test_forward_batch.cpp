// Engine::forward_batch: a sequence's logits are the same bits whether it runs
// alone or in a batch with others, whatever the mix of prefill chunks and
// decode rows, for every cache mode (stories260K). The kernels take one path
// for every row count and each row's int8 scale is its own; attention folds
// its blocks in one order whatever the number of queries; prefill chunks end
// at multiples of the 128-token block (or at the prompt's end) so every query
// sees the cache as one whole prefill would have shown it.
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "cache_mode_params.h"
#include "runtime/engine.h"
#include "runtime/sampler.h"
#include "test_util.h"

namespace xq {
namespace {

std::vector<int32_t> prompt_of(int32_t length, int32_t salt, int32_t vocab) {
  std::vector<int32_t> tokens(static_cast<size_t>(length));
  for (int32_t i = 0; i < length; ++i) tokens[i] = 1 + (i * 37 + salt * 101) % (vocab - 1);
  return tokens;
}

struct Trace {
  std::vector<std::vector<float>> logits;  // after the prompt, then after each decode step
  std::vector<int32_t> tokens;             // greedy
};

// The reference: one sequence in its own engine, its prompt in one forward.
Trace run_alone(const Model& model, const EngineOptions& options,
                const std::vector<int32_t>& prompt, int32_t steps) {
  TransformerEngine engine(model, options);
  const int32_t vocab = model.config().vocab_size;
  Trace trace;
  std::vector<float> row(static_cast<size_t>(vocab));
  engine.forward(0, prompt.data(), static_cast<int32_t>(prompt.size()), 0, row.data(),
                 static_cast<int32_t>(prompt.size()) - 1);
  int32_t pos = static_cast<int32_t>(prompt.size());
  for (int32_t s = 0; s <= steps; ++s) {
    trace.logits.push_back(row);
    trace.tokens.push_back(argmax(row.data(), vocab));
    if (s == steps) break;
    engine.forward(0, &trace.tokens.back(), 1, pos++, row.data(), 0);
  }
  return trace;
}

class ForwardBatch : public ::testing::TestWithParam<std::string> {};

TEST_P(ForwardBatch, EachSequenceAsAlone) {
  auto model = Model::load(testing::shared_path("models/stories260K.bin"));
  const int32_t vocab = model->config().vocab_size;
  EngineOptions options;
  options.cache_mode = GetParam();
  options.max_tokens = 320;
  const int32_t steps = 6;
  // Lengths across the 128-token block: short, just over one block, nearly two.
  const std::vector<std::vector<int32_t>> prompts = {
      prompt_of(150, 1, vocab), prompt_of(40, 2, vocab), prompt_of(230, 3, vocab)};
  std::vector<Trace> alone;
  for (const auto& p : prompts) alone.push_back(run_alone(*model, options, p, steps));

  EngineOptions batched_options = options;
  batched_options.sequences = 3;
  TransformerEngine engine(*model, batched_options);
  // Sequence 2 starts two steps late and prefills in two chunks ([0, 128),
  // [128, 230)) while the others decode.
  std::vector<Trace> batched(3);
  std::vector<int32_t> position(3, 0), fed(3, -1);
  std::vector<float> logits(static_cast<size_t>(3) * vocab);
  for (int step = 0;; ++step) {
    std::vector<Segment> segments;
    std::vector<int32_t> owners;
    for (int32_t s = 0; s < 3; ++s) {
      const auto& p = prompts[static_cast<size_t>(s)];
      Segment seg;
      seg.seq = s;
      seg.pos0 = position[s];
      seg.wants_logits = true;
      if (position[s] < static_cast<int32_t>(p.size())) {
        if (s == 2 && step < 2) continue;
        const int32_t end = (s == 2 && position[s] == 0) ? 128 : static_cast<int32_t>(p.size());
        seg.tokens = p.data() + position[s];
        seg.n = end - position[s];
        seg.wants_logits = end == static_cast<int32_t>(p.size());
      } else {
        if (static_cast<int32_t>(batched[s].tokens.size()) > steps) continue;
        seg.tokens = &batched[s].tokens.back();
        seg.n = 1;
      }
      segments.push_back(seg);
      owners.push_back(s);
    }
    if (segments.empty()) break;
    engine.forward_batch(segments, logits.data());
    size_t scored = 0;
    for (size_t i = 0; i < segments.size(); ++i) {
      const int32_t s = owners[i];
      position[s] += segments[i].n;
      if (!segments[i].wants_logits) continue;
      const float* row = logits.data() + scored++ * vocab;
      batched[s].logits.emplace_back(row, row + vocab);
      batched[s].tokens.push_back(argmax(row, vocab));
    }
  }
  for (int32_t s = 0; s < 3; ++s) {
    ASSERT_EQ(batched[s].tokens, alone[s].tokens) << "sequence " << s;
    for (size_t t = 0; t < alone[s].logits.size(); ++t) {
      float worst = 0;
      for (int32_t v = 0; v < vocab; ++v)
        worst = std::max(worst, std::abs(batched[s].logits[t][v] - alone[s].logits[t][v]));
      EXPECT_EQ(worst, 0.0f) << "sequence " << s << " step " << t;
    }
  }
  // Releasing gives every block back.
  for (int32_t s = 0; s < 3; ++s) engine.release(s);
  EXPECT_EQ(engine.cache_bytes_in_use(), 0u);
}

INSTANTIATE_TEST_SUITE_P(EveryMode, ForwardBatch, ::testing::ValuesIn(testing::table_mode_names()),
                         testing::mode_test_name);

TEST(ForwardBatchInput, RefusesBadSegments) {
  auto model = Model::load(testing::shared_path("models/stories260K.bin"));
  EngineOptions options;
  options.max_tokens = 64;
  options.sequences = 2;
  TransformerEngine engine(*model, options);
  const std::vector<int32_t> tokens = {1, 2, 3};
  Segment a{0, 0, tokens.data(), 3, true};
  EXPECT_THROW(engine.forward_batch({a, a}, nullptr), Error);  // a sequence twice
  Segment gap{1, 5, tokens.data(), 3, false};                  // starts past its length
  EXPECT_THROW(engine.forward_batch({gap}, nullptr), Error);
  Segment slot{7, 0, tokens.data(), 3, false};
  EXPECT_THROW(engine.forward_batch({slot}, nullptr), Error);
  const std::vector<int32_t> bad = {1, -4};
  Segment token{0, 0, bad.data(), 2, false};
  EXPECT_THROW(engine.forward_batch({token}, nullptr), Error);
  EXPECT_EQ(engine.length(0), 0);
}

}  // namespace
}  // namespace xq
