"""torchrun training (issue 28): N ranks train one process's weights; a killed run resumes.

The unit tests check the pieces in one process (shards, the shard loss, launch checks); the slow
ones run `torchrun --standalone --nproc_per_node=2 train_pcm.py` on the tiny config with gloo.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import app.training as training
from policy.checkpoint import load_checkpoint
from tests.conftest import HEADLESS, REPO_ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ("data.val_ratio=0.1", "data.batch_size=8", "train.max_steps=24", "checkpoint.every=6",
        "eval.every=12", "env.max_steps=8", "eval.n_episodes=1", "eval.n_envs=1", "threads=1")
"""The equivalence config: 161 windows in batches of 8 (21 steps an epoch, the last batch one
window, so rank 1 trains on a zero-weight window), validation at 10/20/24 and rollouts at
12/24 on rank 0 (whose RNG draws the other ranks then copy), a checkpoint every 6 steps."""
TOLERANCE = 1e-5
"""|2-rank - 1-rank| bound on every weight after 24 steps (measured: 3.7e-8 on this CPU). Not 0:
the ranks' float32 sums run in another order (two half-batch mean gradients, all-reduced and
halved, instead of one mean over the batch; the UNet's reductions over 4 rows instead of 8).
A wrong noise or data split moves weights by ~lr = 1e-4 a step, far beyond this bound."""


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    """The command line of a torchrun launch of train_pcm.py on this machine's loopback."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "train_pcm.py", *args]


