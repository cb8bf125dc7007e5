// Shared pieces of the CPU kernels: argument checks, fp32 <-> storage-dtype vector loads and stores, the fused
// bias / residual / ReLU epilogue, a row-major GEMM with fp32 accumulation, and tiling helpers.
//
// Everything sits in an inline namespace named after CPU_CAPABILITY so the DEFAULT / AVX2 / AVX512 builds of
// these sources can be loaded into one process side by side.
#pragma once

// ATen only: torch/extension.h (all of libtorch's C++ API and pybind11) tripled each kernel file's compile time;
// bindings.cpp is the one file that needs it.
#include <ATen/ATen.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <memory>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

// The dtypes every kernel here implements (float64 / float16 are declined by the Python side).
#define SHVIT_DISPATCH_FLOAT_BF16(dtype, name, ...) \
  AT_DISPATCH_SWITCH(dtype, name, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace shvit_cpu {
inline namespace CPU_CAPABILITY {

using at::BFloat16;
using fVec = at::vec::Vectorized<float>;
constexpr int64_t kVec = fVec::size();
// fVec's register type, for accumulator arrays: fVec's constructor zeroes its lanes, and where an array of fVec
// reached memory (an epilogue taking its address), GCC zeroed it there with a `rep stos` on every tile call.
#if defined(CPU_CAPABILITY_AVX512)
using fReg = __m512;
#elif defined(CPU_CAPABILITY_AVX2)
using fReg = __m256;
#else
using fReg = fVec;
#endif

// ------------------------------------------------------------------------------------------------------------
// Argument checks (clear messages naming the op, the argument and what was expected)
// ------------------------------------------------------------------------------------------------------------
void check_float_tensor(const at::Tensor& t, const char* op, const char* name, int64_t ndim);
void check_same_dtype(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name);
void check_shape(const at::Tensor& t, at::IntArrayRef shape, const char* op, const char* name);
// A 1-D float32/bfloat16 CPU tensor of length n (BatchNorm / GroupNorm parameters and statistics).
void check_channel_vector(const at::Tensor& t, const char* op, const char* name, int64_t n);

// Arguments of an op on x with two chained 1x1 convs, C -> hidden -> C (ffn_fused, squeeze_excite): x 4-D and
// non-empty, w1 (hidden, C, 1, 1) and w2 (C, hidden, 1, 1) in x's dtype, b1 (hidden), b2 (C).
struct BottleneckShape {
  int64_t batch, c, hidden, pixels;
};
BottleneckShape check_bottleneck_args(const char* op, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                                      const at::Tensor& w2, const at::Tensor& b2);

// v[offset, offset + n) as a parameter gradient of the given dtype (accumulated in fp64, rounded once).
at::Tensor as_param_grad(const std::vector<double>& v, int64_t offset, int64_t n, at::ScalarType dtype);

// The layout a kernel computes in: channels_last when x is channels_last (and not also plain contiguous), as the
// op wrapper's memory-format rule decides; outputs are allocated in it so the wrapper needs no copy.
at::MemoryFormat activation_format(const at::Tensor& x);

// The contiguous transpose of a 2-D tensor, in 16 x 16 blocks so both sides stay in cache: about ten times faster
// than t().contiguous() for the weight transposes the channels_last GEMMs need on every call. A matrix stored
// transposed comes back as a view. Read-only use.
at::Tensor transposed(const at::Tensor& m);
// dst (cols x rows) = src (rows x cols)^T, both contiguous, in 16 x 16 (fp32) or 32 x 32 (bf16) blocks (inline inside
// a parallel region).
void transpose_matrix(const float* src, int64_t rows, int64_t cols, float* dst);
void transpose_matrix(const BFloat16* src, int64_t rows, int64_t cols, BFloat16* dst);
// The weight blocks the GEMM tiles read: for a (n x m) matrix of 32-bit values at src (row stride ld_row, column
// stride ld_col, one of them 1), block b (width x m_pad at dst + b * m_pad * width, row-major) holds its rows
// [b width, b width + width) transposed: element (r, j) = src(b width + j, r), zero past n and past m. fp32 panels
// (width 64) and AMX's VNNI pair blocks (width 32, a bf16 pair per value) are both this; split between the threads.
void pack_transposed_blocks(const float* src, int64_t n, int64_t m, int64_t ld_row, int64_t ld_col, int64_t width,
                            int64_t m_pad, float* dst);
// A 2-D tensor as a contiguous row-major matrix, blocked-transposing one stored transposed (an input-major 1x1
// weight, which the NCHW kernels read as the A operand of W X).
at::Tensor contiguous_matrix(const at::Tensor& m);

// An uninitialised output tensor. Ones of at least 256 KiB reuse blocks released by earlier outputs of the same
// size: fresh pages cost a fault and the kernel's zeroing each, which glibc makes ATen pay on every forward for
// activations of a MiB and more (a 12.8 MB stem output: 1.8 ms to allocate and fill fresh, 0.2 ms reused). With
// only 4 MiB and more cached, S1's 1.6-3.2 MB activations still took 1,500-2,700 faults per forward at ~1.8 us each
// (Xeon 6/207 VM, 2026-12-01): the forward ran 4% faster without them. The cache holds
// at most 4 blocks per size and 512 MiB in all (SHVIT_CPU_OUTPUT_CACHE_MB, or set_output_cache_limit; 0 or
// SHVIT_CPU_OUTPUT_CACHE=0 turns it off); a block no call took for idle_output_allocations() allocations is freed
// on the next miss. The outputs are ordinary resizable CPU tensors.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat format);
// t in `dtype` and memory format `format`: t itself where it is already, else a copy in an empty_output block. A
// kernel's widened or narrowed activations are as large as its outputs, and fresh from at::empty they page-fault on
// every call.
at::Tensor converted(const at::Tensor& t, at::ScalarType dtype, at::MemoryFormat format);
// Frees the cached blocks (returns the bytes freed); the bytes cached now; sets the most bytes kept cached (freeing
// blocks over it) and returns the previous limit.
int64_t release_cached_outputs();
int64_t cached_output_bytes();
int64_t set_output_cache_limit(int64_t max_bytes);
int64_t idle_output_allocations();

// A tensor computed from weight w by make() (a packed, widened or transposed copy), remembered while w's storage
// lives and its version is unchanged, so a constant weight is repacked once instead of on every call (S1's bf16
// FFN at 320 channels spent about 200 of a 730 us call repacking its two weights, Zen 5, 2026-12-02). `kind` names
// what make() builds (a string literal). Writing to w in place bumps its version, so the copy is rebuilt; so does a
// change of 16 elements sampled across w, for the in-place updates that leave the version as it was (torch's fused
// AdamW, which changes every element; writes through .data, unseen only if they miss all 16). Inference tensors have
// no version counter and non-dense ones no sample: never remembered. Entries of freed weights are dropped on the
// next insertion.
at::Tensor derived_weight(const at::Tensor& w, const char* kind, const std::function<at::Tensor()>& make);
// Entries held now; drops them all and returns how many there were.
int64_t derived_weight_count();
int64_t clear_derived_weights();

// A parameter vector (bias) as a contiguous fp32 vector: itself when it is one, else a converted copy remembered as
// derived_weight keeps packed weights (a bf16 model converted each of its ~90 biases on every forward).
at::Tensor float_vector(const at::Tensor& t);

// Bias (or zeros when absent) as a contiguous fp32 vector of length n.
at::Tensor bias_as_float(const std::optional<at::Tensor>& bias, int64_t n, const at::Tensor& like);

// ------------------------------------------------------------------------------------------------------------
// Vector loads/stores that widen to / round from fp32 (bf16 rounding is round-to-nearest-even, as PyTorch's).
// ------------------------------------------------------------------------------------------------------------
inline fVec load_f(const float* p) { return fVec::loadu(p); }
inline fVec load_f(const float* p, int64_t n) { return fVec::loadu(p, n); }
inline fVec load_f(const BFloat16* p) {
  fVec v;
  at::vec::load_to_float<BFloat16>(p, v);
  return v;
}
inline fVec load_f(const BFloat16* p, int64_t n) {
  auto wide = at::vec::convert_to_float<BFloat16>(at::vec::Vectorized<BFloat16>::loadu(p, n));
  return std::get<0>(wide);
}
inline void store_f(const fVec& v, float* p) { v.store(p); }
inline void store_f(const fVec& v, float* p, int64_t n) { v.store(p, n); }
// bf16: ATen's convert_from_float rounds two vectors at a time (here v twice); with AVX-512, one vector's rounding by
// the same function (bit-identical), the cost of every bf16 epilogue's store.
#if defined(CPU_CAPABILITY_AVX512)
inline __m256i bf16_bits(const fVec& v) { return at::vec::cvtfp32_bf16(static_cast<__m512>(v)); }
// 16 bf16 values (their bits) widened, exactly, to fp32.
inline fVec bf16_to_f(__m256i bits) {
  return fVec(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16)));
}
inline void store_f(const fVec& v, BFloat16* p) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16_bits(v)); }
inline void store_f(const fVec& v, BFloat16* p, int64_t n) {
  _mm256_mask_storeu_epi16(p, static_cast<__mmask16>((1u << n) - 1), bf16_bits(v));
}
#else
inline void store_f(const fVec& v, BFloat16* p) { at::vec::convert_from_float<BFloat16>(v, v).store(p, kVec); }
inline void store_f(const fVec& v, BFloat16* p, int64_t n) { at::vec::convert_from_float<BFloat16>(v, v).store(p, n); }
#endif

