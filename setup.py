"""Build kvcompact's C++/CUDA extension against the installed torch.

    pip install --no-build-isolation .            # CUDA kernels when possible
    KVCOMPACT_DEVICE=cpu pip install --no-build-isolation .   # CPU kernels only

KVCOMPACT_DEVICE=auto|cpu|cuda picks the backends (default auto: CUDA whenever
torch is a CUDA build and nvcc is found; no GPU is needed to compile). The choice
and its reason are printed. TORCH_CUDA_ARCH_LIST picks the archs; without it and
without a visible GPU, 8.0;8.9;9.0 are built. KVCOMPACT_DEBUG=1 builds with -O0 -g.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

# torch's own guess for CUDA_HOME is the parent of the `nvcc` on PATH, which on
# machines with a wrapper at /usr/local/bin/nvcc is /usr/local and fails to link
# -lcudart. Prefer the real toolkit when it exists; this must happen before
# torch.utils.cpp_extension is imported, because it reads CUDA_HOME on import.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

DEFAULT_CUDA_ARCHS = "8.0;8.9;9.0"
ROOT = os.path.dirname(os.path.abspath(__file__))


def say(msg: str) -> None:
    print(f"[kvcompact build] {msg}", file=sys.stderr, flush=True)


def choose_backend() -> tuple[bool, str]:
    """Returns (build_cuda, reason)."""
    wanted = os.environ.get("KVCOMPACT_DEVICE", "auto").strip().lower()
    if wanted not in ("auto", "cpu", "cuda"):
        raise SystemExit(f"KVCOMPACT_DEVICE must be auto, cpu or cuda; got {wanted!r}")
    if wanted == "cpu":
        return False, "KVCOMPACT_DEVICE=cpu"
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU-only build")
    if cpp_extension.CUDA_HOME is None:
        problems.append("nvcc was not found (set CUDA_HOME to the CUDA toolkit)")
    if problems:
        if wanted == "cuda":
            raise SystemExit("KVCOMPACT_DEVICE=cuda but " + "; ".join(problems))
        return False, "; ".join(problems)
    why = "KVCOMPACT_DEVICE=cuda" if wanted == "cuda" else (
        f"torch {torch.__version__} is a CUDA {torch.version.cuda} build and nvcc is at "
        f"{cpp_extension.CUDA_HOME}")
    return True, why


def cuda_arch_list() -> str:
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not archs:
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            archs = f"{major}.{minor}"
        else:
            archs = DEFAULT_CUDA_ARCHS
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    return archs


def extension():
    build_cuda, why = choose_backend()
    debug = os.environ.get("KVCOMPACT_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    macros = [("KVCOMPACT_TORCH_VERSION", f'"{torch.__version__}"')]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    # NOTE: no fast-math flag for nvcc or the host compiler: the quantization contract needs IEEE
    # division and rounding so CPU and CUDA agree bit for bit.
    # -fno-trapping-math only promises that no FP trap handler is installed, so
    # the vectorizer may evaluate both sides of a select (the branch-free fp8
    # encode); it changes no value. -ffp-contract=off keeps the host compiler
    # from fusing a*b+c into an FMA, which would round differently from CUDA
    # and from the torch reference (the rope rotation is the case that bites).
    # -fopenmp: at::parallel_for is an inline `#pragma omp parallel` in torch's headers (torch is an
    # OpenMP build), so without the flag every CPU kernel ran on one thread whatever
    # torch.set_num_threads says. The extension then needs libgomp.so.1, which the process already
    # has: torch's wheel ships it (torch/lib) and libtorch_cpu loads it first, so one OpenMP
    # runtime serves both.
    extra = {"cxx": opt + ["-fno-fast-math", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp"]}
    link = ["-fopenmp"]

    if build_cuda:
        archs = cuda_arch_list()
        say(f"building CPU + CUDA kernels ({why}); CUDA archs: {archs}")
        sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        macros += [("KVCOMPACT_WITH_CUDA", None), ("KVCOMPACT_CUDA_ARCHS", f'"{archs}"')]
        # CUDA 13 wheels ship some toolkit headers (cusparse.h, pulled in by
        # ATen/cuda/CUDAContext.h) inside torch's nvidia/ packages.
        for sub in ("cu13", "cu12"):
            candidate = os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", sub, "include")
            if os.path.isdir(candidate):
                include_dirs.append(os.path.abspath(candidate))
        extra["nvcc"] = opt + ["-lineinfo", "--expt-relaxed-constexpr"]
        ext_cls = cpp_extension.CUDAExtension
    else:
        say(f"building CPU kernels only ({why})")
        ext_cls = cpp_extension.CppExtension

    return ext_cls(
        name="kvcompact._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=macros,
        extra_compile_args=extra,
        extra_link_args=link,
    )


setup(
    packages=find_packages(include=["kvcompact", "kvcompact.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
