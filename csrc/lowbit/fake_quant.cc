// Fake quantization (quantize then dequantize in float) and the
// straight-through-estimator mask, with torch.fake_quantize_per_*_affine's
// arithmetic: reciprocal multiply, round half to even, clamp, rescale.

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "lowbit/fake_quant.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include <atomic>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "hwy/highway.h"
#include "lowbit/float_formats-inl.h"
#include "lowbit/kernels.h"
#include "lowbit/parallel.h"

// Target-independent, defined once although foreach_target includes this file per target.
#ifndef LOWBIT_FAKE_QUANT_PIECES_
#define LOWBIT_FAKE_QUANT_PIECES_
namespace lowbit {
// Runs longer than this are cut into pieces so that per-tensor and few-channel
// tensors still use every thread (64 Ki floats = 256 KiB: a piece stays in L2).
constexpr size_t kPiece = size_t(1) << 16;
inline size_t PiecesPerRun(size_t inner) { return inner == 0 ? 1 : (inner + kPiece - 1) / kPiece; }
}  // namespace lowbit
#endif

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

// Runs body(offset, count, params, item) over every piece of every contiguous
// run of one channel; item = run * PiecesPerRun(inner) + piece.
template <class Body>
void ForEachChannelRun(size_t outer, size_t channels, size_t inner, const float* scales,
                       const int32_t* zps, int qmin, int qmax, const Body& body) {
  const size_t per_run = PiecesPerRun(inner);
  const size_t items = outer * channels * per_run;
  const size_t piece = std::min(inner, kPiece);
  const size_t min_items = std::max<size_t>(1, kPiece / std::max<size_t>(1, piece));
  ParallelFor(items, min_items, [&](size_t i0, size_t i1) {
    for (size_t i = i0; i < i1; ++i) {
      const size_t run = i / per_run, p = i % per_run;
      const size_t begin = p * kPiece, count = std::min(inner - std::min(inner, begin), kPiece);
      body(run * inner + begin, count, Params(scales, zps, run % channels, qmin, qmax), i);
    }
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
                    [&](size_t off, size_t inner, const ChannelParams& p, size_t) {
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

// dscale_items / dzp_items: one LSQ partial sum per piece (null: STE only).
void FakeQuantBackwardImpl(const float* x, const float* dy, size_t outer, size_t channels,
                           size_t inner, const float* scales, const int32_t* zps, int qmin,
                           int qmax, float* dx, double* dscale_items, double* dzp_items) {
  ForEachChannelRun(outer, channels, inner, scales, zps, qmin, qmax,
                    [&](size_t off, size_t inner, const ChannelParams& p, size_t item) {
    const DF df;
    const ChannelVecs c(p);
    const bool lsq = dscale_items != nullptr;
    // LSQ terms accumulate in float lanes and are flushed to double every 256
    // vectors, so a 64 Ki piece sums with ~1e-7 relative error, not ~1e-4.
    auto acc_s = hn::Zero(df), acc_z = hn::Zero(df);
    double sum_s = 0.0, sum_z = 0.0;
    size_t pending = 0;
    const auto neg_scale = hn::Neg(c.scale);
    auto step = [&](const float* px, const float* pdy, float* pdx) {
      const auto v = hn::LoadU(df, px);
      const auto g = hn::LoadU(df, pdy);
      const auto r = c.Code(v);
      const auto in_range = c.InRange(r);
      hn::StoreU(hn::IfThenElseZero(in_range, g), df, pdx);
      if (lsq) {
        // In range: (r * scale - x) * inv; outside: the clamp bound minus zp.
        const auto inside = hn::Mul(hn::Sub(hn::Mul(r, c.scale), v), c.inv);
        const auto bound = hn::IfThenElse(hn::Lt(r, c.lo), c.lo, c.hi);
        acc_s = hn::MulAdd(hn::IfThenElse(in_range, inside, bound), g, acc_s);
        acc_z = hn::MulAdd(hn::IfThenElseZero(hn::Not(in_range), neg_scale), g, acc_z);
        if (++pending == 256) {
          sum_s += hn::GetLane(hn::SumOfLanes(df, acc_s));
          sum_z += hn::GetLane(hn::SumOfLanes(df, acc_z));
          acc_s = hn::Zero(df);
          acc_z = hn::Zero(df);
          pending = 0;
        }
      }
    };
    size_t i = 0;
    for (; i + kF32Lanes <= inner; i += kF32Lanes) step(x + off + i, dy + off + i, dx + off + i);
    if (i < inner) {
      const size_t rem = inner - i;
      PaddedTail<float> tx, tdy, tdx;  // padding: x = 0, dy = 0 -> adds nothing to the sums
      step(tx.In(x + off + i, rem), tdy.In(dy + off + i, rem), tdx.buf);
      tdx.Out(dx + off + i, rem);
    }
    if (lsq) {
      dscale_items[item] = sum_s + hn::GetLane(hn::SumOfLanes(df, acc_s));
      dzp_items[item] = sum_z + hn::GetLane(hn::SumOfLanes(df, acc_z));
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
                       const float* scales, const int32_t* zps, int qmin, int qmax, float* dx,
                       double* dscale, double* dzp) {
  if (qmin > qmax) throw std::invalid_argument("quant_min must be <= quant_max");
  if ((dscale == nullptr) != (dzp == nullptr)) throw std::invalid_argument("dscale and dzp go together");
  std::vector<double> s_items, z_items;
  if (dscale) {
    const size_t items = outer * channels * PiecesPerRun(inner);
    s_items.assign(items, 0.0);
    z_items.assign(items, 0.0);
  }
  HWY_DYNAMIC_DISPATCH(FakeQuantBackwardImpl)(x, dy, outer, channels, inner, scales, zps, qmin,
                                              qmax, dx, dscale ? s_items.data() : nullptr,
                                              dscale ? z_items.data() : nullptr);
  if (dscale) {
    const size_t per_run = PiecesPerRun(inner);
    for (size_t c = 0; c < channels; ++c) dscale[c] = dzp[c] = 0.0;
    for (size_t i = 0; i < s_items.size(); ++i) {
      const size_t c = (i / per_run) % channels;
      dscale[c] += s_items[i];
      dzp[c] += z_items[i];
    }
  }
}

}  // namespace lowbit
#endif  // HWY_ONCE
