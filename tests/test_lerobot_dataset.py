"""LeRobot dataset folders -> zarr replay buffer (policy.data.lerobot_dataset and its script).

The fixtures in tests/fixtures/lerobot_dataset_pusht/ were written by LeRobot's own
`LeRobotDataset` (0.6.1: v3.0, one session and a resumed one; 0.3.3: v2.1); reference.npz
holds the arrays given to `add_frame` (README.md there says how they were made).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import run_repo_script

from policy.data import EpisodeSplit, ReplayBuffer, SequenceDataset
from policy.data.lerobot_dataset import (
    check_not_lerobot_dataset,
    default_key,
    is_lerobot_dataset,
    lerobot_to_replay_buffer,
)

pytest.importorskip("pyarrow")

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE = REPO_ROOT / "tests" / "fixtures" / "lerobot_dataset_pusht"
VERSIONS = ("v3.0", "v3.0_resumed", "v2.1")
FEATURES = ("observation.state", "observation.environment_state", "action")
SCRIPT = REPO_ROOT / "scripts" / "convert_lerobot_dataset.py"


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    """The arrays given to LeRobot's add_frame, concatenated, and the episode lengths."""
    with np.load(FIXTURE / "reference.npz") as data:
        return dict(data)


def copy_dataset(tmp_path: Path, version: str = "v3.0") -> Path:
    """A writable copy of one fixture dataset."""
    return Path(shutil.copytree(FIXTURE / version, tmp_path / version))


def edit_info(root: Path, **changes: object) -> None:
    """Rewrite meta/info.json with top-level `changes` (features is merged, not replaced)."""
    path = root / "meta" / "info.json"
    info = json.loads(path.read_text())
    for key, value in changes.items():
        if key == "features":
            info["features"].update(value)
        else:
            info[key] = value
    path.write_text(json.dumps(info, indent=4))


def check_against_reference(buffer: ReplayBuffer, reference: dict[str, np.ndarray]) -> None:
    np.testing.assert_array_equal(buffer.episode_lengths, reference["episode_lengths"])
    assert buffer.keys() == ["action", "environment_state", "state"]
    for feature in FEATURES:
        values = buffer[default_key(feature)][:]
        assert values.dtype == np.float32
        np.testing.assert_array_equal(values, reference[feature])  # bit for bit


# ------------------------------------------------------------------------------ conversion
@pytest.mark.parametrize("version", VERSIONS)
def test_converter_reproduces_what_lerobot_was_given(version: str, reference) -> None:
    buffer = lerobot_to_replay_buffer(FIXTURE / version)
    check_against_reference(buffer, reference)
    source = buffer.attrs["source"]
    assert source["format"] == "lerobot"
    assert source["codebase_version"] == version.split("_")[0]
    assert source["fps"] == 10 and source["robot_type"] == "pusht"
    assert source["keys"] == {"observation.state": "state",
                              "observation.environment_state": "environment_state",
                              "action": "action"}
    assert source["skipped_features"] == [] and source["episode_index"] == [0, 1, 2]


def test_resumed_dataset_spans_two_data_files() -> None:
    files = sorted(p.name for p in (FIXTURE / "v3.0_resumed" / "data").glob("*/*.parquet"))
    assert files == ["file-000.parquet", "file-001.parquet"]


def test_default_key_names() -> None:
    assert default_key("observation.state") == "state"
    assert default_key("observation.environment_state") == "environment_state"
    assert default_key("observation.images.top") == "images_top"
    assert default_key("action") == "action"
    assert default_key("next.reward") == "next_reward"


def test_keys_select_and_rename_features(reference) -> None:
    buffer = lerobot_to_replay_buffer(
        FIXTURE / "v3.0", keys={"observation.environment_state": "keypoint", "action": "act",
                                "frame_index": "frame"})
    assert buffer.keys() == ["act", "frame", "keypoint"]
    np.testing.assert_array_equal(buffer["keypoint"][:], reference["observation.environment_state"])
    np.testing.assert_array_equal(buffer["act"][:], reference["action"])
    frames = np.concatenate([np.arange(n) for n in reference["episode_lengths"]])
    np.testing.assert_array_equal(buffer["frame"][:], frames[:, None].astype(np.float32))
    assert buffer.attrs["source"]["skipped_features"] == ["observation.state"]


