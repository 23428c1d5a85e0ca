"""Diffusion Policy's datasets: zarr v2 stores both ways, unknown codecs, DP's episode subset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from policy.data import EpisodeSplit, ReplayBuffer, SequenceDataset, split_episodes


def dp_style_store(path: Path, jpeg2k_images: bool = True) -> Path:
    """A zarr v2 store in DP's layout whose image array names a codec that is not installed
    (DP's robomimic image caches use imagecodecs' Jpeg2k)."""
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    rng = np.random.default_rng(0)
    root.create_array("data/action", data=rng.uniform(0, 1, (30, 2)).astype(np.float32))
    root.create_array("data/obs", data=rng.uniform(0, 1, (30, 5)).astype(np.float32))
    root.create_array("data/img", data=rng.integers(1, 255, (30, 4, 4, 3), dtype=np.uint8))
    root.create_array("meta/episode_ends", data=np.array([10, 30], dtype=np.int64))
    if jpeg2k_images:
        meta_file = path / "data" / "img" / ".zarray"
        meta = json.loads(meta_file.read_text())
        meta["compressor"] = {"id": "imagecodecs_jpeg2k", "level": 50}
        meta_file.write_text(json.dumps(meta))
    return path


def test_an_unknown_codec_does_not_block_the_low_dim_keys(tmp_path: Path) -> None:
    store = dp_style_store(tmp_path / "dp.zarr")
    assert ReplayBuffer.open(store).keys() == ["action", "img", "obs"]
    windows = SequenceDataset(store, ["obs"], horizon=4, n_obs_steps=2, n_action_steps=2,
                              episode_split=EpisodeSplit(val_ratio=0))
    assert len(windows) > 0
    with pytest.raises(ValueError, match=r"data key 'img' cannot be read: codec "
                                         r"'imagecodecs_jpeg2k' is not installed; the package "
                                         r"'imagecodecs' provides it"):
        SequenceDataset(store, ["img"], horizon=4, n_obs_steps=2, n_action_steps=2,
                        episode_split=EpisodeSplit(val_ratio=0))


@pytest.mark.parametrize("suffix", [".zarr", ".zarr.zip"])
def test_save_as_zarr_v2_writes_what_dp_reads(tmp_path: Path, suffix: str) -> None:
    ours = ReplayBuffer.create_empty()
    rng = np.random.default_rng(1)
    for n in (5, 7):
        ours.add_episode({"obs": rng.normal(size=(n, 3)).astype(np.float32),
                          "action": rng.normal(size=(n, 2)).astype(np.float32)})
    path = tmp_path / f"v2{suffix}"
    ours.save(path, zarr_format=2)
    if suffix == ".zarr":  # zarr 2's layout: .zgroup / .zarray JSON, a numcodecs compressor
        assert (path / ".zgroup").is_file()
        array_meta = json.loads((path / "data" / "obs" / ".zarray").read_text())
        assert array_meta["zarr_format"] == 2 and array_meta["compressor"]["id"] == "blosc"
    back = ReplayBuffer.load(path)
    assert back._root.metadata.zarr_format == 2
    np.testing.assert_array_equal(back.episode_ends, [5, 12])
    for key in ("obs", "action"):
        np.testing.assert_array_equal(back[key][:], ours[key][:])
    with pytest.raises(ValueError, match="zarr_format must be None, 2 or 3"):
        ours.save(tmp_path / "x.zarr", zarr_format=4)


def dp_downsample_mask(mask: np.ndarray, max_n: int, seed: int) -> np.ndarray:
    """Diffusion Policy's `downsample_mask`, restated: a fresh generator seeded with `seed`
    picks `max_n` positions among the mask's True entries."""
    candidates = np.nonzero(mask)[0]
    picks = np.random.default_rng(seed=seed).choice(len(candidates), size=max_n, replace=False)
    out = np.zeros_like(mask)
    out[candidates[picks]] = True
    return out


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_max_train_episodes_draws_dps_subset(seed: int) -> None:
    train, val = split_episodes(40, 0.1, seed=seed, max_train_episodes=11)
    _, full_val = split_episodes(40, 0.1, seed=seed)
    np.testing.assert_array_equal(val, full_val)
    np.testing.assert_array_equal(train, dp_downsample_mask(~full_val, 11, seed))
