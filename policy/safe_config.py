"""A policy config read from a file is data: build the policy from an allow-list, never import.

A checkpoint (ours, a Diffusion Policy workspace, a LeRobot folder) says which network it holds
as a Hydra-style config (`_target_` + arguments). Instantiating that config with Hydra would
import and call whatever the file names, so `build_policy` maps it onto an explicit allow-list
of our own classes instead, one allowed set per slot (the policy, its UNet, observation encoder,
normalizer and schedules). Every argument must be plain data (None, bool, int, float, str, and
lists / dicts of them), within sane bounds, named in the class's signature; interpolations
(`${...}`) and Hydra's other underscore keys are refused. With the file's weights at hand, the
network is first built on PyTorch's meta device (no memory) and the weights are checked against
it (names, shapes, float dtypes, finite values, non-degenerate normaliser statistics) before
anything is allocated. Every refusal is a `CheckpointError`: one line naming the file and the
field. What this guarantees and what it does not: docs/design.md §11.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from picard_sampler import DDIMSchedule, DDPMSchedule
from policy.diffusion_policy import DiffusionPolicy
from policy.encoders import ConcatObsEncoder, ImageObsEncoder, LowDimObsEncoder
from policy.file_io import CheckpointError as CheckpointError  # defined there, raised here
from policy.normalizer import LinearNormalizer
from policy.unet import ConditionalUnet1D

SCHEDULES: dict[str, type] = {
    "picard_sampler.DDPMSchedule": DDPMSchedule,
    "picard_sampler.schedules.DDPMSchedule": DDPMSchedule,
    "picard_sampler.DDIMSchedule": DDIMSchedule,
    "picard_sampler.schedules.DDIMSchedule": DDIMSchedule,
}
SLOTS: dict[str, dict[str, Callable[..., Any]]] = {
    "policy": {"policy.diffusion_policy.DiffusionPolicy": DiffusionPolicy},
    "model": {"policy.unet.ConditionalUnet1D": ConditionalUnet1D},
    "obs_encoder": {
        "policy.encoders.LowDimObsEncoder": LowDimObsEncoder,
        "policy.encoders.ConcatObsEncoder": ConcatObsEncoder,
        "policy.encoders.ImageObsEncoder": ImageObsEncoder,
    },
    "normalizer": {"policy.normalizer.LinearNormalizer": LinearNormalizer},
    "train_schedule": SCHEDULES,
    "inference_schedule": SCHEDULES,
}
"""The only classes a policy config may name, per slot (the policy's constructor argument)."""
PARTIAL_SLOTS = ("model",)
"""Slots built as a factory (`_partial_: true`): the policy passes the UNet's input sizes."""
MODULE_SLOTS = ("model", "obs_encoder", "normalizer")
"""Slots that hold weights, built on the meta device for the weights check."""

INT_LIMITS: dict[str, tuple[int, int]] = {
    "horizon": (1, 1024), "n_obs_steps": (1, 64), "n_action_steps": (1, 1024),
    "action_dim": (1, 1024), "num_train_timesteps": (1, 10_000),
    "num_inference_steps": (1, 10_000), "kernel_size": (1, 31), "n_groups": (1, 1024),
    "final_n_groups": (1, 1024), "diffusion_step_embed_dim": (4, 8192), "obs_dim": (1, 65_536),
    "num_keypoints": (1, 4096), "feature_dim": (1, 65_536), "width": (1, 4096),
    "down_dims": (1, 8192), "crop_shape": (1, 4096), "obs_dims": (1, 65_536),
    "image_shapes": (1, 4096), "lowdim_shapes": (1, 65_536),
}
"""Sane ranges of the size settings (each element, for lists and maps of sizes)."""
ANY_INT = 2**31
"""Any other int in a file's config must lie in (-ANY_INT, ANY_INT)."""
MAX_NODES, MAX_DEPTH, MAX_STRING, MAX_LIST = 10_000, 16, 4096, 1024
"""Bounds on the shape of a file's config tree (a config is a few hundred values)."""
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_NORMALIZER_SCALE = 1e12
"""Largest |scale| of a normaliser statistic (LeRobot's eps 1e-8 on a constant feature gives
1e8); beyond it, or 0, unnormalising is meaningless."""


def check_plain(value: Any, where: str, field: str) -> None:
    """Refuse anything in a config tree but None / bool / int / float / str and lists, tuples
    and str-keyed dicts of them, within MAX_NODES / MAX_DEPTH / MAX_STRING / MAX_LIST; refuse
    non-finite floats and interpolations (`${...}`)."""
    count = 0

    def walk(node: Any, path: str, depth: int) -> None:
        nonlocal count
        count += 1
        if count > MAX_NODES or depth > MAX_DEPTH:
            raise CheckpointError(f"{where}: {field} is too large or too deeply nested for a "
                                  f"policy config (over {MAX_NODES} values or {MAX_DEPTH} levels)")
        if node is None or isinstance(node, bool):
            return
        if isinstance(node, int):
            if not -ANY_INT < node < ANY_INT:
                raise CheckpointError(f"{where}: {path} = {_short(node)} is out of range")
            return
        if isinstance(node, float):
            if not math.isfinite(node):
                raise CheckpointError(f"{where}: {path} = {node} is not finite")
            return
        if isinstance(node, str):
            if len(node) > MAX_STRING:
                raise CheckpointError(f"{where}: {path} is a string of {len(node)} characters "
                                      f"(at most {MAX_STRING})")
            if "${" in node:
                raise CheckpointError(f"{where}: {path} = {_short(node)} is an interpolation; a "
                                      "checkpoint's config must be plain values (nothing from a "
                                      "file is resolved or evaluated)")
            return
        if isinstance(node, list | tuple):
            if len(node) > MAX_LIST:
                raise CheckpointError(f"{where}: {path} is a list of {len(node)} items")
            for i, item in enumerate(node):
                walk(item, f"{path}[{i}]", depth + 1)
            return
        if isinstance(node, Mapping):
            for key, item in node.items():
                if not isinstance(key, str):
                    raise CheckpointError(f"{where}: {path} has a key {_short(key)} that is not "
                                          "a string")
                walk(item, f"{path}.{key}", depth + 1)
            return
        raise CheckpointError(f"{where}: {path} is a {type(node).__name__}; a checkpoint's "
                              "config holds only plain values")

    walk(value, field, 0)


def _short(value: Any, limit: int = 60) -> str:
    """repr cut to `limit` characters (a refusal stays one readable line)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_ints(value: Any, where: str, path: str, limits: tuple[int, int]) -> None:
    """Every int in `value` (recursively) within `limits`; bools are not sizes."""
    if isinstance(value, bool) or (not isinstance(value, int | list | tuple | Mapping)):
        raise CheckpointError(f"{where}: {path} must be an int (or ints); got {_short(value)}")
    if isinstance(value, int):
        if not limits[0] <= value <= limits[1]:
            raise CheckpointError(f"{where}: {path} = {value} is outside [{limits[0]}, "
                                  f"{limits[1]}]")
        return
    items = value.items() if isinstance(value, Mapping) else enumerate(value)
    for key, item in items:
        _check_ints(item, where, f"{path}.{key}" if isinstance(value, Mapping)
                    else f"{path}[{key}]", limits)


def constructor_parameters(cls: Callable[..., Any]) -> Mapping[str, inspect.Parameter]:
    """The settings `cls(...)` takes: its own __init__'s, or for a subclass that forwards
    `*args, **kwargs`, the first base's in the MRO that names them. A class whose `**kwargs`
    are the fields of a settings record names it as `KEYWORD_SETTINGS` (a dataclass); those
    fields are then settings too (e.g. ImageObsEncoder's CameraSettings)."""
    forwarding = {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}
    for klass in getattr(cls, "__mro__", (cls,)):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = {n: p for n, p in inspect.signature(init).parameters.items()
                      if n != "self"}
        if all(p.kind in forwarding for p in parameters.values()):
            continue
        record = klass.__dict__.get("KEYWORD_SETTINGS")
        if record is not None:
            parameters = {n: p for n, p in parameters.items()
                          if p.kind != inspect.Parameter.VAR_KEYWORD}
            parameters.update({f.name: inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default)
                for f in dataclasses.fields(record)})
        return parameters
    return {}


def _spec(config: Any, slot: str, where: str, path: str
          ) -> tuple[Callable[..., Any], dict[str, Any], bool]:
    """(class, arguments, partial) of one slot's config, every key checked."""
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{where}: {path} must be a mapping with _target_; got "
                              f"{type(config).__name__}")
    allowed = SLOTS[slot]
    target = config.get("_target_")
    if target not in allowed:
        raise CheckpointError(f"{where}: {path}._target_ {_short(target)} is not allowed; "
                              f"allowed: {', '.join(sorted(set(allowed)))}")
    cls = allowed[target]
    partial = config.get("_partial_", False)
    if partial is not False and not (partial is True and slot in PARTIAL_SLOTS):
        raise CheckpointError(f"{where}: {path}._partial_ = {_short(partial)} is not allowed "
                              f"here (only {', '.join(PARTIAL_SLOTS)} may be partial)")
    underscored = sorted(k for k in config if k.startswith("_") and k not in
                         ("_target_", "_partial_"))
    if underscored:
        raise CheckpointError(f"{where}: {path}.{underscored[0]} is not allowed in a "
                              "checkpoint's config")
    arguments = {k: v for k, v in config.items() if not k.startswith("_")}
    parameters = constructor_parameters(cls)
    provided_by_policy = ("input_dim", "global_cond_dim") if partial else ()
    names = [n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                               p.KEYWORD_ONLY)]
    unknown = sorted(set(arguments) - set(names)) + sorted(
        set(arguments) & set(provided_by_policy))
    if unknown:
        settable = ", ".join(n for n in names if n not in provided_by_policy)
        raise CheckpointError(f"{where}: {path}.{unknown[0]} is not a setting of {target}; "
                              f"allowed: {settable}")
    missing = [n for n in names if parameters[n].default is inspect.Parameter.empty
               and n not in arguments and n not in provided_by_policy]
    if missing:
        raise CheckpointError(f"{where}: {path}.{missing[0]} is missing ({target} needs it)")
    for key, value in arguments.items():
        if key in SLOTS:
            continue
        if key in INT_LIMITS and value is not None:
            _check_ints(value, where, f"{path}.{key}", INT_LIMITS[key])
    return cls, arguments, bool(partial)