def test_rows_are_ordered_by_episode_and_frame_whatever_the_file_order(tmp_path, reference):
    import pyarrow.parquet as pq

    root = copy_dataset(tmp_path, "v2.1")
    data = root / "data" / "chunk-000"
    for path in data.glob("*.parquet"):  # reverse each episode's rows, swap two file names
        table = pq.read_table(path)
        pq.write_table(table.take(np.arange(table.num_rows)[::-1]), path)
    (data / "episode_000000.parquet").rename(data / "tmp.parquet")
    (data / "episode_000002.parquet").rename(data / "episode_000000.parquet")
    (data / "tmp.parquet").rename(data / "episode_000002.parquet")
    check_against_reference(lerobot_to_replay_buffer(root), reference)


def test_saved_buffer_gives_training_windows(tmp_path: Path, reference) -> None:
    path = tmp_path / "pusht_lerobot.zarr.zip"
    lerobot_to_replay_buffer(FIXTURE / "v3.0").save(path)
    check_against_reference(ReplayBuffer.load(path), reference)
    windows = SequenceDataset(path, obs_keys=["environment_state", "state"], horizon=4,
                              n_obs_steps=2, n_action_steps=2,
                              episode_split=EpisodeSplit(val_ratio=0.0))
    lengths = reference["episode_lengths"]
    assert len(windows) == int((lengths - 4 + 1 + 1 + 1).sum())
    assert (windows.obs_dim, windows.action_dim) == (18, 2)
    obs = np.concatenate([reference["observation.environment_state"],
                          reference["observation.state"]], axis=1)
    first, second = windows[0], windows[1]
    assert first["obs"].shape == (2, 18) and first["action"].shape == (4, 2)
    # The first window starts one step before episode 0: that step repeats frame 0.
    np.testing.assert_array_equal(first["obs"].numpy(), obs[[0, 0]])
    np.testing.assert_array_equal(first["action"].numpy(), reference["action"][[0, 0, 1, 2]])
    np.testing.assert_array_equal(second["obs"].numpy(), obs[[0, 1]])
    # Episode 1's first window: rows 7.. of the concatenation, never episode 0's last frame.
    start = lengths[0] - 4 + 3
    np.testing.assert_array_equal(windows[int(start)]["obs"].numpy(), obs[[7, 7]])


# ---------------------------------------------------------------------------------- errors
def test_missing_feature_is_named_with_the_available_ones() -> None:
    with pytest.raises(ValueError, match=r"'observation\.pose' is not in the dataset") as err:
        lerobot_to_replay_buffer(FIXTURE / "v3.0", keys={"observation.pose": "pose"})
    for feature in FEATURES:
        assert feature in str(err.value)


@pytest.mark.parametrize(("dtype", "message"), [
    ("video", "'observation.image' is a video feature but info.json has no video_path"),
    ("image", r"'observation.image' \(image\) is in info.json but not a column of "
              r"data/chunk-000/file-000.parquet"),
])
def test_cameras_declared_without_frames_are_named(tmp_path, reference, dtype, message) -> None:
    """Cameras convert by default (tests/test_lerobot_cameras.py); one that info.json declares
    but the dataset does not hold is one line, and --key can leave it out."""
    root = copy_dataset(tmp_path)
    edit_info(root, features={"observation.image": {
        "dtype": dtype, "shape": [96, 96, 3], "names": ["height", "width", "channels"]}})
    with pytest.raises(ValueError, match=message) as err:
        lerobot_to_replay_buffer(root)
    assert "\n" not in str(err.value)
    buffer = lerobot_to_replay_buffer(root, keys={feature: default_key(feature)
                                                  for feature in FEATURES})
    check_against_reference(buffer, reference)
    assert buffer.attrs["source"]["skipped_features"] == ["observation.image"]


@pytest.mark.parametrize("version", ["v2.0", "v3.1", None])
def test_unsupported_codebase_version_is_named(tmp_path: Path, version: str | None) -> None:
    root = copy_dataset(tmp_path)
    edit_info(root, codebase_version=version)
    with pytest.raises(ValueError, match=f"codebase_version {version!r} is not supported"):
        lerobot_to_replay_buffer(root)


