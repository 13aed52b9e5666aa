"""Bounded repair after an in-place edit: recompute the tail tokens the edit changed most.

After ``Session.drop`` or ``Session.replace`` the tokens after the edited span keep K/V computed
while the old text was visible. ``recompute_tail=True`` re-feeds all of them (exact, cost
proportional to the tail); doing nothing is free but stale. ``repair=f`` recomputes a fraction
``f`` of them, chosen by how much the edit changed them (the selection of CacheBlend, Yao et al.
2024, applied to an edit instead of to concatenated chunks):

1. **Scan.** Every tail token goes through the first ``SCAN_LAYERS`` layers again, attending to
   the edited context; those layers' K/V are overwritten for the whole tail (they are now exact:
   layer 0 depends on nothing else, layer 1 only on layer 0). At the last scanned layer, each
   token's deviation is the distance between its new and its stored K/V, relative to the stored
   norm. The forward stops there (the observer of :meth:`KVCompactCache.rewriting` asks it to).
2. **Recompute.** ``k = max(ceil(f * tail), MIN_ROWS)`` tokens (at most the tail) -- the newest
   ``RECENT_SHARE * k`` rows and the largest deviations among the rest (:func:`_choose` says why)
   -- go through every layer, attending to the whole cache (the rows not chosen keep their stale
   K/V), and their K/V are written over their own rows in every layer.

Why a floor of ``MIN_ROWS`` tokens: a forward over a few dozen tokens costs about one decode step
(it reads every weight once either way; on a GPU it is the same kernel launches), so recomputing
fewer saves almost nothing -- and agents edit often just behind the newest turn, where the tail is
a short message or two that a pure fraction would leave nearly stale. Measured by ``kvcompact
eval`` on its shipped traces (10 traces, 41 questions, SmolLM2-135M): ``repair=0.1`` without the
floor recovered 38% of the first-token KL gap between no repair and a full tail recompute
(0.0380 -> 0.0235) and answered 33/41; with it, 87% (0.0051) and 36/41, like the full recompute,
for 1% more tokens fed than without repair (docs/eval.md).

Both passes run the model on cached tokens at their own positions and rows
(:meth:`KVCompactCache.rewriting`): position ids are the tokens' RoPE positions, and a 4-D mask
lets each token see every physical row up to its own. Nothing is appended; the session's
tokens, spans and positions do not change. ``repair=1.0`` recomputes every tail token through
every layer: the same K/V as ``recompute_tail`` up to rounding.

Cost, counted in ``Session.fed_tokens`` as full-forward equivalents: the chosen tokens, plus
the tail times ``SCAN_LAYERS / num_layers`` (no scan when every tail token is recomputed: a tail
of at most ``MIN_ROWS``, ``repair=1.0``, or a model no deeper than the scan).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvcompact.cache import compat

__all__ = ["SCAN_LAYERS", "RECENT_SHARE", "MIN_ROWS", "RepairResult", "check_repair", "repair_tail"]

#: Layers every tail token is scanned through; the deviation is read at the last of them. Layer 0's
#: K/V depend on the token and its position only, so an edit first shows at layer 1.
SCAN_LAYERS = 2
#: Share of the recomputed tokens given to the newest rows of the tail, whatever their deviation.
RECENT_SHARE = 0.5
#: Fewest tail tokens a repair recomputes (all of a shorter tail): see the module docstring.
MIN_ROWS = 32


def _choose(deviation: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` tail rows to recompute, in row order: the newest ``RECENT_SHARE * k``, then the
    largest deviations among the others.

    Why both: the layer-1 deviation finds the tokens whose own context changed most, but on the
    measured traces it alone recovered little of the gap at 10% (the next queries read the newest
    rows most, and those rank low when the edit is far from them); the newest rows alone did
    better, half and half about as well as either's best (docs/eval.md has the numbers).
    """
    tail = deviation.numel()
    recent = min(k, int(RECENT_SHARE * k))
    others = deviation[: tail - recent]
    picked = torch.topk(others, k - recent).indices if k > recent else others.new_empty(0, dtype=torch.long)
    newest = torch.arange(tail - recent, tail, device=deviation.device)
    return torch.cat([picked.sort().values, newest])


