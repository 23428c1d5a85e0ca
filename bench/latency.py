"""Per-chunk latency of every sampler under every denoiser runtime, with what it costs in
exactness: which runtime is fastest depends on the shape of the call, so it is measured.

For each model (the shipped 4.56M PushT UNet, DP's paper-size 65.8M low-dim UNet, the image
policy's UNet alone, and two whole camera policies: the size of the imported DP / LeRobot image
fixtures (full-width ResNet-18 on 84x84 crops, UNet 32-64-128) and the shipped PushT image
policy (quarter-width ResNet-18, UNet 64-128-256, with its PCM); random weights where none is
shipped),
batch B (envs per sampler call), runtime and sampler, one row:
latency p50 / p99 of a whole chunk after warm-up, rounds, NFE, `exact_err` against sequential
sampling of the same schedule in eager float32 on the same noise, and `runtime_err` against the
same sampler in eager float32 (what the runtime itself changes); device, threads and versions in
every row. A camera policy's rows add `encode_ms_p50`, its observation encoder's time per chunk
(run once per chunk whatever the sampler), and `chunk_ms_p50` = encoder + sampler.
Samplers: sequential DDPM-100 and DDIM-16, Picard DDPM-100 (full window and 16), Picard DDIM-16
and PCM DDIM-16 (the shipped PCM on the shipped model; an untrained one,
exact by model switching, elsewhere: its latency only).

    python bench/latency.py --quick --out /tmp/latency.json        # ~2 minutes on a CPU
    python bench/latency.py --out bench/results/latency_cpu.json --threads 2
    python bench/latency.py --device cuda --runtimes eager cuda_graph \\
        --out bench/results/latency_gpu.json                          # scripts/gpu_latency.sh
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from picard_sampler import CallInputs, Sampler, exact_errors, is_exact, percentile
from picard_sampler.runinfo import package_versions, run_info
from policy import load_policy
from policy.diffusion_policy import DiffusionPolicy
from policy.encoders import LowDimObsEncoder
from policy.file_io import atomic_write
from policy.normalizer import LinearNormalizer
from policy.pcm import build_pcm
from policy.unet import ConditionalUnet1D

SHIPPED = "checkpoints/pusht_lowdim/pcm.ckpt"  # the shipped policy with its DDIM-16 PCM
SHIPPED_IMAGE_PCM = "checkpoints/pusht_image/pcm.ckpt"  # the image policy with its DDIM-16 PCM
SAMPLERS: dict[str, dict[str, Any]] = {
    "sequential DDPM-100": {"method": "sequential", "schedule": "ddpm", "steps": 100},
    "sequential DDIM-16": {"method": "sequential", "schedule": "ddim", "steps": 16},
    "picard DDPM-100 full": {"method": "picard", "schedule": "ddpm", "steps": 100, "window": None},
    "picard DDPM-100 w16": {"method": "picard", "schedule": "ddpm", "steps": 100, "window": 16},
    "picard DDIM-16": {"method": "picard", "schedule": "ddim", "steps": 16, "window": None},
    "pcm DDIM-16": {"method": "pcm", "schedule": "ddim", "steps": 16, "window": None},
    # Parareal with the policy's fitted propagator (design §4.10): the shipped model only
    "picard DDPM-100 full parareal": {"method": "picard", "schedule": "ddpm", "steps": 100,
                                      "window": None, "update": "parareal"},
    "picard DDIM-16 parareal": {"method": "picard", "schedule": "ddim", "steps": 16,
                                "window": None, "update": "parareal"},
    "pcm DDIM-16 parareal": {"method": "pcm", "schedule": "ddim", "steps": 16, "window": None,
                             "update": "parareal"},
    "pcm DDPM-100 parareal": {"method": "pcm", "schedule": "ddpm", "steps": 100, "window": None,
                              "update": "parareal"},
}
RUNTIME_PACKAGES = ("onnxruntime", "onnx")


def random_policy(down_dims: tuple[int, ...], step_embed: int, feature_dim: int,
                  seed: int = 0) -> DiffusionPolicy:
    """A DiffusionPolicy with a random UNet of these sizes (To=2, H=16, Da=2) and an untrained
    PCM: what latency needs, no trained weights."""
    from picard_sampler import DDPMSchedule

    torch.manual_seed(seed)
    policy = DiffusionPolicy(
        lambda input_dim, global_cond_dim: ConditionalUnet1D(
            input_dim, global_cond_dim, down_dims=down_dims, diffusion_step_embed_dim=step_embed),
        LowDimObsEncoder(feature_dim), LinearNormalizer(), action_dim=2,
        train_schedule=DDPMSchedule(),
    )
    policy.attach_pcm(build_pcm(policy))
    return policy.eval()


def random_image_policy(down_dims: tuple[int, ...], step_embed: int, width: int,
                        seed: int = 0) -> DiffusionPolicy:
    """A whole camera policy with random weights: one 96x96 camera (84x84 crops, ResNet-18 of
    `width`, 32 keypoints, 64 features) + agent_pos, a UNet of `down_dims`, an untrained PCM."""
    from picard_sampler import DDPMSchedule
    from policy.encoders import ImageObsEncoder

    torch.manual_seed(seed)
    policy = DiffusionPolicy(
        lambda input_dim, global_cond_dim: ConditionalUnet1D(
            input_dim, global_cond_dim, down_dims=down_dims, diffusion_step_embed_dim=step_embed),
        ImageObsEncoder({"image": (96, 96, 3)}, {"agent_pos": (2,)}, width=width),
        LinearNormalizer(), action_dim=2, train_schedule=DDPMSchedule(),
    )
    rng = np.random.default_rng(seed)
    policy.normalizer.fit({"agent_pos": rng.uniform(0, 512, (100, 2)),
                           "action": rng.uniform(0, 512, (100, 2))})
    policy.attach_pcm(build_pcm(policy))
    return policy.eval()


MODELS: dict[str, Callable[[], DiffusionPolicy]] = {
    "pusht 4.56M (shipped)": lambda: load_policy(SHIPPED),
    "pusht 4.56M + DDPM-100 PCM": lambda: load_policy("checkpoints/pusht_lowdim/pcm_ddpm100.ckpt"),
    "dp low-dim 65.8M": lambda: random_policy((256, 512, 1024), 256, 20),
    "image UNet (1 camera)": lambda: random_policy((256, 512, 1024), 128, 66),
    "image policy, fixture size (ResNet-18 x64)": lambda: random_image_policy((32, 64, 128), 64,
                                                                              64),
    "pusht image 5.60M (shipped, ResNet-18 x16)": lambda: load_policy(SHIPPED_IMAGE_PCM),
}


def time_chunks(policy: DiffusionPolicy, sampler: Sampler, noise: torch.Tensor,
                cond: torch.Tensor, n_chunks: int, warmup: int) -> tuple[list[float], Any]:
    """Wall times (ms) of `n_chunks` sampler calls after `warmup` untimed ones; the last
    call's (sample, stats)."""
    pcm = policy.pcm_denoiser if policy.pcm is not None else None
    propagator = policy.propagator_for(sampler.schedule) if sampler.needs_propagator else None
    times, result = [], None
    for i in range(warmup + n_chunks):
        if noise.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            result = sampler(policy.denoiser, noise, cond, CallInputs(propagator=propagator),
                             denoiser_pcm=pcm, pcm_sees_noise=policy.pcm_sees_noise)
        if noise.is_cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return times, result


