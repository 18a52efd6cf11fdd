// The quantized cache modes on the device (kivi-B, xquant-B, xquant-cl-B):
// QuantizedCache's blocks (runtime/cache_quantized.cpp, runtime/row_store.cpp)
// in one device arena, its bookkeeping on the host. A layout-only CPU twin
// supplies the block size, the pool's size, every formula and the layers'
// streams, bits, offsets and matrices (block_layout()), so the two caches
// admit the same sequences and a test can hand one's blocks to the other.
//
// Bookkeeping mirrors QuantizedCache at rest (every layer holding the same
// tokens, as after each step): a sequence of L local tokens holds
// ceil(L / 128) group blocks and the window pages of its L % 128 newest
// tokens. A step grows the table to its peak (the groups of the new length
// and the larger of the old and the new window: the layers still behind read
// the old window's pages, as reserve() keeps them on the CPU), and end_step
// settles it to the new length's blocks, as settle() does. A truncation
// inside a quantized per-channel group decodes the group's kept head back
// into the window pages (RowStore::truncate) on the device. XQuant-CL's
// accumulator rows of group blocks newly taken are zeroed (clear_accumulator).
//
// Attention, by layout:
//   xquant latents (GQA models: X·Uk per channel, X·Uv per token) go through
//     the fused decode kernel xquant_latent_attention (no dense K or V);
//   kivi goes through the fused kernel kivi_attention (K and V decoded from
//     their codes tile by tile, no dense K or V), every row of the step in
//     one launch (prefill rows too: a row reads its context's codes, less
//     than the materialize path's fp32 rows), where its shape fits
//     (kivi_unsupported), else the materialize path;
//   xquant on X (MHA) and xquant-cl (deltas of X or of their latent) take
//     the materialize path: per sequence of the step, its stored rows are
//     dequantized into dense fp32 scratch (sized for the longest context at
//     construction), XQuant-CL's chain is summed there with the accumulator
//     rows (and the result kept in them for the next layer, as the CPU's
//     attend does), K and V are rebuilt with fp32 cuBLAS GEMMs where the
//     mode rebuilds (the cache's Blas carries a fixed workspace), K is
//     rotated at each token's global position, and a dense attention kernel
//     attends each query row. The dequantize, accumulate, GEMM and RoPE
//     launches cover the step's dense rows, materialize_rows of its longest
//     sequence (runtime/device_cache.h): a step costs the context it has, not
//     the cache's capacity, and the few bucket sizes are the step's shape key
//     (step_shape_key), so a graph captured for a row count and a bucket
//     replays for any step of the same two. Rows past a sequence's stored
//     slots are computed from whatever the scratch holds and never read.
// Every address run_layer uses is fixed once the step's scratch exists (it
// grows in begin_step, outside any capture, only when a step has more rows
// than any before; a caller that captured graphs must capture again then, as
// the CUDA engine does when its own activations grow at the same moment).
#include <algorithm>
#include <string>
#include <vector>

#include "kernels/cpu/quant.h"
#include "kernels/cuda/device.h"
#include "kernels/cuda/paged_attention.h"
#include "kernels/error.h"
#include "runtime/block_pool.h"
#include "runtime/cache_mode.h"
#include "runtime/device_cache_modes.h"
#include "runtime/sequence_shard.h"

