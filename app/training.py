"""Training runs: ONE loop for every stage; a stage supplies its policy, data, loss and the part
of the config its checkpoints keep.

`run_training(cfg)` reads top to bottom: config check, the stage's policy and data, optimizer +
cosine LR, EMA, then the loop of `train_step` with periodic validation loss, rollout
evaluation of the EMA policy (`app.evaluation`) and atomic checkpoints (`latest.ckpt`,
`best.ckpt` by rollout score, optional step snapshots) in `run_dir`. Stages (`STAGES`):
`DPStage` trains the diffusion policy on demonstration windows; `PCMStage` loads the base
policy of `pcm.base_checkpoint`, attaches a fresh PCM (policy/pcm.py) and trains only it on
base-model trajectories collected once into `pcm.data.cache` (policy/pcm_training.py).
Resuming gives the same weights as an uninterrupted run: the data order is a function of
(seed, epoch), the RNG states travel in the checkpoint, and validation and evaluation draw from
their own generators. SIGINT/SIGTERM finish the current step, write `latest.ckpt` and stop.

Under `torchrun --nproc_per_node=N` (`World`, docs/design.md §13) the same loop runs on N
processes with DistributedDataParallel (gloo on CPU, nccl on CUDA): each step's global batch of
`data.batch_size` windows is the one-process run's, cut into N contiguous shards
(`WindowShards`); DP's noise and timesteps are drawn for the whole global batch on every rank
and each keeps its shard's rows (`dp_shard_loss`), so N ranks train the one-process weights up
to float summation order. Rank 0 alone keeps the EMA, validates, rolls out, logs and writes
checkpoints; the ranks agree after every step on the global loss and on whether to stop.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from app.builder import build_sampler
from app.checks import Check, ConfigError, is_int, is_number, plain, raise_first_failure
from app.device import DEVICE_ALLOWED, configure_torch, device_ok
from app.evaluation import evaluate, summarize
from app.run_dirs import prepare_output_dir
from app.training_curve import METRICS_FILE, parse_metrics_line, write_curve
from envs.rollout import VECTOR_KINDS, EpisodeSpec
from picard_sampler import Schedule
from policy.checkpoint import (
    PCM_KEY,
    load_checkpoint,
    load_policy_checkpoint,
    policy_weights,
    restore_rng_states,
    rng_states,
    save_checkpoint,
)
from policy.data import SequenceDataset, windows_from_config
from policy.diffusion_policy import DiffusionPolicy, schedule_from_config
from policy.ema import EMA
from policy.encoders import camera_shapes
from policy.file_io import atomic_torch_save, atomic_write, weights_fingerprint
from policy.pcm import build_pcm, complete_config
from policy.pcm_training import PCMObjective, TrajectoryDataset, collect_trajectories

LossFn = Callable[[DiffusionPolicy, Mapping[str, Any]], torch.Tensor]
ShardLossFn = Callable[[DiffusionPolicy, Mapping[str, Any], range, int, int], torch.Tensor]
"""A stage's loss on one rank's shard of a global batch: (policy, shard batch, the shard's rows
in the global batch, the global batch's size, this rank's seed for per-rank draws)."""


# ----------------------------------------------------------------------------------- stages
class DPStage:
    """Stage dp: the diffusion policy of `cfg.policy` on the demonstration windows, with DP's
    epsilon-prediction loss; the normalizer is fitted on the training windows."""

    name = "dp"
    items = "windows"

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def checks(self) -> list[Check]:
        """Stage-specific config checks (none beyond the common ones)."""
        return []

    def build_policy(self) -> DiffusionPolicy:
        """Build (and so validate) the policy of `cfg.policy` through the same allow-list as a
        loaded checkpoint (policy.safe_config), normalizer unfitted; a bad value is one line."""
        from policy.safe_config import CheckpointError, build_policy

        try:
            return build_policy(plain(self.cfg.policy), "config").train()
        except CheckpointError as e:
            raise ConfigError(str(e)) from e

    def datasets(self, policy: DiffusionPolicy) -> tuple[Dataset, Dataset]:
        """Train and validation windows (split by episode); fits the policy's normalizer (on
        the low-dim keys and the action). An image policy's cameras (its encoder's `cameras`)
        come as uint8 frames, cropped and scaled by the encoder itself."""
        cfg = self.cfg
        image_shapes = camera_shapes(policy)
        if image_shapes and not OmegaConf.is_dict(cfg.data.obs_keys):
            raise ConfigError(
                f"data.obs_keys must map each observation key to a data key for an image "
                f"policy (e.g. {{image: img, agent_pos: 'state[:2]'}}); got {cfg.data.obs_keys}"
            )
        train_set = load_windows(plain_data(cfg), cfg.policy.horizon, cfg.policy.n_obs_steps,
                                 cfg.policy.n_action_steps, cfg.seed, image_shapes)
        check_enough_windows(train_set, cfg.data.batch_size)
        for key, got in (("obs_dim", train_set.obs_dim), ("action_dim", train_set.action_dim)):
            if cfg.env[key] != got:
                raise ConfigError(f"env.{key} is {cfg.env[key]} but the data's is {got}")
        if not train_set.flat:  # a dict of observations: the same keys and shapes as the policy
            wanted = {k: tuple(v) for k, v in policy.obs_encoder.obs_shapes.items()}
            if train_set.obs_shapes != wanted:
                raise ConfigError(f"data.obs_keys give observations {train_set.obs_shapes} but "
                                  f"the policy takes {wanted}")
        policy.normalizer.fit(train_set.all_obs_and_actions())
        return train_set, train_set.get_validation_dataset()

    def loss(self, policy: DiffusionPolicy) -> LossFn:
        """DP's epsilon-prediction loss."""
        return lambda policy, batch: policy.compute_loss(batch)

    def shard_loss(self, loss: LossFn) -> ShardLossFn:
        """DP's loss on a rank's shard with the global batch's noise (`dp_shard_loss`)."""
        return dp_shard_loss

    def validation_loss_fn(self, loss: LossFn) -> LossFn | None:
        """None: validation draws its noise from a seeded generator (`policy.compute_loss`)."""
        return None

    def checkpoint_config(self, resolved: dict[str, Any]) -> dict[str, Any]:
        """The config the checkpoints keep: the run's own."""
        return resolved

    def trained_module(self, policy: DiffusionPolicy) -> nn.Module:
        """The part that trains: the noise-prediction network and the observation encoder
        (parameter-free for low-dim policies, a ResNet per camera for image policies)."""
        return policy


