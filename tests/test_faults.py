"""Fault injection: bad input gets one line, nothing hangs, nothing is lost.

Bad config values and types, broken data files made on the fly, observations the Python API
must refuse, signals sent to real subprocesses, a full disk simulated by a failing writer,
output folders that are taken or unusable, corrupt checkpoints and a sweep with a failing job.
Every subprocess runs under a timeout, so a hang fails the test instead of stalling CI.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import make_tiny_demos, run_repo_script
from hydra import compose, initialize_config_dir

import app.training as training
from app import evaluation
from app.checks import ConfigError
from app.command_line import CONF_DIR
from app.entry import run_entry
from picard_sampler import DDIMSchedule, Sampler
from policy.checkpoint import load_checkpoint, load_policy_checkpoint
from policy.chunking import ChunkPolicy
from policy.data import ReplayBuffer
from policy.file_io import clean_stale_temp_files

REPO_ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120
pytestmark = pytest.mark.usefixtures("one_thread")


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    """A script as a user runs it (conftest.run_repo_script), under this file's timeout."""
    return run_repo_script(script, *args, timeout=TIMEOUT_S)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The single stderr line of a failed run (asserting there is exactly one)."""
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# ------------------------------------------------------------------------ config values
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("n_episodes=abc", "n_episodes must be an int in [1, 100000]; got 'abc'"),
        ("n_episodes=0", "n_episodes must be an int in [1, 100000]; got 0"),
        ("noise_seed=-5", "noise_seed must be an int >= 0; got -5"),
        ("n_envs=2.5", "n_envs must be an int >= 1; got 2.5"),
        ("warm_start=sometimes", "warm_start must be one of ['none', 'reuse', 'shift']"),
        ("realtime.clock=sundial", "realtime.clock must be one of ['simulated', 'wall']"),
        ("realtime.handoff=blend",
         "realtime.handoff must be one of ['hold', 'skip', 'ensemble', 'inpaint']"),
        ("realtime.delay_ms=-5", "realtime.delay_ms must be a number >= 0"),
        ("realtime.soft_mask=2", "realtime.soft_mask must be a number in [0, 1]"),
        ("realtime.inpaint_method=nudge",
         "realtime.inpaint_method must be one of ['replace', 'guide']"),
        ("realtime.guidance_clip=0", "realtime.guidance_clip must be a number > 0"),
        ("realtime.model_latency_ms=-1",
         "realtime.model_latency_ms must be null or a number >= 0"),
        ("realtime.model_latency_ms=100 realtime.clock=wall",
         "realtime.model_latency_ms must be null with realtime.clock=wall"),
        ("server=nowhere", "server must be null or HOST:PORT"),
        ("sampler.accel=nesterov", "sampler: accel must be one of ['none', 'anderson']"),
        ("deadline_ms=fast", "deadline_ms must be null or a number > 0"),
        ("video=maybe", "video must be true or false"),
        ("device=tpu", "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        ("sampler.tol=-1", "sampler: tol must be a finite number >= 0"),
        ("+sampler.windw=4", "sampler: "),
    ],
)
def test_eval_config_values_and_types_are_one_line_errors(
    eval_cfg, tmp_path: Path, override: str, message: str
) -> None:
    with pytest.raises(ConfigError) as error:
        evaluation.run_eval(eval_cfg(*override.split()), tmp_path / "run")
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_one_names_the_device(eval_cfg, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="device=cuda but this machine has no CUDA device"):
        evaluation.run_eval(eval_cfg("device=cuda"), tmp_path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.max_train_episodes=0", "data.max_train_episodes must be null or an int >= 1"),
        ("data.val_ratio=2", "data.val_ratio must be a number in [0, 1)"),
        ("data.batch_size=abc", "data.batch_size must be an int >= 1; got 'abc'"),
        ("val.max_batches=0", "val.max_batches must be an int >= 1"),
        ("optim.lr=-1", "optim.lr must be a number > 0"),
        ("resume=maybe", "resume must be true or false"),
        ("data.batch_size=100000", "fewer than one batch (data.batch_size=100000)"),
    ],
)
def test_train_config_values_are_one_line_errors(make_cfg, override: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        training.run_training(make_cfg(override))
    assert message in str(error.value)


# --------------------------------------------------------------------------- broken data
def _store_copy(tiny_demos: Path, tmp_path: Path) -> Path:
    """A directory-store copy of the tiny demos, writable in place."""
    path = tmp_path / "demos.zarr"
    ReplayBuffer.load(tiny_demos).save(path)
    return path


def _break_episode_ends(path: Path, ends: list[int]) -> None:
    zarr.open_group(str(path), mode="a")["meta/episode_ends"][:] = np.array(ends)


def _nan_action(path: Path) -> None:
    actions = zarr.open_group(str(path), mode="a")["data/action"]
    values = actions[:]
    values[17, 1] = np.nan
    actions[:] = values


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("truncated", "is unreadable (truncated, or not a zarr store?)"),
        ("empty-file", "is unreadable (truncated, or not a zarr store?)"),
        ("empty-dir", "is a directory but not a zarr store"),
        ("hdf5", "is an HDF5 file; training reads zarr replay buffers"),
        ("missing", "data.path does not exist"),
        ("no-action-key", "replay buffer has no data key 'act'"),
        ("nan", "data key 'action' holds NaN or inf (first at row 17"),
        ("decreasing-ends", "meta/episode_ends must be strictly increasing"),
        ("ends-past-data", "meta/episode_ends ends at row 250 but the data arrays hold 240"),
    ],
)
def test_broken_datasets_are_one_line_errors_naming_the_file(
    make_cfg, tiny_demos: Path, tmp_path: Path, breakage: str, message: str
) -> None:
    overrides = []
    if breakage == "truncated":
        path = tmp_path / "cut.zarr.zip"
        path.write_bytes(tiny_demos.read_bytes()[: tiny_demos.stat().st_size // 2])
    elif breakage == "empty-file":
        path = tmp_path / "empty.zarr.zip"
        path.write_bytes(b"")
    elif breakage == "empty-dir":
        path = tmp_path / "empty.zarr"
        path.mkdir()
    elif breakage == "hdf5":
        path = REPO_ROOT / "data" / "lift_demos.hdf5"
    elif breakage == "missing":
        path = tmp_path / "nowhere.zarr.zip"
    elif breakage == "no-action-key":
        path = tiny_demos
        overrides = ["data.action_key=act"]
    else:
        path = _store_copy(tiny_demos, tmp_path)
        if breakage == "nan":
            _nan_action(path)
        elif breakage == "decreasing-ends":
            _break_episode_ends(path, [30, 60, 50, 120, 150, 180, 210, 240])
        else:
            _break_episode_ends(path, [30, 60, 90, 120, 150, 180, 210, 250])
    with pytest.raises(ConfigError) as error:
        training.run_training(make_cfg(f"data.path={path}", *overrides))
    assert message in str(error.value), str(error.value)


def test_zero_training_windows_is_an_error_not_a_hang(tmp_path: Path) -> None:
    empty = torch.utils.data.TensorDataset(torch.empty(0))
    with pytest.raises(ConfigError, match="the training set is empty"):
        next(training.epoch_batches(empty, compose_train(tmp_path), 0, 0))


def compose_train(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=["debug=tiny", f"run_dir={tmp_path}", *overrides])


def test_short_episodes_still_give_windows_or_a_clear_error(make_cfg, tmp_path: Path) -> None:
    """Episodes shorter than the horizon are padded (DP's rule); a store too small for one batch
    is refused before the loop, never left spinning."""
    short = make_tiny_demos(tmp_path / "short.zarr.zip", n_episodes=2, n_steps=3)
    with pytest.raises(ConfigError, match="fewer than one batch"):
        training.run_training(make_cfg(f"data.path={short}", "data.batch_size=64"))


# ------------------------------------------------------------------- observations (Python API)
@pytest.mark.parametrize("method", ["sequential", "picard", "pcm"])
@pytest.mark.parametrize(
    ("obs", "message"),
    [
        (None, "observation is None"),
        (np.zeros((1, 2, 20), dtype=bool), "has dtype torch.bool; expected real numbers"),
        (np.zeros((1, 2, 20), dtype=complex), "has dtype torch.complex128"),
        (np.zeros((0, 2, 20), dtype=np.float32), "is an empty batch (B = 0)"),
        (np.zeros((1, 2, 19), dtype=np.float32), "expected shape (B, 2, 20), got (1, 2, 19)"),
        (np.full((1, 2, 20), np.nan, dtype=np.float32), "contains NaN or inf"),
    ],
    ids=["none", "bool", "complex", "empty", "shape", "nan"],
)
def test_bad_observations_are_clear_value_errors(
    tiny_checkpoint: Path, method: str, obs: object, message: str
) -> None:
    policy = load_policy_checkpoint(tiny_checkpoint)
    sampler = Sampler(DDIMSchedule(num_inference_steps=4), method=method)
    with pytest.raises(ValueError, match=re.escape(message)):
        policy.predict_action(obs, sampler)


# ----------------------------------------------------------------------------- signals
@pytest.mark.slow
def test_sigterm_during_eval_keeps_the_finished_episodes(tiny_checkpoint: Path, tmp_path) -> None:
    """What a cluster scheduler sends: the finished episodes are written exactly like Ctrl-C."""
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-u", "eval_policy.py", f"checkpoint={tiny_checkpoint}",
         "sampler=sequential_ddim16", "n_episodes=400", "n_envs=1", "max_steps=8",
         "threads=1", "progress=false", "logger.wandb=false", "exact_err=false",
         f"hydra.run.dir={run_dir}"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert "evaluating" in process.stdout.readline()
        time.sleep(3.0)  # tiny episodes of one chunk: dozens finish in this time
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=TIMEOUT_S)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["interrupted"] and 1 <= results["n_episodes"] < 400
    assert results["seeds"] == list(range(100000, 100000 + results["n_episodes"]))
    assert not list(run_dir.glob(".*.tmp"))


@pytest.mark.slow
def test_sigterm_during_training_writes_latest_and_stops(tiny_demos: Path, tmp_path) -> None:
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-u", "train_pcm.py", "debug=tiny", f"data.path={tiny_demos}",
         f"run_dir={run_dir}", "train.max_steps=1000000", "threads=1", "val.every=0",
         "checkpoint.every=1"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert "steps on" in process.stdout.readline()
        deadline = time.monotonic() + TIMEOUT_S  # an event (a step done), not a sleep
        while not (run_dir / "latest.ckpt").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    finally:
        process.kill()
    assert process.returncode == 130, stderr  # stopped, not finished: a scheduler must see it
    assert "resume=true" in stderr.strip().splitlines()[-1], stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["stopped_early"] and 0 < summary["step"] < 1000000
    assert load_checkpoint(run_dir / "latest.ckpt")["step"] == summary["step"]


# ------------------------------------------------------------------- results are never lost
@pytest.mark.slow
def test_a_full_disk_leaves_the_old_results_and_says_so(
    eval_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    evaluation.run_eval(eval_cfg(), run_dir)
    before = (run_dir / "results.json").read_bytes()

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("policy.checkpoint.os.fsync", full_disk)
    with pytest.raises(SystemExit) as stop:
        run_entry(lambda: evaluation.run_eval(eval_cfg("overwrite=true"), run_dir))
    assert str(stop.value.code).startswith("error: No space left on device")
    assert (run_dir / "results.json").read_bytes() == before  # the old file, whole
    assert not list(run_dir.glob(".*.tmp"))


@pytest.mark.slow
def test_a_second_eval_never_silently_replaces_the_first(eval_cfg, tmp_path: Path) -> None:
    evaluation.run_eval(eval_cfg(), tmp_path)
    first = (tmp_path / "results.json").read_bytes()
    with pytest.raises(ConfigError, match="already holds results.json of another run.*"
                                          "overwrite=true"):
        evaluation.run_eval(eval_cfg(), tmp_path)
    assert (tmp_path / "results.json").read_bytes() == first
    evaluation.run_eval(eval_cfg("overwrite=true"), tmp_path)


def test_an_unusable_output_folder_fails_before_any_rollout(eval_cfg, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="output folder .* cannot be created"):
        evaluation.run_eval(eval_cfg(), blocker / "run")


def test_temp_files_of_killed_writes_are_cleaned_at_the_next_start(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = tmp_path / f".results.json.{dead}.tmp"
    live = tmp_path / f".latest.ckpt.{os.getpid()}.tmp"
    stale.write_text("torn")
    live.write_text("being written")
    assert clean_stale_temp_files(tmp_path) == [stale]
    assert not stale.exists() and live.exists()


def test_metrics_log_after_a_resume_equals_the_uninterrupted_run(make_cfg, tmp_path) -> None:
    """A run killed after logging past its last checkpoint (here: latest.ckpt put back to the
    step-6 snapshot after 12 steps) resumes to the uninterrupted run's metrics.jsonl: no step
    twice, and the first loss after the resume averages the same steps (5 per log)."""
    overrides = ("train.max_steps=12", "checkpoint.every=100", "checkpoint.snapshot_every=6",
                 "val.every=4")
    training.run_training(make_cfg(*overrides, run_dir=tmp_path / "straight"))
    training.run_training(make_cfg(*overrides, run_dir=tmp_path / "split"))
    split = tmp_path / "split"
    shutil.copy(split / "step_0000006.ckpt", split / "latest.ckpt")
    training.run_training(make_cfg(*overrides, "resume=true", run_dir=split))

    def logged(run: Path) -> list[dict]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "train/steps_per_s"}
                for line in lines]

    assert [m["step"] for m in logged(split)] == [4, 5, 8, 10, 12]
    assert logged(split) == logged(tmp_path / "straight")


def test_resume_from_a_corrupt_checkpoint_offers_the_intact_snapshot(make_cfg, tmp_path) -> None:
    overrides = ("train.max_steps=6", "checkpoint.snapshot_every=3", "val.every=0")
    training.run_training(make_cfg(*overrides))
    latest = tmp_path / "run" / "latest.ckpt"
    latest.write_bytes(latest.read_bytes()[:1000])
    with pytest.raises(ConfigError, match=r"corrupt or unreadable.*intact checkpoints beside it: "
                                          r"step_0000006.ckpt \(step 6\), step_0000003.ckpt"):
        training.run_training(make_cfg(*overrides, "resume=true"))


def test_a_pcm_file_whose_base_is_missing_is_one_line(eval_cfg, tmp_path: Path) -> None:
    alone = tmp_path / "pcm.ckpt"
    shutil.copy(REPO_ROOT / "checkpoints" / "pusht_lowdim" / "pcm.ckpt", alone)
    with pytest.raises(ConfigError, match="needs its base checkpoint policy.ckpt"):
        evaluation.run_eval(eval_cfg(f"checkpoint={alone}", "sampler=pcm_ddim16"), tmp_path / "r")


# ------------------------------------------------------------------------------- scripts
@pytest.mark.slow
def test_entry_scripts_print_one_line_for_bad_input(tiny_checkpoint: Path, tmp_path) -> None:
    line = one_line_error(run_script("eval_policy.py", f"checkpoint={tiny_checkpoint}",
                                     "n_episodes=abc", f"hydra.run.dir={tmp_path / 'a'}"))
    assert line == "config error: n_episodes must be an int in [1, 100000]; got 'abc'"
    line = one_line_error(run_script("train_pcm.py", "debug=tiny", "data.path=~/x.zarr.zip",
                                     f"run_dir={tmp_path / 'b'}"))
    assert line.startswith("config error: cannot parse the override 'data.path=~/x.zarr.zip'")
    line = one_line_error(run_script("scripts/export_policy.py", str(tmp_path / "no.ckpt"),
                                     str(tmp_path / "out.ckpt")))
    assert line == f"error: checkpoint not found: {tmp_path / 'no.ckpt'}"


@pytest.mark.slow
def test_a_failing_sweep_job_is_recorded_and_the_others_run(tiny_checkpoint: Path, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_script(
        "eval_policy.py", "-m", "noise_seed=0,-5,1", f"checkpoint={tiny_checkpoint}",
        "sampler=sequential_ddim16", "n_episodes=1", "n_envs=1", "max_steps=8", "threads=1",
        "progress=false", "logger.wandb=false", f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 1
    assert "1 job(s) failed: 1" in result.stderr
    with (sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == [
        "ok", "FAILED: config error: noise_seed must be an int >= 0; got -5", "ok"]
    assert rows[0]["mean_score"] and rows[2]["mean_score"] and not rows[1]["mean_score"]
    assert [r["overrides"] for r in rows] == ["noise_seed=0", "noise_seed=-5", "noise_seed=1"]


# --------------------------------------------------------------------------- determinism
def test_what_n_envs_changes_is_float_rounding_only(tiny_checkpoint: Path) -> None:
    """docs/design.md §9: an episode's noise does not depend on its batch mates, so its chunk
    computed alone or beside another env agrees to float rounding (not always bit for bit)."""
    policy = load_policy_checkpoint(tiny_checkpoint)
    sampler = Sampler(DDIMSchedule(num_inference_steps=4), method="sequential")
    obs = np.random.default_rng(0).uniform(0, 512, (2, 2, 20)).astype(np.float32)
    together = ChunkPolicy(policy, sampler, noise_seed=3)
    together.on_reset(0, 100000)
    together.on_reset(1, 100001)
    alone = ChunkPolicy(policy, sampler, noise_seed=3)
    alone.on_reset(0, 100001)
    both, _ = together(obs)
    one, _ = alone(obs[1:])
    np.testing.assert_allclose(one[0], both[1], atol=1e-3, rtol=0)  # raw units, 0-512
    same = ChunkPolicy(policy, sampler, noise_seed=3)  # same batch: bit for bit
    same.on_reset(0, 100000)
    same.on_reset(1, 100001)
    np.testing.assert_array_equal(same(obs)[0], both)


# ------------------------------------------------------------- found by the second probe
@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"method": "picard", "budget_s": -1}, "budget_s must be None or a number of seconds > 0"),
        ({"method": "picard", "budget_s": "abc"}, "budget_s must be None or a number"),
        ({"method": "pcm", "switch_rounds": -2}, "switch_rounds must be an int >= 0"),
        ({"method": "pcm", "switch_rounds": 1.5}, "switch_rounds must be an int >= 0"),
        ({"method": "picard", "window": True}, "window must be a positive int or None"),
        ({"method": "picard", "tol": "abc"}, "tol must be a finite number >= 0"),
        ({"method": "sequential", "window": -7}, "window must be a positive int or None"),
    ],
)
def test_sampler_knobs_of_the_wrong_kind_are_refused(knobs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Sampler(DDIMSchedule(num_inference_steps=4), **knobs)


def test_sigterm_during_a_training_rollout_stops_at_once_without_a_partial_score(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real_call = ChunkPolicy.__call__

    def sigterm_on_first_chunk(self, obs, budget_s=None):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_call(self, obs, budget_s)

    monkeypatch.setattr(ChunkPolicy, "__call__", sigterm_on_first_chunk)
    summary = training.run_training(make_cfg("train.max_steps=20", "eval.every=5",
                                             "eval.n_episodes=50", "eval.n_envs=1",
                                             "val.every=0"))
    assert summary["stopped_early"] and summary["step"] == 5 and len(calls) <= 2
    run = tmp_path / "run"
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert not any(k.startswith("eval/") for m in logged for k in m)
    assert not (run / "best.ckpt").exists() and load_checkpoint(run / "latest.ckpt")["step"] == 5


def test_a_dead_runs_metrics_log_is_kept_apart_not_mixed(make_cfg, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 120, "train/loss": 9.0}\n')
    training.run_training(make_cfg("train.max_steps=5", "val.every=0"))
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [5]
    (orphan,) = run.glob("metrics.*.orphaned.jsonl")
    assert json.loads(orphan.read_text())["step"] == 120


def test_results_are_written_before_plots(eval_cfg, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal while the histograms are drawn (after every episode finished) keeps results."""
    def interrupted_plot(*args, **kwargs):
        raise KeyboardInterrupt("terminated (SIGTERM)")

    monkeypatch.setattr(evaluation, "plot_histograms", interrupted_plot)
    with pytest.raises(KeyboardInterrupt):
        evaluation.run_eval(eval_cfg(), tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["n_episodes"] == 2 and not results["interrupted"]


def test_export_refuses_to_replace_its_source(tiny_checkpoint: Path, tmp_path: Path) -> None:
    source = tmp_path / "latest.ckpt"
    shutil.copy(tiny_checkpoint, source)
    before = source.read_bytes()
    line = one_line_error(run_script("scripts/export_policy.py", str(source), str(source)))
    assert "is the source checkpoint" in line and source.read_bytes() == before


@pytest.mark.slow
def test_command_line_mistakes_are_one_line_before_hydra_writes_anything(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    line = one_line_error(run_script("eval_policy.py", "n_episdes=3",
                                     f"hydra.run.dir={tmp_path / 'a'}"))
    assert line.startswith("config error: Could not override 'n_episdes'")
    assert not (tmp_path / "a").exists()  # refused before Hydra made the run dir
    blocker = tmp_path / "file"
    blocker.write_text("")
    line = one_line_error(run_script("train_pcm.py", "debug=tiny", f"run_dir={blocker}/run"))
    assert line.endswith(f"cannot be created: {blocker} is a file")
    taken = tmp_path / "taken"
    args = (f"checkpoint={tiny_checkpoint}", "n_episodes=1", "n_envs=1", "max_steps=8",
            "logger.wandb=false", "progress=false", f"hydra.run.dir={taken}")
    assert run_script("eval_policy.py", *args).returncode == 0
    record = (taken / ".hydra" / "overrides.yaml").read_text()
    line = one_line_error(run_script("eval_policy.py", *args, "seed_start=7"))
    assert "already holds results.json" in line
    assert (taken / ".hydra" / "overrides.yaml").read_text() == record  # the first run's record


def test_hydra_flags_and_their_values_are_not_overrides() -> None:
    """`--cfg job`, `-p key`, `-cn name`, `--info defaults` take a value that is no override;
    `--info` alone takes none, so an override after it is still one."""
    from app.command_line import hydra_overrides

    assert hydra_overrides(["--cfg", "job", "-p", "sampler", "n_episodes=3"]) == ["n_episodes=3"]
    assert hydra_overrides(["-m", "seed=0,1", "--cfg=all", "~logger"]) == ["seed=0,1", "~logger"]
    assert hydra_overrides(["--info", "defaults", "env=lift_lowdim"]) == ["env=lift_lowdim"]
    assert hydra_overrides(["--info", "env=lift_lowdim"]) == ["env=lift_lowdim"]
    assert hydra_overrides(["-cn", "train", "+x=1"]) == ["+x=1"]


@pytest.mark.slow
def test_printing_the_config_runs_no_job_and_writes_nothing(tmp_path: Path) -> None:
    """`eval_policy.py --cfg job` (Hydra's way to see the composed config) prints it: the
    command-line check took `job` for an override and refused it; nothing is written."""
    out = tmp_path / "run"
    done = run_script("eval_policy.py", "--cfg", "job", "n_episodes=3", f"hydra.run.dir={out}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "n_episodes: 3" in done.stdout and not out.exists()
    line = one_line_error(run_script("eval_policy.py", "--cfg", "job", "n_episdes=3"))
    assert line.startswith("config error: Could not override 'n_episdes'")


def test_a_lost_chunk_file_is_reported_not_read_as_zeros_silently(tiny_demos: Path,
                                                                  tmp_path: Path) -> None:
    from policy.data import SequenceDataset

    store = tmp_path / "demos.zarr"
    ReplayBuffer.load(tiny_demos).save(store)
    chunks = sorted((store / "data" / "keypoint").rglob("c/*/*/*"))
    assert chunks
    chunks[0].unlink()
    with pytest.warns(UserWarning, match=r"data key 'keypoint': 1 of \d+ chunks are not in the "
                                         "store"):
        SequenceDataset(store, ["keypoint", "state[:2]"])


@pytest.mark.slow
def test_entries_run_with_their_default_run_dirs(tiny_checkpoint: Path, tiny_demos: Path,
                                                 tmp_path: Path) -> None:
    """The README's commands name no run dir: the default ones (timestamped, with the sampler
    choice, which only a running Hydra job can resolve) must pass the command-line precheck."""
    env = {**os.environ, "WANDB_MODE": "offline", "PICARD_RUNS": str(tmp_path)}
    for command in (
        ["eval_policy.py", f"checkpoint={tiny_checkpoint}", "n_episodes=1", "n_envs=1",
         "max_steps=8", "logger.wandb=false", "progress=false", "threads=1"],
        ["train_pcm.py", "debug=tiny", f"data.path={tiny_demos}", "train.max_steps=2"],
    ):
        result = subprocess.run([sys.executable, *command], cwd=REPO_ROOT, env=env,
                                capture_output=True, text=True, timeout=TIMEOUT_S)
        assert result.returncode == 0, result.stderr[-2000:]
    assert len(list((tmp_path / "eval").glob("*_auto/results.json"))) == 1
    assert (tmp_path / "dp_pusht_lowdim" / "latest.ckpt").is_file()


@pytest.mark.slow
def test_a_null_group_choice_and_a_2d_episode_ends_are_one_line(make_cfg, tiny_demos: Path,
                                                                tmp_path: Path) -> None:
    line = one_line_error(run_script("eval_policy.py", "env=null",
                                     f"hydra.run.dir={tmp_path / 'a'}"))
    assert line.startswith("config error: env=null is not a choice of env; leave env= out")
    store = _store_copy(tiny_demos, tmp_path)
    meta = zarr.open_group(str(store), mode="a")["meta"]
    ends = meta["episode_ends"][:]
    del meta["episode_ends"]
    meta.create_array("episode_ends", data=np.stack([ends, ends]))
    with pytest.raises(ConfigError, match=r"episode_ends must be one-dimensional; got shape "
                                          r"\(2, 8\)"):
        training.run_training(make_cfg(f"data.path={store}"))


@pytest.mark.slow
def test_a_sweep_stopped_by_sigterm_still_writes_its_summary(tiny_checkpoint: Path,
                                                             tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    process = subprocess.Popen(
        [sys.executable, "-u", "eval_policy.py", "-m", "noise_seed=0,1",
         f"checkpoint={tiny_checkpoint}", "sampler=sequential_ddim16", "n_episodes=400",
         "n_envs=1", "max_steps=8", "threads=1", "progress=false", "logger.wandb=false",
         "exact_err=false", f"hydra.sweep.dir={sweep}"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        for line in process.stdout:  # wait for the first job to start rolling out
            if "evaluating" in line:
                break
        time.sleep(3.0)
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=TIMEOUT_S)
    finally:
        process.kill()
    assert process.returncode == 130
    with (sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["interrupted"] and rows[0]["mean_score"]
