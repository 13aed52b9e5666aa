"""The policy interface: score tokens per (layer, KV head), then keep the best ``budget`` of them.

A policy only *scores*. Every policy shares one selection rule, :func:`select_keep_idx`, which turns
``scores [B, H, T]`` into the ``keep_idx [B, H, K]`` that ``KVCompactLayer.compact`` (one
``ops.compact_`` call) consumes. Keeping the selection in one place is what makes the policies
comparable: they differ only in their scores, never in how sinks, the recent window, ties or the
budget are handled.

Selection rule (per row ``(b, h)``, ``T`` physical tokens, ``K = min(budget, T)``):

1. positions ``[0, sinks)`` (attention sinks) and ``[T - recent, T)`` (the recent window), plus any
   ``protected`` position, are always kept;
2. the remaining ``K - |protected|`` slots go to the highest scores; NaN scores rank lowest;
3. ties are broken towards the more recent token, so the result is deterministic on every device;
4. the kept positions are returned sorted, i.e. strictly increasing, as ``ops.compact_`` requires.

Rows may keep different tokens (head-wise eviction) but all keep ``K``: the buffers stay
rectangular, so memory really shrinks to ``K`` tokens per head.

Per-layer budgets: :func:`budget_for_layer` maps the cache-wide budget to a layer's budget
(``"uniform"`` or PyramidKV's ``"pyramid"``, which gives lower layers more and keeps the total).
``KVCompactCache`` accepts only schedules that give every full-attention layer the same budget
(transformers builds one attention mask for all of them), so ``"pyramid"`` there raises
``ValueError``; the schedule serves callers that size layers themselves.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, ClassVar

import torch

if TYPE_CHECKING:  # pragma: no cover
    from kvcompact.policies.observed import ObservedQueries

__all__ = [
    "Policy",
    "select_keep_idx",
    "budget_for_layer",
    "get_policy",
    "register_policy",
    "available_policies",
    "DEFAULT_SINKS",
    "DEFAULT_RECENT",
]

DEFAULT_SINKS = 4
DEFAULT_RECENT = 32
SCHEDULES = ("uniform", "pyramid")


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_budget(budget, sinks: int, recent: int) -> int:
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise ValueError(f"budget must be an int, got {budget!r}")
    if budget <= sinks + recent:
        raise ValueError(
            f"budget={budget} must exceed sinks + recent = {sinks} + {recent}: the protected tokens alone would "
            "fill it (lower sinks/recent or raise the budget)"
        )
    return budget


def select_keep_idx(
    scores: torch.Tensor,
    budget: int,
    *,
    sinks: int = DEFAULT_SINKS,
    recent: int = DEFAULT_RECENT,
    protected: torch.Tensor | None = None,
) -> torch.Tensor:
    """Turn per-token scores into the sorted physical positions to keep.

    Parameters
    ----------
    scores : torch.Tensor
        ``[B, H, T]`` floating point, any device; higher = keep. Not modified.
    budget : int
        Tokens to keep per row; ``K = min(budget, T)``. Must exceed ``sinks + recent``.
    sinks : int
        Leading positions always kept (attention sinks).
    recent : int
        Trailing positions always kept (the recent window).
    protected : torch.Tensor, optional
        Bool, broadcastable to ``[B, H, T]``: further positions always kept. At most ``K`` per row.

    Returns
    -------
    torch.Tensor
        ``keep_idx`` ``[B, H, K]`` int64 on ``scores.device``, each row strictly increasing in
        ``[0, T)``; contiguous.

    Raises
    ------
    ValueError
        ``budget <= sinks + recent``, negative ``sinks``/``recent``, ``scores`` not 3-D, or a row
        with more than ``K`` protected positions.

    Example
    -------
    >>> s = torch.tensor([[[0.0, 9.0, 1.0, 8.0, 2.0, 3.0]]])
    >>> select_keep_idx(s, 4, sinks=1, recent=1).tolist()
    [[[0, 1, 3, 5]]]
    """
    _check_int("sinks", sinks, 0)
    _check_int("recent", recent, 0)
    _check_budget(budget, sinks, recent)
    if scores.dim() != 3 or not scores.is_floating_point():
        raise ValueError(f"scores must be a floating [B, H, T] tensor, got {scores.dtype} {tuple(scores.shape)}")
    b, h, t = scores.shape
    k = min(budget, t)
    if k == t:
        return torch.arange(t, device=scores.device).expand(b, h, t).contiguous()

    s = scores.float().nan_to_num(nan=-math.inf)  # a copy: the caller's scores stay untouched
    s[..., :sinks] = math.inf
    if recent:
        s[..., t - recent :] = math.inf
    if protected is not None:
        protected = protected.to(device=s.device, dtype=torch.bool).expand(b, h, t)
        s = s.masked_fill(protected, math.inf)
        most = int((s == math.inf).sum(-1).max())
        if most > k:
            raise ValueError(f"protected marks {most} tokens of a row (with sinks and recent) but only {k} fit the budget")
    # Stable descending sort of the reversed row: among equal scores the later token comes first.
    order = torch.sort(s.flip(-1), dim=-1, descending=True, stable=True).indices[..., :k]
    return (t - 1 - order).sort(dim=-1).values.contiguous()


def budget_for_layer(
    layer_idx: int,
    num_layers: int,
    budget: int,
    *,
    schedule: str = "uniform",
    beta: float = 20.0,
    min_budget: int = 1,
) -> int:
    """The budget of one layer under a schedule; the budgets of all layers sum to ``num_layers * budget``.

    ``"uniform"``: every layer gets ``budget``.
    ``"pyramid"`` (PyramidKV, Cai et al. 2024): budgets fall linearly with depth, from
    ``2 * budget - low`` at layer 0 to ``low = max(budget / beta, min_budget)`` at the last layer
    (attention in lower layers is spread wide, in upper layers it concentrates on few tokens).
    Fractions are resolved by largest remainder, so the total is preserved exactly.

    Parameters
    ----------
    layer_idx, num_layers : int
        ``0 <= layer_idx < num_layers``.
    budget : int
        The mean per-layer budget (what ``KVCompactCache(budget=...)`` was given).
    schedule : {"uniform", "pyramid"}
    beta : float
        Pyramid steepness (> 1): the last layer gets ``budget / beta``.
    min_budget : int
        Floor for the last layer (policies pass ``sinks + recent + 1``).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    _check_int("num_layers", num_layers, 1)
    if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or not 0 <= layer_idx < num_layers:
        raise ValueError(f"layer_idx must be an int in [0, {num_layers}), got {layer_idx!r}")
    _check_int("budget", budget, 1)
    if schedule == "uniform" or num_layers == 1:
        return budget
    if not beta > 1:
        raise ValueError(f"beta must be > 1, got {beta!r}")
    if min_budget > budget:
        raise ValueError(f"budget={budget} is below the per-layer minimum {min_budget}")
    low = max(budget / beta, float(min_budget))
    high = 2.0 * budget - low
    step = (high - low) / (num_layers - 1)
    exact = [high - i * step for i in range(num_layers)]
    floors = [math.floor(x) for x in exact]
    short = num_layers * budget - sum(floors)
    # Largest remainder; ties go to the lower (larger-budget) layer.
    for i in sorted(range(num_layers), key=lambda i: (-(exact[i] - floors[i]), i))[:short]:
        floors[i] += 1
    return floors[layer_idx]


