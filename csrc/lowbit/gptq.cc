// GPTQ's column loop (lowbit.quantize(method="gptq"), calibrate/weights.py):
// inside one block of B columns, quantize a column, then push its rounding error
// onto the block's later columns through the upper Cholesky factor of the
// inverse Hessian. Python keeps the parts that are already fast (group scales at
// a group's first column, the factor, the block-to-block update as one matmul);
// this is the part that was ~10 NumPy calls per column (SmolLM2: 150k columns,
// ~30 s of a 60 s GPTQ run).
//
// Data, per block (all row-major; R = output rows of the layer):
//   wt     float64 [B, R]  the block's columns as rows (column c at wt + c * R), updated in place
//   hinv   float64 [B, B]  the factor's block (upper triangular)
//   scales float32 [G, R]  group scales, one row per group; zps likewise (asymmetric) or null
//   groups int32   [B]     the group of each block column (act order jumps between groups)
//   codes  int32   [B, R]  out: the codes of columns c0..c1
//   err    float64 [B, R]  out: (w - dequant(q)) / hinv[c][c] of columns c0..c1
//   levels int8    [16]    or null: symmetric int4 codes on a level table (formats.h
//                          "level tables"), code q meaning levels[q + 8] * s
// For column c and row r, exactly as the NumPy reference (reference.gptq_columns):
//   q   = nearbyint(clamp(float(w) * inv, qmin - z, qmax - z)) + z   float32, inv = s ? 1 / s : 0
//         with levels: u = #{j : float(w) * inv > mid_j}, mid_j = (L_j + L_j+1) / 2 in
//         float32 (the nearest level, ties to the lower: scale_search.cc LevelCodes),
//         q = u - 8 and (double(q) - z) below reads L_u
//   e   = (w - (double(q) - z) * s) / hinv[c][c]                     float64
//   w_j = w_j - e * hinv[c][j]   for j = c + 1 .. B - 1              float64
// Bit-identical to NumPy: this file is compiled with -ffp-contract=off, so no
// multiply-subtract is fused (NumPy rounds each product); round half to even.
//
// Rows are independent (each row's errors only move along that row), so threads
// split the rows; a chunk keeps its B x rows doubles in L2 (128 x 64 x 8 = 64 KiB).

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "lowbit/gptq.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "hwy/highway.h"
#include "lowbit/kernels.h"
#include "lowbit/parallel.h"

HWY_BEFORE_NAMESPACE();
namespace lowbit {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using DD = hn::ScalableTag<double>;

// The rank-1 update of the later columns for rows [r0, r1): the O(R B^2) part.
// One vector per step, no unrolling: each step is independent of the last
// (Mul then Sub, latency 8, overlapped by the out-of-order core), and the
// loads/stores dominate (2 loads + 1 store per 2 flops), so the loop is
// L1/L2-bandwidth bound rather than latency bound.
HWY_INLINE void PushError(double* HWY_RESTRICT wt, size_t rows, const double* HWY_RESTRICT e, const double* hrow,
                          size_t c, size_t b, size_t r0, size_t r1) {
  const DD dd;
  const size_t n = hn::Lanes(dd);
  for (size_t j = c + 1; j < b; ++j) {
    const double h = hrow[j];
    const auto vh = hn::Set(dd, h);
    double* w = wt + j * rows;
    size_t r = r0;
    for (; r + n <= r1; r += n) {
      const auto prod = hn::Mul(hn::LoadU(dd, e + r), vh);
      hn::StoreU(hn::Sub(hn::LoadU(dd, w + r), prod), dd, w + r);
    }
    for (; r < r1; ++r) {
      const double prod = e[r] * h;
      w[r] = w[r] - prod;
    }
  }
}

void GptqColumnsImpl(double* wt, size_t rows, size_t b, const double* hinv, size_t c0, size_t c1,
                     const float* scales, const float* zps, const int32_t* groups, int qmin, int qmax,
                     const int8_t* levels, int32_t* codes, double* err) {
  float mid[15];
  if (levels != nullptr)
    for (int j = 0; j < 15; ++j) mid[j] = 0.5f * (static_cast<float>(levels[j]) + static_cast<float>(levels[j + 1]));
  // Per column ~R * (B - c) * 2 flops: a chunk of 64 rows is >= ~1 us of work per
  // column even at the block's end, and whole blocks are ~B times that.
  const size_t min_rows = 64;
  ParallelFor(rows, min_rows, [&](size_t r0, size_t r1) {
    for (size_t c = c0; c < c1; ++c) {
      const float* s = scales + static_cast<size_t>(groups[c]) * rows;
      const float* z = zps ? zps + static_cast<size_t>(groups[c]) * rows : nullptr;
      const double* w = wt + c * rows;
      int32_t* q_out = codes + c * rows;
      double* e = err + c * rows;
      const double diag = hinv[c * b + c];
      for (size_t r = r0; r < r1; ++r) {
        const float s32 = s[r];
        const float z32 = z ? z[r] : 0.0f;
        const float inv = s32 == 0.0f ? 0.0f : 1.0f / s32;
        const float lo = static_cast<float>(qmin) - z32, hi = static_cast<float>(qmax) - z32;
        const float scaled = static_cast<float>(w[r]) * inv;
        double dq;
        if (levels != nullptr) {  // 15 compares: this loop is ~1% of a GPTQ run
          int u = 0;
          for (int j = 0; j < 15; ++j) u += scaled > mid[j];
          q_out[r] = u - 8;
          dq = static_cast<double>(levels[u]) * static_cast<double>(s32);
        } else {
          const float q = std::nearbyint(std::min(std::max(scaled, lo), hi)) + z32;
          q_out[r] = static_cast<int32_t>(q);
          dq = (static_cast<double>(q) - static_cast<double>(z32)) * static_cast<double>(s32);
        }
        e[r] = (w[r] - dq) / diag;
      }
      PushError(wt, rows, e, hinv + c * b, c, b, r0, r1);
    }
  });
}

}  // namespace HWY_NAMESPACE
}  // namespace lowbit
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace lowbit {

HWY_EXPORT(GptqColumnsImpl);

void GptqColumns(double* wt, size_t rows, size_t b, const double* hinv, size_t c0, size_t c1, const float* scales,
                 const float* zps, const int32_t* groups, int qmin, int qmax, const int8_t* levels, int32_t* codes,
                 double* err) {
  HWY_DYNAMIC_DISPATCH(GptqColumnsImpl)(wt, rows, b, hinv, c0, c1, scales, zps, groups, qmin, qmax, levels, codes,
                                        err);
}

}  // namespace lowbit
#endif  // HWY_ONCE
