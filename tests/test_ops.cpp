// CPU ops and the sampler against plain formulas written here.
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <map>
#include <random>
#include <vector>

#include "kernels/cpu/attention.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/small_gemm.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/error.h"
#include "runtime/sampler.h"

namespace xq {
namespace {

std::vector<float> random_values(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

TEST(Ops, RopeBothLayoutsMatchTheRotationFormula) {
  const int heads = 3, head_dim = 16, rope_dim = 12, rows = 5;
  const float theta = 10000.0f;
  std::vector<float> table(64 * rope_dim);
  cpu::rope_table(table.data(), 64, rope_dim, theta);
  std::vector<int32_t> positions = {0, 1, 7, 33, 63};
  for (RopeLayout layout : {RopeLayout::kInterleaved, RopeLayout::kNeox}) {
    std::vector<float> x = random_values(rows * heads * head_dim, 1), expected = x;
    for (int r = 0; r < rows; ++r) {
      for (int h = 0; h < heads; ++h) {
        float* e = &expected[(r * heads + h) * head_dim];
        for (int i = 0; i < rope_dim / 2; ++i) {
          double angle = positions[r] * std::pow(double(theta), -2.0 * i / rope_dim);
          int a = layout == RopeLayout::kInterleaved ? 2 * i : i;
          int b = layout == RopeLayout::kInterleaved ? 2 * i + 1 : i + rope_dim / 2;
          double xa = e[a], xb = e[b];
          e[a] = float(xa * std::cos(angle) - xb * std::sin(angle));
          e[b] = float(xa * std::sin(angle) + xb * std::cos(angle));
        }
      }
    }
    cpu::rope(x.data(), positions.data(), rows, heads, head_dim, rope_dim, layout, table.data());
    for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(x[i], expected[i], 1e-5f) << "element " << i;
  }
}

TEST(Ops, SoftmaxMatchesDoublePrecisionAndReturnsLogSumExp) {
  for (int n : {1, 7, 8, 9, 100, 1027}) {
    std::vector<float> x = random_values(n, n, 5.0f);
    x[0] = -200.0f;  // far below the max: its exp underflows to zero
    double max_value = -1e30, sum = 0;
    for (float v : x) max_value = std::max(max_value, double(v));
    for (float v : x) sum += std::exp(v - max_value);
    std::vector<float> y = x;
    float lse = cpu::softmax(y.data(), n);
    EXPECT_NEAR(lse, std::log(sum) + max_value, 1e-4);
    for (int i = 0; i < n; ++i)
      EXPECT_NEAR(y[i], std::exp(x[i] - max_value) / sum, 1e-6) << "n " << n << " i " << i;
  }
}

// Attention over tokens split into blocks, absorbed block by block and merged
// across two holders in any order, equals one softmax-weighted sum in double
// precision over all the tokens.
TEST(PartialAttention, BlocksAndMergesEqualOneSoftmaxOverAllTokens) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  const int64_t rows = 3, width = 5, tokens = 97;
  std::vector<float> scores(rows * tokens), values(tokens * width);
  for (float& s : scores) s = normal(rng);
  scores[5] = 60.0f;  // one dominant score: the rescaling must not overflow
  for (float& v : values) v = normal(rng);
  // Holder A sees tokens [0, 40) in blocks of 16, B sees [40, 97) in blocks of 16.
  auto absorb_range = [&](cpu::PartialAttention& state, int64_t begin, int64_t end) {
    for (int64_t t0 = begin; t0 < end; t0 += 16) {
      const int64_t count = std::min<int64_t>(16, end - t0);
      for (int64_t r = 0; r < rows; ++r) {
        std::vector<float> block(scores.begin() + r * tokens + t0,
                                 scores.begin() + r * tokens + t0 + count);
        cpu::absorb_scores(state, r, block.data(), count);
        for (int64_t t = 0; t < count; ++t)
          for (int64_t c = 0; c < width; ++c)
            state.acc[r * width + c] += block[t] * values[(t0 + t) * width + c];
      }
    }
  };
  for (bool a_first : {true, false}) {
    cpu::PartialAttention a, b, empty;
    a.reset(rows, width);
    b.reset(rows, width);
    empty.reset(rows, width);
    absorb_range(a, 0, 40);
    absorb_range(b, 40, tokens);
    cpu::PartialAttention& into = a_first ? a : b;
    cpu::merge_partial_attention(into, a_first ? b : a);
    cpu::merge_partial_attention(into, empty);  // a holder with no tokens changes nothing
    for (int64_t r = 0; r < rows; ++r) {
      double top = -1e30, sum = 0;
      for (int64_t t = 0; t < tokens; ++t) top = std::max<double>(top, scores[r * tokens + t]);
      std::vector<double> expected(width, 0.0);
      for (int64_t t = 0; t < tokens; ++t) {
        double p = std::exp(scores[r * tokens + t] - top);
        sum += p;
        for (int64_t c = 0; c < width; ++c) expected[c] += p * values[t * width + c];
      }
      for (int64_t c = 0; c < width; ++c)
        EXPECT_NEAR(into.acc[r * width + c] / into.sum[r], expected[c] / sum, 1e-5)
            << "row " << r << " channel " << c;
    }
  }
  cpu::PartialAttention wrong;
  wrong.reset(rows, width + 1);
  cpu::PartialAttention right;
  right.reset(rows, width);
  EXPECT_THROW(cpu::merge_partial_attention(right, wrong), std::invalid_argument);
}

// The rest of the state's primitive on the same kind of split: normalize gives
// the softmax-weighted mean and log_sum_exp the natural-log log-sum-exp of all
// the scores, both against double precision; a row that saw nothing has
// log-sum-exp -inf. Tolerance: float sums of ~100 terms of size ~1 (about
// 1e-6 relative), bounded at 1e-5.
TEST(PartialAttention, NormalizeAndLogSumExpMatchDoublePrecision) {
  std::mt19937 rng(9);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  const int64_t rows = 4, width = 6, tokens = 100;
  std::vector<float> scores(rows * tokens), values(tokens * width);
  for (float& v : scores) v = normal(rng);
  for (float& v : values) v = normal(rng);
  cpu::PartialAttention state;
  state.reset(rows + 1, width);  // the last row sees nothing
  for (int64_t t0 = 0; t0 < tokens; t0 += 32) {
    const int64_t count = std::min<int64_t>(32, tokens - t0);
    for (int64_t r = 0; r < rows; ++r) {
      std::vector<float> block(scores.begin() + r * tokens + t0,
                               scores.begin() + r * tokens + t0 + count);
      cpu::absorb_scores(state, r, block.data(), count);
      for (int64_t t = 0; t < count; ++t)
        for (int64_t c = 0; c < width; ++c)
          state.acc[r * width + c] += block[t] * values[(t0 + t) * width + c];
    }
  }
  std::vector<float> out(rows * width);
  cpu::normalize_attention(state, 0, rows, out.data());
  std::vector<float> last_two(2 * width);
  cpu::normalize_attention(state, rows - 2, 2, last_two.data());  // a range from the middle
  for (int64_t r = 0; r < rows; ++r) {
    double sum = 0;
    std::vector<double> mean(width, 0.0);
    for (int64_t t = 0; t < tokens; ++t) {
      const double p = std::exp(static_cast<double>(scores[r * tokens + t]));
      sum += p;
      for (int64_t c = 0; c < width; ++c) mean[c] += p * values[t * width + c];
    }
    EXPECT_NEAR(cpu::log_sum_exp(state, r), std::log(sum), 1e-5 * std::abs(std::log(sum)) + 1e-6)
        << "row " << r;
    for (int64_t c = 0; c < width; ++c)
      EXPECT_NEAR(out[r * width + c], mean[c] / sum, 1e-5) << "row " << r << " channel " << c;
  }
  for (int64_t i = 0; i < 2 * width; ++i) EXPECT_EQ(last_two[i], out[(rows - 2) * width + i]);
  EXPECT_EQ(cpu::log_sum_exp(state, rows), -INFINITY);
}

// The decode block walk (absorb_block through attend_in_blocks, on threads)
// against attention written out in double, with a causal limit per query, a
// block size that leaves a tail, and both ways of feeding values: each query
// head mixing its KV head's slice of V (jobs of one KV head, as the fp16
// cache runs them) and every head mixing whole shared rows (jobs of all KV
// heads, as the quantized caches run them before projecting). Tolerance as
// above: float sums over ~150 terms, 1e-5 relative to the largest value.
TEST(DecodeBlockWalk, MatchesAttentionInDoublePrecision) {
  const int32_t heads = 6, kv_heads = 2, hd = 8, tokens = 150, n = 3, block_tokens = 64;
  const int32_t group = heads / kv_heads, row_width = 20;  // shared rows wider than a head
  std::vector<float> q = random_values(static_cast<size_t>(n) * heads * hd, 21);
  std::vector<float> keys = random_values(static_cast<size_t>(tokens) * kv_heads * hd, 22);
  std::vector<float> values = random_values(static_cast<size_t>(tokens) * kv_heads * hd, 23);
  std::vector<float> rows = random_values(static_cast<size_t>(tokens) * row_width, 24);
  std::vector<int32_t> visible_end = {tokens - 40, tokens - 1, tokens};  // query i's causal limit
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  cpu::DecodeQueries queries;
  queries.q = q.data();
  queries.n = n;
  queries.heads = heads;
  queries.kv_heads = kv_heads;
  queries.head_dim = hd;
  queries.scale = scale;
  queries.visible_end = visible_end.data();
  const int64_t blocks = (tokens + block_tokens - 1) / block_tokens;
  float largest = 0;  // the outputs are weighted means: no larger than this
  for (const auto* v : {&values, &rows})
    for (float x : *v) largest = std::max(largest, std::abs(x));
  cpu::set_thread_count(2);
  for (bool shared : {false, true}) {
    const int64_t width = shared ? row_width : hd;
    const int64_t jobs = shared ? blocks : kv_heads * blocks;
    cpu::PartialAttention state;
    cpu::attend_in_blocks(jobs, static_cast<int64_t>(n) * heads, width, state,
                          [&](int64_t job, cpu::PartialAttention& mine) {
                            std::vector<float> scores(static_cast<size_t>(heads) * block_tokens);
                            cpu::CachedBlock block;
                            block.first_token = static_cast<int32_t>(job % blocks) * block_tokens;
                            block.tokens = std::min(block_tokens, tokens - block.first_token);
                            block.first_kv_head = shared ? 0 : static_cast<int32_t>(job / blocks);
                            block.kv_heads = shared ? kv_heads : 1;
                            block.key_stride = kv_heads * hd;
                            block.keys = keys.data() + block.first_token * block.key_stride +
                                         block.first_kv_head * hd;
                            block.values_shared = shared;
                            block.value_stride = shared ? row_width : kv_heads * hd;
                            block.values = (shared ? rows.data() : values.data()) +
                                           block.first_token * block.value_stride +
                                           (shared ? 0 : block.first_kv_head * hd);
                            cpu::absorb_block(mine, queries, block, scores.data(), block_tokens);
                          });
    std::vector<float> out(static_cast<size_t>(n) * heads * width);
    cpu::normalize_attention(state, 0, state.rows, out.data());
    for (int32_t i = 0; i < n; ++i)
      for (int32_t h = 0; h < heads; ++h) {
        const int32_t g = h / group;
        std::vector<double> p(visible_end[i]);
        double top = -1e300, sum = 0;
        for (int32_t t = 0; t < visible_end[i]; ++t) {
          double dot = 0;
          for (int32_t c = 0; c < hd; ++c)
            dot += static_cast<double>(q[(i * heads + h) * hd + c]) *
                   keys[(t * kv_heads + g) * hd + c];
          p[t] = dot * scale;
          top = std::max(top, p[t]);
        }
        for (double& v : p) sum += (v = std::exp(v - top));
        for (int64_t c = 0; c < width; ++c) {
          double want = 0;
          for (int32_t t = 0; t < visible_end[i]; ++t)
            want += p[t] * (shared ? rows[t * row_width + c] : values[(t * kv_heads + g) * hd + c]);
          EXPECT_NEAR(out[(i * heads + h) * width + c], want / sum, 1e-5 * largest)
              << (shared ? "shared rows" : "per-head values") << ", query " << i << " head " << h
              << " channel " << c;
        }
      }
  }
  cpu::set_thread_count(1);
}

// The decode-attention kernels against plain loops in double, over shapes that
// hit every tile height (1-6 rows), a column tail (n not a multiple of 16),
// strided operands, and accumulation into C.
TEST(SmallGemm, MatchesPlainLoopsForEveryTileShape) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  for (int64_t m : {1, 2, 3, 4, 5, 6, 7, 9, 13})
    for (int64_t n : {16, 40, 64, 7})
      for (bool accumulate : {false, true}) {
        const int64_t k = 37, lda = k + 3, ldb = n + 5, ldc = n + 2;
        std::vector<float> a(m * lda), b(k * ldb), c(m * ldc);
        for (float& v : a) v = uniform(rng);
        for (float& v : b) v = uniform(rng);
        for (float& v : c) v = uniform(rng);
        std::vector<float> before = c;
        cpu::gemm_small(m, n, k, a.data(), lda, b.data(), ldb, c.data(), ldc, accumulate);
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = 0; j < ldc; ++j) {
            if (j >= n) {  // padding between rows is untouched
              EXPECT_EQ(c[i * ldc + j], before[i * ldc + j]);
              continue;
            }
            double want = accumulate ? before[i * ldc + j] : 0.0;
            for (int64_t p = 0; p < k; ++p) want += double(a[i * lda + p]) * b[p * ldb + j];
            EXPECT_NEAR(c[i * ldc + j], want, 1e-4) << m << "x" << n << " at " << i << "," << j;
          }
      }
}

