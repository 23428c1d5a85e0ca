"""Hostile clients against the policy server (issue 31, items 3 and 5): the probe in the suite.

Every case must end in an error reply (one line naming what is wrong) or a close with a code and
reason, while the server keeps serving everyone else: no hang, no traceback in the log, no
chunk that is not finite. The servers run in-process on free loopback ports (the shipped PushT
policy, sequential DDIM-4: fast); SIGTERM is sent to a real serve_policy.py. Waits are bounded
and wait for outcomes (events, closes, replies), never for a guessed time.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
from picard_client import PolicyClient, ServerError
from picard_client.protocol import CLOSE_IDLE, ProtocolError, pack, unpack
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

import app.serving
from app.serving import InferenceThreadDied, PolicyServer, ServerSettings
from policy.checkpoint import load_policy_checkpoint
from tests.conftest import HEADLESS

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "checkpoints/pusht_lowdim/policy.ckpt"
WAIT_S = 30.0  # the most any single outcome may take (generous: the CPU is shared)
OBS = np.linspace(100, 400, 40, dtype=np.float32).reshape(2, 20)
pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ harness
class Running:
    """A PolicyServer serving on a loopback port (0: a free one) in a thread of its own (its
    own event loop), stopped by `stop()` (what SIGTERM does: sets the serve loop's stop
    event)."""

    def __init__(self, server: PolicyServer, port: int = 0, ssl_context: Any = None):
        self.server = server
        self.port = port
        self.ssl_context = ssl_context
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        async def serve() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            await self.server.serve("127.0.0.1", self.port, self._stop, self._listening,
                                    self.ssl_context)

        try:
            asyncio.run(serve())
        except BaseException as e:  # noqa: BLE001 - reported to the test
            self.error = e
        finally:
            self._ready.set()

    def _listening(self, port: int) -> None:
        self.port = port
        self._ready.set()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def __enter__(self) -> Running:
        self._thread.start()
        assert self._ready.wait(WAIT_S) and self.port, f"server did not start: {self.error!r}"
        return self

    def stop(self) -> float:
        """Stop the server; returns how long serve() took to return (asserting it did)."""
        start = time.monotonic()
        if self._thread.is_alive():
            assert self._loop is not None and self._stop is not None
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(WAIT_S)
        assert not self._thread.is_alive(), "serve() did not return after stop"
        return time.monotonic() - start

    def stopped(self, timeout: float = WAIT_S) -> bool:
        """Wait for serve() to return by itself."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    """Poll `condition` until true, failing the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


class Gate:
    """Holds the inference thread at the start of each sampler call until opened."""

    def __init__(self, server: PolicyServer):
        self.open_ = threading.Event()
        self.held: list[int] = []
        self._run = server._run

        def gated(batch: list) -> None:
            self.held.append(len(batch))
            self.open_.wait(WAIT_S)
            self._run(batch)

        server._run = gated

    def open(self) -> None:
        self.open_.set()


def raw(running: Running) -> ClientConnection:
    return connect(running.url, compression=None, max_size=None, open_timeout=WAIT_S)


def ask(ws: ClientConnection, frame: bytes | str | dict) -> dict[str, Any]:
    ws.send(frame if isinstance(frame, bytes | str) else pack(frame))
    return unpack(ws.recv(timeout=WAIT_S), max_items=None)


def reset(ws: ClientConnection, seed: int = 1) -> str:
    return ask(ws, {"type": "reset", "seed": seed})["episode"]


def refusal(reply: dict[str, Any]) -> str:
    """The error line of a refused request (asserting it is one)."""
    assert reply["type"] == "error", reply
    assert "\n" not in reply["error"] and len(reply["error"]) <= 500
    return reply["error"]


def assert_chunk(reply: dict[str, Any]) -> None:
    assert reply["type"] == "chunk", reply
    assert reply["actions"].shape == (16, 2) and np.isfinite(reply["actions"]).all()


def assert_serving(running: Running) -> None:
    """A well-behaved robot is still served (a fresh connection, a fresh episode)."""
    with PolicyClient(f"127.0.0.1:{running.port}", timeout_s=WAIT_S) as client:
        client.reset(3)
        actions, info = client.infer(OBS)
    assert np.isfinite(actions).all() and info["converged"]
    assert running.server._worker.is_alive()


def arr(data: Any, dtype: Any = "float32", shape: Any = (2, 20)) -> dict[str, Any]:
    return {"__ndarray__": data, "dtype": dtype,
            "shape": list(shape) if isinstance(shape, tuple) else shape}


def frame(message: dict[str, Any]) -> bytes:
    """A msgpack frame written by hand (bytes keys, odd values): no numpy encoder involved."""
    return msgpack.packb(message, use_bin_type=True, strict_types=False)


