// Teacher-forced comparison of a parallel engine with the single-rank one:
// both are fed the same tokens (the reference's greedy choices), so each
// step's logits are comparable, and each step is held to a stated bound B on
// the largest |logit difference|. Argmaxes must agree only where the
// reference's top-1 minus top-2 exceeds 2 B: within the bound, a smaller
// margin can flip (each logit moves by at most B, so the gap by at most 2 B).
//
// Where the bounds come from (measured per run on the reference engine, so
// they follow whatever rounding this machine's kernels and OpenBLAS do):
// * E, the int8 activation noise floor: how far rounding every matmul input
//   to int8 moves the reference's logits, max over the steps of |logits(x
//   rounded as the int8 path rounds it) - logits(fp32 x)| on the same tokens
//   (cpu::MatmulPath::kFloatRoundedAsQ8, and for int8-path weights also kAuto,
//   against kFloat: two draws, the larger taken). Each 32-block of every
//   matmul input is rounded with scale max|x| / 127, an error of at most
//   max|x| / 254 per element, which the layers carry to the logits; E is what
//   that comes to (SmolLM2: 0.86-1.4; stories260K: 0.27-0.34).
// * fp32 activations (prefill; decode with kFloat): a parallel engine sums
//   partial products in another order, a relative change of ~2^-24 that
//   reaches the logits only where it moves a cached K or V value across an
//   fp16 rounding boundary, by one fp16 ulp (at most 2^-10 of the value). That
//   is at most 254 / 1024 of the largest int8 rounding error of the same value
//   (max|x| / 254), so even if every cached value moved, the logits would
//   move by at most (254 / 1024) E to first order: kFp32Bound below.
// * int8 activations (decode of Q4_0/Q4_1/Q8_0... weights): any rounding-level
//   difference (another summation order) re-rounds the activations anew, so
//   the parallel engine's int8 noise is another draw of the one measured by E
//   (its column split keeps every 32-block and its scale). Step t's bound is
//   the reference's own int8 noise there (|int8 - fp32| on one rank) plus
//   kRedraws E for the parallel engine's, plus the fp32 bound.
// * a quantized cache (kivi, xquant) likewise: C, the largest |logits(mode)
//   - logits(fp16)| of the reference over the steps, is its rounding noise;
//   step t's bound is the reference's own there plus kRedraws C plus the
//   fp32 bound.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "kernels/cpu/matmul.h"
#include "runtime/engine.h"
#include "runtime/sampler.h"
#include "tests/mpi/mpi_test_env.h"

namespace xq::testing {

// One fp16 ulp (<= 2^-10 of a value) per int8 rounding error (<= 1/254 of
// the block's largest value): see above.
constexpr float kFp16UlpPerInt8Error = 254.0f / 1024.0f;
// How many times the reference's largest noise (over all steps) a parallel
// engine's own draw may reach at one step. The largest |int8 - fp32| over 17
// steps of SmolLM2, from independent draws of the same rounding (one rank's
// int8 path, its fp32-arithmetic emulation, tp 2, tp 4), spread by up to 1.6x
// per prompt (0.81-1.10 and 0.89-1.42); against E, the larger of the
// reference's two, the parallel engine's came to at most 1.12 E.
constexpr float kRedraws = 2.0f;

inline float fp32_bound(float int8_noise_floor) {
  return kFp16UlpPerInt8Error * int8_noise_floor;
}

inline float max_abs_diff(const float* a, const float* b, int64_t n) {
  float worst = 0;
  for (int64_t i = 0; i < n; ++i) worst = std::max(worst, std::abs(a[i] - b[i]));
  return worst;
}

// Largest difference per row of two (rows, vocab) tables.
inline std::vector<float> row_diffs(const std::vector<float>& a, const std::vector<float>& b,
                                    int32_t vocab) {
  std::vector<float> out(a.size() / static_cast<size_t>(vocab));
  for (size_t r = 0; r < out.size(); ++r)
    out[r] = max_abs_diff(&a[r * vocab], &b[r * vocab], vocab);
  return out;
}

inline float max_of(const std::vector<float>& values) {
  return values.empty() ? 0.0f : *std::max_element(values.begin(), values.end());
}

// Sets cpu::matmul's path for a scope (every rank must do the same).
class MatmulPathScope {
 public:
  explicit MatmulPathScope(cpu::MatmulPath path) : saved_(cpu::matmul_path()) {
    cpu::set_matmul_path(path);
  }
  ~MatmulPathScope() { cpu::set_matmul_path(saved_); }
  MatmulPathScope(const MatmulPathScope&) = delete;
  MatmulPathScope& operator=(const MatmulPathScope&) = delete;