TEST(SmallGemm, ScoresAgainstRowsMatchPlainDots) {
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  for (int64_t n : {64, 24, 5})
    for (int64_t count : {1, 8, 21, 64}) {
      const int64_t rows = 3, ldq = n + 1, ldk = 3 * n, ldo = 70;
      std::vector<float> q(rows * ldq), keys(count * ldk), out(rows * ldo, -7.0f);
      for (float& v : q) v = uniform(rng);
      for (float& v : keys) v = uniform(rng);
      cpu::scores_against_rows(rows, n, q.data(), ldq, count, keys.data() + n, ldk, 0.125f,
                               out.data(), ldo);
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t t = 0; t < count; ++t) {
          double want = 0;
          for (int64_t i = 0; i < n; ++i) want += double(q[r * ldq + i]) * keys[t * ldk + n + i];
          EXPECT_NEAR(out[r * ldo + t], 0.125 * want, 1e-5) << n << " " << count << " " << r;
        }
        EXPECT_EQ(out[r * ldo + count], -7.0f);  // nothing written past count
      }
    }
}

TEST(Ops, RmsnormMatchesFormula) {
  const int rows = 33, dim = 96;
  std::vector<float> x = random_values(rows * dim, 3), gamma = random_values(dim, 4),
                     out(rows * dim);
  cpu::set_thread_count(2);
  cpu::rmsnorm(x.data(), gamma.data(), out.data(), rows, dim, 1e-5f);
  for (int r = 0; r < rows; ++r) {
    double ss = 0;
    for (int i = 0; i < dim; ++i) ss += double(x[r * dim + i]) * x[r * dim + i];
    double scale = 1.0 / std::sqrt(ss / dim + 1e-5);
    for (int i = 0; i < dim; ++i)
      EXPECT_NEAR(out[r * dim + i], x[r * dim + i] * scale * gamma[i], 1e-5);
  }
}

