// CPU rope_shift_ and rope_shift_quantized_: in-place re-rotation of cached keys.
//
// Strategy: work is split over tokens with at::parallel_for. With a shared delta
// [T], a task computes the cos/sin table of a token once (fp64 angles,
// rope_math.h) and applies it to every (b, h) row, and reuses the table while
// consecutive tokens share the same delta (the common case: every token after
// an evicted span moves by the same amount). With a per-row delta [B, H, T] the
// items are (row, token) pairs. The quantized form dequantizes one token's D
// values into a small fp32 buffer, rotates them, and requantizes each group
// with quant_math.h, exactly as `quantize(rope_shift(dequantize(...)))`.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <type_traits>
#include <vector>

#include "kvcompact/quant_math.h"
#include "kvcompact/rope_args.h"
#include "kvcompact/rope_math.h"

namespace kvcompact {
namespace {

constexpr int64_t kTokensPerTask = 16;

// cos/sin for one delta, recomputed only when delta changes.
struct AngleTable {
  std::vector<float> c, s;  // per pair i < R/2
  int64_t delta = 0;
  bool valid = false;

  void resize(int64_t half) {
    c.resize(half);
    s.resize(half);
  }
  void update(int64_t d, const float* inv_freq, int64_t half) {
    if (valid && d == delta) return;
    for (int64_t i = 0; i < half; ++i) rope_cos_sin(d, inv_freq[i], c[i], s[i]);
    delta = d;
    valid = true;
  }
};

// bf16 <-> fp32 on raw bits, branch-free so the rotate loop vectorizes (c10's
// conversion is not inlined into a vector loop). Same rounding as c10:
// round-to-nearest-even, any NaN -> 0x7FC0.
inline float bf16_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
}

// Contiguous neox pairs (x1[i], x2[i]). __restrict (the halves and the table
// never overlap) lets the compiler vectorize without runtime alias checks.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define KVCOMPACT_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define KVCOMPACT_VECTOR_CLONES
#endif

KVCOMPACT_VECTOR_CLONES
void rotate_neox_bf16(uint16_t* __restrict x1, uint16_t* __restrict x2, int64_t half,
                      const float* __restrict c, const float* __restrict s) {
  for (int64_t i = 0; i < half; ++i) {
    float y1, y2;
    rope_rotate(bf16_to_float(x1[i]), bf16_to_float(x2[i]), c[i], s[i], y1, y2);
    x1[i] = float_to_bf16(y1);
    x2[i] = float_to_bf16(y2);
  }
}

template <typename scalar_t>
inline void rotate_neox(scalar_t* __restrict x1, scalar_t* __restrict x2, int64_t half,
                        const float* __restrict c, const float* __restrict s) {
  for (int64_t i = 0; i < half; ++i) {
    float y1, y2;
    rope_rotate(static_cast<float>(x1[i]), static_cast<float>(x2[i]), c[i], s[i], y1, y2);
    x1[i] = static_cast<scalar_t>(y1);
    x2[i] = static_cast<scalar_t>(y2);
  }
}

template <typename scalar_t>
inline void rotate_token(scalar_t* x, int64_t sd, const RopeShape& sh, const AngleTable& tab) {
  const int64_t half = sh.half;
  if (sh.style == RopeStyle::kNeox && sd == 1) {
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      uint16_t* bits = reinterpret_cast<uint16_t*>(x);
      rotate_neox_bf16(bits, bits + half, half, tab.c.data(), tab.s.data());
    } else {
      rotate_neox<scalar_t>(x, x + half, half, tab.c.data(), tab.s.data());
    }
    return;
  }
  for (int64_t i = 0; i < half; ++i) {
    int64_t a, b;
    rope_pair(sh.style, half, i, a, b);
    float y1, y2;
    rope_rotate(static_cast<float>(x[a * sd]), static_cast<float>(x[b * sd]), tab.c[i], tab.s[i],
                y1, y2);
    x[a * sd] = static_cast<scalar_t>(y1);
    x[b * sd] = static_cast<scalar_t>(y2);
  }
}

