// The fp16 KV cache on the device: the CPU cache's blocks (runtime/cache_fp16.cpp)
// in one device arena, its bookkeeping on the host. A layout-only CPU twin
// supplies the block size, the pool's size and every formula, so the two
// caches admit the same sequences; the host mirrors the CPU cache's tables
// block for block (a sequence holds blocks_for_tokens(length) group blocks,
// no window) and uploads them with the step's rows at begin_step.
#include <algorithm>
#include <string>
#include <vector>

#include "kernels/cuda/device.h"
#include "kernels/cuda/paged_attention.h"
#include "kernels/error.h"
#include "runtime/block_pool.h"
#include "runtime/cache_fp16.h"
#include "runtime/cache_mode.h"
#include "runtime/device_cache_modes.h"
#include "runtime/sequence_shard.h"

namespace xq {
namespace {

namespace paged = cuda::paged;

// Rows up to which a step's attention splits each row's context (decode
// steps, small prefill chunks); above it each CTA walks a whole row, the rows
// themselves filling the device. Fixed per cache so that the split scratch
// never moves (captured graphs hold its address).
int32_t split_rows_for(int32_t sequences) {
  return std::clamp(sequences, 16, 256);
}

class Fp16DeviceCache final : public DeviceCache {
 public:
  // `twin`: the CPU cache of the same config and options, layout only.
  Fp16DeviceCache(const ModelConfig& config, std::unique_ptr<AttentionCache> twin,
                  const CacheOptions& options, cuda::Stream& stream)
      : config_(config), options_(options), stream_(stream), twin_(std::move(twin)) {
    layout_ = twin_->block_layout();
    if (!layout_.fp16) throw Error("device cache: the fp16 device cache got a quantized layout");
    layers_ = static_cast<int32_t>(layout_.layers.size());
    shard_ = sequence_shard(find_cache_mode(options.mode), config_, options.sequence_shards,
                            options.sequence_shard);
    sequences_ = options.sequences;
    pool_ = BlockPool(layout_.block_bytes, layout_.total_blocks, /*allocate=*/false);
    tables_.resize(static_cast<size_t>(sequences_));
    lengths_.assign(static_cast<size_t>(sequences_), 0);
    table_stride_ = std::max(1, twin_->blocks_for_tokens(options.max_tokens));

    arena_ = cuda::DeviceMemory(layout_.block_bytes * static_cast<size_t>(layout_.total_blocks));
    cuda::fill_zero(arena_.data(), arena_.bytes(), stream_);
    host_tables_.assign(static_cast<size_t>(sequences_) * table_stride_, 0);
    tables_device_ = cuda::DeviceMemory(host_tables_.size() * sizeof(int32_t));
    // A step has at most every sequence's whole context as rows.
    max_rows_ = static_cast<int64_t>(sequences_) * options.max_tokens;
    rows_device_ = cuda::DeviceMemory(static_cast<size_t>(max_rows_) * sizeof(paged::StepRow));
    const size_t table_floats = static_cast<size_t>(options.max_tokens) * config_.rope_dim;
    cos_sin_device_ = cuda::DeviceMemory(table_floats * sizeof(float));
    cuda::copy_to_device(cos_sin_device_.data(), options.rope_cos_sin, table_floats * sizeof(float),
                         stream_);

    shape_.kv_heads = config_.n_kv_heads;
    shape_.head_dim = config_.head_dim;
    shape_.heads = config_.n_heads;
    shape_.layer_bytes = layout_.fp16_layer_bytes;
    shape_.rope_dim = config_.rope_dim;
    shape_.rope_layout = config_.rope_layout;
    shard_spec_.shards = shard_.shards();
    shard_spec_.index = shard_.index();
    shard_spec_.unit = shard_.unit();
    const int32_t max_local = shard_.owned_before(options.max_tokens);
    split_plan_ = paged::plan_splits(max_local);
    whole_plan_.splits = 1;
    whole_plan_.tokens_per_split = split_plan_.splits * split_plan_.tokens_per_split;
    split_rows_ = split_rows_for(sequences_);
    if (split_plan_.splits > 1) {
      scratch_ = cuda::DeviceMemory(
          paged::split_scratch_floats(split_rows_, config_.n_heads, config_.head_dim, split_plan_) *
          sizeof(float));
    }
    upload_tables();
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

  void truncate(int32_t seq, int32_t from) override {
    if (in_step_) throw Error("device cache: truncate inside a step");
    truncate_now(check_seq(seq), from);
  }

  void fill_with_zeros(int32_t seq, int32_t tokens) override {
    if (in_step_) throw Error("device cache: fill inside a step");
    check_seq(seq);
    if (tokens < 0 || tokens > options_.max_tokens)
      throw Error("device cache: cannot fill " + std::to_string(tokens) + " tokens");
    truncate_now(seq, 0);
    resize_table(pool_, tables_[seq], blocks_for_tokens(tokens), 0);  // PoolExhausted: unchanged
    for (int32_t block : tables_[seq].groups)
      cuda::fill_zero(arena_.as<uint8_t>() + static_cast<size_t>(block) * layout_.block_bytes,
                      layout_.block_bytes, stream_);
    lengths_[seq] = tokens;
    upload_tables();
  }

  void begin_step(const std::vector<StepRows>& segments) override {
    if (in_step_) throw Error("device cache: begin_step before the previous step's end_step");
    const int64_t rows = check_step(*this, segments, options_.max_tokens);
    for (const StepRows& s : segments) {
      if (s.pos0 < lengths_[s.seq]) truncate_now(s.seq, s.pos0);
    }
    host_rows_.clear();
    host_rows_.reserve(static_cast<size_t>(rows));
    for (const StepRows& s : segments) {
      BlockTable& table = tables_[s.seq];
      const int32_t peak = std::max(table.held(), blocks_for_step(s.pos0, s.pos0 + s.n));
      resize_table(pool_, table, peak, 0);  // cannot fail: counted above
      for (int32_t i = 0; i < s.n; ++i) host_rows_.push_back({s.seq, s.pos0 + i});
    }
    upload_tables();
    if (!host_rows_.empty())
      cuda::copy_to_device(rows_device_.data(), host_rows_.data(),
                           host_rows_.size() * sizeof(paged::StepRow), stream_);
    step_ = segments;
    step_rows_ = static_cast<int32_t>(rows);
    in_step_ = true;
  }

  void run_layer(int32_t layer, const float*, const float* k, const float* v, const float* q,
                 float* out) override {
    check_layer(layer);
    if (shard_.sharded())
      throw Error("device cache: a sequence-sharded cache attends through run_layer_partial()");
    paged::AttentionTarget target;
    target.out = out;
    encode_and_attend(layer, k, v, q, target);
  }

  void run_layer_partial(int32_t layer, const float*, const float* k, const float* v,
                         const float* q, float* state_max, float* state_sum,
                         float* state_acc) override {
    check_layer(layer);
    if (!shard_.sharded())
      throw Error("device cache: run_layer_partial is for sequence-sharded caches");
    paged::AttentionTarget target;
    target.state_max = state_max;
    target.state_sum = state_sum;
    target.state_acc = state_acc;
    encode_and_attend(layer, k, v, q, target);
  }

  void end_step() override {
    if (!in_step_) throw Error("device cache: end_step without begin_step");
    for (const StepRows& s : step_) {
      lengths_[s.seq] = s.pos0 + s.n;
      resize_table(pool_, tables_[s.seq], blocks_for_tokens(lengths_[s.seq]), 0);
    }
    step_.clear();
    step_rows_ = 0;
    in_step_ = false;
  }

  void import_blocks(const AttentionCache& cpu) override {
    if (in_step_) throw Error("device cache: import inside a step");
    const CacheBlockLayout theirs = cpu.block_layout();
    if (cpu.mode() != mode() || theirs.block_bytes != layout_.block_bytes ||
        theirs.total_blocks != layout_.total_blocks || cpu.sequences() != sequences_)
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
    stream_.synchronize();  // the host arena may go once this returns
  }

  void download_arena(std::vector<uint8_t>& arena) const override {
    arena.resize(arena_.bytes());
    cuda::copy_to_host(arena.data(), arena_.data(), arena_.bytes(), stream_);
    stream_.synchronize();
  }

  const BlockTable& table(int32_t seq) const override { return tables_.at(check_seq(seq)); }

 private:
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

  void truncate_now(int32_t seq, int32_t from) {
    lengths_[seq] = std::min(lengths_[seq], std::max(0, from));
    resize_table(pool_, tables_[seq], blocks_for_tokens(lengths_[seq]), 0);  // only gives back
  }

  // Every sequence's table at its fixed place (sequences x table_stride).
  void upload_tables() {
    std::fill(host_tables_.begin(), host_tables_.end(), 0);
    for (int32_t s = 0; s < sequences_; ++s) {
      const BlockTable& table = tables_[s];
      if (static_cast<int32_t>(table.groups.size()) > table_stride_)
        throw Error("device cache: a table outgrew its row");
      std::copy(table.groups.begin(), table.groups.end(),
                host_tables_.begin() + static_cast<size_t>(s) * table_stride_);
    }
    cuda::copy_to_device(tables_device_.data(), host_tables_.data(),
                         host_tables_.size() * sizeof(int32_t), stream_);
  }

  paged::PagedArena arena_view() const {
    paged::PagedArena pool;
    pool.arena = arena_.as<uint8_t>();
    pool.block_bytes = layout_.block_bytes;
    pool.tables = tables_device_.as<const int32_t>();
    pool.table_stride = table_stride_;
    return pool;
  }

  void encode_and_attend(int32_t layer, const float* k, const float* v, const float* q,
                         const paged::AttentionTarget& target) {
    if (step_rows_ == 0) return;
    const paged::StepRow* rows = rows_device_.as<const paged::StepRow>();
    paged::fp16_encode(arena_view(), shape_, layer, rows, step_rows_, k, v,
                       cos_sin_device_.as<const float>(), shard_spec_, stream_);
    const bool split = split_plan_.splits > 1 && step_rows_ <= split_rows_;
    paged::fp16_attention(arena_view(), shape_, layer, rows, step_rows_, q, shard_spec_,
                          split ? split_plan_ : whole_plan_, split ? scratch_.as<float>() : nullptr,
                          target, stream_);
  }

  ModelConfig config_;
  CacheOptions options_;
  cuda::Stream& stream_;
  std::unique_ptr<AttentionCache> twin_;  // layout only: formulas and layout
  CacheBlockLayout layout_;
  int32_t layers_ = 0, sequences_ = 0;
  SequenceShard shard_;
  BlockPool pool_;
  std::vector<BlockTable> tables_;
  std::vector<int32_t> lengths_;
  int32_t table_stride_ = 0;
  int64_t max_rows_ = 0;

  cuda::DeviceMemory arena_, tables_device_, rows_device_, cos_sin_device_, scratch_;
  std::vector<int32_t> host_tables_;
  std::vector<paged::StepRow> host_rows_;
  paged::Fp16KvShape shape_;
  paged::ShardSpec shard_spec_;
  paged::SplitPlan split_plan_, whole_plan_;
  int32_t split_rows_ = 0;

  std::vector<StepRows> step_;
  int32_t step_rows_ = 0;
  bool in_step_ = false;
};

}  // namespace

std::unique_ptr<DeviceCache> make_fp16_device_cache(const Model& model, const CacheOptions& options,
                                                    cuda::Stream& stream) {
  CacheOptions twin_options = options;
  twin_options.layout_only = true;
  return std::make_unique<Fp16DeviceCache>(model.config(), make_cache(model, twin_options), options,
                                           stream);
}

std::unique_ptr<DeviceCache> make_fp16_device_cache(const ModelConfig& local_config,
                                                    const CacheOptions& options,
                                                    cuda::Stream& stream) {
  CacheOptions twin_options = options;
  twin_options.layout_only = true;
  return std::make_unique<Fp16DeviceCache>(
      local_config, std::make_unique<Fp16KvCache>(local_config, twin_options), options, stream);
}

}  // namespace xq