TEST(Ops, Fp16DotAndAxpyMatchWidenedMath) {
  for (int n : {1, 8, 15, 16, 64, 100}) {
    std::vector<float> x = random_values(n, n), y = random_values(n, n + 100),
                       acc = random_values(n, 7);
    std::vector<uint16_t> y16(n);
    cpu::fp32_to_fp16_row(y.data(), y16.data(), n);
    std::vector<float> y_back(n);
    cpu::fp16_to_fp32_row(y16.data(), y_back.data(), n);
    double dot = 0;
    for (int i = 0; i < n; ++i) dot += double(x[i]) * y_back[i];
    EXPECT_NEAR(cpu::dot_fp16(x.data(), y16.data(), n), dot, 1e-4);
    std::vector<float> expected = acc;
    for (int i = 0; i < n; ++i) expected[i] += 0.75f * y_back[i];
    cpu::axpy_fp16(0.75f, y16.data(), acc.data(), n);
    for (int i = 0; i < n; ++i) EXPECT_NEAR(acc[i], expected[i], 1e-5);
  }
}

TEST(ThreadPool, CoversEveryIndexExactlyOnce) {
  for (int threads : {1, 2, 3}) {
    cpu::set_thread_count(threads);
    for (int64_t n : {0, 1, 2, 5, 64, 1001}) {
      std::vector<std::atomic<int>> hits(n);
      for (int rep = 0; rep < 50; ++rep) {
        cpu::parallel_for(n, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) hits[i].fetch_add(1);
        });
      }
      for (int64_t i = 0; i < n; ++i)
        ASSERT_EQ(hits[i].load(), 50) << "threads " << threads << " n " << n;
    }
  }
  cpu::set_thread_count(1);
}

