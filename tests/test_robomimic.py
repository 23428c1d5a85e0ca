"""robomimic side: robosuite envs, scripted experts, the hdf5 format and its zarr conversion.

Env and expert tests need robosuite 1.5 (the `robomimic` extra) and skip without it; the hdf5
and conversion tests run anywhere.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import gymnasium
import h5py
import numpy as np
import pytest
from omegaconf import OmegaConf

import envs
from policy.data import EpisodeSplit, ReplayBuffer, SequenceDataset
from policy.data.robomimic_hdf5 import (
    DP_LOWDIM_OBS_KEYS,
    RobomimicHDF5Writer,
    iter_demos,
    read_attrs,
    read_env_meta,
    robomimic_to_replay_buffer,
    split_demos,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
LIFT_OBS_DIMS = {"object": 10, "robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2}


def _robosuite_import_error() -> str | None:
    try:
        import robosuite  # noqa: F401
    except Exception as error:  # any import failure (missing, wrong mujoco) means: skip
        return f"robosuite cannot be imported ({error!r}); install the robomimic extra"
    return None


ROBOSUITE_ERROR = _robosuite_import_error()
needs_robosuite = pytest.mark.skipif(ROBOSUITE_ERROR is not None, reason=str(ROBOSUITE_ERROR))


@pytest.fixture(scope="module")
def lift_env() -> Any:
    """One low-dim Lift env for the module (robosuite builds take ~0.5 s each)."""
    from envs.robomimic import RobomimicEnv

    env = RobomimicEnv("Lift")
    yield env
    env.close()


def _synthetic_demo(rng: np.random.Generator, n_steps: int) -> dict[str, Any]:
    """A Lift-shaped demo of random numbers, float64 obs as in robomimic's datasets."""
    observations = {
        key: rng.normal(size=(n_steps + 1, dim)) for key, dim in LIFT_OBS_DIMS.items()
    }
    return {
        "actions": rng.uniform(-1, 1, size=(n_steps, 7)),
        "states": rng.normal(size=(n_steps, 32)),
        "rewards": np.zeros(n_steps),
        "dones": np.eye(n_steps, dtype=np.int64)[-1],
        "obs": {key: value[:-1] for key, value in observations.items()},
        "next_obs": {key: value[1:] for key, value in observations.items()},
        "model_file": "<mujoco/>",
    }


ENV_META = {"env_name": "Lift", "type": 1, "env_kwargs": {"control_freq": 20}}


@pytest.fixture
def synthetic_hdf5(tmp_path: Path) -> tuple[Path, list[dict[str, Any]]]:
    """Eleven synthetic demos (so demo_10 exists) written with our writer, and the demos."""
    rng = np.random.default_rng(0)
    demos = [_synthetic_demo(rng, n_steps) for n_steps in rng.integers(3, 9, size=11)]
    path = tmp_path / "demos.hdf5"
    with RobomimicHDF5Writer(path, ENV_META) as writer:
        for demo in demos:
            writer.add_demo(demo)
        names = [f"demo_{i}" for i in range(len(demos))]
        writer.close(attrs={"expert": {"success_rate": 1.0}}, mask=split_demos(names, 0.2, 0))
    return path, demos


# ----------------------------------------------------------------------------- hdf5 format


def test_hdf5_round_trip_keeps_arrays_attrs_and_demo_order(synthetic_hdf5: tuple) -> None:
    path, demos = synthetic_hdf5
    read = list(iter_demos(path))
    assert [name for name, _ in read] == [f"demo_{i}" for i in range(11)]  # demo_10 last
    for (name, got), demo in zip(read, demos, strict=True):
        for key in ("actions", "states", "rewards", "dones"):
            np.testing.assert_array_equal(got[key], demo[key], err_msg=f"{name}/{key}")
        for group in ("obs", "next_obs"):
            assert set(got[group]) == set(LIFT_OBS_DIMS)
            for key, value in demo[group].items():
                np.testing.assert_array_equal(got[group][key], value)
        assert got["model_file"] == "<mujoco/>"
    assert read_env_meta(path) == ENV_META
    attrs = read_attrs(path)
    assert attrs["total"] == sum(len(demo["actions"]) for demo in demos)
    assert attrs["expert"] == {"success_rate": 1.0}
    with h5py.File(path, "r") as file:
        assert file["data/demo_3"].attrs["num_samples"] == len(demos[3]["actions"])
        train = {name.decode() for name in file["mask/train"][:]}
        valid = {name.decode() for name in file["mask/valid"][:]}
    assert len(valid) == 2 and not train & valid and len(train | valid) == 11
    assert [name for name, _ in iter_demos(path, filter_key="valid")] == sorted(
        valid, key=lambda name: int(name.split("_")[1])
    )


