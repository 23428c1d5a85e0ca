"""Where a number was measured: device, threads and versions, attached to every report."""

from __future__ import annotations

import platform
from importlib import metadata

import torch

_PACKAGES = ("picard-policy", "torch", "numpy", "gymnasium", "pymunk", "zarr", "hydra-core")


def run_info(device: torch.device | str = "cpu", packages: tuple[str, ...] = _PACKAGES) -> dict:
    """Device name, torch thread count, CPU, Python and package versions as a JSON-able dict."""
    device = torch.device(device)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "device": str(device),
        "device_name": device_name,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }
