"""PushT env (DP dynamics, observations, rendering, validation) and its scripted expert."""

import subprocess
import sys

import gymnasium
import numpy as np
import pytest

import envs  # noqa: F401  (registers PushT-v0)
from envs.pusht import GOAL_POSE, PushTEnv, block_keypoints, legacy_initial_state, render_state
from envs.pusht_expert import PushTExpert, pose_error, run_expert_episode

AT_GOAL = [100.0, 100.0, *GOAL_POSE]


def test_block_at_goal_has_full_coverage_and_succeeds() -> None:
    env = PushTEnv()
    _, info = env.reset(options={"reset_to_state": AT_GOAL})
    assert info["coverage"] == pytest.approx(1.0)
    assert info["is_success"]
    _, reward, terminated, truncated, info = env.step(np.array([100.0, 100.0]))
    assert reward == pytest.approx(1.0) and terminated and not truncated


def test_block_far_from_goal_has_no_coverage() -> None:
    _, info = PushTEnv().reset(options={"reset_to_state": [400.0, 100.0, 100.0, 420.0, 0.0]})
    assert info["coverage"] < 0.01
    assert not info["is_success"]


def test_seeded_reset_matches_dp_legacy_position_then_angle() -> None:
    env = PushTEnv()
    _, info = env.reset(seed=0)
    agent_x, agent_y, block_x, block_y, angle = legacy_initial_state(0)
    np.testing.assert_allclose(info["pos_agent"], [agent_x, agent_y])
    # The position is set at angle 0, then the angle turns the T about its centre of gravity.
    cog = np.array([0.0, 45.0])
    rotated_cog = np.array([-np.sin(angle) * cog[1], np.cos(angle) * cog[1]])
    expected_origin = np.array([block_x, block_y]) + cog - rotated_cog
    np.testing.assert_allclose(info["block_pose"], [*expected_origin, angle], atol=1e-6)


@pytest.mark.parametrize("obs_type", ["state", "keypoints", "image"])
def test_observations_have_declared_shapes_and_stay_in_space(obs_type: str) -> None:
    env = gymnasium.make("PushT-v0", obs_type=obs_type)
    obs, _ = env.reset(seed=3)
    rng = np.random.default_rng(0)
    for _ in range(5):
        assert env.observation_space.contains(obs)
        obs, *_ = env.step(rng.uniform(0, 512, size=2).astype(np.float32))
    base = env.unwrapped
    if obs_type == "state":
        assert obs.shape == (5,) and obs.dtype == np.float32
        np.testing.assert_allclose(obs, base.get_state(), rtol=1e-6)
    elif obs_type == "keypoints":
        assert obs.shape == (20,) and obs.dtype == np.float32
        np.testing.assert_allclose(obs[:18], base.keypoints().ravel(), rtol=1e-6)
        np.testing.assert_allclose(obs[18:], base.get_state()[:2], rtol=1e-6)
    else:
        assert obs["image"].shape == (96, 96, 3) and obs["image"].dtype == np.uint8
        assert obs["agent_pos"].shape == (2,) and obs["agent_pos"].dtype == np.float32


def test_every_seeded_reset_lies_in_the_keypoint_observation_space() -> None:
    """Seeds whose T spawns against a wall (e.g. 65) put keypoints a few px outside [0, 512]:
    the declared bounds carry a margin, so gymnasium's checker has nothing to warn about."""
    env = PushTEnv(obs_type="keypoints")
    worst = 0.0
    for seed in range(300):
        obs, _ = env.reset(seed=seed)
        assert env.observation_space.contains(obs), f"seed {seed}: {obs}"
        worst = max(worst, float(-obs.min()), float(obs.max() - 512))
    assert worst > 0  # some resets do reach outside the workspace, which is why the margin exists


def test_same_seed_and_actions_give_identical_trajectories() -> None:
    actions = np.random.default_rng(1).uniform(0, 512, size=(30, 2))
    runs = []
    for _ in range(2):
        env = PushTEnv(obs_type="keypoints")
        observations = [env.reset(seed=7)[0]]
        observations += [env.step(action)[0] for action in actions]
        runs.append(np.array(observations))
    np.testing.assert_array_equal(runs[0], runs[1])


def test_registered_env_truncates_after_300_steps() -> None:
    env = gymnasium.make("PushT-v0")
    env.reset(seed=0)
    truncated_at = [env.step(np.array([30.0, 30.0]))[3] for _ in range(300)]
    assert not any(truncated_at[:-1]) and truncated_at[-1]


@pytest.mark.parametrize(
    ("action", "message"),
    [([np.nan, 10.0], "finite"), ([np.inf, 10.0], "finite"), ([1.0, 2.0, 3.0], "shape")],
)
def test_invalid_actions_raise(action: list, message: str) -> None:
    env = PushTEnv()
    env.reset(seed=0)
    with pytest.raises(ValueError, match=message):
        env.step(np.array(action))


def test_actions_outside_workspace_are_clipped() -> None:
    env = PushTEnv()
    env.reset(options={"reset_to_state": [100.0, 400.0, 350.0, 150.0, 0.0]})
    for _ in range(30):
        *_, info = env.step(np.array([-100.0, 1000.0]))
    np.testing.assert_allclose(info["pos_agent"], [0.0, 512.0], atol=0.5)


def test_render_and_rerender_from_state() -> None:
    env = PushTEnv(obs_type="image", render_mode="rgb_array", render_size=128)
    state = [300.0, 120.0, 200.0, 300.0, 1.0]
    obs, _ = env.reset(options={"reset_to_state": state})
    np.testing.assert_allclose(env.get_state(), state)
    np.testing.assert_array_equal(obs["image"], render_state(env.get_state(), 96))
    frame = env.render()
    assert frame.shape == (128, 128, 3) and frame.dtype == np.uint8
    assert len(np.unique(frame.reshape(-1, 3), axis=0)) > 4  # background, goal, block, agent


def test_keypoints_follow_the_block() -> None:
    pose = np.array([200.0, 250.0, 0.3])
    moved = pose + np.array([10.0, -5.0, 0.0])
    np.testing.assert_allclose(block_keypoints(moved) - block_keypoints(pose), [[10.0, -5.0]] * 9)


def test_expert_improves_the_pose_in_a_short_run() -> None:
    env = PushTEnv()
    episode = run_expert_episode(env, PushTExpert(rng=0), seed=2, max_steps=40)
    steps = episode["n_steps"]
    assert steps == 40 and not episode["success"]
    assert episode["state"].shape == (steps, 5) and episode["state"].dtype == np.float32
    assert episode["keypoint"].shape == (steps, 9, 2) and episode["action"].shape == (steps, 2)
    np.testing.assert_allclose(episode["state"][0], PushTEnv().reset(seed=2)[0], rtol=1e-6)
    assert np.linalg.norm(np.diff(episode["action"], axis=0), axis=1).max() <= 35.0 + 1e-3
    start_pose, end_pose = episode["state"][0, 2:], env.unwrapped.get_state()[2:]
    assert pose_error(end_pose) < pose_error(start_pose) - 30.0
    assert episode["final_coverage"] > PushTEnv().reset(seed=2)[1]["coverage"]


def test_envs_package_does_not_import_torch() -> None:
    code = "import sys, envs.pusht_expert; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
