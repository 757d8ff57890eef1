// lowbit storage formats: the one canonical byte layout of every quantized
// array, independent of SIMD width and identical on every Highway target.
// python/lowbit/reference.py mirrors this file; the on-disk format (issue 6/6)
// is this layout plus a header.
//
// ---------------------------------------------------------------------------
// Logical view
//   A quantized array has a float shape [..., K]. It is treated as R = prod(...)
//   rows of K elements ("rows" are output channels for a weight [N, K]).
//   Elements are split into groups of G consecutive elements along K:
//     per row    : G = K        -> R scales
//     per group  : G divides K  -> R * (K / G) scales, row-major [R, K / G]
//     per tensor : one scale for the whole array
//
// Codes
//   symmetric  (b bits): signed code q in [-2^(b-1), 2^(b-1) - 1];
//                        value = q * scale
//   asymmetric (b bits): unsigned code q in [0, 2^b - 1] with an integer zero
//                        point zp in [0, 2^b - 1] per group;
//                        value = (q - zp) * scale
//   (this is the integer-zero-point form of torch.ao / torch.fake_quantize_*,
//    not the float-zero form of torch's int4 GEMM kernels.)
//
// Packed codes: uint8 array [R, row_bytes], row_bytes = ceil(K * b / 8).
//   Each row starts on a byte boundary; unused high bits of a row's last byte
//   are zero. A code is stored as its low b bits (two's complement for
//   symmetric codes, plain binary for asymmetric ones).
//   b = 8: byte k is element k.
//   b = 4: byte j holds element 2j in bits 0..3 and element 2j+1 in bits 4..7.
//          (low nibble = even index; same order as the float data, no
//           interleave.)
//   b = 2: byte j holds elements 4j, 4j+1, 4j+2, 4j+3 in bits 0..1, 2..3,
//          4..5, 6..7.
//   Example, b = 4, symmetric, codes [-8, 7, 1]: bytes [0x78, 0x01].
//
// Scales: float32, little endian, [R, K / G] (or [1] per tensor).
//   Zero points (asymmetric only): uint8, same shape as the scales.
//   bits_per_weight = b + 32 / G (+ 8 / G with zero points).
//
// ---------------------------------------------------------------------------
// Scale rules (computed when the caller gives no scales)
//   Statistics ignore +-inf (they saturate to the end codes) and include 0:
//     lo = min(0, min finite x), hi = max(0, max finite x).
//   symmetric: m = (-lo >= hi) ? lo : hi   (the signed value of largest
//              magnitude; a tie prefers the negative one), then
//              scale = m / -(2^(b-1)). m maps to code -2^(b-1), so all 2^b levels
//              are used (llama.cpp Q4_0 style). The scale is negative when the
//              largest-magnitude value is positive.
//   asymmetric: scale = float((double(hi) - double(lo)) / (2^b - 1)),
//              zp = clamp(-nearbyint(lo * (1.0f / scale)), 0, 2^b - 1).
//   Degenerate groups: |scale| < FLT_MIN (all zeros, or only values too tiny to
//   represent) store scale 0 (and zp 0); every code is 0 and dequantizes to 0.
//
// Quantization of one element (float32 math, same on every target):
//   inv = 1.0f / scale                      (reciprocal, as torch does)
//   v   = clamp(x * inv, qmin - zp, qmax - zp)
//   q   = nearbyint(v) + zp                 (round half to even)
//   Clamping before rounding equals clamping after (the bounds are integers)
//   and keeps +-inf from overflowing the integer conversion.
//   NaN input is an error (the kernels report it, Python raises ValueError).
//
// ---------------------------------------------------------------------------
// Float formats (conversions in convert.cc; all round to nearest even)
//   float16  IEEE binary16: overflow -> inf, NaN -> quiet NaN 0x7E00|sign.
//   bfloat16 top 16 bits of float32, rounded: overflow -> inf,
//            NaN -> 0x7FC0|sign.
//   fp8 e4m3 ("e4m3fn"): bias 7, no inf, NaN = 0x7F|sign, max 448.
//   fp8 e5m2: bias 15, IEEE-like with inf 0x7C and NaN 0x7E, max 57344.
//   fp8 conversions saturate by default: finite overflow and +-inf give +-max
//   (OCP "satfinite"); without saturation e4m3 overflow gives NaN and e5m2
//   overflow gives inf.
// ---------------------------------------------------------------------------
// Matmul weight layout ("tiled", version 1): what lowbit.pack_weights builds,
// what the matmul kernels stream and what storage writes (issue 6/6).
//   Weights W [N, K], b in {3, 4, 8} bits (int3: see "int3 tiles" below),
//   groups of G along K (G = K per row).
//   Stored codes are unsigned: u = q + 2^(b-1) for symmetric codes, u = q for
//   asymmetric ones; the true integer is u - off with off = 2^(b-1) or zp.
//   kt = 4 (int8) or 8 (int4) consecutive k form one k-step; K is padded with
//   u = off (true 0) to Kp = a multiple of kt (and G must be a multiple of kt
//   unless there is one group per row).
//   N is split into tiles of 16 rows (the last tile padded with u = off, scale
//   0). Tile t is Kp / kt blocks of 64 bytes, k-steps in order; in block kb,
//   bytes 4i..4i+3 belong to row n = 16t + i (i = 0..15):
//     int8: byte 4i + j = u[n, 4kb + j]                            (j = 0..3)
//     int4: byte 4i + j = u[n, 8kb + j] | u[n, 8kb + 4 + j] << 4    (j = 0..3)
//   so each 32-bit lane is one row and a 64-byte block is one AVX-512 vector
//   (two AVX2 or four SSE vectors), the operand order of vpdpbusd (unsigned
//   weights x signed activations, 4 products summed per lane).
//   Scales: float32 [Nt, ngroups, 16]; offsets off: int32 [Nt, ngroups, 16],
//   stored for asymmetric weights only (symmetric: off = 2^(b-1) everywhere).
//   Scale dtype: the scales may instead be stored narrower, same shape and
//   order [Nt, ngroups, 16]. The layout version stays 1: the dtype of the scales
//   array says which (a lowbit file records it per layer).
//     float16: IEEE binary16, little endian, finite. 16 / G bits per weight
//       instead of 32 / G: int4 groups of 32 take 4.5 b/w, llama.cpp Q4_0's size.
//     int8: signed codes c in [-127, 127] plus row scales d: float32 [Nt * 16]
//       (row n = 16 t + i at index n, padding rows 0); scale = c * d. d is the
//       row's largest |scale| / 127 rounded to 11 significant bits, so every
//       c * d is exact in float32 and the kernels compute with exactly the
//       values float32 tiles of c * d would hold. 8 / G + 32 / K bits per
//       weight: int4 groups of 16 take 4.5 + 32 / K (4.56 at K = 576).
//       Example: scales [0.5, -0.25, 0.01] in one row -> d = 0.5 / 127 =
//       0.0039370... rounded to 0.0039367676 (11 bits), c = [127, -64, 3].
//   Quantizers that target a narrow dtype choose each scale, round it as the
//   dtype stores it and then compute the codes with the rounded scale, so no
//   precision is lost after the codes are chosen.
//   Integer accumulation: |u * x| <= 255 * 127 per product, so a group's
//   int32 sum cannot overflow for G <= 65536 (the kernels reject larger).
//
// int3 tiles (b = 3, the same layout version 1): codes u in [0, 7] (symmetric:
//   u = q + 4), kt = 8 as int4, K padded with u = off to Kp, a multiple of 8.
//   A tile is a run of super-blocks of 4 k-steps (32 k, the last one padded past
//   Kp with u = 0, never read); super-block S holds k-steps 4S..4S+3 in 192
//   bytes (3 bits per weight, no padding) as three 64-byte planes. As in the
//   other tiles, bytes 4i..4i+3 of a plane belong to row n = 16t + i, and byte
//   4i + j covers k = 32S + 8s + j (low nibble of int4's byte) and
//   k = 32S + 8s + 4 + j (high nibble) for the 4 k-steps s = 0..3:
//     plane 0 (bytes 0..63), plane 1 (64..127): the low 2 bits of u for k-steps
//       s = 2p, 2p + 1 of plane p: bits 2(s & 1)..+1 hold u[32S + 8s + j] & 3,
//       bits 4 + 2(s & 1)..+1 hold u[32S + 8s + 4 + j] & 3;
//     plane 2 (bytes 128..191): bit s holds u[32S + 8s + j] >> 2, bit s + 4
//       holds u[32S + 8s + 4 + j] >> 2.
//   So k-step s of a super-block becomes the int4 block above with 4 bit ops:
//     int4 byte = ((plane[s / 2] >> 2(s & 1)) & 0x33) | (((plane2 >> s) << 2) & 0x44)
//   (a shift of a 32-bit lane moves bits across bytes only where the masks
//   drop them), and every kernel then runs its int4 code with offset 4.
//   Example, one row, k = 0..7 holding u = 0..7: plane 0 byte 0 = 0 | 0 << 4 =
//   0x00 ... byte j: u[j] & 3 | (u[4 + j] & 3) << 4; plane 2 byte j: bit 0 =
//   u[j] >> 2 = 0, bit 4 = u[4 + j] >> 2 = 1, so 0x10.
//   3 + (scale bits) / G bits per weight: int3 g16 with int8 scale codes takes
//   3.5 + 32 / K (3.56 at K = 576).
//
// Level tables (int4 tiles, symmetric, the same layout version 1): a layer may
//   give its 16 codes a table of signed levels L[0..15] in [-127, 127], int8,
//   one table per layer (16 bytes, stored with the layer); stored code u
//   (0..15) then means the value L[u] * scale instead of (u - 8) * scale. The
//   levels need not be evenly spaced: a grid denser near 0 fits the bell-shaped
//   weights of a group better than the 16 even steps of int4 (lowbit's table
//   "t5", python/lowbit/levels.py). No offsets are stored (the table is the zero
//   point); scales keep their dtypes and layout. The integer kernels look the
//   byte u up as L[u] + 128 (vpshufb) and remove the offset 128 as for int8
//   tiles; the float kernels look up L[u] as a float (vpermps) or a bfloat16
//   (vpermw; |L| <= 127 is exact in both).
//   Example: table t5, codes u = [0, 8, 15] with scale 0.01: values
//   [-1.27, 0, 0.96].
//
// Activations (act_bits=8): per row (token), symmetric int8 in [-127, 127],
//   scale = amax / 127 of the row's finite values, rows padded with zeros to Kp;
//   per row and group the code sum sx (int32) is kept for the offset correction
//   sum_k (u - off) x = sum_k u x - off * sx.

