// Weight-only GEMV (M < 4 rows of float activations) over symmetric int4 / int8
// tiles (formats.h "tiled"), with codes decoded by a byte shuffle: the decode
// path of every target without AVX-512 (AVX2, SSE4, SSSE3). Included by
// matmul.cc once per target, as Highway's *-inl.h headers.
//
// Why: the generic decode of a code is shift, and, subtract the offset, convert
// and FMA: 5 vector ops per 8 weights on AVX2, and with 2 tiles' codes,
// offsets and accumulators live it spilled; perf showed the loop compute-bound
// at ~9 G weights/s a core, half of what llama.cpp's Q4_0 dot reaches.
// Here a code costs a byte shuffle, a convert and the FMA (3 ops), plus 4 ops
// per 8 codes of a lane to prepare:
//   * the stored code is u = q + 2^(b-1); u XOR 2^(b-1) is q in b-bit two's
//     complement (int4: 0 -> 1000b = -8, 15 -> 0111b = 7), for all codes of a
//     lane with one XOR;
//   * int4: (L << 4) & 0xF0F0F0F0 puts each byte's low nibble (codes j < 4) in
//     its high half, L & 0xF0F0F0F0 keeps the high nibbles (codes j >= 4); int8:
//     the bytes are the codes; int3 (read in int4 form, tile_codes-inl.h, u =
//     q + 4 <= 7): XOR 0x44 makes each nibble's 3 low bits q in 3-bit two's
//     complement, (L << 5) & 0xE0E0E0E0 and (L << 1) & 0xE0E0E0E0 move them to
//     the top 3 bits of the byte, and the lane holds q * 2^29;
//   * a byte shuffle moves byte j of each 32-bit lane to its top byte and zeroes
//     the rest, so the lane holds q * 2^28 (int4) or q * 2^24 (int8) as a signed
//     int32, which converts to float exactly.
// The group sums are then exactly 2^28 (2^24) times the generic path's, since
// every product and partial sum is scaled by the same power of two; multiplying
// by 2^-28 (2^-24) before the scale gives the generic path's values bit for bit.
// That holds while nothing overflows or underflows: the caller uses this path
// only for rows whose values are finite with |x| <= 2^64 (a group sum then stays
// below 2^64 * 2^7 * 2^28 * 2^16 = 2^115), where products of normal floats and
// codes stay normal.

#if defined(LOWBIT_GEMV_SHUFFLE_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef LOWBIT_GEMV_SHUFFLE_INL_H_
#undef LOWBIT_GEMV_SHUFFLE_INL_H_
#else
#define LOWBIT_GEMV_SHUFFLE_INL_H_
#endif

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "hwy/cache_control.h"
#include "hwy/highway.h"
#include "lowbit/formats.h"
#include "lowbit/kernels.h"
#include "lowbit/tile_codes-inl.h"
#include "lowbit/tile_scales-inl.h"

