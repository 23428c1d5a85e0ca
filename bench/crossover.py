"""Where each exact sampler wins: chunk latency against batch for every candidate of
sampler=auto, per runtime and thread count, and what auto chose in the same run.

For each thread count, batch B (envs per sampler call) and runtime: every candidate that
sampler=auto considers (sequential; Picard / PCM over the windows, scan and, with a fitted
propagator, Parareal) samples `--chunks` chunks of real PushT observations (the first
observations of episodes 100000.., as a rollout stacks them) after one warm-up chunk; a row
holds its median and p90 latency and rounds. Then sampler=auto calibrates from scratch for
the same (B, threads) and its choice is timed the same way, so "auto within 5 % of the best
fixed configuration" is read off one run. JSON rows (device, threads, versions in each) and a
PNG: latency vs B per candidate, one panel per (threads, runtime).

    python bench/crossover.py --quick --out /tmp/crossover.json         # a few minutes
    python bench/crossover.py --out bench/results/crossover_cpu.json    # the full grid
    python bench/crossover.py --model large --batches 1 --out bench/results/crossover_large.json
    python bench/crossover.py --calibration --batches 1 10 --threads 1 2 \
        --out bench/results/auto_calibration_cpu.json   # only auto's choice and its time
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from picard_sampler.runinfo import run_info
from policy import load_policy
from policy.autotune import Candidate, candidates, choose_sampler, time_chunk
from policy.diffusion_policy import DiffusionPolicy
from policy.file_io import atomic_write

SHIPPED = "checkpoints/pusht_lowdim/policy.ckpt"  # with its propagators.pt (Parareal)
WINDOWS = (4, 8, 16, 32, None)


def pusht_observations(batch: int, policy: DiffusionPolicy) -> Any:
    """The first observations of PushT episodes 100000.. (keypoints), as the rollout stacks
    them: what eval's sampler=auto calibrates on."""
    from app.builder import calibration_observations, make_env_factory

    env = {"id": "envs:PushT-v0", "kwargs": {"obs_type": "keypoints"}}
    return calibration_observations(make_env_factory(env, 300, render=False), policy, batch,
                                    100000)


def large_policy() -> DiffusionPolicy:
    """DP's paper-size low-dim UNet (65.8M parameters; conf/policy/unet_lowdim_large.yaml),
    random weights (timing only), PushT's keypoint observations."""
    from omegaconf import OmegaConf

    from policy.safe_config import build_policy

    large = OmegaConf.load("conf/policy/unet_lowdim_large.yaml")
    large.pop("defaults")  # Hydra's defaults list: the large file is unet_lowdim + its changes
    config = OmegaConf.to_container(OmegaConf.merge(OmegaConf.load("conf/policy/unet_lowdim.yaml"),
                                                    large))
    config.update(action_dim=2)
    config["obs_encoder"]["obs_dim"] = 20
    policy = build_policy(config, "conf/policy/unet_lowdim_large.yaml")
    rng = np.random.default_rng(0)
    policy.normalizer.fit({"obs": rng.uniform(0, 512, (100, 20)),
                           "action": rng.uniform(0, 512, (100, 2))})
    return policy.eval()


