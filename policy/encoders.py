"""Observation encoders: a dict of per-key observations (B, To, ...) -> features (B, To, F).

`obs_shapes` names every key an encoder reads with its per-step shape, so the policy can check
observations at the boundary; `feature_dim` is F. The policy flattens (B, To, F) into the UNet's
global condition. Low-dim keys arrive normalized (LinearNormalizer); images in the env's and
the dataset's own layout, (H, W, C) with values in [0, 255] (uint8 or float).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class LowDimObsEncoder(nn.Module):
    """Identity encoder for a single low-dim observation key: (B, To, Do) -> (B, To, Do)."""

    def __init__(self, obs_dim: int, key: str = "obs"):
        super().__init__()
        if obs_dim < 1:
            raise ValueError(f"obs_encoder.obs_dim must be >= 1, got {obs_dim}")
        self.key = key
        self.obs_shapes = {key: (obs_dim,)}
        self.feature_dim = obs_dim

    def forward(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return obs[self.key]


class ConcatObsEncoder(nn.Module):
    """Several low-dim observation keys concatenated per step, in the given order:
    {key: (B, To, D_key)} -> (B, To, sum D_key). `aliases` maps other projects' key names to
    ours (e.g. LeRobot's "observation.state" -> "observation_state"; our keys must be Python
    identifiers, as the normalizer's buffers are named after them); a single (B, To, sum D)
    array is split into the keys in order (`DiffusionPolicy.check_obs`)."""

    def __init__(self, obs_dims: Mapping[str, int], aliases: Mapping[str, str] | None = None):
        super().__init__()
        if not obs_dims:
            raise ValueError("obs_encoder.obs_dims must name at least one key")
        bad = [k for k, d in obs_dims.items() if not k.isidentifier() or int(d) < 1]
        if bad:
            raise ValueError(f"obs_encoder.obs_dims: keys must be identifiers with dims >= 1; "
                             f"bad: {bad}")
        self.obs_shapes = {key: (int(dim),) for key, dim in obs_dims.items()}
        self.aliases = dict(aliases or {})
        self.feature_dim = sum(int(d) for d in obs_dims.values())

    def forward(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([obs[key] for key in self.obs_shapes], dim=-1)


# --- ResNet-18 trunk (plain torch; torchvision is unusable with this CPU torch) ------------


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm in place of BatchNorm (as DP): 16 channels per group."""
    return nn.GroupNorm(max(1, channels // 16), channels)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with a (projected when shape changes) identity skip."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.norm1 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.norm2 = _group_norm(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                _group_norm(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18Trunk(nn.Sequential):
    """ResNet-18 without its pooling and classifier: (N, C, h, w) -> (N, 8*width, h/32, w/32)."""

    def __init__(self, in_channels: int = 3, width: int = 64):
        widths = [width, 2 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, width, 7, 2, 3, bias=False),
            _group_norm(width),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        ]
        c_in = width
        for i, c_out in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        super().__init__(*layers)
        self.out_channels = c_in


class SpatialSoftmax(nn.Module):
    """Keypoints from a feature map: 1x1 conv to K maps, softmax over pixels, expected (x, y).

    (N, C, h, w) -> (N, 2K) with coordinates in [-1, 1] (Finn et al. 2016, as in robomimic).
    """

    def __init__(self, in_channels: int, num_keypoints: int = 32):
        super().__init__()
        self.num_keypoints = num_keypoints
        self.to_keypoints = nn.Conv2d(in_channels, num_keypoints, 1)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        n, _, h, w = feat.shape
        attn = self.to_keypoints(feat).flatten(2).softmax(dim=-1)  # (N, K, h*w)
        ys = torch.linspace(-1.0, 1.0, h, device=feat.device, dtype=feat.dtype)
        xs = torch.linspace(-1.0, 1.0, w, device=feat.device, dtype=feat.dtype)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack([grid_x.flatten(), grid_y.flatten()], dim=-1)  # (h*w, 2)
        return (attn @ grid).reshape(n, 2 * self.num_keypoints)


CROP_ROUNDINGS = ("floor", "round")
"""How a centred crop's top-left corner is placed: (size - crop) // 2 ("floor", ours), or
torchvision's `center_crop`, int(round((size - crop) / 2)) with Python's round-half-to-even
("round", DP's and LeRobot's eval crop); they differ when size - crop is 3 mod 4."""


def centre_offset(size: int, crop: int, rounding: str = "floor") -> int:
    """Top (or left) of a `crop`-long window centred in `size` under `rounding` (CROP_ROUNDINGS)."""
    if rounding == "floor":
        return (size - crop) // 2
    if rounding == "round":
        return int(round((size - crop) / 2.0))
    raise ValueError(f"crop_rounding must be one of {CROP_ROUNDINGS}; got {rounding!r}")


def crop_images(x: torch.Tensor, size: tuple[int, int], random: bool,
                rounding: str = "floor") -> torch.Tensor:
    """Crop (N, C, h, w) to (N, C, *size): an independent random window per image, or centred
    (its corner placed by `rounding`, see CROP_ROUNDINGS)."""
    n, _, h, w = x.shape
    ch, cw = size
    if (ch, cw) == (h, w):
        return x
    if not random:
        top, left = centre_offset(h, ch, rounding), centre_offset(w, cw, rounding)
        return x[:, :, top : top + ch, left : left + cw]
    top = torch.randint(0, h - ch + 1, (n, 1, 1), device=x.device)
    left = torch.randint(0, w - cw + 1, (n, 1, 1), device=x.device)
    rows = top + torch.arange(ch, device=x.device)[None, :, None]  # (N, ch, 1)
    cols = left + torch.arange(cw, device=x.device)[None, None, :]  # (N, 1, cw)
    batch = torch.arange(n, device=x.device)[:, None, None]
    return x.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


class ImageNormalization(nn.Module):
    """Per-channel `(frames / 255 - mean) / std` of (N, C, h, w) frames in [0, 255]: LeRobot's
    MEAN_STD (std already holding its + eps) and DP's range normaliser (mean = std = 0.5 gives
    DP's `x * 2 - 1` of x = frames / 255 bit for bit). Its statistics are settings, not
    weights: non-persistent buffers, so they never appear in a state dict."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], channels: int):
        super().__init__()
        values = [float(v) for v in (*mean, *std)]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"image_mean / image_std need {channels} values (one per channel); "
                             f"got {len(mean)} and {len(std)}")
        if not all(math.isfinite(v) for v in values) or min(float(v) for v in std) <= 0:
            raise ValueError("image_mean must be finite and image_std finite and > 0; got "
                             f"{list(mean)}, {list(std)}")
        self.register_buffer("mean", torch.tensor([float(v) for v in mean]).reshape(-1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor([float(v) for v in std]).reshape(-1, 1, 1),
                             persistent=False)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) in [0, 255] -> normalised float32."""
        return (frames.float() / 255 - self.mean) / self.std


FEATURE_ACTIVATIONS = (None, "relu")
"""What follows a camera's feature layer: nothing (ours), or ReLU (robomimic's
`ObservationEncoder` in DP's hybrid policy, LeRobot's `DiffusionRgbEncoder`)."""
POOLS = ("spatial_softmax", "avg")
"""How a camera's ResNet map becomes a vector: SpatialSoftmax keypoints (ours, DP's hybrid
policy, LeRobot), or torchvision's global average pool (DP's `MultiImageObsEncoder`)."""


@dataclass(frozen=True)
class CameraSettings:
    """How each camera of an ImageObsEncoder is encoded (each default is the original
    behaviour): the `crop_shape` (h, w) taken from every frame, `num_keypoints` of the spatial
    softmax, `feature_dim` of the feature layer (None: no layer, F = the pooled size), the
    ResNet `width`, `feature_activation` after the feature layer (FEATURE_ACTIVATIONS),
    `crop_rounding` of the eval crop (CROP_ROUNDINGS), `pool` (POOLS), `random_crop=False`
    for the centre crop in training too. These are keys of an `obs_encoder` config (flat,
    beside image_shapes). Checked when built; whether the crop fits is checked per camera."""

    crop_shape: Sequence[int] = (84, 84)
    num_keypoints: int = 32
    feature_dim: int | None = 64
    width: int = 64
    feature_activation: str | None = None
    crop_rounding: str = "floor"
    pool: str = "spatial_softmax"
    random_crop: bool = True

    def __post_init__(self) -> None:
        if self.feature_activation not in FEATURE_ACTIVATIONS:
            raise ValueError(f"feature_activation must be one of {FEATURE_ACTIVATIONS}; got "
                             f"{self.feature_activation!r}")
        if self.crop_rounding not in CROP_ROUNDINGS:
            raise ValueError(f"crop_rounding must be one of {CROP_ROUNDINGS}; got "
                             f"{self.crop_rounding!r}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}; got {self.pool!r}")


class CameraEncoder(nn.Module):
    """One camera: (H, W, C) [0, 255] -> crop -> [-1, 1] -> ResNet-18 -> keypoints -> F.

    `settings` (CameraSettings) holds the options. Another normalisation than [-1, 1] is passed
    in by the caller (`ImageNormalization`, per camera: a shared encoder sees several cameras).
    """

    def __init__(self, image_shape: Sequence[int], settings: CameraSettings):
        super().__init__()
        crop_shape, num_keypoints = settings.crop_shape, settings.num_keypoints
        feature_dim, width, pool = settings.feature_dim, settings.width, settings.pool
        h, w, c = image_shape
        ch, cw = crop_shape
        if not (0 < ch <= h and 0 < cw <= w):
            raise ValueError(f"crop_shape {tuple(crop_shape)} must fit inside image (h, w)={h, w}")
        self.crop_shape = (ch, cw)
        self.crop_rounding = settings.crop_rounding
        self.random_crop = bool(settings.random_crop)
        self.feature_activation = settings.feature_activation
        self.pool = pool
        self.trunk = ResNet18Trunk(c, width)
        if pool == "spatial_softmax":
            self.keypoints = SpatialSoftmax(self.trunk.out_channels, num_keypoints)
            pooled = 2 * num_keypoints
        else:
            pooled = self.trunk.out_channels
        self.project = nn.Linear(pooled, feature_dim) if feature_dim is not None else None
        self.feature_dim = pooled if feature_dim is None else feature_dim

    def stages(self, images: torch.Tensor, normalization: nn.Module | None = None
               ) -> dict[str, torch.Tensor]:
        """(N, H, W, C) in [0, 255] -> every intermediate: `input` (N, C, ch, cw) what the
        ResNet sees, `backbone` its map, `pooled` (N, 2K) keypoints x0, y0, x1, ... (or the
        average pool), `features` (N, F). Random crop in training, centre at eval."""
        x = crop_images(images.permute(0, 3, 1, 2), self.crop_shape,
                        random=self.training and self.random_crop, rounding=self.crop_rounding)
        x = x.float() / 127.5 - 1.0 if normalization is None else normalization(x)
        backbone = self.trunk(x)
        if self.pool == "spatial_softmax":
            pooled = self.keypoints(backbone)
        else:
            pooled = backbone.mean(dim=(2, 3))
        features = pooled if self.project is None else self.project(pooled)
        if self.feature_activation == "relu":
            features = F.relu(features)
        return {"input": x, "backbone": backbone, "pooled": pooled, "features": features}

    def forward(self, images: torch.Tensor, normalization: nn.Module | None = None
                ) -> torch.Tensor:
        """(N, H, W, C) in [0, 255] -> (N, F); random crop in training, centre at eval."""
        return self.stages(images, normalization)["features"]


class ImageObsEncoder(nn.Module):
    """Several cameras (one trunk each) plus low-dim keys, concatenated: -> (B, To, F).

    F = len(image_shapes) * feature_dim + sum of the low-dim key sizes. Cameras take frames
    (B, To, H, W, C) in [0, 255], whatever project the weights came from.

    `camera` holds the CameraSettings keys (crop_shape, num_keypoints, feature_dim, width,
    feature_activation, crop_rounding, pool, random_crop), flat beside the others as in an
    `obs_encoder` config; KEYWORD_SETTINGS tells policy.safe_config they are settings too.
    Options for other projects' encoders (policy/foreign.py; each default keeps the original
    behaviour and state-dict names): `feature_activation`, `crop_rounding`, `pool`,
    `random_crop` (see CameraSettings); `image_mean` / `image_std` {camera: per-channel values}
    for `(frames / 255 - mean) / std` instead of `frames / 127.5 - 1`; `order`, the keys in the
    order their features are concatenated per step (default: cameras, then low-dim keys);
    `shared_encoder`, one trunk for every camera (held under the first camera's name);
    `aliases`, other names of the observation keys (see ConcatObsEncoder).
    """

    KEYWORD_SETTINGS = CameraSettings
    """The record whose fields `**camera` takes (what a config may set besides the named
    parameters)."""

    def __init__(
        self,
        image_shapes: Mapping[str, Sequence[int]],
        lowdim_shapes: Mapping[str, Sequence[int]] | None = None,
        image_mean: Mapping[str, Sequence[float]] | None = None,
        image_std: Mapping[str, Sequence[float]] | None = None,
        order: Sequence[str] | None = None,
        shared_encoder: bool = False,
        aliases: Mapping[str, str] | None = None,
        **camera: Any,
    ):
        super().__init__()
        if not image_shapes:
            raise ValueError("obs_encoder.image_shapes must name at least one camera, got {}")
        lowdim_shapes = dict(lowdim_shapes or {})
        for key, shape in image_shapes.items():
            if len(shape) != 3:
                raise ValueError(
                    f"obs_encoder.image_shapes['{key}'] must be (H, W, C), got {shape}"
                )
        self.camera_keys = list(image_shapes)
        self.shared_encoder = bool(shared_encoder)
        if self.shared_encoder and len({tuple(s) for s in image_shapes.values()}) != 1:
            raise ValueError("obs_encoder.shared_encoder needs cameras of one shape; got "
                             f"{dict(image_shapes)}")
        unknown = sorted(set(camera) - {f.name for f in dataclasses.fields(CameraSettings)})
        if unknown:
            raise TypeError(f"ImageObsEncoder.__init__() got an unexpected keyword argument "
                            f"{unknown[0]!r}")
        settings = CameraSettings(**camera)
        owners = self.camera_keys[:1] if self.shared_encoder else self.camera_keys
        self.cameras = nn.ModuleDict({
            key: CameraEncoder(image_shapes[key], settings) for key in owners
        })
        if (image_mean is None) != (image_std is None):
            raise ValueError("obs_encoder.image_mean and image_std go together; got only one")
        if image_mean is not None and image_std is not None:
            if set(image_mean) != set(image_shapes) or set(image_std) != set(image_shapes):
                raise ValueError("obs_encoder.image_mean / image_std must name every camera "
                                 f"({list(image_shapes)}); got {list(image_mean)}, "
                                 f"{list(image_std)}")
            self.normalizations = nn.ModuleDict({
                key: ImageNormalization(image_mean[key], image_std[key], int(shape[2]))
                for key, shape in image_shapes.items()
            })
        keys = [*image_shapes, *lowdim_shapes]
        order = list(keys if order is None else order)
        if sorted(order) != sorted(keys):
            raise ValueError(f"obs_encoder.order must list every observation key once ({keys}); "
                             f"got {order}")
        self.order = order
        self.lowdim_keys = list(lowdim_shapes)
        self.aliases = dict(aliases or {})
        shapes = {**image_shapes, **lowdim_shapes}
        self.obs_shapes = {k: tuple(shapes[k]) for k in order}
        camera_dim = next(iter(self.cameras.values())).feature_dim
        self.feature_dim = len(image_shapes) * camera_dim + sum(
            math.prod(s) for s in lowdim_shapes.values()
        )

    def camera_stages(self, key: str, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Camera `key`'s frames (N, H, W, C) in [0, 255] -> its encoder's intermediates
        (CameraEncoder.stages) with its own normalisation, through the shared trunk if any."""
        camera = self.cameras[self.camera_keys[0] if self.shared_encoder else key]
        normalizations = getattr(self, "normalizations", None)
        return camera.stages(images, None if normalizations is None else normalizations[key])

    def forward(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """obs[camera] (B, To, H, W, C), obs[lowdim] (B, To, ...) -> (B, To, F)."""
        features = {}
        for key in self.camera_keys:
            images = obs[key]
            b, to = images.shape[:2]
            features[key] = self.camera_stages(key, images.flatten(0, 1))["features"].reshape(
                b, to, -1)
        for key in self.lowdim_keys:
            features[key] = obs[key].flatten(2)
        return torch.cat([features[key] for key in self.order], dim=-1)


def camera_shapes(policy: nn.Module) -> dict[str, tuple[int, ...]]:
    """{camera key: (H, W, C)} of a policy whose encoder reads images (ImageObsEncoder's
    `camera_keys`: every camera, also when one encoder is shared); empty for a low-dim
    policy. What a SequenceDataset needs (`image_shapes`) to hand that policy its frames."""
    encoder = policy.obs_encoder
    keys = getattr(encoder, "camera_keys", list(getattr(encoder, "cameras", {})))
    return {key: tuple(encoder.obs_shapes[key]) for key in keys}
