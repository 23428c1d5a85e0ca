"""envs/rollout.py: seeds per episode, observation history, action chunks, early termination."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import pytest

from envs.rollout import EpisodeSpec, MultiStepWrapper, rollout, summarize


class CountingEnv(gym.Env):
    """Obs [seed, step, last action]; succeeds (terminates) after `3 + seed % 7` steps."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, render_mode: str | None = None):
        self.observation_space = gym.spaces.Box(-1e6, 1e6, (3,), np.float64)
        self.action_space = gym.spaces.Box(-1e6, 1e6, (1,), np.float64)
        self.render_mode = render_mode

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.seed_, self.t = seed, 0
        return np.array([seed, 0, 0.0]), {}

    def step(self, action: np.ndarray):
        self.t += 1
        goal = 3 + self.seed_ % 7
        coverage = self.t / goal
        obs = np.array([self.seed_, self.t, action[0]])
        info = {"coverage": coverage, "is_success": self.t >= goal}
        return obs, min(coverage, 1.0), self.t >= goal, False, info

    def render(self) -> np.ndarray:
        return np.full((2, 2, 3), self.t, np.uint8)


def echo_policy(history: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """Actions that encode the env step they are sent from: chunk (B, 4, 1)."""
    steps = history[:, -1, 1]
    return (steps[:, None] + np.arange(4)[None, :])[..., None], {"rounds": 2}


def test_wrapper_stacks_history_and_executes_a_chunk_until_termination() -> None:
    env = MultiStepWrapper(CountingEnv(), n_obs_steps=2, n_action_steps=4, max_steps=100)
    obs, _ = env.reset(seed=1)  # goal: 4 steps
    np.testing.assert_array_equal(obs, [[1, 0, 0], [1, 0, 0]])  # first obs repeated
    obs, reward, terminated, truncated, info = env.step(np.array([[10.0], [11.0], [12.0], [13.0]]))
    np.testing.assert_array_equal(obs, [[1, 3, 12], [1, 4, 13]])
    assert terminated and not truncated and reward == 1.0
    assert info["chunk_steps"] == 4 and info["chunk_success"]
    env.reset(seed=0)  # goal: 3 steps, terminates inside the chunk
    obs, *_, info = env.step(np.zeros((4, 1)))
    assert info["chunk_steps"] == 3 and obs[-1, 1] == 3


def test_wrapper_truncates_at_max_steps() -> None:
    env = MultiStepWrapper(CountingEnv(), n_obs_steps=1, n_action_steps=4, max_steps=5)
    env.reset(seed=6)  # goal: 9 steps
    assert env.step(np.zeros((4, 1)))[3] is False
    *_, terminated, truncated, info = env.step(np.zeros((4, 1)))
    assert truncated and not terminated and info["chunk_steps"] == 1


@pytest.mark.parametrize("vector", ["sync", "async"])
def test_rollout_runs_each_seed_once_with_fewer_envs_than_episodes(vector: str) -> None:
    seen_batches = []

    def policy_fn(history):
        seen_batches.append(history.shape)
        return echo_policy(history)

    episodes = EpisodeSpec(n_episodes=7, n_envs=3, seed_start=100, max_steps=8, vector=vector,
                           progress=False)
    result = rollout(policy_fn, CountingEnv, episodes, n_obs_steps=2, n_action_steps=4)
    assert [e["seed"] for e in result.episodes] == list(range(100, 107))
    for e in result.episodes:
        goal = 3 + e["seed"] % 7
        assert e["n_steps"] == min(goal, 8)
        assert e["success"] == (goal <= 8) == e["terminated"]
        assert e["final_coverage"] == pytest.approx(min(goal, 8) / goal)
    assert all(shape == (3, 2, 3) for shape in seen_batches)  # one call for the whole batch
    assert result.metrics == summarize(result.episodes)
    assert result.metrics["n_episodes"] == 7
    assert all(call.record["rounds"] == 2 and call.wall_s >= 0 for call in result.policy_calls)


def test_rollout_records_frames_of_the_first_episode() -> None:
    episodes = EpisodeSpec(n_episodes=3, n_envs=2, seed_start=2, record_frames=True,
                           progress=False)
    result = rollout(echo_policy, lambda: CountingEnv("rgb_array"), episodes, n_obs_steps=1,
                     n_action_steps=4)
    goal = 3 + 2 % 7
    assert [int(f[0, 0, 0]) for f in result.frames] == list(range(goal + 1))  # reset + steps


def test_rollout_of_a_trivial_policy_on_pusht_returns_records_with_the_right_seeds() -> None:
    import envs  # noqa: F401  (registers PushT-v0)

    def hold_position(history: np.ndarray) -> tuple[np.ndarray, dict]:
        agent_xy = history[:, -1, -2:]  # keypoint obs end with the agent position
        return np.repeat(agent_xy[:, None], 8, axis=1), {}

    result = rollout(
        hold_position, lambda: gym.make("PushT-v0", obs_type="keypoints"),
        EpisodeSpec(n_episodes=3, n_envs=2, seed_start=10, max_steps=16, progress=False),
    )
    assert [e["seed"] for e in result.episodes] == [10, 11, 12]
    for e in result.episodes:
        reference = gym.make("PushT-v0", obs_type="keypoints")
        _, info = reference.reset(seed=e["seed"])
        assert e["n_steps"] == 16 and e["truncated"] and not e["success"]
        # Holding still leaves the block where the seed put it.
        assert e["final_coverage"] == pytest.approx(info["coverage"], abs=1e-6)
        assert 0.0 <= e["max_reward"] <= 1.0
    assert set(result.metrics) == {"mean_score", "success_rate", "mean_steps", "n_episodes"}


def test_a_camera_policys_video_shows_the_camera_beside_the_scene() -> None:
    from envs.rollout import with_cameras

    frame = np.zeros((256, 256, 3), np.uint8)
    camera = np.arange(96 * 96 * 3, dtype=np.uint32).reshape(96, 96, 3).astype(np.uint8)
    tiled = with_cameras(frame, {"pixels": camera, "agent_pos": np.zeros(2)})
    assert tiled.shape == (256, 512, 3)
    np.testing.assert_array_equal(tiled[0, 256], camera[0, 0])  # nearest pixel, no blending
    np.testing.assert_array_equal(tiled[-1, -1], camera[-1, -1])
    assert with_cameras(frame, np.zeros(5)) is frame  # a low-dim observation: the frame as is
