"""Crafted checkpoints, DP workspaces, LeRobot folders and propagator files, as an attacker or
a broken exporter would make them: loading never runs code from the file (a marker that only
a successful exploit writes is never created), never hangs, never returns a silently wrong
policy, and every refusal is one line naming the file and what was refused (design §11)."""

from __future__ import annotations

import copy
import json
import math
import os
import pathlib
import pickle
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from app.builder import checked_checkpoint_env, load_checkpoint_and_policy
from app.checks import ConfigError
from policy import load_policy
from policy.checkpoint import load_checkpoint
from policy.diffusion_policy import NonFiniteChunkError
from policy.foreign import import_diffusion_policy, import_lerobot, safe_arithmetic
from policy.propagator import load_propagators, save_propagators, schedule_key
from tests.conftest import run_repo_script

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT / "tests" / "fixtures"
DP_FIXTURE = FIXTURES / "dp_lowdim_ddpm" / "dp_workspace.ckpt"
LEROBOT_FIXTURE = FIXTURES / "lerobot_state_ddpm"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    """The file only a successful exploit writes."""
    return tmp_path / "pwned"


def refused(load: Callable[[], Any], path: Path | str, *fragments: str,
            error: type[Exception] = ValueError) -> str:
    """Run `load`, which must raise `error` with a one-line message naming `path` and holding
    each of `fragments`; returns the message."""
    with pytest.raises(error) as caught:
        load()
    message = str(caught.value)
    assert "\n" not in message, message
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def save_ours(ckpt: dict[str, Any], path: Path) -> Path:
    torch.save(ckpt, path)
    return path


# ------------------------------------------------------------------- our checkpoint format
@pytest.fixture
def ours(tiny_checkpoint: Path) -> dict[str, Any]:
    """A fresh copy of a real checkpoint of ours to tamper with."""
    return copy.deepcopy(load_checkpoint(tiny_checkpoint))


@pytest.mark.parametrize("target", [
    "builtins.open", "os.system", "torch.load", "pathlib.Path.write_text", "builtins.eval",
    "policy.checkpoint.atomic_write", "hydra.utils.instantiate", "subprocess.call",
])
def test_a_config_target_is_never_imported_or_called(ours, tmp_path, marker, target) -> None:
    for slot in (None, "obs_encoder", "model", "train_schedule", "normalizer"):
        ckpt = copy.deepcopy(ours)
        node = ckpt["config"]["policy"] if slot is None else ckpt["config"]["policy"][slot]
        node["_target_"] = target
        node["_args_"] = [str(marker), "w"]
        path = save_ours(ckpt, tmp_path / f"evil_{slot}.ckpt")
        refused(lambda p=path: load_policy(p), path, f"_target_ {target!r} is not allowed")
        assert not marker.exists()


@pytest.mark.parametrize("key, value, fragment", [
    ("_args_", ["x"], "_args_ is not allowed"),
    ("_recursive_", False, "_recursive_ is not allowed"),
    ("_convert_", "all", "_convert_ is not allowed"),
    ("horizon", "${oc.env:HOME}", "is an interpolation"),
    ("horizon", "${now:%H}", "is an interpolation"),
    ("horizon", 10**12, "out of range"),
    ("horizon", 4096, "policy.horizon = 4096 is outside [1, 1024]"),
    ("horizon", True, "must be an int"),
    ("horizon", float("nan"), "not finite"),
    ("action_dim", -3, "is outside"),
    ("surprise", 1, "policy.surprise is not a setting of"),
])
def test_config_values_are_plain_bounded_data(ours, tmp_path, key, value, fragment) -> None:
    ours["config"]["policy"][key] = value
    path = save_ours(ours, tmp_path / "bad.ckpt")
    refused(lambda: load_policy(path), path, fragment)


def test_nested_and_partial_tricks_are_refused(ours, tmp_path) -> None:
    cases = [
        (("obs_encoder", "_partial_"), True, "_partial_ = True is not allowed"),
        (("model", "down_dims"), [10**6, 10**6], "outside [1, 8192]"),
        (("model", "down_dims"), {"_target_": "os.system"}, "must be an int"),
        (("train_schedule", "num_train_timesteps"), 10**7, "outside [1, 10000]"),
        (("obs_encoder", "obs_dim"), {"_target_": "builtins.open", "file": "x"},
         "must be an int"),
    ]
    for (slot, key), value, fragment in cases:
        ckpt = copy.deepcopy(ours)
        ckpt["config"]["policy"][slot][key] = value
        path = save_ours(ckpt, tmp_path / f"bad_{slot}_{key}.ckpt")
        refused(lambda p=path: load_policy(p), path, fragment)
    ours["config"]["policy"] = ["_target_", "os.system"]
    path = save_ours(ours, tmp_path / "list.ckpt")
    refused(lambda: load_policy(path), path, "config.policy is missing or not a mapping")


