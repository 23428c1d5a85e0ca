"""Diffusion-Policy-style training windows over a replay buffer.

One sample is a window of H = `horizon` consecutive steps of one episode (To = `n_obs_steps`,
Ta = `n_action_steps`)::

    window step:   0 ... To-1   To ... To-1+Ta-1   ...   H-1
    obs:           |-- To --|                                   conditions the policy
    action:        |------------------------- H -----------|    diffusion target
    executed:             |------ Ta ------|                    pred[To-1 : To-1+Ta]

Windows start from To-1 steps before an episode's first step up to Ta-1 steps past the last
full window (pad_before = To-1, pad_after = Ta-1); steps outside the episode repeat its first
or last frame. These are exactly DP's `create_indices` + `sample_sequence` semantics, built here
as one vectorised (n_windows, H) table of buffer rows. Train/val splits are by episode.

Feature specs name what goes into the flat obs/action vectors: `"key"` is the data array `key`
flattened per step (`keypoint` (N, 9, 2) -> 18 features); `"key[a:b]"` keeps features a..b-1
of that flattened step (Python slice rules, either bound optional); `"key[i]"` keeps feature i.
PushT keypoint obs (DP's 20-D): `obs_keys=["keypoint", "state[:2]"]` (9 points + agent xy).

`obs_keys` as a list gives one flat low-dim "obs" vector per step; as a mapping {obs key: spec}
(image policies) it gives a dict of observations, one entry per obs key. Obs keys named in
`image_shapes` are cameras: their spec is a bare data key of (N, H, W, C) uint8 frames (DP's
PushT `img`, robomimic's `agentview_image`), kept in memory as stored (uint8, no float copy)
and handed out as (To, H, W, C) uint8 windows. Scaling to floats and the crop (random in
training, centred at eval) happen once, in the policy's ImageObsEncoder, exactly as for the
frames an env gives at evaluation. Normalizer statistics cover the low-dim keys and the action.
PushT image obs (DP's): `obs_keys={"image": "img", "agent_pos": "state[:2]"}`.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from policy.data.lerobot_dataset import check_not_lerobot_dataset
from policy.data.replay_buffer import ReplayBuffer

Split = Literal["train", "val"]
ObsKeys = Sequence[str] | Mapping[str, str]
"""A list of low-dim feature specs (one flat "obs" vector) or {obs key: spec} (a dict of obs)."""
FLAT_OBS = "obs"
"""The observation key of a flat (list) `obs_keys`: the name the normalizer fits it under."""

_SPEC_PATTERN = re.compile(
    r"^(?P<key>[^\[\]\s]+)(?:\[(?P<start>-?\d*)(?P<colon>:)?(?P<stop>-?\d*)\])?$"
)


@dataclass(frozen=True)
class FeatureSpec:
    """A data key plus the slice of its per-step flattened features to keep (see module doc)."""

    text: str
    key: str
    columns: slice

    @classmethod
    def parse(cls, spec: str) -> FeatureSpec:
        """Parse `"key"`, `"key[a:b]"` (either bound optional) or `"key[i]"`."""
        match = _SPEC_PATTERN.match(spec)
        if match is None:
            raise ValueError(f"bad feature spec {spec!r}; expected 'key', 'key[a:b]' or 'key[i]'")
        start, colon, stop = match["start"], match["colon"], match["stop"]
        if start is None:
            columns = slice(None)
        elif colon:
            columns = slice(int(start) if start else None, int(stop) if stop else None)
        elif start and not stop:
            index = int(start)
            columns = slice(index, index + 1 if index != -1 else None)
        else:
            raise ValueError(f"bad feature spec {spec!r}; expected 'key', 'key[a:b]' or 'key[i]'")
        return cls(text=spec, key=match["key"], columns=columns)

    def extract(self, array: np.ndarray) -> np.ndarray:
        """(N, ...) data array -> (N, D) float32 features: flatten each step, then slice."""
        features = array.reshape(array.shape[0], -1)[:, self.columns]
        if features.shape[1] == 0:
            raise ValueError(
                f"feature spec {self.text!r} selects no features from {self.key!r} "
                f"of per-step shape {array.shape[1:]}"
            )
        return features.astype(np.float32)


def sequence_row_indices(
    episode_ends: np.ndarray,
    sequence_length: int,
    pad_before: int = 0,
    pad_after: int = 0,
    episode_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Buffer rows of every padded window of the selected episodes, (n_windows, sequence_length).

    An episode of length L gives L - sequence_length + pad_before + pad_after + 1 windows (none
    if that is < 1), starting at episode step -pad_before; steps before the episode's start or
    past its end read its first or last row (DP's edge padding). Pads are clipped to
    [0, sequence_length - 1] as in DP. `episode_mask` (n_episodes,) bool selects episodes.
    """
    if sequence_length < 1:
        raise ValueError(f"sequence_length must be >= 1; got {sequence_length}")
    pad_before = min(max(pad_before, 0), sequence_length - 1)
    pad_after = min(max(pad_after, 0), sequence_length - 1)
    ends = np.asarray(episode_ends, dtype=np.int64)
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    if episode_mask is not None:
        episode_mask = np.asarray(episode_mask, dtype=bool)
        if episode_mask.shape != ends.shape:
            raise ValueError(f"episode_mask shape {episode_mask.shape} != {ends.shape}")
        starts, ends = starts[episode_mask], ends[episode_mask]
    lengths = ends - starts
    n_windows = np.maximum(lengths - sequence_length + pad_before + pad_after + 1, 0)
    episode_of_window = np.repeat(np.arange(len(lengths)), n_windows)
    first_window = np.cumsum(n_windows) - n_windows
    window_start = np.arange(n_windows.sum()) - first_window[episode_of_window] - pad_before
    steps = window_start[:, None] + np.arange(sequence_length)
    steps = np.clip(steps, 0, lengths[episode_of_window][:, None] - 1)
    return steps + starts[episode_of_window][:, None]


