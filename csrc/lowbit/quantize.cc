// Quantize / dequantize kernels: per tensor, per row, per group; symmetric and
// asymmetric; 8/4/2-bit codes packed as formats.h specifies; float32, float16
// and bfloat16 in and out.

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "lowbit/quantize.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <mutex>
#include <stdexcept>
#include <type_traits>
#include <vector>

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

// A parallel chunk should hold >= 64 Ki elements: waking a pool thread costs
// ~5-20 us, which is what a core quantizes in ~64 Ki elements.
size_t MinRowsPerChunk(size_t k) { return std::max<size_t>(1, (size_t(1) << 16) / std::max<size_t>(1, k)); }

// Finite min/max of n elements, both folded with 0 (formats.h). Returns false
// on NaN. Two accumulators per bound: min/max latency 4 at 2 per cycle would
// otherwise bind before the loads do when data is in L1.
template <typename T>
bool GroupRange(const T* x, size_t n, float* lo, float* hi) {
  const DF df;
  auto lo0 = hn::Zero(df), lo1 = hn::Zero(df), hi0 = hn::Zero(df), hi1 = hn::Zero(df);
  auto nan = hn::Zero(df);
  auto fold = [&](hn::Vec<DF> v, hn::Vec<DF>& l, hn::Vec<DF>& h) {
    nan = hn::Or(nan, hn::VecFromMask(df, hn::IsNaN(v)));
    const auto finite = hn::IfThenElseZero(hn::IsFinite(v), v);
    l = hn::Min(l, finite);
    h = hn::Max(h, finite);
  };
  size_t i = 0;
  for (; i + 2 * kF32Lanes <= n; i += 2 * kF32Lanes) {
    fold(LoadAsF32(df, x + i), lo0, hi0);
    fold(LoadAsF32(df, x + i + kF32Lanes), lo1, hi1);
  }
  ForEachVectorIn<kF32Lanes>(x + i, n - i, [&](const T* p) {
    fold(LoadAsF32(df, p), lo0, hi0);  // zero padding cannot move a bound past 0
  });
  *lo = hn::GetLane(hn::MinOfLanes(df, hn::Min(lo0, lo1)));
  *hi = hn::GetLane(hn::MaxOfLanes(df, hn::Max(hi0, hi1)));
  return hn::AllTrue(df, hn::Eq(nan, hn::Zero(df)));
}

// Codes of n elements: q = nearbyint(clamp(x * inv, qmin - zp, qmax - zp)) + zp,
// written as int8 (symmetric) or uint8 (asymmetric) bytes. Returns false on NaN.
template <bool kSym, typename T>
bool QuantizeGroup(const T* x, size_t n, float inv, int qmin, int qmax, int32_t zp,
                   uint8_t* codes) {
  const DF df;
  const DI di;
  using CodeT = std::conditional_t<kSym, int8_t, uint8_t>;
  const hn::Rebind<CodeT, DI> dcode;
  // A degenerate group (scale 0) clamps to [0, 0]: every code is zp, even for +-inf.
  const float lo = inv == 0.0f ? 0.0f : float(qmin - zp);
  const float hi = inv == 0.0f ? 0.0f : float(qmax - zp);
  const auto vinv = hn::Set(df, inv), vlo = hn::Set(df, lo), vhi = hn::Set(df, hi);
  const auto vzp = hn::Set(di, zp);
  auto nan = hn::Zero(df);
  ForEachVector<kF32Lanes>(x, reinterpret_cast<CodeT*>(codes), n, [&](const T* p, CodeT* out) {
    const auto v = LoadAsF32(df, p);
    nan = hn::Or(nan, hn::VecFromMask(df, hn::IsNaN(v)));
    const auto clamped = hn::Min(hn::Max(hn::Mul(v, vinv), vlo), vhi);
    const auto q = hn::Add(hn::NearestInt(clamped), vzp);  // in range: DemoteTo is exact
    hn::StoreU(hn::DemoteTo(dcode, q), dcode, out);
  });
  return hn::AllTrue(df, hn::Eq(nan, hn::Zero(df)));
}

