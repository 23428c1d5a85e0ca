"""LeRobot datasets with cameras -> zarr replay buffer: image features (PNG frames in the parquet
files) and video features (mp4 files decoded with PyAV), as uint8 (N, H, W, 3) arrays that the
image SequenceDataset reads.

No LeRobot dataset with cameras ships in the repository or in ../shared/fixtures, so
`add_cameras` adds two cameras to a copy of tests/fixtures/lerobot_dataset_pusht (written by
LeRobot 0.6.1 / 0.3.3 themselves), step for step as LeRobot 0.6.1's writer does
(`lerobot/datasets/dataset_writer.py`, `feature_utils.py`, `io_utils.py`, `video_utils.py`,
`configs/video.py`):

- info.json: `observation.image` {"dtype": "image", "shape": [H, W, 3], "names": ["height",
  "width", "channels"]} and `observation.images.top` {"dtype": "video", ..., "info":
  {"video.height", "video.width", "video.codec": "av1", "video.pix_fmt": "yuv420p",
  "video.is_depth_map": false, "video.fps", "video.channels": 3, "has_audio": false}} after the
  low-dim observations (LeRobot keeps the user's feature order, bookkeeping features last);
  `video_path` = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4" (v3.0)
  or "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4" (v2.1).
- image feature: a parquet column of Hugging Face `Image()` structs {bytes: binary, path:
  string}, `bytes` the PNG LeRobot's `write_image` saves (Pillow, compress_level 6 for image
  features), `path` its file name `frame-NNNNNN.png` (`embed_table_storage` keeps the name), the
  `huggingface` schema metadata typing it {"_type": "Image"}; written one row group per episode
  (`write_table_one_row_group_per_episode`, snappy, dictionary encoding).
- video feature: per episode, `encode_video_frames` (PNG frames with compress_level 1, opened
  with Pillow, `.convert("RGB")`, `av.VideoFrame.from_image`, stream libsvtav1 at fps with
  options g=2, crf=30, preset=12, pix_fmt yuv420p); v3.0 appends each episode to the camera's
  file-000.mp4 with `concatenate_video_files` (PyAV's concat demuxer, packets remuxed without
  re-encoding) and records `videos/<key>/{chunk_index, file_index, from_timestamp,
  to_timestamp}` in the episode metadata, from_timestamp = the previous episode's
  to_timestamp, to_timestamp = from_timestamp + `get_video_duration_in_s` of the episode's own
  video; v2.1 keeps one video per episode.

Camera statistics (meta/stats.json, the episode metadata's stats/<camera>/*) are not added:
the converter does not read statistics.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import run_repo_script

from policy.data import EpisodeSplit, ReplayBuffer, SequenceDataset
from policy.data.lerobot_dataset import lerobot_to_replay_buffer

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
av = pytest.importorskip("av")
Image = pytest.importorskip("PIL.Image")

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE = REPO_ROOT / "tests" / "fixtures" / "lerobot_dataset_pusht"
SCRIPT = REPO_ROOT / "scripts" / "convert_lerobot_dataset.py"
FPS = 10
IMAGE = "observation.image"
VIDEO = "observation.images.top"
IMAGE_HW = (24, 32)  # not square: H and W cannot be swapped unnoticed
VIDEO_HW = (32, 48)
V3_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
V21_VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"


def frames(n_rows: int, height: int, width: int, seed: int) -> np.ndarray:
    """(n_rows, H, W, 3) uint8 test frames: smooth gradients (a video codec keeps them) with a
    bright square that moves and a blue level that changes from row to row, so every frame is
    told apart from its neighbours even after lossy coding."""
    y, x = np.mgrid[0:height, 0:width]
    out = np.empty((n_rows, height, width, 3), np.uint8)
    for row in range(n_rows):
        top = (3 * row + seed) % (height - 8)
        left = (5 * row + seed) % (width - 8)
        image = np.stack([x * 200 // (width - 1), y * 200 // (height - 1),
                          np.full_like(x, 20 + (37 * row + seed) % 200)], -1)
        image[top : top + 8, left : left + 8] = 250
        out[row] = image
    return out


def png(image: np.ndarray, compress_level: int) -> bytes:
    """The file LeRobot's write_image saves for `image` (Pillow PNG)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def encode_video_frames(images: np.ndarray, path: Path) -> None:
    """LeRobot 0.6.1's encode_video_frames with rgb_encoder_defaults(), from staged PNGs."""
    height, width = images.shape[1:3]
    with av.open(str(path), "w") as output:
        stream = output.add_stream("libsvtav1", FPS,
                                   options={"g": "2", "crf": "30", "preset": "12"})
        stream.pix_fmt = "yuv420p"
        stream.width, stream.height = width, height
        for image in images:
            with Image.open(io.BytesIO(png(image, compress_level=1))) as staged:
                packet = stream.encode(av.VideoFrame.from_image(staged.convert("RGB")))
                if packet:
                    output.mux(packet)
        packet = stream.encode()
        if packet:
            output.mux(packet)


