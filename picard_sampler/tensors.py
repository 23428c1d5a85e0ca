"""Checks and row selection for the tensors every sampler takes: the pre-drawn noise and the
conditioning (a tensor, a dict of tensors, or None). Shared by the samplers and the propagator
fit (picard_sampler.parareal), so neither imports the other for them."""

from __future__ import annotations

from typing import Any

import torch

from picard_sampler.schedules import Schedule


def check_noise(schedule: Schedule, noise: torch.Tensor) -> None:
    """Raise ValueError unless ``noise`` is a finite ``(T+1, B, ...)`` tensor for ``schedule``."""
    T = schedule.num_inference_steps
    if noise.dim() < 3 or noise.shape[0] != T + 1:
        raise ValueError(
            f"noise must have shape (T+1, B, ...) = ({T + 1}, B, H, D) for {schedule!r}; "
            f"got {tuple(noise.shape)}"
        )
    if not torch.isfinite(noise).all():
        raise ValueError("noise contains NaN or inf")


def take_cond(cond: Any, sample_idx: torch.Tensor) -> Any:
    """Rows ``sample_idx`` of the conditioning (a tensor, a dict of tensors, or None)."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond[sample_idx]
    if isinstance(cond, dict):
        return {k: take_cond(v, sample_idx) for k, v in cond.items()}
    raise TypeError(f"cond must be a tensor, a dict of tensors or None; got {type(cond).__name__}")


def clone_cond(cond: Any) -> Any:
    """A copy of the conditioning made outside inference mode, so autograd may save it."""
    if isinstance(cond, torch.Tensor):
        return cond.clone()
    if isinstance(cond, dict):
        return {k: clone_cond(v) for k, v in cond.items()}
    return cond
