"""Benchmark the samplers on a DP-shaped network: rounds, nfe, ms per chunk and exact error.

Rows compare sequential DDPM-100 / DDIM-16 with Picard (drift and scan updates) over windows and
tolerances, cold and warm-started (init = the converged trajectory for a slightly perturbed
conditioning, same noise). ``exact_err`` is max |x - x_sequential| over the chunk in normalised
action units. A second table follows the anytime error after each round (no stopping), the
number a deadline-bound control loop cares about.

    python bench/samplers.py --out bench/results/samplers.json [--quick] [--checkpoint CKPT]

Rows are also written to OUT.partial.json as they finish; a rerun with the same network, chunk
count, device and threads reuses them (resume after a kill; timings of reused rows come from
the earlier run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from picard_sampler import (
    DDIMSchedule,
    DDPMSchedule,
    Schedule,
    exact_errors,
    percentile,
    picard_sample,
    sequential_sample,
)
from picard_sampler.runinfo import run_info

H, DA = 16, 2
COND_DIM = 2 * 20  # To = 2 observation steps of the 20-D PushT keypoint observation
WARM_COND_PERTURBATION = 0.05


def build_denoiser(checkpoint: str | None, seed: int = 0):
    """The policy's denoiser from a checkpoint, or a random (64,128,256) ConditionalUnet1D.

    Returns (denoiser, conditioning source, description). With a checkpoint the conditioning is
    the policy's encoding of real PushT windows from its demonstration data (the warm start's
    nearby conditioning is the next window of the same episode, as in a rollout); without one,
    seeded Gaussian vectors.
    """
    if checkpoint is not None:
        from policy.checkpoint import load_checkpoint, load_policy_checkpoint
        from policy.data import windows_from_config

        policy = load_policy_checkpoint(checkpoint)
        saved = load_checkpoint(checkpoint)
        data_cfg = saved["config"]["data"]
        windows = windows_from_config(  # every episode: no validation split here
            {**data_cfg, "val_ratio": 0.0, "max_train_episodes": None}, policy.horizon,
            policy.n_obs_steps, policy.n_action_steps, seed=42,
        )
        rng = np.random.default_rng(seed)
        picks = rng.choice(len(windows) - 1, size=256, replace=False)
        with torch.no_grad():
            obs = torch.stack([windows[int(i)]["obs"] for i in picks])
            nxt = torch.stack([windows[int(i) + 1]["obs"] for i in picks])
            conds = (
                policy.encode_obs(policy.check_obs(obs)),
                policy.encode_obs(policy.check_obs(nxt)),
            )
        return policy.denoiser, conds, f"checkpoint {checkpoint} (step {saved['step']})"
    from policy.unet import ConditionalUnet1D

    torch.manual_seed(seed)
    net = ConditionalUnet1D(
        input_dim=DA,
        global_cond_dim=COND_DIM,
        down_dims=(64, 128, 256),
        diffusion_step_embed_dim=128,
    ).eval()

    def denoiser(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return net(x, t, cond)

    n_params = sum(p.numel() for p in net.parameters())
    return denoiser, None, f"random ConditionalUnet1D(64,128,256) {n_params / 1e6:.2f}M"


def make_schedules() -> dict[str, Schedule]:
    return {
        "ddpm-100": DDPMSchedule(num_inference_steps=100),
        "ddim-16": DDIMSchedule(num_inference_steps=16),
    }


def chunk_inputs(schedule: Schedule, batch: int, conds, index: int):
    """Seeded conditioning, noise and a nearby conditioning (for warm starts) for chunk ``index``.

    ``conds`` is None (Gaussian conditioning, perturbed for the nearby one) or a pair of
    (real, next-window) encoded observations to take ``batch`` rows from.
    """
    g = torch.Generator().manual_seed(1000 + index)
    noise = torch.randn(schedule.num_inference_steps + 1, batch, H, DA, generator=g)
    if conds is None:
        cond = torch.randn(batch, COND_DIM, generator=g)
        nearby = cond + WARM_COND_PERTURBATION * torch.randn(batch, COND_DIM, generator=g)
        return cond, noise, nearby
    rows = (torch.arange(batch) + index * batch) % conds[0].shape[0]
    return conds[0][rows], noise, conds[1][rows]


@torch.no_grad()
def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    denoiser, conds, network = build_denoiser(args.checkpoint)
    schedules = make_schedules()
    batches = [1] if args.quick else [1, 8]
    window_choices = [4, 16, None] if args.quick else [4, 8, 16, 32, None]
    tols = [0.1] if args.quick else [0.1, 0.01]
    n_chunks = args.chunks

    # References: the sequential sample of every chunk, and a warm start from a nearby cond.
    refs: dict[tuple, tuple] = {}
    info = run_info("cpu")
    where = {"device": info["device"], "threads": info["threads"]}
    rows = []
    for (name, schedule), batch in tqdm(
        [(s, b) for s in schedules.items() for b in batches], desc="sequential"
    ):
        times = []
        for c in range(n_chunks):
            cond, noise, nearby = chunk_inputs(schedule, batch, conds, c)
            start = time.perf_counter()
            x, stats = sequential_sample(denoiser, schedule, noise, cond)
            times.append(time.perf_counter() - start)
            _, near = sequential_sample(denoiser, schedule, noise, nearby)
            refs[(name, batch, c)] = (x, near["trajectory"])
        rows.append(
            {
                "sampler": "sequential",
                "schedule": name,
                "update": None,
                "steps": schedule.num_inference_steps,
                "window": None,
                "tol": None,
                "batch": batch,
                "warm": False,
                "rounds": float(stats.rounds),
                "rounds_p95": float(stats.rounds),
                "nfe": stats.nfe,
                "ms_per_chunk": 1e3 * statistics.median(times[1:] or times),
                "exact_err": 0.0,
                "exact_err_mean": 0.0,
                **where,
            }
        )

    grid = [
        (name, schedule, update, window, tol, batch, warm)
        for name, schedule in schedules.items()
        for update in ("scan", "drift")
        for window in sorted(
            {min(w or 10**9, schedule.num_inference_steps) for w in window_choices}
        )
        for tol in tols
        for batch in batches
        for warm in (False, True)
    ]
    done = previous_rows(args.out, network, n_chunks, where)
    for name, schedule, update, window, tol, batch, warm in tqdm(grid, desc="picard"):
        key = (name, update, window, tol, batch, warm)
        if key in done:  # resume: this row was measured by an earlier, interrupted run
            rows.append(done[key])
            continue
        rounds, nfe, times, errs, mean_errs = [], [], [], [], []
        for c in range(n_chunks):
            cond, noise, _ = chunk_inputs(schedule, batch, conds, c)
            reference, warm_init = refs[(name, batch, c)]
            start = time.perf_counter()
            x, stats = picard_sample(
                denoiser,
                schedule,
                noise,
                cond,
                window=window,
                tol=tol,
                update=update,
                init=warm_init if warm else None,
            )
            times.append(time.perf_counter() - start)
            rounds.append(stats.rounds)
            nfe.append(stats.nfe)
            errs.append(exact_errors(x, reference).max().item())
            mean_errs.append(exact_errors(x, reference).mean().item())
        rows.append(
            {
                "sampler": "picard",
                "schedule": name,
                "update": update,
                "steps": schedule.num_inference_steps,
                "window": window,
                "tol": tol,
                "batch": batch,
                "warm": warm,
                "rounds": statistics.mean(rounds),
                "rounds_p95": percentile(rounds, 95),
                "nfe": statistics.mean(nfe),
                "ms_per_chunk": 1e3 * statistics.median(times),
                "exact_err": max(errs),
                "exact_err_mean": statistics.mean(mean_errs),
                **where,
            }
        )
        write_partial(args.out, {"network": network, "chunks_per_row": n_chunks,
                                 "run_info": info, "rows": rows})

    anytime = anytime_curves(
        denoiser, schedules, conds, n_chunks=min(n_chunks, 5), max_rounds=args.anytime_rounds
    )
    return {
        "benchmark": "samplers",
        "network": network,
        "horizon": H,
        "action_dim": DA,
        "chunks_per_row": n_chunks,
        "ms_statistic": "median over chunks",
        "run_info": info,
        "rows": rows,
        "anytime": anytime,
    }


def _row_key(row: dict) -> tuple:
    return (row["schedule"], row["update"], row["window"], row["tol"], row["batch"], row["warm"])


def previous_rows(path: Path, network: str, n_chunks: int, where: dict) -> dict[tuple, dict]:
    """Picard rows of an unfinished earlier run with the same network, chunks, device and
    threads (to resume; rows timed with other settings are measured again)."""
    partial = path.with_suffix(".partial.json")
    if not partial.is_file():
        return {}
    record = json.loads(partial.read_text())
    if record["network"] != network or record["chunks_per_row"] != n_chunks:
        return {}
    return {_row_key(r): r for r in record["rows"]
            if r["sampler"] == "picard" and all(r.get(k) == v for k, v in where.items())}


def write_partial(path: Path, record: dict) -> None:
    """The rows so far, next to the output, so a killed run resumes where it stopped; written
    to a temp file and renamed, so a kill mid-write cannot lose the rows already there."""
    from policy.file_io import atomic_write

    text = json.dumps(record, indent=1)
    atomic_write(path.with_suffix(".partial.json"), lambda f: f.write(text.encode()))


def anytime_curves(
    denoiser, schedules: dict[str, Schedule], conds, n_chunks: int, max_rounds: int
) -> list[dict]:
    """Mean/max error of the full-window estimate X[T] after each round, both updates, B=1."""
    curves = []
    for name, schedule in schedules.items():
        T = min(schedule.num_inference_steps, max_rounds)
        for update in ("scan", "drift"):
            per_round: list[list[float]] = [[] for _ in range(T)]
            for c in range(n_chunks):
                cond, noise, _ = chunk_inputs(schedule, 1, conds, c)
                reference, _ = sequential_sample(denoiser, schedule, noise, cond)

                def record(info, reference=reference, per_round=per_round):
                    per_round[info["round"] - 1].append((info["x"] - reference).abs())

                picard_sample(
                    denoiser,
                    schedule,
                    noise,
                    cond,
                    window=None,
                    tol=0.0,
                    update=update,
                    max_rounds=T,
                    callback=record,
                )
            curves.append(
                {
                    "schedule": name,
                    "update": update,
                    "rounds": list(range(1, T + 1)),
                    "mean_err": [torch.stack(r).mean().item() for r in per_round if r],
                    "max_err": [torch.stack(r).max().item() for r in per_round if r],
                }
            )
    return curves


def summary_table(result: dict) -> str:
    """Markdown: one row per Picard setting with rounds, ms per chunk and speed-up over the
    sequential sampler of the same schedule and batch, cold / warm, for each batch size."""
    from app.report import markdown_table

    picard = {_row_key(r): r for r in result["rows"] if r["sampler"] == "picard"}
    sequential = {(r["schedule"], r["batch"]): r["ms_per_chunk"]
                  for r in result["rows"] if r["sampler"] == "sequential"}
    batches = sorted({batch for _, batch in sequential})
    header = ["schedule", "update", "window", "tol", "max exact_err (cold)"]
    for batch in batches:
        header += [f"rounds B={batch} cold / warm", f"ms B={batch} cold / warm",
                   f"speed-up B={batch} cold / warm"]
    table = []
    for setting in dict.fromkeys(key[:4] for key in picard):
        rows = {(b, w): picard.get((*setting, b, w)) for b in batches for w in (False, True)}
        errs = [r["exact_err"] for (_, warm), r in rows.items() if r is not None and not warm]
        line: list = [*setting, max(errs) if errs else None]
        for batch in batches:
            cold, warm = rows[(batch, False)], rows[(batch, True)]
            if cold is None or warm is None:
                line += ["-", "-", "-"]
                continue
            base = sequential[(setting[0], batch)]
            line += [f"{cold['rounds']:.1f} / {warm['rounds']:.1f}",
                     f"{cold['ms_per_chunk']:.0f} / {warm['ms_per_chunk']:.0f}",
                     f"{base / cold['ms_per_chunk']:.2f}x / {base / warm['ms_per_chunk']:.2f}x"]
        table.append(line)
    info = result["run_info"]
    seq = ", ".join(f"{s} B={b} {ms:.0f} ms" for (s, b), ms in sequential.items())
    return "\n".join([
        f"Sampler grid: {result['network']}; median ms over {result['chunks_per_row']} chunks; "
        f"{info['device']} ({info['device_name']}), {info['threads']} threads.",
        "",
        f"Sequential: {seq}.",
        "",
        markdown_table(header, table),
        "",
    ])


def plot(result: dict, path: Path) -> None:
    """exact_err against rounds per update (grid rows) and the anytime curves, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    markers = {"ddpm-100": "o", "ddim-16": "s"}
    colors = {"scan": "tab:blue", "drift": "tab:orange"}
    for row in result["rows"]:
        if row["sampler"] != "picard" or row["warm"] or row["batch"] != 1:
            continue
        axes[0].scatter(
            row["rounds"],
            max(row["exact_err"], 1e-7),
            c=colors[row["update"]],
            marker=markers[row["schedule"]],
            alpha=0.8,
        )
    for update, color in colors.items():
        for schedule, marker in markers.items():
            axes[0].scatter([], [], c=color, marker=marker, label=f"{update} {schedule}")
    axes[0].set(
        xlabel="rounds (stopping rule)",
        ylabel="max exact_err",
        yscale="log",
        title="Grid over windows x tol (cold, B=1)",
    )
    axes[0].legend(fontsize=8)
    for curve in result["anytime"]:
        axes[1].plot(
            curve["rounds"],
            curve["mean_err"],
            color=colors[curve["update"]],
            linestyle="-" if curve["schedule"] == "ddpm-100" else "--",
            label=f"{curve['update']} {curve['schedule']}",
        )
    axes[1].set(
        xlabel="rounds (no stopping, full window)",
        ylabel="mean |X_T - sequential|",
        yscale="log",
        title="Anytime error",
        ylim=(1e-7, 1e3),
    )
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="JSON file to write")
    parser.add_argument("--quick", action="store_true", help="few windows, B=1, 3 chunks")
    parser.add_argument("--chunks", type=int, default=None, help="chunks per row (default 20)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--checkpoint", default=None, help="use a trained policy's denoiser")
    parser.add_argument("--anytime-rounds", type=int, default=30, help="rounds in anytime curves")
    args = parser.parse_args()
    if args.chunks is None:
        args.chunks = 3 if args.quick else 20
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(result, args.out.with_suffix(".png"))
    args.out.with_suffix(".md").write_text(summary_table(result))
    args.out.with_suffix(".partial.json").unlink(missing_ok=True)
    print(f"wrote {args.out} (+ .png, .md)")


if __name__ == "__main__":
    main()
