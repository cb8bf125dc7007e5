#include "common.h"

#include <ATen/native/CPUBlas.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/accumulate.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <mutex>
#include <string>
#include <unordered_map>

extern "C" {
// MKL (LP64) entry points exported by libtorch_cpu when torch is built with MKL; weak so the extension still
// loads, and uses at::mm, when they are absent.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha, const uint16_t* a,
                            int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
}

namespace shvit_cpu {
inline namespace CPU_CAPABILITY {

namespace {
// Column panel per micro-kernel call, so the panel of B stays in L2 while every row of A streams past it.
constexpr int64_t kPanelCols = 128;
}  // namespace

void check_float_tensor(const at::Tensor& t, const char* op, const char* name, int64_t ndim) {
  TORCH_CHECK(t.defined(), op, ": '", name, "' must be a tensor, got None");
  TORCH_CHECK(t.device().is_cpu(), op, ": '", name, "' must be on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": '", name,
              "' must be float32 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(ndim < 0 || t.dim() == ndim, op, ": '", name, "' must be ", ndim, "-D, got shape ", t.sizes());
  // A zero-size dimension anywhere would reach tile sizes and weight packing as a division by zero.
  TORCH_CHECK(t.numel() > 0, op, ": '", name, "' must not be empty (it has a zero-size dimension), got shape ",
              t.sizes());
}

void check_same_dtype(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": '", name, "' has dtype ", t.scalar_type(), " but 'x' has ",
              x.scalar_type(), "; they must match");
}

void check_shape(const at::Tensor& t, at::IntArrayRef shape, const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == shape, op, ": '", name, "' must have shape ", shape, ", got ", t.sizes());
}

void check_channel_vector(const at::Tensor& t, const char* op, const char* name, int64_t n) {
  check_float_tensor(t, op, name, 1);
  check_shape(t, {n}, op, name);
}

BottleneckShape check_bottleneck_args(const char* op, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                                      const at::Tensor& w2, const at::Tensor& b2) {
  check_float_tensor(x, op, "x", 4);
  TORCH_CHECK(x.numel() > 0, op, ": 'x' must not be empty, got shape ", x.sizes());
  check_float_tensor(w1, op, "w1", 4);
  check_float_tensor(w2, op, "w2", 4);
  check_same_dtype(w1, x, op, "w1");
  check_same_dtype(w2, x, op, "w2");
  const BottleneckShape s{x.size(0), x.size(1), w1.size(0), x.size(2) * x.size(3)};
  check_shape(w1, {s.hidden, s.c, 1, 1}, op, "w1");
  check_shape(w2, {s.c, s.hidden, 1, 1}, op, "w2");
  check_channel_vector(b1, op, "b1", s.hidden);
  check_channel_vector(b2, op, "b2", s.c);
  return s;
}

at::Tensor as_param_grad(const std::vector<double>& v, int64_t offset, int64_t n, at::ScalarType dtype) {
  at::Tensor t = at::empty({n}, at::TensorOptions().dtype(at::kDouble));
  std::copy(v.begin() + offset, v.begin() + offset + n, t.data_ptr<double>());
  return t.to(dtype);
}

at::MemoryFormat activation_format(const at::Tensor& x) {
  if (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::MemoryFormat::ChannelsLast;
  return at::MemoryFormat::Contiguous;
}

at::Tensor bias_as_float(const std::optional<at::Tensor>& bias, int64_t n, const at::Tensor& like) {
  if (!bias.has_value() || !bias->defined()) return at::zeros({n}, like.options().dtype(at::kFloat));
  return float_vector(*bias);
}

namespace {

constexpr size_t kReuseMinBytes = size_t(256) << 10, kDefaultMaxCachedMiB = 512, kMaxBlocksPerSize = 4;
constexpr uint64_t kIdleAllocations = 1024;

size_t max_cached_bytes_from_env() {
  const char* off = std::getenv("SHVIT_CPU_OUTPUT_CACHE");
  if (off && std::string(off) == "0") return 0;
  const char* mib = std::getenv("SHVIT_CPU_OUTPUT_CACHE_MB");
  if (!mib || !*mib) return kDefaultMaxCachedMiB << 20;
  char* end = nullptr;
  const long long value = std::strtoll(mib, &end, 10);
  TORCH_CHECK(end && *end == '\0' && value >= 0, "SHVIT_CPU_OUTPUT_CACHE_MB must be a non-negative integer (MiB), got '",
              mib, "'");
  return static_cast<size_t>(value) << 20;
}

// A cached block and the cache's allocation count when it was cached.
struct FreeBlock {
  void* data;
  uint64_t since;
};

struct OutputCache {
  std::mutex mutex;
  std::unordered_map<size_t, std::vector<FreeBlock>> free_blocks;  // by size in bytes
  uint64_t allocations = 0;  // empty_output calls of cacheable sizes
  size_t cached_bytes = 0;
  size_t max_cached_bytes = max_cached_bytes_from_env();  // 0: the cache is off
};

// Never destroyed: tensors holding cached blocks may be freed after static destructors have run.
OutputCache& output_cache() {
  static OutputCache* cache = new OutputCache();
  return *cache;
}

// Frees cached blocks, largest first, until at most `limit` bytes stay cached. Caller holds the mutex.
void trim_locked(OutputCache& cache, size_t limit) {
  std::vector<size_t> sizes;
  for (auto& entry : cache.free_blocks) sizes.push_back(entry.first);
  std::sort(sizes.rbegin(), sizes.rend());
  for (size_t bytes : sizes) {
    auto& blocks = cache.free_blocks[bytes];
    while (cache.cached_bytes > limit && !blocks.empty()) {
      c10::free_cpu(blocks.back().data);
      blocks.pop_back();
      cache.cached_bytes -= bytes;
    }
    if (blocks.empty()) cache.free_blocks.erase(bytes);
  }
}

// On a miss (a size the cache has no block for), frees the blocks no call has taken for kIdleAllocations
// allocations: sizes a run stopped using (another batch size, an image size, eval after training). A training step
// takes every size again within a step, a few hundred allocations later (the forward's blocks wait for the backward
// and the next step): 64 freed them on every step, and glibc returned their pages, whose faults then took 4% of S1's
// fp32 step (two threads, batch 16: 111.6 -> 106.8 ms at 1024, 8,300 -> 1,200 faults per step; AMD Zen 5,
// 2026-12-04). The blocks a step keeps cached are free, not live (see benchmarks/device.py's peak measures).
void free_idle_locked(OutputCache& cache) {
  for (auto entry = cache.free_blocks.begin(); entry != cache.free_blocks.end();) {
    auto& blocks = entry->second;
    for (size_t i = 0; i < blocks.size();) {
      if (cache.allocations - blocks[i].since > kIdleAllocations) {
        c10::free_cpu(blocks[i].data);
        cache.cached_bytes -= entry->first;
        blocks.erase(blocks.begin() + static_cast<std::ptrdiff_t>(i));
      } else {
        ++i;
      }
    }
    entry = blocks.empty() ? cache.free_blocks.erase(entry) : std::next(entry);
  }
}

void return_block(void* block, size_t bytes) {
  OutputCache& cache = output_cache();
  {
    std::lock_guard<std::mutex> lock(cache.mutex);
    auto& blocks = cache.free_blocks[bytes];
    if (blocks.size() < kMaxBlocksPerSize && cache.cached_bytes + bytes <= cache.max_cached_bytes) {
      blocks.push_back(FreeBlock{block, cache.allocations});
      cache.cached_bytes += bytes;
      return;
    }
    if (blocks.empty()) cache.free_blocks.erase(bytes);
  }
  c10::free_cpu(block);
}

// The deleter context of a cached block (a DataPtr deleter gets one pointer).
struct CachedBlock {
  void* data;
  size_t bytes;
};

void delete_cached_block(void* context) {
  auto* block = static_cast<CachedBlock*>(context);
  return_block(block->data, block->bytes);
  delete block;
}

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat format) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  OutputCache& cache = output_cache();
  void* block = nullptr;
  {
    std::lock_guard<std::mutex> lock(cache.mutex);
    if (bytes < kReuseMinBytes || cache.max_cached_bytes == 0) return at::empty(sizes, options.memory_format(format));
    ++cache.allocations;
    auto it = cache.free_blocks.find(bytes);
    if (it != cache.free_blocks.end() && !it->second.empty()) {
      block = it->second.back().data;
      it->second.pop_back();
      cache.cached_bytes -= bytes;
    } else {
      free_idle_locked(cache);
    }
  }
  if (!block) block = c10::alloc_cpu(bytes);
  std::vector<int64_t> strides(sizes.size(), 1);
  if (format == at::MemoryFormat::ChannelsLast && sizes.size() == 4) {
    strides = c10::get_channels_last_strides_2d(sizes);
  } else {
    for (int64_t d = static_cast<int64_t>(sizes.size()) - 2; d >= 0; --d) strides[d] = strides[d + 1] * std::max<int64_t>(sizes[d + 1], 1);
  }
  // A resizable storage backed by the CPU allocator, like at::empty's: resize_ / out= into the output reallocate
  // through that allocator and hand the cached block back (from_blob storages cannot grow, and a failed resize left
  // a tensor whose sizes outran its storage).
  c10::DataPtr data(block, new CachedBlock{block, bytes}, &delete_cached_block, c10::Device(c10::kCPU));
  auto storage = c10::make_intrusive<c10::StorageImpl>(c10::StorageImpl::use_byte_size_t(), bytes, std::move(data),
                                                       c10::GetCPUAllocator(), /*resizable=*/true);
  at::Tensor out = at::detail::make_tensor<c10::TensorImpl>(c10::Storage(std::move(storage)),
                                                            c10::DispatchKeySet(c10::DispatchKey::CPU), options.dtype());
  out.unsafeGetTensorImpl()->set_sizes_and_strides(sizes, strides);
  return out;
}

at::Tensor converted(const at::Tensor& t, at::ScalarType dtype, at::MemoryFormat format) {
  if (t.scalar_type() == dtype && t.is_contiguous(format)) return t;
  return empty_output(t.sizes(), t.options().dtype(dtype), format).copy_(t);
}

int64_t set_output_cache_limit(int64_t max_bytes) {
  TORCH_CHECK(max_bytes >= 0, "shvit cpp set_output_cache_limit: 'max_bytes' must be >= 0, got ", max_bytes);
  OutputCache& cache = output_cache();
  std::lock_guard<std::mutex> lock(cache.mutex);
  const int64_t previous = static_cast<int64_t>(cache.max_cached_bytes);
  cache.max_cached_bytes = static_cast<size_t>(max_bytes);
  trim_locked(cache, cache.max_cached_bytes);
  return previous;
}

int64_t release_cached_outputs() {
  OutputCache& cache = output_cache();
  std::lock_guard<std::mutex> lock(cache.mutex);
  const int64_t freed = static_cast<int64_t>(cache.cached_bytes);
  trim_locked(cache, 0);
  return freed;
}

int64_t idle_output_allocations() { return static_cast<int64_t>(kIdleAllocations); }

int64_t cached_output_bytes() {
  OutputCache& cache = output_cache();
  std::lock_guard<std::mutex> lock(cache.mutex);
  return static_cast<int64_t>(cache.cached_bytes);
}

namespace {

// dst (cols x rows) = src (rows x cols)^T, both contiguous, in square blocks.
template <typename E>
void transpose_blocked(const E* src, int64_t rows, int64_t cols, E* dst) {
  // 32 x 32 for 2-byte elements: ATen transposes those in 32 x 32 tiles, and 16 x 16 blocks ran them as masked tiles
  // (a tenth of a bf16 1x1 conv backward's samples on a Xeon, 2026-12-03).
  constexpr int64_t kBlock = sizeof(E) == 2 ? 32 : 16;
  // Weights are transposed / packed on every call outside the kernels' parallel regions: split large ones over
  // the threads too (S1's bf16 weights: about 1 ms per forward on one thread). Nested in a parallel region this
  // runs inline.
  const int64_t row_blocks = ceil_div(rows, kBlock), grain = ceil_div(int64_t{32768}, kBlock * std::max<int64_t>(cols, 1));
  at::parallel_for(0, row_blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0 * kBlock; i < std::min(rows, b1 * kBlock); i += kBlock)
      for (int64_t j = 0; j < cols; j += kBlock)
        at::vec::transpose_mxn<E>(src + i * cols + j, cols, dst + j * rows + i, rows,
                                  static_cast<int>(std::min(kBlock, rows - i)),
                                  static_cast<int>(std::min(kBlock, cols - j)));
  });
}

}  // namespace