def test_hdf5_writer_leaves_no_file_when_interrupted(tmp_path: Path) -> None:
    path = tmp_path / "demos.hdf5"
    with pytest.raises(RuntimeError), RobomimicHDF5Writer(path, ENV_META) as writer:
        writer.add_demo(_synthetic_demo(np.random.default_rng(0), 4))
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_hdf5_writer_rejects_ragged_demos(tmp_path: Path) -> None:
    demo = _synthetic_demo(np.random.default_rng(0), 4)
    demo["obs"]["object"] = demo["obs"]["object"][:3]
    with RobomimicHDF5Writer(tmp_path / "demos.hdf5", ENV_META) as writer, pytest.raises(
        ValueError, match="same length"
    ):
        writer.add_demo(demo)


def test_converter_output_matches_source(synthetic_hdf5: tuple) -> None:
    path, demos = synthetic_hdf5
    buffer = robomimic_to_replay_buffer(path)
    assert buffer.keys() == sorted([*DP_LOWDIM_OBS_KEYS, "action"])
    np.testing.assert_array_equal(buffer.episode_lengths, [len(d["actions"]) for d in demos])
    for index, demo in enumerate(demos):
        episode = buffer.get_episode(index)
        np.testing.assert_array_equal(episode["action"], demo["actions"].astype(np.float32))
        for key in DP_LOWDIM_OBS_KEYS:
            assert episode[key].dtype == np.float32
            np.testing.assert_array_equal(episode[key], demo["obs"][key].astype(np.float32))
    assert buffer.attrs["env_meta"] == ENV_META
    assert buffer.attrs["obs_keys"] == list(DP_LOWDIM_OBS_KEYS)
    assert buffer.attrs["expert"] == {"success_rate": 1.0}
    valid = robomimic_to_replay_buffer(path, filter_key="valid")
    assert valid.n_episodes == 2 and valid.attrs["demo_names"] == sorted(
        valid.attrs["demo_names"], key=lambda name: int(name.split("_")[1])
    )


def test_converter_reads_robomimic_datasets_layout(tmp_path: Path) -> None:
    """robomimic's own files: float64 obs, only total/env_args attrs, no mask, images."""
    path = tmp_path / "robomimic.hdf5"
    rng = np.random.default_rng(1)
    with h5py.File(path, "w") as file:
        data = file.create_group("data")
        data.attrs["total"] = 9
        data.attrs["env_args"] = json.dumps(ENV_META)
        for name, n_steps in (("demo_1", 4), ("demo_0", 5)):
            demo = data.create_group(name)
            demo.attrs["num_samples"] = n_steps
            demo["actions"] = rng.uniform(-1, 1, size=(n_steps, 7))
            demo["obs/object"] = rng.normal(size=(n_steps, 10))
            demo["obs/agentview_image"] = rng.integers(0, 255, (n_steps, 84, 84, 3), np.uint8)
    buffer = robomimic_to_replay_buffer(path, obs_keys=["object", "agentview_image"])
    np.testing.assert_array_equal(buffer.episode_lengths, [5, 4])
    assert buffer["agentview_image"].dtype == np.uint8
    assert buffer["agentview_image"].shape == (9, 84, 84, 3)
    with h5py.File(path, "r") as file:
        np.testing.assert_array_equal(
            buffer["object"][:5], file["data/demo_0/obs/object"][:].astype(np.float32)
        )
    with pytest.raises(KeyError, match="robot0_eef_pos"):
        robomimic_to_replay_buffer(path)


