"""Evaluate a trained Diffusion Policy in its environment under a chosen sampler: the main job.

    python eval_policy.py                                 # shipped PushT policy, Picard DDPM-100
    python eval_policy.py sampler=sequential n_episodes=10 video=true
    python eval_policy.py -m sampler=sequential,picard    # one summary table over the sweep

`run` reads top to bottom: load the checkpoint's EMA policy and its env (or a checked `env=...`),
build the sampler (the schedule's training settings come from the policy), roll out
`n_episodes` seeded episodes with every env's chunk in ONE sampler call, summarize the
DESIGN.md §5 metrics, then write results.json, two histograms, an optional video and an offline
wandb run to the Hydra run dir and print a table. `build_sampler`, `evaluate` and `summarize`
are what train_pcm.py's periodic rollouts call too. After a multirun, `SweepSummary` (a Hydra
callback registered in conf/eval.yaml) writes one table over every job of the sweep.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import importlib.util
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import hydra
import imageio.v3 as iio
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import InstantiationException, OverrideParseException
from hydra.experimental.callback import Callback
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from envs.realtime import (
    CLOCKS,
    RealtimeController,
    max_lead_steps,
    summarize_realtime,
    timed_requests,
)
from envs.rollout import VECTOR_KINDS, RolloutResult, rollout
from picard_sampler import Sampler
from picard_sampler.runinfo import run_info
from policy.checkpoint import load_checkpoint, load_policy
from policy.diffusion_policy import DiffusionPolicy

CONF_DIR = Path(__file__).resolve().parent / "conf"
CHECKED_GROUPS = ("sampler", "env")
PCM_CHECKPOINT_KEY = "pcm"
"""Checkpoint key under which the PCM training stage stores the PCM's weights."""
METRICS = (
    "mean_score", "success_rate", "mean_steps", "rounds_mean", "rounds_p95", "nfe",
    "converged_rate", "exact_err_max", "exact_err_mean", "latency_ms_p50", "latency_ms_p95",
    "latency_ms_p99", "deadline_miss_rate", "anytime_rate", "held_step_rate",
)
"""The metrics every report shows (DESIGN.md §5 names), in table order."""


class ConfigError(ValueError):
    """A config value that cannot work; the entry points print it as one line."""


# ----------------------------------------------------------------------------- config, setup
def check_config(cfg: DictConfig) -> None:
    """Reject values the run cannot use, naming the key and what is allowed."""
    checks = [
        ("n_episodes", cfg.n_episodes >= 1, "an int >= 1"),
        ("n_envs", cfg.n_envs >= 1, "an int >= 1"),
        ("max_steps", cfg.max_steps is None or cfg.max_steps >= 1, "null or an int >= 1"),
        ("warmup_chunks", cfg.warmup_chunks >= 0, "an int >= 0"),
        ("exact_err_every", cfg.exact_err_every >= 1, "an int >= 1"),
        ("deadline_ms", cfg.deadline_ms is None or cfg.deadline_ms > 0, "null or a number > 0"),
        ("vector", cfg.vector in VECTOR_KINDS, f"one of {list(VECTOR_KINDS)}"),
        ("device", cfg.device == "auto" or str(cfg.device).split(":")[0] in ("cpu", "cuda"),
         "'auto', 'cpu', 'cuda' or 'cuda:N'"),
        ("threads", cfg.threads is None or cfg.threads >= 1, "null or an int >= 1"),
        ("realtime.control_hz", cfg.realtime.control_hz > 0, "a number > 0"),
        ("realtime.clock", cfg.realtime.clock in CLOCKS, f"one of {list(CLOCKS)}"),
        ("realtime.budget_margin_ms", cfg.realtime.budget_margin_ms >= 0, "a number >= 0"),
        ("deadline_ms", not (cfg.realtime.enabled and cfg.deadline_ms is not None),
         "null with realtime.enabled=true (the deadline is realtime.lead_steps ticks at "
         "realtime.control_hz)"),
    ]
    for key, ok, allowed in checks:
        if not ok:
            raise ConfigError(f"{key} must be {allowed}; got {OmegaConf.select(cfg, key)!r}")
    resolve_warm_start(cfg.warm_start)


