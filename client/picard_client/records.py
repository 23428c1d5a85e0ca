"""Chunk records as flat JSON-able scalars: what the real-time loop and the rollout loop write
per request (one copy, shared by picard_client.realtime and envs.rollout)."""

from __future__ import annotations

from typing import Any

import numpy as np


def scalars(stats: dict[str, Any]) -> dict[str, Any]:
    """The int/float/bool entries of a stats dict (tensors and lists are dropped)."""
    return {k: v for k, v in stats.items() if isinstance(v, bool | int | float | np.number)}


def record_dict(record: Any) -> dict[str, Any]:
    """A policy's record as flat JSON-able scalars: a mapping, or an object with `to_dict()`
    (a typed record); anything else gives {}."""
    if record is None:
        return {}
    if hasattr(record, "to_dict"):
        record = record.to_dict()
    return scalars(dict(record)) if isinstance(record, dict) else {}
