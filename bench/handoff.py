"""Chunk hand-off benchmark: task score and boundary jerk against an injected inference delay.

For every hand-off (envs/realtime.py: skip, hold, ensemble, inpaint) and injected delay, one
real-time eval (app.evaluation.run_eval, simulated clock: the measured inference latency plus
the injected `realtime.delay_ms` decides the tick at which each chunk is ready) of the shipped
policy with sequential DDIM-16 on onnxruntime (one CPU thread), so the delay, not the sampler,
dominates. Each row: mean_score, success_rate, boundary_jerk and within_chunk_jerk (env action
units), held_step_rate, deadline_miss_rate, the realised delay in ticks and latency percentiles.
Cells are kept under --runs-dir and reused, so a killed run resumes where it stopped.

    python bench/handoff.py --task pusht --out bench/results/handoff_pusht.json --episodes 50
    python bench/handoff.py --task lift --out bench/results/handoff_lift.json --episodes 20 \
        --delays 0 200 500
    python bench/handoff.py --task pusht --handoffs inpaint --inpaint-methods guide \
        --out bench/results/handoff_pusht_guide.json       # RTC's guidance (runtime eager)
    python bench/handoff.py --task pusht --model-latency-ms 50 ...   # every method, same ticks
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from app.command_line import compose_config
from app.evaluation import run_eval
from app.report import write_results
from envs.realtime import HANDOFFS
from picard_sampler import GUIDANCE_CLIP, INPAINT_METHODS

TASKS = {  # checkpoint and control rate (PushT's physics ticks 10 Hz, robosuite's 20 Hz)
    "pusht": ("checkpoints/pusht_lowdim/policy.ckpt", 10),
    "lift": ("checkpoints/lift_lowdim/policy.ckpt", 20),
}
ROW_METRICS = (
    "mean_score", "success_rate", "boundary_jerk", "within_chunk_jerk", "held_step_rate",
    "deadline_miss_rate", "mean_steps", "latency_ms_p50", "latency_ms_p99", "n_timed_requests",
    "prefix_err_max", "prefix_err_mean",
)


def realised_delay_ticks(requests: list[dict[str, Any]]) -> float | None:
    """Mean ticks from request to ready over the timed (non-startup) delivered requests."""
    ticks = [r["ready_tick"] - r["request_tick"] for r in requests
             if not r["startup"] and r["ready_tick"] is not None]
    return float(np.mean(ticks)) if ticks else None


def method_name(handoff: str, soft_mask: float | None, inpaint_method: str = "replace",
                guidance_clip: float = GUIDANCE_CLIP) -> str:
    """A row's method: the hand-off, with the inpaint method (when it guides: and its clip
    when not RTC's) and soft-mask scale."""
    if soft_mask is None:
        return handoff
    guide = ""
    if inpaint_method == "guide":
        guide = " guide" if guidance_clip == GUIDANCE_CLIP else f" guide clip {guidance_clip:g}"
    return f"{handoff}{guide} soft {soft_mask:g}"