// Calls fn(row_b, row_h, t, table) for every (b, h, t), with the table holding
// cos/sin for that element's delta.
template <typename Fn>
void for_each_token(const RopeShape& sh, const at::Tensor& delta, const float* inv_freq,
                    const Fn& fn) {
  const int64_t* dp = delta.const_data_ptr<int64_t>();
  if (!sh.delta_per_row) {
    const int64_t sdt = delta.stride(0);
    at::parallel_for(0, sh.T, kTokensPerTask, [&](int64_t begin, int64_t end) {
      AngleTable tab;
      tab.resize(sh.half);
      for (int64_t t = begin; t < end; ++t) {
        tab.update(dp[t * sdt], inv_freq, sh.half);
        for (int64_t b = 0; b < sh.B; ++b) {
          for (int64_t h = 0; h < sh.H; ++h) fn(b, h, t, tab);
        }
      }
    });
  } else {
    const int64_t sdb = delta.stride(0), sdh = delta.stride(1), sdt = delta.stride(2);
    at::parallel_for(0, sh.B * sh.H * sh.T, kTokensPerTask, [&](int64_t begin, int64_t end) {
      AngleTable tab;
      tab.resize(sh.half);
      for (int64_t w = begin; w < end; ++w) {
        const int64_t t = w % sh.T, r = w / sh.T, b = r / sh.H, h = r % sh.H;
        tab.update(dp[b * sdb + h * sdh + t * sdt], inv_freq, sh.half);
        fn(b, h, t, tab);
      }
    });
  }
}

void rope_shift_cpu(const at::Tensor& keys, const at::Tensor& delta, const at::Tensor& inv_freq,
                    c10::string_view style) {
  const RopeShape sh = check_rope_shift("rope_shift_", keys, delta, inv_freq, style);
  if (keys.numel() == 0) return;
  const at::Tensor freq = inv_freq.contiguous();  // [R / 2]: tiny
  const float* f = freq.const_data_ptr<float>();
  const int64_t sb = keys.stride(0), shh = keys.stride(1), st = keys.stride(2),
                sd = keys.stride(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, keys.scalar_type(), "rope_shift_", [&] {
    scalar_t* base = keys.data_ptr<scalar_t>();
    for_each_token(sh, delta, f, [&](int64_t b, int64_t h, int64_t t, const AngleTable& tab) {
      rotate_token<scalar_t>(base + b * sb + h * shh + t * st, sd, sh, tab);
    });
  });
}

template <QuantFormat F>
void rope_shift_quantized_impl(const at::Tensor& codes, const at::Tensor& scales,
                               const at::Tensor& delta, const float* f,
                               const RopeQuantShape& q) {
  using code_t = typename FormatTraits<F>::code_t;
  constexpr float qmax = FormatTraits<F>::kQmax;
  const RopeShape& sh = q.rope;
  code_t* cbase = static_cast<code_t*>(codes.data_ptr());
  float* sbase = scales.data_ptr<float>();
  const int64_t cb = codes.stride(0), ch = codes.stride(1), ct = codes.stride(2),
                cd = codes.stride(3);
  const int64_t qb = scales.stride(0), qh = scales.stride(1), qt = scales.stride(2),
                qg = scales.stride(3);
  const int64_t D = sh.D, G = q.group_size;
  for_each_token(sh, delta, f, [&](int64_t b, int64_t h, int64_t t, const AngleTable& tab) {
    thread_local std::vector<float> buf;
    buf.resize(D);
    code_t* c = cbase + b * cb + h * ch + t * ct;
    float* s = sbase + b * qb + h * qh + t * qt;
    for (int64_t g = 0; g < q.groups; ++g) {
      const float scale = s[g * qg];
      for (int64_t i = g * G; i < (g + 1) * G; ++i) buf[i] = dequantize_value<F>(c[i * cd], scale);
    }
    rotate_token<float>(buf.data(), 1, sh, tab);
    for (int64_t g = 0; g < q.groups; ++g) {
      GroupStats st;
      for (int64_t i = g * G; i < (g + 1) * G; ++i) st.add(buf[i]);
      const float scale = group_scale(st, qmax);
      for (int64_t i = g * G; i < (g + 1) * G; ++i) c[i * cd] = encode<F>(buf[i], scale);
      s[g * qg] = scale;
    }
  });
}

void rope_shift_quantized_cpu(const at::Tensor& codes, const at::Tensor& scales,
                              const at::Tensor& delta, const at::Tensor& inv_freq,
                              c10::string_view style) {
  const RopeQuantShape q =
      check_rope_shift_quantized("rope_shift_quantized_", codes, scales, delta, inv_freq, style);
  if (codes.numel() == 0) return;
  const at::Tensor freq = inv_freq.contiguous();
  const float* f = freq.const_data_ptr<float>();
  switch (q.fmt) {
    case QuantFormat::kFp8E4M3:
      rope_shift_quantized_impl<QuantFormat::kFp8E4M3>(codes, scales, delta, f, q);
      break;
    case QuantFormat::kFp8E5M2:
      rope_shift_quantized_impl<QuantFormat::kFp8E5M2>(codes, scales, delta, f, q);
      break;
    case QuantFormat::kInt8:
      rope_shift_quantized_impl<QuantFormat::kInt8>(codes, scales, delta, f, q);
      break;
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(kvcompact, CPU, m) {
  m.impl("rope_shift_", &rope_shift_cpu);
  m.impl("rope_shift_quantized_", &rope_shift_quantized_cpu);
}

}  // namespace kvcompact
