"""Shared fixtures: a tiny PushT-shaped demonstration store and the real configs, shrunk."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from policy.data import ReplayBuffer

REPO_ROOT = Path(__file__).resolve().parents[1]
HEADLESS = {"WANDB_MODE": "offline", "SDL_VIDEODRIVER": "dummy", "SDL_AUDIODRIVER": "dummy"}
"""wandb offline, SDL without a display or sound card: how the tests run every script."""


def run_repo_script(script: str | Path, *args: str | Path, timeout: float = 300
                    ) -> subprocess.CompletedProcess:
    """A script of the repository as a user runs it: `python SCRIPT ARGS` from the repo root,
    headless, its output captured, under a timeout (a hang fails the test)."""
    return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **HEADLESS})
CONF_DIR = REPO_ROOT / "conf"
TEST_SAMPLER = "sampler=parareal_ddpm100"
"""What eval_cfg samples with unless a test says otherwise: a fixed exact sampler, so the many
eval tests run no sampler=auto calibration (tests/test_autotune.py and the default-config tests
cover it)."""


@pytest.fixture(autouse=True, scope="session")
def _private_sampler_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """sampler=auto's choices (and onnxruntime exports) go to a folder of this test session, so
    tests never read a choice cached by a user's run or write into their ~/.cache."""
    saved = os.environ.get("PICARD_CACHE")
    os.environ["PICARD_CACHE"] = str(tmp_path_factory.mktemp("picard_cache"))
    yield
    if saved is None:
        os.environ.pop("PICARD_CACHE", None)
    else:
        os.environ["PICARD_CACHE"] = saved


def make_tiny_demos(path: Path, n_episodes: int = 8, n_steps: int = 30, seed: int = 0) -> Path:
    """A learnable PushT-shaped store: the agent moves a fixed fraction of the way to the block,
    so each action is a function of the observation. Keys state (T, 5), keypoint (T, 9, 2),
    action (T, 2), the layout of data/pusht_demos.zarr.zip."""
    rng = np.random.default_rng(seed)
    offsets = rng.uniform(-20, 20, size=(9, 2))
    buffer = ReplayBuffer.create_empty()
    for _ in range(n_episodes):
        agent, block = rng.uniform(100, 400, size=2), rng.uniform(150, 350, size=2)
        angle = rng.uniform(0, 2 * np.pi)
        states, keypoints, actions = [], [], []
        for _ in range(n_steps):
            target = agent + 0.3 * (block - agent)
            states.append([*agent, *block, angle])
            keypoints.append(block + offsets)
            actions.append(target)
            agent = target
        buffer.add_episode({
            "state": np.array(states, np.float32),
            "keypoint": np.array(keypoints, np.float32),
            "action": np.array(actions, np.float32),
        })
    buffer.save(path)
    return path


def make_tiny_image_demos(folder: Path, n_episodes: int, n_steps: int) -> Path:
    """`make_tiny_demos` plus `img`: the PushT env's 96x96 frame of every stored state, saved
    as folder/image.zarr.zip (the low-dim store beside it)."""
    from envs.pusht import render_state
    from policy.data import ReplayBuffer

    source = ReplayBuffer.load(make_tiny_demos(folder / "lowdim.zarr.zip", n_episodes=n_episodes,
                                               n_steps=n_steps))
    buffer = ReplayBuffer.create_empty()
    for index in range(source.n_episodes):
        episode = source.get_episode(index)
        episode["img"] = np.stack([render_state(state.astype(np.float64), 96)
                                   for state in episode["state"]])
        buffer.add_episode(episode)
    buffer.save(folder / "image.zarr.zip")
    return folder / "image.zarr.zip"


@pytest.fixture(scope="session")
def tiny_demos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a tiny demonstration store (8 episodes x 30 steps), built once per session."""
    return make_tiny_demos(tmp_path_factory.mktemp("data") / "tiny_demos.zarr.zip")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run torch on one thread: tiny models gain nothing from two, and the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_cfg(tiny_demos: Path, tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose conf/train.yaml (with debug=tiny unless tiny=False) on the tiny store, the run
    dir under tmp_path."""

    def _make(*overrides: str, run_dir: Path | None = None, tiny: bool = True) -> DictConfig:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(
                "train",
                overrides=[
                    *(["debug=tiny"] if tiny else []),
                    f"data.path={tiny_demos}",
                    f"run_dir={run_dir or tmp_path / 'run'}",
                    *overrides,
                ],
            )

    return _make


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_demos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A debug=tiny policy trained for 10 steps on the tiny store, made once per session."""
    import app.training as training

    run_dir = tmp_path_factory.mktemp("tiny_policy")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[
            "debug=tiny", f"data.path={tiny_demos}", f"run_dir={run_dir}", "train.max_steps=10",
            "val.every=0", "threads=1",
        ])
    threads = torch.get_num_threads()
    training.run_training(cfg)
    torch.set_num_threads(threads)
    return run_dir / "latest.ckpt"


@pytest.fixture
def eval_cfg(tiny_checkpoint: Path) -> Callable[..., DictConfig]:
    """Compose conf/eval.yaml on the tiny checkpoint: 2 episodes of 24 steps (3 chunks) in 2
    envs, TEST_SAMPLER, 1 warm-up chunk, exact_err on every chunk, no wandb, one thread."""

    def _make(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("eval", overrides=[
                f"checkpoint={tiny_checkpoint}", TEST_SAMPLER, "n_episodes=2", "n_envs=2",
                "max_steps=24", "warmup_chunks=1", "exact_err_every=1", "threads=1",
                "progress=false", "logger.wandb=false",
                *overrides,
            ])

    return _make


@pytest.fixture
def sigterm_at_train_step() -> Callable[[int], contextlib.AbstractContextManager[None]]:
    """`with sigterm_at_train_step(n): ...`: inside, training.train_step sends SIGTERM to this
    process on its n-th call, what a run killed mid-training sees."""
    import app.training as training

    @contextlib.contextmanager
    def at(n: int) -> Iterator[None]:
        real_step, calls = training.train_step, 0

        def step_then_sigterm(*args, **kwargs):
            nonlocal calls
            calls += 1
            if calls == n:
                os.kill(os.getpid(), signal.SIGTERM)
            return real_step(*args, **kwargs)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(training, "train_step", step_then_sigterm)
            yield

    return at