// v rounded to T's precision and widened back (exact for float): the rounding an eager op's output in T gets.
template <typename T>
inline fVec round_to(const fVec& v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, BFloat16>)
      return bf16_to_f(bf16_bits(v));
#endif
    return std::get<0>(at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(v, v)));
  }
}

// kVec doubles as two native double vectors, for fp64 accumulation of fp32 vectors. A plain pair rather than ATen's
// VectorizedN, whose copies went through the stack in pieces of another width (store-forwarding stalls that made
// conv_bn_train's fp64 variance pass most of its cost).
struct dVec {
  using Half = at::vec::Vectorized<double>;
  static constexpr int64_t kHalf = Half::size();
  Half lo, hi;
  dVec() = default;
  explicit dVec(double v) : lo(v), hi(v) {}
  dVec(const Half& l, const Half& h) : lo(l), hi(h) {}
  friend dVec operator+(const dVec& a, const dVec& b) { return {a.lo + b.lo, a.hi + b.hi}; }
  friend dVec operator-(const dVec& a, const dVec& b) { return {a.lo - b.lo, a.hi - b.hi}; }
  friend dVec operator*(const dVec& a, const dVec& b) { return {a.lo * b.lo, a.hi * b.hi}; }
  // The first n lanes of v, the rest of base.
  static dVec set(const dVec& base, const dVec& v, int64_t n) {
    return {Half::set(base.lo, v.lo, std::min(n, kHalf)), n > kHalf ? Half::set(base.hi, v.hi, n - kHalf) : base.hi};
  }
  void store(double* p, int64_t n) const {
    lo.store(p, static_cast<int>(std::min(n, kHalf)));
    if (n > kHalf) hi.store(p + kHalf, static_cast<int>(n - kHalf));
  }
  static dVec loadu(const double* p, int64_t n) {
    return {Half::loadu(p, static_cast<int>(std::min(n, kHalf))),
            n > kHalf ? Half::loadu(p + kHalf, static_cast<int>(n - kHalf)) : Half(0.0)};
  }
};
static_assert(2 * dVec::kHalf == kVec, "two double vectors must hold one float vector");

