"""The adapter from a policy + sampler to action chunks for a batch of running episodes.

`ChunkPolicy` is what a rollout (or a robot loop) calls: observations of every env in, one
chunk per env out, all envs in ONE sampler call. It owns the per-episode state that makes runs
reproducible and cheap: the noise generator of each episode, the warm-start trajectory and noise
(docs/design.md §4.6), and the periodic exact_err check against the sequential sampler. It
knows no environment: `on_reset(env_index, seed)` is all it hears of episodes.

`ChunkRecord` is the typed record of one call; `summarize_chunks` turns records into the
sampler metrics of docs/design.md §5 (the one definition eval, training and benchmarks use).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from picard_sampler import (
    GUIDANCE_CLIP,
    Sampler,
    SampleStats,
    exact_errors,
    percentile,
)
from policy.diffusion_policy import DiffusionPolicy

WARM_STARTS = ("none", "reuse", "shift")
"""How consecutive chunks of an episode share noise and start Picard (docs/design.md §4.6):
`none` draws fresh noise per chunk and starts cold (DP's protocol); `reuse` draws one noise per
episode for every chunk and starts from the previous chunk's trajectory; `shift` moves the
previous noise and trajectory Ta steps along the horizon with the actions they belong to (fresh
noise for the Ta new steps at the end), so every action step keeps its noise over time."""


def resolve_warm_start(value: Any) -> str:
    """`value` as one of WARM_STARTS (true/false are accepted as reuse/none)."""
    if isinstance(value, bool):
        return "reuse" if value else "none"
    if value not in WARM_STARTS:
        raise ValueError(f"warm_start must be one of {list(WARM_STARTS)}; got {value!r}")
    return value


def episode_noise_seed(noise_seed: int, episode_seed: int) -> int:
    """Seed of the sampler-noise generator of the episode with env seed `episode_seed`."""
    return int(np.random.SeedSequence([noise_seed, episode_seed]).generate_state(1)[0])


@dataclass
class ChunkRecord:
    """One sampler call for `batch` envs: the SampleStats that reports need, the call's latency
    (ms, around the sampler on the caller's clock) and, when measured, exact_err (max and mean
    over the batch of each chunk's max |a - a_seq|, normalized units); for a chunk from a
    policy server, the round trip's time beyond the server's inference call."""

    batch: int
    rounds: int
    nfe: float
    nfe_total: int
    n_converged: int
    latency_ms: float
    exact_err: float | None = None
    exact_err_mean: float | None = None
    converged_rows: list[bool] | None = None  # per sampled env (left out of flat reports)
    server_overhead_ms: float | None = None  # from a policy server: latency - its inference
    encode_ms: float | None = None  # the observation encoder's share of latency_ms
    sequential_ms: float | None = None  # the exactness check's sequential sample of the same
    # condition and noise (a measured call only): what sequential sampling costs here

    @property
    def converged(self) -> bool:
        """Every chunk of the call converged (so each is its sequential sample)."""
        return self.n_converged == self.batch

    @classmethod
    def from_stats(cls, stats: SampleStats, latency_ms: float) -> ChunkRecord:
        """The record of a sampler call that returned `stats` in `latency_ms`."""
        return cls(batch=stats.batch, rounds=int(stats.rounds), nfe=float(stats.nfe),
                   nfe_total=int(stats.nfe_total), n_converged=int(stats.n_converged),
                   latency_ms=float(latency_ms),
                   converged_rows=[bool(c) for c in stats.converged_per_sample])

    def to_dict(self) -> dict[str, Any]:
        """As JSON-able fields (`converged` included; unmeasured exact_err left out)."""
        fields = {k: v for k, v in asdict(self).items()
                  if v is not None and k != "converged_rows"}
        return {**fields, "converged": self.converged}


def take_rows(obs: Any, rows: list[int]) -> Any:
    """Rows of a batch of observations (an array or a dict of arrays)."""
    if isinstance(obs, Mapping):
        return {key: value[rows] for key, value in obs.items()}
    return obs[rows]


def batch_size(obs: Any) -> int:
    """Number of rows of a batch of observations (an array or a dict of arrays)."""
    return len(next(iter(obs.values()))) if isinstance(obs, Mapping) else len(obs)


class ChunkPolicy:
    """Chunks for all envs running an episode, in ONE sampler call per `__call__`.

    Noise is per episode: the episode with env seed s draws from a generator seeded by
    (noise_seed, s), so its noise does not depend on which env runs it or on its batch mates
    (its actions can still differ by float rounding between batch sizes: docs/design.md §9).
    `warm_start` (WARM_STARTS) shares noise between the chunks of an episode and starts
    Picard/PCM from the env's previous trajectory (same fixed point, fewer rounds). Every
    `exact_err_every`-th call (0: never) also runs the sequential sampler on the same noise.
    Idle envs (`on_reset(i, None)`) are not sampled. `full_horizon` returns the whole (H) chunk
    instead of the Ta executed steps (what a real-time controller needs); `clock` is what
    latencies and time budgets are measured on. A call's `prefix` becomes an inpainting
    constraint applied by `inpaint_method` ("replace", or "guide" with `guidance_clip`: needs
    runtime eager; picard_sampler.inpaint).
    """

    def __init__(
        self, policy: DiffusionPolicy, sampler: Sampler, noise_seed: int,
        warm_start: str | bool = "none", exact_err_every: int = 0, full_horizon: bool = False,
        clock: Callable[[], float] | None = None, inpaint_method: str = "replace",
        guidance_clip: float = GUIDANCE_CLIP,
    ):
        policy.check_inpaint_method(inpaint_method, guidance_clip)  # before any episode
        self.inpaint_method = inpaint_method
        self.guidance_clip = float(guidance_clip)
        self.policy = policy
        self.sampler = sampler
        self.noise_seed = noise_seed
        self.warm_start = resolve_warm_start(warm_start)
        self.exact_err_every = exact_err_every
        self.full_horizon = full_horizon
        self.clock = clock or time.perf_counter
        self.reference = (
            Sampler(sampler.schedule, method="sequential")
            if exact_err_every and sampler.method != "sequential" else None
        )
        self._calls = 0
        self.noise_shape = (sampler.num_steps + 1, policy.horizon, policy.action_dim)
        self._generators: dict[int, torch.Generator] = {}  # one per env running an episode
        self._episode_noise: dict[int, torch.Tensor] = {}  # warm start: the last chunk's noise
        self._trajectories: dict[int, torch.Tensor] = {}  # warm start: the last trajectory

    def on_reset(self, env_index: int, seed: int | None) -> None:
        """Env `env_index` started the episode with env seed `seed` (None: it went idle)."""
        self._trajectories.pop(env_index, None)
        self._episode_noise.pop(env_index, None)
        self._generators.pop(env_index, None)
        if seed is None:
            return
        generator = torch.Generator().manual_seed(episode_noise_seed(self.noise_seed, seed))
        self._generators[env_index] = generator

    def _noise(self, env_index: int) -> torch.Tensor:
        """This chunk's noise (T+1, H, Da) for the episode in env `env_index`."""
        generator = self._generators[env_index]
        previous = self._episode_noise.get(env_index)
        if self.warm_start == "none" or previous is None:
            noise = torch.randn(self.noise_shape, generator=generator)
        elif self.warm_start == "reuse":
            noise = previous
        else:
            ta = self.policy.n_action_steps
            fresh = torch.randn((self.noise_shape[0], ta, self.noise_shape[2]), generator=generator)
            noise = torch.cat([previous[:, ta:], fresh], dim=1)
        if self.warm_start != "none":
            self._episode_noise[env_index] = noise
        return noise

    def _initial_trajectory(self, rows: list[int], noise: torch.Tensor) -> torch.Tensor | None:
        """Warm start (T+1, B, H, Da): each env's previous trajectory (shifted by Ta along the
        horizon for `shift`, its last step repeated), x_T copies for envs that just started;
        None when no env has one (a plain cold start)."""
        if not any(row in self._trajectories for row in rows):
            return None
        init = noise[:1].expand_as(noise).clone()
        ta = self.policy.n_action_steps
        for k, row in enumerate(rows):
            previous = self._trajectories.get(row)
            if previous is None:
                continue
            if self.warm_start == "shift":
                tail = previous[:, -1:].expand_as(previous[:, :ta])
                previous = torch.cat([previous[:, ta:], tail], dim=1)
            init[:, k] = previous
        return init

    def __call__(
        self, obs: Any, budget_s: float | None = None, prefix: Any = None,
        rows: Sequence[int] | None = None,
    ) -> tuple[np.ndarray, ChunkRecord]:
        """Actions (n_envs, Ta or H, Da) for a batch of observation histories (idle envs get
        zeros) and the call's record; `budget_s` caps this call's sampling time (anytime
        Picard/PCM; the sequential sampler ignores it). `prefix` (anything with `actions`
        (n_envs, H, Da) in raw units and `weights` (H,) or (n_envs, H)) constrains the chunks
        to those actions (inpainting, DiffusionPolicy.constraint_for). With `rows` only those
        envs are sampled: `obs` (and `prefix`) then hold exactly their rows, in that order, and
        so do the returned actions (a server sampling the episodes that asked)."""
        subset = rows is not None
        if subset:
            rows = list(rows)
            unknown = [row for row in rows if row not in self._generators]
            if unknown or not rows or len(set(rows)) != len(rows):
                raise ValueError(f"rows must be distinct envs running an episode; got {rows}")
            obs_rows = obs
        else:
            rows = sorted(self._generators)
            if not rows:
                raise ValueError(
                    "no env is running an episode: call on_reset(env_index, seed) first")
            obs_rows = take_rows(obs, rows)
        inpaint = None
        if prefix is not None:
            weights = np.asarray(prefix.weights)
            actions = np.asarray(prefix.actions)
            if not subset:
                actions, weights = actions[rows], weights if weights.ndim == 1 else weights[rows]
            inpaint = self.policy.constraint_for(actions, weights, self.inpaint_method,
                                                 self.guidance_clip)
        noise = torch.stack([self._noise(row) for row in rows], dim=1).to(self.policy.device)
        warm = self.warm_start != "none" and self.sampler.method != "sequential"
        init = self._initial_trajectory(rows, noise) if warm else None
        start = self.clock()
        cond = self.policy.encode(obs_rows)  # once per chunk, whatever the sampler
        encoded = self.clock()
        actions, stats = self.policy.sample_chunk(
            cond, self.sampler, noise=noise, init=init, budget_s=budget_s, clock=self.clock,
            inpaint=inpaint,
        )
        if self.full_horizon:
            actions = self.policy.normalizer.unnormalize("action", stats.sample)
        actions = actions.cpu().numpy()
        record = ChunkRecord.from_stats(stats, (self.clock() - start) * 1e3)
        record.encode_ms = (encoded - start) * 1e3
        if warm:
            for k, row in enumerate(rows):
                self._trajectories[row] = stats.trajectory[:, k]
        if self.exact_err_every and self._calls % self.exact_err_every == 0:
            tick = self.clock()
            errors = self._exact_errors(cond, noise, stats.sample, inpaint)
            if self.reference is not None:
                record.sequential_ms = (self.clock() - tick) * 1e3
            record.exact_err, record.exact_err_mean = float(errors.max()), float(errors.mean())
        self._calls += 1
        if subset:
            return actions, record
        batch_actions = np.zeros((batch_size(obs), *actions.shape[1:]), dtype=actions.dtype)
        batch_actions[rows] = actions
        return batch_actions, record

    def _exact_errors(self, cond: torch.Tensor, noise: torch.Tensor, naction: torch.Tensor,
                      inpaint: Any = None) -> torch.Tensor:
        """exact_err of each chunk against the sequential sampler with the same condition
        (the chunk's own encoding: no second encoder call), noise and constraint (zeros for a
        sequential sampler: its own reference)."""
        if self.reference is None:
            return torch.zeros(naction.shape[0])
        _, reference = self.policy.sample_chunk(cond, self.reference, noise=noise,
                                                inpaint=inpaint)
        return exact_errors(naction, reference.sample).cpu()


def summarize_chunks(
    records: Sequence[ChunkRecord], warmup_chunks: int = 0, deadline_ms: float | None = None
) -> dict[str, Any]:
    """The sampler metrics of docs/design.md §5 over sampler-call records: rounds and nfe per
    call and per sampled chunk, exact_err over the calls that measured it, latency percentiles
    and the offline deadline_miss_rate (calls slower than `deadline_ms`, None without one) over
    the calls after the first `warmup_chunks`. Unmeasured metrics are None."""
    samples = sum(r.batch for r in records)  # (call, env) pairs sampled
    rounds = [r.rounds for r in records]
    latency = np.array([r.latency_ms for r in records[warmup_chunks:]], dtype=float)
    measured = [r for r in records if r.exact_err is not None]
    # the same timed calls, sampled by the sampler and by the exactness check's sequential
    paired = [r for r in records[warmup_chunks:] if r.sequential_ms is not None]
    sequential_p50 = percentile([r.sequential_ms for r in paired], 50)
    return {
        "rounds_mean": float(np.mean(rounds)) if rounds else None,
        "rounds_p95": percentile(rounds, 95),
        "nfe": sum(r.nfe_total for r in records) / samples if samples else None,
        "converged_rate": sum(r.n_converged for r in records) / samples if samples else None,
        "exact_err_max": max(r.exact_err for r in measured) if measured else None,
        "exact_err_mean": (
            sum(r.exact_err_mean * r.batch for r in measured) / sum(r.batch for r in measured)
            if measured else None
        ),
        "latency_ms_p50": percentile(latency, 50),
        "encode_ms_p50": percentile(
            [r.encode_ms for r in records[warmup_chunks:] if r.encode_ms is not None], 50),
        "sequential_ms_p50": sequential_p50,
        "speedup_vs_sequential": (
            sequential_p50 / percentile([r.latency_ms for r in paired], 50) if paired else None),
        "latency_ms_p95": percentile(latency, 95),
        "latency_ms_p99": percentile(latency, 99),
        "deadline_miss_rate": (
            float(np.mean(latency > deadline_ms)) if deadline_ms is not None and latency.size
            else None
        ),
        "n_chunks": len(records),
        "n_timed_chunks": int(latency.size),
        "n_exact_err_chunks": len(measured),
        "exact_check_s": (sum(r.sequential_ms for r in records if r.sequential_ms is not None)
                          / 1e3 if measured else None),
    }
