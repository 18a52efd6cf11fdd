// The resident CUDA engine (runtime/cuda_engine.h): TransformerEngine's
// layer loop (runtime/engine.cpp, with the Q/K/V half of
// runtime/attention_step.cpp) with every tensor on one device.
//
// Memory: the weights of this rank's shard and layers, their norms and the
// RoPE table sit in one device allocation made at construction. Activations
// live in one scratch allocation sized for the most rows a step has had; it
// grows (outside any capture) when a larger step comes, and every captured
// graph is dropped then, because graphs hold its addresses.
//
// A step: the host checks the segments (TransformerEngine's checks and
// messages, before any device work), writes the token ids, positions and the
// rows whose logits are wanted into a pinned buffer, copies them to fixed
// device buffers, lets the device cache upload its tables (begin_step), runs
// the embedding and the layers, hands blocks back (end_step), and only then
// runs the output head over the wanted rows and copies their logits out.
//
// Graphs: a decode step (every segment one token) whose shape has been seen
// before is captured once, embedding and layers, and replayed after;
// everything that changes between such steps is read from the device buffers
// above and the cache's tables. A shape is the row count and the cache's
// step_shape_key() (known once begin_step ran: the materialize path's dense
// rows, a few buckets of the context; 0 elsewhere). The first step of a shape
// runs kernel by kernel, which also makes every lazy initialization (module
// loading, cuBLAS state) happen outside a capture. Shapes are few (row counts
// up to the sequences, times the few buckets), and at most kMaxDecodeGraphs
// graphs are held, the least recently launched going first beyond that. The output head and
// sampling are outside the graph: their row count follows the segments that want logits. A capture
// the device refuses turns graphs off for the engine; that step runs kernel by kernel. A step whose
// device work fails still ends its cache step, each sequence cut back to what it held, so the
// engine stays usable.
//
// Tensor parallelism (a group of more than one, never captured in a graph):
// Wo and down outputs are summed across the group in place, as on the CPU.
// Attention splits as runtime/attention_step.cpp splits it. By KV head (fp16
// where the KV heads divide evenly): each rank uploads its query heads' rows
// of Wq and its KV heads' rows of Wk and Wv, and its device cache is an fp16
// cache of a local config of those heads (make_device_cache's ModelConfig
// overload; where this build's device caches lack it, the case is refused
// with a message). By sequence (elsewhere): every rank computes every head's
// Q, K, V; its device cache keeps its shard of the tokens; one all_gather of
// the online-softmax states per layer, merged on the device, each rank
// keeping its own heads. A communicator works on its own stream and returns
// when done, so the engine waits for its stream before each collective.
#include "runtime/cuda_engine.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <iterator>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "kernels/cpu/ops.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/dense_ops.h"
#include "kernels/cuda/device.h"
#include "kernels/error.h"
#include "runtime/block_pool.h"
#include "runtime/cache_mode.h"
#include "runtime/device_cache.h"
#include "runtime/sampler.h"

// The merge of sequence shards' attention states on the device comes with
// the device caches' kernels; where they are built in, tensor parallelism by
// sequence runs on the device.
#if __has_include("kernels/cuda/paged_attention.h")
#include "kernels/cuda/paged_attention.h"
#define XQ_DEVICE_SHARD_MERGE 1
#endif

namespace xq {
namespace {

// Every piece of the device allocations starts on 256 bytes: what
// cudaMalloc guarantees, so vector loads in any kernel stay aligned.
constexpr size_t kDeviceAlignment = 256;
// Decode graphs held at most. Decode shapes are few (a row count up to the
// sequences, times the cache's few step keys), so this bound only matters
// for many sequences over many context buckets; beyond it the least recently
// launched graph goes (it is captured again when its shape comes back).
constexpr size_t kMaxDecodeGraphs = 128;

size_t align_up(size_t bytes) {
  return (bytes + kDeviceAlignment - 1) / kDeviceAlignment * kDeviceAlignment;
}

struct DeviceLayer {
  const float* attn_norm = nullptr;
  const float* ffn_norm = nullptr;
  cuda::DeviceWeight wq, wk, wv, wo, w_gate, w_up, w_down;
};

// Makes `device` current before anything is created on it (a member
// initialized before the stream).
struct DeviceSelection {
  int index = 0;
  explicit DeviceSelection(int device) {
    std::string why_not;
    if (!cuda::device_available(&why_not)) throw Error("CUDA engine: no CUDA device: " + why_not);
    if (device < 0) {
      CUDA_CHECK(cudaGetDevice(&index));
    } else {
      const int count = cuda::device_count();
      if (device >= count)
        throw Error("CUDA engine: device " + std::to_string(device) + " is not one of the " +
                    std::to_string(count) + " CUDA device(s)");
      index = device;
    }
    cuda::set_device(index);
  }
};

// The cache settings of runtime/attention_step.cpp for the engine's options.
CacheOptions device_cache_options(const EngineOptions& options, int32_t max_tokens,
                                  const float* rope_cos_sin, Range layer_range) {
  CacheOptions c;
  c.mode = options.cache_mode;
  c.max_tokens = max_tokens;
  c.sequences = options.sequences;
  c.pool_bytes = options.cache_bytes;
  c.rope_cos_sin = rope_cos_sin;
  c.keep_outlier_channel = options.keep_outlier_channel;
  c.k_latent_per_head = options.k_latent_per_head;
  c.first_layer = static_cast<int32_t>(layer_range.begin);
  c.layers = static_cast<int32_t>(layer_range.count);
  c.cross_layer_restarts = options.cross_layer_restarts;
  return c;
}

// The device's sampling parameters for the sampler's next pick, consuming its
// generator as Sampler::sample would (Sampler::next_draw: one draw for a
// sampled row, none for a greedy one).
void device_sampling_row(Sampler& sampler, cuda::SamplingRow* row) {
  const SamplingDraw draw = sampler.next_draw();
  row->temperature = draw.temperature;
  row->top_k = draw.top_k;
  row->top_p = draw.top_p;
  row->uniform = draw.uniform;
}

// True where runtime/device_cache.h offers the device cache over one rank's
// KV heads: make_device_cache(const ModelConfig& local_config, ...). (A
// template, so that the engine builds against device caches with or without
// that overload.)
template <typename Config>
constexpr bool kHeadShardedDeviceCache = requires(const Config& local, const CacheOptions& options,
                                                  cuda::Stream& stream, cuda::Blas& blas) {
  make_device_cache(local, options, stream, blas);
};

// The device cache of this rank's KV heads: `local` is the model's config
// with n_layers, n_heads and n_kv_heads of this rank's part (as
// HeadShardedAttention builds it for the CPU cache).
template <typename Config>
std::unique_ptr<DeviceCache> make_head_sharded_cache(const Config& local,
                                                     const CacheOptions& options,
                                                     cuda::Stream& stream, cuda::Blas& blas) {
  if constexpr (kHeadShardedDeviceCache<Config>) {
    return make_device_cache(local, options, stream, blas);
  } else {
    static_cast<void>(local);
    static_cast<void>(stream);
    static_cast<void>(blas);
    throw Error("tensor parallelism by KV head (cache mode " + options.mode +
                ") on the CUDA backend needs a device cache over a rank's KV heads, not "
                "available yet");
  }
}

void check_device_type(const WeightMatrix& w, const char* what) {
  if (!cuda::device_supports(w.type))
    throw Error(std::string("CUDA engine: the ") + what + " is stored as " +
                tensor_type_name(w.type) +
                ", which the device does not read (F32, F16, Q4_0, Q4_1 and Q8_0 only)");
}

}  // namespace

struct CudaEngine::Impl {
  Impl(const Model& m, const EngineOptions& options, Communicator* group, Range layers, int device);

