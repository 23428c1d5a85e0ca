"""Runs that cannot silently go wrong (issue 31 item 4): an output folder that cannot be made is
one line before Hydra starts, two runs cannot write one folder at once, a knob that switches
exactness off is refused or reported, and an absurd episode count fails in one line."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from app.checks import ConfigError
from app.command_line import CONF_DIR
from app.evaluation import MAX_EPISODES, check_eval_config, exactness_warning
from app.run_dirs import check_run_dir, claim_output_dir
from picard_sampler import DDPMSchedule, Sampler
from tests.conftest import run_repo_script

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        check_run_dir(blocker / "run")
    with pytest.raises(ConfigError, match="nothing can be written in /proc"):
        check_run_dir(Path("/proc/picard/run"))
    check_run_dir(tmp_path / "new" / "run")  # fine: nothing is left behind by the probe
    assert not (tmp_path / "new").exists() and [p.name for p in tmp_path.iterdir()] == ["a_file"]
    done = run_repo_script("eval_policy.py", "hydra.run.dir=/proc/picard/run", timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "config error: output folder /proc/picard/run cannot be created: nothing can be written "
        "in /proc (No such file or directory)"]


def test_two_runs_cannot_claim_one_folder(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; "
         "from app.run_dirs import claim_output_dir; claim_output_dir(Path(sys.argv[1])); "
         "print('claimed', flush=True); sys.stdin.read()", str(folder)],
        cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        with pytest.raises(ConfigError, match="is in use by another run"):
            claim_output_dir(folder)
    finally:
        holder.communicate(input="", timeout=60)  # it exits and its lock goes with it
    claim_output_dir(folder)
    claim_output_dir(folder)  # this process holds it already: no error


def test_a_tolerance_that_disables_exactness_is_refused() -> None:
    schedule = DDPMSchedule(num_train_timesteps=10, num_inference_steps=10)
    for tol in (math.inf, math.nan, -1.0):
        with pytest.raises(ValueError, match="tol must be a finite number >= 0"):
            Sampler(schedule, "picard", tol=tol)


def test_loose_chunks_are_reported_as_not_exact() -> None:
    warning = exactness_warning({"exact_err_max": 1.59, "exact_err_mean": 1.2})
    assert warning is not None and warning.startswith("warning: NOT EXACT")
    assert exactness_warning({"exact_err_max": 0.006, "exact_err_mean": 1e-4}) is None
    assert exactness_warning({"exact_err_max": None, "exact_err_mean": None}) is None


def test_an_absurd_episode_count_is_one_line() -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("eval", overrides=[f"n_episodes={10**9}"])
    with pytest.raises(ConfigError, match=f"n_episodes must be an int in \\[1, {MAX_EPISODES}\\]"):
        check_eval_config(cfg)
