// Validation shared by the CPU and CUDA `decode_attention` entry points, so the
// two backends accept and reject exactly the same inputs.
//
// Semantics (kvcompact/reference.py `decode_attention` states them in torch):
//   query [B, Hq, Q, D]  attends to  key/value rows j in [0, T) of [B, Hkv, T, D]
//   (GQA: query head h reads KV head h / (Hq / Hkv)). Query i sits at row
//   position query_start + i: it sees row j iff j <= query_start + i (causal)
//   and, with window > 0, query_start + i - j < window. Scores are
//   dot(q, k) * scale, then softcap * tanh(score / softcap) when softcap > 0.
//   Keys/values are model-dtype tensors (lossless storage) or 8-bit codes with
//   per-group fp32 scales [B, Hkv, T, D / G] (the format is the codes' dtype).
//   Outputs, fp32: out [B, Hq, Q, D] (softmax-weighted values) and
//   lse [B, Hq, Q] (natural log-sum-exp of the visible scores; -inf, with
//   out = 0, when a query sees no row). Segments attended separately merge
//   exactly: lse = logaddexp(lse_a, lse_b), out = sum_s exp(lse_s - lse) out_s.
//   An optional tail (tail_key/tail_value [B, Hkv, T_tail, D], a float dtype) is rows
//   [T, T + T_tail) of the same sequence: the exact newest rows of an 8-bit cache, attended in
//   the same pass instead of as a second segment. Positions count over all T + T_tail rows.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <limits>

#include "kvcompact/checks.h"

namespace kvcompact {

struct AttentionShape {
  int64_t batch, q_heads, kv_heads, q_len, head_dim;
  int64_t stored_len;  // rows in key/value
  int64_t kv_len;      // rows attended: stored_len plus the tail's
  bool quantized;
  QuantFormat fmt;     // quantized only
  int64_t groups;      // scales per row (quantized only; 0 otherwise)
  int64_t group_size;  // head_dim / groups (quantized only)
  float scale, softcap;
  int64_t window;       // 0: no sliding window
  int64_t query_start;  // row position of query 0
};

inline void check_attention_4d(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 4, op, ": `", name, "` must be 4-D; got ", t.dim(), " dims ",
                    t.sizes());
}

