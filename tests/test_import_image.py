"""Camera policies from Diffusion Policy and LeRobot against their own outputs, and each piece
of the mapping on small synthetic weights.

Parity (skipped with one line where ../shared/fixtures is absent): the fixtures
dp_image_ddpm (DP's DiffusionUnetHybridImagePolicy) and lerobot_image_ddpm (LeRobot 0.6.1,
one camera) were made with the projects' own code; their READMEs say what `reference.pt`
holds. Pinned: the encoder's input bit for bit, backbone map, keypoints, image features and
global condition to <= 1e-5 of their largest value, the UNet, the sequential chunk against the
source's action to <= 2e-5 of the action range with the source's noise, Picard at a tight
tolerance to <= 1e-3 of the sequential chunk. In-repo: the ResNet key maps, normalisation,
crop rounding, concatenation order, shared and per-camera encoders (a two-camera LeRobot folder
and DP's MultiImageObsEncoder against plain-functional re-implementations), and the refusals.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from picard_sampler import DDPMSchedule, exact_errors
from policy import load_policy
from policy.encoders import (
    ImageNormalization,
    ImageObsEncoder,
    ResNet18Trunk,
    centre_offset,
    crop_images,
)
from policy.foreign import (
    _dp_multi_image_encoder,
    check_keypoint_grid,
    import_diffusion_policy,
    import_lerobot,
    rename_resnet18_trunk,
    rename_unet_keys,
    trunk_map_size,
)
from policy.unet import ConditionalUnet1D

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared" / "fixtures"
pytestmark = pytest.mark.usefixtures("one_thread")

PARITY = {"dp_image_ddpm": "dp_image_ddpm/dp_workspace.ckpt",
          "lerobot_image_ddpm": "lerobot_image_ddpm"}
FEATURE_TOL = 1e-5
"""Encoder stages and global condition: max |ours - theirs| / max |theirs|."""
ACTION_TOL = 2e-5
"""Sequential chunk: max |ours - source's action| / the action's range."""
PICARD_TOL = 1e-3
"""Picard (tol 1e-4) against the sequential chunk, normalised units."""


def _need_fixtures() -> None:
    """Skip (one line) where the shared fixtures are not beside the repository."""
    if not all((SHARED / path).exists() for path in PARITY.values()):
        pytest.skip(f"camera parity fixtures not found under {SHARED} (../shared/fixtures)")


@pytest.fixture(scope="module")
def parity() -> dict[str, tuple[object, dict[str, torch.Tensor]]]:
    """{fixture: (the loaded policy, its reference.pt)}, loaded once for the module."""
    _need_fixtures()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {name: (load_policy(SHARED / path),
                       torch.load(SHARED / name / "reference.pt", weights_only=True))
                for name, path in PARITY.items()}
    finally:
        torch.set_num_threads(threads)


def source_observations(name: str, ref: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference call's observations under the source's keys: the raw frames (B, To, H, W,
    C) in [0, 255], as our cameras take them, and the raw low-dim values."""
    if name.startswith("dp_"):
        return {"image": ref["frames_uint8_hwc"], "agent_pos": ref["obs_agent_pos"]}
    return {"observation.image": ref["frames_uint8_hwc"], "observation.state": ref["obs_state"]}


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours - theirs| / max |theirs|."""
    return float((ours.detach() - theirs).abs().max() / theirs.abs().max())


# ------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("name", sorted(PARITY))
def test_the_sources_frames_are_ours_divided_by_255_in_chw(parity, name: str) -> None:
    """What the source's policy received is frames / 255 in CHW: we take the frames."""
    _, ref = parity[name]
    frames = ref["frames_uint8_hwc"]
    assert torch.equal(frames.permute(0, 1, 4, 2, 3).float() / 255, ref["obs_image"])


@pytest.mark.parametrize("name", sorted(PARITY))
def test_encoder_stages_match_the_sources(parity, name: str) -> None:
    policy, ref = parity[name]
    encoder = policy.obs_encoder
    (camera,) = encoder.camera_keys
    stages = encoder.camera_stages(camera, ref["frames_uint8_hwc"].flatten(0, 1))
    per_camera = (lambda k: ref[k]) if name.startswith("dp_") else (lambda k: ref[k][0])
    # the normalised, centre-cropped input: the same float32 operations, bit for bit
    assert torch.equal(stages["input"], per_camera("image_encoder_input"))
    for ours, theirs in (("backbone", "backbone_features"), ("pooled", "keypoints"),
                         ("features", "image_features")):
        expected = per_camera(theirs)
        assert relative(stages[ours].reshape(expected.shape), expected) <= FEATURE_TOL, ours