inline float sum_lanes(const fVec& v) { return at::vec::vec_reduce_all<float>(std::plus<fVec>(), v); }
inline double sum_lanes(const dVec& v) { return at::vec::vec_reduce_all<double>(std::plus<dVec::Half>(), v.lo + v.hi); }

// ATen has no vector float -> double conversion (its generic one goes through memory element by element).
inline dVec widen(const fVec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 f = v;
  return {dVec::Half(_mm512_cvtps_pd(_mm512_castps512_ps256(f))),
          dVec::Half(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f), 1))))};
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 f = v;
  return {dVec::Half(_mm256_cvtps_pd(_mm256_castps256_ps128(f))), dVec::Half(_mm256_cvtps_pd(_mm256_extractf128_ps(f, 1)))};
#else
  __at_align__ float lanes[kVec];
  v.store(lanes);
  __at_align__ double wide[kVec];
  for (int64_t i = 0; i < kVec; ++i) wide[i] = lanes[i];
  return {dVec::Half::loadu(wide), dVec::Half::loadu(wide + dVec::kHalf)};
#endif
}

// v rounded to fp32 (round-to-nearest-even), the inverse of widen.
inline fVec narrow(const dVec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(_mm512_cvtpd_ps(v.lo))),
                                             _mm256_castps_pd(_mm512_cvtpd_ps(v.hi)), 1));
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_set_m128(_mm256_cvtpd_ps(v.hi), _mm256_cvtpd_ps(v.lo));
#else
  __at_align__ double wide[kVec];
  v.lo.store(wide);
  v.hi.store(wide + dVec::kHalf);
  __at_align__ float lanes[kVec];
  for (int64_t i = 0; i < kVec; ++i) lanes[i] = static_cast<float>(wide[i]);
  return fVec::loadu(lanes);