def _build(config: Mapping[str, Any], where: str, meta: bool) -> DiffusionPolicy:
    """The policy of a checked config; with `meta`, its modules on the meta device."""
    cls, arguments, _ = _spec(config, "policy", where, "policy")
    built: dict[str, Any] = {}
    for key, value in arguments.items():
        if key not in SLOTS:
            built[key] = value
            continue
        if value is None and key == "inference_schedule":
            built[key] = None
            continue
        slot_cls, slot_args, partial = _spec(value, key, where, f"policy.{key}")
        if partial:
            built[key] = _partial(slot_cls, slot_args, where, f"policy.{key}", meta)
            continue
        device = torch.device("meta") if meta and key in MODULE_SLOTS else None
        built[key] = _construct(slot_cls, slot_args, where, f"policy.{key}", device)
    device = torch.device("meta") if meta else None
    return _construct(cls, built, where, "policy", device)


def _construct(cls: Callable[..., Any], arguments: Mapping[str, Any], where: str, path: str,
               device: torch.device | None) -> Any:
    """cls(**arguments) (on `device`), its ValueError / TypeError one line naming `path`."""
    try:
        if device is None:
            return cls(**arguments)
        with device:
            return cls(**arguments)
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{where}: {path}: {message}") from e


def _partial(cls: Callable[..., Any], arguments: Mapping[str, Any], where: str, path: str,
             meta: bool) -> Callable[..., Any]:
    """A factory the policy calls with the UNet's input sizes (Hydra's `_partial_`)."""
    def make(**sizes: Any) -> Any:
        return _construct(cls, {**arguments, **sizes}, where, path,
                          torch.device("meta") if meta else None)

    return make