  // Throws xq::Error (and PoolExhausted) as TransformerEngine::check_batch,
  // prefixed by `what`; token ids are checked only where `need_tokens`.
  void check_segments(const std::vector<Segment>& segments, const char* what,
                      bool need_tokens) const;
  // Scratch for `rows` rows through the layers and `head_rows` through the
  // output head. Growing drops every graph (they hold the old addresses).
  void reserve(int32_t rows, int32_t head_rows);
  // Copies token ids (where given), positions and the wanted rows to the
  // device buffers the step's kernels read.
  void stage_inputs(const std::vector<Segment>& segments, const std::vector<int32_t>& wanted);
  std::vector<StepRows> step_rows(const std::vector<Segment>& segments) const;
  // Enqueues the embedding of the staged token ids into hidden_.
  void embed_rows(int32_t rows, float* hidden);
  // Enqueues every layer on hidden (rows, dim), the device cache's step begun.
  void layer_loop(float* hidden, int32_t rows);
  // Runs segments through embedding and layers into hidden_ (graph or not),
  // then the output head over the staged wanted rows into logits_.
  void run_step(const std::vector<Segment>& segments, const std::vector<int32_t>& wanted);
  // The device cache's step around `enqueue` (the step's device work). Where
  // enqueue throws, the step still ends and each segment's sequence keeps
  // what it held before the step (up to the segment's start, which the step
  // may have cut), so the engine stays usable; the error stands.
  template <typename Enqueue>
  void cache_step(const std::vector<Segment>& segments, Enqueue&& enqueue);
  // The output head of `rows` rows of `hidden` (device) into `logits` (device).
  void head_rows(const float* hidden, int32_t rows, float* logits);
  void all_reduce(float* data, size_t count);
  // attn = this rank's heads of the attention merged over the group's
  // sequence shards (normed, k, v, q of the layer in place).
  void sharded_attention(int32_t layer, int32_t rows);
  void copy_logits_out(int32_t rows, float* host_logits);
  // The sampled token of the head's first row (the last step's last row).
  SampledToken sample_last_row(const cuda::SamplingRow& row);

  const Model& model;
  const ModelConfig& config;
  SingleProcessCommunicator single_process;
  Communicator& comm;
  DeviceSelection selection;
  TpShard shard;
  Range layer_range;
  int32_t max_tokens = 0;
  bool holds_first = false, holds_last = false;
  std::string device_name;
  int compute_major = 0, compute_minor = 0;

  std::vector<float> rope_host;  // the caches' CacheOptions point here
  cuda::Stream stream;
  cuda::Blas blas{stream};
  cuda::DeviceMemory weights;
  size_t weight_bytes = 0;
  std::vector<DeviceLayer> layers;
  std::vector<cuda::DeviceWeight> all_weights;  // for the workspace size
  cuda::DeviceWeight embedding, output;
  const float* output_norm = nullptr;
  const float* rope = nullptr;
  std::unique_ptr<DeviceCache> cache;
  int64_t q_width = 0, kv_width = 0, ffn_width = 0;
  // Tensor parallelism by sequence: every head's Q over this rank's tokens,
  // the group's states merged, this rank's heads kept.
  bool sequence_sharded = false;
  // Tensor parallelism by KV head: this rank's heads' Q, K, V, its own cache.
  bool head_sharded = false;
  int64_t local_width = 0;  // this rank's heads * head_dim: the input of its Wo slice

  // Scratch: activations (rows, width) and the step's int32 inputs.
  int32_t rows_capacity = 0, head_capacity = 0;
  cuda::DeviceMemory activations, head_memory, workspace;
  size_t workspace_bytes = 0;
  float *hidden = nullptr, *normed = nullptr, *q = nullptr, *k = nullptr, *v = nullptr,
        *attn = nullptr, *proj = nullptr, *gate = nullptr, *up = nullptr;
  int32_t *tokens = nullptr, *positions = nullptr, *wanted_rows = nullptr;
  // Sequence sharding: the group's states (tp records of max, sum, acc), the
  // merged attention of every head, and which of its rows are this rank's.
  float *gathered = nullptr, *merged = nullptr;
  int32_t* own_head_rows = nullptr;
  float *head_in = nullptr, *head_normed = nullptr, *logits = nullptr;
  cuda::PinnedMemory staging;      // int32: tokens, positions, wanted
  cuda::PinnedMemory logits_host;  // (head rows, vocab)
  // Device sampling: one row's parameters in, its token and margin out.
  cuda::DeviceMemory sample_memory;
  size_t sample_workspace_bytes = 0;
  cuda::PinnedMemory sample_host;