def concatenate_video_files(inputs: list[Path], output_path: Path) -> None:
    """LeRobot 0.6.1's concatenate_video_files: the concat demuxer, packets remuxed."""
    with tempfile.NamedTemporaryFile("w", suffix=".ffconcat", delete=False) as listing:
        listing.write("ffconcat version 1.0\n")
        for path in inputs:
            listing.write(f"file '{path.resolve()}'\n")
    source = av.open(listing.name, mode="r", format="concat", options={"safe": "0"})
    tmp = output_path.with_suffix(".tmp.mp4")
    target = av.open(str(tmp), mode="w", options={"movflags": "faststart"})
    streams = {}
    for stream in source.streams:
        if stream.type == "video":
            streams[stream.index] = target.add_stream_from_template(template=stream,
                                                                    opaque=True)
            streams[stream.index].time_base = stream.time_base
    for packet in source.demux():
        if packet.stream.index not in streams or packet.dts is None:
            continue
        packet.stream = streams[packet.stream.index]
        target.mux(packet)
    source.close()
    target.close()
    shutil.move(tmp, output_path)
    Path(listing.name).unlink()


def video_duration_s(path: Path) -> float:
    """LeRobot 0.6.1's get_video_duration_in_s."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if stream.duration is not None:
            return float(stream.duration * stream.time_base)
        return float(container.duration / av.time_base)


def write_one_row_group_per_episode(table, path: Path) -> None:
    """LeRobot 0.6.1's write_table_one_row_group_per_episode."""
    episode = table.column("episode_index").to_numpy()
    starts = np.concatenate(([0], np.nonzero(np.diff(episode))[0] + 1))
    writer = pq.ParquetWriter(str(path), table.schema, compression="snappy",
                              use_dictionary=True)
    for start, stop in zip(starts, np.append(starts[1:], len(episode)), strict=True):
        writer.write_table(table.slice(start, stop - start))
    writer.close()


def video_feature(height: int, width: int) -> dict:
    """info.json's entry of an RGB video feature after LeRobot's update_video_info."""
    return {"dtype": "video", "shape": [height, width, 3],
            "names": ["height", "width", "channels"],
            "info": {"video.height": height, "video.width": width, "video.codec": "av1",
                     "video.pix_fmt": "yuv420p", "video.is_depth_map": False,
                     "video.fps": FPS, "video.channels": 3, "has_audio": False}}


