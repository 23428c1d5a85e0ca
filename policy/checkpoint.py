"""Training checkpoints: one atomic file with everything needed to resume or to deploy a policy.

A checkpoint holds the policy weights (normalizer included), the EMA weights, optimizer and LR
scheduler state, step/epoch, all RNG states and the resolved config, from which
`load_policy_checkpoint` rebuilds the policy through the allow-list of `policy.safe_config` (a
file's config is data: nothing it names is imported or instantiated). A policy with a Picard
Consistency Model attached (`DiffusionPolicy.attach_pcm`) stores the PCM under the key "pcm"
(`PCM_KEY`): `{"config": constructor args, "model": raw weights, "ema": EMA weights}`, the base
weights staying under "model" / "ema" as for any policy; `load_policy_checkpoint` re-attaches it.
`export_pcm` writes a small PCM-only file that names its base checkpoint instead of copying it.
Files are written to a temporary name in the same directory and moved into place with `os.replace`,
so a killed run never leaves a torn file.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from policy.diffusion_policy import DiffusionPolicy
from policy.ema import EMA
from policy.file_io import (
    CheckpointError,
    atomic_torch_save,
    atomic_write,
    check_regular_file,
    check_torch_zip,
    weights_fingerprint,
)
from policy.pcm import build_pcm
from policy.safe_config import build_policy, check_pcm_config, check_weights

FORMAT = "picard-policy-checkpoint/1"
PCM_KEY = "pcm"
"""Checkpoint key of the PCM's config and weights (eval_policy.PCM_CHECKPOINT_KEY)."""
_PCM_PREFIX = f"{PCM_KEY}."


