"""Pin the action chunks of every shipped checkpoint for `tests/test_shipped_checkpoints.py`.

For each `checkpoints/*/*.ckpt` (base policies, PCM training exports and PCM-only files) this loads
the policy with `policy.checkpoint.load_policy_checkpoint`, draws fixed observations (seeded numpy,
uniform inside the normalizer's fitted range of each observation key; a camera's frames uniform
uint8, stored base64 under `frames`) and fixed noise (a seeded `torch.Generator`), and records the
chunk that `predict_action` returns under a 4-step DDIM schedule built from the policy's own
`train_schedule`:

- every checkpoint: `Sampler(schedule, method="sequential")`, its raw `action` (B, Ta, Da) and
  its normalized whole chunk `naction` (B, H, Da);
- checkpoints with a PCM attached: also `Sampler(schedule, method="pcm", window=None, tol=0.0,
  max_rounds=1)`, the anytime estimate after the PCM's first round (all slots evaluated by the
  PCM alone), so the PCM's weights are exercised.

Floats are written as the shortest decimal that round-trips through float32, so reading them
back as float32 gives the computed values exactly. Generate the numbers from a trusted tree
(e.g. a clean checkout of the commit whose behaviour is to be pinned)::

    cd /path/to/clean/checkout && PYTHONPATH=$PWD python scripts/make_shipped_chunks.py \\
        --out tests/data/shipped_chunks.json
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

import picard_sampler
import policy as policy_pkg
from picard_sampler import DDIMSchedule, Sampler
from policy.checkpoint import load_policy_checkpoint
from policy.diffusion_policy import DiffusionPolicy
from policy.encoders import camera_shapes

BATCH = 2
NUM_INFERENCE_STEPS = 4
OBS_SEED = 0
NOISE_SEED = 0
PCM_SAMPLER = {"method": "pcm", "window": None, "tol": 0.0, "max_rounds": 1}
SEQUENTIAL_SAMPLER = {"method": "sequential"}


def ddim_schedule(policy: DiffusionPolicy, steps: int = NUM_INFERENCE_STEPS) -> DDIMSchedule:
    """A `steps`-step DDIM schedule with the training settings of the policy's train_schedule."""
    train = policy.train_schedule
    schedule = DDIMSchedule(
        num_train_timesteps=train.num_train_timesteps,
        num_inference_steps=steps,
        beta_schedule=train.beta_schedule,
        clip_sample=train.clip_sample,
        prediction_type=train.prediction_type,
    )
    # beta_start / beta_end are not among the copied settings: check the betas really match.
    if not torch.equal(schedule.alphas_cumprod, train.alphas_cumprod):
        raise ValueError(f"rebuilt DDIM schedule does not match {train!r}")
    return schedule


def make_obs(policy: DiffusionPolicy, seed: int = OBS_SEED) -> dict[str, np.ndarray]:
    """Observations {key: (B, To, *shape)} float32, uniform in each key's fitted data range
    (the normalizer's input_min / input_max), or in [-1, 1] for keys it does not normalize;
    a camera's frames (B, To, H, W, C) uniform uint8, as an env hands them over."""
    rng = np.random.default_rng(seed)
    cameras = camera_shapes(policy)
    obs = {}
    for key, step_shape in policy.obs_encoder.obs_shapes.items():
        if key in cameras:
            obs[key] = rng.integers(0, 256, size=(BATCH, policy.n_obs_steps, *cameras[key]),
                                    dtype=np.uint8)
            continue
        u = rng.uniform(-1.0, 1.0, size=(BATCH, policy.n_obs_steps, *step_shape))
        if key in policy.normalizer:
            lo = getattr(policy.normalizer, f"{key}_input_min").double().numpy()
            hi = getattr(policy.normalizer, f"{key}_input_max").double().numpy()
            u = lo + (u + 1.0) / 2.0 * (hi - lo)
        obs[key] = u.astype(np.float32)
    return obs


def to_lists(x: torch.Tensor | np.ndarray) -> list:
    """float32 array -> nested lists of floats, each the shortest float32 round-trip decimal."""
    a = np.asarray(x, dtype=np.float32)
    if a.ndim == 0:
        return float(str(a))  # type: ignore[return-value]
    return [to_lists(v) for v in a]


def chunk(
    policy: DiffusionPolicy, obs: dict[str, np.ndarray], knobs: dict[str, Any]
) -> dict[str, Any]:
    """Run `predict_action` with the sampler `knobs` and fixed noise; the JSON record."""
    sampler = Sampler(ddim_schedule(policy), **knobs)
    shape = sampler.noise_shape(BATCH, policy.horizon, policy.action_dim)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(NOISE_SEED))
    single = len(obs) == 1
    action, stats = policy.predict_action(
        next(iter(obs.values())) if single else obs, sampler, noise=noise
    )
    record: dict[str, Any] = {
        "sampler": {"schedule": "ddim", "num_inference_steps": NUM_INFERENCE_STEPS, **knobs},
        "noise_seed": NOISE_SEED,
        "action": to_lists(action),
    }
    if knobs["method"] == "sequential":
        record["naction"] = to_lists(stats.sample)
    return record


def entry(path: Path, root: Path) -> dict[str, Any]:
    """All pinned chunks of one checkpoint."""
    policy = load_policy_checkpoint(path)
    obs = make_obs(policy)
    samplers = [SEQUENTIAL_SAMPLER] + ([PCM_SAMPLER] if policy.pcm is not None else [])
    record: dict[str, Any] = {
        "checkpoint": path.relative_to(root).as_posix(),
        "batch": BATCH,
        "obs_seed": OBS_SEED,
        "obs": {k: to_lists(v) for k, v in obs.items() if v.dtype != np.uint8},
    }
    frames = {k: {"shape": list(v.shape), "uint8_base64": base64.b64encode(v).decode()}
              for k, v in obs.items() if v.dtype == np.uint8}
    if frames:
        record["frames"] = frames
    return {**record, "chunks": [chunk(policy, obs, knobs) for knobs in samplers]}


def dumps(payload: dict[str, Any]) -> str:
    """Indented JSON with each innermost list of numbers on one line."""
    text = json.dumps(payload, indent=1)
    return (
        re.sub(
            r"\[\s*([-+0-9.eE,\s]+?)\s*\]",
            lambda m: "[" + ", ".join(s.strip() for s in m.group(1).split(",")) + "]",
            text,
        )
        + "\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root",
        type=Path,
        default=Path.cwd(),
        help="repository root whose checkpoints/*/*.ckpt are pinned (default: cwd)",
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    torch.manual_seed(0)  # nothing should draw from it; fixed anyway
    print(f"policy from {Path(policy_pkg.__file__).parent}", file=sys.stderr)
    print(f"picard_sampler from {Path(picard_sampler.__file__).parent}", file=sys.stderr)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True
    ).stdout.strip()
    paths = sorted(root.glob("checkpoints/*/*.ckpt"))
    if not paths:
        raise SystemExit(f"no checkpoints under {root / 'checkpoints'}")
    entries = []
    for path in paths:
        print(f"pinning {path.relative_to(root)}", file=sys.stderr)
        entries.append(entry(path, root))
    payload = {
        "generated_by": "scripts/make_shipped_chunks.py",
        "git_head": head,
        "torch": torch.__version__,
        "entries": entries,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(dumps(payload))
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
