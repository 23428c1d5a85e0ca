"""train_pcm.py and app.training: configs, the loop, checkpoints and exact resumption."""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException, InstantiationException

import app.training as training
from policy.checkpoint import load_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tiny_run_trains_validates_evaluates_and_checkpoints(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("train.max_steps=10", "eval.every=10", "env.max_steps=8", "eval.n_episodes=1")
    summary = training.run_training(cfg)
    run_dir = tmp_path / "run"
    assert summary["step"] == 10 and not summary["stopped_early"]
    assert {"train/loss", "val/loss", "eval/mean_score", "eval/success_rate"} <= set(summary)
    assert (run_dir / "latest.ckpt").exists() and (run_dir / "best.ckpt").exists()
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [5, 10]
    assert (run_dir / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # redrawn at step 10
    ckpt = load_checkpoint(run_dir / "latest.ckpt")
    assert ckpt["step"] == 10 and ckpt["config"]["policy"]["horizon"] == 16
    assert ckpt["ema"]["num_updates"] == 10


def test_interrupted_then_resumed_run_equals_an_uninterrupted_one(
    make_cfg, tmp_path: Path, sigterm_at_train_step, capsys: pytest.CaptureFixture
) -> None:
    """SIGTERM mid-epoch (step 7 of 12, 5 steps per epoch) -> latest.ckpt -> resume=true."""
    overrides = ("train.max_steps=12", "data.batch_size=32", "checkpoint.every=5", "val.every=4")
    straight = training.run_training(make_cfg(*overrides, run_dir=tmp_path / "straight"))

    with sigterm_at_train_step(7):
        first = training.run_training(make_cfg(*overrides, run_dir=tmp_path / "split"))
    assert first["stopped_early"] and first["step"] == 7
    assert load_checkpoint(tmp_path / "split" / "latest.ckpt")["step"] == 7
    resumed = training.run_training(make_cfg(*overrides, "resume=true", run_dir=tmp_path / "split"))
    assert "changed config keys" not in capsys.readouterr().err

    assert resumed["step"] == straight["step"] == 12 and resumed["epoch"] == straight["epoch"]
    a = load_checkpoint(tmp_path / "straight" / "latest.ckpt")
    b = load_checkpoint(tmp_path / "split" / "latest.ckpt")
    for part in ("model", "ema"):
        flat_a, flat_b = a[part], b[part]
        if part == "ema":
            assert flat_a["num_updates"] == flat_b["num_updates"] == 12
            flat_a, flat_b = flat_a["model"], flat_b["model"]
        for key in flat_a:
            torch.testing.assert_close(flat_b[key], flat_a[key], rtol=0, atol=0, msg=key)
    assert resumed["val/loss"] == straight["val/loss"]


def test_run_refuses_to_overwrite_or_to_resume_nothing_and_warns_on_changes(
    make_cfg, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(training.ConfigError, match="resume=true but there is no checkpoint"):
        training.run_training(make_cfg("resume=true"))
    training.run_training(make_cfg("train.max_steps=1", "val.every=0"))
    with pytest.raises(training.ConfigError, match="latest.ckpt exists: pass resume=true"):
        training.run_training(make_cfg("train.max_steps=1"))
    training.run_training(make_cfg("train.max_steps=2", "val.every=0", "resume=true"))
    assert "changed config keys ['train.max_steps']" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("stage=pcmx", r"stage must be one of \['dp', 'pcm'\]; got 'pcmx'"),
        ("eval.vector=threads", r"eval.vector must be one of \['sync', 'async'\]"),
        ("checkpoint.every=0", r"checkpoint.every must be an int >= 1; got 0"),
        ("policy.n_action_steps=20", r"policy.n_action_steps must be <= horizon"),
        ("env.obs_dim=21", r"env.obs_dim is 21 but the data's is 20"),
    ],
)
def test_bad_config_values_are_errors_naming_the_key(make_cfg, override, match) -> None:
    with pytest.raises((training.ConfigError, InstantiationException), match=match):
        training.run_training(make_cfg(override))


def test_unknown_config_key_is_rejected(make_cfg) -> None:
    with pytest.raises(ConfigCompositionException, match="train.lr"):
        make_cfg("train.lr=1")


@pytest.mark.slow
def test_entry_script_prints_one_line_config_error(tiny_demos: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "train_pcm.py", "debug=tiny", f"data.path={tiny_demos}",
         f"run_dir={tmp_path / 'run'}", "data.batch_size=0"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "config error: data.batch_size must be an int >= 1; got 0"
    ]


def test_train_loader_order_depends_only_on_seed_and_epoch() -> None:
    dataset = list(range(23))
    full = [b.tolist() for b in training.make_train_loader(dataset, 5, seed=1, epoch=3)]
    again = [b.tolist() for b in training.make_train_loader(dataset, 5, seed=1, epoch=3)]
    skipped = [b.tolist() for b in training.make_train_loader(dataset, 5, 1, 3, skip_batches=2)]
    other = [b.tolist() for b in training.make_train_loader(dataset, 5, seed=1, epoch=4)]
    assert full == again and skipped == full[2:] and other != full
    assert sorted(sum(full, [])) == dataset


def test_lr_warms_up_linearly_then_decays_to_zero(make_cfg) -> None:
    cfg = make_cfg("optim.warmup_steps=4", "optim.lr=1.0")
    optimizer, scheduler = training.build_optimizer(cfg, torch.nn.Linear(1, 1), total_steps=12)
    lrs = []
    for _ in range(12):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and all(a >= b for a, b in pairwise(lrs[4:]))
    assert scheduler.get_last_lr()[0] == pytest.approx(0.0)


def test_wandb_logs_offline_and_keeps_its_run_id_across_resume(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("logger.wandb=true", "logger.mode=offline")
    first = training.MetricLogger(cfg, tmp_path, wandb_id=None)
    first.log({"train/loss": 1.0}, step=1)
    first.close()
    again = training.MetricLogger(cfg, tmp_path, wandb_id=first.wandb_id, resume_step=1)
    again.close()
    assert first.wandb_id and again.wandb_id == first.wandb_id
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{first.wandb_id}"))
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "train/loss": 1.0}\n'


@pytest.mark.parametrize(
    "experiment", sorted(p.stem for p in (REPO_ROOT / "conf" / "experiment")
                         .glob("*.yaml")),
)
def test_shipped_experiment_recipes_compose_and_find_their_data(
    experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every conf/experiment recipe passes check_config; a stage-dp recipe's committed demos
    load with its env's obs_dim/action_dim (so a recipe cannot rot unnoticed until trained)."""
    from hydra import compose, initialize_config_dir

    root = REPO_ROOT
    monkeypatch.chdir(root)
    with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}"])
    if cfg.stage == "pcm" and not (root / cfg.pcm.base_checkpoint).is_file():
        pytest.skip(f"{experiment}: its base {cfg.pcm.base_checkpoint} is not shipped yet")
    training.check_train_config(cfg)
    if cfg.stage == "dp":
        stage = training.DPStage(cfg)
        train_set, val_set = stage.datasets(stage.build_policy())
        assert len(train_set) > 0 and len(val_set) > 0


# ------------------------------------------------------------------------------ image policies
@pytest.fixture(scope="module")
def tiny_image_demos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny PushT-shaped store plus `img`: the env's 96x96 frame of every stored state."""
    from tests.conftest import make_tiny_image_demos

    return make_tiny_image_demos(tmp_path_factory.mktemp("image_data"), 6, 20)


def test_tiny_image_run_trains_evaluates_and_resumes_exactly(
    make_cfg, tiny_image_demos: Path, tmp_path: Path, sigterm_at_train_step
) -> None:
    """debug=tiny_image: uint8 frames through the encoder's random crops, a rollout in the
    image env (centre crops), and a run killed at step 3 resumes to the uninterrupted weights
    (the crops draw from the RNG states the checkpoint restores)."""
    overrides = ("debug=tiny_image", f"data.path={tiny_image_demos}", "train.max_steps=6",
                 "checkpoint.every=3", "val.every=3", "eval.every=6", "env.max_steps=8",
                 "eval.n_episodes=1", "eval.n_envs=1")
    straight = training.run_training(make_cfg(*overrides, run_dir=tmp_path / "straight"))
    assert straight["step"] == 6 and {"val/loss", "eval/mean_score"} <= set(straight)
    ckpt = load_checkpoint(tmp_path / "straight" / "latest.ckpt")
    assert {"agent_pos_scale", "action_scale"} <= {
        k.removeprefix("normalizer.") for k in ckpt["ema"]["model"]}
    assert not any(k.startswith("normalizer.image") for k in ckpt["ema"]["model"])

    with sigterm_at_train_step(3):
        first = training.run_training(make_cfg(*overrides, run_dir=tmp_path / "split"))
    assert first["stopped_early"] and first["step"] == 3
    resumed = training.run_training(make_cfg(*overrides, "resume=true",
                                             run_dir=tmp_path / "split"))
    assert resumed["step"] == 6
    a = load_checkpoint(tmp_path / "straight" / "latest.ckpt")["ema"]["model"]
    b = load_checkpoint(tmp_path / "split" / "latest.ckpt")["ema"]["model"]
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)


def test_image_policy_needs_obs_keys_mapping_and_matching_frames(
    make_cfg, tiny_image_demos: Path
) -> None:
    base = ("debug=tiny_image", f"data.path={tiny_image_demos}")
    with pytest.raises(training.ConfigError, match="data.obs_keys must map each observation"):
        training.run_training(make_cfg(*base, "data.obs_keys=[img]"))
    with pytest.raises(training.ConfigError, match=r"image obs 'image' \(data key 'img'\): "
                       r"expected uint8 frames \(N, 84, 84, 3\)"):
        training.run_training(make_cfg(*base, "env.image_shapes.image=[84,84,3]"))
