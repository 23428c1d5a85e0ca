"""Parareal with a learned linear coarse propagator (docs/design.md §4.10).

A Picard round evaluates the fine step ``f_j`` (one base-model call per slot) at the old
iterate, in parallel, then walks the window once. Written as Parareal, the walk is
``Xnew[j+1] = G_j(Xnew[j]) + f_j(X[j]) - G_j(X[j])`` with a cheap coarse propagator ``G_j``:
the drift update takes ``G_j(x) = x``, the scan update the step's own affine part
``G_j(x) = a_j x``. Whatever ``G_j`` is, the fixed point is ``X[j+1] = f_j(X[j])``: the
sequential sample. The closer ``G_j`` is to ``f_j`` the fewer rounds it takes, since an error
``e`` at slot j reaches slot j+1 in the same round through ``G_j`` and is left with
``(J_j - M_j) e`` to fix in the next (``J_j`` the step's Jacobian).

``update="parareal"`` uses ``G_j(x) = M_j x`` with ``M_j`` a matrix over the flattened chunk
(E = H * Da entries): the step's Jacobian averaged over calibration chunks (sequential
trajectories of real observations), fitted here by finite differences with the denoiser
alone (any runtime, no autograd). Its cost in a round is one (E, E) matrix-vector product per
slot, nothing next to a model call.
"""

from __future__ import annotations

from typing import Any

import torch

from picard_sampler.schedules import Schedule
from picard_sampler.tensors import check_noise, take_cond

FD_STEP = 1e-3  # forward-difference step of the fit, in normalized action units


def check_propagator(propagator: Any, schedule: Schedule, noise: torch.Tensor) -> torch.Tensor:
    """``propagator`` as a (T, E, E) tensor on the noise's device and dtype, or a ValueError
    that says what is wrong with it."""
    T = schedule.num_inference_steps
    elems = noise[0, 0].numel()
    if not isinstance(propagator, torch.Tensor):
        raise ValueError("update=parareal needs a propagator: a (T, E, E) tensor of linear "
                         f"coarse steps (picard_sampler.fit_linear_propagator); got "
                         f"{type(propagator).__name__}")
    if tuple(propagator.shape) != (T, elems, elems):
        raise ValueError(f"propagator must have shape (T, E, E) = ({T}, {elems}, {elems}) for "
                         f"{schedule!r} and chunks of {elems} entries; got "
                         f"{tuple(propagator.shape)}")
    if not torch.isfinite(propagator).all():
        raise ValueError("propagator contains NaN or inf")
    return propagator.to(noise)


@torch.no_grad()
def fit_linear_propagator(
    denoiser: Any,
    schedule: Schedule,
    noise: torch.Tensor,
    cond: Any = None,
    fd_step: float = FD_STEP,
    max_rows: int = 4096,
) -> torch.Tensor:
    """The mean Jacobian of each step's map ``x -> step_mean(denoiser(x), x)`` along the
    sequential trajectories of ``noise`` (T+1, B, H, D) and ``cond`` (B rows): (T, E, E),
    E = H * D, by forward differences of size ``fd_step`` (E + 1 rows per sample and step,
    batched up to ``max_rows`` rows per call). Clipping of x0 and any other nonlinearity of the
    step are averaged in; the injected noise does not depend on x and drops out."""
    if not fd_step > 0:
        raise ValueError(f"fd_step must be > 0; got {fd_step!r}")
    check_noise(schedule, noise)
    T, B = schedule.num_inference_steps, noise.shape[1]
    event = noise.shape[2:]
    elems = noise[0, 0].numel()
    basis = fd_step * torch.eye(elems, dtype=noise.dtype, device=noise.device).view(elems, *event)
    timesteps = schedule.timesteps.to(noise.device)
    noise_std = schedule.table("noise_std", noise)
    per_call = max(1, max_rows // (elems + 1))
    x = noise[0]
    total = torch.zeros(T, elems, elems, dtype=torch.float64, device=noise.device)
    for i in range(T):
        means = []
        for lo in range(0, B, per_call):
            rows = torch.arange(lo, min(lo + per_call, B), device=noise.device)
            probes = torch.cat([x[rows, None], x[rows, None] + basis[None]], 1)
            probes = probes.reshape(-1, *event)  # (n (E + 1), *event)
            idx = torch.full((probes.shape[0],), i, dtype=torch.long, device=noise.device)
            out = denoiser(probes, timesteps[idx], take_cond(cond, rows.repeat_interleave(
                elems + 1)))
            f = schedule.step_mean(out, probes, idx).reshape(len(rows), elems + 1, elems)
            total[i] += ((f[:, 1:] - f[:, :1]) / fd_step).transpose(1, 2).double().sum(0)
            means.append(f[:, 0].reshape(len(rows), *event))
        x = torch.cat(means) + noise_std[i] * noise[i + 1]
    propagator = (total / B).to(noise.dtype)
    if not torch.isfinite(propagator).all():
        raise ValueError("the fitted propagator is not finite (the denoiser returned NaN or "
                         "inf on the calibration chunks)")
    return propagator
