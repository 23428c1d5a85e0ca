"""Sweeps beyond joblib (issue 28 items 3-4): the summary rebuilt from job folders (missing and
failed jobs marked), the seed table, and one sampler sweep on submitit's local processes and on a
local Ray cluster giving the joblib sweep's table."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app import report
from tests.conftest import HEADLESS, REPO_ROOT


def write_json(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def multirun_yaml(sweep: Path, task: list[str], job: str = "eval_policy") -> None:
    """The parts of Hydra's multirun.yaml the summary reads."""
    import yaml

    sweep.mkdir(parents=True, exist_ok=True)
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {
        "sweep": {"dir": str(sweep), "subdir": "${hydra.job.num}"},
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                    "params": None},
        "overrides": {"hydra": [], "task": task}, "job": {"name": job},
    }}))


def eval_results(overrides: list[str], score: float, checkpoint: str = "c.ckpt", step: int = 1
                 ) -> dict:
    """A results.json as run_eval writes it, reduced to what the summary reads."""
    return {"overrides": overrides, "sampler": {"label": "s"}, "n_episodes": 2,
            "checkpoint": {"path": checkpoint, "step": step},
            "metrics": {"mean_score": score, "latency_ms_p50": 1.0}}


def rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------ the summary
def test_summary_marks_missing_and_failed_jobs_and_keeps_every_finished_row(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Jobs 0-5 of sampler=a,b,c x n=1,2: 0 finished, 1 failed, 2 started without results,
    3 with a torn results.json, 4-5 not started; `python -m app.report` says so and exits 1
    (a job failed); a job finishing later gets its row on the next call."""
    sweep = tmp_path / "sweep"
    multirun_yaml(sweep, ["sampler=a,b,c", "n=1,2", "threads=1"])
    write_json(sweep / "0" / "results.json", eval_results(["sampler=a", "n=1", "threads=1"], .5))
    write_json(sweep / "1" / "failed.json", {"error": "config error: bad",
                                             "overrides": ["sampler=a", "n=2", "threads=1"]})
    (sweep / "2" / ".hydra").mkdir(parents=True)
    (sweep / "2" / ".hydra" / "overrides.yaml").write_text("- sampler=b\n- n=1\n- threads=1\n")
    (sweep / "3").mkdir()
    (sweep / "3" / "results.json").write_text('{"overrides": ')
    (sweep / ".submitit").mkdir()  # a launcher's folder is no job

    assert report.main([str(sweep)]) == 1
    out = capsys.readouterr().out
    assert "1 finished, 1 failed, 3 missing, 1 unreadable" in out
    got = {r["job"]: (r["overrides"], r["status"], r["mean_score"])
           for r in rows(sweep / "summary.csv")}
    assert got == {
        "0": ("sampler=a n=1", "ok", "0.5"),
        "1": ("sampler=a n=2", "FAILED: config error: bad", ""),
        "2": ("sampler=b n=1", "MISSING: started, no results yet (running, or killed)", ""),
        "3": ("sampler=b n=2", "UNREADABLE: results.json unreadable (JSONDecodeError)", ""),
        "4": ("sampler=c n=1", "MISSING: not started", ""),
        "5": ("sampler=c n=2", "MISSING: not started", ""),
    }
    write_json(sweep / "4" / "results.json", eval_results(["sampler=c", "n=1", "threads=1"], .7))
    report.write_sweep_summary(sweep, not_started=True)
    statuses = [r["status"] for r in rows(sweep / "summary.csv")]
    assert statuses[0] == statuses[4] == "ok" and statuses[5] == "MISSING: not started"
    assert "summary.md" in out and (sweep / "summary.md").read_text().count("\n| ") == 7


def test_report_cli_refuses_a_folder_that_is_not_one_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "app.report", str(tmp_path / "nope")],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nope'} is not a folder (pass a sweep dir: the one that holds "
        "multirun.yaml and the job folders)"]


def test_t_quantile_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats", reason="scipy (robosuite's) checks t_quantile")
    for df in (1, 2, 3, 5, 10, 30, 200):
        for p in (0.6, 0.9, 0.975, 0.995):
            assert report.t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9)


def test_seed_table_of_an_eval_sweep_over_checkpoints_of_three_runs(tmp_path: Path) -> None:
    """checkpoint= over 4 snapshots of each of 3 training runs: per run (seed) the max and the
    mean of its last 2 checkpoints (k from --last-k), then their mean over seeds ± t(0.975, 2)
    * s / sqrt(3)."""
    sweep = tmp_path / "sweep"
    scores = {0: [.2, .6, .5, .7], 1: [.1, .4, .8, .6], 2: [.3, .3, .5, .5]}
    checkpoints = [f"{tmp_path}/run{seed}/step_{step}.ckpt" for seed in scores for step in range(4)]
    multirun_yaml(sweep, ["checkpoint=" + ",".join(checkpoints), "n_episodes=50"])
    for job, path in enumerate(checkpoints):
        seed, step = int(path.split("run")[1][0]), int(path[-6])
        write_json(sweep / str(job) / "results.json", eval_results(
            [f"checkpoint={path}", "n_episodes=50"], scores[seed][step], path, 1000 * step))
    write_json(tmp_path / "run1" / "eval_scores.json", {"seed": 7, "keep_last": 10})
    report.write_sweep_summary(sweep, last_k=2)
    table = rows(sweep / "summary_seeds.csv")
    assert [(r["seed"], float(r["max"]), float(r["mean_last_k"])) for r in table[:3]] == [
        (f"{tmp_path}/run0", .7, pytest.approx(.6)),
        (f"7 ({tmp_path}/run1)", .8, pytest.approx(.7)),
        (f"{tmp_path}/run2", .5, pytest.approx(.5)),
    ]
    mean, half = report.mean_interval([.6, .7, .5])
    assert half == pytest.approx(4.302652729749464 * 0.1 / 3 ** 0.5)
    assert table[3]["seed"] == "all 3 seeds"
    assert table[3]["mean_last_k"] == f"{mean:.4g} ± {half:.2g}"
    assert "Seeds: max and mean of the last k" in (sweep / "summary.md").read_text()


@pytest.mark.slow
def test_training_sweep_over_seeds_ends_with_the_seed_table(tiny_demos: Path,
                                                           tmp_path: Path) -> None:
    """train_pcm.py -m seed=0,1: each job trains into its own job folder, keeps its last
    eval.keep_last rollout scores, and the sweep's summary holds one row per seed and the
    across-seeds row (its interval over 2 seeds)."""
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, "train_pcm.py", "-m", "seed=0,1", "debug=tiny", f"data.path={tiny_demos}",
         "train.max_steps=6", "eval.every=2", "eval.keep_last=2", "env.max_steps=8",
         "eval.n_episodes=1", "eval.n_envs=1", "val.every=0", "threads=1",
         f"hydra.sweep.dir={sweep}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, **HEADLESS},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for job in ("0", "1"):
        scores = json.loads((sweep / job / "eval_scores.json").read_text())
        assert [e["step"] for e in scores["last"]] == [4, 6] and scores["keep_last"] == 2
    table = rows(sweep / "summary_seeds.csv")
    assert [r["seed"] for r in table] == ["0", "1", "all 2 seeds"]
    assert [r["status"] for r in rows(sweep / "summary.csv")] == ["ok", "ok"]


# ---------------------------------------------------------------- sweeps on other launchers
SWEEP = ("sampler=sequential_ddim16,picard_ddim16", "n_episodes=2", "n_envs=2", "max_steps=24",
         "threads=1", "progress=false", "logger.wandb=false")
"""The sampler sweep every launcher runs: 2 jobs of 2 short PushT episodes each."""


def run_sweep(checkpoint: Path, sweep: Path, *launcher: str, env: dict | None = None
              ) -> list[dict[str, str]]:
    """eval_policy.py -m SWEEP on `launcher`; the summary's rows without timing columns."""
    result = subprocess.run(
        [sys.executable, "eval_policy.py", "-m", *SWEEP, f"checkpoint={checkpoint}",
         f"hydra.sweep.dir={sweep}", *launcher],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=400,
        env={**os.environ, **HEADLESS, **(env or {})},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for job in ("0", "1"):
        assert (sweep / job / "results.json").is_file()
    return [{k: v for k, v in row.items() if "_ms" not in k} for row in rows(sweep / "summary.csv")]


@pytest.fixture(scope="module")
def joblib_rows(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The sweep on joblib (2 workers): the table the other launchers must give."""
    sweep = tmp_path_factory.mktemp("joblib") / "sweep"
    return run_sweep(tiny_checkpoint, sweep, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")


@pytest.mark.slow
def test_submitit_processes_sweep_gives_the_joblib_table(joblib_rows, tiny_checkpoint: Path,
                                                         tmp_path: Path) -> None:
    """submitit local processes give joblib's table, and their logs sit in the one flat folder
    (conf/hydra/launcher/submitit_processes.yaml): the plugin's per-job `.submitit/%j` folder is
    made after the job's process starts, which lost a job to FileNotFoundError on a busy CI."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="hydra-submitit-launcher is in the [scale] extra")
    sweep = tmp_path / "sweep"
    got = run_sweep(tiny_checkpoint, sweep, "hydra/launcher=submitit_processes")
    assert got == joblib_rows and [r["status"] for r in got] == ["ok", "ok"]
    assert len(list((sweep / ".submitit").glob("*_0_log.out"))) == 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_ray_cluster() -> Iterator[str]:
    """`ray start --head --block` on a free port (2 CPUs, no dashboard) for the duration; its
    address. Stopped by SIGTERM to that process, which ends the cluster it started (and any
    process of it left over, by id)."""
    from tests.test_distributed import descendants

    port = free_port()
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
         f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
         "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, "ray start --head exited"
            up = subprocess.run([str(Path(sys.executable).parent / "ray"), "status",
                                 f"--address={address}"], capture_output=True, timeout=60)
            if up.returncode == 0:
                break
            assert time.monotonic() < deadline, "the Ray head did not come up in 120 s"
            time.sleep(1)
        yield address
    finally:
        cluster = descendants(head.pid)
        head.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=60)
        for pid in cluster:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None
                    or importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None,
                    reason="ray and hydra-ray-launcher are in the [scale] extra")
def test_ray_sweep_on_a_local_cluster_gives_the_joblib_table(joblib_rows, tiny_checkpoint: Path,
                                                             tmp_path: Path) -> None:
    with local_ray_cluster() as address:
        got = run_sweep(tiny_checkpoint, tmp_path / "sweep", "hydra/launcher=ray_cluster",
                        env={"RAY_ADDRESS": address, "RAY_USAGE_STATS_ENABLED": "0"})
    assert got == joblib_rows and [r["status"] for r in got] == ["ok", "ok"]
