"""Config checks shared by the entry scripts: one line per bad value, naming the key.

Values are checked once, at the boundary, with their types (a string where an int belongs is
an error, not a traceback later); `run_entry` turns every ConfigError (and Hydra's own config
errors) into one line on stderr and exit status 1.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import InstantiationException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
"""The repository's Hydra config directory."""

SAMPLER_ALIASES = {
    "sequential": "sequential_ddpm100", "ddim": "sequential_ddim16",
    "picard": "picard_ddpm100", "picard_ddim": "picard_ddim16",
    "pcm": "pcm_ddim16", "pcm_ddpm": "pcm_ddpm100",
}
"""Old conf/sampler names (still accepted) and the names that say their schedule."""


class ConfigError(ValueError):
    """A config value that cannot work; the entry points print it as one line."""


Check = tuple[str, bool, str]
"""(dotted key, whether its value is acceptable, what is allowed)."""


def raise_first_failure(cfg: DictConfig, checks: Sequence[Check]) -> None:
    """Raise a ConfigError for the first failing check, naming the key, allowed and got."""
    for key, ok, allowed in checks:
        if not ok:
            raise ConfigError(f"{key} must be {allowed}; got {OmegaConf.select(cfg, key)!r}")


def is_int(value: Any, minimum: int | None = None) -> bool:
    """An int (not a bool) of at least `minimum`."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    return ok and (minimum is None or value >= minimum)


def is_number(value: Any, minimum: float | None = None, strict: bool = False) -> bool:
    """An int or float (not a bool), > `minimum` if `strict` else >= `minimum`."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or minimum is None:
        return ok
    return value > minimum if strict else value >= minimum


def device_ok(value: Any) -> bool:
    """'auto', 'cpu', 'cuda' or 'cuda:N'."""
    return value == "auto" or str(value).split(":")[0] in ("cpu", "cuda")


DEVICE_ALLOWED = "'auto', 'cpu', 'cuda' or 'cuda:N'"


def configure_torch(device: str, threads: int | None) -> torch.device:
    """Set torch's thread count (None keeps the default) and pick the device (auto: CUDA if
    any); a CUDA device on a machine without one is a ConfigError."""
    if threads is not None:
        torch.set_num_threads(threads)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device} but this machine has no CUDA device; use device=cpu "
                          "or device=auto")
    return chosen


def check_group_choices(argv: Sequence[str], groups: Sequence[str],
                        conf_dir: Path = CONF_DIR) -> None:
    """Reject an unknown choice of a config group (e.g. `sampler=`, `env=`) in one line (Hydra's
    own error takes ten)."""
    args = [a for a in argv if "=" in a and not a.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except OverrideParseException:
        return  # Hydra reports syntax errors itself
    for override in overrides:
        group = override.key_or_group
        if group not in groups or override.is_delete():
            continue
        names = (
            list(override.sweep_string_iterator())
            if override.is_sweep_override()
            else [override.value()]
        )
        available = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
        for name in names:
            if isinstance(name, str) and name not in available:
                raise ConfigError(
                    f"unknown {group} {name!r}; available {group}s: {', '.join(available)}"
                )


def one_line(error: BaseException) -> str:
    """An error (Hydra's instantiation errors unwrapped to their cause) as one line."""
    cause = error.__cause__ if isinstance(error, InstantiationException) and error.__cause__ \
        else error
    return " ".join(str(cause).split())


def run_entry(run: Callable[[], Any]) -> Any:
    """Run an entry's job: config errors become `config error: ...` on stderr with exit status
    1, an interrupt exit status 130 with its message (results so far are already written)."""
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        return run()
    except KeyboardInterrupt as e:
        print(str(e) or "interrupted", file=sys.stderr)
        sys.exit(130)
    except (ConfigError, InstantiationException, OmegaConfBaseException) as e:
        sys.exit(f"config error: {one_line(e)}")
