"""Image observations in the training data: uint8 HWC frames from zarr (DP's PushT `img`) and
robomimic hdf5 cameras, windowed as stored; the encoder crops (random in training, centred at
eval) and scales them once; malformed or missing image keys are one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from policy.data import EpisodeSplit, ReplayBuffer, SequenceDataset
from policy.data.robomimic_hdf5 import RobomimicHDF5Writer, robomimic_to_replay_buffer
from policy.encoders import ImageObsEncoder, crop_images

LENGTHS = (12, 7, 15)
SIZE = 16


def frames_of(episode: int, n_steps: int, size: int = SIZE) -> np.ndarray:
    """(T, size, size, 3) uint8 frames whose pixels encode (episode, step): pixel [0, 0, 0] is
    the step, [0, 0, 1] the episode, and each frame has its own gradient."""
    frames = np.zeros((n_steps, size, size, 3), np.uint8)
    frames += np.arange(size, dtype=np.uint8)[None, :, None, None]
    frames[:, 0, 0, 0] = np.arange(n_steps)
    frames[:, 0, 0, 1] = episode
    return frames


def image_buffer(img_dtype: type = np.uint8) -> ReplayBuffer:
    """A PushT-image-shaped store: img (T, 16, 16, 3), state (T, 5), action (T, 2)."""
    buffer = ReplayBuffer.create_empty()
    for episode, n_steps in enumerate(LENGTHS):
        step = np.arange(n_steps, dtype=np.float32)
        buffer.add_episode({
            "img": frames_of(episode, n_steps).astype(img_dtype),
            "state": np.stack([step, -step, step, step, 100 * episode + step], axis=1),
            "action": np.stack([step, step + 0.5], axis=1).astype(np.float32),
        })
    return buffer


OBS_KEYS = {"image": "img", "agent_pos": "state[:2]"}
IMAGES = {"image": (SIZE, SIZE, 3)}


def test_image_windows_are_uint8_hwc_as_stored_with_lowdim_keys_beside() -> None:
    dataset = SequenceDataset(image_buffer(), OBS_KEYS, horizon=4, n_obs_steps=2,
                              n_action_steps=2, episode_split=EpisodeSplit(val_ratio=0.0),
                              image_shapes=IMAGES)
    assert dataset._obs["image"].dtype == np.uint8  # frames kept as stored: no float copy
    assert dataset.obs_shapes == {"image": (SIZE, SIZE, 3), "agent_pos": (2,)}
    assert dataset.obs_dim == 2 and dataset.lowdim_keys == ["agent_pos"]
    item = dataset[0]  # first window of episode 0: padded with frame 0
    image = item["obs"]["image"]
    assert image.dtype == torch.uint8 and image.shape == (2, SIZE, SIZE, 3)  # not cropped here
    assert image[:, 0, 0, 0].tolist() == [0, 0] and image[:, 0, 0, 1].tolist() == [0, 0]
    assert item["obs"]["agent_pos"].dtype == torch.float32
    assert item["obs"]["agent_pos"][:, 0].tolist() == [0.0, 0.0]
    stored = image_buffer()["img"][:]
    rows = dataset._rows[len(dataset) // 2]
    middle = dataset[len(dataset) // 2]["obs"]["image"].numpy()
    np.testing.assert_array_equal(middle, stored[rows[:2]])  # exactly the stored frames
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=5)))
    assert batch["obs"]["image"].shape == (5, 2, SIZE, SIZE, 3)
    assert batch["obs"]["agent_pos"].shape == (5, 2, 2) and batch["action"].shape == (5, 4, 2)


def test_normalizer_statistics_cover_lowdim_keys_and_action_only() -> None:
    dataset = SequenceDataset(image_buffer(), OBS_KEYS, horizon=4, n_obs_steps=2,
                              n_action_steps=2, episode_split=EpisodeSplit(val_ratio=0.34),
                              image_shapes=IMAGES)
    stats = dataset.all_obs_and_actions()
    assert set(stats) == {"agent_pos", "action"}
    assert stats["agent_pos"].shape == (sum(LENGTHS), 2)
    val = dataset.get_validation_dataset()
    assert val._obs["image"] is dataset._obs["image"]  # shared, not reloaded
    assert set(val.episode_indices).isdisjoint(dataset.episode_indices)


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("float", r"image obs 'image' \(data key 'img'\): expected uint8 frames "
                  r"\(N, 16, 16, 3\) \(H, W, C\), got float32 \(34, 16, 16, 3\)"),
        ("shape", r"image obs 'image' \(data key 'img'\): expected uint8 frames "
                  r"\(N, 20, 16, 3\) \(H, W, C\), got uint8 \(34, 16, 16, 3\)"),
        ("lowdim", r"image obs 'image' \(data key 'state'\): expected uint8 frames "
                   r"\(N, 16, 16, 3\) \(H, W, C\), got float32 \(34, 5\)"),
        ("slice", r"image obs 'image' \(data key 'img'\): an image spec must be a bare data "
                  r"key, not the slice 'img\[:3\]'"),
        ("missing", r"image obs 'image' reads data key 'pixels', which the store does not have"),
    ],
)
def test_malformed_or_missing_image_key_is_one_line_naming_key_and_file(
    tmp_path: Path, case: str, match: str
) -> None:
    path = tmp_path / "demos.zarr.zip"
    image_buffer(np.float32 if case == "float" else np.uint8).save(path)
    obs_keys = dict(OBS_KEYS)
    shapes = dict(IMAGES)
    if case == "shape":
        shapes["image"] = (20, SIZE, 3)
    obs_keys["image"] = {"lowdim": "state", "slice": "img[:3]", "missing": "pixels"}.get(
        case, "img")
    with pytest.raises(ValueError, match=match) as error:
        SequenceDataset(path, obs_keys, image_shapes=shapes)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"data.path {path}: ")


def test_image_keys_need_a_mapping_and_must_be_observations() -> None:
    with pytest.raises(ValueError, match="need obs_keys as a mapping"):
        SequenceDataset(image_buffer(), ["img"], image_shapes=IMAGES)
    with pytest.raises(ValueError, match=r"image obs \['wrist'\] not in obs_keys"):
        SequenceDataset(image_buffer(), OBS_KEYS, image_shapes={**IMAGES, "wrist": (8, 8, 3)})


def test_encoder_crops_once_random_in_training_centred_at_eval() -> None:
    """The dataset's full frames go to the encoder, which crops: a fresh random window per image
    in train mode, the centre in eval mode (what the env's frames get at evaluation)."""
    torch.manual_seed(0)
    frames = torch.from_numpy(frames_of(0, 4)).permute(0, 3, 1, 2)  # (N, C, H, W)
    centre = crop_images(frames, (12, 12), random=False)
    torch.testing.assert_close(centre, frames[:, :, 2:14, 2:14], rtol=0, atol=0)
    crops = [crop_images(frames, (12, 12), random=True) for _ in range(8)]
    assert all(c.shape == (4, 3, 12, 12) for c in crops)
    assert any(not torch.equal(crops[0], c) for c in crops[1:])

    # 64x64 frames, 48x48 crops: a 2x2 feature map, so the keypoints see where the crop is
    encoder = ImageObsEncoder({"image": (64, 64, 3)}, {"agent_pos": (2,)}, crop_shape=(48, 48),
                              num_keypoints=4, feature_dim=8, width=4)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 2, 64, 64, 3)))
    obs = {"image": images.float(), "agent_pos": torch.zeros(3, 2, 2)}
    encoder.eval()
    torch.testing.assert_close(encoder(obs), encoder(obs), rtol=0, atol=0)
    encoder.train()
    assert not torch.allclose(encoder(obs), encoder(obs))
    assert encoder(obs).shape == (3, 2, 8 + 2)


