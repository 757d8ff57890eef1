// A native decoder for Llama-family causal LMs (issue 7/11, model-level decode):
// the whole layer stack of one forward step in C++, so generating a token costs
// one call from Python instead of ~600 torch ops and ~200 kernel calls through
// Python (measured: ~70 us of fixed cost per projection call on SmolLM2, more
// than its 576-wide GEMVs take).
//
// What one layer computes (the arithmetic of transformers' LlamaDecoderLayer,
// float32 throughout):
//   h    = RmsNorm(x) * attn_norm                 (x * 1/sqrt(mean(x^2) + eps))
//   qkv  = h @ [Wq; Wk; Wv]^T (+ bias)            lowbit GEMV/GEMM kernels
//   q, k = RoPE(q, k) at each row's position      rotate-half pairs (j, j + D/2),
//                                                 angle = pos * inv_freq[j]
//   a    = softmax(q k^T * attn_scale) v           causal, over the KV cache;
//                                                 each query head reads kv head
//                                                 h / (heads / kv_heads)
//   x   += a @ Wo^T
//   h    = RmsNorm(x) * mlp_norm
//   x   += (silu(h @ Wg^T) * (h @ Wu^T)) @ Wd^T
// and after the last layer RmsNorm(x) * final_norm, then the head (optional:
// a float head stays in the caller's hands).
//
// KV cache: float32, per layer [kv_heads][capacity][head_dim] for keys (after
// RoPE) and for values, so one head's positions are contiguous; the capacity
// doubles when a step would overflow it (copying the filled part).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "lowbit/kernels.h"

namespace lowbit {

// One quantized projection. Its outputs land in columns [col, col + w.n) of the
// buffer of its slot, so q/k/v (or gate/up) either as three separate layers or
// as one fused layer fill the same [rows, q | k | v] buffer.
struct DecoderProjection {
  TiledWeights w;                 // w.bias is set from `bias` by the decoder
  std::vector<float> bias;        // padded to whole tiles, or empty
  std::vector<float> input_scale; // AWQ-style per-input multiplier [K], or empty
  int act_bits = 0;               // 0: float activations, 8: per-token int8
  float act_scale = 0.0f;         // static int8 activation scale (0: dynamic)
  size_t col = 0;
};

enum DecoderSlot { kSlotQkv = 0, kSlotO = 1, kSlotGateUp = 2, kSlotDown = 3, kSlots = 4 };

struct DecoderLayer {
  std::vector<DecoderProjection> proj[kSlots];
  std::vector<float> attn_norm, mlp_norm;  // [hidden]
};

struct DecoderConfig {
  size_t hidden = 0, heads = 0, kv_heads = 0, head_dim = 0, intermediate = 0;
  float eps = 1e-5f;
  float attn_scale = 0.0f;      // softmax temperature (transformers: head_dim^-0.5)
  float rope_scale = 1.0f;      // multiplies cos and sin (transformers' attention_scaling)
  std::vector<float> inv_freq;  // [head_dim / 2], as the model's rotary embedding holds it
};

class Decoder {
 public:
  // Throws std::invalid_argument on an inconsistent configuration.
  explicit Decoder(DecoderConfig config);

  // Appends a layer; its projections must cover their slots exactly
  // (q|k|v: (heads + 2 kv_heads) * head_dim columns over hidden inputs, ...).
  void AddLayer(DecoderLayer layer);
  // The final norm and an optional quantized head (null: no logits).
  void SetFinal(std::vector<float> norm, const DecoderProjection* head);

  // Runs m tokens (embedded rows x [m, hidden]) at positions
  // [Position(), Position() + m), appends their keys and values to the cache,
  // and writes the final-normed hidden states of the last `keep` rows to hidden
  // [keep, hidden] (may be null) and, with a head, their logits [keep, vocab].
  // Returns false (and leaves Position() unchanged) if a NaN reached an int8
  // activation quantizer.
  bool Forward(const float* x, size_t m, size_t keep, float* hidden, float* logits);

  size_t Position() const { return position_; }
  // Forgets cached positions >= pos (pos <= Position()).
  void Truncate(size_t pos);
  size_t Layers() const { return layers_.size(); }
  size_t Vocab() const { return has_head_ ? head_.w.n : 0; }
  size_t CacheCapacity() const { return capacity_; }
  const DecoderConfig& Config() const { return config_; }

 private:
  void Reserve(size_t positions);
  bool Project(DecoderProjection& p, const float* in, size_t in_stride, size_t m, float* out, size_t out_stride);
  bool Layer(size_t index, size_t m);

  DecoderConfig config_;
  std::vector<DecoderLayer> layers_;
  std::vector<float> final_norm_;
  DecoderProjection head_;
  bool has_head_ = false;
  size_t position_ = 0, capacity_ = 0;
  std::vector<std::vector<float>> kcache_, vcache_;  // per layer [kv_heads][capacity_][head_dim]
  // Work buffers, grown to the largest m seen. Inputs of projections are
  // zero-padded to a multiple of 8 columns (the int4 k-step) and stay so.
  std::vector<float> x_, xn_, qkv_, attn_, tmp_, gu_, act_, scaled_, rope_;
  std::vector<int8_t> xq_;
  std::vector<float> xscale_;
  std::vector<int32_t> xsum_;
  size_t rows_ = 0;
};

// ---- row kernels of the decoder (decoder_ops.cc, Highway, dynamic dispatch) ----
// out[r] = x[r] * 1/sqrt(mean(x[r]^2) + eps) * weight, r < m.
void RmsNormRows(const float* x, size_t m, size_t n, size_t x_stride, const float* weight, float eps, float* out,
                 size_t out_stride);
// out[r, j] = silu(gu[r, j]) * gu[r, inter + j]: gate and up side by side.
void SiluMulRows(const float* gu, size_t m, size_t inter, size_t gu_stride, float* out, size_t out_stride);
// x[i] += y[i], i < n.
void AddInPlace(float* x, const float* y, size_t n);
// Causal attention of m query rows (row i sits at position pos0 + i and sees
// cache positions 0 .. pos0 + i): q [m, heads * d] (q_stride apart), caches
// [kv_heads][capacity][d], out [m, heads * d] (out_stride apart).
void AttendRows(const float* q, size_t q_stride, size_t m, size_t heads, size_t kv_heads, size_t d,
                const float* kcache, const float* vcache, size_t capacity, size_t pos0, float scale, float* out,
                size_t out_stride);

}  // namespace lowbit
