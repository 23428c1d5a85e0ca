"""Where a number was measured: device, threads and versions, attached to every report."""

from __future__ import annotations

import platform
import shlex
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from importlib import metadata

import torch

_PACKAGES = ("picard-policy", "torch", "numpy", "gymnasium", "pymunk", "zarr", "hydra-core")


def package_versions(packages: Iterable[str]) -> dict[str, str | None]:
    """Installed version of each package (None when it is not installed), plus Python's."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def provenance(argv: Sequence[str], packages: Iterable[str]) -> dict:
    """The exact command line, UTC date and package versions that made a data file."""
    return {
        "command": shlex.join(["python", sys.argv[0], *argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": package_versions(packages),
    }


def run_info(device: torch.device | str = "cpu", packages: tuple[str, ...] = _PACKAGES) -> dict:
    """Device name, torch thread count, CPU, Python and package versions as a JSON-able dict."""
    device = torch.device(device)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
    return {
        "device": str(device),
        "device_name": device_name,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "versions": package_versions(packages),
    }