// Packs k codes (one per byte) into b-bit fields, formats.h order.
void PackRow(const uint8_t* codes, size_t k, int bits, uint8_t* out) {
  size_t i = 0;  // code index
  if (bits == 4) {
    // Two codes per 16-bit lane: low byte = even code, high byte = odd code.
    const hn::ScalableTag<int16_t> d16;
    const hn::Rebind<uint8_t, decltype(d16)> d8;
    const size_t n = hn::Lanes(d16);
    for (; i + 2 * n <= k; i += 2 * n) {
      const auto v = hn::LoadU(d16, reinterpret_cast<const int16_t*>(codes + i));
      const auto packed = hn::Or(hn::And(v, hn::Set(d16, 0x0F)),
                                 hn::And(hn::ShiftRight<4>(v), hn::Set(d16, 0xF0)));
      hn::StoreU(hn::DemoteTo(d8, packed), d8, out + i / 2);
    }
  } else if (bits == 2) {
    const hn::ScalableTag<int32_t> d32;
    const hn::Rebind<uint8_t, decltype(d32)> d8;
    const size_t n = hn::Lanes(d32);
    for (; i + 4 * n <= k; i += 4 * n) {
      const auto v = hn::LoadU(d32, reinterpret_cast<const int32_t*>(codes + i));
      auto packed = hn::And(v, hn::Set(d32, 0x03));
      packed = hn::Or(packed, hn::And(hn::ShiftRight<6>(v), hn::Set(d32, 0x0C)));
      packed = hn::Or(packed, hn::And(hn::ShiftRight<12>(v), hn::Set(d32, 0x30)));
      packed = hn::Or(packed, hn::And(hn::ShiftRight<18>(v), hn::Set(d32, 0xC0)));
      hn::StoreU(hn::DemoteTo(d8, packed), d8, out + i / 4);
    }
  }
  const int per_byte = 8 / bits;
  const unsigned field = (1u << bits) - 1;
  for (size_t byte = i / per_byte; byte < PackedRowBytes(k, bits); ++byte) {
    unsigned acc = 0;
    for (int f = 0; f < per_byte; ++f) {
      const size_t c = byte * per_byte + f;
      if (c < k) acc |= (codes[c] & field) << (f * bits);
    }
    out[byte] = static_cast<uint8_t>(acc);
  }
}

// Inverse of PackRow; symmetric codes are sign-extended to int8.
void UnpackRow(const uint8_t* packed, size_t k, int bits, bool sym, uint8_t* codes) {
  size_t i = 0;  // code index
  if (bits == 4) {
    const hn::ScalableTag<uint16_t> d16;
    const hn::Rebind<uint8_t, decltype(d16)> d8h;
    const hn::Repartition<uint8_t, decltype(d16)> d8;
    const size_t n = hn::Lanes(d16);
    for (; i + 2 * n <= k; i += 2 * n) {
      const auto v = hn::PromoteTo(d16, hn::LoadU(d8h, packed + i / 2));
      const auto pair = hn::Or(hn::And(v, hn::Set(d16, 0x0F)),
                               hn::ShiftLeft<4>(hn::And(v, hn::Set(d16, 0xF0))));
      auto c = hn::BitCast(d8, pair);
      // Sign-extend a 4-bit two's complement field: (c ^ 8) - 8 in wrapping u8.
      if (sym) c = hn::Sub(hn::Xor(c, hn::Set(d8, 8)), hn::Set(d8, 8));
      hn::StoreU(c, d8, codes + i);
    }
  } else if (bits == 2) {
    const hn::ScalableTag<uint32_t> d32;
    const hn::Rebind<uint8_t, decltype(d32)> d8q;
    const hn::Repartition<uint8_t, decltype(d32)> d8;
    const size_t n = hn::Lanes(d32);
    for (; i + 4 * n <= k; i += 4 * n) {
      const auto v = hn::PromoteTo(d32, hn::LoadU(d8q, packed + i / 4));
      auto quad = hn::And(v, hn::Set(d32, 0x03));
      quad = hn::Or(quad, hn::ShiftLeft<6>(hn::And(v, hn::Set(d32, 0x0C))));
      quad = hn::Or(quad, hn::ShiftLeft<12>(hn::And(v, hn::Set(d32, 0x30))));
      quad = hn::Or(quad, hn::ShiftLeft<18>(hn::And(v, hn::Set(d32, 0xC0))));
      auto c = hn::BitCast(d8, quad);
      if (sym) c = hn::Sub(hn::Xor(c, hn::Set(d8, 2)), hn::Set(d8, 2));
      hn::StoreU(c, d8, codes + i);
    }
  } else {
    std::copy(packed, packed + k, codes);
    return;
  }
  const int per_byte = 8 / bits;
  const unsigned field = (1u << bits) - 1, sign = 1u << (bits - 1);
  for (; i < k; ++i) {
    unsigned c = (packed[i / per_byte] >> ((i % per_byte) * bits)) & field;
    if (sym) c = (c ^ sign) - sign;
    codes[i] = static_cast<uint8_t>(c);
  }
}

