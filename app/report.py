"""What an evaluation leaves behind for people: results.json, plots, video, tables, wandb.

Every file is written atomically (policy.file_io.atomic_write); a sweep's jobs are summed up
in one table by `SweepSummary`, the Hydra callback registered in conf/eval.yaml and
conf/train.yaml, whatever launcher ran them (joblib, Ray, submitit). `python -m app.report
SWEEP_DIR` rebuilds that summary at any time from the jobs' own files: finished jobs, failed ones
(failed.json) and missing ones (expected from multirun.yaml but without results yet), so a sweep
submitted without waiting is summed up later and no finished job's row is ever lost. A sweep
over training seeds (and checkpoints) also gets Diffusion Policy's table: per seed the max and
the mean of the last k checkpoints' scores, across seeds their mean with a 95 % t-interval.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from app.run_dirs import FAILED_JOB_FILE
from policy.file_io import atomic_write

METRICS = (
    "mean_score", "success_rate", "mean_steps", "rounds_mean", "rounds_p95", "nfe",
    "converged_rate", "exact_err_max", "exact_err_mean", "latency_ms_p50", "latency_ms_p95",
    "latency_ms_p99", "sequential_ms_p50", "speedup_vs_sequential", "encode_ms_p50",
    "deadline_miss_rate", "anytime_rate", "held_step_rate",
    "boundary_jerk", "within_chunk_jerk",
)
"""The metrics every report shows (defined in docs/design.md §5), in table order."""


def write_text(path: Path, text: str) -> Path:
    """Write `text` to `path` atomically (the old file or the new one, never a torn one)."""
    return atomic_write(path, lambda f: f.write(text.encode()))


def write_results(path: Path, results: Mapping[str, Any]) -> Path:
    """Write the results record as indented JSON, atomically."""
    return write_text(path, json.dumps(results, indent=2) + "\n")


def _histogram(
    path: Path, values: Sequence[float], xlabel: str, title: str, bins: Any,
    marks: Mapping[str, float | None],
) -> Path:
    """One histogram PNG with labelled vertical lines at `marks` (Agg canvas, no pyplot)."""
    from matplotlib.figure import Figure  # here: 0.4 s to import, plots only

    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.subplots()
    ax.hist(values, bins=bins, color="tab:blue", alpha=0.8)
    for (label, x), color in zip(marks.items(), ("k", "tab:orange", "tab:red", "tab:purple"),
                                 strict=False):
        if x is not None:
            ax.axvline(x, color=color, linestyle="--", label=f"{label} {x:.4g}")
    if any(x is not None for x in marks.values()):
        ax.legend(fontsize=8)
    ax.set(xlabel=xlabel, ylabel="chunks", title=title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return path


def plot_histograms(
    out_dir: Path, rounds: Sequence[int], latency_ms: Sequence[float],
    metrics: Mapping[str, Any], deadline_ms: float | None, title: str,
) -> list[Path]:
    """latency_hist.png (timed chunks, p50/p95/p99 and the deadline) and rounds_hist.png (none
    when no chunk was sampled)."""
    if not rounds:
        return []
    marks = {f"p{q}": metrics[f"latency_ms_p{q}"] for q in (50, 95, 99)}
    return [
        _histogram(out_dir / "latency_hist.png", latency_ms, "latency per chunk (ms)", title, 30,
                   {**marks, "deadline": deadline_ms}),
        _histogram(out_dir / "rounds_hist.png", rounds, "rounds per chunk", title,
                   np.arange(min(rounds), max(rounds) + 2) - 0.5,
                   {"mean": metrics["rounds_mean"]}),
    ]


def save_video(frames: Sequence[np.ndarray], out_dir: Path, fps: int = 10) -> Path:
    """Episode 0 as episode_0.mp4 when imageio-ffmpeg is installed, else as a looping GIF."""
    if importlib.util.find_spec("imageio_ffmpeg") is not None:
        path, kwargs = out_dir / "episode_0.mp4", {"plugin": "FFMPEG", "fps": fps}
    else:
        path, kwargs = out_dir / "episode_0.gif", {"duration": 1000 / fps, "loop": 0}
    data = iio.imwrite("<bytes>", np.stack(frames), extension=path.suffix, **kwargs)
    atomic_write(path, lambda f: f.write(data))
    return path


def log_to_wandb(
    logger_cfg: DictConfig, out_dir: Path, results: Mapping[str, Any], images: Sequence[Path]
) -> None:
    """One wandb run (offline unless logger.mode says otherwise) with the metrics and plots."""
    import wandb

    run = wandb.init(
        project=logger_cfg.project, name=results["sampler"]["label"], dir=str(out_dir),
        mode=logger_cfg.mode, job_type="eval", config=results["config"],
    )
    metrics = {k: v for k, v in results["metrics"].items() if v is not None}
    run.log({**metrics, **{p.stem: wandb.Image(str(p)) for p in images}})
    run.summary.update(metrics)
    run.finish()


def _format(value: Any) -> str:
    """A table cell: '-' for None, 4 significant digits for floats."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_format(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def format_report(results: Mapping[str, Any]) -> str:
    """What a run prints at the end: what was evaluated, where and how, then the metric table."""
    info, seeds = results["run_info"], results["seeds"] or ["-"]
    realtime = results.get("realtime")
    clock = (
        f" | real time: {realtime['control_hz']:g} Hz, deadline {realtime['deadline_ms']:.4g} ms "
        f"({realtime['lead_steps']} ticks), {realtime['clock']} clock" if realtime else ""
    )
    interrupted = " (INTERRUPTED: finished episodes only)" if results.get("interrupted") else ""
    return "\n".join([
        f"{results['sampler']['label']} | {results['checkpoint']['path']} "
        f"(step {results['checkpoint']['step']}) | env {results['config']['env']['name']}{clock}",
        f"{results['n_episodes']} episodes{interrupted} (seeds {seeds[0]}..{seeds[-1]}, noise_seed "
        f"{results['noise_seed']}) | {info['device']} ({info['device_name']}), threads "
        f"{info['threads']}, torch {info['versions']['torch']}",
        markdown_table(("metric", "value"), [(k, results["metrics"].get(k)) for k in METRICS]),
        *speedup_lines(results),
    ])


