"""Write scripted PushT expert demonstrations to a zarr replay buffer (Diffusion Policy's layout).

Each seed is one episode: `PushTEnv` reset with that seed, driven by `PushTExpert(rng=seed)`.
By default only successful episodes are kept, trying further seeds (up to `--extra-frac` more)
until `--episodes` successes are stored. Per step the store holds `state` (T, 5),
`keypoint` (T, 9, 2) and `action` (T, 2) as float32, plus with `--render-images` `img`
(T, 96, 96, 3) uint8, the env's image observation at each stored state. Root attributes record
the expert statistics, per-episode seeds and outcomes, the command line, versions and date.

    python scripts/make_demos.py --out data/pusht_demos.zarr.zip --episodes 200
    python scripts/make_demos.py --out data/pusht_demos.zarr.zip --episodes 200 --render-images
    python scripts/make_demos.py --from-lowdim data/pusht_demos.zarr.zip \
        --out data/pusht_image_demos.zarr.zip            # add images without re-running the expert
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import sys
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from envs.pusht import PushTEnv
from envs.pusht_expert import PushTExpert, run_expert_episode
from picard_sampler.runinfo import provenance
from policy.data import ReplayBuffer

STEP_KEYS = ("state", "keypoint", "action")
IMAGE_KEY = "img"
IMAGE_SIZE = 96
SUMMARY_KEYS = ("final_coverage", "max_coverage", "success", "n_steps")
VERSIONED_PACKAGES = ("numpy", "zarr", "numcodecs", "pymunk", "shapely", "pygame", "gymnasium")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring for examples)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output store: a directory, or a file ending in .zip",
    )
    parser.add_argument(
        "--episodes",
        type=int,
        default=200,
        help="episodes to store (successes unless --keep-failures)",
    )
    parser.add_argument("--seed-start", type=int, default=0, help="first seed to try")
    parser.add_argument(
        "--extra-frac",
        type=float,
        default=0.1,
        help="try at most episodes * (1 + extra_frac) seeds to find the successes",
    )
    parser.add_argument(
        "--keep-failures",
        action="store_true",
        help="store every attempted episode: exactly --episodes seeds, no extras",
    )
    parser.add_argument("--max-steps", type=int, default=300, help="episode step limit")
    parser.add_argument(
        "--render-images",
        action="store_true",
        help="also store img (T, 96, 96, 3) uint8 rendered from each step's state",
    )
    parser.add_argument(
        "--from-lowdim",
        type=Path,
        default=None,
        help="skip the expert: add images to the episodes of this low-dim store",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes running expert episodes in parallel (results identical)",
    )
    args = parser.parse_args(argv)
    if args.episodes < 1 or args.extra_frac < 0 or args.workers < 1:
        parser.error("need --episodes >= 1, --extra-frac >= 0 and --workers >= 1")
    return args


def run_seed(seed: int, max_steps: int) -> dict[str, Any]:
    """One expert episode from `seed`: float32 per-step arrays plus its summary scalars."""
    env = PushTEnv(obs_type="state")
    try:
        result = run_expert_episode(env, PushTExpert(rng=seed), seed, max_steps=max_steps)
    finally:
        env.close()
    return {
        "seed": seed,
        "episode": {key: np.asarray(result[key], dtype=np.float32) for key in STEP_KEYS},
        "final_coverage": float(result["final_coverage"]),
        "max_coverage": float(result["max_coverage"]),
        "success": bool(result["success"]),
        "n_steps": int(result["n_steps"]),
    }


def expert_runs(seeds: Sequence[int], max_steps: int, workers: int) -> Iterator[dict[str, Any]]:
    """Expert episodes for `seeds`, yielded in seed order (in parallel with `workers` > 1)."""
    if workers == 1:
        for seed in seeds:
            yield run_seed(seed, max_steps)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(partial(run_seed, max_steps=max_steps), seeds)


def collect_demos(
    n_episodes: int,
    seed_start: int,
    extra_frac: float,
    keep_failures: bool,
    max_steps: int,
    workers: int,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run seeds from `seed_start` until `n_episodes` are kept: (kept runs, all attempted runs).

    Keeps successes only (at most ceil(n_episodes * (1 + extra_frac)) seeds tried) unless
    `keep_failures`, which keeps exactly the first `n_episodes` seeds.
    """
    max_attempts = n_episodes if keep_failures else math.ceil(n_episodes * (1 + extra_frac))
    seeds = range(seed_start, seed_start + max_attempts)
    kept: list[dict[str, Any]] = []
    attempted: list[dict[str, Any]] = []
    with tqdm(total=n_episodes, desc="expert demos", unit="ep") as bar:
        for run in expert_runs(seeds, max_steps, workers):
            attempted.append(run)
            if keep_failures or run["success"]:
                kept.append(run)
                bar.update(1)
            n_success = sum(r["success"] for r in attempted)
            bar.set_postfix(tried=len(attempted), success_rate=f"{n_success / len(attempted):.2f}")
            if len(kept) == n_episodes:
                break
    return kept, attempted