TRUNK_SETTINGS = ("finetune", "lora_rank", "lora_alpha")
"""pcm.model keys that pick the trunk: a PCM that differs from pcm.init only in these starts
from pcm.init's head, its trunk fresh (the base, a zero LoRA, or a copy of the base)."""


class PCMStage:
    """Stage pcm: a Picard Consistency Model (docs/design.md §4.7) for the frozen base policy of
    `pcm.base_checkpoint`, trained with the objective of `cfg.pcm` on base trajectories."""

    name = "pcm"
    items = "chunks"

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self._base: DiffusionPolicy | None = None

    def checks(self) -> list[Check]:
        """The base checkpoint exists and the trajectory collection is sized sensibly."""
        d = self.cfg.pcm.data
        init = self.cfg.pcm.init
        return [
            ("pcm.init", init is None or isinstance(init, str), "null or a PCM checkpoint path"),
            ("pcm.base_checkpoint", Path(str(self.cfg.pcm.base_checkpoint)).is_file(),
             "an existing policy checkpoint (train one with stage=dp)"),
            ("pcm.data.n_chunks", is_int(d.n_chunks, 1), "an int >= 1"),
            ("pcm.data.n_val_chunks", is_int(d.n_val_chunks, 0), "an int >= 0"),
            ("pcm.data.iterate_rounds", is_int(d.iterate_rounds, 0), "an int >= 0"),
        ]

    def schedule(self, policy: DiffusionPolicy) -> Schedule:
        """The sampler schedule the PCM trains for (`pcm.schedule`) on the base's settings."""
        try:
            return schedule_from_config(policy.train_schedule, plain(self.cfg.pcm.schedule),
                                        "pcm.schedule")
        except ValueError as e:
            raise ConfigError(str(e)) from e

    def build_policy(self) -> DiffusionPolicy:
        """The base policy (EMA weights, frozen) with a fresh PCM of `pcm.model` attached
        (initialised from the EMA PCM of `pcm.init` if set), the only part that trains."""
        cfg = self.cfg
        try:
            policy = load_policy_checkpoint(cfg.pcm.base_checkpoint)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"pcm.base_checkpoint: {e}") from e
        if policy.pcm is not None:
            raise ConfigError(f"pcm.base_checkpoint {cfg.pcm.base_checkpoint} already holds a PCM")
        policy.requires_grad_(False)
        try:
            pcm = build_pcm(policy, **plain(cfg.pcm.model))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"pcm.model: {e}") from e
        if cfg.pcm.init is not None:  # start from a trained PCM (e.g. one for another K_s)
            init_pcm_from(pcm, cfg.pcm.init)
        policy.attach_pcm(pcm.requires_grad_(True))
        return policy

    def datasets(self, policy: DiffusionPolicy) -> tuple[Dataset, Dataset]:
        """Train / val trajectories of the base policy on train / val windows, read from
        `pcm.data.cache` when it holds the same collection, else collected and saved there."""
        cfg, d = self.cfg, self.cfg.pcm.data
        schedule = self.schedule(policy)
        base_weights = {k: v for k, v in policy.state_dict().items()
                        if not k.startswith(f"{PCM_KEY}.")}
        data = plain_data(cfg)
        meta = {
            "base_fingerprint": weights_fingerprint(base_weights),
            "schedule": {"class": type(schedule).__name__, **schedule.config},
            "data": {k: data.get(k) for k in ("path", "obs_keys", "action_key", "val_ratio",
                                              "max_train_episodes")},
            "seed": cfg.seed, "n_chunks": d.n_chunks, "n_val_chunks": d.n_val_chunks,
            "iterate_rounds": d.iterate_rounds, "update": cfg.pcm["update"],
        }
        cache = Path(d.cache)
        if cache.exists():
            try:
                saved = torch.load(cache, map_location="cpu", weights_only=True)
            except Exception as e:  # torch raises several types for torn or foreign files
                raise ConfigError(f"pcm.data.cache {cache} is unreadable ({type(e).__name__}): "
                                  "point pcm.data.cache at a new file (or delete this one if "
                                  "it is a torn trajectory cache)") from e
            if not (isinstance(saved, dict) and {"meta", "train", "val"} <= set(saved)):
                raise ConfigError(f"pcm.data.cache {cache} is not a PCM trajectory cache: point "
                                  "pcm.data.cache at a new file")
            changed = changed_keys(saved["meta"], meta)
            if changed:
                raise ConfigError(
                    f"pcm.data.cache {cache} holds another collection (differs in {changed}): "
                    "delete it or point pcm.data.cache elsewhere"
                )
            return _trajectory_dataset(saved["train"]), _trajectory_dataset(saved["val"])
        image_shapes = camera_shapes(policy)  # an image base: frames encoded once per chunk
        if image_shapes and not OmegaConf.is_dict(cfg.data.obs_keys):
            raise ConfigError(
                f"data.obs_keys must map each observation key of the image base policy to a "
                f"data key (e.g. env=pusht_image); got {cfg.data.obs_keys}"
            )
        windows = load_windows(data, policy.horizon, policy.n_obs_steps, policy.n_action_steps,
                               cfg.seed, image_shapes)
        check_enough_windows(windows, 1)
        wanted = {k: tuple(v) for k, v in policy.obs_encoder.obs_shapes.items()}
        if not windows.flat and windows.obs_shapes != wanted:
            raise ConfigError(f"data.obs_keys give observations {windows.obs_shapes} but the "
                              f"base policy takes {wanted}")
        splits = {}
        for split, source, n, seed in (
            ("train", windows, d.n_chunks, cfg.seed),
            ("val", windows.get_validation_dataset(), d.n_val_chunks, cfg.seed + 1),
        ):
            if n == 0 or len(source) == 0:
                splits[split] = {}
                continue
            splits[split] = collect_trajectories(
                policy, schedule, source, n, seed=seed, iterate_rounds=d.iterate_rounds,
                update=cfg.pcm["update"], progress=cfg.progress,
            )
        atomic_torch_save({"meta": meta, **splits}, cache)
        return _trajectory_dataset(splits["train"]), _trajectory_dataset(splits["val"])

    def loss(self, policy: DiffusionPolicy) -> LossFn:
        """The PCM objective of `cfg.pcm` ((a) landing, (b) consistency)."""
        pcm = self.cfg.pcm
        try:
            return PCMObjective(
                schedule=self.schedule(policy), objective=pcm.objective,
                switch_rounds=pcm.switch_rounds, update=pcm["update"], iterates=pcm.iterates,
                huber_c=pcm.huber_c,
            )
        except ValueError as e:
            raise ConfigError(str(e)) from e

    def shard_loss(self, loss: LossFn) -> ShardLossFn:
        """The objective on the shard as it is: it draws nothing (the data holds its noise) and
        is a mean over the batch, so the shards' weighted mean is the global batch's."""
        return lambda policy, batch, rows, total, seed: loss(policy, batch)

    def validation_loss_fn(self, loss: LossFn) -> LossFn | None:
        """The objective itself (deterministic: the data holds its noise)."""
        return loss

    def checkpoint_config(self, resolved: dict[str, Any]) -> dict[str, Any]:
        """The run's config with the base's `policy` block: it must rebuild the base policy,
        whatever `cfg.policy` says."""
        base = load_checkpoint(self.cfg.pcm.base_checkpoint)["config"]["policy"]
        return {**resolved, "policy": base}

    def trained_module(self, policy: DiffusionPolicy) -> nn.Module:
        """The part that trains: the PCM."""
        return policy.pcm


