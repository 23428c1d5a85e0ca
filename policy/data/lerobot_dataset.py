"""LeRobot datasets (``LeRobotDataset`` folders) converted to our zarr replay buffer, low-dim only.

Layouts read (``meta/info.json`` ``codebase_version``)::

    v3.0 (LeRobot >= 0.4)   meta/info.json, meta/episodes/chunk-*/file-*.parquet,
                            data/chunk-*/file-*.parquet (many episodes per file)
    v2.1 (LeRobot 0.3.x)    meta/info.json, meta/episodes.jsonl,
                            data/chunk-*/episode_*.parquet (one episode per file)

Every data row is one frame: a column per feature of ``info["features"]`` (vectors as
fixed-size lists, shape-[1] features as plain columns), plus the bookkeeping columns
``episode_index``, ``frame_index``, ``index``, ``timestamp``, ``task_index``. Video features
live in ``videos/*.mp4``, not in the parquet files; image features are encoded PNG/JPEG bytes.

Conversion (`lerobot_to_replay_buffer`): episodes in ``episode_index`` order, rows of each in
``frame_index`` order (which must run 0..L-1), every selected feature as a float32 ``data/<key>``
array of shape (N, *feature shape). Default key names drop an ``observation.`` prefix and turn
the remaining dots into underscores (`default_key`)::

    observation.state               -> state
    observation.environment_state   -> environment_state
    action                          -> action
    next.reward                     -> next_reward

With ``keys=None`` every numeric feature except the bookkeeping columns is converted; video,
image and string features are skipped (and listed in the buffer's ``source`` attribute). A
``keys`` mapping {feature: buffer key} converts exactly those features; asking for a video or
image feature is an error (no video decoding here). pyarrow is imported only when reading data
(``pip install 'picard-policy[lerobot]'``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from policy.data.replay_buffer import ReplayBuffer

INFO_FILE = Path("meta") / "info.json"
V1_INFO_FILE = Path("meta_data") / "info.json"  # LeRobot v1.x datasets
SUPPORTED_VERSIONS = ("v2.1", "v3.0")
BOOKKEEPING_FEATURES = ("timestamp", "frame_index", "episode_index", "index", "task_index")
"""Per-frame columns every LeRobot dataset has; not converted unless `keys` names them."""
VISUAL_DTYPES = ("video", "image")
_NUMERIC_KINDS = "biuf"  # numpy dtype kinds converted to float32: bool, int, uint, float
CONVERT_SCRIPT = "scripts/convert_lerobot_dataset.py"


def _info_path(root: Path) -> Path | None:
    return next((root / name for name in (INFO_FILE, V1_INFO_FILE) if (root / name).is_file()),
                None)


def is_lerobot_dataset(path: str | Path) -> bool:
    """Whether `path` is a LeRobot dataset folder (a directory with ``meta/info.json``, or
    ``meta_data/info.json`` for LeRobot's v1.x datasets)."""
    return _info_path(Path(path).expanduser()) is not None


def check_not_lerobot_dataset(path: str | Path, what: str = "data.path") -> None:
    """Raise a one-line ValueError saying how to convert `path` if it is a LeRobot dataset
    folder (training reads zarr replay buffers only); do nothing otherwise."""
    path = Path(path).expanduser()
    info_path = _info_path(path)
    if info_path is None:
        return
    try:
        version = json.loads(info_path.read_text()).get("codebase_version", "?")
    except (OSError, ValueError, AttributeError):
        version = "?"
    raise ValueError(
        f"{what} {path} is a LeRobot dataset folder (codebase_version {version}), not a zarr "
        f"replay buffer; convert it first: python {CONVERT_SCRIPT} {path} OUT.zarr.zip "
        f"(then set {what}=OUT.zarr.zip)"
    )


def default_key(feature: str) -> str:
    """Our buffer key for a LeRobot feature: drop ``observation.``, then ``.`` -> ``_``."""
    return feature.removeprefix("observation.").replace(".", "_")


def read_info(root: str | Path) -> dict[str, Any]:
    """``meta/info.json`` of the dataset at `root`, checked: a supported ``codebase_version``
    and a ``features`` mapping; else FileNotFoundError / ValueError naming what is wrong."""
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"LeRobot dataset folder does not exist: {root}")
    info_path = _info_path(root)
    if info_path is None:
        raise ValueError(f"{root} is not a LeRobot dataset folder: no {INFO_FILE}")
    try:
        info = json.loads(info_path.read_text())
    except ValueError as e:
        raise ValueError(f"{info_path} is not valid JSON: {e}") from e
    if not isinstance(info, dict):
        raise ValueError(f"{info_path} does not hold a JSON object")
    version = info.get("codebase_version")
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(
            f"{root}: LeRobot codebase_version {version!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_VERSIONS)}); upgrade it with LeRobot's converters first "
            "(v2.0 -> v2.1: lerobot 0.3.x lerobot.datasets.v21.convert_dataset_v20_to_v21; "
            "v2.1 -> v3.0: lerobot.scripts.convert_dataset_v21_to_v30)"
        )
    features = info.get("features")
    if not isinstance(features, dict) or not features:
        raise ValueError(f"{info_path} has no 'features' mapping")
    return info


