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
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from app.config import (
    DEVICE_ALLOWED,
    Check,
    ConfigError,
    configure_torch,
    device_ok,
    is_int,
    is_number,
    plain,
    prepare_output_dir,
    raise_first_failure,
)
from app.evaluation import build_sampler, evaluate, summarize
from envs.rollout import VECTOR_KINDS
from picard_sampler import Schedule
from policy.checkpoint import (
    PCM_KEY,
    atomic_torch_save,
    atomic_write,
    load_checkpoint,
    load_policy,
    policy_weights,
    restore_rng_states,
    save_checkpoint,
    weights_fingerprint,
)
from policy.data import SequenceDataset, windows_from_config
from policy.diffusion_policy import DiffusionPolicy, schedule_from_config
from policy.ema import EMA
from policy.pcm import build_pcm, complete_config
from policy.pcm_training import PCMObjective, TrajectoryDataset, collect_trajectories

LossFn = Callable[[DiffusionPolicy, Mapping[str, Any]], torch.Tensor]


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
            policy = load_policy(cfg.pcm.base_checkpoint)
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
        windows = load_windows(data, policy.horizon, policy.n_obs_steps, policy.n_action_steps,
                               cfg.seed)
        check_enough_windows(windows, 1)
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


def camera_shapes(policy: nn.Module) -> dict[str, tuple[int, ...]]:
    """{camera key: (H, W, C)} of a policy whose encoder reads images (ImageObsEncoder's
    `camera_keys`: every camera, also when one encoder is shared); empty for a low-dim
    policy."""
    encoder = policy.obs_encoder
    keys = getattr(encoder, "camera_keys", list(getattr(encoder, "cameras", {})))
    return {key: tuple(encoder.obs_shapes[key]) for key in keys}


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


# ------------------------------------------------------------------------------------ data
def make_train_loader(
    dataset: Dataset, batch_size: int, seed: int, epoch: int, skip_batches: int = 0,
    num_workers: int = 0,
) -> DataLoader:
    """One epoch of shuffled batches; the order depends only on (seed, epoch), so a resumed
    run skips the `skip_batches` already trained on and sees the rest in the same order."""
    order = np.random.default_rng([seed, epoch]).permutation(len(dataset))
    indices = order[skip_batches * batch_size :].tolist()
    return DataLoader(
        dataset, batch_size=batch_size, sampler=indices, num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),  # keeps the global RNG untouched
    )


