"""Demonstration data: the zarr replay buffer and DP-style sequence sampling over it."""

from policy.data.replay_buffer import ReplayBuffer
from policy.data.sequence import (
    EpisodeSplit,
    FeatureSpec,
    SequenceDataset,
    sequence_row_indices,
    split_episodes,
    windows_from_config,
)

__all__ = [
    "EpisodeSplit",
    "FeatureSpec",
    "ReplayBuffer",
    "SequenceDataset",
    "sequence_row_indices",
    "split_episodes",
    "windows_from_config",
]
