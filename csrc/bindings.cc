// The only file that knows NumPy: validates every buffer (dtype, shape,
// contiguity, writability, size) and raises ValueError/TypeError naming the
// argument before any kernel runs; kernels then run with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include <mutex>

#include "lowbit/decoder.h"
#include "lowbit/kernels.h"
#include "lowbit/parallel.h"
#include "lowbit/residency.h"

namespace py = pybind11;
using lowbit::DType;

namespace {

[[noreturn]] void Fail(const std::string& msg) { throw py::value_error(msg); }

// Element kinds a buffer may hold.
enum class Kind { kF32, kF16, kU16, kU8, kI8, kI32, kF64 };

bool HasKind(const py::array& a, Kind kind) {
  const py::dtype dt = a.dtype();
  switch (kind) {
    case Kind::kF32: return dt.is(py::dtype::of<float>());
    case Kind::kF16: return dt.kind() == 'f' && dt.itemsize() == 2;
    case Kind::kU16: return dt.is(py::dtype::of<uint16_t>());
    case Kind::kU8: return dt.is(py::dtype::of<uint8_t>());
    case Kind::kI8: return dt.is(py::dtype::of<int8_t>());
    case Kind::kI32: return dt.is(py::dtype::of<int32_t>());
    case Kind::kF64: return dt.is(py::dtype::of<double>());
  }
  return false;
}

const char* KindName(Kind kind) {
  switch (kind) {
    case Kind::kF32: return "float32";
    case Kind::kF16: return "float16";
    case Kind::kU16: return "uint16";
    case Kind::kU8: return "uint8";
    case Kind::kI8: return "int8";
    case Kind::kI32: return "int32";
    case Kind::kF64: return "float64";
  }
  return "?";
}

Kind KindOf(DType d) {
  switch (d) {
    case DType::kF32: return Kind::kF32;
    case DType::kF16: return Kind::kF16;
    case DType::kBF16: return Kind::kU16;  // bfloat16 travels as a uint16 view
  }
  Fail("dtype flag must be 0 (float32), 1 (float16) or 2 (bfloat16)");
}

DType ToDType(int flag) {
  if (flag < 0 || flag > 2) Fail("dtype flag must be 0 (float32), 1 (float16) or 2 (bfloat16)");
  return static_cast<DType>(flag);
}

void CheckKind(const py::array& a, const char* name, Kind kind) {
  if (!HasKind(a, kind))
    throw py::type_error(std::string(name) + " must have dtype " + KindName(kind) + ", got " +
                         std::string(py::str(a.dtype())));
}

// A contiguous array of exactly n elements of `kind`.
void CheckFlat(const py::array& a, const char* name, Kind kind, size_t n, bool writable) {
  CheckKind(a, name, kind);
  if (!(a.flags() & py::array::c_style)) Fail(std::string(name) + " must be C-contiguous");
  if (writable && !a.writeable()) Fail(std::string(name) + " must be writable");
  if (static_cast<size_t>(a.size()) != n)
    Fail(std::string(name) + " must have " + std::to_string(n) + " elements, got " +
         std::to_string(a.size()));
}

// A 2-D array whose last axis is contiguous; returns the row stride in elements.
size_t CheckRows(const py::array& a, const char* name, Kind kind, bool writable) {
  CheckKind(a, name, kind);
  if (a.ndim() != 2) Fail(std::string(name) + " must be 2-D, got ndim " + std::to_string(a.ndim()));
  if (writable && !a.writeable()) Fail(std::string(name) + " must be writable");
  const ssize_t item = a.itemsize();
  if (a.shape(1) > 1 && a.strides(1) != item) Fail(std::string(name) + " must be contiguous along its last axis");
  if (a.shape(0) > 1 && (a.strides(0) < 0 || a.strides(0) % item != 0 || a.strides(0) / item < a.shape(1)))
    Fail(std::string(name) + " has an unsupported row stride");
  return a.shape(0) > 1 ? static_cast<size_t>(a.strides(0) / item) : static_cast<size_t>(a.shape(1));
}

lowbit::QuantSpec Spec(int bits, size_t k, long group, bool symmetric, bool per_tensor) {
  if (bits != 2 && bits != 4 && bits != 8) Fail("bits must be 2, 4 or 8, got " + std::to_string(bits));
  lowbit::QuantSpec s;
  s.bits = bits;
  s.symmetric = symmetric;
  s.per_tensor = per_tensor;
  if (!per_tensor) {
    if (group <= 0 || k % static_cast<size_t>(group) != 0)
      Fail("group_size " + std::to_string(group) + " must be positive and divide K=" + std::to_string(k));
    s.group = static_cast<size_t>(group);
  }
  return s;
}

size_t NumScales(size_t rows, size_t k, const lowbit::QuantSpec& s) {
  return s.per_tensor ? 1 : rows * (k / s.group);
}

bool QuantizeRows(const py::array& x, int dtype_flag, int bits, long group, bool symmetric,
                  bool per_tensor, bool given, py::array scales, py::object zps_obj, py::array packed) {
  const DType dtype = ToDType(dtype_flag);
  const size_t stride = CheckRows(x, "x", KindOf(dtype), false);
  const size_t rows = x.shape(0), k = x.shape(1);
  if (rows == 0 || k == 0) Fail("x must not be empty");
  const lowbit::QuantSpec spec = Spec(bits, k, group, symmetric, per_tensor);
  const size_t ns = NumScales(rows, k, spec);
  CheckFlat(scales, "scales", Kind::kF32, ns, !given);
  uint8_t* zps = nullptr;
  py::array zarr;
  if (!symmetric) {
    if (zps_obj.is_none()) Fail("zero_point is required for asymmetric quantization");
    zarr = zps_obj.cast<py::array>();
    CheckFlat(zarr, "zero_point", Kind::kU8, ns, !given);
    zps = static_cast<uint8_t*>(zarr.mutable_data());
  }
  const size_t pstride = CheckRows(packed, "packed", Kind::kU8, true);
  if (static_cast<size_t>(packed.shape(0)) != rows || static_cast<size_t>(packed.shape(1)) != lowbit::PackedRowBytes(k, bits))
    Fail("packed must have shape (" + std::to_string(rows) + ", " +
         std::to_string(lowbit::PackedRowBytes(k, bits)) + ")");
  float* s = given ? const_cast<float*>(static_cast<const float*>(scales.data()))
                   : static_cast<float*>(scales.mutable_data());
  uint8_t* out = static_cast<uint8_t*>(packed.mutable_data());
  const void* px = x.data();
  py::gil_scoped_release release;
  return lowbit::QuantizeRows(px, dtype, rows, k, stride, spec, given, s, zps, out, pstride);
}

// Optional per-column search weights [k] (finite, >= 0), converted to float32.
py::array_t<float, py::array::c_style | py::array::forcecast> Importance(const py::object& importance_obj, size_t k) {
  py::array_t<float, py::array::c_style | py::array::forcecast> importance;
  if (importance_obj.is_none()) return importance;
  importance = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(importance_obj);
  if (!importance || importance.ndim() != 1 || static_cast<size_t>(importance.shape(0)) != k)
    Fail("importance must be a 1-D float array with one entry per column of x");
  const float* pc = importance.data();
  for (size_t i = 0; i < k; ++i)
    if (!(pc[i] >= 0.0f) || !std::isfinite(pc[i])) Fail("importance must be finite and >= 0");
  return importance;
}

py::tuple SearchScales(const py::array& x, int bits, long group, bool symmetric, int steps,
                       const py::object& importance_obj) {
  const size_t stride = CheckRows(x, "x", Kind::kF32, false);
  const size_t rows = x.shape(0), k = x.shape(1);
  const auto importance = Importance(importance_obj, k);
  const float* pc = importance_obj.is_none() ? nullptr : importance.data();
  if (rows == 0 || k == 0) Fail("x must not be empty");
  if (bits < 2 || bits > 8) Fail("bits must be in [2, 8] (codes of the search grid)");
  if (group <= 0 || k % static_cast<size_t>(group) != 0) Fail("group_size must divide the last dimension");
  if (steps < 0 || steps > 64) Fail("steps must be in [0, 64]");
  const size_t ns = rows * (k / group);
  py::array_t<float> scales(ns);
  py::array_t<uint8_t> zps(symmetric ? 0 : ns);
  const float* px = static_cast<const float*>(x.data());
  float* s = scales.mutable_data();
  uint8_t* z = symmetric ? nullptr : zps.mutable_data();
  {
    py::gil_scoped_release release;
    lowbit::SearchScales(px, rows, k, stride, group, bits, symmetric, steps, s, z, pc);
  }
  return py::make_tuple(scales, symmetric ? py::object(py::none()) : py::object(zps));
}

// A level table (formats.h "level tables"): 16 increasing int8 levels in [-127, 127].
const int8_t* CheckLevels(const py::array& levels) {
  CheckFlat(levels, "levels", Kind::kI8, 16, false);
  const int8_t* l = static_cast<const int8_t*>(levels.data());
  for (int i = 0; i < 16; ++i)
    if (l[i] < -127 || (i > 0 && l[i] <= l[i - 1])) Fail("levels must be 16 increasing values in [-127, 127]");
  return l;
}

// Level tables (formats.h): a C-contiguous float32 x [rows, K] and int8 levels [16].
const int8_t* LevelArgs(const py::array& x, const py::array& levels, long group) {
  CheckKind(x, "x", Kind::kF32);
  if (x.ndim() != 2 || !(x.flags() & py::array::c_style)) Fail("x must be a C-contiguous 2-D float32 array");
  if (x.shape(0) == 0 || x.shape(1) == 0) Fail("x must not be empty");
  if (group <= 0 || static_cast<size_t>(x.shape(1)) % static_cast<size_t>(group) != 0)
    Fail("group_size must divide the last dimension");
  return CheckLevels(levels);
}

py::array_t<float> SearchLevelScales(const py::array& x, const py::array& levels, long group, int steps,
                                     const py::object& importance_obj) {
  const int8_t* l = LevelArgs(x, levels, group);
  const size_t rows = x.shape(0), k = x.shape(1);
  if (steps < 0 || steps > 64) Fail("steps must be in [0, 64]");
  const auto importance = Importance(importance_obj, k);
  const float* pc = importance_obj.is_none() ? nullptr : importance.data();
  py::array_t<float> scales(rows * (k / group));
  const float* px = static_cast<const float*>(x.data());
  float* s = scales.mutable_data();
  py::gil_scoped_release release;
  lowbit::SearchLevelScales(px, rows, k, group, l, steps, s, pc);
  return scales;
}

py::array_t<uint8_t> LevelCodes(const py::array& x, const py::array& levels, long group, const py::array& scales) {
  const int8_t* l = LevelArgs(x, levels, group);
  const size_t rows = x.shape(0), k = x.shape(1);
  CheckFlat(scales, "scales", Kind::kF32, rows * (k / group), false);
  py::array_t<uint8_t> codes({rows, k});
  const float* px = static_cast<const float*>(x.data());
  const float* s = static_cast<const float*>(scales.data());
  uint8_t* c = codes.mutable_data();
  py::gil_scoped_release release;
  lowbit::LevelCodes(px, rows, k, group, l, s, c);
  return codes;
}

// GPTQ's column loop on one block (gptq.cc): every array C-contiguous and sized
// from wt [B, R]; the group indices are checked against the scales' rows; a
// level table only for symmetric int4 codes.
void GptqColumns(py::array wt, const py::array& hinv, long c0, long c1, const py::array& scales,
                 const py::object& zps_obj, const py::array& groups, int qmin, int qmax, py::array codes,
                 py::array err, const py::object& levels_obj) {
  CheckKind(wt, "wt", Kind::kF64);
  if (wt.ndim() != 2 || !(wt.flags() & py::array::c_style) || !wt.writeable())
    Fail("wt must be a writable C-contiguous 2-D float64 array [B, R]");
  const size_t b = wt.shape(0), rows = wt.shape(1);
  if (b == 0 || rows == 0) Fail("wt must not be empty");
  CheckFlat(hinv, "hinv", Kind::kF64, b * b, false);
  if (c0 < 0 || c1 < c0 || static_cast<size_t>(c1) > b) Fail("columns must satisfy 0 <= c0 <= c1 <= B");
  CheckKind(scales, "scales", Kind::kF32);
  if (scales.ndim() != 2 || static_cast<size_t>(scales.shape(1)) != rows || !(scales.flags() & py::array::c_style))
    Fail("scales must be C-contiguous float32 [G, R]");
  const size_t ngroups = scales.shape(0);
  const float* zps = nullptr;
  if (!zps_obj.is_none()) {
    const py::array zp = zps_obj.cast<py::array>();
    CheckFlat(zp, "zps", Kind::kF32, ngroups * rows, false);
    zps = static_cast<const float*>(zp.data());
  }
  CheckFlat(groups, "groups", Kind::kI32, b, false);
  const int32_t* g = static_cast<const int32_t*>(groups.data());
  for (size_t c = static_cast<size_t>(c0); c < static_cast<size_t>(c1); ++c)
    if (g[c] < 0 || static_cast<size_t>(g[c]) >= ngroups) Fail("groups must index the rows of scales");
  if (qmin > qmax) Fail("qmin must be <= qmax");
  const int8_t* levels = nullptr;
  if (!levels_obj.is_none()) {
    if (zps != nullptr || qmin != -8 || qmax != 7) Fail("levels need symmetric 4-bit codes (no zps, qmin -8, qmax 7)");
    levels = CheckLevels(levels_obj.cast<py::array>());
  }
  CheckFlat(codes, "codes", Kind::kI32, b * rows, true);
  CheckFlat(err, "err", Kind::kF64, b * rows, true);
  double* w = static_cast<double*>(wt.mutable_data());
  const double* h = static_cast<const double*>(hinv.data());
  const float* s = static_cast<const float*>(scales.data());
  int32_t* q = static_cast<int32_t*>(codes.mutable_data());
  double* e = static_cast<double*>(err.mutable_data());
  py::gil_scoped_release release;
  lowbit::GptqColumns(w, rows, b, h, c0, c1, s, zps, g, qmin, qmax, levels, q, e);
}

void DequantizeRows(const py::array& packed, size_t k, int bits, long group, bool symmetric,
                    bool per_tensor, const py::array& scales, py::object zps_obj, py::array out,
                    int dtype_flag) {
  const DType dtype = ToDType(dtype_flag);
  const size_t pstride = CheckRows(packed, "packed", Kind::kU8, false);
  const size_t rows = packed.shape(0);
  if (rows == 0 || k == 0) Fail("cannot dequantize an empty array");
  if (static_cast<size_t>(packed.shape(1)) != lowbit::PackedRowBytes(k, bits))
    Fail("packed rows must hold " + std::to_string(lowbit::PackedRowBytes(k, bits)) + " bytes");
  const lowbit::QuantSpec spec = Spec(bits, k, group, symmetric, per_tensor);
  const size_t ns = NumScales(rows, k, spec);
  CheckFlat(scales, "scales", Kind::kF32, ns, false);
  const uint8_t* zps = nullptr;
  py::array zarr;
  if (!symmetric) {
    if (zps_obj.is_none()) Fail("zero_point is required for asymmetric quantization");
    zarr = zps_obj.cast<py::array>();
    CheckFlat(zarr, "zero_point", Kind::kU8, ns, false);
    zps = static_cast<const uint8_t*>(zarr.data());
  }
  const size_t ostride = CheckRows(out, "out", KindOf(dtype), true);
  if (static_cast<size_t>(out.shape(0)) != rows || static_cast<size_t>(out.shape(1)) != k)
    Fail("out must have shape (" + std::to_string(rows) + ", " + std::to_string(k) + ")");
  const uint8_t* p = static_cast<const uint8_t*>(packed.data());
  const float* s = static_cast<const float*>(scales.data());
  void* o = out.mutable_data();
  py::gil_scoped_release release;
  lowbit::DequantizeRows(p, pstride, rows, k, spec, s, zps, o, dtype, ostride);
}

void UnpackCodes(const py::array& packed, size_t k, int bits, bool symmetric, py::array codes) {
  const size_t pstride = CheckRows(packed, "packed", Kind::kU8, false);
  const size_t rows = packed.shape(0);
  if (bits != 2 && bits != 4 && bits != 8) Fail("bits must be 2, 4 or 8");
  if (static_cast<size_t>(packed.shape(1)) != lowbit::PackedRowBytes(k, bits))
    Fail("packed rows must hold " + std::to_string(lowbit::PackedRowBytes(k, bits)) + " bytes");
  if (!(HasKind(codes, Kind::kU8) || codes.dtype().is(py::dtype::of<int8_t>())))
    throw py::type_error("codes must have dtype int8 or uint8");
  if (!(codes.flags() & py::array::c_style) || !codes.writeable() || static_cast<size_t>(codes.size()) != rows * k)
    Fail("codes must be a writable C-contiguous array of rows*K elements");
  const uint8_t* p = static_cast<const uint8_t*>(packed.data());
  uint8_t* c = static_cast<uint8_t*>(codes.mutable_data());
  py::gil_scoped_release release;
  lowbit::UnpackCodes(p, pstride, rows, k, bits, symmetric, c);
}

py::tuple RangeStats(const py::array& x, int dtype_flag) {
  const DType dtype = ToDType(dtype_flag);
  const size_t stride = CheckRows(x, "x", KindOf(dtype), false);
  float lo = 0, hi = 0;
  {
    py::gil_scoped_release release;
    lowbit::RangeStats(x.data(), dtype, x.shape(0), x.shape(1), stride, &lo, &hi);
  }
  return py::make_tuple(lo, hi);
}

template <typename In, typename Out, class Fn>
void Convert(const py::array& in, Kind kin, py::array out, Kind kout, Fn fn) {
  CheckFlat(in, "x", kin, in.size(), false);
  CheckFlat(out, "out", kout, in.size(), true);
  const In* src = static_cast<const In*>(in.data());
  Out* dst = static_cast<Out*>(out.mutable_data());
  const size_t n = in.size();
  py::gil_scoped_release release;
  fn(src, dst, n);
}

lowbit::Fp8Kind Fp8(int kind) {
  if (kind != 0 && kind != 1) Fail("fp8 kind must be 0 (e4m3) or 1 (e5m2)");
  return static_cast<lowbit::Fp8Kind>(kind);
}

void CheckChannels(const py::array& x, size_t outer, size_t channels, size_t inner,
                          const py::array& scales, const py::array& zps) {
  CheckFlat(x, "x", Kind::kF32, outer * channels * inner, false);
  CheckFlat(scales, "scale", Kind::kF32, channels, false);
  CheckFlat(zps, "zero_point", Kind::kI32, channels, false);
}

bool FakeQuantForward(const py::array& x, size_t outer, size_t channels, size_t inner,
                      const py::array& scales, const py::array& zps, int qmin, int qmax,
                      py::array out, py::object mask_obj) {
  CheckChannels(x, outer, channels, inner, scales, zps);
  CheckFlat(out, "out", Kind::kF32, x.size(), true);
  uint8_t* mask = nullptr;
  py::array marr;
  if (!mask_obj.is_none()) {
    marr = mask_obj.cast<py::array>();
    if (!(HasKind(marr, Kind::kU8) || marr.dtype().is(py::dtype::of<bool>())))
      throw py::type_error("mask must have dtype bool or uint8");
    if (!(marr.flags() & py::array::c_style) || !marr.writeable() || marr.size() != x.size())
      Fail("mask must be a writable C-contiguous array shaped like x");
    mask = static_cast<uint8_t*>(marr.mutable_data());
  }
  const float* px = static_cast<const float*>(x.data());
  const float* s = static_cast<const float*>(scales.data());
  const int32_t* z = static_cast<const int32_t*>(zps.data());
  float* o = static_cast<float*>(out.mutable_data());
  py::gil_scoped_release release;
  return lowbit::FakeQuantForward(px, outer, channels, inner, s, z, qmin, qmax, o, mask);
}

void FakeQuantBackward(const py::array& x, const py::array& dy, size_t outer, size_t channels,
                       size_t inner, const py::array& scales, const py::array& zps, int qmin,
                       int qmax, py::array dx, const py::object& dscale_obj, const py::object& dzp_obj) {
  CheckChannels(x, outer, channels, inner, scales, zps);
  double* dscale = nullptr;
  double* dzp = nullptr;
  py::array ds_arr, dz_arr;
  if (!dscale_obj.is_none() || !dzp_obj.is_none()) {
    if (dscale_obj.is_none() || dzp_obj.is_none()) Fail("dscale and dzero_point go together");
    ds_arr = dscale_obj.cast<py::array>();
    dz_arr = dzp_obj.cast<py::array>();
    for (const py::array* a : {&ds_arr, &dz_arr}) {
      if (!a->dtype().is(py::dtype::of<double>()) || !(a->flags() & py::array::c_style) || !a->writeable() ||
          static_cast<size_t>(a->size()) != channels)
        Fail("dscale / dzero_point must be writable float64 arrays with one element per channel");
    }
    dscale = static_cast<double*>(ds_arr.mutable_data());
    dzp = static_cast<double*>(dz_arr.mutable_data());
  }
  CheckFlat(dy, "grad", Kind::kF32, x.size(), false);
  CheckFlat(dx, "out", Kind::kF32, x.size(), true);
  const float* px = static_cast<const float*>(x.data());
  const float* pdy = static_cast<const float*>(dy.data());
  const float* s = static_cast<const float*>(scales.data());
  const int32_t* z = static_cast<const int32_t*>(zps.data());
  float* o = static_cast<float*>(dx.mutable_data());
  py::gil_scoped_release release;
  lowbit::FakeQuantBackward(px, pdy, outer, channels, inner, s, z, qmin, qmax, o, dscale, dzp);
}

// The tiled weights as Python hands them over: arrays plus their shape facts,
// all re-validated here so a hand-built or corrupted object cannot make a
// kernel read out of bounds.
lowbit::TiledWeights Tiled(int bits, size_t n, size_t k, size_t group, const py::array& data,
                           const py::array& scales, const py::object& offsets_obj,
                           const py::object& row_scales_obj = py::none(),
                           const py::object& levels_obj = py::none()) {
  if (bits != 3 && bits != 4 && bits != 8) Fail("bits must be 3, 4 or 8 for matmul, got " + std::to_string(bits));
  if (n == 0 || k == 0) Fail("weights must not be empty");
  if (group == 0 || k % group != 0) Fail("group_size must divide K");
  lowbit::TiledWeights w;
  w.bits = bits;
  w.n = n;
  w.k = k;
  const size_t step = lowbit::KStep(bits);
  w.kp = (k + step - 1) / step * step;
  w.ngroups = k / group;
  w.group = w.ngroups == 1 ? w.kp : group;
  if (w.group % step != 0)
    Fail("group_size must be a multiple of " + std::to_string(step) + " for " + std::to_string(bits) + "-bit matmul");
  w.tiles = (n + lowbit::kTileRows - 1) / lowbit::kTileRows;
  CheckFlat(data, "data", Kind::kU8, w.tiles * lowbit::TileBytes(bits, w.kp), false);
  // float32, float16 or int8-coded scales (formats.h "scale dtype");
  // finiteness is checked where they are made or loaded, not per call (a
  // non-finite scale gives non-finite outputs, never an out-of-bounds read).
  const Kind kind = HasKind(scales, Kind::kF16) ? Kind::kF16 : HasKind(scales, Kind::kI8) ? Kind::kI8 : Kind::kF32;
  CheckFlat(scales, "scales", kind, w.tiles * w.ngroups * lowbit::kTileRows, false);
  if ((kind == Kind::kI8) == row_scales_obj.is_none())
    Fail("row_scales must be given exactly when the scales are int8 codes");
  w.data = static_cast<const uint8_t*>(data.data());
  if (kind == Kind::kF16) {
    w.scales_f16 = static_cast<const uint16_t*>(scales.data());
  } else if (kind == Kind::kI8) {
    const py::array row_scales = row_scales_obj.cast<py::array>();
    CheckFlat(row_scales, "row_scales", Kind::kF32, w.tiles * lowbit::kTileRows, false);
    w.scale_codes = static_cast<const int8_t*>(scales.data());
    w.row_scales = static_cast<const float*>(row_scales.data());
  } else {
    w.scales = static_cast<const float*>(scales.data());
  }
  if (!offsets_obj.is_none()) {  // None: symmetric weights (offset 2^(bits-1))
    const py::array offsets = offsets_obj.cast<py::array>();
    CheckFlat(offsets, "offsets", Kind::kI32, w.tiles * w.ngroups * lowbit::kTileRows, false);
    w.offsets = static_cast<const int32_t*>(offsets.data());
  }
  if (!levels_obj.is_none()) {  // formats.h "level tables"
    if (bits != 4 || w.offsets != nullptr) Fail("levels need symmetric 4-bit weights");
    const py::array levels = levels_obj.cast<py::array>();
    CheckFlat(levels, "levels", Kind::kI8, 16, false);
    w.levels = static_cast<const int8_t*>(levels.data());
    for (int i = 0; i < 16; ++i)
      if (w.levels[i] < -127) Fail("levels must lie in [-127, 127]");
  }
  return w;
}

void PackTiled(const py::array& codes, int bits, bool symmetric, size_t group, const py::array& scales,
               py::object zps_obj, py::array data, py::array tscales, py::object toffs_obj) {
  if (codes.ndim() != 2) Fail("codes must be 2-D");
  const size_t n = codes.shape(0), k = codes.shape(1);
  if (!(codes.flags() & py::array::c_style) || codes.itemsize() != 1) Fail("codes must be C-contiguous int8/uint8");
  if (symmetric != toffs_obj.is_none()) Fail("tile_offsets must be None exactly when symmetric");
  const lowbit::TiledWeights w = Tiled(bits, n, k, group, data, tscales, toffs_obj);
  CheckFlat(data, "data", Kind::kU8, data.size(), true);
  CheckFlat(tscales, "scales", Kind::kF32, tscales.size(), true);
  int32_t* to = nullptr;
  py::array toffs;
  if (!symmetric) {
    toffs = toffs_obj.cast<py::array>();
    CheckFlat(toffs, "offsets", Kind::kI32, toffs.size(), true);
    to = static_cast<int32_t*>(toffs.mutable_data());
  }
  CheckFlat(scales, "scales", Kind::kF32, n * w.ngroups, false);
  const uint8_t* zps = nullptr;
  py::array zarr;
  if (!symmetric) {
    if (zps_obj.is_none()) Fail("zero_point is required for asymmetric weights");
    zarr = zps_obj.cast<py::array>();
    CheckFlat(zarr, "zero_point", Kind::kU8, n * w.ngroups, false);
    zps = static_cast<const uint8_t*>(zarr.data());
  }
  uint8_t* d = static_cast<uint8_t*>(data.mutable_data());
  std::memset(d, 0, data.size());
  const uint8_t* c = static_cast<const uint8_t*>(codes.data());
  const float* s = static_cast<const float*>(scales.data());
  float* ts = static_cast<float*>(tscales.mutable_data());
  py::gil_scoped_release release;
  lowbit::PackTiled(c, n, k, bits, symmetric, group, s, zps, d, ts, to);
}

void CheckOut(const py::array& out, size_t m, size_t n) {
  CheckKind(out, "out", Kind::kF32);
  if (out.ndim() != 2 || static_cast<size_t>(out.shape(0)) != m || static_cast<size_t>(out.shape(1)) != n)
    Fail("out must have shape (" + std::to_string(m) + ", " + std::to_string(n) + ")");
  if (!out.writeable() || !(out.flags() & py::array::c_style)) Fail("out must be writable and C-contiguous");
}

void DequantizeTiled(int bits, size_t n, size_t k, size_t group, const py::array& data, const py::array& scales,
                     const py::object& offsets, py::array out, const py::object& row_scales,
                     const py::object& levels) {
  const lowbit::TiledWeights w = Tiled(bits, n, k, group, data, scales, offsets, row_scales, levels);
  CheckOut(out, n, k);
  float* o = static_cast<float*>(out.mutable_data());
  py::gil_scoped_release release;
  lowbit::DequantizeTiled(w, o, k);
}

// Bias padded to whole tiles (the kernels add it in their final store).
std::vector<float> PaddedBias(const py::object& bias_obj, const lowbit::TiledWeights& w) {
  std::vector<float> padded;
  if (bias_obj.is_none()) return padded;
  const py::array bias = bias_obj.cast<py::array>();
  CheckFlat(bias, "bias", Kind::kF32, w.n, false);
  padded.assign(w.tiles * lowbit::kTileRows, 0.0f);
  std::memcpy(padded.data(), bias.data(), w.n * sizeof(float));
  return padded;
}

// A validated matmul call: tiled weights (with the padded bias attached), x and out.
struct MatmulCall {
  lowbit::TiledWeights w;
  std::vector<float> bias;  // owns what w.bias points to
  size_t m = 0, x_stride = 0;
  const float* x = nullptr;
  float* out = nullptr;
};

// x must have K columns, or Kp (K padded to the k-step) when padded_x.
void PrepareMatmul(MatmulCall& c, const py::array& x, bool padded_x, int bits, size_t n, size_t k, size_t group,
                   const py::array& data, const py::array& scales, const py::object& offsets, py::array& out,
                   const py::object& bias, const py::object& row_scales, const py::object& levels) {
  c.w = Tiled(bits, n, k, group, data, scales, offsets, row_scales, levels);
  c.bias = PaddedBias(bias, c.w);
  if (!c.bias.empty()) c.w.bias = c.bias.data();
  c.x_stride = CheckRows(x, "x", Kind::kF32, false);
  c.m = x.shape(0);
  const size_t cols = padded_x ? c.w.kp : k;
  if (static_cast<size_t>(x.shape(1)) != cols)
    Fail("x must have " + std::to_string(cols) + (padded_x ? " columns (K zero-padded to the k-step)" : " columns"));
  CheckOut(out, c.m, n);
  c.x = static_cast<const float*>(x.data());
  c.out = static_cast<float*>(out.mutable_data());
}

bool MatmulQuantAct(const py::array& x, int bits, size_t n, size_t k, size_t group, const py::array& data,
                    const py::array& scales, const py::object& offsets, py::array out,
                    const py::object& bias, float act_scale, const py::object& row_scales,
                    const py::object& levels) {
  if (!(act_scale >= 0.0f) || act_scale > 3.0e38f) Fail("act_scale must be finite and >= 0 (0: dynamic)");
  MatmulCall c;
  PrepareMatmul(c, x, false, bits, n, k, group, data, scales, offsets, out, bias, row_scales, levels);
  std::vector<int8_t> xq(c.m * c.w.kp);
  std::vector<float> xs(c.m);
  std::vector<int32_t> xsum(c.m * c.w.ngroups);
  py::gil_scoped_release release;
  if (!lowbit::QuantizeActivations(c.x, c.m, k, c.x_stride, c.w.kp, c.w.group, act_scale, xq.data(), xs.data(),
                                   xsum.data()))
    return false;
  lowbit::MatmulQuantAct(xq.data(), xs.data(), xsum.data(), c.m, c.w, c.out, n);
  return true;
}

void MatmulFloatAct(const py::array& x, int bits, size_t n, size_t k, size_t group, const py::array& data,
                    const py::array& scales, const py::object& offsets, py::array out,
                    const py::object& bias, const py::object& row_scales, const py::object& levels) {
  MatmulCall c;
  PrepareMatmul(c, x, true, bits, n, k, group, data, scales, offsets, out, bias, row_scales, levels);
  py::gil_scoped_release release;
  lowbit::MatmulFloatAct(c.x, c.m, c.x_stride, c.w, c.out, n);
}

py::dict CpuFeatures() {
  py::dict d;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  d["avx2"] = static_cast<bool>(__builtin_cpu_supports("avx2"));
  d["avx512f"] = static_cast<bool>(__builtin_cpu_supports("avx512f"));
  d["avx512vnni"] = static_cast<bool>(__builtin_cpu_supports("avx512vnni"));
  d["avx512bf16"] = static_cast<bool>(__builtin_cpu_supports("avx512bf16"));
#endif
  return d;
}

// Runs fn(data, bytes) on a C-contiguous array's memory with the GIL released
// (residency calls: they may wait on disk reads).
template <class Fn>
auto OnMappedRange(const py::array& a, const char* what, const Fn& fn) {
  if (!(a.flags() & py::array::c_style)) Fail(std::string(what) + ": array must be C-contiguous");
  const void* p = a.data();
  const size_t n = static_cast<size_t>(a.nbytes());
  py::gil_scoped_release release;
  return fn(p, n);
}

// ---- native decoder (decoder.h) ----
// The decoder keeps raw pointers into the weight arrays: it holds a reference
// to every array it was given, so they outlive it whatever Python does with the
// model; a mutex serialises calls from several Python threads.
struct PyDecoder {
  explicit PyDecoder(lowbit::DecoderConfig c) : d(std::move(c)) {}
  lowbit::Decoder d;
  std::vector<py::object> keep_alive;
  std::mutex mu;
};

std::vector<float> FloatVector(const py::object& obj, const char* name, size_t n) {
  const py::array a = obj.cast<py::array>();
  CheckFlat(a, name, Kind::kF32, n, false);
  const float* p = static_cast<const float*>(a.data());
  return std::vector<float>(p, p + n);
}

// One projection from a dict with the QuantLinear's arrays and format facts.
lowbit::DecoderProjection Projection(PyDecoder& self, const py::dict& spec) {
  auto get = [&](const char* key) -> py::object {
    if (!spec.contains(key)) Fail(std::string("projection spec lacks '") + key + "'");
    return spec[key];
  };
  const py::array data = get("data").cast<py::array>(), scales = get("scales").cast<py::array>();
  const py::object offsets = get("offsets"), row_scales = get("row_scales"), bias = get("bias");
  const py::object input_scale = get("input_scale");
  const py::object levels = spec.contains("levels") ? py::object(spec["levels"]) : py::none();
  lowbit::DecoderProjection p;
  p.w = Tiled(get("bits").cast<int>(), get("n").cast<size_t>(), get("k").cast<size_t>(),
              get("group").cast<size_t>(), data, scales, offsets, row_scales, levels);
  p.bias = PaddedBias(bias, p.w);
  if (!input_scale.is_none()) p.input_scale = FloatVector(input_scale, "input_scale", p.w.k);
  p.act_bits = get("act_bits").cast<int>();
  p.act_scale = get("act_scale").cast<float>();
  if (!(p.act_scale >= 0.0f) || p.act_scale > 3.0e38f) Fail("act_scale must be finite and >= 0 (0: dynamic)");
  p.col = get("col").cast<size_t>();
  for (const py::object& o : {py::object(data), py::object(scales), offsets, row_scales, levels})
    if (!o.is_none()) self.keep_alive.push_back(o);
  return p;
}

lowbit::DecoderConfig MakeDecoderConfig(size_t hidden, size_t heads, size_t kv_heads, size_t head_dim,
                                        size_t intermediate, float eps, float attn_scale, float rope_scale,
                                        const py::array& inv_freq) {
  lowbit::DecoderConfig c;
  c.hidden = hidden;
  c.heads = heads;
  c.kv_heads = kv_heads;
  c.head_dim = head_dim;
  c.intermediate = intermediate;
  c.eps = eps;
  c.attn_scale = attn_scale;
  c.rope_scale = rope_scale;
  c.inv_freq = FloatVector(inv_freq, "inv_freq", head_dim / 2);
  return c;
}

void BindDecoder(py::module_& m) {
  py::class_<PyDecoder>(m, "Decoder", "Native Llama-family decoder (use lowbit.llm.NativeDecoder).")
      .def(py::init([](size_t hidden, size_t heads, size_t kv_heads, size_t head_dim, size_t intermediate,
                       float eps, float attn_scale, float rope_scale, const py::array& inv_freq) {
             return new PyDecoder(MakeDecoderConfig(hidden, heads, kv_heads, head_dim, intermediate, eps,
                                                    attn_scale, rope_scale, inv_freq));
           }),
           py::arg("hidden"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("intermediate"),
           py::arg("eps"), py::arg("attn_scale"), py::arg("rope_scale"), py::arg("inv_freq"))
      .def("add_layer", [](PyDecoder& self, const py::array& attn_norm, const py::array& mlp_norm,
                           const py::list& qkv, const py::list& o, const py::list& gate_up, const py::list& down) {
             const size_t hid = self.d.Config().hidden;
             lowbit::DecoderLayer layer;
             layer.attn_norm = FloatVector(attn_norm, "attn_norm", hid);
             layer.mlp_norm = FloatVector(mlp_norm, "mlp_norm", hid);
             const py::list* slots[lowbit::kSlots] = {&qkv, &o, &gate_up, &down};
             for (int s = 0; s < lowbit::kSlots; ++s)
               for (const py::handle h : *slots[s]) layer.proj[s].push_back(Projection(self, h.cast<py::dict>()));
             std::lock_guard<std::mutex> lock(self.mu);
             self.d.AddLayer(std::move(layer));
           })
      .def("set_final", [](PyDecoder& self, const py::array& norm, const py::object& head) {
             std::vector<float> n = FloatVector(norm, "norm", self.d.Config().hidden);
             std::lock_guard<std::mutex> lock(self.mu);
             if (head.is_none()) {
               self.d.SetFinal(std::move(n), nullptr);
             } else {
               const lowbit::DecoderProjection p = Projection(self, head.cast<py::dict>());
               self.d.SetFinal(std::move(n), &p);
             }
           })
      .def("forward", [](PyDecoder& self, const py::array& x, size_t keep, bool logits) {
             const size_t hid = self.d.Config().hidden;
             CheckKind(x, "x", Kind::kF32);
             if (x.ndim() != 2 || static_cast<size_t>(x.shape(1)) != hid || !(x.flags() & py::array::c_style))
               Fail("x must be a C-contiguous float32 array [tokens, " + std::to_string(hid) + "]");
             const size_t m = x.shape(0);
             if (m == 0) Fail("x must hold at least one token");
             if (keep > m) Fail("keep must be <= the number of tokens");
             if (logits && self.d.Vocab() == 0) Fail("this decoder has no quantized head: ask for hidden states");
             py::array_t<float> hidden({keep, hid});
             py::object out = py::none();
             float* lp = nullptr;
             if (logits) {
               py::array_t<float> l({keep, self.d.Vocab()});
               lp = l.mutable_data();
               out = l;
             }
             const float* px = static_cast<const float*>(x.data());
             float* hp = hidden.mutable_data();
             bool ok;
             {
               py::gil_scoped_release release;
               std::lock_guard<std::mutex> lock(self.mu);
               ok = self.d.Forward(px, m, keep, hp, lp);
             }
             if (!ok) Fail("a NaN reached an int8 activation quantizer: the model's activations are not finite");
             return py::make_tuple(hidden, out);
           },
           py::arg("x"), py::arg("keep"), py::arg("logits"))
      .def("truncate", [](PyDecoder& self, size_t pos) {
             std::lock_guard<std::mutex> lock(self.mu);
             self.d.Truncate(pos);
           })
      .def_property_readonly("position", [](PyDecoder& self) { return self.d.Position(); })
      .def_property_readonly("layers", [](PyDecoder& self) { return self.d.Layers(); })
      .def_property_readonly("vocab", [](PyDecoder& self) { return self.d.Vocab(); })
      .def_property_readonly("cache_capacity", [](PyDecoder& self) { return self.d.CacheCapacity(); });
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lowbit native kernels (Highway). Use the lowbit package, not this module.";
  // Kernel argument errors arrive as std::invalid_argument: make them ValueError.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const std::invalid_argument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });

  m.def("quantize_rows", &QuantizeRows, py::arg("x"), py::arg("dtype"), py::arg("bits"),
        py::arg("group"), py::arg("symmetric"), py::arg("per_tensor"), py::arg("given"),
        py::arg("scales").noconvert(), py::arg("zero_points").none(true), py::arg("packed").noconvert(),
        "Quantize rows of x into packed codes; returns False if x held NaN.");
  m.def("dequantize_tiled", &DequantizeTiled, py::arg("bits"), py::arg("n"), py::arg("k"), py::arg("group"),
        py::arg("data"), py::arg("scales"), py::arg("offsets").none(true), py::arg("out").noconvert(),
        py::arg("row_scales").none(true) = py::none(), py::arg("levels").none(true) = py::none(),
        "Float32 values [N, K] of tiled weights (the inverse of pack_tiled, scales applied).");
  m.def("gptq_columns", &GptqColumns, py::arg("wt"), py::arg("hinv"), py::arg("c0"), py::arg("c1"),
        py::arg("scales"), py::arg("zps").none(true), py::arg("groups"), py::arg("qmin"), py::arg("qmax"),
        py::arg("codes").noconvert(), py::arg("err").noconvert(), py::arg("levels").none(true) = py::none(),
        "GPTQ's column loop on one block (columns c0..c1): codes, scaled errors, later columns updated.");
  m.def("search_scales", &SearchScales, py::arg("x"), py::arg("bits"), py::arg("group"), py::arg("symmetric"),
        py::arg("steps"), py::arg("importance").none(true) = py::none(), "(scales, zero points or None): error-minimising group scales (scale_search.cc).");
  m.def("search_level_scales", &SearchLevelScales, py::arg("x"), py::arg("levels"), py::arg("group"),
        py::arg("steps"), py::arg("importance").none(true) = py::none(),
        "Error-minimising group scales for int4 codes on a level table (scale_search.cc).");
  m.def("level_codes", &LevelCodes, py::arg("x"), py::arg("levels"), py::arg("group"), py::arg("scales"),
        "uint8 codes [rows, K]: the index of the level nearest to x / scale (ties to the lower one).");
  m.def("dequantize_rows", &DequantizeRows, py::arg("packed"), py::arg("k"), py::arg("bits"),
        py::arg("group"), py::arg("symmetric"), py::arg("per_tensor"), py::arg("scales"),
        py::arg("zero_points").none(true), py::arg("out").noconvert(), py::arg("dtype"));
  m.def("unpack_codes", &UnpackCodes, py::arg("packed"), py::arg("k"), py::arg("bits"),
        py::arg("symmetric"), py::arg("codes").noconvert());
  m.def("range_stats", &RangeStats, py::arg("x"), py::arg("dtype"),
        "(lo, hi): finite min/max folded with 0 (NaN counts as 0).");
  m.def("choose_scale", [](float lo, float hi, int bits, bool symmetric) {
    float s;
    int32_t z;
    lowbit::ChooseScale(lo, hi, bits, symmetric, &s, &z);
    return py::make_tuple(s, z);
  });

  m.def("f32_to_f16", [](const py::array& x, py::array out) {
    Convert<float, uint16_t>(x, Kind::kF32, out, Kind::kF16, lowbit::F32ToF16);
  }, py::arg("x"), py::arg("out").noconvert());
  m.def("f16_to_f32", [](const py::array& x, py::array out) {
    Convert<uint16_t, float>(x, Kind::kF16, out, Kind::kF32, lowbit::F16ToF32);
  }, py::arg("x"), py::arg("out").noconvert());
  m.def("f32_to_bf16", [](const py::array& x, py::array out) {
    Convert<float, uint16_t>(x, Kind::kF32, out, Kind::kU16, lowbit::F32ToBF16);
  }, py::arg("x"), py::arg("out").noconvert());
  m.def("bf16_to_f32", [](const py::array& x, py::array out) {
    Convert<uint16_t, float>(x, Kind::kU16, out, Kind::kF32, lowbit::BF16ToF32);
  }, py::arg("x"), py::arg("out").noconvert());
  m.def("f32_to_fp8", [](const py::array& x, py::array out, int kind, bool saturate) {
    const lowbit::Fp8Kind k = Fp8(kind);
    Convert<float, uint8_t>(x, Kind::kF32, out, Kind::kU8, [&](const float* i, uint8_t* o, size_t n) {
      lowbit::F32ToFp8(i, o, n, k, saturate);
    });
  }, py::arg("x"), py::arg("out").noconvert(), py::arg("kind"), py::arg("saturate"));
  m.def("fp8_to_f32", [](const py::array& x, py::array out, int kind) {
    const lowbit::Fp8Kind k = Fp8(kind);
    Convert<uint8_t, float>(x, Kind::kU8, out, Kind::kF32, [&](const uint8_t* i, float* o, size_t n) {
      lowbit::Fp8ToF32(i, o, n, k);
    });
  }, py::arg("x"), py::arg("out").noconvert(), py::arg("kind"));

  m.def("fake_quant_forward", &FakeQuantForward, py::arg("x"), py::arg("outer"),
        py::arg("channels"), py::arg("inner"), py::arg("scale"), py::arg("zero_point"),
        py::arg("quant_min"), py::arg("quant_max"), py::arg("out").noconvert(),
        py::arg("mask").none(true));
  m.def("fake_quant_backward", &FakeQuantBackward, py::arg("x"), py::arg("grad"),
        py::arg("outer"), py::arg("channels"), py::arg("inner"), py::arg("scale"),
        py::arg("zero_point"), py::arg("quant_min"), py::arg("quant_max"),
        py::arg("out").noconvert(), py::arg("dscale").none(true) = py::none(),
        py::arg("dzero_point").none(true) = py::none());

  m.def("pack_tiled", &PackTiled, py::arg("codes"), py::arg("bits"), py::arg("symmetric"),
        py::arg("group"), py::arg("scales"), py::arg("zero_points").none(true),
        py::arg("data").noconvert(), py::arg("tile_scales").noconvert(), py::arg("tile_offsets").none(true));
  m.def("matmul_quant_act", &MatmulQuantAct, py::arg("x"), py::arg("bits"), py::arg("n"), py::arg("k"),
        py::arg("group"), py::arg("data"), py::arg("scales"), py::arg("offsets").none(true), py::arg("out").noconvert(),
        py::arg("bias").none(true) = py::none(), py::arg("act_scale") = 0.0f,
        py::arg("row_scales").none(true) = py::none(), py::arg("levels").none(true) = py::none(),
        "int8 activations (per token, or one static act_scale) x tiled weights; returns False if x held NaN.");
  m.def("matmul_float_act", &MatmulFloatAct, py::arg("x"), py::arg("bits"), py::arg("n"), py::arg("k"),
        py::arg("group"), py::arg("data"), py::arg("scales"), py::arg("offsets").none(true), py::arg("out").noconvert(),
        py::arg("bias").none(true) = py::none(), py::arg("row_scales").none(true) = py::none(),
        py::arg("levels").none(true) = py::none());
  // Residency of memory-mapped weights (stream.py calls these on its own file
  // mappings only: DONTNEED on anonymous memory would zero it).
  m.def("prefetch_pages", [](const py::array& a) { return OnMappedRange(a, "prefetch_pages", lowbit::PrefetchPages); },
        py::arg("mapped"));
  m.def("advise_willneed", [](const py::array& a) {
    OnMappedRange(a, "advise_willneed", [](const void* p, size_t n) { lowbit::AdviseWillNeed(p, n); return 0; });
  }, py::arg("mapped"));
  m.def("release_pages", [](const py::array& a) { return OnMappedRange(a, "release_pages", lowbit::ReleasePages); },
        py::arg("mapped"));
  m.def("vnni_active", &lowbit::VnniActive);
  m.def("set_vnni_enabled", &lowbit::SetVnniEnabled, "Test hook: disable (or re-enable) the VNNI path.");
  m.def("shuffle_gemv_enabled", &lowbit::ShuffleGemvEnabled);
  m.def("set_shuffle_gemv_enabled", &lowbit::SetShuffleGemvEnabled,
        "Test hook: disable (or re-enable) the byte-shuffle weight-only GEMV below AVX-512.");
  m.def("bf16_gemv_active", &lowbit::Bf16GemvActive);
  m.def("set_bf16_gemv_enabled", &lowbit::SetBf16GemvEnabled,
        "Test hook: disable (or re-enable) the bfloat16-dot weight-only GEMV (AVX512_BF16).");
  m.def("set_num_threads", [](int n) {
    if (n < 1) Fail("num_threads must be >= 1, got " + std::to_string(n));
    lowbit::SetNumThreads(n);
  });
  m.def("get_num_threads", &lowbit::NumThreads);
  m.def("compiled_targets", &lowbit::CompiledTargets);
  m.def("dispatched_target", &lowbit::DispatchedTarget);
  m.def("cpu_targets", &lowbit::CpuTargets, "Bit mask of the Highway targets this CPU can execute.");
  m.def("restrict_targets", &lowbit::RestrictTargets,
        "Test hook: limit dispatch to the targets in mask (0 removes the limit).");
  m.def("cpu_features", &CpuFeatures);
  BindDecoder(m);
}