  bool graphs_enabled = true;
  std::string graphs_refused;  // why the device refused a capture ("" if it never did)
  // A decode step's shape: its rows and the cache's step_shape_key().
  using StepShape = std::pair<int32_t, int64_t>;
  struct CapturedStep {
    std::unique_ptr<cuda::Graph> graph;
    int64_t last_launch = 0;  // the value of `launches` at its latest launch
  };
  std::map<StepShape, CapturedStep> graphs;
  std::set<StepShape> decode_shapes_seen;
  int64_t launches = 0;
  int64_t captures = 0, replays = 0;
};

CudaEngine::Impl::Impl(const Model& m, const EngineOptions& options, Communicator* group,
                       Range layers_wanted, int device)
    : model(m),
      config(m.config()),
      comm(group != nullptr ? *group : single_process),
      selection(device) {
  const ModelConfig& c = config;
  layer_range = layers_wanted.count == 0 ? Range{0, c.n_layers} : layers_wanted;
  if (layer_range.begin < 0 || layer_range.count < 1 || layer_range.end() > c.n_layers)
    throw Error("engine: layers [" + std::to_string(layer_range.begin) + ", " +
                std::to_string(layer_range.end()) + ") are not a non-empty part of the model's " +
                std::to_string(c.n_layers));
  holds_first = layer_range.begin == 0;
  holds_last = layer_range.end() == c.n_layers;
  shard = plan_shard(model, comm.size(), comm.rank());
  max_tokens = options.max_tokens > 0 ? options.max_tokens : c.max_seq_len;
  const cuda::DeviceInfo info = cuda::device_info(selection.index);
  device_name = info.name;
  compute_major = info.compute_major;
  compute_minor = info.compute_minor;

  // Tensor parallelism needs the attention split of runtime/attention_step.cpp
  // on the device: by KV head (a device cache over this rank's heads) or by
  // sequence (partial states merged across the group). Where the device half
  // of the split is missing, the group is refused here, before anything is
  // uploaded.
  if (comm.size() > 1) {
    const bool by_head = shards_by_head(find_cache_mode(options.cache_mode), c, comm.size());
    if (by_head) {
      if (!kHeadShardedDeviceCache<ModelConfig>)
        throw Error("tensor parallelism by KV head (cache mode " + options.cache_mode +
                    ") on the CUDA backend needs a device cache over a rank's KV heads, not "
                    "available yet");
      head_sharded = true;
    } else {
#if defined(XQ_DEVICE_SHARD_MERGE)
      sequence_sharded = true;
#else
      throw Error("tensor parallelism with cache mode " + options.cache_mode +
                  " on the CUDA backend needs sequence sharding, not available yet");
#endif
    }
  }

  // This rank's views of its layers; with a group of one, every head.
  std::vector<LayerShard> views;
  for (int64_t l = layer_range.begin; l < layer_range.end(); ++l) {
    const LayerWeights& full = model.layers()[static_cast<size_t>(l)];
    LayerShard view = shard_layer(full, c, shard);
    if (sequence_sharded) {
      // Every head's Q, K and V on every rank (replicated, no communication).
      view.wq = full.wq;
      view.wk = full.wk;
      view.wv = full.wv;
    }
    views.push_back(view);
  }
  for (const LayerShard& w : views) {
    for (const WeightMatrix* matrix : {&w.wq, &w.wk, &w.wv, &w.wo, &w.w_gate, &w.w_up, &w.w_down})
      check_device_type(*matrix, "layer weight");
  }
  if (holds_first) check_device_type(model.token_embedding(), "token embedding");
  if (holds_last) check_device_type(model.output(), "output head");
  const bool tied = holds_first && holds_last &&
                    model.output().data == model.token_embedding().data &&
                    model.output().type == model.token_embedding().type;

  rope_host.resize(static_cast<size_t>(max_tokens) * c.rope_dim);
  cpu::rope_table(rope_host.data(), max_tokens, c.rope_dim, c.rope_theta);

  // One allocation for everything read-only: first the sizes, then the copies.
  const size_t norm_bytes = align_up(static_cast<size_t>(c.dim) * sizeof(float));
  size_t total = align_up(rope_host.size() * sizeof(float));
  for (const LayerShard& w : views) {
    total += 2 * norm_bytes;
    for (const WeightMatrix* matrix : {&w.wq, &w.wk, &w.wv, &w.wo, &w.w_gate, &w.w_up, &w.w_down})
      total += align_up(cuda::device_weight_bytes(*matrix));
  }
  if (holds_first) total += align_up(cuda::device_weight_bytes(model.token_embedding()));
  if (holds_last) {
    total += norm_bytes;
    if (!tied) total += align_up(cuda::device_weight_bytes(model.output()));
  }
  weights = cuda::DeviceMemory(total);
  weight_bytes = total;
  uint8_t* next = weights.as<uint8_t>();
  auto place_floats = [&](const float* host, size_t count) {
    float* dst = reinterpret_cast<float*>(next);
    cuda::copy_to_device(dst, host, count * sizeof(float), stream);
    next += align_up(count * sizeof(float));
    return static_cast<const float*>(dst);
  };
  // `multiplied`: a matmul reads it, so the workspace must fit its product.
  auto place_weight = [&](const WeightMatrix& w, bool multiplied = true) {
    const cuda::DeviceWeight d = cuda::upload_weight(w, next, stream);
    next += align_up(cuda::device_weight_bytes(w));
    if (multiplied) all_weights.push_back(d);
    return d;
  };
  rope = place_floats(rope_host.data(), rope_host.size());
  for (const LayerShard& w : views) {
    DeviceLayer d;
    d.attn_norm = place_floats(w.attn_norm, static_cast<size_t>(c.dim));
    d.ffn_norm = place_floats(w.ffn_norm, static_cast<size_t>(c.dim));
    d.wq = place_weight(w.wq);
    d.wk = place_weight(w.wk);
    d.wv = place_weight(w.wv);
    d.wo = place_weight(w.wo);
    d.w_gate = place_weight(w.w_gate);
    d.w_up = place_weight(w.w_up);
    d.w_down = place_weight(w.w_down);
    layers.push_back(d);
  }
  if (holds_first) embedding = place_weight(model.token_embedding(), /*multiplied=*/tied);
  if (holds_last) {
    output_norm = place_floats(model.output_norm(), static_cast<size_t>(c.dim));
    output = tied ? embedding : place_weight(model.output());
  }
  stream.synchronize();  // the host copies above may be pageable: finish them here

  // Q of this rank's heads and K, V of the KV heads they read (every head
  // under sequence sharding; with a group of one, both are every head).
  local_width = shard.heads.count * c.head_dim;
  q_width = sequence_sharded ? c.q_dim() : local_width;
  kv_width = sequence_sharded ? c.kv_dim() : shard.kv_heads.count * c.head_dim;
  ffn_width = shard.ffn.count;
  CacheOptions cache_options =
      device_cache_options(options, max_tokens, rope_host.data(), layer_range);
  if (sequence_sharded) {
    cache_options.sequence_shards = comm.size();
    cache_options.sequence_shard = comm.rank();
  }
  if (head_sharded) {
    ModelConfig local = c;
    local.n_layers = static_cast<int32_t>(layer_range.count);
    local.n_heads = static_cast<int32_t>(shard.heads.count);
    local.n_kv_heads = static_cast<int32_t>(shard.kv_heads.count);
    cache = make_head_sharded_cache(local, cache_options, stream, blas);
  } else {
    cache = make_device_cache(model, cache_options, stream, blas);
  }
}

void CudaEngine::Impl::check_segments(const std::vector<Segment>& segments, const char* what,
                                      bool need_tokens) const {
  const std::string prefix = std::string(what) + ": ";
  std::vector<int32_t> seen;
  for (const Segment& s : segments) {
    if (s.seq < 0 || s.seq >= cache->sequences())
      throw Error(prefix + "sequence " + std::to_string(s.seq) + " is not a slot in [0, " +
                  std::to_string(cache->sequences()) + ")");
    if (std::find(seen.begin(), seen.end(), s.seq) != seen.end())
      throw Error(prefix + "sequence " + std::to_string(s.seq) + " appears twice in a step");
    seen.push_back(s.seq);
    if (s.n <= 0) throw Error(prefix + "a segment has no tokens");
    if (s.pos0 > cache->length(s.seq))
      throw Error(prefix + "sequence " + std::to_string(s.seq) + " holds " +
                  std::to_string(cache->length(s.seq)) + " tokens; a segment cannot start at " +
                  std::to_string(s.pos0));
    if (need_tokens) {
      if (s.tokens == nullptr) throw Error(prefix + "a segment has no token ids");
      check_forward_input(config, max_tokens, s.tokens, s.n, s.pos0);
    } else if (s.pos0 < 0 || s.pos0 + s.n > max_tokens) {
      throw Error("forward: positions [" + std::to_string(s.pos0) + ", " +
                  std::to_string(s.pos0 + s.n) + ") exceed the context of " +
                  std::to_string(max_tokens) + " tokens");
    }
  }
  // The blocks the step takes, against the free ones, before anything is
  // written: a step the pool cannot hold leaves every cache as it was.
  int64_t needed = 0;
  for (const Segment& s : segments) {
    const int32_t kept = std::min(s.pos0, cache->length(s.seq));
    needed +=
        std::max(0, cache->blocks_for_step(kept, s.pos0 + s.n) - cache->blocks_for_tokens(kept));
  }
  const int32_t free = cache->free_blocks();
  if (needed > free)
    throw PoolExhausted("cache pool: the step needs " + std::to_string(needed) + " more blocks; " +
                        std::to_string(free) + " are free");
}

void CudaEngine::Impl::reserve(int32_t rows, int32_t head_rows) {
  const ModelConfig& c = config;
  const bool grow_rows = rows > rows_capacity, grow_head = head_rows > head_capacity;
  if (!grow_rows && !grow_head) return;
  // Nothing may still read the old buffers, and no graph may keep their addresses.
  stream.synchronize();
  graphs.clear();
  if (grow_rows) {
    // Rounded up to 16 rows, so a batch that grows by a few sequences at a
    // time does not reallocate (and drop its graphs) at every step.
    rows_capacity = std::max(rows_capacity, (rows + 15) / 16 * 16);
    const size_t r = static_cast<size_t>(rows_capacity);
    // Under sequence sharding: tp records of rows * heads states (max, sum,
    // head_dim acc each), and the merged attention of every head.
    const size_t states = sequence_sharded ? r * c.n_heads : 0;
    const size_t floats[] = {
        r * c.dim,          r * c.dim,
        r * q_width,        r * kv_width,
        r * kv_width,       r * local_width,
        r * c.dim,          r * ffn_width,
        r * ffn_width,      static_cast<size_t>(comm.size()) * states * (c.head_dim + 2),
        states * c.head_dim};
    size_t bytes = 0;
    for (size_t f : floats) bytes += align_up(f * sizeof(float));
    bytes += 3 * align_up(r * sizeof(int32_t)) + align_up(r * shard.heads.count * sizeof(int32_t));
    activations = cuda::DeviceMemory();
    activations = cuda::DeviceMemory(bytes);
    uint8_t* next = activations.as<uint8_t>();
    float** targets[] = {&hidden, &normed, &q,  &k,        &v,     &attn,
                         &proj,   &gate,   &up, &gathered, &merged};
    for (size_t i = 0; i < std::size(floats); ++i) {
      *targets[i] = reinterpret_cast<float*>(next);
      next += align_up(floats[i] * sizeof(float));
    }
    for (int32_t** target : {&tokens, &positions, &wanted_rows}) {
      *target = reinterpret_cast<int32_t*>(next);
      next += align_up(r * sizeof(int32_t));
    }
    own_head_rows = reinterpret_cast<int32_t*>(next);
    staging = cuda::PinnedMemory();
    staging = cuda::PinnedMemory((3 + shard.heads.count) * r * sizeof(int32_t));
  }
  if (grow_head) {
    head_capacity = std::max(head_capacity, head_rows);
    const size_t r = static_cast<size_t>(head_capacity);
    const size_t vocab = static_cast<size_t>(c.vocab_size);
    const size_t in_bytes = align_up(r * c.dim * sizeof(float));
    head_memory = cuda::DeviceMemory();
    head_memory = cuda::DeviceMemory(2 * in_bytes + align_up(r * vocab * sizeof(float)));
    head_in = head_memory.as<float>();
    head_normed = reinterpret_cast<float*>(head_memory.as<uint8_t>() + in_bytes);
    logits = reinterpret_cast<float*>(head_memory.as<uint8_t>() + 2 * in_bytes);
    logits_host = cuda::PinnedMemory();
    logits_host = cuda::PinnedMemory(r * vocab * sizeof(float));
  }
  // One workspace for the largest product at the most rows either part runs.
  const int64_t most_rows = std::max(rows_capacity, head_capacity);
  size_t needed = 0;
  for (const cuda::DeviceWeight& w : all_weights)
    needed = std::max(needed, cuda::matmul_workspace_bytes(w, most_rows));
  if (needed > workspace_bytes) {
    workspace = cuda::DeviceMemory();
    workspace = cuda::DeviceMemory(needed);
    workspace_bytes = needed;
  }
}

void CudaEngine::Impl::stage_inputs(const std::vector<Segment>& segments,
                                    const std::vector<int32_t>& wanted) {
  int32_t rows = 0;
  for (const Segment& s : segments) rows += s.n;
  const size_t r = static_cast<size_t>(rows_capacity);
  int32_t* host = staging.as<int32_t>();
  int32_t* host_tokens = host;
  int32_t* host_positions = host + r;
  int32_t* host_wanted = host + 2 * r;
  int32_t row = 0;
  bool have_tokens = true;
  for (const Segment& s : segments) {
    if (s.tokens != nullptr)
      std::copy_n(s.tokens, s.n, host_tokens + row);
    else
      have_tokens = false;
    for (int32_t i = 0; i < s.n; ++i) host_positions[row + i] = s.pos0 + i;
    row += s.n;
  }
  std::copy(wanted.begin(), wanted.end(), host_wanted);
  const size_t row_bytes = static_cast<size_t>(rows) * sizeof(int32_t);
  if (have_tokens) cuda::copy_to_device(tokens, host_tokens, row_bytes, stream);
  cuda::copy_to_device(positions, host_positions, row_bytes, stream);
  cuda::copy_to_device(wanted_rows, host_wanted, wanted.size() * sizeof(int32_t), stream);
  if (sequence_sharded) {
    // Row i's own heads in the merged (rows * n_heads, head_dim) attention:
    // i * n_heads + [heads.begin, heads.end()), as SequenceShardedAttention keeps.
    int32_t* host_own = host + 3 * r;
    const auto own = static_cast<int32_t>(shard.heads.count);
    for (int32_t i = 0; i < rows; ++i)
      for (int32_t h = 0; h < own; ++h)
        host_own[i * own + h] = i * config.n_heads + static_cast<int32_t>(shard.heads.begin) + h;
    cuda::copy_to_device(own_head_rows, host_own, row_bytes * own, stream);
  }
}

std::vector<StepRows> CudaEngine::Impl::step_rows(const std::vector<Segment>& segments) const {
  std::vector<StepRows> rows;
  rows.reserve(segments.size());
  for (const Segment& s : segments) rows.push_back(StepRows{s.seq, s.pos0, s.n});
  return rows;
}

void CudaEngine::Impl::embed_rows(int32_t rows, float* out) {
  cuda::embed(embedding, tokens, rows, out, stream);
}

void CudaEngine::Impl::all_reduce(float* data, size_t count) {
  if (comm.size() == 1) return;  // a group of one: the identity
  // A communicator works on its own stream and returns when done: the
  // partial sums must be complete before it reads them.
  stream.synchronize();
  comm.all_reduce_sum(data, count);
}

void CudaEngine::Impl::sharded_attention(int32_t layer, int32_t rows) {
#if defined(XQ_DEVICE_SHARD_MERGE)
  const int64_t states = static_cast<int64_t>(rows) * config.n_heads;
  const size_t record = static_cast<size_t>(states) * (config.head_dim + 2);
  // This rank's record in place in the gathered buffer: max, sum, acc.
  float* mine = gathered + static_cast<size_t>(comm.rank()) * record;
  cache->run_layer_partial(layer, normed, k, v, q, mine, mine + states, mine + 2 * states);
  stream.synchronize();  // the communicator reads it from its own stream
  comm.all_gather(mine, record, gathered);
  cuda::paged::merge_partial_states(gathered, comm.size(), states, config.head_dim, merged, stream);
  cuda::gather_rows(merged, own_head_rows, static_cast<int64_t>(rows) * shard.heads.count,
                    config.head_dim, attn, stream);
#else
  static_cast<void>(layer);
  static_cast<void>(rows);
  throw Error("tensor parallelism by sequence on the CUDA backend is not available yet");
#endif
}

// The one layer loop, as TransformerEngine::run_layers: every row through
// each product together, attention per segment inside the device cache.
void CudaEngine::Impl::layer_loop(float* h, int32_t rows) {
  const ModelConfig& c = config;
  const int64_t n = rows;
  const size_t residual = static_cast<size_t>(n) * c.dim;
  auto matmul = [&](const cuda::DeviceWeight& w, const float* x, float* y) {
    cuda::matmul(w, x, n, y, workspace.data(), workspace_bytes, blas, stream);
  };
  for (int32_t layer = 0; layer < static_cast<int32_t>(layers.size()); ++layer) {
    const DeviceLayer& w = layers[static_cast<size_t>(layer)];
    // Attention block: Q, K, V of this rank's heads, the cache, Wo.
    cuda::rmsnorm(h, w.attn_norm, normed, n, c.dim, c.rms_eps, stream);
    matmul(w.wq, normed, q);
    matmul(w.wk, normed, k);
    matmul(w.wv, normed, v);
    // Every head's Q under sequence sharding (q is (rows, n_heads, head_dim)
    // there), this rank's heads otherwise.
    cuda::rope(q, positions, n, q_width / c.head_dim, c.head_dim, c.rope_dim, c.rope_layout, rope,
               stream);
    if (sequence_sharded)
      sharded_attention(layer, rows);
    else
      cache->run_layer(layer, normed, k, v, q, attn);
    matmul(w.wo, attn, proj);
    all_reduce(proj, residual);
    cuda::add(h, proj, static_cast<int64_t>(residual), stream);
    // Feed-forward block (SwiGLU): this rank's FFN channels.
    cuda::rmsnorm(h, w.ffn_norm, normed, n, c.dim, c.rms_eps, stream);
    matmul(w.w_gate, normed, gate);
    matmul(w.w_up, normed, up);
    cuda::swiglu(gate, up, n * ffn_width, stream);
    matmul(w.w_down, up, proj);
    all_reduce(proj, residual);
    cuda::add(h, proj, static_cast<int64_t>(residual), stream);
  }
}

void CudaEngine::Impl::head_rows(const float* h, int32_t rows, float* out) {
  cuda::rmsnorm(h, output_norm, head_normed, rows, config.dim, config.rms_eps, stream);
  cuda::matmul(output, head_normed, rows, out, workspace.data(), workspace_bytes, blas, stream);
}

template <typename Enqueue>
void CudaEngine::Impl::cache_step(const std::vector<Segment>& segments, Enqueue&& enqueue) {
  std::vector<int32_t> held;
  held.reserve(segments.size());
  for (const Segment& s : segments) held.push_back(std::min(s.pos0, cache->length(s.seq)));
  cache->begin_step(step_rows(segments));
  try {
    enqueue();
  } catch (...) {
    try {
      stream.synchronize();
      cache->end_step();
      for (size_t i = 0; i < segments.size(); ++i) cache->truncate(segments[i].seq, held[i]);
    } catch (const std::exception&) {
      // A device that fails again is broken; the first error says why.
    }
    throw;
  }
  cache->end_step();
}

void CudaEngine::Impl::run_step(const std::vector<Segment>& segments,
                                const std::vector<int32_t>& wanted) {
  int32_t rows = 0;
  bool decode = true;
  for (const Segment& s : segments) {
    rows += s.n;
    decode = decode && s.n == 1;
  }
  reserve(rows, static_cast<int32_t>(wanted.size()));
  stage_inputs(segments, wanted);
  const bool graphable = graphs_enabled && decode && comm.size() == 1;
  auto enqueue_layers = [&] {
    embed_rows(rows, hidden);
    layer_loop(hidden, rows);
  };
  cache_step(segments, [&] {
    const StepShape shape{rows, cache->step_shape_key()};  // the cache's step is begun
    auto found = graphs.find(shape);
    if (graphable && found != graphs.end()) {
      found->second.graph->launch(stream);
      found->second.last_launch = ++launches;
      ++replays;
    } else if (graphable && decode_shapes_seen.count(shape) != 0) {
      // Nothing was enqueued by a capture the device refused (the stream is
      // back to normal once the capture ends), so the step then runs kernel by
      // kernel and the engine stays consistent: its cache's step is begun and
      // ends below either way.
      auto graph = std::make_unique<cuda::Graph>();
      std::string refused;
      try {
        graph->begin_capture(stream);
        try {
          enqueue_layers();
        } catch (...) {
          try {
            graph->end_capture(stream);
          } catch (const std::exception&) {
          }
          throw;
        }
        graph->end_capture(stream);
      } catch (const std::exception& e) {
        refused = e.what();
      }
      if (refused.empty()) {
        ++captures;
        graph->launch(stream);
        ++replays;
        if (graphs.size() >= kMaxDecodeGraphs) {
          // A dropped graph still in flight is freed by CUDA once its launch
          // completes (cudaGraphExecDestroy).
          auto oldest =
              std::min_element(graphs.begin(), graphs.end(), [](const auto& a, const auto& b) {
                return a.second.last_launch < b.second.last_launch;
              });
          graphs.erase(oldest);
        }
        graphs[shape] = CapturedStep{std::move(graph), ++launches};
      } else {
        graphs_enabled = false;
        graphs.clear();
        graphs_refused = refused;
        enqueue_layers();
      }
    } else {
      if (graphable) decode_shapes_seen.insert(shape);
      enqueue_layers();
    }
  });
  if (wanted.empty()) return;
  // Only the rows whose logits someone reads go through the output head.
  const auto count = static_cast<int64_t>(wanted.size());
  cuda::gather_rows(hidden, wanted_rows, count, config.dim, head_in, stream);
  head_rows(head_in, static_cast<int32_t>(count), logits);
}

void CudaEngine::Impl::copy_logits_out(int32_t rows, float* host_logits) {
  const size_t bytes = static_cast<size_t>(rows) * config.vocab_size * sizeof(float);
  cuda::copy_to_host(logits_host.data(), logits, bytes, stream);
  stream.synchronize();
  std::memcpy(host_logits, logits_host.data(), bytes);
}

CudaEngine::CudaEngine(const Model& model, const EngineOptions& options, int device)
    : model_(model), impl_(std::make_unique<Impl>(model, options, nullptr, Range{}, device)) {
  layer_range_ = impl_->layer_range;
  max_tokens_ = impl_->max_tokens;
}

CudaEngine::CudaEngine(const Model& model, const EngineOptions& options, Communicator& tp_group,
                       Range layers, int device)
    : model_(model), impl_(std::make_unique<Impl>(model, options, &tp_group, layers, device)) {
  layer_range_ = impl_->layer_range;
  max_tokens_ = impl_->max_tokens;
}

CudaEngine::~CudaEngine() = default;

void CudaEngine::forward(int32_t seq, const int32_t* tokens, int32_t n, int32_t pos0, float* logits,
                         int32_t first_logit_row) {
  if (n <= 0) return;
  if (!impl_->holds_first || !impl_->holds_last)
    throw Error("forward: this engine holds layers [" + std::to_string(layer_range_.begin) + ", " +
                std::to_string(layer_range_.end()) + ") only; a pipeline stage runs run_layers");
  check_forward_input(model_.config(), max_tokens_, tokens, n, pos0);
  Segment segment;
  segment.seq = seq;
  segment.pos0 = pos0;
  segment.tokens = tokens;
  segment.n = n;
  const std::vector<Segment> segments{segment};
  impl_->check_segments(segments, "forward", /*need_tokens=*/true);
  cuda::set_device(impl_->selection.index);
  std::vector<int32_t> wanted;
  if (logits != nullptr)
    for (int32_t row = std::clamp(first_logit_row, 0, n); row < n; ++row) wanted.push_back(row);
  impl_->run_step(segments, wanted);
  if (wanted.empty()) {
    impl_->stream.synchronize();  // the pinned inputs may be rewritten by the next step
    return;
  }
  impl_->copy_logits_out(static_cast<int32_t>(wanted.size()), logits);
}

void CudaEngine::forward_batch(const std::vector<Segment>& segments, float* logits) {
  if (segments.empty()) return;
  if (!impl_->holds_first || !impl_->holds_last)
    throw Error("forward_batch: this engine holds some layers only; a pipeline runs it");
  impl_->check_segments(segments, "forward_batch", /*need_tokens=*/true);
  cuda::set_device(impl_->selection.index);
  std::vector<int32_t> wanted;
  int32_t row = 0;
  for (const Segment& s : segments) {
    row += s.n;
    if (s.wants_logits && logits != nullptr) wanted.push_back(row - 1);
  }
  impl_->run_step(segments, wanted);
  if (wanted.empty()) {
    impl_->stream.synchronize();
    return;
  }
  impl_->copy_logits_out(static_cast<int32_t>(wanted.size()), logits);
}

SampledToken CudaEngine::forward_sample(int32_t seq, const int32_t* tokens, int32_t n, int32_t pos0,
                                        Sampler& sampler) {
  if (n <= 0) throw Error("forward_sample: no tokens");
  // The device picks from the sampler's own draw, taken once the step has
  // run, as Engine::forward_sample samples only after forward() succeeded.
  run_last_row(seq, tokens, n, pos0);
  cuda::SamplingRow row;
  device_sampling_row(sampler, &row);
  return impl_->sample_last_row(row);
}

void CudaEngine::run_last_row(int32_t seq, const int32_t* tokens, int32_t n, int32_t pos0) {
  if (n <= 0) throw Error("forward_sample: no tokens");
  if (!impl_->holds_first || !impl_->holds_last)
    throw Error("forward_sample: this engine holds some layers only; a pipeline runs it");
  check_forward_input(model_.config(), max_tokens_, tokens, n, pos0);
  Segment segment;
  segment.seq = seq;
  segment.pos0 = pos0;
  segment.tokens = tokens;
  segment.n = n;
  const std::vector<Segment> segments{segment};
  impl_->check_segments(segments, "forward", /*need_tokens=*/true);
  cuda::set_device(impl_->selection.index);
  impl_->run_step(segments, {n - 1});
}

SampledToken CudaEngine::forward_sample_on_device(int32_t seq, const int32_t* tokens, int32_t n,
                                                  int32_t pos0, const cuda::SamplingRow& row) {
  run_last_row(seq, tokens, n, pos0);
  return impl_->sample_last_row(row);
}

SampledToken CudaEngine::Impl::sample_last_row(const cuda::SamplingRow& row) {
  // Parameters in, token and margin out: a few bytes each way.
  const int64_t vocab = config.vocab_size;
  const size_t work = cuda::sample_workspace_bytes(1, vocab);
  if (sample_memory.data() == nullptr || work > sample_workspace_bytes) {
    sample_memory = cuda::DeviceMemory();
    sample_memory = cuda::DeviceMemory(2 * kDeviceAlignment + work);
    sample_workspace_bytes = work;
    sample_host = cuda::PinnedMemory();
    sample_host = cuda::PinnedMemory(kDeviceAlignment);
  }
  // Device: [parameters | token, margin | workspace], each on 256 bytes.
  auto* params = sample_memory.as<cuda::SamplingRow>();
  uint8_t* results = sample_memory.as<uint8_t>() + kDeviceAlignment;
  auto* chosen_token = reinterpret_cast<int32_t*>(results);
  auto* chosen_margin = reinterpret_cast<float*>(results + sizeof(int32_t));
  void* sample_workspace = sample_memory.as<uint8_t>() + 2 * kDeviceAlignment;
  std::memcpy(sample_host.data(), &row, sizeof(row));
  cuda::copy_to_device(params, sample_host.data(), sizeof(row), stream);
  cuda::sample(logits, 1, vocab, params, chosen_token, chosen_margin, sample_workspace,
               sample_workspace_bytes, stream);
  uint8_t* host = sample_host.as<uint8_t>() + sizeof(cuda::SamplingRow);
  cuda::copy_to_host(host, results, sizeof(int32_t) + sizeof(float), stream);
  stream.synchronize();
  SampledToken chosen;
  std::memcpy(&chosen.token, host, sizeof(int32_t));
  std::memcpy(&chosen.margin, host + sizeof(int32_t), sizeof(float));
  return chosen;
}

void CudaEngine::check_batch(const std::vector<Segment>& segments) const {
  impl_->check_segments(segments, "forward_batch", /*need_tokens=*/true);
}

cuda::Stream& CudaEngine::stream() {
  return impl_->stream;
}

SampledToken CudaEngine::head_sample(const float* hidden_row, const cuda::SamplingRow& row) {
  Impl& e = *impl_;
  if (!e.holds_last) throw Error("head_sample: this engine does not hold the last layer");
  cuda::set_device(e.selection.index);
  e.reserve(0, 1);
  e.head_rows(hidden_row, 1, e.logits);
  return e.sample_last_row(row);
}

SampledToken CudaEngine::head_sample(const float* hidden_row, Sampler& sampler) {
  Impl& e = *impl_;
  if (!e.holds_last) throw Error("head_sample: this engine does not hold the last layer");
  cuda::set_device(e.selection.index);
  e.reserve(0, 1);
  e.head_rows(hidden_row, 1, e.logits);
  cuda::SamplingRow row;
  device_sampling_row(sampler, &row);
  return e.sample_last_row(row);
}

void CudaEngine::embed(const std::vector<Segment>& segments, float* hidden) {
  Impl& e = *impl_;
  if (!e.holds_first) throw Error("embed: this engine does not hold layer 0");
  int32_t rows = 0;
  for (const Segment& s : segments) {
    if (s.n <= 0) throw Error("embed: a segment has no tokens");
    if (s.tokens == nullptr) throw Error("embed: a segment has no token ids");
    check_forward_input(model_.config(), max_tokens_, s.tokens, s.n, s.pos0);
    rows += s.n;
  }
  if (rows == 0) return;
  cuda::set_device(e.selection.index);
  e.reserve(rows, 0);
  e.stage_inputs(segments, {});
  e.embed_rows(rows, hidden);
  e.stream.synchronize();
}

void CudaEngine::run_layers(const std::vector<Segment>& segments, float* hidden) {
  Impl& e = *impl_;
  if (segments.empty()) return;
  e.check_segments(segments, "forward_batch", /*need_tokens=*/false);
  int32_t rows = 0;
  for (const Segment& s : segments) rows += s.n;
  cuda::set_device(e.selection.index);
  e.reserve(rows, 0);
  e.stage_inputs(segments, {});
  e.cache_step(segments, [&] { e.layer_loop(hidden, rows); });
  e.stream.synchronize();
}

void CudaEngine::head(const float* hidden, int32_t rows, float* logits) {
  Impl& e = *impl_;
  if (rows <= 0) return;
  if (!e.holds_last) throw Error("head: this engine does not hold the last layer");
  cuda::set_device(e.selection.index);
  e.reserve(0, rows);
  e.head_rows(hidden, rows, logits);
  e.stream.synchronize();
}

void CudaEngine::truncate(int32_t seq, int32_t from) {
  cuda::set_device(impl_->selection.index);
  impl_->cache->truncate(seq, from);
}

int32_t CudaEngine::length(int32_t seq) const {
  return impl_->cache->length(seq);
}

std::string CudaEngine::cache_description() const {
  return impl_->cache->describe();
}

size_t CudaEngine::cache_bytes_in_use() const {
  return impl_->cache->bytes_in_use();
}

double CudaEngine::cache_fraction_of_fp16() const {
  return impl_->cache->fraction_of_fp16();
}

std::string CudaEngine::cache_mode() const {
  return impl_->cache->mode();
}

double CudaEngine::cache_bytes_per_token() const {
  return impl_->cache->bytes_per_token();
}

int32_t CudaEngine::sequence_slots() const {
  return impl_->cache->sequences();
}

PoolInfo CudaEngine::pool() const {
  const DeviceCache& cache = *impl_->cache;
  PoolInfo info;
  info.block_tokens = AttentionCache::kBlockTokens;
  info.total_blocks = cache.total_blocks();
  info.block_bytes = cache.block_bytes();
  info.budget_bytes = static_cast<size_t>(info.total_blocks) * info.block_bytes;
  return info;
}

int32_t CudaEngine::blocks_for_tokens(int32_t tokens) const {
  return impl_->cache->blocks_for_tokens(tokens);
}

int32_t CudaEngine::blocks_for_step(int32_t from, int32_t to) const {
  return impl_->cache->blocks_for_step(from, to);
}

size_t CudaEngine::weight_bytes() const {
  return impl_->weight_bytes;
}

std::string CudaEngine::device_summary() const {
  const Impl& e = *impl_;
  char weights[32];
  std::snprintf(weights, sizeof(weights), "%.1f MB", static_cast<double>(e.weight_bytes) / 1e6);
  return "CUDA device " + std::to_string(e.selection.index) + " (" + e.device_name + ", sm_" +
         std::to_string(e.compute_major) + std::to_string(e.compute_minor) + "), weights " +
         weights + " resident, " + std::to_string(e.captures) + " graph(s) captured, " +
         std::to_string(e.replays) + " step(s) replayed" +
         (e.graphs_refused.empty()
              ? (e.graphs_enabled ? "" : " (graphs off)")
              : " (graphs off: the device refused a capture: " + e.graphs_refused + ")");
}

int64_t CudaEngine::graph_replays() const {
  return impl_->replays;
}

int64_t CudaEngine::graph_captures() const {
  return impl_->captures;
}

bool CudaEngine::graphs_enabled() const {
  return impl_->graphs_enabled;
}

void CudaEngine::fill_with_zeros(int32_t seq, int32_t tokens) {
  impl_->cache->fill_with_zeros(seq, tokens);
}

void CudaEngine::set_graphs_enabled(bool enabled) {
  impl_->graphs_enabled = enabled;
  if (!enabled) {
    impl_->graphs.clear();
    impl_->decode_shapes_seen.clear();
  }
}

}  // namespace xq
