"""Episodic replay buffer on zarr 3, in Diffusion Policy's on-disk layout.

Layout (the same as DP's `ReplayBuffer`, so its datasets and ours read alike)::

    /                       root attributes: free-form JSON metadata (expert statistics, ...)
    data/<key>              (N, ...) every episode concatenated along time, one array per key
    meta/episode_ends       (n_episodes,) int64, cumulative: episode i is rows
                            [episode_ends[i-1], episode_ends[i]) of every data array

Stores: in memory (`MemoryStore`), a directory (`LocalStore`) or a `.zip` file (`ZipStore`).
A zip archive cannot rewrite its entries, so a zip opened for writing is edited in memory and
written once, on `close()` (or when a `with` block ends).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any, Literal

import numcodecs
import numpy as np
import zarr
from numcodecs.abc import Codec
from zarr.codecs import BloscCodec
from zarr.storage import LocalStore, MemoryStore, ZipStore

DATA_GROUP = "data"
EPISODE_ENDS = "meta/episode_ends"
# Blosc with zstd and byte shuffle: good ratios on float trajectories and on uint8 images.
DEFAULT_COMPRESSOR = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
V2_COMPRESSOR = numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)
"""The same compression for zarr v2 stores (what Diffusion Policy's zarr 2 reads)."""
MISSING_CODEC_PACKAGES = {
    f"imagecodecs_{name}": "imagecodecs"
    for name in ("jpeg2k", "jpegxl", "jpeg", "jpegxr", "png", "webp", "avif", "qoi")
}
"""Codecs Diffusion Policy's image datasets use, and the package that provides them: when it is
not installed, a placeholder lets the store open (its low-dim arrays stay readable) and
reading such an array names the codec and the package."""
# Chunks hold whole time steps, about this many bytes each (a few thousand low-dim steps or
# ~40 images of 96x96x3), so appending an episode rewrites at most one partial chunk.
CHUNK_TARGET_BYTES = 1 << 20
EPISODE_ENDS_CHUNK = 4096
# Copies between stores move whole chunks, in blocks of about this many bytes.
COPY_BLOCK_BYTES = 64 << 20

OpenMode = Literal["r", "a", "w"]


class MissingCodecError(RuntimeError):
    """An array's codec is not installed."""


class _MissingCodec(Codec):
    """Stands in for a codec whose package is not installed: metadata parses, data does not."""

    codec_id = "missing"
    package = "?"

    def __init__(self, **config: object) -> None:
        self.config = config

    def encode(self, buf: object) -> object:
        raise MissingCodecError(self._message())

    def decode(self, buf: object, out: object = None) -> object:
        raise MissingCodecError(self._message())

    def _message(self) -> str:
        return (f"codec {self.codec_id!r} is not installed; the package {self.package!r} "
                f"provides it (pip install {self.package})")


def _register_missing_codecs() -> None:
    """Register a placeholder for each MISSING_CODEC_PACKAGES codec that is not available."""
    for codec_id, package in MISSING_CODEC_PACKAGES.items():
        try:
            numcodecs.get_codec({"id": codec_id})
            continue
        except Exception:  # numcodecs raises ValueError or the package's import errors
            pass
        numcodecs.register_codec(type(f"Missing_{codec_id}", (_MissingCodec,),
                                      {"codec_id": codec_id, "package": package}))


_register_missing_codecs()


def _is_zip(path: str | Path) -> bool:
    return str(path).endswith(".zip")


def _time_chunk(row_shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, ...]:
    """Chunk shape for an (N, *row_shape) array: whole rows, ~CHUNK_TARGET_BYTES per chunk."""
    row_bytes = max(1, int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize)
    return (max(1, CHUNK_TARGET_BYTES // row_bytes), *row_shape)


def _check_replaceable(path: Path) -> None:
    """Refuse to replace an existing non-empty directory that is not a zarr store: zarr's
    mode "w" deletes everything inside it."""
    is_zarr = (path / "zarr.json").exists() or (path / ".zgroup").exists()
    if path.is_dir() and any(path.iterdir()) and not is_zarr:
        raise FileExistsError(f"{path} is a non-empty directory that is not a zarr store")


def _init_layout(root: zarr.Group) -> None:
    """Create the empty `data/` group and `meta/episode_ends` in a fresh store."""
    root.require_group(DATA_GROUP)
    root.create_array(
        EPISODE_ENDS,
        shape=(0,),
        dtype=np.int64,
        chunks=(EPISODE_ENDS_CHUNK,),
        compressors=DEFAULT_COMPRESSOR,
    )


def _copy_tree(src: zarr.Group, dst: zarr.Group, recompress: bool = False) -> None:
    """Copy every sub-group and array of `src` into the empty group `dst`, exactly.

    Arrays keep their dtype, chunks, codecs, fill value and attributes (with `recompress`,
    for a change of zarr format, the target format's default codec instead); data moves in
    chunk-aligned blocks so each destination chunk is written once (required by zip stores).
    """
    v2 = dst.metadata.zarr_format == 2
    for path, member in sorted(src.members(max_depth=None)):
        if isinstance(member, zarr.Group):
            dst.create_group(path, attributes=dict(member.attrs))
            continue
        if recompress:
            codecs = {"filters": None, "compressors": V2_COMPRESSOR if v2 else DEFAULT_COMPRESSOR}
        else:
            codecs = {"filters": member.filters, "compressors": member.compressors}
        target = dst.create_array(
            path,
            shape=member.shape,
            dtype=member.dtype,
            chunks=member.chunks,
            fill_value=member.fill_value,
            attributes=dict(member.attrs),
            **codecs,
        )
        if member.size == 0:
            continue
        chunk_rows = member.chunks[0]
        chunk_bytes = max(1, member.nbytes // max(1, member.shape[0])) * chunk_rows
        block_rows = chunk_rows * max(1, COPY_BLOCK_BYTES // chunk_bytes)
        for start in range(0, member.shape[0], block_rows):
            target[start : start + block_rows] = member[start : start + block_rows]


def _check_episode(episode: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """Validate one episode's arrays on their own: at least one key, all (T, ...) with T > 0."""
    if not episode:
        raise ValueError("add_episode needs at least one array; got an empty mapping")
    arrays = {key: np.asarray(value) for key, value in episode.items()}
    scalars = [key for key, arr in arrays.items() if arr.ndim == 0]
    if scalars:
        raise ValueError(f"episode arrays must have a time axis; scalar values for {scalars}")
    lengths = {key: arr.shape[0] for key, arr in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"episode arrays must all have the same length; got {lengths}")
    n_steps = next(iter(lengths.values()))
    if n_steps == 0:
        raise ValueError("cannot add an episode with 0 steps")
    return arrays, n_steps


class ReplayBuffer:
    """Episodes of per-step arrays concatenated along time in a zarr group (DP's layout).

    Build one with `create_empty()`, `open(path, mode)` or `load(path)`; add episodes with
    `add_episode`; read with `get_episode(i)` or `buffer[key]` (the whole (N, ...) array).
    """

    def __init__(
        self, root: zarr.Group, *, path: Path | None = None, zip_on_close: Path | None = None
    ) -> None:
        """Wrap a zarr group that already has the layout; prefer the classmethod constructors.

        `path` is where the store lives (None in memory); `zip_on_close` is the zip file that
        `close()` writes this in-memory buffer to.
        """
        missing = [name for name in (DATA_GROUP, EPISODE_ENDS) if name not in root]
        if missing:
            raise ValueError(
                f"{path or root.store} is not a replay buffer: missing {missing} "
                f"(expected groups/arrays: {DATA_GROUP}/<key>, {EPISODE_ENDS})"
            )
        self._root = root
        self._path = path
        self._zip_on_close = zip_on_close

    # ----------------------------------------------------------------------------- constructors

    @classmethod
    def create_empty(cls) -> ReplayBuffer:
        """An empty, writable buffer held in memory (zarr `MemoryStore`)."""
        root = zarr.open_group(MemoryStore(), mode="w", zarr_format=3)
        _init_layout(root)
        return cls(root)

    @classmethod
    def open(cls, path: str | Path, mode: OpenMode = "r") -> ReplayBuffer:
        """Open a directory store or a `.zip` file: "r" read-only, "a" read/append (created if
        missing), "w" create anew (an existing store at `path` is replaced).

        A zip opened with "a" or "w" is edited in memory and written to `path` on `close()`.
        """
        if mode not in ("r", "a", "w"):
            raise ValueError(f"mode must be one of 'r', 'a', 'w'; got {mode!r}")
        path = Path(path)
        if mode == "r" and not path.exists():
            raise FileNotFoundError(f"no replay buffer at {path}")
        if _is_zip(path):
            if mode == "r":
                root = zarr.open_group(ZipStore(path, mode="r"), mode="r")
                return cls(root, path=path)
            in_memory = cls.load(path) if mode == "a" and path.exists() else cls.create_empty()
            return cls(in_memory._root, zip_on_close=path)
        if mode == "r":
            return cls(zarr.open_group(LocalStore(path, read_only=True), mode="r"), path=path)
        if mode == "a" and path.exists():
            return cls(zarr.open_group(LocalStore(path), mode="a"), path=path)
        _check_replaceable(path)
        root = zarr.open_group(LocalStore(path), mode="w", zarr_format=3)
        _init_layout(root)
        return cls(root, path=path)

    @classmethod
    def load(cls, path: str | Path, in_memory: bool = True) -> ReplayBuffer:
        """Read a stored buffer; with `in_memory` (the default) copy it into a writable
        `MemoryStore` (fast random access, detached from the file), else open it read-only."""
        if not in_memory:
            return cls.open(path, mode="r")
        with cls.open(path, mode="r") as source:
            root = zarr.open_group(
                MemoryStore(),
                mode="w",
                zarr_format=source._root.metadata.zarr_format,
                attributes=dict(source.attrs),
            )
            _copy_tree(source._root, root)
        return cls(root)

    def save(self, path: str | Path, zarr_format: int | None = None) -> None:
        """Write an exact copy (arrays, chunks, codecs, attributes) to a directory store or,
        when `path` ends in `.zip`, to a zip file; an existing store at `path` is replaced.
        `zarr_format=2` writes a zarr v2 store that Diffusion Policy's zarr 2 can read (and 3
        a v3 one): a change of format recompresses with that format's Blosc-zstd codec."""
        if zarr_format not in (None, 2, 3):
            raise ValueError(f"zarr_format must be None, 2 or 3; got {zarr_format!r}")
        path = Path(path)
        if self._path is not None and path.resolve() == self._path.resolve():
            raise ValueError(f"cannot save a replay buffer onto its own store {path}")
        _check_replaceable(path)
        store = ZipStore(path, mode="w") if _is_zip(path) else LocalStore(path)
        source_format = self._root.metadata.zarr_format
        target_format = source_format if zarr_format is None else zarr_format
        root = zarr.open_group(
            store,
            mode="w",
            zarr_format=target_format,
            attributes=dict(self.attrs),
        )
        _copy_tree(self._root, root, recompress=target_format != source_format)
        store.close()

    def close(self) -> None:
        """Finish with the store: write a zip opened for writing, release a zip being read."""
        if self._zip_on_close is not None:
            self.save(self._zip_on_close)
            self._zip_on_close = None
        self._root.store.close()

    def __enter__(self) -> ReplayBuffer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------- reading

    @property
    def episode_ends(self) -> np.ndarray:
        """(n_episodes,) int64 cumulative step counts: episode i ends before row episode_ends[i]."""
        return self._root[EPISODE_ENDS][:]

    @property
    def episode_lengths(self) -> np.ndarray:
        """(n_episodes,) int64 number of steps of each episode."""
        return np.diff(self.episode_ends, prepend=0)

    @property
    def n_episodes(self) -> int:
        """Number of stored episodes."""
        return int(self._root[EPISODE_ENDS].shape[0])

    @property
    def n_steps(self) -> int:
        """Total number of time steps over all episodes (N, the length of every data array)."""
        ends = self._root[EPISODE_ENDS]
        return int(ends[-1]) if ends.shape[0] else 0

    @property
    def attrs(self) -> MutableMapping[str, Any]:
        """Root attributes (JSON values), persisted with the store: dataset metadata."""
        return self._root.attrs

    def keys(self) -> list[str]:
        """Names of the per-step data arrays, sorted."""
        return sorted(self._data.array_keys())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __getitem__(self, key: str) -> zarr.Array:
        """The whole (N, ...) zarr array of one data key (slice it to read numpy)."""
        if key not in self:
            raise KeyError(f"replay buffer has no data key {key!r}; available: {self.keys()}")
        return self._data[key]

    def get_episode(self, index: int) -> dict[str, np.ndarray]:
        """All data arrays of episode `index` (negative counts from the end), each (T, ...)."""
        ends = self.episode_ends
        if not -len(ends) <= index < len(ends):
            raise IndexError(f"episode {index} out of range for {len(ends)} episodes")
        index %= len(ends)
        start = int(ends[index - 1]) if index > 0 else 0
        return {key: self._data[key][start : int(ends[index])] for key in self.keys()}

    def __repr__(self) -> str:
        where = self._path or self._zip_on_close or "memory"
        return (
            f"ReplayBuffer({where}, n_episodes={self.n_episodes}, n_steps={self.n_steps}, "
            f"keys={self.keys()})"
        )

    # ---------------------------------------------------------------------------------- writing

    def add_episode(self, episode: Mapping[str, np.ndarray]) -> None:
        """Append one episode: a (T, ...) array per key, T equal for all keys.

        The first episode fixes the keys, per-step shapes and dtypes; later episodes must match
        them exactly (arrays are stored as given, never cast). Nothing is written on error.
        """
        if self._root.read_only:
            raise PermissionError("replay buffer is read-only; open it with mode 'a' or 'w'")
        arrays, n_steps = _check_episode(episode)
        existing = self.keys()
        if existing:
            missing = sorted(set(existing) - set(arrays))
            unexpected = sorted(set(arrays) - set(existing))
            if missing or unexpected:
                raise KeyError(
                    f"episode keys must match the buffer's {existing}; "
                    f"missing {missing}, unexpected {unexpected}"
                )
            for key, arr in arrays.items():
                stored = self._data[key]
                if arr.shape[1:] != stored.shape[1:]:
                    raise ValueError(
                        f"{key!r}: per-step shape {arr.shape[1:]} differs from the stored "
                        f"{stored.shape[1:]}"
                    )
                if arr.dtype != stored.dtype:
                    raise TypeError(
                        f"{key!r}: dtype {arr.dtype} differs from the stored {stored.dtype} "
                        "(cast it before adding)"
                    )
        elif self.n_episodes:
            raise ValueError("buffer has episodes but no data arrays; the store is inconsistent")

        for key, arr in arrays.items():
            if key not in existing:
                self._data.create_array(
                    key,
                    shape=(0, *arr.shape[1:]),
                    dtype=arr.dtype,
                    chunks=_time_chunk(arr.shape[1:], arr.dtype),
                    compressors=DEFAULT_COMPRESSOR,
                )
            self._data[key].append(arr)
        self._root[EPISODE_ENDS].append(np.array([self.n_steps + n_steps], dtype=np.int64))

    @property
    def _data(self) -> zarr.Group:
        return self._root[DATA_GROUP]
