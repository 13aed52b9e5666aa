// Runtime choice of the x86 ISA a CPU kernel runs with.
//
// Kernels are written once as force-inlined templates (lanes.h) and compiled
// into one entry point per ISA with `KVC_TARGET_*` attributes; `cpu_isa()`
// picks the best the machine has, once. KVCOMPACT_CPU_ISA=avx512|avx2
// (or scalar) forces a lower level (tests run every path on one machine; a level the CPU
// lacks is refused with an error rather than crashing on an illegal
// instruction); "auto" or unset means the best. "scalar" is the generic x86-64
// (SSE2) build of the same code. Non-x86 builds have only that path.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <string>

namespace kvcompact {
namespace cpu {

enum class Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

#if defined(__x86_64__) && defined(__GNUC__)
#define KVC_HAS_X86_ISAS 1
#define KVC_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define KVC_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")))
#else
#define KVC_HAS_X86_ISAS 0
#endif

inline Isa detect_isa() {
#if KVC_HAS_X86_ISAS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    return Isa::kAvx2;
  }
#endif
  return Isa::kGeneric;
}

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    case Isa::kGeneric: return "scalar";
  }
  return "scalar";
}

// The ISA the kernels use: the machine's best, or KVCOMPACT_CPU_ISA when set
// (read at every call, so a test can switch it; getenv is cheap next to a kernel).
inline Isa cpu_isa() {
  static const Isa best = detect_isa();
  const char* forced = std::getenv("KVCOMPACT_CPU_ISA");
  if (forced == nullptr || *forced == '\0' || std::strcmp(forced, "auto") == 0) return best;
  Isa want;
  if (std::strcmp(forced, "avx512") == 0) {
    want = Isa::kAvx512;
  } else if (std::strcmp(forced, "avx2") == 0) {
    want = Isa::kAvx2;
  } else if (std::strcmp(forced, "scalar") == 0) {
    want = Isa::kGeneric;
  } else {
    TORCH_CHECK_VALUE(false, "KVCOMPACT_CPU_ISA must be auto, avx512, avx2 or scalar; got '", forced, "'");
  }
  TORCH_CHECK_VALUE(static_cast<int>(want) <= static_cast<int>(best), "KVCOMPACT_CPU_ISA=", forced,
                    " but this CPU supports at most ", isa_name(best));
  return want;
}

}  // namespace cpu
}  // namespace kvcompact
