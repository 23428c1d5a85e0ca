"""Run folders: made, checked, claimed and cleaned before any work is done.

A run's folder must be creatable and writable, must not hold another run's results (unless
`overwrite`), is held by one process at a time (an flock on RUN_LOCK) and is cleared of the
temporary files that killed writers left (policy.file_io).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from app.checks import ConfigError
from policy.file_io import clean_stale_temp_files

FAILED_JOB_FILE = "failed.json"
"""What a multirun job that failed leaves in its folder (read by the sweep summary)."""


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


def check_results_free(path: Path, overwrite: bool, results_name: str = "results.json") -> None:
    """Refuse a folder holding another run's `results_name` unless `overwrite`."""
    if (path / results_name).exists() and overwrite is not True:
        raise ConfigError(
            f"output folder {path} already holds {results_name} of another run: pick another "
            "folder (hydra.run.dir=...) or pass overwrite=true to replace it"
        )


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
