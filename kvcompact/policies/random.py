"""Random eviction: the baseline every scoring policy must beat.

Scores are uniform draws from a generator seeded once per policy (on the CPU, then moved), so two
policies built with the same seed make the same choices in the same order, on any device.
"""

from __future__ import annotations

import torch

from kvcompact.policies.base import Policy, _check_int, register_policy

__all__ = ["RandomPolicy"]


@register_policy("random")
class RandomPolicy(Policy):
    """Keep a uniformly random subset (plus sinks and the recent window)."""

    def __init__(self, *, seed: int = 0, **kw):
        super().__init__(**kw)
        self.seed = _check_int("seed", seed, 0)
        self.reset()

    def reset(self) -> None:
        self._gen = torch.Generator().manual_seed(self.seed)

    def score(self, layer_idx, keys, values, observed):
        b, h, t = keys.shape[:3]
        return torch.rand(b, h, t, generator=self._gen).to(keys.device)

    def _params(self):
        return {"seed": self.seed, **super()._params()}
