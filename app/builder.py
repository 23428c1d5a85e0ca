"""One policy builder for eval, serve and the benchmarks: checkpoint -> policy, sampler, runtime.

`build_policy(spec, device)` is the one way a run turns its config into something that samples
chunks: load the checkpoint's EMA policy (ours, a Diffusion Policy workspace or a LeRobot folder;
its PCM and fitted propagators come with it, policy.loading), resolve the env (the `env=`
choice, else the checkpoint's own, checked as data), build the sampler on the policy's training
settings (a PCM sampler needs PCM weights; Parareal without a fitted propagator falls back to
scan), put the denoiser on the configured runtime, and for `sampler=auto` calibrate on the env's
first observations (policy.autotune). Its inputs are one record, `PolicySpec`, made from the
keys eval and serve share (conf/policy_run/, checked by `policy_run_checks`); its output is
`BuiltPolicy`. Every mistake is a ConfigError naming the key.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch
from omegaconf import DictConfig, OmegaConf

from app.checks import Check, ConfigError, is_int, plain, raise_first_failure
from app.device import DEVICE_ALLOWED, device_ok
from picard_sampler import Sampler
from policy.autotune import AutoChoice
from policy.checkpoint import PCM_KEY
from policy.chunking import WARM_STARTS
from policy.diffusion_policy import DiffusionPolicy
from policy.loading import load_with_metadata
from policy.runtime import RuntimeUnavailable

# ------------------------------------------------------------------------------ the inputs
POLICY_RUN_GROUPS = ("sampler", "runtime", "env")
"""The config groups of conf/policy_run/: an unknown choice is one line before Hydra starts."""


def policy_run_checks(cfg: DictConfig) -> list[Check]:
    """The checks of the keys eval and serve share (conf/policy_run/); the sampler, runtime
    and env blocks are checked where they are built (build_sampler, choose_runtime,
    resolve_env)."""
    return [
        ("checkpoint", isinstance(cfg.checkpoint, str) and bool(cfg.checkpoint),
         "a path (a checkpoint file or a LeRobot folder)"),
        ("warm_start", isinstance(cfg.warm_start, bool) or cfg.warm_start in WARM_STARTS,
         f"one of {list(WARM_STARTS)} (true: reuse, false: none)"),
        ("device", device_ok(cfg.device), DEVICE_ALLOWED),
        ("threads", cfg.threads is None or is_int(cfg.threads, 1), "null or an int >= 1"),
        # sampler=auto times and runs its candidates at float32 (policy.autotune's runtimes
        # take no precision): another one would be reported but not run
        ("runtime.precision", cfg.sampler.get("method") != "auto"
         or cfg.runtime.get("precision", "float32") == "float32",
         "float32 with sampler=auto (another precision needs a fixed sampler, e.g. "
         "sampler=parareal_ddpm100)"),
    ]


@dataclass(frozen=True)
class PolicySpec:
    """What `build_policy` builds: the checkpoint, the sampler / runtime / env blocks as plain
    dicts (env None: the checkpoint's own), whether the env is rolled out here (required; a
    server's clients may bring their own; a required or named env is checked against the
    policy's shapes), its episode
    length, and for sampler=auto the batch and first env seed it calibrates on;
    `check_policy`, the caller's own checks of the loaded policy (e.g. eval's realtime block
    against its chunk layout), run before anything slow (the env, sampler=auto's calibration)."""

    checkpoint: str
    sampler: Mapping[str, Any]
    runtime: Mapping[str, Any]
    env: Mapping[str, Any] | None = None
    env_required: bool = True
    max_steps: int | None = None
    calibration_batch: int = 1
    calibration_seed: int = 0
    check_policy: Callable[[DiffusionPolicy], None] | None = None

    @classmethod
    def from_config(cls, cfg: DictConfig, *, env_required: bool, max_steps: int | None = None,
                    calibration_batch: int = 1, calibration_seed: int = 0,
                    check_policy: Callable[[DiffusionPolicy], None] | None = None
                    ) -> PolicySpec:
        """The spec of a checked eval or serve config (conf/policy_run/ keys)."""
        return cls(str(cfg.checkpoint), plain(cfg.sampler), plain(cfg.runtime),
                   None if cfg.env is None else plain(cfg.env), env_required, max_steps,
                   calibration_batch, calibration_seed, check_policy)


@dataclass(frozen=True)
class BuiltPolicy:
    """A policy ready to sample: the EMA policy on its runtime, the sampler to run (sampler=auto:
    the chosen one), the checkpoint record, the env config (None: none named), the runtime block
    as run (sampler=auto: its chosen kind) and sampler=auto's choice (else None)."""

    policy: DiffusionPolicy
    sampler: Sampler
    checkpoint: dict[str, Any]
    env: dict[str, Any] | None
    runtime: dict[str, Any]
    auto: AutoChoice | None = None


def build_policy(spec: PolicySpec, device: torch.device) -> BuiltPolicy:
    """Checkpoint -> policy, env, sampler and runtime per `spec`, on `device` (see the module
    docstring); a ConfigError names whatever cannot work."""
    checkpoint, policy = load_checkpoint_and_policy(spec.checkpoint, device)
    if spec.check_policy is not None:
        spec.check_policy(policy)
    if spec.env_required:
        env = resolve_env(spec.env, checkpoint["config"])
    else:
        try:
            env = resolve_env(spec.env, checkpoint["config"])
        except ValueError:
            env = None  # an imported policy names no env: clients bring their own
    max_steps = None if env is None else (
        env["max_steps"] if spec.max_steps is None else spec.max_steps)
    if spec.env_required or spec.env is not None:  # an env named for a server must fit too
        check_env_fits_policy(make_env_factory(env, max_steps, render=False), policy,
                              env["name"], spec.checkpoint)
    sampler = build_sampler(spec.sampler, policy)
    check_pcm_weights(sampler, checkpoint, spec.checkpoint)
    choose_runtime(policy, spec.runtime)
    runtime, choice = plain(spec.runtime), None
    settings = split_auto(spec.sampler)[1]
    if settings is not None:
        if env is None:
            raise ConfigError("sampler=auto calibrates on the env's observations: this "
                              "checkpoint names no env, pass env=<name>")
        obs = calibration_observations(make_env_factory(env, int(max_steps), render=False),
                                       policy, spec.calibration_batch, spec.calibration_seed)
        choice = choose_auto_sampler(policy, sampler, settings, obs, spec.runtime, device)
        sampler, runtime = choice.sampler, {**runtime, "kind": choice.candidate.runtime}
    return BuiltPolicy(policy, sampler, checkpoint, env, runtime, choice)


# ------------------------------------------------------------------------ checkpoint, env
def load_checkpoint_and_policy(
    path: str | Path, device: torch.device
) -> tuple[dict[str, Any], DiffusionPolicy]:
    """The checkpoint record and its EMA policy on `device`: ours, a Diffusion Policy
    workspace checkpoint or a LeRobot folder (policy.loading); a missing or unreadable one is a
    ConfigError naming the path."""
    if not Path(path).expanduser().exists():
        raise ConfigError(
            f"checkpoint not found: {path} (pass checkpoint=PATH to a train_pcm.py checkpoint, "
            "a Diffusion Policy .ckpt or a LeRobot pretrained-model folder)"
        )
    try:
        policy, record = load_with_metadata(path, map_location=device)
    except (ValueError, FileNotFoundError, KeyError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise ConfigError(str(message)) from e
    except OSError as e:  # unreadable file or folder
        raise ConfigError(f"checkpoint {e.filename or path} cannot be read: "
                          f"{e.strerror or e}") from e
    return record, policy


def resolve_env(env_cfg: DictConfig | None, checkpoint_config: Mapping[str, Any]) -> dict:
    """The env config to evaluate in: the explicit `env=...` choice, else the checkpoint's own
    (an imported policy names none: then `env=` is required)."""
    if env_cfg is not None:
        return plain(env_cfg)
    if not checkpoint_config.get("env"):
        source = (checkpoint_config.get("imported_from") or {}).get("format", "this")
        raise ConfigError(f"env must be set (env=<name>, e.g. env=pusht_lowdim): a {source} "
                          "checkpoint does not name one of our envs")
    return checked_checkpoint_env(checkpoint_config["env"])


def our_env_ids() -> list[str]:
    """The gymnasium ids (with their "envs:" prefix) of the envs this package registers."""
    import envs  # noqa: F401  (registers them)

    return sorted(f"envs:{env_id}" for env_id, spec in gym.registry.items()
                  if isinstance(spec.entry_point, str) and spec.entry_point.startswith("envs."))


def checked_checkpoint_env(env: Any) -> dict[str, Any]:
    """A checkpoint's stored env config, taken as data: plain values only and the id of one of
    our envs (a file must not make gym.make import a module of its choosing)."""
    from policy.safe_config import CheckpointError, check_plain

    try:
        check_plain(env, "checkpoint", "config.env")
    except CheckpointError as e:
        raise ConfigError(str(e)) from e
    allowed = our_env_ids()
    if not isinstance(env, Mapping) or env.get("id") not in allowed:
        got = env.get("id") if isinstance(env, Mapping) else env
        raise ConfigError(f"the checkpoint's config.env.id {got!r:.80} is not one of our envs "
                          f"({', '.join(allowed)}); pass env=<name> to choose one")
    if not isinstance(env.get("kwargs") or {}, Mapping):
        raise ConfigError("the checkpoint's config.env.kwargs is not a mapping")
    return dict(env)


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
    check_env_fits(make_env, policy.obs_encoder.obs_shapes, policy.action_dim, env_name,
                   f"the policy in {checkpoint}", getattr(policy.obs_encoder, "aliases", {}))


def check_env_fits(
    make_env: Callable[[], gym.Env], obs_shapes: Mapping[str, Sequence[int]], action_dim: int,
    env_name: str, source: str, aliases: Mapping[str, str] | None = None,
) -> None:
    """Reject an env whose observation or action shapes are not `obs_shapes` (per key, one step)
    and (action_dim,); `aliases` map the env's keys to the policy's (e.g. gym-pusht's for
    LeRobot's); `source` names the policy in the message."""
    env = make_env()
    obs_space, action_space = env.observation_space, env.action_space
    env.close()
    wanted = {key: tuple(shape) for key, shape in obs_shapes.items()}
    aliases = aliases or {}
    if isinstance(obs_space, gym.spaces.Dict):
        got: Any = {aliases.get(key, key): tuple(space.shape)
                    for key, space in obs_space.spaces.items()}
        fits = all(got.get(key) == shape for key, shape in wanted.items())
    else:
        got = tuple(obs_space.shape)
        fits = len(wanted) == 1 and next(iter(wanted.values())) == got
    if not fits:
        raise ConfigError(
            f"env {env_name} does not fit {source}: the env observes {got}, the policy takes "
            f"{wanted}"
        )
    if tuple(action_space.shape) != (action_dim,):
        raise ConfigError(
            f"env {env_name} does not fit {source}: the env takes actions of shape "
            f"{tuple(action_space.shape)}, the policy outputs ({action_dim},)"
        )


# ---------------------------------------------------------------------------------- sampler
AUTO_KEYS = ("windows", "runtimes", "calibration_chunks", "recalibrate", "cache_dir")
"""The keys of conf/sampler/auto.yaml beyond a Picard sampler's."""


@dataclass(frozen=True)
class AutoSettings:
    """sampler=auto's calibration settings (conf/sampler/auto.yaml), checked."""

    windows: tuple[int | None, ...]
    runtimes: tuple[str, ...]
    chunks: int
    recalibrate: bool
    cache_dir: str | None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], key: str = "sampler") -> AutoSettings:
        """The settings of a `method: auto` block; a bad value is a ConfigError naming it."""
        from policy.runtime import RUNTIMES

        windows = config.get("windows") or [None]
        runtimes = config.get("runtimes") or ["eager"]
        chunks = config.get("calibration_chunks", 2)
        nested: dict[str, Any] = dict(config)  # the block at its dotted key, e.g. eval.sampler
        for part in reversed(key.split(".")):
            nested = {part: nested}
        raise_first_failure(OmegaConf.create(nested), [
            (f"{key}.windows", isinstance(windows, list | tuple) and all(
                w is None or is_int(w, 1) for w in windows), "a list of ints >= 1 or null"),
            (f"{key}.runtimes", isinstance(runtimes, list | tuple) and all(
                r in RUNTIMES for r in runtimes), f"a list of {list(RUNTIMES)}"),
            (f"{key}.calibration_chunks", is_int(chunks, 1) and chunks <= 20,
             "an int in [1, 20]"),
            (f"{key}.recalibrate", isinstance(config.get("recalibrate", False), bool),
             "true or false"),
        ])
        cache = config.get("cache_dir")
        return cls(tuple(windows), tuple(runtimes), int(chunks),
                   bool(config.get("recalibrate", False)),
                   None if cache in (None, "") else str(cache))