def split_episodes(
    n_episodes: int, val_ratio: float, seed: int, max_train_episodes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/val split by episode: (train_mask, val_mask), each (n_episodes,) bool.

    round(n_episodes * val_ratio) episodes go to val, at least one when val_ratio > 0, and at
    least one is left for training. `max_train_episodes` keeps a seeded random subset of the
    training episodes, drawn exactly as Diffusion Policy's `downsample_mask` draws it (a fresh
    generator seeded with `seed`), so the same seed trains on the same episodes as DP; the
    dropped ones are in neither split (DP validates on them too: our validation loss stays on
    the held-out episodes).
    """
    if not 0 <= val_ratio < 1:
        raise ValueError(f"val_ratio must be in [0, 1); got {val_ratio}")
    rng = np.random.default_rng(seed)
    val_mask = np.zeros(n_episodes, dtype=bool)
    if val_ratio > 0 and n_episodes > 1:
        n_val = min(max(1, round(n_episodes * val_ratio)), n_episodes - 1)
        val_mask[rng.choice(n_episodes, size=n_val, replace=False)] = True
    train_mask = ~val_mask
    if max_train_episodes is not None and train_mask.sum() > max_train_episodes:
        candidates = np.flatnonzero(train_mask)
        picks = np.random.default_rng(seed).choice(len(candidates), size=max_train_episodes,
                                                   replace=False)
        kept = candidates[picks]
        train_mask = np.zeros(n_episodes, dtype=bool)
        train_mask[kept] = True
    return train_mask, val_mask


def _read_arrays(buffer: ReplayBuffer, keys: set[str]) -> dict[str, np.ndarray]:
    """Every data array in `keys`, read once into memory as stored (dtype unchanged)."""
    raw = {}
    for key in sorted(keys):
        try:
            array = buffer[key]
            raw[key] = array[:]
        except Exception as e:  # a codec that is not installed, a torn chunk, ...
            raise ValueError(f"data key {key!r} cannot be read: {e}") from e
        try:
            stored, total = array.nchunks_initialized, array.nchunks
        except ValueError:  # zarr 3.1 cannot count them when another key extends this one's
            continue        # name (image + images_top, a LeRobot conversion): no check
        if stored < total:  # zarr reads a missing chunk as its fill value, silently
            warnings.warn(
                f"data key {key!r}: {total - stored} of {total} chunks are not in the store and "
                f"read as the fill value {array.fill_value!r} (a deleted or lost chunk file, "
                "unless that stretch really holds only that value)", stacklevel=4)
    return raw


def _check_features(key: str, values: np.ndarray) -> None:
    """Low-dim data must be finite real numbers."""
    if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype,
                                                                   np.complexfloating):
        raise ValueError(f"data key {key!r} holds {values.dtype} values; features must be "
                         "real numbers")
    if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
        rows = np.flatnonzero(~np.isfinite(values.reshape(len(values), -1)).all(1))
        raise ValueError(f"data key {key!r} holds NaN or inf (first at row {rows[0]} of "
                         f"{len(values)})")


def check_image_array(
    obs_key: str, spec: FeatureSpec, values: np.ndarray, shape: Sequence[int], source: object
) -> np.ndarray:
    """`values` if it is (N, *shape) uint8 frames (H, W, C) for camera `obs_key`; else one-line
    ValueError naming the obs key, the data key, the store and what is wrong."""
    where = f"data.path {source}: image obs {obs_key!r} (data key {spec.key!r})"
    if spec.columns != slice(None):
        raise ValueError(f"{where}: an image spec must be a bare data key, not the slice "
                         f"{spec.text!r}")
    expected = tuple(int(n) for n in shape)
    if values.ndim != 4 or values.dtype != np.uint8 or values.shape[1:] != expected:
        raise ValueError(f"{where}: expected uint8 frames (N, {', '.join(map(str, expected))}) "
                         f"(H, W, C), got {values.dtype} {values.shape}")
    return values


def _load_obs_and_actions(
    buffer: ReplayBuffer, obs_specs: Mapping[str, FeatureSpec], action_spec: FeatureSpec,
    image_shapes: Mapping[str, Sequence[int]], source: object,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Read each needed key once: {obs key: (N, D) float32 features or (N, H, W, C) uint8
    frames} and the (N, Da) float32 actions."""
    available = buffer.keys()
    for name in image_shapes:
        if obs_specs[name].key not in available:
            raise ValueError(f"data.path {source}: image obs {name!r} reads data key "
                             f"{obs_specs[name].key!r}, which the store does not have; "
                             f"available keys: {available}")
    for role, specs in (("obs_keys", list(obs_specs.values())), ("action_key", [action_spec])):
        missing = [spec.key for spec in specs if spec.key not in available]
        if missing:
            raise KeyError(
                f"replay buffer has no data key {missing[0]!r} (needed by {role} "
                f"{[spec.text for spec in specs]}); available keys: {available}"
            )
    raw = _read_arrays(buffer, {spec.key for spec in [*obs_specs.values(), action_spec]})
    image_data = {obs_specs[name].key for name in image_shapes}
    for key, values in raw.items():
        if key not in image_data:
            _check_features(key, values)
    obs = {
        name: check_image_array(name, spec, raw[spec.key], image_shapes[name], source)
        if name in image_shapes else spec.extract(raw[spec.key])
        for name, spec in obs_specs.items()
    }
    return obs, action_spec.extract(raw[action_spec.key])