@pytest.mark.parametrize(
    ("config", "obs_dim"), [("lift_lowdim", 19), ("can_lowdim", 23), ("square_lowdim", 23)]
)
def test_lowdim_configs_feature_specs_give_obs_dim(
    config: str, obs_dim: int, tmp_path: Path
) -> None:
    cfg = OmegaConf.load(REPO_ROOT / "conf" / "env" / f"{config}.yaml")
    assert cfg.obs_dim == obs_dim and cfg.action_dim == 7 and cfg.max_steps == 400
    assert list(cfg.dataset.obs_keys) == list(DP_LOWDIM_OBS_KEYS)
    assert gymnasium.spec(cfg.id.split(":")[1]).max_episode_steps == cfg.max_steps
    object_dim = obs_dim - 9
    rng = np.random.default_rng(0)
    buffer_path = tmp_path / "buffer.zarr.zip"
    buffer = ReplayBuffer.create_empty()
    for _ in range(2):
        buffer.add_episode(
            {
                "object": rng.normal(size=(20, object_dim)).astype(np.float32),
                **{
                    key: rng.normal(size=(20, dim)).astype(np.float32)
                    for key, dim in LIFT_OBS_DIMS.items()
                    if key != "object"
                },
                "action": rng.normal(size=(20, 7)).astype(np.float32),
            }
        )
    buffer.save(buffer_path)
    dataset = SequenceDataset(buffer_path, obs_keys=list(cfg.dataset.obs_keys),
                              episode_split=EpisodeSplit(val_ratio=0.0))
    assert (dataset.obs_dim, dataset.action_dim) == (cfg.obs_dim, cfg.action_dim)


def test_importing_envs_does_not_import_robosuite_or_torch() -> None:
    code = (
        "import sys, envs; "
        "print(sorted(m for m in ('robosuite', 'torch', 'policy') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT
    )
    assert result.stdout.strip() == "[]"
    assert set(envs.ROBOMIMIC_ENV_NAMES) == {"Lift", "PickPlaceCan", "NutAssemblySquare"}


# ---------------------------------------------------------------------------------- envs


@needs_robosuite
def test_lift_reset_and_step_give_robomimic_lowdim_obs(lift_env: Any) -> None:
    obs, info = lift_env.reset(seed=0)
    assert obs.shape == (19,) and obs.dtype == np.float32
    assert lift_env.observation_space.contains(obs) and info == {"is_success": False}
    keys = lift_env.observation_dict()
    assert {key: value.shape[0] for key, value in keys.items()} == LIFT_OBS_DIMS
    np.testing.assert_array_equal(obs, np.concatenate([keys[k] for k in DP_LOWDIM_OBS_KEYS]))
    # robomimic's object layout: cube pos, cube quat (xyzw), eef pos - cube pos
    robosuite_env = lift_env.robosuite_env
    cube_pos = robosuite_env.sim.data.body_xpos[robosuite_env.cube_body_id]
    np.testing.assert_allclose(keys["object"][:3], cube_pos, atol=1e-6)
    np.testing.assert_allclose(keys["object"][7:], keys["robot0_eef_pos"] - cube_pos, atol=1e-6)
    obs, reward, terminated, truncated, info = lift_env.step(np.zeros(7, dtype=np.float32))
    assert obs.shape == (19,) and reward == 0.0 and not terminated and not truncated
    assert info == {"is_success": False}


@needs_robosuite
def test_same_seed_same_initial_state(lift_env: Any) -> None:
    first, _ = lift_env.reset(seed=7)
    state = lift_env.get_state()
    for _ in range(3):
        lift_env.step(lift_env.action_space.sample())
    again, _ = lift_env.reset(seed=7)
    np.testing.assert_array_equal(lift_env.get_state(), state)
    np.testing.assert_array_equal(again, first)
    lift_env.reset(seed=8)
    assert not np.allclose(lift_env.get_state(), state)


@needs_robosuite
def test_reset_to_state_restores_the_observation(lift_env: Any) -> None:
    lift_env.reset(seed=3)
    actions = np.random.default_rng(0).uniform(-1, 1, size=(4, 7))
    for action in actions:
        obs, *_ = lift_env.step(action)
    state = lift_env.get_state()
    lift_env.reset(seed=4)
    np.testing.assert_allclose(lift_env.reset_to_state(state), obs, atol=1e-6)
    lift_env.reset(seed=4)
    restored, info = lift_env.reset(options={"reset_to_state": state})
    np.testing.assert_allclose(restored, obs, atol=1e-6)
    np.testing.assert_array_equal(lift_env.get_state(), state)
    with pytest.raises(ValueError, match="finite numbers"):
        lift_env.reset_to_state(state[:-1])


