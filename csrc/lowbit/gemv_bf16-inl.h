// Weight-only GEMV (M < 4 rows of float activations) over symmetric int4 / int8
// tiles (formats.h "tiled") with bfloat16 dot products: vdpbf16ps of
// AVX512_BF16 (Zen 4, Sapphire Rapids). Included by matmul.cc once per target,
// as Highway's *-inl.h headers; the kernel exists on the AVX3 target only and
// runs when the CPU has AVX512_BF16 (matmul.cc checks at run time).
//
// Why: the AVX-512 decode loop of matmul.cc spends 3 vector ops per 16 weights
// (shift, vpermps lookup, FMA): int4 g16 measured 24-28 G weights/s on one Zen 4
// core in cache and 23.7 from DRAM, where the core reads 22 GB/s (39 G weights/s
// at 4.5 bits). Here, per 8 k of a tile (128 int4 weights), 3 shifts, 4
// permutes and 8 dot products: 15 ops instead of 24.
//   * The activations are split once per call into two bfloat16 parts,
//     x = hi + lo + e with hi = bf16(x), lo = bf16(x - hi) (x - hi is exact in
//     float32) and |e| <= 2^-16 |x|: 16 significant bits of each activation.
//   * A code becomes a bfloat16 by a word permute (vpermw: word i of the result
//     is word (index_i & 31) of a 32-word table). Each 16-bit half of a 32-bit
//     lane holds 4 nibbles; a table of 16 entries written twice ignores the
//     fifth index bit, so one permute maps the lowest nibble of both halves, and
//     shifting the words right by 4, 8 and 12 brings the others down.
//       int4 (a lane holds codes 0..7 of its row at bits 0-3: 0, 4-7: 4, 8-11:
//       1, 12-15: 5, 16-19: 2, 20-23: 6, 24-27: 3, 28-31: 7): the shifts by
//       0, 4, 8, 12 give the pairs (q0, q2), (q4, q6), (q1, q3), (q5, q7);
//       table: u -> u - 8 (stored u = q + 8), or u -> L[u] with a level table.
//       int3 tiles read in int4 form (tile_codes-inl.h) with the table u -> u - 4.
//       int8 (bytes 0..3 are codes 0..3, stored u = q + 128 = 16 h + l): the
//       pairs are (l0, l2), (h0, h2), (l1, l3), (h1, h3), the low nibbles read
//       l -> l and the high ones h -> h - 8 and meet 16 x (exact), so the two
//       products add up to q x.
//   * vdpbf16ps multiplies each bfloat16 pair by the matching activation pair
//     and adds both products into the float32 lane: one instruction per 32
//     products, the throughput of one FMA of 16.
// Accuracy: every product is exact (a code has <= 5 significant bits, a part 8)
// and the sums round in float32 as an FMA chain does. vdpbf16ps treats denormal
// inputs and results as zero whatever MXCSR says, so only rows whose nonzero
// values lie in [2^-60, 2^64] take this path: their parts are >= 2^-84 and every
// product and partial sum has its lowest bit above 2^-126, so nothing is ever
// flushed (and nothing overflows). Other rows (denormal-scale values, inf,
// NaN, |x| > 2^64) take the decode loop. With the split, the error bound is
// the float32 one plus 2^-16 sum |w x| (python/lowbit/reference.py matmul(...,
// bf16_split=True)).

#if defined(LOWBIT_GEMV_BF16_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef LOWBIT_GEMV_BF16_INL_H_
#undef LOWBIT_GEMV_BF16_INL_H_
#else
#define LOWBIT_GEMV_BF16_INL_H_
#endif

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "hwy/cache_control.h"
#include "hwy/highway.h"
#include "lowbit/formats.h"
#include "lowbit/gemv_shuffle-inl.h"  // AbsInRange
#include "lowbit/kernels.h"
#include "lowbit/tile_codes-inl.h"
#include "lowbit/tile_scales-inl.h"

