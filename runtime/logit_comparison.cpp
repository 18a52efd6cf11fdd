#include "runtime/logit_comparison.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "kernels/error.h"

namespace xq {
namespace {

constexpr char kMagic[8] = {'X', 'Q', 'L', 'O', 'G', 'I', 'T', '1'};
constexpr size_t kHeaderBytes = sizeof(kMagic) + 4 * sizeof(int32_t);

// Bytes of one scored row: the target's NLL, then either the log of the
// rest's mass, k ids and k log-probabilities, or vocab log-probabilities.
size_t row_bytes(const SavedLogitsHeader& h) {
  return h.top_k > 0 ? sizeof(float) * 2 + static_cast<size_t>(h.top_k) * 8
                     : sizeof(float) * (1 + static_cast<size_t>(h.vocab));
}

size_t chunk_bytes(const SavedLogitsHeader& h) {
  return sizeof(uint64_t) + row_bytes(h) * h.rows_per_chunk;
}

// FNV-1a over the chunk's token ids: enough to tell a different text, ctx or
// BOS setting from the saved one.
uint64_t hash_tokens(const int32_t* tokens, int32_t count) {
  uint64_t h = 1469598103934665603ull;
  for (int32_t i = 0; i < count; ++i) {
    uint32_t v = static_cast<uint32_t>(tokens[i]);
    for (int b = 0; b < 4; ++b, v >>= 8) h = (h ^ (v & 0xff)) * 1099511628211ull;
  }
  return h;
}

// The most likely token: the largest value, the lower id on ties.
int32_t top_token(const float* values, int32_t count) {
  int32_t best = 0;
  for (int32_t v = 1; v < count; ++v)
    if (values[v] > values[best]) best = v;
  return best;
}

// log of the mass outside the top k, summed directly (not 1 - sum of the
// top, which cancels to nothing when the top holds nearly all of it).
// `in_top_k` marks the top ids with 1 on entry.
float log_rest_mass(const float* logits, double log_normalizer, int32_t vocab,
                    const std::vector<uint8_t>& in_top_k) {
  double rest = 0;
  for (int32_t v = 0; v < vocab; ++v)
    if (!in_top_k[v]) rest += std::exp(static_cast<double>(logits[v]) - log_normalizer);
  return rest > 0 ? static_cast<float>(std::log(rest)) : -std::numeric_limits<float>::infinity();
}

// p * (log p - log q) with p = exp(log_p); 0 where p is 0.
double kl_term(float log_p, float log_q) {
  if (std::isinf(log_p) && log_p < 0) return 0;
  return std::exp(static_cast<double>(log_p)) *
         (static_cast<double>(log_p) - static_cast<double>(log_q));
}

}  // namespace

double kl_divergence_row(const int32_t* top_ids, const float* reference_log_probs,
                         float reference_log_rest, int32_t top_k, const float* logits,
                         double log_normalizer, int32_t vocab, std::vector<uint8_t>& scratch) {
  double kld = 0;
  if (top_k == 0) {
    for (int32_t v = 0; v < vocab; ++v)
      kld += kl_term(reference_log_probs[v], stored_log_probability(logits[v], log_normalizer));
    return kld;
  }
  for (int32_t i = 0; i < top_k; ++i) {
    scratch[top_ids[i]] = 1;
    kld +=
        kl_term(reference_log_probs[i], stored_log_probability(logits[top_ids[i]], log_normalizer));
  }
  kld += kl_term(reference_log_rest, log_rest_mass(logits, log_normalizer, vocab, scratch));
  for (int32_t i = 0; i < top_k; ++i) scratch[top_ids[i]] = 0;
  return kld;
}

SavedLogitsWriter::SavedLogitsWriter(const std::string& path, int32_t vocab, int32_t rows_per_chunk,
                                     int32_t top_k)
    : path_(path), out_(path, std::ios::binary | std::ios::trunc) {
  if (top_k < 0 || top_k > vocab)
    throw Error("--save-top-k must be between 0 (every logit) and the vocabulary's " +
                std::to_string(vocab) + ", got " + std::to_string(top_k));
  if (!out_) throw Error(path + ": cannot open for writing");
  header_ = {vocab, rows_per_chunk, top_k};
  const int32_t fields[4] = {vocab, rows_per_chunk, top_k, 0};
  out_.write(kMagic, sizeof(kMagic));
  out_.write(reinterpret_cast<const char*>(fields), sizeof(fields));
  order_.resize(vocab);
  in_top_k_.assign(vocab, 0);
  record_.resize(row_bytes(header_) / sizeof(float));
}

void SavedLogitsWriter::begin_chunk(int32_t, const int32_t* tokens, int32_t count) {
  const uint64_t h = hash_tokens(tokens, count);
  out_.write(reinterpret_cast<const char*>(&h), sizeof(h));
}

void SavedLogitsWriter::row(const float* logits, double log_normalizer, int32_t target) {
  const int32_t vocab = header_.vocab, k = header_.top_k;
  record_[0] = static_cast<float>(log_normalizer - logits[target]);
  if (k == 0) {
    for (int32_t v = 0; v < vocab; ++v)
      record_[1 + v] = stored_log_probability(logits[v], log_normalizer);
  } else {
    for (int32_t v = 0; v < vocab; ++v) order_[v] = v;
    std::partial_sort(order_.begin(), order_.begin() + k, order_.end(), [&](int32_t a, int32_t b) {
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    });
    for (int32_t i = 0; i < k; ++i) in_top_k_[order_[i]] = 1;
    record_[1] = log_rest_mass(logits, log_normalizer, vocab, in_top_k_);
    for (int32_t i = 0; i < k; ++i) in_top_k_[order_[i]] = 0;
    std::memcpy(&record_[2], order_.data(), sizeof(int32_t) * k);
    for (int32_t i = 0; i < k; ++i)
      record_[2 + k + i] = stored_log_probability(logits[order_[i]], log_normalizer);
  }
  out_.write(reinterpret_cast<const char*>(record_.data()), record_.size() * sizeof(float));
}

void SavedLogitsWriter::end_chunk() {
  if (!out_) throw Error(path_ + ": write failed (disk full?)");
}

void SavedLogitsWriter::close() {
  out_.close();
  if (!out_) throw Error(path_ + ": write failed (disk full?)");
}

KlDivergenceComparer::KlDivergenceComparer(const std::string& path, int32_t vocab,
                                           int32_t rows_per_chunk)
    : path_(path), in_(path, std::ios::binary) {
  if (!in_) throw Error(path + ": cannot open the saved logits");
  char magic[sizeof(kMagic)] = {};
  int32_t fields[4] = {};
  in_.read(magic, sizeof(magic));
  in_.read(reinterpret_cast<char*>(fields), sizeof(fields));
  if (!in_ || std::memcmp(magic, kMagic, sizeof(kMagic)) != 0)
    throw Error(path + ": not a saved-logits file (written by xq perplexity --save-logits)");
  header_ = {fields[0], fields[1], fields[2]};
  if (header_.vocab != vocab)
    throw Error(path + ": saved with a vocabulary of " + std::to_string(header_.vocab) +
                ", this model has " + std::to_string(vocab));
  if (header_.rows_per_chunk != rows_per_chunk)
    throw Error(path + ": saved with " + std::to_string(header_.rows_per_chunk) +
                " scored tokens per chunk, this run scores " + std::to_string(rows_per_chunk) +
                " (use the same --ctx and --score)");
  if (header_.top_k < 0 || header_.top_k > vocab || header_.rows_per_chunk < 1)
    throw Error(path + ": corrupt header");
  in_.seekg(0, std::ios::end);
  const auto size = static_cast<size_t>(in_.tellg());
  const size_t body = size - kHeaderBytes;
  if (body % chunk_bytes(header_) != 0)
    throw Error(path + ": truncated or corrupt (" + std::to_string(size) +
                " bytes is not a whole number of chunks)");
  saved_chunks_ = static_cast<int32_t>(body / chunk_bytes(header_));
  in_.seekg(static_cast<std::streamoff>(kHeaderBytes));
  record_.resize(row_bytes(header_) / sizeof(float));
  in_top_k_.assign(vocab, 0);
}

void KlDivergenceComparer::begin_chunk(int32_t chunk, const int32_t* tokens, int32_t count) {
  if (chunk >= saved_chunks_)
    throw Error(path_ + ": holds " + std::to_string(saved_chunks_) +
                " chunks; this run scores more (use --chunks " + std::to_string(saved_chunks_) +
                ")");
  uint64_t saved = 0;
  in_.read(reinterpret_cast<char*>(&saved), sizeof(saved));
  if (!in_) throw Error(path_ + ": read error");
  if (saved != hash_tokens(tokens, count))
    throw Error(path_ + ": chunk " + std::to_string(chunk) +
                " was saved from different tokens (same --file, --ctx and --bos?)");
  chunk_nll_run_ = chunk_nll_reference_ = 0;
  chunk_rows_ = 0;
}

void KlDivergenceComparer::row(const float* logits, double log_normalizer, int32_t target) {
  in_.read(reinterpret_cast<char*>(record_.data()), record_.size() * sizeof(float));
  if (!in_) throw Error(path_ + ": read error");
  const int32_t vocab = header_.vocab, k = header_.top_k;
  double kld = 0;
  int32_t reference_top = 0;
  if (k == 0) {
    kld = kl_divergence_row(nullptr, &record_[1], 0, 0, logits, log_normalizer, vocab, in_top_k_);
    reference_top = top_token(&record_[1], vocab);
  } else {
    const int32_t* ids = reinterpret_cast<const int32_t*>(&record_[2]);
    for (int32_t i = 0; i < k; ++i)
      if (ids[i] < 0 || ids[i] >= vocab) throw Error(path_ + ": corrupt token id in a row");
    kld = kl_divergence_row(ids, &record_[2 + k], record_[1], k, logits, log_normalizer, vocab,
                            in_top_k_);
    reference_top = ids[0];
  }
  kld_.push_back(kld);
  if (top_token(logits, vocab) == reference_top) ++top1_matches_;
  // Rounded as the writer rounds the reference's, so a run against itself differs by 0.
  const float nll = static_cast<float>(log_normalizer - logits[target]);
  chunk_nll_run_ += nll;
  chunk_nll_reference_ += record_[0];
  reference_nll_sum_ += record_[0];
  ++chunk_rows_;
}

void KlDivergenceComparer::end_chunk() {
  chunk_differences_.push_back((chunk_nll_run_ - chunk_nll_reference_) / chunk_rows_);
}

namespace {

// Mean and the standard error of the mean of `values`.
std::pair<double, double> mean_and_error(const std::vector<double>& values) {
  const double n = static_cast<double>(values.size());
  if (values.empty()) return {0, 0};
  double sum = 0;
  for (double v : values) sum += v;
  const double mean = sum / n;
  if (values.size() < 2) return {mean, 0};
  double squares = 0;
  for (double v : values) squares += (v - mean) * (v - mean);
  return {mean, std::sqrt(squares / (n - 1) / n)};
}

// The q-quantile of sorted values, linearly interpolated.
double quantile(const std::vector<double>& sorted, double q) {
  if (sorted.empty()) return 0;
  const double at = q * static_cast<double>(sorted.size() - 1);
  const size_t below = static_cast<size_t>(at);
  const size_t above = std::min(below + 1, sorted.size() - 1);
  return sorted[below] + (at - static_cast<double>(below)) * (sorted[above] - sorted[below]);
}

}  // namespace

KlDivergenceResult KlDivergenceComparer::result() const {
  KlDivergenceResult r;
  r.rows = static_cast<int64_t>(kld_.size());
  r.chunks = static_cast<int32_t>(chunk_differences_.size());
  if (r.rows == 0) return r;
  std::tie(r.mean, r.mean_standard_error) = mean_and_error(kld_);
  std::vector<double> sorted = kld_;
  std::sort(sorted.begin(), sorted.end());
  r.median = quantile(sorted, 0.5);
  r.p99 = quantile(sorted, 0.99);
  r.max = sorted.back();
  const double n = static_cast<double>(r.rows);
  r.top1_agreement = static_cast<double>(top1_matches_) / n;
  r.top1_standard_error = std::sqrt(r.top1_agreement * (1 - r.top1_agreement) / n);
  std::tie(r.nll_difference, r.nll_difference_standard_error) = mean_and_error(chunk_differences_);
  r.reference_perplexity = std::exp(reference_nll_sum_ / n);
  return r;
}

}  // namespace xq
