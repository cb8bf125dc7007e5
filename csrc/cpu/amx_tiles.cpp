// bf16 GEMM tiles on AMX (Intel Sapphire Rapids and later): TDPBF16PS multiplies a 16 x 32 bf16 tile by a 32 x 16
// one (in VNNI pairs) into 16 x 16 fp32 sums, eight times the products per cycle of AVX512_BF16's VDPBF16PS. On a
// Xeon with AMX (family 6 model 167 VM, 2026-12-02) one core ran 940-2,250 GFLOP/s on tiles against 58-79 on
// VDPBF16PS, so the pair kernels' register tiles (conv_bias_act.cpp) cannot keep up with oneDNN's bf16 convolutions
// there.
//
// amx_rows computes a block of output rows x 32 channels in the four accumulator tiles, stores them to an L1 buffer
// and applies the pair kernels' epilogue (bias, residual, ReLU, bf16 rounding to nearest even) from there.
#include "ops.h"

#include <ATen/native/CPUBlas.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <limits>

#if defined(CPU_CAPABILITY_AVX512)
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace shvit_cpu {
inline namespace CPU_CAPABILITY {

namespace {

constexpr int64_t kRows = 32;      // output rows per block: two A tiles of 16
constexpr int64_t kChannels = 32;  // output channels per weight block: two B tiles of 16
constexpr int64_t kChunk = 32;     // K values per tile multiply (16 pairs)

std::atomic<bool>& amx_switch() {
  static std::atomic<bool> on([] {
    const char* env = std::getenv("SHVIT_CPU_AMX");
    if (!env || !*env || std::strcmp(env, "1") == 0) return true;
    TORCH_CHECK(std::strcmp(env, "0") == 0, "SHVIT_CPU_AMX must be '0' or '1', got '", env, "'");
    return false;
  }());
  return on;
}

#if defined(CPU_CAPABILITY_AVX512)
// The processor has AMX-TILE and AMX-BF16, the OS enables the tile state (XCR0 bits 17, 18), and Linux grants this
// process the tile data (arch_prctl ARCH_REQ_XCOMP_PERM; without it the first tile instruction faults).
bool amx_probe() {
  static const bool available = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    const bool tile = edx & (1u << 24), bf16 = edx & (1u << 22);
    if (!tile || !bf16 || !(ecx & (1u << 27))) return false;  // ecx bit 27: OSXSAVE (xgetbv allowed)
    const uint64_t xcr0 = _xgetbv(0);
    if ((xcr0 & (3u << 17)) != (3u << 17)) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return available;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles: sums 0 = rows [0, 16) x channels [0, 16), 1 = [0, 16) x [16, 32), 2 = [16, 32) x [0, 16), 3 = [16, 32) x
// [16, 32); activations 4 = rows [0, 16), 5 = rows [16, 32); weights 6, 7 = the two channel halves. A block of
// `rows` < 32 configures its tiles shorter (tiles 2, 3, 5 unused when rows <= 16).
__attribute__((target("amx-tile"))) void configure_tiles(int64_t rows) {
  TileConfig cfg;
  const uint8_t top = static_cast<uint8_t>(std::min<int64_t>(rows, 16)), bottom = static_cast<uint8_t>(rows - top);
  const uint8_t tile_rows[8] = {top, top, bottom, bottom, top, bottom, 16, 16};
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = tile_rows[t];
    cfg.colsb[t] = tile_rows[t] ? 64 : 0;
  }
  // GCC 12's _tile_loadconfig does not tell the compiler it reads cfg, which then drops the stores above.
  asm volatile("ldtilecfg %0" : : "m"(cfg));
}

// One K chunk of every row of a block: its first row (stride bytes apart) and its weight rows in a channel block.
struct Chunk {
  const BFloat16* a;
  int64_t stride;
  int64_t w;
};

// c (kRows x kChannels fp32, row stride kChannels) = the block's sums over chunks. kBottom: rows 16..31 exist;
// kRight: channels 16..31 exist.
template <bool kBottom, bool kRight>
__attribute__((target("amx-tile,amx-bf16"))) void tile_sums(const Chunk* chunks, int64_t n_chunks,
                                                            const BFloat16* w_block, float* c) {
  _tile_zero(0);
  if constexpr (kRight) _tile_zero(1);
  if constexpr (kBottom) _tile_zero(2);
  if constexpr (kBottom && kRight) _tile_zero(3);
  for (int64_t i = 0; i < n_chunks; ++i) {
    const Chunk& ch = chunks[i];
    const BFloat16* w = w_block + ch.w;
    _tile_loadd(6, w, kChannels * 2 * sizeof(BFloat16));
    if constexpr (kRight) _tile_loadd(7, w + 32, kChannels * 2 * sizeof(BFloat16));
    _tile_loadd(4, ch.a, ch.stride);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (kRight) _tile_dpbf16ps(1, 4, 7);
    if constexpr (kBottom) {
      _tile_loadd(5, reinterpret_cast<const char*>(ch.a) + 16 * ch.stride, ch.stride);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (kRight) _tile_dpbf16ps(3, 5, 7);
    }
  }
  constexpr int64_t ld = kChannels * sizeof(float);
  _tile_stored(0, c, ld);
  if constexpr (kRight) _tile_stored(1, c + 16, ld);
  if constexpr (kBottom) _tile_stored(2, c + 16 * kChannels, ld);
  if constexpr (kBottom && kRight) _tile_stored(3, c + 16 * kChannels + 16, ld);
}

// out[r, 0:channels) (row stride ld) = bf16(act(c[r] + bias [+ residual[r]])) for r < rows, channels <= 32; the pair
// kernels' epilogue (round to nearest even by VCVTNE2PS2BF16).
__attribute__((target("avx512bf16"))) void tile_epilogue(const float* c, int64_t rows, int64_t channels,
                                                         const float* bias, const BFloat16* residual, int64_t ld,
                                                         bool relu, BFloat16* out) {
  const fVec floor(relu ? 0.f : -std::numeric_limits<float>::infinity());
  const fVec bias0 = fVec::loadu(bias), bias1 = fVec::loadu(bias + 16);
  const __mmask32 mask = static_cast<__mmask32>((uint64_t(1) << channels) - 1);
  for (int64_t r = 0; r < rows; ++r) {
    fVec lo = fVec::loadu(c + r * kChannels) + bias0, hi = fVec::loadu(c + r * kChannels + 16) + bias1;
    if (residual) {
      const __m512i res = _mm512_maskz_loadu_epi16(mask, residual + r * ld);
      lo = lo + bf16_to_f(_mm512_castsi512_si256(res));
      hi = hi + bf16_to_f(_mm512_extracti64x4_epi64(res, 1));
    }
    const __m512bh packed = _mm512_cvtne2ps_pbh(at::vec::maximum(hi, floor), at::vec::maximum(lo, floor));
    _mm512_mask_storeu_epi16(out + r * ld, mask, (__m512i)packed);
  }
}

__attribute__((target("amx-tile"))) void release_tiles() { _tile_release(); }

__attribute__((target("amx-tile,amx-bf16"))) double tile_multiply_gflops(int64_t iters) {
  configure_tiles(kRows);
  alignas(64) BFloat16 ones[16 * kChunk];
  std::fill_n(ones, 16 * kChunk, BFloat16(1.f));
  _tile_loadd(4, ones, 64);
  _tile_loadd(5, ones, 64);
  _tile_loadd(6, ones, 64);
  _tile_loadd(7, ones, 64);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const auto start = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < iters; ++i) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  alignas(64) float sums[16 * 16];
  _tile_stored(0, sums, 64);
  const double s = seconds_since(start);
  release_tiles();
  TORCH_CHECK(sums[0] == float(kChunk * iters), "amx_bf16_gflops: the tiles summed ", sums[0], ", expected ",
              kChunk * iters);
  return iters * 4.0 * 16 * 16 * kChunk * 2 / s / 1e9;
}
#else
bool amx_probe() { return false; }
#endif

}  // namespace

bool amx_available() { return amx_probe(); }

double amx_bf16_gflops(int64_t iters) {
#if defined(CPU_CAPABILITY_AVX512)
  return amx_available() ? tile_multiply_gflops(iters) : 0.0;
#else
  (void)iters;
  return 0.0;
#endif
}

bool amx_usable() {
  return amx_available() && amx_switch().load(std::memory_order_relaxed) && !bf16_widened();
}

bool set_amx_tiles(bool on) { return amx_switch().exchange(on); }

std::string bf16_pair_unit() {
  if (!pair_products_usable()) return "none";
  return amx_usable() ? "amx" : "avx512_bf16";
}

AmxWeight amx_weight(const at::Tensor& weight, int64_t c_pad, const float* bias) {
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && (weight.dim() == 4 || weight.dim() == 2),
              "amx_weight: expects a bf16 (n, c_in[, kh, kw]) weight, got ", weight.sizes());
  AmxWeight w;
  const int64_t c_in = weight.size(1), kh = weight.dim() == 4 ? weight.size(2) : 1,
                kw = weight.dim() == 4 ? weight.size(3) : 1;
  TORCH_CHECK(c_pad >= c_in && (kw * c_pad) % 2 == 0, "amx_weight: c_pad ", c_pad, " must be >= c_in ", c_in,
              " with an even kernel row");
  w.n = weight.size(0), w.segments = kh, w.seg_k = kw * c_pad, w.seg_pad = ceil_div(w.seg_k, kChunk) * kChunk;
  const int64_t blocks = ceil_div(w.n, kChannels);
  w.blocks = derived_weight(weight, "amx blocks", [&] {
    if (kh == 1 && kw == 1 && c_pad == c_in) {
      // A 1x1 weight's VNNI pairs are the 32-bit transpose of its rows, packed in one pass into a reused block:
      // ATen's pad, permute and copy took 0.95 ms of 1.43 for six of S1's bf16 1x1 training convs on two threads,
      // whose autocast weights are new tensors on every step (Intel Xeon family 6 model 167, 2026-12-05).
      const at::Tensor rows = weight.reshape({w.n, c_in}).contiguous();
      at::Tensor packed =
          empty_output({blocks, 1, w.seg_pad / 2, kChannels, 2}, weight.options(), at::MemoryFormat::Contiguous);
      pack_transposed_blocks(reinterpret_cast<const float*>(rows.data_ptr<BFloat16>()), w.n, c_in / 2, c_in / 2, 1,
                             kChannels, w.seg_pad / 2, reinterpret_cast<float*>(packed.data_ptr<BFloat16>()));
      return packed;
    }
    // (n, c_in, kh, kw) -> (n, kh, kw * c_pad) kernel rows, zero-padded to (blocks * 32, kh, seg_pad), then VNNI pairs
    // of K per channel: (block, kh, seg_pad / 2, 32 channels, 2).
    const at::Tensor rows = at::constant_pad_nd(weight.reshape({w.n, c_in, kh, kw}), {0, 0, 0, 0, 0, c_pad - c_in})
                                .permute({0, 2, 3, 1})
                                .reshape({w.n, kh, w.seg_k});
    return at::constant_pad_nd(rows, {0, w.seg_pad - w.seg_k, 0, 0, 0, blocks * kChannels - w.n})
        .reshape({blocks, kChannels, kh, w.seg_pad / 2, 2})
        .permute({0, 2, 3, 1, 4})
        .contiguous();
  });
  w.bias.assign(blocks * kChannels, 0.f);
  std::copy_n(bias, w.n, w.bias.data());
  return w;
}