TEST(Sampler, GreedyTopKOneAndTinyTopPAllPickTheArgmax) {
  std::vector<float> logits = random_values(1000, 11);
  const int32_t best = argmax(logits.data(), 1000);
  Sampler greedy(SamplerOptions{});
  EXPECT_EQ(greedy.sample(logits.data(), 1000), best);
  SamplerOptions top_k_one{1.0f, 1, 1.0f, 5};
  Sampler sampler_k(top_k_one);
  SamplerOptions tiny_p{1.0f, 0, 1e-6f, 5};
  Sampler sampler_p(tiny_p);
  for (int i = 0; i < 20; ++i) {
    EXPECT_EQ(sampler_k.sample(logits.data(), 1000), best);
    EXPECT_EQ(sampler_p.sample(logits.data(), 1000), best);
  }
}

TEST(Sampler, FrequenciesFollowSoftmaxAtTemperatureAndSeedsRepeat) {
  std::vector<float> logits = {1.0f, 2.0f, 0.0f, -1.0f};
  const float temperature = 0.7f;
  SamplerOptions options{temperature, 0, 1.0f, 42};
  Sampler sampler(options), again(options);
  std::map<int32_t, int> counts;
  const int draws = 40000;
  for (int i = 0; i < draws; ++i) {
    int32_t a = sampler.sample(logits.data(), 4);
    EXPECT_EQ(a, again.sample(logits.data(), 4));
    counts[a]++;
  }
  double z = 0;
  for (float l : logits) z += std::exp(l / temperature);
  for (int32_t t = 0; t < 4; ++t) {
    double p = std::exp(logits[t] / temperature) / z;
    double sigma = std::sqrt(p * (1 - p) / draws);
    EXPECT_NEAR(double(counts[t]) / draws, p, 5 * sigma + 1e-4) << "token " << t;
  }
  // top-k 2 never picks the two least likely tokens.
  Sampler top2(SamplerOptions{temperature, 2, 1.0f, 1});
  for (int i = 0; i < 1000; ++i) {
    int32_t t = top2.sample(logits.data(), 4);
    EXPECT_TRUE(t == 0 || t == 1);
  }
}

TEST(Sampler, RejectsBadOptions) {
  EXPECT_THROW(Sampler(SamplerOptions{-1.0f, 0, 1.0f, 0}), Error);
  EXPECT_THROW(Sampler(SamplerOptions{1.0f, -3, 1.0f, 0}), Error);
  EXPECT_THROW(Sampler(SamplerOptions{1.0f, 0, 0.0f, 0}), Error);
}

}  // namespace
}  // namespace xq