namespace xq {
namespace {

namespace paged = cuda::paged;

constexpr int32_t kBlockTokens = AttentionCache::kBlockTokens;

// Decode steps and small prefill chunks split each row's context for the
// fused kernels (latent and kivi, as the fp16 cache does); fixed per cache so
// that the split scratch never moves.
int32_t split_rows_for(int32_t sequences) {
  return std::clamp(sequences, 16, 256);
}

paged::PagedStream paged_stream(const StreamLayout& s) {
  paged::PagedStream out;
  out.width = static_cast<int32_t>(s.width);
  out.bits = s.bits;
  out.per_channel = s.axis == QuantAxis::kPerChannel;
  out.group_offset = s.group_offset;
  out.window_offset = s.window_offset;
  out.row_code_bytes = s.row_code_bytes;
  out.row_groups = static_cast<int32_t>(s.row_groups);
  out.group_code_bytes = s.group_code_bytes;
  return out;
}

cuda::DeviceMemory upload_floats(const HostMatrix& m, cuda::Stream& stream) {
  if (m.values == nullptr) return {};
  const size_t bytes = static_cast<size_t>(m.rows * m.cols) * sizeof(float);
  cuda::DeviceMemory memory(bytes);
  cuda::copy_to_device(memory.data(), m.values, bytes, stream);
  return memory;
}

// A matrix whose rows are outputs (y = M x, rows x cols) as a projection.
paged::RowProjection output_major(const cuda::DeviceMemory& m, const HostMatrix& host) {
  paged::RowProjection p;
  p.matrix = m.as<const float>();
  p.in_width = static_cast<int32_t>(host.cols);
  p.out_width = static_cast<int32_t>(host.rows);
  p.in_step = 1;
  p.out_step = host.cols;
  return p;
}

// An input-major matrix (rows = inputs) as a projection: one dense block, or
// `blocks` diagonal blocks of cols x cols stacked along the rows.
paged::RowProjection input_major(const cuda::DeviceMemory& m, const HostMatrix& host,
                                 int32_t blocks) {
  paged::RowProjection p;
  p.matrix = m.as<const float>();
  p.blocks = blocks;
  p.in_width = static_cast<int32_t>(host.rows / blocks);
  p.out_width = static_cast<int32_t>(host.cols);
  p.block_stride = static_cast<int64_t>(p.in_width) * host.cols;
  p.in_step = host.cols;
  p.out_step = 1;
  return p;
}

class QuantizedDeviceCache final : public DeviceCache {
 public:
  QuantizedDeviceCache(const Model& model, const CacheOptions& options, cuda::Stream& stream,
                       cuda::Blas& blas)
      : config_(model.config()), options_(options), stream_(stream), blas_(blas) {
    CacheOptions twin_options = options;
    twin_options.layout_only = true;
    twin_ = make_cache(model, twin_options);
    layout_ = twin_->block_layout();
    if (layout_.fp16) throw Error("device cache: the quantized device cache got the fp16 layout");
    layers_ = static_cast<int32_t>(layout_.layers.size());
    shard_ = sequence_shard(find_cache_mode(options.mode), config_, options.sequence_shards,
                            options.sequence_shard);
    sequences_ = options.sequences;
    window_tokens_ = layout_.window_tokens;
    pool_ = BlockPool(layout_.block_bytes, layout_.total_blocks, /*allocate=*/false);
    tables_.resize(static_cast<size_t>(sequences_));
    lengths_.assign(static_cast<size_t>(sequences_), 0);
    capacity_ = shard_.owned_before(options.max_tokens);
    table_stride_ = std::max(1, (capacity_ + kBlockTokens - 1) / kBlockTokens);
    window_stride_ = std::max(1, window_pages(std::min(capacity_, kBlockTokens - 1)));

    arena_ = cuda::DeviceMemory(layout_.block_bytes * static_cast<size_t>(layout_.total_blocks));
    cuda::fill_zero(arena_.data(), arena_.bytes(), stream_);
    host_tables_.assign(static_cast<size_t>(sequences_) * table_stride_, 0);
    host_window_.assign(static_cast<size_t>(sequences_) * window_stride_, 0);
    tables_device_ = cuda::DeviceMemory(host_tables_.size() * sizeof(int32_t));
    window_device_ = cuda::DeviceMemory(host_window_.size() * sizeof(int32_t));
    host_stored_.assign(static_cast<size_t>(sequences_), 0);
    host_begins_.assign(static_cast<size_t>(sequences_), 0);
    stored_device_ = cuda::DeviceMemory(host_stored_.size() * sizeof(int32_t));
    begins_device_ = cuda::DeviceMemory(host_begins_.size() * sizeof(int32_t));
    const size_t table_floats = static_cast<size_t>(options.max_tokens) * config_.rope_dim;
    cos_sin_device_ = cuda::DeviceMemory(std::max<size_t>(1, table_floats) * sizeof(float));
    if (table_floats > 0)
      cuda::copy_to_device(cos_sin_device_.data(), options.rope_cos_sin,
                           table_floats * sizeof(float), stream_);

    shape_.heads = config_.n_heads;
    shape_.kv_heads = config_.n_kv_heads;
    shape_.head_dim = config_.head_dim;
    shape_.rope_dim = config_.rope_dim;
    shape_.rope_layout = config_.rope_layout;
    shard_spec_.shards = shard_.shards();
    shard_spec_.index = shard_.index();
    shard_spec_.unit = shard_.unit();
    kivi_fused_ =
        layout_.kv_source == KvSource::kReadBack && paged::kivi_unsupported(shape_).empty();
    upload_layers();
    allocate_dense_scratch();
    ensure_step_rows(std::max(sequences_, options.max_tokens));
    upload_tables();
    upload_lengths();
    stream_.synchronize();  // the host matrices above are the twin's; the copies are done
  }

  std::string mode() const override { return twin_->mode(); }
  std::string describe() const override { return twin_->describe(); }
  double bytes_per_token() const override { return twin_->bytes_per_token(); }
  double fp16_bytes_per_token() const override { return twin_->fp16_bytes_per_token(); }
  size_t block_bytes() const override { return layout_.block_bytes; }
  int32_t total_blocks() const override { return layout_.total_blocks; }
  int32_t free_blocks() const override { return pool_.free_blocks(); }
  int32_t sequences() const override { return sequences_; }
  int32_t blocks_for_tokens(int32_t tokens) const override {
    return twin_->blocks_for_tokens(tokens);
  }
  int32_t blocks_for_step(int32_t from, int32_t to) const override {
    return twin_->blocks_for_step(from, to);
  }
  int32_t length(int32_t seq) const override { return lengths_.at(check_seq(seq)); }
  int64_t step_shape_key() const override { return dense_rows_; }

