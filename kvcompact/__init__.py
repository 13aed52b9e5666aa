"""kvcompact: keep long-running LLM agents inside accelerator memory.

Kernels live in :mod:`kvcompact.ops` (backed by ``torch.ops.kvcompact``), their
plain-torch specification in :mod:`kvcompact.reference`.
"""

import json as _json

import torch as _torch

try:
    from kvcompact import _C  # noqa: F401  (registers torch.ops.kvcompact.*)
except ImportError as _err:  # pragma: no cover - depends on how it was installed
    raise ImportError(
        f"kvcompact's compiled extension (kvcompact._C) is missing next to {__file__}. "
        "Build it with `pip install --no-build-isolation .` (or `python setup.py build_ext "
        "--inplace` for a source checkout). If you are running Python from the repository "
        "root, the source folder shadows the installed package: run from elsewhere or "
        "with `python -P`."
    ) from _err
from kvcompact import ops  # noqa: F401  (registers fake kernels)

__version__ = "0.1.0"

from kvcompact.formats import FORMAT_NAMES as FORMATS  # noqa: E402  (names; kvcompact.formats has the table)


def build_info() -> dict:
    """What this build of the extension contains.

    Returns
    -------
    dict
        ``torch_version`` (the torch it was compiled against), ``cuda_kernels``
        (bool), ``cuda_archs`` (e.g. ``"8.0;8.9;9.0"``, empty without CUDA), ``cpu_isa`` (the
        best vector ISA the CPU kernels can use on this machine: ``"avx512"``, ``"avx2"`` or
        ``"scalar"``; ``KVCOMPACT_CPU_ISA`` may force a lower one) and ``runtime_torch_version``
        (the torch importing it now).
    """
    info = _json.loads(_torch.ops.kvcompact._build_info())
    info["runtime_torch_version"] = _torch.__version__
    return info


# The transformers-facing names import transformers, which takes seconds; load
# them on first use so `import kvcompact` (and `kvcompact estimate`) stays fast.
_LAZY = {
    "KVCompactCache": ("kvcompact.cache", "KVCompactCache"),
    "KVCompactLayer": ("kvcompact.cache", "KVCompactLayer"),
    "CacheStats": ("kvcompact.cache", "CacheStats"),
    "attach": ("kvcompact.policies", "attach"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kvcompact' has no attribute {name!r}")


__all__ = ["FORMATS", "build_info", "ops", *_LAZY]