// value = (q - zp) * scale for n codes, stored as T.
template <bool kSym, typename T>
void DequantizeGroup(const uint8_t* codes, size_t n, float scale, int32_t zp, T* out) {
  const DF df;
  const DI di;
  using CodeT = std::conditional_t<kSym, int8_t, uint8_t>;
  const hn::Rebind<CodeT, DI> dcode;
  const auto vscale = hn::Set(df, scale);
  const auto vzp = hn::Set(di, zp);
  ForEachVector<kF32Lanes>(reinterpret_cast<const CodeT*>(codes), out, n,
                           [&](const CodeT* p, T* o) {
                             const auto q = hn::Sub(hn::PromoteTo(di, hn::LoadU(dcode, p)), vzp);
                             StoreFromF32(df, hn::Mul(hn::ConvertTo(df, q), vscale), o);
                           });
}

struct Layout {
  size_t group, groups_per_row;
  bool per_tensor;
  size_t ScaleIndex(size_t r, size_t j) const { return per_tensor ? 0 : r * groups_per_row + j; }
};

Layout MakeLayout(size_t k, const QuantSpec& spec) {
  const size_t group = spec.per_tensor ? k : spec.group;
  if (group == 0 || k % group != 0) throw std::invalid_argument("group_size must divide K");
  return Layout{group, k / group, spec.per_tensor};
}

template <typename T, bool kSym>
bool QuantizeRowsT(const T* x, size_t rows, size_t k, size_t row_stride, const QuantSpec& spec,
                   bool given, float* scales, uint8_t* zps, uint8_t* packed, size_t packed_stride) {
  const Layout lay = MakeLayout(k, spec);
  const int qmin = QMin(spec.bits, kSym), qmax = QMax(spec.bits, kSym);
  std::atomic<bool> ok{true};
  ParallelFor(rows, MinRowsPerChunk(k), [&](size_t r0, size_t r1) {
    std::vector<uint8_t> scratch(spec.bits == 8 ? 0 : k);
    for (size_t r = r0; r < r1; ++r) {
      const T* xr = x + r * row_stride;
      uint8_t* out = packed + r * packed_stride;
      uint8_t* codes = spec.bits == 8 ? out : scratch.data();
      for (size_t j = 0; j < lay.groups_per_row; ++j) {
        const size_t s = lay.ScaleIndex(r, j);
        float scale;
        int32_t zp = 0;
        if (given) {
          scale = scales[s];
          if (!kSym) zp = zps[s];
        } else {
          float lo, hi;
          if (!GroupRange(xr + j * lay.group, lay.group, &lo, &hi)) ok = false;
          ChooseScale(lo, hi, spec.bits, kSym, &scale, &zp);
          scales[s] = scale;
          if (!kSym) zps[s] = static_cast<uint8_t>(zp);
        }
        const float inv = scale == 0.0f ? 0.0f : 1.0f / scale;
        if (!QuantizeGroup<kSym>(xr + j * lay.group, lay.group, inv, qmin, qmax, zp,
                                 codes + j * lay.group)) {
          ok = false;
        }
      }
      if (spec.bits != 8) PackRow(codes, k, spec.bits, out);
    }
  });
  return ok;
}

