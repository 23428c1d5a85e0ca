"""Config checks shared by the entry scripts: one line per bad value, naming the key.

Values are checked once, at the boundary, with their types (a string where an int belongs is
an error, not a traceback later); `run_entry` turns every ConfigError (and Hydra's own config
errors) into one line on stderr and exit status 1.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import InstantiationException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from policy.checkpoint import atomic_write, clean_stale_temp_files

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
"""The repository's Hydra config directory."""

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


def device_ok(value: Any) -> bool:
    """'auto', 'cpu', 'cuda' or 'cuda:N'."""
    return isinstance(value, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", value) is not None


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
    """Reject an override Hydra cannot parse, or an unknown choice of a config group (e.g.
    `sampler=`, `env=`), in one line (Hydra's own errors take ten)."""
    args = [a for a in argv if "=" in a and not a.startswith("-")]
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


def one_line(error: BaseException) -> str:
    """An error (Hydra's instantiation errors unwrapped to their cause) as one line."""
    cause = error.__cause__ if isinstance(error, InstantiationException) and error.__cause__ \
        else error
    return " ".join(str(cause).split())


ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                      errno.EIO}
"""OSErrors that are the machine's state (full or read-only disk, permissions), not a bug."""


def interrupt_on_sigterm() -> None:
    """Make SIGTERM (what a cluster scheduler or `kill` sends) act as Ctrl-C in the main thread,
    so every entry stops the same clean way and keeps its finished work."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt("terminated (SIGTERM)")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def precheck_command_line(argv: Sequence[str], config_name: str, groups: Sequence[str],
                          conf_dir: Path = CONF_DIR) -> DictConfig | None:
    """Before Hydra starts (and writes anything into a run dir): parse the overrides, check
    the group choices and compose the config once, so an unknown key, a bad group value or a
    syntax error is one line. Returns the composed config (with `hydra`), or None for a
    multirun, whose jobs are checked one by one."""
    from hydra import compose, initialize_config_dir

    check_group_choices(argv, groups, conf_dir)
    if any(a in ("-m", "--multirun") for a in argv):
        return None
    overrides = [a for a in argv if not a.startswith("-")]
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


def check_run_dir(path: Path) -> None:
    """A run dir that cannot be created is one line, before Hydra tries: a file in its way, or
    a nearest existing folder where nothing can be made (read-only, /proc, immutable), found by
    making and removing a probe folder there (permissions alone do not tell, e.g. for root)."""
    for parent in [path, *path.parents]:
        if not parent.exists():
            continue
        if not parent.is_dir():
            raise ConfigError(f"output folder {path} cannot be created: {parent} is a file")
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".picard_probe_", dir=parent))
        except OSError as e:
            raise ConfigError(f"output folder {path} cannot be created: nothing can be written "
                              f"in {parent} ({e.strerror})") from e
        return


def precheck_or_exit(argv: Sequence[str], config_name: str, groups: Sequence[str],
                     run_dir_key: str | None = None,
                     check_free: Callable[[DictConfig, Path], None] | None = None) -> None:
    """An entry's check before Hydra starts: the command line (precheck_command_line), then its
    run dir if it has one (`run_dir_key`), which must be creatable and pass
    `check_free(cfg, run_dir)` (not taken by another run). A failure exits with one
    `config error:` line."""
    try:
        cfg = precheck_command_line(argv, config_name, groups)
        run_dir = None if cfg is None or run_dir_key is None else run_dir_of(cfg, run_dir_key)
        if run_dir is not None:
            check_run_dir(run_dir)
            if check_free is not None:
                check_free(cfg, run_dir)
    except ConfigError as e:
        sys.exit(f"config error: {e}")


def check_results_free(path: Path, overwrite: bool, results_name: str = "results.json") -> None:
    """Refuse a folder holding another run's `results_name` unless `overwrite`."""
    if (path / results_name).exists() and overwrite is not True:
        raise ConfigError(
            f"output folder {path} already holds {results_name} of another run: pick another "
            "folder (hydra.run.dir=...) or pass overwrite=true to replace it"
        )


