"""Evaluation runs: a policy under a sampler, rolled out in its env, summarized and reported.

`run_eval(cfg, out_dir)` is eval_policy.py's whole job, top to bottom: check the config, load
the checkpoint's EMA policy and its env (or a checked `env=...`) and build the sampler on the
policy's own training settings (`app.builder`, sampler=auto's calibration included), roll out
`n_episodes` seeded episodes with every env's chunk in ONE sampler call
(`policy.chunking.ChunkPolicy`; in real time one env on the control clock of `envs.realtime`),
summarize the metrics of docs/design.md §5, write results.json, histograms, an optional video
and an offline wandb run, and print a table. `evaluate` + `summarize` are what training's
periodic rollouts call too.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch
from gymnasium.envs.registration import load_env_creator
from omegaconf import DictConfig, OmegaConf
from picard_client.realtime import (
    ChunkRequest,
    RealtimeController,
    RealtimeSettings,
    max_lead_steps,
    summarize_realtime,
    timed_requests,
)

from app.builder import (
    PolicySpec,
    build_policy,
    check_env_fits,
    make_env_factory,
    policy_run_checks,
)
from app.checks import ConfigError, is_int, is_number, plain, raise_first_failure
from app.device import configure_torch
from app.report import (
    format_report,
    log_to_wandb,
    plot_histograms,
    save_video,
    write_results,
)
from app.run_dirs import prepare_output_dir
from envs.rollout import VECTOR_KINDS, EpisodeSpec, RolloutResult, rollout
from picard_sampler import Sampler
from picard_sampler.metrics import EXACT_RULE, is_exact
from picard_sampler.runinfo import run_info
from policy.chunking import (
    ChunkPolicy,
    ChunkRecord,
    resolve_warm_start,
    summarize_chunks,
)
from policy.diffusion_policy import DiffusionPolicy

# ----------------------------------------------------------------------------- config, setup
MAX_EPISODES = 100_000
"""Most episodes one eval runs (each keeps its record in results.json; 10**9 would exhaust
memory long before it finished)."""


def check_eval_config(cfg: DictConfig) -> None:
    """Reject values an eval run cannot use, naming the key and what is allowed."""
    rt = cfg.realtime
    raise_first_failure(cfg, [
        *policy_run_checks(cfg),
        ("n_episodes", is_int(cfg.n_episodes, 1) and cfg.n_episodes <= MAX_EPISODES,
         f"an int in [1, {MAX_EPISODES}]"),
        ("n_envs", is_int(cfg.n_envs, 1), "an int >= 1"),
        ("seed_start", is_int(cfg.seed_start, 0) and cfg.seed_start + _n(cfg) <= 2**32 - 1,
         "an int >= 0 with seed_start + n_episodes < 2**32 (env seeds are 32-bit)"),
        ("noise_seed", is_int(cfg.noise_seed, 0), "an int >= 0"),
        ("max_steps", cfg.max_steps is None or is_int(cfg.max_steps, 1), "null or an int >= 1"),
        ("warmup_chunks", is_int(cfg.warmup_chunks, 0), "an int >= 0"),
        ("exact_err", isinstance(cfg.exact_err, bool), "true or false"),
        ("exact_err_every", is_int(cfg.exact_err_every, 1), "an int >= 1"),
        ("deadline_ms", cfg.deadline_ms is None or is_number(cfg.deadline_ms, 0, strict=True),
         "null or a number > 0"),
        ("vector", cfg.vector in VECTOR_KINDS, f"one of {list(VECTOR_KINDS)}"),
        ("realtime.enabled", isinstance(rt.enabled, bool), "true or false"),
        ("server", cfg.server is None or (isinstance(cfg.server, str) and ":" in cfg.server),
         "null or HOST:PORT of a running serve_policy.py"),
        ("server", cfg.server is None or rt.enabled is True,
         "null unless realtime.enabled=true (a server feeds one robot's control loop)"),
        ("video", isinstance(cfg.video, bool), "true or false"),
        ("progress", isinstance(cfg.progress, bool), "true or false"),
        ("overwrite", isinstance(cfg.overwrite, bool), "true or false"),
        ("logger.wandb", isinstance(cfg.logger.wandb, bool), "true or false"),
        ("deadline_ms", not (rt.enabled and cfg.deadline_ms is not None),
         "null with realtime.enabled=true (the deadline is realtime.lead_steps ticks at "
         "realtime.control_hz)"),
    ])
    _realtime_block(cfg)  # checked by the record it becomes, naming the realtime.* key


def _realtime_block(cfg: DictConfig) -> RealtimeSettings:
    """The `realtime` block (times in ms) as the controller's RealtimeSettings (seconds); a
    bad value is a ConfigError naming its key."""
    try:
        return RealtimeSettings.from_config(cfg.realtime)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _n(cfg: DictConfig) -> int:
    """n_episodes when it is an int (checked on its own), else 0."""
    return cfg.n_episodes if is_int(cfg.n_episodes) else 0


def realtime_settings(cfg: DictConfig, dims: tuple[int, int, int]) -> RealtimeSettings | None:
    """The `realtime` block as RealtimeSettings (None when disabled), checked against what the
    policy's `dims` (n_obs_steps, n_action_steps, horizon) allow: its lead_steps, and a
    budget margin below the deadline."""
    if not cfg.realtime.enabled:
        return None
    settings = _realtime_block(cfg)
    try:
        lead = settings.resolved_lead_steps(dims)
    except ValueError as e:
        most = max_lead_steps(dims[2], dims[0], dims[1])
        raise ConfigError(
            f"realtime.lead_steps must be null or in [1, horizon - n_obs_steps + 1 - "
            f"n_action_steps = {most}] for this policy; got {settings.lead_steps!r}"
        ) from e
    deadline_s = settings.deadline_s(lead)
    if not settings.budget_margin_s < deadline_s:
        raise ConfigError(
            f"realtime.budget_margin_ms must be below the deadline ({deadline_s * 1e3:g} ms = "
            f"lead_steps / control_hz); got {cfg.realtime.budget_margin_ms!r}"
        )
    return settings


# ------------------------------------------------------------------------------ env
def env_class_attribute(env: Mapping[str, Any], name: str, default: Any) -> Any:
    """Attribute `name` of the class an env config (gymnasium id, "module:" prefix allowed)
    makes, read from its registration: no env is built (a robosuite env takes seconds)."""
    module, _, env_id = env["id"].rpartition(":")
    if module:
        importlib.import_module(module)
    entry_point = gym.spec(env_id).entry_point
    creator = load_env_creator(entry_point) if isinstance(entry_point, str) else entry_point
    return getattr(creator, name, default)


# ------------------------------------------------------------------------------- rollouts
@dataclass
class EvalResult:
    """A rollout and, in real time, the robot's view of it: one ChunkRequest per chunk request
    and the real-time settings used."""

    rollout: RolloutResult
    requests: list[ChunkRequest] = field(default_factory=list)
    realtime: dict[str, Any] | None = None
    executed: list[tuple[Any, Any]] = field(default_factory=list)  # per episode: actions, sources

    @property
    def chunk_records(self) -> list[ChunkRecord]:
        """The sampler calls to report: every call offline; in real time, the timed requests'
        calls (each episode's awaited first chunk left out)."""
        if self.realtime is not None:
            return [r.chunk for r in timed_requests(self.requests)]
        return [call.record for call in self.rollout.policy_calls]


def evaluate(
    policy: DiffusionPolicy,
    sampler: Sampler,
    env: Mapping[str, Any],
    episodes: EpisodeSpec,
    noise_seed: int,
    warm_start: str | bool = "none",
    exact_err_every: int = 0,
    realtime: RealtimeSettings | None = None,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
) -> EvalResult:
    """Roll `policy` out with `sampler` in `env` (an env config: id, kwargs, max_steps) for
    the `episodes` (env seeds seed_start .. seed_start + n_episodes - 1; `record_frames`
    keeps the frames of episode 0); the sampler noise of an episode is drawn from
    (`noise_seed`, its seed).

    Each rollout call's record is a ChunkRecord (exact_err on every `exact_err_every`-th
    sampler call; 0: never). With `realtime`, one env runs on the control clock of
    envs.realtime.RealtimeController (`clock`, `sleep`).
    """
    env = plain(env)
    try:
        inpaint = ({"inpaint_method": realtime.inpaint_method,
                    "guidance_clip": realtime.guidance_clip}
                   if realtime is not None and realtime.handoff == "inpaint" else {})
        chunk_policy = ChunkPolicy(policy, sampler, noise_seed, resolve_warm_start(warm_start),
                                   exact_err_every, full_horizon=realtime is not None,
                                   clock=clock, **inpaint)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    dims = (policy.n_obs_steps, policy.n_action_steps, policy.horizon)
    if realtime is not None:
        if episodes.n_envs != 1:
            raise ConfigError(f"realtime runs one env (one robot, one control clock); got "
                              f"n_envs={episodes.n_envs}")
        return evaluate_realtime(chunk_policy, chunk_policy.on_reset, dims, env, realtime,
                                 episodes, clock=clock, sleep=sleep)
    result = rollout(
        chunk_policy, make_env_factory(env, episodes.max_steps, render=episodes.record_frames),
        episodes, n_obs_steps=dims[0], n_action_steps=dims[1], on_reset=chunk_policy.on_reset,
    )
    return EvalResult(result)


def evaluate_realtime(
    chunk_fn: Callable[..., Any], on_reset: Callable[[int, int | None], None],
    dims: tuple[int, int, int], env: Mapping[str, Any], realtime: RealtimeSettings,
    episodes: EpisodeSpec, *, clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
) -> EvalResult:
    """One env on the control clock of envs.realtime.RealtimeController, its chunks from
    `chunk_fn` (a ChunkPolicy returning whole chunks, or serving.client.RemoteChunks asking a
    policy server); `dims` = (n_obs_steps, n_action_steps, horizon); `episodes` run one at a
    time (its n_envs is not used: one robot)."""
    rate_action_dims = env_class_attribute(env, "rate_action_dims", ())  # held = standing still
    controller = RealtimeController(chunk_fn, dims, realtime, clock=clock, sleep=sleep,
                                    rate_action_dims=rate_action_dims)

    def both_on_reset(env_index: int, seed: int | None) -> None:
        controller.on_reset(env_index, seed)
        on_reset(env_index, seed)

    try:
        result = rollout(
            controller,
            make_env_factory(env, episodes.max_steps, render=episodes.record_frames),
            dataclasses.replace(episodes, n_envs=1), n_obs_steps=dims[0],
            n_action_steps=dims[1], on_reset=both_on_reset,
        )
    finally:
        controller.close()
    return EvalResult(result, controller.requests, realtime.report(controller.lead_steps),
                      controller.episodes)


def summarize(
    result: EvalResult, warmup_chunks: int = 0, deadline_ms: float | None = None
) -> dict[str, Any]:
    """Every metric of docs/design.md §5: the episodes' (envs.rollout), the sampler calls'
    (policy.chunking.summarize_chunks; offline deadline_miss_rate against `deadline_ms`) and,
    in real time, the robot's (envs.realtime.summarize_realtime); unmeasured ones are None."""
    metrics = {
        **result.rollout.metrics,
        **summarize_chunks(result.chunk_records, warmup_chunks, deadline_ms),
        "anytime_rate": None,
        "held_step_rate": None,
        "boundary_jerk": None,
        "within_chunk_jerk": None,
        "prefix_err_max": None,
        "prefix_err_mean": None,
    }
    if result.realtime is not None:
        steps = [call.record for call in result.rollout.policy_calls]
        metrics.update(summarize_realtime(steps, result.requests, result.executed))
    return metrics


# -------------------------------------------------------------------------------------- run
def run_eval(cfg: DictConfig, out_dir: Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Evaluate per `cfg` and write every output to `out_dir`; returns the results record."""
    check_eval_config(cfg)
    prepare_output_dir(out_dir, cfg.overwrite)
    device = configure_torch(cfg.device, cfg.threads)
    run = _run_remote(cfg) if cfg.server else _run_local(cfg, device)
    return _report(cfg, out_dir, overrides, device, run)


@dataclass
class _Run:
    """What a finished rollout reports: its result, the env, the sampler and where it ran."""

    result: EvalResult
    env: dict[str, Any]
    max_steps: int
    sampler: dict[str, Any]
    runtime: dict[str, Any]
    checkpoint: dict[str, Any]
    auto: dict[str, Any] | None = None  # sampler=auto: sampler_choice and calibration


def _episode_spec(cfg: DictConfig, n_envs: int, max_steps: int) -> EpisodeSpec:
    """The eval config's episodes (n_episodes, seed_start, vector, video, progress) on
    `n_envs` envs of `max_steps` steps."""
    return EpisodeSpec(n_episodes=cfg.n_episodes, n_envs=n_envs, seed_start=cfg.seed_start,
                       max_steps=max_steps, vector=cfg.vector, record_frames=cfg.video,
                       progress=cfg.progress)


def _run_local(cfg: DictConfig, device: torch.device) -> _Run:
    """Load the checkpoint here and roll it out (offline, or on the control clock)."""
    n_envs = 1 if cfg.realtime.enabled else cfg.n_envs  # real time: one robot, one env

    def realtime_of(policy: DiffusionPolicy) -> RealtimeSettings | None:
        return realtime_settings(cfg, (policy.n_obs_steps, policy.n_action_steps,
                                       policy.horizon))

    built = build_policy(PolicySpec.from_config(  # sampler=auto: calibrated for that batch
        cfg, env_required=True, max_steps=cfg.max_steps,
        calibration_batch=min(n_envs, cfg.n_episodes), calibration_seed=cfg.seed_start,
        check_policy=realtime_of), device)  # a bad realtime block: refused before calibrating
    policy, sampler, checkpoint, env = built.policy, built.sampler, built.checkpoint, built.env
    runtime, choice = built.runtime, built.auto
    max_steps = env["max_steps"] if cfg.max_steps is None else cfg.max_steps
    realtime = realtime_of(policy)
    exact_err_every = cfg.exact_err_every if cfg.exact_err else 0
    print(f"evaluating {cfg.checkpoint} (step {checkpoint['step']}) with {sampler.label}: "
          f"{cfg.n_episodes} episodes of {env['name']} on {device}")
    if realtime is not None:
        if realtime.clock == "wall" and exact_err_every:
            exact_err_every = 0
            print("realtime.clock=wall: exact_err is not measured (it would run on the clock)")
        print(f"real-time rollout: one env at {realtime.control_hz:g} Hz ({realtime.clock} clock)")

    result = evaluate(
        policy, sampler, env, _episode_spec(cfg, n_envs, max_steps), noise_seed=cfg.noise_seed,
        warm_start=cfg.warm_start, exact_err_every=exact_err_every, realtime=realtime,
    )
    return _Run(result, env, max_steps, {"label": sampler.label, **sampler.config},
                runtime, {"path": str(cfg.checkpoint), "step": checkpoint["step"]},
                None if choice is None else {
                    "sampler_choice": {"candidate": choice.candidate.short,
                                       "runtime": choice.candidate.runtime,
                                       "label": sampler.label},
                    "calibration": choice.calibration})


def _run_remote(cfg: DictConfig) -> _Run:
    """Roll out one robot on the control clock against a policy server (serve_policy.py): the
    server's policy, sampler, runtime and noise seed; network time inside the latency."""
    from picard_client.client import PolicyClient, RemoteChunks, ServerError, server_url

    try:
        client = PolicyClient(server_url(cfg.server))
        meta = client.metadata()
    except (ServerError, ValueError) as e:
        raise ConfigError(f"server: {e}") from e
    try:
        env = plain(cfg.env) if cfg.env is not None else meta.get("env")
        if not env:
            raise ConfigError("env must be set (env=<name>): the server's policy names no env")
        max_steps = env["max_steps"] if cfg.max_steps is None else cfg.max_steps
        check_env_fits(make_env_factory(env, max_steps, render=False),
                       {key: shape[1:] for key, shape in meta["obs_spec"].items()},
                       meta["action_dim"], env["name"], f"the policy served at {cfg.server}",
                       meta.get("obs_aliases"))
        dims = (meta["n_obs_steps"], meta["n_action_steps"], meta["horizon"])
        realtime = realtime_settings(cfg, dims)
        if meta.get("control_hz") not in (None, realtime.control_hz):
            print(f"note: the server says {meta['control_hz']:g} Hz; this robot runs at "
                  f"realtime.control_hz={realtime.control_hz:g}")
        print(f"evaluating the policy served at {cfg.server} ({meta['sampler']['label']}): "
              f"{cfg.n_episodes} episodes of {env['name']}, one env at "
              f"{realtime.control_hz:g} Hz ({realtime.clock} clock)")
        remote = RemoteChunks(client)

        def chunk_fn(obs: Any, budget_s: float | None, *prefix: Any) -> tuple[Any, ChunkRecord]:
            chunks, info = remote(obs, budget_s, *prefix)
            return chunks, ChunkRecord(
                batch=1, rounds=info["rounds"], nfe=info["nfe"], nfe_total=info["nfe"],
                n_converged=int(info["converged"]), latency_ms=info["latency_ms"],
                server_overhead_ms=info["latency_ms"] - info["infer_ms"])

        try:
            result = evaluate_realtime(chunk_fn, remote.on_reset, dims, env, realtime,
                                       _episode_spec(cfg, 1, max_steps))
        except ServerError as e:
            raise ConfigError(f"server: {e}") from e
    finally:
        client.close()
    return _Run(result, env, max_steps, {**meta["sampler"], "server": cfg.server},
                meta["runtime"], {**meta["checkpoint"], "server": cfg.server})


def exactness_warning(metrics: Mapping[str, Any]) -> str | None:
    """A warning line when the measured exact_err breaks the exactness rule (EXACT_RULE): the
    sampler's `converged` then only means it met its own tolerance, not that its chunks are
    the sequential ones (e.g. a loose sampler.tol)."""
    err_max, err_mean = metrics.get("exact_err_max"), metrics.get("exact_err_mean")
    if err_max is None or is_exact(err_max, err_mean):
        return None
    return (f"warning: NOT EXACT: exact_err max {err_max:.3g} / mean {err_mean:.3g} breaks the "
            f"exactness rule (max <= {EXACT_RULE['exact_err_max']}, mean <= "
            f"{EXACT_RULE['exact_err_mean']}); converged_rate counts chunks that met "
            "sampler.tol, not chunks equal to sequential sampling: tighten sampler.tol")


def _report(cfg: DictConfig, out_dir: Path, overrides: Sequence[str], device: torch.device,
            run: _Run) -> dict[str, Any]:
    """Summarize a finished run and write results.json, plots, video and wandb."""
    result, env, max_steps = run.result, run.env, run.max_steps
    metrics = summarize(result, cfg.warmup_chunks, cfg.deadline_ms)
    rollout_result = result.rollout
    config = {**OmegaConf.to_container(cfg, resolve=True), "env": env, "max_steps": max_steps}
    results = {
        "metrics": metrics,
        "sampler": run.sampler,
        "sampler_choice": (run.auto or {}).get("sampler_choice"),
        "calibration": (run.auto or {}).get("calibration"),
        "runtime": run.runtime,
        "n_episodes": len(rollout_result.episodes),
        "interrupted": rollout_result.interrupted,
        "realtime": result.realtime,
        "seeds": [e["seed"] for e in rollout_result.episodes],
        "noise_seed": cfg.noise_seed,
        "checkpoint": run.checkpoint,
        "overrides": list(overrides),
        "config": config,  # as run: env and max_steps filled in
        "run_info": run_info(device),
        "episodes": rollout_result.episodes,
        "chunks": [call.to_dict() for call in rollout_result.policy_calls],
        "requests": [request.to_dict() for request in result.requests],
    }
    # results.json first: a signal while plots and videos are drawn must not lose the rollout
    write_results(out_dir / "results.json", results)
    deadline_ms = result.realtime["deadline_ms"] if result.realtime else cfg.deadline_ms
    records = result.chunk_records
    images = plot_histograms(
        out_dir, [r.rounds for r in records], [r.latency_ms for r in records[cfg.warmup_chunks:]],
        metrics, deadline_ms, run.sampler["label"],
    )
    if rollout_result.frames:
        results["video"] = str(save_video(rollout_result.frames, out_dir))
        write_results(out_dir / "results.json", results)
    if cfg.logger.wandb:
        log_to_wandb(cfg.logger, out_dir, results, images)
    print(format_report(results))
    not_exact = exactness_warning(metrics)
    if not_exact:
        print(not_exact)
    print(f"results: {out_dir / 'results.json'}")
    if rollout_result.interrupted:
        raise KeyboardInterrupt(f"interrupted; results so far in {out_dir / 'results.json'}")
    return results