def build_policy(config: Any, where: str,
                 weights: Mapping[str, torch.Tensor] | None = None) -> DiffusionPolicy:
    """A DiffusionPolicy from a file's policy config, mapped onto the allow-list (`SLOTS`),
    with `weights` checked against the network (`check_weights`) before it is allocated and
    then loaded (cast to float32), in eval mode on the CPU. CheckpointError naming `where`."""
    check_plain(config, where, "policy")
    if weights is not None:
        check_policy_weights(weights, _build(config, where, meta=True), where)
    policy = _build(config, where, meta=False)
    if weights is not None:
        try:
            policy.load_state_dict({k: v.float() if v.is_floating_point() else v
                                    for k, v in weights.items()})
        except RuntimeError as e:  # check_weights should have caught it; keep it one line
            raise CheckpointError(f"{where}: weights do not fit the config: "
                                  f"{str(e).splitlines()[0]}") from e
    return policy.eval()


def check_policy_weights(weights: Mapping[str, Any], network: DiffusionPolicy, where: str
                         ) -> None:
    """A policy file's weights against the policy built from its config (on the meta device):
    `check_weights` for the networks, plus normaliser statistics that can be inverted."""
    check_weights(weights, network.state_dict(), where, extra_prefix="normalizer.")
    normalizer = {k for k in weights if k.startswith("normalizer.")}
    _check_normalizer(weights, normalizer, network, where)