bool QuantizeRowsImpl(const void* x, DType dtype, size_t rows, size_t k, size_t row_stride,
                      const QuantSpec& spec, bool given, float* scales, uint8_t* zps,
                      uint8_t* packed, size_t packed_stride) {
  switch (dtype) {
#define LOWBIT_CASE(DT, T)                                                                       \
  case DT:                                                                                       \
    return spec.symmetric                                                                        \
               ? QuantizeRowsT<T, true>(static_cast<const T*>(x), rows, k, row_stride, spec,     \
                                        given, scales, zps, packed, packed_stride)               \
               : QuantizeRowsT<T, false>(static_cast<const T*>(x), rows, k, row_stride, spec,    \
                                         given, scales, zps, packed, packed_stride);
    LOWBIT_CASE(DType::kF32, float)
    LOWBIT_CASE(DType::kF16, hwy::float16_t)
    LOWBIT_CASE(DType::kBF16, hwy::bfloat16_t)
#undef LOWBIT_CASE
  }
  throw std::invalid_argument("unsupported dtype");
}

template <typename T>
bool RangeStatsT(const T* x, size_t rows, size_t k, size_t row_stride, float* lo, float* hi) {
  std::mutex mu;
  float glo = 0.0f, ghi = 0.0f;
  bool ok = true;
  ParallelFor(rows, MinRowsPerChunk(k), [&](size_t r0, size_t r1) {
    float clo = 0.0f, chi = 0.0f;
    bool cok = true;
    for (size_t r = r0; r < r1; ++r) {
      float l, h;
      cok &= GroupRange(x + r * row_stride, k, &l, &h);
      clo = std::min(clo, l);
      chi = std::max(chi, h);
    }
    std::lock_guard<std::mutex> lock(mu);
    glo = std::min(glo, clo);
    ghi = std::max(ghi, chi);
    ok &= cok;
  });
  *lo = glo;
  *hi = ghi;
  return ok;
}

bool RangeStatsImpl(const void* x, DType dtype, size_t rows, size_t k, size_t row_stride,
                    float* lo, float* hi) {
  switch (dtype) {
    case DType::kF32:
      return RangeStatsT(static_cast<const float*>(x), rows, k, row_stride, lo, hi);
    case DType::kF16:
      return RangeStatsT(static_cast<const hwy::float16_t*>(x), rows, k, row_stride, lo, hi);
    case DType::kBF16:
      return RangeStatsT(static_cast<const hwy::bfloat16_t*>(x), rows, k, row_stride, lo, hi);
  }
  throw std::invalid_argument("unsupported dtype");
}

template <bool kSym, typename T>
void DequantizeRowsT(const uint8_t* packed, size_t packed_stride, size_t rows, size_t k,
                     const QuantSpec& spec, const float* scales, const uint8_t* zps, T* out,
                     size_t out_stride) {
  const Layout lay = MakeLayout(k, spec);
  ParallelFor(rows, MinRowsPerChunk(k), [&](size_t r0, size_t r1) {
    std::vector<uint8_t> scratch(spec.bits == 8 ? 0 : k);
    for (size_t r = r0; r < r1; ++r) {
      const uint8_t* codes = packed + r * packed_stride;
      if (spec.bits != 8) {
        UnpackRow(codes, k, spec.bits, kSym, scratch.data());
        codes = scratch.data();
      }
      for (size_t j = 0; j < lay.groups_per_row; ++j) {
        const size_t s = lay.ScaleIndex(r, j);
        DequantizeGroup<kSym>(codes + j * lay.group, lay.group, scales[s], kSym ? 0 : zps[s],
                              out + r * out_stride + j * lay.group);
      }
    }
  });
}

void DequantizeRowsImpl(const uint8_t* packed, size_t packed_stride, size_t rows, size_t k,
                        const QuantSpec& spec, const float* scales, const uint8_t* zps, void* out,
                        DType out_dtype, size_t out_stride) {
  switch (out_dtype) {
#define LOWBIT_CASE(DT, T)                                                                     \
  case DT:                                                                                     \
    return spec.symmetric                                                                      \
               ? DequantizeRowsT<true>(packed, packed_stride, rows, k, spec, scales, zps,     \
                                       static_cast<T*>(out), out_stride)                      \
               : DequantizeRowsT<false>(packed, packed_stride, rows, k, spec, scales, zps,    \
                                        static_cast<T*>(out), out_stride);
    LOWBIT_CASE(DType::kF32, float)
    LOWBIT_CASE(DType::kF16, hwy::float16_t)
    LOWBIT_CASE(DType::kBF16, hwy::bfloat16_t)
#undef LOWBIT_CASE
  }
  throw std::invalid_argument("unsupported dtype");
}