  void truncate(int32_t seq, int32_t from) override {
    if (in_step_) throw Error("device cache: truncate inside a step");
    check_seq(seq);
    std::vector<PendingHead> heads;
    truncate_now(seq, from, heads);  // PoolExhausted before anything changes
    upload_tables();
    decode_heads(heads);
    upload_lengths();
  }

  void begin_step(const std::vector<StepRows>& segments) override {
    if (in_step_) throw Error("device cache: begin_step before the previous step's end_step");
    const int64_t rows = check_step(*this, segments, options_.max_tokens);
    ensure_step_rows(rows);  // outside any capture: may move the step scratch
    std::vector<PendingHead> heads;
    for (const StepRows& s : segments) {
      if (s.pos0 < lengths_[s.seq]) truncate_now(s.seq, s.pos0, heads);  // cannot fail: counted
    }
    // The materialize path's scratch rows for this step: enough for the
    // longest sequence it attends over, in a few sizes (materialize_rows).
    int32_t longest = 0;
    for (const StepRows& s : segments)
      if (s.n > 0) longest = std::max(longest, shard_.owned_before(s.pos0 + s.n));
    dense_rows_ = materializes() ? materialize_rows(longest, capacity_) : 0;
    host_rows_.clear();
    host_rows_.reserve(static_cast<size_t>(rows));
    for (const StepRows& s : segments) {
      BlockTable& table = tables_[s.seq];
      const int32_t local_end = shard_.owned_before(s.pos0 + s.n);
      const int32_t had = static_cast<int32_t>(table.groups.size());
      const int32_t groups = std::max(had, (local_end + kBlockTokens - 1) / kBlockTokens);
      const int32_t window = std::max(static_cast<int32_t>(table.window.size()),
                                      window_pages(local_end % kBlockTokens));
      resize_table(pool_, table, groups, window);  // cannot fail: counted above
      clear_accumulator(table, had);
      for (int32_t i = 0; i < s.n; ++i) host_rows_.push_back({s.seq, s.pos0 + i});
      host_begins_[s.seq] = s.pos0;
    }
    upload_tables();
    decode_heads(heads);
    if (!host_rows_.empty())
      cuda::copy_to_device(rows_device_.data(), host_rows_.data(),
                           host_rows_.size() * sizeof(paged::StepRow), stream_);
    step_ = segments;
    step_rows_ = static_cast<int32_t>(rows);
    upload_lengths();  // stored lengths after the step: what the kernels read
    in_step_ = true;
  }

  void run_layer(int32_t layer, const float* x, const float* k, const float* v, const float* q,
                 float* out) override {
    check_layer(layer);
    if (shard_.sharded())
      throw Error("device cache: a sequence-sharded cache attends through run_layer_partial()");
    paged::AttentionTarget target;
    target.out = out;
    encode_and_attend(layer, x, k, v, q, target);
  }

  void run_layer_partial(int32_t layer, const float* x, const float* k, const float* v,
                         const float* q, float* state_max, float* state_sum,
                         float* state_acc) override {
    check_layer(layer);
    if (!shard_.sharded())
      throw Error("device cache: run_layer_partial is for sequence-sharded caches");
    paged::AttentionTarget target;
    target.state_max = state_max;
    target.state_sum = state_sum;
    target.state_acc = state_acc;
    encode_and_attend(layer, x, k, v, q, target);
  }

  void end_step() override {
    if (!in_step_) throw Error("device cache: end_step without begin_step");
    for (const StepRows& s : step_) {
      lengths_[s.seq] = s.pos0 + s.n;
      const int32_t local = shard_.owned_before(lengths_[s.seq]);
      resize_table(pool_, tables_[s.seq], (local + kBlockTokens - 1) / kBlockTokens,
                   window_pages(local % kBlockTokens));  // only gives back
    }
    step_.clear();
    step_rows_ = 0;
    dense_rows_ = 0;
    in_step_ = false;
  }

  void fill_with_zeros(int32_t seq, int32_t tokens) override {
    if (in_step_) throw Error("device cache: fill inside a step");
    check_seq(seq);
    if (tokens < 0 || tokens > options_.max_tokens)
      throw Error("device cache: cannot fill " + std::to_string(tokens) + " tokens");
    truncate(seq, 0);
    const int32_t local = shard_.owned_before(tokens);
    // Zero codes with zero scales and zero points decode to 0; zero window
    // rows are fp16 zeros; the CL accumulator starts at zero.
    resize_table(pool_, tables_[seq], (local + kBlockTokens - 1) / kBlockTokens,
                 window_pages(local % kBlockTokens));
    for (const std::vector<int32_t>* blocks : {&tables_[seq].groups, &tables_[seq].window})
      for (int32_t block : *blocks)
        cuda::fill_zero(arena_.as<uint8_t>() + static_cast<size_t>(block) * layout_.block_bytes,
                        layout_.block_bytes, stream_);
    lengths_[seq] = tokens;
    upload_tables();
    upload_lengths();
  }

