// Error-minimising group scales (lowbit.quantize(method="mse")): for every
// group, the scale (and, asymmetric, the integer zero point) that minimises the
// squared weight error sum (x - s * (q - zp))^2 among a set of candidates, instead
// of the range rule of formats.h. The codes are then made by QuantizeRows with
// these scales, so the storage format and every kernel are unchanged.
//
// The search (per group of G elements, float32 math):
//   1. The range rule's scale s0 (ChooseScale) is candidate zero; it is always
//      evaluated, so the result is never worse than round-to-nearest.
//   2. 2 * steps + 1 trial reciprocals around the range rule's:
//        symmetric : inv_i = -(2^(b-1) + i * delta) / m     (m = largest-magnitude value)
//        asymmetric: inv_i = (qmax + i * delta) / (hi - lo), zp_i = clamp(nearbyint(-lo * inv_i))
//      with delta = 0.1 * 2^b / 16 (0.1 code steps at 4 bits, as llama.cpp's
//      searches use) and i = -steps .. steps: shrinking the range clips the few
//      largest values and rounds the many small ones finer. For each trial the
//      codes L are fixed and the least-squares scale s = sum(x L) / sum(L L) is
//      scored by the error it leaves, sum (x - s L)^2 (a second pass: see TrialError).
//   3. The best trial's scale, refined twice (codes from 1/s, least-squares s
//      again), and s0 are evaluated exactly as QuantizeRows will round them
//      (q = nearbyint(x * (1/s)) + zp, clamped); the lowest error wins (ties keep
//      the earlier candidate, s0 first).
// Weighted search (optional per-column importances c >= 0, one per input of K):
//   every sum above becomes sum c (x - s L)^2, sum c x L and sum c L L, i.e. the
//   output error of the layer if its inputs were independent with E[x_k^2] = c_k
//   (lowbit.calibrate.importance derives c without data; GPTQ's Hessian diagonal
//   is the same quantity measured). The candidates stay those of the unweighted
//   search, so the range rule's scale is still always evaluated. Unweighted runs
//   take the kWeighted = false instantiation: bit for bit the search before.
// Non-finite elements count as 0 in the search (QuantizeRows saturates +-inf and
// reports NaN). Every sum runs over vectors of the group padded with zeros, so
// results can differ between SIMD widths only by float summation order; the
// Python reference (reference.search_scales) follows the same steps.

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "lowbit/scale_search.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "hwy/highway.h"
#include "lowbit/kernels.h"
#include "lowbit/parallel.h"