def test_weights_are_checked_before_they_are_used(ours, tmp_path) -> None:
    weights = ours["ema"]["model"]
    first = next(k for k in weights if k.startswith("model."))
    cases = {
        "int8": ({first: weights[first].to(torch.int8)}, f"{first} is torch.int8"),
        "nan": ({first: torch.full_like(weights[first], math.nan)}, f"{first} holds NaN"),
        "shape": ({first: weights[first][..., :1]}, f"weight {first} has shape"),
        "nan_stats": ({"normalizer.action_offset": torch.tensor([math.nan, 0.0])},
                      "normalizer.action_offset holds NaN"),
        "zero_scale": ({"normalizer.action_scale": torch.zeros(2)},
                       "normalizer.action_scale has a zero or huge entry"),
        "stats_length": ({"normalizer.action_scale": torch.ones(3)},
                         "normaliser statistics of 'action' have shapes"),
        "extra": ({"model.backdoor": torch.ones(1)}, "tensors the config's network does not"),
        "not_a_tensor": ({first: [1.0, 2.0]}, f"weight {first} is a list"),
    }
    for name, (patch, fragment) in cases.items():
        ckpt = copy.deepcopy(ours)
        ckpt["ema"]["model"].update(patch)
        path = save_ours(ckpt, tmp_path / f"{name}.ckpt")
        refused(lambda p=path: load_policy(p), path, fragment)
    ckpt = copy.deepcopy(ours)
    del ckpt["ema"]["model"][first]
    path = save_ours(ckpt, tmp_path / "missing.ckpt")
    refused(lambda: load_policy(path), path, "weights miss 1 tensors", first)
    ckpt = copy.deepcopy(ours)
    del ckpt["ema"]["model"]["normalizer.action_scale"]
    path = save_ours(ckpt, tmp_path / "no_scale.ckpt")
    refused(lambda: load_policy(path), path, "normalizer.action_scale is missing")


def test_pcm_entries_are_checked(ours, tmp_path) -> None:
    from policy.pcm import build_pcm

    policy = load_policy(save_ours(copy.deepcopy(ours), tmp_path / "base.ckpt"))
    pcm = build_pcm(policy, head_down_dims=[8, 16])
    good = {"config": {"head_down_dims": [8, 16]}, "model": None, "ema": pcm.state_dict()}
    cases = [
        ({"config": {"_target_": "os.system"}}, "pcm.config._target_ is not a PCM setting"),
        ({"config": {"lora_rank": 10**9}}, "pcm.config.lora_rank = 1000000000 is outside"),
        ({"config": {"head_down_dims": [8, 16, 32, 64, 128, 256, 512]}}, "more than 6 levels"),
        ({"ema": {**pcm.state_dict(), "head.extra": torch.ones(1)}}, "does not have"),
        ({"ema": {k: v.to(torch.int8) for k, v in pcm.state_dict().items()}}, "is torch.int8"),
    ]
    for patch, fragment in cases:
        ckpt = copy.deepcopy(ours)
        ckpt["pcm"] = {**good, **patch}
        path = save_ours(ckpt, tmp_path / "pcm.ckpt")
        refused(lambda p=path: load_policy(p), path, fragment)
    ckpt = copy.deepcopy(ours)
    ckpt["pcm"] = good
    assert load_policy(save_ours(ckpt, tmp_path / "pcm_ok.ckpt")).pcm is not None


def test_a_pcm_only_file_is_checked_like_its_base(ours, tmp_path) -> None:
    ours.update(ema=None, model=None, pcm={"config": {}, "ema": {}})
    for base, fragment in ((["a"], "names no base checkpoint"),
                           ("../../../../etc/passwd", "corrupt or unreadable")):
        ours["base_checkpoint"] = base
        path = save_ours(ours, tmp_path / "pcm_only.ckpt")
        refused(lambda p=path: load_policy(p), "pcm_only.ckpt" if isinstance(base, list)
                else "/etc/passwd", fragment)


class Exploit:
    """A pickle payload that runs a command on load (the textbook __reduce__ trick)."""

    command = ""

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


