"""PCM training data and objectives: base-model trajectories and the losses of docs/design.md §4.7.

Data (`collect_trajectories`): for observation windows of the demonstrations (low-dim, or an
image policy's camera frames, encoded once per chunk into the global condition the base and
the PCM share) and pre-drawn noise z, the base policy's fixed point X* (= its sequential
trajectory, Picard's unique fixed point) and optionally its first Picard iterates X^1..X^R
(full window, no stopping). Iterates that blew up (the drift update's, docs/design.md §4.3) are
flagged in `iterate_ok` and never trained on.

Objectives (`PCMObjective`), for the rounds k < K_s in which `pcm_sample` uses the PCM
(lam_k = clip(1 - k/K_s, 0, 1) blends PCM and base epsilons), starting from the cold
trajectory X^0 (every slot x_T):

- "landing" (a): one Picard round from X^k with the blended model should land on X*: a
  pseudo-Huber loss on each slot's error in the sampler's tolerance units
  ``||Xnew[j+1] - X*[j+1]||^2 / (D s'_j^2)``, with the exact gradient of the x0 clip.
- "consistency" (b): the blended x0 prediction at every slot should be X*[T], the chunk;
  mean squared error with a straight-through clip.

(c) of docs/design.md §4.7 is not a third loss but a PCM that also sees each slot's noise path
(`pcm.model.sees_noise`, for stochastic DDPM); both losses then hand it the path.

The next round's input X^{k+1} is the blended round's output (on-policy, detached) or the base's
recorded iterate (`iterates="base"`). Rounds are computed by `pcm_sample` itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from picard_sampler import (
    Schedule,
    noise_path,
    pcm_sample,
    picard_sample,
    sequential_sample,
    switch_weight,
)
from policy.data import SequenceDataset
from policy.diffusion_policy import DiffusionPolicy

OBJECTIVES = ("landing", "consistency")
ITERATE_SOURCES = ("on_policy", "base")
BLOWN_UP = 10.0
"""An iterate with |X| above this (normalized action units; x_T ~ N(0, 1)) is not trained on."""


@torch.no_grad()
def collect_trajectories(
    policy: DiffusionPolicy,
    schedule: Schedule,
    windows: SequenceDataset,
    n_chunks: int,
    seed: int,
    iterate_rounds: int = 0,
    update: str = "scan",
    batch_size: int = 256,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Base-model fixed points (and Picard iterates) for `n_chunks` seeded (window, noise) pairs.

    Windows are low-dim (a flat obs) or an image policy's dict with uint8 camera frames; each
    chunk's observations are encoded once (`encode_for_sampling`: eval-mode centre crop) into
    "cond", on which the base's trajectory, and later the PCM during training, condition.
    Returns batch-first CPU tensors: "cond" (N, Dc), "noise" (N, T+1, H, Da), "fixed_point"
    (N, T+1, H, Da), "window" (N,) the window indices; with `iterate_rounds` R > 0 also
    "iterates" (N, R, T+1, H, Da), round r+1's trajectory of Picard (`update`, full window, no
    stopping) and "iterate_ok" (N, R), False where an iterate is not finite or blew up.
    """
    if n_chunks < 1 or len(windows) == 0:
        raise ValueError(f"need n_chunks >= 1 and windows; got {n_chunks}, {len(windows)} windows")
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(windows), size=n_chunks, replace=n_chunks > len(windows))
    generator = torch.Generator().manual_seed(seed)
    T, H, Da = schedule.num_inference_steps, policy.horizon, policy.action_dim
    parts: dict[str, list[torch.Tensor]] = {}
    for start in tqdm(range(0, n_chunks, batch_size), disable=not progress, desc="trajectories"):
        rows = picks[start : start + batch_size]
        obs = stack_obs([windows[int(i)]["obs"] for i in rows])
        cond = encode_for_sampling(policy, obs)
        noise = torch.randn(T + 1, len(rows), H, Da, generator=generator).to(policy.device)
        _, stats = sequential_sample(policy.denoiser, schedule, noise, cond)
        batch = {"cond": cond, "noise": noise.transpose(0, 1),
                 "fixed_point": stats.trajectory.transpose(0, 1)}
        if iterate_rounds:
            rounds: list[torch.Tensor] = []
            picard_sample(
                policy.denoiser, schedule, noise, cond, window=None, tol=0.0, update=update,
                max_rounds=iterate_rounds,
                callback=lambda info, rounds=rounds: rounds.append(info["trajectory"].clone()),
            )
            while len(rounds) < iterate_rounds:  # converged early: the fixed point repeats
                rounds.append(rounds[-1])
            iterates = torch.stack(rounds).permute(2, 0, 1, 3, 4)  # (B, R, T+1, H, Da)
            flat = iterates.flatten(2)
            batch["iterates"] = iterates
            batch["iterate_ok"] = torch.isfinite(flat).all(-1) & (flat.abs().amax(-1) <= BLOWN_UP)
        for key, value in batch.items():
            parts.setdefault(key, []).append(value.cpu())
    out = {key: torch.cat(values) for key, values in parts.items()}
    out["window"] = torch.as_tensor(picks)
    return out