def rng_states() -> dict[str, Any]:
    """Python, numpy, torch CPU and CUDA generator states (weights_only-loadable types)."""
    # numpy's legacy global RNG is saved in case a dependency draws from it.
    name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    return {
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_states(states: Mapping[str, Any]) -> None:
    """Inverse of `rng_states`."""
    random.setstate(_as_tuples(states["python"]))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _as_tuples(x: Any) -> Any:
    """Lists back to tuples, recursively (random.setstate insists on tuples)."""
    return tuple(_as_tuples(v) for v in x) if isinstance(x, list | tuple) else x


def save_checkpoint(
    path: str | Path,
    *,
    policy: nn.Module,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: int,
    epoch: int,
    config: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Atomically write a checkpoint to `path`; `config` is the resolved config as plain dicts.

    An attached PCM's weights go under `PCM_KEY` rather than into "model" / "ema"."""
    model, pcm_model = split_pcm_weights(policy.state_dict())
    ema_state = ema.state_dict()
    ema_model, pcm_ema = split_pcm_weights(ema_state["model"])
    payload = {
        "format": FORMAT,
        "step": step,
        "epoch": epoch,
        "model": model,
        "ema": {**ema_state, "model": ema_model},
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "rng": rng_states(),
        "config": dict(config),
        "extra": dict(extra or {}),
    }
    pcm = getattr(policy, "pcm", None)
    if pcm is not None:
        payload[PCM_KEY] = {"config": dict(pcm.config), "model": pcm_model, "ema": pcm_ema}
    return atomic_torch_save(payload, Path(path))


def split_pcm_weights(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A policy state dict -> (base weights, PCM weights without the "pcm." prefix)."""
    base = {k: v for k, v in state.items() if not k.startswith(_PCM_PREFIX)}
    pcm = {k[len(_PCM_PREFIX) :]: v for k, v in state.items() if k.startswith(_PCM_PREFIX)}
    return base, pcm


def policy_weights(ckpt: Mapping[str, Any], part: str = "ema") -> dict[str, torch.Tensor]:
    """The full policy state dict of a checkpoint: `part` ("ema" or "model") base weights plus
    the same part of the PCM's, if it has one (the inverse of `save_checkpoint`'s split)."""
    base = ckpt["ema"]["model"] if part == "ema" else ckpt["model"]
    pcm = (ckpt.get(PCM_KEY) or {}).get(part) or {}
    return {**base, **{_PCM_PREFIX + k: v for k, v in pcm.items()}}


def export_policy(
    src: str | Path, dst: str | Path, dtype: torch.dtype = torch.float16
) -> Path:
    """Write a deployable checkpoint: the EMA weights (stored as `dtype`) and config only.

    Drops the optimizer, raw weights and RNG states (a 4.6M-parameter policy goes from ~73 MB to
    ~9 MB in float16); `load_policy_checkpoint` reads it like a training checkpoint and casts
    back to float32. Normalizer statistics are kept in float32 so action scaling is unchanged.
    """
    ckpt = load_checkpoint(src)
    if ckpt["ema"] is None:
        raise ValueError(f"{src} is a PCM-only file: export its base checkpoint instead")
    payload = {
        "format": FORMAT,
        "step": ckpt["step"],
        "epoch": ckpt["epoch"],
        "model": None,
        "ema": {"model": _cast_weights(ckpt["ema"]["model"], dtype)},
        "config": ckpt["config"],
        "extra": {"exported_from": str(src), "weights_dtype": str(dtype)},
    }
    if PCM_KEY in ckpt:
        payload[PCM_KEY] = _exported_pcm(ckpt, dtype)
    return atomic_torch_save(payload, Path(dst))


def write_config_yaml(ckpt_path: str | Path, out: str | Path) -> Path:
    """Write a checkpoint's resolved training config as YAML next to a shipped checkpoint, so a
    reader sees the recipe without loading torch; written atomically like the checkpoints."""
    from omegaconf import OmegaConf

    ckpt_path = Path(ckpt_path)
    config = load_checkpoint(ckpt_path)["config"]
    text = (
        f"# Resolved training config of {ckpt_path.name} (written by train_pcm.py into the "
        f"checkpoint).\n{OmegaConf.to_yaml(OmegaConf.create(config))}"
    )
    return atomic_write(out, lambda f: f.write(text.encode()))


def export_pcm(
    src: str | Path, dst: str | Path, base: str | Path, dtype: torch.dtype = torch.float16
) -> Path:
    """Write a PCM-only deployable file: the PCM's EMA weights and config plus the path of its
    base checkpoint `base` (relative to `dst`'s folder) and a fingerprint of the base weights.

    `src` is a PCM training checkpoint; its base weights must equal `base`'s (as float32), so the
    PCM is known to belong to that base. `load_policy_checkpoint(dst)` loads the base, then the PCM.
    """
    ckpt = load_checkpoint(src)
    if PCM_KEY not in ckpt or ckpt["ema"] is None:
        raise ValueError(f"{src} is not a PCM training checkpoint (no '{PCM_KEY}' key)")
    base_ckpt = load_checkpoint(base)
    if base_ckpt["ema"] is None:
        raise ValueError(f"base {base} is itself a PCM-only file")
    ours, theirs = ckpt["ema"]["model"], base_ckpt["ema"]["model"]
    differ = sorted(
        k for k in set(ours) | set(theirs)
        if k not in ours or k not in theirs or not torch.equal(ours[k].float(), theirs[k].float())
    )
    if differ:
        raise ValueError(
            f"the PCM in {src} was trained on other base weights than {base}'s "
            f"(first differing key: {differ[0]})"
        )
    dst = Path(dst)
    relative = os.path.relpath(Path(base).resolve(), dst.resolve().parent)
    payload = {
        "format": FORMAT,
        "step": ckpt["step"],
        "epoch": ckpt["epoch"],
        "model": None,
        "ema": None,
        "base_checkpoint": relative,
        "base_fingerprint": weights_fingerprint(theirs),
        "config": ckpt["config"],
        PCM_KEY: _exported_pcm(ckpt, dtype),
        "extra": {"exported_from": str(src), "weights_dtype": str(dtype)},
    }
    return atomic_torch_save(payload, dst)


def _cast_weights(weights: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict:
    """Floating-point weights as `dtype`; normalizer statistics stay float32."""
    return {
        k: v.to(dtype) if v.is_floating_point() and not k.startswith("normalizer.") else v
        for k, v in weights.items()
    }


def _exported_pcm(ckpt: Mapping[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """The PCM entry of an exported file: config and EMA weights as `dtype`, no raw weights."""
    return {
        "config": ckpt[PCM_KEY]["config"],
        "model": None,
        "ema": _cast_weights(ckpt[PCM_KEY]["ema"], dtype),
    }


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint` (torch's weights-only unpickler: tensors
    and plain containers only); CheckpointError naming the file if it is missing a piece,
    corrupt or not ours."""
    path = Path(path)
    check_regular_file(path)
    check_torch_zip(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable: {reason}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a picard-policy checkpoint (expected format "
                              f"{FORMAT})")
    for key, kinds in (("config", dict), ("ema", dict | None), ("model", dict | None)):
        if not isinstance(ckpt.get(key), kinds):
            raise CheckpointError(f"checkpoint {path}: '{key}' is missing or a "
                                  f"{type(ckpt.get(key)).__name__}, not a mapping")
    if ckpt["ema"] is not None and not isinstance(ckpt["ema"].get("model"), dict):
        raise CheckpointError(f"checkpoint {path}: 'ema.model' is missing or not a mapping")
    if not isinstance(ckpt["config"].get("policy"), dict):
        raise CheckpointError(f"checkpoint {path}: config.policy is missing or not a mapping")
    if PCM_KEY in ckpt and not (isinstance(ckpt[PCM_KEY], dict)
                                and isinstance(ckpt[PCM_KEY].get("config"), dict)):
        raise CheckpointError(f"checkpoint {path}: '{PCM_KEY}' must be a mapping with a config")
    return ckpt


def load_policy_checkpoint(
    path: str | Path, use_ema: bool = True, map_location: str | torch.device = "cpu"
) -> DiffusionPolicy:
    """Rebuild the policy from one of OUR checkpoint files and load its (EMA) weights, in eval
    mode. Most callers want `policy.load_policy` instead: every format (ours, Diffusion
    Policy's, LeRobot's) plus the Parareal propagators beside the file; this one reads only our
    format, attaches no propagators, and can load the raw training weights (`use_ema=False`).

    A PCM stored in the checkpoint is attached (`DiffusionPolicy.attach_pcm`); a PCM-only file
    (`export_pcm`) loads its base checkpoint first and checks the base weights' fingerprint."""
    path = Path(path)
    return policy_from_checkpoint(path, load_checkpoint(path, map_location), use_ema, map_location)


def policy_from_checkpoint(
    path: Path, ckpt: Mapping[str, Any], use_ema: bool = True,
    map_location: str | torch.device = "cpu",
) -> DiffusionPolicy:
    """`load_policy_checkpoint` for a checkpoint already read from `path` (no second read)."""
    if ckpt["ema"] is None:
        return _load_pcm_only(path, ckpt, use_ema, map_location)
    if not use_ema and ckpt["model"] is None:
        raise ValueError(f"{path} is an exported checkpoint: it holds only the EMA weights")
    part = "ema" if use_ema else "model"
    base = ckpt["ema"]["model"] if use_ema else ckpt["model"]
    policy = build_policy(ckpt["config"]["policy"], str(path), weights=base)
    if PCM_KEY in ckpt:
        policy.attach_pcm(_checked_pcm(policy, ckpt[PCM_KEY], part, path))
    return policy.to(map_location).eval()


def _checked_pcm(policy: DiffusionPolicy, entry: Mapping[str, Any], part: str, path: Path
                 ) -> nn.Module:
    """The PCM of a checkpoint's `PCM_KEY` entry for `policy`: config and `part` weights
    checked (names, shapes, dtypes, finite) before they are loaded."""
    config = check_pcm_config(entry.get("config"), str(path))
    try:
        pcm = build_pcm(policy, **config)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: pcm.config: {str(e).splitlines()[0]}") from e
    weights = entry.get(part)
    if not isinstance(weights, Mapping):
        raise CheckpointError(f"{path}: pcm.{part} is missing or not a mapping of weights")
    check_pcm_weights(weights, pcm, str(path))
    pcm.load_state_dict({k: v.float() if v.is_floating_point() else v
                         for k, v in weights.items()})
    return pcm.eval()


def check_pcm_weights(weights: Mapping[str, Any], pcm: nn.Module, where: str) -> None:
    """A PCM's weights against the built PCM (names, shapes, float dtypes, finite)."""
    check_weights(weights, pcm.state_dict(), where, prefix="pcm.")


def _load_pcm_only(
    path: Path, ckpt: Mapping[str, Any], use_ema: bool, map_location: str | torch.device
) -> DiffusionPolicy:
    """`load_policy_checkpoint` for a file written by `export_pcm`: its base, then its PCM."""
    if not use_ema:
        raise ValueError(f"{path} is an exported PCM: it holds only the EMA weights")
    if not isinstance(ckpt.get("base_checkpoint"), str) or PCM_KEY not in ckpt:
        raise CheckpointError(f"{path} holds no base weights and names no base checkpoint")
    base_path = (path.parent / ckpt["base_checkpoint"]).resolve()
    if not base_path.is_file():
        raise FileNotFoundError(
            f"{path} needs its base checkpoint {ckpt['base_checkpoint']} (relative to "
            f"{path.parent}), which is missing: {base_path}"
        )
    base = load_checkpoint(base_path, map_location)
    if base["ema"] is None:
        raise ValueError(f"base checkpoint {base_path} of {path} is itself a PCM-only file")
    fingerprint = weights_fingerprint(base["ema"]["model"])
    if fingerprint != ckpt["base_fingerprint"]:
        raise ValueError(
            f"base checkpoint {base_path} is not the one the PCM in {path} was trained on "
            "(the weights' fingerprint differs): retrain or re-export the PCM"
        )
    policy = policy_from_checkpoint(base_path, base, use_ema=True)
    policy.attach_pcm(_checked_pcm(policy, ckpt[PCM_KEY], "ema", path))
    return policy.to(map_location).eval()