at::Tensor transposed(const at::Tensor& m) {
  TORCH_CHECK(m.dim() == 2, "shvit cpp transposed: expected a 2-D tensor, got shape ", m.sizes());
  if (m.t().is_contiguous()) return m.t();  // stored transposed already (an input-major weight)
  const at::Tensor src = m.contiguous();
  at::Tensor dst = at::empty({src.size(1), src.size(0)}, src.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "shvit_transposed", [&] {
    transpose_blocked(src.data_ptr<scalar_t>(), src.size(0), src.size(1), dst.data_ptr<scalar_t>());
  });
  return dst;
}

at::Tensor contiguous_matrix(const at::Tensor& m) { return m.is_contiguous() ? m : transposed(m.t()); }

void transpose_matrix(const float* src, int64_t rows, int64_t cols, float* dst) { transpose_blocked(src, rows, cols, dst); }
void transpose_matrix(const BFloat16* src, int64_t rows, int64_t cols, BFloat16* dst) {
  transpose_blocked(src, rows, cols, dst);
}

void pack_transposed_blocks(const float* src, int64_t n, int64_t m, int64_t ld_row, int64_t ld_col, int64_t width,
                            int64_t m_pad, float* dst) {
  TORCH_CHECK(ld_row == 1 || ld_col == 1, "pack_transposed_blocks: one stride must be 1, got ", ld_row, " and ",
              ld_col);
  const int64_t blocks = ceil_div(n, width);
  // At least 64 Ki values per thread: a training step repacks every weight, and with 1 Mi values per thread S1's
  // packs ran on one thread of two (1.1% of its fp32 step's samples on the main thread, none on the other).
  const int64_t grain = std::max<int64_t>(1, int64_t{65536} / std::max<int64_t>(m * width, 1));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * width, cols = std::min(width, n - n0);
      float* block = dst + b * m_pad * width;
      if (ld_col == 1) {  // rows of the matrix: transposed in 16 x 16 blocks
        at::vec::transpose_mxn<float>(src + n0 * ld_row, ld_row, block, width, static_cast<int>(cols),
                                      static_cast<int>(m));
      } else {  // its columns are contiguous: each block row is a copy
        for (int64_t r = 0; r < m; ++r) std::copy_n(src + r * ld_col + n0, cols, block + r * width);
      }
      if (cols < width)
        for (int64_t r = 0; r < m; ++r) std::fill(block + r * width + cols, block + (r + 1) * width, 0.f);
      std::fill(block + m * width, block + m_pad * width, 0.f);
    }
  });
}

