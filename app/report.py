"""What an evaluation leaves behind for people: results.json, plots, video, tables, wandb.

Every file is written atomically (policy.checkpoint.atomic_write); a sweep's jobs are summed up
in one table by `SweepSummary`, the Hydra callback registered in conf/eval.yaml.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
from hydra.experimental.callback import Callback
from matplotlib.figure import Figure
from omegaconf import DictConfig

from app.config import FAILED_JOB_FILE
from policy.checkpoint import atomic_write

METRICS = (
    "mean_score", "success_rate", "mean_steps", "rounds_mean", "rounds_p95", "nfe",
    "converged_rate", "exact_err_max", "exact_err_mean", "latency_ms_p50", "latency_ms_p95",
    "latency_ms_p99", "encode_ms_p50", "deadline_miss_rate", "anytime_rate", "held_step_rate",
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
    ])


def _job_number(job_dir: Path) -> tuple[int, str]:
    """Sort key of a sweep's job dirs: numeric names (Hydra's job numbers) in numeric order."""
    return (int(job_dir.name) if job_dir.name.isdigit() else -1, job_dir.name)


def write_sweep_summary(sweep_dir: Path) -> str:
    """One table over every job's results.json in `sweep_dir`: summary.md and summary.csv.

    The overrides column shows only the overrides that differ between jobs."""
    jobs = []
    for job_dir in sorted((p for p in sweep_dir.iterdir() if p.is_dir()), key=_job_number):
        if (job_dir / "results.json").is_file():
            jobs.append((job_dir.name, json.loads((job_dir / "results.json").read_text())))
        elif (job_dir / FAILED_JOB_FILE).is_file():
            failed = json.loads((job_dir / FAILED_JOB_FILE).read_text())
            jobs.append((job_dir.name, {"overrides": failed["overrides"], "metrics": {},
                                        "status": f"FAILED: {failed['error']}"}))
    shared = set.intersection(*(set(r["overrides"]) for _, r in jobs)) if jobs else set()
    header = ("job", "overrides", "status", "sampler", "n_episodes", *METRICS)
    rows = [
        [name, " ".join(o for o in r["overrides"] if o not in shared),
         r.get("status", "interrupted" if r.get("interrupted") else "ok"),
         r.get("sampler", {}).get("label"), r.get("n_episodes"),
         *(r["metrics"].get(k) for k in METRICS)]
        for name, r in jobs
    ]
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    write_text(sweep_dir / "summary.csv", text.getvalue())
    table = markdown_table(header, rows)
    write_text(sweep_dir / "summary.md", f"# Sweep {sweep_dir}\n\n{table}\n")
    return table


def failed_jobs(sweep_dir: Path) -> list[str]:
    """The job folders of a sweep that hold a FAILED_JOB_FILE."""
    return sorted(p.parent.name for p in sweep_dir.glob(f"*/{FAILED_JOB_FILE}"))


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, print and write the sweep's summary table;
    exit with status 1 when a job failed (after the table is written)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        print(f"sweep summary: {sweep_dir / 'summary.md'}\n{write_sweep_summary(sweep_dir)}")
        failed = failed_jobs(sweep_dir)
        if failed:
            sys.exit(f"{len(failed)} job(s) failed: {', '.join(failed)} (see their "
                     f"{FAILED_JOB_FILE})")
