"""Diffusion Policy's table for our policies: per task, the max and the mean of the last k
evaluated checkpoints' scores (per training seed, then the mean over seeds ± a 95 % t-interval),
next to the numbers Diffusion Policy published for the same task (state-based policies, max /
mean of the last 10 checkpoints, 3 training seeds, 50 test initial states).

    python -m app.policy_table                       # the shipped policies (see below)
    python -m app.policy_table /work/runs/square_300 /work/runs/can_long   # training runs
    python -m app.policy_table RUN_A RUN_B --last-k 5 --out table.md

Each path is one of:
- a training run dir: its ``eval_scores.json`` (written by train_pcm.py every ``eval.every``
  steps: the last ``eval.keep_last`` rollout scores and the best), its task and rollout sampler
  from ``.hydra/config.yaml`` (``env.name``, ``eval.sampler``); runs with the same task and run
  ``name`` are seeds of one configuration (one row, plus a row per seed when there are several).
  A shipped checkpoint folder that keeps its training run's ``eval_scores.json`` beside the
  exported ``config.yaml`` (the run's resolved config) reads the same way;
- a sweep dir (``train_pcm.py -m seed=...``): each job folder with an ``eval_scores.json``;
- an eval_policy.py ``results.json`` (or a copy in bench/results): one checkpoint's score, so max
  and mean are that score (what a shipped policy measured once is).

The score is ``mean_score``: the mean over episodes of the episode's best reward, which for the
robomimic tasks (reward 1 on success) is the success rate and for PushT Diffusion Policy's
coverage score. Reads JSON and YAML only (no torch).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from app.report import DEFAULT_LAST_K, SeedScores, markdown_table, mean_interval

EVAL_SCORES = "eval_scores.json"
"""What train_pcm.py's periodic rollouts write into the run dir (app.training.EVAL_SCORES)."""

DP_PUBLISHED: dict[str, tuple[float, float, str]] = {
    "pusht_lowdim": (0.95, 0.91, "state, ph"),
    "pusht_image": (0.91, 0.84, "image, ph"),
    "lift_lowdim": (1.00, 0.98, "state, ph"),
    "can_lowdim": (1.00, 0.96, "state, ph"),
    "square_lowdim": (1.00, 0.93, "state, ph"),
}
"""Diffusion Policy's published (max, mean of the last 10 checkpoints) per task: DP paper,
CNN-based policy, averaged over 3 training seeds and 50 test initial states (PushT image:
our docs/results/policies.md's PushT image section). Their robomimic numbers are on proficient
human (ph) demonstrations; ours on scripted-expert ones."""

SHIPPED_RESULTS = {
    "pusht_lowdim": "bench/results/pusht_policy_sequential_ddpm100.json",
    "lift_lowdim": "bench/results/lift_policy_sequential.json",
    "can_lowdim": "bench/results/can_300_policy_sequential_ddpm100.json",
    "square_lowdim": "bench/results/square_300_policy_sequential_ddpm100.json",
    "pusht_image": "bench/results/pusht_image_policy_sequential_ddpm100.json",
}
"""The sequential DDPM-100 result files of the shipped policies (the default table, with every
shipped checkpoint folder that keeps its training run's rollout scores: SHIPPED_TRAINING_RUNS)."""

SHIPPED_TRAINING_RUNS = "checkpoints/*/" + EVAL_SCORES
"""Shipped policies whose training evaluated checkpoints in DP's way keep that record here."""


@dataclass
class Source:
    """One configuration's seeds for one task: where they came from and their scores."""

    task: str
    label: str
    seeds: list[SeedScores]
    n_episodes: int | None
    sampler: str = "?"


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read it as JSON ({e})") from e


def sampler_label(config: Any) -> str:
    """'sequential DDPM-100' and the like from a sampler config (Hydra's or a results file's)."""
    if not isinstance(config, dict):
        return "?"
    if config.get("label"):
        return str(config["label"])
    schedule = config.get("schedule") or {}
    kind = str(schedule.get("_target_") or schedule.get("class") or "?").rsplit(".", 1)[-1]
    kind = kind.removesuffix("Schedule").upper()
    return f"{config.get('method', '?')} {kind}-{schedule.get('num_inference_steps', '?')}"


def _run_config(run_dir: Path) -> dict[str, Any]:
    """A run dir's resolved config: Hydra's record, or the `config.yaml` an export wrote."""
    for config in (run_dir / ".hydra" / "config.yaml", run_dir / "config.yaml"):
        if config.is_file():
            try:
                loaded = yaml.safe_load(config.read_text())
            except yaml.YAMLError as e:
                raise ValueError(f"{config}: not readable YAML ({e})") from e
            return loaded if isinstance(loaded, dict) else {}
    return {}


def _run_task(config: dict[str, Any], run_dir: Path, scores: dict[str, Any]) -> str:
    """The env name of a training run: its Hydra config's env.name, else its run name."""
    env = config.get("env") or {}
    if isinstance(env, dict) and env.get("name"):
        return str(env["name"])
    name = str(scores.get("name", run_dir.name))
    return next((task for task in DP_PUBLISHED if task in name), name)


def _shown(path: Path | str) -> str:
    """`path` relative to the working directory when it is under it."""
    try:
        return Path(path).resolve().relative_to(Path.cwd()).as_posix()
    except ValueError:
        return str(path)


