// Plain C++ entry points of the Highway kernels. Callers (bindings.cc) have
// validated shapes and pointers; the kernels still throw std::invalid_argument
// on inconsistent arguments rather than aborting, and never read or write out
// of the ranges described here.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "lowbit/formats.h"

namespace lowbit {

// Describes one quantization: see formats.h for the meaning of every field.
struct QuantSpec {
  int bits = 8;            // 2, 4 or 8
  bool symmetric = true;
  size_t group = 0;        // elements per group along K (divides K)
  bool per_tensor = false; // one scale/zp for everything (group ignored)
};

// Finite min/max of rows x[r * row_stride + k], k < K, including 0 (formats.h);
// NaN counts as 0 (QuantizeRows reports NaN).
void RangeStats(const void* x, DType dtype, size_t rows, size_t k, size_t row_stride,
                float* lo, float* hi);

// Quantizes rows x [rows, K] (row_stride elements apart) into packed codes
// [rows, packed_stride] bytes. When scales_given, scales/zps are read,
// otherwise they are computed and written. Scale index: per_tensor ? 0 :
// r * (K / group) + k / group. zps may be null for symmetric specs.
// Returns false (after writing everything) if x held a NaN.
bool QuantizeRows(const void* x, DType dtype, size_t rows, size_t k, size_t row_stride,
                  const QuantSpec& spec, bool scales_given, float* scales, uint8_t* zps,
                  uint8_t* packed, size_t packed_stride);

// Error-minimising scales (scale_search.cc) for groups of `group` (divides K) of
// float32 rows x [rows, K]: writes scales [rows, K / group] and, asymmetric, zero
// points; QuantizeRows with scales_given then makes the codes. importance:
// optional per-column weights [K] (finite, >= 0) of the squared error.
void SearchScales(const float* x, size_t rows, size_t k, size_t row_stride, size_t group, int bits, bool symmetric,
                  int steps, float* scales, uint8_t* zps, const float* importance = nullptr);

// The same search for int4 codes on a level table (formats.h "level tables";
// levels: 16 increasing int8 values): scales [rows, K / group] of float32 rows
// x [rows, K] (contiguous); code u of element x is then LevelCodes'.
void SearchLevelScales(const float* x, size_t rows, size_t k, size_t group, const int8_t* levels, int steps,
                       float* scales, const float* importance = nullptr);
// Level-table codes u in [0, 15] [rows, K] of x under scales [rows, K / group]:
// the nearest level to x / scale, ties to the lower one.
void LevelCodes(const float* x, size_t rows, size_t k, size_t group, const int8_t* levels, const float* scales,
                uint8_t* codes);

// GPTQ's column loop for columns [c0, c1) of one block of B columns (gptq.cc
// documents the arrays and the arithmetic): quantizes each column with its
// group's scale, writes codes and scaled errors, and updates the later columns.
void GptqColumns(double* wt, size_t rows, size_t b, const double* hinv, size_t c0, size_t c1, const float* scales,
                 const float* zps, const int32_t* groups, int qmin, int qmax, const int8_t* levels, int32_t* codes,
                 double* err);

// Inverse of QuantizeRows: out [rows, K] (out_stride elements apart) in dtype.
void DequantizeRows(const uint8_t* packed, size_t packed_stride, size_t rows, size_t k,
                    const QuantSpec& spec, const float* scales, const uint8_t* zps, void* out,
                    DType out_dtype, size_t out_stride);

// Unpacks codes to int8 (symmetric) or uint8 (asymmetric) bytes, [rows, K].
void UnpackCodes(const uint8_t* packed, size_t packed_stride, size_t rows, size_t k, int bits,
                 bool symmetric, uint8_t* codes);

// Float conversions (formats.h); n elements, contiguous.
void F32ToF16(const float* in, uint16_t* out, size_t n);
void F16ToF32(const uint16_t* in, float* out, size_t n);
void F32ToBF16(const float* in, uint16_t* out, size_t n);
void BF16ToF32(const uint16_t* in, float* out, size_t n);
void F32ToFp8(const float* in, uint8_t* out, size_t n, Fp8Kind kind, bool saturate);
void Fp8ToF32(const uint8_t* in, float* out, size_t n, Fp8Kind kind);

// Fake quantization of x viewed as [outer, channels, inner], with one scale and
// zero point per channel (channels = 1: per tensor; inner = G: per group):
//   r = nearbyint(x * (1.0f / scale)), out = (clamp(r + zp, qmin, qmax) - zp) * scale,
//   mask = qmin <= r + zp <= qmax  (the straight-through-estimator mask).
// mask may be null. Returns false if x held a NaN.
bool FakeQuantForward(const float* x, size_t outer, size_t channels, size_t inner,
                      const float* scales, const int32_t* zps, int qmin, int qmax, float* out,
                      uint8_t* mask);
// dx = mask(x) ? dy : 0 with the mask above. When dscale/dzp are non-null they
// receive the LSQ sums per channel (float64 [channels], the caller scales them):
//   dscale += dy * (in range ? (out - x) / scale : below ? qmin - zp : qmax - zp)
//   dzp    += dy * (in range ? 0 : -scale)
void FakeQuantBackward(const float* x, const float* dy, size_t outer, size_t channels,
                       size_t inner, const float* scales, const int32_t* zps, int qmin, int qmax,
                       float* dx, double* dscale = nullptr, double* dzp = nullptr);

// ---- matmul (formats.h "Matmul weight layout") ----
struct TiledWeights {
  int bits = 8;            // 3, 4 or 8
  size_t n = 0, k = 0;     // logical shape [N, K]
  size_t kp = 0;           // K padded to the k-step
  size_t group = 0;        // elements per group along K (== kp when one group per row)
  size_t ngroups = 0, tiles = 0;
  const uint8_t* data = nullptr;    // tiles * TileBytes(bits, kp) bytes
  const float* scales = nullptr;    // [tiles, ngroups, 16] float32, or null when scales_f16 is set
  const uint16_t* scales_f16 = nullptr;  // the same as IEEE float16 bits (formats.h "scale dtype")
  const int8_t* scale_codes = nullptr;   // or as int8 codes c: scale = c * row_scales[row]
  const float* row_scales = nullptr;     // [tiles * 16] with scale_codes
  const int32_t* offsets = nullptr; // [tiles, ngroups, 16]; null: all 2^(bits-1) (symmetric)
  // Level table (formats.h "level tables"), symmetric int4 only: code u stands
  // for levels[u] (16 signed values) instead of u - 8; null: the uniform grid.
  const int8_t* levels = nullptr;
  const float* bias = nullptr;      // [tiles * 16] (zero padded) added to every output row, or null
};

// Builds the tiled layout from unpacked codes [N, K] (int8 when symmetric,
// uint8 otherwise), scales [N, ngroups] and zero points [N, ngroups] (asymmetric;
// tile_offsets is null for symmetric weights).
void PackTiled(const uint8_t* codes, size_t n, size_t k, int bits, bool symmetric, size_t group,
               const float* scales, const uint8_t* zps, uint8_t* data, float* tile_scales,
               int32_t* tile_offsets);

// The float32 values [N, K] (row stride out_stride) of tiled weights: the
// inverse of PackTiled with the scales and offsets applied.
void DequantizeTiled(const TiledWeights& w, float* out, size_t out_stride);

// Per-row symmetric int8 activations (formats.h): xq [M, kp] (zero padded),
// xscale [M], xsum [M, ngroups] with groups of `group` along kp.
// fixed_scale > 0: every row uses it (static, calibrated activation scale;
// values beyond +-127 * fixed_scale saturate); 0: per row amax / 127 (dynamic).
// Returns false if x held a NaN.
bool QuantizeActivations(const float* x, size_t m, size_t k, size_t x_stride, size_t kp,
                         size_t group, float fixed_scale, int8_t* xq, float* xscale, int32_t* xsum);

// out [M, N] (out_stride apart) = dequant(xq) @ dequant(W)^T with integer dot
// products (VNNI vpdpbusd when active, else int16 multiply-add).
void MatmulQuantAct(const int8_t* xq, const float* xscale, const int32_t* xsum, size_t m,
                    const TiledWeights& w, float* out, size_t out_stride);

// out [M, N] = x @ dequant(W)^T with float activations x [M, kp] (x_stride apart;
// columns K..kp must be zero).
void MatmulFloatAct(const float* x, size_t m, size_t x_stride, const TiledWeights& w, float* out,
                    size_t out_stride);

// Whether the AVX-512 VNNI path runs (CPU has it and it is not disabled), and
// the test hook that disables it so the portable path is checked on AVX-512 too.
bool VnniActive();
void SetVnniEnabled(bool enabled);
// The byte-shuffle weight-only GEMV of targets below AVX-512 (on by default).
bool ShuffleGemvEnabled();
void SetShuffleGemvEnabled(bool enabled);
// The bfloat16-dot weight-only GEMV of AVX-512 CPUs with AVX512_BF16
// (gemv_bf16-inl.h): whether it runs, and the test hook that turns it off.
bool Bf16GemvActive();
void SetBf16GemvEnabled(bool enabled);

// Highway targets compiled into this module (bit masks and names), the one
// dispatch picks now, and a test hook restricting dispatch (0 = no limit).
std::vector<std::pair<int64_t, std::string>> CompiledTargets();
int64_t DispatchedTarget();
void RestrictTargets(int64_t mask);
// Targets this CPU can execute (ignores any RestrictTargets mock).
int64_t CpuTargets();

}  // namespace lowbit
