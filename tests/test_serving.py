"""The policy server (serve_policy.py, app.serving) and its torch-free client (serving/).

A real server process on a free loopback port serves the shipped PushT policy with sequential
DDIM-16; its chunks must equal the in-process ChunkPolicy's for the same seeds, bad requests
must get one-line errors while the server keeps serving, episodes of different clients must
keep their own state, and SIGTERM must stop it cleanly. Batching is tested in-process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
from picard_client import PolicyClient, ServerError
from picard_client.protocol import pack, unpack
from websockets.sync.client import connect

from app.serving import PolicyServer, ServerSettings, _Connection
from policy.checkpoint import load_policy_checkpoint
from policy.chunking import ChunkPolicy
from tests.conftest import HEADLESS

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "checkpoints/pusht_lowdim/policy.ckpt"
NOISE_SEED = 100000


def start_server(tmp_path: Path, *overrides: str) -> tuple[subprocess.Popen, int]:
    """serve_policy.py on a free loopback port; returns the process and its port."""
    ready = tmp_path / "ready.json"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "serve_policy.py"), "port=0", f"ready_file={ready}",
         "sampler=sequential_ddim16", "threads=1", f"noise_seed={NOISE_SEED}", *overrides],
        cwd=ROOT, env={**os.environ, **HEADLESS}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 120
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"server did not start: {process.communicate()[0]}")
        time.sleep(0.1)
    return process, json.loads(ready.read_text())["port"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    process, port = start_server(tmp_path_factory.mktemp("server"))
    yield port
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def local() -> ChunkPolicy:
    """The in-process reference: the same policy, sampler and noise seed, whole chunks."""
    policy = load_policy_checkpoint(CHECKPOINT)
    return ChunkPolicy(policy, policy.make_sampler("sequential", "ddim", 16), NOISE_SEED,
                       full_horizon=True)


def obs_for(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(50, 450, size=(2, 20)).astype(np.float32)


def local_chunks(local: ChunkPolicy, seed: int, observations: list[np.ndarray]) -> list:
    local.on_reset(0, seed)
    return [local(obs[None])[0][0] for obs in observations]


@pytest.mark.slow
def test_round_trip_equals_the_in_process_chunk(server: int, local: ChunkPolicy) -> None:
    observations = [obs_for(1), obs_for(2)]
    expected = local_chunks(local, 7, observations)
    with PolicyClient(f"127.0.0.1:{server}") as client:
        meta = client.metadata()
        assert (meta["horizon"], meta["n_obs_steps"], meta["n_action_steps"]) == (16, 2, 8)
        assert meta["obs_spec"] == {"obs": [2, 20]} and meta["env"]["name"] == "pusht_lowdim"
        assert (meta["idle_timeout_s"], meta["max_message_items"]) == (60, 4096)  # serve.yaml
        client.reset(7)
        for obs, want in zip(observations, expected, strict=True):
            actions, info = client.infer(obs)
            assert actions.shape == (16, 2) and info["rounds"] == 16 and info["converged"]
            np.testing.assert_allclose(actions, want, atol=1e-4)


def test_two_clients_keep_separate_episode_state(server: int, local: ChunkPolicy) -> None:
    observations = [obs_for(3), obs_for(4)]
    want_a = local_chunks(local, 11, observations)
    want_b = local_chunks(local, 12, observations)
    with PolicyClient(f"127.0.0.1:{server}") as a, PolicyClient(f"127.0.0.1:{server}") as b:
        a.reset(11)
        b.reset(12)
        got_a0, _ = a.infer(observations[0])
        got_b0, _ = b.infer(observations[0])
        got_b1, _ = b.infer(observations[1])
        got_a1, _ = a.infer(observations[1])
        for got, want in ((got_a0, want_a[0]), (got_a1, want_a[1]), (got_b0, want_b[0]),
                          (got_b1, want_b[1])):
            np.testing.assert_allclose(got, want, atol=1e-4)
        with pytest.raises(ServerError, match="unknown episode"):
            b.infer(observations[0], episode=a.episode)  # not b's episode


def test_malformed_requests_get_one_line_errors_and_the_server_keeps_serving(
    server: int,
) -> None:
    url = f"ws://127.0.0.1:{server}"
    with connect(url, compression=None) as ws:
        for raw, expected in [
            (b"\xc1 not msgpack", "not a msgpack message"),
            (msgpack.packb([1, 2]), "map with a 'type'"),
            (pack({"type": "fly"}), "unknown request type"),
            (pack({"type": "infer", "episode": "x", "obs": np.zeros((2, 20), np.float32)}),
             "unknown episode"),
            (pack({"type": "reset", "seed": -3}), "seed must be"),
            (msgpack.packb({"type": "infer", "obs": {"__ndarray__": b"12", "dtype": "float32",
                                                     "shape": [1000, 1000]}}), "needs"),
            (msgpack.packb({"type": "infer", "obs": {"__ndarray__": b"", "dtype": "object",
                                                     "shape": [0]}}), "dtype"),
        ]:
            ws.send(raw)
            reply = unpack(ws.recv(timeout=10))
            assert reply["type"] == "error" and expected in reply["error"], reply
        ws.send("a text frame")
        assert "binary msgpack" in unpack(ws.recv(timeout=10))["error"]
    with PolicyClient(f"127.0.0.1:{server}") as client:
        client.reset(5)
        for bad, expected in [(np.zeros((3, 20), np.float32), "expected shape"),
                              (np.full((2, 20), np.nan, np.float32), "NaN"),
                              (np.zeros((2, 20), complex), "cannot be sent")]:
            with pytest.raises((ServerError, TypeError), match=expected):
                client.infer(bad)
        with pytest.raises(ServerError, match="deadline_ms"):
            client.infer(obs_for(1), deadline_ms=-1)
        with pytest.raises(ServerError, match="prefix weights must lie"):
            client.infer(obs_for(1), prefix_actions=np.zeros((16, 2)),
                         prefix_weights=np.full(16, 2.0))
        # an oversized message closes only its own connection
        with pytest.raises(ServerError, match="1009"):
            client.infer(np.zeros((2, 20 * 300_000), np.float32))
    with PolicyClient(f"127.0.0.1:{server}") as client:  # still serving
        client.reset(5)
        actions, _ = client.infer(obs_for(1))
        assert np.isfinite(actions).all()


def test_prefix_is_honoured_through_the_server(server: int) -> None:
    committed = np.linspace(100, 300, 32, dtype=np.float32).reshape(16, 2)
    weights = np.zeros(16, np.float32)
    weights[:4] = 1.0
    with PolicyClient(f"127.0.0.1:{server}") as client:
        client.reset(9)
        actions, _ = client.infer(obs_for(1), prefix_actions=committed, prefix_weights=weights)
    np.testing.assert_allclose(actions[:4], committed[:4], rtol=1e-5)  # normalize round trip


@pytest.mark.slow
def test_sigterm_shuts_the_server_down_cleanly(tmp_path: Path) -> None:
    process, port = start_server(tmp_path)
    with PolicyClient(f"127.0.0.1:{port}") as client:
        client.reset(1)
        client.infer(obs_for(1))
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert "server stopped after 1 sampler calls" in output
    assert not (ROOT / "serve_policy.log").exists()  # a server writes no files (log: stdout)
    with pytest.raises(ServerError, match="cannot reach"):
        PolicyClient(f"127.0.0.1:{port}", timeout_s=2)


@pytest.mark.slow
def test_bad_server_config_is_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "serve_policy.py"), "port=70000"], cwd=ROOT,
        env={**os.environ, **HEADLESS}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("config error: port")


def test_guided_prefixes_need_an_eager_server(local: ChunkPolicy) -> None:
    """serve_policy.py inpaint_method=guide: a server whose runtime cannot be differentiated
    refuses to start, naming the runtime (run_serve turns it into a config error)."""
    from app.command_line import compose_config
    from app.serving import check_serve_config

    guided = PolicyServer(local.policy, local.sampler, {}, ServerSettings(inpaint_method="guide"))
    assert guided.chunks.inpaint_method == "guide"
    runtime = local.policy.__dict__.get("_runtime")
    try:
        local.policy.use_runtime("compile")
        with pytest.raises(ValueError, match="needs runtime=eager; got runtime=compile"):
            PolicyServer(local.policy, local.sampler, {}, ServerSettings(inpaint_method="guide"))
    finally:
        local.policy.__dict__["_runtime"] = runtime
    with pytest.raises(Exception, match=r"inpaint_method must be one of \['replace', 'guide'\]"):
        check_serve_config(compose_config("serve", ["inpaint_method=nudge"]))


def test_waiting_requests_are_sampled_in_one_call(local: ChunkPolicy) -> None:
    """Requests that queue while the worker is busy go into ONE sampler call; their chunks
    equal the one-by-one chunks up to float rounding (docs/design.md §9)."""
    server = PolicyServer(local.policy, local.sampler, {},
                          ServerSettings(noise_seed=NOISE_SEED, max_batch=8))
    ports: list[int] = []
    loop = asyncio.new_event_loop()
    stop_event = asyncio.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.serve("127.0.0.1", 0, stop_event, ports.append))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    while not ports:
        time.sleep(0.05)
    seeds, results = [21, 22, 23, 24], {}

    def ask(seed: int) -> None:
        with PolicyClient(f"127.0.0.1:{ports[0]}") as client:
            client.reset(seed)
            results[seed] = client.infer(obs_for(seed))

    gate, run_batch, held = threading.Event(), server._run, []

    def gated_run(batch: list) -> None:  # the worker waits here: the requests pile up meanwhile
        held.append(len(batch))
        gate.wait(timeout=30)
        run_batch(batch)

    server._run = gated_run
    workers = [threading.Thread(target=ask, args=(s,)) for s in seeds]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 30
    while sum(held) + server._jobs.qsize() < len(seeds) and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.set()
    for worker in workers:
        worker.join(timeout=60)
    loop.call_soon_threadsafe(stop_event.set)
    thread.join(timeout=30)
    assert len(server.batches) <= 2 and max(b.batch for b in server.batches) >= 2
    assert any(info["batch"] > 1 for _, info in results.values())
    for seed in seeds:
        (want,) = local_chunks(local, seed, [obs_for(seed)])
        np.testing.assert_allclose(results[seed][0], want, atol=1e-3)


def test_eval_runs_a_realtime_robot_against_the_server(server: int, tmp_path: Path) -> None:
    from app.command_line import compose_config
    from app.evaluation import run_eval

    overrides = ["realtime.enabled=true", f"server=127.0.0.1:{server}", "n_episodes=1",
                 "max_steps=24", "logger.wandb=false", "progress=false",
                 "realtime.handoff=inpaint"]
    results = run_eval(compose_config("eval", overrides), tmp_path / "run", overrides)
    assert results["sampler"]["label"] == "sequential DDIM-16"  # the server's, not eval.yaml's
    assert results["checkpoint"]["server"] == f"127.0.0.1:{server}"
    timed = [r for r in results["requests"] if not r["startup"]]
    assert timed and all(r["server_overhead_ms"] >= 0 for r in timed)
    assert all(r["frozen_steps"] >= 2 for r in timed)  # the prefix travelled with the request
    assert results["metrics"]["mean_score"] is not None
    wrong = ["realtime.enabled=true", f"server=127.0.0.1:{server}", "env=lift_lowdim",
             "logger.wandb=false"]
    with pytest.raises(Exception, match="env lift_lowdim does not fit the policy served at"):
        run_eval(compose_config("eval", wrong), tmp_path / "wrong", wrong)
    with pytest.raises(Exception, match="realtime.enabled=true"):
        bad = [f"server=127.0.0.1:{server}", "logger.wandb=false"]
        run_eval(compose_config("eval", bad), tmp_path / "bad", bad)


def test_an_episode_ending_during_its_sampler_call_is_freed_after_it(local: ChunkPolicy) -> None:
    """The event loop never waits for inference: releasing a busy slot is deferred to the
    worker, which frees it once the call is done (and never resets it mid-call)."""
    server = PolicyServer(local.policy, local.sampler, {}, ServerSettings(
        noise_seed=NOISE_SEED, max_clients=1, max_episodes_per_client=2))
    connection = _Connection()
    (slot,) = [server._reset(5, connection).slot]
    server._busy.add(slot)  # as when its request was queued
    server._release(slot)
    assert slot not in server._free_slots and slot in server.chunks._generators
    server._done_with([slot])
    assert slot in server._free_slots and slot not in server.chunks._generators
