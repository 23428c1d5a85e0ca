"""Evaluate a trained Diffusion Policy in its environment under a chosen sampler: the main job.

    python eval_policy.py                                 # shipped PushT policy, sampler=auto
    python eval_policy.py sampler=sequential_ddpm100 n_episodes=10 video=true
    python eval_policy.py -m sampler=sequential_ddpm100,picard_ddpm100   # one summary table

A thin Hydra entry over `app.evaluation.run_eval` (which reads top to bottom: checkpoint, env,
sampler, rollout, metrics, outputs). Config errors print one line and exit with status 1;
Ctrl-C or SIGTERM keeps the finished episodes in results.json and exits with status 130. After
a multirun, `app.report.SweepSummary` (registered in conf/eval.yaml) writes one table over the
sweep, failed jobs included (their failed.json says why); the sweep then exits with status 1 if
any job failed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from app.builder import POLICY_RUN_GROUPS
from app.command_line import precheck_or_exit
from app.entry import run_entry
from app.evaluation import run_eval
from app.run_dirs import check_results_free

CHECKED_GROUPS = POLICY_RUN_GROUPS  # conf/policy_run/: sampler, runtime, env


@hydra.main(config_path="conf", config_name="eval", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    """Hydra entry: evaluate into the Hydra run dir."""
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN  # a failing job must not stop the sweep
    overrides = list(hydra_cfg.overrides.task)
    run_entry(lambda: run_eval(cfg, out_dir, overrides),
              failed_job_dir=out_dir if multirun else None, job_overrides=overrides)


def main() -> None:
    """Check the command line in one line (unknown keys and groups, a run dir that is taken or
    cannot be made) before Hydra writes anything, then hand it to Hydra."""
    precheck_or_exit(sys.argv[1:], "eval", CHECKED_GROUPS, "hydra.run.dir",
                     lambda cfg, run_dir: check_results_free(run_dir, cfg.overwrite))
    hydra_main()


if __name__ == "__main__":
    main()
