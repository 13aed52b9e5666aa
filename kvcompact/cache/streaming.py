"""The built-in eviction rule used when a budget is set without a policy (StreamingLLM).

Keep the first ``sinks`` tokens (attention sinks) and the newest ``budget - sinks``. This is the
one function the policy layer (``kvcompact.policies``) replaces; the cache only needs a
``keep_idx`` from it.
"""

from __future__ import annotations

import torch

SINKS = 4


def streaming_keep_idx(batch: int, heads: int, length: int, budget: int, device, sinks: int = SINKS) -> torch.Tensor:
    """Physical positions to keep: ``[0, sinks)`` and ``[length - (budget - sinks), length)``.

    Parameters
    ----------
    batch, heads : int
        Leading dims of the layer's buffers.
    length : int
        Physical tokens held, ``> budget``.
    budget : int
        Tokens to keep, ``> sinks``.

    Returns
    -------
    torch.Tensor
        ``keep_idx`` ``[batch, heads, budget]`` int64 on ``device``, strictly increasing per row.
    """
    recent = torch.arange(length - (budget - sinks), length, device=device)
    row = torch.cat([torch.arange(sinks, device=device), recent])
    return row.expand(batch, heads, budget).contiguous()