namespace {

struct DerivedEntry {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  uint32_t version;
  uint64_t sample;  // content_sample(w) when value was made
  at::Tensor value;
};

// A hash of 16 elements spread over w's memory, first and last included. Some in-place updates leave the version
// counter as it was: torch's fused AdamW (torch.optim.AdamW(fused=True), as `shvit train` builds it; torch 2.13), and
// writes through .data. An optimizer step changes every element, so it changes these; a copy made before it is not
// reused (a functional op trained with fused AdamW ran on stale weights from its second step on).
uint64_t content_sample(const at::Tensor& w) {
  const auto* bytes = static_cast<const unsigned char*>(w.data_ptr());
  const int64_t n = w.numel(), size = static_cast<int64_t>(w.element_size());
  uint64_t hash = 1469598103934665603ull;  // FNV-1a
  for (int i = 0; i < 16 && n > 0; ++i) {
    const int64_t at = (n - 1) * i / 15;
    for (int64_t b = 0; b < size; ++b) hash = (hash ^ bytes[at * size + b]) * 1099511628211ull;
  }
  return hash;
}

struct DerivedWeights {
  std::mutex mutex;
  std::unordered_map<std::string, DerivedEntry> entries;
};

DerivedWeights& derived_weights() {
  static auto* cache = new DerivedWeights();  // never destroyed: tensors may be freed after static destructors run
  return *cache;
}

// kind, data pointer, dtype, sizes and strides: a view of the same storage with another shape is another entry.
std::string derived_key(const at::Tensor& w, const char* kind) {
  std::string key(kind);
  key.push_back('\0');
  auto put = [&key](int64_t v) { key.append(reinterpret_cast<const char*>(&v), sizeof v); };
  put(reinterpret_cast<intptr_t>(w.data_ptr()));
  put(static_cast<int64_t>(w.scalar_type()));
  for (const int64_t size : w.sizes()) put(size);
  for (const int64_t stride : w.strides()) put(stride);
  return key;
}

}  // namespace

