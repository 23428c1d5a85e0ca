"""PushT's gym-pusht options replay gym-pusht 0.1.8's own rollouts (tests/fixtures/gym_pusht).

The fixture was made with gym-pusht's code (pymunk 6, opencv) in a throwaway venv; see its
README.md. Our env with ``gym_pusht_kwargs(...)`` must give the same observations, rewards and
termination; the default (Diffusion Policy) mode must stay as it was.
"""

from pathlib import Path

import gymnasium
import numpy as np
import pytest

import envs  # noqa: F401  (registers PushT-v0)
from envs.pusht import (
    GYM_PUSHT_OBS_TYPES,
    PushTEnv,
    gym_pusht_kwargs,
    legacy_initial_state,
    resize_like_cv2_linear,
)

FIXTURE = Path(__file__).parent / "fixtures" / "gym_pusht" / "reference.npz"
REF = dict(np.load(FIXTURE))
SEEDS = [int(seed) for seed in REF["seeds"]]
COVERAGE_ATOL = 1e-12
"""gym-pusht sums its coverage over a set of two polygons (ordered by address): ulp-level noise."""


def _rollout(obs_type: str, prefix: str, options: dict | None = None, seed: int | None = None,
             make: bool = False) -> dict[str, np.ndarray]:
    """Replay the fixture's actions for ``prefix`` in our env with gym-pusht's options."""
    kwargs = gym_pusht_kwargs(obs_type)
    env = gymnasium.make("PushT-v0", **kwargs) if make else PushTEnv(**kwargs)
    obs, info = env.reset(seed=seed, options=options)
    steps: dict[str, list] = {"obs": [obs], "reward": [], "terminated": [], "coverage": [],
                              "is_success": [], "block_pose": [info["block_pose"]]}
    for action in REF[f"{prefix}/action"]:
        obs, reward, terminated, truncated, info = env.step(action)
        assert not truncated
        for key, value in (("obs", obs), ("reward", reward), ("terminated", terminated),
                           ("coverage", info["coverage"]), ("is_success", info["is_success"]),
                           ("block_pose", info["block_pose"])):
            steps[key].append(value)
    out = {key: np.array(value) for key, value in steps.items() if key != "obs"}
    for key in steps["obs"][0]:
        out[key] = np.array([obs[key] for obs in steps["obs"]])
    return out


def _check_step_results(ours: dict[str, np.ndarray], prefix: str) -> None:
    np.testing.assert_array_equal(ours["block_pose"], REF[f"{prefix}/block_pose"])
    np.testing.assert_allclose(ours["reward"], REF[f"{prefix}/reward"], rtol=0, atol=COVERAGE_ATOL)
    np.testing.assert_allclose(ours["coverage"], REF[f"{prefix}/coverage"], rtol=0,
                               atol=COVERAGE_ATOL)
    np.testing.assert_array_equal(ours["terminated"], REF[f"{prefix}/terminated"])
    np.testing.assert_array_equal(ours["is_success"], REF[f"{prefix}/is_success"])


@pytest.mark.parametrize("seed", SEEDS)
def test_environment_state_and_rewards_equal_gym_pusht(seed: int) -> None:
    ours = _rollout("environment_state_agent_pos", f"seed{seed}", seed=seed)
    assert ours["environment_state"].dtype == np.float64 and ours["agent_pos"].dtype == np.float64
    # Bit-equal: same dynamics, same seeded draw, same cos/sin and operation order.
    np.testing.assert_array_equal(ours["environment_state"], REF[f"seed{seed}/environment_state"])
    np.testing.assert_array_equal(ours["agent_pos"], REF[f"seed{seed}/agent_pos"])
    _check_step_results(ours, f"seed{seed}")


@pytest.mark.parametrize("seed", SEEDS)
def test_pixels_equal_gym_pusht(seed: int) -> None:
    ours = _rollout("pixels_agent_pos", f"seed{seed}", seed=seed, make=seed == SEEDS[0])
    assert ours["pixels"].dtype == np.uint8 and ours["pixels"].shape == (21, 96, 96, 3)
    np.testing.assert_array_equal(ours["pixels"], REF[f"seed{seed}/pixels"])
    np.testing.assert_array_equal(ours["agent_pos"], REF[f"seed{seed}/agent_pos_pixels"])
    _check_step_results(ours, f"seed{seed}")


@pytest.mark.parametrize("case", [0, 1])
def test_reset_to_state_is_placed_like_gym_pusht(case: int) -> None:
    """gym-pusht places reset_to_state legacy-style (case 0 is its docstring's example: block
    (20, 30) -> (57.87, 50.69)); case 1 lands on the goal, so it is terminated with reward 1."""
    prefix = f"reset_to_state{case}"
    options = {"reset_to_state": REF["reset_to_states"][case]}
    state = _rollout("environment_state_agent_pos", prefix, options)
    pixels = _rollout("pixels_agent_pos", prefix, options)
    np.testing.assert_array_equal(state["environment_state"], REF[f"{prefix}/environment_state"])
    np.testing.assert_array_equal(state["agent_pos"], REF[f"{prefix}/agent_pos"])
    np.testing.assert_array_equal(pixels["pixels"], REF[f"{prefix}/pixels"])
    _check_step_results(state, prefix)
    assert REF[f"{prefix}/terminated"].all() == (case == 1)