@dataclass(frozen=True)
class RepairResult:
    """What one repair did: ``tail`` tokens after the edit, ``recomputed`` of them through every
    layer, and the full-forward equivalents it cost (``fed``)."""

    tail: int
    recomputed: int
    fed: int


def check_repair(repair, recompute_tail: bool, op: str) -> float | None:
    """Validate a ``repair=`` argument; returns it as a float (or None)."""
    if repair is None:
        return None
    if isinstance(repair, bool) or not isinstance(repair, (int, float)) or not 0.0 <= float(repair) <= 1.0:
        raise ValueError(f"{op}: repair must be a fraction in [0, 1] of the tokens after the edit to "
                         f"recompute (e.g. 0.1), or None; got {repair!r}")
    if recompute_tail:
        raise ValueError(f"{op}: pass repair= or recompute_tail=True, not both (recompute_tail recomputes "
                         "every token after the edit, i.e. repair=1.0 exactly)")
    return float(repair)


def _mask(query_rows: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive ``[1, 1, q, length]`` mask: query row ``r`` sees physical rows ``0..r``."""
    allowed = torch.arange(length, device=query_rows.device)[None, :] <= query_rows[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=query_rows.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def _forward_rows(session, rows: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, observe=None) -> None:
    """Run the model on cached tokens ``ids`` at physical ``rows``, overwriting their K/V."""
    cache, model = session.cache, session.model
    n = cache.physical_length
    dtype = next(model.parameters()).dtype
    with cache.rewriting(rows, observe=observe):
        model(input_ids=ids[None], position_ids=positions[None], attention_mask=_mask(rows, n, dtype),
              use_cache=True, logits_to_keep=1, **compat.cache_kwargs(cache))


def _deviation(session, start: int, rows, ids, positions, depth: int) -> torch.Tensor:
    """``rows`` (contiguous) through the first ``depth`` layers, their K/V rewritten; returns each
    row's deviation at layer ``depth - 1``: the relative L2 distance of its new K/V to the stored ones."""
    deviation = torch.empty(rows.numel(), dtype=torch.float32, device=rows.device)

    def observe(layer_idx, at, new_key, new_value, old_key, old_value):
        if layer_idx != depth - 1:
            return False
        diff = (new_key - old_key).float().pow(2).sum((0, 1, 3)) + (new_value - old_value).float().pow(2).sum((0, 1, 3))
        norm = old_key.float().pow(2).sum((0, 1, 3)) + old_value.float().pow(2).sum((0, 1, 3))
        deviation[at - start] = (diff / norm.clamp_min(1e-12)).sqrt()
        return True  # stop the forward here: the later layers are the recompute's job

    for i in range(0, rows.numel(), session.prefill_chunk):
        sl = slice(i, i + session.prefill_chunk)
        _forward_rows(session, rows[sl], ids[sl], positions[sl], observe)
    return deviation


@torch.no_grad()
def repair_tail(session, start: int, fraction: float) -> RepairResult:
    """Recompute the most-changed ``fraction`` of physical rows ``[start, end)`` (module docstring)."""
    cache = session.cache
    n = len(session._cache_ids)
    tail = n - start
    if tail <= 0 or fraction <= 0.0:
        return RepairResult(max(tail, 0), 0, 0)
    device = session._device()
    ids = torch.tensor(session._cache_ids[start:], dtype=torch.long, device=device)
    positions = torch.tensor(session.positions()[start:], dtype=torch.long, device=device)
    rows = torch.arange(start, n, device=device)
    chunk = session.prefill_chunk
    num_layers = len(cache)
    k = min(tail, max(math.ceil(fraction * tail), MIN_ROWS))

    scan = SCAN_LAYERS if k < tail and num_layers > SCAN_LAYERS else 0
    if scan:
        deviation = _deviation(session, start, rows, ids, positions, scan)
        chosen = _choose(deviation, k)
    else:
        # Everything: asked for (k == tail), or a model no deeper than the scan, whose scan would
        # already be a full recompute of the tail.
        k = tail
        chosen = torch.arange(tail, device=device)
    for i in range(0, k, chunk):
        sel = chosen[i:i + chunk]
        _forward_rows(session, rows[sel], ids[sel], positions[sel])
    fed = k + math.ceil(tail * scan / num_layers)
    session.fed_tokens += fed
    return RepairResult(tail, k, fed)