#endif
}

// out[i] = act(acc[i] + bias + residual[i]) for a contiguous run of n values. The bias either varies along the
// run (bias_run, channels_last rows) or is one value for the run (bias_const, NCHW rows). acc may alias out.
template <typename T>
inline void epilogue_run(const float* acc, const float* bias_run, float bias_const, const T* residual, bool relu, T* out,
                         int64_t n) {
  const fVec zero(0.f), bias_splat(bias_const);
  int64_t i = 0;
  for (; i + kVec <= n; i += kVec) {
    fVec v = load_f(acc + i) + (bias_run ? load_f(bias_run + i) : bias_splat);
    if (residual) v = v + load_f(residual + i);
    if (relu) v = at::vec::maximum(v, zero);
    store_f(v, out + i);
  }
  if (i < n) {
    const int64_t r = n - i;
    fVec v = load_f(acc + i, r) + (bias_run ? load_f(bias_run + i, r) : bias_splat);
    if (residual) v = v + load_f(residual + i, r);
    if (relu) v = at::vec::maximum(v, zero);
    store_f(v, out + i, r);
  }
}

// Channel sums of one image (c channels of `plane` pixels, channels_last or NCHW) in fp32, for the pooling ops.
template <typename T>
inline void channel_sums(const T* x, bool channels_last, int64_t c, int64_t plane, float* sums) {
  if (channels_last) {
    std::fill(sums, sums + c, 0.f);
    for (int64_t p = 0; p < plane; ++p) {
      const T* px = x + p * c;
      int64_t i = 0;
      for (; i + kVec <= c; i += kVec) store_f(load_f(sums + i) + load_f(px + i), sums + i);
      if (i < c) store_f(load_f(sums + i, c - i) + load_f(px + i, c - i), sums + i, c - i);
    }
    return;
  }
  for (int64_t ch = 0; ch < c; ++ch) {
    const T* px = x + ch * plane;
    fVec acc(0.f);
    int64_t i = 0;
    for (; i + kVec <= plane; i += kVec) acc = acc + load_f(px + i);
    float total = sum_lanes(acc);
    for (; i < plane; ++i) total += static_cast<float>(px[i]);
    sums[ch] = total;
  }
}

// out[i] = max(in[i], 0) for a contiguous run, rounded to out's dtype (exact when in has out's dtype).
template <typename I, typename T>
inline void relu_copy(const I* in, T* out, int64_t n) {
  const fVec zero(0.f);
  int64_t i = 0;
  for (; i + kVec <= n; i += kVec) store_f(at::vec::maximum(load_f(in + i), zero), out + i);
  if (i < n) store_f(at::vec::maximum(load_f(in + i, n - i), zero), out + i, n - i);
}

// ------------------------------------------------------------------------------------------------------------
// Row-major GEMM, C[m, n] = alpha * op(A)[m, k] op(B)[k, n] + beta * C, accumulating and writing fp32.
// Uses MKL's single-call routines when torch's MKL exports them (sequential inside at::parallel_for workers),
// else falls back to at::mm on views.
// ------------------------------------------------------------------------------------------------------------
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc);
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const BFloat16* a, int64_t lda,
          const BFloat16* b, int64_t ldb, float beta, float* c, int64_t ldc);
// "mkl" or "aten": which GEMM the calls above use (for tests and reports).
std::string gemm_provider();

