// Per-group scales and offsets of the tiled weight layout (formats.h "tiled",
// "scale dtype") loaded as vectors of 16 rows: shared by the matmul kernels of
// matmul.cc and the shuffle GEMV of gemv_shuffle-inl.h. Per-target include, as
// Highway's *-inl.h headers.

#if defined(LOWBIT_TILE_SCALES_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef LOWBIT_TILE_SCALES_INL_H_
#undef LOWBIT_TILE_SCALES_INL_H_
#else
#define LOWBIT_TILE_SCALES_INL_H_
#endif

#include <cstddef>
#include <cstdint>

#include "hwy/highway.h"
#include "lowbit/kernels.h"

HWY_BEFORE_NAMESPACE();
namespace lowbit {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Offsets of 16 rows: symmetric weights have none stored (all 2^(bits-1)), which
// saves 4 bytes per group and row of traffic (6% of an int4 g128 GEMV). Codes
// looked up in a level table read as L[u] + 128 (tile_codes-inl.h): offset 128.
HWY_INLINE hn::Vec<hn::ScalableTag<int32_t>> LoadOffsets(const TiledWeights& w, size_t idx) {
  const hn::ScalableTag<int32_t> di;
  return w.offsets ? hn::LoadU(di, w.offsets + idx) : hn::Set(di, w.levels ? 128 : 1 << (w.bits - 1));
}

// Scales of 16 rows starting at row0 (= 16 t + lane), as float32: stored as
// float32, float16, or int8 codes times a per-row float32 scale (formats.h
// "scale dtype"). float16 halves the scale traffic (int4 g32: 4.5 instead of 5
// bits per weight) for one vcvtph2ps (F16C, AVX2 and up) per 8-16 scales;
// int8 codes quarter it (int4 g16: 4.5 + 32 / K) for a sign extension, a
// convert and a multiply. A scale serves 16-32 codes per row, so the branch and
// the widening cost a few % of a group's work. The products c * d are exact
// (d has an 11-bit significand), so every path computes with the same values
// as float32 tiles holding them.
//
// ScaleKind names the encoding at compile time: kRuntime tests the pointers
// (a GEMM amortises that over 8 rows); the GEMV, whose per-group epilogue at
// group 16 costs as much as the group's dot products, is instantiated per kind
// so its loop holds no branch and no reload of the pointers (the int8 codes
// path sat out of line behind 2 jumps per vector and group): AVX2 W4A8 int4
// g16 int8-codes GEMV in cache 30 -> 34-35 G weights/s on 1 thread. The
// weight-only shuffle GEMV keeps kRuntime: instantiated per kind it measured
// slower (15 -> 12 G weights/s, same run), its epilogue being a small share.
enum class ScaleKind { kRuntime, kF32, kF16, kI8 };

HWY_INLINE ScaleKind ScaleKindOf(const TiledWeights& w) {
  return w.scales != nullptr ? ScaleKind::kF32 : w.scales_f16 != nullptr ? ScaleKind::kF16 : ScaleKind::kI8;
}

template <ScaleKind kKind = ScaleKind::kRuntime>
HWY_INLINE hn::Vec<hn::ScalableTag<float>> LoadScales(const TiledWeights& w, size_t idx, size_t row0) {
  const hn::ScalableTag<float> df;
  if constexpr (kKind == ScaleKind::kRuntime) {
    switch (ScaleKindOf(w)) {
      case ScaleKind::kF32: return LoadScales<ScaleKind::kF32>(w, idx, row0);
      case ScaleKind::kF16: return LoadScales<ScaleKind::kF16>(w, idx, row0);
      default: return LoadScales<ScaleKind::kI8>(w, idx, row0);
    }
  } else if constexpr (kKind == ScaleKind::kF32) {
    return hn::LoadU(df, w.scales + idx);
  } else if constexpr (kKind == ScaleKind::kF16) {
    const hn::Rebind<hwy::float16_t, decltype(df)> dh;
    return hn::PromoteTo(df, hn::LoadU(dh, reinterpret_cast<const hwy::float16_t*>(w.scales_f16 + idx)));
  } else {
    const hn::ScalableTag<int32_t> di;
    const hn::Rebind<int8_t, decltype(di)> d8;
    const auto codes = hn::ConvertTo(df, hn::PromoteTo(di, hn::LoadU(d8, w.scale_codes + idx)));
    return hn::Mul(codes, hn::LoadU(df, w.row_scales + row0));
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace lowbit
HWY_AFTER_NAMESPACE();

#endif  // LOWBIT_TILE_SCALES_INL_H_
