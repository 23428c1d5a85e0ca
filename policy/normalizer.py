"""LinearNormalizer: per-dimension min-max scaling of each data key to [-1, 1].

Its statistics are buffers, so they travel inside the policy's state_dict (and checkpoint) and a
rebuilt, unfitted normalizer is restored by `load_state_dict` alone.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

_SUFFIXES = ("scale", "offset", "input_min", "input_max")


class LinearNormalizer(nn.Module):
    """Maps each key's last dimension affinely from its [min, max] on the fitted data to [-1, 1].

    Dimensions whose range is below `range_eps` (constant in the data) get scale 1 and are
    shifted to 0, so they neither blow up nor lose their value on the round trip.
    """

    def __init__(self, range_eps: float = 1e-4):
        super().__init__()
        self.range_eps = range_eps
        self.keys: list[str] = []

    def fit(self, data: Mapping[str, np.ndarray | torch.Tensor]) -> LinearNormalizer:
        """Compute per-dimension statistics from arrays of shape (..., D), one per key."""
        for key, value in data.items():
            x = torch.tensor(np.asarray(value, dtype=np.float32)).reshape(-1, value.shape[-1])
            if x.shape[0] == 0 or not torch.isfinite(x).all():
                raise ValueError(f"normalizer.fit: data for '{key}' is empty or not finite")
            lo, hi = x.min(dim=0).values, x.max(dim=0).values
            span = hi - lo
            constant = span < self.range_eps
            scale = torch.where(constant, torch.ones_like(span), 2.0 / span.clamp_min(1e-12))
            offset = torch.where(constant, -lo, -1.0 - scale * lo)
            self._set(key, dict(scale=scale, offset=offset, input_min=lo, input_max=hi))
        return self

    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """Raw values (..., D) of `key` -> normalized values in [-1, 1] on the fitted range."""
        scale, offset = self._params(key, x)
        return x * scale + offset

    def unnormalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalize`: normalized (..., D) -> raw units."""
        scale, offset = self._params(key, x)
        return (x - offset) / scale

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def _params(self, key: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if key not in self.keys:
            raise KeyError(f"normalizer has no statistics for '{key}' (fitted: {self.keys})")
        scale, offset = getattr(self, f"{key}_scale"), getattr(self, f"{key}_offset")
        if x.shape[-1] != scale.shape[0]:
            raise ValueError(
                f"normalizer['{key}']: last dim must be {scale.shape[0]}, "
                f"got shape {tuple(x.shape)}"
            )
        return scale, offset

    def _set(self, key: str, tensors: Mapping[str, torch.Tensor]) -> None:
        if not key.isidentifier():
            raise ValueError(f"normalizer key must be an identifier, got '{key}'")
        for suffix in _SUFFIXES:
            name = f"{key}_{suffix}"
            if hasattr(self, name):
                delattr(self, name)
            self.register_buffer(name, tensors[suffix].clone())
        if key not in self.keys:
            self.keys.append(key)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Create the buffers named in `state_dict` first, so an unfitted normalizer can load."""
        for name in state_dict:
            if name.startswith(prefix) and name.endswith("_scale"):
                key = name[len(prefix) : -len("_scale")]
                found = {s: state_dict.get(f"{prefix}{key}_{s}") for s in _SUFFIXES}
                if all(v is not None for v in found.values()):
                    self._set(key, found)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
