// Float format conversions: float32 <-> float16, bfloat16, fp8 e4m3 / e5m2
// (round to nearest even; formats.h gives the special-value rules).

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "lowbit/convert.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include <stdexcept>

#include "hwy/highway.h"
#include "lowbit/float_formats-inl.h"
#include "lowbit/kernels.h"
#include "lowbit/parallel.h"

HWY_BEFORE_NAMESPACE();
namespace lowbit {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using DF = hn::ScalableTag<float>;
using DI = hn::RebindToSigned<DF>;
constexpr size_t kF32Lanes = HWY_LANES(float);  // == Lanes(DF()), as a constant
// 256 Ki elements per parallel chunk: a conversion moves ~6 bytes/element, so
// a chunk is ~1.5 MB of traffic, far above the pool's wake-up cost.
constexpr size_t kChunk = size_t(1) << 18;

template <typename In, typename Out, class Body>
void Parallel(const In* in, Out* out, size_t n, const Body& body) {
  ParallelFor((n + kChunk - 1) / kChunk, 1, [&](size_t c0, size_t c1) {
    const size_t begin = c0 * kChunk, end = std::min(n, c1 * kChunk);
    ForEachVector<kF32Lanes>(in + begin, out + begin, end - begin, body);
  });
}

void F32ToF16Impl(const float* in, uint16_t* out, size_t n) {
  Parallel(in, reinterpret_cast<hwy::float16_t*>(out), n, [](const float* p, hwy::float16_t* o) {
    const DF df;
    StoreFromF32(df, hn::LoadU(df, p), o);
  });
}
void F16ToF32Impl(const uint16_t* in, float* out, size_t n) {
  Parallel(reinterpret_cast<const hwy::float16_t*>(in), out, n,
           [](const hwy::float16_t* p, float* o) {
             const DF df;
             hn::StoreU(LoadAsF32(df, p), df, o);
           });
}
void F32ToBF16Impl(const float* in, uint16_t* out, size_t n) {
  Parallel(in, reinterpret_cast<hwy::bfloat16_t*>(out), n, [](const float* p, hwy::bfloat16_t* o) {
    const DF df;
    StoreFromF32(df, hn::LoadU(df, p), o);
  });
}
void BF16ToF32Impl(const uint16_t* in, float* out, size_t n) {
  Parallel(reinterpret_cast<const hwy::bfloat16_t*>(in), out, n,
           [](const hwy::bfloat16_t* p, float* o) {
             const DF df;
             hn::StoreU(LoadAsF32(df, p), df, o);
           });
}

template <class F>
void F32ToFp8T(const float* in, uint8_t* out, size_t n, bool saturate) {
  Parallel(in, out, n, [saturate](const float* p, uint8_t* o) {
    const DF df;
    const hn::Rebind<uint8_t, DF> d8;
    // Codes are 0..255 in int32 lanes: the saturating demotion is exact.
    const auto code = hn::And(EncodeMiniFloat<F>(df, hn::LoadU(df, p), saturate), hn::Set(DI(), 0xFF));
    hn::StoreU(hn::DemoteTo(d8, code), d8, o);
  });
}
template <class F>
void Fp8ToF32T(const uint8_t* in, float* out, size_t n) {
  Parallel(in, out, n, [](const uint8_t* p, float* o) {
    const DF df;
    const hn::Rebind<uint8_t, DF> d8;
    hn::StoreU(DecodeMiniFloat<F>(df, hn::PromoteTo(DI(), hn::LoadU(d8, p))), df, o);
  });
}

void F32ToFp8Impl(const float* in, uint8_t* out, size_t n, Fp8Kind kind, bool saturate) {
  if (kind == Fp8Kind::kE4M3) return F32ToFp8T<E4M3Format>(in, out, n, saturate);
  return F32ToFp8T<E5M2Format>(in, out, n, saturate);
}
void Fp8ToF32Impl(const uint8_t* in, float* out, size_t n, Fp8Kind kind) {
  if (kind == Fp8Kind::kE4M3) return Fp8ToF32T<E4M3Format>(in, out, n);
  return Fp8ToF32T<E5M2Format>(in, out, n);
}

}  // namespace HWY_NAMESPACE
}  // namespace lowbit
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace lowbit {

HWY_EXPORT(F32ToF16Impl);
HWY_EXPORT(F16ToF32Impl);
HWY_EXPORT(F32ToBF16Impl);
HWY_EXPORT(BF16ToF32Impl);
HWY_EXPORT(F32ToFp8Impl);
HWY_EXPORT(Fp8ToF32Impl);

void F32ToF16(const float* in, uint16_t* out, size_t n) { HWY_DYNAMIC_DISPATCH(F32ToF16Impl)(in, out, n); }
void F16ToF32(const uint16_t* in, float* out, size_t n) { HWY_DYNAMIC_DISPATCH(F16ToF32Impl)(in, out, n); }
void F32ToBF16(const float* in, uint16_t* out, size_t n) { HWY_DYNAMIC_DISPATCH(F32ToBF16Impl)(in, out, n); }
void BF16ToF32(const uint16_t* in, float* out, size_t n) { HWY_DYNAMIC_DISPATCH(BF16ToF32Impl)(in, out, n); }
void F32ToFp8(const float* in, uint8_t* out, size_t n, Fp8Kind kind, bool saturate) {
  HWY_DYNAMIC_DISPATCH(F32ToFp8Impl)(in, out, n, kind, saturate);
}
void Fp8ToF32(const uint8_t* in, float* out, size_t n, Fp8Kind kind) {
  HWY_DYNAMIC_DISPATCH(Fp8ToF32Impl)(in, out, n, kind);
}

}  // namespace lowbit
#endif  // HWY_ONCE
