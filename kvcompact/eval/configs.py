"""The configurations an eval compares: how each one holds the context of the same trace.

A configuration is data (:class:`EvalConfig`); its ``mode`` names the replayer class that plays a
trace under it (``kvcompact.eval.replay.REPLAYERS``). A new kind of configuration (a policy at a
token budget, bounded repair after an edit) is a new mode with its replayer, plus entries here;
the runner and the report need no change.

Built-in configurations (:data:`ALL_CONFIGS`; :data:`DEFAULT_CONFIGS` and :data:`QUICK_CONFIGS`
are subsets):

=====================  ============================================================================
``dense``              The reference: lossless ``KVCompactCache`` (token for token a
                       ``DynamicCache``), edits ignored -- truncated and dropped outputs stay whole.
``reprefill``          Message compaction with a full re-prefill: at each question a fresh session
                       is prefilled with the compacted message list (what an agent framework does).
``inplace-gap``        Edits in place: ``Session.drop(reposition=False)`` (a position gap remains),
                       ``Session.replace`` for truncations; later tokens keep their KV.
``inplace-reposition`` As above with ``drop(reposition=True)`` (later keys re-rotated).
``repair-10``          ``inplace-reposition``, then the 10% of the tokens after each edit that the
                       edit changed most are recomputed (``repair=0.1``, bounded repair).
``recompute-tail``     Edits in place, then the tokens after the edit are fed again
                       (``recompute_tail=True``): exact, paid per edit.
``structured``         Prevention instead of cure: a tool output the trace later truncates is
                       shaped when it arrives (``structure_output``: the event's ``fields`` /
                       ``grep``, the truncation's token budget, a fetch handle); drops in place.
``fp8_e4m3``,          ``inplace-reposition`` with 8-bit storage (the format's default group size;
``fp8_e5m2``, ``int8`` ``fp8_e4m3-g16`` / ``-g64`` other group sizes), so the difference to the
                       ``inplace-reposition`` row is the storage alone.
``int8-repair-10``     The demo's configuration (:data:`DEMO_CONFIG`): ``int8`` with ``repair=0.1``.
``{policy}-{pct}``     Every message whole in a cache with a token budget of ``pct``% of the trace's
                       longest context, evicted by ``policy`` (streaming, snapkv, h2o, knorm, tova;
                       25, 50, 75): what eviction alone does, edits ignored.
=====================  ============================================================================
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kvcompact.formats import FORMATS

__all__ = ["EvalConfig", "ALL_CONFIGS", "DEFAULT_CONFIGS", "QUICK_CONFIGS", "DEMO_CONFIG", "BUDGET_POLICIES", "BUDGET_FRACTIONS", "get_configs",
           "MODES"]

#: Modes the runner knows (each a replayer in kvcompact.eval.replay).
MODES = ("dense", "reprefill", "inplace", "budget")


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
    structured : bool
        ``inplace``: a tool output that the trace later truncates comes back shaped by
        :func:`kvcompact.agent.structured.structure_output` in the first place (its ``fields`` /
        ``grep``, the truncation's token budget), and the truncation is then a no-op.
    repair : float, optional
        ``inplace``: after each edit, recompute this fraction of the tokens after it, the ones the
        edit changed most (``Session.drop/replace(repair=...)``).
    policy : str, optional
        ``budget``: the eviction policy (a name from ``kvcompact.policies.available_policies()``).
    budget_fraction : float, optional
        ``budget``: the cache's token budget as a fraction of the trace's longest context (every
        message whole), rounded up.
    description : str
        One line for the report.
    """

    name: str
    mode: str
    kv_dtype: str | None = None
    group_size: int | None = None
    reposition: bool = False
    recompute_tail: bool = False
    structured: bool = False
    repair: float | None = None
    policy: str | None = None
    budget_fraction: float | None = None
    description: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"EvalConfig.name must be a non-empty str; got {self.name!r}")
        if self.mode not in MODES:
            raise ValueError(f"EvalConfig.mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.kv_dtype is not None and self.kv_dtype not in FORMATS:
            raise ValueError(f"EvalConfig.kv_dtype must be None or one of {', '.join(FORMATS)}; "
                             f"got {self.kv_dtype!r}")
        if self.mode != "inplace" and (self.reposition or self.recompute_tail or self.repair is not None
                                       or self.structured):
            raise ValueError(f"EvalConfig {self.name!r}: reposition/recompute_tail/repair/structured apply to mode "
                             "'inplace' only")
        if self.repair is not None and (self.recompute_tail or not 0.0 < self.repair <= 1.0):
            raise ValueError(f"EvalConfig {self.name!r}: repair must be a fraction in (0, 1] without "
                             f"recompute_tail; got repair={self.repair!r}")
        if (self.mode == "budget") != (self.policy is not None and self.budget_fraction is not None):
            raise ValueError(f"EvalConfig {self.name!r}: mode 'budget' needs policy and budget_fraction, and "
                             "only it takes them")
        if self.budget_fraction is not None and not 0.0 < self.budget_fraction <= 1.0:
            raise ValueError(f"EvalConfig {self.name!r}: budget_fraction must be in (0, 1]; got {self.budget_fraction!r}")

    def to_dict(self) -> dict:
        return asdict(self)


#: Policies compared at each budget (kvcompact.policies).
BUDGET_POLICIES = ("streaming", "snapkv", "h2o", "knorm", "tova")
#: Token budgets, as fractions of each trace's longest context.
BUDGET_FRACTIONS = (0.25, 0.5, 0.75)

#: The configuration ``kvcompact demo`` runs (its ``DemoConfig`` defaults are read from it).
DEMO_CONFIG = "int8-repair-10"

_CORE = (
    EvalConfig("dense", "dense", description="lossless cache, no edits (reference context)"),
    EvalConfig("reprefill", "reprefill", description="compacted messages, fresh prefill at each question"),
    EvalConfig("inplace-gap", "inplace", description="in-place edits, drop leaves a position gap"),
    EvalConfig("inplace-reposition", "inplace", reposition=True,
               description="in-place edits, drop re-rotates later keys"),
    EvalConfig("repair-10", "inplace", reposition=True, repair=0.1,
               description="inplace-reposition + recompute the 10% of the tail the edit changed most"),
    EvalConfig("recompute-tail", "inplace", reposition=True, recompute_tail=True,
               description="in-place edits, tail after each edit fed again (exact)"),
    EvalConfig("structured", "inplace", reposition=True, structured=True,
               description="tool outputs shaped to the asked fields at the truncation's budget, drops in place"),
    EvalConfig("fp8_e4m3", "inplace", kv_dtype="fp8_e4m3", reposition=True,
               description="inplace-reposition, fp8 e4m3 storage (groups of 32)"),
    EvalConfig("fp8_e4m3-g16", "inplace", kv_dtype="fp8_e4m3", group_size=16, reposition=True,
               description="inplace-reposition, fp8 e4m3 storage, groups of 16"),
    EvalConfig("fp8_e4m3-g64", "inplace", kv_dtype="fp8_e4m3", group_size=64, reposition=True,
               description="inplace-reposition, fp8 e4m3 storage, groups of 64"),
    EvalConfig("fp8_e5m2", "inplace", kv_dtype="fp8_e5m2", reposition=True,
               description="inplace-reposition, fp8 e5m2 storage"),
    EvalConfig("int8", "inplace", kv_dtype="int8", reposition=True,
               description="inplace-reposition, int8 storage (one scale per head and token)"),
    EvalConfig(DEMO_CONFIG, "inplace", kv_dtype="int8", reposition=True, repair=0.1,
               description="the demo's configuration: int8 storage, drops close the gap, repair=0.1 after each edit"),
)

_BUDGETS = tuple(
    EvalConfig(f"{policy}-{round(fraction * 100)}", "budget", policy=policy, budget_fraction=fraction,
               description=f"every message whole, {policy} eviction at {fraction:.0%} of the longest context")
    for policy in BUDGET_POLICIES for fraction in BUDGET_FRACTIONS)

#: Every built-in configuration (``kvcompact eval --configs all``).
ALL_CONFIGS = _CORE + _BUDGETS

def _named(*names) -> tuple:
    by_name = {c.name: c for c in ALL_CONFIGS}
    return tuple(by_name[n] for n in names)


#: What ``run_eval`` and ``kvcompact eval`` compare by default (about 12 minutes on a 2-core CPU
#: for the shipped traces, two worker processes): the message-level choices, 8-bit storage, the
#: demo's configuration, one eviction policy at half the context. ``--configs all`` adds the
#: position gap, fp8 group sizes, fp8_e5m2 and every policy at every budget.
DEFAULT_CONFIGS = _named("dense", "reprefill", "inplace-reposition", "repair-10", "recompute-tail", "structured",
                         "fp8_e4m3", "int8", DEMO_CONFIG, "snapkv-50")

#: ``kvcompact eval --quick``: one configuration of each kind, for the quick traces.
QUICK_CONFIGS = _named("dense", "reprefill", "inplace-reposition", DEMO_CONFIG, "snapkv-50")


def get_configs(names=None) -> list:
    """Configurations by name from :data:`ALL_CONFIGS`, in the given order.

    None gives :data:`DEFAULT_CONFIGS`; the names ``"all"``, ``"default"`` and ``"quick"`` stand
    for :data:`ALL_CONFIGS`, :data:`DEFAULT_CONFIGS` and :data:`QUICK_CONFIGS` (and may be combined
    with other names).
    """
    if names is None:
        return list(DEFAULT_CONFIGS)
    if isinstance(names, str):
        names = [names]
    by_name = {c.name: c for c in ALL_CONFIGS}
    groups = {"all": [c.name for c in ALL_CONFIGS], "default": [c.name for c in DEFAULT_CONFIGS],
              "quick": [c.name for c in QUICK_CONFIGS]}
    expanded = []
    for n in names:
        for m in groups.get(n, [n]):
            if m not in expanded:
                expanded.append(m)
    unknown = [n for n in expanded if n not in by_name]
    if unknown:
        raise ValueError(f"unknown eval config(s) {', '.join(map(repr, unknown))}; expected 'all', 'default', 'quick' or "
                         f"names from {', '.join(by_name)}")
    return [by_name[n] for n in expanded]
