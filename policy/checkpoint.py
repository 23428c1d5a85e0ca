"""Training checkpoints: one atomic file with everything needed to resume or to deploy a policy.

A checkpoint holds the policy weights (normalizer included), the EMA weights, optimizer and LR
scheduler state, step/epoch, all RNG states and the resolved config, from which `load_policy`
rebuilds the policy with `hydra.utils.instantiate`. Files are written to a temporary name in the
same directory and moved into place with `os.replace`, so a killed run never leaves a torn file.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from torch import nn

from policy.diffusion_policy import DiffusionPolicy
from policy.ema import EMA

FORMAT = "picard-policy-checkpoint/1"


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


def _atomic_torch_save(payload: Mapping[str, Any], path: Path) -> Path:
    """torch.save to a temporary file in the same directory, fsync, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.ckpt.tmp")
    try:
        with tmp.open("wb") as f:
            torch.save(dict(payload), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


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
    """Atomically write a checkpoint to `path`; `config` is the resolved config as plain dicts."""
    payload = {
        "format": FORMAT,
        "step": step,
        "epoch": epoch,
        "model": policy.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "rng": rng_states(),
        "config": dict(config),
        "extra": dict(extra or {}),
    }
    return _atomic_torch_save(payload, Path(path))


def export_policy(
    src: str | Path, dst: str | Path, dtype: torch.dtype = torch.float16
) -> Path:
    """Write a deployable checkpoint: the EMA weights (stored as `dtype`) and config only.

    Drops the optimizer, raw weights and RNG states (a 4.6M-parameter policy goes from ~73 MB to
    ~9 MB in float16); `load_policy` reads it like a training checkpoint and casts back to
    float32. Normalizer statistics are kept in float32 so action scaling is unchanged.
    """
    ckpt = load_checkpoint(src)
    weights = {
        k: v.to(dtype) if v.is_floating_point() and not k.startswith("normalizer.") else v
        for k, v in ckpt["ema"]["model"].items()
    }
    payload = {
        "format": FORMAT,
        "step": ckpt["step"],
        "epoch": ckpt["epoch"],
        "model": None,
        "ema": {"model": weights},
        "config": ckpt["config"],
        "extra": {"exported_from": str(src), "weights_dtype": str(dtype)},
    }
    return _atomic_torch_save(payload, Path(dst))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`; clear errors if missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise ValueError(f"checkpoint {path} is corrupt or unreadable: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a picard-policy checkpoint (expected format {FORMAT})")
    return ckpt


def load_policy(
    path: str | Path, use_ema: bool = True, map_location: str | torch.device = "cpu"
) -> DiffusionPolicy:
    """Rebuild the policy from the checkpoint's config and load its (EMA) weights, in eval mode."""
    ckpt = load_checkpoint(path, map_location)
    if not use_ema and ckpt["model"] is None:
        raise ValueError(f"{path} is an exported checkpoint: it holds only the EMA weights")
    policy = hydra.utils.instantiate(ckpt["config"]["policy"], _convert_="all")
    policy.load_state_dict(ckpt["ema"]["model"] if use_ema else ckpt["model"])
    return policy.to(map_location).eval()
