"""Real-time control benchmark: which sampler keeps up with which control rate, and at what score.

For every sampler and control rate, app.evaluation (eval_policy.py's job) runs the shipped
policy in real-time mode (one env, envs.realtime on the simulated clock: inference latency is
measured on this machine and decides the tick at which each chunk takes over; a late chunk
leaves the robot holding its last action) and records mean_score, success_rate,
deadline_miss_rate, anytime_rate, held_step_rate, rounds, latency percentiles and exact_err.
The summary gives, per sampler, the highest tested rate it sustains with deadline_miss_rate
< 1%.

    python bench/realtime.py --out bench/results/realtime.json [--quick] [--episodes 10]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from app.command_line import compose_config
from app.evaluation import run_eval

PCM_CHECKPOINT = "checkpoints/pusht_lowdim/pcm.ckpt"  # the shipped PCM of the shipped policy
SAMPLERS: dict[str, list[str]] = {
    "sequential DDPM-100": ["sampler=sequential_ddpm100"],
    "sequential DDIM-16": ["sampler=sequential_ddim16"],
    "picard DDPM-100 w16": ["sampler=picard_ddpm100"],
    "picard DDPM-100 w16 shift": ["sampler=picard_ddpm100", "warm_start=shift"],
    "picard DDIM-16": ["sampler=picard_ddim16"],
    "picard DDIM-16 shift": ["sampler=picard_ddim16", "warm_start=shift"],
    "pcm DDIM-16": ["sampler=pcm_ddim16", f"checkpoint={PCM_CHECKPOINT}"],
    "pcm DDIM-16 shift": [
        "sampler=pcm_ddim16", f"checkpoint={PCM_CHECKPOINT}", "warm_start=shift"
    ],
}
ROW_METRICS = (
    "mean_score", "success_rate", "deadline_miss_rate", "anytime_rate", "held_step_rate",
    "rounds_mean", "nfe", "converged_rate", "latency_ms_p50", "latency_ms_p95", "latency_ms_p99",
    "exact_err_mean", "exact_err_max", "skipped_requests", "n_timed_requests",
)
MISS_THRESHOLD = 0.01


def run_cell(overrides: list[str], out_dir: Path) -> dict[str, Any]:
    """One eval run (app.evaluation.run_eval) with `overrides`; its results record."""
    return run_eval(compose_config("eval", overrides), out_dir, overrides)


def sustained_rates(rows: list[dict[str, Any]], exact: bool = False) -> dict[str, float | None]:
    """Per sampler: the highest tested control rate with deadline_miss_rate < 1% (None: none);
    with `exact`, also anytime_rate < 1% (the chunks are converged samples, not estimates)."""
    best: dict[str, float | None] = {}
    for row in rows:
        ok = row["deadline_miss_rate"] is not None and row["deadline_miss_rate"] < MISS_THRESHOLD
        if exact:
            ok = ok and row["anytime_rate"] is not None and row["anytime_rate"] < MISS_THRESHOLD
        current = best.get(row["sampler"])
        if ok and (current is None or row["control_hz"] > current):
            best[row["sampler"]] = row["control_hz"]
        else:
            best.setdefault(row["sampler"], None)
    return best


def plot(result: dict[str, Any], path: Path) -> None:
    """mean_score and deadline_miss_rate against the control rate, one line per sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name in dict.fromkeys(r["sampler"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["sampler"] == name]
        hz = [r["control_hz"] for r in rows]
        for ax, key in zip(axes, ("mean_score", "deadline_miss_rate", "exact_err_mean"),
                           strict=True):
            ax.plot(hz, [r[key] if r[key] is not None else float("nan") for r in rows], "o-",
                    label=name)
    for ax, key in zip(axes, ("mean_score", "deadline_miss_rate", "exact_err_mean (anytime)"),
                       strict=True):
        ax.set(xlabel="control rate (Hz)", ylabel=key, xscale="log")
    axes[2].set_yscale("symlog", linthresh=1e-3)
    axes[2].set_ylim(bottom=0)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Real-time PushT, {result['n_episodes']} episodes per cell, "
                 f"{result['run_info']['device_name']}, threads {result['threads']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="JSON file to write")
    parser.add_argument("--episodes", type=int, default=10, help="episodes per cell")
    parser.add_argument("--rates", type=float, nargs="+", default=[10, 20, 50, 100])
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--checkpoint", default=None, help="default: eval.yaml's checkpoint")
    parser.add_argument("--pcm-checkpoint", default=PCM_CHECKPOINT,
                        help="the PCM checkpoint of the pcm rows (default: the shipped PushT PCM)")
    parser.add_argument("--quick", action="store_true", help="2 episodes of 48 steps, 2 rates")
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="keep each cell's run here; cells already there are reused")
    args = parser.parse_args()
    rates = args.rates[:2] if args.quick else args.rates
    episodes = 2 if args.quick else args.episodes
    runs_dir = args.runs_dir or Path(tempfile.mkdtemp(prefix="bench_realtime_"))

    rows, info = [], None
    for name in args.samplers:
        for hz in rates:
            sampler = [f"checkpoint={args.pcm_checkpoint}" if o == f"checkpoint={PCM_CHECKPOINT}"
                       else o for o in SAMPLERS[name]]
            overrides = [
                *sampler, "realtime.enabled=true", f"realtime.control_hz={hz:g}",
                f"n_episodes={episodes}", f"threads={args.threads}", "exact_err_every=4",
                "logger.wandb=false", "progress=false",
            ]
            if args.checkpoint:
                overrides.append(f"checkpoint={args.checkpoint}")
            if args.quick:
                overrides.append("max_steps=48")
            cell_dir = runs_dir / f"{name.replace(' ', '_')}_{hz:g}hz"
            done = cell_dir / "results.json"
            if done.is_file() and json.loads(done.read_text())["overrides"] == overrides:
                results = json.loads(done.read_text())  # resume: this cell already ran
            else:
                results = run_cell(overrides, cell_dir)
            info = results["run_info"]
            rows.append({
                "sampler": name, "label": results["sampler"]["label"], "control_hz": hz,
                "deadline_ms": results["realtime"]["deadline_ms"],
                "budget_ms": results["realtime"]["budget_ms"],
                "warm_start": results["config"]["warm_start"],
                **{k: results["metrics"].get(k) for k in ROW_METRICS},
                "n_episodes": results["n_episodes"], "overrides": overrides,
            })
            write(args.out, rows, episodes, args.threads, info)
    result = write(args.out, rows, episodes, args.threads, info)
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps(result["sustained_hz_miss_below_1pct"], indent=1))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def write(path: Path, rows: list[dict], episodes: int, threads: int, info: dict | None) -> dict:
    """Write the rows so far (a killed run keeps its finished cells); returns the record."""
    result = {
        "benchmark": "realtime",
        "clock": "simulated (measured inference latency, env steps cost no time)",
        "n_episodes": episodes,
        "seeds": f"100000..{100000 + episodes - 1}",
        "threads": threads,
        "run_info": info,
        "rows": rows,
        "sustained_hz_miss_below_1pct": sustained_rates(rows),
        "sustained_hz_exact_chunks": sustained_rates(rows, exact=True),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
