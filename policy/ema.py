"""Exponential moving average of a model's weights, the copy that Diffusion Policy evaluates."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class EMA:
    """Keeps `self.model`, a frozen copy whose parameters track the live model's.

    Decay after n updates follows DP's EMAModel warm-up: 0 for the first two updates, then
    1 - (1 + n - 1) ** -power, capped at `max_decay` (power 0.75 reaches 0.999 at ~10k steps).
    Buffers (e.g. normalizer statistics) are copied, not averaged.
    """

    def __init__(self, model: nn.Module, power: float = 0.75, max_decay: float = 0.9999):
        if not power > 0.0:
            raise ValueError(f"ema.power must be > 0, got {power}")
        if not 0.0 <= max_decay < 1.0:
            raise ValueError(f"ema.max_decay must be in [0, 1), got {max_decay}")
        self.power = power
        self.max_decay = max_decay
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay(self) -> float:
        """Decay used by the next update."""
        step = self.num_updates - 1
        if step <= 0:
            return 0.0
        return min(1.0 - (1.0 + step) ** -self.power, self.max_decay)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend the live model's parameters into the average; copy its buffers."""
        decay = self.decay()
        for ema_p, p in zip(self.model.parameters(), model.parameters(), strict=True):
            ema_p.lerp_(p.detach(), 1.0 - decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        """Averaged weights plus the update count that sets the next decay."""
        return {"model": self.model.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])
