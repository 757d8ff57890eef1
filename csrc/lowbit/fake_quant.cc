// Fake quantization (quantize then dequantize in float) and the
// straight-through-estimator mask, with torch.fake_quantize_per_*_affine's
// arithmetic: reciprocal multiply, round half to even, clamp, rescale.

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "lowbit/fake_quant.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include <atomic>
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

// Per channel constants. r = Round(x * inv) stays in float (Round is half to
// even and keeps +-inf), so the mask test and the clamp see the exact integer
// torch computes; lo/hi are qmin - zp and qmax - zp.
struct ChannelParams {
  float inv, scale, lo, hi;
};

ChannelParams Params(const float* scales, const int32_t* zps, size_t c, int qmin, int qmax) {
  const float scale = scales[c];
  const int32_t zp = zps ? zps[c] : 0;
  return ChannelParams{1.0f / scale, scale, float(qmin - zp), float(qmax - zp)};
}

// Runs body(x_span, out_span, n, params) over every contiguous run of one channel.
template <class Body>
void ForEachChannelRun(size_t outer, size_t channels, size_t inner, const float* scales,
                       const int32_t* zps, int qmin, int qmax, const Body& body) {
  const size_t runs = outer * channels;
  const size_t min_runs = std::max<size_t>(1, (size_t(1) << 16) / std::max<size_t>(1, inner));
  ParallelFor(runs, min_runs, [&](size_t r0, size_t r1) {
    for (size_t r = r0; r < r1; ++r) body(r * inner, Params(scales, zps, r % channels, qmin, qmax));
  });
}

bool FakeQuantForwardImpl(const float* x, size_t outer, size_t channels, size_t inner,
                          const float* scales, const int32_t* zps, int qmin, int qmax, float* out,
                          uint8_t* mask) {
  std::atomic<bool> ok{true};
  ForEachChannelRun(outer, channels, inner, scales, zps, qmin, qmax,
                    [&](size_t off, const ChannelParams& p) {
    const DF df;
    const DI di;
    const hn::Rebind<uint8_t, DI> d8;
    const auto vinv = hn::Set(df, p.inv), vscale = hn::Set(df, p.scale);
    const auto vlo = hn::Set(df, p.lo), vhi = hn::Set(df, p.hi);
    auto nan = hn::Zero(df);
    ForEachVector<kF32Lanes>(x + off, out + off, inner, [&](const float* px, float* po) {
      const auto v = hn::LoadU(df, px);
      nan = hn::Or(nan, hn::VecFromMask(df, hn::IsNaN(v)));
      const auto r = hn::Round(hn::Mul(v, vinv));
      hn::StoreU(hn::Mul(hn::Min(hn::Max(r, vlo), vhi), vscale), df, po);
    });
    if (mask) {
      ForEachVector<kF32Lanes>(x + off, mask + off, inner, [&](const float* px, uint8_t* pm) {
        const auto r = hn::Round(hn::Mul(hn::LoadU(df, px), vinv));
        const auto in_range = hn::And(hn::Ge(r, vlo), hn::Le(r, vhi));
        const auto bit = hn::IfThenElseZero(hn::RebindMask(di, in_range), hn::Set(di, 1));
        hn::StoreU(hn::DemoteTo(d8, bit), d8, pm);
      });
    }
    if (!hn::AllTrue(df, hn::Eq(nan, hn::Zero(df)))) ok = false;
  });
  return ok;
}

void FakeQuantBackwardImpl(const float* x, const float* dy, size_t outer, size_t channels,
                           size_t inner, const float* scales, const int32_t* zps, int qmin,
                           int qmax, float* dx) {
  ForEachChannelRun(outer, channels, inner, scales, zps, qmin, qmax,
                    [&](size_t off, const ChannelParams& p) {
    const DF df;
    const auto vinv = hn::Set(df, p.inv), vlo = hn::Set(df, p.lo), vhi = hn::Set(df, p.hi);
    const float* pdy = dy + off;
    size_t i = 0;
    // dy rides along with x: pass the offset through the index.
    ForEachVector<kF32Lanes>(x + off, dx + off, inner, [&](const float* px, float* pdx) {
      HWY_ALIGN float dyb[kF32Lanes] = {};
      const size_t valid = std::min(kF32Lanes, inner - i);
      const float* src = pdy + i;
      if (valid < kF32Lanes) {
        std::copy(src, src + valid, dyb);
        src = dyb;
      }
      const auto r = hn::Round(hn::Mul(hn::LoadU(df, px), vinv));
      const auto in_range = hn::And(hn::Ge(r, vlo), hn::Le(r, vhi));
      hn::StoreU(hn::IfThenElseZero(in_range, hn::LoadU(df, src)), df, pdx);
      i += kF32Lanes;
    });
  });
}

}  // namespace HWY_NAMESPACE
}  // namespace lowbit
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace lowbit {

HWY_EXPORT(FakeQuantForwardImpl);
HWY_EXPORT(FakeQuantBackwardImpl);

bool FakeQuantForward(const float* x, size_t outer, size_t channels, size_t inner,
                      const float* scales, const int32_t* zps, int qmin, int qmax, float* out,
                      uint8_t* mask) {
  if (qmin > qmax) throw std::invalid_argument("quant_min must be <= quant_max");
  return HWY_DYNAMIC_DISPATCH(FakeQuantForwardImpl)(x, outer, channels, inner, scales, zps, qmin,
                                                    qmax, out, mask);
}

void FakeQuantBackward(const float* x, const float* dy, size_t outer, size_t channels, size_t inner,
                       const float* scales, const int32_t* zps, int qmin, int qmax, float* dx) {
  if (qmin > qmax) throw std::invalid_argument("quant_min must be <= quant_max");
  HWY_DYNAMIC_DISPATCH(FakeQuantBackwardImpl)(x, dy, outer, channels, inner, scales, zps, qmin,
                                              qmax, dx);
}

}  // namespace lowbit
#endif  // HWY_ONCE