at::Tensor derived_weight(const at::Tensor& w, const char* kind, const std::function<at::Tensor()>& make) {
  // No version counter: a copy kept could outlive an in-place change of w unnoticed. (No warning: the unfused
  // model's eval-mode Conv+BN folds fresh weights on every call under inference mode, where the copy could not be
  // reused anyway; shvit.fuse and the fused modules keep normal tensors.)
  // Packed copies are the kernels' own: made without autograd history, which would tie a cached copy to the
  // weight's graph (whose last reference, dropped here by a worker thread, can need the GIL that the calling
  // thread holds: a deadlock, seen with an NCHW stem batch on two threads).
  c10::AutoGradMode grad_off(false);
  // Sampled by memory offset: only a dense w's elements are 0 .. numel - 1 from its data pointer.
  if (w.is_inference() || !w.is_non_overlapping_and_dense()) return make();
  const c10::StorageImpl* storage = w.storage().unsafeGetStorageImpl();
  const uint32_t version = w.unsafeGetTensorImpl()->version_counter().current_version();
  const uint64_t sample = content_sample(w);
  const std::string key = derived_key(w, kind);
  DerivedWeights& cache = derived_weights();
  // Copies no longer valid (this one's stale version, freed weights' entries) are dropped before make() runs, so
  // their blocks are free for it: a training step repacks every weight, and fresh blocks page-faulted (40% of the
  // samples of one-thread S1 forwards at 64 px, each after an in-place weight update; Intel Xeon family 6 model 167,
  // 2026-12-04).
  std::vector<at::Tensor> dropped;
  {
    std::lock_guard<std::mutex> lock(cache.mutex);
    const auto it = cache.entries.find(key);
    // A live weak pointer to the same StorageImpl: the weight was not freed (and its address reused) meanwhile.
    if (it != cache.entries.end() && it->second.version == version && it->second.sample == sample &&
        !it->second.storage.expired() && it->second.storage._unsafe_get_target() == storage)
      return it->second.value;
    if (it != cache.entries.end()) {
      dropped.push_back(std::move(it->second.value));
      cache.entries.erase(it);
    }
    for (auto e = cache.entries.begin(); e != cache.entries.end();) {
      if (!e->second.storage.expired()) {
        ++e;
        continue;
      }
      dropped.push_back(std::move(e->second.value));
      e = cache.entries.erase(e);
    }
  }
  dropped.clear();  // outside the lock: a freed block goes back to empty_output's cache under its own
  at::Tensor value = make();
  // A view of w itself (nothing to pack) would keep w's storage alive through the cache.
  if (value.is_alias_of(w)) return value;
  std::lock_guard<std::mutex> lock(cache.mutex);
  cache.entries.insert_or_assign(key, DerivedEntry{w.storage().getWeakStorageImpl(), version, sample, value});
  return value;
}

at::Tensor float_vector(const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat && t.is_contiguous()) return t;
  return derived_weight(t, "fp32 vector", [&] { return t.to(at::kFloat).contiguous(); });
}