def test_v1_layout_is_recognised_and_refused(tmp_path: Path) -> None:
    (tmp_path / "meta_data").mkdir()
    (tmp_path / "meta_data" / "info.json").write_text('{"codebase_version": "v1.6", "fps": 10}')
    assert is_lerobot_dataset(tmp_path)
    with pytest.raises(ValueError, match="codebase_version 'v1.6' is not supported"):
        lerobot_to_replay_buffer(tmp_path)


def test_not_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lerobot_to_replay_buffer(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"not a LeRobot dataset folder: no meta/info\.json"):
        lerobot_to_replay_buffer(tmp_path)


def test_missing_data_file_is_caught(tmp_path: Path) -> None:
    root = copy_dataset(tmp_path, "v2.1")
    (root / "data" / "chunk-000" / "episode_000001.parquet").unlink()
    with pytest.raises(ValueError, match="total_frames=28 but the data files hold 16"):
        lerobot_to_replay_buffer(root)


def test_duplicated_data_file_is_caught(tmp_path: Path) -> None:
    root = copy_dataset(tmp_path, "v3.0_resumed")
    data = root / "data" / "chunk-000"
    shutil.copy(data / "file-001.parquet", data / "file-002.parquet")
    with pytest.raises(ValueError, match="episode 2 has frame_index 0 where 1 was expected"):
        lerobot_to_replay_buffer(root)


def test_episode_metadata_must_match_the_data(tmp_path: Path) -> None:
    root = copy_dataset(tmp_path, "v2.1")
    path = root / "meta" / "episodes.jsonl"
    path.write_text(path.read_text().replace('"length": 12', '"length": 11'))
    with pytest.raises(ValueError, match="differ from the episode metadata"):
        lerobot_to_replay_buffer(root)


def test_bad_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="same buffer key"):
        lerobot_to_replay_buffer(FIXTURE / "v3.0", keys={"action": "x", "observation.state": "x"})
    with pytest.raises(ValueError, match="bad buffer key names"):
        lerobot_to_replay_buffer(FIXTURE / "v3.0", keys={"action": "a/b"})
    with pytest.raises(ValueError, match="at least one"):
        lerobot_to_replay_buffer(FIXTURE / "v3.0", keys={})


# ----------------------------------------------------------------- training-path detection
def test_training_path_check_says_how_to_convert(tmp_path: Path) -> None:
    assert is_lerobot_dataset(FIXTURE / "v3.0") and not is_lerobot_dataset(FIXTURE)
    with pytest.raises(ValueError) as err:
        check_not_lerobot_dataset(FIXTURE / "v3.0")
    message = str(err.value)
    assert "\n" not in message and "LeRobot dataset folder (codebase_version v3.0)" in message
    assert "scripts/convert_lerobot_dataset.py" in message
    check_not_lerobot_dataset(tmp_path)  # anything else: nothing to say
    check_not_lerobot_dataset(tmp_path / "nowhere")


def test_sequence_dataset_refuses_a_lerobot_folder() -> None:
    with pytest.raises(ValueError, match="convert_lerobot_dataset.py"):
        SequenceDataset(FIXTURE / "v3.0", obs_keys=["state"])


# ------------------------------------------------------------------------------ the script
def run_script(*args: str | Path) -> subprocess.CompletedProcess:
    """scripts/convert_lerobot_dataset.py as a user runs it, from the repo root."""
    return run_repo_script(SCRIPT, *args, timeout=120)


@pytest.mark.slow
def test_script_end_to_end(tmp_path: Path, reference) -> None:
    out = tmp_path / "out" / "pusht.zarr.zip"
    done = run_script(FIXTURE / "v3.0_resumed", out)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote {out}: 3 episodes, 28 steps")
    assert "environment_state (16,)" in done.stdout
    check_against_reference(ReplayBuffer.load(out), reference)
    # Refusals are one line on stderr: a bad source, an existing output.
    for args, expected in [((tmp_path / "nowhere", tmp_path / "x.zarr.zip"), "does not exist"),
                           ((FIXTURE / "v3.0", out), "exists; pass --overwrite")]:
        done = run_script(*args)
        assert done.returncode != 0 and expected in done.stderr
        assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