def split_auto(sampler_cfg: Mapping[str, Any] | DictConfig, key: str = "sampler"
               ) -> tuple[dict[str, Any], AutoSettings | None]:
    """A sampler config without its auto settings (as a Picard sampler's: the candidates'
    common schedule and knobs), and those settings (None unless `method: auto`)."""
    config = plain(sampler_cfg)
    if config.get("method") != "auto":
        return config, None
    settings = AutoSettings.from_config(config, key)
    base = {k: v for k, v in config.items() if k not in AUTO_KEYS}
    return {**base, "method": "picard", "window": None, "update": "scan"}, settings


def calibration_observations(make_env: Callable[[], gym.Env], policy: DiffusionPolicy,
                             batch: int, seed_start: int) -> Any:
    """(batch, To, ...) first observations of episodes seed_start, seed_start + 1, ... as the
    rollout stacks them (MultiStepWrapper): what sampler=auto calibrates on."""
    from envs.rollout import MultiStepWrapper, _stack_obs

    observations = []
    for i in range(batch):
        env = MultiStepWrapper(make_env(), policy.n_obs_steps, policy.n_action_steps, 1)
        obs, _ = env.reset(seed=seed_start + i)
        observations.append(obs)
        env.close()
    return _stack_obs(observations)


def choose_auto_sampler(policy: DiffusionPolicy, base: Sampler, settings: AutoSettings,
                        obs: Any, runtime_cfg: Mapping[str, Any] | DictConfig,
                        device: torch.device) -> AutoChoice:
    """sampler=auto's choice for this policy and batch (policy.autotune), printed in one line;
    the configured runtime is the first timed, then `settings.runtimes`' others."""
    from policy.autotune import choose_sampler

    options = plain(runtime_cfg)
    first = options.pop("kind", "eager")
    runtimes = [first, *[r for r in settings.runtimes if r != first]]
    if device.type != "cuda":
        runtimes = [r for r in runtimes if r != "cuda_graph"]
    extra = {k: v for k, v in options.items() if k in ("cache_dir", "spinning")}
    try:
        choice = choose_sampler(policy, obs, base, windows=settings.windows, runtimes=runtimes,
                                runtime_options=extra, chunks=settings.chunks,
                                cache_dir=settings.cache_dir, recalibrate=settings.recalibrate)
    except (ValueError, RuntimeUnavailable) as e:
        raise ConfigError(f"sampler=auto: {e}") from e
    print(choice.line(device.type, torch.get_num_threads(), choice.calibration["batch"]))
    return choice