int64_t derived_weight_count() {
  DerivedWeights& cache = derived_weights();
  std::lock_guard<std::mutex> lock(cache.mutex);
  return static_cast<int64_t>(cache.entries.size());
}

int64_t clear_derived_weights() {
  DerivedWeights& cache = derived_weights();
  std::lock_guard<std::mutex> lock(cache.mutex);
  const int64_t held = static_cast<int64_t>(cache.entries.size());
  cache.entries.clear();
  return held;
}

namespace {

at::Tensor operand_view(const void* p, at::ScalarType dtype, bool trans, int64_t rows, int64_t cols, int64_t ld) {
  // op(X) is rows x cols; X itself is stored row-major with leading dimension ld.
  auto opts = at::TensorOptions().dtype(dtype);
  if (!trans) return at::from_blob(const_cast<void*>(p), {rows, cols}, {ld, 1}, opts);
  return at::from_blob(const_cast<void*>(p), {cols, rows}, {ld, 1}, opts).t();
}

void gemm_aten(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const void* a, int64_t lda,
               const void* b, int64_t ldb, float beta, float* c, int64_t ldc, at::ScalarType dtype) {
  auto prod = at::mm(operand_view(a, dtype, ta, m, k, lda).to(at::kFloat),
                     operand_view(b, dtype, tb, k, n, ldb).to(at::kFloat));
  auto cv = at::from_blob(c, {m, n}, {ldc, 1}, at::TensorOptions().dtype(at::kFloat));
  if (beta == 0.f) {
    cv.copy_(prod.mul_(alpha));
  } else {
    cv.mul_(beta).add_(prod, alpha);
  }
}

int as_int(int64_t v, const char* what) {
  TORCH_CHECK(v <= INT32_MAX, "shvit cpp gemm: ", what, " = ", v, " exceeds the 32-bit BLAS interface");
  return static_cast<int>(v);
}

}  // namespace

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
          int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (!sgemm_) return gemm_aten(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, at::kFloat);
  // Row-major C = A B is column-major C^T = B^T A^T: swap the operands.
  const char opb = tb ? 'T' : 'N', opa = ta ? 'T' : 'N';
  const int mi = as_int(n, "n"), ni = as_int(m, "m"), ki = as_int(k, "k");
  const int ldbi = as_int(ldb, "ldb"), ldai = as_int(lda, "lda"), ldci = as_int(ldc, "ldc");
  sgemm_(&opb, &opa, &mi, &ni, &ki, &alpha, b, &ldbi, a, &ldai, &beta, c, &ldci);
}

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const BFloat16* a, int64_t lda,
          const BFloat16* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  // Widened where AMX is available: MKL's bf16 GEMM runs on AMX tiles there and keeps their configuration loaded
  // from one call to the next, which ATen's brgemm and amx_rows replace in between; its next call then faulted on
  // unconfigured tiles (SIGILL, ffn_fused in bf16 NCHW with 1 or 3 channels, Xeon with AMX, 2026-12-02).
  if (bf16_widened() || amx_available()) {
    thread_local std::vector<float> a_wide, b_wide;
    const int64_t a_cols = ta ? m : k, b_cols = tb ? k : n;
    widen_matrix(a, ta ? k : m, a_cols, lda, a_wide);
    widen_matrix(b, tb ? n : k, b_cols, ldb, b_wide);
    return gemm(ta, tb, m, n, k, alpha, a_wide.data(), a_cols, b_wide.data(), b_cols, beta, c, ldc);
  }
  if (!cblas_gemm_bf16bf16f32) return gemm_aten(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, at::kBFloat16);
  constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;  // CBLAS enum values
  cblas_gemm_bf16bf16f32(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, as_int(m, "m"), as_int(n, "n"),
                         as_int(k, "k"), alpha, reinterpret_cast<const uint16_t*>(a), as_int(lda, "lda"),
                         reinterpret_cast<const uint16_t*>(b), as_int(ldb, "ldb"), beta, c, as_int(ldc, "ldc"));
}

std::string gemm_provider() { return (sgemm_ && cblas_gemm_bf16bf16f32) ? "mkl" : "aten"; }

bool bf16_brgemm_usable() {
  // ATen's bf16 brgemm needs oneDNN enabled and an AVX-512 core (it raises otherwise, e.g. on AVX2-only Zen 3);
  // one tiny call tells, whatever the torch version's checks are.
  if (!at::globalContext().userEnabledMkldnn()) return false;
  static const bool isa_ok = [] {
    try {
      const BFloat16 a[2] = {BFloat16(1.f), BFloat16(1.f)}, b[2] = {BFloat16(1.f), BFloat16(1.f)};
      float c = 0.f;
      at::native::cpublas::brgemm(1, 1, 2, 2, 1, 1, false, a, b, &c, true);
      at::native::cpublas::brgemm_release(true);
      return c == 2.f;
    } catch (const c10::Error&) {
      return false;
    }
  }();
  return isa_ok;
}

void widen_matrix(const BFloat16* src, int64_t rows, int64_t cols, int64_t ld, std::vector<float>& dst) {
  dst.resize(std::max<int64_t>(rows * cols, 1));
  for (int64_t r = 0; r < rows; ++r) at::vec::convert(src + r * ld, dst.data() + r * cols, cols);
}

