// Low-bit matmul kernels over the tiled weight layout of formats.h:
//   * per-token int8 activation quantization,
//   * integer GEMV/GEMM (W8A8, W4A8): unsigned weights x signed int8
//     activations, 4 products per 32-bit lane and step (vpdpbusd on AVX-512
//     VNNI, int16 multiply-add elsewhere), offsets removed per group, scales
//     applied per group in float,
//   * weight-only GEMV/GEMM with float32 activations (codes decoded in registers).
// Work is split over tiles of 16 output rows, so every thread streams its own
// contiguous part of the weights.

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "lowbit/matmul.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include <algorithm>
#include <atomic>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "hwy/aligned_allocator.h"
#include "hwy/cache_control.h"
#include "hwy/highway.h"
#include "lowbit/float_formats-inl.h"
#include "lowbit/tile_scales-inl.h"
#include "lowbit/tile_codes-inl.h"
#include "lowbit/gemv_shuffle-inl.h"
#include "lowbit/gemv_bf16-inl.h"
#include "lowbit/kernels.h"
#include "lowbit/parallel.h"

namespace lowbit {
// Set once from the CPU, cleared by the test hook (HWY_ONCE section below).
extern std::atomic<bool> g_vnni_enabled;
// The shuffle-decoded weight-only GEMV (gemv_shuffle-inl.h); the test hook
// turns it off so the generic decode loop is checked on the same CPU.
extern std::atomic<bool> g_shuffle_gemv_enabled;
// The bfloat16-dot weight-only GEMV (gemv_bf16-inl.h): set once from the CPU
// (AVX512_BF16), cleared by its test hook.
extern std::atomic<bool> g_bf16_gemv_enabled;
}  // namespace lowbit

HWY_BEFORE_NAMESPACE();
namespace lowbit {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using DF = hn::ScalableTag<float>;
using DI = hn::ScalableTag<int32_t>;
using DU8 = hn::Repartition<uint8_t, DI>;
using VI = hn::Vec<DI>;
using VF = hn::Vec<DF>;
constexpr size_t kLanes = HWY_LANES(int32_t);
// Vectors per 16-row tile: 1 (AVX-512), 2 (AVX2), 4 (SSE).
constexpr size_t kVecs = kTileRows / kLanes;
#ifndef LOWBIT_PF_BLOCKS
// GEMV software prefetch distance per tile stream, in 64-byte blocks: 4 KiB ahead
// (one page: the hardware prefetchers stop at 4 KiB boundaries). Int8 11008x4096
// from DRAM, 7 alternating runs: 19.6 GB/s median vs 18.6 with 1 KiB.
#define LOWBIT_PF_BLOCKS 64
#endif
#ifndef LOWBIT_MR
#define LOWBIT_MR 8  // 8 rows x 2 tiles: 16 vpdpbusd per 2 weight loads + 8 broadcasts (no spills)
#endif

// ---------------------------------------------------------------- activations

bool QuantizeActivationsImpl(const float* x, size_t m, size_t k, size_t x_stride, size_t kp,
                             size_t group, float fixed_scale, int8_t* xq, float* xscale, int32_t* xsum) {
  const size_t ngroups = kp / group;
  std::atomic<bool> ok{true};
  // Parallel only from 256 Ki elements: below that one core quantizes in < 40 us.
  ParallelFor(m, std::max<size_t>(1, (size_t(1) << 18) / kp), [&](size_t r0, size_t r1) {
    const DF df;
    const DI di;
    const hn::Rebind<int8_t, DI> d8;
    for (size_t r = r0; r < r1; ++r) {
      const float* xr = x + r * x_stride;
      auto amax = hn::Zero(df);
      auto nan = hn::Lt(amax, amax);
      ForEachVectorIn<kLanes>(xr, k, [&](const float* p) {
        const auto v = hn::LoadU(df, p);
        nan = hn::Or(nan, hn::IsNaN(v));
        amax = hn::Max(amax, hn::IfThenElseZero(hn::IsFinite(v), hn::Abs(v)));
      });
      if (!hn::AllFalse(df, nan)) ok = false;
      const float a = hn::GetLane(hn::MaxOfLanes(df, amax));
      const float scale = fixed_scale > 0.0f ? fixed_scale : a / 127.0f;
      const float inv = scale >= FLT_MIN ? 1.0f / scale : 0.0f;
      xscale[r] = inv == 0.0f ? 0.0f : scale;
      const auto vinv = hn::Set(df, inv), lo = hn::Set(df, -127.0f), hi = hn::Set(df, 127.0f);
      int8_t* qr = xq + r * kp;
      for (size_t g = 0; g < ngroups; ++g) {
        const size_t begin = g * group, end = std::min(k, begin + group);
        auto sum = hn::Zero(di);
        if (begin < end) {
          ForEachVector<kLanes>(xr + begin, qr + begin, end - begin, [&](const float* p, int8_t* o) {
            const auto q = hn::NearestInt(hn::Min(hn::Max(hn::Mul(hn::LoadU(df, p), vinv), lo), hi));
            sum = hn::Add(sum, q);
            hn::StoreU(hn::DemoteTo(d8, q), d8, o);
          });
        }
        // Zero padding past K (it sits in the last group).
        for (size_t i = std::max(begin, k); i < begin + group; ++i) qr[i] = 0;
        xsum[r * ngroups + g] = hn::GetLane(hn::SumOfLanes(di, sum));
      }
    }
  });
  return ok;
}

// ---------------------------------------------------------------- int dot step

// acc += sum over the 4 bytes of each 32-bit lane of w (unsigned) * x (signed).
struct DotPortable {
  struct X {
    hn::Vec<hn::Repartition<int16_t, DI>> even, odd;
  };
  static HWY_INLINE X Prepare(int32_t x4) {
    const hn::Repartition<int16_t, DI> d16;
    const auto v = hn::BitCast(d16, hn::Set(DI(), x4));
    return X{hn::ShiftRight<8>(hn::ShiftLeft<8>(v)), hn::ShiftRight<8>(v)};  // sign-extended bytes 0,2 / 1,3
  }
  static HWY_INLINE VI Dot(VI acc, hn::Vec<DU8> w, const X& x) {
    const hn::Repartition<int16_t, DI> d16;
    const hn::Repartition<uint16_t, DI> du16;
    const auto w16 = hn::BitCast(du16, w);
    const auto we = hn::BitCast(d16, hn::And(w16, hn::Set(du16, 0x00FF)));
    const auto wo = hn::BitCast(d16, hn::ShiftRight<8>(w16));
    VI unused = hn::Zero(DI());
    // pmaddwd: each 32-bit lane gets w0*x0 + w2*x2, then w1*x1 + w3*x3 (<= 2*255*127).
    acc = hn::ReorderWidenMulAccumulate(DI(), we, x.even, acc, unused);
    acc = hn::ReorderWidenMulAccumulate(DI(), wo, x.odd, acc, unused);
    return hn::RearrangeToOddPlusEven(acc, unused);
  }
};

#undef LOWBIT_HAVE_MADDUBS  // set per target: this file is compiled once per target
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX2 || HWY_TARGET == HWY_SSE4 || HWY_TARGET == HWY_SSSE3
#define LOWBIT_HAVE_MADDUBS 1
// int4 codes only. pmaddubsw multiplies unsigned by signed bytes and adds
// pairs into int16 with saturation; with codes <= 15 a pair is at most
// 2 * 15 * 128 = 3840, so it never saturates and the result equals
// DotPortable's exactly. pmaddwd by ones then adds the two pairs of each
// 32-bit lane: 3 ops per vector (plus the add) against DotPortable's 7
// (mask, shift, 2 pmaddwd, 2 adds, final add), which bounded the AVX2 W4A8
// GEMV (compute-bound at ~11 G weights/s a core before).
struct DotMaddubs {
  using X = VI;
  static HWY_INLINE X Prepare(int32_t x4) { return hn::Set(DI(), x4); }
  static HWY_INLINE VI Dot(VI acc, hn::Vec<DU8> w, const X& x) {
#if HWY_TARGET == HWY_AVX3
    const __m512i pairs = _mm512_maddubs_epi16(w.raw, x.raw);
    return VI{_mm512_add_epi32(acc.raw, _mm512_madd_epi16(pairs, _mm512_set1_epi16(1)))};
#elif HWY_TARGET == HWY_AVX2
    const __m256i pairs = _mm256_maddubs_epi16(w.raw, x.raw);
    return VI{_mm256_add_epi32(acc.raw, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))};
#else
    const __m128i pairs = _mm_maddubs_epi16(w.raw, x.raw);
    return VI{_mm_add_epi32(acc.raw, _mm_madd_epi16(pairs, _mm_set1_epi16(1)))};
#endif
  }
};
#endif

