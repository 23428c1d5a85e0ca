"""The rollout loop: run a chunking policy on a batch of gymnasium envs, one record per episode.

Diffusion-agnostic on purpose (no torch-side imports): the policy is any callable that maps a
batch of observation histories (B, To, ...) to a batch of action chunks (B, Ta, Da). Each env
is wrapped by `MultiStepWrapper`, so one vector step executes one chunk in every env and all
envs ask for their next chunk together: the whole batch goes through one policy call.

Episode i always runs with seed `seed_start + i`. Envs that finish are reset with the next
unused seed; once no seeds are left they idle (cost nothing) until the last episode ends.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv
from picard_client.records import record_dict
from tqdm.auto import tqdm

PolicyFn = Callable[[Any], tuple[np.ndarray, dict[str, Any]]]
ResetHook = Callable[[int, int | None], None]
VECTOR_KINDS = ("sync", "async")


def _stack_space(space: gym.Space, n: int) -> gym.Space:
    """Space of n stacked copies along a new leading axis (Box, or Dict of Boxes)."""
    if isinstance(space, gym.spaces.Dict):
        return gym.spaces.Dict({k: _stack_space(s, n) for k, s in space.spaces.items()})
    if not isinstance(space, gym.spaces.Box):
        raise TypeError(f"MultiStepWrapper supports Box or Dict spaces, got {space}")
    low = np.repeat(space.low[None], n, axis=0)
    high = np.repeat(space.high[None], n, axis=0)
    return gym.spaces.Box(low=low, high=high, dtype=space.dtype)


def _stack_obs(history: Sequence[Any]) -> Any:
    """A sequence of To observations (arrays or dicts of arrays) -> stacked (To, ...)."""
    if isinstance(history[0], dict):
        return {k: np.stack([h[k] for h in history]) for k in history[0]}
    return np.stack(history)


def with_cameras(frame: np.ndarray, obs: Any) -> np.ndarray:
    """The rendered frame with the observation's camera images (uint8 (h, w, 3) entries of a
    dict observation) to its right, each scaled to the frame's height by pixel repetition: a
    video of a camera policy shows what the policy saw beside the scene."""
    if not isinstance(obs, dict):
        return frame
    cameras = [v for v in obs.values() if isinstance(v, np.ndarray) and v.dtype == np.uint8
               and v.ndim == 3 and v.shape[-1] == 3]
    if not cameras or frame is None:
        return frame
    height = frame.shape[0]
    tiles = [frame]
    for image in cameras:
        rows = np.arange(height) * image.shape[0] // height
        width = max(1, round(image.shape[1] * height / image.shape[0]))
        cols = np.arange(width) * image.shape[1] // width
        tiles.append(image[rows][:, cols])
    return np.concatenate(tiles, axis=1)


class MultiStepWrapper(gym.Wrapper):
    """Observation history in, action chunk out (as DP's MultiStepWrapper).

    Observations are the last To env observations (B, To, ...), the first one repeated after a
    reset. `step` takes (Ta, Da) and executes the actions in order, stopping at termination or
    after `max_steps` env steps (truncation); the reward is the chunk's max, `info` the last
    step's plus `chunk_steps` and `chunk_success` (any step's `is_success`). Reset options:
    `idle=True` freezes the env where it is (no inner reset; steps are no-ops until the next
    reset), `record_frames=True` returns `env.render()` frames in `info["frames"]`.
    """

    def __init__(self, env: gym.Env, n_obs_steps: int, n_action_steps: int, max_steps: int):
        super().__init__(env)
        if n_obs_steps < 1 or n_action_steps < 1 or max_steps < 1:
            raise ValueError(
                f"n_obs_steps, n_action_steps and max_steps must be >= 1; got "
                f"{n_obs_steps}, {n_action_steps}, {max_steps}"
            )
        self.n_obs_steps = n_obs_steps
        self.max_steps = max_steps
        self.observation_space = _stack_space(env.observation_space, n_obs_steps)
        self.action_space = _stack_space(env.action_space, n_action_steps)
        self._history: deque = deque(maxlen=n_obs_steps)
        self._steps = 0
        self._idle = False
        self._record = False

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        options = dict(options or {})
        self._idle = bool(options.pop("idle", False))
        self._record = bool(options.pop("record_frames", False))
        if self._idle and self._history:
            return _stack_obs(self._history), {}
        obs, info = self.env.reset(seed=seed, options=options or None)
        self._history.extend([obs] * self.n_obs_steps)
        self._steps = 0
        if self._record:
            info = {**info, "frames": [with_cameras(self.env.render(), obs)]}
        return _stack_obs(self._history), info

    def step(self, action: np.ndarray) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        if self._idle:
            return _stack_obs(self._history), 0.0, False, False, {}
        rewards, frames, success = [], [], False
        terminated = truncated = False
        info: dict[str, Any] = {}
        for a in action:
            obs, reward, terminated, truncated, info = self.env.step(a)
            self._history.append(obs)
            self._steps += 1
            rewards.append(float(reward))
            success |= bool(info.get("is_success", False))
            if self._record:
                frames.append(with_cameras(self.env.render(), obs))
            truncated = truncated or self._steps >= self.max_steps
            if terminated or truncated:
                break
        info = {**info, "chunk_steps": len(rewards), "chunk_success": success}
        if frames:
            info["frames"] = frames
        return _stack_obs(self._history), max(rewards), terminated, truncated, info


@dataclass
class PolicyCall:
    """One policy call of a rollout: its wall time and the record the policy returned."""

    wall_s: float
    record: Any

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-able fields: the record's scalars, then wall_s."""
        return {**record_dict(self.record), "wall_s": self.wall_s}


