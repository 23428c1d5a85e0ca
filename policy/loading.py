"""One entry point for every policy format: ours, Diffusion Policy's and LeRobot's.

`load_policy(path)` detects the format (policy.foreign.detect_format) and returns the policy in
eval mode, with no extra step; `load_with_metadata` also returns a checkpoint-like record
(`step`, `config` with the policy's Hydra config, `env` when the source names ours, and
`imported_from` for foreign formats) for the entry points.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from policy.checkpoint import load_checkpoint, policy_from_checkpoint
from policy.diffusion_policy import DiffusionPolicy
from policy.foreign import Imported, detect_format, import_diffusion_policy, import_lerobot


def import_foreign(path: str | Path, kind: str | None = None) -> Imported:
    """The Imported policy of a Diffusion Policy checkpoint or a LeRobot folder (ValueError
    for our own format: nothing to import); `kind`: the format if already detected."""
    kind = kind or detect_format(path)
    path = Path(path).expanduser()
    if kind == "diffusion_policy":
        return import_diffusion_policy(path)
    if kind == "lerobot":
        return import_lerobot(path)
    raise ValueError(f"{path} is already a picard-policy checkpoint")


def load_with_metadata(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[DiffusionPolicy, dict[str, Any]]:
    """The policy (EMA weights, eval mode) and a checkpoint-like record: our checkpoint itself,
    or for a foreign format {"format", "step", "config": {"policy", "env": None,
    "imported_from"}}."""
    kind = detect_format(path)
    path = Path(path).expanduser()
    if kind == "picard":
        record = load_checkpoint(path)
        policy = policy_from_checkpoint(path, record, map_location=map_location)
    else:
        imported = import_foreign(path, kind)
        record = {"format": kind, "step": imported.source.get("step", 0),
                  "config": {"policy": imported.config, "env": None,
                             "imported_from": imported.source}}
        policy = imported.build(map_location)
    attach_saved_propagators(policy, path)
    return policy, record


def attach_saved_propagators(policy: DiffusionPolicy, path: Path) -> None:
    """Attach the `propagators.pt` beside `path` (in it, for a folder) when it was fitted for
    this policy's base weights; one that belongs to other weights is skipped with a warning
    (a parareal sampler then says how to fit one)."""
    from policy.propagator import FILENAME, load_propagators

    file = (path if path.is_dir() else path.parent) / FILENAME
    if not file.is_file():
        return
    try:
        policy.attach_propagators(load_propagators(file, policy))
    except ValueError as e:
        warnings.warn(f"{e}; not using it", stacklevel=2)


def load_policy(path: str | Path, map_location: str | torch.device = "cpu") -> DiffusionPolicy:
    """Any supported policy file or folder as a DiffusionPolicy in eval mode."""
    return load_with_metadata(path, map_location)[0]