#if HWY_TARGET == HWY_AVX3
// vpdpbusd through inline asm: the compiler never emits VNNI by itself here (so
// the portable path stays VNNI-free on AVX-512 CPUs without it), and the EVEX
// zmm form cannot turn into the VEX {vex} encoding that Zen 4 lacks.
struct DotVnni {
  using X = VI;
  static HWY_INLINE X Prepare(int32_t x4) { return hn::Set(DI(), x4); }
  static HWY_INLINE VI Dot(VI acc, hn::Vec<DU8> w, const X& x) {
    __m512i a = acc.raw;
    asm("vpdpbusd %[x], %[w], %[a]" : [a] "+v"(a) : [w] "v"(w.raw), [x] "v"(x.raw));
    return VI{a};
  }
};
#endif

// ---------------------------------------------------------------- int GEMM

// The unsigned codes of vector v of k-step s of a tile for the dot products:
// int8 bytes as stored; int4 / int3 low nibbles (k-step half 0) or high
// nibbles (half 1); with a level table (kLevels) the nibble u becomes L[u] + 128
// (levels: LevelBytes), one vpshufb more per 64 codes.
template <int kBits, bool kLevels = false>
HWY_INLINE hn::Vec<DU8> BlockCodes(TileReader<kBits>& tile, size_t s, size_t v, size_t half,
                                   hn::Vec<DU8> levels) {
  const DU8 du8;
  auto b = hn::BitCast(du8, tile.Lanes(s, v));
  if (kBits != 8) {
    if (half != 0) b = hn::BitCast(du8, hn::ShiftRight<4>(hn::BitCast(hn::Repartition<uint16_t, DI>(), b)));
    b = hn::And(b, hn::Set(du8, 0x0F));
    if (kLevels) b = hn::TableLookupBytes(levels, b);
  }
  return b;
}