// B operand of C = A B for the oneDNN brgemm micro-kernel (at::native::cpublas::brgemm), which on this kind of
// processor is about twice as fast as MKL's sgemm: fp32 is used in place; bf16 is copied into VNNI pairs
// (K/2, N, 2). bf16 with odd K has no VNNI form and goes through gemm() instead.
template <typename T>
struct MatB {
  const T* data = nullptr;
  int64_t k = 0, n = 0, ld = 0;
  bool vnni = false;
  // The VNNI copy, grown as needed and never value-initialised (assign writes every element: zero-filling it was 4%
  // of a bf16 1x1 conv backward's samples on a Xeon with AMX, 2026-12-04).
  std::unique_ptr<T[]> storage;
  int64_t storage_size = 0;
  // bf16 when bf16_widened(): B held as fp32 at `wide` (k x n, row-major, ld = n) and multiplied in fp32.
  bool widened = false;
  const float* wide = nullptr;
  std::vector<float> wide_storage;
  at::Tensor packed;  // a remembered packed weight (derived_weight) that data or wide point into
  void assign(const T* b, int64_t rows, int64_t cols, int64_t ldb);
  // B = w^T for a 1x1 conv weight w (cols, rows, 1, 1) or a matrix (cols, rows) in either layout, of dtype T or
  // (T = float) bf16, widened: read in place (fp32) when stored input-channel major, i.e. w^T contiguous, as
  // shvit.fuse keeps CPU weights; otherwise packed once per weight version (derived_weight). w must outlive the MatB.
  void assign_weight(const at::Tensor& w);
};

// Whether ATen's bf16 brgemm micro-kernel runs here (oneDNN enabled, AVX-512 core); when not, bf16 GEMMs go
// through gemm() on plain (non-VNNI) operands.
bool bf16_brgemm_usable();

// How bf16 GEMMs multiply: "dot", bf16 pair products (AVX512_BF16 or AMX, through the VNNI micro-kernel), or
// "fp32", operands widened to fp32 (exactly) and multiplied by fp32 FMAs. Both accumulate in fp32. "auto" times
// both micro-kernels once per process and keeps the faster: an Intel Xeon without AMX ran VDPBF16PS at half its
// fp32 FMA rate (92 vs 191 GFLOP/s, 2026-12-01), so bf16 products lost there. SHVIT_CPU_BF16_PRODUCTS sets the
// initial mode; set_bf16_products returns the previous one.
std::string bf16_products();
std::string set_bf16_products(const std::string& mode);
// The mode in force, "auto" resolved (measured on first use).
bool bf16_widened();

// bf16 GEMMs on AMX tiles (amx_tiles.cpp): usable where the processor has AMX-BF16, Linux grants the tile state, bf16
// multiplies as pairs and the switch (SHVIT_CPU_AMX=0, set_amx_tiles) is on. The pair kernels (pair_rows, the dense
// channels_last convs) then run on tiles instead of VDPBF16PS.
bool amx_usable();
bool set_amx_tiles(bool on);
// The processor has AMX-BF16 tiles and this process may use them (whatever the switch says).
bool amx_available();
// What the pair kernels multiply on: "amx", "avx512_bf16" or "none" (not usable: ATen's paths or widened fp32).
std::string bf16_pair_unit();
// A (n, c_in[, kh, kw]) bf16 weight packed for amx_rows, kept per weight version: (n / 32 rounded up, kh, seg_pad / 2,
// 32, 2) bf16, each kernel row's kw * c_pad values (c_in zero-padded to c_pad) padded to seg_pad, a multiple of 32;
// its bias (fp32) zero-padded to whole blocks.
struct AmxWeight {
  at::Tensor blocks;
  std::vector<float> bias;
  int64_t n = 0, segments = 0, seg_k = 0, seg_pad = 0;
};
AmxWeight amx_weight(const at::Tensor& weight, int64_t c_pad, const float* bias);
// Where row 0's seg_k values of one kernel row start, and which kernel row of the weight (index) they multiply.
struct AmxSegment {
  const BFloat16* a;
  int64_t index;
};
// out (m x n, ld n) = bf16(act(sum over segments s of A_s W_s^T + bias [+ residual (ld n)])), where row r of A_s is
// the seg_k values at s.a + r * lda; one thread.
void amx_rows(const AmxSegment* segments, int64_t n_segments, int64_t m, int64_t lda, const AmxWeight& w,
              const BFloat16* residual, bool relu, BFloat16* out);

// bf16 GEMMs on this extension's AVX512_BF16 pair-product tiles (conv_bias_act.cpp's pair_conv): usable where the
// processor has the instructions and bf16 multiplies as pairs (not bf16_widened()).
bool pair_products_usable();
// A (n, k[, 1, 1]) weight (k even) packed for pair_rows, kept per weight version, and its bias padded to whole blocks.
struct PairWeight {
  at::Tensor blocks;  // (n / (16 vecs) rounded up, k / 2, 16 vecs, 2) bf16; empty when amx is
  std::vector<float> bias;
  int64_t n = 0, k = 0;
  int vecs = 0;  // channel vectors per block: 1 for n <= 16, else 2
  std::optional<AmxWeight> amx;  // the weight packed for AMX tiles, where amx_usable()
};
PairWeight pair_weight(const at::Tensor& weight, const float* bias);
// out (rows x n, ld n) = bf16(act(a w^T + bias [+ residual (ld n)])), a (rows x k, ld lda) read in place; one thread.
void pair_rows(const BFloat16* a, int64_t rows, int64_t lda, const PairWeight& w, const BFloat16* residual, bool relu,
               BFloat16* out);

