"""The torch device and thread count of a run: the `device` and `threads` keys, checked."""

from __future__ import annotations

import re
from typing import Any

import torch

from app.checks import ConfigError


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
