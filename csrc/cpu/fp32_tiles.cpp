// fp32 GEMM register tiles for pixel rows times a 1x1 weight: out = act(a w^T + bias [+ residual]), for the
// channels_last 1x1 convolutions and both FFN GEMMs. The weight is packed once into panels of 64 output channels
// (k x 64, zero past n); a tile of 6 rows x 64 channels stays in 24 registers over the whole K sum, and the bias,
// residual and ReLU are applied before it leaves them, so no pass over the accumulators follows the GEMM. Rows of A
// are read in place, one value broadcast per row and k. Tried on S1/S4 shapes (Intel Xeon family 6 model 167,
// 2026-12-03): 14 x 32 and 8 x 48 tiles ran slower than 6 x 64 on most shapes; blocking K (128 or 192: the B block
// in L1, C reloaded) and software prefetch of B on every tile were slower or no faster (but see kPrefetchAhead).
#include "common.h"

#include <atomic>
#include <chrono>
#include <cstdlib>

namespace shvit_cpu {
inline namespace CPU_CAPABILITY {

namespace {

constexpr int64_t kPanel = 64;  // output channels per packed panel: four vectors
constexpr int kTileRows = 6;    // 6 x 4 accumulators, four B vectors and a broadcast
// Weight panels one pass over the rows multiplies: about 1 MiB of B, so it stays in L2 while the rows stream by.
constexpr int64_t kGroupBytes = int64_t(1) << 20;

#if defined(CPU_CAPABILITY_AVX512)
// Rows of A are addressed three per base pointer (base + {0, 1, 2} * lda): with one pointer per row, 14-row tiles
// ran out of general registers and the compiler reloaded the pointers from the stack on every k.
// The first row tile of each panel group reads the group's panels from memory (the weights are cold: every other
// kernel of the forward ran since this weight's last call); it requests each panel row 2 KiB ahead, which the hardware
// prefetchers did not cover. In-process A/B on the fused forward (one thread unless said, Intel Xeon family 6 model
// 167, 2026-12-05): S1 batch 1 8.83 -> 8.35 and 9.52 -> 8.87 ms (two threads 6.58 -> 6.13), S4 batch 1 27.7 -> 26.3,
// S1 batch 16 67.0 -> 66.3 and 66.4 -> 66.4, S4 batch 16 259 -> 255. 1-2 KiB ahead was best of 1-16 KiB; on every
// tile (B then comes from L2) batch 1 gained a little more but batch 16 lost 1%.
constexpr int64_t kPrefetchAhead = 512;  // floats: two panel rows of k

template <int MR, int NV, bool kPrefetch>
inline __attribute__((always_inline)) void tile(const float* a, int64_t lda, const float* panel, int64_t k,
                                                const float* bias, const float* residual, int64_t ld, bool relu,
                                                float* out, __mmask16 last_mask) {
  constexpr int kBases = (MR + 2) / 3;
  __m512 acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  const float* base[kBases];
  for (int g = 0; g < kBases; ++g) base[g] = a + 3 * g * lda;
  const float* const end = a + k;
  const float* b = panel;
#pragma GCC unroll 2
  while (base[0] < end) {
    if constexpr (kPrefetch)
      for (int v = 0; v < 4; ++v) _mm_prefetch(reinterpret_cast<const char*>(b + kPrefetchAhead + 16 * v), _MM_HINT_T0);
    __m512 bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(b + 16 * v);
    for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(base[i / 3][(i % 3) * lda]);
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(av, bv[v], acc[i][v]);
    }
    for (int g = 0; g < kBases; ++g) ++base[g];
    b += kPanel;
  }
  const __m512 zero = _mm512_setzero_ps();
  for (int i = 0; i < MR; ++i) {
    for (int v = 0; v < NV; ++v) {
      const __mmask16 mask = v == NV - 1 ? last_mask : __mmask16(0xFFFF);
      __m512 r = _mm512_add_ps(acc[i][v], _mm512_loadu_ps(bias + 16 * v));
      if (residual) r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(mask, residual + i * ld + 16 * v));
      if (relu) r = _mm512_max_ps(r, zero);
      _mm512_mask_storeu_ps(out + i * ld + 16 * v, mask, r);
    }
  }
}

template <int NV, bool kPrefetch>
void tile_rows(int mr, const float* a, int64_t lda, const float* panel, int64_t k, const float* bias,
               const float* residual, int64_t ld, bool relu, float* out, __mmask16 last_mask) {
  switch (mr) {
    case 1: return tile<1, NV, kPrefetch>(a, lda, panel, k, bias, residual, ld, relu, out, last_mask);
    case 2: return tile<2, NV, kPrefetch>(a, lda, panel, k, bias, residual, ld, relu, out, last_mask);
    case 3: return tile<3, NV, kPrefetch>(a, lda, panel, k, bias, residual, ld, relu, out, last_mask);
    case 4: return tile<4, NV, kPrefetch>(a, lda, panel, k, bias, residual, ld, relu, out, last_mask);
    case 5: return tile<5, NV, kPrefetch>(a, lda, panel, k, bias, residual, ld, relu, out, last_mask);
    case 6: return tile<6, NV, kPrefetch>(a, lda, panel, k, bias, residual, ld, relu, out, last_mask);
  }
  TORCH_CHECK(false, "fp32 tiles: ", mr, " rows per tile, expected 1..", kTileRows);
}

// out (rows x n, ld n) = act(a panels + bias [+ residual]): for each group of panels, every 6-row tile of A meets
// every panel of the group (A's tile stays in L1, the group in L2).
void rows_times_panels(const float* a, int64_t rows, int64_t lda, const float* panels, int64_t k, int64_t n,
                       const float* bias, const float* residual, bool relu, float* out) {
  const int64_t n_panels = ceil_div(n, kPanel);
  const int64_t group = std::max<int64_t>(1, kGroupBytes / (k * kPanel * int64_t(sizeof(float))));
  for (int64_t g0 = 0; g0 < n_panels; g0 += group) {
    const int64_t g1 = std::min(n_panels, g0 + group);
    for (int64_t i0 = 0; i0 < rows; i0 += kTileRows) {
      const int mr = static_cast<int>(std::min<int64_t>(kTileRows, rows - i0));
      for (int64_t j = g0; j < g1; ++j) {
        const int64_t cols = std::min(kPanel, n - j * kPanel), rem = cols % 16;
        const __mmask16 last_mask = rem == 0 ? __mmask16(0xFFFF) : __mmask16((1u << rem) - 1);
        const auto run = i0 == 0 ? (cols > 48   ? tile_rows<4, true>
                                    : cols > 32 ? tile_rows<3, true>
                                    : cols > 16 ? tile_rows<2, true>
                                                : tile_rows<1, true>)
                                 : (cols > 48   ? tile_rows<4, false>
                                    : cols > 32 ? tile_rows<3, false>
                                    : cols > 16 ? tile_rows<2, false>
                                                : tile_rows<1, false>);
        run(mr, a + i0 * lda, lda, panels + j * k * kPanel, k, bias + j * kPanel,
            residual ? residual + i0 * n + j * kPanel : nullptr, n, relu, out + i0 * n + j * kPanel, last_mask);
      }
    }
  }
}
#endif

constexpr int kAuto = 0, kTiles = 1, kBrgemm = 2;

int parse_mode(const std::string& mode, const char* what) {
  if (mode == "auto") return kAuto;
  if (mode == "tiles") return kTiles;
  if (mode == "brgemm") return kBrgemm;
  TORCH_CHECK(false, what, " must be 'auto', 'tiles' or 'brgemm', got '", mode, "'");
  return kAuto;
}

std::atomic<int>& mode() {
  static std::atomic<int> value([] {
    const char* env = std::getenv("SHVIT_CPU_FP32_GEMM");
    return env && *env ? parse_mode(env, "SHVIT_CPU_FP32_GEMM") : kAuto;
  }());
  return value;
}

bool tiles_built() {
#if defined(CPU_CAPABILITY_AVX512)
  return true;
#else
  return false;
#endif
}

// Whether the tiles beat brgemm with its epilogue pass here: a 168 x 256 x 256 product of each, alternately, best of
// seven (a few milliseconds in all). brgemm must win by 3% (as autotune asks of a backend over the fixed order's
// first): the two ran within noise of each other on some shapes, and a busy host flipped the choice between runs.
bool measured_tiles_faster() {
#if defined(CPU_CAPABILITY_AVX512)
  constexpr int64_t m = 168, k = 256, n = 256;
  // b is both brgemm's k x n matrix and the tiles' (n / 64, k, 64) panels: every value the same.
  std::vector<float> a(m * k, 0.5f), b(k * n, 0.25f), c(m * n), bias(n, 0.f);
  MatB<float> mat;
  mat.assign(b.data(), k, n, n);
  MatmulThreadGuard guard;
  double tiles = 1e30, brgemm = 1e30;
  for (int rep = 0; rep < 7; ++rep) {
    auto start = std::chrono::steady_clock::now();
    rows_times_panels(a.data(), m, k, b.data(), k, n, bias.data(), nullptr, true, c.data());
    tiles = std::min(tiles, seconds_since(start));
    start = std::chrono::steady_clock::now();
    matmul(m, a.data(), k, mat, c.data(), n);
    for (int64_t r = 0; r < m; ++r)
      epilogue_run(c.data() + r * n, bias.data(), 0.f, static_cast<const float*>(nullptr), true, c.data() + r * n, n);
    brgemm = std::min(brgemm, seconds_since(start));
  }
  return tiles < 1.03 * brgemm;
#else
  return false;
#endif
}

}  // namespace

