"""The robot-side distribution (client/, `pip install ./client`): it declares numpy, msgpack
and websockets only, imports nothing else (no torch, pygame, wandb, gymnasium, nothing of the
main package), runs the real-time loop on its own, and examples/robot_loop.py drives a fake
robot from a live server with only picard_client importable."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from policy.checkpoint import load_policy_checkpoint
from tests.test_server_hostile import CHECKPOINT, WAIT_S, Running, make_server

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = ("torch", "pygame", "wandb", "gymnasium", "hydra", "omegaconf", "app", "policy",
             "envs", "picard_sampler", "serving")
BLOCKER = f"""
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {FORBIDDEN!r}:
            raise ImportError(f"picard_client must not import {{name}}")
sys.meta_path.insert(0, Blocker())
"""


def run_without_main_package(code: str, *args: str, timeout: float = 60
                             ) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter where importing torch (or anything of the main package)
    fails, run outside the repository so only installed packages are importable."""
    return subprocess.run([sys.executable, "-c", BLOCKER + code, *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT / "client")


def test_the_client_declares_only_numpy_msgpack_and_websockets() -> None:
    client = tomllib.loads((ROOT / "client/pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~ \[]", dep)[0] for dep in client["dependencies"]}
    assert names == {"numpy", "msgpack", "websockets"}
    main = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"{client['name']}=={client['version']}" in main  # the main package depends on it
    assert "./client" in (ROOT / "scripts/setup.sh").read_text()  # installed from here first


def test_picard_client_runs_its_realtime_loop_without_torch() -> None:
    code = """
import numpy as np
import picard_client
from picard_client import openpi, protocol, records
from picard_client.realtime import RealtimeController, RealtimeSettings, summarize_realtime

def chunk_fn(obs, budget_s, prefix=None):
    return np.zeros((1, 16, 2)) + obs[:, -1:, :2], {"converged": True}

settings = RealtimeSettings(control_hz=10, handoff="inpaint")
with RealtimeController(chunk_fn, (2, 8, 16), settings) as controller:
    steps = [controller(np.full((1, 2, 20), float(k)))[1] for k in range(5)]
metrics = summarize_realtime(steps, controller.requests)
assert metrics["n_timed_requests"] == 4, metrics
frame = openpi.packb({"obs": np.ones((2, 20), np.float32)})
assert openpi.unpackb(frame, 4096)["obs"].shape == (2, 20)
print("ok", picard_client.__file__)
"""
    result = run_without_main_package(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok") and "client/picard_client" in result.stdout


@pytest.mark.slow
def test_the_example_robot_loop_drives_a_fake_robot_from_a_server() -> None:
    """examples/robot_loop.py with only picard_client importable, 20 Hz for 2 s, inpaint."""
    policy: Any = load_policy_checkpoint(CHECKPOINT)
    with Running(make_server(policy, idle_timeout_s=WAIT_S)) as running:
        code = ("import runpy, sys; sys.argv = ['robot_loop.py', *sys.argv[1:]]; "
                f"runpy.run_path({str(ROOT / 'examples/robot_loop.py')!r}, run_name='__main__')")
        result = run_without_main_package(
            code, "--server", f"127.0.0.1:{running.port}", "--hz", "20", "--seconds", "2",
            "--handoff", "inpaint", timeout=WAIT_S + 30)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["ticks"] >= 16 and summary["commands"] == summary["ticks"]
    assert summary["latency_ms_p50"] is not None and summary["episodes_lost"] == 0
    assert summary["client"]["stale_replies"] == 0 and summary["client"]["requests"] >= 3


@pytest.mark.slow  # builds a wheel: ~10 s here
def test_the_client_wheel_holds_picard_client_only(tmp_path: Path) -> None:
    import shutil

    source = tmp_path / "client"  # a copy: setuptools writes build/ beside the sources
    shutil.copytree(ROOT / "client", source,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(source)], check=True, timeout=300,
                   capture_output=True)
    (wheel,) = tmp_path.glob("picard_policy_client-*.whl")
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert {n.split("/")[0] for n in names} == {"picard_client",
                                                 wheel.name.split("-py3")[0] + ".dist-info"}
    requires = sorted(line.split(": ")[1].split(">")[0].split("<")[0]
                      for line in metadata.splitlines() if line.startswith("Requires-Dist"))
    assert requires == ["msgpack", "numpy", "websockets"]