  void import_blocks(const AttentionCache& cpu) override {
    if (in_step_) throw Error("device cache: import inside a step");
    const CacheBlockLayout theirs = cpu.block_layout();
    if (cpu.mode() != mode() || theirs.block_bytes != layout_.block_bytes ||
        theirs.total_blocks != layout_.total_blocks || cpu.sequences() != sequences_ ||
        theirs.window_tokens != layout_.window_tokens)
      throw Error("device cache: import from a cache of another mode or layout");
    const CacheBlocksView view = cpu.blocks(0);
    if (view.arena == nullptr) throw Error("device cache: import from a cache without an arena");
    cuda::copy_to_device(arena_.data(), view.arena, arena_.bytes(), stream_);
    for (int32_t s = 0; s < sequences_; ++s) {
      tables_[s] = *cpu.blocks(s).table;
      lengths_[s] = cpu.length(s);
    }
    pool_ = pool_around(layout_.block_bytes, layout_.total_blocks, tables_);
    upload_tables();
    upload_lengths();
    stream_.synchronize();  // the host arena may go once this returns
  }

  void download_arena(std::vector<uint8_t>& arena) const override {
    arena.resize(arena_.bytes());
    cuda::copy_to_host(arena.data(), arena_.data(), arena_.bytes(), stream_);
    stream_.synchronize();
  }

  const BlockTable& table(int32_t seq) const override { return tables_.at(check_seq(seq)); }

 private:
  // The device copies of one layer's matrices (empty where unused).
  struct LayerMatrices {
    cuda::DeviceMemory encode_k, encode_v, decode_x, rebuild_k, rebuild_v;
    cuda::DeviceMemory latent_from_k, latent_from_v;
    cuda::DeviceMemory rebuild_k_fp16;  // the fused kernel's K rebuild
  };
  // A truncated per-channel group whose kept head goes back to the window.
  struct PendingHead {
    int32_t seq, group_block, head;
  };

  int32_t check_seq(int32_t seq) const {
    if (seq < 0 || seq >= sequences_)
      throw Error("device cache: sequence " + std::to_string(seq) + " out of range");
    return seq;
  }

  void check_layer(int32_t layer) const {
    if (!in_step_) throw Error("device cache: run_layer outside a step");
    if (layer < 0 || layer >= layers_)
      throw Error("device cache: layer " + std::to_string(layer) + " is not one of its " +
                  std::to_string(layers_));
  }

  int32_t window_pages(int32_t window_rows) const {
    return window_tokens_ ? (window_rows + window_tokens_ - 1) / window_tokens_ : 0;
  }

  bool latent_layout() const { return layout_.kv_source == KvSource::kRebuiltFromLatents; }
  bool cross_layer() const { return layout_.kv_source == KvSource::kCrossLayerDeltas; }
  // Whether attention goes through dense scratch (not a fused kernel).
  bool materializes() const { return !latent_layout() && !kivi_fused_; }

  // QuantizedCache::truncate at rest: the table keeps the groups of the kept
  // tokens and the window pages of the partial group; where the cut falls
  // inside a quantized group, its head is noted for decode_heads (after the
  // tables are uploaded). Throws PoolExhausted before changing anything when
  // the window pages cannot be had.
  void truncate_now(int32_t seq, int32_t from, std::vector<PendingHead>& heads) {
    from = std::clamp(from, 0, lengths_[seq]);
    const int32_t own_from = shard_.owned_before(from);
    const int32_t stored = shard_.owned_before(lengths_[seq]);
    BlockTable& table = tables_[seq];
    resize_table(pool_, table, (own_from + kBlockTokens - 1) / kBlockTokens,
                 window_pages(own_from % kBlockTokens));
    const int32_t head = own_from % kBlockTokens;
    if (window_tokens_ > 0 && head != 0 && own_from / kBlockTokens < stored / kBlockTokens)
      heads.push_back({seq, table.groups[own_from / kBlockTokens], head});
    lengths_[seq] = from;
  }

  // The kept heads of truncated groups back into the window pages, for every
  // per-channel stream of every layer (the tables uploaded first).
  void decode_heads(const std::vector<PendingHead>& heads) {
    for (const PendingHead& h : heads)
      for (const LayerLayout& layer : layout_.layers)
        for (const StreamLayout& s : layer.streams)
          if (s.axis == QuantAxis::kPerChannel)
            paged::quant_group_to_window(
                arena_view(), paged_stream(s), h.group_block,
                window_device_.as<const int32_t>() + static_cast<size_t>(h.seq) * window_stride_,
                window_tokens_, h.head, stream_);
  }

  // XQuant-CL: the accumulator rows of group blocks from `first_group` on
  // start at zero (QuantizedCache::clear_accumulator).
  void clear_accumulator(const BlockTable& table, int32_t first_group) {
    if (!layout_.cross_layer_accumulator) return;
    for (size_t g = static_cast<size_t>(first_group); g < table.groups.size(); ++g)
      cuda::fill_zero(arena_.as<uint8_t>() +
                          static_cast<size_t>(table.groups[g]) * layout_.block_bytes +
                          layout_.accumulator_offset,
                      static_cast<size_t>(kBlockTokens) * config_.dim * sizeof(float), stream_);
  }

