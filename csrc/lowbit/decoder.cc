// The native decoder's orchestration (decoder.h): buffers, the KV cache, RoPE,
// and the order of the row kernels (decoder_ops.cc) and projections (matmul.cc).
// Plain C++: every SIMD loop lives in those two files.

#include "lowbit/decoder.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

namespace lowbit {
namespace {

// Projection inputs are padded to whole int4 k-steps (8), a multiple of the
// int8 one (4), so one padding serves both.
size_t Padded(size_t k) {
  const size_t step = KStep(4);
  return (k + step - 1) / step * step;
}

void Require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

// The projections of one slot must be k-wide and tile [0, n) without gaps.
void CheckSlot(std::vector<DecoderProjection>& ps, size_t k, size_t n, const std::string& name) {
  Require(!ps.empty(), name + ": no projection");
  std::sort(ps.begin(), ps.end(), [](const DecoderProjection& a, const DecoderProjection& b) { return a.col < b.col; });
  size_t next = 0;
  for (const DecoderProjection& p : ps) {
    Require(p.w.k == k, name + ": expected " + std::to_string(k) + " inputs, got " + std::to_string(p.w.k));
    Require(p.col == next, name + ": outputs must cover columns 0.." + std::to_string(n) + " without gaps");
    Require(p.input_scale.empty() || p.input_scale.size() == k, name + ": input_scale must have K entries");
    Require(p.act_bits == 0 || p.act_bits == 8, name + ": act_bits must be 0 or 8");
    next += p.w.n;
  }
  Require(next == n, name + ": expected " + std::to_string(n) + " outputs, got " + std::to_string(next));
}

void AttachBias(DecoderProjection& p) { p.w.bias = p.bias.empty() ? nullptr : p.bias.data(); }

}  // namespace

Decoder::Decoder(DecoderConfig config) : config_(std::move(config)) {
  const DecoderConfig& c = config_;
  Require(c.hidden > 0 && c.heads > 0 && c.kv_heads > 0 && c.head_dim > 0 && c.intermediate > 0,
          "decoder sizes must be positive");
  Require(c.heads % c.kv_heads == 0, "heads must be a multiple of kv_heads");
  Require(c.head_dim % 2 == 0, "head_dim must be even (RoPE rotates pairs)");
  Require(c.inv_freq.size() == c.head_dim / 2, "inv_freq must have head_dim / 2 entries");
  Require(std::isfinite(c.eps) && c.eps >= 0.0f, "eps must be finite and >= 0");
  Require(std::isfinite(c.attn_scale) && c.attn_scale > 0.0f, "attn_scale must be finite and > 0");
  Require(std::isfinite(c.rope_scale), "rope_scale must be finite");
}

void Decoder::AddLayer(DecoderLayer layer) {
  const DecoderConfig& c = config_;
  Require(position_ == 0, "layers must be added before the first forward");
  const std::string name = "layer " + std::to_string(layers_.size());
  Require(layer.attn_norm.size() == c.hidden && layer.mlp_norm.size() == c.hidden, name + ": norms need hidden entries");
  CheckSlot(layer.proj[kSlotQkv], c.hidden, (c.heads + 2 * c.kv_heads) * c.head_dim, name + " q/k/v");
  CheckSlot(layer.proj[kSlotO], c.heads * c.head_dim, c.hidden, name + " o_proj");
  CheckSlot(layer.proj[kSlotGateUp], c.hidden, 2 * c.intermediate, name + " gate/up");
  CheckSlot(layer.proj[kSlotDown], c.intermediate, c.hidden, name + " down_proj");
  layers_.push_back(std::move(layer));
  for (auto& slot : layers_.back().proj)
    for (DecoderProjection& p : slot) AttachBias(p);
  kcache_.emplace_back();
  vcache_.emplace_back();
}

void Decoder::SetFinal(std::vector<float> norm, const DecoderProjection* head) {
  Require(norm.size() == config_.hidden, "final norm needs hidden entries");
  final_norm_ = std::move(norm);
  has_head_ = head != nullptr;
  if (head) {
    head_ = *head;
    head_.col = 0;
    std::vector<DecoderProjection> one{head_};
    CheckSlot(one, config_.hidden, head_.w.n, "head");
    AttachBias(head_);
  }
}

void Decoder::Truncate(size_t pos) {
  Require(pos <= position_, "truncate position " + std::to_string(pos) + " is past the cached " +
                                std::to_string(position_));
  position_ = pos;  // entries past pos are overwritten by the next forward
}

void Decoder::Reserve(size_t positions) {
  if (positions <= capacity_) return;
  size_t cap = std::max<size_t>(capacity_ ? capacity_ : 256, 256);
  while (cap < positions) cap *= 2;
  const size_t d = config_.head_dim, kvh = config_.kv_heads;
  for (size_t l = 0; l < layers_.size(); ++l) {
    for (std::vector<float>* cache : {&kcache_[l], &vcache_[l]}) {
      std::vector<float> grown(kvh * cap * d);
      for (size_t h = 0; h < kvh && position_ > 0; ++h)
        std::memcpy(grown.data() + h * cap * d, cache->data() + h * capacity_ * d, position_ * d * sizeof(float));
      cache->swap(grown);
    }
  }
  capacity_ = cap;
}

bool Decoder::Project(DecoderProjection& p, const float* in, size_t in_stride, size_t m, float* out,
                      size_t out_stride) {
  const size_t k = p.w.k;
  if (!p.input_scale.empty()) {  // AWQ: the kernels see x * s
    const size_t stride = Padded(k);
    for (size_t r = 0; r < m; ++r)
      for (size_t i = 0; i < k; ++i) scaled_[r * stride + i] = in[r * in_stride + i] * p.input_scale[i];
    in = scaled_.data();
    in_stride = stride;
  }
  if (p.act_bits == 8) {
    if (!QuantizeActivations(in, m, k, in_stride, p.w.kp, p.w.group, p.act_scale, xq_.data(), xscale_.data(),
                             xsum_.data()))
      return false;
    MatmulQuantAct(xq_.data(), xscale_.data(), xsum_.data(), m, p.w, out + p.col, out_stride);
  } else {
    MatmulFloatAct(in, m, in_stride, p.w, out + p.col, out_stride);
  }
  return true;
}

bool Decoder::Layer(size_t index, size_t m) {
  const DecoderConfig& c = config_;
  DecoderLayer& layer = layers_[index];
  const size_t hid = c.hidden, d = c.head_dim, heads = c.heads, kvh = c.kv_heads;
  const size_t hp = Padded(hid), qkv_n = (heads + 2 * kvh) * d, ap = Padded(heads * d);
  const size_t ip = Padded(c.intermediate);

  RmsNormRows(x_.data(), m, hid, hid, layer.attn_norm.data(), c.eps, xn_.data(), hp);
  for (DecoderProjection& p : layer.proj[kSlotQkv])
    if (!Project(p, xn_.data(), hp, m, qkv_.data(), qkv_n)) return false;

  // RoPE on q and k (rotate-half pairs; cos/sin per row from Forward), then
  // k and v into the cache.
  const size_t half = d / 2;
  float* kc = kcache_[index].data();
  float* vc = vcache_[index].data();
  for (size_t r = 0; r < m; ++r) {
    const size_t pos = position_ + r;
    const float* cs = rope_.data() + r * d;
    const float* sn = cs + half;
    float* row = qkv_.data() + r * qkv_n;
    for (size_t h = 0; h < heads + kvh; ++h) {
      float* v = row + h * d;
      for (size_t j = 0; j < half; ++j) {
        const float a = v[j], b = v[j + half];
        v[j] = a * cs[j] - b * sn[j];
        v[j + half] = b * cs[j] + a * sn[j];
      }
    }
    for (size_t h = 0; h < kvh; ++h) {
      std::memcpy(kc + (h * capacity_ + pos) * d, row + (heads + h) * d, d * sizeof(float));
      std::memcpy(vc + (h * capacity_ + pos) * d, row + (heads + kvh + h) * d, d * sizeof(float));
    }
  }
  AttendRows(qkv_.data(), qkv_n, m, heads, kvh, d, kc, vc, capacity_, position_, c.attn_scale, attn_.data(), ap);
  for (DecoderProjection& p : layer.proj[kSlotO])
    if (!Project(p, attn_.data(), ap, m, tmp_.data(), hid)) return false;
  AddInPlace(x_.data(), tmp_.data(), m * hid);

  RmsNormRows(x_.data(), m, hid, hid, layer.mlp_norm.data(), c.eps, xn_.data(), hp);
  for (DecoderProjection& p : layer.proj[kSlotGateUp])
    if (!Project(p, xn_.data(), hp, m, gu_.data(), 2 * c.intermediate)) return false;
  SiluMulRows(gu_.data(), m, c.intermediate, 2 * c.intermediate, act_.data(), ip);
  for (DecoderProjection& p : layer.proj[kSlotDown])
    if (!Project(p, act_.data(), ip, m, tmp_.data(), hid)) return false;
  AddInPlace(x_.data(), tmp_.data(), m * hid);
  return true;
}

bool Decoder::Forward(const float* x, size_t m, size_t keep, float* hidden, float* logits) {
  const DecoderConfig& c = config_;
  Require(!layers_.empty() && !final_norm_.empty(), "the decoder has no layers or no final norm");
  Require(m > 0, "at least one token is needed");
  Require(keep <= m, "keep must be <= the number of tokens");
  Require(logits == nullptr || has_head_, "logits need a quantized head");
  Reserve(position_ + m);
  const size_t hid = c.hidden, d = c.head_dim;
  const size_t hp = Padded(hid), ap = Padded(c.heads * d), ip = Padded(c.intermediate);
  if (m > rows_) {  // zero-filled, so the padding columns stay zero
    rows_ = m;
    x_.assign(m * hid, 0.0f);
    xn_.assign(m * hp, 0.0f);
    qkv_.assign(m * (c.heads + 2 * c.kv_heads) * d, 0.0f);
    attn_.assign(m * ap, 0.0f);
    tmp_.assign(m * hid, 0.0f);
    gu_.assign(m * 2 * c.intermediate, 0.0f);
    act_.assign(m * ip, 0.0f);
    const size_t widest = std::max(hp, std::max(ap, ip));
    scaled_.assign(m * widest, 0.0f);
    xq_.assign(m * widest, 0);
    xscale_.assign(m, 0.0f);
    xsum_.assign(m * widest, 0);
  }
  std::memcpy(x_.data(), x, m * hid * sizeof(float));
  // cos / sin of every row's angles, once for all layers: [m][cos half | sin half].
  const size_t half = d / 2;
  rope_.resize(m * d);
  for (size_t r = 0; r < m; ++r)
    for (size_t j = 0; j < half; ++j) {
      // float32 angle, as transformers computes it (inv_freq times position).
      const float angle = c.inv_freq[j] * static_cast<float>(position_ + r);
      rope_[r * d + j] = std::cos(angle) * c.rope_scale;
      rope_[r * d + half + j] = std::sin(angle) * c.rope_scale;
    }
  for (size_t l = 0; l < layers_.size(); ++l)
    if (!Layer(l, m)) return false;  // position_ unchanged: the next forward overwrites these entries
  const size_t first = m - keep;
  RmsNormRows(x_.data() + first * hid, keep, hid, hid, final_norm_.data(), c.eps, xn_.data(), hp);
  if (hidden)
    for (size_t r = 0; r < keep; ++r) std::memcpy(hidden + r * hid, xn_.data() + r * hp, hid * sizeof(float));
  if (logits && keep && !Project(head_, xn_.data(), hp, keep, logits, head_.w.n)) return false;
  position_ += m;
  return true;
}

}  // namespace lowbit