HWY_BEFORE_NAMESPACE();
namespace lowbit {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

#if HWY_TARGET == HWY_AVX3

// True if every x[i] is 0 or finite with 2^-60 <= |x[i]| <= 2^64: the range of
// the split (see Accuracy above).
HWY_INLINE bool FitsBf16SplitRange(const float* x, size_t k) {
  return AbsInRange(x, k, 8.67361737988403547e-19f, 18446744073709551616.0f);  // 2^-60, 2^64
}

// bfloat16 bits of a finite float, rounded to nearest even (no overflow for
// |x| <= 2^64, the caller's range).
HWY_INLINE uint32_t Bf16Bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
}

// Splits a into hi + lo (bfloat16 bits each).
HWY_INLINE void SplitBf16(float a, uint32_t* hi, uint32_t* lo) {
  *hi = Bf16Bits(a);
  const uint32_t hi_bits = *hi << 16;
  float hi_f;
  std::memcpy(&hi_f, &hi_bits, 4);
  *lo = Bf16Bits(a - hi_f);  // exact difference
}

// Activation pairs of one row, [kp / kstep][8] uint32: for pair p = 0..3 of a
// k-step (the order of the permutes above) the hi parts, then the lo parts,
// first element in the low 16 bits (it meets the low word of a weight lane).
// Columns K..kp of x are zero (MatmulFloatAct's contract).
template <int kBits>
HWY_INLINE void PrepareBf16Pairs(const float* x, size_t kp, uint32_t* xp) {
  constexpr size_t kStep = KStep(kBits);
  for (size_t s = 0; s < kp / kStep; ++s) {
    const float* v = x + s * kStep;
    float first[4], second[4];
    if (kBits != 8) {
      const float f[4] = {v[0], v[4], v[1], v[5]}, g[4] = {v[2], v[6], v[3], v[7]};
      std::memcpy(first, f, sizeof f);
      std::memcpy(second, g, sizeof g);
    } else {  // the high nibble's pairs meet 16 x: a power of two, exact
      const float f[4] = {v[0], 16.0f * v[0], v[1], 16.0f * v[1]}, g[4] = {v[2], 16.0f * v[2], v[3], 16.0f * v[3]};
      std::memcpy(first, f, sizeof f);
      std::memcpy(second, g, sizeof g);
    }
    for (size_t p = 0; p < 4; ++p) {
      uint32_t ah, al, bh, bl;
      SplitBf16(first[p], &ah, &al);
      SplitBf16(second[p], &bh, &bl);
      xp[s * 8 + p] = ah | (bh << 16);
      xp[s * 8 + 4 + p] = al | (bl << 16);
    }
  }
}

// 32 words: bfloat16 of (i & 15) + base, or of a level table's L[i & 15]
// (formats.h "level tables"; exact: |L| <= 127), so the permute ignores index
// bit 4.
HWY_INLINE __m512i NibbleTable(int base, const int8_t* levels = nullptr) {
  alignas(64) uint16_t t[32];
  for (int i = 0; i < 32; ++i)
    t[i] = static_cast<uint16_t>(Bf16Bits(static_cast<float>(levels ? levels[i & 15] : (i & 15) + base)));
  return _mm512_load_si512(t);
}

// acc += pairs(w) . pairs(x) per 32-bit lane. Inline asm as DotVnni: the
// compiler never emits AVX512_BF16 by itself here, so no other code of this
// target needs the extension.
// The activation pair is broadcast from memory by the instruction itself
// ({1to16}): one instruction instead of a broadcast and the dot (int4 g16
// 8192x2048 from DRAM 30 -> 31.5 G weights/s).
HWY_INLINE __m512 DotBf16Bcst(__m512 acc, __m512i w, const uint32_t* x) {
  asm("vdpbf16ps %[x]%{1to16%}, %[w], %[a]" : [a] "+v"(acc) : [w] "v"(w), [x] "m"(*x));
  return acc;
}

// Software prefetch distance: 4 KiB (one page), as the other GEMVs (none: 1536x576
// from DRAM the same, 8192x2048 10% slower).
constexpr size_t kBf16PrefetchBlocks = 64;

