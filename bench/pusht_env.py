"""Benchmark PushT: env steps/s per observation type and the scripted expert's success.

Usage: python bench/pusht_env.py --out FILE.json [--seeds N] [--seed-start S]
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

from envs.pusht import OBS_TYPES, PushTEnv
from envs.pusht_expert import PushTExpert, run_expert_episode
from picard_sampler.runinfo import package_versions

STEPS_PER_OBS_TYPE = {"state": 3000, "keypoints": 3000, "image": 600}
EPISODE_LENGTH = 300


def measure_env_steps_per_second(obs_type: str, n_steps: int) -> float:
    """Steps/s with uniformly random targets, resetting every 300 steps (reset time included)."""
    env = PushTEnv(obs_type=obs_type)
    actions = np.random.default_rng(0).uniform(0, 512, size=(n_steps, 2))
    start = time.perf_counter()
    for step, action in enumerate(actions):
        if step % EPISODE_LENGTH == 0:
            env.reset(seed=step)
        env.step(action)
    return n_steps / (time.perf_counter() - start)


def evaluate_expert(seeds: range) -> dict:
    """Expert rollouts (diversity 0.5, rng = seed) over ``seeds``: success and coverage stats."""
    env = PushTEnv()
    episodes = []
    for seed in tqdm(seeds, desc="expert episodes"):
        start = time.perf_counter()
        episode = run_expert_episode(env, PushTExpert(rng=seed), seed=seed)
        episodes.append(
            {
                "seed": seed,
                "success": episode["success"],
                "final_coverage": episode["final_coverage"],
                "max_coverage": episode["max_coverage"],
                "n_steps": episode["n_steps"],
                "wall_s": time.perf_counter() - start,
            }
        )
    return {
        "n_episodes": len(episodes),
        "seeds": [seeds.start, seeds.stop - 1],
        "success_rate": float(np.mean([e["success"] for e in episodes])),
        "mean_final_coverage": float(np.mean([e["final_coverage"] for e in episodes])),
        "mean_max_coverage": float(np.mean([e["max_coverage"] for e in episodes])),
        "mean_steps": float(np.mean([e["n_steps"] for e in episodes])),
        "mean_wall_s_per_episode": float(np.mean([e["wall_s"] for e in episodes])),
        "failed_seeds": [e["seed"] for e in episodes if not e["success"]],
        "episodes": episodes,
    }


def environment_info() -> dict:
    """Device, threads and package versions to report next to the numbers."""
    return {
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": 1,
        "versions": package_versions(["numpy", "gymnasium", "pymunk", "pygame", "shapely"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--seeds", type=int, default=20, help="number of expert episodes")
    parser.add_argument("--seed-start", type=int, default=0, help="first expert seed")
    args = parser.parse_args()

    steps_per_second = {
        obs_type: measure_env_steps_per_second(obs_type, STEPS_PER_OBS_TYPE[obs_type])
        for obs_type in tqdm(OBS_TYPES, desc="env steps/s")
    }
    expert = evaluate_expert(range(args.seed_start, args.seed_start + args.seeds))
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "env_steps_per_second": steps_per_second,
        "expert": expert,
        **environment_info(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    summary = {key: value for key, value in expert.items() if key != "episodes"}
    print(json.dumps({"env_steps_per_second": steps_per_second, "expert": summary}, indent=2))


if __name__ == "__main__":
    main()