def _camera_demo(rng: np.random.Generator, n_steps: int, image_dtype: type) -> dict:
    """A robomimic demo with two 12x12 cameras and the robot's low-dim keys."""
    cams = {key: rng.integers(0, 256, size=(n_steps, 12, 12, 3)).astype(image_dtype)
            for key in ("agentview_image", "robot0_eye_in_hand_image")}
    obs = {**cams, "robot0_eef_pos": rng.normal(size=(n_steps, 3))}
    return {"actions": rng.uniform(-1, 1, size=(n_steps, 7)),
            "states": rng.normal(size=(n_steps, 4)), "rewards": np.zeros(n_steps),
            "dones": np.zeros(n_steps), "obs": obs, "next_obs": obs}


def _camera_hdf5(path: Path, image_dtype: type = np.uint8) -> Path:
    rng = np.random.default_rng(0)
    with RobomimicHDF5Writer(path, {"env_name": "Lift", "type": 1, "env_kwargs": {}}) as writer:
        for n_steps in (9, 6):
            writer.add_demo(_camera_demo(rng, n_steps, image_dtype))
    return path


CAMERA_KEYS = ("agentview_image", "robot0_eye_in_hand_image", "robot0_eef_pos")


def test_robomimic_hdf5_cameras_train_as_uint8_frames(tmp_path: Path) -> None:
    path = _camera_hdf5(tmp_path / "cams.hdf5")
    buffer = robomimic_to_replay_buffer(path, obs_keys=CAMERA_KEYS)
    assert buffer["agentview_image"].dtype == np.uint8
    shapes = {"agentview_image": (12, 12, 3), "robot0_eye_in_hand_image": (12, 12, 3)}
    dataset = SequenceDataset(buffer, {key: key for key in CAMERA_KEYS}, horizon=4,
                              n_obs_steps=2, n_action_steps=2,
                              episode_split=EpisodeSplit(val_ratio=0.0), image_shapes=shapes)
    item = dataset[3]
    assert item["obs"]["agentview_image"].dtype == torch.uint8
    assert item["obs"]["robot0_eye_in_hand_image"].shape == (2, 12, 12, 3)
    assert item["obs"]["robot0_eef_pos"].shape == (2, 3) and item["action"].shape == (4, 7)
    assert set(dataset.all_obs_and_actions()) == {"robot0_eef_pos", "action"}


def test_robomimic_malformed_or_missing_camera_is_one_line_naming_file(tmp_path: Path) -> None:
    path = _camera_hdf5(tmp_path / "float_cams.hdf5", image_dtype=np.float32)
    with pytest.raises(ValueError, match=(
        f"{path} demo_0: camera obs 'agentview_image' must be uint8 frames "
        r"\(T, H, W, C\) with C 1 or 3; got float32 \(9, 12, 12, 3\)")):
        robomimic_to_replay_buffer(path, obs_keys=CAMERA_KEYS)
    good = _camera_hdf5(tmp_path / "cams.hdf5")
    with pytest.raises(KeyError, match=f"{good} demo_0 has no obs \\['sideview_image'\\]"):
        robomimic_to_replay_buffer(good, obs_keys=("sideview_image",))