  // Every sequence's group blocks and window pages at their fixed places.
  void upload_tables() {
    std::fill(host_tables_.begin(), host_tables_.end(), 0);
    std::fill(host_window_.begin(), host_window_.end(), 0);
    for (int32_t s = 0; s < sequences_; ++s) {
      const BlockTable& table = tables_[s];
      if (static_cast<int32_t>(table.groups.size()) > table_stride_ ||
          static_cast<int32_t>(table.window.size()) > window_stride_)
        throw Error("device cache: a table outgrew its row");
      std::copy(table.groups.begin(), table.groups.end(),
                host_tables_.begin() + static_cast<size_t>(s) * table_stride_);
      std::copy(table.window.begin(), table.window.end(),
                host_window_.begin() + static_cast<size_t>(s) * window_stride_);
    }
    cuda::copy_to_device(tables_device_.data(), host_tables_.data(),
                         host_tables_.size() * sizeof(int32_t), stream_);
    cuda::copy_to_device(window_device_.data(), host_window_.data(),
                         host_window_.size() * sizeof(int32_t), stream_);
  }

  // Local slots each sequence holds once the step's rows are in (the step's
  // ends for its sequences, the lengths for the others), and the steps' starts.
  void upload_lengths() {
    for (int32_t s = 0; s < sequences_; ++s) host_stored_[s] = shard_.owned_before(lengths_[s]);
    for (const StepRows& s : step_) host_stored_[s.seq] = shard_.owned_before(s.pos0 + s.n);
    cuda::copy_to_device(stored_device_.data(), host_stored_.data(),
                         host_stored_.size() * sizeof(int32_t), stream_);
    cuda::copy_to_device(begins_device_.data(), host_begins_.data(),
                         host_begins_.size() * sizeof(int32_t), stream_);
  }

  void upload_layers() {
    const int64_t hd = config_.head_dim;
    for (const LayerLayout& layer : layout_.layers) {
      LayerMatrices m;
      switch (layout_.kv_source) {
        case KvSource::kReadBack:
          break;
        case KvSource::kRebuiltFromX:
          m.rebuild_k = upload_floats(layer.rebuild_k, stream_);
          m.rebuild_v = upload_floats(layer.rebuild_v, stream_);
          break;
        case KvSource::kCrossLayerDeltas:
          m.encode_k = upload_floats(layer.encode_k, stream_);
          m.decode_x = upload_floats(layer.decode_x, stream_);
          m.rebuild_k = upload_floats(layer.rebuild_k, stream_);
          m.rebuild_v = upload_floats(layer.rebuild_v, stream_);
          break;
        case KvSource::kRebuiltFromLatents: {
          m.encode_k = upload_floats(layer.encode_k, stream_);
          m.encode_v = upload_floats(layer.encode_v, stream_);
          m.latent_from_k = upload_floats(layer.latent_from_k, stream_);
          m.latent_from_v = upload_floats(layer.latent_from_v, stream_);
          m.rebuild_v = upload_floats(layer.rebuild_v, stream_);
          const HostMatrix& r = layer.rebuild_k;
          const bool per_head = layer.rebuild_k_per_head;
          if (r.values == nullptr || r.rows != config_.kv_dim() ||
              r.cols != (per_head ? hd : config_.kv_dim()))
            throw Error("device cache: the latent K rebuild is not kv x " +
                        std::string(per_head ? "head_dim" : "kv"));
          std::vector<uint16_t> half(static_cast<size_t>(r.rows * r.cols));
          for (size_t i = 0; i < half.size(); ++i) half[i] = cpu::fp32_to_fp16(r.values[i]);
          m.rebuild_k_fp16 = cuda::DeviceMemory(half.size() * sizeof(uint16_t));
          cuda::copy_to_device(m.rebuild_k_fp16.data(), half.data(), half.size() * sizeof(uint16_t),
                               stream_);
          stream_.synchronize();  // `half` goes at the end of this iteration
          break;
        }
      }
      matrices_.push_back(std::move(m));
    }
  }