@needs_robosuite
@pytest.mark.parametrize(
    ("action", "message"),
    [(np.full(7, np.nan), "finite"), (np.zeros(6), r"shape \(7,\)"), (np.zeros((1, 7)), "shape")],
)
def test_bad_actions_raise_clear_errors(lift_env: Any, action: np.ndarray, message: str) -> None:
    lift_env.reset(seed=0)
    with pytest.raises(ValueError, match=message):
        lift_env.step(action)


@needs_robosuite
def test_lift_expert_episode_succeeds(lift_env: Any) -> None:
    from envs.robomimic_expert import LiftExpert, run_expert_episode

    episode = run_expert_episode(lift_env, LiftExpert(rng=0), seed=0, max_steps=400)
    n_steps = episode["n_steps"]
    assert episode["success"] and n_steps < 100
    assert episode["actions"].shape == (n_steps, 7)
    assert np.all(np.abs(episode["actions"]) <= 1.0)
    assert episode["states"].shape == (n_steps, 32)
    assert episode["rewards"][-1] == 1.0 and episode["dones"][-1] == 1
    assert episode["rewards"][:-1].sum() == 0.0
    for key, dim in LIFT_OBS_DIMS.items():
        assert episode["obs"][key].shape == (n_steps, dim)
        np.testing.assert_array_equal(episode["obs"][key][1:], episode["next_obs"][key][:-1])
    lift_env.reset_to_state(episode["states"][5])
    np.testing.assert_allclose(
        lift_env.observation_dict()["object"], episode["obs"]["object"][5], atol=1e-5
    )


@needs_robosuite
def test_square_expert_episode_puts_the_nut_on_its_peg() -> None:
    from envs.robomimic_expert import NutAssemblySquareExpert, make_expert, run_expert_episode

    env = gymnasium.make("envs:NutAssemblySquare-v0")
    expert = make_expert("NutAssemblySquare", rng=3)
    assert isinstance(expert, NutAssemblySquareExpert)
    episode = run_expert_episode(env, expert, seed=3, max_steps=400)
    n_steps = episode["n_steps"]
    assert episode["success"] and n_steps < 250
    assert episode["rewards"][-1] == 1.0 and episode["rewards"][:-1].sum() == 0.0
    assert np.all(np.abs(episode["actions"]) <= 1.0)
    assert episode["obs"]["object"].shape == (n_steps, 14)
    robosuite_env = env.unwrapped.robosuite_env
    nut = robosuite_env.sim.data.body_xpos[robosuite_env.obj_body_id["SquareNut"]]
    peg = robosuite_env.sim.data.body_xpos[robosuite_env.peg1_body_id]
    assert np.linalg.norm(nut[:2] - peg[:2]) < 0.01  # down the peg, not beside it
    env.close()


@needs_robosuite
def test_can_env_object_is_robomimic_layout() -> None:
    env = gymnasium.make("envs:PickPlaceCan-v0")
    assert env.spec.max_episode_steps == 400
    obs, _ = env.reset(seed=0)
    assert obs.shape == (23,) and env.observation_space.shape == (23,)
    env.step(np.zeros(7))
    robosuite_env = env.unwrapped.robosuite_env
    raw = robosuite_env._get_observations(force_update=True)  # robosuite 1.5's own values
    obj = env.unwrapped.observation_dict()["object"]
    np.testing.assert_allclose(obj[:3], raw["Can_pos"], atol=1e-6)
    np.testing.assert_allclose(obj[3:7], raw["Can_quat"], atol=1e-6)
    np.testing.assert_allclose(obj[7:10], raw["Can_to_robot0_eef_pos"], atol=1e-5)
    np.testing.assert_allclose(obj[10:], raw["Can_to_robot0_eef_quat"], atol=1e-5)
    env.close()


