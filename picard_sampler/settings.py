"""The two records a Picard or PCM sampler call is made of (docs/design.md §4).

``SamplerSettings``: the method's knobs, what a config chooses (window, tolerance, walk,
stopping limits, acceleration, PCM switching); frozen and checked once, here, when built.
``CallInputs``: what one call brings besides the denoiser, noise and conditioning (a warm
start, its own time budget and the clock it is read on, an observer, an inpainting constraint,
the Parareal propagator); the same settings serve every call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch

from picard_sampler.inpaint import Inpaint

Callback = Callable[[dict[str, Any]], None]
UPDATES = ("scan", "drift", "parareal")
ACCELERATIONS = ("none", "anderson")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_budget(budget_s: Any) -> None:
    """Raise ValueError unless ``budget_s`` is None or a number of seconds > 0."""
    if budget_s is not None and (not _is_number(budget_s) or not budget_s > 0):
        raise ValueError(f"budget_s must be None or a number of seconds > 0; got {budget_s!r}")


@dataclass(frozen=True)
class SamplerSettings:
    """The knobs of Picard and PCM sampling (the sequential sampler ignores them, but a bad
    value is still refused). ``window``: slots per sample in a round (None: all T steps);
    ``tol``: the stopping tolerance in noise-scale units (§4.4); ``update``: the walk
    (scan, drift, parareal); ``max_rounds`` / ``budget_s``: anytime limits (§4.5);
    ``accel`` / ``accel_memory``: Anderson acceleration over that many rounds (§4.9);
    ``switch_rounds``: PCM evaluations of a slot before the base model takes over (§4.7)."""

    window: int | None = None
    tol: float = 0.1
    update: str = "scan"
    max_rounds: int | None = None
    budget_s: float | None = None
    accel: str = "none"
    accel_memory: int = 3
    switch_rounds: int = 1

    def __post_init__(self) -> None:
        if self.update not in UPDATES:
            raise ValueError(f"update must be one of {list(UPDATES)}; got {self.update!r}")
        if self.window is not None and (not _is_int(self.window) or self.window < 1):
            raise ValueError(f"window must be a positive int or None (= all steps); "
                             f"got {self.window!r}")
        if not _is_number(self.tol) or not 0 <= self.tol < math.inf:
            raise ValueError(f"tol must be a finite number >= 0 (inf would stop after one round, "
                             f"never exact); got {self.tol!r}")
        if self.max_rounds is not None and (not _is_int(self.max_rounds) or self.max_rounds < 1):
            raise ValueError(f"max_rounds must be a positive int or None; got {self.max_rounds!r}")
        if self.accel not in ACCELERATIONS:
            raise ValueError(f"accel must be one of {list(ACCELERATIONS)}; got {self.accel!r}")
        if not _is_int(self.accel_memory) or self.accel_memory < 1:
            raise ValueError(f"accel_memory must be an int >= 1; got {self.accel_memory!r}")
        check_budget(self.budget_s)
        if not _is_int(self.switch_rounds) or self.switch_rounds < 0:
            raise ValueError(f"switch_rounds must be an int >= 0; got {self.switch_rounds!r}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The knob names, in field order (the keys a config or a call override may set)."""
        return tuple(f.name for f in fields(cls))

    def window_for(self, steps: int) -> int:
        """The window in slots for a schedule of ``steps`` steps; ValueError when acceleration
        is asked for with less than the full window."""
        window = min(self.window or steps, steps)
        if self.accel != "none" and window < steps:
            raise ValueError(f"accel={self.accel!r} needs the full window (window=None or "
                             f">= {steps}); got window {window}")
        return window

    def as_dict(self) -> dict[str, Any]:
        """The knobs by name (what `Sampler.config` and results.json record)."""
        return {name: getattr(self, name) for name in self.names()}


@dataclass(frozen=True, eq=False)
class CallInputs:
    """What one sampler call brings besides denoiser, noise and conditioning. ``init``: a
    ``(T+1, B, H, D)`` warm start (§4.6); ``budget_s``: this call's time limit in seconds, on
    top of the settings' own (the smaller wins), read on ``clock`` (None: time.perf_counter);
    ``callback``: called after every round with a dict (round, x, trajectory, ...);
    ``inpaint``: known values to keep (§4.8); ``propagator``: the (T, E, E) linear coarse steps
    of ``update="parareal"`` (§4.10)."""

    init: torch.Tensor | None = None
    budget_s: float | None = None
    clock: Callable[[], float] | None = None
    callback: Callback | None = None
    inpaint: Inpaint | None = None
    propagator: torch.Tensor | None = None

    def __post_init__(self) -> None:
        check_budget(self.budget_s)
