"""Bring your own policy: Diffusion Policy and LeRobot checkpoints against their own outputs.

The fixtures in tests/fixtures/ were made with the other projects' own code (their READMEs say
how): the UNet's output on fixed inputs, and the whole predict_action with every noise draw in
our layout. Pinned: UNet parity, the sequential chunk against the source's action, Picard's
fixed point, the settings kept, the safe unpickler, the import script and eval on them.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from app import evaluation
from app.checks import ConfigError
from app.command_line import CONF_DIR
from picard_sampler import DDIMSchedule, DDPMSchedule, exact_errors
from policy import load_policy
from policy.foreign import detect_format, import_diffusion_policy, import_lerobot

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT / "tests" / "fixtures"
pytestmark = pytest.mark.usefixtures("one_thread")

# fixture -> (path to load, schedule class, inference steps, relative chunk tolerance). DDIM's
# few large steps amplify the UNet's float32 rounding (~7e-7 here: the fixtures were made with
# another torch build), so its chunks agree less tightly than DDPM-100's.
CASES = {
    "dp_lowdim_ddpm": ("dp_lowdim_ddpm/dp_workspace.ckpt", DDPMSchedule, 100, 1e-5),
    "dp_lowdim_ddim": ("dp_lowdim_ddim/dp_workspace.ckpt", DDIMSchedule, 16, 1e-5),
    "lerobot_state_ddpm": ("lerobot_state_ddpm", DDPMSchedule, 100, 1e-5),
    "lerobot_state_ddim_nofilm": ("lerobot_state_ddim_nofilm", DDIMSchedule, 10, 5e-5),
    "lerobot_old_layout": ("lerobot_old_layout", DDPMSchedule, 100, 1e-5),
}


def reference(name: str) -> dict[str, torch.Tensor]:
    return torch.load(FIXTURES / name / "reference.pt", weights_only=True)


def observations(name: str, ref: dict[str, torch.Tensor]) -> object:
    """The reference call's observations under the source's own keys."""
    if name.startswith("dp_"):
        return ref["obs"]
    obs = {"observation.state": ref["obs_state"]}
    if "obs_env_state" in ref:
        obs["observation.environment_state"] = ref["obs_env_state"]
    return obs


@pytest.fixture(scope="module")
def loaded() -> dict[str, object]:
    return {name: load_policy(FIXTURES / path) for name, (path, *_) in CASES.items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_unet_matches_the_source_network(loaded, name: str) -> None:
    ref = reference(name)
    out = loaded[name].model(ref["unet_x"], ref["unet_t"], ref["unet_global_cond"])
    torch.testing.assert_close(out, ref["unet_out"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_sequential_chunk_equals_the_sources_predict_action(loaded, name: str) -> None:
    _, schedule_class, steps, tolerance = CASES[name]
    policy, ref = loaded[name], reference(name)
    sampler = policy.make_sampler("sequential")  # the source's own scheduler and steps
    assert type(sampler.schedule) is schedule_class and sampler.num_steps == steps
    action, _ = policy.predict_action(observations(name, ref), sampler, noise=ref["noise"])
    scale = ref["action"].abs().max()
    assert (action - ref["action"]).abs().max() / scale <= tolerance


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_picard_converges_to_the_same_chunk(loaded, name: str) -> None:
    """tol=0 iterates to the fixed point (the sequential chunk); the default tol=0.1 stays
    within its error scale of it."""
    policy, ref = loaded[name], reference(name)
    obs = observations(name, ref)
    _, sequential = policy.predict_action(obs, policy.make_sampler("sequential"),
                                          noise=ref["noise"])
    _, exact = policy.predict_action(obs, policy.make_sampler("picard", tol=0.0),
                                     noise=ref["noise"])
    assert exact.converged
    assert exact_errors(exact.sample, sequential.sample).max() <= 1e-4
    _, fast = policy.predict_action(obs, policy.make_sampler("picard", window=16),
                                    noise=ref["noise"])
    assert fast.converged  # random weights: no speed-up to expect, only the answer
    assert exact_errors(fast.sample, sequential.sample).max() <= 0.1


def test_imported_settings_are_the_sources(loaded) -> None:
    dp = loaded["dp_lowdim_ddim"]
    assert (dp.horizon, dp.n_obs_steps, dp.n_action_steps, dp.action_dim) == (8, 3, 4, 3)
    assert dp.obs_encoder.obs_shapes == {"obs": (9,)}
    assert not dp.model.down[0][0].cond_predict_scale  # DP's bias-only conditioning
    assert dp.model.final[0][1].num_groups == 8 and dp.model.down[0][0].conv1[1].num_groups == 4
    lerobot = loaded["lerobot_state_ddim_nofilm"]
    assert list(lerobot.obs_encoder.obs_shapes) == ["observation_state",
                                                    "observation_environment_state"]
    assert "observation_environment_state" not in lerobot.normalizer  # LeRobot: no ENV entry
    assert lerobot.train_schedule.config["num_inference_steps"] == 100
    assert lerobot.inference_schedule.num_inference_steps == 10


def test_lerobot_policy_takes_its_keys_gym_keys_and_our_stacked_layout(loaded) -> None:
    policy, ref = loaded["lerobot_state_ddpm"], reference("lerobot_state_ddpm")
    sampler = policy.make_sampler("sequential", "ddim", 4)
    noise = torch.randn(sampler.noise_shape(3, policy.horizon, policy.action_dim))
    expected, _ = policy.predict_action(observations("lerobot_state_ddpm", ref), sampler,
                                        noise=noise)
    gym_keys = {"agent_pos": ref["obs_state"], "environment_state": ref["obs_env_state"]}
    stacked = torch.cat([ref["obs_state"], ref["obs_env_state"]], dim=-1)
    for obs in (gym_keys, stacked):
        torch.testing.assert_close(policy.predict_action(obs, sampler, noise=noise)[0], expected)


def test_formats_are_detected(tmp_path: Path) -> None:
    assert detect_format(FIXTURES / "dp_lowdim_ddpm" / "dp_workspace.ckpt") == "diffusion_policy"
    assert detect_format(FIXTURES / "lerobot_old_layout") == "lerobot"
    assert detect_format(REPO_ROOT / "checkpoints" / "pusht_lowdim" / "policy.ckpt") == "picard"
    (tmp_path / "text.ckpt").write_text("hello")
    with pytest.raises(ValueError, match="not a torch zip file"):
        detect_format(tmp_path / "text.ckpt")
    with pytest.raises(ValueError, match="not a LeRobot pretrained model"):
        detect_format(tmp_path)


class RunsCode:
    """A pickle payload that would run a command on load."""

    def __reduce__(self):
        return (os.system, (f"touch {RunsCode.marker}",))

    marker = ""


def test_a_dp_pickle_with_foreign_classes_is_refused_without_running_them(tmp_path) -> None:
    RunsCode.marker = str(tmp_path / "ran")
    evil = tmp_path / "evil.ckpt"
    torch.save({"cfg": "omegaconf", "state_dicts": {}, "attack": RunsCode()}, evil,
               pickle_module=pickle)
    assert detect_format(evil) == "diffusion_policy"  # it says omegaconf in its pickle
    with pytest.raises(ValueError, match=r"refusing to unpickle (posix|os|nt)\.system"):
        import_diffusion_policy(evil)
    assert not (tmp_path / "ran").exists()


def test_what_does_not_map_is_one_clear_line(tmp_path: Path) -> None:
    folder = tmp_path / "camera_policy"
    shutil.copytree(FIXTURES / "lerobot_state_ddpm", folder)
    config = json.loads((folder / "config.json").read_text())
    config["input_features"]["observation.image"] = {"type": "VISUAL", "shape": [3, 96, 96]}
    (folder / "config.json").write_text(json.dumps(config))
    # cameras map (tests/test_import_image.py), but not this config's pretrained BatchNorm
    with pytest.raises(ValueError, match=r"use_group_norm=false: the ResNet keeps its "
                                         r"BatchNorm layers \(running statistics, pretrained"):
        import_lerobot(folder)
    config.update(use_group_norm=True, pretrained_backbone_weights=None)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"no weights for the image encoder "
                                         r"diffusion.rgb_encoder.0.\* \(use_separate_rgb"):
        import_lerobot(folder)
    config["vision_backbone"] = "resnet50"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="vision_backbone 'resnet50' does not map"):
        import_lerobot(folder)
    config["input_features"].pop("observation.image")
    config["prediction_type"] = "sample"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="prediction_type 'sample' is not supported"):
        import_lerobot(folder)


@pytest.mark.slow
def test_import_script_writes_a_native_checkpoint_with_the_same_chunks(loaded, tmp_path) -> None:
    out = tmp_path / "imported" / "policy.ckpt"
    result = subprocess.run(
        [sys.executable, "scripts/import_policy.py", str(FIXTURES / "lerobot_state_ddpm"),
         str(out), "--env", "pusht_lowdim"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (out.parent / "config.yaml").is_file()
    native, original = load_policy(out), loaded["lerobot_state_ddpm"]
    ref = reference("lerobot_state_ddpm")
    sampler = original.make_sampler("sequential", "ddim", 4)
    noise = torch.randn(sampler.noise_shape(3, original.horizon, original.action_dim))
    obs = observations("lerobot_state_ddpm", ref)
    torch.testing.assert_close(native.predict_action(obs, sampler, noise=noise)[0],
                               original.predict_action(obs, sampler, noise=noise)[0],
                               rtol=0, atol=0)
    assert native.inference_schedule.config == original.inference_schedule.config


def eval_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("eval", overrides=[
            "n_episodes=2", "n_envs=2", "max_steps=16", "threads=1", "progress=false",
            "logger.wandb=false", "exact_err_every=1", *overrides])


def test_eval_runs_an_imported_dp_checkpoint_and_asks_for_its_env(tmp_path: Path) -> None:
    checkpoint = FIXTURES / "dp_lowdim_ddpm" / "dp_workspace.ckpt"
    with pytest.raises(ConfigError, match="env must be set"):
        evaluation.run_eval(eval_config(f"checkpoint={checkpoint}"), tmp_path / "a")
    results = evaluation.run_eval(
        eval_config(f"checkpoint={checkpoint}", "env=pusht_lowdim", "sampler=picard_ddim16"),
        tmp_path / "b")
    assert results["n_episodes"] == 2
    assert results["config"]["env"]["name"] == "pusht_lowdim"
    assert np.isfinite(results["metrics"]["exact_err_max"])