STAGES = {"dp": DPStage, "pcm": PCMStage}
"""Every training stage by its `stage=` name; the loop is the same for all."""


def init_pcm_from(pcm: nn.Module, path: str) -> None:
    """Load the EMA weights of the PCM in checkpoint `path` into `pcm`: all of them when the
    settings match, or only the head when only the trunk differs (e.g. a LoRA or full fine-tune
    started from a trained head-only PCM, which learns the head far faster)."""
    try:
        init = load_checkpoint(path).get(PCM_KEY)
    except (FileNotFoundError, ValueError) as e:  # missing, corrupt or foreign
        raise ConfigError(f"pcm.init: {e}") from e
    if init is None:
        raise ConfigError(f"pcm.init {path} holds no PCM")
    stored = complete_config(init["config"])
    differ = sorted(k for k in pcm.config if stored.get(k) != pcm.config[k])
    if not differ:
        pcm.load_state_dict(init["ema"])
    elif set(differ) <= set(TRUNK_SETTINGS):
        head = {k[len("head."):]: v for k, v in init["ema"].items() if k.startswith("head.")}
        pcm.head.load_state_dict(head)
    else:
        raise ConfigError(
            f"pcm.init {path} holds a PCM whose {differ} differ from pcm.model's; only the trunk "
            f"settings {list(TRUNK_SETTINGS)} may differ (its head is then reused)"
        )


# ----------------------------------------------------------------------------- config, setup
def check_train_config(cfg: DictConfig) -> None:
    """Reject values the run cannot use, naming the key and what is allowed."""
    t = cfg.train
    checks: list[Check] = [
        ("stage", cfg.stage in STAGES, f"one of {sorted(STAGES)}"),
        ("device", device_ok(cfg.device), DEVICE_ALLOWED),
        ("threads", cfg.threads is None or is_int(cfg.threads, 1), "null or an int >= 1"),
        ("seed", is_int(cfg.seed, 0), "an int >= 0"),
        ("data.batch_size", is_int(cfg.data.batch_size, 1), "an int >= 1"),
        ("data.val_ratio", is_number(cfg.data.val_ratio, 0) and cfg.data.val_ratio < 1,
         "a number in [0, 1)"),
        ("data.max_train_episodes", cfg.data.max_train_episodes is None
         or is_int(cfg.data.max_train_episodes, 1), "null or an int >= 1"),
        ("data.num_workers", is_int(cfg.data.num_workers, 0), "an int >= 0"),
        ("optim.lr", is_number(cfg.optim.lr, 0, strict=True), "a number > 0"),
        ("optim.betas", OmegaConf.is_list(cfg.optim.betas) and len(cfg.optim.betas) == 2
         and all(is_number(b, 0) and b < 1 for b in cfg.optim.betas),
         "two numbers in [0, 1)"),
        ("optim.weight_decay", is_number(cfg.optim.weight_decay, 0), "a number >= 0"),
        ("ema.power", is_number(cfg.ema.power, 0, strict=True), "a number > 0"),
        ("ema.max_decay", is_number(cfg.ema.max_decay, 0) and cfg.ema.max_decay <= 1,
         "a number in [0, 1]"),
        ("val.max_batches", is_int(cfg.val.max_batches, 1), "an int >= 1"),
        ("eval.n_episodes", is_int(cfg.eval.n_episodes, 1), "an int >= 1"),
        ("eval.n_envs", is_int(cfg.eval.n_envs, 1), "an int >= 1"),
        ("eval.seed_start", is_int(cfg.eval.seed_start, 0), "an int >= 0"),
        ("resume", isinstance(cfg.resume, bool), "true or false"),
        ("progress", isinstance(cfg.progress, bool), "true or false"),
        ("logger.wandb", isinstance(cfg.logger.wandb, bool), "true or false"),
        ("train.max_steps", t.max_steps is None or is_int(t.max_steps, 1), "null or an int >= 1"),
        ("train.num_epochs", t.num_epochs is None or is_int(t.num_epochs, 1),
         "null or an int >= 1"),
        ("train.max_steps", t.max_steps is not None or t.num_epochs is not None,
         "set (or train.num_epochs set): training needs an end"),
        ("optim.warmup_steps", is_int(cfg.optim.warmup_steps, 0), "an int >= 0"),
        ("val.every", is_int(cfg.val.every, 0), "an int >= 0 (0 disables validation)"),
        ("eval.every", is_int(cfg.eval.every, 0), "an int >= 0 (0 disables rollouts)"),
        ("eval.vector", cfg.eval.vector in VECTOR_KINDS, f"one of {list(VECTOR_KINDS)}"),
        ("checkpoint.every", is_int(cfg.checkpoint.every, 1), "an int >= 1"),
        ("checkpoint.snapshot_every", is_int(cfg.checkpoint.snapshot_every, 0),
         "an int >= 0 (0 keeps no step snapshots)"),
        ("logger.log_every", is_int(cfg.logger.log_every, 1), "an int >= 1"),
        ("eval.keep_last", is_int(cfg.eval.keep_last, 1), "an int >= 1"),
        ("distributed.timeout_min", is_number(cfg.distributed.timeout_min, 0, strict=True),
         "a number > 0 (minutes)"),
    ]
    raise_first_failure(cfg, checks)
    raise_first_failure(cfg, STAGES[cfg.stage](cfg).checks())