def check_weights(weights: Any, expected: Mapping[str, torch.Tensor], where: str,
                  prefix: str = "", extra_prefix: str | None = None) -> None:
    """A file's weights against the state dict of the network built from its config: the same
    names (plus any under `extra_prefix`) and shapes, tensors of a float dtype where the
    network's are float, finite values. CheckpointError naming the first bad key."""
    if not isinstance(weights, Mapping):
        raise CheckpointError(f"{where}: weights are a {type(weights).__name__}, not a mapping "
                              "of names to tensors")
    bad_names = [k for k in weights if not isinstance(k, str)]
    if bad_names:
        raise CheckpointError(f"{where}: a weight name is {_short(bad_names[0])}, not a string")
    normalizer = {k for k in weights if extra_prefix and k.startswith(extra_prefix)}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected) - normalizer)
    if missing:
        raise CheckpointError(f"{where}: weights miss {len(missing)} tensors the config's "
                              f"network has (first: {prefix}{missing[0]})")
    if unexpected:
        raise CheckpointError(f"{where}: weights hold {len(unexpected)} tensors the config's "
                              f"network does not have (first: {prefix}{_short(unexpected[0])})")
    for key, value in weights.items():
        name = f"{prefix}{key}"
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{where}: weight {name} is a {type(value).__name__}, not a "
                                  "tensor")
        if key in expected:
            want = expected[key]
            if tuple(value.shape) != tuple(want.shape):
                raise CheckpointError(f"{where}: weight {name} has shape {tuple(value.shape)}; "
                                      f"the config's network needs {tuple(want.shape)}")
            if want.is_floating_point() and value.dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"{where}: weight {name} is {value.dtype}; weights must "
                                      "be float16, bfloat16, float32 or float64")
        elif value.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{where}: normaliser statistic {name} is {value.dtype}, "
                                  "not a float dtype")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{where}: weight {name} holds NaN or inf")


