"""Write scripted robomimic expert demonstrations to robomimic's hdf5 layout (and a zarr copy).

Each seed is one episode: `RobomimicEnv` reset with that seed (robomimic's ph settings, see
`envs.robomimic.default_env_meta`), driven by the task's scripted expert with ``rng=seed``.
Only successful episodes are kept unless ``--keep-failures``, trying further seeds (up to
``--extra-frac`` more) until ``--episodes`` are stored. Per demo the file holds robomimic's
``actions``, ``states``, ``rewards``, ``dones``, ``obs``/``next_obs`` (the four low-dim keys, plus
the two 84x84 cameras with ``--images``); a seeded ``mask/train|valid`` split; and ``data`` attrs
``expert`` (success rate, steps, seeds) and ``provenance``. The MuJoCo XML is the same for every
demo (built once from ``env_args``), so robomimic's per-demo ``model_file`` attribute (~40 KB,
most of a low-dim file) is stored only with ``--model-files`` (robomimic's playback tools read it).
``--zarr`` also writes the DP replay buffer (`robomimic_to_replay_buffer`) that configs train on.

    python scripts/make_robomimic_demos.py --task lift --episodes 100 \
        --out data/lift_demos.hdf5 --zarr data/lift_demos.zarr.zip
    python scripts/make_robomimic_demos.py --task can --episodes 100 \
        --out data/can_demos.hdf5 --zarr data/can_demos.zarr.zip
    python scripts/make_robomimic_demos.py --task square --episodes 100 \
        --out data/square_demos.hdf5 --zarr data/square_demos.zarr.zip

``--join A.hdf5 B.hdf5 ... --zarr OUT.zarr.zip`` runs no expert: it writes one replay buffer of
the demos of several files this script made (e.g. two processes over disjoint seed ranges, to
use two cores), in the order given, with each file's ``expert`` statistics, seeds and
provenance kept under ``parts``:

    python scripts/make_robomimic_demos.py --task square --episodes 150 --seed-start 0 \
        --extra-frac 0.2 --out runs/square_s0.hdf5      # and --seed-start 500 in a 2nd process
    python scripts/make_robomimic_demos.py --task square --join runs/square_s0.hdf5 \
        runs/square_s500.hdf5 --zarr data/square_demos.zarr.zip
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from envs import ROBOMIMIC_TASKS
from envs.robomimic import IMAGE_OBS_KEYS, LOWDIM_OBS_KEYS, RobomimicEnv
from envs.robomimic_expert import EXPERTS, make_expert, run_expert_episode
from picard_sampler.runinfo import provenance
from policy.data.robomimic_hdf5 import (
    RobomimicHDF5Writer,
    robomimic_to_replay_buffer,
    split_demos,
)

VERSIONED_PACKAGES = ("numpy", "h5py", "zarr", "robosuite", "mujoco", "gymnasium")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring for examples)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--task", choices=sorted(ROBOMIMIC_TASKS), required=True, help="robomimic task"
    )
    parser.add_argument("--episodes", type=int, default=100, help="demos to store")
    parser.add_argument("--out", type=Path, help="output .hdf5 file (not with --join)")
    parser.add_argument(
        "--join",
        type=Path,
        nargs="+",
        metavar="HDF5",
        help="no expert: write --zarr from the demos of these files (made by this script)",
    )
    parser.add_argument("--zarr", type=Path, help="also write a DP replay buffer (.zarr.zip)")
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
        help="store every attempted episode: exactly --episodes seeds",
    )
    parser.add_argument("--max-steps", type=int, default=400, help="episode step limit")
    parser.add_argument(
        "--diversity", type=float, default=0.5, help="expert randomisation per seed (0..1)"
    )
    parser.add_argument(
        "--valid-ratio", type=float, default=0.1, help="fraction of demos in mask/valid"
    )
    parser.add_argument(
        "--images", action="store_true", help="also store the two 84x84 camera observations"
    )
    parser.add_argument(
        "--model-files",
        action="store_true",
        help="store each demo's MuJoCo XML as robomimic's model_file attribute (+~40 KB/demo)",
    )
    args = parser.parse_args(argv)
    if args.episodes < 1:
        parser.error(f"--episodes must be >= 1, got {args.episodes}")
    if args.join is not None:
        if args.zarr is None or args.out is not None:
            parser.error("--join writes --zarr only: give --zarr and no --out")
        return args
    if args.out is None:
        parser.error("--out is required (unless --join)")
    if args.out.suffix not in (".hdf5", ".h5"):
        parser.error(f"--out must end in .hdf5 or .h5, got {args.out}")
    return args


def expert_statistics(outcomes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Success rate and mean steps over every attempted seed (the expert's quality)."""
    success = np.array([run["success"] for run in outcomes], dtype=bool)
    steps = np.array([run["n_steps"] for run in outcomes], dtype=float)
    return {
        "n_attempted": len(outcomes),
        "n_success": int(success.sum()),
        "success_rate": float(success.mean()),
        "mean_steps": float(steps.mean()),
        "mean_steps_successful": float(steps[success].mean()) if success.any() else None,
        "seeds_attempted": [run["seed"] for run in outcomes],
        "seeds_failed": [run["seed"] for run in outcomes if not run["success"]],
    }