def camera_observations(policy: DiffusionPolicy, batch: int) -> dict[str, np.ndarray]:
    """Random frames (uint8) and low-dim values of a camera policy's observation keys."""
    rng = np.random.default_rng(batch)
    obs = {}
    for key, shape in policy.obs_encoder.obs_shapes.items():
        full = (batch, policy.n_obs_steps, *shape)
        obs[key] = (rng.integers(0, 256, full, dtype=np.uint8) if len(shape) == 3
                    else rng.uniform(0, 512, full))
    return obs


def encoder_times(policy: DiffusionPolicy, batch: int, n: int) -> list[float] | None:
    """ms of `n` observation-encoder calls for `batch` observations after one warm-up (None
    for a low-dim policy: its encoder is an identity)."""
    if not hasattr(policy.obs_encoder, "cameras"):
        return None
    obs = camera_observations(policy, batch)
    policy.encode(obs)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        policy.encode(obs)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def runtime_options(runtime: str, args: argparse.Namespace) -> dict[str, Any]:
    """The options of `runtime` for this run (onnxruntime: its export cache and spinning;
    eager: a reduced `--precision`, autocast)."""
    if runtime == "eager" and args.precision != "float32":
        return {"precision": args.precision}
    if runtime != "onnxruntime":
        return {}
    return {"cache_dir": args.cache_dir, "spinning": args.ort_spinning}


