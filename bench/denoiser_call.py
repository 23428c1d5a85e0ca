"""Per-call latency of the shipped PushT UNet under each way of running it, at the row counts
the samplers use (1: sequential at B = 1; 16: a window or DDIM-16 Picard round; 100: a full
DDPM-100 Picard round): where a CPU chunk's time goes, and what a runtime would have to beat.

Variants: eager float32 (what `runtime=eager` runs), eager under bfloat16 autocast, torch.compile
with dynamic shapes (`runtime=compile`), with static shapes, and static with Inductor's weight
freezing, onnxruntime on the dynamic-row export (`runtime=onnxruntime`) and on a static export
per row count. Each variant runs in its own process (two thread pools in one process slow each
other down), measures every row count after warm-up calls, and reports p50 / p99 per call, the
first call's time (compilation) and max |output - eager float32| on the same inputs.

    python bench/denoiser_call.py --out bench/results/denoiser_call_cpu.json --threads 2
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from picard_sampler import percentile  # noqa: E402
from picard_sampler.runinfo import run_info  # noqa: E402
from policy import load_policy  # noqa: E402
from policy.file_io import atomic_write  # noqa: E402

CHECKPOINT = ROOT / "checkpoints/pusht_lowdim/policy.ckpt"
VARIANTS = ("eager", "eager_bf16", "compile_dynamic", "compile_static", "compile_freezing",
            "onnxruntime_dynamic", "onnxruntime_static")


def inputs(model: torch.nn.Module, rows: int, horizon: int) -> tuple[torch.Tensor, ...]:
    """Fixed random inputs of `rows` rows (the same for every variant)."""
    g = torch.Generator().manual_seed(rows)
    return (torch.randn(rows, horizon, model.input_dim, generator=g),
            torch.randint(0, 100, (rows,), generator=g),
            torch.randn(rows, model.global_cond_dim, generator=g))


def onnx_session(model: torch.nn.Module, horizon: int, rows: int | None, folder: Path) -> Any:
    """An onnxruntime session of the UNet exported with a dynamic row axis (`rows` None, the
    runtime's export) or for `rows` fixed rows; threads spin as onnxruntime's default does."""
    from policy.runtime import export_onnx
    from policy.runtime import onnx_session as runtime_session

    path = folder / f"unet_{'dynamic' if rows is None else rows}.onnx"
    export_onnx(model, horizon, path, rows)
    return runtime_session(path, spinning=True)


def measure_variant(variant: str, rows_list: list[int], calls: int, threads: int) -> list[dict]:
    """Rows of one variant (run in its own process)."""
    torch.set_num_threads(threads)
    policy = load_policy(CHECKPOINT)
    model = policy.model.eval()
    out: list[dict[str, Any]] = []
    folder = Path(tempfile.mkdtemp(prefix="denoiser_call_"))
    compiled = None
    if variant.startswith("compile"):
        import torch._inductor.config as inductor

        inductor.freezing = variant == "compile_freezing"
        compiled = torch.compile(model, dynamic=variant == "compile_dynamic")
    session = None
    if variant == "onnxruntime_dynamic":
        session = onnx_session(model, policy.horizon, None, folder)
    for rows in rows_list:
        x = inputs(model, rows, policy.horizon)
        with torch.inference_mode():
            reference = model(*x)
        if variant == "onnxruntime_static":
            session = onnx_session(model, policy.horizon, rows, folder)
        if session is not None:
            feeds = {"sample": x[0].numpy(), "timestep": x[1].numpy(), "global_cond": x[2].numpy()}

            def call(feeds: dict = feeds, session: Any = session) -> torch.Tensor:
                return torch.from_numpy(session.run(None, feeds)[0])
        else:
            def call(x: tuple = x) -> torch.Tensor:
                with torch.inference_mode():
                    if variant == "eager_bf16":
                        with torch.autocast("cpu", dtype=torch.bfloat16):
                            return model(*x).float()
                    return (model if compiled is None else compiled)(*x)
        start = time.perf_counter()
        first = call()
        first_s = time.perf_counter() - start
        for _ in range(5):
            call()
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1e3)
        out.append({
            "variant": variant, "rows": rows, "latency_ms_p50": float(np.median(times)),
            "latency_ms_p99": percentile(times, 99), "first_call_s": first_s,
            "max_abs_diff": float((first - reference).abs().max()), "calls": calls,
            "threads": threads,
        })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="JSON file to write (with a .png)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 100])
    parser.add_argument("--calls", type=int, default=100, help="timed calls per row count")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one variant, rows on stdout
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_variant(args.child, args.rows, args.calls, args.threads)))
        return
    if args.out is None:
        parser.error("--out is required")
    rows: list[dict[str, Any]] = []
    for variant in args.variants:
        child = [sys.executable, __file__, "--child", variant, "--rows",
                 *map(str, args.rows), "--calls", str(args.calls), "--threads",
                 str(args.threads)]
        done = subprocess.run(child, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
            rows.append({"variant": variant, "skipped": tail[0]})
            print(f"{variant}: failed: {tail[0]}")
            continue
        for row in json.loads(done.stdout.strip().splitlines()[-1]):
            rows.append(row)
            print(f"{variant:20s} rows {row['rows']:4d}  p50 {row['latency_ms_p50']:7.2f} ms  "
                  f"p99 {row['latency_ms_p99']:7.2f} ms  first {row['first_call_s']:6.1f} s  "
                  f"diff {row['max_abs_diff']:.1e}", flush=True)
    record = {"benchmark": "denoiser_call", "command": shlex.join(["python", *sys.argv]),
              "checkpoint": str(CHECKPOINT.relative_to(ROOT)),
              "run_info": run_info(torch.device("cpu")), "rows": rows}
    atomic_write(args.out, lambda f: f.write((json.dumps(record, indent=1) + "\n").encode()))
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """p50 per call against rows per call, one line per variant (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant in dict.fromkeys(r["variant"] for r in rows if "skipped" not in r):
        mine = [r for r in rows if r.get("variant") == variant and "skipped" not in r]
        ax.plot([r["rows"] for r in mine], [r["latency_ms_p50"] for r in mine], "o-",
                label=variant)
    ax.set(xscale="log", yscale="log", xlabel="rows per call",
           ylabel="latency per call p50 (ms)", title="shipped PushT UNet (4.56M), CPU")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