namespace {

// Independent accumulator chains: enough to cover the FMA latency times two ports on current cores.
constexpr int kPeakChains = 16;

// The native vector type, so the compiler barrier below can keep `a` in a register.
#if defined(CPU_CAPABILITY_AVX512)
using NativeVec = __m512;
inline NativeVec fma_native(NativeVec a, NativeVec b, NativeVec c) { return _mm512_fmadd_ps(a, b, c); }
#elif defined(CPU_CAPABILITY_AVX2)
using NativeVec = __m256;
inline NativeVec fma_native(NativeVec a, NativeVec b, NativeVec c) { return _mm256_fmadd_ps(a, b, c); }
#endif

double fp32_fma_gflops(int64_t iters) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  NativeVec acc[kPeakChains];
  for (int i = 0; i < kPeakChains; ++i) acc[i] = fVec(1e-3f * i);
  NativeVec a = fVec(1.0001f), b = fVec(0.9999f);
  const auto start = std::chrono::steady_clock::now();
  for (int64_t it = 0; it < iters; ++it) {
    for (int i = 0; i < kPeakChains; ++i) acc[i] = fma_native(a, b, acc[i]);
    asm volatile("" : "+x"(a));  // keeps the loop from being folded
  }
  const double s = seconds_since(start);
  float sink = 0.f;
  for (int i = 0; i < kPeakChains; ++i) sink += sum_lanes(fVec(acc[i]));
  asm volatile("" : : "r"(sink));
  return iters * kPeakChains * 2.0 * kVec / s / 1e9;
#else
  (void)iters;
  return 0.0;  // no vector FMA in the portable build
#endif
}

#if defined(CPU_CAPABILITY_AVX512)
__attribute__((target("avx512bf16"))) double bf16_dot_gflops(int64_t iters) {
  __m512 acc[kPeakChains];
  for (int i = 0; i < kPeakChains; ++i) acc[i] = _mm512_setzero_ps();
  __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80), b = a;  // bf16 1.0
  const auto start = std::chrono::steady_clock::now();
  for (int64_t it = 0; it < iters; ++it) {
    for (int i = 0; i < kPeakChains; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
    asm volatile("" : "+x"(a));
  }
  const double s = seconds_since(start);
  float sink = 0.f;
  for (int i = 0; i < kPeakChains; ++i) sink += _mm512_reduce_add_ps(acc[i]);
  asm volatile("" : : "r"(sink));
  return iters * kPeakChains * 64.0 / s / 1e9;
}
#endif

}  // namespace

double peak_gflops(const std::string& kind) {
  // Best of several short runs: on a shared machine a short run often has the core to itself (the AMX loop measured
  // 940 to 2,250 GFLOP/s from one run to the next in one process on a KVM Xeon, 2026-12-02).
  constexpr int64_t kIters = 1 << 18;
  constexpr int kRuns = 9;
  TORCH_CHECK(kind == "fp32_fma" || kind == "bf16_dot" || kind == "amx_bf16",
              "peak_gflops: kind must be 'fp32_fma', 'bf16_dot' or 'amx_bf16', got '", kind, "'");
  double best = 0.0;
  for (int run = 0; run < kRuns; ++run) {
    if (kind == "amx_bf16") {
      best = std::max(best, amx_bf16_gflops(kIters / 16));
    } else if (kind == "fp32_fma") {
      best = std::max(best, fp32_fma_gflops(kIters));
    } else {
#if defined(CPU_CAPABILITY_AVX512)
      if (!__builtin_cpu_supports("avx512bf16")) return 0.0;
      best = std::max(best, bf16_dot_gflops(kIters));
#else
      return 0.0;
#endif
    }
  }
  return best;
}

namespace {

enum Bf16Mode : int { kAuto = 0, kDot = 1, kFp32 = 2 };

Bf16Mode parse_bf16_mode(const std::string& mode, const char* source) {
  if (mode == "auto") return kAuto;
  if (mode == "dot") return kDot;
  if (mode == "fp32") return kFp32;
  TORCH_CHECK(false, source, " must be 'auto', 'dot' or 'fp32', got '", mode, "'");
}

std::atomic<int>& bf16_mode() {
  static std::atomic<int> mode([] {
    const char* env = std::getenv("SHVIT_CPU_BF16_PRODUCTS");
    return static_cast<int>(env && *env ? parse_bf16_mode(env, "SHVIT_CPU_BF16_PRODUCTS") : kAuto);
  }());
  return mode;
}

// Best of a few runs of one micro-kernel call on a B panel of the shape matmul uses (seconds).
template <typename T>
double time_brgemm(int64_t m, int64_t n, int64_t k, bool vnni) {
  std::vector<T> a(m * k, T(0.5f)), b(k * n, T(0.25f));
  std::vector<float> c(m * n);
  double best = 1e30;
  for (int rep = 0; rep < 7; ++rep) {
    const auto start = std::chrono::steady_clock::now();
    at::native::cpublas::brgemm(m, n, k, k, n, n, false, a.data(), b.data(), c.data(), vnni);
    best = std::min(best, seconds_since(start));
  }
  at::native::cpublas::brgemm_release(vnni);
  return best;
}

// Whether bf16 pair products beat widening to fp32 on this processor: without the VNNI micro-kernel they cannot
// run at all; with it, a 192 x 128 x 256 product of each kind is timed (about a millisecond in all).
bool measured_widening_faster() {
  if (!bf16_brgemm_usable()) return true;
  const double dot = time_brgemm<BFloat16>(192, kPanelCols, 256, true);
  const double fp32 = time_brgemm<float>(192, kPanelCols, 256, false);
  return fp32 < dot;
}

}  // namespace

