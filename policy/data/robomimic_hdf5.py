"""robomimic's hdf5 demonstration format: write, read, and convert to a zarr replay buffer.

Layout (robomimic v0.3 / dataset v1.5; our writer and robomimic's datasets read alike)::

    data                        attrs: total (steps over all demos), env_args (JSON env
                                metadata: env_name, type, env_kwargs), plus our extra attrs
                                as JSON strings (expert statistics, provenance)
    data/demo_<i>               attrs: num_samples (T), model_file (MuJoCo XML, optional)
        actions (T, Da)         states (T, S) flat MuJoCo state under obs[t]
        rewards (T,)            dones (T,)
        obs/<key> (T, ...)      next_obs/<key> (T, ...)   observation before / after action t
    mask/<filter_key>           optional: demo names (bytes) of a split, e.g. train / valid

Demos are ordered by their index (``demo_2`` before ``demo_10``), as robomimic and DP do.
This module needs only h5py: no robosuite, no envs.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from policy.data.replay_buffer import ReplayBuffer

DP_LOWDIM_OBS_KEYS = ("object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")
"""Diffusion Policy's robomimic low-dim observation keys, in its concatenation order."""
ACTION_KEY = "action"
"""The replay buffer's action key (robomimic's ``actions``)."""
STEP_DATASETS = ("actions", "states", "rewards", "dones")
_DEMO_NAME = re.compile(r"^demo_(\d+)$")


def _demo_index(name: str) -> int:
    match = _DEMO_NAME.match(name)
    if match is None:
        raise ValueError(f"not a robomimic demo name: {name!r} (expected demo_<i>)")
    return int(match[1])


def _check_demo(demo: Mapping[str, Any]) -> int:
    """Validate one demo's arrays: every step dataset and obs key has the same length T > 0."""
    missing = [key for key in (*STEP_DATASETS, "obs", "next_obs") if key not in demo]
    if missing:
        raise KeyError(f"demo is missing {missing}; needs {[*STEP_DATASETS, 'obs', 'next_obs']}")
    if set(demo["obs"]) != set(demo["next_obs"]):
        raise KeyError(
            f"obs and next_obs keys differ: {sorted(demo['obs'])} vs {sorted(demo['next_obs'])}"
        )
    lengths = {key: len(demo[key]) for key in STEP_DATASETS}
    for group in ("obs", "next_obs"):
        lengths.update({f"{group}/{key}": len(value) for key, value in demo[group].items()})
    if len(set(lengths.values())) != 1 or not next(iter(lengths.values())):
        raise ValueError(f"demo arrays must all have the same length T > 0; got {lengths}")
    return lengths["actions"]


