// The yardstick for quantized caches that perplexity alone is too blunt for
// (llama.cpp's --kl-divergence): one run (fp16) saves the next-token
// distribution of every scored position, and any later run on the same text
// is compared with it position by position:
//   * KL divergence KL(P_ref || P_run), with its mean's standard error, the
//     median and the 99th percentile;
//   * top-1 agreement: how often both runs' most likely token is the same;
//   * the paired NLL difference: per chunk, the run's mean negative
//     log-likelihood minus the reference's; its mean over chunks and that
//     mean's standard error. The text-dependent part of the NLL, which makes a
//     20-chunk perplexity uncertain by +/- 3%, is shared by both runs and
//     cancels here.
// Distributions may be saved whole or as their top k log-probabilities plus
// the log of the rest's mass. With top k, the KL divergence is that of the
// two distributions over k + 1 outcomes (the k tokens and "any other"),
// which by the data-processing inequality is at most the full one; the README
// reports how far apart they are on the real models.
#pragma once

#include <cstdint>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

namespace xq {

// Receives each scored position of a perplexity run (runtime/perplexity.h):
// the position's logits, their log-normalizer log(sum(exp(logits))), the
// token that follows; and the end of each chunk with its tokens.
class ScoredRowObserver {
 public:
  virtual ~ScoredRowObserver() = default;
  virtual void begin_chunk(int32_t chunk, const int32_t* tokens, int32_t count) = 0;
  virtual void row(const float* logits, double log_normalizer, int32_t target) = 0;
  virtual void end_chunk() = 0;
};

// What a saved-logits file holds about the run that wrote it.
struct SavedLogitsHeader {
  int32_t vocab = 0;
  int32_t rows_per_chunk = 0;  // scored positions per chunk
  int32_t top_k = 0;           // 0: the whole distribution
};

// Writes the reference: per chunk, a hash of its tokens, then per scored row
// the target's NLL and the distribution (float32 log-probabilities).
class SavedLogitsWriter : public ScoredRowObserver {
 public:
  // top_k = 0 saves every log-probability (vocab floats a row).
  SavedLogitsWriter(const std::string& path, int32_t vocab, int32_t rows_per_chunk, int32_t top_k);
  void begin_chunk(int32_t chunk, const int32_t* tokens, int32_t count) override;
  void row(const float* logits, double log_normalizer, int32_t target) override;
  void end_chunk() override;
  // Flushes and checks the file was written whole; throws xq::Error if not.
  void close();

 private:
  std::string path_;
  std::ofstream out_;
  SavedLogitsHeader header_;
  std::vector<int32_t> order_;
  std::vector<uint8_t> in_top_k_;
  std::vector<float> record_;
};

// Figures of one comparison (see the top of this file).
struct KlDivergenceResult {
  int64_t rows = 0;
  int32_t chunks = 0;
  double mean = 0, mean_standard_error = 0;
  double median = 0, p99 = 0, max = 0;
  double top1_agreement = 0, top1_standard_error = 0;  // fractions
  // Per-token NLL, run minus reference, paired by chunk.
  double nll_difference = 0, nll_difference_standard_error = 0;
  double reference_perplexity = 0;
};

// Reads a reference written by SavedLogitsWriter and compares a run's rows
// with it as they come. The run must score the same text the same way: each
// chunk's tokens are checked against the saved hash, and the run may stop
// early (fewer chunks) but not go beyond the saved ones.
class KlDivergenceComparer : public ScoredRowObserver {
 public:
  KlDivergenceComparer(const std::string& path, int32_t vocab, int32_t rows_per_chunk);
  void begin_chunk(int32_t chunk, const int32_t* tokens, int32_t count) override;
  void row(const float* logits, double log_normalizer, int32_t target) override;
  void end_chunk() override;
  KlDivergenceResult result() const;
  const SavedLogitsHeader& header() const { return header_; }

 private:
  std::string path_;
  std::ifstream in_;
  SavedLogitsHeader header_;
  int32_t saved_chunks_ = 0;
  std::vector<float> record_;
  std::vector<uint8_t> in_top_k_;
  std::vector<double> kld_;
  int64_t top1_matches_ = 0;
  double chunk_nll_run_ = 0, chunk_nll_reference_ = 0;
  int32_t chunk_rows_ = 0;
  std::vector<double> chunk_differences_;
  double reference_nll_sum_ = 0;
};

// The log-probability of a token as the files store it: float32 of
// logit - log_normalizer computed in double. Writer and comparer both round
// through here, so a run compared with itself gives exactly 0.
inline float stored_log_probability(float logit, double log_normalizer) {
  return static_cast<float>(static_cast<double>(logit) - log_normalizer);
}

// One position's KL divergence KL(P || Q) where P is saved as `top_k`
// (ids, log-probabilities) pairs plus the log of the remaining mass
// (top_k = 0: `reference_log_probs` holds all vocab log-probabilities, ids
// implicit), and Q is given by logits and their log-normalizer. `scratch`
// holds vocab zero bytes between calls.
double kl_divergence_row(const int32_t* top_ids, const float* reference_log_probs,
                         float reference_log_rest, int32_t top_k, const float* logits,
                         double log_normalizer, int32_t vocab, std::vector<uint8_t>& scratch);

}  // namespace xq
