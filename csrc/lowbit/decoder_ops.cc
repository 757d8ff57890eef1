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
#include <type_traits>
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

// ---- prefill: blocks of query rows against blocks of positions
//
// The per-row loop below costs one Dot (with its horizontal sum) and one Axpy
// (loading and storing the accumulators) per position, head and row: a 512-token
// prompt of SmolLM2 makes 35 M of each. For m >= kAttnRows rows the work is
// blocked as a small GEMM instead: the keys of 2 vectors of positions are
// transposed once into kt [d][np] and serve every row and every query head of
// their KV group (scores: one FMA per position vector, row and dimension, no
// horizontal sums), and the values are mixed 4 rows x 2 vectors at a time with
// the accumulators in registers.
constexpr size_t kAttnRows = 4;       // query rows per register block
constexpr size_t kAttnRowBlock = 16;  // query rows per task

// s_r[t0, t0 + np) = scale * q_r . k_t for R rows (q pointers), keys kt [d][np].
template <size_t R>
HWY_INLINE void ScoreBlock(const float* const* qs, const float* kt, size_t d, size_t np, float scale,
                           float* const* s, size_t t0) {
  const DF df;
  const size_t n = hn::Lanes(df);
  VF a[R][2];  // 2 R independent FMA chains
  for (size_t r = 0; r < R; ++r) a[r][0] = a[r][1] = hn::Zero(df);
  for (size_t i = 0; i < d; ++i) {
    const VF k0 = hn::Load(df, kt + i * np), k1 = hn::Load(df, kt + i * np + n);
    for (size_t r = 0; r < R; ++r) {
      const VF qb = hn::Set(df, qs[r][i]);
      a[r][0] = hn::MulAdd(qb, k0, a[r][0]);
      a[r][1] = hn::MulAdd(qb, k1, a[r][1]);
    }
  }
  const VF vs = hn::Set(df, scale);
  for (size_t r = 0; r < R; ++r) {
    hn::StoreU(hn::Mul(a[r][0], vs), df, s[r] + t0);
    hn::StoreU(hn::Mul(a[r][1], vs), df, s[r] + t0 + n);
  }
}

// outs_r = inv_r * sum_{t < len} p_r[t] v_t for R rows (p_r zero past each row's
// own length), values v [positions][d].
template <size_t R>
HWY_INLINE void MixBlock(const float* const* p, const float* inv, const float* v, size_t d, size_t len,
                         float* const* outs) {
  const DF df;
  const size_t n = hn::Lanes(df);
  size_t j = 0;
  for (; j + 2 * n <= d; j += 2 * n) {
    VF a[R][2];
    for (size_t r = 0; r < R; ++r) a[r][0] = a[r][1] = hn::Zero(df);
    for (size_t t = 0; t < len; ++t) {
      const VF v0 = hn::LoadU(df, v + t * d + j), v1 = hn::LoadU(df, v + t * d + j + n);
      for (size_t r = 0; r < R; ++r) {
        const VF pb = hn::Set(df, p[r][t]);
        a[r][0] = hn::MulAdd(pb, v0, a[r][0]);
        a[r][1] = hn::MulAdd(pb, v1, a[r][1]);
      }
    }
    for (size_t r = 0; r < R; ++r) {
      hn::StoreU(hn::Mul(a[r][0], hn::Set(df, inv[r])), df, outs[r] + j);
      hn::StoreU(hn::Mul(a[r][1], hn::Set(df, inv[r])), df, outs[r] + j + n);
    }
  }
  for (; j < d; ++j) {  // head dims that are not a multiple of 2 vectors
    for (size_t r = 0; r < R; ++r) {
      float acc = 0.0f;
      for (size_t t = 0; t < len; ++t) acc += p[r][t] * v[t * d + j];
      outs[r][j] = acc * inv[r];
    }
  }
}

template <class Fn>
HWY_INLINE void ForRowBlocks(size_t nr, const Fn& fn) {
  switch (nr) {
    case 4: return fn(std::integral_constant<size_t, 4>());
    case 3: return fn(std::integral_constant<size_t, 3>());
    case 2: return fn(std::integral_constant<size_t, 2>());
    default: return fn(std::integral_constant<size_t, 1>());
  }
}