def add_cameras(root: Path, image: bool = True, video: bool = True) -> dict[str, np.ndarray]:
    """Add the cameras of the module doc to the LeRobot dataset folder `root` (a copy of a
    fixture); return the frames given to LeRobot ({feature: (N, H, W, 3)}, rows in episode /
    frame order)."""
    info_path = root / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    version = info["codebase_version"]
    data_files = sorted((root / "data").glob("chunk-*/*.parquet"))
    tables = [pq.read_table(path) for path in data_files]
    n_rows = sum(t.num_rows for t in tables)
    given = {}
    features = {}
    for name in info["features"]:  # the cameras after the low-dim observations
        features[name] = info["features"][name]
        if name == "observation.environment_state":
            if image:
                features[IMAGE] = {"dtype": "image", "shape": [*IMAGE_HW, 3],
                                   "names": ["height", "width", "channels"]}
            if video:
                features[VIDEO] = video_feature(*VIDEO_HW)
    info["features"] = features
    if image:
        given[IMAGE] = frames(n_rows, *IMAGE_HW, seed=1)
        for path, table in zip(data_files, tables, strict=True):
            rows = table.column("index").to_numpy()
            column = pa.StructArray.from_arrays(
                [pa.array([png(given[IMAGE][r], compress_level=6) for r in rows], pa.binary()),
                 pa.array([f"frame-{f:06d}.png" for f in table.column("frame_index")
                           .to_pylist()], pa.string())],
                names=["bytes", "path"])
            position = table.schema.get_field_index("observation.environment_state") + 1
            hf = json.loads(table.schema.metadata[b"huggingface"])
            hf_features = list(hf["info"]["features"].items())
            hf_features.insert(position, (IMAGE, {"_type": "Image"}))
            hf["info"]["features"] = dict(hf_features)
            table = table.add_column(position, IMAGE, column)
            table = table.replace_schema_metadata({b"huggingface": json.dumps(hf).encode()})
            write_one_row_group_per_episode(table, path)
    if video:
        given[VIDEO] = frames(n_rows, *VIDEO_HW, seed=2)
        data = pa.concat_tables(pq.read_table(p, columns=["index", "episode_index"])
                                for p in data_files)
        episodes = data.column("episode_index").to_numpy()
        rows = data.column("index").to_numpy()
        staging = root / "staging"
        staging.mkdir()
        if version == "v2.1":  # one video per episode
            for ep in np.unique(episodes).tolist():
                target = root / V21_VIDEO_PATH.format(episode_chunk=0, video_key=VIDEO,
                                                      episode_index=ep)
                target.parent.mkdir(parents=True, exist_ok=True)
                encode_video_frames(given[VIDEO][np.sort(rows[episodes == ep])], target)
        file_index = -1
        for meta in sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet")):
            # one recording session per episode metadata file: a resumed session starts a new
            # video file (LeRobot: no latest episode -> the last one's file_index + 1)
            table = pq.read_table(meta)
            file_index += 1
            target = root / V3_VIDEO_PATH.format(video_key=VIDEO, chunk_index=0,
                                                 file_index=file_index)
            records = []
            for ep in table.column("episode_index").to_pylist():
                ep_path = staging / f"{VIDEO}_{ep:03d}.mp4"
                encode_video_frames(given[VIDEO][np.sort(rows[episodes == ep])], ep_path)
                duration = video_duration_s(ep_path)
                start = records[-1][3] if records else 0.0
                if records:
                    concatenate_video_files([target, ep_path], target)
                    ep_path.unlink()
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(ep_path, target)
                records.append((0, file_index, start, start + duration))
            for i, (column, kind) in enumerate((("chunk_index", pa.int64()),
                                                ("file_index", pa.int64()),
                                                ("from_timestamp", pa.float64()),
                                                ("to_timestamp", pa.float64()))):
                table = table.append_column(f"videos/{VIDEO}/{column}",
                                            pa.array([r[i] for r in records], kind))
            pq.write_table(table, meta)
        shutil.rmtree(staging)
        info["video_path"] = V21_VIDEO_PATH if version == "v2.1" else V3_VIDEO_PATH
    info_path.write_text(json.dumps(info, indent=4))
    return given


