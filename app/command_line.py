"""The command line of an entry, checked before Hydra starts (and writes anything).

An unknown key, a bad group choice, a syntax error or a run dir that cannot be made is one
`config error:` line with exit status 1 instead of Hydra's ten-line messages; `compose_config`
composes the shipped configs outside a Hydra run (benchmarks, the server's tests).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from app.checks import ConfigError, one_line
from app.run_dirs import check_run_dir

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
"""The repository's Hydra config directory."""


HYDRA_VALUE_FLAGS = frozenset({"--cfg", "-c", "--package", "-p", "--config-path", "-cp",
                               "--config-name", "-cn", "--config-dir", "-cd", "--info", "-i",
                               "--experimental-rerun"})
"""Hydra's command-line flags that take the next argument as their value (`--cfg job`)."""
HYDRA_NO_JOB_FLAGS = frozenset({"--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i",
                                "--shell-completion", "-sc"})
"""Flags with which Hydra prints something and runs no job (so no run dir is made)."""
HYDRA_OTHER_CONFIG_FLAGS = frozenset({"--config-path", "-cp", "--config-name", "-cn",
                                      "--config-dir", "-cd", "--experimental-rerun"})
"""Flags that make Hydra compose another config than the entry's: left to Hydra to check."""
INFO_CHOICES = frozenset({"all", "config", "defaults", "defaults-tree", "plugins",
                          "searchpath"})
"""The optional values of Hydra's `--info` (any other next argument is an override)."""


def hydra_overrides(argv: Sequence[str]) -> list[str]:
    """The overrides of a command line (`key=value`, `+key=value`, `~key`), Hydra's flags and
    their values left out."""
    overrides: list[str] = []
    expect_value: str | None = None
    for arg in argv:
        if expect_value is not None:
            flag, expect_value = expect_value, None
            if flag not in ("--info", "-i") or arg in INFO_CHOICES:
                continue  # the flag's value
        if arg.startswith("-"):
            if "=" not in arg and arg in HYDRA_VALUE_FLAGS:
                expect_value = arg
            continue
        overrides.append(arg)
    return overrides


def hydra_flags(argv: Sequence[str]) -> set[str]:
    """The Hydra flags of a command line (`--cfg`, `-m`, ...; `--flag=value` counts as the
    flag)."""
    return {a.split("=", 1)[0] for a in argv if a.startswith("-")}


def check_group_choices(argv: Sequence[str], groups: Sequence[str],
                        conf_dir: Path = CONF_DIR) -> None:
    """Reject an override Hydra cannot parse, or an unknown choice of a config group (e.g.
    `sampler=`, `env=`), in one line (Hydra's own errors take ten)."""
    args = [a for a in hydra_overrides(argv) if "=" in a]
    parser = OverridesParser.create()
    for arg in args:
        try:
            parser.parse_overrides([arg])
        except OverrideParseException as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else "syntax error"
            raise ConfigError(
                f"cannot parse the override {arg!r} ({first}); quote values with special "
                "characters, e.g. data.path='~/demos.zarr.zip'"
            ) from e
    overrides = parser.parse_overrides(args)
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
            if name is None:
                raise ConfigError(
                    f"{group}=null is not a choice of {group}; leave {group}= out for the default "
                    f"(available {group}s: {', '.join(available)})"
                )
            if isinstance(name, str) and name not in available:
                raise ConfigError(
                    f"unknown {group} {name!r}; available {group}s: {', '.join(available)}"
                )


def precheck_command_line(argv: Sequence[str], config_name: str, groups: Sequence[str],
                          conf_dir: Path = CONF_DIR) -> DictConfig | None:
    """Before Hydra starts (and writes anything into a run dir): parse the overrides, check
    the group choices and compose the config once, so an unknown key, a bad group value or a
    syntax error is one line. Returns the composed config (with `hydra`), or None for a
    multirun, whose jobs are checked one by one."""
    from hydra import compose, initialize_config_dir

    check_group_choices(argv, groups, conf_dir)
    flags = hydra_flags(argv)
    if flags & {"-m", "--multirun"} or flags & HYDRA_OTHER_CONFIG_FLAGS:
        return None
    overrides = hydra_overrides(argv)
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            return compose(config_name, overrides=overrides, return_hydra_config=True)
    except Exception as e:  # Hydra and OmegaConf raise several types for a bad command line
        raise ConfigError(f"{one_line(e)} (conf/{config_name}.yaml holds the keys)") from e


def compose_config(config_name: str, overrides: Sequence[str] = (),
                   conf_dir: Path = CONF_DIR) -> DictConfig:
    """conf/<config_name>.yaml composed with `overrides` outside a Hydra run (benchmarks and
    the server compose the same configs the entries do)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


def run_dir_of(cfg: DictConfig, key: str) -> Path | None:
    """The run dir `key` of a prechecked config, or None when it resolves only inside a
    running Hydra job (the default eval dir names the sampler choice): such a dir is new."""
    try:
        value = OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
    except OmegaConfBaseException:
        return None
    return None if value is None else Path(str(value)).expanduser()


def precheck_or_exit(argv: Sequence[str], config_name: str, groups: Sequence[str],
                     run_dir_key: str | None = None,
                     check_free: Callable[[DictConfig, Path], None] | None = None) -> None:
    """An entry's check before Hydra starts: the command line (precheck_command_line), then its
    run dir if it has one (`run_dir_key`), which must be creatable and pass
    `check_free(cfg, run_dir)` (not taken by another run). A failure exits with one
    `config error:` line."""
    runs_a_job = not hydra_flags(argv) & HYDRA_NO_JOB_FLAGS
    try:
        cfg = precheck_command_line(argv, config_name, groups)
        run_dir = (None if cfg is None or run_dir_key is None or not runs_a_job
                   else run_dir_of(cfg, run_dir_key))
        if run_dir is not None:
            check_run_dir(run_dir)
            if check_free is not None:
                check_free(cfg, run_dir)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