def epoch_batches(
    dataset: Dataset, cfg: DictConfig, epoch: int, batch_in_epoch: int
) -> Iterator[tuple[int, int, Any]]:
    """Endless (epoch, index in epoch, batch), starting at batch `batch_in_epoch` of `epoch`;
    an empty dataset is an error (it would loop without yielding)."""
    if len(dataset) == 0:
        raise ConfigError("the training set is empty: nothing to train on")
    for e in itertools.count(epoch):
        skip = batch_in_epoch if e == epoch else 0
        loader = make_train_loader(
            dataset, cfg.data.batch_size, cfg.seed, e, skip, cfg.data.num_workers
        )
        for index, batch in enumerate(loader, start=skip):
            yield e, index, batch


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
    ema: EMA,
) -> float:
    """One optimizer step on `batch`, then the LR schedule and the EMA; returns the loss."""
    policy.train()
    loss = loss_fn(policy, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    lr_scheduler.step()
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
    result = evaluate(
        policy, sampler, cfg.env, n_episodes=cfg.eval.n_episodes, n_envs=cfg.eval.n_envs,
        seed_start=cfg.eval.seed_start, noise_seed=cfg.eval.seed_start,
        max_steps=cfg.env.max_steps, vector=cfg.eval.vector, progress=cfg.progress,
    )
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
    path: Path, policy: DiffusionPolicy, ema: EMA, optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device,
    config: Mapping[str, Any],
) -> dict[str, Any]:
    """Load weights, optimizer, scheduler and RNG states from `path`; return the progress.

    Warns about config keys that changed since the checkpoint (other than `resume`): the run
    goes on, but it is no longer the same as an uninterrupted one."""
    try:
        ckpt = load_checkpoint(path, map_location=device)
    except ValueError as e:
        intact = intact_checkpoints(path.parent, exclude=path)
        offer = (f"; intact checkpoints beside it: {', '.join(intact)} (copy one to "
                 f"{path.name} to resume from it)" if intact
                 else "; no intact checkpoint beside it")
        raise ConfigError(f"resume=true: {e}{offer}") from e
    changed = [k for k in changed_keys(ckpt["config"], config) if k != "resume"]
    if changed:
        print(f"warning: resuming {path} with changed config keys {changed}", file=sys.stderr)
    try:
        policy.load_state_dict(policy_weights(ckpt, "model"))
        ema.load_state_dict({**ckpt["ema"], "model": policy_weights(ckpt, "ema")})
    except RuntimeError as e:  # shapes or keys differ: the config changed the network
        raise ConfigError(
            f"resume=true: {path} holds another network than the config builds (changed keys: "
            f"{changed or 'none'}); resume with the checkpoint's settings or start a new run"
        ) from e
    optimizer.load_state_dict(ckpt["optimizer"])
    lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
    restore_rng_states(ckpt["rng"])
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
        self.path = run_dir / "metrics.jsonl"
        if resume_step is None and self.path.exists():  # a run killed before any checkpoint
            kept = run_dir / f"metrics.{time.strftime('%Y%m%d-%H%M%S')}.orphaned.jsonl"
            self.path.replace(kept)
            print(f"{self.path} of an earlier run without a checkpoint kept as {kept.name}",
                  file=sys.stderr)
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines(keepends=True)
                    if _logged_step(line) is not None and _logged_step(line) <= resume_step]
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
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


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
    """Train per `cfg`; returns the final step, epoch and last losses / rollout metrics."""
    check_train_config(cfg)
    device = configure_torch(cfg.device, cfg.threads)
    seed_everything(cfg.seed)
    stage = STAGES[cfg.stage](cfg)
    run_dir = Path(cfg.run_dir)
    latest = run_dir / "latest.ckpt"
    check_fresh_or_resume(run_dir, cfg.resume)
    prepare_output_dir(run_dir, overwrite=True, results_name=None)

    policy = stage.build_policy()
    loss_fn = stage.loss(policy)
    train_set, val_set = stage.datasets(policy)
    resolved = stage.checkpoint_config(OmegaConf.to_container(cfg, resolve=True))
    policy.to(device)
    steps_per_epoch = math.ceil(len(train_set) / cfg.data.batch_size)
    epoch_steps = cfg.train.num_epochs and cfg.train.num_epochs * steps_per_epoch
    total_steps = min(n for n in (cfg.train.max_steps, epoch_steps) if n is not None)
    ema = EMA(policy, power=cfg.ema.power, max_decay=cfg.ema.max_decay)
    optimizer, lr_scheduler = build_optimizer(cfg, policy, total_steps)

    # recent_losses / recent_s: the losses (and their seconds) since the last log, saved with
    # every checkpoint so the first log after a resume averages the same steps
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_score": -math.inf,
             "wandb_id": None, "recent_losses": [], "recent_s": 0.0}
    if cfg.resume:
        state.update(
            resume_training(latest, policy, ema, optimizer, lr_scheduler, device, resolved)
        )
    logger = MetricLogger(cfg, run_dir, state["wandb_id"],
                          resume_step=state["step"] if cfg.resume else None)
    state["wandb_id"] = logger.wandb_id

    def checkpoint(path: Path) -> None:
        state.update(recent_losses=list(recent), recent_s=recent_s)
        save_checkpoint(
            path, policy=policy, ema=ema, optimizer=optimizer, lr_scheduler=lr_scheduler,
            step=state["step"], epoch=state["epoch"], config=resolved,
            extra={k: state[k] for k in ("batch_in_epoch", "best_score", "wandb_id",
                                         "recent_losses", "recent_s")},
        )

    n_params = sum(p.numel() for p in stage.trained_module(policy).parameters())
    print(f"{cfg.name}: {len(train_set)} train / {len(val_set)} val {stage.items}, {stage.name} "
          f"model {n_params / 1e6:.2f}M params, {total_steps} steps on {device} -> {run_dir}")
    val_loss_fn = stage.validation_loss_fn(loss_fn)
    bar = tqdm(total=total_steps, initial=state["step"], disable=not cfg.progress, desc="train")
    recent: list[float] = [float(x) for x in state["recent_losses"]]  # since the last log
    recent_s = float(state["recent_s"])  # their training seconds
    last: dict[str, Any] = {}
    saved_at = state["step"] if cfg.resume else None
    batches = epoch_batches(train_set, cfg, state["epoch"], state["batch_in_epoch"])
    with StopOnSignal() as stop:
        for epoch, index, batch in batches:
            if state["step"] >= total_steps or stop.requested:
                break
            tick = time.perf_counter()
            recent.append(train_step(
                policy, to_device(batch, device), loss_fn, optimizer, lr_scheduler, ema
            ))
            recent_s += time.perf_counter() - tick
            state.update(step=state["step"] + 1, epoch=epoch, batch_in_epoch=index + 1)
            step = state["step"]
            bar.update(1)
            metrics: dict[str, float] = {}
            if step % cfg.logger.log_every == 0 or step == total_steps:
                metrics.update({
                    "train/loss": float(np.mean(recent)),
                    "train/lr": lr_scheduler.get_last_lr()[0],
                    "train/steps_per_s": len(recent) / recent_s,
                    "train/epoch": epoch,
                })
                bar.set_postfix(loss=f"{metrics['train/loss']:.4f}")
                recent, recent_s = [], 0.0
            if cfg.val.every and (step % cfg.val.every == 0 or step == total_steps):
                metrics["val/loss"] = validation_loss(
                    ema.model, val_set, cfg.data.batch_size, cfg.val.max_batches, cfg.seed, device,
                    loss_fn=val_loss_fn,
                )
            if cfg.eval.every and (step % cfg.eval.every == 0 or step == total_steps):
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
                        state["best_score"] = scores["mean_score"]
                        checkpoint(run_dir / "best.ckpt")
            if metrics:
                logger.log(metrics, step)
                last.update(metrics)
            if step % cfg.checkpoint.every == 0:
                checkpoint(latest)
                saved_at = step
            if cfg.checkpoint.snapshot_every and step % cfg.checkpoint.snapshot_every == 0:
                checkpoint(run_dir / f"step_{step:07d}.ckpt")
    if saved_at != state["step"]:
        checkpoint(latest)
    bar.close()
    logger.close()
    summary = {"step": state["step"], "epoch": state["epoch"], "total_steps": total_steps,
               "stopped_early": stop.requested, **last}
    print(json.dumps(summary))
    return summary