// MR activation rows x NT tiles (NT * 16 output rows) over all of K.
// Registers: MR * NT * kVecs int32 accumulators + as many float ones; AVX-512
// with MR = 4, NT = 2: 8 + 8 of 32 zmm, and each weight vector loaded once
// serves 4 rows (2 loads + 4 broadcasts per 8 vpdpbusd).
template <class Dot, size_t MR, size_t NT, int kBits, bool kLevels, ScaleKind kScales = ScaleKind::kRuntime>
HWY_INLINE void IntBlock(const int8_t* xq, size_t kp, const float* xscale, const int32_t* xsum,
                         const TiledWeights& w, size_t t0, float* out, size_t out_stride,
                         size_t rows_left) {
  const DF df;
  const DI di;
  constexpr size_t kStep = KStep(kBits);
  const size_t steps_per_group = w.group / kStep;
  const size_t tile_bytes = TileBytes(kBits, kp);
  VF facc[MR][NT * kVecs];
  for (size_t r = 0; r < MR; ++r)
    for (size_t v = 0; v < NT * kVecs; ++v) facc[r][v] = hn::Zero(df);
  TileReader<kBits> tile[NT];
  for (size_t t = 0; t < NT; ++t) tile[t] = TileReader<kBits>(w.data + (t0 + t) * tile_bytes);
  const auto levels = kLevels ? LevelBytes(w.levels) : hn::Zero(DU8());

  for (size_t g = 0; g < w.ngroups; ++g) {
    VI iacc[MR][NT * kVecs];
    for (size_t r = 0; r < MR; ++r)
      for (size_t v = 0; v < NT * kVecs; ++v) iacc[r][v] = hn::Zero(di);
    for (size_t s = g * steps_per_group; s < (g + 1) * steps_per_group; ++s) {
      if (MR == 1) {  // GEMV streams weights once from DRAM; GEMM re-reads them from L2
        for (size_t t = 0; t < NT; ++t) tile[t].Prefetch(s + LOWBIT_PF_BLOCKS);
      }
      for (size_t half = 0; half < (kBits == 8 ? 1u : 2u); ++half) {
        // int4 / int3: low nibbles hold k-step half 0, high nibbles half 1.
        hn::Vec<DU8> wv[NT * kVecs];
        for (size_t t = 0; t < NT; ++t)
          for (size_t v = 0; v < kVecs; ++v) wv[t * kVecs + v] = BlockCodes<kBits, kLevels>(tile[t], s, v, half, levels);
        const size_t kx = s * kStep + half * 4;
        for (size_t r = 0; r < MR; ++r) {
          int32_t x4;
          std::memcpy(&x4, xq + r * kp + kx, 4);
          const auto xo = Dot::Prepare(x4);
          for (size_t v = 0; v < NT * kVecs; ++v) iacc[r][v] = Dot::Dot(iacc[r][v], wv[v], xo);
        }
      }
    }
    // Remove the offsets (sum (u - off) x = sum u x - off * sum x) and scale.
    for (size_t t = 0; t < NT; ++t) {
      for (size_t v = 0; v < kVecs; ++v) {
        const size_t idx = ((t0 + t) * w.ngroups + g) * kTileRows + v * kLanes;
        const auto scale = LoadScales<kScales>(w, idx, (t0 + t) * kTileRows + v * kLanes);
        const auto off = LoadOffsets(w, idx);
        for (size_t r = 0; r < MR; ++r) {
          const auto corr = hn::Mul(off, hn::Set(di, xsum[r * w.ngroups + g]));
          const auto exact = hn::ConvertTo(df, hn::Sub(iacc[r][t * kVecs + v], corr));
          facc[r][t * kVecs + v] = hn::MulAdd(exact, scale, facc[r][t * kVecs + v]);
        }
      }
    }
  }
  for (size_t r = 0; r < MR && r < rows_left; ++r) {
    const auto xs = hn::Set(df, xscale[r]);
    for (size_t t = 0; t < NT; ++t) {
      const size_t n0 = (t0 + t) * kTileRows;
      if (n0 >= w.n) break;
      // Whole tiles store straight to out; only the last partial tile goes
      // through a buffer (a variable-size memcpy here compiled to rep movsq and
      // took 13% of an in-cache GEMM).
      const bool whole = n0 + kTileRows <= w.n;
      alignas(64) float buf[kTileRows];
      float* dst = whole ? out + r * out_stride + n0 : buf;
      for (size_t v = 0; v < kVecs; ++v) {
        auto y = hn::Mul(facc[r][t * kVecs + v], xs);
        if (w.bias) y = hn::Add(y, hn::LoadU(df, w.bias + n0 + v * kLanes));  // fused: no second pass
        hn::StoreU(y, df, dst + v * kLanes);
      }
      if (!whole) std::memcpy(out + r * out_stride + n0, buf, (w.n - n0) * sizeof(float));
    }
  }
}

// Runs fn(t0, nt) over groups of up to kMaxNT tiles split across threads.
template <size_t kNT, class Fn>
void ForTileGroups(size_t tiles, const Fn& fn) {
  const size_t groups = (tiles + kNT - 1) / kNT;
  ParallelFor(groups, 1, [&](size_t g0, size_t g1) {
    for (size_t g = g0; g < g1; ++g) fn(g * kNT, std::min(kNT, tiles - g * kNT));
  });
}

// Tiles per unit of GEMV work claimed by a thread (the tiles of a unit are read
// in order, one after the other: IntGemvTile). Until 2026-12-05 a unit's 4 tiles
// (AVX2: 2) were read interleaved for 4 independent dot chains; reading them in
// order, with the chains inside a tile, measured faster from DRAM on a Zen 4
// core: W4A8 int4 g16 8192x2048 28 -> 40 G weights/s (AVX2 target 26 -> 35),
// 1536x576 19 -> 27, W8A8 49152x576 15 -> 25.
#ifndef LOWBIT_INT_GEMV_TILES
#define LOWBIT_INT_GEMV_TILES 4
#endif
// One activation row times tile t over all of K, for a GEMV that walks the
// tiles in order: its weights are one sequential stream, which a core reads
// faster from DRAM than 4 tiles interleaved 64 bytes at a time (Zen 4: 22-23
// against 12-19 GB/s in a read-only microbenchmark). The independent dot
// chains come from within the tile: int4 nibble halves (int8: even and odd
// k-steps) in separate accumulators, summed per group. Integer sums are exact,
// so the results equal IntBlock's bit for bit.
template <class Dot, int kBits, bool kLevels, ScaleKind kScales>
HWY_INLINE void IntGemvTile(const int8_t* xq, float xscale, const int32_t* xsum, const TiledWeights& w,
                            size_t t, float* out) {
  const DF df;
  const DI di;
  constexpr size_t kStep = KStep(kBits);
  const size_t steps_per_group = w.group / kStep;
  TileReader<kBits> tile(w.data + t * TileBytes(kBits, w.kp));
  const auto levels = kLevels ? LevelBytes(w.levels) : hn::Zero(DU8());
  VF facc[kVecs];
  for (size_t v = 0; v < kVecs; ++v) facc[v] = hn::Zero(df);
  for (size_t g = 0; g < w.ngroups; ++g) {
    VI chain[2][kVecs];
    for (size_t v = 0; v < kVecs; ++v) chain[0][v] = chain[1][v] = hn::Zero(di);
    for (size_t s = g * steps_per_group; s < (g + 1) * steps_per_group; ++s) {
      tile.Prefetch(s + LOWBIT_PF_BLOCKS);
      for (size_t half = 0; half < (kBits == 8 ? 1u : 2u); ++half) {
        int32_t x4;
        std::memcpy(&x4, xq + s * kStep + half * 4, 4);
        const auto xo = Dot::Prepare(x4);
        const size_t c = kBits == 8 ? (s & 1) : half;
        for (size_t v = 0; v < kVecs; ++v) chain[c][v] = Dot::Dot(chain[c][v], BlockCodes<kBits, kLevels>(tile, s, v, half, levels), xo);
      }
    }
    for (size_t v = 0; v < kVecs; ++v) {
      const size_t idx = (t * w.ngroups + g) * kTileRows + v * kLanes;
      const auto corr = hn::Mul(LoadOffsets(w, idx), hn::Set(di, xsum[g]));
      const auto exact = hn::ConvertTo(df, hn::Sub(hn::Add(chain[0][v], chain[1][v]), corr));
      facc[v] = hn::MulAdd(exact, LoadScales<kScales>(w, idx, t * kTileRows + v * kLanes), facc[v]);
    }
  }
  const size_t n0 = t * kTileRows;
  if (n0 >= w.n) return;
  const bool whole = n0 + kTileRows <= w.n;
  alignas(64) float buf[kTileRows];
  float* dst = whole ? out + n0 : buf;
  for (size_t v = 0; v < kVecs; ++v) {
    auto y = hn::Mul(facc[v], hn::Set(df, xscale));
    if (w.bias) y = hn::Add(y, hn::LoadU(df, w.bias + n0 + v * kLanes));
    hn::StoreU(y, df, dst + v * kLanes);
  }
  if (!whole) std::memcpy(out + n0, buf, (w.n - n0) * sizeof(float));
}