class PathWrite:
    """A payload that reaches a file write through an allowed class's method (a dotted name
    under protocol 4: pathlib / Path.write_text)."""

    target = ""

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.write_text, (pathlib.Path(self.target), "pwned"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_pickle_tricks_in_our_format_never_run(ours, tmp_path, marker) -> None:
    Exploit.command, PathWrite.target = f"touch {marker}", str(marker)
    for name, payload in (("system", Exploit()), ("write", PathWrite())):
        ckpt = copy.deepcopy(ours)
        ckpt["extra"] = {"payload": payload}
        path = tmp_path / f"{name}.ckpt"
        torch.save(ckpt, path, pickle_protocol=4)
        refused(lambda p=path: load_policy(p), path, "corrupt or unreadable")
        assert not marker.exists()


def test_files_that_are_not_checkpoints_are_one_line(ours, tmp_path) -> None:
    good = save_ours(ours, tmp_path / "good.ckpt")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    refused(lambda: load_policy(truncated), truncated, "")
    fifo = tmp_path / "fifo.ckpt"
    os.mkfifo(fifo)
    refused(lambda: load_policy(fifo), fifo, "is not a regular file")  # and no hang
    refused(lambda: load_checkpoint(fifo), fifo, "is not a regular file")
    folder = tmp_path / "folder"
    folder.mkdir()
    refused(lambda: load_policy(folder), folder, "not a LeRobot pretrained model")


def test_a_zip_that_inflates_is_refused_before_it_is_read(tmp_path) -> None:
    bomb = tmp_path / "bomb.ckpt"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"format": "x"}))
        archive.writestr("archive/data/0", b"\0" * (64 * 2**20))
    assert bomb.stat().st_size < 2**20
    refused(lambda: load_checkpoint(bomb), bomb, "refusing to inflate")
    refused(lambda: load_policy(bomb), bomb, "")


def test_a_checkpoints_env_is_data_and_one_of_ours() -> None:
    assert checked_checkpoint_env({"id": "envs:PushT-v0", "kwargs": {}})["id"] == "envs:PushT-v0"
    for env, fragment in (({"id": "os:system"}, "is not one of our envs"),
                          ({"id": "antigravity:Fly-v0"}, "is not one of our envs"),
                          ({"id": "envs:PushT-v0", "kwargs": {"x": "${oc.env:HOME}"}},
                           "interpolation"),
                          (["envs:PushT-v0"], "is not one of our envs")):
        with pytest.raises(ConfigError, match=fragment):
            checked_checkpoint_env(env)


def test_eval_refuses_a_crafted_checkpoint_in_one_line(ours, tmp_path, marker) -> None:
    ours["config"]["policy"]["_target_"] = "builtins.exec"
    ours["config"]["policy"]["_args_"] = [f"open({str(marker)!r}, 'w')"]
    path = save_ours(ours, tmp_path / "evil.ckpt")
    with pytest.raises(ConfigError, match="is not allowed"):
        load_checkpoint_and_policy(path, torch.device("cpu"))
    done = run_repo_script("eval_policy.py", f"checkpoint={path}", f"hydra.run.dir={tmp_path}/run",
                           "n_episodes=1", timeout=120)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "_target_ 'builtins.exec' is not allowed" in lines[0], done.stderr
    assert not marker.exists()


def test_a_non_finite_chunk_is_never_returned(ours, tmp_path) -> None:
    policy = load_policy(save_ours(ours, tmp_path / "ok.ckpt"))
    policy.normalizer.action_scale.fill_(1e-45)  # a denormal scale: unnormalising overflows
    obs = torch.zeros(1, policy.n_obs_steps, 20)
    with pytest.raises(NonFiniteChunkError, match="NaN or inf"):
        policy.predict_action(obs, policy.make_sampler("sequential", "ddim", 4))


# ------------------------------------------------------------------- Diffusion Policy pickles
def dp_payload() -> dict[str, Any]:
    from policy.foreign import safe_torch_load

    return safe_torch_load(DP_FIXTURE)


def save_dp(payload: dict[str, Any], path: Path, protocol: int = 2) -> Path:
    torch.save(payload, path, pickle_protocol=protocol)
    return path


def test_dp_pickle_tricks_never_run(tmp_path, marker) -> None:
    Exploit.command, PathWrite.target = f"touch {marker}", str(marker)
    for name, payload, fragment in (
            ("system", Exploit(), "refusing to unpickle"),
            ("path_write", PathWrite(), "refusing to unpickle pathlib.Path.write_text")):
        data = dp_payload()
        data["attack"] = payload
        path = save_dp(data, tmp_path / f"{name}.ckpt", protocol=4)
        refused(lambda p=path: import_diffusion_policy(p), path, fragment)
        assert not marker.exists()


