"""Latency of an imported policy: sequential DDPM-100 against Picard on the same chunk.

Loads any checkpoint `policy.load_policy` reads (here a Diffusion Policy workspace checkpoint of
paper size, 65.8M parameters, made with DP's own code outside the repo), draws seeded
observations uniformly in the normalizer's fitted observation range and seeded noise, and times
`policy.predict_action(obs, sampler, noise=noise)` per chunk for sequential DDPM-100 and Picard
(scan update) over the same DDPM-100 schedule: full window and window 16, at tol 0.1, 0.01 and
0. DDIM-16 is left out: it samples a different chunk, so it is no "same chunk" speed-up.
``exact_err`` is a chunk's max |x - x_sequential| in normalized action units, against the
sequential DDPM-100 sample of the same observations and noise (the sequential row is the
reference, so its exact_err is 0 by construction). ``fastest_exact`` is the fastest row (p50
latency) within EXACT_RULE; ``latency_ratio`` = sequential p50 / fastest_exact p50.

    python bench/import_latency.py \
        --checkpoint /work/scratch_fixtures/dp_paper_size/dp_workspace.ckpt \
        --dp-reference /work/scratch_fixtures/dp_paper_size/reference.pt \
        --out bench/results/import_dp_paper_size.json --batch 1 --chunks 12 --threads 2

Warm-up: 2 untimed calls each of the sequential sampler and of every Picard window. Then the
samplers take turns chunk by chunk (load from other jobs hits every row alike). A Picard row
that is clearly slower than sequential (median so far > SLOW_FACTOR x the sequential median)
stops taking chunks once its timed calls add up to ``--row-budget-s`` (after ``MIN_CHUNKS``)
and records how many it measured (the tol 0 rows, about 98 rounds); every other row measures
all chunks.
``--quick``: 3 chunks, 1 warm-up call, tol 0.1 and 0.01, batch 1 (about 2 minutes on 2 idle
CPU threads). The PNG (OUT with .png) plots p50 latency against max exact_err per sampler.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from picard_sampler import EXACT_RULE, Sampler, exact_errors, is_exact, percentile
from picard_sampler.runinfo import provenance, run_info
from policy import load_policy
from policy.diffusion_policy import DiffusionPolicy
from policy.file_io import atomic_write

MIN_CHUNKS = 3
SLOW_FACTOR = 2.0
OBS_SEED, NOISE_SEED, WARMUP_SEED = 1000, 2000, 9000
SHARED_MACHINE_NOTE = (
    "Measured on a shared 2-core CPU machine where other jobs run at times (no core is "
    "reserved), so latencies are loose: compare rows of this file with each other, not across "
    "machines. loadavg_1m_mean per row shows how busy it was (about 2.0 = this run's own 2 "
    "threads); samplers were interleaved chunk by chunk so load hits every row alike."
)


def chunk_inputs(
    policy: DiffusionPolicy, sampler: Sampler, batch: int, index: int, seed: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Seeded raw observations {key: (B, To, D)}, uniform in the normalizer's fitted range of
    each key, and seeded noise of the sampler's shape for chunk `index`."""
    g = torch.Generator().manual_seed(seed + OBS_SEED + index)
    obs = {}
    for key, shape in policy.obs_encoder.obs_shapes.items():
        if key not in policy.normalizer:
            raise ValueError(f"observation '{key}' has no normalizer range to draw from")
        lo = getattr(policy.normalizer, f"{key}_input_min")
        hi = getattr(policy.normalizer, f"{key}_input_max")
        u = torch.rand(batch, policy.n_obs_steps, *shape, generator=g)
        obs[key] = lo + (hi - lo) * u
    g = torch.Generator().manual_seed(seed + NOISE_SEED + index)
    noise = torch.randn(sampler.noise_shape(batch, policy.horizon, policy.action_dim), generator=g)
    return obs, noise


def make_samplers(
    policy: DiffusionPolicy, windows: list[int | None], tols: list[float]
) -> list[tuple[str, Sampler]]:
    """Sequential DDPM-100 first (the reference), then Picard (scan) per window and tol."""
    samplers = [
        ("sequential", policy.make_sampler("sequential", schedule="ddpm", num_inference_steps=100))
    ]
    for window in windows:
        for tol in tols:
            sampler = policy.make_sampler(
                "picard", schedule="ddpm", num_inference_steps=100, window=window, tol=tol
            )
            samplers.append(("picard", sampler))
    return samplers


