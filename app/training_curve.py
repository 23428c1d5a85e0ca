"""A training run's curve: train and validation loss, and rollout scores, against the step.

train_pcm.py redraws `curve.png` in its run dir after every validation or rollout, from the
run's own `metrics.jsonl` (which a resumed run trims back to its checkpoint, so each step
appears once); a shipped checkpoint's card shows the same plot. Rebuild it at any time:

    python -m app.training_curve RUN_DIR [--out curve.png] [--json curve.json] [--mark STEP]

`--json` also writes the plotted points (the validation losses and the rollout scores), the
numbers behind the picture for a card or a comparison.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from policy.file_io import atomic_write

METRICS_FILE = "metrics.jsonl"
"""What app.training.MetricLogger appends to, one JSON object per logged step."""
CURVE_FILE = "curve.png"


def parse_metrics_line(line: str) -> tuple[int, dict[str, Any]] | None:
    """(step, record) of one metrics.jsonl line; None for a torn or foreign line (a run killed
    mid-write leaves at most one)."""
    try:
        record = json.loads(line)
        return int(record["step"]), record
    except (ValueError, KeyError, TypeError):
        return None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The run's logged steps in step order, the last line winning for a repeated step; torn or
    foreign lines are skipped."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise ValueError(f"{run_dir}: no {METRICS_FILE} (not a train_pcm.py run dir?)")
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        parsed = parse_metrics_line(line)
        if parsed is not None:
            by_step[parsed[0]] = parsed[1]
    if not by_step:
        raise ValueError(f"{path} holds no logged step yet")
    return [by_step[step] for step in sorted(by_step)]


def series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that logged `key`; a value that is not a number is a
    ValueError naming the step and key."""
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if value is None:
            continue
        try:
            values.append(float(value))
        except (TypeError, ValueError):
            raise ValueError(f"{METRICS_FILE} step {record['step']}: {key} is {value!r}, not a "
                             "number") from None
        steps.append(record["step"])
    return steps, values


def curve_points(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The plotted evaluation points: validation loss and rollout scores by step."""
    points: dict[str, Any] = {}
    for key in ("val/loss", "eval/mean_score", "eval/success_rate"):
        steps, values = series(records, key)
        if steps:
            points[key] = {"step": steps, "value": values}
    return points


def draw_curve(records: Sequence[dict[str, Any]], title: str, mark: int | None = None) -> bytes:
    """A PNG: losses (log scale) on the left, rollout scores on the right (when there are any);
    `mark` draws a dashed line at that step (e.g. the checkpoint a card ships) on each."""
    scores = [series(records, k) for k in ("eval/mean_score", "eval/success_rate")]
    from matplotlib.figure import Figure  # here: 0.4 s to import, plots only

    fig = Figure(figsize=(11 if scores[0][0] else 6, 3.8), layout="constrained")
    axes = fig.subplots(1, 2 if scores[0][0] else 1, squeeze=False)[0]
    for key, style in (("train/loss", "-"), ("val/loss", "o-")):
        steps, values = series(records, key)
        if steps:
            axes[0].plot(steps, values, style, markersize=3, label=key)
    axes[0].set(xlabel="step", ylabel="loss", yscale="log", title=title)
    axes[0].legend(fontsize=8)
    if scores[0][0]:
        for (steps, values), label in zip(scores, ("mean_score", "success_rate"), strict=True):
            if steps:
                axes[1].plot(steps, values, "o-", markersize=4, label=label)
        episodes = series(records, "eval/n_episodes")[1]
        shown = f" ({int(episodes[-1])} episodes each)" if episodes else ""
        axes[1].set(xlabel="step", ylabel="rollouts (EMA policy)", ylim=(0, 1.02),
                    title=f"periodic rollouts{shown}")
        axes[1].grid(alpha=0.3)
        axes[1].legend(fontsize=8)
    if mark is not None:
        for ax in axes:
            ax.axvline(mark, color="k", linestyle="--", linewidth=1, label=f"step {mark}")
            ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def write_curve(run_dir: Path, out: Path | None = None, title: str | None = None,
                points_json: Path | None = None, mark: int | None = None) -> Path:
    """Draw the run's curve to `out` (default RUN_DIR/curve.png), atomically; optionally the
    plotted points to `points_json` and a line at step `mark`."""
    records = read_metrics(run_dir)
    out = out or run_dir / CURVE_FILE
    try:
        png = draw_curve(records, title or run_dir.name, mark)
    except ValueError as error:  # a value that is not a number: name the run dir too
        raise ValueError(f"{run_dir}: {error}") from None
    atomic_write(out, lambda f: f.write(png))
    if points_json is not None:
        record = {"run_dir": str(run_dir), **curve_points(records)}
        text = "{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}"
                                   for k, v in record.items()) + "\n}\n"
        atomic_write(points_json, lambda f: f.write(text.encode()))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a train_pcm.py run dir (has metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write "
                        "(default: RUN_DIR/curve.png)")
    parser.add_argument("--json", type=Path, default=None, help="also write the plotted points")
    parser.add_argument("--title", default=None, help="plot title (default: the run dir's name)")
    parser.add_argument("--mark", type=int, default=None, metavar="STEP",
                        help="draw a line at this step (e.g. the shipped checkpoint's)")
    args = parser.parse_args(argv)
    try:
        path = write_curve(args.run_dir, args.out, args.title, args.json, args.mark)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