def cell(task: str, handoff: str, soft_mask: float | None, delay_ms: float, episodes: int,
         runs_dir: Path, sampler: str, runtime: str, quick: bool,
         inpaint_method: str = "replace", guidance_clip: float = GUIDANCE_CLIP,
         model_latency_ms: float | None = None) -> dict[str, Any]:
    """One (hand-off, delay) eval; reuses a finished run of the same overrides. Guided
    inpainting differentiates the UNet, so its cells run on runtime eager. With
    `model_latency_ms` every request takes exactly that (+ the delay) on the simulated clock."""
    checkpoint, hz = TASKS[task]
    if inpaint_method == "guide":
        runtime = "eager"
    overrides = [
        f"checkpoint={checkpoint}", f"sampler={sampler}", f"runtime={runtime}",
        "realtime.enabled=true", f"realtime.control_hz={hz}", f"realtime.handoff={handoff}",
        f"realtime.delay_ms={delay_ms:g}", f"n_episodes={episodes}", "threads=1",
        "exact_err=false", "logger.wandb=false", "progress=false",
    ] + (["max_steps=48"] if quick else [])
    if soft_mask is not None:
        overrides.append(f"realtime.soft_mask={soft_mask:g}")
    if inpaint_method != "replace":
        overrides.append(f"realtime.inpaint_method={inpaint_method}")
        if guidance_clip != GUIDANCE_CLIP:
            overrides.append(f"realtime.guidance_clip={guidance_clip:g}")
    method = method_name(handoff, soft_mask, inpaint_method, guidance_clip)
    modelled = ""
    if model_latency_ms is not None:
        overrides.append(f"realtime.model_latency_ms={model_latency_ms:g}")
        modelled = f"_model{model_latency_ms:g}ms"
    out_dir = (runs_dir /
               f"{task}_{method.replace(' ', '_')}_{delay_ms:g}ms{modelled}_{episodes}ep")
    done = out_dir / "results.json"
    if done.is_file() and json.loads(done.read_text())["overrides"] == overrides:
        results = json.loads(done.read_text())
    else:
        results = run_eval(compose_config("eval", overrides), out_dir, overrides)
    return {
        "task": task, "method": method, "handoff": handoff, "soft_mask": soft_mask,
        "inpaint_method": inpaint_method if handoff == "inpaint" else None,
        "guidance_clip": guidance_clip if inpaint_method == "guide" else None,
        "runtime": runtime, "delay_ms": delay_ms, "model_latency_ms": model_latency_ms,
        "control_hz": hz,
        **{k: results["metrics"].get(k) for k in ROW_METRICS},
        "realised_delay_ticks": realised_delay_ticks(results["requests"]),
        "n_episodes": results["n_episodes"], "overrides": overrides,
        "run_info": results["run_info"],
    }


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """mean_score, success_rate and boundary jerk against the injected delay, per hand-off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("mean_score", "success_rate", "boundary_jerk")
    fig, axes = plt.subplots(1, len(keys), figsize=(14, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["delay_ms"])
        for ax, key in zip(axes, keys, strict=True):
            values = [r[key] if r[key] is not None else float("nan") for r in mine]
            ax.plot([r["delay_ms"] for r in mine], values, "o-", label=method)
    for ax, key in zip(axes, keys, strict=True):
        ax.set(xlabel="injected inference delay (ms)", ylabel=key)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(rows: list[dict[str, Any]]) -> str:
    """One line per method: mean_score / boundary jerk at each delay (for docs/results)."""
    delays = sorted({r["delay_ms"] for r in rows})
    head = "| method | " + " | ".join(f"{d:g} ms" for d in delays) + " |"
    lines = [head, "|" + " --- |" * (len(delays) + 1)]
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for delay in delays:
            row = next((r for r in rows if r["method"] == method and r["delay_ms"] == delay),
                       None)
            cells.append("-" if row is None else
                         f"{row['mean_score']:.3f} / {row['boundary_jerk']:.1f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(path: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """The rows so far and the run's settings (a killed run keeps its finished cells)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_results(path, {**meta, "rows": rows})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=list(TASKS), default="pusht")
    parser.add_argument("--out", required=True, type=Path, help="JSON file to write (+ .png)")
    parser.add_argument("--episodes", type=int, default=50, help="episodes (seeds) per cell")
    parser.add_argument("--delays", type=float, nargs="+", default=[0, 100, 200, 300, 500])
    parser.add_argument("--handoffs", nargs="+", default=list(HANDOFFS), choices=HANDOFFS)
    parser.add_argument("--soft-masks", type=float, nargs="+", default=[0, 0.5, 1],
                        help="realtime.soft_mask values of the inpaint rows")
    parser.add_argument("--inpaint-methods", nargs="+", default=["replace"],
                        choices=list(INPAINT_METHODS),
                        help="realtime.inpaint_method values of the inpaint rows (guide runs "
                             "on runtime eager)")
    parser.add_argument("--guidance-clip", type=float, default=GUIDANCE_CLIP,
                        help="realtime.guidance_clip of the guide rows (RTC's beta)")
    parser.add_argument("--model-latency-ms", type=float, default=None,
                        help="realtime.model_latency_ms: every request takes this (+ the delay) "
                             "instead of its measured latency")
    parser.add_argument("--sampler", default="sequential_ddim16", help="conf/sampler choice")
    parser.add_argument("--runtime", default="onnxruntime", help="conf/runtime choice")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/bench_handoff"))
    parser.add_argument("--quick", action="store_true", help="2 episodes of 48 steps")
    args = parser.parse_args()
    episodes = 2 if args.quick else args.episodes
    meta = {
        "benchmark": "handoff", "task": args.task, "sampler": args.sampler,
        "runtime": args.runtime, "n_episodes": episodes, "threads": 1,
        "clock": ("simulated (measured inference latency + injected delay; env steps cost no "
                  "time)" if args.model_latency_ms is None else
                  f"simulated ({args.model_latency_ms:g} ms modelled inference latency + "
                  f"injected delay; env steps cost no time)"),
        "command": "python bench/handoff.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if k not in ("quick", "runs_dir", "out") and v is not None
        ) + f" --out {args.out}" + (" --quick" if args.quick else ""),
    }
    rows: list[dict[str, Any]] = []
    methods = [(h, s, m) for h in args.handoffs
               for m in (args.inpaint_methods if h == "inpaint" else ["replace"])
               for s in (args.soft_masks if h == "inpaint" else [None])]
    for delay in args.delays:
        for handoff, soft_mask, inpaint_method in methods:
            rows.append(cell(args.task, handoff, soft_mask, delay, episodes, args.runs_dir,
                             args.sampler, args.runtime, args.quick, inpaint_method,
                             args.guidance_clip, args.model_latency_ms))
            row = rows[-1]
            print(f"{args.task} {row['method']:16s} {delay:5g} ms: score "
                  f"{row['mean_score']:.3f} jerk {row['boundary_jerk']:.2f} / "
                  f"{row['within_chunk_jerk']:.2f}", flush=True)
            write(args.out, rows, meta)
    plot(rows, args.out.with_suffix(".png"),
         f"{args.task}: {args.sampler} on {args.runtime}, {episodes} episodes per point")
    print("mean_score / boundary_jerk per method and injected delay:")
    print(markdown(rows))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
