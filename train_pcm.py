"""Train a Diffusion Policy (stage=dp), then its Picard Consistency Model (stage=pcm).

    python train_pcm.py                                  # PushT low-dim, CPU-sized UNet
    python train_pcm.py resume=true                      # continue runs/<name>/latest.ckpt
    python train_pcm.py debug=tiny logger.wandb=false    # seconds-long smoke run
    python train_pcm.py stage=pcm                        # PCM for pcm.base_checkpoint (conf/pcm/)
    python train_pcm.py experiment=pcm_pusht_lowdim_cpu  # the shipped PCM's CPU recipe
    torchrun --standalone --nproc_per_node=2 train_pcm.py ...   # DDP, same global batch
    python train_pcm.py -m seed=0,1,2 eval.every=5000    # one run per seed, one seed table

A thin Hydra entry over `app.training.run_training`: one training loop, the stage (dp, pcm)
supplies the policy, data, loss and checkpoint config. Config errors print one line and exit
with status 1; SIGINT/SIGTERM finish the current step, write `latest.ckpt` and exit with status
130. Under torchrun only rank 0 prints (its error line, its progress) and Hydra writes its
files for rank 0 only. In a multirun each job trains into its own job folder (unless run_dir=
is given) and the sweep ends with `app.report.SweepSummary`'s table (seed table included).
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from app.checks import ConfigError
from app.command_line import precheck_or_exit
from app.entry import run_entry
from app.training import (
    check_fresh_or_resume,
    check_resume_world,
    launch_world,
    run_training,
    write_json,
)

CHECKED_GROUPS = ("env", "policy", "pcm", "experiment", "debug")
RANK_QUIET = ("hydra.output_subdir=null", "hydra/job_logging=disabled",
              "hydra/hydra_logging=disabled")
"""Overrides for ranks > 0: Hydra writes its config and log files once, for rank 0."""
RANK_ERROR_GRACE_S = 15
"""How long a rank > 0 with a config error waits for rank 0 to print the same line (torchrun
then stops it) before it prints the line itself: rank 0 may fail later or not at all."""


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    """Hydra entry: train into `run_dir` (in a multirun: the job's folder unless run_dir= is
    given); a run stopped by a signal exits with status 130 (it did not finish: a job
    scheduler must not take it for done)."""
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN  # a failing job must not stop the sweep
    out_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    if multirun:
        if not any(o.split("=", 1)[0].lstrip("+~") == "run_dir" for o in overrides):
            with open_dict(cfg):
                cfg.run_dir = str(out_dir)
        elif Path(cfg.run_dir).resolve() != out_dir.resolve():  # the sweep summary follows it
            write_json(out_dir / "train_run.json", {"run_dir": str(Path(cfg.run_dir).resolve())})
    summary = run_entry(lambda: run_training(cfg), failed_job_dir=out_dir if multirun else None,
                        job_overrides=overrides)
    if summary and summary.get("stopped_early"):
        if launch_world().main:
            print(f"stopped by a signal at step {summary['step']} of {summary['total_steps']}; "
                  "latest.ckpt is written: continue with resume=true", file=sys.stderr)
        if multirun:  # the sweep stops here: its table of the jobs so far
            from app.report import write_sweep_summary

            write_sweep_summary(out_dir.parent)
        sys.exit(130)


def main() -> None:
    """Check the command line in one line (unknown keys and groups, a run dir that is taken or
    cannot be made, a torchrun launch that cannot work) before Hydra writes anything, then hand
    it to Hydra. Under torchrun, ranks > 0 leave the error line to rank 0 (exit status 1
    alike) and Hydra's files to it."""
    try:
        world = launch_world()
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    if world.active and any(a in ("-m", "--multirun") for a in sys.argv[1:]):
        sys.exit("config error: torchrun runs one training run; sweep with plain python "
                 "(train_pcm.py -m ...), each job on one process" if world.main else 1)
    if not world.main:
        sys.argv += RANK_QUIET

    def run_dir_free(cfg: DictConfig, run_dir: Path) -> None:
        check_fresh_or_resume(run_dir, cfg.resume)
        check_resume_world(run_dir, cfg.resume, world)

    try:
        precheck_or_exit(sys.argv[1:], "train", CHECKED_GROUPS, "run_dir", run_dir_free)
        hydra_main()
    except SystemExit as e:
        if world.main or not isinstance(e.code, str):
            raise
        # rank 0 prints the same line, and torchrun then stops this rank (quietly: default
        # handlers); if rank 0 did not fail so, the line is said here
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        time.sleep(RANK_ERROR_GRACE_S)
        print(f"rank {world.rank}: {e.code}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