 private:
  cpu::MatmulPath saved_;
};

// The logits after the prompt (tokens[0, n0)) and after each later token,
// (tokens.size() - n0 + 1, vocab): the prompt in one forward pass, then one
// token at a time (decode), all with cpu::matmul's `path`.
inline std::vector<float> forced_rows(Engine& engine, int32_t seq,
                                      const std::vector<int32_t>& tokens, int32_t n0, int32_t vocab,
                                      cpu::MatmulPath path) {
  MatmulPathScope scope(path);
  const int32_t n = static_cast<int32_t>(tokens.size());
  std::vector<float> rows(static_cast<size_t>(n - n0 + 1) * vocab);
  engine.forward(seq, tokens.data(), n0, 0, rows.data(), n0 - 1);
  for (int32_t p = n0; p < n; ++p)
    engine.forward(seq, &tokens[p], 1, p, &rows[static_cast<size_t>(p - n0 + 1) * vocab], 0);
  return rows;
}

// Steps of a teacher-forced run held to their bounds.
class LogitComparison {
 public:
  explicit LogitComparison(std::string what) : what_(std::move(what)) {}

  void add(int step, const float* reference, const float* ours, int32_t vocab, float bound) {
    const float diff = max_abs_diff(reference, ours, vocab);
    worst_ = std::max(worst_, diff);
    worst_ratio_ = std::max(worst_ratio_, bound > 0 ? diff / bound : INFINITY);
    char text[200];
    if (!(diff <= bound)) {
      std::snprintf(text, sizeof text, " step %d: difference %.4g > bound %.4g;", step, diff,
                    bound);
      fail(text);
    }
    const float margin = top2_margin(reference, vocab);
    if (margin <= 2 * bound) {
      ++unchecked_;
      return;
    }
    ++checked_;
    const int32_t want = argmax(reference, vocab), got = argmax(ours, vocab);
    if (want != got) {
      std::snprintf(text, sizeof text,
                    " step %d: argmax %d where the reference's is %d at margin %.4g > 2 x bound "
                    "%.4g;",
                    step, got, want, margin, bound);
      fail(text);
    }
  }
  // All rows of two (rows, vocab) tables under one bound.
  void add_rows(const std::vector<float>& reference, const std::vector<float>& ours, int32_t vocab,
                float bound) {
    for (size_t r = 0; r < reference.size() / static_cast<size_t>(vocab); ++r)
      add(static_cast<int>(r), &reference[r * vocab], &ours[r * vocab], vocab, bound);
  }

  ::testing::AssertionResult ok() const {
    if (failed_ == 0) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure()
           << what_ << ": " << failed_ << " failed check(s):" << failures_
           << (failed_ > kListed ? " ..." : "");
  }
  float worst() const { return worst_; }
  // Largest difference / bound: how much of the bound was used.
  float worst_ratio() const { return worst_ratio_; }
  int argmax_checked() const { return checked_; }
  std::string summary() const {
    char text[240];
    std::snprintf(text, sizeof text,
                  "%s: largest difference %.3g (%.0f%% of its bound), argmax compared at %d of %d "
                  "steps",
                  what_.c_str(), worst_, 100 * worst_ratio_, checked_, checked_ + unchecked_);
    return text;
  }

 private:
  static constexpr int kListed = 6;  // failures spelled out; the rest counted
  void fail(const char* text) {
    if (failed_++ < kListed) failures_ += text;
  }

