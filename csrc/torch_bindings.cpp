// Every kvcompact operator schema, in one table.
//
// Backends (csrc/cpu, csrc/cuda) register implementations only. In-place ops end
// in `_`, mark what they mutate with `Tensor(a!)`, and return nothing. Token
// tensors are [B, H, T, ...] (batch, KV heads, tokens, trailing dims).
#include <Python.h>
#include <torch/library.h>

#include <string>

namespace kvcompact {
std::string build_info_json();
}

TORCH_LIBRARY(kvcompact, m) {
  // --- quantization (bit-exact contract: docs/kernels.md; csrc/include/kvcompact/quant_math.h)
  // x [..., D] -> codes [..., D] (fmt's dtype), scales [..., D // group_size] fp32.
  m.def("quantize(Tensor x, str fmt, int? group_size=None) -> (Tensor codes, Tensor scales)");
  // Same math into preallocated, possibly strided views (cache appends).
  m.def("quantize_into_(Tensor x, Tensor(a!) codes, Tensor(b!) scales, str fmt) -> ()");
  // codes [..., D] + scales [..., D // G] -> y [..., D] in `dtype`.
  m.def("dequantize(Tensor codes, Tensor scales, ScalarType dtype) -> Tensor");
  m.def("dequantize_into_(Tensor codes, Tensor scales, Tensor(a!) out) -> ()");

  // --- token-dim edits, in place (compaction, span moves)
  // For every (b, h) and j < K: t[b, h, j] = old t[b, h, keep_idx[b, h, j]].
  m.def("compact_(Tensor(a!)[] tensors, Tensor keep_idx, bool validate=True) -> ()");
  // memmove of tokens [src_start, src_end) to dst_start along dim 2.
  m.def("move_(Tensor(a!)[] tensors, int src_start, int src_end, int dst_start) -> ()");

  // --- RoPE re-rotation of cached keys by delta * inv_freq
  m.def("rope_shift_(Tensor(a!) keys, Tensor delta, Tensor inv_freq, str style) -> ()");
  m.def(
      "rope_shift_quantized_(Tensor(a!) codes, Tensor(b!) scales, Tensor delta, "
      "Tensor inv_freq, str style) -> ()");

  // --- attention over cache storage (decode steps and short chunks); semantics in
  // csrc/include/kvcompact/attention_args.h. query [B, Hq, Q, D]; key/value [B, Hkv, T, D]
  // in a float dtype, or 8-bit codes with key_scales/value_scales [B, Hkv, T, D // G] fp32.
  // tail_key/tail_value [B, Hkv, T_tail, D] (a float dtype): rows [T, T + T_tail), the exact
  // newest rows of an 8-bit cache, attended in the same call.
  // -> out [B, Hq, Q, D] fp32, lse [B, Hq, Q] fp32 (segments merge by log-sum-exp).
  m.def(
      "decode_attention(Tensor query, Tensor key, Tensor value, Tensor? key_scales, "
      "Tensor? value_scales, float scale, float softcap=0., int window=0, "
      "int? query_start=None, Tensor? tail_key=None, Tensor? tail_value=None) -> (Tensor out, Tensor lse)");

  // --- offload: block copies between device and (pinned) host buffers on the
  // current stream. block_mapping is int64 [N, 2] on the CPU.
  m.def("copy_blocks_(Tensor src, Tensor(a!) dst, Tensor block_mapping) -> ()");

  // --- build facts (torch version, CUDA kernels compiled, archs), as JSON text.
  m.def("_build_info() -> str", [] { return kvcompact::build_info_json(); });
}

// The Python module only exists so `import kvcompact._C` runs the static
// registrations above; ops are reached through torch.ops.kvcompact.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