def write_demos(args: argparse.Namespace, argv: Sequence[str]) -> tuple[int, dict[str, Any]]:
    """Run the expert over seeds, streaming kept demos into ``args.out``: (demos, stats)."""
    env_name = ROBOMIMIC_TASKS[args.task]
    env = RobomimicEnv(env_name, obs_type="image" if args.images else "lowdim")
    max_attempts = (
        args.episodes if args.keep_failures else math.ceil(args.episodes * (1 + args.extra_frac))
    )
    outcomes: list[dict[str, Any]] = []
    seeds: list[int] = []
    with (
        RobomimicHDF5Writer(args.out, env.env_meta) as writer,
        tqdm(total=args.episodes, desc=f"{args.task} demos", unit="ep") as bar,
    ):
        for seed in range(args.seed_start, args.seed_start + max_attempts):
            expert = make_expert(env_name, rng=seed, diversity=args.diversity)
            demo = run_expert_episode(env, expert, seed, args.max_steps)
            outcomes.append({"seed": seed, "success": demo["success"], "n_steps": demo["n_steps"]})
            if args.keep_failures or demo["success"]:
                if not args.model_files:
                    demo["model_file"] = None
                writer.add_demo(demo)
                seeds.append(seed)
                bar.update(1)
            n_success = sum(run["success"] for run in outcomes)
            bar.set_postfix(tried=len(outcomes), success_rate=f"{n_success / len(outcomes):.2f}")
            if writer.n_demos == args.episodes:
                break
        names = [f"demo_{i}" for i in range(writer.n_demos)]
        stats = expert_statistics(outcomes)
        writer.close(
            attrs={
                "task": args.task,
                "source": f"scripted expert: envs.robomimic_expert.{EXPERTS[env_name].__name__}",
                "only_successes": not args.keep_failures,
                "expert": stats,
                "demo_seeds": seeds,
                "provenance": provenance(argv, VERSIONED_PACKAGES),
            },
            mask=split_demos(names, args.valid_ratio, seed=args.seed_start),
        )
    env.close()
    return len(names), stats


def join_demos(paths: Sequence[Path], obs_keys: Sequence[str], argv: Sequence[str]) -> Any:
    """One replay buffer of the demos of ``paths`` in order; attrs: the first file's, with
    ``demo_seeds`` and ``demo_names`` over all, and per file its path, expert statistics, seeds
    and provenance under ``parts``."""
    buffers = [robomimic_to_replay_buffer(path, obs_keys) for path in paths]
    parts = [
        {
            "path": str(path),
            "n_demos": buffer.n_episodes,
            **{key: buffer.attrs.get(key) for key in ("expert", "demo_seeds", "provenance")},
        }
        for path, buffer in zip(paths, buffers, strict=True)
    ]
    joined = buffers[0]
    for buffer in buffers[1:]:
        for index in range(buffer.n_episodes):
            joined.add_episode(buffer.get_episode(index))
    joined.attrs.update(
        {
            "source": {"format": "robomimic_hdf5", "paths": [str(path) for path in paths]},
            "demo_names": [f"demo_{i}" for i in range(joined.n_episodes)],
            "demo_seeds": [seed for part in parts for seed in (part["demo_seeds"] or [])],
            "parts": parts,
            "provenance": provenance(list(argv), VERSIONED_PACKAGES),
        }
    )
    joined.attrs.pop("expert", None)
    return joined


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: write the hdf5 file and, with ``--zarr``, its replay-buffer copy (or,
    with ``--join``, one replay buffer of several files)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.join is not None:
        buffer = join_demos(args.join, LOWDIM_OBS_KEYS, argv)
        args.zarr.parent.mkdir(parents=True, exist_ok=True)
        buffer.save(args.zarr)
        print(f"wrote {buffer} to {args.zarr} ({args.zarr.stat().st_size / 1e6:.2f} MB)")
        return
    stored, stats = write_demos(args, argv)
    if stored < args.episodes:
        print(
            f"warning: only {stored} of {args.episodes} episodes succeeded within "
            f"{stats['n_attempted']} seeds; raise --extra-frac for more",
            file=sys.stderr,
        )
    print(
        f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): expert success rate "
        f"{stats['success_rate']:.3f} over {stats['n_attempted']} seeds, "
        f"mean steps {stats['mean_steps']:.1f}"
    )
    if args.zarr is not None:
        obs_keys = [*LOWDIM_OBS_KEYS, *(IMAGE_OBS_KEYS if args.images else ())]
        buffer = robomimic_to_replay_buffer(args.out, obs_keys)
        args.zarr.parent.mkdir(parents=True, exist_ok=True)
        buffer.save(args.zarr)
        print(f"wrote {buffer} to {args.zarr} ({args.zarr.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
