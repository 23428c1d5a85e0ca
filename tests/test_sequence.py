"""Sequence sampling: DP's edge padding, window counts, episode splits, feature specs."""

from pathlib import Path

import numpy as np
import pytest
import torch

from policy.data import (
    EpisodeSplit,
    FeatureSpec,
    ReplayBuffer,
    SequenceDataset,
    sequence_row_indices,
)
from policy.data.sequence import split_episodes

EPISODE_LENGTHS = (20, 11, 30, 16, 25, 9, 40, 18, 22, 14)


def dp_style_windows(
    episode_ends: np.ndarray, length: int, pad_before: int, pad_after: int
) -> list[list[int]]:
    """Reference: one window at a time, out-of-episode steps filled with the edge frame."""
    windows, start = [], 0
    for end in episode_ends:
        for first in range(-pad_before, end - start - length + pad_after + 1):
            steps = [min(max(first + k, 0), end - start - 1) for k in range(length)]
            windows.append([start + step for step in steps])
        start = end
    return windows


def step_valued_buffer() -> ReplayBuffer:
    """Episodes whose every value encodes (episode, step): easy to read off a sample."""
    buffer = ReplayBuffer.create_empty()
    for episode, n_steps in enumerate(EPISODE_LENGTHS):
        step = np.arange(n_steps, dtype=np.float32)
        code = 1000 * episode + step
        buffer.add_episode(
            {
                "state": np.stack([code, -code, step, step, step], axis=1),
                "keypoint": np.repeat(code[:, None, None], 18, axis=1).reshape(n_steps, 9, 2),
                "action": np.stack([code, code + 0.5], axis=1),
            }
        )
    return buffer


def test_row_indices_match_dp_padding_for_many_settings() -> None:
    episode_ends = np.cumsum(EPISODE_LENGTHS)
    for length, pad_before, pad_after in [(16, 1, 7), (1, 0, 0), (8, 3, 2), (12, 11, 11)]:
        rows = sequence_row_indices(episode_ends, length, pad_before, pad_after)
        expected = dp_style_windows(episode_ends, length, pad_before, pad_after)
        np.testing.assert_array_equal(rows, np.array(expected).reshape(-1, length))


def test_first_window_repeats_frame_zero_and_last_windows_repeat_final_action() -> None:
    dataset = SequenceDataset(
        step_valued_buffer(),
        ["keypoint", "state[:2]"],
        horizon=16,
        n_obs_steps=3,
        n_action_steps=8,
        episode_split=EpisodeSplit(val_ratio=0.0),
    )
    first = dataset[0]
    assert first["obs"].shape == (3, 20) and first["action"].shape == (16, 2)
    assert first["obs"].dtype == torch.float32 and first["action"].dtype == torch.float32
    np.testing.assert_array_equal(first["obs"][:, 0], [0, 0, 0])  # frame 0 padded To-1 times
    np.testing.assert_array_equal(first["action"][:3, 0], [0, 0, 0])
    np.testing.assert_array_equal(first["action"][2:, 0], np.arange(14))
    # The last window of episode 0 (20 steps) ends Ta-1 = 7 steps past its final frame.
    n_windows_episode_0 = 20 - 16 + 2 + 7 + 1
    last = dataset[n_windows_episode_0 - 1]
    np.testing.assert_array_equal(last["action"][:, 0], [*range(11, 20), *[19] * 7])
    assert dataset[n_windows_episode_0]["action"][0, 0] == 1000  # next episode starts clean


