// The codes of one k-step block of a tile (formats.h "tiled") as a vector of
// 32-bit lanes, in the int4 form (bytes u[j] | u[4 + j] << 4) for int3 and int4
// tiles and as stored for int8: every matmul kernel reads its codes through
// here, so the int3 planes cost one decode and the kernels' int4 code serves
// both. Per-target include, as Highway's *-inl.h headers.

#if defined(LOWBIT_TILE_CODES_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef LOWBIT_TILE_CODES_INL_H_
#undef LOWBIT_TILE_CODES_INL_H_
#else
#define LOWBIT_TILE_CODES_INL_H_
#endif

#include <cstddef>
#include <cstdint>

#include "hwy/cache_control.h"
#include "hwy/highway.h"
#include "lowbit/formats.h"

HWY_BEFORE_NAMESPACE();
namespace lowbit {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Code width of a tile's lanes as TileReader returns them: int3 reads as int4.
template <int kBits>
constexpr int kLaneBits = kBits == 8 ? 8 : 4;

// Bytes of the weight stream before k-step s of a tile (int3: 48 per k-step on
// average), for software prefetch distances.
template <int kBits>
constexpr size_t StreamOffset(size_t s) {
  return kBits == 3 ? s * (kInt3SuperBytes / kInt3SuperSteps) : s * kBlockBytes;
}

// Reads the code vectors of one tile, k-step by k-step: Lanes(s, v) is vector v
// (of 16 / lanes) of k-step s. int8 / int4 tiles load it as stored; int3 tiles
// decode a whole super-block (4 k-steps) into the int4 form the first time one
// of its k-steps is asked for, with every shift an immediate: 5 shifts, 4 ANDs
// and 4 OR-ANDs (vpternlogd on AVX-512) per 4 k-steps. Decoding one k-step at a
// time needed 2 shifts by a run-time count each (int3 g16 weight-only GEMV
// 8192x2048 from DRAM, 1 Zen 4 core: 26.5 G weights/s against int4's 33.6).
// Kernels walk k-steps in order, so each super-block is decoded once.
template <int kBits>
class TileReader {
 public:
  using DI = hn::ScalableTag<int32_t>;
  using VI = hn::Vec<DI>;
  static constexpr size_t kLanes = HWY_LANES(int32_t);
  static constexpr size_t kVecs = kTileRows / kLanes;

  TileReader() = default;
  explicit TileReader(const uint8_t* tile) : tile_(tile) {}

  // Software prefetch of the weight stream at k-step s.
  HWY_INLINE void Prefetch(size_t s) const { hwy::Prefetch(tile_ + StreamOffset<kBits>(s)); }

  HWY_INLINE VI Lanes(size_t s, size_t v) {
    if constexpr (kBits != 3) {
      return hn::LoadU(DI(), reinterpret_cast<const int32_t*>(tile_ + s * kBlockBytes) + v * kLanes);
    } else {
      if (s / kInt3SuperSteps != super_) Decode(s / kInt3SuperSteps);
      return cache_[(s % kInt3SuperSteps) * kVecs + v];
    }
  }

 private:
  // k-step ss of the super-block: ((plane[ss / 2] >> 2(ss & 1)) & 0x33) |
  // (((plane2 >> ss) << 2) & 0x44) (formats.h), the high plane's net shift
  // being <<2, <<1, 0, >>1 for ss = 0..3. Unsigned lanes: logical shifts.
  HWY_INLINE void Decode(size_t super) {
    const hn::ScalableTag<uint32_t> du;
    const uint8_t* sb = tile_ + super * kInt3SuperBytes;
    const auto low_mask = hn::Set(du, 0x33333333u), high_mask = hn::Set(du, 0x44444444u);
    for (size_t v = 0; v < kVecs; ++v) {
      const auto p0 = hn::LoadU(du, reinterpret_cast<const uint32_t*>(sb) + v * kLanes);
      const auto p1 = hn::LoadU(du, reinterpret_cast<const uint32_t*>(sb + kBlockBytes) + v * kLanes);
      const auto h = hn::LoadU(du, reinterpret_cast<const uint32_t*>(sb + 2 * kBlockBytes) + v * kLanes);
      cache_[0 * kVecs + v] = hn::BitCast(DI(), hn::OrAnd(hn::And(p0, low_mask), hn::ShiftLeft<2>(h), high_mask));
      cache_[1 * kVecs + v] =
          hn::BitCast(DI(), hn::OrAnd(hn::And(hn::ShiftRight<2>(p0), low_mask), hn::ShiftLeft<1>(h), high_mask));
      cache_[2 * kVecs + v] = hn::BitCast(DI(), hn::OrAnd(hn::And(p1, low_mask), h, high_mask));
      cache_[3 * kVecs + v] =
          hn::BitCast(DI(), hn::OrAnd(hn::And(hn::ShiftRight<2>(p1), low_mask), hn::ShiftRight<1>(h), high_mask));
    }
    super_ = super;
  }

  const uint8_t* tile_ = nullptr;
  size_t super_ = ~size_t(0);
  VI cache_[kBits == 3 ? kInt3SuperSteps * kVecs : 1];
};

// A layer's level table (formats.h "level tables") as bytes L[u] + 128 (so the
// integer kernels' unsigned-times-signed dot products take them, offset 128),
// repeated in every 128-bit block: byte shuffles (vpshufb) look up per block.
HWY_INLINE hn::Vec<hn::Repartition<uint8_t, hn::ScalableTag<int32_t>>> LevelBytes(const int8_t* levels) {
  alignas(16) uint8_t table[16];
  for (int i = 0; i < 16; ++i) table[i] = static_cast<uint8_t>(levels[i] + 128);
  return hn::LoadDup128(hn::Repartition<uint8_t, hn::ScalableTag<int32_t>>(), table);
}

// Codes u (0..15) in the low byte of 32-bit lanes, the other bytes 0, to
// L[u] + 128: one byte shuffle, and an AND because the zero bytes looked up
// entry 0.
HWY_INLINE hn::Vec<hn::ScalableTag<int32_t>> LookupLevelLanes(hn::Vec<hn::ScalableTag<int32_t>> u,
                                                              hn::Vec<hn::ScalableTag<int32_t>> table) {
  const hn::ScalableTag<int32_t> di;
  return hn::And(hn::TableLookupBytes(table, u), hn::Set(di, 0xFF));
}

}  // namespace HWY_NAMESPACE
}  // namespace lowbit
HWY_AFTER_NAMESPACE();

#endif  // LOWBIT_TILE_CODES_INL_H_
