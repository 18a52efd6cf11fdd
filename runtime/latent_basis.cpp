#include "runtime/latent_basis.h"

#include <cmath>
#include <string>
#include <vector>

#include "kernels/cpu/matmul.h"
#include "kernels/error.h"

extern "C" void dgesdd_(const char* jobz, const int* m, const int* n, double* a, const int* lda,
                        double* s, double* u, const int* ldu, double* vt, const int* ldvt,
                        double* work, const int* lwork, int* iwork, int* info);

namespace xq {
namespace {

// SVD of W (math shape d x kv: K = X W) = U S Bᵀ. The GGUF matrix (kv rows of
// d) is W in column-major order, so it goes to LAPACK as is. Encoder: rows of
// Uᵀ (kv x d); rebuild matrix: (S Bᵀ)ᵀ as rows (kv x kv).
// Also from_output (n x n, input-major): the latent from the layer's own
// output, X·U = (X W) V S⁻¹, so the engine's K (or V) is encoded with an
// n x n product instead of a d x n one. Left empty where W is so close to
// singular (s_min < 1e-4 s_max) that dividing by S would amplify noise.
void svd_projections(const WeightMatrix& w, cpu::AlignedVector<float>& encoder,
                     cpu::AlignedVector<float>& rebuild,
                     cpu::AlignedVector<float>* from_output = nullptr) {
  const int m = static_cast<int>(w.cols), n = static_cast<int>(w.rows);  // d, kv
  cpu::AlignedVector<float> wf = widen(w);
  std::vector<double> a(wf.begin(), wf.end()), s(n), u(static_cast<size_t>(m) * n),
      vt(static_cast<size_t>(n) * n);
  std::vector<int> iwork(8 * n);
  int lwork = -1, info = 0;
  double query = 0;
  dgesdd_("S", &m, &n, a.data(), &m, s.data(), u.data(), &m, vt.data(), &n, &query, &lwork,
          iwork.data(), &info);
  lwork = static_cast<int>(query);
  std::vector<double> work(lwork);
  dgesdd_("S", &m, &n, a.data(), &m, s.data(), u.data(), &m, vt.data(), &n, work.data(), &lwork,
          iwork.data(), &info);
  if (info != 0)
    throw Error("xquant: SVD of a key/value projection failed (LAPACK info " +
                std::to_string(info) + ")");
  encoder.assign(u.begin(), u.end());  // column j of U (contiguous in column-major) = encoder row j
  rebuild.resize(static_cast<size_t>(n) * n);
  for (int j = 0; j < n; ++j)
    for (int i = 0; i < n; ++i)
      rebuild[static_cast<size_t>(j) * n + i] = static_cast<float>(s[i] * vt[i + j * n]);
  if (!from_output) return;
  from_output->clear();
  if (s[n - 1] < 1e-4 * s[0]) return;  // LAPACK orders s descending
  from_output->resize(static_cast<size_t>(n) * n);
  for (int i = 0; i < n; ++i)    // input channel (of K or V)
    for (int j = 0; j < n; ++j)  // latent channel
      (*from_output)[static_cast<size_t>(i) * n + j] = static_cast<float>(vt[j + i * n] / s[j]);
}

// V's latent is quantized per token: every channel of a group gets the same
// step, while an error in latent channel j reaches V multiplied by s_j (the
// rebuild is S·Vᵀ). Channel j is stored times sqrt(s_j / s_0), and the
// rebuild matrix divides it out again: the channels V depends on most get
// finer steps without the top channels' range coarsening all the others.
// On SmolLM2 (ctx 1024, 20 chunks) this took xquant-3 from 21.14 to 20.70
// (README); weighting by s_j itself overshoots.
void weight_value_latent(KeyValueLatentBasis& basis, int64_t kv, int64_t d) {
  std::vector<double> norms(kv, 0.0);
  for (int64_t i = 0; i < kv; ++i)  // column j of the rebuild holds s_j times a unit vector
    for (int64_t j = 0; j < kv; ++j) {
      const double v = basis.rebuild_v.values[i * kv + j];
      norms[j] += v * v;
    }
  const double top = std::sqrt(norms[0]);
  for (int64_t j = 0; j < kv; ++j) {
    const double weight = std::sqrt(std::sqrt(norms[j]) / top);
    if (!(weight > 0)) continue;  // a zero singular value: the channel is always zero
    for (int64_t i = 0; i < kv; ++i) {
      basis.rebuild_v.values[i * kv + j] =
          static_cast<float>(basis.rebuild_v.values[i * kv + j] / weight);
      if (!basis.latent_from_v.empty())
        basis.latent_from_v[i * kv + j] =
            static_cast<float>(basis.latent_from_v[i * kv + j] * weight);
    }
    for (int64_t r = 0; r < d; ++r)
      basis.encode_v.values[j * d + r] =
          static_cast<float>(basis.encode_v.values[j * d + r] * weight);
  }
}

}  // namespace

WeightMatrix Projection::view() const {
  WeightMatrix m;
  m.type = TensorType::kF32;
  m.data = reinterpret_cast<const uint8_t*>(values.data());
  m.rows = rows;
  m.cols = cols;
  m.row_bytes = static_cast<size_t>(cols) * sizeof(float);
  return m;
}

cpu::AlignedVector<float> widen(const WeightMatrix& w) {
  cpu::AlignedVector<float> out(static_cast<size_t>(w.rows * w.cols));
  for (int64_t r = 0; r < w.rows; ++r) cpu::matrix_row_to_float(w, r, out.data() + r * w.cols);
  return out;
}

KeyValueLatentBasis key_value_latent_basis(const LayerWeights& w, const ModelConfig& config,
                                           bool k_latent_per_head) {
  KeyValueLatentBasis basis;
  const int64_t kv = config.kv_dim(), d = config.dim, hd = config.head_dim;
  if (k_latent_per_head) {
    basis.rebuild_k_per_head = true;
    for (int64_t g = 0; g < config.n_kv_heads; ++g) {
      WeightMatrix head = w.wk;
      head.data += static_cast<size_t>(g) * hd * w.wk.row_bytes;
      head.rows = hd;
      cpu::AlignedVector<float> encoder, rebuild, from_k;
      svd_projections(head, encoder, rebuild, &from_k);
      basis.encode_k.values.insert(basis.encode_k.values.end(), encoder.begin(), encoder.end());
      basis.rebuild_k.values.insert(basis.rebuild_k.values.end(), rebuild.begin(), rebuild.end());
      basis.latent_from_k.insert(basis.latent_from_k.end(), from_k.begin(), from_k.end());
    }
    basis.rebuild_k.cols = hd;
  } else {
    svd_projections(w.wk, basis.encode_k.values, basis.rebuild_k.values, &basis.latent_from_k);
    basis.rebuild_k.cols = kv;
  }
  svd_projections(w.wv, basis.encode_v.values, basis.rebuild_v.values, &basis.latent_from_v);
  weight_value_latent(basis, kv, d);
  // One ill-conditioned head (its block missing) sends every head back to X.
  if (basis.latent_from_k.size() != static_cast<size_t>(kv) * (k_latent_per_head ? hd : kv))
    basis.latent_from_k.clear();
  basis.encode_k.rows = basis.encode_v.rows = kv;
  basis.encode_k.cols = basis.encode_v.cols = d;
  basis.rebuild_k.rows = basis.rebuild_v.rows = kv;
  basis.rebuild_v.cols = kv;
  return basis;
}

// Deltas are coded as dX·U (2 kv values) and decoded as (dX·U)·Uᵀ, which
// leaves [K | V] exact for X in the span of U.
CrossLayerLatentBasis cross_layer_latent_basis(const LayerWeights& w, const ModelConfig& config) {
  const int64_t kv = config.kv_dim(), d = config.dim;
  // [Wk | Wv] in GGUF orientation: 2kv rows of d.
  cpu::AlignedVector<float> stacked = widen(w.wk);
  cpu::AlignedVector<float> wv = widen(w.wv);
  stacked.insert(stacked.end(), wv.begin(), wv.end());
  WeightMatrix both;
  both.type = TensorType::kF32;
  both.data = reinterpret_cast<const uint8_t*>(stacked.data());
  both.rows = 2 * kv;
  both.cols = d;
  both.row_bytes = static_cast<size_t>(d) * sizeof(float);
  CrossLayerLatentBasis basis;
  cpu::AlignedVector<float> unused;
  svd_projections(both, basis.encode.values, unused);
  basis.encode.rows = 2 * kv;
  basis.encode.cols = d;
  basis.decode.rows = d;
  basis.decode.cols = 2 * kv;
  basis.decode.values.resize(static_cast<size_t>(d) * 2 * kv);
  for (int64_t j = 0; j < 2 * kv; ++j)
    for (int64_t r = 0; r < d; ++r)
      basis.decode.values[r * 2 * kv + j] = basis.encode.values[j * d + r];
  return basis;
}

}  // namespace xq