def default_keys(info: Mapping[str, Any]) -> dict[str, str]:
    """{feature: buffer key} for every numeric, non-bookkeeping feature of `info`, in order."""
    return {
        name: default_key(name)
        for name, spec in info["features"].items()
        if name not in BOOKKEEPING_FEATURES and _is_numeric(spec)
    }


def _is_numeric(spec: Mapping[str, Any]) -> bool:
    try:
        return np.dtype(spec.get("dtype")).kind in _NUMERIC_KINDS
    except TypeError:  # "video", "image", "string", ...
        return False


def _select_keys(info: Mapping[str, Any], keys: Mapping[str, str] | None) -> dict[str, str]:
    """Validate the requested {feature: buffer key} mapping against the dataset's features."""
    features = info["features"]
    if keys is None:
        selected = default_keys(info)
        if not selected:
            raise ValueError(f"the dataset has no low-dim numeric features; features: "
                             f"{_describe(features)}")
    else:
        selected = dict(keys)
        if not selected:
            raise ValueError("keys must name at least one LeRobot feature")
        for name in selected:
            if name not in features:
                raise ValueError(f"LeRobot feature {name!r} is not in the dataset; available "
                                 f"features: {_describe(features)}")
            dtype = features[name].get("dtype")
            if dtype in VISUAL_DTYPES:
                raise ValueError(f"LeRobot feature {name!r} is a {dtype} feature: video/image "
                                 "decoding is not supported (low-dim features only)")
            if not _is_numeric(features[name]):
                raise ValueError(f"LeRobot feature {name!r} has dtype {dtype!r}; only numeric "
                                 "features can be converted")
    bad = [key for key in selected.values()
           if not isinstance(key, str) or not key or "/" in key or key.startswith("__")]
    if bad:
        raise ValueError(f"bad buffer key names {bad}: need non-empty strings without '/'")
    targets = list(selected.values())
    clashes = sorted({key for key in targets if targets.count(key) > 1})
    if clashes:
        raise ValueError(f"several features map to the same buffer key {clashes}: {selected}")
    return selected


def _describe(features: Mapping[str, Any]) -> str:
    return ", ".join(f"{name} ({spec.get('dtype')}, {list(spec.get('shape', []))})"
                     for name, spec in features.items())


def _import_pyarrow() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(
            "reading LeRobot datasets needs pyarrow: pip install 'picard-policy[lerobot]' "
            f"({e})"
        ) from e
    return pq


def _column_values(column: Any, name: str, n_rows: int, shape: tuple[int, ...]) -> np.ndarray:
    """A pyarrow column (scalars or nested lists) -> (n_rows, *shape) float32."""
    import pyarrow as pa

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if array.null_count:
        raise ValueError(f"LeRobot feature {name!r} has {array.null_count} null rows")
    while pa.types.is_list(array.type) or pa.types.is_large_list(array.type) or \
            pa.types.is_fixed_size_list(array.type):
        array = array.flatten()
        if array.null_count:
            raise ValueError(f"LeRobot feature {name!r} holds null values")
    values = array.to_numpy(zero_copy_only=False)
    if values.dtype.kind not in _NUMERIC_KINDS:
        raise ValueError(f"LeRobot feature {name!r} holds {values.dtype} values, not numbers")
    expected = n_rows * int(np.prod(shape, dtype=np.int64))
    if values.size != expected:
        raise ValueError(f"LeRobot feature {name!r}: info.json says shape {list(shape)} per "
                         f"frame but the data hold {values.size / max(n_rows, 1):g} values "
                         "per frame")
    return values.reshape(n_rows, *shape).astype(np.float32)


def _meta_episode_lengths(root: Path, version: str) -> dict[int, int] | None:
    """{episode_index: length} from the episode metadata, or None where there is none."""
    if version == "v2.1":
        path = root / "meta" / "episodes.jsonl"
        if not path.is_file():
            return None
        lengths = {}
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                lengths[int(record["episode_index"])] = int(record["length"])
        return lengths
    files = sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    if not files:
        return None
    pq = _import_pyarrow()
    lengths = {}
    for path in files:
        table = pq.read_table(path, columns=["episode_index", "length"])
        lengths.update(zip(table.column("episode_index").to_pylist(),
                           table.column("length").to_pylist(), strict=True))
    return lengths