@pytest.mark.parametrize("name", sorted(PARITY))
def test_global_condition_and_unet_match_the_sources(parity, name: str) -> None:
    policy, ref = parity[name]
    cond = policy.encode_obs(policy.check_obs(source_observations(name, ref)))
    assert relative(cond, ref["global_cond"]) <= FEATURE_TOL
    out = policy.model(ref["unet_x"], ref["unet_t"], ref["unet_global_cond"])
    torch.testing.assert_close(out, ref["unet_out"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(PARITY))
def test_sequential_chunk_equals_the_sources_action_and_picard_converges_to_it(
        parity, name: str) -> None:
    policy, ref = parity[name]
    obs = source_observations(name, ref)
    sampler = policy.make_sampler("sequential")  # the source's DDPM-100
    assert type(sampler.schedule) is DDPMSchedule and sampler.num_steps == 100
    action, sequential = policy.predict_action(obs, sampler, noise=ref["noise"])
    span = ref["action"].max() - ref["action"].min()
    assert float((action - ref["action"]).abs().max() / span) <= ACTION_TOL
    _, picard = policy.predict_action(obs, policy.make_sampler("picard", tol=1e-4),
                                      noise=ref["noise"])
    assert picard.converged
    assert float(exact_errors(picard.sample, sequential.sample).max()) <= PICARD_TOL


def test_imported_camera_settings_are_the_sources(parity) -> None:
    dp = parity["dp_image_ddpm"][0].obs_encoder
    assert dp.order == ["image", "agent_pos"] and dp.obs_shapes["image"] == (96, 96, 3)
    assert dp.cameras["image"].feature_activation == "relu"
    lerobot = parity["lerobot_image_ddpm"][0].obs_encoder
    assert lerobot.order == ["observation_state", "observation_image"]  # state first
    assert lerobot.shared_encoder and lerobot.aliases["pixels"] == "observation_image"


# ------------------------------------------------------------------ plain-functional twins
def functional_resnet18(x: torch.Tensor, w: dict[str, torch.Tensor], stem: tuple[str, str],
                        layer: Callable[[int], str]) -> torch.Tensor:
    """torchvision's resnet18 trunk with GroupNorm (C // 16 groups) in plain F, reading weights
    named `stem` (conv, norm) and `layer(i)` for layer1..layer4 (i = 0..3)."""
    def gn(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.group_norm(x, x.shape[1] // 16, w[f"{name}.weight"], w[f"{name}.bias"], 1e-5)

    x = F.max_pool2d(F.relu(gn(F.conv2d(x, w[f"{stem[0]}.weight"], stride=2, padding=3),
                               stem[1])), 3, 2, 1)
    for i in range(4):
        for b in range(2):
            q = f"{layer(i)}.{b}."
            stride = 2 if i > 0 and b == 0 else 1
            y = F.relu(gn(F.conv2d(x, w[q + "conv1.weight"], stride=stride, padding=1),
                          q + "bn1"))
            y = gn(F.conv2d(y, w[q + "conv2.weight"], padding=1), q + "bn2")
            skip = (gn(F.conv2d(x, w[q + "downsample.0.weight"], stride=stride),
                       q + "downsample.1") if q + "downsample.0.weight" in w else x)
            x = F.relu(y + skip)
    return x


def torchvision_centre_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """torchvision's center_crop of (N, C, H, W): top = int(round((H - h) / 2))."""
    top = int(round((x.shape[-2] - size[0]) / 2.0))
    left = int(round((x.shape[-1] - size[1]) / 2.0))
    return x[..., top:top + size[0], left:left + size[1]]


def random_resnet18(prefix: str, stem: tuple[str, str], layer: Callable[[int], str],
                    generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random resnet18 (GroupNorm) weights under `prefix` in the given naming; norm weights
    1 + noise, so a wrong map cannot hide behind ones."""
    w = {f"{prefix}{stem[0]}.weight": torch.randn(64, 3, 7, 7, generator=generator) * 0.1}
    norms = [(f"{prefix}{stem[1]}", 64)]
    c_in = 64
    for i, c in enumerate((64, 128, 256, 512)):
        for b in range(2):
            q = f"{prefix}{layer(i)}.{b}."
            first = c_in if b == 0 else c
            w[q + "conv1.weight"] = torch.randn(c, first, 3, 3, generator=generator) * 0.05
            w[q + "conv2.weight"] = torch.randn(c, c, 3, 3, generator=generator) * 0.05
            norms += [(q + "bn1", c), (q + "bn2", c)]
            if b == 0 and i > 0:
                w[q + "downsample.0.weight"] = torch.randn(c, first, 1, 1,
                                                           generator=generator) * 0.1
                norms.append((q + "downsample.1", c))
        c_in = c
    for name, c in norms:
        w[f"{name}.weight"] = 1 + 0.1 * torch.randn(c, generator=generator)
        w[f"{name}.bias"] = 0.1 * torch.randn(c, generator=generator)
    return w


CHILDREN = (("0", "1"), lambda i: str(i + 4))
TORCHVISION = (("conv1", "bn1"), lambda i: f"layer{i + 1}")


def unprefixed(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix`, with it removed."""
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


# ------------------------------------------------------------------------------ key maps
def test_resnet18_key_maps_cover_our_trunk_in_both_layouts() -> None:
    ours = set(ResNet18Trunk(3, 64).state_dict())
    g = torch.Generator().manual_seed(0)
    for layout, (stem, layer) in (("children", CHILDREN), ("torchvision", TORCHVISION)):
        mapped = rename_resnet18_trunk(random_resnet18("", stem, layer, g), layout, "f", "it")
        assert {k.removeprefix("trunk.") for k in mapped} == ours
    spot = rename_resnet18_trunk({"layer3.0.downsample.1.bias": torch.zeros(1),
                                  "7.1.bn2.weight": torch.zeros(1)}, "torchvision", "f", "it")
    assert set(spot) == {"trunk.8.shortcut.1.bias", "trunk.11.norm2.weight"}


@pytest.mark.parametrize("name, message", [
    ("1.running_mean", "BatchNorm running statistics"),
    ("4.2.conv1.weight", "does not map onto a ResNet-18 trunk"),  # resnet34's third block
    ("5.0.conv3.weight", "does not map onto a ResNet-18 trunk"),  # a bottleneck (resnet50)
    ("fc.weight", "does not map onto a ResNet-18 trunk"),
])
def test_what_is_not_a_groupnorm_resnet18_is_refused(name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rename_resnet18_trunk({name: torch.zeros(1)}, "torchvision", "file", "the encoder")


def test_keypoint_grid_is_checked_against_ours() -> None:
    assert [trunk_map_size(s) for s in (84, 76, 96, 33, 216, 288)] == [3, 3, 3, 2, 7, 9]
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 3), torch.linspace(-1, 1, 3), indexing="ij")
    grid = torch.stack([xs.flatten(), ys.flatten()], dim=-1)
    check_keypoint_grid(grid, (84, 84), "f", "it")
    with pytest.raises(ValueError, match="not the \\[-1, 1\\] grid of the 3 x 3 map"):
        check_keypoint_grid(grid.flip(-1) * 0.5, (84, 84), "f", "it")
    with pytest.raises(ValueError, match="grid of the 2 x 2 map of a 33 x 33 input"):
        check_keypoint_grid(grid, (33, 33), "f", "it")


# -------------------------------------------------------------- normalisation, crop, order
def test_normalisations_reproduce_the_sources_bit_for_bit() -> None:
    frames = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(1, 3, 16, 16)
    x = frames.float() / 255
    # DP: its image range normaliser, x * 2 - 1 (scale 2, offset -1)
    assert torch.equal(ImageNormalization([0.5] * 3, [0.5] * 3, 3)(frames), x * 2.0 + (-1.0))
    # LeRobot MEAN_STD: (x - mean) / (std + eps), statistics (3, 1, 1)
    mean, std = torch.tensor([0.41, 0.48, 0.43]), torch.tensor([0.15, 0.16, 0.149])
    lerobot = (x - mean.reshape(3, 1, 1)) / (std.reshape(3, 1, 1) + 1e-8)
    ours = ImageNormalization(mean.tolist(), (std + 1e-8).tolist(), 3)(frames)
    assert torch.equal(ours, lerobot)
    with pytest.raises(ValueError, match="3 values"):
        ImageNormalization([0.5], [0.5], 3)
    with pytest.raises(ValueError, match="> 0"):
        ImageNormalization([0.5] * 3, [0.5, 0.0, 0.5], 3)


def test_centre_crop_rounding_floor_is_ours_and_round_is_torchvisions() -> None:
    for size, crop in ((96, 84), (96, 76), (36, 31), (36, 33), (10, 3), (10, 7)):
        assert centre_offset(size, crop, "round") == int(round((size - crop) / 2.0))
        assert centre_offset(size, crop, "floor") == (size - crop) // 2
    assert (centre_offset(36, 33, "floor"), centre_offset(36, 33, "round")) == (1, 2)
    images = torch.arange(36 * 36, dtype=torch.float32).reshape(1, 1, 36, 36)
    torch.testing.assert_close(crop_images(images, (33, 33), False, "round"),
                               torchvision_centre_crop(images, (33, 33)), rtol=0, atol=0)
    assert crop_images(images, (33, 33), False)[0, 0, 0, 0] == 36 + 1  # ours: top = left = 1
    with pytest.raises(ValueError, match="crop_rounding"):
        ImageObsEncoder({"image": (40, 40, 3)}, crop_shape=(33, 33), crop_rounding="ceil")


def test_default_encoder_is_unchanged_and_options_add_no_weights() -> None:
    torch.manual_seed(0)
    default = ImageObsEncoder({"image": (40, 40, 3)}, {"agent_pos": (2,)}, crop_shape=(33, 33),
                              num_keypoints=4, feature_dim=8, width=16).eval()
    names = list(default.state_dict())
    assert names[0] == "cameras.image.trunk.0.weight" and names[-2:] == [
        "cameras.image.project.weight", "cameras.image.project.bias"]
    assert "cameras.image.keypoints.to_keypoints.weight" in names
    frames = torch.randint(0, 256, (3, 40, 40, 3), dtype=torch.uint8)
    camera = default.cameras["image"]
    stages = camera.stages(frames)
    expected_input = frames.permute(0, 3, 1, 2)[:, :, 3:36, 3:36].float() / 127.5 - 1.0
    assert torch.equal(stages["input"], expected_input)  # floor crop, [-1, 1], no activation
    assert torch.equal(stages["features"],
                       camera.project(camera.keypoints(camera.trunk(expected_input))))
    options = ImageObsEncoder({"image": (40, 40, 3)}, {"agent_pos": (2,)}, crop_shape=(33, 33),
                              num_keypoints=4, feature_dim=8, width=16,
                              feature_activation="relu", crop_rounding="round",
                              image_mean={"image": [0.5] * 3}, image_std={"image": [0.2] * 3},
                              order=["agent_pos", "image"], random_crop=False,
                              aliases={"pixels": "image"})
    assert list(options.state_dict()) == names  # statistics are settings, not weights
    options.load_state_dict(default.state_dict())


def test_order_sets_the_per_step_concatenation() -> None:
    torch.manual_seed(0)
    kwargs = dict(crop_shape=(33, 33), num_keypoints=4, feature_dim=8, width=16)
    shapes, lowdim = {"left": (40, 40, 3), "right": (40, 40, 3)}, {"a": (2,), "b": (3,)}
    default = ImageObsEncoder(shapes, lowdim, **kwargs).eval()
    ordered = ImageObsEncoder(shapes, lowdim, order=["b", "right", "a", "left"], **kwargs).eval()
    ordered.load_state_dict(default.state_dict())
    obs = {k: torch.randint(0, 256, (2, 2, 40, 40, 3)).float() for k in shapes}
    obs.update(a=torch.randn(2, 2, 2), b=torch.randn(2, 2, 3))
    left, right, a, b = default(obs).split([8, 8, 2, 3], dim=-1)
    assert torch.equal(ordered(obs), torch.cat([b, right, a, left], dim=-1))
    assert list(ordered.obs_shapes) == ["b", "right", "a", "left"]
    with pytest.raises(ValueError, match="must list every observation key once"):
        ImageObsEncoder(shapes, lowdim, order=["a", "b", "left"], **kwargs)


def test_a_shared_encoder_has_one_trunk_and_per_camera_normalisation() -> None:
    torch.manual_seed(0)
    shapes = {"top": (40, 40, 3), "wrist": (40, 40, 3)}
    shared = ImageObsEncoder(shapes, crop_shape=(33, 33), num_keypoints=4, feature_dim=8,
                             width=16, shared_encoder=True,
                             image_mean={"top": [0.5] * 3, "wrist": [0.3] * 3},
                             image_std={"top": [0.25] * 3, "wrist": [0.2] * 3}).eval()
    assert list(shared.cameras) == ["top"] and shared.feature_dim == 16
    frames = torch.randint(0, 256, (1, 2, 40, 40, 3)).float()
    top, wrist = shared({"top": frames, "wrist": frames}).split(8, dim=-1)
    assert not torch.equal(top, wrist)  # the same frames, normalised per camera
    assert torch.equal(wrist[0], shared.camera_stages("wrist", frames[0])["features"])
    with pytest.raises(ValueError, match="cameras of one shape"):
        ImageObsEncoder({"top": (40, 40, 3), "wrist": (48, 40, 3)}, crop_shape=(33, 33),
                        shared_encoder=True)


# ------------------------------------------------------------- a two-camera LeRobot folder
def lerobot_unet_names(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our UNet's state dict in LeRobot's names (the inverse of rename_unet_keys)."""
    out = {}
    for name, value in ours.items():
        for pattern, replacement in ((r"^step_encoder\.", "diffusion_step_encoder."),
                                     (r"^(down|mid|up)\.", r"\1_modules."),
                                     (r"^final\.0\.", "final_conv.0.block."),
                                     (r"^final\.1\.", "final_conv.1."),
                                     (r"\.conv([12])\.", r".conv\1.block."),
                                     (r"\.film\.1\.", ".cond_encoder.1."),
                                     (r"\.residual\.", ".residual_conv.")):
            name = re.sub(pattern, replacement, name)
        out[f"diffusion.unet.{name}"] = value
    return out


CAMERAS = ("observation.images.top", "observation.images.wrist")
FRAME = (36, 36)
CROP = (33, 33)  # 36 - 33 = 3: torchvision's round(1.5) = 2, our floor 1
KEYPOINTS = 4


def make_lerobot_folder(folder: Path, separate: bool, seed: int = 0,
                        **overrides: object) -> dict[str, torch.Tensor]:
    """A LeRobot 0.6-layout diffusion folder with two cameras, state (2,) and environment
    state (3,), random weights; returns the weights (LeRobot's names) and statistics."""
    g = torch.Generator().manual_seed(seed)
    cond_dim = 2 * (2 + 2 * 2 * KEYPOINTS + 3)
    unet = ConditionalUnet1D(input_dim=2, global_cond_dim=cond_dim, down_dims=(16, 32),
                             diffusion_step_embed_dim=16, n_groups=4, final_n_groups=8)
    weights = lerobot_unet_names(unet.state_dict())
    assert set(rename_unet_keys(weights, "diffusion.unet.")) == {
        f"model.{k}" for k in unet.state_dict()}  # the inverse above is exact
    prefixes = ([f"diffusion.rgb_encoder.{i}." for i in range(2)] if separate
                else ["diffusion.rgb_encoder."])
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 2), torch.linspace(-1, 1, 2), indexing="ij")
    for prefix in prefixes:
        weights.update(random_resnet18(prefix + "backbone.", *CHILDREN, generator=g))
        weights[prefix + "pool.nets.weight"] = torch.randn(KEYPOINTS, 512, 1, 1, generator=g)
        weights[prefix + "pool.nets.bias"] = torch.randn(KEYPOINTS, generator=g)
        weights[prefix + "pool.pos_grid"] = torch.stack([xs.flatten(), ys.flatten()], dim=-1)
        weights[prefix + "out.weight"] = torch.randn(2 * KEYPOINTS, 2 * KEYPOINTS,
                                                     generator=g) * 0.3
        weights[prefix + "out.bias"] = torch.randn(2 * KEYPOINTS, generator=g) * 0.1
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))
    stats = {"observation.state.min": torch.tensor([0.0, 10.0]),
             "observation.state.max": torch.tensor([512.0, 500.0]),
             "action.min": torch.tensor([0.0, 0.0]), "action.max": torch.tensor([512.0, 512.0])}
    for i, camera in enumerate(CAMERAS):  # channels and cameras differ on purpose
        stats[f"{camera}.mean"] = torch.tensor([0.4, 0.5, 0.45]).reshape(3, 1, 1) + 0.05 * i
        stats[f"{camera}.std"] = torch.tensor([0.15, 0.2, 0.25]).reshape(3, 1, 1) - 0.03 * i
    save_file(stats, str(folder / "policy_preprocessor_step_3_normalizer_processor.safetensors"))
    (folder / "policy_preprocessor.json").write_text(json.dumps(
        {"steps": [{"registry_name": "normalizer_processor", "config": {"eps": 1e-8}}]}))
    config = {
        "type": "diffusion", "n_obs_steps": 2, "horizon": 8, "n_action_steps": 4,
        "input_features": {
            "observation.state": {"type": "STATE", "shape": [2]},
            CAMERAS[0]: {"type": "VISUAL", "shape": [3, *FRAME]},
            "observation.environment_state": {"type": "ENV", "shape": [3]},
            CAMERAS[1]: {"type": "VISUAL", "shape": [3, *FRAME]}},
        "output_features": {"action": {"type": "ACTION", "shape": [2]}},
        "normalization_mapping": {"VISUAL": "MEAN_STD", "STATE": "MIN_MAX",
                                  "ACTION": "MIN_MAX"},
        "vision_backbone": "resnet18", "pretrained_backbone_weights": None,
        "use_group_norm": True, "resize_shape": None, "crop_ratio": 1.0,
        "crop_shape": list(CROP), "crop_is_random": True,
        "spatial_softmax_num_keypoints": KEYPOINTS,
        "use_separate_rgb_encoder_per_camera": separate,
        "down_dims": [16, 32], "kernel_size": 5, "n_groups": 4, "diffusion_step_embed_dim": 16,
        "use_film_scale_modulation": True, "noise_scheduler_type": "DDPM",
        "num_train_timesteps": 10, "beta_schedule": "squaredcos_cap_v2",
        "clip_sample": True, "clip_sample_range": 1.0, "prediction_type": "epsilon",
        "num_inference_steps": 10, **overrides}
    (folder / "config.json").write_text(json.dumps(config))
    return {**weights, **stats}


def lerobot_global_cond(w: dict[str, torch.Tensor], obs: dict[str, torch.Tensor],
                        separate: bool) -> torch.Tensor:
    """LeRobot's _prepare_global_conditioning in plain F (preprocessor included): per step
    [state MIN_MAX, each camera's DiffusionRgbEncoder features in input order, env state]."""
    state = obs["observation.state"]
    low, high = w["observation.state.min"], w["observation.state.max"]
    parts = [2 * (state - low) / (high - low) - 1]
    for i, camera in enumerate(CAMERAS):
        prefix = f"diffusion.rgb_encoder.{i}." if separate else "diffusion.rgb_encoder."
        frames = obs[camera]
        b, t = frames.shape[:2]
        x = frames.flatten(0, 1).permute(0, 3, 1, 2).float() / 255
        x = (x - w[f"{camera}.mean"]) / (w[f"{camera}.std"] + 1e-8)
        x = functional_resnet18(torchvision_centre_crop(x, CROP), unprefixed(w, prefix +
                                                                             "backbone."),
                                *CHILDREN)
        attention = F.conv2d(x, w[prefix + "pool.nets.weight"],
                             w[prefix + "pool.nets.bias"]).flatten(2).softmax(-1)
        keypoints = (attention @ w[prefix + "pool.pos_grid"]).flatten(1)
        features = F.relu(F.linear(keypoints, w[prefix + "out.weight"], w[prefix + "out.bias"]))
        parts.append(features.reshape(b, t, -1))
    parts.append(obs["observation.environment_state"])
    return torch.cat(parts, dim=-1).flatten(1)


def camera_observations(seed: int = 1) -> dict[str, torch.Tensor]:
    """Two cameras' frames (3, 2, H, W, 3) uint8, state and env state, each camera different."""
    g = torch.Generator().manual_seed(seed)
    obs = {camera: torch.randint(0, 256, (3, 2, *FRAME, 3), generator=g, dtype=torch.uint8)
           for camera in CAMERAS}
    obs["observation.state"] = torch.rand(3, 2, 2, generator=g) * 512
    obs["observation.environment_state"] = torch.randn(3, 2, 3, generator=g)
    return obs


@pytest.mark.parametrize("separate", [True, False])
def test_two_camera_lerobot_folder_maps_each_encoder_and_the_order(tmp_path: Path,
                                                                   separate: bool) -> None:
    weights = make_lerobot_folder(tmp_path, separate)
    policy = load_policy(tmp_path)
    encoder = policy.obs_encoder
    assert encoder.order == ["observation_state", "observation_images_top",
                             "observation_images_wrist", "observation_environment_state"]
    assert len(encoder.cameras) == (2 if separate else 1)
    obs = camera_observations()
    expected = lerobot_global_cond(weights, obs, separate)
    cond = policy.encode_obs(policy.check_obs(obs))
    assert relative(cond, expected) <= FEATURE_TOL
    # the encoders really differ: swapping the cameras' frames changes the condition
    swapped = {**obs, CAMERAS[0]: obs[CAMERAS[1]], CAMERAS[1]: obs[CAMERAS[0]]}
    assert relative(policy.encode_obs(policy.check_obs(swapped)), expected) > 1e-3


@pytest.mark.parametrize("overrides, message", [
    ({"vision_backbone": "resnet34"}, "vision_backbone 'resnet34' does not map"),
    ({"use_group_norm": False, "pretrained_backbone_weights": "ResNet18_Weights.IMAGENET1K_V1"},
     "use_group_norm=false: the ResNet keeps its BatchNorm layers .*pretrained"),
    ({"resize_shape": [48, 48]}, "resize_shape \\[48, 48\\] resizes the 36 x 36 images"),
    ({"crop_shape": [20, 20]}, "position grid \\(4, 2\\) is not the \\[-1, 1\\] grid of the "
                               "1 x 1 map"),
    ({"use_separate_rgb_encoder_per_camera": False},
     "use_separate_rgb_encoder_per_camera=false, but the weights hold one image encoder per "
     "camera \\(diffusion.rgb_encoder.0.backbone.0.weight\\)"),
    ({"normalization_mapping": {"VISUAL": "QUANTILES", "STATE": "MIN_MAX",
                                "ACTION": "MIN_MAX"}},
     "normalisation 'QUANTILES' of the cameras is not supported"),
])
def test_lerobot_camera_settings_that_do_not_map_are_one_line(tmp_path: Path, overrides: dict,
                                                              message: str) -> None:
    make_lerobot_folder(tmp_path, separate=True, **overrides)
    with pytest.raises(ValueError, match=message) as error:
        import_lerobot(tmp_path)
    assert "\n" not in str(error.value)


def test_lerobot_identity_resize_and_crop_ratio_map(tmp_path: Path) -> None:
    """resize_shape equal to the frames is torchvision's no-op; crop_ratio then sets the crop."""
    make_lerobot_folder(tmp_path, separate=False, resize_shape=list(FRAME), crop_shape=None,
                        crop_ratio=0.92)
    encoder = import_lerobot(tmp_path).config["obs_encoder"]
    assert encoder["crop_shape"] == [int(36 * 0.92)] * 2 == list(CROP)


# ---------------------------------------------------- DP's MultiImageObsEncoder, synthetic
def dp_multi_image_cfg(**encoder: object) -> dict:
    """A DiffusionUnetImagePolicy cfg: cameras 'wrist' and 'agentview' (listed out of sorted
    order, with a low-dim key between them), DP's real-robot encoder settings."""
    shape_meta = {"obs": {"wrist": {"shape": [3, 36, 36], "type": "rgb"},
                          "robot_eef": {"shape": [3], "type": "low_dim"},
                          "agentview": {"shape": [3, 36, 36], "type": "rgb"},
                          "gripper": {"shape": [1], "type": "low_dim"}},
                  "action": {"shape": [2]}}
    settings = {"_target_": "diffusion_policy.model.vision.multi_image_obs_encoder."
                            "MultiImageObsEncoder",
                "shape_meta": shape_meta,
                "rgb_model": {"_target_": "diffusion_policy.model.vision.model_getter.get_resnet",
                              "name": "resnet18", "weights": None},
                "resize_shape": [36, 36], "crop_shape": list(CROP), "random_crop": True,
                "use_group_norm": True, "share_rgb_model": False, "imagenet_norm": True,
                **encoder}
    return {"_target_": "diffusion_policy.policy.diffusion_unet_image_policy."
                        "DiffusionUnetImagePolicy",
            "shape_meta": shape_meta, "obs_encoder": settings}


def dp_multi_image_weights(shared: bool) -> dict[str, torch.Tensor]:
    """Random torchvision-named resnet18 weights per camera (or one shared 'rgb' model) and
    DP's image range normaliser for both cameras."""
    g = torch.Generator().manual_seed(3)
    weights: dict[str, torch.Tensor] = {}
    for key in ["rgb"] if shared else ["wrist", "agentview"]:
        weights.update(random_resnet18(f"obs_encoder.key_model_map.{key}.", *TORCHVISION, g))
    for camera in ("wrist", "agentview"):
        weights[f"normalizer.params_dict.{camera}.scale"] = torch.tensor([2.0])
        weights[f"normalizer.params_dict.{camera}.offset"] = torch.tensor([-1.0])
    return weights


@pytest.mark.parametrize("shared", [False, True])
def test_dp_multi_image_encoder_maps_against_a_functional_twin(shared: bool) -> None:
    cfg = dp_multi_image_cfg(share_rgb_model=shared)
    weights = dp_multi_image_weights(shared)
    rgb = {"wrist": (3, 36, 36), "agentview": (3, 36, 36)}
    lowdim = {"robot_eef": 3, "gripper": 1}
    config, mapped = _dp_multi_image_encoder(cfg, rgb, lowdim, weights, "file")
    assert config["order"] == ["agentview", "wrist", "gripper", "robot_eef"]  # DP sorts both
    encoder = ImageObsEncoder(**{k: v for k, v in config.items() if k != "_target_"}).eval()
    encoder.load_state_dict(unprefixed(mapped, "obs_encoder."))
    g = torch.Generator().manual_seed(4)
    obs = {k: torch.randint(0, 256, (2, 2, 36, 36, 3), generator=g).float() for k in rgb}
    obs.update(robot_eef=torch.randn(2, 2, 3, generator=g), gripper=torch.randn(2, 2, 1,
                                                                                generator=g))
    parts = []
    for camera in ("agentview", "wrist"):  # DP's forward: the normaliser, then its transforms
        x = obs[camera].flatten(0, 1).permute(0, 3, 1, 2) / 255 * 2.0 - 1.0
        x = (x - torch.tensor([0.485, 0.456, 0.406]).reshape(3, 1, 1)) / torch.tensor(
            [0.229, 0.224, 0.225]).reshape(3, 1, 1)
        model = "rgb" if shared else camera
        x = functional_resnet18(torchvision_centre_crop(x, CROP), unprefixed(
            weights, f"obs_encoder.key_model_map.{model}."), *TORCHVISION)
        parts.append(F.adaptive_avg_pool2d(x, 1).flatten(1).reshape(2, 2, -1))
    expected = torch.cat([*parts, obs["gripper"], obs["robot_eef"]], dim=-1)
    assert relative(encoder(obs), expected) <= FEATURE_TOL


@pytest.mark.parametrize("encoder, message", [
    ({"rgb_model": {"_target_": "diffusion_policy.model.vision.model_getter.get_resnet",
                    "name": "resnet34"}}, "rgb_model.name='resnet34' does not map"),
    ({"rgb_model": {"_target_": "diffusion_policy.model.vision.model_getter.get_resnet",
                    "name": "resnet18", "weights": "r3m"}}, "weights=r3m does not map"),
    ({"use_group_norm": False}, "use_group_norm=False: the ResNet keeps its BatchNorm"),
    ({"resize_shape": [40, 40]}, "resize_shape \\[40, 40\\] resizes the 36 x 36 images"),
    ({"crop_shape": {"wrist": [33, 33], "agentview": [31, 31]}},
     "cameras cropped to different sizes"),
    ({"_target_": "my.Encoder"}, "_target_ Encoder does not map"),
])
def test_dp_multi_image_settings_that_do_not_map_are_one_line(encoder: dict,
                                                              message: str) -> None:
    rgb = {"wrist": (3, 36, 36), "agentview": (3, 36, 36)}
    with pytest.raises(ValueError, match=message):
        _dp_multi_image_encoder(dp_multi_image_cfg(**encoder), rgb, {}, dp_multi_image_weights(
            False), "file")


def test_dp_without_random_crop_never_crops() -> None:
    """DP's random_crop=False builds a CenterCrop and overwrites it: such a policy sees the
    whole frame, in training and eval."""
    rgb = {"wrist": (3, 36, 36), "agentview": (3, 36, 36)}
    config, _ = _dp_multi_image_encoder(dp_multi_image_cfg(random_crop=False,
                                                           share_rgb_model=True),
                                        rgb, {}, dp_multi_image_weights(True), "file")
    assert config["crop_shape"] == [36, 36] and config["shared_encoder"]


# -------------------------------------------------------------- DP hybrid: crafted files
def dp_hybrid_file(tmp_path: Path, policy: dict | None = None,
                   encoder_weights: dict[str, torch.Tensor] | None = None) -> Path:
    """A DP workspace file (plain pickle: the allow-list reads it) of a hybrid image policy
    with the given policy settings and observation-encoder weights, no UNet."""
    shape_meta = {"obs": {"image": {"shape": [3, 96, 96], "type": "rgb"},
                          "agent_pos": {"shape": [2], "type": "low_dim"}},
                  "action": {"shape": [2]}}
    cfg = {"policy": {
        "_target_": "diffusion_policy.policy.diffusion_unet_hybrid_image_policy."
                    "DiffusionUnetHybridImagePolicy",
        "shape_meta": shape_meta, "horizon": 16, "n_obs_steps": 2, "n_action_steps": 8,
        "noise_scheduler": {"_target_": "diffusers.DDPMScheduler", "num_train_timesteps": 100},
        "crop_shape": [84, 84], "obs_encoder_group_norm": True, "eval_fixed_crop": True,
        **(policy or {})}}
    path = tmp_path / "dp_hybrid.ckpt"
    torch.save({"cfg": cfg, "state_dicts": {"model": dict(encoder_weights or {})},
                "pickles": {}}, path)
    return path


def hybrid_camera(**extra: torch.Tensor) -> dict[str, torch.Tensor]:
    """A VisualCore's tensors, as few as the checks before the refusal under test read."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 3), torch.linspace(-1, 1, 3), indexing="ij")
    base = "obs_encoder.obs_nets.image."
    weights = {base + "nets.0.nets.0.weight": torch.ones(1),
               base + "nets.1.temperature": torch.ones(1),
               base + "nets.1.pos_x": xs.reshape(1, 9), base + "nets.1.pos_y": ys.reshape(1, 9)}
    weights.update({base + k: v for k, v in extra.items()})
    return weights


@pytest.mark.parametrize("policy, weights, message", [
    ({"obs_encoder_group_norm": False}, {}, "obs_encoder_group_norm=False: robomimic's"),
    ({"eval_fixed_crop": False}, {}, "eval_fixed_crop=False: robomimic's CropRandomizer"),
    ({"shape_meta": {"obs": {"depth": {"shape": [1, 8, 8], "type": "depth"}},
                     "action": {"shape": [2]}}}, {}, "type 'depth' does not map"),
    ({}, hybrid_camera(**{"nets.1.temperature": torch.tensor([2.0])}),
     "temperature \\[2.0\\] does not map"),
    ({"crop_shape": [64, 64]}, hybrid_camera(), "grid of the 2 x 2 map of a 64 x 64 input"),
    ({}, hybrid_camera(**{"nets.0.nets.1.running_var": torch.ones(1)}), "BatchNorm running"),
    ({}, hybrid_camera(**{"backbone.nets.0.weight": torch.zeros(1)}),
     "differs from its alias .*nets.0.nets.0.weight"),
])
def test_dp_hybrid_settings_that_do_not_map_are_one_line(tmp_path: Path, policy: dict,
                                                         weights: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        import_diffusion_policy(dp_hybrid_file(tmp_path, policy, weights))
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------ the numbers, printed
def measure() -> None:
    """Print every parity stage's max abs and relative error for both fixtures (the numbers
    of docs/results/import.md): `python tests/test_import_image.py`."""
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, fixtures {SHARED}")
    for name, path in PARITY.items():
        policy = load_policy(SHARED / path)
        ref = torch.load(SHARED / name / "reference.pt", weights_only=True)
        per_camera = (lambda k, r=ref: r[k]) if name.startswith("dp_") else (
            lambda k, r=ref: r[k][0])
        encoder = policy.obs_encoder
        with torch.no_grad():
            stages = encoder.camera_stages(encoder.camera_keys[0],
                                           ref["frames_uint8_hwc"].flatten(0, 1))
            obs = source_observations(name, ref)
            rows = [(label, stages[ours].reshape(per_camera(theirs).shape), per_camera(theirs))
                    for label, ours, theirs in (
                        ("encoder input", "input", "image_encoder_input"),
                        ("backbone map", "backbone", "backbone_features"),
                        ("keypoints", "pooled", "keypoints"),
                        ("image features", "features", "image_features"))]
            rows.append(("global_cond", policy.encode_obs(policy.check_obs(obs)),
                         ref["global_cond"]))
            rows.append(("UNet", policy.model(ref["unet_x"], ref["unet_t"],
                                              ref["unet_global_cond"]), ref["unet_out"]))
        action, sequential = policy.predict_action(obs, policy.make_sampler("sequential"),
                                                   noise=ref["noise"])
        picard_action, picard = policy.predict_action(
            obs, policy.make_sampler("picard", tol=1e-4), noise=ref["noise"])
        span = float(ref["action"].max() - ref["action"].min())
        print(f"\n{name}")
        for label, ours, theirs in rows:
            error = float((ours - theirs).abs().max())
            scale = float(theirs.abs().max())
            print(f"  {label:16s} max abs {error:.3g} / max |ref| {scale:.3g}: "
                  f"{error / scale:.3g}")
        for label, ours in (("sequential chunk", action), ("Picard tol 1e-4", picard_action)):
            error = float((ours - ref["action"]).abs().max())
            print(f"  {label:16s} action max abs {error:.3g} raw units / range {span:.1f}: "
                  f"{error / span:.3g}")
        gap = float(exact_errors(picard.sample, sequential.sample).max())
        print(f"  Picard tol 1e-4: {picard.rounds} rounds, converged {picard.converged}, "
              f"exact_err vs sequential {gap:.3g} (normalised)")


if __name__ == "__main__":
    measure()