template <class Dot, int kBits, bool kLevels, ScaleKind kScales>
void IntGemv(const int8_t* xq, const float* xscale, const int32_t* xsum, size_t m,
             const TiledWeights& w, float* out, size_t out_stride) {
  ForTileGroups<LOWBIT_INT_GEMV_TILES>(w.tiles, [&](size_t t0, size_t nt) {
    for (size_t r = 0; r < m; ++r)
      for (size_t t = t0; t < t0 + nt; ++t)
        IntGemvTile<Dot, kBits, kLevels, kScales>(xq + r * w.kp, xscale[r], xsum + r * w.ngroups, w, t, out + r * out_stride);
  });
}

template <class Dot, int kBits, bool kLevels = false>
void IntMatmul(const int8_t* xq, const float* xscale, const int32_t* xsum, size_t m,
               const TiledWeights& w, float* out, size_t out_stride) {
  if (m < 4) {
    switch (ScaleKindOf(w)) {
      case ScaleKind::kF32: return IntGemv<Dot, kBits, kLevels, ScaleKind::kF32>(xq, xscale, xsum, m, w, out, out_stride);
      case ScaleKind::kF16: return IntGemv<Dot, kBits, kLevels, ScaleKind::kF16>(xq, xscale, xsum, m, w, out, out_stride);
      default: return IntGemv<Dot, kBits, kLevels, ScaleKind::kI8>(xq, xscale, xsum, m, w, out, out_stride);
    }
  }
  // Split N (pairs of tiles) across threads; every thread walks all rows of x
  // in blocks of kMR, re-reading its own weight slice from L2 (x is small).
  constexpr size_t kMR = LOWBIT_MR;
  ForTileGroups<2>(w.tiles, [&](size_t t0, size_t nt) {
    size_t r = 0;
    for (; r + kMR <= m; r += kMR) {
      if (nt == 2) IntBlock<Dot, kMR, 2, kBits, kLevels>(xq + r * w.kp, w.kp, xscale + r, xsum + r * w.ngroups, w, t0, out + r * out_stride, out_stride, kMR);
      else IntBlock<Dot, kMR, 1, kBits, kLevels>(xq + r * w.kp, w.kp, xscale + r, xsum + r * w.ngroups, w, t0, out + r * out_stride, out_stride, kMR);
    }
    for (; r < m; ++r) {
      if (nt == 2) IntBlock<Dot, 1, 2, kBits, kLevels>(xq + r * w.kp, w.kp, xscale + r, xsum + r * w.ngroups, w, t0, out + r * out_stride, out_stride, 1);
      else IntBlock<Dot, 1, 1, kBits, kLevels>(xq + r * w.kp, w.kp, xscale + r, xsum + r * w.ngroups, w, t0, out + r * out_stride, out_stride, 1);
    }
  });
}

void MatmulQuantActImpl(const int8_t* xq, const float* xscale, const int32_t* xsum, size_t m,
                        const TiledWeights& w, float* out, size_t out_stride) {
  if (w.levels != nullptr) {  // int4 with a level table (the bindings allow no other width)
#if HWY_TARGET == HWY_AVX3
    if (g_vnni_enabled.load(std::memory_order_relaxed)) return IntMatmul<DotVnni, 4, true>(xq, xscale, xsum, m, w, out, out_stride);
#endif
    // Not pmaddubsw: bytes L[u] + 128 up to 255 times 127, twice, saturate int16.
    return IntMatmul<DotPortable, 4, true>(xq, xscale, xsum, m, w, out, out_stride);
  }
#if HWY_TARGET == HWY_AVX3
  if (g_vnni_enabled.load(std::memory_order_relaxed)) {
    if (w.bits == 4) return IntMatmul<DotVnni, 4>(xq, xscale, xsum, m, w, out, out_stride);
    if (w.bits == 3) return IntMatmul<DotVnni, 3>(xq, xscale, xsum, m, w, out, out_stride);
    return IntMatmul<DotVnni, 8>(xq, xscale, xsum, m, w, out, out_stride);
  }
#endif
#ifdef LOWBIT_HAVE_MADDUBS
  if (w.bits == 4) return IntMatmul<DotMaddubs, 4>(xq, xscale, xsum, m, w, out, out_stride);
  if (w.bits == 3) return IntMatmul<DotMaddubs, 3>(xq, xscale, xsum, m, w, out, out_stride);
#endif
  if (w.bits == 4) return IntMatmul<DotPortable, 4>(xq, xscale, xsum, m, w, out, out_stride);
  if (w.bits == 3) return IntMatmul<DotPortable, 3>(xq, xscale, xsum, m, w, out, out_stride);
  return IntMatmul<DotPortable, 8>(xq, xscale, xsum, m, w, out, out_stride);
}

// ---------------------------------------------------------------- float activations