def check_episode_ends(episode_ends: np.ndarray, n_rows: int) -> None:
    """episode_ends must be strictly increasing positive row counts ending at the data's length
    (anything else makes windows that cross episodes or read past the data)."""
    ends = np.asarray(episode_ends)
    if ends.ndim != 1:
        raise ValueError(f"meta/episode_ends must be one-dimensional; got shape {ends.shape}")
    if ends.size == 0:
        raise ValueError("the replay buffer holds no episodes (meta/episode_ends is empty)")
    if not np.issubdtype(ends.dtype, np.integer):
        raise ValueError(f"meta/episode_ends must hold integers; got {ends.dtype}")
    if ends[0] <= 0 or (np.diff(ends) <= 0).any():
        bad = 0 if ends[0] <= 0 else int(np.flatnonzero(np.diff(ends) <= 0)[0]) + 1
        raise ValueError(f"meta/episode_ends must be strictly increasing positive row counts; "
                         f"entry {bad} is {int(ends[bad])} after "
                         f"{int(ends[bad - 1]) if bad else 0}")
    if ends[-1] != n_rows:
        raise ValueError(f"meta/episode_ends ends at row {int(ends[-1])} but the data arrays "
                         f"hold {n_rows} rows")


@dataclass(frozen=True)
class EpisodeSplit:
    """How a dataset's episodes divide into train and val (`split_episodes`): `val_ratio` of
    them held out by a generator seeded with `seed`, and at most `max_train_episodes` of the
    rest trained on (None: all). The values are checked by `split_episodes`."""

    val_ratio: float = 0.02
    seed: int = 42
    max_train_episodes: int | None = None

    def masks(self, n_episodes: int) -> tuple[np.ndarray, np.ndarray]:
        """(train_mask, val_mask) of `n_episodes` episodes."""
        return split_episodes(n_episodes, self.val_ratio, self.seed, self.max_train_episodes)


