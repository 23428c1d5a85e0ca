"""Other projects' Diffusion Policies as ours: real-stanford/diffusion_policy workspace
checkpoints and LeRobot diffusion pretrained-model folders (current and old layouts).

Each importer reads the source's settings (horizon, To, Ta, scheduler type and steps, betas,
clipping, prediction type, UNet sizes and conditioning, normaliser statistics, observation
order) and returns an `Imported`: the Hydra config of the equivalent `DiffusionPolicy` plus its
state dict, so a loaded policy is built exactly as one of our checkpoints is (and
`scripts/import_policy.py` can write it as one). Camera policies (DP's hybrid and image
policies, LeRobot with one or more cameras) become an `ImageObsEncoder` with the options that
reproduce the source's image path (normalisation, eval crop rounding, feature activation or
average pool, per-step order, shared or per-camera encoders). What does not map is refused with
one line naming the setting. The mapping facts (key names, DP's 8-group final block, bias-only
FiLM, each source's feature order, normalisation and image conventions) are in docs/design.md
§10.

A DP checkpoint is a pickle (saved with dill) holding an OmegaConf config: it is unpickled with
an allow-list of the classes such a file holds (OmegaConf containers, tensors, builtins), and
anything else is refused with the class named, so loading someone's file runs none of its code.
"""

from __future__ import annotations

import _compat_pickle
import ast
import io
import json
import math
import operator
import pickle
import re
import types
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FORMATS = ("picard", "diffusion_policy", "lerobot")

# ---------------------------------------------------------------------------- safe unpickle
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"), ("collections", "defaultdict"), ("typing", "Any"),
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "set"),
    ("builtins", "frozenset"), ("builtins", "int"), ("builtins", "float"), ("builtins", "str"),
    ("builtins", "bool"), ("builtins", "bytes"), ("builtins", "slice"), ("builtins", "complex"),
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"), ("torch", "Size"), ("torch", "device"),
    ("torch", "dtype"), ("torch.nn.parameter", "Parameter"), ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"), ("pathlib", "Path"), ("pathlib", "PurePosixPath"),
    ("omegaconf.dictconfig", "DictConfig"), ("omegaconf.listconfig", "ListConfig"),
    ("omegaconf.base", "ContainerMetadata"), ("omegaconf.base", "Metadata"),
    *(("omegaconf.nodes", node) for node in (
        "AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "BytesNode",
        "PathNode", "ValueNode", "InterpolationResultNode")),
}
"""Exactly the (module, name) pairs a DP workspace checkpoint needs; a dotted name (a method or
attribute reached through an allowed class, e.g. `Path.write_text`) never matches."""
_DILL_TYPES = {"dict": dict, "list": list, "tuple": tuple, "set": set, "frozenset": frozenset,
               "int": int, "float": float, "str": str, "bool": bool, "bytes": bytes,
               "NoneType": type(None), "object": object}


def _dill_load_type(name: str) -> type:
    """dill's `_load_type` for builtin types only (what a DP checkpoint's config needs)."""
    if name not in _DILL_TYPES:
        raise pickle.UnpicklingError(f"refusing to load the type {name!r} from a pickle")
    return _DILL_TYPES[name]


class AllowListUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only allow-listed globals; anything else (which could run
    code on load) is refused with the class named."""

    def find_class(self, module: str, name: str) -> Any:
        # protocol-2 pickles name Python 2 modules (__builtin__.dict): map them first
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) == ("dill._dill", "_load_type"):
            return _dill_load_type
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to unpickle {module}.{name}: not one of the classes a Diffusion Policy "
            "checkpoint holds (loading it could run arbitrary code)"
        )


_SAFE_PICKLE = types.SimpleNamespace(
    __name__="picard_safe_pickle", Unpickler=AllowListUnpickler, load=pickle.load,
    UnpicklingError=pickle.UnpicklingError,
)


def safe_torch_load(path: str | Path) -> Any:
    """torch.load of a full pickle (not weights-only) through AllowListUnpickler, on the CPU."""
    return torch.load(path, map_location="cpu", pickle_module=_SAFE_PICKLE, weights_only=False)


_ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
               ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
               ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}
MAX_EXPRESSION = 200
"""Longest `${eval:...}` expression evaluated (DP's are ~30 characters)."""
MAX_MAGNITUDE = 1e15
"""Largest |value| of any operand or intermediate result of an expression."""


def safe_arithmetic(expression: str) -> int | float:
    """DP's `${eval:...}` config resolver for what its configs use it for (arithmetic on
    numbers), without Python's eval and bounded: at most MAX_EXPRESSION characters, operands
    and every intermediate result within MAX_MAGNITUDE, exponents within 64 (so `9**9**9`
    is refused at once instead of hanging). ValueError naming the expression otherwise."""
    text = str(expression)
    if len(text) > MAX_EXPRESSION:
        raise ValueError(f"refusing to evaluate an expression of {len(text)} characters "
                         f"(at most {MAX_EXPRESSION})")

    def bounded(result: Any) -> int | float:
        if isinstance(result, complex) or abs(result) > MAX_MAGNITUDE:
            raise ValueError(f"refusing to evaluate {text!r}: a value exceeds {MAX_MAGNITUDE:g}")
        return result

    def value(node: ast.AST) -> int | float:
        if (isinstance(node, ast.Constant) and isinstance(node.value, int | float)
                and not isinstance(node.value, bool)):
            return bounded(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError(f"refusing to evaluate {text!r}: exponent {right} beyond 64")
            try:
                return bounded(_ARITHMETIC[type(node.op)](left, right))
            except (ZeroDivisionError, OverflowError) as e:
                raise ValueError(f"refusing to evaluate {text!r}: {e}") from e
        if isinstance(node, ast.UnaryOp) and type(node.op) in _ARITHMETIC:
            return bounded(_ARITHMETIC[type(node.op)](value(node.operand)))
        raise ValueError(f"refusing to evaluate {text!r}: only arithmetic on numbers")

    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"refusing to evaluate {text!r}: not an arithmetic expression") from e
    return value(tree.body)


_REFERENCE = re.compile(r"\$\{([A-Za-z_][\w.]*)\}")
_EVAL = re.compile(r"^\$\{eval:(['\"])(.*)\1\}$", re.DOTALL)


def resolve_config(value: Any, root: Mapping[str, Any], where: str, path: str,
                   depth: int = 0) -> Any:
    """A DP config subtree with its interpolations resolved the safe way: `${a.b}` references
    to other keys of the same config and `${eval:'...'}` arithmetic (`safe_arithmetic`) only;
    any other resolver (`oc.env`, `oc.decode`, `now`, ...) is refused, naming the key, so
    nothing outside the file (an environment variable, a clock) gets into the policy."""
    if depth > 32:
        raise ValueError(f"{where}: cfg.{path}: interpolations nest too deeply (a cycle?)")
    if isinstance(value, Mapping):
        return {k: resolve_config(v, root, where, f"{path}.{k}", depth) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [resolve_config(v, root, where, f"{path}[{i}]", depth)
                for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value
    whole = _REFERENCE.fullmatch(value)
    if whole:
        return resolve_config(_lookup(root, whole.group(1), where, path), root, where, path,
                              depth + 1)

    def substitute(text: str) -> str:
        return _REFERENCE.sub(lambda m: str(resolve_config(
            _lookup(root, m.group(1), where, path), root, where, path, depth + 1)), text)

    evaluated = _EVAL.match(value)
    if evaluated:
        inner = substitute(evaluated.group(2))
        if "${" not in inner:
            try:
                return safe_arithmetic(inner)
            except ValueError as e:
                raise ValueError(f"{where}: cfg.{path}: {e}") from e
    else:
        text = substitute(value)
        if "${" not in text:
            return text
    resolver = re.search(r"\$\{([^:}]*)", value)
    raise ValueError(f"{where}: cfg.{path} = {value[:80]!r} uses the resolver or interpolation "
                     f"{resolver.group(1) if resolver else '?'!r}; only ${{key}} references and "
                     "${eval:'arithmetic'} are resolved from a file")


def _lookup(root: Mapping[str, Any], dotted: str, where: str, path: str) -> Any:
    """root[a][b] for 'a.b'; ValueError naming the key when it is missing."""
    node: Any = root
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ValueError(f"{where}: cfg.{path} refers to ${{{dotted}}}, which the config "
                             "does not have")
        node = node[part]
    return node


# ------------------------------------------------------------------------------- the result
@dataclass
class Imported:
    """An imported policy: the Hydra config of the equivalent DiffusionPolicy, its weights,
    and where it came from (format, path, step, the source's settings)."""

    config: dict[str, Any]
    weights: dict[str, torch.Tensor]
    source: dict[str, Any] = field(default_factory=dict)

    def build(self, map_location: str | torch.device = "cpu") -> Any:
        """The DiffusionPolicy (built from the allow-list, `policy.safe_config`), weights
        checked and loaded strictly, in eval mode."""
        from policy.safe_config import build_policy

        where = str(self.source.get("path", "imported policy"))
        return build_policy(self.config, where, weights=self.weights).to(map_location).eval()


# ------------------------------------------------------------------------------- UNet keys
_UNET_RENAMES = (
    (r"^diffusion_step_encoder\.", "step_encoder."),
    (r"^down_modules\.", "down."),
    (r"^mid_modules\.", "mid."),
    (r"^up_modules\.", "up."),
    (r"^final_conv\.0\.block\.", "final.0."),
    (r"^final_conv\.1\.", "final.1."),
    (r"\.blocks\.0\.block\.", ".conv1."),  # DP: blocks[0], blocks[1]
    (r"\.blocks\.1\.block\.", ".conv2."),
    (r"\.conv([12])\.block\.", r".conv\1."),  # LeRobot: conv1, conv2
    (r"\.cond_encoder\.1\.", ".film.1."),
    (r"\.residual_conv\.", ".residual."),
    (r"^(down|up)\.(\d+)\.2\.conv\.", r"\1.\2.2."),  # DP's Downsample1d / Upsample1d .conv
)


def rename_unet_keys(weights: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """DP's / LeRobot's ConditionalUnet1D state dict (keys under `prefix`) in our names,
    prefixed `model.` as in a DiffusionPolicy."""
    renamed = {}
    for key, value in weights.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        for pattern, replacement in _UNET_RENAMES:
            name = re.sub(pattern, replacement, name)
        renamed[f"model.{name}"] = value.float()
    return renamed


def _unet_config(down_dims: Any, kernel_size: int, n_groups: int, step_embed_dim: int,
                 predict_scale: bool) -> dict[str, Any]:
    """Our ConditionalUnet1D config (partial: the policy passes input and condition sizes);
    DP's and LeRobot's final block always has 8 GroupNorm groups."""
    return {
        "_target_": "policy.unet.ConditionalUnet1D", "_partial_": True,
        "down_dims": [int(d) for d in down_dims], "kernel_size": int(kernel_size),
        "n_groups": int(n_groups), "diffusion_step_embed_dim": int(step_embed_dim),
        "cond_predict_scale": bool(predict_scale), "final_n_groups": 8,
    }


def _schedules(kind: str, settings: Mapping[str, Any], steps: int | None) -> dict[str, Any]:
    """train_schedule (DDPM with the source's training settings) and inference_schedule (the
    source's scheduler class and inference steps) configs."""
    steps = int(settings["num_train_timesteps"]) if steps is None else int(steps)
    train = {"_target_": "picard_sampler.DDPMSchedule", **settings,
             "num_inference_steps": int(settings["num_train_timesteps"])}
    target = {"ddpm": "picard_sampler.DDPMSchedule", "ddim": "picard_sampler.DDIMSchedule"}[kind]
    return {"train_schedule": train,
            "inference_schedule": {"_target_": target, **settings, "num_inference_steps": steps}}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _training_settings(source: Mapping[str, Any], what: str) -> dict[str, Any]:
    """Our schedule's training settings from diffusers-style scheduler arguments, refusing the
    ones our schedules do not implement."""
    prediction = source.get("prediction_type", "epsilon")
    _require(prediction == "epsilon", f"{what}: prediction_type {prediction!r} is not supported "
                                      "(only 'epsilon')")
    variance = source.get("variance_type", "fixed_small")
    _require(variance == "fixed_small", f"{what}: variance_type {variance!r} is not supported "
                                        "(only 'fixed_small')")
    spacing = source.get("timestep_spacing", "leading")
    _require(spacing == "leading", f"{what}: timestep_spacing {spacing!r} is not supported "
                                   "(only 'leading', diffusers' default)")
    _require(bool(source.get("set_alpha_to_one", True)), f"{what}: set_alpha_to_one=False is "
                                                         "not supported")
    _require(int(source.get("steps_offset", 0)) == 0, f"{what}: steps_offset != 0 is not "
                                                      "supported")
    beta_schedule = source.get("beta_schedule", "linear")
    _require(beta_schedule in ("linear", "squaredcos_cap_v2"),
             f"{what}: beta_schedule {beta_schedule!r} is not supported")
    return {
        "num_train_timesteps": _int_field(source, "num_train_timesteps", what, "", 1000),
        "beta_schedule": beta_schedule,
        "beta_start": _float_field(source, "beta_start", what, 1e-4),
        "beta_end": _float_field(source, "beta_end", what, 0.02),
        "clip_sample": bool(source.get("clip_sample", True)),
        "clip_sample_range": _float_field(source, "clip_sample_range", what, 1.0),
        "prediction_type": "epsilon",
    }


def _float_field(config: Mapping[str, Any], key: str, where: str, default: float) -> float:
    """config[key] as a finite float; ValueError naming the field otherwise."""
    value = config.get(key, default)
    try:
        if isinstance(value, bool):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {key} must be a number; got {value!r:.60}") from None
    _require(math.isfinite(number), f"{where}: {key} must be finite; got {value!r:.60}")
    return number


def _linear_normalizer(key: str, scale: torch.Tensor, offset: torch.Tensor, low: torch.Tensor,
                       high: torch.Tensor) -> dict[str, torch.Tensor]:
    """Our LinearNormalizer buffers for `key` (normalized = x * scale + offset)."""
    return {f"normalizer.{key}_scale": scale.float(), f"normalizer.{key}_offset": offset.float(),
            f"normalizer.{key}_input_min": low.float(), f"normalizer.{key}_input_max": high.float()}


# --------------------------------------------------------------------------- camera encoders
_TRUNK_BLOCK = re.compile(r"^([4-7])\.([01])\.(.+)$")
_BLOCK_PARTS = {"conv1.weight": "conv1.weight", "conv2.weight": "conv2.weight",
                "bn1.weight": "norm1.weight", "bn1.bias": "norm1.bias",
                "bn2.weight": "norm2.weight", "bn2.bias": "norm2.bias",
                "downsample.0.weight": "shortcut.0.weight",
                "downsample.1.weight": "shortcut.1.weight", "downsample.1.bias": "shortcut.1.bias"}
_BATCHNORM_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
GRID_TOLERANCE = 1e-6
"""Largest |difference| between a source's SpatialSoftmax position buffer and the grid ours
computes (numpy's float64 linspace rounded to float32 against torch's)."""


def rename_resnet18_trunk(weights: Mapping[str, torch.Tensor], layout: str, where: str,
                          what: str) -> dict[str, torch.Tensor]:
    """A torchvision resnet18 trunk's weights (names relative to it) in our ResNet18Trunk names
    (`trunk.<i>.`), so one map serves every source. `layout` "children": the
    `nn.Sequential(*list(resnet.children())[:-2])` of robomimic and LeRobot (0 conv1, 1 bn1,
    4..7 layer1..layer4); "torchvision": the model itself (conv1, bn1, layer1..4; DP's
    `get_resnet`, whose fc is an Identity). Only GroupNorm in place of BatchNorm maps: running
    statistics, a classifier head or a block ResNet-18 lacks are refused, the weight named."""
    out = {}
    for original, value in weights.items():
        name = original
        if layout == "torchvision":
            name = re.sub(r"^conv1\.", "0.", name)
            name = re.sub(r"^bn1\.", "1.", name)
            name = re.sub(r"^layer([1-4])\.", lambda m: f"{int(m.group(1)) + 3}.", name)
        _require(not name.endswith(_BATCHNORM_STATISTICS),
                 f"{where}: {what} holds BatchNorm running statistics ({original}); only a "
                 "backbone with GroupNorm in place of BatchNorm maps")
        if name in ("0.weight", "1.weight", "1.bias"):
            out[f"trunk.{name}"] = value
            continue
        block = _TRUNK_BLOCK.match(name)
        part = _BLOCK_PARTS.get(block.group(3)) if block else None
        _require(block is not None and part is not None,
                 f"{where}: {what} weight {original!r} does not map onto a ResNet-18 trunk "
                 "(only resnet18 with GroupNorm maps)")
        index = 4 + 2 * (int(block.group(1)) - 4) + int(block.group(2))
        out[f"trunk.{index}.{part}"] = value
    return out


def trunk_map_size(side: int) -> int:
    """The side of ResNet-18's last feature map for an input side `side` (the 7x7 stride-2
    conv, the max pool and layer2..layer4 each halve it, rounding up)."""
    side = (side + 2 * 3 - 7) // 2 + 1
    for _ in range(4):
        side = (side + 2 - 3) // 2 + 1
    return side


def check_keypoint_grid(grid: torch.Tensor, crop: tuple[int, int], where: str, what: str
                        ) -> None:
    """A source's SpatialSoftmax positions, (h*w, 2) columns (x, y), against the grid ours
    computes for the map of a `crop` input (numpy's meshgrid of linspace(-1, 1) over w and h,
    row-major): the buffers are not loaded, so they must be ours; one line otherwise."""
    h, w = trunk_map_size(crop[0]), trunk_map_size(crop[1])
    ys = torch.linspace(-1.0, 1.0, h, dtype=torch.float64)
    xs = torch.linspace(-1.0, 1.0, w, dtype=torch.float64)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    expected = torch.stack([grid_x.flatten(), grid_y.flatten()], dim=-1)
    _require(tuple(grid.shape) == tuple(expected.shape) and bool(
        (grid.double() - expected).abs().max() <= GRID_TOLERANCE),
        f"{where}: {what} position grid {tuple(grid.shape)} is not the [-1, 1] grid of the "
        f"{h} x {w} map of a {crop[0]} x {crop[1]} input, which ours computes; it does not map")


def _camera_shape(shape: Any, where: str, field: str) -> tuple[int, int, int]:
    """A source's (C, H, W) camera shape as ints; one line naming the field otherwise."""
    _require(isinstance(shape, list | tuple) and len(shape) == 3,
             f"{where}: {field} must be an image shape (C, H, W); got {shape!r:.60}")
    c, h, w = (_int_field({field: v}, field, where) for v in shape)
    _require(c >= 1 and h >= 1 and w >= 1, f"{where}: {field} = {shape} must be positive")
    return c, h, w


def _pair(value: Any, where: str, field: str) -> tuple[int, int]:
    """An (h, w) setting as two ints; one line naming the field otherwise."""
    _require(isinstance(value, list | tuple) and len(value) == 2,
             f"{where}: {field} must be (height, width); got {value!r:.60}")
    h, w = (_int_field({field: v}, field, where) for v in value)
    return h, w


# ------------------------------------------------------------------------ Diffusion Policy
DP_LOWDIM_POLICY = "DiffusionUnetLowdimPolicy"
DP_HYBRID_POLICY = "DiffusionUnetHybridImagePolicy"
DP_IMAGE_POLICY = "DiffusionUnetImagePolicy"
DP_POLICIES = (DP_LOWDIM_POLICY, DP_HYBRID_POLICY, DP_IMAGE_POLICY)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
"""torchvision's ImageNet normalisation, which DP's MultiImageObsEncoder applies with
imagenet_norm=True (after DP's own normaliser)."""


def _load_dp_payload(path: Path) -> dict[str, Any]:
    """A DP workspace checkpoint's payload through the allow-list unpickler; one line naming
    the file when it is not one."""
    from omegaconf import DictConfig

    from policy.file_io import check_regular_file, check_torch_zip

    check_regular_file(path)
    check_torch_zip(path)
    try:
        payload = safe_torch_load(path)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: {e}") from e
    except Exception as e:  # torch raises several types for truncated or foreign files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is corrupt or unreadable: {reason}") from e
    _require(isinstance(payload, dict) and {"cfg", "state_dicts"} <= set(payload),
             f"{path} is not a Diffusion Policy workspace checkpoint (no cfg / state_dicts)")
    _require(isinstance(payload["cfg"], DictConfig | dict),
             f"{path}: cfg is a {type(payload['cfg']).__name__}, not a config")
    return payload


def import_diffusion_policy(path: str | Path) -> Imported:
    """A real-stanford/diffusion_policy workspace checkpoint: the low-dim UNet policy, or a
    camera policy (`DiffusionUnetHybridImagePolicy`, robomimic's encoder; or
    `DiffusionUnetImagePolicy`, DP's MultiImageObsEncoder), with global conditioning; EMA
    weights when the run kept them. Its config is read as data: only the policy, training and
    task sections, interpolations resolved by `resolve_config`."""
    from omegaconf import DictConfig, OmegaConf

    path = Path(path)
    payload = _load_dp_payload(path)
    raw = (OmegaConf.to_container(payload["cfg"], resolve=False)
           if isinstance(payload["cfg"], DictConfig) else payload["cfg"])
    where = str(path)
    cfg = {key: resolve_config(raw.get(key), raw, where, key)
           for key in ("policy", "training", "task")}
    policy_cfg = _section(cfg, "policy", where)
    kind = str(policy_cfg.get("_target_", "")).rsplit(".", 1)[-1]
    _require(kind in DP_POLICIES,
             f"{path}: the Diffusion Policy class {kind or '?'} is not importable (only "
             f"{', '.join(DP_POLICIES)})")
    for key, wanted in (("obs_as_global_cond", True), ("obs_as_local_cond", False),
                        ("pred_action_steps_only", False), ("oa_step_convention", True)):
        _require(bool(policy_cfg.get(key, wanted)) == wanted,
                 f"{path}: policy.{key}={policy_cfg.get(key)} is not supported (needs {wanted})")
    scheduler = _section(policy_cfg, "noise_scheduler", where, "policy.")
    scheduler_class = str(scheduler.get("_target_", "")).rsplit(".", 1)[-1]
    kinds = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim"}
    _require(scheduler_class in kinds, f"{path}: noise_scheduler {scheduler_class} is not "
                                       "supported (DDPMScheduler or DDIMScheduler)")
    settings = _training_settings(scheduler, f"{path}: noise_scheduler")
    n_obs_steps = _int_field(policy_cfg, "n_obs_steps", where, "policy.")

    states = payload["state_dicts"]
    _require(isinstance(states, dict) and "model" in states,
             f"{path}: state_dicts has no 'model' weights")
    training = cfg.get("training") if isinstance(cfg.get("training"), dict) else {}
    use_ema = bool(training.get("use_ema", False)) and "ema_model" in states
    weights = states["ema_model" if use_ema else "model"]
    _require(isinstance(weights, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()),
        f"{path}: state_dicts.{'ema_model' if use_ema else 'model'} is not a mapping of names "
        "to tensors")
    converted = rename_unet_keys(weights, "model.")
    if kind == DP_LOWDIM_POLICY:
        model = _section(policy_cfg, "model", where, "policy.")
        _require(model.get("local_cond_dim") is None,
                 f"{path}: local conditioning is not supported")
        obs_dim = _int_field(policy_cfg, "obs_dim", where, "policy.")
        action_dim = _int_field(policy_cfg, "action_dim", where, "policy.")
        _require(_int_field(model, "global_cond_dim", where, "policy.model.")
                 == obs_dim * n_obs_steps,
                 f"{path}: model.global_cond_dim {model['global_cond_dim']} != obs_dim x "
                 "n_obs_steps")
        unet = _unet_config(_int_list(model, "down_dims", where, "policy.model."),
                            _int_field(model, "kernel_size", where, "policy.model.", 5),
                            _int_field(model, "n_groups", where, "policy.model.", 8),
                            _int_field(model, "diffusion_step_embed_dim", where,
                                       "policy.model."),
                            bool(model.get("cond_predict_scale", False)))
        encoder: dict[str, Any] = {"_target_": "policy.encoders.LowDimObsEncoder",
                                   "obs_dim": obs_dim}
        normalised = ["obs"]
    else:
        # the image policies' UNet settings sit in the policy itself (DP's defaults if absent)
        unet = _unet_config(
            _int_list({"down_dims": policy_cfg.get("down_dims", [256, 512, 1024])},
                      "down_dims", where, "policy."),
            _int_field(policy_cfg, "kernel_size", where, "policy.", 5),
            _int_field(policy_cfg, "n_groups", where, "policy.", 8),
            _int_field(policy_cfg, "diffusion_step_embed_dim", where, "policy.", 256),
            bool(policy_cfg.get("cond_predict_scale", True)))
        rgb, lowdim, action_dim = _dp_shape_meta(policy_cfg, where)
        if kind == DP_HYBRID_POLICY:
            encoder, camera_weights = _dp_hybrid_encoder(policy_cfg, rgb, lowdim, weights, where)
        else:
            encoder, camera_weights = _dp_multi_image_encoder(policy_cfg, rgb, lowdim, weights,
                                                              where)
        converted.update(camera_weights)
        normalised = list(lowdim)
    for key in [*normalised, "action"]:
        stats = f"normalizer.params_dict.{key}"
        _require(f"{stats}.scale" in weights, f"{path}: no normalizer statistics for {key!r}")
        converted.update(_linear_normalizer(
            key, weights[f"{stats}.scale"], weights[f"{stats}.offset"],
            weights[f"{stats}.input_stats.min"], weights[f"{stats}.input_stats.max"]))
    config = {
        "_target_": "policy.diffusion_policy.DiffusionPolicy",
        "horizon": _int_field(policy_cfg, "horizon", where, "policy."),
        "n_obs_steps": n_obs_steps,
        "n_action_steps": _int_field(policy_cfg, "n_action_steps", where, "policy."),
        "action_dim": action_dim,
        "model": unet,
        "obs_encoder": encoder,
        "normalizer": {"_target_": "policy.normalizer.LinearNormalizer"},
        **_schedules(kinds[scheduler_class], settings, policy_cfg.get("num_inference_steps")),
    }
    source = {"format": "diffusion_policy", "path": str(path),
              "weights": "ema_model" if use_ema else "model",
              "step": _pickled_int((payload.get("pickles") or {}).get("global_step")),
              "task": _task_name(cfg.get("task")), "policy_class": kind}
    return Imported(config, converted, source)


def _dp_shape_meta(policy_cfg: Mapping[str, Any], where: str
                   ) -> tuple[dict[str, tuple[int, int, int]], dict[str, int], int]:
    """A DP image policy's `shape_meta`: its cameras {key: (C, H, W)} and low-dim keys
    {key: D}, each in the file's order, and the action size; other types are refused."""
    meta = _section(policy_cfg, "shape_meta", where, "policy.")
    obs = _section(meta, "obs", where, "policy.shape_meta.")
    rgb: dict[str, tuple[int, int, int]] = {}
    lowdim: dict[str, int] = {}
    for key, attr in obs.items():
        field = f"policy.shape_meta.obs.{key}"
        _require(isinstance(attr, Mapping), f"{where}: {field} must be a mapping")
        _require(str(key).isidentifier(), f"{where}: {field}: the observation key {key!r} is "
                                          "not an identifier; it does not map")
        kind = attr.get("type", "low_dim")
        if kind == "rgb":
            rgb[key] = _camera_shape(attr.get("shape"), where, f"{field}.shape")
        elif kind == "low_dim":
            shape = attr.get("shape")
            _require(isinstance(shape, list | tuple) and len(shape) == 1,
                     f"{where}: {field}.shape must be 1-D for a low_dim key; got {shape!r:.60}")
            lowdim[key] = _int_field({"shape": shape[0]}, "shape", where, f"{field}.")
        else:
            _require(False, f"{where}: {field}.type {kind!r} does not map (rgb or low_dim)")
    _require(bool(rgb), f"{where}: policy.shape_meta.obs has no rgb observation")
    action = meta.get("action") if isinstance(meta.get("action"), Mapping) else {}
    shape = action.get("shape")
    _require(isinstance(shape, list | tuple) and len(shape) == 1,
             f"{where}: policy.shape_meta.action.shape must be 1-D; got {shape!r:.60}")
    return rgb, lowdim, _int_field({"shape": shape[0]}, "shape", where,
                                   "policy.shape_meta.action.")


def _dp_image_normalisation(weights: Mapping[str, torch.Tensor], key: str, channels: int,
                            where: str, then: tuple[Any, Any] | None = None
                            ) -> tuple[list[float], list[float]]:
    """Per-channel (mean, std) with `(frames / 255 - mean) / std` equal to DP's image
    normaliser `x * scale + offset` of x = frames / 255 (DP's range normaliser, scale 2 and
    offset -1, gives mean = std = 0.5: bit for bit), followed by `(y - m) / s` with
    `then` = (m, s) per channel when given (ImageNet normalisation)."""
    stats = f"normalizer.params_dict.{key}"
    _require(f"{stats}.scale" in weights and f"{stats}.offset" in weights,
             f"{where}: no normalizer statistics for the camera {key!r}")
    scale, offset = weights[f"{stats}.scale"].double(), weights[f"{stats}.offset"].double()
    _require(scale.numel() == 1 and offset.numel() == 1 and bool(scale.item() > 0)
             and math.isfinite(scale.item()) and math.isfinite(offset.item()),
             f"{where}: the normaliser of camera {key!r} has scale {tuple(scale.shape)} = "
             f"{scale.flatten()[:3].tolist()}; only an image range normaliser (one positive "
             "scale and offset, DP's x * 2 - 1) maps")
    mean, std = -offset.item() / scale.item(), 1.0 / scale.item()
    if then is None:
        return [mean] * channels, [std] * channels
    return ([mean + m * std for m in then[0]], [std * s for s in then[1]])


def _dp_hybrid_encoder(policy_cfg: Mapping[str, Any], rgb: Mapping[str, tuple[int, int, int]],
                       lowdim: Mapping[str, int], weights: Mapping[str, torch.Tensor],
                       where: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Our ImageObsEncoder config and weights for DP's hybrid policy: robomimic's VisualCore per
    camera (ResNet-18 trunk with GroupNorm, SpatialSoftmax, Linear, then the ObservationEncoder's
    ReLU), DP's centre crop in eval (torchvision rounding), features in shape_meta order."""
    _require(bool(policy_cfg.get("obs_encoder_group_norm", False)),
             f"{where}: policy.obs_encoder_group_norm=False: robomimic's ResNet-18 keeps its "
             "BatchNorm layers (running statistics), which do not map; only GroupNorm does")
    shapes = {(h, w) for _, h, w in rgb.values()}
    crop_cfg = policy_cfg.get("crop_shape", [76, 76])
    if crop_cfg is None:
        _require(len(shapes) == 1, f"{where}: cameras of different sizes {sorted(shapes)} with "
                                   "no crop do not map (our encoder has one crop shape)")
        crop = next(iter(shapes))
    else:
        _require(bool(policy_cfg.get("eval_fixed_crop", False)),
                 f"{where}: policy.eval_fixed_crop=False: robomimic's CropRandomizer crops at "
                 "random even in eval, so the source's actions are not reproducible; only "
                 "eval_fixed_crop=True (DP's centre crop in eval) maps")
        crop = _pair(crop_cfg, where, "policy.crop_shape")
    out: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    num_keypoints = feature_dim = None
    for key in rgb:
        base = f"obs_encoder.obs_nets.{key}."
        own = {k[len(base):]: v for k, v in weights.items() if k.startswith(base)}
        consumed.update(base + name for name in own)
        what = f"the image encoder of {key!r}"
        # VisualCore registers its backbone and pool twice: map nets.*, check the aliases
        for name, value in own.items():
            for alias, target in (("backbone.nets.", "nets.0.nets."), ("pool.", "nets.1.")):
                if name.startswith(alias):
                    twin = own.get(target + name[len(alias):])
                    _require(twin is not None and torch.equal(twin, value),
                             f"{where}: {what}: {base}{name} differs from its alias "
                             f"{base}{target}{name[len(alias):]} (a corrupt file)")
        prefix = f"obs_encoder.cameras.{key}."
        trunk = {n[len("nets.0.nets."):]: v for n, v in own.items()
                 if n.startswith("nets.0.nets.")}
        _require(bool(trunk), f"{where}: {what} has no ResNet weights ({base}nets.0.nets.*)")
        out.update({prefix + n: v for n, v in
                    rename_resnet18_trunk(trunk, "children", where, what).items()})
        temperature = own.get("nets.1.temperature")
        _require(temperature is None or (temperature.numel() == 1
                                         and float(temperature.item()) == 1.0),
                 f"{where}: {what}: SpatialSoftmax temperature "
                 f"{None if temperature is None else temperature.flatten()[:2].tolist()} does "
                 "not map (only 1.0, robomimic's default)")
        pos_x, pos_y = own.get("nets.1.pos_x"), own.get("nets.1.pos_y")
        _require(pos_x is not None and pos_y is not None and pos_x.numel() == pos_y.numel(),
                 f"{where}: {what} has no SpatialSoftmax positions (nets.1.pos_x / pos_y)")
        check_keypoint_grid(torch.stack([pos_x.flatten(), pos_y.flatten()], dim=-1), crop,
                            where, f"{what}'s SpatialSoftmax")
        for ours, theirs in (("keypoints.to_keypoints", "nets.1.nets"), ("project", "nets.3")):
            for suffix in ("weight", "bias"):
                _require(f"{theirs}.{suffix}" in own,
                         f"{where}: {what} has no {base}{theirs}.{suffix}")
                out[f"{prefix}{ours}.{suffix}"] = own[f"{theirs}.{suffix}"]
        known = ("nets.0.nets.", "backbone.nets.", "pool.", "nets.1.", "nets.3.")
        unknown = sorted(n for n in own if not n.startswith(known))
        _require(not unknown, f"{where}: {what}: {base}{unknown[0] if unknown else ''} does not "
                              "map (robomimic's VisualCore: ResNet-18, SpatialSoftmax, Linear)")
        num_keypoints = int(own["nets.1.nets.weight"].shape[0])
        feature_dim = int(own["nets.3.weight"].shape[0])
    others = sorted(k for k in weights if k.startswith("obs_encoder.") and k not in consumed)
    _require(not others, f"{where}: {others[0] if others else ''} does not map (an observation "
                         "encoder weight outside the cameras' VisualCores)")
    means, stds = zip(*(_dp_image_normalisation(weights, key, rgb[key][0], where)
                        for key in rgb), strict=True)
    config = {
        "_target_": "policy.encoders.ImageObsEncoder",
        "image_shapes": {key: [h, w, c] for key, (c, h, w) in rgb.items()},
        "lowdim_shapes": {key: [d] for key, d in lowdim.items()},
        "crop_shape": list(crop), "num_keypoints": num_keypoints, "feature_dim": feature_dim,
        "width": 64, "feature_activation": "relu", "crop_rounding": "round",
        "image_mean": dict(zip(rgb, means, strict=True)),
        "image_std": dict(zip(rgb, stds, strict=True)),
        "order": [k for k in policy_cfg["shape_meta"]["obs"] if k in rgb or k in lowdim],
    }
    return config, out


def _dp_multi_image_encoder(policy_cfg: Mapping[str, Any],
                            rgb: Mapping[str, tuple[int, int, int]], lowdim: Mapping[str, int],
                            weights: Mapping[str, torch.Tensor], where: str
                            ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Our ImageObsEncoder config and weights for DP's MultiImageObsEncoder (a torchvision
    resnet18 per camera or shared, GroupNorm, global average pool, fc = Identity: 512 features,
    no activation), its eval crop and normalisation; cameras sorted by key, then the low-dim
    keys sorted, as DP concatenates them."""
    field = "policy.obs_encoder"
    encoder = _section(policy_cfg, "obs_encoder", where, "policy.")
    target = str(encoder.get("_target_", "")).rsplit(".", 1)[-1]
    _require(target == "MultiImageObsEncoder",
             f"{where}: {field}._target_ {target or '?'} does not map (only MultiImageObsEncoder)")
    model = encoder.get("rgb_model")
    _require(isinstance(model, Mapping) and "_target_" in model,
             f"{where}: {field}.rgb_model must be one get_resnet model (a model per camera does "
             "not map)")
    getter = str(model.get("_target_", "")).rsplit(".", 1)[-1]
    _require(getter == "get_resnet", f"{where}: {field}.rgb_model._target_ {getter or '?'} does "
                                     "not map (only diffusion_policy's get_resnet)")
    _require(model.get("name") == "resnet18", f"{where}: {field}.rgb_model.name="
                                              f"{model.get('name')!r} does not map (only "
                                              "resnet18)")
    _require(str(model.get("weights")).lower() != "r3m",
             f"{where}: {field}.rgb_model.weights=r3m does not map (R3M's ResNet is not "
             "torchvision's)")
    _require(bool(encoder.get("use_group_norm", False)),
             f"{where}: {field}.use_group_norm=False: the ResNet keeps its BatchNorm layers "
             "(running statistics), which do not map; only GroupNorm does")

    def per_camera(value: Any, key: str) -> Any:
        """A setting given for all cameras or per camera ({key: value})."""
        return value.get(key) if isinstance(value, Mapping) else value

    resize = encoder.get("resize_shape")
    crops = set()
    for key, (_, h, w) in rgb.items():
        size = per_camera(resize, key)
        _require(size is None or _pair(size, where, f"{field}.resize_shape") == (h, w),
                 f"{where}: {field}.resize_shape {size} resizes the {h} x {w} images of "
                 f"{key!r} (torchvision's antialiased resize), which does not map; only null or "
                 "the image's own size (torchvision then returns the image)")
        crop = per_camera(encoder.get("crop_shape"), key)
        # random_crop=False: DP assigns its CenterCrop to a variable it then overwrites, so
        # such a policy never crops; random_crop=True crops at random in training, centred
        # (torchvision's center_crop) in eval
        random_crop = bool(encoder.get("random_crop", True))
        crops.add((h, w) if crop is None or not random_crop
                  else _pair(crop, where, f"{field}.crop_shape"))
    _require(len(crops) == 1, f"{where}: {field}: cameras cropped to different sizes "
                              f"{sorted(crops)} do not map (our encoder has one crop shape)")
    shared = bool(encoder.get("share_rgb_model", False))
    cameras = sorted(rgb)
    out: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    for key in cameras[:1] if shared else cameras:
        base = f"obs_encoder.key_model_map.{'rgb' if shared else key}."
        own = {k[len(base):]: v for k, v in weights.items() if k.startswith(base)}
        _require(bool(own), f"{where}: no weights for the camera model {base}*")
        consumed.update(base + name for name in own)
        trunk = rename_resnet18_trunk(own, "torchvision", where, f"the ResNet of {base[:-1]}")
        out.update({f"obs_encoder.cameras.{key}.{n}": v for n, v in trunk.items()})
    others = sorted(k for k in weights if k.startswith("obs_encoder.") and k not in consumed)
    _require(not others, f"{where}: {others[0] if others else ''} does not map (an observation "
                         "encoder weight outside the camera models)")
    imagenet = (IMAGENET_MEAN, IMAGENET_STD) if encoder.get("imagenet_norm", False) else None
    _require(imagenet is None or all(c == 3 for c, _, _ in rgb.values()),
             f"{where}: {field}.imagenet_norm needs 3-channel images")
    norms = {key: _dp_image_normalisation(weights, key, rgb[key][0], where, imagenet)
             for key in cameras}
    config = {
        "_target_": "policy.encoders.ImageObsEncoder",
        "image_shapes": {key: [rgb[key][1], rgb[key][2], rgb[key][0]] for key in cameras},
        "lowdim_shapes": {key: [lowdim[key]] for key in sorted(lowdim)},
        "crop_shape": list(next(iter(crops))), "feature_dim": None, "width": 64,
        "pool": "avg", "crop_rounding": "round", "shared_encoder": shared,
        "image_mean": {key: norms[key][0] for key in cameras},
        "image_std": {key: norms[key][1] for key in cameras},
        "order": [*cameras, *sorted(lowdim)],
    }
    return config, out


def _section(config: Mapping[str, Any], key: str, where: str, prefix: str = ""
             ) -> dict[str, Any]:
    """config[key] as a mapping; ValueError naming the field when missing or not a mapping."""
    value = config.get(key)
    _require(isinstance(value, Mapping), f"{where}: {prefix}{key} is missing or not a mapping")
    return dict(value)


def _int_field(config: Mapping[str, Any], key: str, where: str, prefix: str = "",
               default: int | None = None) -> int:
    """config[key] as an int (an integral float or numeric string too); ValueError naming the
    field when missing or not a number."""
    value = config.get(key, default)
    try:
        number = float(value) if isinstance(value, str) else value
        if isinstance(number, bool) or not isinstance(number, int | float) or (
                number != int(number)):
            raise TypeError
        return int(number)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{where}: {prefix}{key} must be an integer; got {value!r:.60}"
                         ) from None


def _int_list(config: Mapping[str, Any], key: str, where: str, prefix: str = "") -> list[int]:
    """config[key] as a list of ints; ValueError naming the field otherwise."""
    value = config.get(key)
    _require(isinstance(value, list | tuple) and 0 < len(value) <= 16,
             f"{where}: {prefix}{key} must be a list of integers; got {value!r:.60}")
    return [_int_field({key: v}, key, where, prefix) for v in value]


def _task_name(task: Any) -> str | None:
    """A DP config's task.name when it is a string (it is only recorded)."""
    name = task.get("name") if isinstance(task, Mapping) else None
    return name if isinstance(name, str) else None


def _pickled_int(data: Any) -> int:
    """A DP workspace's pickled counter (`pickles["global_step"]`, dill bytes of an int); 0
    when absent or not an int."""
    if not isinstance(data, bytes):
        return 0
    try:
        value = AllowListUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, ValueError):
        return 0
    return value if isinstance(value, int) else 0


# ---------------------------------------------------------------------------------- LeRobot
LEROBOT_NORM_MODES = ("MIN_MAX", "MEAN_STD", "IDENTITY")


def _identifier(key: str) -> str:
    """LeRobot's feature key as one of our (identifier) keys: 'observation.state' ->
    'observation_state'."""
    return re.sub(r"\W", "_", key)


def _lerobot_statistics(folder: Path, config: Mapping[str, Any], weights: Mapping[str, Any]
                        ) -> tuple[dict[str, dict[str, torch.Tensor]], float, str]:
    """Per-feature statistics {feature: {min, max, mean, std}}, the normaliser's eps and the
    layout ("processor" files of LeRobot >= 0.4, or "buffers" in the weights of older ones)."""

    processors = sorted(folder.glob("policy_preprocessor_step_*_normalizer_processor.safetensors"))
    if processors:
        flat = _load_safetensors(processors[0])
        for post in folder.glob("policy_postprocessor_step_*_unnormalizer_processor.safetensors"):
            flat = {**_load_safetensors(post), **flat}
        stats: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in flat.items():
            feature, _, stat = key.rpartition(".")
            stats.setdefault(feature, {})[stat] = value
        eps = 1e-8
        preprocessor = folder / "policy_preprocessor.json"
        if preprocessor.is_file():
            steps = _read_json(preprocessor).get("steps", [])
            _require(isinstance(steps, list), f"{preprocessor}: steps must be a list")
            for step in steps:
                step_config = step.get("config") if isinstance(step, Mapping) else None
                if isinstance(step_config, Mapping) and "eps" in step_config:
                    eps = _float_field(step_config, "eps", str(preprocessor), eps)
        _require(0 < eps < 1, f"{preprocessor}: eps must be in (0, 1); got {eps}")
        return stats, eps, "processor"
    stats = {}
    features = {**config.get("input_features", {}), **config.get("output_features", {})}
    for feature in features:
        buffer = f"buffer_{feature.replace('.', '_')}"
        for module in ("normalize_inputs", "normalize_targets", "unnormalize_outputs"):
            for stat in ("min", "max", "mean", "std"):
                key = f"{module}.{buffer}.{stat}"
                if key in weights:
                    stats.setdefault(feature, {})[stat] = weights[key]
    return stats, 1e-8, "buffers"


def _lerobot_normalizer(feature: str, mode: str, stats: Mapping[str, torch.Tensor], eps: float,
                        layout: str, where: str) -> dict[str, torch.Tensor]:
    """Our normalizer buffers reproducing LeRobot's normalisation of `feature`."""
    key = _identifier(feature)
    if mode == "MIN_MAX":
        _require({"min", "max"} <= set(stats), f"{where}: no min/max statistics for {feature}")
        low, high = stats["min"].float(), stats["max"].float()
        if layout == "buffers":  # LeRobot <= 0.3: (x - min) / (max - min + 1e-8) * 2 - 1
            span = high - low + 1e-8
        else:  # LeRobot >= 0.4: eps only replaces a zero range
            span = torch.where(high - low == 0, torch.full_like(low, eps), high - low)
        scale = 2.0 / span
        return _linear_normalizer(key, scale, -1.0 - scale * low, low, high)
    _require({"mean", "std"} <= set(stats), f"{where}: no mean/std statistics for {feature}")
    mean, std = stats["mean"].float(), stats["std"].float()
    scale = 1.0 / (std + (1e-8 if layout == "buffers" else eps))
    return _linear_normalizer(key, scale, -mean * scale, stats.get("min", mean).float(),
                              stats.get("max", mean).float())


LEROBOT_ENV_KEYS = {"agent_pos": "observation.state",
                    "environment_state": "observation.environment_state",
                    "pixels": "observation.image"}
"""gym-pusht / gym-aloha observation keys and the LeRobot features they become (LeRobot's
`preprocess_observation`; `pixels` are (H, W, C) frames in [0, 255], as our cameras take)."""


def _lerobot_aliases(features: list[str]) -> dict[str, str]:
    """Observation keys a LeRobot policy accepts: its feature names and the gym env keys they
    come from, each mapped to our identifier key."""
    aliases = {feature: _identifier(feature) for feature in features}
    aliases.update({env_key: _identifier(feature) for env_key, feature in LEROBOT_ENV_KEYS.items()
                    if feature in features})
    return aliases


def _lerobot_image_normalisation(feature: str, mode: str, stats: Mapping[str, torch.Tensor],
                                 channels: int, eps: float, layout: str, where: str
                                 ) -> tuple[list[float], list[float]]:
    """Per-channel (mean, std) with `(frames / 255 - mean) / std` equal to LeRobot's
    normalisation of the camera `feature` (frames / 255 in CHW): MEAN_STD `(x - mean) /
    (std + eps)` (std + eps summed in float32 as LeRobot does: bit for bit), MIN_MAX
    `2 (x - min) / range - 1`, IDENTITY `x`."""
    def per_channel(value: torch.Tensor, name: str) -> torch.Tensor:
        flat = value.float().flatten()
        _require(flat.numel() in (1, channels),
                 f"{where}: the {name} statistic of {feature} has {flat.numel()} values; "
                 f"{channels} (one per channel, shape ({channels}, 1, 1)) expected")
        return flat.expand(channels)

    if mode == "IDENTITY":
        return [0.0] * channels, [1.0] * channels
    if mode == "MEAN_STD":
        _require({"mean", "std"} <= set(stats), f"{where}: no mean/std statistics for {feature}")
        mean, std = per_channel(stats["mean"], "mean"), per_channel(stats["std"], "std")
        denom = std + (1e-8 if layout == "buffers" else eps)
        _require(bool((denom > 0).all()), f"{where}: the std of {feature} is not positive")
        return mean.tolist(), denom.tolist()
    _require({"min", "max"} <= set(stats), f"{where}: no min/max statistics for {feature}")
    low, high = per_channel(stats["min"], "min").double(), per_channel(stats["max"], "max")
    if layout == "buffers":
        span = high.double() - low + 1e-8
    else:
        span = torch.where(high.double() - low == 0, torch.full_like(low, eps),
                           high.double() - low)
    _require(bool((span > 0).all()), f"{where}: the range of {feature} is not positive")
    return (low + span / 2).tolist(), (span / 2).tolist()


def _lerobot_cameras(config: Mapping[str, Any], visual: list[str],
                     inputs: Mapping[str, Any], weights: Mapping[str, torch.Tensor],
                     stats: Mapping[str, Mapping[str, torch.Tensor]], eps: float, layout: str,
                     where: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """ImageObsEncoder settings and weights for LeRobot's DiffusionRgbEncoder (one shared, or
    one per camera with `use_separate_rgb_encoder_per_camera`): ResNet-18 with GroupNorm,
    SpatialSoftmax, `out` Linear + ReLU; the eval centre crop (torchvision rounding) after an
    identity resize; each camera's VISUAL normalisation."""
    backbone = config.get("vision_backbone", "resnet18")
    _require(backbone == "resnet18", f"{where}: vision_backbone {backbone!r} does not map "
                                     "(only resnet18)")
    pretrained = config.get("pretrained_backbone_weights")
    _require(bool(config.get("use_group_norm", True)),
             f"{where}: use_group_norm=false: the ResNet keeps its BatchNorm layers (running "
             f"statistics{', pretrained ' + str(pretrained) if pretrained else ''}), which do "
             "not map; only GroupNorm does")
    shapes = {key: _camera_shape(inputs[key].get("shape"), where,
                                 f"input_features.{key}.shape") for key in visual}
    _require(len(set(shapes.values())) == 1, f"{where}: cameras of different shapes "
                                             f"{sorted(set(shapes.values()))} (LeRobot needs one)")
    c, h, w = next(iter(shapes.values()))
    crop_cfg = config.get("crop_shape")
    resize = config.get("resize_shape")
    if resize is not None:
        _require(_pair(resize, where, "resize_shape") == (h, w),
                 f"{where}: resize_shape {resize} resizes the {h} x {w} images (torchvision's "
                 "antialiased resize), which does not map; only null or the images' own size")
        ratio = _float_field(config, "crop_ratio", where, 1.0)
        crop_cfg = [int(h * ratio), int(w * ratio)] if ratio < 1.0 else None
    crop = (h, w) if crop_cfg is None else _pair(crop_cfg, where, "crop_shape")
    num_keypoints = _int_field(config, "spatial_softmax_num_keypoints", where, "", 32)
    separate = bool(config.get("use_separate_rgb_encoder_per_camera", False))
    owners = ([(key, f"diffusion.rgb_encoder.{i}.") for i, key in enumerate(visual)]
              if separate else [(visual[0], "diffusion.rgb_encoder.")])
    out: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    for key, base in owners:
        own = {k[len(base):]: v for k, v in weights.items() if k.startswith(base)}
        setting = f"use_separate_rgb_encoder_per_camera={str(separate).lower()}"
        _require(bool(own), f"{where}: no weights for the image encoder {base}* ({setting})")
        indexed = sorted(n for n in own if n.split(".", 1)[0].isdigit())
        _require(not indexed, f"{where}: {setting}, but the weights hold one image encoder per "
                              f"camera ({base}{indexed[0] if indexed else ''})")
        known = {"pool.pos_grid", "pool.nets.weight", "pool.nets.bias", "out.weight", "out.bias"}
        unknown = sorted(n for n in own if n not in known and not n.startswith("backbone."))
        _require(not unknown, f"{where}: {base}{unknown[0] if unknown else ''} does not map "
                              "(LeRobot's DiffusionRgbEncoder: backbone, pool, out)")
        what = f"the image encoder {base[:-1]}"
        prefix = f"obs_encoder.cameras.{_identifier(key)}."
        trunk = {n[len("backbone."):]: v for n, v in own.items() if n.startswith("backbone.")}
        out.update({prefix + n: v for n, v in
                    rename_resnet18_trunk(trunk, "children", where, what).items()})
        _require("pool.pos_grid" in own, f"{where}: {what} has no pool.pos_grid")
        check_keypoint_grid(own["pool.pos_grid"], crop, where, f"{what}'s SpatialSoftmax")
        for ours, theirs in (("keypoints.to_keypoints", "pool.nets"), ("project", "out")):
            for suffix in ("weight", "bias"):
                _require(f"{theirs}.{suffix}" in own,
                         f"{where}: {what} has no {base}{theirs}.{suffix}")
                out[f"{prefix}{ours}.{suffix}"] = own[f"{theirs}.{suffix}"]
        consumed.update(base + name for name in own)
    others = sorted(k for k in weights if k.startswith("diffusion.rgb_encoder.")
                    and k not in consumed)
    _require(not others, f"{where}: {others[0] if others else ''} does not map (more image "
                         f"encoders than the {len(visual)} camera(s), or "
                         "use_separate_rgb_encoder_per_camera does not match the weights)")
    mode = (config.get("normalization_mapping") or {}).get("VISUAL", "IDENTITY")
    _require(mode in LEROBOT_NORM_MODES, f"{where}: normalisation {mode!r} of the cameras is "
                                         "not supported")
    norms = {key: _lerobot_image_normalisation(key, mode, stats.get(key, {}), c, eps, layout,
                                               where) for key in visual}
    settings = {
        "image_shapes": {_identifier(k): [h, w, c] for k in visual},
        "crop_shape": list(crop), "num_keypoints": num_keypoints,
        "feature_dim": 2 * num_keypoints, "width": 64, "feature_activation": "relu",
        "crop_rounding": "round", "random_crop": bool(config.get("crop_is_random", True)),
        "image_mean": {_identifier(k): norms[k][0] for k in visual},
        "image_std": {_identifier(k): norms[k][1] for k in visual},
        "shared_encoder": not separate,
    }
    return settings, out


def import_lerobot(folder: str | Path) -> Imported:
    """A LeRobot diffusion pretrained-model folder (`config.json` + `model.safetensors`, the
    normaliser statistics in its pre/post-processor files or, in LeRobot <= 0.3, in the
    weights), for state / environment-state observations and cameras."""

    folder = Path(folder)
    where = str(folder)
    config = _read_json(folder / "config.json")
    _require(config.get("type", "diffusion") == "diffusion",
             f"{where}: LeRobot policy type {config.get('type')!r} is not a diffusion policy")
    weights = _load_safetensors(folder / "model.safetensors")
    inputs = config.get("input_features") or {}
    _require(isinstance(inputs, Mapping) and all(
        isinstance(v, Mapping) for v in inputs.values()),
        f"{folder / 'config.json'}: input_features must map feature names to {{type, shape}}")
    visual = [k for k, v in inputs.items() if v.get("type") == "VISUAL"]
    state = [k for k, v in inputs.items() if v.get("type") == "STATE"]
    env = [k for k, v in inputs.items() if v.get("type") == "ENV"]
    unknown = [k for k in inputs if k not in state + env + visual]
    _require(not unknown, f"{where}: input features {unknown} have types this importer does not "
                          "know")
    ordered = state + env
    # LeRobot's per-step global condition: [state, cameras in input_features order, env state]
    order = state + visual + env
    _require(bool(state + env), f"{where}: the policy has no state or environment-state inputs")
    outputs = config.get("output_features") or {}
    action = outputs.get("action") if isinstance(outputs, Mapping) else None
    action_shape = action.get("shape") if isinstance(action, Mapping) else None
    _require(isinstance(action_shape, list | tuple) and len(action_shape) == 1,
             f"{where}: the output feature 'action' must be a vector")
    for feature in ordered:
        shape = inputs[feature].get("shape")
        _require(isinstance(shape, list | tuple) and len(shape) == 1,
                 f"{where}: input feature {feature} must have a 1-D shape; got {shape!r:.60}")
    kind = str(config.get("noise_scheduler_type", "DDPM")).lower()
    _require(kind in ("ddpm", "ddim"), f"{where}: noise_scheduler_type {kind!r} is not supported")
    settings = _training_settings(config, where)
    norm_map = config.get("normalization_mapping") or {}
    stats, eps, layout = _lerobot_statistics(folder, config, weights)

    converted = rename_unet_keys(weights, "diffusion.unet.")
    for feature in [*ordered, "action"]:
        feature_type = "ACTION" if feature == "action" else inputs[feature]["type"]
        mode = norm_map.get(feature_type, "IDENTITY")
        _require(mode in LEROBOT_NORM_MODES, f"{where}: normalisation {mode!r} of {feature} is "
                                             "not supported")
        if mode != "IDENTITY":
            converted.update(_lerobot_normalizer(feature, mode, stats.get(feature, {}), eps,
                                                 layout, where))
    _require(any(k.startswith("normalizer.action_") for k in converted),
             f"{where}: the action has no normalisation (IDENTITY); not supported")
    obs_dims = {_identifier(k): _int_field({k: inputs[k]["shape"][0]}, k, where,
                                           "input_features.") for k in ordered}
    if visual:
        cameras, camera_weights = _lerobot_cameras(config, visual, inputs, weights, stats, eps,
                                                   layout, where)
        converted.update(camera_weights)
        encoder = {"_target_": "policy.encoders.ImageObsEncoder", **cameras,
                   "lowdim_shapes": {k: [d] for k, d in obs_dims.items()},
                   "order": [_identifier(k) for k in order],
                   "aliases": _lerobot_aliases(order)}
    else:
        encoder = {"_target_": "policy.encoders.ConcatObsEncoder", "obs_dims": obs_dims,
                   "aliases": _lerobot_aliases(ordered)}
    model_config = {
        "_target_": "policy.diffusion_policy.DiffusionPolicy",
        "horizon": _int_field(config, "horizon", where),
        "n_obs_steps": _int_field(config, "n_obs_steps", where),
        "n_action_steps": _int_field(config, "n_action_steps", where),
        "action_dim": _int_field({"action": action_shape[0]}, "action", where,
                                 "output_features."),
        "model": _unet_config(_int_list(config, "down_dims", where),
                              _int_field(config, "kernel_size", where, "", 5),
                              _int_field(config, "n_groups", where, "", 8),
                              _int_field(config, "diffusion_step_embed_dim", where),
                              bool(config.get("use_film_scale_modulation", True))),
        "obs_encoder": encoder,
        "normalizer": {"_target_": "policy.normalizer.LinearNormalizer"},
        **_schedules(kind, settings, config.get("num_inference_steps")),
    }
    source = {"format": "lerobot", "path": where, "layout": layout, "step": 0,
              "features": order}
    return Imported(model_config, converted, source)


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; ValueError naming the file when it is unreadable, not JSON or
    not an object (at most 16 MB: a LeRobot config is a few kB)."""
    from policy.file_io import check_regular_file

    check_regular_file(path, "file")
    if path.stat().st_size > 16 * 2**20:
        raise ValueError(f"{path} is {path.stat().st_size} bytes; a config is at most 16 MB")
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    _require(isinstance(value, dict), f"{path} must hold a JSON object, not a "
                                      f"{type(value).__name__}")
    return value


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file (its header checked against the file size by safetensors itself);
    ValueError naming the file when it is truncated or malformed."""
    from safetensors.torch import load_file

    from policy.file_io import check_regular_file

    check_regular_file(path, "file")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError and OSError
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a readable safetensors file: {reason}") from e


# --------------------------------------------------------------------------------- detection
def detect_format(path: str | Path) -> str:
    """Which of FORMATS `path` holds: a LeRobot folder, a DP workspace pickle or ours; a
    ValueError / FileNotFoundError naming the path otherwise."""
    path = Path(path).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
            return "lerobot"
        raise ValueError(f"{path} is a folder but not a LeRobot pretrained model (no config.json "
                         "+ model.safetensors)")
    from policy.file_io import check_regular_file

    check_regular_file(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is neither a picard-policy nor a Diffusion Policy checkpoint "
                         "(not a torch zip file)")
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if not pickles:
            raise ValueError(f"{path} is a zip file but not a torch checkpoint")
        head = archive.read(pickles[0])[:4096]
    if b"omegaconf" in head or b"dill" in head:
        return "diffusion_policy"
    return "picard"