@dataclass
class RolloutResult:
    """Per-episode records (ordered by episode), episode metrics, one PolicyCall per call."""

    episodes: list[dict[str, Any]]
    metrics: dict[str, float]
    policy_calls: list[PolicyCall] = field(default_factory=list)
    frames: list[np.ndarray] = field(default_factory=list)
    interrupted: bool = False  # Ctrl-C: `episodes` holds the episodes that finished before it


def summarize(episodes: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The episode metrics of docs/design.md §5: mean_score (mean of per-episode max reward),
    success_rate, mean_steps and n_episodes (None when no episode finished)."""
    if not episodes:
        return {"mean_score": None, "success_rate": None, "mean_steps": None, "n_episodes": 0}
    return {
        "mean_score": float(np.mean([e["max_reward"] for e in episodes])),
        "success_rate": float(np.mean([e["success"] for e in episodes])),
        "mean_steps": float(np.mean([e["n_steps"] for e in episodes])),
        "n_episodes": len(episodes),
    }


def make_vector_env(
    make_env: Callable[[], gym.Env],
    n_envs: int,
    n_obs_steps: int,
    n_action_steps: int,
    max_steps: int,
    vector: str = "sync",
) -> gym.vector.VectorEnv:
    """n_envs MultiStepWrapper'd envs in a Sync or Async vector env without autoreset."""
    if vector not in VECTOR_KINDS:
        raise ValueError(f"vector must be one of {list(VECTOR_KINDS)}; got {vector!r}")

    def thunk() -> gym.Env:
        return MultiStepWrapper(make_env(), n_obs_steps, n_action_steps, max_steps)

    cls = SyncVectorEnv if vector == "sync" else AsyncVectorEnv
    return cls([thunk] * n_envs, autoreset_mode=AutoresetMode.DISABLED)


def _info_at(info: dict[str, Any], key: str, i: int) -> Any:
    """Value of `key` for sub-env i in a vector env's info dict, or None if it has none."""
    if key in info and info[f"_{key}"][i]:
        return info[key][i]
    return None


def _notify(on_reset: ResetHook | None, env_index: int, seed: int | None) -> None:
    """Tell the policy (if it asked) that env `env_index` started episode `seed` or went idle."""
    if on_reset is not None:
        on_reset(env_index, seed)


@dataclass(frozen=True)
class EpisodeSpec:
    """Which episodes a rollout runs and how: `n_episodes` episodes, episode i with env seed
    `seed_start + i`, on min(n_envs, n_episodes) envs stepped together (a `vector` env of
    VECTOR_KINDS), each cut at `max_steps` env steps; `record_frames` keeps the rendered
    frames of episode 0; `progress` shows a bar over episodes. Checked when built."""

    n_episodes: int
    n_envs: int = 1
    seed_start: int = 0
    max_steps: int = 300
    vector: str = "sync"
    record_frames: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.n_episodes < 1 or self.n_envs < 1:
            raise ValueError(f"n_episodes and n_envs must be >= 1; got {self.n_episodes}, "
                             f"{self.n_envs}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1; got {self.max_steps}")
        if self.vector not in VECTOR_KINDS:
            raise ValueError(f"vector must be one of {list(VECTOR_KINDS)}; got {self.vector!r}")


def rollout(
    policy_fn: PolicyFn,
    make_env: Callable[[], gym.Env],
    episodes: EpisodeSpec,
    n_obs_steps: int = 2,
    n_action_steps: int = 8,
    on_reset: ResetHook | None = None,
) -> RolloutResult:
    """Run the `episodes` (EpisodeSpec: seeds seed_start + i, on min(n_envs, n_episodes) envs)
    with a policy of `n_obs_steps` observed and `n_action_steps` executed steps per chunk.

    `policy_fn(obs (B, To, ...) or {key: (B, To, ...)}) -> (actions (B, Ta, Da), record)` is
    called once per chunk for the whole batch; each call's record is kept in a PolicyCall.
    Each episode record holds seed, episode, max_reward, success, n_steps, terminated,
    truncated and final_coverage when the env reports `coverage`.
    `record_frames` keeps the rendered frames of episode 0 (make_env must create envs with
    render_mode="rgb_array"). `on_reset(env_index, seed)` is called whenever an env starts an
    episode, before the policy sees its first observation, and `on_reset(env_index, None)` when
    it goes idle (its row of the batch is then a frozen observation whose action is ignored):
    what a policy with per-episode state (noise, warm starts) needs to know. A KeyboardInterrupt
    ends the rollout cleanly: the envs are closed and the episodes finished so far are returned
    with `interrupted=True`.
    """
    n_episodes, seed_start, record_frames = (episodes.n_episodes, episodes.seed_start,
                                             episodes.record_frames)
    n_envs = min(episodes.n_envs, n_episodes)
    envs = make_vector_env(make_env, n_envs, n_obs_steps, n_action_steps, episodes.max_steps,
                           episodes.vector)
    slot_episode: list[int | None] = list(range(n_envs))  # episode running in each env
    records: list[dict[str, Any]] = [
        {"episode": i, "seed": seed_start + i, "max_reward": -np.inf, "success": False,
         "n_steps": 0}
        for i in range(n_episodes)
    ]
    calls: list[PolicyCall] = []
    frames: list[np.ndarray] = []
    next_episode = n_envs
    interrupted = False
    bar = tqdm(total=n_episodes, desc="rollout", disable=not episodes.progress, leave=False)
    try:
        seeds = [seed_start + i for i in range(n_envs)]
        obs, _ = envs.reset(seed=seeds)
        for i, seed in enumerate(seeds):
            _notify(on_reset, i, seed)
        if record_frames:  # reset env 0 again, same seed, now rendering
            mask = np.arange(n_envs) == 0
            obs, info = envs.reset(seed=seeds, options={"reset_mask": mask, "record_frames": True})
            frames += info["frames"][0]
        while any(e is not None for e in slot_episode):
            start = time.perf_counter()
            actions, record = policy_fn(obs)
            calls.append(PolicyCall(time.perf_counter() - start, record))
            obs, reward, terminated, truncated, info = envs.step(np.asarray(actions))
            new_seeds: dict[int, int] = {}
            idle: list[int] = []
            for i, episode in enumerate(slot_episode):
                if episode is None:
                    continue
                rec = records[episode]
                rec["max_reward"] = max(rec["max_reward"], float(reward[i]))
                rec["n_steps"] += int(info["chunk_steps"][i])
                rec["success"] |= bool(info["chunk_success"][i])
                coverage = _info_at(info, "coverage", i)
                if coverage is not None:
                    rec["final_coverage"] = float(coverage)
                if episode == 0 and record_frames:
                    frames += _info_at(info, "frames", i) or []
                if terminated[i] or truncated[i]:
                    rec["terminated"], rec["truncated"] = bool(terminated[i]), bool(truncated[i])
                    bar.update(1)
                    if next_episode < n_episodes:
                        slot_episode[i] = next_episode
                        new_seeds[i] = seed_start + next_episode
                        next_episode += 1
                    else:
                        slot_episode[i] = None
                        idle.append(i)
            if new_seeds:
                mask = np.isin(np.arange(n_envs), list(new_seeds))
                seeds = [new_seeds.get(i) for i in range(n_envs)]
                obs, _ = envs.reset(seed=seeds, options={"reset_mask": mask})
                for i, seed in new_seeds.items():
                    _notify(on_reset, i, seed)
            if idle:
                mask = np.isin(np.arange(n_envs), idle)
                obs, _ = envs.reset(options={"reset_mask": mask, "idle": True})
                for i in idle:
                    _notify(on_reset, i, None)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        envs.close()
    if interrupted:
        records = [r for r in records if "terminated" in r]
    return RolloutResult(records, summarize(records), calls, frames, interrupted=interrupted)