@dataclass(frozen=True)
class LeRobotEpisodes:
    """The selected low-dim features of a LeRobot dataset, ordered by episode then frame."""

    arrays: dict[str, np.ndarray]
    """{buffer key: (N, *feature shape) float32}, all episodes concatenated."""
    episode_index: np.ndarray
    """(E,) int64 LeRobot episode indices, increasing."""
    lengths: np.ndarray
    """(E,) int64 frames per episode."""
    keys: dict[str, str]
    """{LeRobot feature: buffer key} that was converted."""
    info: dict[str, Any]
    """The dataset's meta/info.json."""


def read_lerobot_episodes(
    root: str | Path, keys: Mapping[str, str] | None = None
) -> LeRobotEpisodes:
    """Read the selected features of every frame, ordered by episode then frame, with the
    checks of the module doc (ValueError naming the problem)."""
    root = Path(root).expanduser()
    info = read_info(root)
    selected = _select_keys(info, keys)
    pq = _import_pyarrow()
    files = sorted((root / "data").glob("chunk-*/*.parquet"))
    if not files:
        raise ValueError(f"{root}: no data files (data/chunk-*/*.parquet)")
    columns = list(dict.fromkeys([*selected, "episode_index", "frame_index"]))
    tables = []
    for path in files:
        try:
            tables.append(pq.read_table(path, columns=columns))
        except Exception as e:  # pyarrow: ArrowInvalid (missing column, corrupt file), OSError
            raise ValueError(f"cannot read {path.relative_to(root)}: {type(e).__name__}: "
                             f"{e}") from e
    import pyarrow as pa

    table = pa.concat_tables(tables)
    n_rows = table.num_rows
    episode = table.column("episode_index").to_numpy().astype(np.int64)
    frame = table.column("frame_index").to_numpy().astype(np.int64)
    order = np.lexsort((frame, episode))
    episode, frame = episode[order], frame[order]
    episode_index, starts, lengths = np.unique(episode, return_index=True, return_counts=True)
    expected_frame = np.arange(n_rows) - np.repeat(starts, lengths)
    if (frame != expected_frame).any():
        row = int(np.flatnonzero(frame != expected_frame)[0])
        raise ValueError(f"{root}: episode {episode[row]} has frame_index {frame[row]} where "
                         f"{expected_frame[row]} was expected (frames must run 0..L-1 once)")
    for name, total in (("total_frames", n_rows), ("total_episodes", len(episode_index))):
        if name in info and int(info[name]) != total:
            raise ValueError(f"{root}: info.json says {name}={info[name]} but the data files "
                             f"hold {total} (missing or extra data files?)")
    meta_lengths = _meta_episode_lengths(root, info["codebase_version"])
    found = dict(zip(episode_index.tolist(), lengths.tolist(), strict=True))
    if meta_lengths is not None and meta_lengths != found:
        diff = sorted(set(meta_lengths.items()) ^ set(found.items()))[:4]
        raise ValueError(f"{root}: episode lengths in the data files differ from the episode "
                         f"metadata (episode, length) {diff}")
    arrays = {}
    for name, key in selected.items():
        shape = tuple(int(n) for n in info["features"][name].get("shape", [1]))
        arrays[key] = _column_values(table.column(name), name, n_rows, shape)[order]
    return LeRobotEpisodes(arrays, episode_index.astype(np.int64), lengths.astype(np.int64),
                           selected, info)


def lerobot_to_replay_buffer(
    root: str | Path, keys: Mapping[str, str] | None = None
) -> ReplayBuffer:
    """Convert the LeRobot dataset folder `root` (v3.0 or v2.1) to an in-memory replay buffer
    (``buffer.save(path)`` writes it): one episode per LeRobot episode, in ``episode_index``
    order; `keys` maps LeRobot feature -> buffer key (default: every low-dim feature, named by
    `default_key`). Attribute ``source`` records the dataset, version, fps, mapping, skipped
    features and the original episode indices."""
    read = read_lerobot_episodes(root, keys)
    info = read.info
    buffer = ReplayBuffer.create_empty()
    ends = np.cumsum(read.lengths)
    for start, end in zip(ends - read.lengths, ends, strict=True):
        buffer.add_episode({key: values[start:end] for key, values in read.arrays.items()})
    skipped = [name for name in info["features"]
               if name not in read.keys and name not in BOOKKEEPING_FEATURES]
    buffer.attrs.update({
        "source": {
            "format": "lerobot",
            "path": str(Path(root).expanduser()),
            "codebase_version": info["codebase_version"],
            "fps": info.get("fps"),
            "robot_type": info.get("robot_type"),
            "keys": read.keys,
            "skipped_features": skipped,
            "episode_index": read.episode_index.tolist(),
        },
    })
    return buffer