class SequenceDataset(Dataset):
    """Padded (obs, action) windows of a replay buffer, for Diffusion Policy training.

    Each item is `{"obs": ..., "action": (H, Da) float32}`: with a list `obs_keys`, "obs" is a
    (To, Do) float32 tensor; with a mapping, a dict {obs key: (To, D) float32, or (To, H, W, C)
    uint8 for the cameras of `image_shapes`} (module doc for the window layout, feature specs and
    image conventions). The needed arrays are read into memory once, as stored; the dataset
    keeps no handle on the store (safe to pickle into DataLoader workers).
    """

    def __init__(
        self,
        path_or_buffer: str | Path | ReplayBuffer,
        obs_keys: ObsKeys,
        action_key: str = "action",
        horizon: int = 16,
        n_obs_steps: int = 2,
        n_action_steps: int = 8,
        episode_split: EpisodeSplit | None = None,
        split: Split = "train",
        image_shapes: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        """Load `obs_keys` / `action_key` features (and the frames of the `image_shapes`
        cameras, {obs key: (H, W, C)}) from a buffer or a store path and index the windows of
        the `split` episodes of `episode_split` (default EpisodeSplit())."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val'; got {split!r}")
        if not obs_keys:
            raise ValueError("obs_keys must name at least one data key")
        if n_obs_steps < 1 or n_action_steps < 1:
            raise ValueError(
                f"need n_obs_steps, n_action_steps >= 1; got {n_obs_steps}, {n_action_steps}"
            )
        if n_obs_steps - 1 + n_action_steps > horizon:
            raise ValueError(
                f"executed actions [To-1, To-1+Ta) = [{n_obs_steps - 1}, "
                f"{n_obs_steps - 1 + n_action_steps}) do not fit in horizon {horizon}"
            )
        self.flat = not isinstance(obs_keys, Mapping)
        self.obs_keys: list[str] | dict[str, str] = (
            list(obs_keys) if self.flat else {str(k): str(v) for k, v in obs_keys.items()})
        self.image_shapes = {str(k): tuple(int(n) for n in v)
                             for k, v in (image_shapes or {}).items()}
        if self.image_shapes and self.flat:
            raise ValueError("image observations need obs_keys as a mapping {obs key: data key}; "
                             f"got the list {self.obs_keys}")
        unknown = sorted(set(self.image_shapes) - set(self.obs_keys))
        if unknown:
            raise ValueError(f"image obs {unknown} not in obs_keys {sorted(self.obs_keys)}")
        bad_shapes = {k: v for k, v in self.image_shapes.items() if len(v) != 3}
        if bad_shapes:
            raise ValueError(f"image_shapes must be (H, W, C) per camera; got {bad_shapes}")
        self.action_key = action_key
        self.source = path_or_buffer if isinstance(path_or_buffer, ReplayBuffer) else Path(
            path_or_buffer).expanduser()
        self.horizon = horizon
        self.n_obs_steps = n_obs_steps
        self.n_action_steps = n_action_steps
        self.split: Split = split

        if self.flat:
            flat_specs = [FeatureSpec.parse(spec) for spec in self.obs_keys]
            obs_specs = {f"{FLAT_OBS}{i}": spec for i, spec in enumerate(flat_specs)}
        else:
            obs_specs = {name: FeatureSpec.parse(spec) for name, spec in self.obs_keys.items()}
        action_spec = FeatureSpec.parse(action_key)
        try:
            if isinstance(path_or_buffer, ReplayBuffer):
                source = nullcontext(path_or_buffer)
            else:
                source = ReplayBuffer.open(check_store_path(path_or_buffer), mode="r")
            with source as buffer:
                obs, self._action = _load_obs_and_actions(
                    buffer, obs_specs, action_spec, self.image_shapes, self.source)
                self.episode_ends = buffer.episode_ends
        except (KeyError, ValueError, FileNotFoundError):
            raise  # already say what is wrong
        except Exception as e:  # zarr and zipfile raise many types for broken stores
            raise ValueError(
                f"replay buffer {path_or_buffer} is unreadable (truncated, or not a zarr store?): "
                f"{type(e).__name__}: {e}"
            ) from e
        # flat: the specs' features side by side, one "obs" array (N, Do)
        self._obs: dict[str, np.ndarray] = (
            {FLAT_OBS: np.concatenate(list(obs.values()), axis=1)} if self.flat else obs)
        check_episode_ends(self.episode_ends, len(self._action))
        for shared in (*self._obs.values(), self._action, self.episode_ends):
            shared.flags.writeable = False  # shared with get_validation_dataset() and callers
        train_mask, val_mask = (episode_split or EpisodeSplit()).masks(len(self.episode_ends))
        self._split_masks = {"train": train_mask, "val": val_mask}
        self._rows = self._window_rows(split)

    def _window_rows(self, split: Split) -> np.ndarray:
        return sequence_row_indices(
            self.episode_ends,
            self.horizon,
            pad_before=self.n_obs_steps - 1,
            pad_after=self.n_action_steps - 1,
            episode_mask=self._split_masks[split],
        )

    @property
    def episode_indices(self) -> np.ndarray:
        """(n,) int indices (in the buffer) of the episodes in this split."""
        return np.flatnonzero(self._split_masks[self.split])

    @property
    def lowdim_keys(self) -> list[str]:
        """The observation keys that are feature vectors (not cameras), in order."""
        return [key for key in self._obs if key not in self.image_shapes]

    @property
    def obs_dim(self) -> int:
        """Do: low-dim features per observation step (cameras not counted)."""
        return sum(self._obs[key].shape[1] for key in self.lowdim_keys)

    @property
    def obs_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-step shape of every observation key: (D,) features or (H, W, C) frames."""
        return {key: tuple(values.shape[1:]) for key, values in self._obs.items()}

    @property
    def action_dim(self) -> int:
        """Da: features per action step."""
        return self._action.shape[1]

    def get_validation_dataset(self) -> SequenceDataset:
        """The val-split windows of the same data (shares the loaded arrays, no reload)."""
        val = copy.copy(self)
        val.split = "val"
        val._rows = self._window_rows("val")
        return val

    def all_obs_and_actions(self) -> dict[str, np.ndarray]:
        """Every step of the buffer, all episodes, of the low-dim keys and the action:
        {"obs" (flat) or each low-dim obs key: (N, D), "action": (N, Da)} float32, to fit the
        min-max normalizer on (DP fits it on the whole buffer). Cameras have no statistics."""
        return {**{key: self._obs[key] for key in self.lowdim_keys}, "action": self._action}

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rows = self._rows[index]
        obs = {key: torch.from_numpy(values[rows[: self.n_obs_steps]])
               for key, values in self._obs.items()}
        return {
            "obs": obs[FLAT_OBS] if self.flat else obs,
            "action": torch.from_numpy(self._action[rows]),
        }


def windows_from_config(
    data: Mapping[str, Any], horizon: int, n_obs_steps: int, n_action_steps: int, seed: int,
    split: Split = "train", image_shapes: Mapping[str, Sequence[int]] | None = None,
) -> SequenceDataset:
    """The `split` windows of a training config's `data` block (path, obs_keys, action_key,
    val_ratio, max_train_episodes) with the cameras of `image_shapes`: the one way training,
    PCM data collection and the benchmarks build a SequenceDataset, so they all see the same
    episodes and windows. `~` in the path is expanded; a path that is not a zarr replay buffer
    is a ValueError naming it."""
    obs_keys = data["obs_keys"]
    episode_split = EpisodeSplit(val_ratio=data.get("val_ratio", 0.02), seed=seed,
                                 max_train_episodes=data.get("max_train_episodes"))
    return SequenceDataset(
        data["path"], obs_keys=dict(obs_keys) if isinstance(obs_keys, Mapping) else list(obs_keys),
        action_key=data.get("action_key", "action"), horizon=horizon, n_obs_steps=n_obs_steps,
        n_action_steps=n_action_steps, episode_split=episode_split, split=split,
        image_shapes=image_shapes,
    )


def check_store_path(path: str | Path) -> Path:
    """`path` (with `~` expanded) if it can be a zarr replay buffer (a `.zarr.zip` file or a
    zarr directory); else FileNotFoundError / ValueError naming the path and what it is."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data.path does not exist: {path} (run from the repo root?)")
    if path.is_dir():
        check_not_lerobot_dataset(path)
        if not ((path / "zarr.json").exists() or (path / ".zgroup").exists()):
            raise ValueError(f"data.path {path} is a directory but not a zarr store (no zarr.json "
                             "or .zgroup)")
        return path
    if path.suffix in (".hdf5", ".h5"):
        raise ValueError(f"data.path {path} is an HDF5 file; training reads zarr replay buffers "
                         "(convert a robomimic hdf5 with policy.data.robomimic_hdf5."
                         "robomimic_to_replay_buffer; the shipped ones are data/*.zarr.zip)")
    if path.suffix != ".zip":
        raise ValueError(f"data.path {path} is neither a zarr directory nor a .zarr.zip file")
    return path
