// Host-side argument checks for rope_shift_ and rope_shift_quantized_, shared by
// the CPU and CUDA backends.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <string>

#include "kvcompact/checks.h"
#include "kvcompact/rope_math.h"

namespace kvcompact {

struct RopeShape {
  int64_t B, H, T, D;
  int64_t half;        // R / 2 = len(inv_freq)
  bool delta_per_row;  // delta is [B, H, T] (else [T], shared by every row)
  RopeStyle style;
};

inline RopeStyle parse_rope_style(const char* op, c10::string_view style) {
  if (style == "neox") return RopeStyle::kNeox;
  if (style == "gptj") return RopeStyle::kGptj;
  TORCH_CHECK_VALUE(false, op, ": `style` must be 'neox' or 'gptj'; got '",
                    std::string(style.data(), style.size()), "'");
}

// `keys_name` is the rotated tensor ([B, H, T, D]); its dtype is checked by the caller.
inline RopeShape check_rope_common(const char* op, const char* keys_name, const at::Tensor& keys,
                                   const at::Tensor& delta, const at::Tensor& inv_freq,
                                   c10::string_view style) {
  RopeShape s;
  s.style = parse_rope_style(op, style);
  TORCH_CHECK_VALUE(keys.dim() == 4, op, ": `", keys_name, "` must be [B, H, T, D]; got shape ",
                    keys.sizes());
  TORCH_CHECK_VALUE(at::has_internal_overlap(keys) != at::MemOverlap::Yes, op, ": `", keys_name,
                    "` has elements sharing memory (an expanded view?); it cannot be "
                    "rotated in place");
  s.B = keys.size(0);
  s.H = keys.size(1);
  s.T = keys.size(2);
  s.D = keys.size(3);
  check_same_device(op, keys_name, keys, "delta", delta);
  check_same_device(op, keys_name, keys, "inv_freq", inv_freq);
  TORCH_CHECK_TYPE(delta.scalar_type() == c10::ScalarType::Long, op,
                   ": `delta` must be int64; got ", delta.scalar_type());
  if (delta.dim() == 1) {
    TORCH_CHECK_VALUE(delta.size(0) == s.T, op, ": `delta` must be [T] = [", s.T,
                      "] or [B, H, T]; got shape ", delta.sizes());
    s.delta_per_row = false;
  } else {
    TORCH_CHECK_VALUE(delta.dim() == 3 && delta.size(0) == s.B && delta.size(1) == s.H &&
                          delta.size(2) == s.T,
                      op, ": `delta` must be [T] = [", s.T, "] or [B, H, T] = [", s.B, ", ",
                      s.H, ", ", s.T, "]; got shape ", delta.sizes());
    s.delta_per_row = true;
  }
  TORCH_CHECK_TYPE(inv_freq.scalar_type() == c10::ScalarType::Float, op,
                   ": `inv_freq` must be float32; got ", inv_freq.scalar_type());
  TORCH_CHECK_VALUE(inv_freq.dim() == 1 && inv_freq.size(0) > 0, op,
                    ": `inv_freq` must be a non-empty 1-d tensor [R / 2]; got shape ",
                    inv_freq.sizes());
  s.half = inv_freq.size(0);
  TORCH_CHECK_VALUE(2 * s.half <= s.D, op, ": rotary dim R = 2 * len(`inv_freq`) = ",
                    2 * s.half, " exceeds the head dim D = ", s.D, " of `", keys_name, "`");
  return s;
}

inline RopeShape check_rope_shift(const char* op, const at::Tensor& keys, const at::Tensor& delta,
                                  const at::Tensor& inv_freq, c10::string_view style) {
  TORCH_CHECK_TYPE(is_float_activation(keys.scalar_type()), op,
                   ": `keys` must be float32, float16 or bfloat16; got ", keys.scalar_type());
  return check_rope_common(op, "keys", keys, delta, inv_freq, style);
}

struct RopeQuantShape {
  RopeShape rope;
  QuantFormat fmt;
  int64_t group_size, groups;
};

inline RopeQuantShape check_rope_shift_quantized(const char* op, const at::Tensor& codes,
                                                 const at::Tensor& scales,
                                                 const at::Tensor& delta,
                                                 const at::Tensor& inv_freq,
                                                 c10::string_view style) {
  RopeQuantShape q;
  q.fmt = format_of_codes(op, codes);
  q.rope = check_rope_common(op, "codes", codes, delta, inv_freq, style);
  check_same_device(op, "codes", codes, "scales", scales);
  TORCH_CHECK_TYPE(scales.scalar_type() == c10::ScalarType::Float, op,
                   ": `scales` must be float32; got ", scales.scalar_type());
  TORCH_CHECK_VALUE(scales.dim() == 4 && scales.sizes().slice(0, 3) == codes.sizes().slice(0, 3),
                    op, ": `scales` must be [B, H, T, D // group_size] with codes' [B, H, T] = ",
                    codes.sizes().slice(0, 3), "; got ", scales.sizes());
  TORCH_CHECK_VALUE(at::has_internal_overlap(scales) != at::MemOverlap::Yes, op,
                    ": `scales` has elements sharing memory; it cannot be written in place");
  q.groups = scales.size(3);
  TORCH_CHECK_VALUE(q.groups > 0 && q.rope.D % q.groups == 0, op, ": `scales` last dim (",
                    q.groups, ") must divide D = ", q.rope.D);
  q.group_size = q.rope.D / q.groups;
  return q;
}

}  // namespace kvcompact