def speedup_lines(results: Mapping[str, Any]) -> list[str]:
    """The line saying what the sampler bought over sequential sampling in this run (measured
    on the exactness check's chunks) and what that check cost; none when it was not measured."""
    metrics = results["metrics"]
    speedup = metrics.get("speedup_vs_sequential")
    if speedup is None:
        return []
    checks = metrics.get("n_exact_err_chunks") or 0
    choice = results.get("sampler_choice")
    name = f"auto ({choice['candidate']})" if choice else results["sampler"]["label"]
    cost = metrics.get("exact_check_s")
    spent = f"; the {checks} checks took {cost:.1f} s of the run" if cost is not None else ""
    return [f"{name}: {speedup:.2f}x sequential sampling, measured in this run on its "
            f"exactness-checked chunks after warm-up ({metrics['sequential_ms_p50']:.0f} ms "
            f"sequential vs {metrics['sequential_ms_p50'] / speedup:.0f} ms, p50){spent}"]


def _job_number(job_dir: Path | str) -> tuple[int, str]:
    """Sort key of a sweep's job dirs: numeric names (Hydra's job numbers) in numeric order."""
    name = job_dir if isinstance(job_dir, str) else job_dir.name
    return (int(name) if name.isdigit() else -1, name)


TRAIN_SUMMARY, EVAL_SCORES, TRAIN_POINTER = (
    "train_summary.json", "eval_scores.json", "train_run.json")
"""A training job's files (app.training, train_pcm.py): its summary when it ends, its rollout
scores (best, last k), and in its job folder the run dir it trained into when run_dir= moved
it."""
DEFAULT_LAST_K = 10
"""Diffusion Policy's k: the mean over the last 10 checkpoints (when no run says its own)."""