class RobomimicHDF5Writer:
    """Write demos one at a time into robomimic's layout; the file appears only on success.

    Data go to ``<path>.partial`` and replace ``path`` in `close`, so an interrupted run never
    leaves a truncated dataset nor destroys an existing one. Use as a context manager.
    """

    def __init__(
        self, path: str | Path, env_meta: Mapping[str, Any], compression: str | None = "gzip"
    ) -> None:
        """Start a dataset for an env described by robomimic ``env_meta`` (stored as JSON)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._partial = self.path.with_name(self.path.name + ".partial")
        # HDF5 >= 1.10 chunk indexes: ~0.3 KB per small dataset instead of ~3 KB (a demo has
        # a dozen), so a low-dim file is a third the size; any current h5py reads it.
        self._file = h5py.File(self._partial, "w", libver="latest")
        self._data = self._file.create_group("data")
        self._data.attrs["env_args"] = json.dumps(dict(env_meta))
        self._compression = compression
        self.n_demos = 0
        self.total = 0

    def add_demo(self, demo: Mapping[str, Any]) -> str:
        """Append a demo (``actions``, ``states``, ``rewards``, ``dones``, ``obs``, ``next_obs``
        dicts, optional ``model_file``); returns its name ``demo_<i>``."""
        n_steps = _check_demo(demo)
        name = f"demo_{self.n_demos}"
        group = self._data.create_group(name)
        for key in STEP_DATASETS:
            group.create_dataset(key, data=np.asarray(demo[key]), compression=self._compression)
        for obs_group in ("obs", "next_obs"):
            for key, value in demo[obs_group].items():
                group.create_dataset(
                    f"{obs_group}/{key}", data=np.asarray(value), compression=self._compression
                )
        group.attrs["num_samples"] = n_steps
        if demo.get("model_file") is not None:
            group.attrs["model_file"] = demo["model_file"]
        self.n_demos += 1
        self.total += n_steps
        return name

    def close(
        self,
        attrs: Mapping[str, Any] | None = None,
        mask: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        """Write ``total``, extra ``data`` attrs (each as a JSON string) and the ``mask``
        splits ({filter_key: demo names}), then move the file into place."""
        self._data.attrs["total"] = self.total
        for key, value in (attrs or {}).items():
            self._data.attrs[key] = json.dumps(value)
        for filter_key, names in (mask or {}).items():
            unknown = sorted(set(names) - set(self._data))
            if unknown:
                raise KeyError(f"mask {filter_key!r} names unknown demos {unknown[:5]}")
            self._file.create_dataset(f"mask/{filter_key}", data=np.array(names, dtype="S"))
        self._file.close()
        self._partial.replace(self.path)

    def abort(self) -> None:
        """Drop the partial file; ``path`` is left as it was."""
        self._file.close()
        self._partial.unlink(missing_ok=True)

    def __enter__(self) -> RobomimicHDF5Writer:
        return self

    def __exit__(self, exc_type: type | None, *exc_info: object) -> None:
        if exc_type is None:
            if self._file.id.valid:
                self.close()
        elif self._file.id.valid:
            self.abort()


def split_demos(
    names: Sequence[str], valid_ratio: float, seed: int
) -> dict[str, list[str]]:
    """Seeded ``{"train": [...], "valid": [...]}`` mask (robomimic's filter keys); at least one
    demo each when ``valid_ratio`` > 0 and there are two or more demos."""
    if not 0 <= valid_ratio < 1:
        raise ValueError(f"valid_ratio must be in [0, 1); got {valid_ratio}")
    n_valid = 0
    if valid_ratio > 0 and len(names) > 1:
        n_valid = min(max(1, round(len(names) * valid_ratio)), len(names) - 1)
    valid = set(np.random.default_rng(seed).choice(len(names), size=n_valid, replace=False))
    return {
        "train": [name for i, name in enumerate(names) if i not in valid],
        "valid": [name for i, name in enumerate(names) if i in valid],
    }


def read_env_meta(path: str | Path) -> dict[str, Any]:
    """The env metadata (``data.attrs["env_args"]``) of a robomimic hdf5 file."""
    with h5py.File(path, "r") as file:
        return json.loads(file["data"].attrs["env_args"])


def read_attrs(path: str | Path) -> dict[str, Any]:
    """Every ``data`` attribute, JSON strings decoded (``env_args``, our expert statistics)."""
    with h5py.File(path, "r") as file:
        attrs = {}
        for key, value in file["data"].attrs.items():
            if isinstance(value, bytes):
                value = value.decode()
            if isinstance(value, str):
                with contextlib.suppress(json.JSONDecodeError):
                    value = json.loads(value)
            attrs[key] = value.item() if isinstance(value, np.generic) else value
        return attrs


def demo_names(file: h5py.File, filter_key: str | None = None) -> list[str]:
    """Demo names in index order: all, or those of ``mask/<filter_key>``."""
    if filter_key is None:
        names = list(file["data"].keys())
    else:
        if f"mask/{filter_key}" not in file:
            available = list(file["mask"].keys()) if "mask" in file else []
            raise KeyError(f"no mask/{filter_key} in {file.filename}; masks: {available}")
        names = [name.decode() for name in file[f"mask/{filter_key}"][:]]
    return sorted(names, key=_demo_index)


def iter_demos(
    path: str | Path, obs_keys: Sequence[str] | None = None, filter_key: str | None = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(name, demo)`` in index order: the step datasets, ``obs`` / ``next_obs`` dicts
    (``obs_keys`` only, or all), ``model_file`` (None if absent). Reads one demo at a time."""
    with h5py.File(path, "r") as file:
        for name in demo_names(file, filter_key):
            group = file["data"][name]
            keys = list(group["obs"].keys()) if obs_keys is None else list(obs_keys)
            missing = [key for key in keys if key not in group["obs"]]
            if missing:
                raise KeyError(
                    f"{path} {name} has no obs {missing}; available: "
                    f"{sorted(group['obs'].keys())}"
                )
            demo: dict[str, Any] = {key: group[key][:] for key in STEP_DATASETS if key in group}
            for obs_group in ("obs", "next_obs"):
                if obs_group in group:
                    demo[obs_group] = {key: group[obs_group][key][:] for key in keys}
            demo["model_file"] = group.attrs.get("model_file")
            yield name, demo


def is_camera_key(key: str) -> bool:
    """robomimic's naming rule for RGB cameras: `<camera>_image` (e.g. `agentview_image`,
    `robot0_eye_in_hand_image`)."""
    return key.endswith("_image")


def check_camera_frames(value: np.ndarray, key: str, where: str) -> np.ndarray:
    """`value` if it is (T, H, W, C) uint8 frames (C 1 or 3, as robomimic stores RGB); else one
    ValueError naming `where` (file and demo), the key and what it holds."""
    if value.dtype != np.uint8 or value.ndim != 4 or value.shape[-1] not in (1, 3):
        raise ValueError(f"{where}: camera obs {key!r} must be uint8 frames (T, H, W, C) with "
                         f"C 1 or 3; got {value.dtype} {value.shape}")
    return value


def robomimic_to_replay_buffer(
    path: str | Path,
    obs_keys: Sequence[str] = DP_LOWDIM_OBS_KEYS,
    filter_key: str | None = None,
) -> ReplayBuffer:
    """Convert a robomimic hdf5 file (ours or robomimic's v1.5 datasets) to an in-memory
    replay buffer, one episode per demo, as Diffusion Policy trains on it.

    Per step: each of ``obs_keys`` as its own array, low-dim keys flattened to (T, D) float32
    and cameras (``*_image`` keys, `is_camera_key`) kept as (T, H, W, C) uint8 frames (anything
    else there is a ValueError naming the file, demo and key), plus ``action`` (T, Da) float32.
    DP's low-dim obs is the concatenation of `DP_LOWDIM_OBS_KEYS` in order, so a config lists
    those keys as its feature specs. Attributes: env metadata, source path, keys, demo names,
    our extra attrs.
    """
    buffer = ReplayBuffer.create_empty()
    names = []
    for name, demo in iter_demos(path, obs_keys, filter_key):
        episode = {}
        for key in obs_keys:
            value = demo["obs"][key]
            if is_camera_key(key):
                episode[key] = check_camera_frames(value, key, f"{path} {name}")
            else:
                episode[key] = value.reshape(len(value), -1).astype(np.float32)
        episode[ACTION_KEY] = demo["actions"].astype(np.float32)
        buffer.add_episode(episode)
        names.append(name)
    if not names:
        where = f" in mask {filter_key!r}" if filter_key else ""
        raise ValueError(f"{path} has no demos{where}")
    attrs = read_attrs(path)
    buffer.attrs.update(
        {
            "source": {"format": "robomimic_hdf5", "path": str(path), "filter_key": filter_key},
            "env_meta": attrs.pop("env_args"),
            "obs_keys": list(obs_keys),
            "demo_names": names,
            **{key: value for key, value in attrs.items() if key != "total"},
        }
    )
    return buffer