std::string bf16_products() {
  switch (bf16_mode().load()) {
    case kDot: return "dot";
    case kFp32: return "fp32";
    default: return "auto";
  }
}

std::string set_bf16_products(const std::string& mode) {
  const Bf16Mode next = parse_bf16_mode(mode, "set_bf16_products: mode");
  TORCH_CHECK(next != kDot || bf16_brgemm_usable(),
              "set_bf16_products: 'dot' needs ATen's bf16 micro-kernel (oneDNN on an AVX-512 core), not usable here");
  const std::string previous = bf16_products();
  bf16_mode().store(next);
  return previous;
}

bool bf16_widened() {
  const int mode = bf16_mode().load();
  if (mode != kAuto) return mode == kFp32;
  static const bool widen = measured_widening_faster();
  return widen;
}

template <>
void MatB<float>::assign(const float* b, int64_t rows, int64_t cols, int64_t ldb) {
  data = b, k = rows, n = cols, ld = ldb, vnni = false;
}

template <>
void MatB<BFloat16>::assign(const BFloat16* b, int64_t rows, int64_t cols, int64_t ldb) {
  k = rows, n = cols;
  widened = bf16_widened();
  if (widened) {
    data = b, ld = cols, vnni = false;
    widen_matrix(b, rows, cols, ldb, wide_storage);
    wide = wide_storage.data();
    return;
  }
  vnni = rows % 2 == 0 && bf16_brgemm_usable();
  if (!vnni) {
    data = b, ld = ldb;
    return;
  }
  if (storage_size < rows * cols) {
    storage.reset(new BFloat16[rows * cols]);
    storage_size = rows * cols;
  }
  // Large copies (a 1x1 conv backward's whole x) split over the threads, as transpose_blocked does; nested in a
  // parallel region, or small, this runs inline.
  const int64_t pairs = rows / 2, grain = ceil_div(int64_t{16384}, std::max<int64_t>(cols, 1));
  BFloat16* const out = storage.get();
  at::parallel_for(0, pairs, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t kk = 2 * p0; kk < 2 * p1; kk += 2) {
      const BFloat16 *even = b + kk * ldb, *odd = even + ldb;
      BFloat16* dst = out + kk * cols;
      int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX512)
      // 32 columns of the two rows at a time, interleaved by two word permutes (the scalar loop was 4% of a bf16 1x1
      // conv backward on a Xeon, 2026-12-03).
      const __m512i first = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7,
                                             38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
      const __m512i second = _mm512_add_epi16(first, _mm512_set1_epi16(16));
      for (; j + 32 <= cols; j += 32) {
        const __m512i e = _mm512_loadu_si512(even + j), o = _mm512_loadu_si512(odd + j);
        _mm512_storeu_si512(dst + 2 * j, _mm512_permutex2var_epi16(e, first, o));
        _mm512_storeu_si512(dst + 2 * j + 32, _mm512_permutex2var_epi16(e, second, o));
      }
#endif
      for (; j < cols; ++j) {
        dst[2 * j] = even[j];
        dst[2 * j + 1] = odd[j];
      }
    }
  });
  data = out, ld = cols;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

bool is_input_major(const at::Tensor& w) {
  const int64_t cols = w.size(0), rows = w.numel() / std::max<int64_t>(cols, 1);
  if (cols < 2 || rows < 2) return false;  // a vector: either layout is contiguous
  for (int64_t d = 2; d < w.dim(); ++d)
    if (w.size(d) != 1) return false;
  return w.stride(0) == 1 && w.stride(1) == cols;
}

namespace {

// B = w^T of a weight w (cols, rows[, 1, 1]) as a contiguous row-major (rows, cols) fp32 matrix (bf16 widened).
at::Tensor weight_b_fp32(const at::Tensor& w) {
  const int64_t cols = w.size(0), rows = w.numel() / cols;
  return transposed(w.reshape({cols, rows}).to(at::kFloat)).contiguous();
}

// B = w^T of a bf16 weight w (cols, rows[, 1, 1]), rows even, in VNNI pairs (rows / 2, cols, 2): the 32-bit
// transpose of w as a row-major (cols, rows) matrix.
at::Tensor weight_b_vnni(const at::Tensor& w) {
  const int64_t cols = w.size(0), rows = w.numel() / cols;
  const at::Tensor w_nk = contiguous_matrix(w.reshape({cols, rows}));
  at::Tensor b = at::empty({rows / 2, cols, 2}, w.options());
  transpose_blocked(reinterpret_cast<const float*>(w_nk.data_ptr<BFloat16>()), cols, rows / 2,
                    reinterpret_cast<float*>(b.data_ptr<BFloat16>()));
  return b;
}

}  // namespace