NORMALIZER_SUFFIXES = ("scale", "offset", "input_min", "input_max")


def _check_normalizer(weights: Mapping[str, torch.Tensor], keys: set[str], network: nn.Module,
                      where: str) -> None:
    """Normaliser statistics: for the action and per observation key, the four 1-D statistics
    of one length (the action's = action_dim), scales finite and 0 < |scale| <=
    MAX_NORMALIZER_SCALE."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key in keys:
        name = key[len("normalizer."):]
        base, suffix = _split_suffix(name)
        if suffix is None:
            raise CheckpointError(f"{where}: {key} is not a normaliser statistic (expected "
                                  f"<key>_{{{','.join(NORMALIZER_SUFFIXES)}}})")
        groups.setdefault(base, {})[suffix] = weights[key]
    if "action" not in groups:
        raise CheckpointError(f"{where}: weights hold no normaliser statistics for the action "
                              "(normalizer.action_scale, ...)")
    obs_keys = set(getattr(getattr(network, "obs_encoder", None), "obs_shapes", {}))
    for base, stats in sorted(groups.items()):
        if base != "action" and base not in obs_keys:
            raise CheckpointError(f"{where}: normaliser statistics for {base!r}, which is "
                                  f"neither the action nor an observation key ({sorted(obs_keys)})")
        absent = [s for s in NORMALIZER_SUFFIXES if s not in stats]
        if absent:
            raise CheckpointError(f"{where}: normalizer.{base}_{absent[0]} is missing")
        lengths = {tuple(t.shape) for t in stats.values()}
        want = (getattr(network, "action_dim", None),) if base == "action" else None
        if len(lengths) != 1 or len(next(iter(lengths))) != 1 or (
                want is not None and next(iter(lengths)) != want):
            raise CheckpointError(f"{where}: normaliser statistics of {base!r} have shapes "
                                  f"{sorted(lengths)}; expected one 1-D length"
                                  + (f" = {want[0]}" if want else ""))
        scale = stats["scale"].double().abs()
        if bool((scale == 0).any()) or bool((scale > MAX_NORMALIZER_SCALE).any()):
            raise CheckpointError(f"{where}: normalizer.{base}_scale has a zero or huge entry "
                                  f"(|scale| must be in (0, {MAX_NORMALIZER_SCALE:g}])")


def _split_suffix(name: str) -> tuple[str, str | None]:
    """'action_input_min' -> ('action', 'input_min')."""
    for suffix in sorted(NORMALIZER_SUFFIXES, key=len, reverse=True):
        if name.endswith(f"_{suffix}") and len(name) > len(suffix) + 1:
            return name[: -len(suffix) - 1], suffix
    return name, None


PCM_LIMITS: dict[str, tuple[int, int]] = {
    "lora_rank": (1, 1024), "head_down_dims": (1, 4096), "head_kernel_size": (1, 31),
    "head_n_groups": (1, 1024), "head_step_embed_dim": (4, 4096),
}


def check_pcm_config(config: Any, where: str) -> dict[str, Any]:
    """A PCM's constructor settings from a file: plain values named in PcmSettings (what
    PicardConsistencyModel is built with), sizes within PCM_LIMITS."""
    from policy.pcm import PcmSettings

    check_plain(config, where, "pcm.config")
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{where}: pcm.config must be a mapping")
    names = list(PcmSettings.names())
    unknown = sorted(set(config) - set(names))
    if unknown:
        raise CheckpointError(f"{where}: pcm.config.{unknown[0]} is not a PCM setting; "
                              f"allowed: {', '.join(names)}")
    for key, limits in PCM_LIMITS.items():
        if config.get(key) is not None:
            _check_ints(config[key], where, f"pcm.config.{key}", limits)
    if "head_down_dims" in config and len(config["head_down_dims"]) > 6:
        raise CheckpointError(f"{where}: pcm.config.head_down_dims has more than 6 levels")
    return dict(config)