def check_fresh_or_resume(run_dir: Path, resume: Any) -> None:
    """A new run needs a run dir without latest.ckpt; resume=true needs one with it."""
    latest = run_dir / "latest.ckpt"
    if latest.exists() and resume is not True:
        raise ConfigError(
            f"{latest} exists: pass resume=true to continue it, or run_dir=<new folder> (or "
            "name=<new> when run_dir is not set) for a new run"
        )
    if resume is True and not latest.exists():
        raise ConfigError(f"resume=true but there is no checkpoint at {latest}")


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's legacy and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (the legacy global RNG, for dependencies)
    torch.manual_seed(seed)


def plain_data(cfg: DictConfig) -> dict[str, Any]:
    """The `data` block as a plain dict."""
    return plain(cfg.data)


def load_windows(data: Mapping[str, Any], horizon: int, n_obs_steps: int, n_action_steps: int,
                 seed: int, image_shapes: Mapping[str, tuple[int, ...]] | None = None,
                 ) -> SequenceDataset:
    """The training windows of the `data` block (cameras: `image_shapes`); a missing, broken or
    foreign store, a missing key or bad values (NaN, episode_ends, malformed frames) are
    one-line ConfigErrors naming data.path."""
    try:
        return windows_from_config(data, horizon, n_obs_steps, n_action_steps, seed,
                                   image_shapes=image_shapes)
    except KeyError as e:
        raise ConfigError(f"data.path {data['path']}: {e.args[0]}") from e
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from e
    except ValueError as e:
        message = str(e)
        raise ConfigError(message if message.startswith("data.path") else
                          f"data.path {data['path']}: {message}") from e


def check_enough_windows(windows: Dataset, batch_size: int) -> None:
    """Training needs at least one full batch of windows: zero windows would spin forever."""
    if len(windows) < max(1, batch_size):
        raise ConfigError(
            f"data.path {getattr(windows, 'source', 'the dataset')} gives {len(windows)} training "
            f"windows, fewer than one batch (data.batch_size={batch_size}): check "
            "data.max_train_episodes, data.val_ratio and that episodes are not empty, or lower "
            "data.batch_size"
        )


def _trajectory_dataset(data: Mapping[str, torch.Tensor]) -> Dataset:
    """A TrajectoryDataset, or an empty dataset when nothing was collected (no val chunks)."""
    return TrajectoryDataset(data) if data else torch.utils.data.TensorDataset(torch.empty(0))


# ----------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class World:
    """This process's place in a `torchrun` launch (its RANK, WORLD_SIZE, LOCAL_RANK). A run
    without torchrun, or with one process, is rank 0 of 1: nothing distributed runs for it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the process that keeps the EMA, evaluates, logs and writes checkpoints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one process: DistributedDataParallel and collectives."""
        return self.world_size > 1


def launch_world(environ: Mapping[str, str] | None = None) -> World:
    """The World of this process from torchrun's variables (none set: one process); values
    that are not a consistent launch are a ConfigError."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return World()
    try:
        world = World(int(env.get("RANK", "0")), int(env["WORLD_SIZE"]),
                      int(env.get("LOCAL_RANK", "0")))
    except ValueError:
        world = None
    if world is None or not (world.world_size >= 1 and 0 <= world.rank < world.world_size
                             and world.local_rank >= 0):
        raise ConfigError(
            f"RANK={env.get('RANK')!r} WORLD_SIZE={env.get('WORLD_SIZE')!r} LOCAL_RANK="
            f"{env.get('LOCAL_RANK')!r} are not a torchrun launch: start distributed runs with "
            "torchrun --nproc_per_node=N train_pcm.py ..."
        )
    return world


def check_world(cfg: DictConfig, world: World) -> None:
    """What a launch of `world.world_size` processes needs from the config: a global batch
    that splits evenly over the ranks, and no fixed CUDA device (each rank takes its own)."""
    if not world.active:
        return
    batch = cfg.data.batch_size
    if batch % world.world_size:
        raise ConfigError(
            f"data.batch_size={batch} is not divisible by the world size {world.world_size} "
            f"(torchrun's processes): the global batch is split evenly over the ranks; use a "
            f"multiple of {world.world_size}"
        )
    if isinstance(cfg.device, str) and cfg.device.startswith("cuda:"):
        raise ConfigError(f"device={cfg.device} under torchrun: each rank uses cuda:LOCAL_RANK; "
                          "pass device=cuda or device=auto")


def check_resume_world(run_dir: Path, resume: Any, world: World) -> None:
    """resume=true with the world size of the run: checked before any process group or data
    (a cheap read of latest.ckpt's progress record); an unreadable file is left to
    `resume_training`, which explains it."""
    latest = run_dir / "latest.ckpt"
    if resume is not True or not latest.is_file():
        return
    try:
        extra = torch.load(latest, map_location="cpu", weights_only=True, mmap=True)["extra"]
        saved = int(extra.get("world_size", 1))
    except Exception:  # torn, foreign or old: resume_training names what is wrong
        return
    if saved != world.world_size:
        how = ("plain python (one process)" if saved == 1
               else f"torchrun with {saved} processes in all (--nproc_per_node x nodes)")
        raise ConfigError(
            f"resume=true: {latest} was written by a run of world_size {saved}, this launch has "
            f"world_size {world.world_size}: resume with {how}, or start a new run"
        )


def start_world(world: World, device: torch.device, timeout_min: float) -> torch.device:
    """Join the process group (nccl on CUDA, gloo on CPU) and return this rank's device
    (cuda:LOCAL_RANK on CUDA). The timeout bounds how long ranks wait for each other, e.g. for
    rank 0's rollouts: it must exceed the longest evaluation."""
    if not world.active:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=timedelta(minutes=timeout_min))
    return device


def stop_world(world: World) -> None:
    """Leave the process group (if this process joined one)."""
    if world.active and dist.is_initialized():
        dist.destroy_process_group()