#pragma once

#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace lowbit {

// Input / output element types crossing the Python boundary.
enum class DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// fp8 flavours.
enum class Fp8Kind : int { kE4M3 = 0, kE5M2 = 1 };

constexpr size_t kTileRows = 16;   // rows per matmul weight tile
constexpr size_t kBlockBytes = 64;  // bytes per k-step block of a tile
constexpr size_t KStep(int bits) { return bits == 8 ? 4 : 8; }  // int3 and int4: 8
constexpr size_t kInt3SuperSteps = 4;     // k-steps per int3 super-block
constexpr size_t kInt3SuperBytes = 192;   // 3 planes of 64 bytes

// Bytes of one 16-row tile with kp (a multiple of the k-step) padded columns.
inline size_t TileBytes(int bits, size_t kp) {
  const size_t steps = kp / KStep(bits);
  if (bits == 3) return (steps + kInt3SuperSteps - 1) / kInt3SuperSteps * kInt3SuperBytes;
  return steps * kBlockBytes;
}

// Stored code u of column kk, row i (0..15) of a tile: the scalar statement of
// the layouts above, used by the packer and the reference dequantizer.
inline void SetTileCode(uint8_t* tile, int bits, size_t kk, size_t i, int u) {
  const size_t step = KStep(bits), s = kk / step, j = kk % step;
  if (bits == 8) {
    tile[s * kBlockBytes + 4 * i + j] = static_cast<uint8_t>(u);
  } else if (bits == 4) {
    uint8_t& b = tile[s * kBlockBytes + 4 * i + (j % 4)];
    const int shift = j < 4 ? 0 : 4;
    b = static_cast<uint8_t>((b & ~(0x0F << shift)) | ((u & 0x0F) << shift));
  } else {
    uint8_t* sb = tile + (s / kInt3SuperSteps) * kInt3SuperBytes;
    const size_t ss = s % kInt3SuperSteps, half = j / 4;
    uint8_t& lo = sb[(ss / 2) * kBlockBytes + 4 * i + (j % 4)];
    uint8_t& hi = sb[2 * kBlockBytes + 4 * i + (j % 4)];
    const int lo_shift = int(2 * (ss & 1) + 4 * half), hi_shift = int(ss + 4 * half);
    lo = static_cast<uint8_t>((lo & ~(3 << lo_shift)) | ((u & 3) << lo_shift));
    hi = static_cast<uint8_t>((hi & ~(1 << hi_shift)) | (((u >> 2) & 1) << hi_shift));
  }
}

