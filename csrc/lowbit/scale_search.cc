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

// The code values L of x on the even grid: clamping x * inv to [qmin - zp, qmax -
// zp] before rounding gives the same integers as clamping q after (formats.h).
struct EvenGrid {
  hn::Vec<DF> inv, lo, hi;
  EvenGrid(float inv_, float zp, float qmin, float qmax)
      : inv(hn::Set(DF(), inv_)), lo(hn::Set(DF(), qmin - zp)), hi(hn::Set(DF(), qmax - zp)) {}
  HWY_INLINE hn::Vec<DF> operator()(hn::Vec<DF> v) const { return hn::Round(hn::Min(hn::Max(hn::Mul(v, inv), lo), hi)); }
};

// A level table (formats.h "level tables") as thresholds: the level of t = x * inv
// is L[0] plus the gaps L[j + 1] - L[j] of every midpoint (L[j] + L[j + 1]) / 2
// that t exceeds, i.e. the nearest level, ties to the lower one. 15 compares and
// masked adds per vector: ~2 ops per weight and trial, no table lookup (float
// lookups of 16 entries need AVX-512).
struct LevelVectors {
  hn::Vec<DF> first, mid[15], gap[15];
#if HWY_TARGET == HWY_AVX3
  // AVX-512: t in 32 buckets of width 8 over [-128, 128) (clamped at the
  // ends); a bucket holds at most one midpoint when midpoints lie >= 8 apart
  // (t5: >= 8.5), so the level is the bucket's lower or upper level by one
  // compare with that midpoint: 3 two-register permutes, a compare and a
  // blend instead of 15 compares and adds (the level search of a 1B-class
  // model: 59 -> see the README). Same levels as the scan: the midpoints
  // below a bucket are below every t in it, and an FMA t / 8 + 16 only
  // rounds a t within 2^-20 of an edge up to it, where no half-integer
  // midpoint lies between.
  bool bucketed = true;
  __m512 lower[2], upper[2], threshold[2];
#endif
  explicit LevelVectors(const float* levels) : first(hn::Set(DF(), levels[0])) {
    float mids[15];
    for (int j = 0; j < 15; ++j) {
      mids[j] = 0.5f * (levels[j] + levels[j + 1]);
      mid[j] = hn::Set(DF(), mids[j]);
      gap[j] = hn::Set(DF(), levels[j + 1] - levels[j]);
    }
#if HWY_TARGET == HWY_AVX3
    alignas(64) float lo[32], hi[32], th[32];
    for (int b = 0; b < 32; ++b) {
      const float edge = 8.0f * static_cast<float>(b - 16);
      int below = 0, inside = 0;
      for (int j = 0; j < 15; ++j) {
        below += mids[j] < edge;
        inside += mids[j] >= edge && mids[j] < edge + 8.0f;
      }
      if (inside > 1) bucketed = false;
      lo[b] = levels[below];
      hi[b] = inside ? levels[below + 1] : levels[below];
      th[b] = inside ? mids[below] : HUGE_VALF;
    }
    for (int h = 0; h < 2; ++h) {
      lower[h] = _mm512_load_ps(lo + 16 * h);
      upper[h] = _mm512_load_ps(hi + 16 * h);
      threshold[h] = _mm512_load_ps(th + 16 * h);
    }
#endif
  }
};
// The level of t: 4 partial sums, so the 15 adds form chains of 4 (latency ~16
// cycles instead of 60 for one chain).
HWY_INLINE hn::Vec<DF> LevelOf(const LevelVectors& table, hn::Vec<DF> t) {
#if HWY_TARGET == HWY_AVX3
  if (table.bucketed) {
    const __m512 u = _mm512_min_ps(_mm512_max_ps(_mm512_fmadd_ps(t.raw, _mm512_set1_ps(0.125f), _mm512_set1_ps(16.0f)),
                                                 _mm512_setzero_ps()),
                                   _mm512_set1_ps(31.0f));
    const __m512i b = _mm512_cvttps_epi32(u);
    const __m512 lo = _mm512_permutex2var_ps(table.lower[0], b, table.lower[1]);
    const __m512 hi = _mm512_permutex2var_ps(table.upper[0], b, table.upper[1]);
    const __m512 th = _mm512_permutex2var_ps(table.threshold[0], b, table.threshold[1]);
    return hn::Vec<DF>{_mm512_mask_blend_ps(_mm512_cmp_ps_mask(t.raw, th, _CMP_GT_OQ), lo, hi)};
  }
#endif
  hn::Vec<DF> part[4] = {table.first, hn::Zero(DF()), hn::Zero(DF()), hn::Zero(DF())};
  for (int j = 0; j < 15; ++j)
    part[j % 4] = hn::Add(part[j % 4], hn::IfThenElseZero(hn::Gt(t, table.mid[j]), table.gap[j]));
  return hn::Add(hn::Add(part[0], part[1]), hn::Add(part[2], part[3]));
}

