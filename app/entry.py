"""Running an entry's job: what a user can fix is one line and an exit status, never a traceback.

Config errors become `config error: ...` with status 1, a full or read-only disk `error: ...`
with status 1, Ctrl-C or SIGTERM status 130 (finished work already written); a failing job of a
multirun leaves `failed.json` in its folder instead, so the sweep goes on and its summary
(`app.report`) lists it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from omegaconf.errors import OmegaConfBaseException

from app.checks import ConfigError, one_line
from app.run_dirs import FAILED_JOB_FILE
from policy.file_io import atomic_write

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