def agree(world: World, device: torch.device, loss: float, stop: bool) -> tuple[float, bool]:
    """After a step, one all_reduce: the global batch's loss (the ranks' weighted losses
    averaged) and whether any rank was asked to stop, so every rank stops at the same step. One
    process: the values as they are."""
    if not world.active:
        return loss, stop
    values = torch.tensor([loss, float(stop)], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return values[0].item() / world.world_size, values[1].item() > 0


def share_rng_states(world: World, device: torch.device) -> None:
    """Rank 0's RNG states (Python, numpy, torch CPU and this device's CUDA generator) to every
    rank, after rank 0 alone has drawn from them (its validation DataLoader and rollouts draw
    from the global generators, as they do in one process): the ranks' next draws stay equal,
    and equal to one process's."""
    if not world.active:
        return
    on_cuda = device.type == "cuda"
    payload = [{"rng": {**rng_states(), "cuda": []},
                "device": torch.cuda.get_rng_state(device) if on_cuda else None}
               if world.main else None]
    dist.broadcast_object_list(payload, src=0, device=device if on_cuda else None)
    if not world.main:
        restore_rng_states(payload[0]["rng"])
        if on_cuda:
            torch.cuda.set_rng_state(payload[0]["device"].cpu(), device)


def dp_shard_loss(policy: DiffusionPolicy, batch: Mapping[str, Any], rows: range, total: int,
                  seed: int) -> torch.Tensor:
    """DP's epsilon-prediction loss (`DiffusionPolicy.compute_loss`, the same steps) on `rows`
    of a global batch of `total` windows: the noise and timesteps are drawn for all `total`
    windows from the global RNG, as one process draws them for the whole batch, and this rank
    keeps its rows. Every rank draws the same numbers (same seed, same draws), so N ranks train
    on one process's noise and their RNG states stay equal (rank 0's checkpoint resumes all).
    Camera crops are drawn per rank from a generator seeded by `seed` (the encoder draws per
    image, so they cannot be sliced from a global draw): the same distribution as in one
    process, other numbers."""
    obs = policy.check_obs(batch["obs"])
    naction = policy.normalizer.normalize("action", batch["action"].to(policy.device))
    expected = (len(rows) or 1, policy.horizon, policy.action_dim)
    if tuple(naction.shape) != expected:
        raise ValueError(f"batch 'action': expected shape {expected}, got {tuple(naction.shape)}")
    if camera_shapes(policy):
        on_cuda = [policy.device] if policy.device.type == "cuda" else []
        with torch.random.fork_rng(devices=on_cuda):
            torch.manual_seed(seed)
            cond = policy.encode_obs(obs)
    else:
        cond = policy.encode_obs(obs)
    keep = slice(rows.start, rows.stop) if rows else slice(0, 1)
    noise = torch.randn((total, *naction.shape[1:]), device=policy.device)[keep]
    t = torch.randint(0, policy.train_schedule.num_train_timesteps, (total,),
                      device=policy.device)[keep]
    noisy = policy.train_schedule.add_noise(naction, noise, t)
    return F.mse_loss(policy.model(noisy, t, cond), noise)


def rank_seed(seed: int, step: int, rank: int) -> int:
    """The seed of rank `rank`'s own draws at `step` (camera crops under torchrun)."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


class ShardLoss(nn.Module):
    """A stage's shard loss as a module around the policy, so that DistributedDataParallel's
    forward runs it (DDP arms its gradient all-reduce in forward)."""

    def __init__(self, policy: DiffusionPolicy, shard_loss: ShardLossFn):
        super().__init__()
        self.policy = policy
        self.shard_loss = shard_loss

    def forward(self, batch: Mapping[str, Any], rows: range, total: int,
                seed: int) -> torch.Tensor:
        return self.shard_loss(self.policy, batch, rows, total, seed)


def distributed_loss(module: DistributedDataParallel, world: World, shard: Shard, seed: int
                     ) -> LossFn:
    """The loss `train_step` takes for this rank's shard: DDP's forward, weighted so that the
    gradient DDP averages over the ranks is the global batch's mean (`Shard.weight`)."""
    def loss(policy: DiffusionPolicy, batch: Mapping[str, Any]) -> torch.Tensor:
        return module(batch, shard.rows, shard.total, seed) * shard.weight(world.world_size)

    return loss


# ------------------------------------------------------------------------------------ data
def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the `n` windows in `epoch`: a function of (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def make_train_loader(
    dataset: Dataset, batch_size: int, seed: int, epoch: int, skip_batches: int = 0,
    num_workers: int = 0,
) -> DataLoader:
    """One epoch of shuffled batches; the order depends only on (seed, epoch), so a resumed
    run skips the `skip_batches` already trained on and sees the rest in the same order."""
    order = epoch_order(len(dataset), seed, epoch)
    indices = order[skip_batches * batch_size :].tolist()
    return DataLoader(
        dataset, batch_size=batch_size, sampler=indices, num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),  # keeps the global RNG untouched
    )


@dataclass(frozen=True)
class Shard:
    """This rank's part of one global batch: its `rows` of the `total` windows (empty when the
    last batch of an epoch has fewer windows than there are ranks)."""

    rows: range
    total: int

    def weight(self, world_size: int) -> float:
        """The factor on this rank's mean loss that makes DDP's gradient average (the sum over
        ranks / world_size) the global batch's mean: len(rows) * world_size / total."""
        return len(self.rows) * world_size / self.total


def shard_rows(total: int, rank: int, world_size: int) -> range:
    """Rank `rank`'s contiguous rows of a batch of `total`: sizes differ by at most one
    (np.array_split's cut), all equal when `world_size` divides `total`."""
    size, extra = divmod(total, world_size)
    start = rank * size + min(rank, extra)
    return range(start, start + size + (rank < extra))


class WindowShards(Sampler[list[int]]):
    """The distributed sampler over windows: one epoch's global batches, in a one-process run's
    order (`epoch_order`, batches of `batch_size`), from batch `skip_batches` on; each rank
    loads only its `shard_rows` of each (a rank left without rows in a short last batch loads
    the batch's first window and trains on it with weight 0, so every rank takes part in every
    step). torch's DistributedSampler deals windows round-robin from its own permutation and
    pads the epoch with repeats, which no one-process run sees."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, rank: int,
                 world_size: int, skip_batches: int = 0):
        order = epoch_order(n, seed, epoch)
        self.batches: list[list[int]] = []
        self.shards: list[Shard] = []
        for start in range(skip_batches * batch_size, n, batch_size):
            batch = order[start : start + batch_size]
            rows = shard_rows(len(batch), rank, world_size)
            self.batches.append(batch[rows.start : rows.stop].tolist() if rows
                                else batch[:1].tolist())
            self.shards.append(Shard(rows, len(batch)))

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def epoch_batches(
    dataset: Dataset, cfg: DictConfig, epoch: int, batch_in_epoch: int,
    world: World | None = None,
) -> Iterator[tuple[int, int, Any, Shard | None]]:
    """Endless (epoch, index in epoch, batch, shard), starting at batch `batch_in_epoch` of
    `epoch`: whole batches (shard None) in one process, this rank's shards (`WindowShards`)
    under torchrun. An empty dataset is an error (it would loop without yielding)."""
    if len(dataset) == 0:
        raise ConfigError("the training set is empty: nothing to train on")
    world = world or World()
    for e in itertools.count(epoch):
        skip = batch_in_epoch if e == epoch else 0
        if not world.active:
            loader = make_train_loader(
                dataset, cfg.data.batch_size, cfg.seed, e, skip, cfg.data.num_workers
            )
            for index, batch in enumerate(loader, start=skip):
                yield e, index, batch, None
            continue
        shards = WindowShards(len(dataset), cfg.data.batch_size, cfg.seed, e, world.rank,
                              world.world_size, skip)
        loader = DataLoader(dataset, batch_sampler=shards, num_workers=cfg.data.num_workers,
                            generator=torch.Generator().manual_seed(cfg.seed))  # as above
        for index, (batch, shard) in enumerate(zip(loader, shards.shards, strict=True),
                                               start=skip):
            yield e, index, batch, shard


def to_device(batch: Any, device: torch.device) -> Any:
    """Move a (nested dict of) tensor batch to `device`."""
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch.to(device, non_blocking=True)


# ---------------------------------------------------------------------------------- steps
def build_optimizer(
    cfg: DictConfig, policy: nn.Module, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW plus a linear warm-up then cosine decay to 0 over `total_steps` (DP's schedule)."""
    optimizer = torch.optim.AdamW(
        [p for p in policy.parameters() if p.requires_grad], lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay,
    )
    warmup = cfg.optim.warmup_steps

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def train_step(
    policy: DiffusionPolicy,
    batch: Mapping[str, Any],
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    ema: EMA | None,
) -> float:
    """One optimizer step on `batch`, then the LR schedule and the EMA (None: a rank that
    keeps none); returns the loss."""
    policy.train()
    loss = loss_fn(policy, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    lr_scheduler.step()
    if ema is not None:
        ema.update(policy)
    return loss.item()


@torch.no_grad()
def validation_loss(
    policy: DiffusionPolicy, dataset: Dataset, batch_size: int, max_batches: int, seed: int,
    device: torch.device, loss_fn: LossFn | None = None,
) -> float:
    """Mean loss over the first `max_batches` validation batches, with fixed noise (seed);
    `loss_fn` (deterministic, e.g. the PCM objective) replaces the policy's DP loss."""
    if len(dataset) == 0:
        return float("nan")
    generator = torch.Generator(device).manual_seed(seed)
    losses = []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        batch = to_device(batch, device)
        loss = (
            policy.compute_loss(batch, generator=generator) if loss_fn is None
            else loss_fn(policy, batch)
        )
        losses.append(loss.item())
    return float(np.mean(losses))


def rollout_metrics(policy: DiffusionPolicy, cfg: DictConfig) -> dict[str, float] | None:
    """Roll the policy out in the env on `cfg.eval` seeds (app.evaluation); the measured
    metrics of docs/design.md §5 (mean_score, success_rate, rounds_mean, nfe, latency_ms_*),
    or None when the rollout was interrupted (its partial score is no score)."""
    sampler = build_sampler(cfg.eval.sampler, policy, "eval.sampler")
    episodes = EpisodeSpec(n_episodes=cfg.eval.n_episodes, n_envs=cfg.eval.n_envs,
                           seed_start=cfg.eval.seed_start, max_steps=cfg.env.max_steps,
                           vector=cfg.eval.vector, progress=cfg.progress)
    result = evaluate(policy, sampler, cfg.env, episodes, noise_seed=cfg.eval.seed_start)
    if result.rollout.interrupted:
        return None
    return {k: v for k, v in summarize(result).items() if v is not None}


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            changed += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}")
    return changed


def resume_training(
    path: Path, policy: DiffusionPolicy, ema: EMA | None, optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device,
    config: Mapping[str, Any], world: World | None = None,
) -> dict[str, Any]:
    """Load weights, optimizer, scheduler and RNG states from `path`; return the progress.

    Warns about config keys that changed since the checkpoint (other than `resume`): the run
    goes on, but it is no longer the same as an uninterrupted one. A checkpoint of another
    world size is refused: the ranks' shards and draws are that launch's. Every rank loads
    the same file (rank 0's states are every rank's); `ema` None: a rank without EMA."""
    world = world or World()
    try:
        ckpt = load_checkpoint(path, map_location=device)
    except ValueError as e:
        intact = intact_checkpoints(path.parent, exclude=path)
        offer = (f"; intact checkpoints beside it: {', '.join(intact)} (copy one to "
                 f"{path.name} to resume from it)" if intact
                 else "; no intact checkpoint beside it")
        raise ConfigError(f"resume=true: {e}{offer}") from e
    if int(ckpt["extra"].get("world_size", 1)) != world.world_size:  # a file swapped since
        check_resume_world(path.parent, True, world)
    changed = [k for k in changed_keys(ckpt["config"], config) if k != "resume"]
    if changed and world.main:
        print(f"warning: resuming {path} with changed config keys {changed}", file=sys.stderr)
    try:
        policy.load_state_dict(policy_weights(ckpt, "model"))
        if ema is not None:
            ema.load_state_dict({**ckpt["ema"], "model": policy_weights(ckpt, "ema")})
    except RuntimeError as e:  # shapes or keys differ: the config changed the network
        raise ConfigError(
            f"resume=true: {path} holds another network than the config builds (changed keys: "
            f"{changed or 'none'}); resume with the checkpoint's settings or start a new run"
        ) from e
    optimizer.load_state_dict(ckpt["optimizer"])
    lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
    restore_rng_states(ckpt["rng"])
    rng_device = ckpt["extra"].get("rng_device")
    if world.active and device.type == "cuda" and rng_device is not None:
        # rank 0 saved its own device's generator: every rank's device continues from it
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"][rng_device], device)
    return {**ckpt["extra"], "step": ckpt["step"], "epoch": ckpt["epoch"]}


def intact_checkpoints(run_dir: Path, exclude: Path) -> list[str]:
    """'name (step N)' of every readable checkpoint in `run_dir` but `exclude`, newest first."""
    found = []
    for candidate in run_dir.glob("*.ckpt"):
        if candidate == exclude:
            continue
        try:
            found.append((load_checkpoint(candidate)["step"], candidate.name))
        except (ValueError, FileNotFoundError):
            continue
    return [f"{name} (step {step})" for step, name in sorted(found, reverse=True)]


# ------------------------------------------------------------------------------ bookkeeping
class MetricLogger:
    """Appends metrics to run_dir/metrics.jsonl and, if enabled, to wandb (offline by default).

    Resuming from the checkpoint of step `resume_step` first drops the lines logged after it
    (the interrupted run went past its last checkpoint), so the file equals an uninterrupted
    run's."""

    def __init__(self, cfg: DictConfig, run_dir: Path, wandb_id: str | None,
                 resume_step: int | None = None):
        self.path = run_dir / METRICS_FILE
        if resume_step is None and self.path.exists():  # a run killed before any checkpoint
            kept = run_dir / f"metrics.{time.strftime('%Y%m%d-%H%M%S')}.orphaned.jsonl"
            self.path.replace(kept)
            print(f"{self.path} of an earlier run without a checkpoint kept as {kept.name}",
                  file=sys.stderr)
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines(keepends=True)
                    if (step := _logged_step(line)) is not None and step <= resume_step]
            atomic_write(self.path, lambda f: f.write("".join(kept).encode()))
        self.wandb = None
        self.wandb_id = wandb_id
        if cfg.logger.wandb:
            import wandb

            self.wandb = wandb.init(
                project=cfg.logger.project, name=cfg.name, id=wandb_id, resume="allow",
                dir=str(run_dir), mode=cfg.logger.mode,
                config=OmegaConf.to_container(cfg, resolve=True),
            )
            self.wandb_id = self.wandb.id

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(dict(metrics), step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _logged_step(line: str) -> int | None:
    """The step of a metrics.jsonl line (None for a torn or foreign line)."""
    parsed = parse_metrics_line(line)
    return None if parsed is None else parsed[0]


class StopOnSignal:
    """Turns the first SIGINT/SIGTERM into `requested = True` (a second one acts as usual);
    inside `interruptible()` (a periodic rollout) it also interrupts the work at once, so a
    scheduler's SIGTERM never waits for a whole rollout."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}
        self._interruptible = False

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """A section a stop request interrupts (KeyboardInterrupt) instead of waiting for."""
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        self._restore()
        if self._interruptible:
            raise KeyboardInterrupt("stop requested during a rollout")

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __exit__(self, *exc_info: object) -> None:
        self._restore()


# -------------------------------------------------------------------------------------- run
def run_training(cfg: DictConfig) -> dict[str, Any]:
    """Train per `cfg`; returns the final step, epoch and last losses / rollout metrics.

    Under torchrun every rank runs this (`World`); rank 0 returns the summary, the others too
    (their `last` holds the agreed train losses only)."""
    world = launch_world()
    check_train_config(cfg)
    check_world(cfg, world)
    device = configure_torch(cfg.device, cfg.threads)
    seed_everything(cfg.seed)
    stage = STAGES[cfg.stage](cfg)
    run_dir = Path(cfg.run_dir)
    latest = run_dir / "latest.ckpt"
    check_fresh_or_resume(run_dir, cfg.resume)
    check_resume_world(run_dir, cfg.resume, world)
    device = start_world(world, device, cfg.distributed.timeout_min)
    try:
        return _train(cfg, stage, world, device, run_dir, latest)
    finally:
        stop_world(world)


def _train(cfg: DictConfig, stage: DPStage | PCMStage, world: World, device: torch.device,
           run_dir: Path, latest: Path) -> dict[str, Any]:
    """run_training's loop, inside the process group of a distributed launch."""
    main = world.main
    if main:
        prepare_output_dir(run_dir, overwrite=True, results_name=None)

    policy = stage.build_policy()
    loss_fn = stage.loss(policy)
    if world.active and not main:  # rank 0 collects a PCM trajectory cache, the others read it
        dist.barrier()
    train_set, val_set = stage.datasets(policy)
    if world.active and main:
        dist.barrier()
    resolved = stage.checkpoint_config(OmegaConf.to_container(cfg, resolve=True))
    policy.to(device)
    steps_per_epoch = math.ceil(len(train_set) / cfg.data.batch_size)
    epoch_steps = cfg.train.num_epochs and cfg.train.num_epochs * steps_per_epoch
    total_steps = min(n for n in (cfg.train.max_steps, epoch_steps) if n is not None)
    ema = EMA(policy, power=cfg.ema.power, max_decay=cfg.ema.max_decay) if main else None
    optimizer, lr_scheduler = build_optimizer(cfg, policy, total_steps)

    # recent_losses / recent_s: the losses (and their seconds) since the last log, saved with
    # every checkpoint so the first log after a resume averages the same steps; eval_history:
    # the last eval.keep_last rollout scores (eval_scores.json, the sweep's seed table)
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_score": -math.inf,
             "best_step": None, "eval_history": [], "wandb_id": None, "recent_losses": [],
             "recent_s": 0.0}
    if cfg.resume:
        state.update(resume_training(latest, policy, ema, optimizer, lr_scheduler, device,
                                     resolved, world))
    state.update(world_size=world.world_size, rng_device=device.index)
    logger = (MetricLogger(cfg, run_dir, state["wandb_id"],
                           resume_step=state["step"] if cfg.resume else None) if main else None)
    if logger is not None:
        state["wandb_id"] = logger.wandb_id
    module = None
    if world.active:  # after resuming: DDP's first broadcast then sends the loaded weights
        module = DistributedDataParallel(
            ShardLoss(policy, stage.shard_loss(loss_fn)),
            device_ids=[device.index] if device.type == "cuda" else None,
            forward_sync_buffers=False,  # the normalizer is fitted alike on every rank
        )

    def checkpoint(path: Path) -> None:
        state.update(recent_losses=list(recent), recent_s=recent_s)
        save_checkpoint(
            path, policy=policy, ema=ema, optimizer=optimizer, lr_scheduler=lr_scheduler,
            step=state["step"], epoch=state["epoch"], config=resolved,
            extra={k: state[k] for k in CHECKPOINT_EXTRA},
        )

    n_params = sum(p.numel() for p in stage.trained_module(policy).parameters())
    per_rank = (f" = {world.world_size} ranks x {cfg.data.batch_size // world.world_size}"
                if world.active else "")
    if main:
        print(f"{cfg.name}: {len(train_set)} train / {len(val_set)} val {stage.items}, "
              f"{stage.name} model {n_params / 1e6:.2f}M params, {total_steps} steps on "
              f"{device}, batch {cfg.data.batch_size}{per_rank}, world_size {world.world_size} "
              f"-> {run_dir}")
    val_loss_fn = stage.validation_loss_fn(loss_fn)
    bar = tqdm(total=total_steps, initial=state["step"], disable=not (cfg.progress and main),
               desc="train")
    recent: list[float] = [float(x) for x in state["recent_losses"]]  # since the last log
    recent_s = float(state["recent_s"])  # their training seconds
    last: dict[str, Any] = {}
    saved_at = state["step"] if cfg.resume else None
    batches = epoch_batches(train_set, cfg, state["epoch"], state["batch_in_epoch"], world)
    stop_agreed = False  # under torchrun: every rank's stop requests, as of the last step
    with StopOnSignal() as stop:
        for epoch, index, batch, shard in batches:
            if state["step"] >= total_steps or (stop_agreed if world.active
                                                else stop.requested):
                break
            tick = time.perf_counter()
            step_loss = loss_fn if shard is None else distributed_loss(
                module, world, shard, rank_seed(cfg.seed, state["step"], world.rank))
            loss = train_step(policy, to_device(batch, device), step_loss, optimizer,
                              lr_scheduler, ema)
            recent_s += time.perf_counter() - tick
            state.update(step=state["step"] + 1, epoch=epoch, batch_in_epoch=index + 1)
            step = state["step"]
            bar.update(1)
            metrics: dict[str, float] = {}
            validate = bool(cfg.val.every) and (step % cfg.val.every == 0 or step == total_steps)
            roll_out = bool(cfg.eval.every) and (step % cfg.eval.every == 0
                                                 or step == total_steps)
            if main and validate:
                metrics["val/loss"] = validation_loss(
                    ema.model, val_set, cfg.data.batch_size, cfg.val.max_batches, cfg.seed, device,
                    loss_fn=val_loss_fn,
                )
            if main and roll_out:
                try:
                    with stop.interruptible():
                        scores = rollout_metrics(ema.model, cfg)
                except KeyboardInterrupt:
                    scores = None
                if scores is None:  # stopped mid-rollout: a partial score is not a score
                    stop.requested = True
                else:
                    metrics.update({f"eval/{k}": v for k, v in scores.items()})
                    if scores["mean_score"] > state["best_score"]:
                        state.update(best_score=scores["mean_score"], best_step=step)
                        checkpoint(run_dir / "best.ckpt")
                    record_evaluation(state, step, scores, cfg, run_dir)
            if validate or roll_out:
                share_rng_states(world, device)
            tock = time.perf_counter()
            loss, stop_agreed = agree(world, device, loss, stop.requested)
            recent_s += time.perf_counter() - tock
            recent.append(loss)
            if step % cfg.logger.log_every == 0 or step == total_steps:
                metrics = {
                    "train/loss": float(np.mean(recent)),
                    "train/lr": lr_scheduler.get_last_lr()[0],
                    "train/steps_per_s": len(recent) / recent_s,
                    "train/world_size": world.world_size,
                    "train/epoch": epoch,
                    **metrics,
                }
                bar.set_postfix(loss=f"{metrics['train/loss']:.4f}")
                recent, recent_s = [], 0.0
            if metrics and logger is not None:
                logger.log(metrics, step)
                if validate or roll_out:  # a new point on the curve
                    write_curve(run_dir)
            if metrics:
                last.update(metrics)
            if main and step % cfg.checkpoint.every == 0:
                checkpoint(latest)
            if main and cfg.checkpoint.snapshot_every and step % cfg.checkpoint.snapshot_every == 0:
                checkpoint(run_dir / f"step_{step:07d}.ckpt")
            if step % cfg.checkpoint.every == 0:
                saved_at = step
    if main and saved_at != state["step"]:
        checkpoint(latest)
    bar.close()
    summary = {"step": state["step"], "epoch": state["epoch"], "total_steps": total_steps,
               "stopped_early": stop_agreed if world.active else stop.requested,
               "world_size": world.world_size, **last}
    if main:
        logger.close()
        write_json(run_dir / TRAIN_SUMMARY, {"seed": cfg.seed, "stage": cfg.stage, **summary})
        print(json.dumps(summary))
    return summary


