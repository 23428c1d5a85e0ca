"""app.policy_table: Diffusion Policy's max / mean-of-last-k table per task from training runs'
eval_scores.json and eval results files, next to DP's published numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app import policy_table


def _run(
    root: Path,
    name: str,
    seed: int,
    scores: list[float],
    env: str = "square_lowdim",
    keep_last: int = 10,
) -> Path:
    run = root / f"{name}_{seed}"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(
        f"env:\n  name: {env}\neval:\n  sampler:\n    method: sequential\n    schedule:\n"
        "      _target_: picard_sampler.DDIMSchedule\n      num_inference_steps: 16\n"
    )
    last = [{"step": 1000 * (i + 1), "mean_score": s} for i, s in enumerate(scores)]
    (run / policy_table.EVAL_SCORES).write_text(
        json.dumps(
            {
                "seed": seed,
                "name": name,
                "keep_last": keep_last,
                "n_episodes": 50,
                "best": max(last, key=lambda e: e["mean_score"]),
                "last": last[-keep_last:],
            }
        )
    )
    return run


def test_seeds_of_one_run_name_are_one_row_with_dp_numbers(tmp_path: Path) -> None:
    a = _run(tmp_path, "dp_square", 0, [0.2, 0.9, 0.6, 0.8], keep_last=3)
    b = _run(tmp_path, "dp_square", 1, [0.5, 0.7, 0.7, 0.4], keep_last=3)
    rows = policy_table.table_rows(policy_table.sources([a, b], None))
    assert [r[1].endswith(f"({a})") for r in rows[:1]] == [True]
    seed0, seed1, together = rows
    assert seed0[6:8] == ["0.900", "0.767"]  # max over all (the best), mean of the last 3
    assert seed1[6:8] == ["0.700", "0.600"]
    assert together[0] == "square_lowdim" and together[2] == "sequential DDIM-16"
    assert together[3:6] == [2, 3, 50]
    assert together[6].startswith("0.800 ± ") and together[7].startswith("0.683 ± ")
    assert together[-1] == "1.00 / 0.93"


def test_sweep_dir_and_results_file(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    _run(sweep, "dp_can", 0, [0.9, 1.0], env="can_lowdim")
    _run(sweep, "dp_can", 1, [0.8, 0.9], env="can_lowdim")
    result = tmp_path / "results.json"
    result.write_text(
        json.dumps(
            {
                "metrics": {"mean_score": 0.48},
                "n_episodes": 50,
                "checkpoint": {"path": "checkpoints/square_lowdim/policy.ckpt", "step": 16000},
                "sampler": {"label": "sequential DDPM-100"},
                "config": {"env": {"name": "square_lowdim"}},
            }
        )
    )
    rows = policy_table.table_rows(policy_table.sources([result, sweep], last_k=1))
    assert [r[0] for r in rows] == ["can_lowdim"] * 3 + ["square_lowdim"]
    assert rows[2][6].startswith("0.950 ± ") and rows[2][7].startswith("0.950 ± ")
    assert rows[3][2] == "sequential DDPM-100" and rows[3][6:] == ["0.480", "0.480", "1.00 / 0.93"]


def test_cli_default_table_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert policy_table.main([]) == 0  # the shipped policies' committed result files
    out = capsys.readouterr().out
    for task in ("pusht_lowdim", "lift_lowdim", "can_lowdim", "square_lowdim"):
        assert f"| {task} |" in out
    # and the training rollouts that checkpoints/square_lowdim keeps (10 checkpoints, DDIM-16)
    assert "| dp_square_lowdim_300demos_cpu (training rollouts) | sequential DDIM-16 | 1 | 10 |" \
        in out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert policy_table.main([str(empty)]) == 1
    assert "no eval_scores.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        policy_table.main(["--last-k", "0"])


def test_a_checkpoint_folder_with_its_training_scores_reads_as_a_run(tmp_path: Path) -> None:
    """A shipped folder: eval_scores.json beside the exported config.yaml (no .hydra); its task
    and rollout sampler come from config.yaml, and a broken config.yaml is one ValueError."""
    run = _run(tmp_path, "dp_lift", 0, [0.9, 1.0, 1.0], env="lift_lowdim")
    (run / ".hydra" / "config.yaml").rename(run / "config.yaml")
    (run / ".hydra").rmdir()
    (row,) = policy_table.table_rows(policy_table.sources([run], None))
    assert row[:4] == ["lift_lowdim", "dp_lift (training rollouts)", "sequential DDIM-16", 1]
    assert row[6:] == ["1.000", "0.967", "1.00 / 0.98"]
    (run / "config.yaml").write_text("env: [unclosed\n")
    with pytest.raises(ValueError, match="config.yaml: not readable YAML"):
        policy_table.sources([run], None)
