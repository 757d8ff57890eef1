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
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "hwy/cache_control.h"
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

// Finite min/max of n elements, both folded with 0 (formats.h). NaN counts as 0
// here; QuantizeGroup, which reads every element again, reports it. Two
// accumulators per bound: min/max latency 4 at 2 per cycle would otherwise bind
// before the loads do when the data is in L1.
template <typename T>
HWY_INLINE void GroupRange(const T* x, size_t n, float* lo, float* hi) {
  const DF df;
  auto lo0 = hn::Zero(df), lo1 = hn::Zero(df), hi0 = hn::Zero(df), hi1 = hn::Zero(df);
  auto fold = [&](hn::Vec<DF> v, hn::Vec<DF>& l, hn::Vec<DF>& h) {
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
}

// nearbyint of values the caller has clamped to well inside int32: one
// cvtps2dq (round half to even under the default MXCSR, as NearestInt assumes
// too) without NearestInt's overflow fix-up, which costs 4 more uops per vector.
HWY_INLINE hn::Vec<DI> RoundClamped(hn::Vec<DF> v) {
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
  return hn::Vec<DI>{_mm512_cvtps_epi32(v.raw)};
#elif HWY_TARGET == HWY_AVX2
  return hn::Vec<DI>{_mm256_cvtps_epi32(v.raw)};
#elif HWY_TARGET == HWY_SSE4 || HWY_TARGET == HWY_SSSE3
  return hn::Vec<DI>{_mm_cvtps_epi32(v.raw)};
#else
  return hn::NearestInt(v);
#endif
}

// Stores the codes of one vector of kF32Lanes elements as kF32Lanes * kBits / 8
// bytes in formats.h order. Packing in registers saves a pass over a scratch
// row (1 thread, int4 per row: 8.0 -> 11 GB/s on 128 MiB).
template <int kBits, bool kSym>
HWY_INLINE void StoreCodes(hn::Vec<DI> q, uint8_t* out) {
  const DI di;
  if constexpr (kBits == 8) {
    using CodeT = std::conditional_t<kSym, int8_t, uint8_t>;
    const hn::Rebind<CodeT, DI> dcode;
    hn::StoreU(hn::DemoteTo(dcode, q), dcode, reinterpret_cast<CodeT*>(out));
  } else if constexpr (kBits == 4) {
    // Pairs of 16-bit codes viewed as 32-bit lanes: (c0 & 0xF) | (c1 & 0xF) << 4.
    const hn::Rebind<int16_t, DI> d16;
    const hn::Repartition<int32_t, decltype(d16)> d32;
    const hn::Rebind<uint8_t, decltype(d32)> d8;
    const auto v = hn::BitCast(d32, hn::DemoteTo(d16, q));
    const auto b = hn::Or(hn::And(v, hn::Set(d32, 0x0F)), hn::And(hn::ShiftRight<12>(v), hn::Set(d32, 0xF0)));
    hn::StoreU(hn::DemoteTo(d8, b), d8, out);
  } else {
    static_assert(kBits == 2, "bits");
    const hn::Rebind<int8_t, DI> d8c;
    const hn::Repartition<int32_t, decltype(d8c)> d32;
    const hn::Rebind<uint8_t, decltype(d32)> d8;
    const auto v = hn::BitCast(d32, hn::DemoteTo(d8c, q));
    auto b = hn::And(v, hn::Set(d32, 0x03));
    b = hn::Or(b, hn::And(hn::ShiftRight<6>(v), hn::Set(d32, 0x0C)));
    b = hn::Or(b, hn::And(hn::ShiftRight<12>(v), hn::Set(d32, 0x30)));
    b = hn::Or(b, hn::And(hn::ShiftRight<18>(v), hn::Set(d32, 0xC0)));
    hn::StoreU(hn::DemoteTo(d8, b), d8, out);
  }
  (void)di;
}

// Codes of n elements, q = nearbyint(clamp(x * inv, qmin - zp, qmax - zp)) + zp,
// packed kBits each into out (which starts on a byte boundary; kBits = 8 is one
// code per byte). Returns false on NaN.
// prefetch: the same span of the next row, or null. The range pass must read a
// row before its codes can be computed, so each row is read twice; fetching the
// next row from DRAM while this one is quantized from L1 overlaps the two
// (1 thread, int8 per row: 8.4 -> 11 GB/s on 128 MiB).
template <int kBits, bool kSym, typename T>
bool QuantizeGroup(const T* x, size_t n, float inv, int qmin, int qmax, int32_t zp,
                   uint8_t* out, const T* prefetch) {
  const DF df;
  const DI di;
  // A degenerate group (scale 0) clamps to [0, 0]: every code is zp, even for +-inf.
  const float lo = inv == 0.0f ? 0.0f : float(qmin - zp);
  const float hi = inv == 0.0f ? 0.0f : float(qmax - zp);
  const auto vinv = hn::Set(df, inv), vlo = hn::Set(df, lo), vhi = hn::Set(df, hi);
  const auto vzp = hn::Set(di, zp);
  auto nan = hn::Lt(vlo, vlo);  // all false; a mask OR per vector is 1 uop on AVX-512
  auto body = [&](const T* p, uint8_t* o) {
    const auto v = LoadAsF32(df, p);
    nan = hn::Or(nan, hn::IsNaN(v));
    const auto q = RoundClamped(hn::Min(hn::Max(hn::Mul(v, vinv), vlo), vhi));
    StoreCodes<kBits, kSym>(kSym ? q : hn::Add(q, vzp), o);  // in range: exact
  };
  constexpr size_t kBytes = kF32Lanes * kBits / 8;
  size_t i = 0;
  for (; i + kF32Lanes <= n; i += kF32Lanes) {
    if (prefetch) hwy::Prefetch(prefetch + i);  // one line per 64-byte vector
    body(x + i, out + i * kBits / 8);
  }
  if (i < n) {  // same vector code on zero-padded copies
    alignas(64) T in_buf[kF32Lanes];
    alignas(64) uint8_t out_buf[kBytes];
    std::memset(static_cast<void*>(in_buf), 0, sizeof(in_buf));
    std::memcpy(static_cast<void*>(in_buf), x + i, (n - i) * sizeof(T));
    body(in_buf, out_buf);
    const size_t bits = (n - i) * kBits, bytes = (bits + 7) / 8;
    if (bits % 8) out_buf[bytes - 1] &= static_cast<uint8_t>((1u << (bits % 8)) - 1);  // zero pad
    std::memcpy(out + i * kBits / 8, out_buf, bytes);
  }
  return hn::AllFalse(df, nan);
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

// kBits: bits of the packed output, or 8 with kPackAfter (groups that do not
// start on byte boundaries: codes go to a scratch row packed afterwards).
template <int kBits, bool kSym, typename T>
bool QuantizeRowsT(const T* x, size_t rows, size_t k, size_t row_stride, const QuantSpec& spec,
                   bool given, float* scales, uint8_t* zps, uint8_t* packed, size_t packed_stride) {
  const Layout lay = MakeLayout(k, spec);
  const int qmin = QMin(spec.bits, kSym), qmax = QMax(spec.bits, kSym);
  const bool pack_after = kBits != spec.bits;
  std::atomic<bool> ok{true};
  ParallelFor(rows, MinRowsPerChunk(k), [&](size_t r0, size_t r1) {
    std::vector<uint8_t> scratch(pack_after ? k : 0);
    std::vector<float> lo(lay.groups_per_row), hi(lay.groups_per_row), inv(lay.groups_per_row);
    std::vector<int32_t> zp(lay.groups_per_row, 0);
    for (size_t r = r0; r < r1; ++r) {
      const T* xr = x + r * row_stride;
      uint8_t* out = pack_after ? scratch.data() : packed + r * packed_stride;
      // Three sweeps over the row's groups rather than one group at a time: each
      // group's range -> scale -> reciprocal chain is ~60 cycles of latency, which
      // independent groups overlap (1 thread, int4 g128: 8.5 -> 11 GB/s).
      const size_t s0 = lay.ScaleIndex(r, 0);
      if (!given) {
        for (size_t j = 0; j < lay.groups_per_row; ++j) GroupRange(xr + j * lay.group, lay.group, &lo[j], &hi[j]);
        for (size_t j = 0; j < lay.groups_per_row; ++j) {
          ChooseScale(lo[j], hi[j], spec.bits, kSym, &scales[s0 + j], &zp[j]);
          if (!kSym) zps[s0 + j] = static_cast<uint8_t>(zp[j]);
        }
      } else if (!kSym) {
        for (size_t j = 0; j < lay.groups_per_row; ++j) zp[j] = zps[lay.ScaleIndex(r, j)];
      }
      for (size_t j = 0; j < lay.groups_per_row; ++j) {
        const float scale = scales[lay.ScaleIndex(r, j)];
        inv[j] = scale == 0.0f ? 0.0f : 1.0f / scale;
      }
      for (size_t j = 0; j < lay.groups_per_row; ++j) {
        const T* xg = xr + j * lay.group;
        const T* next = r + 1 < r1 ? xg + row_stride : nullptr;
        if (!QuantizeGroup<kBits, kSym>(xg, lay.group, inv[j], qmin, qmax, zp[j],
                                        out + j * lay.group * kBits / 8, next)) {
          ok = false;
        }
      }
      if (pack_after) PackRow(scratch.data(), k, spec.bits, packed + r * packed_stride);
    }
  });
  return ok;
}

template <typename T, bool kSym>
bool QuantizeRowsBits(const T* x, size_t rows, size_t k, size_t row_stride, const QuantSpec& spec,
                      bool given, float* scales, uint8_t* zps, uint8_t* packed, size_t stride) {
  const size_t group = spec.per_tensor ? k : spec.group;
  // Every group starts on a byte boundary unless a row holds several groups of
  // an odd size (int4) or a size that is not a multiple of 4 (int2).
  const bool aligned = group == k || (group * spec.bits) % 8 == 0;
  if (spec.bits == 4 && aligned)
    return QuantizeRowsT<4, kSym>(x, rows, k, row_stride, spec, given, scales, zps, packed, stride);
  if (spec.bits == 2 && aligned)
    return QuantizeRowsT<2, kSym>(x, rows, k, row_stride, spec, given, scales, zps, packed, stride);
  return QuantizeRowsT<8, kSym>(x, rows, k, row_stride, spec, given, scales, zps, packed, stride);
}

bool QuantizeRowsImpl(const void* x, DType dtype, size_t rows, size_t k, size_t row_stride,
                      const QuantSpec& spec, bool given, float* scales, uint8_t* zps,
                      uint8_t* packed, size_t packed_stride) {
  switch (dtype) {
#define LOWBIT_CASE(DT, T)                                                                       \
  case DT:                                                                                       \
    return spec.symmetric                                                                        \
               ? QuantizeRowsBits<T, true>(static_cast<const T*>(x), rows, k, row_stride, spec,     \
                                        given, scales, zps, packed, packed_stride)               \
               : QuantizeRowsBits<T, false>(static_cast<const T*>(x), rows, k, row_stride, spec,    \
                                         given, scales, zps, packed, packed_stride);
    LOWBIT_CASE(DType::kF32, float)
    LOWBIT_CASE(DType::kF16, hwy::float16_t)
    LOWBIT_CASE(DType::kBF16, hwy::bfloat16_t)
#undef LOWBIT_CASE
  }
  throw std::invalid_argument("unsupported dtype");
}

template <typename T>
void RangeStatsT(const T* x, size_t rows, size_t k, size_t row_stride, float* lo, float* hi) {
  std::mutex mu;
  float glo = 0.0f, ghi = 0.0f;
  ParallelFor(rows, MinRowsPerChunk(k), [&](size_t r0, size_t r1) {
    float clo = 0.0f, chi = 0.0f;
    for (size_t r = r0; r < r1; ++r) {
      float l, h;
      GroupRange(x + r * row_stride, k, &l, &h);
      clo = std::min(clo, l);
      chi = std::max(chi, h);
    }
    std::lock_guard<std::mutex> lock(mu);
    glo = std::min(glo, clo);
    ghi = std::max(ghi, chi);
  });
  *lo = glo;
  *hi = ghi;
}

void RangeStatsImpl(const void* x, DType dtype, size_t rows, size_t k, size_t row_stride,
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

void RangeStats(const void* x, DType dtype, size_t rows, size_t k, size_t row_stride, float* lo,
                float* hi) {
  HWY_DYNAMIC_DISPATCH(RangeStatsImpl)(x, dtype, rows, k, row_stride, lo, hi);
}

bool QuantizeRows(const void* x, DType dtype, size_t rows, size_t k, size_t row_stride,
                  const QuantSpec& spec, bool scales_given, float* scales, uint8_t* zps,
                  uint8_t* packed, size_t packed_stride) {
  if (spec.bits != 2 && spec.bits != 4 && spec.bits != 8)
    throw std::invalid_argument("bits must be 2, 4 or 8");
  if (packed_stride < PackedRowBytes(k, spec.bits))
    throw std::invalid_argument("packed row stride too small");
  if (spec.per_tensor && !scales_given) {
    float lo, hi;
    RangeStats(x, dtype, rows, k, row_stride, &lo, &hi);
    int32_t zp;
    ChooseScale(lo, hi, spec.bits, spec.symmetric, &scales[0], &zp);
    if (!spec.symmetric) zps[0] = static_cast<uint8_t>(zp);
    scales_given = true;
  }
  return HWY_DYNAMIC_DISPATCH(QuantizeRowsImpl)(x, dtype, rows, k, row_stride, spec,
                                                scales_given, scales, zps, packed, packed_stride);
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
