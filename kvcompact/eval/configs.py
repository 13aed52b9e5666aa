"""The configurations an eval compares: how each one holds the context of the same trace.

A configuration is data (:class:`EvalConfig`); its ``mode`` names the replayer class that plays a
trace under it (``kvcompact.eval.replay.REPLAYERS``). A new kind of configuration (a policy at a
token budget, bounded repair after an edit) is a new mode with its replayer, plus entries here;
the runner and the report need no change.

Built-in configurations (:data:`DEFAULT_CONFIGS`):

=====================  ============================================================================
``dense``              The reference: lossless ``KVCompactCache`` (token for token a
                       ``DynamicCache``), edits ignored -- truncated and dropped outputs stay whole.
``reprefill``          Message compaction with a full re-prefill: at each question a fresh session
                       is prefilled with the compacted message list (what an agent framework does).
``inplace-gap``        Edits in place: ``Session.drop(reposition=False)`` (a position gap remains),
                       ``Session.replace`` for truncations; later tokens keep their KV.
``inplace-reposition`` As above with ``drop(reposition=True)`` (later keys re-rotated).
``recompute-tail``     Edits in place, then the tokens after the edit are fed again
                       (``recompute_tail=True``): exact, paid per edit.
``fp8_e4m3``,          ``inplace-gap`` with 8-bit storage (the format's default group size), so the
``fp8_e5m2``, ``int8`` difference to the ``inplace-gap`` row is the storage alone.
=====================  ============================================================================
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kvcompact.formats import FORMATS

__all__ = ["EvalConfig", "DEFAULT_CONFIGS", "get_configs", "MODES"]

#: Modes the runner knows (each a replayer in kvcompact.eval.replay).
MODES = ("dense", "reprefill", "inplace")


@dataclass(frozen=True)
class EvalConfig:
    """One way of holding a trace's context.

    Parameters
    ----------
    name : str
        Unique in a run; rows of the report are named by it.
    mode : {"dense", "reprefill", "inplace"}
        Which replayer plays the trace (see the module docstring).
    kv_dtype : {None, "fp8_e4m3", "fp8_e5m2", "int8"}
        Cache storage (``KVCompactCache(kv_dtype=...)``); None is the model dtype, lossless.
    group_size : int, optional
        Elements per scale for 8-bit storage (None: the format's default).
    reposition : bool
        ``inplace``: ``Session.drop(reposition=...)``.
    recompute_tail : bool
        ``inplace``: re-feed the tokens after each edit.
    description : str
        One line for the report.
    """

    name: str
    mode: str
    kv_dtype: str | None = None
    group_size: int | None = None
    reposition: bool = False
    recompute_tail: bool = False
    description: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"EvalConfig.name must be a non-empty str; got {self.name!r}")
        if self.mode not in MODES:
            raise ValueError(f"EvalConfig.mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.kv_dtype is not None and self.kv_dtype not in FORMATS:
            raise ValueError(f"EvalConfig.kv_dtype must be None or one of {', '.join(FORMATS)}; "
                             f"got {self.kv_dtype!r}")
        if self.mode != "inplace" and (self.reposition or self.recompute_tail):
            raise ValueError(f"EvalConfig {self.name!r}: reposition/recompute_tail apply to mode 'inplace' only")

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT_CONFIGS = (
    EvalConfig("dense", "dense", description="lossless cache, no edits (reference context)"),
    EvalConfig("reprefill", "reprefill", description="compacted messages, fresh prefill at each question"),
    EvalConfig("inplace-gap", "inplace", description="in-place edits, drop leaves a position gap"),
    EvalConfig("inplace-reposition", "inplace", reposition=True,
               description="in-place edits, drop re-rotates later keys"),
    EvalConfig("recompute-tail", "inplace", reposition=True, recompute_tail=True,
               description="in-place edits, tail after each edit fed again (exact)"),
    EvalConfig("fp8_e4m3", "inplace", kv_dtype="fp8_e4m3", description="inplace-gap, fp8 e4m3 storage"),
    EvalConfig("fp8_e5m2", "inplace", kv_dtype="fp8_e5m2", description="inplace-gap, fp8 e5m2 storage"),
    EvalConfig("int8", "inplace", kv_dtype="int8", description="inplace-gap, int8 storage"),
)


def get_configs(names=None) -> list:
    """Configurations by name from :data:`DEFAULT_CONFIGS` (all of them for None), in the given order."""
    if names is None:
        return list(DEFAULT_CONFIGS)
    if isinstance(names, str):
        names = [names]
    by_name = {c.name: c for c in DEFAULT_CONFIGS}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown eval config(s) {', '.join(map(repr, unknown))}; expected names from "
                         f"{', '.join(by_name)}")
    return [by_name[n] for n in names]
