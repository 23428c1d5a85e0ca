"""Benchmark PCM sampling against plain Picard on the real PushT policy: rounds and exact error.

Chunks: observation windows of the base policy's held-out demonstration episodes (its
validation split, seen by neither the policy nor the PCM in training) with seeded noise.
``exact_err`` is a chunk's max |x - x_sequential| in normalised action units (same noise).

(i) Stopping rule: mean / p95 ``rounds`` and max / mean ``exact_err`` per sampler and ``tol``;
    each PCM row is compared with plain Picard (scan, the faster update) at matched exact_err:
    Picard's rounds interpolated (log error) over its own tol sweep.
(ii) Fixed round budgets (no stopping, the deadline case): mean and max exact_err after each
    round (each curve is one run without stopping, read after every round), cold and
    (``--warm``) warm-started from the sequential trajectory of the window
    ``Ta`` steps earlier with the same noise; ``rounds_to_err``: rounds each sampler needs for
    mean exact_err <= 1e-2 and 5e-2 (integer, and log-interpolated).

    python bench/pcm.py --out bench/results/pcm.json --pcm a=RUN/latest.ckpt [--quick] \
        [--propagators checkpoints/pusht_lowdim/propagators.pt]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from app.report import write_results
from picard_sampler import (
    DDIMSchedule,
    DDPMSchedule,
    Schedule,
    exact_errors,
    pcm_sample,
    percentile,
    picard_sample,
    sequential_sample,
)
from picard_sampler.runinfo import run_info
from policy.checkpoint import load_checkpoint, load_policy_checkpoint
from policy.data import windows_from_config
from policy.encoders import camera_shapes
from policy.pcm_training import encode_for_sampling, stack_obs
from policy.propagator import load_propagators, schedule_key

BUDGETS = (1, 2, 3, 5, 8, 12)
THRESHOLDS = (1e-2, 5e-2)
SCHEDULES: dict[str, Callable[[dict], Schedule]] = {
    "ddim-16": lambda s: DDIMSchedule(num_inference_steps=16, **s),
    "ddim-100": lambda s: DDIMSchedule(num_inference_steps=100, **s),
    "ddpm-100": lambda s: DDPMSchedule(num_inference_steps=100, **s),
}


def held_out_chunks(checkpoint: str, n_chunks: int, seed: int) -> tuple[Any, dict]:
    """The base policy and `n_chunks` seeded held-out windows: their conditioning and that of
    the window Ta steps earlier in the same episode (for warm starts)."""
    policy = load_policy_checkpoint(checkpoint)
    cfg = load_checkpoint(checkpoint)["config"]
    data = cfg["data"]
    windows = windows_from_config(  # a camera policy's windows hold uint8 frames
        data, policy.horizon, policy.n_obs_steps, policy.n_action_steps, cfg["seed"], "val",
        image_shapes=camera_shapes(policy) or None,
    )
    ta = policy.n_action_steps
    # Window i - Ta is the same episode's previous chunk iff its actions [Ta:] are i's [:H-Ta].
    same = [
        i for i in range(ta, len(windows))
        if torch.equal(windows[i - ta]["action"][ta:], windows[i]["action"][:-ta])
    ]
    if len(same) < n_chunks:
        raise ValueError(f"only {len(same)} held-out windows; asked for {n_chunks} chunks")
    picks = np.random.default_rng(seed).choice(same, size=n_chunks, replace=False)
    with torch.no_grad():
        encode = lambda idx: encode_for_sampling(  # noqa: E731  (once per chunk, eval crop)
            policy, stack_obs([windows[int(i)]["obs"] for i in idx]))
        conds = {"cond": encode(picks), "previous": encode(picks - ta)}
    conds["episodes"] = len(windows.episode_indices)
    conds["windows"] = len(windows)
    return policy, conds


def base_of(policy: Any, other: Any, label: str) -> None:
    """Raise unless `other` (a PCM file's policy) has exactly `policy`'s base weights."""
    mine, theirs = policy.model.state_dict(), other.model.state_dict()
    if any(not torch.equal(mine[k], theirs[k]) for k in mine):
        raise ValueError(f"PCM {label} was trained on another base policy than --checkpoint")


def rounds_to_err(mean_err: list[float], threshold: float) -> tuple[int | None, float | None]:
    """(first round with mean error <= threshold, log-interpolated fractional round)."""
    for r, err in enumerate(mean_err, start=1):
        if err <= threshold:
            if r == 1 or mean_err[r - 2] <= 0 or err <= 0:
                return r, float(r)
            prev = mean_err[r - 2]
            frac = (math.log(prev) - math.log(threshold)) / (math.log(prev) - math.log(err))
            return r, r - 1 + frac
    return None, None


def interpolate_rounds(points: list[tuple[float, float]], err: float) -> float | None:
    """Rounds at exact_err `err` on a (rounds, err) curve, log-linear in err; None outside."""
    pts = sorted(points, key=lambda p: -p[1])  # decreasing error
    for (r0, e0), (r1, e1) in zip(pts, pts[1:], strict=False):
        if e1 <= err <= e0 and e0 > 0 and e1 > 0:
            if e0 == e1:
                return min(r0, r1)
            w = (math.log(e0) - math.log(err)) / (math.log(e0) - math.log(e1))
            return r0 + w * (r1 - r0)
    return None


def run_sampler(sampler: dict, schedule: Schedule, noise, cond, **knobs) -> tuple[Any, dict]:
    """One call of a sampler row: plain Picard or PCM (base + PCM denoisers, K_s); parareal
    rows take their schedule's fitted propagator (sampler["propagators"])."""
    if sampler["update"] == "parareal":
        knobs["propagator"] = sampler["propagators"][schedule_key(schedule)]
    if sampler["pcm"] is None:
        return picard_sample(sampler["base"], schedule, noise, cond, window=None,
                             update=sampler["update"], accel=sampler.get("accel", "none"),
                             **knobs)
    return pcm_sample(sampler["base"], sampler["pcm"], schedule, noise, cond, window=None,
                      update=sampler["update"], switch_rounds=sampler["switch_rounds"],
                      pcm_sees_noise=sampler["sees_noise"], **knobs)


@torch.no_grad()
def budget_curve(sampler, schedule, noise, cond, reference, max_rounds, init=None) -> dict:
    """Mean / max exact_err over chunks after each round 1..max_rounds, no stopping."""
    per_round: list[torch.Tensor] = []
    run_sampler(
        sampler, schedule, noise, cond, tol=0.0, max_rounds=max_rounds, init=init,
        callback=lambda info: per_round.append(exact_errors(info["x"], reference)),
    )
    while len(per_round) < max_rounds:  # every chunk converged exactly: the error stays
        per_round.append(per_round[-1])
    return {
        "rounds": list(range(1, max_rounds + 1)),
        "mean_err": [e.mean().item() for e in per_round],
        "max_err": [e.max().item() for e in per_round],
    }


@torch.no_grad()
def stopping_row(sampler, schedule, noise, cond, reference, tol) -> dict:
    """Rounds and exact_err under the stopping rule at `tol`."""
    start = time.perf_counter()
    x, stats = run_sampler(sampler, schedule, noise, cond, tol=tol)
    errs = exact_errors(x, reference).tolist()
    rounds = [float(r) for r in stats.rounds_per_sample]
    return {
        "tol": tol,
        "rounds": statistics.mean(rounds),
        "rounds_p95": percentile(rounds, 95),
        "nfe": stats.nfe,
        "exact_err": max(errs),
        "exact_err_mean": statistics.mean(errs),
        "converged": stats.converged,
        "wall_s": time.perf_counter() - start,
    }


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    policy, conds = held_out_chunks(args.checkpoint, args.chunks, args.seed)
    trained = load_checkpoint(args.checkpoint)["config"]["policy"]["train_schedule"]
    settings = {k: v for k, v in trained.items() if k not in ("_target_", "num_inference_steps")}
    pcms = {}
    for spec in args.pcm:
        label, _, path = spec.partition("=")
        path, _, ks = path.partition("@")
        other = load_policy_checkpoint(path)
        if other.pcm is None:
            raise ValueError(f"--pcm {spec}: {path} holds no PCM")
        base_of(policy, other, label)
        pcms[label] = {"path": path, "denoiser": other.pcm_denoiser,
                       "sees_noise": other.pcm_sees_noise,
                       "config": load_checkpoint(path)["config"].get("pcm"),
                       "switch_rounds": [int(k) for k in ks.split(",")] if ks else
                       args.switch_rounds}
    base = policy.denoiser
    samplers = [
        {"name": f"picard-{u}", "base": base, "pcm": None, "update": u, "switch_rounds": 0}
        for u in ("scan", "drift")
    ] + [  # Anderson acceleration (picard_sampler.anderson, memory 3) of both updates
        {"name": f"picard-{u}-anderson", "base": base, "pcm": None, "update": u,
         "switch_rounds": 0, "accel": "anderson"}
        for u in ("scan", "drift")
    ] + [
        {"name": f"pcm-{label}-ks{ks}", "base": base, "pcm": p["denoiser"], "update": "scan",
         "switch_rounds": ks, "pcm_label": label, "sees_noise": p["sees_noise"]}
        for label, p in pcms.items() for ks in p["switch_rounds"]
    ]
    if args.propagators:  # Parareal with the fitted linear propagator (picard_sampler.parareal)
        propagators = load_propagators(args.propagators, policy)
        samplers += [
            {**s, "name": f"{s['name']}-parareal", "update": "parareal",
             "propagators": propagators}
            for s in samplers if s["name"] == "picard-scan" or s["name"].startswith("pcm-")
        ]
    if args.only:
        unknown = set(args.only) - {s["name"] for s in samplers}
        if unknown:
            raise ValueError(f"--only {sorted(unknown)}: not among {[s['name'] for s in samplers]}")
        samplers = [s for s in samplers if s["name"] in args.only]
    result: dict[str, Any] = {
        "benchmark": "pcm",
        "checkpoint": args.checkpoint,
        "pcms": {k: {"path": v["path"], "config": v["config"]} for k, v in pcms.items()},
        "chunks": args.chunks,
        "chunk_source": f"held-out validation split of the base's data: {conds['episodes']} "
                        f"episodes, {conds['windows']} windows",
        "window": "full",
        "budgets": list(BUDGETS),
        "max_rounds": args.max_rounds,
        "run_info": run_info("cpu"),
        "threads": args.threads,
        "schedules": {},
    }
    for name in args.schedules:
        schedule = SCHEDULES[name](settings)
        T = schedule.num_inference_steps
        noise = torch.randn(T + 1, args.chunks, policy.horizon, policy.action_dim,
                            generator=torch.Generator().manual_seed(args.seed))
        reference, seq = sequential_sample(base, schedule, noise, conds["cond"])
        warm_init = None
        if args.warm is not None:
            warm_init = sequential_sample(base, schedule, noise, conds["previous"])[1].trajectory
        max_rounds = min(args.max_rounds, T)
        rows, curves = [], []
        for sampler in tqdm(samplers, desc=name):
            label = {k: sampler[k] for k in ("name", "update", "switch_rounds")}
            label["accel"] = sampler.get("accel", "none")
            warm_too = args.warm is not None and (not args.warm or sampler["name"] in args.warm)
            for warm in (False, True) if warm_too else (False,):
                curve = budget_curve(sampler, schedule, noise, conds["cond"], reference,
                                     max_rounds, init=warm_init if warm else None)
                curve.update(label, warm=warm)
                for threshold in THRESHOLDS:
                    r, frac = rounds_to_err(curve["mean_err"], threshold)
                    curve[f"rounds_to_err_{threshold:g}"] = r
                    curve[f"rounds_to_err_{threshold:g}_interp"] = frac
                curves.append(curve)
            tols = {"picard-scan": args.picard_tols, "picard-drift": args.drift_tols,
                    "picard-scan-anderson": args.picard_tols,
                    "picard-scan-parareal": args.picard_tols,
                    "picard-drift-anderson": args.drift_tols}.get(sampler["name"], args.pcm_tols)
            for tol in tols:
                rows.append({**label, **stopping_row(sampler, schedule, noise, conds["cond"],
                                                     reference, tol)})
        result["schedules"][name] = {
            "steps": T, "sequential_rounds": seq.rounds, "stopping": rows, "budget": curves,
            "summary": summarize(rows, curves),
        }
    return result


def summarize(rows: list[dict], curves: list[dict]) -> dict:
    """PCM and accelerated Picard vs the best plain Picard: rounds_to_err ratios (ii) and
    matched-error ratios (i)."""
    out: dict[str, Any] = {"rounds_to_err": {}, "stopping_matched": []}
    for warm in sorted({c["warm"] for c in curves}):
        key = "warm" if warm else "cold"
        group = [c for c in curves if c["warm"] == warm]
        table = {}
        for threshold in THRESHOLDS:
            field = f"rounds_to_err_{threshold:g}_interp"
            plain = [c[field] for c in group if _plain(c) and c[field] is not None]
            best = min(plain) if plain else None
            table[f"{threshold:g}"] = {
                "best_picard": best,
                "samplers": {
                    c["name"]: {
                        "rounds": c[field],
                        "ratio_to_best_picard": (c[field] / best) if best and c[field] else None,
                    }
                    for c in group
                },
            }
        out["rounds_to_err"][key] = table
    scan = [(r["rounds"], r["exact_err"]) for r in rows if r["name"] == "picard-scan"]
    scan_mean = [(r["rounds"], r["exact_err_mean"]) for r in rows if r["name"] == "picard-scan"]
    for r in rows:
        if _plain(r):
            continue
        at_max = interpolate_rounds(scan, r["exact_err"])
        at_mean = interpolate_rounds(scan_mean, r["exact_err_mean"])
        out["stopping_matched"].append({
            "name": r["name"], "tol": r["tol"], "rounds": r["rounds"],
            "exact_err": r["exact_err"], "exact_err_mean": r["exact_err_mean"],
            "picard_scan_rounds_at_matched_max_err": at_max,
            "speedup_at_matched_max_err": at_max / r["rounds"] if at_max else None,
            "picard_scan_rounds_at_matched_mean_err": at_mean,
            "speedup_at_matched_mean_err": at_mean / r["rounds"] if at_mean else None,
        })
    return out


def _plain(row: dict) -> bool:
    """A plain Picard row (no PCM, no acceleration, no propagator); older results have no
    `accel` key."""
    return (row["switch_rounds"] == 0 and row.get("accel", "none") == "none"
            and row.get("update") != "parareal")


def plot(result: dict, path: Path) -> None:
    """Per schedule: mean exact_err vs rounds (budgets; cold solid, warm dashed), and the
    stopping rule's rounds vs max exact_err."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["schedules"])
    fig, axes = plt.subplots(len(names), 2, figsize=(12, 4.5 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        data = result["schedules"][name]
        labels = sorted({c["name"] for c in data["budget"]})
        colors = {n: plt.cm.tab10(i % 10) for i, n in enumerate(labels)}
        ax = axes[row][0]
        for c in data["budget"]:
            ax.plot(c["rounds"], [max(e, 1e-7) for e in c["mean_err"]], color=colors[c["name"]],
                    linestyle="--" if c["warm"] else "-", marker="o", markersize=3,
                    label=f"{c['name']}{' warm' if c['warm'] else ''}")
        for threshold in THRESHOLDS:
            ax.axhline(threshold, color="gray", linewidth=0.6, linestyle=":")
        ax.set(xlabel="rounds (fixed budget, full window)", ylabel="mean exact_err",
               yscale="log", title=f"{name}: anytime error ({result['chunks']} chunks)")
        ax.legend(fontsize=7)
        ax = axes[row][1]
        for n in labels:
            pts = [(r["rounds"], r["exact_err"]) for r in data["stopping"] if r["name"] == n]
            ax.plot(*zip(*sorted(pts), strict=True), color=colors[n], marker="o", label=n)
        ax.set(xlabel="mean rounds (stopping rule)", ylabel="max exact_err", yscale="log",
               title=f"{name}: stopping rule over tol")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="JSON file to write (+ .png)")
    parser.add_argument("--quick", action="store_true", help="32 chunks, K_s 1, two tols")
    parser.add_argument("--checkpoint", default="checkpoints/pusht_lowdim/policy.ckpt",
                        help="the base policy")
    parser.add_argument("--pcm", action="append", default=[], metavar="LABEL=PATH[@K,K]",
                        help="a PCM checkpoint (training or exported), benchmarked with the K_s "
                        "after @ (default --switch-rounds); repeatable")
    parser.add_argument("--chunks", type=int, default=None, help="chunks (default 256)")
    parser.add_argument("--schedules", nargs="+", default=["ddim-16"], choices=list(SCHEDULES))
    parser.add_argument("--switch-rounds", type=int, nargs="+", default=None, help="K_s values")
    parser.add_argument("--picard-tols", type=float, nargs="+", default=None)
    parser.add_argument("--drift-tols", type=float, nargs="+", default=[0.1, 0.01])
    parser.add_argument("--pcm-tols", type=float, nargs="+", default=None)
    parser.add_argument("--warm", nargs="*", default=None, metavar="SAMPLER",
                        help="also warm-started budget curves, for these samplers (none: all)")
    parser.add_argument("--max-rounds", type=int, default=max(BUDGETS),
                        help="rounds of the no-stopping curves, at least the last budget "
                        "(rounds_to_err is read from them: raise it when plain Picard has not "
                        "reached 1e-2)")
    parser.add_argument("--only", nargs="+", default=None, metavar="SAMPLER",
                        help="run only these samplers (e.g. picard-scan pcm-a-ks1)")
    parser.add_argument("--propagators", type=Path, default=None, metavar="FILE",
                        help="also run update=parareal rows (plain Picard and each PCM) with "
                        "this policy's fitted propagators (scripts/fit_propagator.py)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    if args.max_rounds < max(BUDGETS):
        parser.error(f"--max-rounds {args.max_rounds}: must be at least the last budget, "
                     f"{max(BUDGETS)}")
    quick = args.quick
    args.chunks = args.chunks or (32 if quick else 256)
    args.switch_rounds = args.switch_rounds or ([1] if quick else [1, 2, 3])
    args.picard_tols = args.picard_tols or ([0.1, 0.01] if quick else [0.3, 0.1, 0.03, 0.01,
                                                                        0.003])
    args.pcm_tols = args.pcm_tols or [0.1, 0.01]
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_results(args.out, result)
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps({k: v["summary"] for k, v in result["schedules"].items()}, indent=1))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
