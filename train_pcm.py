"""Train a Diffusion Policy (stage=dp), then its Picard Consistency Model (stage=pcm).

    python train_pcm.py                                  # PushT low-dim, CPU-sized UNet
    python train_pcm.py resume=true                      # continue runs/<name>/latest.ckpt
    python train_pcm.py debug=tiny logger.wandb=false    # seconds-long smoke run
    python train_pcm.py stage=pcm                        # PCM for pcm.base_checkpoint (conf/pcm/)
    python train_pcm.py experiment=pcm_pusht_lowdim_cpu  # the shipped PCM's CPU recipe

A thin Hydra entry over `app.training.run_training`: one training loop, the stage (dp, pcm)
supplies the policy, data, loss and checkpoint config. Config errors print one line and exit
with status 1; SIGINT/SIGTERM finish the current step, write `latest.ckpt` and exit with status
130.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from app.config import precheck_or_exit, run_entry
from app.training import check_fresh_or_resume, run_training

CHECKED_GROUPS = ("env", "policy", "pcm", "experiment", "debug")


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    """Hydra entry: train into `run_dir`; a run stopped by a signal exits with status 130 (it
    did not finish: a job scheduler must not take it for done)."""
    summary = run_entry(lambda: run_training(cfg))
    if summary and summary.get("stopped_early"):
        print(f"stopped by a signal at step {summary['step']} of {summary['total_steps']}; "
              "latest.ckpt is written: continue with resume=true", file=sys.stderr)
        sys.exit(130)


def main() -> None:
    """Check the command line in one line (unknown keys and groups, a run dir that is taken or
    cannot be made) before Hydra writes anything, then hand it to Hydra."""
    precheck_or_exit(sys.argv[1:], "train", CHECKED_GROUPS, "run_dir",
                     lambda cfg, run_dir: check_fresh_or_resume(run_dir, cfg.resume))
    hydra_main()


if __name__ == "__main__":
    main()