struct LevelGrid {
  const LevelVectors& table;
  hn::Vec<DF> inv;
  LevelGrid(const LevelVectors& t, float inv_) : table(t), inv(hn::Set(DF(), inv_)) {}
  HWY_INLINE hn::Vec<DF> operator()(hn::Vec<DF> v) const { return LevelOf(table, hn::Mul(v, inv)); }
};

// kBatch level trials in one pass over the group (independent chains: a group of
// 16 is one AVX-512 vector, so one trial at a time waited on latencies): for
// each reciprocal inv[b] the sums xl[b] = sum c x L and ll[b] = sum c L L.
constexpr size_t kLevelBatch = 4;
template <bool kWeighted>
HWY_INLINE void LevelTrials(const float* x, const float* c, size_t padded, const LevelVectors& table,
                            const float* inv, float* xl, float* ll) {
  const DF df;
  const size_t n = hn::Lanes(df);
  hn::Vec<DF> vinv[kLevelBatch], axl[kLevelBatch], all[kLevelBatch];
  for (size_t b = 0; b < kLevelBatch; ++b) {
    vinv[b] = hn::Set(df, inv[b]);
    axl[b] = all[b] = hn::Zero(df);
  }
  for (size_t i = 0; i < padded; i += n) {
    const auto v = hn::LoadU(df, x + i);
    const auto cw = kWeighted ? hn::LoadU(df, c + i) : hn::Set(df, 1.0f);
    const auto cv = kWeighted ? hn::Mul(v, cw) : v;
    for (size_t b = 0; b < kLevelBatch; ++b) {
      const auto l = LevelOf(table, hn::Mul(v, vinv[b]));
      axl[b] = hn::MulAdd(cv, l, axl[b]);
      all[b] = hn::MulAdd(kWeighted ? hn::Mul(l, cw) : l, l, all[b]);
    }
  }
  for (size_t b = 0; b < kLevelBatch; ++b) {
    xl[b] = hn::GetLane(hn::SumOfLanes(df, axl[b]));
    ll[b] = hn::GetLane(hn::SumOfLanes(df, all[b]));
  }
}

template <bool kWeighted, class Grid>
HWY_INLINE TrialSums Trial(const float* x, const float* c, size_t padded, const Grid& codes) {
  const DF df;
  const size_t n = hn::Lanes(df);
  auto xl0 = hn::Zero(df), xl1 = hn::Zero(df), ll0 = hn::Zero(df), ll1 = hn::Zero(df);
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
template <bool kWeighted, class Grid>
HWY_INLINE float TrialError(const float* x, const float* c, size_t padded, const Grid& codes, float s) {
  const DF df;
  const size_t n = hn::Lanes(df);
  const auto vs = hn::Set(df, s);
  auto e0 = hn::Zero(df), e1 = hn::Zero(df);
  auto weighted = [&](hn::Vec<DF> v, size_t at) { return kWeighted ? hn::Mul(v, hn::LoadU(df, c + at)) : v; };
  size_t i = 0;
  for (; i + 2 * n <= padded; i += 2 * n) {
    const auto v0 = hn::LoadU(df, x + i), v1 = hn::LoadU(df, x + i + n);
    const auto d0 = hn::NegMulAdd(codes(v0), vs, v0);
    const auto d1 = hn::NegMulAdd(codes(v1), vs, v1);
    e0 = hn::MulAdd(weighted(d0, i), d0, e0);
    e1 = hn::MulAdd(weighted(d1, i + n), d1, e1);
  }
  for (; i < padded; i += n) {
    const auto v = hn::LoadU(df, x + i);
    const auto d = hn::NegMulAdd(codes(v), vs, v);
    e0 = hn::MulAdd(weighted(d, i), d, e0);
  }
  return hn::GetLane(hn::SumOfLanes(df, hn::Add(e0, e1)));
}

// The reciprocal QuantizeRows (and LevelCodes) use for scale s.
HWY_INLINE float Reciprocal(float s) { return s == 0.0f ? 0.0f : 1.0f / s; }

// Exact squared error of scale s (and zero point zp) as QuantizeRows rounds it:
// codes from the reciprocal 1/s, then the same error pass as a trial's.
template <bool kWeighted>
HWY_INLINE float Error(const float* x, const float* c, size_t padded, float s, float zp, float qmin, float qmax) {
  return TrialError<kWeighted>(x, c, padded, EvenGrid(Reciprocal(s), zp, qmin, qmax), s);
}

// min(0, min x) and max(0, max x) of a zero-padded group.
HWY_INLINE void GroupRange(const float* x, size_t padded, float* lo, float* hi) {
  const DF df;
  const size_t n = hn::Lanes(df);
  auto vlo = hn::Zero(df), vhi = hn::Zero(df);
  for (size_t i = 0; i < padded; i += n) {
    const auto v = hn::LoadU(df, x + i);
    vlo = hn::Min(vlo, v);
    vhi = hn::Max(vhi, v);
  }
  *lo = hn::GetLane(hn::MinOfLanes(df, vlo));
  *hi = hn::GetLane(hn::MaxOfLanes(df, vhi));
}

// One group (already copied to a zero-padded buffer of `padded` floats; c
// likewise, when kWeighted).
template <bool kWeighted>
void SearchGroup(const float* x, const float* c, size_t g, size_t padded, int bits, bool symmetric, int steps,
                 float* scale, uint8_t* zp_out) {
  float lo, hi;
  GroupRange(x, padded, &lo, &hi);
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
    const EvenGrid grid(inv, zp, qmin, qmax);
    const TrialSums t = Trial<kWeighted>(x, c, padded, grid);
    if (!(t.ll > 0.0f)) continue;
    const float ls = t.xl / t.ll;  // least-squares scale for these codes
    const float err = TrialError<kWeighted>(x, c, padded, grid, ls);
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
    const TrialSums t = Trial<kWeighted>(x, c, padded, EvenGrid(1.0f / s, best_z, qmin, qmax));
    if (!(t.ll > 0.0f)) break;
    s = t.xl / t.ll;
  }
  *scale = win_s;
  if (!symmetric) *zp_out = static_cast<uint8_t>(win_z);
}

