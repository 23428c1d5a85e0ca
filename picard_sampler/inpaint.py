"""Inpainting constraints: samples that keep known values where a mask says so.

A constraint turns every reverse step ``f_j`` into ``g_j(x) = lerp(f_j(x), c_{j+1}, W)``: after
the step, each constrained entry is pulled towards the known value ``target`` noised to the
level the step lands on, ``c_{j+1} = sqrt(abar) target + sqrt(1 - abar) x_T`` (``x_T = noise[0]``,
so the constraint is a deterministic function of (target, weight, noise)); after the last step
``abar = 1`` and an entry of weight 1 equals ``target`` exactly. Weight 1 freezes an entry
(replacement), a weight in (0, 1) softly blends it (the soft-masked overlap of Real-Time
Chunking). Because ``g_j`` is again a fixed function of (x, step, noise), Picard iteration and
PCM sampling converge to the sequential sample *with the constraint*: exactness is unchanged
(docs/design.md §4.8).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from picard_sampler.schedules import Schedule


@dataclass
class Inpaint:
    """Known values ``target`` (B, *event) and their weights ``weight`` in [0, 1] (broadcastable
    to ``target``: e.g. (B, H, 1) for per-action-step weights). Entries of weight 0 are free."""

    target: torch.Tensor
    weight: torch.Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.target, torch.Tensor) or not isinstance(self.weight, torch.Tensor):
            raise TypeError("Inpaint target and weight must be tensors")
        try:
            self.weight = torch.broadcast_to(self.weight, self.target.shape)
        except RuntimeError as e:
            raise ValueError(
                f"Inpaint weight of shape {tuple(self.weight.shape)} does not broadcast to the "
                f"target's {tuple(self.target.shape)}"
            ) from e
        if not torch.isfinite(self.target).all():
            raise ValueError("Inpaint target contains NaN or inf")
        if not bool(((self.weight >= 0) & (self.weight <= 1)).all()):
            raise ValueError("Inpaint weights must lie in [0, 1]")

    def check_batch(self, noise: torch.Tensor) -> None:
        """The target must have the shape of one sample of ``noise`` (T+1, B, *event)."""
        if tuple(self.target.shape) != tuple(noise.shape[1:]):
            raise ValueError(
                f"Inpaint target must have shape {tuple(noise.shape[1:])} (B, *event) like the "
                f"noise's samples; got {tuple(self.target.shape)}"
            )

    def to(self, like: torch.Tensor) -> Inpaint:
        """On ``like``'s device and dtype."""
        return Inpaint(self.target.to(like), self.weight.to(like))

    def apply(self, schedule: Schedule, x_next: torch.Tensor, step: torch.Tensor,
              sample: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The constrained result of steps ``step`` (N,) for samples ``sample`` (N,), whose
        unconstrained results are ``x_next`` (N, *event)."""
        trail = [1] * (x_next.dim() - 1)
        scale = schedule.table("sqrt_ac_prev", x_next)[step].view(-1, *trail)
        spread = schedule.table("sqrt_1m_ac_prev", x_next)[step].view(-1, *trail)
        known = scale * self.target[sample] + spread * noise[0, sample]
        return torch.lerp(x_next, known, self.weight[sample])

    def keep(self, sample: torch.Tensor) -> torch.Tensor:
        """1 - weight of ``sample`` (N,): the share of a step's x-coefficient left after it."""
        return 1.0 - self.weight[sample]
