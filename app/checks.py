"""Config value checks shared by the entries: one line per bad value, naming the key.

Values are checked once, at the boundary, with their types (a string where an int belongs is
an error, not a traceback later): each entry lists its checks as (key, ok, allowed) and
`raise_first_failure` turns the first failing one into a ConfigError, which `app.entry`
prints as one line with exit status 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value that cannot work; the entry points print it as one line."""


Check = tuple[str, bool, str]
"""(dotted key, whether its value is acceptable, what is allowed)."""


def plain(config: Any) -> Any:
    """A DictConfig as plain, resolved containers, a mapping as a dict; anything else as is."""
    if OmegaConf.is_config(config):
        return OmegaConf.to_container(config, resolve=True)
    return dict(config) if isinstance(config, Mapping) else config


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


def one_line(error: BaseException) -> str:
    """An error (Hydra's instantiation errors unwrapped to their cause) as one line."""
    cause = error.__cause__ if isinstance(error, InstantiationException) and error.__cause__ \
        else error
    return " ".join(str(cause).split())