HWY_BEFORE_NAMESPACE();
namespace lowbit {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// True if every x[i] is 0 or finite with min_nonzero <= |x[i]| <= max (NaN:
// false): the range checks of the shuffle GEMV and of the bfloat16 GEMV
// (gemv_bf16-inl.h).
HWY_INLINE bool AbsInRange(const float* x, size_t k, float min_nonzero, float max) {
  const hn::ScalableTag<float> df;
  const size_t n = hn::Lanes(df);
  const auto vmin = hn::Set(df, min_nonzero), vmax = hn::Set(df, max), zero = hn::Zero(df);
  auto bad = hn::Lt(zero, zero);
  size_t i = 0;
  for (; i + n <= k; i += n) {
    const auto a = hn::Abs(hn::LoadU(df, x + i));
    bad = hn::Or(bad, hn::Not(hn::Or(hn::Eq(a, zero), hn::And(hn::Le(vmin, a), hn::Le(a, vmax)))));
  }
  if (!hn::AllFalse(df, bad)) return false;
  for (; i < k; ++i) {
    const float a = x[i] < 0.0f ? -x[i] : x[i];
    if (!(a == 0.0f || (a >= min_nonzero && a <= max))) return false;
  }
  return true;
}

// True if every x[i] is finite with |x[i]| <= 2^64: the shuffle path's range.
HWY_INLINE bool FitsShuffleRange(const float* x, size_t k) {
  return AbsInRange(x, k, 0.0f, 18446744073709551616.0f);  // 2^64
}

// Software prefetch distance per tile stream: 64 blocks = 4 KiB, one page (the
// hardware prefetchers stop at page boundaries), as the generic GEMV.
constexpr size_t kPrefetchBlocks = 64;

// One activation row times NT tiles (NT * 16 outputs) over all of K; symmetric
// weights (no stored offsets) only.
template <size_t NT, int kBits>
HWY_INLINE void ShuffleGemvBlock(const float* x, const TiledWeights& w, size_t t0, float* out) {
  using DF = hn::ScalableTag<float>;
  using DI = hn::ScalableTag<int32_t>;
  using DU8 = hn::Repartition<uint8_t, DI>;
  const DF df;
  const DI di;
  const DU8 du8;
  constexpr size_t kLanes = HWY_LANES(int32_t);
  constexpr size_t kVecs = kTileRows / kLanes;
  constexpr size_t kV = NT * kVecs;
  constexpr size_t kStep = KStep(kBits);
  constexpr int kShift = kBits == 4 ? 28 : kBits == 3 ? 29 : 24;  // where the code lands in the lane
  const size_t steps_per_group = w.group / kStep;
  const size_t tile_bytes = TileBytes(kBits, w.kp);
  // Shuffle controls: byte j of each 32-bit lane to byte 3; bytes 0..2 from
  // index 0x80 (zero). Indices are per 128-bit block (lane i of a block at 4i).
  hn::Vec<DU8> ctrl[4];
  for (int j = 0; j < 4; ++j) {
    const auto lane_in_block = hn::And(hn::Iota(di, 0), hn::Set(di, 3));
    const auto idx = hn::Add(hn::ShiftLeft<2>(lane_in_block), hn::Set(di, j));
    ctrl[j] = hn::BitCast(du8, hn::Or(hn::ShiftLeft<24>(idx), hn::Set(di, 0x808080)));
  }
  const auto flip = hn::Set(di, int32_t(kBits == 4 ? 0x88888888u : kBits == 3 ? 0x44444444u : 0x80808080u));
  const auto nibbles = hn::Set(di, int32_t(kBits == 3 ? 0xE0E0E0E0u : 0xF0F0F0F0u));
  const auto unscale = hn::Set(df, 1.0f / float(1u << kShift));  // power of two: exact
  TileReader<kBits> tile[NT];
  for (size_t t = 0; t < NT; ++t) tile[t] = TileReader<kBits>(w.data + (t0 + t) * tile_bytes);

  hn::Vec<DF> oacc[kV];
  for (size_t v = 0; v < kV; ++v) oacc[v] = hn::Zero(df);
  for (size_t g = 0; g < w.ngroups; ++g) {
    hn::Vec<DF> gacc[kV];
    for (size_t v = 0; v < kV; ++v) gacc[v] = hn::Zero(df);
    for (size_t s = g * steps_per_group; s < (g + 1) * steps_per_group; ++s) {
      const float* xs = x + s * kStep;
      for (size_t t = 0; t < NT; ++t) tile[t].Prefetch(s + kPrefetchBlocks);
      for (size_t half = 0; half < (kBits == 8 ? 1u : 2u); ++half) {
        hn::Vec<DU8> codes[kV];
        for (size_t t = 0; t < NT; ++t) {
          for (size_t v = 0; v < kVecs; ++v) {
            const auto lanes = hn::Xor(tile[t].Lanes(s, v), flip);
            constexpr int kLow = kBits == 3 ? 5 : 4, kHigh = kBits == 3 ? 1 : 0;
            const auto sel = kBits == 8    ? lanes
                             : half == 0   ? hn::And(hn::ShiftLeft<kLow>(lanes), nibbles)
                                           : hn::And(hn::ShiftLeft<kHigh>(lanes), nibbles);
            codes[t * kVecs + v] = hn::BitCast(du8, sel);
          }
        }
        for (int j = 0; j < 4; ++j) {
          const auto xb = hn::Set(df, xs[half * 4 + j]);
          for (size_t v = 0; v < kV; ++v) {
            const auto q = hn::ConvertTo(df, hn::BitCast(di, hn::TableLookupBytesOr0(codes[v], ctrl[j])));
            gacc[v] = hn::MulAdd(q, xb, gacc[v]);
          }
        }
      }
    }
    for (size_t t = 0; t < NT; ++t) {
      for (size_t v = 0; v < kVecs; ++v) {
        const size_t idx = ((t0 + t) * w.ngroups + g) * kTileRows + v * kLanes;
        const auto scale = LoadScales(w, idx, (t0 + t) * kTileRows + v * kLanes);
        oacc[t * kVecs + v] = hn::MulAdd(hn::Mul(gacc[t * kVecs + v], unscale), scale, oacc[t * kVecs + v]);
      }
    }
  }
  for (size_t t = 0; t < NT; ++t) {
    const size_t n0 = (t0 + t) * kTileRows;
    if (n0 >= w.n) break;
    const bool whole = n0 + kTileRows <= w.n;
    alignas(64) float buf[kTileRows];
    float* dst = whole ? out + n0 : buf;
    for (size_t v = 0; v < kVecs; ++v) {
      auto y = oacc[t * kVecs + v];
      if (w.bias) y = hn::Add(y, hn::LoadU(df, w.bias + n0 + v * kLanes));
      hn::StoreU(y, df, dst + v * kLanes);
    }
    if (!whole) std::memcpy(out + n0, buf, (w.n - n0) * sizeof(float));
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace lowbit
HWY_AFTER_NAMESPACE();

#endif  // LOWBIT_GEMV_SHUFFLE_INL_H_