def run_seed(run_dir: Path, last_k: int | None) -> tuple[str, str, SeedScores, Source]:
    """(task, run name, its SeedScores, an empty Source for it) of a training run dir."""
    scores = _read(run_dir / EVAL_SCORES)
    last = scores.get("last") or []
    if not last:
        raise ValueError(f"{run_dir / EVAL_SCORES} lists no evaluated checkpoint yet")
    seed = SeedScores(
        configuration=str(scores.get("name", run_dir.name)),
        seed=f"{scores.get('seed', '?')} ({run_dir})",
        scores=[(int(e["step"]), float(e["mean_score"])) for e in last],
        k=last_k or int(scores.get("keep_last") or DEFAULT_LAST_K),
        best=(scores.get("best") or {}).get("mean_score"),
    )
    config = _run_config(run_dir)
    task = _run_task(config, run_dir, scores)
    sampler = sampler_label((config.get("eval") or {}).get("sampler"))
    return (
        task,
        seed.configuration,
        seed,
        Source(task, f"{seed.configuration} (training rollouts)", [], scores.get("n_episodes"),
               sampler),
    )


def result_source(path: Path) -> Source:
    """One checkpoint's eval_policy.py results.json as a one-seed, one-checkpoint source."""
    results = _read(path)
    config = results.get("config") or {}
    env = config.get("env") or {}
    task = str(env.get("name")) if isinstance(env, dict) and env.get("name") else path.stem
    checkpoint = results.get("checkpoint") or {}
    score = float(results["metrics"]["mean_score"])
    step = int(checkpoint.get("step") or 0)
    seed = SeedScores(str(path), str(checkpoint.get("path", "?")), [(step, score)], 1)
    label = f"{checkpoint.get('path', path)} (step {step}; {_shown(path)})"
    sampler = sampler_label(results.get("sampler") or config.get("sampler"))
    return Source(task, label, [seed], results.get("n_episodes"), sampler)


def sources(paths: Sequence[Path], last_k: int | None) -> list[Source]:
    """The table's sources: result files as they are, training runs grouped by (task, name)."""
    found: list[Source] = []
    runs: dict[tuple[str, str], Source] = {}
    for path in paths:
        if path.is_file():
            found.append(result_source(path))
            continue
        if not path.is_dir():
            raise ValueError(f"{path}: no such file or directory")
        run_dirs = (
            [path]
            if (path / EVAL_SCORES).is_file()
            else sorted(p.parent for p in path.glob(f"*/{EVAL_SCORES}"))
        )
        if not run_dirs:
            raise ValueError(f"{path}: no {EVAL_SCORES} in it or in its job folders")
        for run_dir in run_dirs:
            task, name, seed, empty = run_seed(run_dir, last_k)
            runs.setdefault((task, name), empty).seeds.append(seed)
    return found + list(runs.values())


def _fmt(mean: float, half: float | None) -> str:
    return f"{mean:.3f}" if half is None else f"{mean:.3f} ± {half:.3f}"


def table_rows(found: Sequence[Source]) -> list[list[Any]]:
    """Per source (task order of `DP_PUBLISHED`): a row per seed when there are several, then
    the row over its seeds, with DP's published max / mean of the task."""
    order = {task: i for i, task in enumerate(DP_PUBLISHED)}
    rows = []
    for source in sorted(found, key=lambda s: (order.get(s.task, len(order)), s.task)):
        dp = DP_PUBLISHED.get(source.task)
        dp_cell = f"{dp[0]:.2f} / {dp[1]:.2f}" if dp else "-"
        episodes = source.n_episodes if source.n_episodes is not None else "?"
        if len(source.seeds) > 1:
            for seed in source.seeds:
                k = min(seed.k, len(seed.scores))
                rows.append(
                    [
                        source.task,
                        f"{source.label}, seed {seed.seed}",
                        source.sampler,
                        1,
                        k,
                        episodes,
                        f"{seed.max:.3f}",
                        f"{seed.mean_last_k:.3f}",
                        dp_cell,
                    ]
                )
        k = min(min(s.k, len(s.scores)) for s in source.seeds)
        rows.append(
            [
                source.task,
                source.label,
                source.sampler,
                len(source.seeds),
                k,
                episodes,
                _fmt(*mean_interval([s.max for s in source.seeds])),
                _fmt(*mean_interval([s.mean_last_k for s in source.seeds])),
                dp_cell,
            ]
        )
    return rows


HEADER = (
    "task",
    "policy (run / checkpoint)",
    "sampler",
    "seeds",
    "checkpoints (last k)",
    "episodes / eval",
    "max",
    "mean of last k",
    "DP max / mean",
)


def main(argv: Sequence[str] | None = None) -> int:
    """Print (and with --out write) the table; exit 1 with one line on an unreadable path."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "paths",
        nargs="*",
        type=Path,
        help="training run dirs, sweep dirs or eval results.json files "
        "(default: the shipped policies' sequential DDPM-100 results)",
    )
    parser.add_argument(
        "--last-k",
        type=int,
        default=None,
        help=f"checkpoints in the mean (default: each run's eval.keep_last, {DEFAULT_LAST_K})",
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=Path(__file__).resolve().parents[1],
        help="repository root for the default result files",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    if args.last_k is not None and args.last_k < 1:
        parser.error(f"--last-k must be >= 1; got {args.last_k}")
    paths = args.paths or [
        *(args.root / p for p in SHIPPED_RESULTS.values()),
        *sorted(p.parent for p in args.root.glob(SHIPPED_TRAINING_RUNS)),
    ]
    try:
        text = markdown_table(HEADER, table_rows(sources(paths, args.last_k)))
    except (ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