def raw_pickle_checkpoint(tmp_path: Path, name: str, pickle_bytes: bytes) -> Path:
    """A torch zip whose data.pkl is `pickle_bytes` (hand-written opcodes)."""
    path = tmp_path / f"{name}.ckpt"
    torch.save({"cfg": "omegaconf"}, path)
    with zipfile.ZipFile(path) as archive:
        entries = {info.filename: archive.read(info) for info in archive.infolist()}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for filename, data in entries.items():
            archive.writestr(filename, pickle_bytes if filename.endswith("data.pkl") else data)
    return path


@pytest.mark.parametrize("module, name", [
    ("omegaconf.nodes", "Path.write_text"),  # an allowed module's imported name, by its dots
    ("omegaconf.nodes", "sys"),
    ("omegaconf.nodes", "AnyNode.__init__.__globals__"),
    ("pathlib", "Path.write_text"),
    ("builtins", "getattr"),
    ("dill._dill", "_create_function"),
    ("torch", "load"),
    ("__builtin__", "eval"),  # a Python 2 name mapped to builtins.eval
])
def test_hand_written_globals_are_refused(tmp_path, marker, module, name) -> None:
    # GLOBAL module name; then call it with (marker, "x"): it must never get that far
    body = (b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n"
            + pickle.dumps((str(marker), "x"), protocol=2)[2:-1] + b"R.")
    path = raw_pickle_checkpoint(tmp_path, "global", body)
    refused(lambda: import_diffusion_policy(path), path, "refusing to unpickle")
    assert not marker.exists()


def test_dp_config_resolvers_are_data_only(tmp_path, monkeypatch) -> None:
    from omegaconf import OmegaConf

    monkeypatch.setenv("PICARD_SECRET", "hunter2")
    cases = {
        "env": ("policy.n_action_steps", "${oc.env:PICARD_SECRET}", "'oc.env'"),
        "decode": ("policy.horizon", "${oc.decode:'16'}", "'oc.decode'"),
        "power": ("policy.horizon", "${eval:'9**9**9'}", "exponent"),
        "huge": ("policy.horizon", "${eval:'10**15*10**15'}", "exceeds"),
        "code": ("policy.horizon", "${eval:'__import__(\"os\").getcwd()'}",
                 "only arithmetic on numbers"),
        "long": ("policy.horizon", "${eval:'" + "+".join(["1"] * 200) + "'}", "characters"),
        "missing": ("policy.horizon", "${nowhere.to.be.found}", "does not have"),
        "cycle": ("policy.horizon", "${policy.horizon}", "nest too deeply"),
    }
    for name, (key, value, fragment) in cases.items():
        data = dp_payload()
        OmegaConf.update(data["cfg"], key, value, merge=False, force_add=True)
        path = save_dp(data, tmp_path / f"{name}.ckpt")
        message = refused(lambda p=path: import_diffusion_policy(p), path, fragment)
        assert "hunter2" not in message
    data = dp_payload()  # resolvers outside what the import reads are never run
    OmegaConf.update(data["cfg"], "logging.name", "${oc.env:PICARD_SECRET}", force_add=True)
    OmegaConf.update(data["cfg"], "policy.horizon", "${eval:'8*2'}")
    imported = import_diffusion_policy(save_dp(data, tmp_path / "fine.ckpt"))
    assert imported.config["horizon"] == 16
    assert "hunter2" not in json.dumps(imported.config) + json.dumps(imported.source)


def test_dp_fields_of_the_wrong_type_are_one_line(tmp_path) -> None:
    from omegaconf import OmegaConf

    for key, value, fragment in (("policy.horizon", "sixteen", "policy.horizon must be an "
                                                               "integer"),
                                 ("policy.model.down_dims", 7, "down_dims must be a list"),
                                 ("policy.model", [1, 2], "policy.model is missing or not a "
                                                          "mapping")):
        data = dp_payload()
        OmegaConf.update(data["cfg"], key, value, merge=False, force_add=True)
        path = save_dp(data, tmp_path / "typed.ckpt")
        refused(lambda p=path: import_diffusion_policy(p), path, fragment)
    data = dp_payload()
    data["state_dicts"]["ema_model"]["normalizer.params_dict.action.scale"] = torch.zeros(2)
    data["state_dicts"]["model"]["normalizer.params_dict.action.scale"] = torch.zeros(2)
    path = save_dp(data, tmp_path / "zero_scale.ckpt")
    refused(lambda: load_policy(path), path, "normalizer.action_scale has a zero")