// One group on a level table L (scale in the units where code u means L[u] *
// scale): the same search with the level grid. The range rule maps the
// largest-magnitude value m to the table's most negative level L[0] (as the
// even grid's symmetric rule maps it to -2^(b-1)); trials scale the reciprocal
// by 1 + 0.0125 i (0.1 int4 code steps, as above) around it and around the map
// of m to the most positive level L[15] (tables need not be symmetric).
template <bool kWeighted>
void SearchGroupLevels(const float* x, const float* c, size_t padded, const float* levels, const LevelVectors& table,
                       int steps, float* scale) {
  float lo, hi;
  GroupRange(x, padded, &lo, &hi);
  const float m = (-lo >= hi) ? lo : hi;
  const float s0 = m / levels[0];
  *scale = std::fabs(s0) >= FLT_MIN && std::isfinite(s0) ? s0 : 0.0f;
  if (*scale == 0.0f) return;  // degenerate group: every code reads 0 * scale
  // Trials are ranked by sum c x x - xl^2 / ll, the error of their least-squares
  // scale expanded: no second pass. It cancels where the error is tiny next to
  // sum c x x (8-bit grids, hence TrialError above); 4-bit levels leave ~1% of
  // it, 10^5 times float32's rounding. The winner's exact error decides below.
  float xx = 0.0f;
  {
    const DF df;
    auto acc = hn::Zero(df);
    for (size_t i = 0; i < padded; i += hn::Lanes(df)) {
      const auto v = hn::LoadU(df, x + i);
      acc = hn::MulAdd(kWeighted ? hn::Mul(v, hn::LoadU(df, c + i)) : v, v, acc);
    }
    xx = hn::GetLane(hn::SumOfLanes(df, acc));
  }
  float invs[2 * (2 * 64 + 1) + kLevelBatch];  // steps <= 64 (SearchLevelScales checks)
  size_t count = 0;
  for (const float end : {levels[0], levels[15]})
    for (int i = -steps; i <= steps; ++i) {
      const float inv = end * (1.0f + 0.0125f * static_cast<float>(i)) / m;
      if (std::isfinite(inv) && inv != 0.0f) invs[count++] = inv;
    }
  if (count == 0) return;
  while (count % kLevelBatch) { invs[count] = invs[count - 1]; ++count; }  // repeats: never a new winner
  float best_err = HUGE_VALF, best_s = s0;
  for (size_t b0 = 0; b0 < count; b0 += kLevelBatch) {
    float xl[kLevelBatch], ll[kLevelBatch];
    LevelTrials<kWeighted>(x, c, padded, table, invs + b0, xl, ll);
    for (size_t b = 0; b < kLevelBatch; ++b) {
      if (!(ll[b] > 0.0f)) continue;
      const float err = xx - xl[b] * xl[b] / ll[b];
      if (err < best_err) {
        best_err = err;
        best_s = xl[b] / ll[b];
      }
    }
  }
  float win_s = s0, win_err = TrialError<kWeighted>(x, c, padded, LevelGrid(table, Reciprocal(s0)), s0);
  float s = best_s;
  for (int refine = 0; refine < 3; ++refine) {
    if (!(std::fabs(s) >= FLT_MIN) || !std::isfinite(s)) break;
    const LevelGrid grid(table, Reciprocal(s));
    const float err = TrialError<kWeighted>(x, c, padded, grid, s);
    if (err < win_err) {
      win_err = err;
      win_s = s;
    }
    const TrialSums t = Trial<kWeighted>(x, c, padded, grid);
    if (!(t.ll > 0.0f)) break;
    s = t.xl / t.ll;
  }
  *scale = win_s;
}

