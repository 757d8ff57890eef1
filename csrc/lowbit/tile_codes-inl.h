// The codes of one k-step block of a tile (formats.h "tiled") as a vector of
// 32-bit lanes, in the int4 form (bytes u[j] | u[4 + j] << 4) for int3 and int4
// tiles and as stored for int8: every matmul kernel reads its codes through
// here, so the int3 planes cost one decode and the kernels' int4 code serves
// both. Per-target include, as Highway's *-inl.h headers.
//
// The int3 decode is 2 loads, 2 shifts by a run-time count, 1 immediate shift,
// 2 ANDs and an OR per vector: ~6 ops per 128 weights (AVX-512), next to the 2
// nibble selects and 2 dot products (vpdpbusd) or 4 permutes and 8 vdpbf16ps
// the kernels spend on them, for 2/3 of int4's bytes.

#if defined(LOWBIT_TILE_CODES_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef LOWBIT_TILE_CODES_INL_H_
#undef LOWBIT_TILE_CODES_INL_H_
#else
#define LOWBIT_TILE_CODES_INL_H_
#endif

#include <cstddef>
#include <cstdint>

#include "hwy/highway.h"
#include "lowbit/formats.h"

HWY_BEFORE_NAMESPACE();
namespace lowbit {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Code width of a tile's lanes after BlockLanes: int3 reads as int4.
template <int kBits>
constexpr int kLaneBits = kBits == 8 ? 8 : 4;

// Bytes of the weight stream before k-step s of a tile (int3: 48 per k-step on
// average), for software prefetch distances.
template <int kBits>
constexpr size_t StreamOffset(size_t s) {
  return kBits == 3 ? s * (kInt3SuperBytes / kInt3SuperSteps) : s * kBlockBytes;
}

// Vector v (of 16 / lanes) of k-step s of the tile starting at `tile`.
template <int kBits>
HWY_INLINE hn::Vec<hn::ScalableTag<int32_t>> BlockLanes(const uint8_t* tile, size_t s, size_t v) {
  const hn::ScalableTag<int32_t> di;
  constexpr size_t kLanes = HWY_LANES(int32_t);
  if constexpr (kBits != 3) {
    return hn::LoadU(di, reinterpret_cast<const int32_t*>(tile + s * kBlockBytes) + v * kLanes);
  } else {
    // Unsigned lanes: logical shifts (the masks would hide the sign bits of
    // an arithmetic shift too, but this states it).
    const hn::ScalableTag<uint32_t> du;
    const uint8_t* sb = tile + (s / kInt3SuperSteps) * kInt3SuperBytes;
    const size_t ss = s % kInt3SuperSteps;
    const auto low = hn::LoadU(du, reinterpret_cast<const uint32_t*>(sb + (ss / 2) * kBlockBytes) + v * kLanes);
    const auto high = hn::LoadU(du, reinterpret_cast<const uint32_t*>(sb + 2 * kBlockBytes) + v * kLanes);
    const auto low_bits = hn::And(hn::ShiftRightSame(low, int(2 * (ss & 1))), hn::Set(du, 0x33333333u));
    const auto high_bits = hn::And(hn::ShiftLeft<2>(hn::ShiftRightSame(high, int(ss))), hn::Set(du, 0x44444444u));
    return hn::BitCast(di, hn::Or(low_bits, high_bits));
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace lowbit
HWY_AFTER_NAMESPACE();

#endif  // LOWBIT_TILE_CODES_INL_H_
