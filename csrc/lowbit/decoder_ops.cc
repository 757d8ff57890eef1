// Row kernels of the native decoder (decoder.h): RMSNorm, SiLU-gated product,
// residual add and causal attention over the KV cache. Everything but the
// projections, which are matmul.cc's kernels.
//
// All float32. Sums use several vector accumulators, so results differ from
// torch's reductions in the last bits (tests bound the difference at model
// level, against transformers' own forward).

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "lowbit/decoder_ops.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include <algorithm>
#include <cmath>
#include <vector>

#include "hwy/aligned_allocator.h"
#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"
#include "lowbit/decoder.h"
#include "lowbit/parallel.h"

HWY_BEFORE_NAMESPACE();
namespace lowbit {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using DF = hn::ScalableTag<float>;
using VF = hn::Vec<DF>;

// Sum of x[i] * y[i]. Two accumulators: FMA latency 4 at 2 per cycle, and a
// head_dim of 64 is only 4-8 vectors, so more would not fill.
float Dot(const float* HWY_RESTRICT x, const float* HWY_RESTRICT y, size_t n) {
  const DF df;
  const size_t lanes = hn::Lanes(df);
  VF a0 = hn::Zero(df), a1 = hn::Zero(df);
  size_t i = 0;
  for (; i + 2 * lanes <= n; i += 2 * lanes) {
    a0 = hn::MulAdd(hn::LoadU(df, x + i), hn::LoadU(df, y + i), a0);
    a1 = hn::MulAdd(hn::LoadU(df, x + i + lanes), hn::LoadU(df, y + i + lanes), a1);
  }
  for (; i + lanes <= n; i += lanes) a0 = hn::MulAdd(hn::LoadU(df, x + i), hn::LoadU(df, y + i), a0);
  float sum = hn::GetLane(hn::SumOfLanes(df, hn::Add(a0, a1)));
  for (; i < n; ++i) sum += x[i] * y[i];
  return sum;
}

// acc[i] += p * v[i].
void Axpy(float p, const float* HWY_RESTRICT v, float* HWY_RESTRICT acc, size_t n) {
  const DF df;
  const size_t lanes = hn::Lanes(df);
  const VF vp = hn::Set(df, p);
  size_t i = 0;
  for (; i + lanes <= n; i += lanes) hn::StoreU(hn::MulAdd(vp, hn::LoadU(df, v + i), hn::LoadU(df, acc + i)), df, acc + i);
  for (; i < n; ++i) acc[i] += p * v[i];
}

// ---------------------------------------------------------------- RMSNorm

void RmsNormRowsImpl(const float* x, size_t m, size_t n, size_t x_stride, const float* weight, float eps,
                     float* out, size_t out_stride) {
  const DF df;
  const size_t lanes = hn::Lanes(df);
  for (size_t r = 0; r < m; ++r) {
    const float* xr = x + r * x_stride;
    float* o = out + r * out_stride;
    const float inv = 1.0f / std::sqrt(Dot(xr, xr, n) / static_cast<float>(n) + eps);
    const VF vinv = hn::Set(df, inv);
    size_t i = 0;
    for (; i + lanes <= n; i += lanes)
      hn::StoreU(hn::Mul(hn::LoadU(df, weight + i), hn::Mul(hn::LoadU(df, xr + i), vinv)), df, o + i);
    for (; i < n; ++i) o[i] = weight[i] * (xr[i] * inv);
  }
}

// ---------------------------------------------------------------- SiLU-gated

void SiluMulRowsImpl(const float* gu, size_t m, size_t inter, size_t gu_stride, float* out, size_t out_stride) {
  const DF df;
  const size_t lanes = hn::Lanes(df);
  const VF one = hn::Set(df, 1.0f);
  for (size_t r = 0; r < m; ++r) {
    const float* g = gu + r * gu_stride;
    const float* u = g + inter;
    float* o = out + r * out_stride;
    size_t i = 0;
    // silu(g) = g / (1 + exp(-g)). Highway's Exp (1 ulp) is valid up to +104,
    // so -g is capped at 88: exp(88) = 1.7e38 already makes the quotient 0 to
    // float precision for any g below -88.
    const VF cap = hn::Set(df, 88.0f);
    for (; i + lanes <= inter; i += lanes) {
      const VF vg = hn::LoadU(df, g + i);
      const VF s = hn::Div(vg, hn::Add(one, hn::Exp(df, hn::Min(hn::Neg(vg), cap))));
      hn::StoreU(hn::Mul(s, hn::LoadU(df, u + i)), df, o + i);
    }
    for (; i < inter; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  }
}

void AddInPlaceImpl(float* x, const float* y, size_t n) {
  const DF df;
  const size_t lanes = hn::Lanes(df);
  size_t i = 0;
  for (; i + lanes <= n; i += lanes) hn::StoreU(hn::Add(hn::LoadU(df, x + i), hn::LoadU(df, y + i)), df, x + i);
  for (; i < n; ++i) x[i] += y[i];
}

// ---------------------------------------------------------------- attention

// Softmax in place over s[0, n): exp(s - max) / sum.
float ExpShifted(float* s, size_t n) {
  const DF df;
  const size_t lanes = hn::Lanes(df);
  float mx = s[0];
  for (size_t t = 1; t < n; ++t) mx = std::max(mx, s[t]);
  const VF vmx = hn::Set(df, mx);
  VF vsum = hn::Zero(df);
  size_t t = 0;
  for (; t + lanes <= n; t += lanes) {
    const VF e = hn::Exp(df, hn::Sub(hn::LoadU(df, s + t), vmx));
    hn::StoreU(e, df, s + t);
    vsum = hn::Add(vsum, e);
  }
  float sum = hn::GetLane(hn::SumOfLanes(df, vsum));
  for (; t < n; ++t) {
    s[t] = std::exp(s[t] - mx);
    sum += s[t];
  }
  return sum;
}

void AttendRowsImpl(const float* q, size_t q_stride, size_t m, size_t heads, size_t kv_heads, size_t d,
                    const float* kcache, const float* vcache, size_t capacity, size_t pos0, float scale,
                    float* out, size_t out_stride) {
  const size_t group = heads / kv_heads;
  // One task = one (row, head) of ~L * d * 4 flops; a chunk should hold about
  // 2^14 multiply-adds (a few microseconds, what a pool hand-off costs), so a
  // decode step (m = 1, `heads` tasks) splits from about 256 / d positions on.
  const size_t tasks = m * heads;
  const size_t work = (pos0 + m) * d;
  const size_t min_chunk = std::max<size_t>(1, (size_t(1) << 14) / std::max<size_t>(1, work));
  ParallelFor(tasks, min_chunk, [&](size_t t0, size_t t1) {
    std::vector<float> s(pos0 + m);
    hwy::AlignedFreeUniquePtr<float[]> acc = hwy::AllocateAligned<float>(d);
    for (size_t task = t0; task < t1; ++task) {
      const size_t r = task / heads, h = task % heads;
      const size_t len = pos0 + r + 1;
      const float* qh = q + r * q_stride + h * d;
      const float* kh = kcache + (h / group) * capacity * d;
      const float* vh = vcache + (h / group) * capacity * d;
      for (size_t t = 0; t < len; ++t) s[t] = Dot(qh, kh + t * d, d) * scale;
      const float inv = 1.0f / ExpShifted(s.data(), len);
      std::fill(acc.get(), acc.get() + d, 0.0f);
      for (size_t t = 0; t < len; ++t) Axpy(s[t], vh + t * d, acc.get(), d);
      float* o = out + r * out_stride + h * d;
      for (size_t i = 0; i < d; ++i) o[i] = acc[i] * inv;
    }
  });
}

}  // namespace HWY_NAMESPACE
}  // namespace lowbit
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace lowbit {

HWY_EXPORT(RmsNormRowsImpl);
HWY_EXPORT(SiluMulRowsImpl);
HWY_EXPORT(AddInPlaceImpl);
HWY_EXPORT(AttendRowsImpl);

void RmsNormRows(const float* x, size_t m, size_t n, size_t x_stride, const float* weight, float eps, float* out,
                 size_t out_stride) {
  HWY_DYNAMIC_DISPATCH(RmsNormRowsImpl)(x, m, n, x_stride, weight, eps, out, out_stride);
}

void SiluMulRows(const float* gu, size_t m, size_t inter, size_t gu_stride, float* out, size_t out_stride) {
  HWY_DYNAMIC_DISPATCH(SiluMulRowsImpl)(gu, m, inter, gu_stride, out, out_stride);
}

void AddInPlace(float* x, const float* y, size_t n) { HWY_DYNAMIC_DISPATCH(AddInPlaceImpl)(x, y, n); }

void AttendRows(const float* q, size_t q_stride, size_t m, size_t heads, size_t kv_heads, size_t d,
                const float* kcache, const float* vcache, size_t capacity, size_t pos0, float scale, float* out,
                size_t out_stride) {
  HWY_DYNAMIC_DISPATCH(AttendRowsImpl)(q, q_stride, m, heads, kv_heads, d, kcache, vcache, capacity, pos0, scale,
                                       out, out_stride);
}

}  // namespace lowbit
#endif  // HWY_ONCE