def run_env() -> dict[str, str]:
    """Headless, one thread per rank (torchrun's default, said so that it does not warn)."""
    return {**os.environ, **HEADLESS, "OMP_NUM_THREADS": "1"}


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The raw and EMA weights of run_dir/latest.ckpt, by name."""
    ckpt = load_checkpoint(run_dir / "latest.ckpt")
    return {**{f"model.{k}": v for k, v in ckpt["model"].items()},
            **{f"ema.{k}": v for k, v in ckpt["ema"]["model"].items()}}


def logged(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the timing values (throughput, latencies)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if "per_s" not in k and "_ms" not in k}
            for line in lines]


# ----------------------------------------------------------------------------- unit checks
def test_shards_cut_each_global_batch_of_one_process_into_contiguous_parts() -> None:
    """Every rank's shard of every batch, put together, is the one-process batch in its order;
    a batch shorter than the world leaves a rank a zero-weight window."""
    n, batch, world = 23, 6, 4
    whole = [b.tolist() for b in training.make_train_loader(list(range(n)), batch, 1, 3)]
    parts = [training.WindowShards(n, batch, 1, 3, rank, world) for rank in range(world)]
    for index, expected in enumerate(whole):
        shards = [p.shards[index] for p in parts]
        got = sum((p.batches[index] for p, s in zip(parts, shards, strict=True) if s.rows), [])
        assert got == expected
        assert sum(s.weight(world) for s in shards) == pytest.approx(world)
    last = [p.shards[-1] for p in parts]  # 23 = 3 * 6 + 5: shards 2, 1, 1, 1
    assert [len(s.rows) for s in last] == [2, 1, 1, 1]
    tiny = [training.WindowShards(9, 6, 1, 0, rank, world) for rank in range(world)]
    assert [len(p.shards[-1].rows) for p in tiny] == [1, 1, 1, 0]  # 3 windows, 4 ranks
    assert tiny[3].batches[-1] == tiny[0].batches[-1][:1] and tiny[3].shards[-1].weight(4) == 0
    skipped = training.WindowShards(n, batch, 1, 3, 1, world, skip_batches=2)
    assert skipped.batches == parts[1].batches[2:]


def test_shard_loss_of_all_rows_is_compute_loss_bit_for_bit(make_cfg) -> None:
    """dp_shard_loss repeats DiffusionPolicy.compute_loss's steps: on the whole batch from the
    same RNG state it gives the same loss, and two half shards average to it."""
    cfg = make_cfg()
    stage = training.DPStage(cfg)
    policy = stage.build_policy()
    train_set, _ = stage.datasets(policy)
    batch = next(iter(training.make_train_loader(train_set, 8, 0, 0)))
    torch.manual_seed(3)
    reference = policy.compute_loss(batch)
    torch.manual_seed(3)
    assert torch.equal(training.dp_shard_loss(policy, batch, range(8), 8, 0), reference)
    halves = []
    for rows in (range(0, 4), range(4, 8)):
        torch.manual_seed(3)
        shard = {k: v[rows.start:rows.stop] for k, v in batch.items()}
        halves.append(training.dp_shard_loss(policy, shard, rows, 8, 0))
    torch.testing.assert_close((halves[0] + halves[1]) / 2, reference, rtol=1e-6, atol=0)


def test_launch_variables_and_bad_launches_are_one_line(make_cfg, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    assert training.launch_world({}) == training.World(0, 1, 0)
    world = training.launch_world({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert world.active and not world.main
    with pytest.raises(training.ConfigError, match="are not a torchrun launch"):
        training.launch_world({"RANK": "2", "WORLD_SIZE": "2"})
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(training.ConfigError, match=r"data.batch_size=7 is not divisible by the "
                       r"world size 2 .*use a multiple of 2$"):
        training.run_training(make_cfg("data.batch_size=7"))
    with pytest.raises(training.ConfigError, match="under torchrun: each rank uses cuda:LOCAL"):
        training.run_training(make_cfg("device=cuda:1"))
    monkeypatch.delenv("WORLD_SIZE")
    training.run_training(make_cfg("train.max_steps=2", "val.every=0"))
    assert load_checkpoint(tmp_path / "run" / "latest.ckpt")["extra"]["world_size"] == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(training.ConfigError, match=r"written by a run of world_size 1, this "
                       r"launch has world_size 2: resume with plain python"):
        training.run_training(make_cfg("train.max_steps=4", "resume=true"))


def test_entry_prints_one_line_for_a_resume_with_another_world_size(make_cfg, tiny_demos: Path,
                                                                     tmp_path: Path) -> None:
    """The check runs before Hydra and before any process group: rank 0 of a 2-process launch
    (its variables set by hand here) says it in one line, exit status 1."""
    training.run_training(make_cfg("train.max_steps=1", "val.every=0"))
    result = subprocess.run(
        [sys.executable, "train_pcm.py", "debug=tiny", f"data.path={tiny_demos}",
         f"run_dir={tmp_path / 'run'}", "resume=true"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        env={**run_env(), "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"},
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"config error: resume=true: {tmp_path / 'run' / 'latest.ckpt'} was written by a run of "
        "world_size 1, this launch has world_size 2: resume with plain python (one process), "
        "or start a new run"
    ]


# ------------------------------------------------------------------------------ 2 processes
@pytest.fixture(scope="module")
def two_rank_run(tiny_demos: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> Callable[..., Path]:
    """Runs of `torchrun --nproc_per_node=2 train_pcm.py` on TINY, made once per module: the
    uninterrupted one both slow tests compare with."""
    made: dict[str, Path] = {}

    def run(name: str = "straight") -> Path:
        if name not in made:
            run_dir = tmp_path_factory.mktemp("ddp") / name
            result = subprocess.run(
                torchrun("debug=tiny", f"data.path={tiny_demos}", f"run_dir={run_dir}", *TINY),
                cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=run_env(),
            )
            assert result.returncode == 0, result.stderr[-3000:]
            made[name] = run_dir
        return made[name]

    return run


@pytest.mark.slow
def test_two_ranks_train_the_weights_of_one_process(two_rank_run, make_cfg,
                                                    tmp_path: Path) -> None:
    """Same global batch and seed: 24 steps on 2 gloo ranks give one process's weights (raw and
    EMA) within TOLERANCE, the same logged losses to float rounding, and the same rollout."""
    ddp = two_rank_run()
    one = training.run_training(make_cfg(*TINY, run_dir=tmp_path / "one"))
    assert one["step"] == 24
    a, b = weights(tmp_path / "one"), weights(ddp)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= TOLERANCE, worst
    ckpt = load_checkpoint(ddp / "latest.ckpt")
    assert ckpt["extra"]["world_size"] == 2 and ckpt["step"] == 24
    lines_one, lines_ddp = logged(tmp_path / "one"), logged(ddp)
    assert [m["step"] for m in lines_ddp] == [m["step"] for m in lines_one]
    for m1, m2 in zip(lines_one, lines_ddp, strict=True):
        assert m2.pop("train/world_size", 2) == 2 and m1.pop("train/world_size", 1) == 1
        assert m1.keys() == m2.keys()
        for key in m1:
            assert m2[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-6), key
    scores = json.loads((ddp / training.EVAL_SCORES).read_text())
    assert scores["world_size"] == 2 and [e["step"] for e in scores["last"]] == [12, 24]


def descendants(pid: int) -> list[int]:
    """`pid` and every process under it (torchrun starts its workers in new sessions, so a
    process group kill would miss them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


@pytest.mark.slow
def test_two_rank_run_killed_with_sigkill_resumes_to_the_uninterrupted_end(
    two_rank_run, tiny_demos: Path, tmp_path: Path
) -> None:
    """SIGKILL to torchrun and both ranks once the first latest.ckpt is written; torchrun
    resume=true then ends with the uninterrupted 2-rank weights exactly and its metrics."""
    run_dir = tmp_path / "killed"
    command = torchrun("debug=tiny", f"data.path={tiny_demos}", f"run_dir={run_dir}", *TINY)
    launch = subprocess.Popen(command, cwd=REPO_ROOT, env=run_env(), start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (run_dir / "latest.ckpt").exists() and launch.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.01)
    for pid in descendants(launch.pid):
        with contextlib.suppress(ProcessLookupError):  # a worker that ended meanwhile
            os.kill(pid, signal.SIGKILL)
    launch.wait(timeout=60)
    killed_at = load_checkpoint(run_dir / "latest.ckpt")["step"]
    assert 6 <= killed_at < 24

    resumed = subprocess.run(command + ["resume=true"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=300, env=run_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = two_rank_run()
    a, b = weights(straight), weights(run_dir)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
    assert logged(run_dir) == logged(straight)


@pytest.mark.slow
def test_two_ranks_train_one_process_pcm(tiny_checkpoint: Path, tiny_demos: Path, make_cfg,
                                         tmp_path: Path) -> None:
    """Stage pcm under torchrun: rank 0 collects the trajectory cache while rank 1 waits, then
    both read it; 10 steps give one process's PCM weights within TOLERANCE (its objective
    draws nothing: the shards' weighted means average to the batch's)."""
    pcm = ("stage=pcm", f"pcm.base_checkpoint={tiny_checkpoint}", "train.max_steps=10",
           "val.every=5", "checkpoint.every=5", "data.batch_size=6", "threads=1")
    ddp = tmp_path / "ddp"
    result = subprocess.run(
        torchrun("debug=tiny", f"data.path={tiny_demos}", f"run_dir={ddp}", *pcm),
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=run_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    training.run_training(make_cfg(*pcm, run_dir=tmp_path / "one"))
    a, b = (load_checkpoint(run / "latest.ckpt")["pcm"] for run in (tmp_path / "one", ddp))
    for part in ("model", "ema"):
        worst = max((a[part][k] - b[part][k]).abs().max().item() for k in a[part])
        assert worst <= TOLERANCE, (part, worst)