def time_candidate(policy: DiffusionPolicy, cond: torch.Tensor, candidate: Candidate,
                   base: Any, chunks: int, seed: int) -> dict[str, Any]:
    """Median / p90 ms and mean rounds of `chunks` chunks after one warm-up chunk."""
    sampler = candidate.sampler(base)
    generator = torch.Generator().manual_seed(seed)
    shape = base.noise_shape(cond.shape[0], policy.horizon, policy.action_dim)
    time_chunk(policy, cond, sampler, torch.randn(shape, generator=generator))  # warm-up
    timed = [time_chunk(policy, cond, sampler, torch.randn(shape, generator=generator))
             for _ in range(chunks)]
    ms = [t[0] for t in timed if t is not None]
    return {"candidate": candidate.short, "method": candidate.method,
            "window": candidate.window, "update": candidate.update,
            "runtime": candidate.runtime, "latency_ms_p50": statistics.median(ms),
            "latency_ms_p90": float(np.percentile(ms, 90)),
            "rounds_mean": statistics.fmean(t[1] for t in timed if t is not None),
            "chunks": len(ms)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", choices=("shipped", "large"), default="shipped")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 10, 20])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runtimes", nargs="+", default=["eager", "onnxruntime"])
    parser.add_argument("--chunks", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu, cuda (then --runtimes eager "
                                                       "cuda_graph)")
    parser.add_argument("--quick", action="store_true", help="B 1 and 10, 2 threads, 2 chunks")
    parser.add_argument("--replot", action="store_true",
                        help="only redraw --out's PNG from its JSON")
    parser.add_argument("--calibration", action="store_true",
                        help="only sampler=auto's calibration per (threads, B): choice and time")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.threads, args.chunks = [1, 10], [2], 2
    if args.replot:
        plot(json.loads(args.out.read_text())["rows"], args.out.with_suffix(".png"))
        return
    device = torch.device(args.device)
    policy = (load_policy(SHIPPED) if args.model == "shipped" else large_policy()).to(device)
    base = policy.make_sampler("picard", "ddpm", 100, tol=0.1)
    if args.calibration:
        calibrate_only(policy, base, args, device)
        return
    rows: list[dict[str, Any]] = []
    started = time.time()
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.batches:
            obs = pusht_observations(batch, policy)
            cond = policy.encode(obs)
            for runtime in args.runtimes:
                policy.use_runtime(runtime)
                for candidate in candidates(policy, base, WINDOWS, runtime):
                    row = time_candidate(policy, cond, candidate, base, args.chunks, batch)
                    rows.append({"threads": threads, "batch": batch, "kind": "fixed", **row})
                    print(f"x{threads} B={batch:2d} {candidate.short:32s} "
                          f"{row['latency_ms_p50']:8.1f} ms  {row['rounds_mean']:5.1f} rounds",
                          flush=True)
            policy.use_runtime("eager")
            tick = time.perf_counter()
            choice = choose_sampler(policy, obs, base, windows=WINDOWS, runtimes=args.runtimes,
                                    cache_dir=None)
            seconds = time.perf_counter() - tick
            row = time_candidate(policy, cond, choice.candidate, base, args.chunks, batch)
            fixed = [r for r in rows if r["threads"] == threads and r["batch"] == batch
                     and r["kind"] == "fixed"]
            best = min(fixed, key=lambda r: r["latency_ms_p50"])
            sequential = next(r for r in fixed if r["method"] == "sequential"
                              and r["runtime"] == "eager")
            rows.append({"threads": threads, "batch": batch, "kind": "auto", **row,
                         "calibration_s": seconds, "best_fixed": best["candidate"],
                         "best_fixed_ms": best["latency_ms_p50"],
                         "vs_best": row["latency_ms_p50"] / best["latency_ms_p50"],
                         "speedup_vs_sequential": sequential["latency_ms_p50"]
                         / row["latency_ms_p50"]})
            print(f"x{threads} B={batch:2d} auto -> {choice.candidate.short}: "
                  f"{row['latency_ms_p50']:.1f} ms ({rows[-1]['vs_best']:.2f}x the best fixed "
                  f"{best['candidate']}, {rows[-1]['speedup_vs_sequential']:.2f}x sequential), "
                  f"calibrated in {seconds:.1f} s", flush=True)
            policy.use_runtime("eager")
    payload = {"command": shlex.join([sys.executable, *sys.argv]), "model": args.model,
               "run_info": run_info(device), "seconds": time.time() - started,
               "rows": rows}
    atomic_write(args.out, lambda f: f.write(json.dumps(payload, indent=1).encode()))
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def calibrate_only(policy: DiffusionPolicy, base: Any, args: argparse.Namespace,
                   device: torch.device) -> None:
    """sampler=auto's choice and calibration time per (threads, B), from scratch (no cache)."""
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.batches:
            obs = pusht_observations(batch, policy)
            tick = time.perf_counter()
            choice = choose_sampler(policy, obs, base, windows=WINDOWS, runtimes=args.runtimes,
                                    cache_dir=None)
            seconds = time.perf_counter() - tick
            line = choice.line(device.type, threads, batch)
            print(line, flush=True)
            rows.append({"threads": threads, "batch": batch, "seconds": seconds, "line": line,
                         "chosen": choice.candidate.short, "calibration": choice.calibration})
            policy.use_runtime("eager")
    payload = {"command": shlex.join([sys.executable, *sys.argv]), "run_info": run_info(device),
               "rows": rows}
    atomic_write(args.out, lambda f: f.write(json.dumps(payload, indent=1).encode()))


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Latency vs batch per candidate, one panel per (threads, runtime); auto as black dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["threads"], r["runtime"]) for r in rows if r["kind"] == "fixed"})
    names = list(dict.fromkeys(r["candidate"].split(" +")[0] for r in rows
                               if r["kind"] == "fixed"))
    colours = dict(zip(names, plt.cm.tab20(np.linspace(0, 1, max(len(names), 2))),
                       strict=True))  # 11 candidates: more than the default cycle's 10
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (threads, runtime) in zip(axes[0], panels, strict=True):
        mine = [r for r in rows if r["threads"] == threads and r["runtime"] == runtime
                and r["kind"] == "fixed"]
        for name in dict.fromkeys(r["candidate"] for r in mine):
            line = sorted((r["batch"], r["latency_ms_p50"]) for r in mine
                          if r["candidate"] == name)
            label = name.replace(f" +{runtime}", "")  # the panel names the runtime
            ax.plot(*zip(*line, strict=True), marker="o", label=label, color=colours[label],
                    linestyle="--" if "sequential" in name else "-")
        auto = sorted((r["batch"], r["latency_ms_p50"]) for r in rows
                      if r["kind"] == "auto" and r["threads"] == threads)
        if auto:
            ax.plot(*zip(*auto, strict=True), "k*", markersize=12, label="auto's choice")
        ax.set(xscale="log", yscale="log", xlabel="batch (envs per call)",
               ylabel="chunk latency p50 (ms)", title=f"{runtime}, {threads} thread(s)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
