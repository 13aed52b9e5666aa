// Facts fixed at build time, reported by kvcompact.build_info(), and the CPU
// kernels' ISA (detected once at run time; see kvcompact/cpu/isa.h).
#include <string>

#include "kvcompact/cpu/isa.h"

// Both macros are set by setup.py from the torch it builds against.
#ifndef KVCOMPACT_TORCH_VERSION
#define KVCOMPACT_TORCH_VERSION "unknown"
#endif

#ifndef KVCOMPACT_CUDA_ARCHS
#define KVCOMPACT_CUDA_ARCHS ""
#endif

namespace kvcompact {

std::string build_info_json() {
  std::string json = "{";
  json += "\"torch_version\": \"" KVCOMPACT_TORCH_VERSION "\", ";
#ifdef KVCOMPACT_WITH_CUDA
  json += "\"cuda_kernels\": true, ";
#else
  json += "\"cuda_kernels\": false, ";
#endif
  json += "\"cuda_archs\": \"" KVCOMPACT_CUDA_ARCHS "\", ";
  json += std::string("\"cpu_isa\": \"") + cpu::isa_name(cpu::detect_isa()) + "\"}";
  return json;
}

}  // namespace kvcompact