def test_bounded_arithmetic_still_does_what_dp_configs_need() -> None:
    assert safe_arithmetic("8+2-1") == 9 and safe_arithmetic("2**10") == 1024
    assert safe_arithmetic("20*2") == 40 and safe_arithmetic("-(3)") == -3
    for bad in ("2**100", "1/0", "True+1", "(1).real", "[1]*3"):
        with pytest.raises(ValueError, match="refusing to evaluate"):
            safe_arithmetic(bad)


# ------------------------------------------------------------------------------ LeRobot
@pytest.fixture
def lerobot(tmp_path: Path) -> Path:
    folder = tmp_path / "lerobot"
    shutil.copytree(LEROBOT_FIXTURE, folder)
    return folder


def test_lerobot_config_json_is_checked(lerobot) -> None:
    config_file = lerobot / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text("{not json")
    refused(lambda: import_lerobot(lerobot), config_file, "is not valid JSON")
    config_file.write_text("[1, 2]")
    refused(lambda: import_lerobot(lerobot), config_file, "must hold a JSON object")
    for key, value, fragment in (("horizon", "abc", "horizon must be an integer"),
                                 ("horizon", 1e300, "policy.horizon = 1000"),
                                 ("down_dims", "512", "down_dims must be a list"),
                                 ("input_features", [1], "input_features must map"),
                                 ("beta_start", "x", "beta_start must be a number"),
                                 ("horizon", 10**9, "policy.horizon = 1000000000 is outside")):
        config_file.write_text(json.dumps({**config, key: value}))
        refused(lambda: load_policy(lerobot), lerobot, fragment)


def test_lerobot_weights_and_statistics_are_checked(lerobot) -> None:
    from safetensors.torch import load_file, save_file

    weights = lerobot / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    refused(lambda: import_lerobot(lerobot), weights, "not a readable safetensors file")
    weights.write_bytes(data)
    stats_file = next(lerobot.glob("policy_preprocessor_step_*_normalizer_processor.safetensors"))
    stats = load_file(str(stats_file))
    key = next(k for k in stats if k.startswith("observation.state") and k.endswith("max"))
    stats[key] = torch.full_like(stats[key], math.nan)
    save_file(stats, str(stats_file))
    refused(lambda: load_policy(lerobot), lerobot, "holds NaN")


# ------------------------------------------------------------------------- propagator files
def test_propagator_files_are_checked(ours, tmp_path) -> None:
    path = save_ours(ours, tmp_path / "policy.ckpt")
    policy = load_policy(path)
    schedule = policy.make_sampler("picard", "ddim", 8, update="parareal").schedule
    size = policy.horizon * policy.action_dim
    file = tmp_path / "propagators.pt"
    for tensor, fragment in ((torch.full((8, size, size), math.nan), "holds NaN"),
                             (torch.zeros(8, size, size + 1), "has shape"),
                             (torch.full((8, size, size), 1e9), "beyond"),
                             (torch.zeros(8, size, size, dtype=torch.int64), "no float")):
        save_propagators(file, policy, {schedule_key(schedule): {"propagator": tensor}})
        refused(lambda: load_propagators(file, policy), file, fragment)
        file.unlink()
    save_propagators(file, policy, {"../../etc": {"propagator": torch.zeros(8, size, size)}})
    refused(lambda: load_propagators(file, policy), file, "not a schedule key")


def test_a_crafted_file_never_imports_a_module(ours, tmp_path, monkeypatch) -> None:
    """Belt and braces: with imports of the usual attack modules blocked, every refusal above
    still comes before any import (a refusal, not an ImportError)."""
    import builtins

    real_import = builtins.__import__
    blocked = ("subprocess", "antigravity", "webbrowser", "ctypes")

    def guarded(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.split(".")[0] in blocked:
            raise AssertionError(f"a crafted file imported {name}")
        return real_import(name, *args, **kwargs)

    ours["config"]["policy"]["obs_encoder"]["_target_"] = "subprocess.Popen"
    path = save_ours(ours, tmp_path / "popen.ckpt")
    monkeypatch.setattr(builtins, "__import__", guarded)
    refused(lambda: load_policy(path), path, "'subprocess.Popen' is not allowed")
