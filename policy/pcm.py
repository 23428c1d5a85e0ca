"""Picard Consistency Model (So et al. 2025): a denoiser phi tuned so Picard's first rounds land
near the fixed point; `picard_sampler.pcm_sample` switches back to the base model afterwards.

Parametrisation (docs/design.md §4.7, what made training work in the prototypes): phi predicts the
base network's x0 plus a shift from a zero-initialised head, and returns it as an epsilon::

    eps_trunk = trunk(x, t, c)                        the frozen base, a LoRA of it, or a copy
    x0        = (x - sqrt(1 - abar_t) eps_trunk) / sqrt(abar_t)
    delta     = head([x, clip(x0)], t, c)             small ConditionalUnet1D, last layer zero
    eps_phi   = eps_trunk - sqrt(abar_t / (1 - abar_t)) * delta    (i.e. x0_phi = x0 + delta)

`sees_noise=True` (docs/design.md §4.7 (c), for stochastic DDPM) also gives the head the slot's
`picard_sampler.noise_path` (what the pre-drawn noise z[1..j] contributes to slot j): a cold
slot cannot otherwise know the noise its fixed point depends on. The sampler passes it
(`pcm_sample(..., pcm_sees_noise=True)`).

A plain epsilon copy barely learns: near t = 0 a small x0 change needs a ~40x larger epsilon
change, so the head moves x0 directly. At initialisation phi equals the base exactly.
`finetune` picks the trunk: "none" (the base itself, frozen: only the head is stored),
"lora" (low-rank deltas on every conv/linear weight of the base) or "full" (a trainable copy).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from policy.unet import ConditionalUnet1D

FINETUNE_MODES = ("none", "lora", "full")


class LoRA(nn.Module):
    """Low-rank deltas ``W + (alpha / r) B A`` for every >= 2-D weight of a module (LoRA, Hu et
    al. 2021), applied through `torch.func.functional_call` so the base stays untouched.

    ``A`` (r, fan_in) starts random and ``B`` (fan_out, r) at zero, so the delta starts at 0.
    Conv weights are treated as (out, in * kernel) matrices (ConvTranspose as (in, out * k)).
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None):
        super().__init__()
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"pcm.model.lora_rank must be an int >= 1; got {rank!r}")
        self.rank = rank
        self.scale = (alpha if alpha is not None else rank) / rank
        self.names: list[str] = []
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        for name, weight in base.named_parameters():
            if weight.dim() < 2:
                continue
            rows, cols = weight.shape[0], weight[0].numel()
            key = name.replace(".", "__")
            a = torch.empty(rank, cols)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.A[key] = nn.Parameter(a)
            self.B[key] = nn.Parameter(torch.zeros(rows, rank))
            self.names.append(name)

    def merged(self, base: nn.Module) -> dict[str, torch.Tensor]:
        """{parameter name: base weight + delta} for every adapted weight."""
        params = dict(base.named_parameters())
        out = {}
        for name in self.names:
            key = name.replace(".", "__")
            weight = params[name]
            delta = (self.B[key] @ self.A[key]).view_as(weight)
            out[name] = weight + self.scale * delta
        return out


@dataclass(frozen=True)
class PcmSettings:
    """What a PCM is built with: the keys of `pcm.model` in a training config and of the
    `pcm.config` a checkpoint stores. `finetune` picks the trunk (FINETUNE_MODES) with
    `lora_rank` / `lora_alpha` for "lora"; `head_*` size the head's ConditionalUnet1D;
    `clip_range` clips the trunk's x0 the head sees; `sees_noise` also hands it the slots'
    noise path. Checked when built."""

    finetune: str = "none"
    lora_rank: int = 8
    lora_alpha: float | None = None
    head_down_dims: Sequence[int] = (64, 128)
    head_kernel_size: int = 5
    head_n_groups: int = 8
    head_step_embed_dim: int = 64
    clip_range: float = 1.0
    sees_noise: bool = False

    def __post_init__(self) -> None:
        if self.finetune not in FINETUNE_MODES:
            raise ValueError(
                f"pcm.model.finetune must be one of {list(FINETUNE_MODES)}; got {self.finetune!r}"
            )

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The setting names, in field order (the keys a config may set)."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_config(self) -> dict[str, Any]:
        """The settings as a checkpoint stores them (`pcm.config`)."""
        config = {name: getattr(self, name) for name in self.names()}
        config["head_down_dims"] = [int(d) for d in self.head_down_dims]
        config["sees_noise"] = bool(self.sees_noise)
        return config


