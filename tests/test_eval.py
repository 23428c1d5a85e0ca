"""eval_policy.py and app.evaluation: every sampler end to end, results, sweeps, errors."""

from __future__ import annotations

import csv
import json
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import HEADLESS, run_repo_script

from app import builder, evaluation, report
from envs.rollout import PolicyCall, RolloutResult
from policy.chunking import ChunkRecord

REPO_ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
EPISODE_KEYS = {"seed", "max_reward", "success", "n_steps", "final_coverage"}


@pytest.fixture(autouse=True)
def headless(monkeypatch: pytest.MonkeyPatch) -> None:
    """wandb offline, SDL without a display or sound card."""
    for key, value in HEADLESS.items():
        monkeypatch.setenv(key, value)


def run_script(*args: str) -> subprocess.CompletedProcess:
    """eval_policy.py as a user runs it."""
    return run_repo_script("eval_policy.py", *args)


# ------------------------------------------------------------------------- end to end
@pytest.mark.parametrize(
    ("sampler", "rounds"),
    [("sequential_ddpm100", 100), ("sequential_ddim16", 16), ("picard_ddpm100", None),
     ("picard_ddim16", None), ("picard", None)],  # picard: the old name, an alias
)
def test_each_sampler_evaluates_end_to_end_and_writes_every_result(
    eval_cfg, tmp_path: Path, sampler: str, rounds: int | None
) -> None:
    evaluation.run_eval(eval_cfg(f"sampler={sampler}"), tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    metrics = results["metrics"]
    assert set(report.METRICS) <= set(metrics)
    assert results["n_episodes"] == 2 and results["seeds"] == [100000, 100001]
    assert results["noise_seed"] == 100000
    assert [e["seed"] for e in results["episodes"]] == results["seeds"]
    assert all(set(e) >= EPISODE_KEYS and e["n_steps"] == 24 for e in results["episodes"])
    assert {"device", "threads", "versions"} <= set(results["run_info"])
    assert results["run_info"]["threads"] == 1 and results["run_info"]["versions"]["torch"]
    assert results["config"]["env"]["name"] == "pusht_lowdim"  # from the checkpoint
    assert results["sampler"]["schedule"]["beta_schedule"] == "squaredcos_cap_v2"  # policy's
    assert metrics["n_chunks"] == 3 and metrics["n_timed_chunks"] == 2
    assert metrics["n_exact_err_chunks"] == 3
    assert 0 <= metrics["mean_score"] <= 1 and metrics["success_rate"] == 0
    timed = [c["latency_ms"] for c in results["chunks"][1:]]  # warmup_chunks=1
    assert metrics["latency_ms_p99"] == pytest.approx(np.percentile(timed, 99))  # linear method
    chunk_rounds = [c["rounds"] for c in results["chunks"]]
    assert metrics["rounds_mean"] == pytest.approx(np.mean(chunk_rounds))
    assert metrics["deadline_miss_rate"] is None and metrics["converged_rate"] == 1
    if rounds is not None:  # sequential: exact by definition, T rounds
        assert metrics["rounds_mean"] == metrics["nfe"] == rounds
        assert metrics["exact_err_max"] == 0
    else:
        assert metrics["exact_err_max"] == max(c["exact_err"] for c in results["chunks"])
        assert metrics["exact_err_max"] < 0.5  # tol 0.1: close to the sequential chunk
    assert (tmp_path / "latency_hist.png").stat().st_size > 0
    assert (tmp_path / "rounds_hist.png").stat().st_size > 0


def test_pcm_sampler_names_the_missing_checkpoint_key(eval_cfg, tmp_path: Path) -> None:
    with pytest.raises(evaluation.ConfigError, match="under the checkpoint key 'pcm'"):
        evaluation.run_eval(eval_cfg("sampler=pcm"), tmp_path)


def test_pcm_trained_for_another_schedule_is_a_warning() -> None:
    from picard_sampler import DDIMSchedule, DDPMSchedule, Sampler

    checkpoint = {"pcm": {}, "config": {"pcm": {"schedule": {
        "_target_": "picard_sampler.DDIMSchedule", "num_inference_steps": 16}}}}
    same = Sampler(DDIMSchedule(num_inference_steps=16), method="pcm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        builder.check_pcm_weights(same, checkpoint, "pcm.ckpt")
    other = Sampler(DDPMSchedule(num_inference_steps=100), method="pcm")
    with pytest.warns(UserWarning, match="trained for DDIMSchedule with 16 steps, but the sampler"):
        builder.check_pcm_weights(other, checkpoint, "pcm.ckpt")


@pytest.mark.parametrize("warm_start", ["none", "reuse", "shift", True])
def test_picard_at_zero_tolerance_gives_the_sequential_actions(
    eval_cfg, tmp_path: Path, warm_start: str | bool
) -> None:
    """Warm starts change the rounds, never the answer."""
    cfg = eval_cfg("sampler=picard_ddim", "sampler.tol=0", f"warm_start={warm_start}")
    assert evaluation.run_eval(cfg, tmp_path)["metrics"]["exact_err_max"] < 1e-5


def test_same_seeds_give_the_same_episodes_and_chunks_whatever_the_batching(
    eval_cfg, tmp_path: Path
) -> None:
    """Noise is drawn per episode, so the number of envs does not change an episode either."""
    overrides = ("sampler=picard", "exact_err=false")
    first = evaluation.run_eval(eval_cfg(*overrides), tmp_path / "a")
    again = evaluation.run_eval(eval_cfg(*overrides), tmp_path / "b")
    one_env = evaluation.run_eval(eval_cfg(*overrides, "n_envs=1"), tmp_path / "c")
    assert again["episodes"] == first["episodes"]
    drop_timing = ("wall_s", "latency_ms", "encode_ms")
    assert [{k: v for k, v in c.items() if k not in drop_timing} for c in again["chunks"]] == [
        {k: v for k, v in c.items() if k not in drop_timing} for c in first["chunks"]
    ]
    for a, b in zip(one_env["episodes"], first["episodes"], strict=True):
        assert a["final_coverage"] == pytest.approx(b["final_coverage"], abs=1e-4)


@pytest.mark.slow
def test_video_and_offline_wandb_run(eval_cfg, tmp_path: Path) -> None:
    cfg = eval_cfg("sampler=ddim", "video=true", "logger.wandb=true", "n_episodes=1",
                   "max_steps=8", "warmup_chunks=0")
    results = evaluation.run_eval(cfg, tmp_path)
    video = Path(results["video"])
    assert video.parent == tmp_path and video.suffix in (".gif", ".mp4")
    assert video.stat().st_size > 0
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_summarize_excludes_warmup_from_latency_and_weights_errors_by_batch() -> None:
    chunks = [
        ChunkRecord(batch=2, rounds=10, nfe=20, nfe_total=40, n_converged=2, latency_ms=500.0,
                    exact_err=0.2, exact_err_mean=0.1),
        ChunkRecord(batch=2, rounds=6, nfe=12, nfe_total=24, n_converged=1, latency_ms=10.0,
                    exact_err=0.4, exact_err_mean=0.3),
        ChunkRecord(batch=1, rounds=2, nfe=4, nfe_total=4, n_converged=1, latency_ms=30.0),
    ]
    calls = [PolicyCall(wall_s=0.0, record=chunk) for chunk in chunks]
    result = evaluation.EvalResult(
        RolloutResult(episodes=[], metrics={"mean_score": 0.5}, policy_calls=calls))
    metrics = evaluation.summarize(result, warmup_chunks=1, deadline_ms=20.0)
    assert metrics["mean_score"] == 0.5 and metrics["rounds_mean"] == 6
    assert metrics["nfe"] == pytest.approx(68 / 5) and metrics["converged_rate"] == 0.8
    assert metrics["exact_err_max"] == 0.4 and metrics["n_exact_err_chunks"] == 2
    assert metrics["exact_err_mean"] == pytest.approx((0.2 + 0.6) / 4)
    assert metrics["rounds_p95"] == pytest.approx(9.6)  # linear: 6 + 0.9 * (10 - 6)
    assert metrics["latency_ms_p50"] == 20.0 and metrics["deadline_miss_rate"] == 0.5
    assert evaluation.summarize(result)["deadline_miss_rate"] is None


# ------------------------------------------------------------------------- the script
@pytest.mark.slow
def test_multirun_over_two_samplers_writes_one_summary(tiny_checkpoint: Path, tmp_path) -> None:
    sweep = tmp_path / "sweep"
    result = run_script(
        "-m", "sampler=sequential,picard", f"checkpoint={tiny_checkpoint}", "n_episodes=1",
        "n_envs=1", "max_steps=8", "warmup_chunks=0", "threads=1", "progress=false",
        "logger.wandb=false", f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 0, result.stderr
    with (sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["overrides"] for r in rows] == ["sampler=sequential", "sampler=picard"]
    assert rows[0]["sampler"] == "sequential DDPM-100" and rows[0]["rounds_mean"] == "100.0"
    assert rows[1]["sampler"].startswith("picard DDPM-100")
    summary = (sweep / "summary.md").read_text()
    assert summary.count("\n| ") == 3 and "mean_score" in summary  # header + 2 jobs
    assert "sweep summary" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("checkpoint={tmp}/missing.ckpt",), "config error: checkpoint not found: {tmp}/missing"),
        (("sampler=nope",), "config error: unknown sampler 'nope'; available samplers: auto, "
                            "ddim, "
                            "parareal_ddpm100, pcm, pcm_ddim16, pcm_ddpm, pcm_ddpm100, "
                            "pcm_parareal_ddim16, picard, picard_ddim, "
                            "picard_ddim16, picard_ddpm100, sequential, sequential_ddim16, "
                            "sequential_ddpm100"),
        (("checkpoint={ckpt}", "env=pusht_image"),
         "config error: env pusht_image does not fit the policy in {ckpt}: the env observes"),
    ],
    ids=["missing-checkpoint", "unknown-sampler", "env-obs-mismatch"],
)
@pytest.mark.slow
def test_script_errors_are_one_line(
    tiny_checkpoint: Path, tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    fill = {"tmp": tmp_path, "ckpt": tiny_checkpoint}
    result = run_script(*(a.format(**fill) for a in args), f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message.format(**fill)), result.stderr


def test_a_run_reports_its_measured_speed_up_over_sequential_sampling(eval_cfg, tmp_path) -> None:
    """The exactness check's sequential samples time sequential sampling on the same chunks:
    sequential_ms_p50 / the same calls' latency is the printed speed-up, and what the checks
    cost is printed beside it; a sequential sampler has no such line."""
    from policy.chunking import summarize_chunks

    records = [ChunkRecord(batch=2, rounds=4, nfe=4, nfe_total=8, n_converged=2,
                           latency_ms=ms, exact_err=0.0, exact_err_mean=0.0, sequential_ms=seq)
               for ms, seq in ((50.0, 400.0), (10.0, 40.0), (20.0, 60.0), (30.0, 90.0))]
    metrics = summarize_chunks(records, warmup_chunks=1)
    assert metrics["sequential_ms_p50"] == pytest.approx(60.0)  # warm-up call left out
    assert metrics["speedup_vs_sequential"] == pytest.approx(3.0)  # 60 / 20
    assert metrics["exact_check_s"] == pytest.approx(0.59)  # every check, warm-up included
    results = evaluation.run_eval(eval_cfg("sampler=picard_ddim16", "exact_err_every=1"),
                                  tmp_path / "picard")
    (line,) = report.speedup_lines(results)
    assert "x sequential sampling, measured in this run" in line and "checks took" in line
    assert results["metrics"]["sequential_ms_p50"] > 0
    sequential = evaluation.run_eval(eval_cfg("sampler=sequential_ddim16"), tmp_path / "seq")
    assert sequential["metrics"]["speedup_vs_sequential"] is None
    assert report.speedup_lines(sequential) == []