template <>
void MatB<float>::assign_weight(const at::Tensor& w) {
  const int64_t cols = w.size(0), rows = w.numel() / cols;
  if (w.scalar_type() == at::kFloat && is_input_major(w)) return assign(w.data_ptr<float>(), rows, cols, cols);
  packed = derived_weight(w, "B fp32", [&] { return weight_b_fp32(w); });
  assign(packed.data_ptr<float>(), rows, cols, cols);
}

template <>
void MatB<BFloat16>::assign_weight(const at::Tensor& w) {
  const int64_t cols = w.size(0), rows = w.numel() / cols;
  k = rows, n = cols, ld = cols, vnni = false, widened = bf16_widened();
  if (widened) {
    packed = derived_weight(w, "B fp32", [&] { return weight_b_fp32(w); });
    wide = packed.data_ptr<float>();
    data = nullptr;
  } else if (rows % 2 == 0 && bf16_brgemm_usable()) {
    packed = derived_weight(w, "B bf16 VNNI", [&] { return weight_b_vnni(w); });
    data = packed.data_ptr<BFloat16>(), vnni = true;
  } else if (is_input_major(w)) {
    data = w.data_ptr<BFloat16>();
  } else {
    packed = derived_weight(w, "B bf16", [&] { return transposed(w.reshape({cols, rows})).contiguous(); });
    data = packed.data_ptr<BFloat16>();
  }
}

template <typename T>
void matmul(int64_t m, const T* a, int64_t lda, const MatB<T>& b, float* c, int64_t ldc, bool accumulate) {
  if (m == 0 || b.n == 0) return;
  const bool fp32 = std::is_same<T, float>::value;
  if constexpr (std::is_same_v<T, BFloat16>) {
    if (b.widened) {
      // Rows may overlap (lda < k): widen the span they cover and keep lda; else each row, packed (ld = k).
      thread_local std::vector<float> a_wide;
      int64_t lda_wide = lda;
      if (lda < b.k) {
        const int64_t span = (m - 1) * lda + b.k;
        a_wide.resize(span);
        at::vec::convert(a, a_wide.data(), span);
      } else {
        widen_matrix(a, m, b.k, lda, a_wide);
        lda_wide = b.k;
      }
      MatB<float> b_wide;
      b_wide.assign(b.wide, b.k, b.n, b.n);
      return matmul<float>(m, a_wide.data(), lda_wide, b_wide, c, ldc, accumulate);
    }
  }
  if (!fp32 && !b.vnni) {
    TORCH_CHECK(lda >= b.k, "shvit cpp matmul: overlapping A rows (lda ", lda, " < k ", b.k, ") need an even k in bf16");
    return gemm(false, false, m, b.n, b.k, 1.f, a, lda, b.data, b.ld, accumulate ? 1.f : 0.f, c, ldc);
  }
  for (int64_t j0 = 0; j0 < b.n; j0 += kPanelCols) {
    const int64_t nc = std::min(kPanelCols, b.n - j0);
    at::native::cpublas::brgemm(m, nc, b.k, lda, b.ld, ldc, accumulate, a, b.data + j0 * (fp32 ? 1 : 2), c + j0,
                                !fp32);
  }
}
template void matmul<float>(int64_t, const float*, int64_t, const MatB<float>&, float*, int64_t, bool);
template void matmul<BFloat16>(int64_t, const BFloat16*, int64_t, const MatB<BFloat16>&, float*, int64_t, bool);

MatmulThreadGuard::~MatmulThreadGuard() {
  at::native::cpublas::brgemm_release(false);
  at::native::cpublas::brgemm_release(true);
}

int64_t rows_per_tile(int64_t total_rows, int64_t row_floats, int64_t multiple) {
  // 1 MiB of fp32 working set per tile: FFN tiles of S1/S4 shapes ran 2-4% faster than with 512 KiB (1 thread).
  constexpr int64_t kTargetFloats = 256 * 1024;
  const int64_t target = std::min<int64_t>(1024, std::max<int64_t>(multiple, kTargetFloats / std::max<int64_t>(row_floats, 1)));
  // A whole number of tiles per thread: with 5 tiles on 2 threads one thread idles for the last (S1's FFNs ran
  // 1.3-1.5x faster on 2 threads than on 1 before this).
  const int64_t threads = at::get_num_threads();
  const int64_t tiles = ceil_div(ceil_div(total_rows, target), threads) * threads;
  const int64_t rows = ceil_div(ceil_div(total_rows, tiles), multiple) * multiple;
  return std::min(rows, total_rows);
}

int64_t pixels_per_tile(int64_t pixels, int64_t row_floats) {
  return std::min<int64_t>(pixels, std::max<int64_t>(64, rows_per_tile(pixels, row_floats)));
}

}  // namespace CPU_CAPABILITY
}  // namespace shvit_cpu