def realtime_settings(cfg: DictConfig, policy: DiffusionPolicy) -> Realtime | None:
    """The `realtime` block as Realtime settings (None when disabled); lead_steps is checked
    against what the policy's horizon allows."""
    if not cfg.realtime.enabled:
        return None
    most = max_lead_steps(policy.horizon, policy.n_obs_steps, policy.n_action_steps)
    lead = cfg.realtime.lead_steps
    if most < 1 or (lead is not None and not 1 <= lead <= most):
        raise ConfigError(
            f"realtime.lead_steps must be null or in [1, horizon - n_obs_steps + 1 - "
            f"n_action_steps = {most}] for this policy; got {lead!r}"
        )
    return Realtime(float(cfg.realtime.control_hz), cfg.realtime.clock, lead,
                    float(cfg.realtime.budget_margin_ms))


def configure_torch(device: str, threads: int | None) -> torch.device:
    """Set torch's thread count (None keeps the default) and pick the device (auto: CUDA if any)."""
    if threads is not None:
        torch.set_num_threads(threads)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_group_choices(argv: Sequence[str], conf_dir: Path = CONF_DIR) -> None:
    """Reject an unknown `sampler=` / `env=` choice in one line (Hydra's own error takes ten)."""
    args = [a for a in argv if "=" in a and not a.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except OverrideParseException:
        return  # Hydra reports syntax errors itself
    for override in overrides:
        group = override.key_or_group
        if group not in CHECKED_GROUPS or override.is_delete():
            continue
        names = (
            list(override.sweep_string_iterator())
            if override.is_sweep_override()
            else [override.value()]
        )
        available = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
        for name in names:
            if isinstance(name, str) and name not in available:
                raise ConfigError(
                    f"unknown {group} {name!r}; available {group}s: {', '.join(available)}"
                )


# ------------------------------------------------------------------------ checkpoint, env
def load_checkpoint_and_policy(
    path: str | Path, device: torch.device
) -> tuple[dict[str, Any], DiffusionPolicy]:
    """The checkpoint dict and its EMA policy on `device`; a missing or foreign file is a
    ConfigError naming the path."""
    if not Path(path).is_file():
        raise ConfigError(
            f"checkpoint not found: {path} (pass checkpoint=PATH to a train_pcm.py checkpoint, "
            "e.g. runs/dp_pusht_lowdim/best.ckpt)"
        )
    try:
        return load_checkpoint(path), load_policy(path, map_location=device)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def resolve_env(env_cfg: DictConfig | None, checkpoint_config: Mapping[str, Any]) -> dict:
    """The env config to evaluate in: the explicit `env=...` choice, else the checkpoint's own."""
    if env_cfg is None:
        return dict(checkpoint_config["env"])
    return OmegaConf.to_container(env_cfg, resolve=True)


def make_env_factory(env: Mapping[str, Any], max_steps: int, render: bool) -> Callable[[], gym.Env]:
    """A picklable thunk making one env of `env` (gymnasium id + kwargs) that ends at
    `max_steps`, rendering RGB frames if `render`."""
    kwargs = dict(env.get("kwargs") or {}, max_episode_steps=max_steps)
    if render:
        kwargs["render_mode"] = "rgb_array"
    return functools.partial(gym.make, env["id"], **kwargs)


def check_env_fits_policy(
    make_env: Callable[[], gym.Env], policy: DiffusionPolicy, env_name: str, checkpoint: str
) -> None:
    """Reject an env whose observation or action shapes are not the ones the policy takes."""
    env = make_env()
    obs_space, action_space = env.observation_space, env.action_space
    env.close()
    wanted = {key: tuple(shape) for key, shape in policy.obs_encoder.obs_shapes.items()}
    if isinstance(obs_space, gym.spaces.Dict):
        got: Any = {key: tuple(space.shape) for key, space in obs_space.spaces.items()}
        fits = all(got.get(key) == shape for key, shape in wanted.items())
    else:
        got = tuple(obs_space.shape)
        fits = len(wanted) == 1 and next(iter(wanted.values())) == got
    if not fits:
        raise ConfigError(
            f"env {env_name} does not fit the policy in {checkpoint}: the env observes {got}, "
            f"the policy takes {wanted}"
        )
    if tuple(action_space.shape) != (policy.action_dim,):
        raise ConfigError(
            f"env {env_name} does not fit the policy in {checkpoint}: the env takes actions of "
            f"shape {tuple(action_space.shape)}, the policy outputs ({policy.action_dim},)"
        )


# ---------------------------------------------------------------------------------- sampler
def _plain(config: Mapping[str, Any]) -> dict[str, Any]:
    """A DictConfig or mapping as a plain, resolved dict."""
    if OmegaConf.is_config(config):
        return OmegaConf.to_container(config, resolve=True)
    return dict(config)


def build_sampler(sampler_cfg: DictConfig, train_schedule: Mapping[str, Any]) -> Sampler:
    """Instantiate a conf/sampler config with the schedule's training settings (timesteps,
    betas, clipping, prediction type) taken from the policy's `train_schedule` config, so the
    two cannot disagree; the sampler config picks the schedule class, steps and method knobs."""
    trained = {
        key: value for key, value in _plain(train_schedule).items()
        if key not in ("_target_", "num_inference_steps")
    }
    clash = sorted(set(trained) & set(sampler_cfg.schedule))
    if clash:
        raise ConfigError(
            f"sampler.schedule.{clash[0]} cannot be set: it comes from the policy's "
            f"train_schedule ({trained[clash[0]]!r})"
        )
    try:
        return hydra.utils.instantiate(sampler_cfg, schedule=trained)
    except InstantiationException as e:
        raise ConfigError(f"sampler: {e.__cause__ or e}") from e


def check_pcm_weights(sampler: Sampler, checkpoint: Mapping[str, Any], path: str) -> None:
    """PCM sampling needs a PCM in the checkpoint: say which key is missing, up front; warn when
    the PCM was trained for another schedule (still exact by switching, but no faster)."""
    if sampler.method != "pcm":
        return
    if PCM_CHECKPOINT_KEY not in checkpoint:
        raise ConfigError(
            f"sampler=pcm needs PCM weights under the checkpoint key '{PCM_CHECKPOINT_KEY}', "
            f"which {path} does not have: train a PCM for this policy or pick another sampler"
        )
    trained = (checkpoint.get("config") or {}).get("pcm", {}).get("schedule") or {}
    name = str(trained.get("_target_", "")).rsplit(".", 1)[-1]
    steps = trained.get("num_inference_steps")
    if name and (name, steps) != (type(sampler.schedule).__name__, sampler.num_steps):
        warnings.warn(
            f"the PCM in {path} was trained for {name} with {steps} steps, but the sampler runs "
            f"{type(sampler.schedule).__name__} with {sampler.num_steps}: the chunks stay exact "
            "(model switching), but expect no gain over Picard (sampler=pcm is DDIM-16, "
            "sampler=pcm_ddpm DDPM-100)",
            stacklevel=2,
        )


def describe_sampler(sampler: Sampler) -> str:
    """A short label for tables, e.g. 'picard DDPM-100 (window 16, tol 0.1, scan)'."""
    label = f"{sampler.method} {sampler.schedule.name.upper()}-{sampler.num_steps}"
    if sampler.method == "sequential":
        return label
    knobs = [f"window {sampler.window or sampler.num_steps}", f"tol {sampler.tol:g}",
             sampler.update]
    if sampler.method == "pcm":
        knobs.append(f"switch_rounds {sampler.switch_rounds}")
    if sampler.max_rounds is not None:
        knobs.append(f"max_rounds {sampler.max_rounds}")
    if sampler.budget_s is not None:
        knobs.append(f"budget {sampler.budget_s * 1e3:g} ms")
    return f"{label} ({', '.join(knobs)})"


# ------------------------------------------------------------------------------- rollouts
def episode_noise_seed(noise_seed: int, episode_seed: int) -> int:
    """Seed of the sampler-noise generator of the episode with env seed `episode_seed`."""
    return int(np.random.SeedSequence([noise_seed, episode_seed]).generate_state(1)[0])


def _take_rows(obs: Any, rows: list[int]) -> Any:
    """Rows of a batch of observations (an array or a dict of arrays)."""
    if isinstance(obs, Mapping):
        return {key: value[rows] for key, value in obs.items()}
    return obs[rows]


WARM_STARTS = ("none", "reuse", "shift")
"""How consecutive chunks of an episode share noise and start Picard (DESIGN.md §4): `none`
draws fresh noise per chunk and starts cold (DP's protocol); `reuse` draws one noise per episode
for every chunk and starts from the previous chunk's trajectory; `shift` moves the previous
noise and trajectory Ta steps along the horizon with the actions they belong to (fresh noise for
the Ta new steps at the end), so every action step keeps its noise over time."""


def resolve_warm_start(value: Any) -> str:
    """`warm_start` as one of WARM_STARTS (true/false are accepted as reuse/none)."""
    if isinstance(value, bool):
        return "reuse" if value else "none"
    if value not in WARM_STARTS:
        raise ConfigError(f"warm_start must be one of {list(WARM_STARTS)}; got {value!r}")
    return value


class ChunkPolicy:
    """The rollout's `policy_fn`: the chunks of all envs running an episode in ONE sampler call.

    Noise is per episode: the episode with env seed s draws from a generator seeded by
    (noise_seed, s), so its actions do not depend on which env runs it or on its batch mates.
    `warm_start` (WARM_STARTS) shares noise between the chunks of an episode and starts
    Picard/PCM from the env's previous trajectory (same fixed point, fewer rounds). Every
    `exact_err_every`-th call (0: never) also runs the sequential sampler on the same noise and
    records each chunk's largest |a - a_seq| (normalized units). Idle envs are not sampled.
    `full_horizon` returns the whole (H) chunk instead of the Ta executed steps (what the
    real-time controller needs); `budget_s` caps one call's sampling time (anytime Picard/PCM).
    """

    def __init__(
        self, policy: DiffusionPolicy, sampler: Sampler, noise_seed: int,
        warm_start: str | bool = "none", exact_err_every: int = 0, full_horizon: bool = False,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.policy = policy
        self.sampler = sampler
        self.noise_seed = noise_seed
        self.warm_start = resolve_warm_start(warm_start)
        self.exact_err_every = exact_err_every
        self.full_horizon = full_horizon
        self.clock = clock
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
        """rollout's hook: env `env_index` started the episode with env seed `seed` (None: idle)."""
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
        self, obs: Any, budget_s: float | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Actions (n_envs, Ta or H, Da) for a batch of observation histories, and the call's
        stats (rounds, nfe, convergence, latency_ms around the sampler, exact_err when due)."""
        rows = sorted(self._generators)
        obs_rows = _take_rows(obs, rows)
        noise = torch.stack([self._noise(row) for row in rows], dim=1).to(self.policy.device)
        warm = self.warm_start != "none" and self.sampler.method != "sequential"
        init = self._initial_trajectory(rows, noise) if warm else None
        sampler = self.sampler
        if budget_s is not None and sampler.method != "sequential":
            budget_s = budget_s if sampler.budget_s is None else min(budget_s, sampler.budget_s)
            sampler = dataclasses.replace(sampler, budget_s=budget_s, extra={
                **sampler.extra, "clock": self.clock})
        start = self.clock()
        actions, stats = self.policy.predict_action(obs_rows, sampler, noise=noise, init=init)
        if self.full_horizon:
            actions = self.policy.normalizer.unnormalize("action", stats["naction"])
        actions = actions.cpu().numpy()
        latency_ms = (self.clock() - start) * 1e3
        if warm:
            for k, row in enumerate(rows):
                self._trajectories[row] = stats["trajectory"][:, k]
        record = {
            "batch": len(rows),
            "rounds": int(stats["rounds"]),
            "nfe": float(stats["nfe"]),
            "nfe_total": int(stats["nfe_total"]),
            "n_converged": int(sum(stats["converged_per_sample"])),
            "converged": bool(all(stats["converged_per_sample"])),
            "latency_ms": latency_ms,
        }
        if self.exact_err_every and self._calls % self.exact_err_every == 0:
            errors = self._exact_errors(obs_rows, noise, stats["naction"])
            record.update(exact_err=float(errors.max()), exact_err_mean=float(errors.mean()))
        self._calls += 1
        n_envs = len(next(iter(obs.values()))) if isinstance(obs, Mapping) else len(obs)
        batch_actions = np.zeros((n_envs, *actions.shape[1:]), dtype=actions.dtype)
        batch_actions[rows] = actions  # idle envs ignore their actions
        return batch_actions, record

    def _exact_errors(self, obs: Any, noise: torch.Tensor, naction: torch.Tensor) -> torch.Tensor:
        """max |a - a_seq| over each sample's whole normalized chunk (zeros for a sequential
        sampler, which is its own reference)."""
        if self.reference is None:
            return torch.zeros(naction.shape[0])
        _, reference = self.policy.predict_action(obs, self.reference, noise=noise)
        return (naction - reference["naction"]).abs().flatten(1).amax(1).cpu()


@dataclasses.dataclass
class Realtime:
    """Real-time rollout settings (envs.realtime): the control rate, which clock, the lead."""

    control_hz: float = 10.0
    clock: str = "simulated"
    lead_steps: int | None = None
    budget_margin_ms: float = 5.0


def evaluate(
    policy: DiffusionPolicy,
    sampler: Sampler,
    env: Mapping[str, Any],
    n_episodes: int,
    n_envs: int,
    seed_start: int,
    noise_seed: int,
    max_steps: int | None = None,
    vector: str = "sync",
    warm_start: str | bool = "none",
    exact_err_every: int = 0,
    video: bool = False,
    progress: bool = True,
    realtime: Realtime | None = None,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
) -> RolloutResult:
    """Roll `policy` out with `sampler` in `env` (an env config: id, kwargs, max_steps) for the
    episodes with env seeds seed_start .. seed_start + n_episodes - 1.

    The result's `policy_calls` hold one record per rollout call: batch, rounds, nfe,
    nfe_total, n_converged, latency_ms (around the sampler call) and, on every
    `exact_err_every`-th sampler call (0: never), exact_err / exact_err_mean. `video` keeps the
    frames of episode 0. With `realtime`, one env runs on the control clock of
    envs.realtime.RealtimeController (its per-request records are in `result.requests`).
    """
    env = _plain(env)
    max_steps = env["max_steps"] if max_steps is None else max_steps
    chunk_policy = ChunkPolicy(policy, sampler, noise_seed, warm_start, exact_err_every,
                               full_horizon=realtime is not None, clock=clock)
    policy_fn, on_reset, controller = chunk_policy, chunk_policy.on_reset, None
    if realtime is not None:
        if n_envs != 1:
            raise ConfigError(f"realtime runs one env (one robot, one control clock); got "
                              f"n_envs={n_envs}")
        controller = RealtimeController(
            chunk_policy, realtime.control_hz, policy.n_obs_steps, policy.n_action_steps,
            policy.horizon, realtime.lead_steps, realtime.budget_margin_ms / 1e3,
            realtime.clock, clock=clock, sleep=sleep,
        )

        def on_reset(env_index: int, seed: int | None) -> None:
            controller.on_reset(env_index, seed)
            chunk_policy.on_reset(env_index, seed)

        policy_fn = controller
    try:
        result = rollout(
            policy_fn, make_env_factory(env, max_steps, render=video), n_episodes=n_episodes,
            n_envs=n_envs, seed_start=seed_start, max_steps=max_steps,
            n_obs_steps=policy.n_obs_steps, n_action_steps=policy.n_action_steps, vector=vector,
            record_frames=video, progress=progress, on_reset=on_reset,
        )
    finally:
        if controller is not None:
            controller.close()
    if controller is not None:
        result.requests = controller.requests
        result.realtime = {"control_hz": controller.control_hz, "clock": controller.clock_mode,
                           "lead_steps": controller.lead_steps,
                           "deadline_ms": controller.deadline_s * 1e3,
                           "budget_ms": controller.budget_s * 1e3}
    return result


def sampler_calls(result: RolloutResult) -> list[dict[str, Any]]:
    """One record per sampler call to report: the rollout's calls offline, the timed chunk
    requests in real time (each episode's awaited first chunk left out)."""
    if result.realtime is not None:
        return timed_requests(result.requests)
    return result.policy_calls


def summarize(
    result: RolloutResult, warmup_chunks: int = 0, deadline_ms: float | None = None
) -> dict[str, Any]:
    """DESIGN.md §5 metrics: scores per episode; rounds, nfe, exact_err per sampler call (in real
    time: per timed request, each episode's awaited first chunk left out); latency per call
    after the first `warmup_chunks` calls. Offline, `deadline_miss_rate` is the
    share of timed calls slower than `deadline_ms`; in a real-time rollout it is the share of
    chunks that arrived after their due tick, next to anytime_rate and held_step_rate
    (envs.realtime.summarize_realtime). Unmeasured metrics are None."""
    chunks = sampler_calls(result)
    samples = sum(c["batch"] for c in chunks)  # (chunk, env) pairs sampled
    rounds = np.array([c["rounds"] for c in chunks], dtype=float)
    latency = np.array([c["latency_ms"] for c in chunks[warmup_chunks:]], dtype=float)
    measured = [c for c in chunks if "exact_err" in c]
    p50, p95, p99 = np.percentile(latency, [50, 95, 99]) if latency.size else (None,) * 3
    metrics = {
        **result.metrics,
        "rounds_mean": float(rounds.mean()) if rounds.size else None,
        "rounds_p95": float(np.percentile(rounds, 95)) if rounds.size else None,
        "nfe": sum(c["nfe_total"] for c in chunks) / samples if samples else None,
        "converged_rate": sum(c["n_converged"] for c in chunks) / samples if samples else None,
        "exact_err_max": max(c["exact_err"] for c in measured) if measured else None,
        "exact_err_mean": (
            sum(c["exact_err_mean"] * c["batch"] for c in measured)
            / sum(c["batch"] for c in measured)
            if measured else None
        ),
        "latency_ms_p50": None if p50 is None else float(p50),
        "latency_ms_p95": None if p95 is None else float(p95),
        "latency_ms_p99": None if p99 is None else float(p99),
        "deadline_miss_rate": (
            float(np.mean(latency > deadline_ms)) if deadline_ms is not None and latency.size
            else None
        ),
        "anytime_rate": None,  # real time only (summarize_realtime)
        "held_step_rate": None,
        "n_chunks": len(chunks),
        "n_timed_chunks": int(latency.size),
        "n_exact_err_chunks": len(measured),
    }
    if result.realtime is not None:
        metrics.update(summarize_realtime(result.policy_calls, result.requests))
    return metrics


# ---------------------------------------------------------------------------------- outputs
def write_results(path: Path, results: Mapping[str, Any]) -> Path:
    """Write the results record as indented JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def _histogram(
    path: Path, values: Sequence[float], xlabel: str, title: str, bins: Any,
    marks: Mapping[str, float | None],
) -> Path:
    """One histogram PNG with labelled vertical lines at `marks` (Agg canvas, no pyplot)."""
    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.subplots()
    ax.hist(values, bins=bins, color="tab:blue", alpha=0.8)
    for (label, x), color in zip(marks.items(), ("k", "tab:orange", "tab:red", "tab:purple"),
                                 strict=False):
        if x is not None:
            ax.axvline(x, color=color, linestyle="--", label=f"{label} {x:.4g}")
    if any(x is not None for x in marks.values()):
        ax.legend(fontsize=8)
    ax.set(xlabel=xlabel, ylabel="chunks", title=title)
    fig.savefig(path, dpi=100)
    return path


def plot_histograms(
    out_dir: Path, result: RolloutResult, metrics: Mapping[str, Any], warmup_chunks: int,
    deadline_ms: float | None, title: str,
) -> list[Path]:
    """latency_hist.png (timed chunks, p50/p95/p99 and the deadline) and rounds_hist.png (none
    when no chunk was sampled)."""
    chunks = sampler_calls(result)
    if not chunks:
        return []
    rounds = [c["rounds"] for c in chunks]
    latency = [c["latency_ms"] for c in chunks[warmup_chunks:]]
    marks = {f"p{q}": metrics[f"latency_ms_p{q}"] for q in (50, 95, 99)}
    return [
        _histogram(out_dir / "latency_hist.png", latency, "latency per chunk (ms)", title, 30,
                   {**marks, "deadline": deadline_ms}),
        _histogram(out_dir / "rounds_hist.png", rounds, "rounds per chunk", title,
                   np.arange(min(rounds), max(rounds) + 2) - 0.5,
                   {"mean": metrics["rounds_mean"]}),
    ]


def save_video(frames: Sequence[np.ndarray], out_dir: Path, fps: int = 10) -> Path:
    """Episode 0 as episode_0.mp4 when imageio-ffmpeg is installed, else as a looping GIF."""
    if importlib.util.find_spec("imageio_ffmpeg") is not None:
        path = out_dir / "episode_0.mp4"
        iio.imwrite(path, np.stack(frames), plugin="FFMPEG", fps=fps)
    else:
        path = out_dir / "episode_0.gif"
        iio.imwrite(path, np.stack(frames), duration=1000 / fps, loop=0)
    return path


def log_to_wandb(
    logger_cfg: DictConfig, out_dir: Path, results: Mapping[str, Any], images: Sequence[Path]
) -> None:
    """One wandb run (offline unless logger.mode says otherwise) with the metrics and plots."""
    import wandb

    run = wandb.init(
        project=logger_cfg.project, name=results["sampler"]["label"], dir=str(out_dir),
        mode=logger_cfg.mode, job_type="eval", config=results["config"],
    )
    metrics = {k: v for k, v in results["metrics"].items() if v is not None}
    run.log({**metrics, **{p.stem: wandb.Image(str(p)) for p in images}})
    run.summary.update(metrics)
    run.finish()


def _format(value: Any) -> str:
    """A table cell: '-' for None, 4 significant digits for floats."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_format(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def format_report(results: Mapping[str, Any]) -> str:
    """What a run prints at the end: what was evaluated, where and how, then the metric table."""
    info, seeds = results["run_info"], results["seeds"] or ["-"]
    realtime = results.get("realtime")
    clock = (
        f" | real time: {realtime['control_hz']:g} Hz, deadline {realtime['deadline_ms']:.4g} ms "
        f"({realtime['lead_steps']} ticks), {realtime['clock']} clock" if realtime else ""
    )
    interrupted = " (INTERRUPTED: finished episodes only)" if results.get("interrupted") else ""
    return "\n".join([
        f"{results['sampler']['label']} | {results['checkpoint']['path']} "
        f"(step {results['checkpoint']['step']}) | env {results['config']['env']['name']}{clock}",
        f"{results['n_episodes']} episodes{interrupted} (seeds {seeds[0]}..{seeds[-1]}, noise_seed "
        f"{results['noise_seed']}) | {info['device']} ({info['device_name']}), threads "
        f"{info['threads']}, torch {info['versions']['torch']}",
        markdown_table(("metric", "value"), [(k, results["metrics"].get(k)) for k in METRICS]),
    ])


# ----------------------------------------------------------------------------- sweep summary
def _job_number(job_dir: Path) -> tuple[int, str]:
    """Sort key of a sweep's job dirs: numeric names (Hydra's job numbers) in numeric order."""
    return (int(job_dir.name) if job_dir.name.isdigit() else -1, job_dir.name)


def write_sweep_summary(sweep_dir: Path) -> str:
    """One table over every job's results.json in `sweep_dir`: summary.md and summary.csv.

    The overrides column shows only the overrides that differ between jobs."""
    paths = sorted(sweep_dir.glob("*/results.json"), key=lambda p: _job_number(p.parent))
    jobs = [(p.parent.name, json.loads(p.read_text())) for p in paths]
    shared = set.intersection(*(set(r["overrides"]) for _, r in jobs)) if jobs else set()
    header = ("job", "overrides", "sampler", "n_episodes", *METRICS)
    rows = [
        [name, " ".join(o for o in r["overrides"] if o not in shared), r["sampler"]["label"],
         r["n_episodes"], *(r["metrics"].get(k) for k in METRICS)]
        for name, r in jobs
    ]
    with (sweep_dir / "summary.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([["" if v is None else v for v in row] for row in rows])
    table = markdown_table(header, rows)
    (sweep_dir / "summary.md").write_text(f"# Sweep {sweep_dir}\n\n{table}\n")
    return table


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, print and write the sweep's summary table."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        print(f"sweep summary: {sweep_dir / 'summary.md'}\n{write_sweep_summary(sweep_dir)}")


# -------------------------------------------------------------------------------------- run
def run(cfg: DictConfig, out_dir: Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Evaluate per `cfg` and write every output to `out_dir`; returns the results record."""
    check_config(cfg)
    device = configure_torch(cfg.device, cfg.threads)
    checkpoint, policy = load_checkpoint_and_policy(cfg.checkpoint, device)
    env = resolve_env(cfg.env, checkpoint["config"])
    max_steps = env["max_steps"] if cfg.max_steps is None else cfg.max_steps
    check_env_fits_policy(
        make_env_factory(env, max_steps, render=False), policy, env["name"], cfg.checkpoint
    )
    sampler = build_sampler(cfg.sampler, checkpoint["config"]["policy"]["train_schedule"])
    check_pcm_weights(sampler, checkpoint, cfg.checkpoint)
    label = describe_sampler(sampler)
    print(f"evaluating {cfg.checkpoint} (step {checkpoint['step']}) with {label}: "
          f"{cfg.n_episodes} episodes of {env['name']} on {device} -> {out_dir}")

    realtime = realtime_settings(cfg, policy)
    n_envs, exact_err_every = cfg.n_envs, cfg.exact_err_every if cfg.exact_err else 0
    if realtime is not None:
        n_envs = 1
        if realtime.clock == "wall" and exact_err_every:
            exact_err_every = 0
            print("realtime.clock=wall: exact_err is not measured (it would run on the clock)")
        print(f"real-time rollout: one env at {realtime.control_hz:g} Hz ({realtime.clock} clock)")

    result = evaluate(
        policy, sampler, env, n_episodes=cfg.n_episodes, n_envs=n_envs,
        seed_start=cfg.seed_start, noise_seed=cfg.noise_seed, max_steps=max_steps,
        vector=cfg.vector, warm_start=cfg.warm_start, exact_err_every=exact_err_every,
        video=cfg.video, progress=cfg.progress, realtime=realtime,
    )
    metrics = summarize(result, cfg.warmup_chunks, cfg.deadline_ms)

    out_dir.mkdir(parents=True, exist_ok=True)
    config = {**OmegaConf.to_container(cfg, resolve=True), "env": env, "max_steps": max_steps}
    results = {
        "metrics": metrics,
        "sampler": {
            "label": label,
            "method": sampler.method,
            "schedule": {"class": type(sampler.schedule).__name__, **sampler.schedule.config},
            **{k: getattr(sampler, k) for k in ("window", "tol", "update", "switch_rounds",
                                                 "max_rounds", "budget_s")},
        },
        "n_episodes": len(result.episodes),
        "interrupted": result.interrupted,
        "realtime": result.realtime,
        "seeds": [e["seed"] for e in result.episodes],
        "noise_seed": cfg.noise_seed,
        "checkpoint": {"path": str(cfg.checkpoint), "step": checkpoint["step"]},
        "overrides": list(overrides),
        "config": config,  # as run: env and max_steps filled in
        "run_info": run_info(device),
        "episodes": result.episodes,
        "chunks": result.policy_calls,
        "requests": result.requests,
    }
    deadline_ms = result.realtime["deadline_ms"] if result.realtime else cfg.deadline_ms
    images = plot_histograms(out_dir, result, metrics, cfg.warmup_chunks, deadline_ms, label)
    if result.frames:
        results["video"] = str(save_video(result.frames, out_dir))
    write_results(out_dir / "results.json", results)
    if cfg.logger.wandb:
        log_to_wandb(cfg.logger, out_dir, results, images)
    print(format_report(results))
    print(f"results: {out_dir / 'results.json'}")
    if result.interrupted:
        raise KeyboardInterrupt(f"interrupted; results so far in {out_dir / 'results.json'}")
    return results


@hydra.main(config_path="conf", config_name="eval", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    """Hydra entry: config errors become one line on stderr and exit status 1."""
    os.environ.setdefault("WANDB_SILENT", "true")
    hydra_cfg = HydraConfig.get()
    try:
        run(cfg, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task))
    except KeyboardInterrupt as e:
        print(str(e) or "interrupted", file=sys.stderr)
        sys.exit(130)
    except (ConfigError, InstantiationException, OmegaConfBaseException) as e:
        cause = e.__cause__ if isinstance(e, InstantiationException) and e.__cause__ else e
        sys.exit(f"config error: {' '.join(str(cause).split())}")


def main() -> None:
    """Check group choices in one line, then hand the command line to Hydra."""
    try:
        check_group_choices(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    hydra_main()


if __name__ == "__main__":
    main()