  // Split scratch of the fused decode kernels, or dense scratch of the
  // materialize path (one sequence's whole context, zeroed once: a step's
  // projections run over its first dense_rows_ rows, and the rows past a
  // sequence's stored ones are never read).
  void allocate_dense_scratch() {
    if (kivi_fused_) {
      const int32_t max_local = capacity_;
      split_plan_ = paged::plan_splits(max_local);
      whole_plan_.splits = 1;
      whole_plan_.tokens_per_split = split_plan_.splits * split_plan_.tokens_per_split;
      split_rows_ = split_rows_for(sequences_);
      if (split_plan_.splits > 1)
        split_scratch_ = cuda::DeviceMemory(
            paged::split_scratch_floats(split_rows_, shape_.heads, shape_.head_dim, split_plan_) *
            sizeof(float));
      return;
    }
    if (latent_layout()) {
      const int32_t max_local = capacity_;
      split_plan_ = paged::plan_splits(max_local);
      whole_plan_.splits = 1;
      whole_plan_.tokens_per_split = split_plan_.splits * split_plan_.tokens_per_split;
      split_rows_ = split_rows_for(sequences_);
      if (split_plan_.splits > 1)
        split_scratch_ = cuda::DeviceMemory(
            paged::xquant_latent_scratch_floats(split_rows_, shape_, split_plan_) * sizeof(float));
      return;
    }
    const size_t cap = static_cast<size_t>(std::max(1, capacity_));
    const size_t kv = static_cast<size_t>(config_.kv_dim()), d = static_cast<size_t>(config_.dim);
    keys_ = cuda::DeviceMemory(cap * kv * sizeof(float));
    values_ = cuda::DeviceMemory(cap * kv * sizeof(float));
    if (layout_.kv_source != KvSource::kReadBack)
      source_ = cuda::DeviceMemory(cap * d * sizeof(float));
    if (cross_layer() && layout_.layers[0].decode_x.values != nullptr)
      dense_latent_ = cuda::DeviceMemory(
          cap * static_cast<size_t>(layout_.layers[0].decode_x.cols) * sizeof(float));
    for (const cuda::DeviceMemory* m : {&keys_, &values_, &source_, &dense_latent_})
      cuda::fill_zero(m->data(), m->bytes(), stream_);
  }

  // Floats per step row of the encode scratch.
  size_t step_floats_per_row() const {
    const size_t kv = static_cast<size_t>(config_.kv_dim()), d = static_cast<size_t>(config_.dim);
    if (latent_layout()) return 2 * kv;
    if (cross_layer()) return d + 2 * kv;  // the delta, and its CL latent where the layers have one
    return 0;
  }

  // The step's rows descriptors and encode scratch for `rows` rows (rounded
  // up to 16, like the engine's activations).
  void ensure_step_rows(int64_t rows) {
    if (rows <= step_capacity_) return;
    stream_.synchronize();  // nothing may still read the old buffers
    step_capacity_ = (rows + 15) / 16 * 16;
    rows_device_ = cuda::DeviceMemory(static_cast<size_t>(step_capacity_) * sizeof(paged::StepRow));
    const size_t floats = static_cast<size_t>(step_capacity_) * step_floats_per_row();
    step_scratch_ = floats ? cuda::DeviceMemory(floats * sizeof(float)) : cuda::DeviceMemory();
  }

  paged::PagedArena arena_view() const {
    paged::PagedArena pool;
    pool.arena = arena_.as<uint8_t>();
    pool.block_bytes = layout_.block_bytes;
    pool.tables = tables_device_.as<const int32_t>();
    pool.table_stride = table_stride_;
    return pool;
  }
  paged::PagedWindow window_view() const {
    paged::PagedWindow window;
    window.window = window_device_.as<const int32_t>();
    window.window_stride = window_stride_;
    window.window_tokens = window_tokens_;
    return window;
  }
  paged::PagedLengths lengths_view() const {
    paged::PagedLengths lengths;
    lengths.stored = stored_device_.as<const int32_t>();
    return lengths;
  }

  // Stores rows (step rows, in_stride apart) in one stream of the layer.
  void encode_stream(const StreamLayout& s, const float* in, int64_t in_stride) {
    const paged::StepRow* rows = rows_device_.as<const paged::StepRow>();
    if (s.axis == QuantAxis::kPerChannel) {
      paged::StepBegins begins;
      begins.step_begin = begins_device_.as<const int32_t>();
      paged::quant_encode_per_channel(arena_view(), window_view(), lengths_view(), begins,
                                      paged_stream(s), rows, step_rows_, in, in_stride, shard_spec_,
                                      stream_);
    } else {
      paged::quant_encode_per_token(arena_view(), paged_stream(s), rows, step_rows_, in, in_stride,
                                    shard_spec_, stream_);
    }
  }

