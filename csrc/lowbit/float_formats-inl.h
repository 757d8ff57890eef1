// Vector float-format codecs shared by the kernels (per-target include, as
// Highway's *-inl.h headers): float32 <-> float16 / bfloat16 / fp8 e4m3 / e5m2,
// round to nearest even, exactly as formats.h and reference.py specify.
// Highway 1.0.3's f32->bf16 DemoteTo truncates and its f16 path differs per
// target, so the conversions are written here with integer ops: the same
// arithmetic on every target.

#if defined(LOWBIT_FLOAT_FORMATS_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef LOWBIT_FLOAT_FORMATS_INL_H_
#undef LOWBIT_FLOAT_FORMATS_INL_H_
#else
#define LOWBIT_FLOAT_FORMATS_INL_H_
#endif

#include <cstdint>
#include <cstring>

#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace lowbit {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// A binary float format with kExp exponent bits and kMan mantissa bits.
// kIeee: the top exponent encodes inf/NaN (float16, e5m2). Otherwise only
// all-ones exponent and mantissa is NaN (e4m3fn), so the top binade is finite.
template <int E, int M, bool kIeeeSpecials>
struct MiniFloat {
  static constexpr int kExp = E;
  static constexpr int kMan = M;
  static constexpr bool kIeee = kIeeeSpecials;
  static constexpr int kBias = (1 << (kExp - 1)) - 1;
  static constexpr int32_t kMagMask = (1 << (kExp + kMan)) - 1;
  static constexpr int32_t kInfCode = kIeee ? (((1 << kExp) - 1) << kMan) : -1;
  static constexpr int32_t kMaxCode = kIeee ? kInfCode - 1 : kMagMask - 1;
  static constexpr int32_t kNanCode = kIeee ? (kInfCode | (1 << (kMan - 1))) : kMagMask;
  // Smallest normal of the format, as float32 bits: 2^(1 - bias).
  static constexpr int32_t kMinNormalBits = (127 + 1 - kBias) << 23;
  // Subnormals are multiples of 2^(1 - bias - kMan). Adding 2^23 times that unit
  // to |x| leaves float32's ULP equal to the unit, so the FPU's own
  // round-to-nearest-even rounds |x| to a whole number of units.
  static constexpr int32_t kSubMagicBits = (127 + 1 - kBias - kMan + 23) << 23;
};
using F16Format = MiniFloat<5, 10, true>;
using E4M3Format = MiniFloat<4, 3, false>;
using E5M2Format = MiniFloat<5, 2, true>;

template <class F>
constexpr int kSignShift() {
  return F::kExp + F::kMan;
}

template <class F, class DF>
HWY_INLINE float SubMagic(DF) {
  float f;
  const int32_t bits = F::kSubMagicBits;
  std::memcpy(&f, &bits, 4);
  return f;
}

// float32 -> format codes in int32 lanes (sign included). saturate: finite
// overflow and +-inf give the largest finite code instead of inf / NaN.
template <class F, class DF>
HWY_INLINE hn::Vec<hn::RebindToSigned<DF>> EncodeMiniFloat(DF df, hn::Vec<DF> v, bool saturate) {
  const hn::RebindToSigned<DF> di;
  const hn::RebindToUnsigned<DF> du;
  const auto bits = hn::BitCast(di, v);
  const auto mag = hn::And(bits, hn::Set(di, 0x7FFFFFFF));
  const auto sign = hn::BitCast(
      di, hn::ShiftLeft<kSignShift<F>()>(hn::ShiftRight<31>(hn::BitCast(du, bits))));

  const auto magic = hn::Set(df, SubMagic<F>(df));
  const auto sub = hn::Sub(hn::BitCast(di, hn::Add(hn::Abs(v), magic)), hn::BitCast(di, magic));

  constexpr int kDrop = 23 - F::kMan;  // mantissa bits dropped
  const auto odd = hn::And(hn::ShiftRight<kDrop>(mag), hn::Set(di, 1));
  const auto rounded = hn::Add(hn::Add(mag, hn::Set(di, (1 << (kDrop - 1)) - 1)), odd);
  const auto normal =
      hn::Sub(hn::ShiftRight<kDrop>(rounded), hn::Set(di, (127 - F::kBias) << F::kMan));

  auto code = hn::IfThenElse(hn::Lt(mag, hn::Set(di, F::kMinNormalBits)), sub, normal);
  const int32_t overflow = saturate ? F::kMaxCode : (F::kInfCode >= 0 ? F::kInfCode : F::kNanCode);
  code = hn::IfThenElse(hn::Gt(code, hn::Set(di, F::kMaxCode)), hn::Set(di, overflow), code);
  code = hn::IfThenElse(hn::Gt(mag, hn::Set(di, 0x7F800000)), hn::Set(di, F::kNanCode), code);
  return hn::Or(code, sign);
}

