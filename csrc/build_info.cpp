// Facts fixed at build time, reported by kvcompact.build_info().
#include <string>

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
  json += "\"cuda_archs\": \"" KVCOMPACT_CUDA_ARCHS "\"}";
  return json;
}

}  // namespace kvcompact
