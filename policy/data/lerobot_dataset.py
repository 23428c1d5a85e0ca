"""LeRobot datasets (``LeRobotDataset`` folders) converted to our zarr replay buffer, cameras too.

Layouts read (``meta/info.json`` ``codebase_version``)::

    v3.0 (LeRobot >= 0.4)   meta/info.json, meta/episodes/chunk-*/file-*.parquet,
                            data/chunk-*/file-*.parquet (many episodes per file)
    v2.1 (LeRobot 0.3.x)    meta/info.json, meta/episodes.jsonl,
                            data/chunk-*/episode_*.parquet (one episode per file)

Every data row is one frame: a column per feature of ``info["features"]`` (vectors as
fixed-size lists, shape-[1] features as plain columns), plus the bookkeeping columns
``episode_index``, ``frame_index``, ``index``, ``timestamp``, ``task_index``. Cameras come in
two kinds (LeRobot's writer, ``dataset_writer.py`` / ``feature_utils.py`` of LeRobot 0.6.1):

- ``dtype "image"``: a parquet column of Hugging Face ``Image()`` structs ``{bytes, path}``,
  ``bytes`` the frame's PNG (or JPEG) file, embedded (``path`` its file name); where ``bytes``
  is null, ``path`` is read relative to the dataset folder. Decoded with Pillow.
- ``dtype "video"``: no parquet column; the frames are in ``info["video_path"]`` files, in v3.0
  ``videos/<key>/chunk-XXX/file-YYY.mp4`` holding many episodes back to back (the episode
  metadata's ``videos/<key>/chunk_index``, ``file_index``, ``from_timestamp``), in v2.1
  ``videos/chunk-XXX/<key>/episode_NNNNNN.mp4`` (one per episode, from 0 s). Frame ``i`` of an
  episode is the video frame at ``from_timestamp + timestamp[i]``, the closest decoded frame
  within ``VIDEO_TOLERANCE_S`` (LeRobotDataset's default ``tolerance_s``), decoded with PyAV to
  RGB24 as LeRobot's pyav backend does (``frame.to_ndarray(format="rgb24")``). Without PyAV a
  video feature is refused with one line naming it.

Cameras are converted to uint8 ``(N, H, W, 3)`` arrays (the layout of DP's ``img``, read by
``SequenceDataset``'s ``image_shapes``); ``shape`` in info.json may be HWC or, with ``names``
starting with ``channels``, CHW. Only RGB cameras convert (depth maps are refused). They are
decoded one episode at a time, straight into the (compressed) buffer: a video is sought to the
keyframe before each episode, so no more than one episode's raw frames is ever in memory.

Conversion (`lerobot_to_replay_buffer`): episodes in ``episode_index`` order, rows of each in
``frame_index`` order (which must run 0..L-1), every selected low-dim feature as a float32
``data/<key>`` array of shape (N, *feature shape), cameras as uint8 (N, H, W, 3). Default key
names drop an ``observation.`` prefix and turn
the remaining dots into underscores (`default_key`)::

    observation.state               -> state
    observation.environment_state   -> environment_state
    action                          -> action
    next.reward                     -> next_reward
    observation.image               -> image
    observation.images.top          -> images_top

With ``keys=None`` every numeric and camera feature except the bookkeeping columns is converted;
string (and other) features are skipped (and listed in the buffer's ``source`` attribute). A
``keys`` mapping {feature: buffer key} converts exactly those features. pyarrow, Pillow and
PyAV are imported only when needed (``pip install 'picard-policy[lerobot]'``).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from policy.data.replay_buffer import ReplayBuffer

INFO_FILE = Path("meta") / "info.json"
V1_INFO_FILE = Path("meta_data") / "info.json"  # LeRobot v1.x datasets
SUPPORTED_VERSIONS = ("v2.1", "v3.0")
BOOKKEEPING_FEATURES = ("timestamp", "frame_index", "episode_index", "index", "task_index")
"""Per-frame columns every LeRobot dataset has; not converted unless `keys` names them."""
VISUAL_DTYPES = ("video", "image")
VIDEO_TOLERANCE_S = 1e-4
"""Largest |video frame time - requested time| accepted (LeRobotDataset's default tolerance_s)."""
CHANNEL_NAMES = ("channels", "channel", "c")
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
    """{feature: buffer key} for every numeric or camera (image / video), non-bookkeeping
    feature of `info`, in order."""
    return {
        name: default_key(name)
        for name, spec in info["features"].items()
        if name not in BOOKKEEPING_FEATURES and (_is_numeric(spec) or _is_camera(spec))
    }


def _is_camera(spec: Mapping[str, Any]) -> bool:
    return spec.get("dtype") in VISUAL_DTYPES


def camera_shape(name: str, spec: Mapping[str, Any]) -> tuple[int, int, int]:
    """(H, W, 3) of camera feature `name` from info.json's ``shape`` (HWC, or CHW where
    ``names`` starts with channels); ValueError unless it is an RGB camera."""
    shape = [int(n) for n in spec.get("shape") or []]
    names = [str(n).lower() for n in spec.get("names") or []]
    info = spec.get("info") or {}
    if info.get("video.is_depth_map"):
        raise ValueError(f"LeRobot feature {name!r} is a depth-map video; only RGB cameras "
                         "convert")
    if len(shape) != 3:
        raise ValueError(f"LeRobot feature {name!r} ({spec.get('dtype')}) has shape {shape}; "
                         "expected [H, W, C] or [C, H, W]")
    height, width, channels = ((shape[1], shape[2], shape[0])
                               if names and names[0] in CHANNEL_NAMES else shape)
    if channels != 3:
        raise ValueError(f"LeRobot feature {name!r} has {channels} channels (shape {shape}, "
                         f"names {spec.get('names')}); only RGB cameras (3) convert")
    return height, width, channels


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
            raise ValueError(f"the dataset has no numeric or camera features; features: "
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
            if not (_is_numeric(features[name]) or _is_camera(features[name])):
                raise ValueError(f"LeRobot feature {name!r} has dtype {dtype!r}; only numeric "
                                 "and camera (image, video) features can be converted")
    for name in selected:
        if _is_camera(features[name]):
            camera_shape(name, features[name])  # an RGB camera, or one line saying why not
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


def _image_values(column: Any, name: str, root: Path, shape: tuple[int, int, int],
                  rows: list[str]) -> np.ndarray:
    """A column of Hugging Face ``Image()`` structs {bytes, path} -> (n_rows, H, W, 3) uint8:
    each embedded PNG/JPEG decoded with Pillow (a null ``bytes`` reads ``path``, which must lie
    inside the dataset folder `root`); `rows` names each row in errors."""
    import io

    import pyarrow as pa
    from PIL import Image

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not pa.types.is_struct(array.type) or array.type.get_field_index("bytes") < 0:
        raise ValueError(f"LeRobot feature {name!r} is an image feature but its column holds "
                         f"{array.type}, not Image() structs {{bytes, path}}")
    blobs = array.field("bytes").to_pylist()
    has_path = array.type.get_field_index("path") >= 0
    paths = array.field("path").to_pylist() if has_path else [None] * len(blobs)
    out = np.empty((len(blobs), *shape), np.uint8)
    inside = root.resolve()
    for row, (blob, path) in enumerate(zip(blobs, paths, strict=True)):
        try:
            if blob is None:
                if not path:
                    raise ValueError("neither bytes nor a path")
                file = (root / path).resolve()
                if inside not in file.parents:
                    raise ValueError(f"its path {path!r} is outside the dataset folder")
                blob = file.read_bytes()
            with Image.open(io.BytesIO(blob)) as image:
                if image.mode not in ("RGB", "L", "P"):
                    raise ValueError(f"a {image.mode} image, not RGB")
                frame = np.asarray(image.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            # PIL's UnidentifiedImageError is an OSError; a bomb is over 2x MAX_IMAGE_PIXELS
            raise ValueError(f"LeRobot feature {name!r}: {rows[row]} is not a readable image "
                             f"({e})") from e
        if frame.shape != shape:
            raise ValueError(f"LeRobot feature {name!r}: {rows[row]} holds a {frame.shape} "
                             f"image but info.json says {list(shape)} (H, W, C)")
        out[row] = frame
    return out


def _import_av(name: str, info: Mapping[str, Any]) -> Any:
    """PyAV, or a one-line ValueError naming the video feature that needs it."""
    try:
        import av
    except ImportError as e:
        codec = (info["features"][name].get("info") or {}).get("video.codec", "?")
        raise ValueError(
            f"LeRobot feature {name!r} is a video feature (codec {codec}): decoding it needs "
            f"PyAV: pip install 'picard-policy[lerobot]' (or convert only other features with "
            f"--key) ({e})") from e
    return av


def _video_files(root: Path, info: Mapping[str, Any], name: str,
                 episodes: np.ndarray) -> dict[int, tuple[Path, float]]:
    """{episode: (video file, its start time in that file)} of video feature `name`."""
    template = info.get("video_path")
    if not template:
        raise ValueError(f"LeRobot feature {name!r} is a video feature but info.json has no "
                         "video_path")
    inside = root.resolve()

    def video_file(**fields: int) -> Path:  # read only inside the dataset folder, as images
        try:
            relative = str(template).format(video_key=name, **fields)
        except (KeyError, IndexError, ValueError, AttributeError) as e:
            raise ValueError(f"LeRobot feature {name!r}: info.json's video_path {template!r} "
                             f"is not a LeRobot path template ({e!r})") from e
        if inside not in (root / relative).resolve().parents:
            raise ValueError(f"LeRobot feature {name!r}: info.json's video_path gives "
                             f"{relative!r}, outside the dataset folder")
        return root / relative

    if info["codebase_version"] == "v2.1":  # one file per episode, starting at 0 s
        chunks = int(info.get("chunks_size", 1000))
        return {int(ep): (video_file(episode_chunk=int(ep) // chunks, episode_index=int(ep)),
                          0.0)
                for ep in episodes}
    files = sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    prefix = f"videos/{name}/"
    columns = ["episode_index", *(prefix + c for c in ("chunk_index", "file_index",
                                                      "from_timestamp"))]
    pq = _import_pyarrow()
    found: dict[int, tuple[Path, float]] = {}
    for path in files:
        try:
            table = pq.read_table(path, columns=columns)
        except Exception as e:  # pyarrow: ArrowInvalid for a missing column
            raise ValueError(f"LeRobot feature {name!r}: the episode metadata "
                             f"{path.relative_to(root)} has no {prefix}* columns ({e})") from e
        for ep, chunk, file, start in zip(*(table.column(c).to_pylist() for c in columns),
                                          strict=True):
            found[int(ep)] = (video_file(chunk_index=int(chunk), file_index=int(file)),
                              float(start))
    missing = sorted(set(episodes.tolist()) - set(found))
    if missing:
        raise ValueError(f"LeRobot feature {name!r}: no video in the episode metadata for "
                         f"episodes {missing[:4]}")
    return found


def _video_episode(root: Path, name: str, shape: tuple[int, int, int], episode: int,
                   source: tuple[Path, float], timestamps: np.ndarray) -> np.ndarray:
    """(L, H, W, 3) uint8 frames of one episode of video feature `name`: frame i is the video
    frame at the episode's from_timestamp + timestamps[i] in its file, within
    VIDEO_TOLERANCE_S (module doc). The file is sought to the keyframe before the episode's
    first frame and decoded only until its last, so a file of many episodes is decoded about
    once over all of them, and only one episode's frames are ever in memory."""
    import av

    path, start = source  # read_lerobot_episodes checked every file exists
    where = path.relative_to(root)
    query = start + np.asarray(timestamps, np.float64)
    order = np.argsort(query, kind="stable")
    query = query[order]
    out = np.empty((len(query), *shape), np.uint8)
    filled = np.zeros(len(query), bool)
    tol = VIDEO_TOLERANCE_S
    times = []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            if len(query) and query[0] > tol:
                container.seek(max(int((query[0] - tol) / stream.time_base), 0),
                               stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                t = float(frame.pts * stream.time_base)
                times.append(t)
                if len(query) == 0 or t > query[-1] + tol:
                    break
                lo = np.searchsorted(query, t - tol, side="right")  # |q - t| < tol
                hi = np.searchsorted(query, t + tol, side="left")
                if hi <= lo:
                    continue
                image = frame.to_ndarray(format="rgb24")  # LeRobot's pyav conversion
                if image.shape != shape:
                    raise ValueError(f"LeRobot feature {name!r}: {where} holds {image.shape} "
                                     f"frames but info.json says {list(shape)} (H, W, C)")
                out[order[lo:hi]] = image
                filled[lo:hi] = True
    except (av.FFmpegError, IndexError) as e:
        raise ValueError(f"LeRobot feature {name!r}: cannot decode {where} with PyAV "
                         f"{av.__version__} ({type(e).__name__}: {e})") from e
    if not filled.all():
        bad = int(np.flatnonzero(~filled)[0])
        gap = float(np.min(np.abs(np.asarray(times) - query[bad]))) if times else np.inf
        raise ValueError(
            f"LeRobot feature {name!r}: episode {episode} needs a frame at {query[bad]:.4f} s "
            f"of {where}, but the closest video frame is {gap:.4f} s away (tolerance {tol} s; "
            f"{len(times)} frames decoded)")
    return out


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
    """The selected features of a LeRobot dataset, ordered by episode then frame."""

    arrays: dict[str, np.ndarray]
    """{buffer key: (N, *feature shape) float32} of the low-dim features, all episodes
    concatenated."""
    cameras: dict[str, Callable[[int], np.ndarray]]
    """{buffer key: frames(i)} of the camera features: the (L_i, H, W, 3) uint8 frames of the
    i-th episode, decoded when asked (a whole camera dataset decoded at once would not fit in
    memory)."""
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
    videos = [name for name in selected if info["features"][name].get("dtype") == "video"]
    if videos:
        _import_av(videos[0], info)  # before any work: no PyAV, no video feature
    in_rows = [name for name in selected if name not in videos]  # videos are not columns
    columns = list(dict.fromkeys([*in_rows, "episode_index", "frame_index",
                                  *(["timestamp"] if videos else [])]))
    tables = []
    for path in files:
        try:
            absent = [c for c in columns if c not in pq.read_schema(path).names]
        except Exception as e:  # pyarrow: ArrowInvalid (not parquet), OSError
            raise ValueError(f"cannot read {path.relative_to(root)}: {type(e).__name__}: "
                             f"{e}") from e
        if absent:
            kinds = [info["features"].get(c, {}).get("dtype", "?") for c in absent]
            raise ValueError(f"LeRobot feature {absent[0]!r} ({kinds[0]}) is in info.json but "
                             f"not a column of {path.relative_to(root)}")
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
    rows = [f"episode {e} frame {f}" for e, f in zip(episode.tolist(), frame.tolist(),
                                                      strict=True)]  # file order, for errors
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
    arrays: dict[str, np.ndarray] = {}
    cameras: dict[str, Callable[[int], np.ndarray]] = {}
    starts = np.cumsum(lengths) - lengths
    sorted_rows = [rows[k] for k in order.tolist()]
    for name, key in selected.items():
        spec = info["features"][name]
        if spec.get("dtype") == "image":
            column = table.column(name).take(pa.array(order))  # encoded images, sorted
            cameras[key] = functools.partial(
                _image_episode, column, name, root, camera_shape(name, spec), sorted_rows,
                starts, lengths)
        elif spec.get("dtype") == "video":
            timestamps = table.column("timestamp").to_numpy().astype(np.float64)[order]
            files = _video_files(root, info, name, episode_index)
            for path in sorted({file for file, _ in files.values()}):
                if not path.is_file():  # before any decoding: say which episodes lack it
                    eps = sorted(ep for ep, (file, _) in files.items() if file == path)
                    raise ValueError(f"LeRobot feature {name!r}: video file "
                                     f"{path.relative_to(root)} of episodes {eps[:4]} is "
                                     "missing")
            cameras[key] = functools.partial(
                _video_rows, root, name, camera_shape(name, spec), episode_index, files,
                timestamps, starts, lengths)
        else:
            shape = tuple(int(n) for n in spec.get("shape", [1]))
            arrays[key] = _column_values(table.column(name), name, n_rows, shape)[order]
    return LeRobotEpisodes(arrays, cameras, episode_index.astype(np.int64),
                           lengths.astype(np.int64), selected, info)


def _image_episode(column: Any, name: str, root: Path, shape: tuple[int, int, int],
                   rows: list[str], starts: np.ndarray, lengths: np.ndarray,
                   index: int) -> np.ndarray:
    """The decoded frames of the `index`-th episode of an image feature's sorted column."""
    start, length = int(starts[index]), int(lengths[index])
    return _image_values(column.slice(start, length), name, root, shape,
                         rows[start:start + length])


def _video_rows(root: Path, name: str, shape: tuple[int, int, int], episode_index: np.ndarray,
                files: Mapping[int, tuple[Path, float]], timestamps: np.ndarray,
                starts: np.ndarray, lengths: np.ndarray, index: int) -> np.ndarray:
    """The decoded frames of the `index`-th episode of a video feature."""
    episode = int(episode_index[index])
    start, length = int(starts[index]), int(lengths[index])
    return _video_episode(root, name, shape, episode, files[episode],
                          timestamps[start:start + length])


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
    spans = list(zip(ends - read.lengths, ends, strict=True))
    for i, (start, end) in enumerate(tqdm(spans, desc="episodes", unit="ep", disable=None)):
        episode = {key: values[start:end] for key, values in read.arrays.items()}
        episode.update({key: frames(i) for key, frames in read.cameras.items()})
        buffer.add_episode(episode)  # compressed in the buffer; one episode raw at a time
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