// Format codes in int32 lanes -> float32 (exact: every code is representable).
template <class F, class DF>
HWY_INLINE hn::Vec<DF> DecodeMiniFloat(DF df, hn::Vec<hn::RebindToSigned<DF>> code) {
  const hn::RebindToSigned<DF> di;
  const auto mag = hn::And(code, hn::Set(di, F::kMagMask));
  const auto sign = hn::ShiftLeft<31 - kSignShift<F>()>(hn::AndNot(hn::Set(di, F::kMagMask), code));
  const auto normal = hn::Add(hn::ShiftLeft<23 - F::kMan>(mag), hn::Set(di, (127 - F::kBias) << 23));
  // Subnormal: mantissa * 2^(1 - bias - kMan), exact in float32.
  float unit;
  const int32_t unit_bits = (127 + 1 - F::kBias - F::kMan) << 23;
  std::memcpy(&unit, &unit_bits, 4);
  const auto sub = hn::BitCast(di, hn::Mul(hn::ConvertTo(df, mag), hn::Set(df, unit)));
  auto bits = hn::IfThenElse(hn::Lt(mag, hn::Set(di, 1 << F::kMan)), sub, normal);
  if (F::kIeee) {
    // Top exponent: inf (mantissa 0) or a quiet NaN.
    const auto top = hn::Gt(mag, hn::Set(di, F::kInfCode - 1));
    const auto nan = hn::Gt(mag, hn::Set(di, F::kInfCode));
    bits = hn::IfThenElse(top, hn::Set(di, 0x7F800000), bits);
    bits = hn::IfThenElse(nan, hn::Set(di, 0x7FC00000), bits);
  } else {
    bits = hn::IfThenElse(hn::Eq(mag, hn::Set(di, F::kNanCode)), hn::Set(di, 0x7FC00000), bits);
  }
  return hn::BitCast(df, hn::Or(bits, sign));
}

// float32 -> bfloat16 bits in int32 lanes: round to nearest even, quiet NaN.
template <class DF>
HWY_INLINE hn::Vec<hn::RebindToSigned<DF>> EncodeBF16(DF df, hn::Vec<DF> v) {
  const hn::RebindToSigned<DF> di;
  const hn::RebindToUnsigned<DF> du;
  const auto bits = hn::BitCast(du, v);
  const auto odd = hn::And(hn::ShiftRight<16>(bits), hn::Set(du, 1));
  const auto rounded = hn::ShiftRight<16>(hn::Add(hn::Add(bits, hn::Set(du, 0x7FFF)), odd));
  const auto nan = hn::Or(hn::And(hn::ShiftRight<16>(bits), hn::Set(du, 0x8000)), hn::Set(du, 0x7FC0));
  const auto is_nan = hn::Gt(hn::BitCast(di, hn::And(bits, hn::Set(du, 0x7FFFFFFF))),
                             hn::Set(di, 0x7F800000));
  return hn::IfThenElse(is_nan, hn::BitCast(di, nan), hn::BitCast(di, rounded));
}