class Policy:
    """Base class: subclasses implement :meth:`score`; selection is :func:`select_keep_idx`.

    Parameters
    ----------
    sinks : int
        Leading tokens always kept (default 4).
    recent : int
        Newest tokens always kept (default 32; policy-specific defaults noted per class).
    schedule : {"uniform", "pyramid"}
        Per-layer budget schedule (see :func:`budget_for_layer`). ``KVCompactCache`` refuses
        ``"pyramid"`` (its full-attention layers must share one budget).
    beta : float
        Pyramid steepness.

    Class attributes
    ----------------
    name : str
        Registry name.
    observes : None, "window" or "all"
        What :func:`kvcompact.attach` must capture for this policy: nothing (cache-only), the last
        ``window`` query states, or every query (accumulated attention, h2o).
    window : int
        Query states kept per layer when ``observes`` is set.
    """

    name: ClassVar[str] = "base"
    observes: ClassVar[str | None] = None
    observes_hidden: ClassVar[bool] = False  # also keep the window's hidden states (kvpress bridge)
    needs_values: ClassVar[bool] = False  # scores read values too (only then are they dequantized)
    window: int = 0

    def __init__(
        self,
        *,
        sinks: int = DEFAULT_SINKS,
        recent: int = DEFAULT_RECENT,
        schedule: str = "uniform",
        beta: float = 20.0,
    ):
        self.sinks = _check_int("sinks", sinks, 0)
        self.recent = _check_int("recent", recent, 0)
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if not beta > 1:
            raise ValueError(f"beta must be > 1, got {beta!r}")
        self.schedule, self.beta = schedule, float(beta)

    # -- what subclasses provide -----------------------------------------------------------------

    def score(
        self,
        layer_idx: int | None,
        keys: torch.Tensor,
        values: torch.Tensor | None,
        observed: ObservedQueries | None,
    ) -> torch.Tensor:
        """Importance of every physical token: ``[B, H_kv, T]`` float32, higher = keep.

        ``keys``/``values`` are ``[B, H_kv, T, D]`` float views of the physical cache (dequantized
        when stored in 8 bits); ``observed`` is the layer's :class:`ObservedQueries` (None unless
        the policy ``observes`` and :func:`kvcompact.attach` is active).
        """
        raise NotImplementedError

    def protected_mask(self, length: int, device) -> torch.Tensor | None:
        """Extra positions to protect (``[T]`` or ``[B, H, T]`` bool), or None."""
        return None

    @property
    def needs_hooks(self) -> bool:
        """Whether :func:`kvcompact.attach` must be active for this policy (query-aware)."""
        return self.observes is not None

    # -- budgets ---------------------------------------------------------------------------------

    @property
    def min_budget(self) -> int:
        """The smallest budget this policy accepts: ``sinks + recent + 1``."""
        return self.sinks + self.recent + 1

    def layer_budget(self, layer_idx: int, num_layers: int, budget: int) -> int:
        """This layer's budget under ``self.schedule``.

        ``KVCompactCache`` calls it per layer and raises ``ValueError`` if a full-attention layer's
        budget differs from the cache-wide one; other callers may size their layers with it.
        """
        return budget_for_layer(
            layer_idx, num_layers, budget, schedule=self.schedule, beta=self.beta, min_budget=self.min_budget
        )

    def validate(self, budget: int, num_layers: int = 1) -> None:
        """Raise ``ValueError`` now if some layer's budget could not hold sinks + recent.

        Call at cache construction so a bad budget fails before the first forward, not mid-generate.
        """
        for i in range(num_layers):
            _check_budget(self.layer_budget(i, num_layers, budget), self.sinks, self.recent)

    # -- selection -------------------------------------------------------------------------------

    def select(
        self,
        keys: torch.Tensor,
        values: torch.Tensor | None,
        budget: int,
        *,
        layer_idx: int | None = None,
        observed: ObservedQueries | None = None,
    ) -> torch.Tensor:
        """Score and select: ``keep_idx [B, H_kv, min(budget, T)]`` int64 on ``keys.device``.

        ``budget`` is this layer's budget (already scheduled). Pure: nothing is modified.
        """
        _check_budget(budget, self.sinks, self.recent)
        t = keys.shape[2]
        if t <= budget:  # nothing to evict; skip the scoring work
            b, h = keys.shape[:2]
            return torch.arange(t, device=keys.device).expand(b, h, t).contiguous()
        scores = self.score(layer_idx, keys, values, observed)
        return select_keep_idx(
            scores, budget, sinks=self.sinks, recent=self.recent, protected=self.protected_mask(t, keys.device)
        )

    def keep_indices(
        self,
        layer,
        budget: int,
        *,
        keys: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
        layer_idx: int | None = None,
        observed: ObservedQueries | None = None,
    ) -> torch.Tensor:
        """The cache-facing entry point: choose what ``layer`` keeps and update ``observed`` to match.

        Parameters
        ----------
        layer : KVCompactLayer
            The layer about to be compacted (``physical_len`` tokens). Only read when ``keys`` is
            None (see :func:`layer_keys`).
        budget : int
            This layer's budget.
        keys, values : torch.Tensor, optional
            ``[B, H_kv, T, D]`` the layer's physical K/V as attention sees them this step. Pass
            them: for 8-bit storage they are already dequantized (the workspace), and reading
            ``layer.keys`` instead would overwrite that shared workspace.
        layer_idx : int, optional
            The layer's index in the model (needed by query-aware policies for messages only).
        observed : ObservedQueries, optional
            The layer's captured queries (``cache.observed[layer_idx]``, filled by ``attach``).

        Returns
        -------
        torch.Tensor
            ``keep_idx [B, H_kv, K]`` int64, ``K = min(budget, T)``, rows strictly increasing. The
            caller must pass it to ``layer.compact`` right away: ``observed`` (accumulated
            attention) has already been compacted with it.
        """
        if keys is None:
            keys, values = layer_keys(layer, with_values=self.needs_values)
        if self.observes is not None and observed is None:
            raise RuntimeError(
                f"policy {self.name!r} scores with query states but got observed=None (layer {layer_idx}): run the "
                "model inside `with kvcompact.attach(model, cache):`, and pass observed=cache.observed.get(layer_idx)"
            )
        if observed is not None:
            observed.fold(keys)  # bring accumulated attention up to date with every held token
        keep_idx = self.select(keys, values, budget, layer_idx=layer_idx, observed=observed)
        if observed is not None:
            observed.compact(keep_idx)
        return keep_idx

    def reset(self) -> None:
        """Forget per-run state (random generators); called when a cache is reset."""

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}(sinks={self.sinks}, recent={self.recent}{extra})"

    def _params(self) -> dict:
        return {} if self.schedule == "uniform" else {"schedule": self.schedule, "beta": self.beta}