class PicardConsistencyModel(nn.Module):
    """phi(x, t, cond) -> eps: the base's x0 plus a zero-initialised head's shift (module doc).

    `base` fixes the shapes (and is copied for finetune="full"); it is NOT a submodule: the
    policy passes its own network to `forward`, so the stored PCM holds only what it learned.
    `alphas_cumprod` (num_train_timesteps,) is the policy's training schedule; `settings` the
    PcmSettings it is built with (`config` holds them as a checkpoint stores them).
    """

    def __init__(self, base: ConditionalUnet1D, alphas_cumprod: torch.Tensor,
                 settings: PcmSettings | None = None):
        super().__init__()
        settings = PcmSettings() if settings is None else settings
        self.config: dict[str, Any] = settings.to_config()
        self.finetune = settings.finetune
        self.sees_noise = bool(settings.sees_noise)
        self.clip_range = float(settings.clip_range)
        self.register_buffer(
            "alphas_cumprod", torch.as_tensor(alphas_cumprod).float().clone(), persistent=False
        )
        self.trunk = (copy.deepcopy(base).requires_grad_(True) if self.finetune == "full"
                      else None)
        self.lora = (LoRA(base, settings.lora_rank, settings.lora_alpha)
                     if self.finetune == "lora" else None)
        da = base.input_dim
        self.head = ConditionalUnet1D(
            input_dim=(3 if self.sees_noise else 2) * da,
            output_dim=da,
            global_cond_dim=base.global_cond_dim,
            down_dims=settings.head_down_dims,
            kernel_size=settings.head_kernel_size,
            n_groups=settings.head_n_groups,
            diffusion_step_embed_dim=settings.head_step_embed_dim,
        )
        last = self.head.final[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def trunk_eps(
        self, base: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor
    ) -> torch.Tensor:
        """The trunk's epsilon: the base (no gradient), its LoRA, or the fine-tuned copy."""
        if self.trunk is not None:
            return self.trunk(x, t, cond)
        if self.lora is not None:
            return functional_call(base, self.lora.merged(base), (x, t, cond))
        with torch.no_grad():
            return base(x, t, cond)

    def forward(
        self,
        base: nn.Module,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        noise_path: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (N, H, Da), training timesteps t (N,), cond (N, Dc) [, the slots' noise path
        (N, H, Da), required iff sees_noise] -> eps_phi (N, H, Da)."""
        if self.sees_noise != (noise_path is not None):
            raise ValueError(
                "this PCM sees the noise path: call it with noise_path (pcm_sample(..., "
                "pcm_sees_noise=True))" if self.sees_noise else
                "this PCM does not take a noise_path (it was trained with sees_noise=false)"
            )
        abar = self.alphas_cumprod[t].view(-1, *([1] * (x.dim() - 1)))
        eps = self.trunk_eps(base, x, t, cond)
        x0 = (x - (1.0 - abar).sqrt() * eps) / abar.sqrt()
        parts = [x, x0.clamp(-self.clip_range, self.clip_range)]
        if noise_path is not None:
            if noise_path.shape != x.shape:
                raise ValueError(
                    f"noise_path must have the shape of x {tuple(x.shape)}; "
                    f"got {tuple(noise_path.shape)}"
                )
            parts.append(noise_path)
        features = torch.cat(parts, dim=-1)
        delta = self.head(features, t, cond)
        return eps - (abar / (1.0 - abar)).sqrt() * delta

    def num_stored_parameters(self) -> int:
        """Parameters a checkpoint stores for this PCM (the frozen base is not among them)."""
        return sum(p.numel() for p in self.parameters())


def complete_config(config: dict[str, Any]) -> dict[str, Any]:
    """A stored PCM config with the settings it predates (e.g. `sees_noise` in checkpoints from
    before it existed) filled in with their defaults, so configs of any age compare equal."""
    defaults = {f.name: f.default for f in dataclasses.fields(PcmSettings)}
    return {**defaults, **config}


def build_pcm(policy: nn.Module, **config: Any) -> PicardConsistencyModel:
    """A PCM for `policy` (a DiffusionPolicy) from PcmSettings keys `config`: shapes from its
    network, its training schedule."""
    return PicardConsistencyModel(
        policy.model, policy.train_schedule.alphas_cumprod, PcmSettings(**config)
    ).to(policy.device)