def test_window_count_per_episode() -> None:
    horizon, n_obs_steps, n_action_steps = 16, 2, 8
    dataset = SequenceDataset(
        step_valued_buffer(),
        ["state"],
        horizon=horizon,
        n_obs_steps=n_obs_steps,
        n_action_steps=n_action_steps,
        episode_split=EpisodeSplit(val_ratio=0.0),
    )
    episodes = np.array([int(dataset[i]["action"][-1, 0]) // 1000 for i in range(len(dataset))])
    counts = np.bincount(episodes, minlength=len(EPISODE_LENGTHS))
    expected = [max(0, n - horizon + n_obs_steps + n_action_steps - 1) for n in EPISODE_LENGTHS]
    np.testing.assert_array_equal(counts, expected)


def test_obs_concatenates_flattened_keys_and_slices() -> None:
    dataset = SequenceDataset(step_valued_buffer(), ["keypoint", "state[:2]"],
                              episode_split=EpisodeSplit(val_ratio=0.0))
    assert (dataset.obs_dim, dataset.action_dim) == (20, 2)
    obs = dataset[5]["obs"]
    code = obs[-1, 0]
    np.testing.assert_array_equal(obs[-1], [code] * 18 + [code, -code])
    features = dataset.all_obs_and_actions()
    assert features["obs"].shape == (sum(EPISODE_LENGTHS), 20)
    assert features["action"].shape == (sum(EPISODE_LENGTHS), 2)
    assert features["obs"].dtype == np.float32
    single = FeatureSpec.parse("state[-1]").extract(np.arange(10).reshape(2, 5))
    np.testing.assert_array_equal(single, [[4], [9]])
    with pytest.raises(ValueError, match="bad feature spec"):
        FeatureSpec.parse("state[1")
    with pytest.raises(ValueError, match="selects no features"):
        FeatureSpec.parse("state[7:]").extract(np.zeros((3, 5)))


def test_split_is_by_episode_disjoint_and_seeded() -> None:
    buffer = step_valued_buffer()
    train = SequenceDataset(buffer, ["state"], episode_split=EpisodeSplit(val_ratio=0.2, seed=3))
    val = train.get_validation_dataset()
    assert len(val.episode_indices) == 2
    assert set(train.episode_indices).isdisjoint(val.episode_indices)
    assert len(train.episode_indices) + len(val.episode_indices) == len(EPISODE_LENGTHS)
    sample_episodes = {int(val[i]["action"][0, 0]) // 1000 for i in range(len(val))}
    assert sample_episodes == set(val.episode_indices)
    again = SequenceDataset(buffer, ["state"], episode_split=EpisodeSplit(val_ratio=0.2, seed=3),
                            split="val")
    np.testing.assert_array_equal(again.episode_indices, val.episode_indices)
    other_seeds = {
        tuple(split_episodes(len(EPISODE_LENGTHS), 0.2, seed)[1].nonzero()[0]) for seed in range(8)
    }
    assert len(other_seeds) > 1


def test_split_edge_cases() -> None:
    train_mask, val_mask = split_episodes(10, 0.01, seed=0)
    assert val_mask.sum() == 1 and train_mask.sum() == 9  # at least one val episode
    train_mask, val_mask = split_episodes(1, 0.5, seed=0)
    assert val_mask.sum() == 0 and train_mask.sum() == 1  # never empties the training set
    train_mask, val_mask = split_episodes(10, 0.2, seed=0, max_train_episodes=3)
    assert train_mask.sum() == 3 and val_mask.sum() == 2 and not (train_mask & val_mask).any()


def test_missing_key_error_names_key_and_available(tmp_path: Path) -> None:
    step_valued_buffer().save(tmp_path / "demos.zarr.zip")
    listing = "available keys: \\['action', 'keypoint', 'state'\\]"
    with pytest.raises(KeyError, match=f"'img'.*{listing}"):
        SequenceDataset(tmp_path / "demos.zarr.zip", ["img", "state[:2]"])
    with pytest.raises(KeyError, match="'act'"):
        SequenceDataset(tmp_path / "demos.zarr.zip", ["state"], action_key="act")


def test_loads_from_a_path_and_validates_arguments(tmp_path: Path) -> None:
    step_valued_buffer().save(tmp_path / "demos.zarr")
    dataset = SequenceDataset(tmp_path / "demos.zarr", ["keypoint", "state[:2]"])
    assert len(dataset) > 0
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    batch = next(iter(loader))
    assert batch["obs"].shape == (4, 2, 20) and batch["action"].shape == (4, 16, 2)
    with pytest.raises(ValueError, match="do not fit"):
        SequenceDataset(tmp_path / "demos.zarr", ["state"], horizon=8, n_obs_steps=2)
    with pytest.raises(ValueError, match="split"):
        SequenceDataset(tmp_path / "demos.zarr", ["state"], split="test")