inline AttentionShape check_decode_attention(const char* op, const at::Tensor& query,
                                             const at::Tensor& key, const at::Tensor& value,
                                             const c10::optional<at::Tensor>& key_scales,
                                             const c10::optional<at::Tensor>& value_scales,
                                             double scale, double softcap, int64_t window,
                                             c10::optional<int64_t> query_start,
                                             const c10::optional<at::Tensor>& tail_key,
                                             const c10::optional<at::Tensor>& tail_value) {
  check_attention_4d(op, "query", query);
  check_attention_4d(op, "key", key);
  check_attention_4d(op, "value", value);
  check_activation_dtype(op, "query", query);
  check_same_device(op, "query", query, "key", key);
  check_same_device(op, "query", query, "value", value);
  TORCH_CHECK_TYPE(key.scalar_type() == value.scalar_type(), op, ": `key` (", key.scalar_type(),
                   ") and `value` (", value.scalar_type(), ") must have the same dtype");
  TORCH_CHECK_VALUE(key.sizes() == value.sizes(), op, ": `key` ", key.sizes(), " and `value` ",
                    value.sizes(), " must have the same shape [B, Hkv, T, D]");
  AttentionShape s{};
  s.batch = query.size(0);
  s.q_heads = query.size(1);
  s.q_len = query.size(2);
  s.head_dim = query.size(3);
  s.kv_heads = key.size(1);
  s.stored_len = key.size(2);
  TORCH_CHECK_VALUE(key.size(0) == s.batch, op, ": `key` batch (", key.size(0),
                    ") must equal `query` batch (", s.batch, ")");
  TORCH_CHECK_VALUE(key.size(3) == s.head_dim, op, ": `key` head dim (", key.size(3),
                    ") must equal `query` head dim (", s.head_dim, ")");
  TORCH_CHECK_VALUE(s.head_dim > 0, op, ": head dim D must be positive");
  TORCH_CHECK_VALUE(s.kv_heads > 0 && s.q_heads % s.kv_heads == 0, op, ": `query` heads (",
                    s.q_heads, ") must be a multiple of `key` heads (", s.kv_heads, ")");

  const bool has_k = key_scales.has_value(), has_v = value_scales.has_value();
  TORCH_CHECK_VALUE(has_k == has_v, op,
                    ": pass both `key_scales` and `value_scales` (8-bit codes) or neither "
                    "(model-dtype keys and values)");
  s.quantized = has_k;
  if (s.quantized) {
    s.fmt = format_of_codes(op, key);
    const at::Tensor& ks = *key_scales;
    const at::Tensor& vs = *value_scales;
    check_attention_4d(op, "key_scales", ks);
    check_attention_4d(op, "value_scales", vs);
    check_same_device(op, "key", key, "key_scales", ks);
    check_same_device(op, "key", key, "value_scales", vs);
    TORCH_CHECK_TYPE(ks.scalar_type() == c10::ScalarType::Float &&
                         vs.scalar_type() == c10::ScalarType::Float,
                     op, ": `key_scales` and `value_scales` must be float32; got ",
                     ks.scalar_type(), " and ", vs.scalar_type());
    TORCH_CHECK_VALUE(ks.sizes() == vs.sizes(), op, ": `key_scales` ", ks.sizes(),
                      " and `value_scales` ", vs.sizes(), " must have the same shape");
    TORCH_CHECK_VALUE(ks.sizes().slice(0, 3) == key.sizes().slice(0, 3), op,
                      ": `key_scales` must be [B, Hkv, T, D // G] with key's [B, Hkv, T] = ",
                      key.sizes().slice(0, 3), "; got ", ks.sizes());
    s.groups = ks.size(3);
    TORCH_CHECK_VALUE(s.groups > 0 && s.head_dim % s.groups == 0, op, ": `key_scales` last dim (",
                      s.groups, ") must divide D = ", s.head_dim);
    s.group_size = s.head_dim / s.groups;
  } else {
    TORCH_CHECK_TYPE(is_float_activation(key.scalar_type()), op,
                     ": without scales `key` and `value` must be float32, float16 or bfloat16 "
                     "(with 8-bit codes pass `key_scales` and `value_scales`); got ",
                     key.scalar_type());
    s.groups = 0;
    s.group_size = 0;
  }
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": `scale` must be finite; got ", scale);
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0.0, op,
                    ": `softcap` must be >= 0 (0: none); got ", softcap);
  TORCH_CHECK_VALUE(window >= 0, op, ": `window` must be >= 0 (0: none); got ", window);
  s.scale = static_cast<float>(scale);
  s.softcap = static_cast<float>(softcap);
  s.window = window;
  s.kv_len = s.stored_len;
  TORCH_CHECK_VALUE(tail_key.has_value() == tail_value.has_value(), op,
                    ": pass both `tail_key` and `tail_value` or neither");
  if (tail_key.has_value()) {
    const at::Tensor& tk = *tail_key;
    const at::Tensor& tv = *tail_value;
    check_attention_4d(op, "tail_key", tk);
    check_attention_4d(op, "tail_value", tv);
    check_same_device(op, "query", query, "tail_key", tk);
    check_same_device(op, "query", query, "tail_value", tv);
    TORCH_CHECK_TYPE(is_float_activation(tk.scalar_type()) && tk.scalar_type() == tv.scalar_type(), op,
                     ": `tail_key` and `tail_value` must share a float dtype (float32, float16 or "
                     "bfloat16); got ", tk.scalar_type(), " and ", tv.scalar_type());
    TORCH_CHECK_VALUE(tk.sizes() == tv.sizes(), op, ": `tail_key` ", tk.sizes(), " and `tail_value` ",
                      tv.sizes(), " must have the same shape");
    TORCH_CHECK_VALUE(tk.size(0) == s.batch && tk.size(1) == s.kv_heads && tk.size(3) == s.head_dim, op,
                      ": `tail_key` must be [B, Hkv, T_tail, D] with key's B, Hkv, D = ", s.batch, ", ",
                      s.kv_heads, ", ", s.head_dim, "; got ", tk.sizes());
    s.kv_len += tk.size(2);
  }
  s.query_start = query_start.has_value() ? *query_start : s.kv_len - s.q_len;
  // Far outside [-2^40, 2^40] the position arithmetic could overflow; no cache is that long.
  constexpr int64_t kMaxPos = int64_t(1) << 40;
  TORCH_CHECK_VALUE(s.query_start > -kMaxPos && s.query_start < kMaxPos, op,
                    ": `query_start` out of range; got ", s.query_start);
  return s;
}

// How K/V rows are stored; both backends make it a kernel template argument.
enum class KVStorage : int { kF32 = 0, kF16, kBF16, kE4M3, kE5M2, kInt8 };

inline KVStorage kv_storage(const AttentionShape& s, const at::Tensor& key) {
  if (s.quantized) {
    switch (s.fmt) {
      case QuantFormat::kFp8E4M3: return KVStorage::kE4M3;
      case QuantFormat::kFp8E5M2: return KVStorage::kE5M2;
      case QuantFormat::kInt8: return KVStorage::kInt8;
    }
  }
  switch (key.scalar_type()) {
    case c10::ScalarType::Half: return KVStorage::kF16;
    case c10::ScalarType::BFloat16: return KVStorage::kBF16;
    default: return KVStorage::kF32;
  }
}

// The kernels read rows with a contiguous last dim; any other layout is copied first (rare: cache
// buffers and the model's projections have one).
inline at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

// Whether query i (0-based) may read row j, per the semantics above.
inline bool attention_visible(const AttentionShape& s, int64_t i, int64_t j) {
  const int64_t qpos = s.query_start + i;
  return j <= qpos && (s.window == 0 || qpos - j < s.window);
}

// The rows [lo, hi) query i may read (empty when lo >= hi).
inline void attention_row_range(const AttentionShape& s, int64_t i, int64_t* lo, int64_t* hi) {
  const int64_t qpos = s.query_start + i;
  int64_t end = qpos + 1;
  int64_t begin = s.window > 0 ? qpos - s.window + 1 : 0;
  *lo = begin < 0 ? 0 : begin;
  *hi = end > s.kv_len ? s.kv_len : end;
}

}  // namespace kvcompact