void UnpackCodesImpl(const uint8_t* packed, size_t packed_stride, size_t rows, size_t k,
                     int bits, bool sym, uint8_t* codes) {
  ParallelFor(rows, MinRowsPerChunk(k), [&](size_t r0, size_t r1) {
    for (size_t r = r0; r < r1; ++r) UnpackRow(packed + r * packed_stride, k, bits, sym, codes + r * k);
  });
}

}  // namespace HWY_NAMESPACE
}  // namespace lowbit
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace lowbit {

HWY_EXPORT(QuantizeRowsImpl);
HWY_EXPORT(RangeStatsImpl);
HWY_EXPORT(DequantizeRowsImpl);
HWY_EXPORT(UnpackCodesImpl);

void ChooseScale(float lo, float hi, int bits, bool symmetric, float* scale, int32_t* zp) {
  float s;
  int32_t z = 0;
  if (symmetric) {
    const float m = (-lo >= hi) ? lo : hi;                 // signed value of largest magnitude
    s = m / -static_cast<float>(1 << (bits - 1));           // power of two: exact
  } else {
    const int qmax = QMax(bits, false);
    s = static_cast<float>((static_cast<double>(hi) - static_cast<double>(lo)) / qmax);
    if (std::fabs(s) >= FLT_MIN) {
      const float zf = std::nearbyint(-(lo * (1.0f / s)));
      z = static_cast<int32_t>(std::min(std::max(zf, 0.0f), static_cast<float>(qmax)));
    }
  }
  if (!(std::fabs(s) >= FLT_MIN)) {  // all zeros, or too tiny for 1/scale to be finite
    s = 0.0f;
    z = 0;
  }
  *scale = s;
  *zp = z;
}

bool RangeStats(const void* x, DType dtype, size_t rows, size_t k, size_t row_stride, float* lo,
                float* hi) {
  return HWY_DYNAMIC_DISPATCH(RangeStatsImpl)(x, dtype, rows, k, row_stride, lo, hi);
}

bool QuantizeRows(const void* x, DType dtype, size_t rows, size_t k, size_t row_stride,
                  const QuantSpec& spec, bool scales_given, float* scales, uint8_t* zps,
                  uint8_t* packed, size_t packed_stride) {
  if (spec.bits != 2 && spec.bits != 4 && spec.bits != 8)
    throw std::invalid_argument("bits must be 2, 4 or 8");
  if (packed_stride < PackedRowBytes(k, spec.bits))
    throw std::invalid_argument("packed row stride too small");
  bool ok = true;
  if (spec.per_tensor && !scales_given) {
    float lo, hi;
    ok = RangeStats(x, dtype, rows, k, row_stride, &lo, &hi);
    int32_t zp;
    ChooseScale(lo, hi, spec.bits, spec.symmetric, &scales[0], &zp);
    if (!spec.symmetric) zps[0] = static_cast<uint8_t>(zp);
    scales_given = true;
  }
  ok &= HWY_DYNAMIC_DISPATCH(QuantizeRowsImpl)(x, dtype, rows, k, row_stride, spec,
                                               scales_given, scales, zps, packed, packed_stride);
  return ok;
}

void DequantizeRows(const uint8_t* packed, size_t packed_stride, size_t rows, size_t k,
                    const QuantSpec& spec, const float* scales, const uint8_t* zps, void* out,
                    DType out_dtype, size_t out_stride) {
  if (spec.bits != 2 && spec.bits != 4 && spec.bits != 8)
    throw std::invalid_argument("bits must be 2, 4 or 8");
  HWY_DYNAMIC_DISPATCH(DequantizeRowsImpl)(packed, packed_stride, rows, k, spec, scales, zps, out,
                                           out_dtype, out_stride);
}

void UnpackCodes(const uint8_t* packed, size_t packed_stride, size_t rows, size_t k, int bits,
                 bool symmetric, uint8_t* codes) {
  if (bits != 2 && bits != 4 && bits != 8) throw std::invalid_argument("bits must be 2, 4 or 8");
  HWY_DYNAMIC_DISPATCH(UnpackCodesImpl)(packed, packed_stride, rows, k, bits, symmetric, codes);
}

}  // namespace lowbit
#endif  // HWY_ONCE