def expert_statistics(attempted: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Success rate, mean final/max coverage and mean steps over every attempted seed."""
    success = np.array([run["success"] for run in attempted], dtype=bool)
    steps = np.array([run["n_steps"] for run in attempted], dtype=float)
    return {
        "n_attempted": len(attempted),
        "n_success": int(success.sum()),
        "success_rate": float(success.mean()),
        "mean_final_coverage": float(np.mean([run["final_coverage"] for run in attempted])),
        "mean_max_coverage": float(np.mean([run["max_coverage"] for run in attempted])),
        "mean_steps": float(steps.mean()),
        "mean_steps_successful": float(steps[success].mean()) if success.any() else None,
        "seeds_attempted": [run["seed"] for run in attempted],
        "seeds_failed": [run["seed"] for run in attempted if not run["success"]],
    }


def render_episode_images(env: PushTEnv, states: np.ndarray) -> np.ndarray:
    """(T, 5) PushT states -> (T, 96, 96, 3) uint8: the image observation the env gives at each
    state (`env` must have obs_type="image"), so stored images match what a policy sees."""
    frames = []
    for state in states:
        observation, _ = env.reset(options={"reset_to_state": np.asarray(state, np.float64)})
        frames.append(observation["image"])
    return np.stack(frames)


def add_images(source: ReplayBuffer) -> ReplayBuffer:
    """A copy of `source` (in memory) with `img` rendered from every stored `state`."""
    if IMAGE_KEY in source:
        raise ValueError(f"the store already has {IMAGE_KEY!r}")
    env = PushTEnv(obs_type="image", image_size=IMAGE_SIZE)
    target = ReplayBuffer.create_empty()
    try:
        for index in tqdm(range(source.n_episodes), desc="render images", unit="ep"):
            episode = source.get_episode(index)
            episode[IMAGE_KEY] = render_episode_images(env, episode["state"])
            target.add_episode(episode)
    finally:
        env.close()
    target.attrs.update(dict(source.attrs))
    return target


def make_demos(args: argparse.Namespace, argv: Sequence[str]) -> ReplayBuffer:
    """Run the expert as `args` asks and return the in-memory buffer with its attributes."""
    kept, attempted = collect_demos(
        args.episodes,
        args.seed_start,
        args.extra_frac,
        args.keep_failures,
        args.max_steps,
        args.workers,
    )
    if len(kept) < args.episodes:
        print(
            f"warning: only {len(kept)} of {args.episodes} episodes succeeded within "
            f"{len(attempted)} seeds; raise --extra-frac for more",
            file=sys.stderr,
        )
    buffer = ReplayBuffer.create_empty()
    for run in kept:
        buffer.add_episode(run["episode"])
    buffer.attrs.update(
        {
            "task": "pusht",
            "source": "scripted expert: envs.pusht_expert.PushTExpert",
            "only_successes": not args.keep_failures,
            "expert": expert_statistics(attempted),
            "episodes": {key: [run[key] for run in kept] for key in ("seed", *SUMMARY_KEYS)},
            "provenance": provenance(argv, VERSIONED_PACKAGES),
        }
    )
    return add_images(buffer) if args.render_images else buffer


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: generate (or add images to) demonstrations and save them to `--out`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.from_lowdim is not None:
        buffer = add_images(ReplayBuffer.load(args.from_lowdim))
        buffer.attrs["images_provenance"] = provenance(argv, VERSIONED_PACKAGES)
    else:
        buffer = make_demos(args, argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    buffer.save(args.out)
    print(f"wrote {buffer} to {args.out}")
    if "expert" in buffer.attrs:
        stats = buffer.attrs["expert"]
        print(
            f"expert: success rate {stats['success_rate']:.3f} over {stats['n_attempted']} "
            f"seeds, mean final coverage {stats['mean_final_coverage']:.3f}, "
            f"mean steps {stats['mean_steps']:.1f}"
        )


if __name__ == "__main__":
    main()
