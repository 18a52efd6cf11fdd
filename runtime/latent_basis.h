// The SVD bases behind the latent cache streams (runtime/cache_mode.h). On GQA
// models K+V (2 kv_dim values a token) is narrower than X (dim), so xquant
// caches the latents X·Uk and X·Uv, with Wk = Uk Σk Bkᵀ (math shape d x kv,
// K = X Wk; likewise Wv), and rebuilds K = (X·Uk)·Σk Bkᵀ; XQuant-CL codes its
// deltas in the latent of [Wk | Wv]. The bases depend on the weights only and
// are computed once per layer when a cache is made (LAPACK dgesdd, in double).
#pragma once

#include <cstdint>

#include "kernels/cpu/aligned_vector.h"
#include "runtime/model.h"

namespace xq {

// Row-major fp32 matrix whose rows are outputs: y = M x.
struct Projection {
  cpu::AlignedVector<float> values;
  int64_t rows = 0, cols = 0;
  WeightMatrix view() const;
};

// A weight matrix's rows widened to fp32, as stored (rows x cols).
cpu::AlignedVector<float> widen(const WeightMatrix& w);

// The xquant latents of one layer.
struct KeyValueLatentBasis {
  Projection encode_k, encode_v;  // X -> X·Uk, X·Uv: kv rows of d
  // Latent -> K before RoPE, V: kv rows of kv, or for K with rebuild_k_per_head
  // kv rows of head_dim (one head_dim x head_dim block per KV head, the
  // latent of each head from its own SVD). V's latent channels are weighted
  // (see key_value_latent_basis) and rebuild_v divides the weights out.
  Projection rebuild_k, rebuild_v;
  bool rebuild_k_per_head = false;
  // The latents from the layer's own K and V instead of X: X·U = (X W) B Σ⁻¹,
  // input-major (per-head blocks for K when rebuild_k_per_head). Empty where W
  // is too close to singular to divide by Σ: encode from X then.
  cpu::AlignedVector<float> latent_from_k, latent_from_v;
};

// K's latent from one SVD per KV head (k_latent_per_head) or one of all of Wk.
KeyValueLatentBasis key_value_latent_basis(const LayerWeights& weights, const ModelConfig& config,
                                           bool k_latent_per_head);

// XQuant-CL's latent of one layer: [Wk | Wv] (d x 2 kv) = U S Bᵀ.
struct CrossLayerLatentBasis {
  Projection encode;  // Uᵀ: 2 kv rows of d. Also the decoder, read input-major.
  Projection decode;  // U: d rows of 2 kv. Also the encoder, read input-major.
};

CrossLayerLatentBasis cross_layer_latent_basis(const LayerWeights& weights,
                                               const ModelConfig& config);

}  // namespace xq