HWY_BEFORE_NAMESPACE();
namespace lowbit {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using DF = hn::ScalableTag<float>;

// Sums of one trial: sum(x L) and sum(L L), with L = clamp(nearbyint(x * inv) + zp) - zp.
// Two accumulator pairs: FMA latency 4 against ~6 dependent ops per vector, so
// two independent chains keep the loop throughput-bound for G >= 64.
struct TrialSums {
  float xl, ll;
};

template <bool kWeighted>
HWY_INLINE TrialSums Trial(const float* x, const float* c, size_t padded, float inv, float zp, float qmin,
                           float qmax) {
  const DF df;
  const size_t n = hn::Lanes(df);
  const auto vinv = hn::Set(df, inv);
  const auto lo = hn::Set(df, qmin - zp), hi = hn::Set(df, qmax - zp);
  auto xl0 = hn::Zero(df), xl1 = hn::Zero(df), ll0 = hn::Zero(df), ll1 = hn::Zero(df);
  // L = q - zp; clamping x * inv to [qmin - zp, qmax - zp] before rounding gives
  // the same integers as clamping q after (formats.h).
  auto codes = [&](hn::Vec<DF> v) { return hn::Round(hn::Min(hn::Max(hn::Mul(v, vinv), lo), hi)); };
  // Weighted: c x and c L stand in for x and L as the first factors.
  auto weighted = [&](hn::Vec<DF> v, size_t at) { return kWeighted ? hn::Mul(v, hn::LoadU(df, c + at)) : v; };
  size_t i = 0;
  for (; i + 2 * n <= padded; i += 2 * n) {
    const auto v0 = hn::LoadU(df, x + i), v1 = hn::LoadU(df, x + i + n);
    const auto l0 = codes(v0), l1 = codes(v1);
    xl0 = hn::MulAdd(weighted(v0, i), l0, xl0);
    ll0 = hn::MulAdd(weighted(l0, i), l0, ll0);
    xl1 = hn::MulAdd(weighted(v1, i + n), l1, xl1);
    ll1 = hn::MulAdd(weighted(l1, i + n), l1, ll1);
  }
  for (; i < padded; i += n) {
    const auto v = hn::LoadU(df, x + i);
    const auto l = codes(v);
    xl0 = hn::MulAdd(weighted(v, i), l, xl0);
    ll0 = hn::MulAdd(weighted(l, i), l, ll0);
  }
  return {hn::GetLane(hn::SumOfLanes(df, hn::Add(xl0, xl1))), hn::GetLane(hn::SumOfLanes(df, hn::Add(ll0, ll1)))};
}

// Squared error of codes L (from trial reciprocal inv) with scale s: scoring a
// trial by sum(x x) - sum(x L)^2 / sum(L L) cancels catastrophically in float32
// at 8 bits (the error is ~1e-5 of sum(x x)), so every trial gets this pass too.
template <bool kWeighted>
HWY_INLINE float TrialError(const float* x, const float* c, size_t padded, float inv, float s, float zp, float qmin,
                            float qmax) {
  const DF df;
  const size_t n = hn::Lanes(df);
  const auto vinv = hn::Set(df, inv), vs = hn::Set(df, s);
  const auto lo = hn::Set(df, qmin - zp), hi = hn::Set(df, qmax - zp);
  auto e0 = hn::Zero(df), e1 = hn::Zero(df);
  auto weighted = [&](hn::Vec<DF> v, size_t at) { return kWeighted ? hn::Mul(v, hn::LoadU(df, c + at)) : v; };
  size_t i = 0;
  for (; i + 2 * n <= padded; i += 2 * n) {
    const auto v0 = hn::LoadU(df, x + i), v1 = hn::LoadU(df, x + i + n);
    const auto d0 = hn::NegMulAdd(hn::Round(hn::Min(hn::Max(hn::Mul(v0, vinv), lo), hi)), vs, v0);
    const auto d1 = hn::NegMulAdd(hn::Round(hn::Min(hn::Max(hn::Mul(v1, vinv), lo), hi)), vs, v1);
    e0 = hn::MulAdd(weighted(d0, i), d0, e0);
    e1 = hn::MulAdd(weighted(d1, i + n), d1, e1);
  }
  for (; i < padded; i += n) {
    const auto v = hn::LoadU(df, x + i);
    const auto d = hn::NegMulAdd(hn::Round(hn::Min(hn::Max(hn::Mul(v, vinv), lo), hi)), vs, v);
    e0 = hn::MulAdd(weighted(d, i), d, e0);
  }
  return hn::GetLane(hn::SumOfLanes(df, hn::Add(e0, e1)));
}

// Exact squared error of scale s (and zero point zp) as QuantizeRows rounds it:
// codes from the reciprocal 1/s, then the same error pass as a trial's.
template <bool kWeighted>
HWY_INLINE float Error(const float* x, const float* c, size_t padded, float s, float zp, float qmin, float qmax) {
  return TrialError<kWeighted>(x, c, padded, s == 0.0f ? 0.0f : 1.0f / s, s, zp, qmin, qmax);
}

// One group (already copied to a zero-padded buffer of `padded` floats; c
// likewise, when kWeighted).
template <bool kWeighted>
void SearchGroup(const float* x, const float* c, size_t g, size_t padded, int bits, bool symmetric, int steps,
                 float* scale, uint8_t* zp_out) {
  const DF df;
  const size_t n = hn::Lanes(df);
  auto vlo = hn::Zero(df), vhi = hn::Zero(df);
  for (size_t i = 0; i < padded; i += n) {
    const auto v = hn::LoadU(df, x + i);
    vlo = hn::Min(vlo, v);
    vhi = hn::Max(vhi, v);
  }
  const float lo = hn::GetLane(hn::MinOfLanes(df, vlo)), hi = hn::GetLane(hn::MaxOfLanes(df, vhi));
  float s0;
  int32_t z0;
  ChooseScale(lo, hi, bits, symmetric, &s0, &z0);
  *scale = s0;
  if (!symmetric) *zp_out = static_cast<uint8_t>(z0);
  if (s0 == 0.0f || g == 0) return;  // degenerate group: the range rule's zeros

  const float qmin = static_cast<float>(QMin(bits, symmetric)), qmax = static_cast<float>(QMax(bits, symmetric));
  const float delta = 0.1f * static_cast<float>(1 << bits) / 16.0f;
  float best_err = HUGE_VALF, best_s = s0, best_z = static_cast<float>(z0);
  const float m = (-lo >= hi) ? lo : hi;
  for (int i = -steps; i <= steps; ++i) {
    float inv, zp = 0.0f;
    if (symmetric) {
      inv = -(static_cast<float>(1 << (bits - 1)) + static_cast<float>(i) * delta) / m;
    } else {
      inv = (qmax + static_cast<float>(i) * delta) / (hi - lo);
      zp = std::fmin(std::fmax(std::nearbyint(-lo * inv), 0.0f), qmax);
    }
    if (!(std::isfinite(inv)) || inv == 0.0f) continue;
    const TrialSums t = Trial<kWeighted>(x, c, padded, inv, zp, qmin, qmax);
    if (!(t.ll > 0.0f)) continue;
    const float ls = t.xl / t.ll;  // least-squares scale for these codes
    const float err = TrialError<kWeighted>(x, c, padded, inv, ls, zp, qmin, qmax);
    if (err < best_err) {
      best_err = err;
      best_s = ls;
      best_z = zp;
    }
  }
  // Exact errors: s0 first (ties keep it), then the best trial and two refinements.
  float win_s = s0, win_z = static_cast<float>(z0);
  float win_err = Error<kWeighted>(x, c, padded, s0, win_z, qmin, qmax);
  float s = best_s;
  for (int refine = 0; refine < 3; ++refine) {
    if (!(std::fabs(s) >= FLT_MIN) || !std::isfinite(s)) break;
    const float err = Error<kWeighted>(x, c, padded, s, best_z, qmin, qmax);
    if (err < win_err) {
      win_err = err;
      win_s = s;
      win_z = best_z;
    }
    const TrialSums t = Trial<kWeighted>(x, c, padded, 1.0f / s, best_z, qmin, qmax);
    if (!(t.ll > 0.0f)) break;
    s = t.xl / t.ll;
  }
  *scale = win_s;
  if (!symmetric) *zp_out = static_cast<uint8_t>(win_z);
}

void SearchScalesImpl(const float* x, size_t rows, size_t k, size_t row_stride, size_t group, int bits,
                      bool symmetric, int steps, const float* importance, float* scales, uint8_t* zps) {
  const size_t lanes = hn::Lanes(DF());
  const size_t groups = k / group;
  const size_t padded = (group + lanes - 1) / lanes * lanes;
  // ~20 trial passes per element: a chunk of 16 Ki elements is ~0.1 ms of work,
  // far above a pool wake-up (~5-20 us).
  const size_t min_rows = std::max<size_t>(1, (size_t(1) << 14) / std::max<size_t>(1, k));
  ParallelFor(rows, min_rows, [&](size_t r0, size_t r1) {
    std::vector<float> buf(padded, 0.0f), cbuf(padded, 0.0f);
    for (size_t r = r0; r < r1; ++r) {
      for (size_t j = 0; j < groups; ++j) {
        const float* src = x + r * row_stride + j * group;
        for (size_t e = 0; e < group; ++e) buf[e] = std::isfinite(src[e]) ? src[e] : 0.0f;
        float* scale = &scales[r * groups + j];
        uint8_t* zp = symmetric ? nullptr : &zps[r * groups + j];
        if (importance) {
          std::copy(importance + j * group, importance + (j + 1) * group, cbuf.begin());
          SearchGroup<true>(buf.data(), cbuf.data(), group, padded, bits, symmetric, steps, scale, zp);
        } else {
          SearchGroup<false>(buf.data(), nullptr, group, padded, bits, symmetric, steps, scale, zp);
        }
      }
    }
  });
}

}  // namespace HWY_NAMESPACE
}  // namespace lowbit
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace lowbit {

HWY_EXPORT(SearchScalesImpl);

void SearchScales(const float* x, size_t rows, size_t k, size_t row_stride, size_t group, int bits, bool symmetric,
                  int steps, float* scales, uint8_t* zps, const float* importance) {
  if (bits < 2 || bits > 8) throw std::invalid_argument("bits must be in [2, 8]");
  if (group == 0 || k % group != 0) throw std::invalid_argument("group must divide k");
  if (steps < 0 || steps > 64) throw std::invalid_argument("steps must be in [0, 64]");
  if (!symmetric && zps == nullptr) throw std::invalid_argument("asymmetric search needs zero points");
  if (importance)
    for (size_t i = 0; i < k; ++i)
      if (!(importance[i] >= 0.0f) || !std::isfinite(importance[i]))
        throw std::invalid_argument("importance must be finite and >= 0");
  HWY_DYNAMIC_DISPATCH(SearchScalesImpl)(x, rows, k, row_stride, group, bits, symmetric, steps, importance, scales,
                                         zps);
}

}  // namespace lowbit
#endif  // HWY_ONCE