// MR rows x NT tiles; codes are decoded once per k and reused by the MR rows.
template <size_t MR, size_t NT, int kBits>
HWY_INLINE void FloatBlock(const float* x, size_t x_stride, const TiledWeights& w, size_t t0,
                           float* out, size_t out_stride, size_t rows_left) {
  const DF df;
  const DI di;
  constexpr size_t kStep = KStep(kBits);
  constexpr int kCode = kLaneBits<kBits>;
  const size_t steps_per_group = w.group / kStep;
  const size_t tile_bytes = TileBytes(kBits, w.kp);
  VF oacc[MR][NT * kVecs];
  for (size_t r = 0; r < MR; ++r)
    for (size_t v = 0; v < NT * kVecs; ++v) oacc[r][v] = hn::Zero(df);
  TileReader<kBits> tile[NT];
  for (size_t t = 0; t < NT; ++t) tile[t] = TileReader<kBits>(w.data + (t0 + t) * tile_bytes);
  const VI level_bytes = w.levels ? hn::BitCast(di, LevelBytes(w.levels)) : hn::Zero(di);
#if HWY_TARGET == HWY_AVX3
  // Symmetric int4: vpermps looks the float value (u - 8) up by the low 4 bits
  // of each lane, so a code costs a shift and a permute instead of shift, and,
  // subtract and convert (same values, bit for bit). int3: u - 4 (entries 8..15
  // are never looked up). A level table: L[u].
  alignas(64) float lut_values[16];
  for (int u = 0; u < 16; ++u) lut_values[u] = w.levels ? float(w.levels[u]) : float(u - (kBits == 3 ? 4 : 8));
  const __m512 lut = _mm512_load_ps(lut_values);
#endif
  for (size_t g = 0; g < w.ngroups; ++g) {
    VF gacc[MR][NT * kVecs];
    VI off[NT * kVecs];
    for (size_t t = 0; t < NT; ++t)
      for (size_t v = 0; v < kVecs; ++v)
        off[t * kVecs + v] = LoadOffsets(w, ((t0 + t) * w.ngroups + g) * kTileRows + v * kLanes);
    for (size_t r = 0; r < MR; ++r)
      for (size_t v = 0; v < NT * kVecs; ++v) gacc[r][v] = hn::Zero(df);
    for (size_t s = g * steps_per_group; s < (g + 1) * steps_per_group; ++s) {
      VI lanes[NT * kVecs];
      for (size_t t = 0; t < NT; ++t) {
        tile[t].Prefetch(s + 8);
        for (size_t v = 0; v < kVecs; ++v) lanes[t * kVecs + v] = tile[t].Lanes(s, v);
      }
      const size_t k0 = s * kStep;
      // Code j of each lane: (lane >> (bits * j)) & mask; int4 (and int3 in
      // int4 form) j = 0..7 reads bytes j % 4 (low nibble for j < 4, high
      // nibble after).
      // Unrolled, so every shift count is an immediate (GCC 12 kept the loop,
      // with the count in a register).
#pragma GCC unroll 8
      for (size_t j = 0; j < kStep; ++j) {
        const int shift = kCode == 4 ? int((j % 4) * 8 + (j / 4) * 4) : int(j * 8);
        const int mask = (1 << kCode) - 1;
        VF wj[NT * kVecs];
#if HWY_TARGET == HWY_AVX3
        if (kCode == 4 && w.offsets == nullptr) {
          for (size_t v = 0; v < NT * kVecs; ++v)
            wj[v] = VF{_mm512_permutexvar_ps(hn::ShiftRightSame(lanes[v], shift).raw, lut)};
        } else
#endif
        for (size_t v = 0; v < NT * kVecs; ++v) {
          auto u = hn::And(hn::ShiftRightSame(lanes[v], shift), hn::Set(di, mask));
          if (kCode == 4 && w.levels) u = LookupLevelLanes(u, level_bytes);
          wj[v] = hn::ConvertTo(df, hn::Sub(u, off[v]));
        }
        for (size_t r = 0; r < MR; ++r) {
          const auto xb = hn::Set(df, x[r * x_stride + k0 + j]);
          for (size_t v = 0; v < NT * kVecs; ++v) gacc[r][v] = hn::MulAdd(wj[v], xb, gacc[r][v]);
        }
      }
    }
    for (size_t t = 0; t < NT; ++t)
      for (size_t v = 0; v < kVecs; ++v) {
        const auto scale = LoadScales(w, ((t0 + t) * w.ngroups + g) * kTileRows + v * kLanes,
                                      (t0 + t) * kTileRows + v * kLanes);
        for (size_t r = 0; r < MR; ++r)
          oacc[r][t * kVecs + v] = hn::MulAdd(gacc[r][t * kVecs + v], scale, oacc[r][t * kVecs + v]);
      }
  }
  for (size_t r = 0; r < MR && r < rows_left; ++r) {
    for (size_t t = 0; t < NT; ++t) {
      const size_t n0 = (t0 + t) * kTileRows;
      if (n0 >= w.n) break;
      const bool whole = n0 + kTileRows <= w.n;  // as in IntBlock: no memcpy for whole tiles
      alignas(64) float buf[kTileRows];
      float* dst = whole ? out + r * out_stride + n0 : buf;
      for (size_t v = 0; v < kVecs; ++v) {
        auto y = oacc[r][t * kVecs + v];
        if (w.bias) y = hn::Add(y, hn::LoadU(df, w.bias + n0 + v * kLanes));
        hn::StoreU(y, df, dst + v * kLanes);
      }
      if (!whole) std::memcpy(out + r * out_stride + n0, buf, (w.n - n0) * sizeof(float));
    }
  }
}

// ---- weight-only GEMM: dequantize a K-chunk of a tile pair once, then FMA.

constexpr size_t kChunkK = 128;  // 128 k x 32 floats = 16 KiB: stays in L1
// Rows per micro-kernel block: 8 x 2 tiles = 16 accumulators on AVX-512; fewer
// rows where a tile needs more vectors, so accumulators stay in registers.
constexpr size_t kFloatMR = 8 / kVecs > 0 ? 8 / kVecs : 1;

// buf[k][32] = (u - off) * scale for k in [k0, k0 + nk) of tiles t0, t0 + 1.
template <int kBits>
HWY_INLINE void DequantChunk(const TiledWeights& w, size_t t0, size_t nt, size_t k0, size_t nk,
                             float* buf) {
  const DF df;
  const DI di;
  constexpr size_t kStep = KStep(kBits);
  constexpr int kCode = kLaneBits<kBits>;
  constexpr int kMask = (1 << kCode) - 1;
  const size_t tile_bytes = TileBytes(kBits, w.kp);
  const VI level_bytes = w.levels ? hn::BitCast(di, LevelBytes(w.levels)) : hn::Zero(di);
  for (size_t t = 0; t < 2; ++t) {
    if (t >= nt) {  // no second tile: zeros
      for (size_t k = 0; k < nk; ++k)
        for (size_t v = 0; v < kVecs; ++v) hn::Store(hn::Zero(df), df, buf + k * 32 + 16 + v * kLanes);
      continue;
    }
    TileReader<kBits> tile(w.data + (t0 + t) * tile_bytes);
    for (size_t s = k0 / kStep; s < (k0 + nk) / kStep; ++s) {
      const size_t g = s * kStep / w.group;
      for (size_t v = 0; v < kVecs; ++v) {
        const size_t idx = ((t0 + t) * w.ngroups + g) * kTileRows + v * kLanes;
        const auto scale = LoadScales(w, idx, (t0 + t) * kTileRows + v * kLanes);
        const auto off = LoadOffsets(w, idx);
        const auto lanes = tile.Lanes(s, v);
        for (size_t j = 0; j < kStep; ++j) {
          const int shift = kCode == 4 ? int((j % 4) * 8 + (j / 4) * 4) : int(j * 8);
          auto u = hn::And(hn::ShiftRightSame(lanes, shift), hn::Set(di, kMask));
          if (kCode == 4 && w.levels) u = LookupLevelLanes(u, level_bytes);
          const auto val = hn::Mul(hn::ConvertTo(df, hn::Sub(u, off)), scale);
          hn::Store(val, df, buf + (s * kStep + j - k0) * 32 + t * 16 + v * kLanes);
        }
      }
    }
  }
}