  // QuantizedCache::append_own for every row of the step, on the device.
  void encode(int32_t layer_index, const float* x, const float* k, const float* v) {
    const LayerLayout& layer = layout_.layers[layer_index];
    const LayerMatrices& m = matrices_[layer_index];
    const int64_t d = config_.dim, kv = config_.kv_dim();
    switch (layout_.kv_source) {
      case KvSource::kReadBack:
        encode_stream(layer.streams[0], k, kv);
        encode_stream(layer.streams[1], v, kv);
        break;
      case KvSource::kRebuiltFromX:
        encode_stream(layer.streams[0], x, d);
        break;
      case KvSource::kCrossLayerDeltas: {
        // X_i minus the previous layer's reconstruction, which its attention
        // left in the accumulator rows of these tokens.
        float* delta = step_scratch_.as<float>();
        paged::cross_layer_delta(arena_view(), layout_.accumulator_offset, d,
                                 rows_device_.as<const paged::StepRow>(), step_rows_, x,
                                 layer.cross_layer_delta, delta, shard_spec_, stream_);
        if (layer.decode_x.values != nullptr) {
          float* latent = delta + static_cast<size_t>(step_capacity_) * d;
          const int64_t width = layer.decode_x.cols;
          paged::project_rows(delta, d, step_rows_, input_major(m.decode_x, layer.decode_x, 1),
                              latent, width, blas_, stream_);
          encode_stream(layer.streams[0], latent, width);
        } else {
          encode_stream(layer.streams[0], delta, d);
        }
        break;
      }
      case KvSource::kRebuiltFromLatents: {
        float* k_latent = step_scratch_.as<float>();
        float* v_latent = k_latent + static_cast<size_t>(step_capacity_) * kv;
        if (layer.latent_from_k.values != nullptr) {
          const int32_t blocks = static_cast<int32_t>(kv / layer.latent_from_k.cols);
          paged::project_rows(k, kv, step_rows_,
                              input_major(m.latent_from_k, layer.latent_from_k, blocks), k_latent,
                              kv, blas_, stream_);
        } else {
          paged::project_rows(x, d, step_rows_, output_major(m.encode_k, layer.encode_k), k_latent,
                              kv, blas_, stream_);
        }
        if (layout_.keep_outlier)
          paged::keep_outlier_channels(arena_view(), layer.outlier_offset,
                                       layout_.outliers_per_token, config_.head_dim,
                                       rows_device_.as<const paged::StepRow>(), step_rows_,
                                       k_latent, kv, shard_spec_, stream_);
        encode_stream(layer.streams[0], k_latent, kv);
        if (layer.latent_from_v.values != nullptr) {
          const int32_t blocks = static_cast<int32_t>(kv / layer.latent_from_v.cols);
          paged::project_rows(v, kv, step_rows_,
                              input_major(m.latent_from_v, layer.latent_from_v, blocks), v_latent,
                              kv, blas_, stream_);
        } else {
          paged::project_rows(x, d, step_rows_, output_major(m.encode_v, layer.encode_v), v_latent,
                              kv, blas_, stream_);
        }
        encode_stream(layer.streams[1], v_latent, kv);
        break;
      }
    }
  }

  // The materialize path for one segment: dense K (rotated) and V of its
  // sequence's stored rows, then its rows' attention.
  void attend_dense(int32_t layer_index, int32_t row0, int32_t n, const float* q,
                    const paged::AttentionTarget& target) {
    const LayerLayout& layer = layout_.layers[layer_index];
    const LayerMatrices& m = matrices_[layer_index];
    const int64_t d = config_.dim, kv = config_.kv_dim();
    const paged::StepRow* rows = rows_device_.as<const paged::StepRow>() + row0;
    paged::DenseRows dense;
    dense.seq_row = rows;
    dense.capacity = dense_rows_;  // at least the sequence's stored slots
    const paged::PagedLengths lengths = lengths_view();
    float* keys = keys_.as<float>();
    float* values = values_.as<float>();
    switch (layout_.kv_source) {
      case KvSource::kReadBack:
        paged::quant_materialize(arena_view(), window_view(), lengths,
                                 paged_stream(layer.streams[0]), dense, keys, stream_);
        paged::quant_materialize(arena_view(), window_view(), lengths,
                                 paged_stream(layer.streams[1]), dense, values, stream_);
        break;
      case KvSource::kRebuiltFromX:
      case KvSource::kCrossLayerDeltas: {
        float* source = source_.as<float>();
        if (layer.decode_x.values != nullptr) {
          paged::quant_materialize(arena_view(), window_view(), lengths,
                                   paged_stream(layer.streams[0]), dense, dense_latent_.as<float>(),
                                   stream_);
          paged::project_rows(dense_latent_.as<const float>(), layer.encode_k.rows, dense_rows_,
                              input_major(m.encode_k, layer.encode_k, 1), source, d, blas_,
                              stream_);
        } else {
          paged::quant_materialize(arena_view(), window_view(), lengths,
                                   paged_stream(layer.streams[0]), dense, source, stream_);
        }
        if (cross_layer())
          paged::cross_layer_accumulate(arena_view(), layout_.accumulator_offset, d, lengths, dense,
                                        source, layer.cross_layer_delta, layer.cross_layer_keeps,
                                        stream_);
        paged::project_rows(source, d, dense_rows_, output_major(m.rebuild_k, layer.rebuild_k),
                            keys, kv, blas_, stream_);
        paged::project_rows(source, d, dense_rows_, output_major(m.rebuild_v, layer.rebuild_v),
                            values, kv, blas_, stream_);
        break;
      }
      case KvSource::kRebuiltFromLatents:
        throw Error("device cache: the latent layout attends through the fused kernel");
    }
    paged::rope_dense_keys(keys, lengths, dense, shape_, cos_sin_device_.as<const float>(),
                           shard_spec_, stream_);
    const int64_t heads = config_.n_heads, hd = config_.head_dim;
    paged::AttentionTarget part;
    if (target.out != nullptr) {
      part.out = target.out + static_cast<int64_t>(row0) * heads * hd;
    } else {
      part.state_max = target.state_max + static_cast<int64_t>(row0) * heads;
      part.state_sum = target.state_sum + static_cast<int64_t>(row0) * heads;
      part.state_acc = target.state_acc + static_cast<int64_t>(row0) * heads * hd;
    }
    paged::dense_attention(keys, values, rows, n, q + static_cast<int64_t>(row0) * heads * hd,
                           shape_, shard_spec_, part, stream_);
  }