void amx_rows(const AmxSegment* segments, int64_t n_segments, int64_t m, int64_t lda, const AmxWeight& w,
              const BFloat16* residual, bool relu, BFloat16* out) {
#if defined(CPU_CAPABILITY_AVX512)
  TORCH_CHECK(amx_available(), "amx_rows: AMX tiles are not usable on this processor");
  // ATen's brgemm remembers per thread which tile configuration it loaded last: forget it, as ours replaces it.
  if (bf16_brgemm_usable()) at::native::cpublas::brgemm_release(true);
  const int64_t full = w.seg_k / kChunk, tail = w.seg_k % kChunk, blocks = ceil_div(w.n, kChannels);
  const int64_t block_size = w.segments * w.seg_pad * kChannels, lda_bytes = lda * int64_t(sizeof(BFloat16));
  const BFloat16* w_blocks = w.blocks.data_ptr<BFloat16>();
  std::vector<Chunk> chunks(n_segments * (full + (tail > 0)));
  // A tail chunk's rows copied with zeros after the tail: reading past a row would multiply the next row's values
  // (or unmapped memory) by the zero weight padding, and 0 x inf is NaN.
  alignas(64) BFloat16 tails_storage[4][kRows * kChunk];
  std::vector<BFloat16> tails_heap(n_segments > 4 ? n_segments * kRows * kChunk : 0);
  BFloat16* tails = n_segments > 4 ? tails_heap.data() : &tails_storage[0][0];
  alignas(64) float sums[kRows * kChannels];
  int64_t configured = 0;
  for (int64_t m0 = 0; m0 < m; m0 += kRows) {
    const int64_t rows = std::min(kRows, m - m0);
    if (rows != configured) configure_tiles(configured = rows);
    Chunk* chunk = chunks.data();
    for (int64_t s = 0; s < n_segments; ++s) {
      const BFloat16* a = segments[s].a + m0 * lda;
      const int64_t w0 = segments[s].index * (w.seg_pad / 2) * kChannels * 2;
      for (int64_t j = 0; j < full; ++j) *chunk++ = Chunk{a + j * kChunk, lda_bytes, w0 + j * 16 * kChannels * 2};
      if (tail) {
        BFloat16* t = tails + s * kRows * kChunk;
        const __mmask32 mask = static_cast<__mmask32>((uint64_t(1) << tail) - 1);
        for (int64_t r = 0; r < rows; ++r)
          _mm512_storeu_si512(t + r * kChunk, _mm512_maskz_loadu_epi16(mask, a + r * lda + full * kChunk));
        *chunk++ = Chunk{t, kChunk * int64_t(sizeof(BFloat16)), w0 + full * 16 * kChannels * 2};
      }
    }
    const int64_t n_chunks = chunk - chunks.data();
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t c0 = b * kChannels, channels = std::min(kChannels, w.n - c0);
      const BFloat16* w_block = w_blocks + b * block_size;
      if (rows > 16) {
        (channels > 16 ? tile_sums<true, true> : tile_sums<true, false>)(chunks.data(), n_chunks, w_block, sums);
      } else {
        (channels > 16 ? tile_sums<false, true> : tile_sums<false, false>)(chunks.data(), n_chunks, w_block, sums);
      }
      tile_epilogue(sums, rows, channels, w.bias.data() + c0, residual ? residual + m0 * w.n + c0 : nullptr, w.n,
                    relu, out + m0 * w.n + c0);
    }
  }
  release_tiles();
#else
  (void)segments, (void)n_segments, (void)m, (void)lda, (void)w, (void)residual, (void)relu, (void)out;
  TORCH_CHECK(false, "amx_rows: AMX tiles are not usable in this build");
#endif
}

}  // namespace CPU_CAPABILITY
}  // namespace shvit_cpu