def measure_model(name: str, policy: DiffusionPolicy, args: argparse.Namespace,
                  device: torch.device) -> list[dict[str, Any]]:
    """Every (batch, sampler, runtime) row of one model."""
    rows = []
    policy = policy.to(device)
    for batch in args.batch:
        g = torch.Generator().manual_seed(batch)
        cond = torch.randn(batch, policy.model.global_cond_dim, generator=g).to(device)
        encode_ms = encoder_times(policy, batch, args.chunks)
        if encode_ms is not None:  # a camera policy: sample from a real encoding
            cond = policy.encode(camera_observations(policy, batch))
        references: dict[tuple[str, int], torch.Tensor] = {}
        eager_results: dict[str, torch.Tensor] = {}
        for runtime in args.runtimes:
            try:
                policy.use_runtime(runtime, **runtime_options(runtime, args))
            except Exception as e:  # unavailable here: one row saying why
                rows.append({"model": name, "batch": batch, "runtime": runtime,
                             "skipped": f"{type(e).__name__}: {e}"})
                continue
            for label in args.samplers:
                spec = SAMPLERS[label]
                sampler = policy.make_sampler(
                    spec["method"], spec["schedule"], spec["steps"],
                    **({"window": spec["window"], "tol": args.tol,
                        "update": spec.get("update", "scan")}
                       if spec["method"] != "sequential" else {}))
                if sampler.needs_propagator and not policy.has_propagator(sampler.schedule):
                    continue  # random weights have no fitted propagator (design §4.10)
                noise = torch.randn(sampler.noise_shape(batch, policy.horizon, policy.action_dim),
                                    generator=torch.Generator().manual_seed(7)).to(device)
                key = (spec["schedule"], spec["steps"])
                if key not in references:  # sequential, eager, float32, same noise
                    policy.use_runtime("eager")
                    reference = policy.make_sampler("sequential", spec["schedule"], spec["steps"])
                    _, (_, stats) = time_chunks(policy, reference, noise, cond, 1, 0)
                    references[key] = stats.sample
                    policy.use_runtime(runtime, **runtime_options(runtime, args))
                n_chunks = max(1, args.chunks // (4 if "full" in label and batch > 1 else 1))
                times, (_, stats) = time_chunks(policy, sampler, noise, cond, n_chunks,
                                                args.warmup)
                if runtime == "eager" and args.precision == "float32":
                    eager_results[label] = stats.sample
                reference_same = eager_results.get(label)
                errors = exact_errors(stats.sample, references[key])
                rows.append({
                    "model": name, "batch": batch, "runtime": runtime, "sampler": label,
                    "runtime_options": {k: v for k, v in runtime_options(runtime, args).items()
                                        if k != "cache_dir"},
                    "tol": None if spec["method"] == "sequential" else args.tol,
                    "latency_ms_p50": percentile(times, 50),
                    "latency_ms_p99": percentile(times, 99),
                    **({} if encode_ms is None else {
                        "encode_ms_p50": percentile(encode_ms, 50),
                        "chunk_ms_p50": percentile(encode_ms, 50) + percentile(times, 50)}),
                    "n_chunks": len(times), "rounds": stats.rounds, "nfe": stats.nfe,
                    "exact_err": float(errors.max()),
                    "exact_err_mean": float(errors.mean()),
                    "runtime_err": (None if reference_same is None else
                                    float(exact_errors(stats.sample, reference_same).max())),
                    "device": str(device), "threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                    "runtime_versions": package_versions(RUNTIME_PACKAGES),
                })
                print(f"{name:24s} B={batch:<3d} {runtime:12s} {label:22s} "
                      f"p50 {rows[-1]['latency_ms_p50']:9.1f} ms  rounds {stats.rounds:3d}  "
                      f"exact_err {rows[-1]['exact_err']:.2e}", flush=True)
        policy.use_runtime("eager")
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Latency p50 against exact_err, one marker per runtime, one panel per model and batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if "skipped" not in r]
    panels = sorted({(r["model"], r["batch"]) for r in measured})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    markers = dict(zip(("eager", "onnxruntime", "compile", "cuda_graph"), "os^D", strict=True))
    for ax, (model, batch) in zip(axes[0], panels, strict=True):
        for r in (r for r in measured if (r["model"], r["batch"]) == (model, batch)):
            ax.scatter(r["latency_ms_p50"], max(r["exact_err"], 1e-7),
                       marker=markers.get(r["runtime"], "x"), label=f"{r['runtime']}")
            ax.annotate(r["sampler"], (r["latency_ms_p50"], max(r["exact_err"], 1e-7)),
                        fontsize=6)
        ax.set(xscale="log", yscale="log", title=f"{model}, B={batch}",
               xlabel="latency per chunk p50 (ms)", ylabel="exact_err (floor 1e-7)")
        handles, labels = ax.get_legend_handles_labels()
        ax.legend(dict(zip(labels, handles, strict=False)).values(),
                  dict(zip(labels, handles, strict=False)).keys(), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--models", nargs="+", choices=list(MODELS),
                        default=[m for m in MODELS if m != "pusht 4.56M + DDPM-100 PCM"],
                        help="the PCM-for-DDPM-100 model is run only when named")
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    parser.add_argument("--runtimes", nargs="+", default=["eager", "onnxruntime"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--chunks", type=int, default=20, help="timed chunks per row")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--tol", type=float, default=0.1, help="Picard / PCM tolerance")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ort-spinning", action="store_true",
                        help="runtime=onnxruntime with spinning=true (threads busy-wait)")
    parser.add_argument("--precision", default="float32",
                        choices=["float32", "bfloat16", "float16"],
                        help="eager rows under autocast to this dtype (exact_err shows the cost)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/picard-policy"))
    parser.add_argument("--quick", action="store_true",
                        help="the shipped model, B=1, 5 chunks: a couple of minutes on a CPU")
    args = parser.parse_args()
    if args.quick:
        args.models, args.batch, args.chunks = [next(iter(MODELS))], [1], 5
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows: list[dict[str, Any]] = []
    for name in args.models:
        rows += measure_model(name, MODELS[name](), args, device)
        write(args, rows, device)
    write(args, rows, device)
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def write(args: argparse.Namespace, rows: list[dict[str, Any]], device: torch.device) -> None:
    """The rows so far, atomically (a killed run keeps its finished models)."""
    record = {
        "benchmark": "latency", "command": shlex.join(["python", *sys.argv]),
        "run_info": run_info(device), "quick": args.quick, "rows": rows,
        "fastest_exact": fastest_exact(rows),
    }
    atomic_write(args.out, lambda f: f.write((json.dumps(record, indent=1) + "\n").encode()))


def fastest_exact(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (model, batch, schedule): the fastest row whose chunks are exact
    (picard_sampler.is_exact over the batch's chunks), with its runtime and sampler."""
    best: dict[str, Any] = {}
    for r in rows:
        if "skipped" in r or not is_exact(r["exact_err"], r.get("exact_err_mean")):
            continue
        key = f"{r['model']} | B={r['batch']} | {r['sampler'].split()[1]}"
        if key not in best or r["latency_ms_p50"] < best[key]["latency_ms_p50"]:
            best[key] = {k: r[k] for k in ("runtime", "sampler", "latency_ms_p50",
                                           "latency_ms_p99", "exact_err")}
    return dict(sorted(best.items()))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