CHECKPOINT_EXTRA = ("batch_in_epoch", "best_score", "best_step", "eval_history", "wandb_id",
                    "recent_losses", "recent_s", "world_size", "rng_device")
"""The loop state a checkpoint keeps beside weights and RNG states (resume restores it)."""
TRAIN_SUMMARY = "train_summary.json"
"""What a finished (or stopped) training run leaves in its run dir: run_training's summary."""
EVAL_SCORES = "eval_scores.json"
"""The run's best rollout score and its last eval.keep_last ones (the sweep's seed table)."""


def write_json(path: Path, record: Mapping[str, Any]) -> None:
    """`record` as indented JSON at `path`, atomically."""
    text = json.dumps(record, indent=2) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def record_evaluation(state: dict[str, Any], step: int, scores: Mapping[str, float],
                      cfg: DictConfig, run_dir: Path) -> None:
    """Keep the last `eval.keep_last` rollout scores in `state` (checkpoints carry them) and
    write them with the run's best to eval_scores.json: what Diffusion Policy's table (max and
    mean of the last k checkpoints, per seed) needs from this run."""
    entry = {"step": step, **{k: scores[k] for k in ("mean_score", "success_rate")
                              if k in scores}}
    history = [*state["eval_history"], entry][-cfg.eval.keep_last :]
    state["eval_history"] = history
    write_json(run_dir / EVAL_SCORES, {
        "seed": cfg.seed, "stage": cfg.stage, "name": cfg.name,
        "world_size": state["world_size"], "keep_last": cfg.eval.keep_last,
        "n_episodes": cfg.eval.n_episodes,
        "best": {"step": state["best_step"], "mean_score": state["best_score"]},
        "last": history,
        "last_mean_score": float(np.mean([e["mean_score"] for e in history])),
    })