void SearchLevelScalesImpl(const float* x, size_t rows, size_t k, size_t group, const int8_t* levels8, int steps,
                           const float* importance, float* scales) {
  const size_t lanes = hn::Lanes(DF());
  const size_t groups = k / group;
  const size_t padded = (group + lanes - 1) / lanes * lanes;
  float levels[16];
  for (int i = 0; i < 16; ++i) levels[i] = levels8[i];
  // ~40 trial passes of ~2 ops per weight: chunks of 8 Ki elements.
  const size_t min_rows = std::max<size_t>(1, (size_t(1) << 13) / std::max<size_t>(1, k));
  ParallelFor(rows, min_rows, [&](size_t r0, size_t r1) {
    const LevelVectors table(levels);
    std::vector<float> buf(padded, 0.0f), cbuf(padded, 0.0f);
    for (size_t r = r0; r < r1; ++r) {
      for (size_t j = 0; j < groups; ++j) {
        const float* src = x + r * k + j * group;
        for (size_t e = 0; e < group; ++e) buf[e] = std::isfinite(src[e]) ? src[e] : 0.0f;
        if (importance) {
          std::copy(importance + j * group, importance + (j + 1) * group, cbuf.begin());
          SearchGroupLevels<true>(buf.data(), cbuf.data(), padded, levels, table, steps, &scales[r * groups + j]);
        } else {
          SearchGroupLevels<false>(buf.data(), nullptr, padded, levels, table, steps, &scales[r * groups + j]);
        }
      }
    }
  });
}

// Codes on a level table for given scales: u = the index of the level nearest
// to x * (1 / scale), ties to the lower one (non-finite x: +-inf to the end
// levels, NaN as 0 - the callers reject NaN first).
void LevelCodesImpl(const float* x, size_t rows, size_t k, size_t group, const int8_t* levels8, const float* scales,
                    uint8_t* codes) {
  float mid[15];
  for (int j = 0; j < 15; ++j) mid[j] = 0.5f * (static_cast<float>(levels8[j]) + static_cast<float>(levels8[j + 1]));
  const size_t groups = k / group;
  ParallelFor(rows, std::max<size_t>(1, (size_t(1) << 15) / std::max<size_t>(1, k)), [&](size_t r0, size_t r1) {
    for (size_t r = r0; r < r1; ++r)
      for (size_t kk = 0; kk < k; ++kk) {
        const float t = (std::isnan(x[r * k + kk]) ? 0.0f : x[r * k + kk]) * Reciprocal(scales[r * groups + kk / group]);
        uint8_t u = 0;
        for (int j = 0; j < 15; ++j) u += t > mid[j];
        codes[r * k + kk] = u;
      }
  });
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
HWY_EXPORT(SearchLevelScalesImpl);
HWY_EXPORT(LevelCodesImpl);

static void CheckLevels(const int8_t* levels, size_t k, size_t group) {
  if (group == 0 || k % group != 0) throw std::invalid_argument("group must divide k");
  for (int i = 0; i < 16; ++i)
    if (levels[i] < -127 || (i > 0 && levels[i] <= levels[i - 1]))
      throw std::invalid_argument("levels must be 16 increasing values in [-127, 127]");
}

void SearchLevelScales(const float* x, size_t rows, size_t k, size_t group, const int8_t* levels, int steps,
                       float* scales, const float* importance) {
  CheckLevels(levels, k, group);
  if (steps < 0 || steps > 64) throw std::invalid_argument("steps must be in [0, 64]");
  if (importance)
    for (size_t i = 0; i < k; ++i)
      if (!(importance[i] >= 0.0f) || !std::isfinite(importance[i]))
        throw std::invalid_argument("importance must be finite and >= 0");
  HWY_DYNAMIC_DISPATCH(SearchLevelScalesImpl)(x, rows, k, group, levels, steps, importance, scales);
}

void LevelCodes(const float* x, size_t rows, size_t k, size_t group, const int8_t* levels, const float* scales,
                uint8_t* codes) {
  CheckLevels(levels, k, group);
  HWY_DYNAMIC_DISPATCH(LevelCodesImpl)(x, rows, k, group, levels, scales, codes);
}

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
