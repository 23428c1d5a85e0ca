"""Fit the linear coarse propagators that `sampler.update=parareal` needs, for one policy.

Each schedule's propagator is the mean Jacobian of its denoising steps along sequential
trajectories of `--chunks` observation windows from the policy's own training demonstrations
(docs/design.md §4.10): 19 s for DDIM-16 and 116 s for DDPM-100 on one CPU thread (the PushT
policy, 64 windows).
It is written to `propagators.pt` beside the checkpoint (merged with the schedules already
there), which `load_policy` attaches from then on. Each fit is then checked on `--check`
validation windows: full-window Picard rounds with the scan walk and with the stored
propagator (in its stored `--dtype`), printed and kept in the file's entry as "check".

python scripts/fit_propagator.py checkpoints/pusht_lowdim/policy.ckpt --schedules ddpm-100 ddim-16
python scripts/fit_propagator.py POLICY --dtype float16   # the shipped files: half the size
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import default_collate

from app.entry import script_errors
from picard_sampler.parareal import FD_STEP
from policy.data import windows_from_config
from policy.encoders import camera_shapes
from policy.loading import load_with_metadata
from policy.propagator import (
    FILENAME,
    check_propagator,
    fit_propagator,
    save_propagators,
    schedule_key,
)

SCHEDULE_NAME = re.compile(r"^(ddpm|ddim)-([1-9][0-9]*)$")
DTYPES = {"float32": torch.float32, "float16": torch.float16}
CHECK_TOL = 0.1
"""The check's stopping tolerance: the samplers' default, so its rounds are the ones eval sees."""


def _walk(report: dict[str, float]) -> str:
    return (f"{report['rounds']} ({report['rounds_mean']:.2f}) rounds, "
            f"max |chunk - sequential| {report['exact_err_max']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="the policy (or PCM) checkpoint")
    parser.add_argument("--schedules", nargs="+", default=["ddpm-100", "ddim-16"],
                        help="schedules to fit, as NAME-STEPS (ddpm-100, ddim-16, ...)")
    parser.add_argument("--chunks", type=int, default=64,
                        help="calibration windows from the training split")
    parser.add_argument("--seed", type=int, default=0, help="picks the windows and the noise")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="stored precision (float16 halves the file; sampling is float32)")
    parser.add_argument("--check", type=int, default=16, metavar="N",
                        help="validation windows to check the rounds on (0: no check)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"file to write (default: {FILENAME} beside the checkpoint)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or (args.checkpoint if args.checkpoint.is_dir()
                       else args.checkpoint.parent) / FILENAME
    with script_errors(out):
        schedules = []
        for name in args.schedules:
            match = SCHEDULE_NAME.match(name)
            if match is None:
                raise ValueError(f"--schedules: {name!r} is not NAME-STEPS with NAME ddpm or "
                                 f"ddim (e.g. ddpm-100, ddim-16)")
            schedules.append((match[1], int(match[2])))
        if args.chunks < 1:
            raise ValueError(f"--chunks must be >= 1; got {args.chunks}")
        if args.check < 0:
            raise ValueError(f"--check must be >= 0 (0: no check); got {args.check}")
        policy, record = load_with_metadata(args.checkpoint)
        data = (record.get("config") or {}).get("data")
        if not data:
            raise ValueError(f"{args.checkpoint} names no training data (an imported policy?): "
                             "calibration needs observation windows from its demonstrations")
        seed = record["config"].get("seed", 0)  # the training run's split of the episodes

        def encoded_windows(split: str, count: int) -> torch.Tensor | None:
            """`count` windows of `split` picked by --seed, encoded; None if it has none."""
            windows = windows_from_config(data, policy.horizon, policy.n_obs_steps,
                                          policy.n_action_steps, seed, split,
                                          image_shapes=camera_shapes(policy) or None)
            if len(windows) == 0:
                return None
            picks = np.random.default_rng(args.seed).choice(
                len(windows), size=min(count, len(windows)), replace=False)
            with torch.no_grad():  # a batch of windows, arrays or maps of arrays alike
                obs = default_collate([windows[int(i)]["obs"] for i in picks])
                return policy.encode_obs(policy.check_obs(obs))

        cond = encoded_windows("train", args.chunks)
        if cond is None:
            raise ValueError(f"{args.checkpoint}: its training data has no windows")
        check_cond = encoded_windows("val", args.check) if args.check else None
        if args.check and check_cond is None:
            print("check skipped: the training data has no validation episodes")
        entries = {}
        for kind, steps in schedules:
            schedule = policy.make_sampler("picard", kind, steps).schedule
            start = time.perf_counter()
            matrices = fit_propagator(policy, schedule, cond, seed=args.seed)
            matrices = matrices.to(DTYPES[args.dtype])
            seconds = time.perf_counter() - start
            entry = {
                "propagator": matrices, "schedule": {"class": type(schedule).__name__,
                                                     **schedule.config},
                "calibration": {"chunks": cond.shape[0], "seed": args.seed, "split": "train",
                                "fd_step": FD_STEP, "seconds": round(seconds, 1)},
            }
            print(f"{kind}-{steps}: fitted on {cond.shape[0]} windows in {seconds:.1f} s "
                  f"({args.dtype})")
            if check_cond is not None:
                report = check_propagator(policy, schedule, check_cond, matrices,
                                          seed=args.seed, tol=CHECK_TOL)
                entry["check"] = {"windows": check_cond.shape[0], "split": "val",
                                  "tol": CHECK_TOL, "window": "full", **report}
                print(f"  check on {check_cond.shape[0]} validation windows (full-window "
                      f"Picard, tol {CHECK_TOL:g}; the batch's rounds, per-sample mean): scan "
                      f"{_walk(report['scan'])}; parareal {_walk(report['parareal'])}")
            entries[schedule_key(schedule)] = entry
        path = save_propagators(out, policy, entries)
        print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
