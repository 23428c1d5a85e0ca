"""Benchmark the robomimic envs: steps/s (low-dim, image), render time, expert success.

Usage: python bench/robomimic_env.py --out FILE.json [--seeds N] [--seed-start S] [--tasks ...]

Steps/s use uniformly random actions after a 20-step warm-up (numba compiles robosuite's
controller on first use), one reset every 400 steps included. Rendering is timed with and
without ``fast_render`` (MSAA and reflections off) on the backend in ``MUJOCO_GL``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from envs import ROBOMIMIC_TASKS
from envs.robomimic import RobomimicEnv
from envs.robomimic_expert import make_expert, run_expert_episode
from picard_sampler.runinfo import package_versions

STEPS_PER_OBS_TYPE = {"lowdim": 400, "image": 60}
EPISODE_LENGTH = 400
WARMUP_STEPS = 20
RENDER_FRAMES = 20


def measure_steps_per_second(env_name: str, obs_type: str, n_steps: int) -> float:
    """Env steps/s with random actions, resetting every 400 steps (reset time included)."""
    env = RobomimicEnv(env_name, obs_type=obs_type)
    actions = np.random.default_rng(0).uniform(-1, 1, size=(WARMUP_STEPS + n_steps, 7))
    env.reset(seed=0)
    for action in actions[:WARMUP_STEPS]:
        env.step(action)
    start = time.perf_counter()
    for step, action in enumerate(actions[WARMUP_STEPS:]):
        if step % EPISODE_LENGTH == 0:
            env.reset(seed=step)
        env.step(action)
    seconds = time.perf_counter() - start
    env.close()
    return n_steps / seconds


def measure_render_ms(env_name: str, fast_render: bool) -> dict[str, float]:
    """Milliseconds per frame: one 84x84 camera and one 256x256 `render()` frame."""
    env = RobomimicEnv(env_name, render_mode="rgb_array", fast_render=fast_render)
    env.reset(seed=0)
    sim = env.robosuite_env.sim
    timings = {}
    for label, size in (("camera_84px_ms", 84), ("frame_256px_ms", 256)):
        sim.render(camera_name="agentview", width=size, height=size)  # sizes the buffers
        start = time.perf_counter()
        for _ in range(RENDER_FRAMES):
            sim.render(camera_name="agentview", width=size, height=size)
        timings[label] = (time.perf_counter() - start) / RENDER_FRAMES * 1e3
    env.close()
    return timings


def evaluate_expert(env_name: str, seeds: range, max_steps: int) -> dict:
    """Expert rollouts (diversity 0.5, rng = seed) over ``seeds``: success and step stats."""
    env = RobomimicEnv(env_name)
    episodes = []
    for seed in tqdm(seeds, desc=f"{env_name} expert"):
        start = time.perf_counter()
        episode = run_expert_episode(env, make_expert(env_name, rng=seed), seed, max_steps)
        episodes.append(
            {
                "seed": seed,
                "success": episode["success"],
                "n_steps": episode["n_steps"],
                "wall_s": time.perf_counter() - start,
            }
        )
    env.close()
    success = np.array([e["success"] for e in episodes])
    steps = np.array([e["n_steps"] for e in episodes], dtype=float)
    return {
        "n_episodes": len(episodes),
        "seeds": [seeds.start, seeds.stop - 1],
        "success_rate": float(success.mean()),
        "mean_steps": float(steps.mean()),
        "mean_steps_successful": float(steps[success].mean()) if success.any() else None,
        "mean_wall_s_per_episode": float(np.mean([e["wall_s"] for e in episodes])),
        "failed_seeds": [e["seed"] for e in episodes if not e["success"]],
        "episodes": episodes,
    }


def environment_info() -> dict:
    """Device, load, rendering backend and package versions to report next to the numbers."""
    return {
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "mujoco_gl": os.environ.get("MUJOCO_GL"),
        "versions": package_versions(["numpy", "gymnasium", "robosuite", "mujoco"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--seeds", type=int, default=50, help="expert episodes per task")
    parser.add_argument("--seed-start", type=int, default=0, help="first expert seed")
    parser.add_argument("--max-steps", type=int, default=EPISODE_LENGTH, help="episode limit")
    parser.add_argument(
        "--tasks", nargs="+", choices=sorted(ROBOMIMIC_TASKS), default=sorted(ROBOMIMIC_TASKS)
    )
    args = parser.parse_args()

    results = {}
    for task in args.tasks:
        env_name = ROBOMIMIC_TASKS[task]
        results[task] = {
            "env_steps_per_second": {
                obs_type: measure_steps_per_second(env_name, obs_type, n_steps)
                for obs_type, n_steps in STEPS_PER_OBS_TYPE.items()
            },
            "render": {
                "fast": measure_render_ms(env_name, fast_render=True),
                "default": measure_render_ms(env_name, fast_render=False),
            },
            "expert": evaluate_expert(
                env_name, range(args.seed_start, args.seed_start + args.seeds), args.max_steps
            ),
        }
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "tasks": results,
        **environment_info(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    summary = {
        task: {
            **{key: value for key, value in result.items() if key != "expert"},
            "expert": {k: v for k, v in result["expert"].items() if k != "episodes"},
        }
        for task, result in results.items()
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