  std::string what_, failures_;
  int failed_ = 0;
  float worst_ = 0, worst_ratio_ = 0;
  int checked_ = 0, unchecked_ = 0;
};

// The prompt followed by `steps` greedy tokens of the engine (default path):
// the tokens a comparison feeds both engines.
inline std::vector<int32_t> greedy_tokens(Engine& engine, int32_t seq, std::vector<int32_t> tokens,
                                          int steps) {
  const int32_t vocab = engine.model().config().vocab_size;
  std::vector<float> logits(vocab);
  const int32_t n0 = static_cast<int32_t>(tokens.size());
  engine.forward(seq, tokens.data(), n0, 0, logits.data(), n0 - 1);
  for (int s = 0; s < steps; ++s) {
    const int32_t next = argmax(logits.data(), vocab);
    engine.forward(seq, &next, 1, static_cast<int32_t>(tokens.size()), logits.data(), 0);
    tokens.push_back(next);
  }
  return tokens;
}

// The int8 noise floor E of the reference over forced tokens (all[0, n0) the
// prompt) from kFloatRoundedAsQ8 against kFloat, on sequences seq and seq + 1.
inline float int8_noise_floor(Engine& reference, int32_t seq, const std::vector<int32_t>& all,
                              int32_t n0) {
  const int32_t vocab = reference.model().config().vocab_size;
  const std::vector<float> fp32 =
      forced_rows(reference, seq, all, n0, vocab, cpu::MatmulPath::kFloat);
  const std::vector<float> q8 =
      forced_rows(reference, seq + 1, all, n0, vocab, cpu::MatmulPath::kFloatRoundedAsQ8);
  return max_of(row_diffs(q8, fp32, vocab));
}

inline void print_rank0(const std::string& line) {
  if (world_rank() != 0) return;
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
}

// A model whose decode takes the int8 path (SmolLM2 Q4_1) against the
// single-rank engine, teacher-forced from `prompt` for `steps` steps, run
// three ways on both engines: fp32 activations throughout (kFloat), x rounded
// as the int8 path rounds it in fp32 arithmetic (kFloatRoundedAsQ8), and as in
// production (kAuto); the reference's last two against its first are two draws
// of its int8 rounding noise, E the larger. Checked: the prefill of every row
// and the fp32 decode within the fp32 bound; the int8 decode within the
// reference's own int8 noise at the step plus kRedraws E plus the fp32 bound;
// the parallel engine's own int8 noise within kRedraws E. The reference runs
// on rank 0 alone and is broadcast (ranks may outnumber cores, and the fp32
// paths dequantize every weight). Prefill rows take the int8 path as decode
// does (one path for every row count), so each is held to the reference's own
// int8 noise at that row plus kRedraws E plus the fp32 bound. Both engines
// need 4 sequences and room for prompt + steps tokens.
inline void expect_int8_decode_within_bounds(Engine& reference, Engine& parallel,
                                             const std::vector<int32_t>& prompt, int steps,
                                             const std::string& what) {
  using cpu::MatmulPath;
  const int32_t vocab = reference.model().config().vocab_size;
  const int32_t n0 = static_cast<int32_t>(prompt.size());
  const bool root = world_rank() == 0;
  std::vector<int32_t> all(prompt.size() + static_cast<size_t>(steps));
  if (root) all = greedy_tokens(reference, 3, prompt, steps);
  broadcast_from_rank0(all);
  const int32_t n = static_cast<int32_t>(all.size());
  const size_t rows = static_cast<size_t>(steps + 1) * vocab;
  std::vector<float> ref_fp32(rows), ref_q8(rows), ref_int8(rows);
  std::vector<float> ref_rows(static_cast<size_t>(n) * vocab), ours_rows(ref_rows.size());
  std::vector<float> ref_rows_fp32(ref_rows.size());
  if (root) {
    ref_fp32 = forced_rows(reference, 0, all, n0, vocab, MatmulPath::kFloat);
    ref_q8 = forced_rows(reference, 1, all, n0, vocab, MatmulPath::kFloatRoundedAsQ8);
    ref_int8 = forced_rows(reference, 2, all, n0, vocab, MatmulPath::kAuto);
    // Prefill: every row of all n tokens in one pass, as in production and
    // with fp32 activations (the row's own int8 noise).
    reference.truncate(3, 0);
    reference.forward(3, all.data(), n, 0, ref_rows.data(), 0);
    MatmulPathScope fp32_activations(MatmulPath::kFloat);
    reference.truncate(3, 0);
    reference.forward(3, all.data(), n, 0, ref_rows_fp32.data(), 0);
  }
  for (std::vector<float>* v : {&ref_fp32, &ref_q8, &ref_int8, &ref_rows, &ref_rows_fp32})
    broadcast_from_rank0(*v);
  const std::vector<float> ours_fp32 = forced_rows(parallel, 0, all, n0, vocab, MatmulPath::kFloat);
  const std::vector<float> ours_int8 = forced_rows(parallel, 2, all, n0, vocab, MatmulPath::kAuto);
  parallel.forward(3, all.data(), n, 0, ours_rows.data(), 0);

  const std::vector<float> ref_noise = row_diffs(ref_int8, ref_fp32, vocab);
  const std::vector<float> our_noise = row_diffs(ours_int8, ours_fp32, vocab);
  const float floor = std::max(max_of(row_diffs(ref_q8, ref_fp32, vocab)), max_of(ref_noise));
  const float fp32 = fp32_bound(floor);

  LogitComparison prefill(what + " prefill");
  const std::vector<float> prefill_noise = row_diffs(ref_rows, ref_rows_fp32, vocab);
  for (size_t r = 0; r < prefill_noise.size(); ++r)
    prefill.add(static_cast<int>(r), &ref_rows[r * vocab], &ours_rows[r * vocab], vocab,
                prefill_noise[r] + kRedraws * floor + fp32);
  EXPECT_TRUE(prefill.ok());
  LogitComparison decode_fp32(what + " fp32 decode");
  decode_fp32.add_rows(ref_fp32, ours_fp32, vocab, fp32);
  EXPECT_TRUE(decode_fp32.ok());
  LogitComparison decode_int8(what + " int8 decode");
  for (size_t s = 0; s < ref_noise.size(); ++s) {
    decode_int8.add(static_cast<int>(s), &ref_int8[s * vocab], &ours_int8[s * vocab], vocab,
                    ref_noise[s] + kRedraws * floor + fp32);
    EXPECT_LE(our_noise[s], kRedraws * floor)
        << what << " step " << s << ": the parallel engine's own int8 noise |int8 - fp32 decode|";
  }
  EXPECT_TRUE(decode_int8.ok());
  const std::vector<float> last(ours_int8.end() - vocab, ours_int8.end());
  EXPECT_TRUE(same_as_rank0(last)) << what << ": logits differ from rank 0's";
  char line[240];
  std::snprintf(line, sizeof line,
                "%s: int8 noise floor E %.3g (fp32 bound %.3g); largest |int8 - fp32|: one rank "
                "%.3g, parallel %.3g",
                what.c_str(), floor, fp32, max_of(ref_noise), max_of(our_noise));
  print_rank0(line);
  print_rank0(prefill.summary());
  print_rank0(decode_fp32.summary());
  print_rank0(decode_int8.summary());
}

}  // namespace xq::testing
