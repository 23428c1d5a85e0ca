"""eval_policy.py runs a camera policy on robomimic's camera envs end to end (env=can_image): a
tiny debug=tiny_image policy for the env's two 84x84 cameras and low-dim robot keys (random
weights, a fitted normaliser), a few env steps under Picard, results and a video of the camera
view. The eval path is the same for every task, so env=lift_image is checked in process (its
env fits the policy and gives a chunk): a second subprocess eval cost ~14 s of the suite.
Rendering is offscreen (MuJoCo EGL, or MUJOCO_GL=osmesa)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_repo_script

pytest.importorskip("robosuite")
pytestmark = pytest.mark.slow  # robosuite envs and a subprocess: ~20-45 s per env here


def tiny_image_checkpoint(make_cfg, env: str, path: Path) -> Path:
    """A debug=tiny_image policy for `env`, saved as train_pcm.py saves one (no training)."""
    from omegaconf import OmegaConf

    import app.training as training
    from policy.checkpoint import save_checkpoint
    from policy.ema import EMA

    cfg = make_cfg("debug=tiny_image", f"env={env}")
    policy = training.DPStage(cfg).build_policy()
    rng = np.random.default_rng(0)
    lowdim = {key: rng.normal(0, 0.3, (64, *shape)) for key, shape
              in OmegaConf.to_container(cfg.env.lowdim_shapes).items()}
    policy.normalizer.fit({**lowdim, "action": rng.uniform(-1, 1, (64, cfg.env.action_dim))})
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    return save_checkpoint(
        path, policy=policy, ema=EMA(policy), optimizer=optimizer,
        lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), step=0,
        epoch=0, config=OmegaConf.to_container(cfg, resolve=True))


def test_eval_policy_runs_a_camera_policy_on_robomimic_camera_envs(make_cfg,
                                                                   tmp_path: Path) -> None:
    checkpoint = tiny_image_checkpoint(make_cfg, "can_image", tmp_path / "policy.ckpt")
    out = tmp_path / "eval"
    done = run_repo_script(
        "eval_policy.py", f"checkpoint={checkpoint}", "sampler=picard_ddim16",
        "sampler.schedule.num_inference_steps=4", "sampler.tol=1e-3", "n_episodes=1",
        "n_envs=1", "max_steps=12", "warmup_chunks=0", "exact_err_every=1", "video=true",
        "threads=1",
        "logger.wandb=false", "progress=false", f"hydra.run.dir={out}", timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    metrics = results["metrics"]
    assert results["config"]["max_steps"] == 12 and metrics["n_episodes"] == 1
    assert metrics["n_chunks"] >= 2 and metrics["encode_ms_p50"] is not None
    assert metrics["exact_err_max"] <= 1e-2  # Picard at a tight tol: the sequential chunk
    videos = list(out.glob("*.mp4")) + list(out.glob("*.gif"))
    assert videos and videos[0].stat().st_size > 0


def test_lift_image_env_fits_its_camera_policy_and_gives_a_chunk(make_cfg, tmp_path: Path) -> None:
    """env=lift_image in process: the env builder's check accepts the debug=tiny_image policy
    made for it, and a real first observation gives a finite chunk of the env's action size."""
    from app.builder import check_env_fits_policy, make_env_factory
    from policy import load_policy

    cfg = make_cfg("debug=tiny_image", "env=lift_image")
    checkpoint = tiny_image_checkpoint(make_cfg, "lift_image", tmp_path / "policy.ckpt")
    policy = load_policy(checkpoint)
    make_env = make_env_factory(cfg.env, max_steps=8, render=False)
    check_env_fits_policy(make_env, policy, "lift_image", str(checkpoint))
    env = make_env()
    try:
        obs, _ = env.reset(seed=0)
    finally:
        env.close()
    batch = {key: torch.as_tensor(np.stack([obs[key]] * policy.n_obs_steps))[None]
             for key in policy.obs_encoder.obs_shapes}
    sampler = policy.make_sampler("sequential", "ddim", 2)
    with torch.no_grad():
        actions, _ = policy.predict_action(batch, sampler,
                                           generator=torch.Generator().manual_seed(0))
    assert actions.shape == (1, policy.n_action_steps, cfg.env.action_dim)
    assert bool(torch.isfinite(actions).all())