@pytest.mark.parametrize("size", [96, 84])
def test_resize_equals_cv2_default_resize(size: int) -> None:
    """cv2.resize(image, (size, size)) (INTER_LINEAR) of a hashed noise image, bit for bit."""
    mask = np.uint64(2**32 - 1)
    x = np.arange(512 * 512 * 3, dtype=np.uint64) * np.uint64(2654435761) & mask
    x ^= x >> np.uint64(16)
    x = x * np.uint64(2246822519) & mask
    x ^= x >> np.uint64(13)
    image = (x >> np.uint64(24)).astype(np.uint8).reshape(512, 512, 3)
    np.testing.assert_array_equal(resize_like_cv2_linear(image, size),
                                  REF[f"resize/hash_image_{size}"])


def test_gym_pusht_spaces_keys_and_dtypes() -> None:
    for obs_type in GYM_PUSHT_OBS_TYPES:
        env = PushTEnv(**gym_pusht_kwargs(obs_type))
        obs, _ = env.reset(seed=0)
        assert env.observation_space.contains(obs)
        obs, *_ = env.step(np.array([-30.0, 600.0]))  # unclipped: the agent leaves [0, 512]
        assert env.observation_space.contains(obs)
    obs, _ = PushTEnv(**gym_pusht_kwargs("environment_state_agent_pos")).reset(seed=0)
    assert set(obs) == {"environment_state", "agent_pos"}
    assert obs["environment_state"].shape == (16,)
    obs, _ = PushTEnv(**gym_pusht_kwargs("pixels_agent_pos")).reset(seed=0)
    assert set(obs) == {"pixels", "agent_pos"} and obs["agent_pos"].dtype == np.float64
    pixels, _ = PushTEnv(**gym_pusht_kwargs("pixels")).reset(seed=0)
    np.testing.assert_array_equal(pixels, obs["pixels"])
    with pytest.raises(ValueError, match="reset_rule"):
        PushTEnv(reset_rule="lerobot")
    with pytest.raises(ValueError, match="obs_type"):
        gym_pusht_kwargs("keypoints")


def test_action_clip_option() -> None:
    state = [100.0, 400.0, 350.0, 150.0, 0.0]
    positions = {}
    for clip in (True, False):
        env = PushTEnv(action_clip=clip)
        env.reset(options={"reset_to_state": state})
        for _ in range(30):
            *_, info = env.step(np.array([-100.0, 1000.0]))
        positions[clip] = info["pos_agent"]
    np.testing.assert_allclose(positions[True], [0.0, 512.0], atol=0.5)
    np.testing.assert_allclose(positions[False], [-100.0, 1000.0], atol=0.5)


# Default (DP) mode: seed 0, 15 pushes at the block's centre of gravity (rng 7), then 5 targets
# outside the workspace (clipped). Pinned with the code before the gym-pusht options existed;
# the new code gave bit-identical observations, infos and renders (state, keypoints, image).
DEFAULT_FINAL_STATE = [285.13809, 62.741222, 271.73080, 497.63962, 3.2494843]
DEFAULT_REWARD_SUM = 0.5190704128539244
DEFAULT_FINAL_IMAGE_MEAN = 246.6822554976852


def _default_rollout(obs_type: str) -> tuple[list, list]:
    env = PushTEnv(obs_type=obs_type)
    obs, info = env.reset(seed=0)
    observations, rewards = [obs], []
    rng = np.random.default_rng(7)
    for step in range(20):
        if step < 15:
            x, y, angle = info["block_pose"]
            target = [x - 45 * np.sin(angle), y + 45 * np.cos(angle)] + rng.normal(0, 30, 2)
        else:
            target = rng.uniform(-40.0, 552.0, 2)
        obs, reward, _, _, info = env.step(np.asarray(target, dtype=np.float32))
        observations.append(obs)
        rewards.append(reward)
    return observations, rewards


def test_default_mode_is_unchanged() -> None:
    env = PushTEnv()
    assert (env.obs_type, env.reset_rule, env.action_clip) == ("state", "dp", True)
    obs, _ = env.reset(seed=0)
    np.testing.assert_allclose(env.get_state()[:2], legacy_initial_state(0)[:2])
    gym_obs, _ = PushTEnv(reset_rule="gym_pusht").reset(seed=0)
    assert not np.allclose(obs, gym_obs)  # the two rules draw different initial states
    states, rewards = _default_rollout("state")
    assert all(s.dtype == np.float32 and s.shape == (5,) for s in states)
    np.testing.assert_allclose(states[-1], DEFAULT_FINAL_STATE, rtol=0, atol=1e-3)
    np.testing.assert_allclose(sum(rewards), DEFAULT_REWARD_SUM, rtol=0, atol=1e-6)
    images, _ = _default_rollout("image")
    final = images[-1]
    assert set(final) == {"image", "agent_pos"} and final["agent_pos"].dtype == np.float32
    np.testing.assert_allclose(final["agent_pos"], states[-1][:2], rtol=1e-6)
    assert final["image"].shape == (96, 96, 3) and final["image"].dtype == np.uint8
    assert abs(final["image"].mean() - DEFAULT_FINAL_IMAGE_MEAN) < 0.05
