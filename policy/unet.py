"""ConditionalUnet1D: the Diffusion Policy noise-prediction network (Chi et al. 2023).

A 1-D U-Net over the action horizon: Conv1d + GroupNorm + Mish blocks, two residual FiLM blocks
per level, conditioned on a sinusoidal embedding of the diffusion step concatenated with the
global observation feature. Shapes: sample (B, H, Da), timestep (B,), global_cond (B, Dc).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class SinusoidalStepEmbedding(nn.Module):
    """Transformer-style sin/cos embedding of an integer diffusion step: (B,) -> (B, dim)."""

    def __init__(self, dim: int):
        super().__init__()
        if dim % 2 or dim < 4:
            raise ValueError(f"diffusion_step_embed_dim must be even and >= 4, got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half) / (half - 1))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.to(self.freqs.dtype)[:, None] * self.freqs[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class Conv1dBlock(nn.Sequential):
    """Conv1d (same padding) -> GroupNorm -> Mish, on (B, C, H)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, n_groups: int):
        super().__init__(
            nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(n_groups, out_channels),
            nn.Mish(),
        )


class ConditionalResidualBlock1D(nn.Module):
    """Two conv blocks with FiLM (per-channel scale and bias from the condition) in between;
    `cond_predict_scale=False` predicts the bias only (scale 1: DP's bias-only conditioning)."""

    def __init__(
        self, in_channels: int, out_channels: int, cond_dim: int, kernel_size: int, n_groups: int,
        cond_predict_scale: bool = True,
    ):
        super().__init__()
        self.conv1 = Conv1dBlock(in_channels, out_channels, kernel_size, n_groups)
        self.conv2 = Conv1dBlock(out_channels, out_channels, kernel_size, n_groups)
        self.cond_predict_scale = cond_predict_scale
        film_out = 2 * out_channels if cond_predict_scale else out_channels
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, film_out))
        self.residual = (
            nn.Conv1d(in_channels, out_channels, 1)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (B, C_in, H), cond (B, cond_dim) -> (B, C_out, H)."""
        if not self.cond_predict_scale:
            return self.conv2(self.conv1(x) + self.film(cond)[:, :, None]) + self.residual(x)
        scale, bias = self.film(cond)[:, :, None].chunk(2, dim=1)
        out = self.conv2(scale * self.conv1(x) + bias)
        return out + self.residual(x)


class ConditionalUnet1D(nn.Module):
    """Epsilon network eps(x_t, t, cond) over an action chunk: (B, H, Da) -> (B, H, Da).

    `down_dims` sets the channels of each level; the horizon is halved between levels, so H
    must be a multiple of `horizon_multiple` = 2 ** (len(down_dims) - 1). `output_dim` (default
    `input_dim`) sets the output channels, for networks that read more channels than they write.
    `cond_predict_scale=False` is DP's bias-only conditioning; `final_n_groups` (default
    `n_groups`) the GroupNorm groups of the final block, which DP and LeRobot fix at 8.
    """

    def __init__(
        self,
        input_dim: int,
        global_cond_dim: int,
        down_dims: Sequence[int] = (256, 512, 1024),
        kernel_size: int = 5,
        n_groups: int = 8,
        diffusion_step_embed_dim: int = 256,
        output_dim: int | None = None,
        cond_predict_scale: bool = True,
        final_n_groups: int | None = None,
    ):
        super().__init__()
        down_dims = [int(d) for d in down_dims]
        if not down_dims:
            raise ValueError("down_dims must name at least one level, got []")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same padding), got {kernel_size}")
        bad = [d for d in down_dims if d % n_groups]
        if bad:
            raise ValueError(f"down_dims {down_dims} must be multiples of n_groups={n_groups}")
        self.input_dim = input_dim
        self.output_dim = input_dim if output_dim is None else int(output_dim)
        self.global_cond_dim = global_cond_dim
        self.horizon_multiple = 2 ** (len(down_dims) - 1)

        dsed = diffusion_step_embed_dim
        self.step_encoder = nn.Sequential(
            SinusoidalStepEmbedding(dsed),
            nn.Linear(dsed, 4 * dsed),
            nn.Mish(),
            nn.Linear(4 * dsed, dsed),
        )
        cond_dim = dsed + global_cond_dim

        def block(c_in: int, c_out: int) -> ConditionalResidualBlock1D:
            return ConditionalResidualBlock1D(c_in, c_out, cond_dim, kernel_size, n_groups,
                                              cond_predict_scale)

        channels = [input_dim, *down_dims]
        levels = list(zip(channels[:-1], channels[1:], strict=True))
        self.down = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(levels):
            is_last = i == len(levels) - 1
            self.down.append(
                nn.ModuleList([
                    block(c_in, c_out),
                    block(c_out, c_out),
                    nn.Identity() if is_last else nn.Conv1d(c_out, c_out, 3, stride=2, padding=1),
                ])
            )
        self.mid = nn.ModuleList([block(down_dims[-1], down_dims[-1]) for _ in range(2)])
        self.up = nn.ModuleList()
        for c_in, c_out in reversed(levels[1:]):
            self.up.append(
                nn.ModuleList([
                    block(2 * c_out, c_in),
                    block(c_in, c_in),
                    nn.ConvTranspose1d(c_in, c_in, 4, stride=2, padding=1),
                ])
            )
        final_groups = n_groups if final_n_groups is None else int(final_n_groups)
        if down_dims[0] % final_groups:
            raise ValueError(f"down_dims[0]={down_dims[0]} must be a multiple of "
                             f"final_n_groups={final_groups}")
        self.final = nn.Sequential(
            Conv1dBlock(down_dims[0], down_dims[0], kernel_size, final_groups),
            nn.Conv1d(down_dims[0], self.output_dim, 1),
        )

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, global_cond: torch.Tensor
    ) -> torch.Tensor:
        """sample (B, H, Da), timestep (B,) long, global_cond (B, Dc) -> (B, H, output_dim)."""
        cond = torch.cat([self.step_encoder(timestep), global_cond], dim=-1)
        x = sample.transpose(1, 2)
        skips = []  # as in DP, the top level's skip is never popped: up levels = levels - 1
        for res1, res2, downsample in self.down:
            x = res2(res1(x, cond), cond)
            skips.append(x)
            x = downsample(x)
        for res in self.mid:
            x = res(x, cond)
        for res1, res2, upsample in self.up:
            x = torch.cat([x, skips.pop()], dim=1)
            x = upsample(res2(res1(x, cond), cond))
        return self.final(x).transpose(1, 2)
