"""Files written and read safely: atomic writes, leftovers of killed writers, torch zip checks.

Every file the package writes goes through `atomic_write` (a temporary name in the same folder,
fsync, `os.replace`), so a killed run leaves the old file or the new one, never a torn one;
`clean_stale_temp_files` removes what killed writers left. Before a torch zip is unpickled,
`check_regular_file` and `check_torch_zip` bound what reading it can cost (docs/design.md §12).
`weights_fingerprint` keys files derived from a policy's weights (exports, propagators, caches).
Kept apart from `policy.checkpoint` so that the runtime and propagator modules, which
`DiffusionPolicy` imports, need nothing that imports `DiffusionPolicy` back.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch


class CheckpointError(ValueError):
    """A file that cannot be loaded safely or correctly: one line naming the file and field."""


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """`write` into a temporary file in the same directory, fsync, then os.replace: a killed
    run leaves the old file or the new one, never a torn one (and no temporary file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def clean_stale_temp_files(folder: str | Path) -> list[Path]:
    """Remove the temporary files (`.NAME.PID.tmp`) that `atomic_write` calls of killed
    processes left in `folder` (those of live processes are kept); returns what was removed."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if not pid.isdigit() or _process_alive(int(pid)):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _process_alive(pid: int) -> bool:
    """Whether a process with this id exists (this one included)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_torch_save(payload: Mapping[str, Any], path: str | Path) -> Path:
    """torch.save `payload` to `path` atomically (`atomic_write`)."""
    return atomic_write(path, lambda f: torch.save(dict(payload), f))


def weights_fingerprint(weights: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a state dict (sorted by name)."""
    digest = hashlib.sha256()
    for key in sorted(weights):
        value = weights[key].detach().cpu().contiguous()
        digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


MAX_PICKLE_BYTES = 64 * 2**20
"""Largest pickle (data.pkl) a checkpoint may hold: ours are ~100 kB, weights are separate."""


def check_torch_zip(path: Path, what: str = "checkpoint") -> None:
    """A torch zip checkpoint's entries against its size before anything is read: stored (not
    compressed) entries only, as torch writes them, so no entry inflates beyond the file, and a
    pickle of at most MAX_PICKLE_BYTES. CheckpointError naming the file otherwise."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{what} {path} is corrupt or unreadable (not a torch zip file: "
                              f"{e})") from e
    size = path.stat().st_size
    for entry in entries:
        if entry.compress_type != zipfile.ZIP_STORED or entry.file_size > size:
            raise CheckpointError(
                f"{what} {path}: entry {entry.filename!r} declares {entry.file_size} bytes "
                f"in a {size}-byte file (torch writes stored entries; refusing to inflate it)")
        if entry.filename.endswith(".pkl") and entry.file_size > MAX_PICKLE_BYTES:
            raise CheckpointError(f"{what} {path}: its pickle is {entry.file_size} bytes "
                                  f"(at most {MAX_PICKLE_BYTES})")


def check_regular_file(path: Path, what: str = "checkpoint") -> None:
    """FileNotFoundError if `path` does not exist, CheckpointError if it is not a regular file
    (a FIFO or device would block or stream forever)."""
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"{what} {path} is not a regular file")
