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

``method="guide"`` leaves the steps alone and instead guides the model output towards the
target (pseudoinverse guidance, as Real-Time Chunking uses it): with ``x0`` the output's
clean-sample estimate and ``g = J^T W (target - x0)``, ``J = d x0 / d x`` (one vector-Jacobian
product through the denoiser, so it needs a differentiable one: eager PyTorch), the output
becomes ``eps' = eps - share * g / sqrt(1 - abar)``; ``share = 1`` is the full pseudoinverse
correction (``x0`` moves by ``g / sqrt(abar)``), and RTC's clip of the guidance weight at
``beta`` becomes ``share = min(1, beta * sqrt(abar (1 - abar)))`` in diffusion terms. The
guided output is again a fixed function of (x, t, cond, target, weight), so every sampler still
converges to the sequential sample with the same guidance; the target is approached, not met
exactly (docs/design.md §4.8).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from picard_sampler.schedules import Schedule

INPAINT_METHODS = ("replace", "guide")
GUIDANCE_CLIP = 5.0
"""Largest guidance weight of ``method="guide"`` (Real-Time Chunking's beta): the natural
weight grows without bound at both ends of sampling."""


def check_inpaint_method(method: Any, guidance_clip: Any) -> None:
    """Raise ValueError naming what is wrong with an inpainting `method` (INPAINT_METHODS) or
    `guidance_clip` (a number > 0)."""
    if method not in INPAINT_METHODS:
        raise ValueError(f"inpaint method must be one of {list(INPAINT_METHODS)}; got "
                         f"{method!r}")
    clip = guidance_clip
    if isinstance(clip, bool) or not isinstance(clip, int | float) or not clip > 0:
        raise ValueError(f"inpaint guidance_clip must be a number > 0; got {clip!r}")


@dataclass
class Inpaint:
    """Known values ``target`` (B, *event) and their weights ``weight`` in [0, 1] (broadcastable
    to ``target``: e.g. (B, H, 1) for per-action-step weights). Entries of weight 0 are free.
    ``method``: "replace" (after each step) or "guide" (the model output, ``guidance_clip``
    its largest weight); see the module docstring."""

    target: torch.Tensor
    weight: torch.Tensor
    method: str = "replace"
    guidance_clip: float = GUIDANCE_CLIP

    def __post_init__(self) -> None:
        check_inpaint_method(self.method, self.guidance_clip)
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
        return Inpaint(self.target.to(like), self.weight.to(like), self.method,
                       self.guidance_clip)

    @property
    def guides(self) -> bool:
        """Whether the constraint acts on the model output (guidance), not on the steps."""
        return self.method == "guide"

    def apply(self, schedule: Schedule, x_next: torch.Tensor, step: torch.Tensor,
              sample: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The constrained result of steps ``step`` (N,) for samples ``sample`` (N,), whose
        unconstrained results are ``x_next`` (N, *event); unchanged when guiding."""
        if self.guides:
            return x_next
        trail = [1] * (x_next.dim() - 1)
        scale = schedule.table("sqrt_ac_prev", x_next)[step].view(-1, *trail)
        spread = schedule.table("sqrt_1m_ac_prev", x_next)[step].view(-1, *trail)
        known = scale * self.target[sample] + spread * noise[0, sample]
        return torch.lerp(x_next, known, self.weight[sample])

    def keep(self, sample: torch.Tensor) -> torch.Tensor:
        """1 - weight of ``sample`` (N,): the share of a step's x-coefficient left after it
        (all of it when guiding: the steps are not changed)."""
        if self.guides:
            return torch.ones_like(self.weight[sample])
        return 1.0 - self.weight[sample]

    def guided_output(self, schedule: Schedule, out: torch.Tensor, x: torch.Tensor,
                      step: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The guided model output for rows at steps ``step`` (N,) of samples ``sample`` (N,):
        ``out`` must have been computed from ``x`` with autograd recording (the caller's
        job); returns a detached tensor."""
        if not out.requires_grad:
            raise ValueError(
                "inpaint method 'guide' needs a differentiable denoiser (eager PyTorch); this one "
                "returned an output without a gradient (an exported or captured runtime?)")
        x0 = schedule.predict_x0(out, x, step)
        residual = (self.weight[sample] * (self.target[sample] - x0)).detach()
        (pull,) = torch.autograd.grad(x0, x, grad_outputs=residual)
        trail = [1] * (x.dim() - 1)
        signal = schedule.table("sqrt_ac_t", x)[step].view(-1, *trail)
        spread = schedule.table("sqrt_1m_ac_t", x)[step].view(-1, *trail)
        # the share of the full pseudoinverse correction: weight / natural weight, both in the
        # flow-matching time RTC clips them in (natural weight 1 / sqrt(abar (1 - abar)))
        share = (self.guidance_clip * signal * spread).clamp(max=1.0)
        if schedule.prediction_type == "sample":  # the output is x0: x0 += share g / sqrt(abar)
            return (out + share / signal * pull).detach()
        return (out - share / spread * pull).detach()  # the same move of x0, through eps