inline int GetTileCode(const uint8_t* tile, int bits, size_t kk, size_t i) {
  const size_t step = KStep(bits), s = kk / step, j = kk % step;
  if (bits == 8) return tile[s * kBlockBytes + 4 * i + j];
  if (bits == 4) {
    const uint8_t b = tile[s * kBlockBytes + 4 * i + (j % 4)];
    return j < 4 ? b & 0x0F : b >> 4;
  }
  const uint8_t* sb = tile + (s / kInt3SuperSteps) * kInt3SuperBytes;
  const size_t ss = s % kInt3SuperSteps, half = j / 4;
  const uint8_t lo = sb[(ss / 2) * kBlockBytes + 4 * i + (j % 4)];
  const uint8_t hi = sb[2 * kBlockBytes + 4 * i + (j % 4)];
  return ((lo >> (2 * (ss & 1) + 4 * half)) & 3) | (((hi >> (ss + 4 * half)) & 1) << 2);
}

inline size_t PackedRowBytes(size_t k, int bits) { return (k * size_t(bits) + 7) / 8; }

inline int QMin(int bits, bool symmetric) { return symmetric ? -(1 << (bits - 1)) : 0; }
inline int QMax(int bits, bool symmetric) {
  return symmetric ? (1 << (bits - 1)) - 1 : (1 << bits) - 1;
}