def build_sampler(sampler_cfg: Mapping[str, Any] | DictConfig, policy: DiffusionPolicy,
                  key: str = "sampler") -> Sampler:
    """The Sampler of a conf/sampler config on `policy`'s training settings
    (`DiffusionPolicy.sampler_from_config`); a bad value is a ConfigError naming its key.
    `update=parareal` without a propagator fitted for this policy and schedule falls back to
    `update=scan` with a warning: the same chunks (both converge to the sequential one), more
    rounds; the run then records scan, which is what it ran."""
    config, _ = split_auto(sampler_cfg, key)
    try:
        sampler = policy.sampler_from_config(config, key)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if sampler.needs_propagator and not policy.has_propagator(sampler.schedule):
        steps = f"{sampler.schedule.name}-{sampler.num_steps}"
        warnings.warn(
            f"{key}.update=parareal: no linear propagator is fitted for this policy and "
            f"{steps.upper()}; sampling with update=scan instead (the same chunks, more "
            f"rounds). Fit one: python scripts/fit_propagator.py CHECKPOINT --schedules {steps}",
            stacklevel=2,
        )
        sampler = dataclasses.replace(sampler, update="scan")
    return sampler


def check_pcm_weights(sampler: Sampler, checkpoint: Mapping[str, Any], path: str) -> None:
    """PCM sampling needs a PCM in the checkpoint: say which key is missing, up front; warn when
    the PCM was trained for another schedule (still exact by switching, but no faster)."""
    if sampler.method != "pcm":
        return
    if PCM_KEY not in checkpoint:
        raise ConfigError(
            f"sampler=pcm needs PCM weights under the checkpoint key '{PCM_KEY}', "
            f"which {path} does not have: train a PCM for this policy or pick another sampler"
        )
    pcm_config = (checkpoint.get("config") or {}).get("pcm")
    trained = pcm_config.get("schedule") if isinstance(pcm_config, Mapping) else None
    trained = trained if isinstance(trained, Mapping) else {}  # data from the file: only read
    name = str(trained.get("_target_", "")).rsplit(".", 1)[-1]
    steps = trained.get("num_inference_steps")
    if name and (name, steps) != (type(sampler.schedule).__name__, sampler.num_steps):
        warnings.warn(
            f"the PCM in {path} was trained for {name} with {steps} steps, but the sampler runs "
            f"{type(sampler.schedule).__name__} with {sampler.num_steps}: the chunks stay exact "
            "(model switching), but expect no gain over Picard (sampler=pcm_ddim16 is DDIM-16, "
            "sampler=pcm_ddpm100 DDPM-100)",
            stacklevel=2,
        )


def choose_runtime(policy: DiffusionPolicy, runtime_cfg: Mapping[str, Any] | DictConfig) -> None:
    """Run the policy's denoiser with the conf/runtime choice; one line if it cannot run here
    (a missing package, no CUDA) or a value is wrong."""
    options = plain(runtime_cfg)
    kind = options.pop("kind", "eager")
    try:
        policy.use_runtime(kind, **options)
    except (ValueError, TypeError, RuntimeUnavailable) as e:
        raise ConfigError(f"runtime: {e}") from e