ROBOMIMIC_V15_LIFT_META = {
    "env_name": "Lift",
    "type": 1,
    "env_kwargs": {
        "has_renderer": False,
        "has_offscreen_renderer": True,
        "ignore_done": True,
        "use_object_obs": True,
        "use_camera_obs": False,
        "control_freq": 20,
        "controller_configs": {
            "type": "OSC_POSE",
            "input_max": 1,
            "input_min": -1,
            "output_max": [0.05, 0.05, 0.05, 0.5, 0.5, 0.5],
            "output_min": [-0.05, -0.05, -0.05, -0.5, -0.5, -0.5],
            "kp": 150,
            "damping": 1,
            "impedance_mode": "fixed",
            "kp_limits": [0, 300],
            "damping_limits": [0, 10],
            "position_limits": None,
            "orientation_limits": None,
            "uncouple_pos_ori": True,
            "control_delta": True,
            "interpolation": None,
            "ramp_ratio": 0.2,
        },
        "robots": ["Panda"],
        "camera_depths": False,
        "camera_heights": 84,
        "camera_widths": 84,
        "reward_shaping": False,
    },
}
"""The env_args of robomimic's v1.5 Lift datasets: an old OSC_POSE config, hard resets."""


@needs_robosuite
def test_env_from_robomimic_dataset_metadata() -> None:
    from envs.robomimic import RobomimicEnv

    env = RobomimicEnv(env_meta=ROBOMIMIC_V15_LIFT_META)
    obs, _ = env.reset(seed=5)
    state = env.get_state()
    env.step(np.ones(7))
    again, _ = env.reset(seed=5)  # a hard reset rebuilds the model from the seeded rng
    np.testing.assert_array_equal(env.get_state(), state)
    np.testing.assert_array_equal(again, obs)
    assert obs.shape == (19,) and env.robosuite_env.action_dim == 7
    assert env.env_meta == ROBOMIMIC_V15_LIFT_META
    env.close()


@needs_robosuite
def test_image_observations_and_rendering() -> None:
    from envs.robomimic import RobomimicEnv

    env = RobomimicEnv("Lift", obs_type="image", render_mode="rgb_array", render_size=(64, 96))
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    for key in ("agentview_image", "robot0_eye_in_hand_image"):
        assert obs[key].shape == (84, 84, 3) and obs[key].dtype == np.uint8
        assert obs[key].std() > 5  # a scene, not a blank buffer
    assert {key: obs[key].shape for key in ("robot0_eef_pos", "robot0_gripper_qpos")} == {
        "robot0_eef_pos": (3,),
        "robot0_gripper_qpos": (2,),
    }
    frame = env.render()
    assert frame.shape == (64, 96, 3) and frame.dtype == np.uint8
    env.close()


@needs_robosuite
def test_make_demos_script_writes_hdf5_and_zarr(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    try:
        import make_robomimic_demos
    finally:
        sys.path.remove(str(REPO_ROOT / "scripts"))
    out, zarr_path = tmp_path / "lift.hdf5", tmp_path / "lift.zarr.zip"
    make_robomimic_demos.main(
        ["--task", "lift", "--episodes", "2", "--out", str(out), "--zarr", str(zarr_path)]
    )
    attrs = read_attrs(out)
    assert attrs["expert"]["n_success"] == 2 and attrs["env_args"]["env_name"] == "Lift"
    buffer = ReplayBuffer.load(zarr_path)
    assert buffer.n_episodes == 2 and buffer["object"].shape[1] == 10
    assert buffer.n_steps == attrs["total"]


@needs_robosuite
def test_make_demos_script_joins_files_into_one_replay_buffer(
    synthetic_hdf5: tuple, tmp_path: Path
) -> None:
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    try:
        import make_robomimic_demos
    finally:
        sys.path.remove(str(REPO_ROOT / "scripts"))
    path, demos = synthetic_hdf5
    out = tmp_path / "joined.zarr.zip"
    make_robomimic_demos.main(
        ["--task", "lift", "--join", str(path), str(path), "--zarr", str(out)]
    )
    buffer = ReplayBuffer.load(out)
    assert buffer.n_episodes == 2 * len(demos)
    lengths = [len(demo["actions"]) for demo in demos]
    np.testing.assert_array_equal(buffer.episode_lengths, lengths + lengths)
    np.testing.assert_allclose(
        buffer.get_episode(len(demos))["action"], demos[0]["actions"], rtol=1e-6
    )
    assert [part["n_demos"] for part in buffer.attrs["parts"]] == [len(demos)] * 2
    assert buffer.attrs["parts"][0]["expert"] == {"success_rate": 1.0}
    with pytest.raises(SystemExit):  # --join writes --zarr only
        make_robomimic_demos.main(["--task", "lift", "--join", str(path), "--out", "x.hdf5"])