// IEEE float16 bits -> float32 (exact: every float16 is a float32).
inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h >> 15) << 31;
  const uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  uint32_t bits;
  if (exp == 0) {  // zero or subnormal: man * 2^-24 is exact in float32
    const float mag = static_cast<float>(man) * 5.9604644775390625e-8f;
    std::memcpy(&bits, &mag, 4);
  } else if (exp == 31) {
    bits = 0x7F800000u | (man << 13);  // inf, or NaN with its payload
  } else {
    bits = ((exp + 112) << 23) | (man << 13);  // rebias 15 -> 127
  }
  bits |= sign;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// The scale rules above, for a group whose range is [lo, hi]. Inline so that
// every kernel target gets the same scalar code (no FMA: nothing to contract).
inline void ChooseScale(float lo, float hi, int bits, bool symmetric, float* scale, int32_t* zp) {
  float s;
  int32_t z = 0;
  if (symmetric) {
    const float m = (-lo >= hi) ? lo : hi;  // signed value of largest magnitude
    s = m / -static_cast<float>(1 << (bits - 1));  // power of two: exact
  } else {
    const int qmax = QMax(bits, false);
    s = static_cast<float>((static_cast<double>(hi) - static_cast<double>(lo)) / qmax);
    if (std::fabs(s) >= FLT_MIN) {
      const float zf = std::nearbyint(-(lo * (1.0f / s)));
      z = static_cast<int32_t>(std::fmin(std::fmax(zf, 0.0f), static_cast<float>(qmax)));
    }
  }
  if (!(std::fabs(s) >= FLT_MIN)) {  // all zeros, or too tiny for 1/scale to be finite
    s = 0.0f;
    z = 0;
  }
  *scale = s;
  *zp = z;
}

}  // namespace lowbit