  void attend_latents(int32_t layer_index, const float* q, const paged::AttentionTarget& target) {
    const LayerLayout& layer = layout_.layers[layer_index];
    const LayerMatrices& m = matrices_[layer_index];
    paged::XQuantLatentLayer latent;
    latent.k_latent = paged_stream(layer.streams[0]);
    latent.v_latent = paged_stream(layer.streams[1]);
    latent.rebuild_k_fp16 = m.rebuild_k_fp16.as<const uint16_t>();
    latent.rebuild_v = m.rebuild_v.as<const float>();
    latent.per_head_k = layer.rebuild_k_per_head;
    latent.keep_outlier = layout_.keep_outlier;
    latent.outliers_per_token = layout_.outliers_per_token;
    latent.outlier_offset = layer.outlier_offset;
    const bool split = split_plan_.splits > 1 && step_rows_ <= split_rows_;
    paged::xquant_latent_attention(arena_view(), window_view(), lengths_view(), latent, shape_,
                                   rows_device_.as<const paged::StepRow>(), step_rows_, q,
                                   cos_sin_device_.as<const float>(), shard_spec_,
                                   split ? split_plan_ : whole_plan_,
                                   split ? split_scratch_.as<float>() : nullptr, target, stream_);
  }

  // kivi through the fused kernel: every row of the step in one launch.
  void attend_kivi(int32_t layer_index, const float* q, const paged::AttentionTarget& target) {
    const LayerLayout& layer = layout_.layers[layer_index];
    paged::KiviLayer kivi;
    kivi.keys = paged_stream(layer.streams[0]);
    kivi.values = paged_stream(layer.streams[1]);
    const bool split = split_plan_.splits > 1 && step_rows_ <= split_rows_;
    paged::kivi_attention(arena_view(), window_view(), lengths_view(), kivi, shape_,
                          rows_device_.as<const paged::StepRow>(), step_rows_, q,
                          cos_sin_device_.as<const float>(), shard_spec_,
                          split ? split_plan_ : whole_plan_,
                          split ? split_scratch_.as<float>() : nullptr, target, stream_);
  }

  void encode_and_attend(int32_t layer, const float* x, const float* k, const float* v,
                         const float* q, const paged::AttentionTarget& target) {
    if (step_rows_ == 0) return;
    encode(layer, x, k, v);
    if (latent_layout()) {
      attend_latents(layer, q, target);
      return;
    }
    if (kivi_fused_) {
      attend_kivi(layer, q, target);
      return;
    }
    int32_t row0 = 0;
    for (const StepRows& s : step_) {
      if (s.n > 0) attend_dense(layer, row0, s.n, q, target);
      row0 += s.n;
    }
  }

  ModelConfig config_;
  CacheOptions options_;
  cuda::Stream& stream_;
  cuda::Blas& blas_;                      // the materialize path's projections
  std::unique_ptr<AttentionCache> twin_;  // layout only: formulas, layout, matrices
  CacheBlockLayout layout_;
  int32_t layers_ = 0, sequences_ = 0;
  SequenceShard shard_;
  BlockPool pool_;
  std::vector<BlockTable> tables_;
  std::vector<int32_t> lengths_;  // global, per sequence
  int32_t capacity_ = 0;          // local slots of the longest sequence
  int32_t table_stride_ = 0, window_stride_ = 0, window_tokens_ = 0;

  cuda::DeviceMemory arena_, tables_device_, window_device_, stored_device_, begins_device_;
  cuda::DeviceMemory rows_device_, cos_sin_device_, step_scratch_;
  cuda::DeviceMemory keys_, values_, source_, dense_latent_, split_scratch_;
  std::vector<LayerMatrices> matrices_;
  std::vector<int32_t> host_tables_, host_window_, host_stored_, host_begins_;
  std::vector<paged::StepRow> host_rows_;
  int64_t step_capacity_ = 0;
  paged::AttentionShape shape_;
  paged::ShardSpec shard_spec_;
  paged::SplitPlan split_plan_, whole_plan_;
  int32_t split_rows_ = 0;
  bool kivi_fused_ = false;  // kivi attends through kivi_attention (else materializes)

  std::vector<StepRows> step_;
  int32_t step_rows_ = 0;
  int32_t dense_rows_ = 0;  // the step's materialize rows (materialize_rows); 0 if fused
  bool in_step_ = false;
};

}  // namespace

std::unique_ptr<DeviceCache> make_quantized_device_cache(const Model& model,
                                                         const CacheOptions& options,
                                                         cuda::Stream& stream, cuda::Blas& blas) {
  return std::make_unique<QuantizedDeviceCache>(model, options, stream, blas);
}

}  // namespace xq
