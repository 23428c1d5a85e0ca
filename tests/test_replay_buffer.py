"""ReplayBuffer: DP layout, exact round trips through every store kind, appends and errors."""

from pathlib import Path

import numpy as np
import pytest

from policy.data import ReplayBuffer


def make_episode(n_steps: int, seed: int, with_images: bool = False) -> dict[str, np.ndarray]:
    """A PushT-shaped episode of random data."""
    rng = np.random.default_rng(seed)
    episode = {
        "state": rng.normal(size=(n_steps, 5)).astype(np.float32),
        "keypoint": rng.normal(size=(n_steps, 9, 2)).astype(np.float32),
        "action": rng.normal(size=(n_steps, 2)).astype(np.float32),
    }
    if with_images:
        episode["img"] = rng.integers(0, 256, size=(n_steps, 96, 96, 3), dtype=np.uint8)
    return episode


def assert_same_buffer(actual: ReplayBuffer, expected: ReplayBuffer) -> None:
    assert actual.keys() == expected.keys()
    np.testing.assert_array_equal(actual.episode_ends, expected.episode_ends)
    for key in expected:
        assert actual[key].dtype == expected[key].dtype
        assert actual[key].chunks == expected[key].chunks
        np.testing.assert_array_equal(actual[key][:], expected[key][:])
    assert dict(actual.attrs) == dict(expected.attrs)


@pytest.fixture
def buffer() -> ReplayBuffer:
    buffer = ReplayBuffer.create_empty()
    for seed, n_steps in enumerate((5, 12, 7)):
        buffer.add_episode(make_episode(n_steps, seed, with_images=True))
    buffer.attrs["expert"] = {"success_rate": 0.96, "seeds": [0, 1, 2]}
    return buffer


def test_layout_counts_and_episodes(buffer: ReplayBuffer) -> None:
    assert buffer.n_episodes == 3
    assert buffer.n_steps == 24
    assert buffer.episode_ends.dtype == np.int64
    np.testing.assert_array_equal(buffer.episode_ends, [5, 17, 24])
    np.testing.assert_array_equal(buffer.episode_lengths, [5, 12, 7])
    assert buffer.keys() == ["action", "img", "keypoint", "state"]
    assert buffer["keypoint"].shape == (24, 9, 2)
    assert buffer["img"].dtype == np.uint8
    second = buffer.get_episode(1)
    np.testing.assert_array_equal(second["state"], make_episode(12, 1)["state"])
    np.testing.assert_array_equal(buffer.get_episode(-1)["action"], make_episode(7, 2)["action"])
    with pytest.raises(IndexError):
        buffer.get_episode(3)


def test_empty_buffer() -> None:
    buffer = ReplayBuffer.create_empty()
    assert (buffer.n_episodes, buffer.n_steps, buffer.keys()) == (0, 0, [])
    assert buffer.episode_lengths.shape == (0,)


@pytest.mark.parametrize("suffix", [".zarr", ".zarr.zip"])
def test_save_and_load_round_trip_is_exact(
    buffer: ReplayBuffer, tmp_path: Path, suffix: str
) -> None:
    path = tmp_path / f"demos{suffix}"
    buffer.save(path)
    assert_same_buffer(ReplayBuffer.load(path), buffer)
    with ReplayBuffer.open(path, mode="r") as on_disk:
        assert_same_buffer(on_disk, buffer)
    assert_same_buffer(ReplayBuffer.load(path, in_memory=False), buffer)


@pytest.mark.parametrize("suffix", [".zarr", ".zarr.zip"])
def test_open_for_writing_appends_and_persists_attrs(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"demos{suffix}"
    with ReplayBuffer.open(path, mode="w") as written:
        written.add_episode(make_episode(4, seed=0))
        written.attrs["note"] = "first"
    with ReplayBuffer.open(path, mode="a") as appended:
        assert appended.n_episodes == 1
        appended.add_episode(make_episode(6, seed=1))
        appended.attrs["note"] = "second"
    reread = ReplayBuffer.load(path)
    np.testing.assert_array_equal(reread.episode_ends, [4, 10])
    np.testing.assert_array_equal(reread.get_episode(1)["keypoint"], make_episode(6, 1)["keypoint"])
    assert reread.attrs["note"] == "second"
    with ReplayBuffer.open(path, mode="w") as replaced:
        assert replaced.n_episodes == 0


def test_read_only_buffer_refuses_writes(buffer: ReplayBuffer, tmp_path: Path) -> None:
    buffer.save(tmp_path / "demos.zarr")
    with (
        ReplayBuffer.open(tmp_path / "demos.zarr", mode="r") as read_only,
        pytest.raises(PermissionError),
    ):
        read_only.add_episode(make_episode(3, seed=0, with_images=True))


def test_open_missing_path_and_save_onto_itself(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ReplayBuffer.open(tmp_path / "absent.zarr", mode="r")
    with ReplayBuffer.open(tmp_path / "demos.zarr", mode="w") as buffer:
        buffer.add_episode(make_episode(3, seed=0))
        with pytest.raises(ValueError, match="its own store"):
            buffer.save(tmp_path / "demos.zarr")


def test_inconsistent_episodes_are_rejected_without_writing(buffer: ReplayBuffer) -> None:
    ragged = make_episode(5, seed=9, with_images=True)
    ragged["action"] = ragged["action"][:4]
    with pytest.raises(ValueError, match="same length"):
        buffer.add_episode(ragged)
    without_images = make_episode(5, seed=9)
    with pytest.raises(KeyError, match="missing \\['img'\\]"):
        buffer.add_episode(without_images)
    wrong_dtype = make_episode(5, seed=9, with_images=True)
    wrong_dtype["state"] = wrong_dtype["state"].astype(np.float64)
    with pytest.raises(TypeError, match="'state': dtype float64"):
        buffer.add_episode(wrong_dtype)
    wrong_shape = make_episode(5, seed=9, with_images=True)
    wrong_shape["keypoint"] = wrong_shape["keypoint"][:, :8]
    with pytest.raises(ValueError, match="per-step shape"):
        buffer.add_episode(wrong_shape)
    with pytest.raises(ValueError, match="0 steps"):
        buffer.add_episode({key: value[:0] for key, value in make_episode(3, 0, True).items()})
    assert buffer.n_steps == 24
    assert {buffer[key].shape[0] for key in buffer} == {24}


def test_missing_data_key_names_available_keys(buffer: ReplayBuffer) -> None:
    with pytest.raises(KeyError, match="'velocity'.*'action', 'img'"):
        buffer["velocity"]


def test_refuses_to_replace_a_directory_that_is_not_a_store(
    buffer: ReplayBuffer, tmp_path: Path
) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        buffer.save(tmp_path)
    with pytest.raises(FileExistsError):
        ReplayBuffer.open(tmp_path, mode="w")
    assert (tmp_path / "notes.txt").read_text() == "keep me"