def _read_json(path: Path) -> tuple[Any, str | None]:
    """(the JSON in `path`, None) or (None, why it cannot be read)."""
    try:
        return json.loads(path.read_text()), None
    except (OSError, ValueError) as e:
        return None, f"{path.name} unreadable ({type(e).__name__})"


@dataclass
class Job:
    """One job of a sweep as its files tell it: `kind` eval or train (None: nothing written),
    `status` ok / interrupted / stopped / FAILED: ... / MISSING: ... / UNREADABLE: ..."""

    name: str
    overrides: list[str]
    status: str
    kind: str | None = None
    results: dict[str, Any] = field(default_factory=dict)  # eval: results.json
    training: dict[str, Any] = field(default_factory=dict)  # train: summary + scores


def expected_jobs(sweep_dir: Path) -> dict[str, list[str]]:
    """{job folder: overrides} of every job the sweep launches, from its multirun.yaml as
    Hydra's basic sweeper expands it (hydra.sweeper.params, then the command line's sweeps, in
    job-number order); empty when there is no readable multirun.yaml, another sweeper, or job
    folders not named by job number."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        config = yaml.safe_load((sweep_dir / "multirun.yaml").read_text())
        hydra = config["hydra"]
        if str(hydra["sweep"]["subdir"]) != "${hydra.job.num}":
            return {}
        if "basic_sweeper" not in str(hydra["sweeper"].get("_target_", "basic_sweeper")):
            return {}
        params = [f"{k}={v}" for k, v in (hydra["sweeper"].get("params") or {}).items()]
        task = [*params, *hydra["overrides"]["task"]]
        parsed = OverridesParser.create().parse_overrides(task)
        combos = BasicSweeper.split_arguments(parsed, None)[0]
    except Exception:  # absent, torn or foreign: the job folders alone tell the sweep
        return {}
    return {str(i): list(combo) for i, combo in enumerate(combos)}


def sweep_kind(sweep_dir: Path) -> str | None:
    """'train' for a train_pcm.py sweep, 'eval' for an eval_policy.py one (multirun.yaml's
    job name), None when unknown."""
    try:
        name = yaml.safe_load((sweep_dir / "multirun.yaml").read_text())["hydra"]["job"]["name"]
    except Exception:  # absent or foreign
        return None
    return {"train_pcm": "train", "eval_policy": "eval"}.get(name)


def read_job(job_dir: Path, expected: list[str] | None) -> Job:
    """What the files of one job folder say (it may not exist yet)."""
    name = job_dir.name
    try:
        overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())
    except (OSError, yaml.YAMLError):
        overrides = None
    overrides = [str(o) for o in (overrides or expected or [])]
    if (job_dir / "results.json").is_file():
        results, why = _read_json(job_dir / "results.json")
        if why:
            return Job(name, overrides, f"UNREADABLE: {why}", "eval")
        status = "interrupted" if results.get("interrupted") else "ok"
        return Job(name, list(results.get("overrides", overrides)), status, "eval", results)
    if (job_dir / FAILED_JOB_FILE).is_file():
        failed, why = _read_json(job_dir / FAILED_JOB_FILE)
        if why:
            return Job(name, overrides, f"FAILED: {why}")
        return Job(name, list(failed.get("overrides", overrides)),
                   f"FAILED: {failed.get('error')}")
    run_dir = job_dir
    pointer, _ = _read_json(job_dir / TRAIN_POINTER)
    if isinstance(pointer, dict) and pointer.get("run_dir"):
        run_dir = Path(pointer["run_dir"])
    scores, _ = _read_json(run_dir / EVAL_SCORES)
    if (run_dir / TRAIN_SUMMARY).is_file():
        summary, why = _read_json(run_dir / TRAIN_SUMMARY)
        if why:
            return Job(name, overrides, f"UNREADABLE: {why}", "train")
        status = (f"stopped at step {summary.get('step')}" if summary.get("stopped_early")
                  else "ok")
        return Job(name, overrides, status, "train",
                   training={"summary": summary, "scores": scores or {}, "run_dir": run_dir})
    if not job_dir.is_dir():
        return Job(name, overrides, "MISSING: not started")
    kind = "train" if (run_dir / "latest.ckpt").is_file() or scores else None
    return Job(name, overrides, "MISSING: started, no results yet (running, or killed)", kind,
               training={"scores": scores or {}, "run_dir": run_dir} if kind else {})


def sweep_jobs(sweep_dir: Path, not_started: bool = True) -> list[Job]:
    """Every job of the sweep in job order: each job folder (hidden ones, e.g. submitit's
    .submitit, are a launcher's) and, with `not_started`, each job multirun.yaml expects that
    has no folder yet."""
    expected = expected_jobs(sweep_dir)
    folders = {p.name for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")}
    names = folders | set(expected) if not_started else folders
    return [read_job(sweep_dir / name, expected.get(name))
            for name in sorted(names, key=_job_number)]


def _shown_overrides(jobs: Sequence[Job]) -> dict[str, str]:
    """{job: its overrides that not every job shares}."""
    shared = set.intersection(*(set(j.overrides) for j in jobs)) if jobs else set()
    return {j.name: " ".join(o for o in j.overrides if o not in shared) for j in jobs}


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A CSV table, atomically (None as an empty cell)."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    write_text(path, text.getvalue())


TRAIN_COLUMNS = ("job", "overrides", "status", "seed", "world_size", "step", "best_score",
                 "best_step", "last_k", "last_mean_score", "train/loss", "val/loss")
"""The columns of a training sweep's table."""


def write_sweep_summary(sweep_dir: Path, last_k: int | None = None,
                        not_started: bool = False) -> str:
    """One table over every job of `sweep_dir`: summary.md and summary.csv (eval jobs: their
    metrics; training jobs: their scores and losses); failed jobs say why and missing ones
    (expected from multirun.yaml, or started without results) say so. A sweep over training
    seeds or over checkpoints of several runs also gets the seed table (`seed_table`) in
    summary.md and summary_seeds.csv. The overrides column shows only the overrides that
    differ between jobs; `not_started` also lists the jobs that have no folder yet (what
    `python -m app.report` and the end of a sweep show; a sweep stopped by a signal lists the
    jobs it ran). Returns the markdown tables."""
    jobs = sweep_jobs(sweep_dir, not_started)
    kind = sweep_kind(sweep_dir) or (
        "train" if any(j.kind == "train" for j in jobs)
        and not any(j.kind == "eval" for j in jobs) else "eval")
    shown = _shown_overrides(jobs)
    if kind == "eval":
        header = ("job", "overrides", "status", "sampler", "n_episodes", *METRICS)
        rows = [[j.name, shown[j.name], j.status, j.results.get("sampler", {}).get("label"),
                 j.results.get("n_episodes"),
                 *(j.results.get("metrics", {}).get(k) for k in METRICS)] for j in jobs]
    else:
        header = TRAIN_COLUMNS
        rows = []
        for j in jobs:
            summary = j.training.get("summary", {})
            scores = j.training.get("scores", {})
            best = scores.get("best") or {}
            rows.append([
                j.name, shown[j.name], j.status, summary.get("seed", scores.get("seed")),
                summary.get("world_size", scores.get("world_size")), summary.get("step"),
                best.get("mean_score"), best.get("step"), len(scores.get("last", [])) or None,
                scores.get("last_mean_score"), summary.get("train/loss"),
                summary.get("val/loss"),
            ])
    _write_csv(sweep_dir / "summary.csv", header, rows)
    table = markdown_table(header, rows)
    text = f"# Sweep {sweep_dir}\n\n{table}\n"
    seeds = seed_rows(jobs, shown, last_k)
    if seeds:
        seed_header = ("configuration", "seed", "max", "last_k", "mean_last_k")
        rows = seed_table(seeds)
        _write_csv(sweep_dir / "summary_seeds.csv", seed_header, rows)
        seed_md = markdown_table(seed_header, rows)
        text += (f"\n## Seeds: max and mean of the last k checkpoints' scores\n\nPer seed, "
                 f"and across seeds their mean ± the half-width of a 95 % t-interval "
                 f"(Diffusion Policy's table).\n\n{seed_md}\n")
        table += f"\n\n{seed_md}"
    write_text(sweep_dir / "summary.md", text)
    return table


@dataclass
class SeedScores:
    """The evaluated checkpoints of one training seed: (step, mean_score) in step order, the
    max over all of them (`best`, which may come from checkpoints no longer listed) and k."""

    configuration: str
    seed: str
    scores: list[tuple[int, float]]
    k: int
    best: float | None = None

    @property
    def max(self) -> float:
        """The best score of any evaluated checkpoint of the seed."""
        listed = max(score for _, score in self.scores)
        return listed if self.best is None else max(self.best, listed)

    @property
    def mean_last_k(self) -> float:
        """The mean score of the seed's last k evaluated checkpoints."""
        return statistics.fmean(score for _, score in self.scores[-self.k :])


def seed_rows(jobs: Sequence[Job], shown: Mapping[str, str], last_k: int | None
              ) -> list[SeedScores]:
    """The seeds of a sweep: each finished training job is a seed (its eval_scores.json), its
    configuration the overrides that differ between jobs less seed=; or, in an eval sweep over
    checkpoints, each training run folder of the checkpoints is a seed (its checkpoints' scores
    by step), its configuration the differing overrides less checkpoint=. Empty otherwise."""
    def configuration(job: Job, drop: str) -> str:
        return " ".join(o for o in shown[job.name].split() if not o.startswith(drop)) or "-"

    found: list[SeedScores] = []
    for job in jobs:
        scores = job.training.get("scores") or {}
        if job.kind != "train" or job.status != "ok" or not scores.get("last"):
            continue
        found.append(SeedScores(
            configuration(job, "seed="), str(scores.get("seed", job.name)),
            [(int(e["step"]), float(e["mean_score"])) for e in scores["last"]],
            last_k or int(scores.get("keep_last", DEFAULT_LAST_K)),
            (scores.get("best") or {}).get("mean_score")))
    if found:
        return found
    evals = [j for j in jobs if j.kind == "eval" and j.status == "ok"
             and any(o.startswith("checkpoint=") for o in shown[j.name].split())]
    groups: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for job in evals:
        checkpoint = job.results.get("checkpoint", {})
        score = job.results.get("metrics", {}).get("mean_score")
        if checkpoint.get("step") is None or score is None:
            continue
        run = str(Path(checkpoint.get("path", "")).parent)
        groups.setdefault((configuration(job, "checkpoint="), run), []).append(
            (int(checkpoint["step"]), float(score)))
    for (config, run), scores in groups.items():
        recorded, _ = _read_json(Path(run) / EVAL_SCORES)
        recorded = recorded if isinstance(recorded, dict) else {}
        seed = f"{recorded['seed']} ({run})" if "seed" in recorded else run
        found.append(SeedScores(config, seed, sorted(scores),
                                last_k or int(recorded.get("keep_last", DEFAULT_LAST_K))))
    return found


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom (bisection on its CDF, the
    regularized incomplete beta function by Lentz's continued fraction)."""
    def beta_cf(a: float, b: float, x: float) -> float:
        tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
        d = 1.0 / (d if abs(d) > tiny else tiny)
        h = d
        for m in range(1, 300):
            for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                              -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
                d = 1.0 + numerator * d
                d = 1.0 / (d if abs(d) > tiny else tiny)
                c = 1.0 + numerator / c
                c = c if abs(c) > tiny else tiny
                h *= d * c
            if abs(d * c - 1.0) < 1e-15:
                break
        return h

    def cdf(t: float) -> float:
        x = df / (df + t * t)
        a, b = df / 2.0, 0.5
        front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                         + a * math.log(x) + b * math.log1p(-x)) if 0 < x < 1 else 0.0
        tail = 0.5 * (front * beta_cf(a, b, x) / a if x < (a + 1) / (a + b + 2)
                      else 1.0 - front * beta_cf(b, a, 1.0 - x) / b)
        return 1.0 - tail if t > 0 else tail

    if not 0.5 <= p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 <= p < 1 and df >= 1; got p={p}, df={df}")
    low, high = 0.0, 1.0
    while cdf(high) < p:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if cdf(mid) < p else (low, mid)
    return 0.5 * (low + high)


def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float | None]:
    """(mean, half-width of its `level` t-interval over the values; None for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    half = t_quantile(0.5 + level / 2, len(values) - 1) * statistics.stdev(values)
    return mean, half / math.sqrt(len(values))


def _with_interval(mean: float, half: float | None) -> str:
    return f"{mean:.4g}" if half is None else f"{mean:.4g} ± {half:.2g}"


def seed_table(seeds: Sequence[SeedScores]) -> list[list[Any]]:
    """Diffusion Policy's table: per seed the max and the mean of its last k checkpoints'
    scores, then per configuration one 'all N seeds' row with the mean of each over the seeds
    ± the half-width of its 95 % t-interval."""
    rows: list[list[Any]] = []
    configurations = sorted({s.configuration for s in seeds})
    for config in configurations:
        group = [s for s in seeds if s.configuration == config]
        for s in group:
            rows.append([config, s.seed, s.max, min(s.k, len(s.scores)), s.mean_last_k])
        rows.append([config, f"all {len(group)} seeds",
                     _with_interval(*mean_interval([s.max for s in group])),
                     min(min(s.k, len(s.scores)) for s in group),
                     _with_interval(*mean_interval([s.mean_last_k for s in group]))])
    return rows


def failed_jobs(sweep_dir: Path) -> list[str]:
    """The job folders of a sweep that hold a FAILED_JOB_FILE."""
    return sorted(p.parent.name for p in sweep_dir.glob(f"*/{FAILED_JOB_FILE}"))


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, print and write the sweep's summary table;
    exit with status 1 when a job failed (after the table is written). The launcher does not
    matter: the table is read from the job folders."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        table = write_sweep_summary(sweep_dir, not_started=True)
        print(f"sweep summary: {sweep_dir / 'summary.md'}\n{table}")
        failed = failed_jobs(sweep_dir)
        if failed:
            sys.exit(f"{len(failed)} job(s) failed: {', '.join(failed)} (see their "
                     f"{FAILED_JOB_FILE})")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m app.report SWEEP_DIR [--last-k K]`: (re)write the sweep's summary from its
    jobs' files and print it with a count of finished, failed and missing jobs; exit status 1
    when a job failed, 0 otherwise (missing jobs may still be running)."""
    parser = argparse.ArgumentParser(prog="python -m app.report", description=main.__doc__)
    parser.add_argument("sweep_dir", type=Path, help="a multirun's sweep dir")
    parser.add_argument("--last-k", type=int, default=None,
                        help="k of the seed table (default: each run's eval.keep_last, or 10)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        sys.exit(f"error: {args.sweep_dir} is not a folder (pass a sweep dir: the one that holds "
                 "multirun.yaml and the job folders)")
    if args.last_k is not None and args.last_k < 1:
        sys.exit(f"error: --last-k must be >= 1; got {args.last_k}")
    table = write_sweep_summary(args.sweep_dir, args.last_k, not_started=True)
    jobs = sweep_jobs(args.sweep_dir)
    counts = {label: sum(j.status.startswith(prefix) for j in jobs) for label, prefix in
              (("failed", "FAILED"), ("missing", "MISSING"), ("unreadable", "UNREADABLE"))}
    finished = len(jobs) - sum(counts.values())
    print(f"sweep summary: {args.sweep_dir / 'summary.md'}\n{table}\n{finished} finished, "
          + ", ".join(f"{n} {label}" for label, n in counts.items()))
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
