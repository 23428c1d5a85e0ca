"""The sampler-level metrics, defined once (docs/design.md §5) and used by eval, bench and tests."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def percentile(values: Sequence[float] | np.ndarray, q: float) -> float | None:
    """The q-th percentile with linear interpolation between order statistics (numpy's
    default method), the one percentile of every report; None for no values."""
    values = np.asarray(values, dtype=float)
    return float(np.percentile(values, q)) if values.size else None


def exact_errors(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """exact_err of each sample: max |x - reference| over the whole chunk (all but the batch
    dim), in the units of its arguments (normalized actions in every report)."""
    if x.shape != reference.shape:
        raise ValueError(f"exact_err needs equal shapes; got {tuple(x.shape)} and "
                         f"{tuple(reference.shape)}")
    return (x - reference).abs().flatten(1).amax(1)


EXACT_RULE = {"exact_err_max": 0.15, "exact_err_mean": 1e-2}
"""When a sampler's chunks count as exact (docs/design.md §5): the largest and the mean
exact_err over the measured chunks, the closed-loop bar of the PushT evaluations."""


def is_exact(err_max: float, err_mean: float | None = None) -> bool:
    """Whether chunks with this largest (and, when known, mean) exact_err are exact by
    EXACT_RULE."""
    if err_max > EXACT_RULE["exact_err_max"]:
        return False
    return err_mean is None or err_mean <= EXACT_RULE["exact_err_mean"]