// acc [MR][32] += panel[k][MR] (x, packed) * buf[k][32] over nk values of k.
template <size_t MR>
HWY_INLINE void FmaPanel(const float* panel, const float* buf, size_t nk, float* acc) {
  const DF df;
  constexpr size_t kV = 2 * kVecs;
  VF a[MR][kV];
  for (size_t r = 0; r < MR; ++r)
    for (size_t v = 0; v < kV; ++v) a[r][v] = hn::Load(df, acc + r * 32 + v * kLanes);
  for (size_t k = 0; k < nk; ++k) {
    VF wv[kV];
    for (size_t v = 0; v < kV; ++v) wv[v] = hn::Load(df, buf + k * 32 + v * kLanes);
    for (size_t r = 0; r < MR; ++r) {
      const auto xb = hn::Set(df, panel[k * MR + r]);
      for (size_t v = 0; v < kV; ++v) a[r][v] = hn::MulAdd(wv[v], xb, a[r][v]);
    }
  }
  for (size_t r = 0; r < MR; ++r)
    for (size_t v = 0; v < kV; ++v) hn::Store(a[r][v], df, acc + r * 32 + v * kLanes);
}

template <int kBits>
void FloatGemm(const float* x, size_t m, size_t x_stride, const TiledWeights& w, float* out,
               size_t out_stride) {
  // Cache blocking for L2 (1 MiB on Zen 4, 2 MiB on Sapphire Rapids): K is walked
  // in blocks whose slice of x is copied into a panel ([row block][k][8 rows],
  // <= 256 KiB) that a run of tile pairs reuses while their accumulators
  // (<= 512 KiB) stay put. The panel makes the 8 broadcasts of a step one cache
  // line instead of 8 rows K floats apart, which alias in L1 when K is a power
  // of two (M = 512, K = 4096: 2x).
  constexpr size_t MR = kFloatMR;
  const size_t mpad = (m + MR - 1) / MR * MR;
  const size_t kb = std::max(kChunkK, (size_t(1) << 16) / mpad / kChunkK * kChunkK);
  const size_t run = std::max<size_t>(1, (size_t(1) << 17) / (mpad * 32));  // <= 512 KiB of sums
  const size_t pairs = (w.tiles + 1) / 2;
  ParallelFor(pairs, 1, [&](size_t p0, size_t p1) {
    auto buf = hwy::AllocateAligned<float>(kChunkK * 32);
    auto panel = hwy::AllocateAligned<float>(mpad * std::min(kb, w.kp));
    auto acc = hwy::AllocateAligned<float>(std::min(run, p1 - p0) * mpad * 32);
    for (size_t q0 = p0; q0 < p1; q0 += run) {
      const size_t nrun = std::min(run, p1 - q0);
      std::fill(acc.get(), acc.get() + nrun * mpad * 32, 0.0f);
      for (size_t kb0 = 0; kb0 < w.kp; kb0 += kb) {
        const size_t kbn = std::min(kb, w.kp - kb0);
        for (size_t rb = 0; rb < mpad / MR; ++rb) {
          float* dst = panel.get() + rb * kbn * MR;
          const float* src[MR];
          for (size_t i = 0; i < MR; ++i) src[i] = rb * MR + i < m ? x + (rb * MR + i) * x_stride + kb0 : nullptr;
          for (size_t k = 0; k < kbn; ++k)
            for (size_t i = 0; i < MR; ++i) dst[k * MR + i] = src[i] ? src[i][k] : 0.0f;
        }
        for (size_t p = q0; p < q0 + nrun; ++p) {
          const size_t t0 = 2 * p, nt = std::min<size_t>(2, w.tiles - t0);
          float* pacc = acc.get() + (p - q0) * mpad * 32;
          for (size_t k0 = kb0; k0 < kb0 + kbn; k0 += kChunkK) {
            const size_t nk = std::min(kChunkK, kb0 + kbn - k0);
            DequantChunk<kBits>(w, t0, nt, k0, nk, buf.get());
            for (size_t rb = 0; rb < mpad / MR; ++rb)
              FmaPanel<MR>(panel.get() + (rb * kbn + (k0 - kb0)) * MR, buf.get(), nk, pacc + rb * MR * 32);
          }
        }
      }
      const DF df;
      for (size_t p = q0; p < q0 + nrun; ++p) {
        const size_t n0 = 2 * p * kTileRows, cols = std::min(2 * kTileRows, w.n - n0);
        float* pacc = acc.get() + (p - q0) * mpad * 32;
        for (size_t r = 0; r < m; ++r) {
          if (w.bias) {
            for (size_t v = 0; v < 2 * kVecs && v * kLanes < cols; ++v) {
              float* a = pacc + r * 32 + v * kLanes;
              hn::Store(hn::Add(hn::Load(df, a), hn::LoadU(df, w.bias + n0 + v * kLanes)), df, a);
            }
          }
          if (cols == 2 * kTileRows) {  // whole tile pair: vector copy, not a rep movsq memcpy
            for (size_t v = 0; v < 2 * kVecs; ++v)
              hn::StoreU(hn::Load(df, pacc + r * 32 + v * kLanes), df, out + r * out_stride + n0 + v * kLanes);
          } else {
            std::memcpy(out + r * out_stride + n0, pacc + r * 32, cols * sizeof(float));
          }
        }
      }
    }
  });
}

