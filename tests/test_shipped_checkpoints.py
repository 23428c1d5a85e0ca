"""Backward compatibility of the shipped checkpoints: each `checkpoints/*/*.ckpt` still loads with
`load_policy_checkpoint` and reproduces its pinned action chunks (`tests/data/shipped_chunks.json`,
written by `scripts/make_shipped_chunks.py`) for fixed observations and fixed noise, under a 4-step
DDIM schedule built from the policy's own training schedule: the sequential chunk for every file,
and for a file with a PCM attached also the chunk after the PCM's first round (pcm, max_rounds=1).

If a change is meant to alter these numbers, regenerate the file with the script and say why in
the commit. A newly shipped checkpoint must be pinned too (`test_every_checkpoint_is_pinned`),
and ship with the Parareal propagators of its base weights
(`test_shipped_checkpoint_has_the_parareal_propagators`).
"""

from __future__ import annotations

import base64
import json
import warnings
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from picard_sampler import DDIMSchedule, Sampler
from policy.checkpoint import load_policy_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data" / "shipped_chunks.json"
RTOL = ATOL = 1e-5


def sample_chunk(
    policy: Any, schedule_steps: int, knobs: dict[str, Any], obs: Any, noise_seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The one place this file calls the sampling API: (action (B, Ta, Da), naction (B, H, Da))
    from `predict_action` with a `schedule_steps`-step DDIM schedule whose training settings are
    the policy's `train_schedule`'s, a `Sampler(schedule, **knobs)` and noise drawn from
    `torch.Generator().manual_seed(noise_seed)`."""
    train = policy.train_schedule
    schedule = DDIMSchedule(
        num_train_timesteps=train.num_train_timesteps,
        num_inference_steps=schedule_steps,
        beta_schedule=train.beta_schedule,
        clip_sample=train.clip_sample,
        prediction_type=train.prediction_type,
    )
    sampler = Sampler(schedule, **knobs)
    batch = len(next(iter(obs.values())) if isinstance(obs, dict) else obs)
    shape = sampler.noise_shape(batch, policy.horizon, policy.action_dim)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(noise_seed))
    action, stats = policy.predict_action(obs, sampler, noise=noise)
    return action, stats.sample


@cache
def pinned() -> dict[str, Any]:
    return json.loads(DATA.read_text())


def entries() -> list[dict[str, Any]]:
    return pinned()["entries"]


def test_every_checkpoint_is_pinned() -> None:
    shipped = sorted(
        p.relative_to(REPO_ROOT).as_posix() for p in REPO_ROOT.glob("checkpoints/*/*.ckpt")
    )
    assert shipped, f"no checkpoints found under {REPO_ROOT / 'checkpoints'}"
    pinned_paths = [e["checkpoint"] for e in entries()]
    missing = sorted(set(shipped) - set(pinned_paths))
    assert not missing, (
        f"shipped checkpoints without pinned chunks in {DATA.name}: {missing}; run "
        "scripts/make_shipped_chunks.py"
    )
    stale = sorted(set(pinned_paths) - set(shipped))
    assert not stale, f"{DATA.name} pins checkpoints that are not shipped: {stale}"


@pytest.mark.parametrize("entry", entries(), ids=[e["checkpoint"] for e in entries()])
def test_shipped_checkpoint_reproduces_pinned_chunks(entry: dict[str, Any]) -> None:
    policy = load_policy_checkpoint(REPO_ROOT / entry["checkpoint"])
    obs = {k: np.asarray(v, dtype=np.float32) for k, v in entry["obs"].items()}
    for key, frames in entry.get("frames", {}).items():  # a camera's uint8 frames
        data = np.frombuffer(base64.b64decode(frames["uint8_base64"]), dtype=np.uint8).copy()
        obs[key] = data.reshape(frames["shape"])
    if len(obs) == 1:
        obs = next(iter(obs.values()))
    methods = [c["sampler"]["method"] for c in entry["chunks"]]
    assert ("pcm" in methods) == (policy.pcm is not None), (
        f"PCM attached: {policy.pcm is not None}, pinned samplers: {methods}"
    )
    for pinned_chunk in entry["chunks"]:
        knobs = dict(pinned_chunk["sampler"])
        assert knobs.pop("schedule") == "ddim"
        steps = knobs.pop("num_inference_steps")
        action, naction = sample_chunk(policy, steps, knobs, obs, pinned_chunk["noise_seed"])
        what = f"{entry['checkpoint']} with {pinned_chunk['sampler']}"
        expected = torch.tensor(pinned_chunk["action"], dtype=torch.float32)
        torch.testing.assert_close(
            action, expected, rtol=RTOL, atol=ATOL, msg=lambda m, w=what: f"action of {w}: {m}"
        )
        if "naction" in pinned_chunk:
            expected = torch.tensor(pinned_chunk["naction"], dtype=torch.float32)
            torch.testing.assert_close(
                naction,
                expected,
                rtol=RTOL,
                atol=ATOL,
                msg=lambda m, w=what: f"naction of {w}: {m}",
            )


DEFAULT_PARAREAL_SCHEDULES = (("DDPMSchedule", 100), ("DDIMSchedule", 16))
"""The schedules of the Parareal samplers the project ships configs for: the default
`parareal_ddpm100` (conf/eval.yaml, conf/serve.yaml) and `pcm_parareal_ddim16`."""


@pytest.mark.parametrize(
    "checkpoint",
    sorted(p.relative_to(REPO_ROOT).as_posix() for p in REPO_ROOT.glob("checkpoints/*/*.ckpt")),
)
def test_shipped_checkpoint_has_the_parareal_propagators(checkpoint: str) -> None:
    """Every shipped checkpoint loads (as eval_policy.py loads it) with a fitted propagator for
    DDPM-100 and DDIM-16 attached, so the default sampler never falls back to update=scan with
    a warning: its folder's propagators.pt, fitted on its base weights
    (scripts/fit_propagator.py CHECKPOINT --schedules ddpm-100 ddim-16)."""
    from policy.loading import load_with_metadata

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a propagators.pt of other weights is a warning there
        policy, _ = load_with_metadata(REPO_ROOT / checkpoint)
    for schedule, steps in DEFAULT_PARAREAL_SCHEDULES:
        config = {"_target_": f"picard_sampler.{schedule}", "num_inference_steps": steps}
        sampler = policy.sampler_from_config(
            {"method": "picard", "update": "parareal", "schedule": config}
        )
        assert sampler.needs_propagator
        assert policy.has_propagator(sampler.schedule), (
            f"{checkpoint}: no propagator for {schedule}-{steps} in its folder's "
            f"propagators.pt; run scripts/fit_propagator.py {checkpoint} --schedules "
            "ddpm-100 ddim-16"
        )