FAILED_JOB_FILE = "failed.json"
"""What a multirun job that failed leaves in its folder (read by the sweep summary)."""


def error_line(error: BaseException) -> str | None:
    """The one line an entry prints for an error a user can fix, None for a bug."""
    if isinstance(error, ConfigError | InstantiationException | OmegaConfBaseException):
        return f"config error: {one_line(error)}"
    if isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS:
        where = f" ({error.filename})" if error.filename else ""
        return (f"error: {error.strerror}{where}; files written before this point are complete "
                "(every file is written atomically: the old version or none is left)")
    return None


def run_entry(run: Callable[[], Any], failed_job_dir: Path | None = None,
              job_overrides: Sequence[str] = ()) -> Any:
    """Run an entry's job: config errors become `config error: ...` on stderr with exit status
    1; a full or read-only disk `error: ...` with status 1; Ctrl-C or SIGTERM exit status 130
    with its message (results so far are already written). In a multirun (`failed_job_dir`
    set) a failing job writes FAILED_JOB_FILE there (with its `job_overrides`) and returns, so
    the other jobs still run and the sweep summary lists it as failed."""
    os.environ.setdefault("WANDB_SILENT", "true")
    interrupt_on_sigterm()
    try:
        return run()
    except KeyboardInterrupt as e:
        print(str(e) or "interrupted", file=sys.stderr)
        if failed_job_dir is not None:  # a stopped sweep still gets its table of finished jobs
            from app.report import write_sweep_summary

            write_sweep_summary(failed_job_dir.parent)
            print(f"sweep summary so far: {failed_job_dir.parent / 'summary.md'}",
                  file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        line = error_line(e)
        if failed_job_dir is not None:
            line = line or f"{type(e).__name__}: {one_line(e)}"
            print(f"job failed: {line}", file=sys.stderr)
            record = json.dumps({"error": line, "overrides": list(job_overrides)}, indent=2)
            atomic_write(failed_job_dir / FAILED_JOB_FILE, lambda f: f.write(record.encode()))
            return None
        if line is None:
            raise
        sys.exit(line)


@contextlib.contextmanager
def script_errors(output: Path) -> Iterator[None]:
    """A script's mistakes a user can fix as one `error:` line and exit status 1: bad input
    (ValueError, a missing file, a missing optional package) or an `output` it cannot write."""
    try:
        yield
    except (ValueError, FileNotFoundError, ImportError) as e:
        sys.exit("error: " + " ".join(str(e).split()))
    except OSError as e:
        sys.exit(f"error: cannot write {e.filename or output}: {e.strerror}")


RUN_LOCK = ".run.lock"
"""The file a run holds an exclusive lock on for as long as it writes into its folder."""
_CLAIMED: dict[Path, int] = {}
"""Folders this process holds (their lock file descriptors stay open until it exits)."""


def claim_output_dir(path: Path) -> None:
    """Take `path` for this process with an exclusive, non-blocking flock on its RUN_LOCK: two
    runs started at once into one folder cannot both write results (the second is refused in
    one line). The lock goes with the process, however it ends; a folder this process already
    holds is kept."""
    import fcntl

    key = path.resolve()
    if key in _CLAIMED:
        return
    try:
        fd = os.open(path / RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(f"output folder {path} is not writable: {e.strerror}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"output folder {path} is in use by another run right now: pick "
                          "another folder (hydra.run.dir=...)") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _CLAIMED[key] = fd


def prepare_output_dir(path: Path, overwrite: bool, results_name: str | None = "results.json"
                       ) -> None:
    """Create the output folder, remove temporary files that killed runs left there, refuse a
    folder holding another run's `results_name` (unless `overwrite`; None: no such check) and
    check that it is writable, all before any work is done: a ConfigError names the folder and
    the fix."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"output folder {path} cannot be created: {e.strerror}") from e
    claim_output_dir(path)
    clean_stale_temp_files(path)
    if results_name is not None:
        check_results_free(path, overwrite, results_name)
    probe = path / f".write_probe.{os.getpid()}.tmp"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output folder {path} is not writable: {e.strerror}") from e