def warm_up(
    policy: DiffusionPolicy, samplers: list[tuple[str, Sampler]], args: argparse.Namespace
) -> None:
    """`args.warmup` untimed calls per batch-shape set: the sequential sampler and each Picard
    window at its first tol (rows that differ only in tol evaluate the same batch shapes)."""
    seen: set[tuple[str, int | None]] = set()
    for name, sampler in samplers:
        key = (name, sampler.window)
        if key in seen:
            continue
        seen.add(key)
        for k in range(args.warmup):
            obs, noise = chunk_inputs(policy, sampler, args.batch, k, args.seed + WARMUP_SEED)
            policy.predict_action(obs, sampler, noise=noise)


def measure(
    policy: DiffusionPolicy, samplers: list[tuple[str, Sampler]], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Time predict_action per chunk, the samplers interleaved chunk by chunk (sequential first:
    its sample is the chunk's reference), so that load from other jobs hits every row alike. A
    Picard row slower than SLOW_FACTOR x sequential (medians so far) stops taking chunks once
    its timed calls add up to `args.row_budget_s` (after MIN_CHUNKS)."""
    records: list[dict[str, list]] = [
        {k: [] for k in ("ms", "rounds", "nfe", "err_max", "err_mean", "converged", "load")}
        for _ in samplers
    ]
    for c in range(args.chunks):
        reference = None
        for (name, sampler), rec in zip(samplers, records, strict=True):
            if (
                name != "sequential"
                and len(rec["ms"]) >= MIN_CHUNKS
                and sum(rec["ms"]) / 1e3 > args.row_budget_s
                and statistics.median(rec["ms"]) > SLOW_FACTOR * statistics.median(records[0]["ms"])
            ):
                continue
            obs, noise = chunk_inputs(policy, sampler, args.batch, c, args.seed)
            rec["load"].append(os.getloadavg()[0])
            start = time.perf_counter()
            _, stats = policy.predict_action(obs, sampler, noise=noise)
            rec["ms"].append(1e3 * (time.perf_counter() - start))
            if name == "sequential":
                reference = stats.sample.clone()
            errs = exact_errors(stats.sample, reference)
            rec["err_max"].append(errs.max().item())
            rec["err_mean"].append(errs.mean().item())
            rec["rounds"].append(stats.rounds)
            rec["nfe"].append(stats.nfe)
            rec["converged"].append(stats.converged)
        print(
            f"chunk {c + 1}/{args.chunks}: "
            + ", ".join(f"{r['ms'][-1]:.0f}" for r in records if len(r["ms"]) == c + 1)
            + " ms",
            flush=True,
        )
    return [
        row(name, sampler, rec, args)
        for (name, sampler), rec in zip(samplers, records, strict=True)
    ]


def row(
    name: str, sampler: Sampler, rec: dict[str, list], args: argparse.Namespace
) -> dict[str, Any]:
    """One output row from a sampler's per-chunk records."""
    picard = name != "sequential"
    return {
        "sampler": name,
        "label": sampler.label,
        "schedule": f"{sampler.schedule.name}-{sampler.num_steps}",
        "update": sampler.update if picard else None,
        "window": sampler.window if picard else None,
        "window_slots": (sampler.window or sampler.num_steps) if picard else None,
        "tol": sampler.tol if picard else None,
        "batch": args.batch,
        "chunks": len(rec["ms"]),
        "chunks_requested": args.chunks,
        "latency_ms_p50": percentile(rec["ms"], 50),
        "latency_ms_p99": percentile(rec["ms"], 99),
        "latency_ms_mean": statistics.mean(rec["ms"]),
        "latency_ms_min": min(rec["ms"]),
        "latency_ms_all": [round(ms, 1) for ms in rec["ms"]],
        "rounds_mean": statistics.mean(rec["rounds"]),
        "nfe": statistics.mean(rec["nfe"]),
        "exact_err_max": max(rec["err_max"]),
        "exact_err_mean": statistics.mean(rec["err_mean"]),
        "converged_frac": sum(rec["converged"]) / len(rec["converged"]),
        "loadavg_1m_mean": statistics.mean(rec["load"]),
    }


def dp_reference_check(policy: DiffusionPolicy, path: Path) -> dict[str, Any]:
    """Max |diff| (raw action units) between the imported policy's sequential DDPM-100 and DP's
    own predict_action in `path` (obs, noise with every draw DP made, action, action_pred)."""
    ref = torch.load(path, weights_only=True)
    sampler = policy.make_sampler("sequential", schedule="ddpm", num_inference_steps=100)
    action, stats = policy.predict_action(ref["obs"], sampler, noise=ref["noise"])
    pred = policy.normalizer.unnormalize("action", stats.sample)
    return {
        "reference": str(path),
        "batch": int(ref["obs"].shape[0]),
        "action_max_abs_diff": (action - ref["action"]).abs().max().item(),
        "action_pred_max_abs_diff": (pred - ref["action_pred"]).abs().max().item(),
        "action_range": [ref["action_pred"].min().item(), ref["action_pred"].max().item()],
    }


@torch.no_grad()
def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    policy = load_policy(args.checkpoint)
    n_params = sum(p.numel() for p in policy.parameters())
    info = run_info(policy.device)
    where = {
        "device": info["device"],
        "threads": info["threads"],
        "torch": info["versions"]["torch"],
    }
    samplers = make_samplers(policy, args.windows, args.tols)
    load_start = os.getloadavg()
    warm_up(policy, samplers, args)
    rows = [{**r, **where} for r in measure(policy, samplers, args)]
    load_end = os.getloadavg()
    for r in rows:
        print(
            f"{r['label']:<48} p50 {r['latency_ms_p50']:8.0f} ms  p99 "
            f"{r['latency_ms_p99']:8.0f} ms  rounds {r['rounds_mean']:6.1f}  nfe "
            f"{r['nfe']:6.1f}  err {r['exact_err_max']:.2e}/{r['exact_err_mean']:.2e}  "
            f"({r['chunks']} chunks, load {r['loadavg_1m_mean']:.1f})",
            flush=True,
        )
    sequential = rows[0]
    exact = [r for r in rows if is_exact(r["exact_err_max"], r["exact_err_mean"])]
    fastest = min(exact, key=lambda r: r["latency_ms_p50"])
    picard = [r for r in exact if r["sampler"] == "picard"]
    fastest_picard = min(picard, key=lambda r: r["latency_ms_p50"]) if picard else None
    truncated = [r["label"] for r in rows if r["chunks"] < r["chunks_requested"]]
    return {
        "benchmark": "import_latency",
        "checkpoint": str(args.checkpoint),
        "checkpoint_bytes": Path(args.checkpoint).stat().st_size,
        "params": n_params,
        "policy": {
            "horizon": policy.horizon,
            "n_obs_steps": policy.n_obs_steps,
            "n_action_steps": policy.n_action_steps,
            "action_dim": policy.action_dim,
            "obs_shapes": {k: list(v) for k, v in policy.obs_encoder.obs_shapes.items()},
            "inference_schedule": repr(policy.inference_schedule),
        },
        "inputs": "observations uniform in the normalizer's fitted range, Gaussian noise; seeded "
        f"(seed {args.seed}); the same chunks for every sampler",
        "timed": "policy.predict_action(obs, sampler, noise=noise) per chunk (normalization, "
        "observation encoding and sampling), wall clock; samplers interleaved chunk "
        f"by chunk after {args.warmup} warm-up calls per sampler shape (sequential, "
        "each Picard window)",
        "exact_err": "max |x - x_sequential| over a chunk in normalized action units "
        "(exact_errors(stats.sample, sequential.sample), same obs and noise)",
        "latency_stats": "p50 / p99 over the chunks of a row (numpy linear percentile; with "
        "few chunks p99 is close to the slowest chunk)",
        "row_budget_s": args.row_budget_s,
        "row_budget_rule": (
            f"a Picard row whose median latency so far exceeds {SLOW_FACTOR} x the sequential "
            f"median stops taking chunks once its timed calls exceed row_budget_s (after "
            f"{MIN_CHUNKS} chunks); all other rows measure every chunk"
        ),
        "loadavg_start_end": [list(load_start), list(load_end)],
        "rows_with_fewer_chunks": truncated,
        "fastest_exact_rule": (
            f"the row with the smallest latency_ms_p50 among rows with exact_err_max <= "
            f"{EXACT_RULE['exact_err_max']} and exact_err_mean <= {EXACT_RULE['exact_err_mean']} "
            "(the sequential row included); DDIM is not the same chunk and is not measured"
        ),
        "fastest_exact": fastest["label"],
        "latency_ratio": sequential["latency_ms_p50"] / fastest["latency_ms_p50"],
        "fastest_exact_picard": fastest_picard["label"] if fastest_picard else None,
        "latency_ratio_picard": (
            sequential["latency_ms_p50"] / fastest_picard["latency_ms_p50"]
            if fastest_picard
            else None
        ),
        "dp_reference_check": (
            dp_reference_check(policy, args.dp_reference) if args.dp_reference else None
        ),
        "note": SHARED_MACHINE_NOTE,
        "provenance": provenance(sys.argv[1:], ("picard-policy", "torch", "numpy")),
        "run_info": info,
        "rows": rows,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    """p50 latency (p99 as the bar's top) against max exact_err, one point per sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1e-7
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for row in result["rows"]:
        p50, p99 = row["latency_ms_p50"], row["latency_ms_p99"]
        err = max(row["exact_err_max"], floor)
        marker = "s" if row["sampler"] == "sequential" else "o"
        ax.errorbar(
            [p50],
            [err],
            xerr=[[0.0], [max(p99 - p50, 0.0)]],
            fmt=marker,
            capsize=3,
            label=f"{row['label']} ({row['chunks']} chunks)"
            + (" = reference, err 0" if row["sampler"] == "sequential" else ""),
        )
    ax.axhline(
        EXACT_RULE["exact_err_max"],
        color="grey",
        linestyle="--",
        linewidth=0.8,
        label=f"exact rule: max err <= {EXACT_RULE['exact_err_max']}",
    )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="latency per chunk, ms (p50, bar to p99)",
        ylabel=f"max exact_err (normalized; floor {floor:g})",
        title=f"Imported {result['params'] / 1e6:.1f}M DP policy, "
        f"B={result['rows'][0]['batch']}, {result['run_info']['threads']} threads: "
        f"ratio {result['latency_ratio']:.2f}x",
    )
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_window(text: str) -> int | None:
    """'full' or 'none' -> None (all T slots), else an int window."""
    return None if text.lower() in ("full", "none") else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="a load_policy checkpoint")
    parser.add_argument("--out", required=True, type=Path, help="JSON file to write (and .png)")
    parser.add_argument("--batch", type=int, default=1, help="observations per chunk")
    parser.add_argument("--chunks", type=int, default=None, help="timed chunks per row (12)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls per shape (2)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--windows",
        type=parse_window,
        nargs="+",
        default=[None, 16],
        help="Picard windows ('full' = all T)",
    )
    parser.add_argument(
        "--tols", type=float, nargs="+", default=None, help="Picard tolerances (0.1 0.01 0)"
    )
    parser.add_argument(
        "--row-budget-s",
        type=float,
        default=None,
        help="seconds after which a Picard row stops adding chunks (60)",
    )
    parser.add_argument("--seed", type=int, default=0, help="observation / noise seed")
    parser.add_argument(
        "--dp-reference",
        type=Path,
        default=None,
        help="reference.pt of DP's own predict_action, to check the import",
    )
    parser.add_argument("--quick", action="store_true", help="3 chunks, tol 0.1 and 0.01, batch 1")
    args = parser.parse_args()
    if args.quick:
        args.batch = 1
    defaults = {
        "chunks": (3, 12),
        "warmup": (1, 2),
        "tols": ([0.1, 0.01], [0.1, 0.01, 0.0]),
        "row_budget_s": (20.0, 60.0),
    }
    for key, (quick, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if args.chunks < 1 or args.batch < 1:
        parser.error("--chunks and --batch must be >= 1")

    result = run(args)
    text = json.dumps(result, indent=1)
    atomic_write(args.out, lambda f: f.write(text.encode()))
    plot(result, args.out.with_suffix(".png"))
    print(
        f"fastest exact: {result['fastest_exact']}; latency ratio {result['latency_ratio']:.2f}x"
        f"; fastest exact Picard: {result['fastest_exact_picard']} "
        f"({result['latency_ratio_picard'] or float('nan'):.2f}x)"
    )
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
