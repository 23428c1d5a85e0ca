"""Fitted linear coarse propagators for `update="parareal"` sampling, stored beside a policy.

A propagator is one (T, E, E) tensor per inference schedule (picard_sampler.parareal), fitted
on the base model alone, so it belongs to the base weights: the file records their fingerprint
and `load_propagators` refuses a file fitted for other weights. One file, `propagators.pt`
beside the checkpoint, holds every schedule fitted for it; `load_policy` attaches it when it
matches (docs/design.md §4.10). Read with `torch.load(weights_only=True)`: tensors and plain
containers only, never code.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from picard_sampler import CallInputs, Sampler, Schedule, exact_errors, fit_linear_propagator
from picard_sampler.parareal import FD_STEP

FILENAME = "propagators.pt"
FORMAT = "picard-policy propagators v1"


def schedule_key(schedule: Schedule) -> str:
    """A readable key naming the schedule and every setting: 'ddpm-100-<hash of its config>'."""
    config = json.dumps({"class": type(schedule).__name__, **schedule.config}, sort_keys=True,
                        default=str)
    digest = hashlib.sha256(config.encode()).hexdigest()[:10]
    return f"{schedule.name}-{schedule.num_inference_steps}-{digest}"


def base_fingerprint(policy: Any) -> str:
    """The fingerprint of the weights a propagator is fitted on: the base UNet's."""
    from policy.file_io import weights_fingerprint

    return weights_fingerprint(policy.model.state_dict())


def fit_propagator(policy: Any, schedule: Schedule, cond: torch.Tensor, seed: int = 0,
                   fd_step: float = FD_STEP) -> torch.Tensor:
    """The (T, E, E) propagator of `policy` under `schedule`, calibrated on encoded
    observations `cond` (B, Dc) with noise drawn from `seed` (through the policy's runtime)."""
    noise = _fixed_noise(policy, schedule, cond, seed)
    return fit_linear_propagator(policy.denoiser, schedule, noise, cond, fd_step=fd_step)


def _fixed_noise(policy: Any, schedule: Schedule, cond: torch.Tensor, seed: int) -> torch.Tensor:
    """The (T+1, B, H, Da) up-front noise of a fit or check, drawn from `seed` on the CPU (the
    same draw on any device), on `cond`'s device."""
    noise = torch.randn((schedule.num_inference_steps + 1, cond.shape[0], policy.horizon,
                         policy.action_dim), generator=torch.Generator().manual_seed(seed))
    return noise.to(cond.device)


def check_propagator(policy: Any, schedule: Schedule, cond: torch.Tensor,
                     propagator: torch.Tensor, seed: int = 0, tol: float = 0.1
                     ) -> dict[str, dict[str, float]]:
    """How much a propagator saves: full-window Picard at `tol` on encoded observations `cond`
    with one fixed noise draw, once with the scan walk and once with `propagator` (Parareal).
    {"scan" | "parareal": {"rounds" (the batch's), "rounds_mean" (per sample), "converged"
    (fraction), "exact_err_max" (vs the sequential chunk, normalized actions)}}; both walks
    converge to the same chunks, so rounds are what a propagator is for (docs/design.md §4.10)."""
    noise = _fixed_noise(policy, schedule, cond, seed)
    with torch.no_grad():
        reference, _ = Sampler(schedule, "sequential")(policy.denoiser, noise, cond)
        report = {}
        for update, inputs in (("scan", CallInputs()),
                               ("parareal", CallInputs(propagator=propagator.float()))):
            sample, stats = Sampler(schedule, "picard", tol=tol, update=update)(
                policy.denoiser, noise, cond, inputs)
            report[update] = {
                "rounds": int(stats.rounds),
                "rounds_mean": round(sum(stats.rounds_per_sample) / stats.batch, 3),
                "converged": round(stats.n_converged / stats.batch, 3),
                "exact_err_max": round(float(exact_errors(sample, reference).max()), 5),
            }
    return report


def save_propagators(path: str | Path, policy: Any,
                     entries: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write `entries` ({schedule_key: {"propagator", "schedule", "calibration"}}) for the
    policy's base weights to `path` atomically, merged with the entries already there for the
    same weights (a file fitted for other weights, or unreadable, is replaced)."""
    from policy.file_io import atomic_torch_save

    path = Path(path)
    fingerprint = base_fingerprint(policy)
    merged: dict[str, Any] = {}
    if path.is_file():
        try:
            merged = dict(_read(path, fingerprint))
        except ValueError:
            merged = {}
    merged.update({k: dict(v) for k, v in entries.items()})
    return atomic_torch_save({"format": FORMAT, "base_fingerprint": fingerprint,
                              "entries": merged}, path)


def _read(path: Path, fingerprint: str) -> Mapping[str, Any]:
    from policy.file_io import check_regular_file, check_torch_zip

    check_regular_file(path, "propagator file")
    check_torch_zip(path, "propagator file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign files raise several types
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"propagator file {path} is corrupt or unreadable: {reason}") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a propagator file (expected format {FORMAT!r})")
    if payload.get("base_fingerprint") != fingerprint:
        raise ValueError(f"propagator file {path} was fitted for other base weights than this "
                         f"policy's; refit it with scripts/fit_propagator.py")
    if not isinstance(payload.get("entries"), dict):
        raise ValueError(f"propagator file {path}: 'entries' is not a mapping")
    return payload["entries"]


MAX_PROPAGATOR_ENTRY = 1e3
"""Largest |entry| of a fitted propagator: it maps x_t to x_{t-1} (the shipped ones stay below
1); beyond this the file is not a propagator of a diffusion step."""


def load_propagators(path: str | Path, policy: Any) -> dict[str, torch.Tensor]:
    """{schedule_key: (T, E, E) tensor} from a file fitted for this policy's base weights,
    each checked: a float (T, E, E) tensor with E = horizon x action_dim and T the key's
    step count, finite, entries within MAX_PROPAGATOR_ENTRY. A ValueError that names the file
    and the entry when it is unreadable, malformed or belongs to other weights."""
    path = Path(path)
    entries = _read(path, base_fingerprint(policy))
    size = policy.horizon * policy.action_dim
    checked = {}
    for key, entry in entries.items():
        name = f"propagator file {path}: entry {str(key)[:60]!r}"
        steps = str(key).split("-")
        tensor = entry.get("propagator") if isinstance(entry, Mapping) else None
        if len(steps) != 3 or not steps[1].isdigit():
            raise ValueError(f"{name} is not a schedule key (name-steps-hash)")
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise ValueError(f"{name} holds no float 'propagator' tensor")
        expected = (int(steps[1]), size, size)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}; this policy needs "
                             f"{expected}")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name} holds NaN or inf")
        if float(tensor.abs().max()) > MAX_PROPAGATOR_ENTRY:
            raise ValueError(f"{name} has entries beyond {MAX_PROPAGATOR_ENTRY:g} in magnitude")
        checked[str(key)] = tensor.float()
    return checked