def raw_socket(port: int) -> socket.socket:
    """A TCP connection that completes a websocket handshake by hand and then does only what
    the test writes (answers no ping, reads nothing)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(4096)
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


def close_code_of(sock: socket.socket) -> int | None:
    """Read until the server closes the TCP connection; the code of its close frame, if any."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    at = 0
    while at + 2 <= len(data):  # server frames: unmasked, short payloads
        opcode, length = data[at] & 0x0F, data[at + 1] & 0x7F
        if opcode == 0x8:
            return int.from_bytes(data[at + 2:at + 4], "big")
        at += 2 + length
    return None


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def policy() -> Any:
    return load_policy_checkpoint(CHECKPOINT)


def make_server(policy: Any, **knobs: Any) -> PolicyServer:
    return PolicyServer(policy, policy.make_sampler("sequential", "ddim", 4), {},
                        ServerSettings(noise_seed=100000, **knobs))


@pytest.fixture(scope="module")
def live(policy: Any) -> Iterator[Running]:
    """The shared server of the cases that leave no state behind."""
    with Running(make_server(policy, max_clients=8, idle_timeout_s=WAIT_S)) as running:
        yield running


@pytest.fixture(autouse=True)
def no_tracebacks(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Nothing a test does may log an error or a traceback (the server's log stays clean)."""
    caplog.set_level(logging.WARNING)
    yield
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [f"{r.name}: {r.getMessage()}" for r in bad]


# -------------------------------------------------------------------- malformed messages
DEEP = b"\x91" * 2000 + b"\x90"
MALFORMED = [
    ("truncated", pack({"type": "metadata", "x": b"abc"})[:-2],
     "truncated msgpack message"),
    ("extra-bytes", pack({"type": "metadata"}) + b"\x01\x02", "2 extra bytes follow it"),
    ("reserved-byte", b"\xc1\xc1", "not a msgpack message"),
    ("not-a-map", msgpack.packb([1, 2]), "must be a map with a 'type'; got a list"),
    ("no-type", msgpack.packb({"kind": "infer"}), "got keys ['kind']"),
    ("int-key", msgpack.packb({1: 2, "type": "metadata"}), "map keys must be strings"),
    ("bytes-key", frame({b"type": "metadata"}), "map keys must be strings; got a bytes key"),
    ("bytes-key-in-obs", frame({"type": "infer", "obs": {b"obs": arr(OBS.tobytes())}}),
     "got a bytes key b'obs'"),
    ("ext-type", frame({"type": "metadata", "x": msgpack.ExtType(5, b"")}), "ext type 5"),
    ("timestamp", frame({"type": "metadata", "id": msgpack.Timestamp(1, 0)}), "timestamps"),
    ("bad-utf8", b"\x81\xa4type\xa2\xff\xfe", "not valid UTF-8"),
    ("nested-too-deep", b"\x82\xa4type\xa1x\xa1x" + DEEP, "nested too deep"),
    ("long-array", frame({"type": "metadata", "x": list(range(1000))}),
     "array of 1000 entries; at most 256 per map or array"),
    ("too-many-items", frame({"type": "metadata", "x": [[0] * 50] * 100}),
     "more than 4096 msgpack items"),
    ("huge-shape", frame({"type": "infer", "obs": arr(b"", shape=[2**62, 2**62])}),
     "array shape [4611686018427387904, 4611686018427387904] too large"),
    ("huge-empty-shape", frame({"type": "infer", "obs": arr(b"", shape=[0, 2**62])}),
     "too large for numpy"),
    ("shape-vs-bytes", frame({"type": "infer", "obs": arr(b"12", shape=[1000, 1000])}),
     "needs 4000000 bytes; got 2"),
    ("too-few-elements", frame({"type": "infer", "obs": arr(b"1234567", shape=[1])}),
     "needs 4 bytes; got 7"),
    ("object-dtype", frame({"type": "infer", "obs": arr(b"", "object", [0])}),
     "array dtype 'object' is not one of"),
    ("int-dtype", frame({"type": "infer", "obs": arr(b"", 5, [0])}), "array dtype 5"),
    ("negative-dim", frame({"type": "infer", "obs": arr(b"", shape=[-1])}),
     "shape must be a list of ints >= 0; got [-1]"),
    ("bool-dim", frame({"type": "infer", "obs": arr(b"\0" * 4, shape=[True])}),
     "list of ints >= 0; got [True]"),
    ("shape-not-list", frame({"type": "infer", "obs": arr(b"", shape="2x20")}),
     "got '2x20'"),
    ("40-dims", frame({"type": "infer", "obs": arr(b"\0" * 4, shape=[1] * 40)}),
     "40 dimensions; at most 32"),
    ("array-extra-key", frame({"type": "infer", "obs": {**arr(b""), "order": "F"}}),
     "unknown keys ['order']"),
    ("array-data-str", frame({"type": "infer", "obs": arr("abcd", shape=[1])}),
     "must be raw bytes (msgpack bin); got a str"),
    ("unknown-type", pack({"type": "fly"}), "unknown request type 'fly'"),
    ("type-not-str", frame({"type": [1, 2]}), "unknown request type [1, 2]"),
    ("id-a-list", frame({"type": "metadata", "id": [1]}), "id must be null, an int or"),
    ("id-too-long", frame({"type": "metadata", "id": "x" * 1000}), "at most 128 characters"),
    ("episode-a-list", pack({"type": "infer", "episode": [1], "obs": OBS}),
     "unknown episode [1] on this connection"),
    ("seed-negative", pack({"type": "reset", "seed": -3}), "seed must be null or an int"),
    ("seed-huge", pack({"type": "reset", "seed": 2**64 - 1}), "got 18446744073709551615"),
    ("seed-float", pack({"type": "reset", "seed": 1.5}), "got 1.5"),
    ("text-frame", "a text frame", "binary msgpack frames, not text"),
]


@pytest.mark.parametrize(("data", "expected"), [case[1:] for case in MALFORMED],
                         ids=[case[0] for case in MALFORMED])
def test_a_malformed_message_is_one_line_naming_what_is_wrong(
    live: Running, data: bytes | str, expected: str
) -> None:
    with raw(live) as ws:
        assert expected in refusal(ask(ws, data))
        assert ask(ws, {"type": "metadata", "id": 7})["id"] == 7  # the connection still works


EMPTY_ARRAYS = msgpack.packb({"type": "metadata", "a": [[[[]] * 256] * 256] * 63})  # 4 MB


def test_the_item_budget_bounds_decoding_memory_and_time() -> None:
    """The probe's 4 MiB of empty arrays (9.6 s and 259 MiB of Python objects before), one
    array of 4 million and a 1000-deep nest of arrays that each declare 256 entries cost a few
    MiB at most; a legitimate 4 MiB array still decodes."""
    hostile = [(EMPTY_ARRAYS, "more than 4096 msgpack items"),
               (b"\xdd" + (4 * 2**20).to_bytes(4, "big") + b"\x90" * (4 * 2**20),
                "array of 4194304 entries; at most 256"),
               (b"\x82\xa4type\xa1x\xa1x" + b"\xdc\x01\x00" * 1000, "truncated")]
    for data, message in hostile:
        tracemalloc.start()
        start = time.perf_counter()
        with pytest.raises(ProtocolError, match=message):
            unpack(data)
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 8 * 2**20 and seconds < 1.0, (message, peak, seconds)
    big = np.arange(2**20, dtype=np.float32).reshape(1024, 1024)
    np.testing.assert_array_equal(unpack(pack({"type": "infer", "obs": big}))["obs"], big)


def test_a_hostile_4mib_message_is_refused_while_others_are_served(live: Running) -> None:
    hostile = EMPTY_ARRAYS
    done = threading.Event()
    replies: list[dict] = []

    def attacker() -> None:
        with raw(live) as ws:
            for _ in range(3):
                replies.append(ask(ws, hostile))
        done.set()

    thread = threading.Thread(target=attacker)
    thread.start()
    assert_serving(live)
    assert done.wait(WAIT_S)
    thread.join()
    assert all("more than 4096 msgpack items" in refusal(r) for r in replies)


# ---------------------------------------------------------------------- bad infer requests
BAD_INFER = [
    ("obs-nested-map", {"obs": {"obs": {"obs": OBS}}}, "obs['obs'] must be an array"),
    ("obs-a-string", {"obs": "pixels"}, "obs must be an array (To, ...) or a map of arrays; "
                                        "got a str"),
    ("obs-empty-map", {"obs": {}}, "got an empty map"),
    ("obs-missing", {}, "got null"),
    ("obs-unknown-key", {"obs": {"state": OBS}}, "missing keys ['obs']"),
    ("obs-bool", {"obs": OBS > 0}, "has dtype torch.bool"),
    ("obs-nan", {"obs": np.where(np.eye(2, 20) > 0, np.nan, OBS)}, "contains NaN or inf"),
    ("obs-inf", {"obs": np.full((2, 20), np.inf, np.float32)}, "contains NaN or inf"),
    ("obs-overflows-float32", {"obs": np.full((2, 20), 1e300)}, "contains NaN or inf"),
    ("obs-shape", {"obs": np.zeros((3, 20), np.float32)}, "expected shape (B, 2, 20), got "
                                                          "(1, 3, 20)"),
    ("obs-empty", {"obs": np.zeros((0,), np.float32)}, "expected shape"),
    ("obs-1mib", {"obs": np.zeros((2, 2**17), np.float32)},  # decoded off the event loop
     "expected shape (B, 2, 20), got (1, 2, 131072)"),
    ("deadline-nan", {"obs": OBS, "deadline_ms": float("nan")}, "deadline_ms must be null or "
                                                                "a finite number > 0; got nan"),
    ("deadline-inf", {"obs": OBS, "deadline_ms": float("inf")}, "got inf"),
    ("deadline-negative", {"obs": OBS, "deadline_ms": -1}, "got -1"),
    ("deadline-bool", {"obs": OBS, "deadline_ms": True}, "got True"),
    ("deadline-str", {"obs": OBS, "deadline_ms": "soon"}, "got 'soon'"),
    ("prefix-not-map", {"obs": OBS, "prefix": [1]}, "prefix must be a map"),
    ("prefix-shape", {"obs": OBS, "prefix": {"actions": np.zeros((8, 2)),
                                             "weights": np.zeros(16)}},
     "prefix actions must be an array of shape (16, 2); got an array [8, 2]"),
    ("prefix-nan", {"obs": OBS, "prefix": {"actions": np.full((16, 2), np.nan),
                                           "weights": np.zeros(16)}}, "prefix contains NaN"),
    ("prefix-overflows-float32", {"obs": OBS, "prefix": {"actions": np.full((16, 2), 1e300),
                                                         "weights": np.zeros(16)}},
     "prefix contains NaN or inf (in float32)"),
    ("prefix-weights", {"obs": OBS, "prefix": {"actions": np.zeros((16, 2)),
                                               "weights": np.full(16, 2.0)}},
     "weights must lie in [0, 1]"),
]


@pytest.mark.parametrize(("fields", "expected"), [case[1:] for case in BAD_INFER],
                         ids=[case[0] for case in BAD_INFER])
def test_a_bad_infer_request_is_refused_alone_and_its_episode_goes_on(
    live: Running, fields: dict, expected: str
) -> None:
    with raw(live) as ws:
        episode = reset(ws)
        assert expected in refusal(ask(ws, {"type": "infer", "episode": episode, **fields}))
        assert_chunk(ask(ws, {"type": "infer", "episode": episode, "obs": OBS}))
    assert live.server._worker.is_alive()


def test_the_probes_bytes_key_no_longer_kills_the_inference_thread(live: Running) -> None:
    """The wedge the probe found: {b'x': ..., 'y': ...} made check_obs raise a TypeError in the
    inference thread, which died; every later client then waited forever."""
    with raw(live) as ws:
        episode = reset(ws)
        data = frame({"type": "infer", "episode": episode,
                      "obs": {b"x": arr(OBS.tobytes()), "y": arr(OBS.tobytes())}})
        assert "map keys must be strings; got a bytes key b'x'" in refusal(ask(ws, data))
    assert_serving(live)


def test_any_failure_inside_the_inference_thread_is_answered_to_its_request(
    live: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever check_obs or the sampler raise (here a TypeError, as the bytes key did, and a
    RuntimeError), the request hears it in one line and the next request is served."""
    real_check = live.server.policy.check_obs

    def check(obs: Any) -> Any:
        if isinstance(obs, dict) and "poison" in obs:
            raise TypeError("'<' not supported between instances of 'str' and 'bytes'")
        return real_check(obs)

    monkeypatch.setattr(live.server.policy, "check_obs", check)

    class Crashing:
        def __init__(self, chunks: Any):
            self.chunks = chunks

        def __getattr__(self, name: str) -> Any:
            return getattr(self.chunks, name)

        def __call__(self, obs: Any, budget: Any, prefix: Any = None, rows: Any = None) -> Any:
            # 123 is a sentinel copied through untouched (exact in float32): no arithmetic
            if float(obs["obs"][0, 0, 0]) == 123.0:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return self.chunks(obs, budget, prefix=prefix, rows=rows)

    monkeypatch.setattr(live.server, "chunks", Crashing(live.server.chunks))
    with raw(live) as ws:
        episode = reset(ws)
        poisoned = {"type": "infer", "episode": episode, "obs": {"obs": OBS, "poison": OBS}}
        assert "infer: '<' not supported" in refusal(ask(ws, poisoned))
        crash = {"type": "infer", "episode": episode, "obs": np.full((2, 20), 123, np.float32)}
        assert "inference failed: CUDA error" in refusal(ask(ws, crash))
        assert_chunk(ask(ws, {"type": "infer", "episode": episode, "obs": OBS}))
    assert live.server._worker.is_alive()


def test_a_message_in_a_thousand_fragments_is_served(live: Running) -> None:
    with raw(live) as ws:
        data = pack({"type": "metadata", "id": 3})
        ws.send([data[i:i + 1] for i in range(len(data))] + [b""] * 1000)
        assert unpack(ws.recv(timeout=WAIT_S), max_items=None)["id"] == 3


def test_a_flood_of_tiny_messages_is_answered_in_order_and_others_are_served(
    live: Running,
) -> None:
    n = 1000
    with raw(live) as ws:
        def flood() -> None:
            for i in range(n):
                ws.send(pack({"type": "end", "episode": "nope", "id": i}))

        sender = threading.Thread(target=flood)
        sender.start()
        assert_serving(live)  # while the flood is read
        ids = []
        for _ in range(n):
            reply = unpack(ws.recv(timeout=WAIT_S), max_items=None)
            assert "unknown episode 'nope'" in refusal(reply)
            ids.append(reply["id"])
        sender.join(WAIT_S)
    assert ids == list(range(n))


def test_connections_beyond_max_clients_are_told_to_come_back(live: Running) -> None:
    clients = [raw(live) for _ in range(live.server.max_clients)]
    try:
        wait_for(lambda: len(live.server._connections) == 8, "eight connections")
        with pytest.raises(ServerError, match=r"1013.*server full \(8 clients\)"):
            PolicyClient(f"127.0.0.1:{live.port}", timeout_s=WAIT_S).metadata()
    finally:
        for client in clients:
            client.close()
    wait_for(lambda: not live.server._connections, "the connections to be dropped")
    assert_serving(live)


# ----------------------------------------------------------------- layouts and batching
def test_requests_with_different_obs_layouts_share_one_sampler_call(policy: Any) -> None:
    """The probe: half the clients sending obs as an array, half as {'obs': array}, refused
    57 of 60 with an internal error. Each observation is normalised to the policy's layout
    first, so the six requests go into ONE call, and the same seed gives the same chunk in
    either layout (up to float rounding)."""
    server = make_server(policy, max_batch=8, idle_timeout_s=WAIT_S)
    with Running(server) as running:
        gate = Gate(server)
        results: dict[tuple[int, str], dict] = {}

        def robot(seed: int, layout: str) -> None:
            with raw(running) as ws:
                episode = reset(ws, seed)
                obs = OBS + seed if layout == "array" else {"obs": OBS + seed}
                results[seed, layout] = ask(ws, {"type": "infer", "episode": episode,
                                                 "obs": obs})

        blocker = threading.Thread(target=robot, args=(0, "array"))
        blocker.start()  # its call holds the worker while the six queue up
        wait_for(lambda: gate.held, "the blocking call")
        robots = [threading.Thread(target=robot, args=(seed, layout))
                  for seed in (41, 42, 43) for layout in ("array", "map")]
        for thread in robots:
            thread.start()
        wait_for(lambda: server._jobs.qsize() == 6, "six queued requests")
        gate.open()
        for thread in [blocker, *robots]:
            thread.join(WAIT_S)
    assert [b.batch for b in server.batches] == [1, 6]
    for seed in (41, 42, 43):
        as_array, as_map = results[seed, "array"], results[seed, "map"]
        assert_chunk(as_array)
        assert_chunk(as_map)
        assert as_array["info"]["batch"] == as_map["info"]["batch"] == 6
        np.testing.assert_allclose(as_array["actions"], as_map["actions"], atol=1e-3)


def test_a_batch_mate_that_breaks_the_call_does_not_take_the_others_down(policy: Any) -> None:
    """A finite but huge observation (3e38) makes the denoiser return inf, which fails the
    call of three; each request is then sampled alone, and only the culprit hears of it."""
    server = make_server(policy, max_batch=8, idle_timeout_s=WAIT_S)
    with Running(server) as running:
        gate = Gate(server)
        results: dict[str, dict] = {}

        def robot(name: str, obs: np.ndarray) -> None:
            with raw(running) as ws:
                episode = reset(ws, 5)
                results[name] = ask(ws, {"type": "infer", "episode": episode, "obs": obs})

        blocker = threading.Thread(target=robot, args=("blocker", OBS))
        blocker.start()
        wait_for(lambda: gate.held, "the blocking call")
        robots = [threading.Thread(target=robot, args=args) for args in
                  [("good-1", OBS), ("huge", np.full((2, 20), 3e38, np.float32)),
                   ("good-2", OBS + 1)]]
        for thread in robots:
            thread.start()
        wait_for(lambda: server._jobs.qsize() == 3, "three queued requests")
        gate.open()
        for thread in [blocker, *robots]:
            thread.join(WAIT_S)
    assert "NaN or inf" in refusal(results["huge"])
    for name in ("blocker", "good-1", "good-2"):
        assert_chunk(results[name])


@pytest.mark.parametrize("breakage", ["nan-action-stats", "nan-weights"])
def test_a_chunk_that_is_not_finite_is_never_sent(policy: Any, breakage: str) -> None:
    """NaN action statistics gave NaN chunks marked converged; garbage weights NaN ones. The
    server checks every chunk at its boundary and replies with an error instead."""
    broken = copy.deepcopy(policy)
    with torch.no_grad():
        if breakage == "nan-action-stats":
            broken.normalizer.action_scale.fill_(float("nan"))
        else:
            next(broken.model.parameters()).fill_(float("nan"))
    with Running(make_server(broken, idle_timeout_s=WAIT_S)) as running, raw(running) as ws:
        episode = reset(ws)
        for _ in range(2):  # and the episode can still ask
            error = refusal(ask(ws, {"type": "infer", "episode": episode, "obs": OBS}))
            assert "NaN or inf" in error
        assert running.server._worker.is_alive()


# ----------------------------------------------------------------------- clients that go
def test_a_client_that_leaves_mid_request_frees_its_place_and_its_episode(policy: Any) -> None:
    """max_clients=1, one episode each: a client leaves while its request waits for a call;
    its connection is let go at once, the next client takes its place and starts an episode
    while the old one's slot is still in the call, and the slot is freed after it."""
    server = make_server(policy, max_clients=1, max_episodes_per_client=1,
                         idle_timeout_s=WAIT_S, resume_window_s=0)
    with Running(server) as running:
        gate = Gate(server)
        ws = raw(running)
        episode = reset(ws)
        ws.send(pack({"type": "infer", "episode": episode, "obs": OBS}))
        wait_for(lambda: gate.held, "the request to reach the inference thread")
        ws.socket.shutdown(socket.SHUT_RDWR)  # gone, without a close handshake
        ws.close()
        wait_for(lambda: not server._connections, "the connection to be let go")
        with raw(running) as other:
            other_episode = reset(other, 2)  # while the old slot is still busy
            gate.open()
            assert_chunk(ask(other, {"type": "infer", "episode": other_episode, "obs": OBS}))
        wait_for(lambda: not server._busy and not server._release_after, "the slot's release")
        assert len(server.batches) == 2 and server._worker.is_alive()


# --------------------------------------------------------------------- silent connections
@pytest.fixture
def impatient(policy: Any) -> Iterator[Running]:
    """A server that closes connections after 1 s of silence, with 2 places."""
    with Running(make_server(policy, max_clients=2, idle_timeout_s=1.0)) as running:
        yield running


def test_a_silent_connection_is_closed_naming_the_idle_timeout(impatient: Running) -> None:
    with raw(impatient) as ws, pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=WAIT_S)
    assert closed.value.rcvd.code == CLOSE_IDLE
    assert closed.value.rcvd.reason == "idle for 1 s (idle_timeout_s)"


def test_silent_clients_cannot_lock_robots_out(impatient: Running) -> None:
    """The probe: 16 silent clients locked every robot out for good. Here two fill the two
    places; a robot is told 'server full' and gets in once they have timed out."""
    silent = [raw(impatient) for _ in range(2)]
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            assert_serving(impatient)
            break
        except ServerError as e:  # full until the silent ones time out
            assert "1013" in str(e) and time.monotonic() < deadline, e
            time.sleep(0.05)
    for ws in silent:
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=WAIT_S)
        assert ws.close_code == CLOSE_IDLE


def test_a_request_in_a_sampler_call_is_not_idle(impatient: Running) -> None:
    """The idle clock runs only while the server waits for a message: a request held in the
    inference thread until another connection has timed out is still answered."""
    gate = Gate(impatient.server)
    with raw(impatient) as ws:
        episode = reset(ws)
        ws.send(pack({"type": "infer", "episode": episode, "obs": OBS}))
        wait_for(lambda: gate.held, "the request to reach the inference thread")
        with raw(impatient) as silent, pytest.raises(ConnectionClosed):
            silent.recv(timeout=WAIT_S)  # more than idle_timeout_s has now passed
        gate.open()
        assert_chunk(unpack(ws.recv(timeout=WAIT_S), max_items=None))


def test_the_client_reconnects_and_resumes_its_episode_after_an_idle_close(
    impatient: Running,
) -> None:
    """An idle close (4408) detaches the episode; the client's next infer reconnects, resumes
    it and gets the chunk an uninterrupted episode gets (the close drew no noise)."""
    with PolicyClient(f"127.0.0.1:{impatient.port}", timeout_s=WAIT_S) as other:
        other.reset(1)
        want, _ = other.infer(OBS)
    with PolicyClient(f"127.0.0.1:{impatient.port}", timeout_s=WAIT_S) as client:
        episode = client.reset(1)
        wait_for(lambda: client._ws.close_code is not None, "the idle close", WAIT_S)
        assert client._ws.close_code == CLOSE_IDLE
        actions, _ = client.infer(OBS)
        assert client.episode == episode
        assert (client.stats.reconnects, client.stats.resumed) == (1, 1)
        np.testing.assert_array_equal(actions, want)
        wait_for(lambda: client._ws.close_code is not None, "the second idle close", WAIT_S)
        client.end()  # reconnects, resumes and ends it
        assert client.episode is None and episode not in impatient.server._episodes


def test_a_frame_that_never_ends_and_a_handshake_that_never_starts_are_dropped(
    impatient: Running,
) -> None:
    sock = raw_socket(impatient.port)
    header = bytes([0x82, 0xFF]) + (2**20).to_bytes(8, "big") + os.urandom(4)
    sock.sendall(header + b"\0" * 100)  # announces 1 MiB, sends 100 bytes, then nothing
    bare = socket.create_connection(("127.0.0.1", impatient.port), timeout=WAIT_S)
    try:
        assert close_code_of(sock) == CLOSE_IDLE
        assert bare.recv(1024) == b""  # no handshake within the handshake timeout: dropped
    finally:
        sock.close()
        bare.close()
    assert_serving(impatient)


def test_garbage_instead_of_a_handshake_is_one_log_line(
    impatient: Running, caplog: pytest.LogCaptureFixture
) -> None:
    """websockets logs a failed handshake as an ERROR with a traceback; the server's log gets
    one WARNING line naming it."""
    with socket.create_connection(("127.0.0.1", impatient.port), timeout=WAIT_S) as sock:
        sock.sendall(b"GARBAGE\r\n\r\n")
        assert sock.recv(1024) == b""  # dropped
    wait_for(lambda: any("handshake" in r.getMessage() for r in caplog.records), "the log line")
    (line,) = [r for r in caplog.records if "handshake" in r.getMessage()]
    assert line.levelno == logging.WARNING and not line.exc_info
    assert line.getMessage() == ("opening handshake failed: InvalidMessage: did not receive a "
                                 "valid HTTP request")
    assert_serving(impatient)


def test_a_peer_that_answers_no_ping_is_dropped(policy: Any) -> None:
    server = make_server(policy, idle_timeout_s=WAIT_S, ping_interval_s=0.2, ping_timeout_s=0.2)
    with Running(server) as running:
        sock = raw_socket(running.port)
        try:
            assert close_code_of(sock) == 1011  # websockets: keepalive ping timeout
        finally:
            sock.close()


def masked_frame(payload: bytes) -> bytes:
    """A client's binary websocket frame (clients must mask), written by hand."""
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 126
    return bytes([0x82, 0x80 | len(payload)]) + mask + body


def test_a_client_that_never_reads_its_replies_is_dropped(
    policy: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that keeps asking but reads nothing fills the socket buffers with replies;
    the server's send then waits, and so do websockets' pings (they wait for the buffer too),
    so this client held its place forever. A reply not taken within idle_timeout_s drops it."""
    server = make_server(policy, max_clients=1, idle_timeout_s=1.0)
    with Running(server) as running:
        sock = raw_socket(running.port)
        try:
            sock.sendall(masked_frame(pack({"type": "metadata"})) * 20000)
            wait_for(lambda: server._connections, "the client's connection")
            wait_for(lambda: not server._connections, "the reader-less client to be dropped")
        finally:
            sock.close()
        assert_serving(running)
    assert any("dropped a client that read no reply for 1 s" in r.getMessage()
               for r in caplog.records)


# ---------------------------------------------------------------------------- stopping
def test_a_stop_ends_every_state_within_bounded_time(
    policy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stop (what SIGTERM sets) with a sampler call that never finishes by itself, a request
    queued behind it, a silent client, a client that reads none of its replies (even a close
    frame cannot reach it) and a bare TCP connection: serve() returns after the grace times;
    the queued request is told the server is shutting down, every client hears a close (1001)
    or is dropped."""
    monkeypatch.setattr(app.serving, "STOP_GRACE_S", 1.0)
    monkeypatch.setattr(app.serving, "CLOSE_TIMEOUT_S", 0.5)
    server = make_server(policy, idle_timeout_s=WAIT_S)
    running = Running(server).__enter__()
    gate = Gate(server)
    in_call, queued, silent = raw(running), raw(running), raw(running)
    bare = socket.create_connection(("127.0.0.1", running.port), timeout=WAIT_S)
    deaf = raw_socket(running.port)
    try:
        deaf.sendall(masked_frame(pack({"type": "metadata"})) * 20000)
        for ws in (in_call, queued):
            ws.send(pack({"type": "infer", "episode": reset(ws), "obs": OBS}))
        wait_for(lambda: gate.held and server._jobs.qsize() == 1, "a call and a queued job")
        assert running.stop() < WAIT_S
        for ws in (in_call, queued, silent):
            replies = []
            with pytest.raises(ConnectionClosed):
                while True:
                    replies.append(unpack(ws.recv(timeout=WAIT_S), max_items=None))
            assert ws.close_code == 1001
            assert all("infer: the server is shutting down" in refusal(r) for r in replies)
        assert bare.recv(1024) == b""
        close_code_of(deaf)  # reads what piled up, then the end of the connection
        assert running.error is None
    finally:
        gate.open()
        for ws in (in_call, queued, silent):
            ws.close()
        bare.close()
        deaf.close()
        server._worker.join(WAIT_S)  # the held call finishes now; no thread outlives the test


def test_an_inference_thread_that_dies_stops_the_server_instead_of_wedging_it(
    policy: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing a client sends can kill the inference thread; should something else (a
    BaseException in the sampler), its request gets an error, the server stops by itself with
    InferenceThreadDied (serve_policy.py: one line, exit status 1) and nobody waits forever."""
    server = make_server(policy, idle_timeout_s=WAIT_S)

    def dies(batch: list) -> None:
        raise SystemExit("the sampler called sys.exit")

    server._sample = dies
    running = Running(server).__enter__()
    try:
        with raw(running) as ws:
            episode = reset(ws)
            ws.send(pack({"type": "infer", "episode": episode, "obs": OBS}))
            try:
                reply = unpack(ws.recv(timeout=WAIT_S), max_items=None)
                assert "the inference thread stopped" in refusal(reply)
            except ConnectionClosed:
                pass  # the server went down before the reply: a close, not a hang
        assert running.stopped()
    finally:
        running.stop()
    assert isinstance(running.error, InferenceThreadDied)
    assert "SystemExit: the sampler called sys.exit" in str(running.error)
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.getMessage().startswith("the inference thread stopped") and not record.exc_info
    caplog.clear()  # the one error line this test expects


@pytest.mark.slow  # a serve_policy.py subprocess: 7-11 s here
def test_sigterm_stops_serve_policy_with_hostile_connections_open(tmp_path: Path) -> None:
    """A real serve_policy.py: SIGTERM with a silent client, a bare TCP connection, a frame
    that never ends and a request in flight exits 0 within bounded time; garbage instead of a
    handshake is one log line, and the log holds no traceback."""
    ready = tmp_path / "ready.json"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "serve_policy.py"), "port=0", f"ready_file={ready}",
         "sampler=sequential_ddim16", "threads=1"],
        cwd=ROOT, env={**os.environ, **HEADLESS}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    opened: list[Any] = []
    try:
        wait_for(lambda: ready.exists() or process.poll() is not None, "the server", 120)
        port = json.loads(ready.read_text())["port"]
        url = f"ws://127.0.0.1:{port}"
        silent = connect(url, compression=None)
        busy = connect(url, compression=None)
        opened += [silent, busy, socket.create_connection(("127.0.0.1", port)),
                   raw_socket(port)]
        opened[-1].sendall(bytes([0x82, 0xFE, 0x10, 0x00]) + os.urandom(4) + b"\0" * 10)
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as garbage:
            garbage.sendall(b"GARBAGE\r\n\r\n")
            assert garbage.recv(1024) == b""
        busy.send(pack({"type": "infer", "episode": reset(busy), "obs": OBS}))
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=WAIT_S + 15)
    finally:
        process.kill()
        for thing in opened:
            thing.close()
    assert process.returncode == 0, output
    assert "server stopped after" in output and "Traceback" not in output, output
    assert ("opening handshake failed: InvalidMessage: did not receive a valid HTTP request\n"
            in output), output


# ------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("idle_timeout_s", 0, "idle_timeout_s must be a finite number > 0; got 0"),
        ("idle_timeout_s", float("inf"), "idle_timeout_s must be a finite number > 0; got inf"),
        ("idle_timeout_s", "soon", "idle_timeout_s must be a finite number > 0; got 'soon'"),
        ("ping_interval_s", -1, "ping_interval_s must be null or a finite number > 0; got -1"),
        ("ping_timeout_s", 0, "ping_timeout_s must be null or a finite number > 0; got 0"),
        ("max_message_items", 10, "max_message_items must be an int >= 64; got 10"),
        ("max_message_items", 1.5, "max_message_items must be an int >= 64; got 1.5"),
    ],
)
def test_serving_limits_are_checked_in_one_line(serve_cfg: Any, key: str, value: Any,
                                                 message: str) -> None:
    from app.checks import ConfigError
    from app.serving import check_serve_config

    cfg = copy.deepcopy(serve_cfg)
    cfg[key] = value
    with pytest.raises(ConfigError) as error:
        check_serve_config(cfg)
    assert str(error.value) == message


@pytest.fixture(scope="module")
def serve_cfg() -> Any:
    """conf/serve.yaml as serve_policy.py composes it (the defaults pass the check)."""
    from app.command_line import compose_config
    from app.serving import check_serve_config

    cfg = compose_config("serve")
    check_serve_config(cfg)
    return cfg