std::string fp32_gemm() {
  switch (mode().load()) {
    case kTiles: return "tiles";
    case kBrgemm: return "brgemm";
    default: return "auto";
  }
}

std::string set_fp32_gemm(const std::string& next) {
  const int value = parse_mode(next, "set_fp32_gemm: mode");
  TORCH_CHECK(value != kTiles || tiles_built(), "set_fp32_gemm: 'tiles' needs the AVX-512 build, this one is ",
              C10_STRINGIZE(CPU_CAPABILITY));
  const std::string previous = fp32_gemm();
  mode().store(value);
  return previous;
}

bool f32_tiles_usable() {
  if (!tiles_built()) return false;
  const int value = mode().load();
  if (value != kAuto) return value == kTiles;
  static const bool faster = measured_tiles_faster();
  return faster;
}

F32Weight f32_weight(const at::Tensor& weight, const float* bias) {
  F32Weight w;
  w.n = weight.size(0), w.k = weight.numel() / w.n;
  const int64_t n_pad = ceil_div(w.n, kPanel) * kPanel;
  w.panels = derived_weight(weight, "fp32 panels", [&] {  // (n / 64 rounded up, k, 64), zero past n
    const at::Tensor matrix = weight.reshape({w.n, w.k}).to(at::kFloat);
    if (matrix.stride(1) == 1 || matrix.stride(0) == 1) {
      // In one pass, in an empty_output block: derived_weight frees a weight's stale panels first, so a training step
      // (which repacks every weight) reuses them. ATen's pad, transpose and copy took ~100 us per copy for a 640 x 320
      // weight, five per Conv+BN forward (an S1 forward at 64 px, batch 2, after an in-place weight update: 27-29 ms,
      // 14-15 with unchanged weights, 22 with this; one thread, Intel Xeon family 6 model 167, 2026-12-04).
      at::Tensor packed = empty_output({n_pad / kPanel, w.k, kPanel}, matrix.options(), at::MemoryFormat::Contiguous);
      pack_transposed_blocks(matrix.data_ptr<float>(), w.n, w.k, matrix.stride(0), matrix.stride(1), kPanel, w.k,
                             packed.data_ptr<float>());
      return packed;
    }
    return at::constant_pad_nd(matrix, {0, 0, 0, n_pad - w.n})
        .reshape({n_pad / kPanel, kPanel, w.k})
        .transpose(1, 2)
        .contiguous();
  });
  w.bias.assign(n_pad, 0.f);
  if (bias) std::copy_n(bias, w.n, w.bias.data());
  return w;
}

void f32_rows(const float* a, int64_t rows, int64_t lda, const F32Weight& w, const float* residual, bool relu,
              float* out) {
#if defined(CPU_CAPABILITY_AVX512)
  rows_times_panels(a, rows, lda, w.panels.data_ptr<float>(), w.k, w.n, w.bias.data(), residual, relu, out);
#else
  (void)a, (void)rows, (void)lda, (void)w, (void)residual, (void)relu, (void)out;
  TORCH_CHECK(false, "f32_rows: the fp32 tiles need the AVX-512 build");
#endif
}

}  // namespace CPU_CAPABILITY
}  // namespace shvit_cpu
