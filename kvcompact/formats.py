"""The 8-bit KV storage formats: one table that the kernels' wrappers, the cache and the memory
estimator all read.

The compiled kernels carry the same numbers in ``csrc/include/kvcompact/quant_math.h``
(``FormatTraits``); ``tests/test_cache_edits.py`` checks that both agree by quantizing values whose
scale reveals ``qmax``. The table itself needs no torch (the memory estimator reads it); the torch
dtype of the codes is looked up on first use.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KVFormat", "FORMATS", "FORMAT_NAMES", "SCALE_BYTES", "get_format", "format_of_dtype"]

# Every scale is one fp32 per group.
SCALE_BYTES = 4


@dataclass(frozen=True)
class KVFormat:
    """One storage format.

    Attributes
    ----------
    name : str
        ``"fp8_e4m3"``, ``"fp8_e5m2"`` or ``"int8"`` (the ``fmt`` / ``kv_dtype`` string).
    dtype_name : str
        Name of the codes' torch dtype (``dtype`` is the dtype itself).
    qmax : float
        Largest code magnitude; a group's scale is ``absmax / qmax``.
    code_bytes : int
        Bytes per code.
    """

    name: str
    dtype_name: str
    qmax: float
    code_bytes: int = 1

    @property
    def dtype(self):
        """The codes' ``torch.dtype``."""
        import torch

        return getattr(torch, self.dtype_name)


FORMATS: dict[str, KVFormat] = {
    f.name: f
    for f in (
        KVFormat("fp8_e4m3", "float8_e4m3fn", 448.0),
        KVFormat("fp8_e5m2", "float8_e5m2", 57344.0),
        KVFormat("int8", "int8", 127.0),
    )
}
FORMAT_NAMES: tuple[str, ...] = tuple(FORMATS)


def get_format(name: str, argument: str = "fmt") -> KVFormat:
    """The :class:`KVFormat` called ``name``; ``ValueError`` naming ``argument`` otherwise."""
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise ValueError(f"{argument} must be one of {list(FORMAT_NAMES)}, got {name!r}") from None


def format_of_dtype(dtype) -> KVFormat | None:
    """The format whose codes have the torch ``dtype`` (None for any other dtype)."""
    return next((f for f in FORMATS.values() if f.dtype == dtype), None)