def stack_obs(items: list[Any]) -> torch.Tensor | dict[str, torch.Tensor]:
    """Windows' observations as one batch: a flat (To, Do) tensor each, or an image policy's
    dict {key: (To, ...)} (uint8 frames stay uint8; the encoder scales them)."""
    if isinstance(items[0], Mapping):
        return {key: torch.stack([item[key] for item in items]) for key in items[0]}
    return torch.stack(items)


def encode_for_sampling(
    policy: DiffusionPolicy, obs: torch.Tensor | Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """The global condition the base samples with: the observation encoder once per chunk, in
    eval mode (an image encoder's centre crop, as at sampling time, even when the policy is
    in train mode), without autograd. The PCM head and the base UNet both condition on it."""
    encoder = policy.obs_encoder
    training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            return policy.encode_obs(policy.check_obs(obs))
    finally:
        encoder.train(training)


class TrajectoryDataset(Dataset):
    """Chunks of `collect_trajectories` output as items {"cond", "noise", "fixed_point", ...}."""

    KEYS = ("cond", "noise", "fixed_point", "iterates", "iterate_ok")

    def __init__(self, data: Mapping[str, torch.Tensor]):
        missing = [k for k in ("cond", "noise", "fixed_point") if k not in data]
        if missing:
            raise ValueError(f"trajectory data is missing {missing}")
        self.data = {k: data[k] for k in self.KEYS if k in data}
        sizes = {k: len(v) for k, v in self.data.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"trajectory arrays disagree in length: {sizes}")

    def __len__(self) -> int:
        return len(self.data["cond"])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[index] for k, v in self.data.items()}


def pseudo_huber(d2: torch.Tensor, c: float) -> torch.Tensor:
    """sqrt(d2 + c^2) - c of a squared distance: quadratic below c, linear above."""
    return (d2 + c * c).sqrt() - c


