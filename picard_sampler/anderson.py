"""Anderson acceleration of the Picard fixed-point iteration (docs/design.md §4.9).

A Picard round maps the trajectory iterate ``x_k`` to ``g_k = F(x_k)`` (one batched model call
plus the drift or scan walk). Plain Picard takes ``x_{k+1} = g_k``. Anderson acceleration
(type II, memory m) instead mixes the last m+1 rounds: with residuals ``f_i = g_i - x_i`` and
differences ``dF_i = f_i - f_{i-1}``, ``dG_i = g_i - g_{i-1}``, it solves, per sample,
``gamma = argmin ||f_k - dF gamma||`` and takes ``x_{k+1} = g_k - dG gamma``: the secant
extrapolation of where the residual vanishes. The round machinery keeps its stopping rule on
the residual ``f_k`` (a slot is final when the residuals up to it are within tolerance), and
final slots always take ``g_k`` itself, so the sample converged to is the same fixed point,
the sequential sample; acceleration only changes how fast the non-final slots get there.
History is dropped whenever the map changes (a PCM round that used the consistency model), as
its secant information would describe another map.
"""

from __future__ import annotations

import torch


class Anderson:
    """History of one sampler call and the (triangular) Anderson step; ``memory`` past rounds
    are mixed, ``ridge`` regularises each least-squares solve relative to its Gram trace."""

    def __init__(self, memory: int, ridge: float = 1e-6):
        self.memory = memory
        self.ridge = ridge
        self._x: list[torch.Tensor] = []  # iterates x_i (T+1, B, ...)
        self._g: list[torch.Tensor] = []  # their images g_i = F(x_i)

    def reset(self) -> None:
        """Forget the history (the fixed-point map changed)."""
        self._x.clear()
        self._g.clear()

    def step(self, x: torch.Tensor, g: torch.Tensor, begin: torch.Tensor,
             active: torch.Tensor) -> torch.Tensor:
        """The next iterate from ``x_k`` and ``g_k`` (T+1, B, ...): ``g_k`` on every slot up to
        ``begin`` (final) and for inactive samples, the Anderson mix on the others."""
        self._x.append(x)
        self._g.append(g)
        if len(self._x) > self.memory + 1:
            self._x.pop(0)
            self._g.pop(0)
        if len(self._x) < 2 or active.numel() == 0:
            return g
        xs = torch.stack([h[:, active] for h in self._x])  # (n, T+1, S, ...)
        gs = torch.stack([h[:, active] for h in self._g])
        f = (gs - xs).flatten(3)  # (n, T+1, S, N) residuals per slot and sample
        d_f = (f[1:] - f[:-1]).permute(1, 2, 3, 0)  # (T+1, S, N, m)
        d_g = (gs[1:] - gs[:-1]).flatten(3).permute(1, 2, 3, 0)
        # triangular: slot i solves its least squares over the slots <= i only (cumulative sums
        # of the per-slot terms)
        gram = (d_f.transpose(-1, -2) @ d_f).cumsum(0)  # (T+1, S, m, m)
        rhs = (d_f.transpose(-1, -2) @ f[-1].unsqueeze(-1)).cumsum(0)  # (T+1, S, m, 1)
        # ridge relative to the Gram's trace, with a floor so residual-free slots get gamma = 0
        scale = gram.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        floor = torch.finfo(gram.dtype).tiny ** 0.5
        gamma = torch.linalg.solve(gram + (self.ridge * scale + floor) * eye, rhs)
        mixed = (gs[-1].flatten(2) - (d_g @ gamma).squeeze(-1)).view_as(gs[-1])
        if not torch.isfinite(mixed).all():  # a degenerate history: take the plain step
            self.reset()
            return g
        out = g.clone()
        slots = torch.arange(g.shape[0], device=g.device)[:, None]
        free = slots > begin[active][None, :]  # (T+1, S): not yet final
        out[:, active] = torch.where(free.view(*free.shape, *[1] * (g.dim() - 2)), mixed,
                                     g[:, active])
        return out