@pytest.fixture(scope="module")
def camera_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The v3.0 fixture (resumed session: two data files) with both cameras, built once."""
    root = Path(shutil.copytree(FIXTURE / "v3.0_resumed",
                                tmp_path_factory.mktemp("lerobot_cameras") / "v3.0"))
    return root, add_cameras(root)


@pytest.fixture(scope="module")
def converted(camera_dataset) -> ReplayBuffer:
    return lerobot_to_replay_buffer(camera_dataset[0])


def decode_as_lerobot(root: Path, episode: int, frame: int) -> np.ndarray:
    """The frame LeRobotDataset (pyav backend) returns for (episode, frame), by its own steps:
    the episode's video file, its from_timestamp + the row's timestamp, the closest frame."""
    meta = pa.concat_tables(pq.read_table(p) for p in sorted(
        (root / "meta" / "episodes").glob("chunk-*/file-*.parquet")))
    row = meta.column("episode_index").to_pylist().index(episode)
    start = meta.column(f"videos/{VIDEO}/from_timestamp")[row].as_py()
    file_index = meta.column(f"videos/{VIDEO}/file_index")[row].as_py()
    query = start + float(np.float32(frame / FPS))  # LeRobot stores timestamps as float32
    with av.open(str(root / V3_VIDEO_PATH.format(video_key=VIDEO, chunk_index=0,
                                                 file_index=file_index))) as container:
        stream = container.streams.video[0]
        decoded = [(float(f.pts * stream.time_base), f.to_ndarray(format="rgb24"))
                   for f in container.decode(stream)]
    times = np.array([t for t, _ in decoded])
    nearest = int(np.abs(times - query).argmin())
    assert abs(times[nearest] - query) < 1e-4
    return decoded[nearest][1]


# ------------------------------------------------------------------------------ conversion
def test_the_fixture_is_laid_out_as_lerobot_writes_it(camera_dataset) -> None:
    root, _ = camera_dataset
    info = json.loads((root / "meta" / "info.json").read_text())
    assert list(info["features"])[:5] == ["observation.state", "observation.environment_state",
                                          IMAGE, VIDEO, "action"]
    # two sessions (episodes 0-1, then 2 after resume()): two data files, two video files
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.mp4")) == [
        f"videos/{VIDEO}/chunk-000/file-000.mp4", f"videos/{VIDEO}/chunk-000/file-001.mp4"]
    schema = pq.read_schema(root / "data" / "chunk-000" / "file-000.parquet")
    assert schema.field(IMAGE).type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    assert VIDEO not in schema.names
    meta = pa.concat_tables(pq.read_table(p) for p in sorted(
        (root / "meta" / "episodes").glob("chunk-*/file-*.parquet")))
    files = meta.column(f"videos/{VIDEO}/file_index").to_pylist()
    starts = meta.column(f"videos/{VIDEO}/from_timestamp").to_pylist()
    ends = meta.column(f"videos/{VIDEO}/to_timestamp").to_pylist()
    lengths = meta.column("length").to_pylist()
    assert files == [0, 0, 1] and starts[0] == starts[2] == 0 and starts[1] == ends[0]
    assert np.allclose(np.array(ends) - starts, np.array(lengths) / FPS)


def test_image_features_convert_bit_for_bit(camera_dataset, converted) -> None:
    _, given = camera_dataset
    images = converted["image"][:]
    assert images.dtype == np.uint8 and images.shape == (28, *IMAGE_HW, 3)
    np.testing.assert_array_equal(images, given[IMAGE])  # PNG is lossless
    assert converted.attrs["source"]["keys"][IMAGE] == "image"


def test_video_features_decode_as_lerobot_does(camera_dataset, converted) -> None:
    root, given = camera_dataset
    video = converted["images_top"][:]
    assert video.dtype == np.uint8 and video.shape == (28, *VIDEO_HW, 3)
    lengths = converted.episode_lengths
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    for episode, frame in ((0, 0), (0, 6), (1, 0), (1, 11), (2, 4), (2, 8)):
        row = int(starts[episode]) + frame
        np.testing.assert_array_equal(video[row], decode_as_lerobot(root, episode, frame))
    # lossy, but each converted frame is closest to its own original: no frame is shifted
    error = np.abs(video.astype(int) - given[VIDEO].astype(int))
    assert error.mean() < 6
    distance = ((video[:, None].astype(float) - given[VIDEO][None].astype(float)) ** 2).mean(
        axis=(2, 3, 4))
    np.testing.assert_array_equal(distance.argmin(1), np.arange(len(video)))


def test_cameras_are_decoded_one_episode_at_a_time(camera_dataset, converted,
                                                  monkeypatch) -> None:
    """Conversion never holds more than one episode's raw frames: each camera is decoded per
    episode (a video sought to the episode's keyframe), and the result is the same buffer."""
    from policy.data import lerobot_dataset

    decoded: list[tuple[str, int]] = []
    for name in ("_image_values", "_video_episode"):
        original = getattr(lerobot_dataset, name)

        def counting(*args, _original=original, _name=name, **kwargs):
            frames = _original(*args, **kwargs)
            decoded.append((_name, len(frames)))
            return frames

        monkeypatch.setattr(lerobot_dataset, name, counting)
    buffer = lerobot_to_replay_buffer(camera_dataset[0])
    lengths = buffer.episode_lengths.tolist()
    assert [n for kind, n in decoded if kind == "_image_values"] == lengths
    assert [n for kind, n in decoded if kind == "_video_episode"] == lengths
    for key in converted:
        np.testing.assert_array_equal(buffer[key][:], converted[key][:])


def test_converted_cameras_give_image_training_windows(converted, tmp_path: Path) -> None:
    path = tmp_path / "cameras.zarr.zip"
    converted.save(path)
    windows = SequenceDataset(path, obs_keys={"image": "image", "top": "images_top",
                                              "agent_pos": "state"},
                              horizon=4, n_obs_steps=2, n_action_steps=2,
                              episode_split=EpisodeSplit(val_ratio=0.0),
                              image_shapes={"image": (*IMAGE_HW, 3), "top": (*VIDEO_HW, 3)})
    first = windows[1]["obs"]
    assert first["image"].dtype.is_floating_point is False
    assert tuple(first["image"].shape) == (2, *IMAGE_HW, 3)
    assert tuple(first["top"].shape) == (2, *VIDEO_HW, 3)
    np.testing.assert_array_equal(first["image"].numpy(), converted["image"][:2])


def test_keys_select_one_camera_and_channels_first_shapes_convert(camera_dataset,
                                                                  tmp_path: Path) -> None:
    root = Path(shutil.copytree(camera_dataset[0], tmp_path / "chw"))
    info = json.loads((root / "meta" / "info.json").read_text())
    info["features"][IMAGE].update(shape=[3, *IMAGE_HW], names=["channels", "height", "width"])
    (root / "meta" / "info.json").write_text(json.dumps(info))
    buffer = lerobot_to_replay_buffer(root, keys={IMAGE: "img", "action": "action"})
    assert buffer.keys() == ["action", "img"]
    np.testing.assert_array_equal(buffer["img"][:], camera_dataset[1][IMAGE])
    assert VIDEO in buffer.attrs["source"]["skipped_features"]


def test_v21_per_episode_videos_convert(tmp_path: Path) -> None:
    root = Path(shutil.copytree(FIXTURE / "v2.1", tmp_path / "v2.1"))
    given = add_cameras(root, image=False)
    assert len(list(root.glob(f"videos/chunk-000/{VIDEO}/episode_*.mp4"))) == 3
    video = lerobot_to_replay_buffer(root)["images_top"][:]
    distance = ((video[:, None].astype(float) - given[VIDEO][None].astype(float)) ** 2).mean(
        axis=(2, 3, 4))
    np.testing.assert_array_equal(distance.argmin(1), np.arange(len(video)))


# ---------------------------------------------------------------------------------- errors
def test_video_without_pyav_is_refused_in_one_line(camera_dataset, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "av", None)  # import av raises ImportError
    with pytest.raises(ValueError, match=rf"'{VIDEO}' is a video feature \(codec av1\): "
                       r"decoding it needs PyAV") as err:
        lerobot_to_replay_buffer(camera_dataset[0])
    assert "\n" not in str(err.value)
    buffer = lerobot_to_replay_buffer(camera_dataset[0], keys={IMAGE: "image"})  # no video
    assert buffer.keys() == ["image"]


def edited(camera_dataset, tmp_path: Path, feature: str, **changes) -> Path:
    root = Path(shutil.copytree(camera_dataset[0], tmp_path / "edited"))
    info = json.loads((root / "meta" / "info.json").read_text())
    info["features"][feature].update(changes)
    (root / "meta" / "info.json").write_text(json.dumps(info))
    return root


@pytest.mark.parametrize(("changes", "message"), [
    ({"shape": [*IMAGE_HW, 4]}, "has 4 channels"),
    ({"shape": [*IMAGE_HW]}, r"has shape \[24, 32\]; expected \[H, W, C\]"),
    ({"shape": [32, 24, 3]}, r"episode 0 frame 0 holds a \(24, 32, 3\) image but info.json "
                             r"says \[32, 24, 3\]"),
])
def test_bad_image_features_are_named(camera_dataset, tmp_path, changes, message) -> None:
    root = edited(camera_dataset, tmp_path, IMAGE, **changes)
    with pytest.raises(ValueError, match=f"'{IMAGE}'.*{message}"):
        lerobot_to_replay_buffer(root, keys={IMAGE: "image"})


def test_bad_video_features_are_named(camera_dataset, tmp_path: Path) -> None:
    root = edited(camera_dataset, tmp_path, VIDEO,
                  info={**video_feature(*VIDEO_HW)["info"], "video.is_depth_map": True})
    with pytest.raises(ValueError, match="is a depth-map video; only RGB cameras convert"):
        lerobot_to_replay_buffer(root)
    shutil.rmtree(root)
    root = edited(camera_dataset, tmp_path, VIDEO, shape=[48, 32, 3])
    with pytest.raises(ValueError, match=r"holds \(32, 48, 3\) frames but info.json says "
                                         r"\[48, 32, 3\]"):
        lerobot_to_replay_buffer(root, keys={VIDEO: "top"})
    shutil.rmtree(root)

    root = Path(shutil.copytree(camera_dataset[0], tmp_path / "shifted"))
    meta = root / "meta" / "episodes" / "chunk-000" / "file-000.parquet"  # episodes 0 and 1
    table = pq.read_table(meta)
    column = f"videos/{VIDEO}/from_timestamp"
    shifted = pa.array([t + 0.05 for t in table.column(column).to_pylist()], pa.float64())
    pq.write_table(table.set_column(table.schema.get_field_index(column), column, shifted), meta)
    with pytest.raises(ValueError, match=r"episode 0 needs a frame at 0\.0500 s of videos/"
                       rf"{VIDEO}/chunk-000/file-000\.mp4, but the closest video frame is "
                       r"0\.0500 s away"):
        lerobot_to_replay_buffer(root, keys={VIDEO: "top"})

    video = root / V3_VIDEO_PATH.format(video_key=VIDEO, chunk_index=0, file_index=0)
    video.write_bytes(b"not a video")
    with pytest.raises(ValueError, match="cannot decode videos/.*file-000.mp4 with PyAV"):
        lerobot_to_replay_buffer(root, keys={VIDEO: "top"})
    video.unlink()
    with pytest.raises(ValueError, match=r"video file videos/.*file-000.mp4 of episodes "
                                         r"\[0, 1\] is missing"):
        lerobot_to_replay_buffer(root, keys={VIDEO: "top"})


def test_a_broken_image_is_named(camera_dataset, tmp_path: Path) -> None:
    root = Path(shutil.copytree(camera_dataset[0], tmp_path / "broken"))
    path = root / "data" / "chunk-000" / "file-000.parquet"
    table = pq.read_table(path)
    column = table.column(IMAGE).combine_chunks()
    blobs = column.field("bytes").to_pylist()
    blobs[3] = b"not a png"
    broken = pa.StructArray.from_arrays([pa.array(blobs, pa.binary()), column.field("path")],
                                        names=["bytes", "path"])
    pq.write_table(table.set_column(table.schema.get_field_index(IMAGE), IMAGE, broken), path)
    with pytest.raises(ValueError, match=f"'{IMAGE}': episode 0 frame 3 is not a readable "
                                         "image"):
        lerobot_to_replay_buffer(root, keys={IMAGE: "image"})


def test_image_files_beside_the_parquet_are_read_inside_the_folder_only(camera_dataset,
                                                                        tmp_path: Path) -> None:
    """Images not embedded (bytes null): LeRobot's images/<key>/episode-NNNNNN/frame-NNNNNN.png
    path under the dataset folder is read; a path that leaves the folder is refused."""
    root = Path(shutil.copytree(camera_dataset[0], tmp_path / "files"))
    path = root / "data" / "chunk-000" / "file-000.parquet"
    table = pq.read_table(path)
    column = table.column(IMAGE).combine_chunks()
    blobs, names = column.field("bytes").to_pylist(), column.field("path").to_pylist()
    image_dir = root / "images" / IMAGE / "episode-000000"
    image_dir.mkdir(parents=True)
    (image_dir / names[0]).write_bytes(blobs[0])
    blobs[0] = None
    names[0] = f"images/{IMAGE}/episode-000000/{names[0]}"
    (tmp_path / "outside.png").write_bytes(blobs[1])

    def write(paths: list) -> None:
        array = pa.StructArray.from_arrays([pa.array(blobs, pa.binary()),
                                            pa.array(paths, pa.string())], names=["bytes", "path"])
        pq.write_table(table.set_column(table.schema.get_field_index(IMAGE), IMAGE, array), path)

    write(names)
    buffer = lerobot_to_replay_buffer(root, keys={IMAGE: "image"})
    np.testing.assert_array_equal(buffer["image"][:], camera_dataset[1][IMAGE])
    blobs[1] = None
    write([names[0], "../../outside.png", *names[2:]])
    with pytest.raises(ValueError, match=r"episode 0 frame 1 is not a readable image \(its path "
                                         r"'\.\./\.\./outside\.png' is outside the dataset"):
        lerobot_to_replay_buffer(root, keys={IMAGE: "image"})



@pytest.mark.parametrize(("video_path", "message"), [
    ("../outside/{video_key}/file-{file_index:03d}.mp4",
     r"video_path gives '\.\./outside/.*', outside the dataset folder"),
    ("videos/{camera}/file-{file_index:03d}.mp4", r"video_path .* is not a LeRobot path template"),
])
def test_video_paths_stay_inside_the_folder(camera_dataset, tmp_path: Path, video_path: str,
                                            message: str) -> None:
    """info.json's video_path, like an image's path, is read inside the dataset folder only;
    a template LeRobot would not write is one line, not a KeyError."""
    root = Path(shutil.copytree(camera_dataset[0], tmp_path / "escaping"))
    info = json.loads((root / "meta" / "info.json").read_text())
    info["video_path"] = video_path
    (root / "meta" / "info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=f"'{VIDEO}': info.json's {message}"):
        lerobot_to_replay_buffer(root, keys={VIDEO: "top"})


# ------------------------------------------------------------------------------ the script
@pytest.mark.slow
def test_script_converts_cameras(camera_dataset, tmp_path: Path) -> None:
    out = tmp_path / "cameras.zarr.zip"
    done = run_repo_script(SCRIPT, camera_dataset[0], out, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "image (24, 32, 3) uint8" in done.stdout
    assert "images_top (32, 48, 3) uint8" in done.stdout
    assert "state (2,) float32" in done.stdout
    np.testing.assert_array_equal(ReplayBuffer.load(out)["image"][:], camera_dataset[1][IMAGE])