def layer_keys(layer, with_values: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A layer's physical K/V ``[B, H, T, D]`` without touching the cache's shared workspace.

    Lossless storage: views of the buffers. 8-bit storage: dequantized from the codes into fresh
    fp32 tensors (``layer.keys`` would dequantize into the workspace that attention is reading);
    values only when ``with_values`` (None otherwise).
    """
    store = getattr(layer, "storage", None)
    if store is not None and getattr(store, "fmt", None) is not None:
        from kvcompact import ops

        n = store.length
        k = ops.dequantize(store.key_codes[:, :, :n], store.key_scales[:, :, :n], dtype=torch.float32)
        v = None
        if with_values:
            v = ops.dequantize(store.value_codes[:, :, :n], store.value_scales[:, :, :n], dtype=torch.float32)
        return k, v
    return layer.keys, (layer.values if with_values else None)


# -- registry ------------------------------------------------------------------------------------

_REGISTRY: dict[str, Callable[..., Policy]] = {}


def register_policy(name: str):
    """Class decorator: make a policy constructible as ``get_policy(name, **params)``."""

    def deco(cls):
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return deco


def available_policies() -> list[str]:
    """Registered policy names."""
    return sorted(_REGISTRY)


def get_policy(policy, **params) -> Policy:
    """A policy from a name (``"snapkv"``), a :class:`Policy` (returned as is) or a kvpress press.

    Raises ``ValueError`` naming ``policy`` for an unknown name or object, and naming the parameter
    for a bad parameter.

    Example
    -------
    >>> get_policy("snapkv", window=16, pool=5)
    SnapKVPolicy(sinks=4, recent=16, window=16, pool=5, pooling='max')
    """
    if isinstance(policy, Policy):
        if params:
            raise ValueError(f"policy: parameters {sorted(params)} given with an already built {policy!r}")
        return policy
    if isinstance(policy, str):
        cls = _REGISTRY.get(policy.lower())
        if cls is None:
            raise ValueError(f"policy: unknown name {policy!r}; choose from {available_policies()}")
        return cls(**params)
    if hasattr(policy, "score") and hasattr(policy, "compression_ratio"):  # a kvpress ScorerPress
        from kvcompact.policies.press import KVPressPolicy

        return KVPressPolicy(policy, **params)
    raise ValueError(f"policy must be a name in {available_policies()}, a Policy, or a kvpress press; got {policy!r}")