template <class DF>
HWY_INLINE hn::Vec<DF> DecodeBF16(DF df, hn::Vec<hn::RebindToSigned<DF>> code) {
  return hn::BitCast(df, hn::ShiftLeft<16>(code));
}

// Loads Lanes(df) elements stored as T and widens them to float32.
template <class DF>
HWY_INLINE hn::Vec<DF> LoadAsF32(DF df, const float* p) {
  return hn::LoadU(df, p);
}
template <class DF>
HWY_INLINE hn::Vec<DF> LoadAsF32(DF df, const hwy::float16_t* p) {
  const hn::RebindToSigned<DF> di;
  const hn::Rebind<uint16_t, DF> d16;
  const auto code = hn::PromoteTo(di, hn::LoadU(d16, reinterpret_cast<const uint16_t*>(p)));
  return DecodeMiniFloat<F16Format>(df, code);
}
template <class DF>
HWY_INLINE hn::Vec<DF> LoadAsF32(DF df, const hwy::bfloat16_t* p) {
  const hn::RebindToSigned<DF> di;
  const hn::Rebind<uint16_t, DF> d16;
  return DecodeBF16(df, hn::PromoteTo(di, hn::LoadU(d16, reinterpret_cast<const uint16_t*>(p))));
}

// Narrows float32 lanes to T (round to nearest even) and stores Lanes(df) of them.
template <class DF>
HWY_INLINE void StoreFromF32(DF df, hn::Vec<DF> v, float* p) {
  hn::StoreU(v, df, p);
}
template <class DF>
HWY_INLINE void StoreFromF32(DF df, hn::Vec<DF> v, hwy::float16_t* p) {
  const hn::Rebind<uint16_t, DF> d16;
  hn::StoreU(hn::DemoteTo(d16, EncodeMiniFloat<F16Format>(df, v, false)), d16,
             reinterpret_cast<uint16_t*>(p));
}
template <class DF>
HWY_INLINE void StoreFromF32(DF df, hn::Vec<DF> v, hwy::bfloat16_t* p) {
  const hn::Rebind<uint16_t, DF> d16;
  hn::StoreU(hn::DemoteTo(d16, EncodeBF16(df, v)), d16, reinterpret_cast<uint16_t*>(p));
}

// Runs body(in, out) over n elements, Lanes per call; the tail goes through
// zero-padded stack buffers so it uses the very same vector code (identical
// numerics) without reading or writing past the caller's arrays.
template <size_t kLanes, typename TIn, typename TOut, class Body>
HWY_INLINE void ForEachVector(const TIn* in, TOut* out, size_t n, const Body& body) {
  size_t i = 0;
  for (; i + kLanes <= n; i += kLanes) body(in + i, out + i);
  if (i < n) {
    alignas(64) TIn in_buf[kLanes];
    alignas(64) TOut out_buf[kLanes];
    std::memset(static_cast<void*>(in_buf), 0, sizeof(in_buf));
    std::memcpy(static_cast<void*>(in_buf), in + i, (n - i) * sizeof(TIn));
    body(in_buf, out_buf);
    std::memcpy(static_cast<void*>(out + i), out_buf, (n - i) * sizeof(TOut));
  }
}

// Read-only variant for reductions: body(in) per vector, zero-padded tail.
template <size_t kLanes, typename TIn, class Body>
HWY_INLINE void ForEachVectorIn(const TIn* in, size_t n, const Body& body) {
  size_t i = 0;
  for (; i + kLanes <= n; i += kLanes) body(in + i);
  if (i < n) {
    alignas(64) TIn in_buf[kLanes];
    std::memset(static_cast<void*>(in_buf), 0, sizeof(in_buf));
    std::memcpy(static_cast<void*>(in_buf), in + i, (n - i) * sizeof(TIn));
    body(in_buf);
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace lowbit
HWY_AFTER_NAMESPACE();

#endif  // LOWBIT_FLOAT_FORMATS_INL_H_