template <int kBits>
void FloatMatmul(const float* x, size_t m, size_t x_stride, const TiledWeights& w, float* out,
                 size_t out_stride) {
  // From 8 rows on, dequantizing each weight once per call and running a plain
  // FMA micro-kernel beats decoding codes inside the row loop (M=128, 4096^2:
  // 2.6x). The two paths round differently (scale folded into the weight here,
  // applied per group there); each is deterministic for a given M.
  if (m >= 8) return FloatGemm<kBits>(x, m, x_stride, w, out, out_stride);
  if (m < 4) {
    // GEMV-like: 4 accumulator vectors give 4 independent FMA chains per code
    // (latency 4; with 2 the loop waited on it, 4096^2 int4: 0.8 ms). That is 4
    // tiles on AVX-512 but 2 on AVX2, whose tiles take 2 vectors each: 4 AVX2
    // tiles needed 8 code + 8 offset + 16 accumulator vectors of 16 ymm and
    // spilled every step. Tiles are independent: results do not depend on it.
    constexpr size_t kNT = kVecs >= 4 ? 1 : 4 / kVecs;
#if HWY_TARGET != HWY_AVX3
    // Symmetric codes decode by byte shuffle (gemv_shuffle-inl.h), bit-identical
    // to the loop below for rows in its range. (AVX-512 keeps the loop: its
    // int4 vpermps lookup costs the same 2 ops per code.)
    bool shuffle[4] = {false, false, false, false};
    for (size_t r = 0; r < m; ++r)
      // (Its q * 2^29 decode needs evenly spaced codes: no level tables.)
      shuffle[r] = w.offsets == nullptr && w.levels == nullptr && g_shuffle_gemv_enabled.load(std::memory_order_relaxed) &&
                   FitsShuffleRange(x + r * x_stride, w.k);
#else
    const bool shuffle[4] = {false, false, false, false};
    // Symmetric codes on CPUs with AVX512_BF16: bfloat16 dot products over
    // activations split in two parts (gemv_bf16-inl.h), 1.3-1.6x the decode loop.
    bool bf16[4] = {false, false, false, false};
    std::vector<uint32_t> pairs;
    const size_t row_pairs = w.kp / KStep(kBits) * 8;
    if (w.offsets == nullptr && g_bf16_gemv_enabled.load(std::memory_order_relaxed)) {
      for (size_t r = 0; r < m; ++r) {
        bf16[r] = FitsBf16SplitRange(x + r * x_stride, w.k);
        if (!bf16[r]) continue;
        pairs.resize(m * row_pairs);
        PrepareBf16Pairs<kBits>(x + r * x_stride, w.kp, pairs.data() + r * row_pairs);
      }
    }
#endif
#if HWY_TARGET == HWY_AVX3
    const Bf16Tables bf16_tables = MakeBf16Tables<kBits>(w);
#endif
    ForTileGroups<kNT>(w.tiles, [&](size_t t0, size_t nt) {
      for (size_t r = 0; r < m; ++r) {
        const float* xr = x + r * x_stride;
        float* orow = out + r * out_stride;
#if HWY_TARGET == HWY_AVX3
        if (bf16[r]) {
          for (size_t t = 0; t < nt; ++t) Bf16GemvTile<kBits>(pairs.data() + r * row_pairs, w, t0 + t, bf16_tables, orow);
          continue;
        }
#endif
#if HWY_TARGET != HWY_AVX3
        if (shuffle[r]) {
          switch (nt) {
            case 4: ShuffleGemvBlock<kNT >= 4 ? 4 : 1, kBits>(xr, w, t0, orow); break;
            case 3: ShuffleGemvBlock<kNT >= 3 ? 3 : 1, kBits>(xr, w, t0, orow); break;
            case 2: ShuffleGemvBlock<kNT >= 2 ? 2 : 1, kBits>(xr, w, t0, orow); break;
            default: ShuffleGemvBlock<1, kBits>(xr, w, t0, orow);
          }
          continue;
        }
#endif
        switch (nt) {
          case 4: FloatBlock<1, kNT >= 4 ? 4 : 1, kBits>(xr, x_stride, w, t0, orow, out_stride, 1); break;
          case 3: FloatBlock<1, kNT >= 3 ? 3 : 1, kBits>(xr, x_stride, w, t0, orow, out_stride, 1); break;
          case 2: FloatBlock<1, kNT >= 2 ? 2 : 1, kBits>(xr, x_stride, w, t0, orow, out_stride, 1); break;
          default: FloatBlock<1, 1, kBits>(xr, x_stride, w, t0, orow, out_stride, 1);
        }
      }
    });
    return;
  }
  constexpr size_t kNT = 2;
  ForTileGroups<kNT>(w.tiles, [&](size_t t0, size_t nt) {
    const bool two = nt == 2;
    size_t r = 0;
    for (; r + 4 <= m; r += 4) {
      if (two) FloatBlock<4, 2, kBits>(x + r * x_stride, x_stride, w, t0, out + r * out_stride, out_stride, 4);
      else FloatBlock<4, 1, kBits>(x + r * x_stride, x_stride, w, t0, out + r * out_stride, out_stride, 4);
    }
    for (; r < m; ++r) {
      if (two) FloatBlock<1, 2, kBits>(x + r * x_stride, x_stride, w, t0, out + r * out_stride, out_stride, 1);
      else FloatBlock<1, 1, kBits>(x + r * x_stride, x_stride, w, t0, out + r * out_stride, out_stride, 1);
    }
  });
}

void MatmulFloatActImpl(const float* x, size_t m, size_t x_stride, const TiledWeights& w,
                        float* out, size_t out_stride) {
  if (w.bits == 4) return FloatMatmul<4>(x, m, x_stride, w, out, out_stride);
  if (w.bits == 3) return FloatMatmul<3>(x, m, x_stride, w, out, out_stride);
  return FloatMatmul<8>(x, m, x_stride, w, out, out_stride);
}

}  // namespace HWY_NAMESPACE
}  // namespace lowbit
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace lowbit {

// __builtin_cpu_supports takes a string literal: one function for both features.
enum class CpuFeature { kVnni, kBf16 };
static bool CpuHas(CpuFeature feature) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  return feature == CpuFeature::kVnni ? __builtin_cpu_supports("avx512vnni") : __builtin_cpu_supports("avx512bf16");
#else
  (void)feature;
  return false;
#endif
}