@dataclass
class PCMObjective:
    """The PCM loss on a batch of trajectories (module doc); `policy` must have a PCM attached.

    `schedule` is the sampler schedule the PCM is trained for, `switch_rounds` K_s the number
    of rounds per slot that use it, `update` the Picard update (full window only).
    """

    schedule: Schedule
    objective: str = "consistency"
    switch_rounds: int = 1
    update: str = "scan"
    iterates: str = "on_policy"
    huber_c: float = 1.0

    def __post_init__(self) -> None:
        checks = [
            ("objective", self.objective in OBJECTIVES, f"one of {list(OBJECTIVES)}"),
            ("iterates", self.iterates in ITERATE_SOURCES, f"one of {list(ITERATE_SOURCES)}"),
            ("switch_rounds", isinstance(self.switch_rounds, int) and self.switch_rounds >= 1,
             "an int >= 1"),
            ("update", self.update in ("scan", "drift"), "'scan' or 'drift'"),
            ("huber_c", self.huber_c > 0, "> 0"),
        ]
        for key, ok, allowed in checks:
            if not ok:
                raise ValueError(f"pcm.{key} must be {allowed}; got {getattr(self, key)!r}")

    def blended(self, policy: DiffusionPolicy, lam: float) -> Callable[..., torch.Tensor]:
        """The denoiser of a round with PCM weight `lam`: lam * eps_pcm + (1 - lam) * eps_base
        (a noise-aware PCM's also takes the slots' noise path)."""

        def denoiser(
            x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, *path: torch.Tensor
        ) -> torch.Tensor:
            out = policy.pcm_denoiser(x, t, cond, *path)
            if lam < 1.0:
                with torch.no_grad():
                    base = policy.denoiser(x, t, cond)
                out = lam * out + (1.0 - lam) * base
            return out

        return denoiser

    def __call__(self, policy: DiffusionPolicy, batch: Mapping[str, Any]) -> torch.Tensor:
        """Mean loss over the batch and the K_s PCM rounds."""
        noise = batch["noise"].transpose(0, 1)  # (T+1, B, H, Da), the sampler layout
        target = batch["fixed_point"].transpose(0, 1)
        cond = batch["cond"]
        x = noise[:1].expand_as(noise).clone()  # X^0: the cold start, every slot x_T
        path = None  # the consistency loss calls the PCM itself; pcm_sample makes its own path
        if policy.pcm_sees_noise and self.objective == "consistency":
            path = noise_path(self.schedule, noise)
        losses = []
        for k in range(self.switch_rounds):
            lam = float(switch_weight(torch.tensor(k), self.switch_rounds))
            denoiser = self.blended(policy, lam)
            more = k + 1 < self.switch_rounds
            own_next = more and self.iterates == "on_policy"
            if self.objective == "landing":
                new = self._round(policy, denoiser, noise, cond, x)
                losses.append(self.landing_loss(new, target))
            else:
                losses.append(self.consistency_loss(denoiser, x, cond, target[-1], path))
                new = None
                if own_next:
                    new = self._round(policy, denoiser, noise, cond, x, grad=False)
            if more:
                x = new.detach() if own_next else self._base_iterate(batch, k + 1, x)
        return torch.stack(losses).mean()

    def _round(
        self, policy: DiffusionPolicy, denoiser: Callable[..., torch.Tensor],
        noise: torch.Tensor, cond: torch.Tensor, x: torch.Tensor, grad: bool = True,
    ) -> torch.Tensor:
        """The trajectory after one full-window round from `x` with the blended `denoiser`
        (differentiable): `pcm_sample`'s first round, in which every slot uses its PCM."""
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            _, stats = pcm_sample(
                policy.denoiser, denoiser, self.schedule, noise, cond, window=None, tol=0.0,
                switch_rounds=1, update=self.update, max_rounds=1, init=x,
                pcm_sees_noise=policy.pcm_sees_noise,
            )
        return stats.trajectory

    def _base_iterate(
        self, batch: Mapping[str, Any], k: int, fallback: torch.Tensor
    ) -> torch.Tensor:
        """X^k from the recorded base iterates, where they did not blow up (else `fallback`)."""
        if "iterates" not in batch or batch["iterates"].shape[1] < k:
            raise ValueError(
                f"pcm.iterates=base with switch_rounds={self.switch_rounds} needs recorded "
                f"iterates of >= {self.switch_rounds - 1} rounds (pcm.data.iterate_rounds)"
            )
        recorded = batch["iterates"][:, k - 1].transpose(0, 1)
        ok = batch["iterate_ok"][:, k - 1].view(1, -1, *([1] * (recorded.dim() - 2)))
        return torch.where(ok, recorded, fallback)

    def landing_loss(self, new: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Pseudo-Huber of each slot's squared error in tolerance units, mean over slots."""
        scale = self.schedule.table("error_std", new) ** 2 * new[0, 0].numel()
        d2 = (new[1:] - target[1:]).flatten(2).pow(2).sum(-1) / scale[:, None]  # (T, B)
        return pseudo_huber(d2, self.huber_c).mean()

    def consistency_loss(
        self, denoiser: Callable[..., torch.Tensor], x: torch.Tensor, cond: torch.Tensor,
        chunk: torch.Tensor, path: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """MSE between the (straight-through clipped) x0 of every slot of `x` and the chunk
        (`path`: the noise path, for a noise-aware PCM)."""
        T, B = self.schedule.num_inference_steps, x.shape[1]
        idx = torch.arange(T, device=x.device).repeat_interleave(B)  # slot of each row
        rows = x[:T].reshape(T * B, *x.shape[2:])
        t = self.schedule.timesteps.to(x.device)[idx]
        extra = () if path is None else (path[:T].reshape(T * B, *x.shape[2:]),)
        eps = denoiser(rows, t, cond.repeat(T, *([1] * (cond.dim() - 1))), *extra)
        x0 = self.schedule.predict_x0(eps, rows, idx)
        x0 = x0 + (self.schedule.clip(x0) - x0).detach()  # straight-through clip
        return (x0.view(T, B, *x.shape[2:]) - chunk[None]).pow(2).mean()