void AttendBlocked(const float* q, size_t q_stride, size_t m, size_t heads, size_t kv_heads, size_t d,
                   const float* kcache, const float* vcache, size_t capacity, size_t pos0, float scale,
                   float* out, size_t out_stride) {
  const DF df;
  const size_t np = 2 * hn::Lanes(df);  // positions per key block; divides the capacity (a multiple of 256)
  const size_t group = heads / kv_heads;
  const size_t blocks = (m + kAttnRowBlock - 1) / kAttnRowBlock;
  ParallelFor(kv_heads * blocks, 1, [&](size_t t0, size_t t1) {
    const size_t s_stride = (pos0 + m + np - 1) / np * np;
    auto kt = hwy::AllocateAligned<float>(d * np);
    auto s = hwy::AllocateAligned<float>(group * kAttnRowBlock * s_stride);
    for (size_t task = t0; task < t1; ++task) {
      const size_t g = task / blocks, rb0 = (task % blocks) * kAttnRowBlock;
      const size_t rb1 = std::min(m, rb0 + kAttnRowBlock), lmax = pos0 + rb1;
      const float* kh = kcache + g * capacity * d;
      const float* vh = vcache + g * capacity * d;
      auto srow = [&](size_t h, size_t r) { return s.get() + (h * kAttnRowBlock + (r - rb0)) * s_stride; };
      for (size_t p0 = 0; p0 < lmax; p0 += np) {
        for (size_t j = 0; j < np; ++j)  // reads up to lmax rounded up to np: inside the capacity
          for (size_t i = 0; i < d; ++i) kt[i * np + j] = kh[(p0 + j) * d + i];
        const size_t first = std::max(rb0, p0 > pos0 ? p0 - pos0 : size_t(0));  // rows that see p0
        for (size_t h = 0; h < group; ++h) {
          for (size_t r = first; r < rb1; r += kAttnRows) {
            ForRowBlocks(std::min(kAttnRows, rb1 - r), [&](auto rows) {
              constexpr size_t R = decltype(rows)::value;
              const float* qs[R];
              float* ss[R];
              for (size_t i = 0; i < R; ++i) {
                qs[i] = q + (r + i) * q_stride + (g * group + h) * d;
                ss[i] = srow(h, r + i);
              }
              ScoreBlock<R>(qs, kt.get(), d, np, scale, ss, p0);
            });
          }
        }
      }
      for (size_t h = 0; h < group; ++h) {
        for (size_t r = rb0; r < rb1; r += kAttnRows) {
          const size_t nr = std::min(kAttnRows, rb1 - r), len = pos0 + r + nr;  // the last row's length
          float inv[kAttnRows];
          for (size_t i = 0; i < nr; ++i) {
            float* p = srow(h, r + i);
            const size_t own = pos0 + r + i + 1;
            inv[i] = 1.0f / ExpShifted(p, own);
            std::fill(p + own, p + len, 0.0f);  // causal: later positions weigh 0
          }
          ForRowBlocks(nr, [&](auto rows) {
            constexpr size_t R = decltype(rows)::value;
            const float* ps[R];
            float* outs[R];
            for (size_t i = 0; i < R; ++i) {
              ps[i] = srow(h, r + i);
              outs[i] = out + (r + i) * out_stride + (g * group + h) * d;
            }
            MixBlock<R>(ps, inv, vh, d, len, outs);
          });
        }
      }
    }
  });
}

void AttendRowsImpl(const float* q, size_t q_stride, size_t m, size_t heads, size_t kv_heads, size_t d,
                    const float* kcache, const float* vcache, size_t capacity, size_t pos0, float scale,
                    float* out, size_t out_stride) {
  if (m >= kAttnRows) {
    return AttendBlocked(q, q_stride, m, heads, kv_heads, d, kcache, vcache, capacity, pos0, scale, out,
                         out_stride);
  }
  // Decode (1-3 rows): per position. The caches come from DRAM here (a token's
  // 88 MB of SmolLM2 weights pass through the caches in between), so the loop
  // order matters little: a transposed-key variant measured no faster.
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