std::atomic<bool> g_vnni_enabled{CpuHas(CpuFeature::kVnni)};

std::atomic<bool> g_shuffle_gemv_enabled{true};
void SetShuffleGemvEnabled(bool enabled) { g_shuffle_gemv_enabled = enabled; }
bool ShuffleGemvEnabled() { return g_shuffle_gemv_enabled.load(); }

std::atomic<bool> g_bf16_gemv_enabled{CpuHas(CpuFeature::kBf16)};
void SetBf16GemvEnabled(bool enabled) { g_bf16_gemv_enabled = enabled && CpuHas(CpuFeature::kBf16); }
bool Bf16GemvActive() { return g_bf16_gemv_enabled.load() && DispatchedTarget() == HWY_AVX3; }

HWY_EXPORT(QuantizeActivationsImpl);
HWY_EXPORT(MatmulQuantActImpl);
HWY_EXPORT(MatmulFloatActImpl);

bool VnniActive() {
  return g_vnni_enabled.load() && DispatchedTarget() == HWY_AVX3;
}

void SetVnniEnabled(bool enabled) { g_vnni_enabled = enabled && CpuHas(CpuFeature::kVnni); }

void PackTiled(const uint8_t* codes, size_t n, size_t k, int bits, bool symmetric, size_t group,
               const float* scales, const uint8_t* zps, uint8_t* data, float* tile_scales,
               int32_t* tile_offsets) {
  if (bits != 3 && bits != 4 && bits != 8) throw std::invalid_argument("matmul weights must be 3, 4 or 8 bits");
  const size_t step = KStep(bits);
  const size_t kp = (k + step - 1) / step * step;
  const size_t ngroups = k / group;
  const size_t gp = ngroups == 1 ? kp : group;  // padded group length
  if (gp % step != 0) throw std::invalid_argument("group_size must be a multiple of the k-step");
  const size_t tiles = (n + kTileRows - 1) / kTileRows;
  const size_t tile_bytes = TileBytes(bits, kp);
  const int bias = symmetric ? 1 << (bits - 1) : 0;
  ParallelFor(tiles, 1, [&](size_t t0, size_t t1) {
    for (size_t t = t0; t < t1; ++t) {
      // int3: the super-block past kp must read as zeros (formats.h).
      if (bits == 3) std::memset(data + t * tile_bytes, 0, tile_bytes);
      for (size_t i = 0; i < kTileRows; ++i) {
        const size_t row = t * kTileRows + i;
        for (size_t g = 0; g < ngroups; ++g) {
          const size_t idx = (t * ngroups + g) * kTileRows + i;
          const int off = row >= n ? bias : (symmetric ? bias : zps[row * ngroups + g]);
          tile_scales[idx] = row < n ? scales[row * ngroups + g] : 0.0f;
          if (tile_offsets) tile_offsets[idx] = off;
        }
        for (size_t kk = 0; kk < kp; ++kk) {
          int u;
          if (row < n && kk < k) {
            u = symmetric ? static_cast<int>(static_cast<int8_t>(codes[row * k + kk])) + bias : codes[row * k + kk];
          } else {  // padding: the true value 0
            const size_t g = std::min(kk / gp, ngroups - 1);
            u = tile_offsets ? tile_offsets[(t * ngroups + g) * kTileRows + i] : bias;
          }
          SetTileCode(data + t * tile_bytes, bits, kk, i, u);
        }
      }
    }
  });
}

// The tiles' float values, row-major [N, K] (the input gradient of a frozen
// layer needs W itself, not x @ W.T): the inverse of PackTiled, as the NumPy
// dequantize_packed computes it, (u - offset) * scale (level table: L[u] * scale)
// in float32. Scalar: one
// byte read per 1-2 outputs, so it runs at memory speed (~1 ms for 1536 x 576).
void DequantizeTiled(const TiledWeights& w, float* out, size_t out_stride) {
  const size_t tile_bytes = TileBytes(w.bits, w.kp);
  const int sym_offset = 1 << (w.bits - 1);
  ParallelFor(w.tiles, 1, [&](size_t t0, size_t t1) {
    for (size_t t = t0; t < t1; ++t) {
      for (size_t i = 0; i < kTileRows; ++i) {
        const size_t row = t * kTileRows + i;
        if (row >= w.n) break;
        float* dst = out + row * out_stride;
        for (size_t kk = 0; kk < w.k; ++kk) {
          const size_t g = kk / w.group;
          const size_t idx = (t * w.ngroups + g) * kTileRows + i;
          const float scale = w.scales       ? w.scales[idx]
                              : w.scales_f16 ? HalfToFloat(w.scales_f16[idx])
                                             : static_cast<float>(w.scale_codes[idx]) * w.row_scales[row];
          const int u = GetTileCode(w.data + t * tile_bytes, w.bits, kk, i);
          const int off = w.offsets ? w.offsets[idx] : sym_offset;
          dst[kk] = static_cast<float>(w.levels ? w.levels[u] : u - off) * scale;
        }
      }
    }
  });
}

bool QuantizeActivations(const float* x, size_t m, size_t k, size_t x_stride, size_t kp,
                         size_t group, float fixed_scale, int8_t* xq, float* xscale, int32_t* xsum) {
  if (group == 0 || kp % group != 0 || kp < k) throw std::invalid_argument("bad activation grouping");
  if (!(fixed_scale >= 0.0f) || fixed_scale > 3.0e38f) throw std::invalid_argument("act_scale must be finite and >= 0");
  return HWY_DYNAMIC_DISPATCH(QuantizeActivationsImpl)(x, m, k, x_stride, kp, group, fixed_scale, xq, xscale,
                                                       xsum);
}

void MatmulQuantAct(const int8_t* xq, const float* xscale, const int32_t* xsum, size_t m,
                    const TiledWeights& w, float* out, size_t out_stride) {
  if (w.group > 65536) throw std::invalid_argument("groups longer than 65536 could overflow int32");
  HWY_DYNAMIC_DISPATCH(MatmulQuantActImpl)(xq, xscale, xsum, m, w, out, out_stride);
}

void MatmulFloatAct(const float* x, size_t m, size_t x_stride, const TiledWeights& w, float* out,
                    size_t out_stride) {
  HWY_DYNAMIC_DISPATCH(MatmulFloatActImpl)(x, m, x_stride, w, out, out_stride);
}

}  // namespace lowbit
#endif  // HWY_ONCE