// One activation row (its pairs xp) times tile t0 over all of K. The caller
// walks the tiles in order, so the weights are read as one sequential stream:
// a Zen 4 core reads 22-23 GB/s that way against 12-19 GB/s from 4 tiles
// interleaved 64 bytes at a time (a read-only microbenchmark; the 4-tile GEMV
// below AVX512_BF16 interleaves them for 4 independent dot chains). Here the
// chains come from within the tile: hi and lo parts, even and odd pairs (4
// accumulators, 2 vdpbf16ps per step each), and the accumulators restart per
// group, so out-of-order execution overlaps consecutive groups. Int4 g16 from
// DRAM, 1 thread: 1536x576 16 -> 22 G weights/s, 8192x2048 26 -> 28, int8
// 49152x576 13.5 -> 16.3 against the 4-tile version of this kernel.
// The two code tables of a call (low nibbles / high nibbles of a byte), built
// once per call: per tile, a level table's 64 conversions cost 6% of an int4
// g16 8192x2048 GEMV (the even tables fold to constants).
struct Bf16Tables {
  __m512i lo, hi;
};
template <int kBits>
HWY_INLINE Bf16Tables MakeBf16Tables(const TiledWeights& w) {
  const int8_t* levels = kBits == 4 ? w.levels : nullptr;
  return {NibbleTable(kBits == 4 ? -8 : kBits == 3 ? -4 : 0, levels), NibbleTable(kBits == 3 ? -4 : -8, levels)};
}

template <int kBits>
HWY_INLINE void Bf16GemvTile(const uint32_t* xp, const TiledWeights& w, size_t t0, const Bf16Tables& tables,
                             float* out) {
  constexpr size_t kStep = KStep(kBits);
  const size_t steps_per_group = w.group / kStep;
  const size_t tile_bytes = TileBytes(kBits, w.kp);
  const __m512i tab_lo = tables.lo, tab_hi = tables.hi;
  TileReader<kBits> reader(w.data + t0 * tile_bytes);
  __m512 oacc = _mm512_setzero_ps();
  for (size_t g = 0; g < w.ngroups; ++g) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
    for (size_t s = g * steps_per_group; s < (g + 1) * steps_per_group; ++s) {
      const uint32_t* xs = xp + s * 8;
      reader.Prefetch(s + kBf16PrefetchBlocks);
      const __m512i lanes = reader.Lanes(s, 0).raw;
      const __m512i c0 = _mm512_permutexvar_epi16(lanes, tab_lo);
      const __m512i c1 = _mm512_permutexvar_epi16(_mm512_srli_epi16(lanes, 4), tab_hi);
      const __m512i c2 = _mm512_permutexvar_epi16(_mm512_srli_epi16(lanes, 8), tab_lo);
      const __m512i c3 = _mm512_permutexvar_epi16(_mm512_srli_epi16(lanes, 12), tab_hi);
      a0 = DotBf16Bcst(a0, c0, xs + 0);
      b0 = DotBf16Bcst(b0, c0, xs + 4);
      a1 = DotBf16Bcst(a1, c1, xs + 1);
      b1 = DotBf16Bcst(b1, c1, xs + 5);
      a0 = DotBf16Bcst(a0, c2, xs + 2);
      b0 = DotBf16Bcst(b0, c2, xs + 6);
      a1 = DotBf16Bcst(a1, c3, xs + 3);
      b1 = DotBf16Bcst(b1, c3, xs + 7);
    }
    const __m512 scale = LoadScales(w, (t0 * w.ngroups + g) * kTileRows, t0 * kTileRows).raw;
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(b0, b1));
    oacc = _mm512_fmadd_ps(sum, scale, oacc);
  }
  const size_t n0 = t0 * kTileRows;
  if (n0 >= w.n) return;
  if (w.bias) oacc = _mm512_add_ps(oacc, _mm512_loadu_ps(w.bias + n0));
  if (n0 + kTileRows <= w.n) {
    _mm512_storeu_ps(out + n0, oacc);
  } else {
    alignas(64) float buf[kTileRows];
    _mm512_store_ps(buf, oacc);
    std::memcpy(out + n0, buf, (w.n - n0) * sizeof(float));
  }
}

#endif  // HWY_TARGET == HWY_AVX3

}  // namespace HWY_NAMESPACE
}  // namespace lowbit
HWY_AFTER_NAMESPACE();

#endif  // LOWBIT_GEMV_BF16_INL_H_
