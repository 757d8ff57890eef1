// Fake quantization (quantize then dequantize in float) and the
// straight-through-estimator mask, with torch.fake_quantize_per_*_affine's
// arithmetic: reciprocal multiply, round half to even, clamp, rescale.

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "lowbit/fake_quant.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include <atomic>
#include <cstring>
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

// One channel's constants as vectors, and the two results both directions use:
// the rounded code r and whether zp + r lies in [qmin, qmax] (the STE mask).
struct ChannelVecs {
  explicit ChannelVecs(const ChannelParams& p)
      : inv(hn::Set(DF(), p.inv)), scale(hn::Set(DF(), p.scale)), lo(hn::Set(DF(), p.lo)),
        hi(hn::Set(DF(), p.hi)) {}
  hn::Vec<DF> Code(hn::Vec<DF> x) const { return hn::Round(hn::Mul(x, inv)); }
  hn::Mask<DF> InRange(hn::Vec<DF> r) const { return hn::And(hn::Ge(r, lo), hn::Le(r, hi)); }
  hn::Vec<DF> inv, scale, lo, hi;
};

// A zero-padded stack copy for the last partial vector of a run: the tail goes
// through the same vector code without touching memory past the caller's arrays.
template <typename T>
struct PaddedTail {
  alignas(64) T buf[kF32Lanes] = {};
  T* In(const T* src, size_t n) {
    std::memcpy(buf, src, n * sizeof(T));
    return buf;
  }
  void Out(T* dst, size_t n) const { std::memcpy(dst, buf, n * sizeof(T)); }
};

bool FakeQuantForwardImpl(const float* x, size_t outer, size_t channels, size_t inner,
                          const float* scales, const int32_t* zps, int qmin, int qmax, float* out,
                          uint8_t* mask) {
  std::atomic<bool> ok{true};
  ForEachChannelRun(outer, channels, inner, scales, zps, qmin, qmax,
                    [&](size_t off, const ChannelParams& p) {
    const DF df;
    const DI di;
    const hn::Rebind<uint8_t, DI> d8;
    const ChannelVecs c(p);
    auto nan = hn::Lt(c.lo, c.lo);  // all false
    // One pass: x is loaded and rounded once for both the output and the mask.
    auto step = [&](const float* px, float* po, uint8_t* pm) {
      const auto v = hn::LoadU(df, px);
      nan = hn::Or(nan, hn::IsNaN(v));
      const auto r = c.Code(v);
      hn::StoreU(hn::Mul(hn::Min(hn::Max(r, c.lo), c.hi), c.scale), df, po);
      if (pm) {
        const auto bit = hn::IfThenElseZero(hn::RebindMask(di, c.InRange(r)), hn::Set(di, 1));
        hn::StoreU(hn::DemoteTo(d8, bit), d8, pm);
      }
    };
    size_t i = 0;
    for (; i + kF32Lanes <= inner; i += kF32Lanes) step(x + off + i, out + off + i, mask ? mask + off + i : nullptr);
    if (i < inner) {
      const size_t rem = inner - i;
      PaddedTail<float> tx, to;
      PaddedTail<uint8_t> tm;
      step(tx.In(x + off + i, rem), to.buf, mask ? tm.buf : nullptr);
      to.Out(out + off + i, rem);
      if (mask) tm.Out(mask + off + i, rem);
    }
    if (!hn::AllFalse(df, nan)) ok = false;
  });
  return ok;
}

void FakeQuantBackwardImpl(const float* x, const float* dy, size_t outer, size_t channels,
                           size_t inner, const float* scales, const int32_t* zps, int qmin,
                           int qmax, float* dx) {
  ForEachChannelRun(outer, channels, inner, scales, zps, qmin, qmax,
                    [&](size_t off, const ChannelParams& p) {
    const DF df;
    const ChannelVecs c(p);
    auto step = [&](const float* px, const float* pdy, float* pdx) {
      const auto in_range = c.InRange(c.Code(hn::LoadU(df, px)));
      hn::StoreU(hn::IfThenElseZero(in_range, hn::LoadU(df, pdy)), df, pdx);
    };
    size_t i = 0;
    for (; i + kF32Lanes <= inner; i += kF32Lanes) step(x + off + i, dy + off + i, dx + off + i);
    if (i < inner) {
      const size_t rem = inner - i;
      PaddedTail<float> tx, tdy, tdx;
      step(tx.In(x + off + i, rem), tdy.In(dy + off + i, rem), tdx.buf);
      tdx.Out(dx + off + i, rem);
    }
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
