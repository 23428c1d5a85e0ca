"""app.training_curve: a run's metrics.jsonl -> curve.png (+ the plotted points as JSON)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app import training_curve

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(run_dir: Path, lines: list[str]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / training_curve.METRICS_FILE).write_text("\n".join(lines) + "\n")


def test_points_skip_torn_lines_and_keep_the_last_of_a_step(tmp_path: Path) -> None:
    write_metrics(tmp_path, [
        json.dumps({"step": 10, "train/loss": 1.0, "val/loss": 0.9}),
        json.dumps({"step": 20, "train/loss": 0.5, "eval/mean_score": 0.3,
                    "eval/success_rate": 0.0, "eval/n_episodes": 20}),
        '{"step": 30, "train/lo',  # a run killed mid-write
        json.dumps({"step": 20, "train/loss": 0.4, "eval/mean_score": 0.35,
                    "eval/success_rate": 0.1, "eval/n_episodes": 20}),
        json.dumps({"note": "not a metrics line"}),
    ])
    records = training_curve.read_metrics(tmp_path)
    assert [r["step"] for r in records] == [10, 20]
    assert training_curve.curve_points(records) == {
        "val/loss": {"step": [10], "value": [0.9]},
        "eval/mean_score": {"step": [20], "value": [0.35]},
        "eval/success_rate": {"step": [20], "value": [0.1]},
    }
    out = training_curve.write_curve(tmp_path, points_json=tmp_path / "points.json")
    assert out == tmp_path / "curve.png" and out.read_bytes()[:8] == PNG_MAGIC
    assert json.loads((tmp_path / "points.json").read_text())["eval/mean_score"]["value"] == [0.35]


def test_a_run_without_rollouts_still_draws_its_losses(tmp_path: Path) -> None:
    write_metrics(tmp_path, [json.dumps({"step": s, "train/loss": 1 / s}) for s in (1, 2, 3)])
    assert training_curve.write_curve(tmp_path).read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("lines, message", [
    (None, "no metrics.jsonl"),
    (["", "garbage"], "holds no logged step yet"),
    (['{"step": 3, "train/loss": {"x": 1}}'], "step 3: train/loss is {'x': 1}, not a number"),
])
def test_cli_names_the_bad_run_dir_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                               lines: list[str] | None, message: str) -> None:
    if lines is not None:
        write_metrics(tmp_path, lines)
    assert training_curve.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert message in err and str(tmp_path) in err and len(err.strip().splitlines()) == 1
