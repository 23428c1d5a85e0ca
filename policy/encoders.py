"""Observation encoders: a dict of per-key observations (B, To, ...) -> features (B, To, F).

`obs_shapes` names every key an encoder reads with its per-step shape, so the policy can check
observations at the boundary; `feature_dim` is F. The policy flattens (B, To, F) into the UNet's
global condition. Low-dim keys arrive normalized (LinearNormalizer); images in the env's and
the dataset's own layout, (H, W, C) with values in [0, 255] (uint8 or float).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

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


def crop_images(x: torch.Tensor, size: tuple[int, int], random: bool) -> torch.Tensor:
    """Crop (N, C, h, w) to (N, C, *size): an independent random window per image, or centred."""
    n, _, h, w = x.shape
    ch, cw = size
    if (ch, cw) == (h, w):
        return x
    if not random:
        top, left = (h - ch) // 2, (w - cw) // 2
        return x[:, :, top : top + ch, left : left + cw]
    top = torch.randint(0, h - ch + 1, (n, 1, 1), device=x.device)
    left = torch.randint(0, w - cw + 1, (n, 1, 1), device=x.device)
    rows = top + torch.arange(ch, device=x.device)[None, :, None]  # (N, ch, 1)
    cols = left + torch.arange(cw, device=x.device)[None, None, :]  # (N, 1, cw)
    batch = torch.arange(n, device=x.device)[:, None, None]
    return x.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


class CameraEncoder(nn.Module):
    """One camera: (H, W, C) [0, 255] -> crop -> [-1, 1] -> ResNet-18 -> keypoints -> F."""

    def __init__(
        self,
        image_shape: Sequence[int],
        crop_shape: Sequence[int],
        num_keypoints: int,
        feature_dim: int,
        width: int,
    ):
        super().__init__()
        h, w, c = image_shape
        ch, cw = crop_shape
        if not (0 < ch <= h and 0 < cw <= w):
            raise ValueError(f"crop_shape {tuple(crop_shape)} must fit inside image (h, w)={h, w}")
        self.crop_shape = (ch, cw)
        self.trunk = ResNet18Trunk(c, width)
        self.keypoints = SpatialSoftmax(self.trunk.out_channels, num_keypoints)
        self.project = nn.Linear(2 * num_keypoints, feature_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, H, W, C) in [0, 255] -> (N, F); random crop in training, centre at eval."""
        x = crop_images(images.permute(0, 3, 1, 2), self.crop_shape, random=self.training)
        x = x.float() / 127.5 - 1.0
        return self.project(self.keypoints(self.trunk(x)))


class ImageObsEncoder(nn.Module):
    """Several cameras (one trunk each) plus low-dim keys, concatenated: -> (B, To, F).

    F = len(image_shapes) * feature_dim + sum of the low-dim key sizes.
    """

    def __init__(
        self,
        image_shapes: Mapping[str, Sequence[int]],
        lowdim_shapes: Mapping[str, Sequence[int]] | None = None,
        crop_shape: Sequence[int] = (84, 84),
        num_keypoints: int = 32,
        feature_dim: int = 64,
        width: int = 64,
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
        self.cameras = nn.ModuleDict({
            key: CameraEncoder(shape, crop_shape, num_keypoints, feature_dim, width)
            for key, shape in image_shapes.items()
        })
        self.lowdim_keys = list(lowdim_shapes)
        self.obs_shapes = {k: tuple(s) for k, s in {**image_shapes, **lowdim_shapes}.items()}
        self.feature_dim = len(image_shapes) * feature_dim + sum(
            math.prod(s) for s in lowdim_shapes.values()
        )

    def forward(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """obs[camera] (B, To, H, W, C), obs[lowdim] (B, To, ...) -> (B, To, F)."""
        features = []
        for key, camera in self.cameras.items():
            images = obs[key]
            b, to = images.shape[:2]
            features.append(camera(images.flatten(0, 1)).reshape(b, to, -1))
        features += [obs[key].flatten(2) for key in self.lowdim_keys]
        return torch.cat(features, dim=-1)