// fp32 register tiles for pixel rows times a 1x1 weight (fp32_tiles.cpp), in place of brgemm plus an epilogue pass
// for the channels_last 1x1 convolutions and the FFN. Usable in the AVX-512 build when the mode allows: "tiles",
// "brgemm" or "auto" (both timed once per process; brgemm kept only if 3% faster); SHVIT_CPU_FP32_GEMM sets the
// initial mode, set_fp32_gemm returns the previous one.
std::string fp32_gemm();
std::string set_fp32_gemm(const std::string& mode);
bool f32_tiles_usable();
// A (n, k[, 1, 1]) weight packed for f32_rows, kept per weight version, and its bias padded to whole panels.
struct F32Weight {
  at::Tensor panels;  // (n / 64 rounded up, k, 64) fp32, zero past n
  std::vector<float> bias;
  int64_t n = 0, k = 0;
};
F32Weight f32_weight(const at::Tensor& weight, const float* bias);
// out (rows x n, ld n) = act(a w^T + bias [+ residual (ld n)]), a (rows x k, ld lda) read in place; one thread.
void f32_rows(const float* a, int64_t rows, int64_t lda, const F32Weight& w, const float* residual, bool relu,
              float* out);

// dst = the rows x cols bf16 matrix at src (leading dimension ld) widened, exactly, to a contiguous fp32 matrix.
void widen_matrix(const BFloat16* src, int64_t rows, int64_t cols, int64_t ld, std::vector<float>& dst);

// Seconds on the steady clock since start (the one-off per-process timings that pick a kernel path).
double seconds_since(std::chrono::steady_clock::time_point start);

// The arithmetic peak of one core, measured by a register-resident loop (tens of ms): "fp32_fma" (this build's
// vector width; 0 in the portable build), "bf16_dot" (512-bit VDPBF16PS, 64 flops each) or "amx_bf16" (TDPBF16PS on
// four independent accumulator tiles, 16,384 flops each); 0 where this build or processor has none.
double peak_gflops(const std::string& kind);
// GFLOP/s of `iters` rounds of four tile multiplies (amx_tiles.cpp); 0 where AMX is not available.
double amx_bf16_gflops(int64_t iters);

// True when the 2-D view of weight w (cols, rows[, 1, 1]) is the transpose of a contiguous (rows, cols) matrix.
bool is_input_major(const at::Tensor& w);

// C[m, n] = A[m, k] B[k, n] (row-major, fp32 C overwritten, or added to when accumulate), k and n from b. lda may be
// smaller than k: rows of A may overlap, which is how the dense convolution reads a kernel row's patch in place.
template <typename T>
void matmul(int64_t m, const T* a, int64_t lda, const MatB<T>& b, float* c, int64_t ldc, bool accumulate = false);

// Releases the micro-kernel's per-thread state; construct one in each parallel task that calls matmul.
struct MatmulThreadGuard {
  ~MatmulThreadGuard();
};

// Rows per tile so that a tile's fp32 working set (row_floats per row) stays around L2 size, in a number of tiles
// that the threads share evenly.
int64_t rows_per_tile(int64_t total_rows, int64_t row_floats, int64_t multiple = 16);

// An uninitialised buffer of n T's, for per-thread scratch that a kernel writes before it reads: std::vector
// value-initialises, and zeroing the FFN's 0.16-0.27 MB hidden tile on every call made it 1.05-1.10x slower (bf16
// S1 shapes, one thread, Zen 5).
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t n) : data_(n > 0 ? new T[n] : nullptr) {}
  T* data() const { return data_.get(); }
  bool empty() const { return data_ == nullptr; }

 private:
  std::unique_ptr<T[]> data_;
};

// Pixel tile for NCHW kernels: as rows_per_tile, but never under 64 columns (narrower GEMMs waste the vector width).
int64_t pixels_per_tile(int64_t pixels, int64_t row_floats);

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace CPU_CAPABILITY
}  // namespace shvit_cpu
